//! What the kernel's exec record says about a process, turned into the
//! checks attestation applies (pure; no I/O).
//!
//! The kernel recorded, before any of the new image's code ran: which file
//! was executed, whether the environment steers the dynamic loader, whether
//! the process sees mounts a user made or runs in a chroot, and whether the
//! file lives on a filesystem its user controls. Since then it marks a
//! process someone traced or whose memory or exe link was changed. Those
//! facts outrank anything /proc says now.

use tether_attest::{ExecCheck, FileAccess, ProcessInfo};
use tether_kernel::{ExecFlags, ExecRecord};

/// How far attestation may touch the executable: not at all when the
/// kernel says its file or the mounts around it are a user's own (opening
/// a FUSE file can block; a private mount can show anything), or when
/// there is no record to check it against.
pub fn file_access(rec: Option<&ExecRecord>) -> FileAccess {
    match rec {
        Some(r)
            if r.exec_id != 0
                && !r.flags.tainted()
                && !r.flags.has(
                    ExecFlags::UNTRUSTED_FS | ExecFlags::USERNS_MOUNTS | ExecFlags::CHROOT,
                ) =>
        {
            FileAccess::Full
        }
        _ => FileAccess::LinksOnly,
    }
}

/// The checks for a process attested with `access`, against its record.
/// `host_mnt_ns` is the agent's own mount namespace (the host's view).
pub fn exec_check(
    rec: Option<&ExecRecord>,
    info: &ProcessInfo,
    access: FileAccess,
    host_mnt_ns: u32,
) -> ExecCheck {
    let mut c = ExecCheck::default();
    let Some(rec) = rec.filter(|r| r.exec_id != 0) else {
        c.blocking.push(
            "no exec record: the process started before Tether's kernel programs were loaded \
             (or the record table was full); it gets an identity once it execs again"
                .into(),
        );
        return c;
    };
    c.executed = Some(rec.name.clone());
    let f = rec.flags;
    if f.tainted() {
        let marks = ExecFlags(f.0 & ExecFlags::TAINTS).names();
        c.blocking.push(format!(
            "marked since its exec ({}) by pid {}: its memory or image may not be what was executed",
            marks.join(", "),
            rec.tracer
        ));
    }
    if access == FileAccess::Full && (info.exe_dev, info.exe_ino) != (rec.dev, rec.ino) {
        c.blocking.push(format!(
            "its exe link names another file ({}:{}) than the one it executed ({}:{}, {:?})",
            info.exe_dev, info.exe_ino, rec.dev, rec.ino, rec.name
        ));
    }
    // An environment too large to scan counts as every loader variable.
    // The rest: user-owned mounts, a chroot, a filesystem its user
    // controls, an inherited seccomp listener (its supervisor can answer
    // the loader's opens with descriptors of its own) and a user namespace
    // (where it may hold every capability; rootless containers do). Each
    // acceptable by name with spec.allowExec.
    let env = if f.has(ExecFlags::ENV_UNSCANNED) {
        ExecFlags::ENV
    } else {
        0
    };
    let acceptable = ExecFlags::ENV
        | ExecFlags::USERNS_MOUNTS
        | ExecFlags::CHROOT
        | ExecFlags::UNTRUSTED_FS
        | ExecFlags::SECCOMP_NOTIFY
        | ExecFlags::USER_NS;
    c.findings.extend(
        ExecFlags((f.0 | env) & acceptable)
            .names()
            .into_iter()
            .map(String::from),
    );
    // Another mount namespace than the host's, even one root made (a
    // container's, a sandboxed unit's): its /etc/ld.so.preload, loader and
    // libraries may not be the host's, and whoever is root there can write
    // them. A user's own (USERNS_MOUNTS) is named the same.
    if rec.mnt_ns != host_mnt_ns && !c.findings.iter().any(|f| f == "mount-namespace") {
        c.findings.push("mount-namespace".into());
    }
    if access == FileAccess::Full && !info.interpreter_standard {
        c.findings.push("interpreter".into());
    }
    c
}

