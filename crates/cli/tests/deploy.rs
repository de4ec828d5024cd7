//! The shipped deployment files: the systemd unit runs the agent with
//! flags it has, and systemd accepts the unit as written.

mod common;

use std::process::Command;

const UNIT: &str = include_str!("../../../deploy/tether-agent.service");

#[test]
fn the_systemd_unit_uses_real_flags_and_systemd_accepts_it() {
    let help = Command::new(common::TETHER)
        .args(["agent", "--help"])
        .output()
        .expect("tether agent --help");
    let help = String::from_utf8_lossy(&help.stdout);
    let flags: Vec<&str> = UNIT
        .split_whitespace()
        .filter(|w| w.starts_with("--"))
        .collect();
    assert!(flags.len() >= 10, "ExecStart flags: {flags:?}");
    for f in flags {
        assert!(
            help.contains(&format!("{f} ")),
            "the unit passes {f}, which `tether agent` does not take"
        );
    }
    // systemd's own parser, with the binary this build made and the
    // environment file optional (neither is installed here).
    let dir = tempfile::tempdir().expect("tempdir");
    let unit = dir.path().join("tether-agent.service");
    std::fs::write(
        &unit,
        UNIT.replace("/usr/local/bin/tether", common::TETHER)
            .replace("EnvironmentFile=/etc", "EnvironmentFile=-/etc"),
    )
    .expect("write unit");
    let o = Command::new(common::servers::which("systemd-analyze"))
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && err.trim().is_empty(),
        "systemd-analyze verify: {err}"
    );
}
