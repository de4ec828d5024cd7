//! A kernel test that cannot run its subject fails and says why; it skips
//! only when the run asks for that, and then the skip is printed. Shown by
//! running this binary's own `needs_the_kernel` as an unprivileged user.

mod common;

use std::process::Command;

/// A fixture for the test below, not a test of its own: it only asks for
/// what every kernel test needs.
#[test]
#[ignore = "run by as_non_root_a_kernel_test_fails_naming_root"]
fn needs_the_kernel() {
    // False only when skipping is allowed; the skip is printed then.
    let _ = common::can_run();
}

fn run_as_nobody(allow_skip: bool) -> (bool, String) {
    let me = std::env::current_exe().expect("own binary");
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&me)
        .args([
            "--ignored",
            "--exact",
            "needs_the_kernel",
            "--test-threads=1",
        ]);
    tether_test_support::no_loader_env(&mut cmd);
    cmd.env_remove(tether_test_support::ALLOW_SKIP);
    if allow_skip {
        cmd.env(tether_test_support::ALLOW_SKIP, "1");
    }
    let out = cmd.output().expect("setpriv runs (util-linux)");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn as_non_root_a_kernel_test_fails_naming_root() {
    assert!(common::can_run());
    let (ok, text) = run_as_nobody(false);
    assert!(!ok, "a kernel test without root must fail:\n{text}");
    assert!(
        text.contains("need root"),
        "the failure names what is missing:\n{text}"
    );
    assert!(!text.contains("SKIPPED"), "{text}");

    let (ok, text) = run_as_nobody(true);
    assert!(ok, "with the allow-skip variable it passes:\n{text}");
    assert!(
        text.contains("SKIPPED needs_the_kernel: the kernel tests load BPF programs and need root"),
        "and says it skipped:\n{text}"
    );
}