/// One line for audit records and `whoami`: why the exec checks refuse a
/// process, or None when they pass (for an identity accepting `allowed`).
pub fn refusal(check: &ExecCheck, allowed: &[String]) -> Option<String> {
    if let Some(b) = check.blocking.first() {
        return Some(b.clone());
    }
    let failed: Vec<&str> = check
        .findings
        .iter()
        .filter(|f| !allowed.contains(f))
        .map(String::as_str)
        .collect();
    (!failed.is_empty()).then(|| {
        format!(
            "exec checks failed: {} (an identity may accept them with spec.allowExec)",
            failed.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST_MNT: u32 = 4026531841;

    fn rec(flags: u32) -> ExecRecord {
        ExecRecord {
            exec_id: 5,
            start_ns: 1,
            ino: 42,
            dev: 7,
            flags: ExecFlags(flags),
            tracer: 99,
            mnt_ns: HOST_MNT,
            name: "redis-cli".into(),
        }
    }

    fn info() -> ProcessInfo {
        ProcessInfo {
            exe_dev: 7,
            exe_ino: 42,
            interpreter_standard: true,
            ..ProcessInfo::default()
        }
    }

    #[test]
    fn a_clean_exec_passes() {
        let r = rec(0);
        assert_eq!(file_access(Some(&r)), FileAccess::Full);
        let c = exec_check(Some(&r), &info(), FileAccess::Full, HOST_MNT);
        assert!(c.findings.is_empty() && c.blocking.is_empty(), "{c:?}");
        assert_eq!(c.executed.as_deref(), Some("redis-cli"));
        assert_eq!(refusal(&c, &[]), None);
    }

    #[test]
    fn what_cannot_be_accepted() {
        // No record.
        let c = exec_check(None, &info(), FileAccess::LinksOnly, HOST_MNT);
        assert!(c.blocking[0].contains("no exec record"));
        assert_eq!(file_access(None), FileAccess::LinksOnly);
        // A forged exe link.
        let mut i = info();
        i.exe_ino = 43;
        let c = exec_check(Some(&rec(0)), &i, FileAccess::Full, HOST_MNT);
        assert!(c.blocking[0].contains("another file"), "{c:?}");
        // Marked.
        let r = rec(ExecFlags::PTRACE);
        assert_eq!(file_access(Some(&r)), FileAccess::LinksOnly);
        let c = exec_check(Some(&r), &info(), FileAccess::LinksOnly, HOST_MNT);
        assert!(c.blocking[0].contains("ptrace attach") && c.blocking[0].contains("99"));
        assert!(refusal(&c, &["LD_PRELOAD".into()]).is_some());
    }

    #[test]
    fn every_finding_has_a_name_an_identity_can_accept() {
        let mut i = info();
        i.interpreter_standard = false;
        let c = exec_check(
            Some(&rec(!ExecFlags::TAINTS)),
            &i,
            FileAccess::Full,
            HOST_MNT,
        );
        assert!(c.blocking.is_empty(), "{c:?}");
        let mut found = c.findings.clone();
        found.sort();
        let mut all: Vec<String> = tether_attest::EXEC_CHECKS
            .iter()
            .map(|s| s.to_string())
            .collect();
        all.sort();
        assert_eq!(found, all);
    }

    #[test]
    fn what_an_identity_may_accept() {
        let r = rec(ExecFlags::LD_PRELOAD | ExecFlags::USERNS_MOUNTS);
        assert_eq!(file_access(Some(&r)), FileAccess::LinksOnly);
        let c = exec_check(Some(&r), &info(), FileAccess::LinksOnly, HOST_MNT);
        assert_eq!(c.findings, ["LD_PRELOAD", "mount-namespace"]);
        assert!(c.blocking.is_empty());
        let why = refusal(&c, &["LD_PRELOAD".into()]).expect("refused");
        assert!(why.contains("mount-namespace") && !why.contains("LD_PRELOAD"));
        assert_eq!(
            refusal(&c, &["LD_PRELOAD".into(), "mount-namespace".into()]),
            None
        );
        // An environment too large to scan counts as every variable.
        let c = exec_check(
            Some(&rec(ExecFlags::ENV_UNSCANNED)),
            &info(),
            FileAccess::Full,
            HOST_MNT,
        );
        assert_eq!(c.findings.len(), 7);
        assert!(c.findings.iter().any(|f| f == "runtime-env"));
        // A non-standard ELF interpreter.
        let mut i = info();
        i.interpreter_standard = false;
        let c = exec_check(Some(&rec(0)), &i, FileAccess::Full, HOST_MNT);
        assert_eq!(c.findings, ["interpreter"]);
        // A seccomp listener inherited, a user namespace.
        let c = exec_check(
            Some(&rec(ExecFlags::SECCOMP_NOTIFY | ExecFlags::USER_NS)),
            &info(),
            FileAccess::Full,
            HOST_MNT,
        );
        assert_eq!(c.findings, ["seccomp-notify", "user-namespace"]);
        // Another mount namespace than the host's, though root made it (a
        // container's): named once, also with user-owned mounts.
        let mut r = rec(0);
        r.mnt_ns = HOST_MNT + 1;
        let c = exec_check(Some(&r), &info(), FileAccess::Full, HOST_MNT);
        assert_eq!(c.findings, ["mount-namespace"]);
        r.flags = ExecFlags(ExecFlags::USERNS_MOUNTS);
        let c = exec_check(Some(&r), &info(), FileAccess::Full, HOST_MNT);
        assert_eq!(c.findings, ["mount-namespace"]);
    }
}
