//! Kernel-side fixtures for the enforcement tests: a cgroup of the test's
//! own (never the root), a private bpffs, and processes started paused
//! right after exec so a test can decide when the agent has attested them.

use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command};

#[allow(unused_imports, reason = "each test binary uses a different subset")]
pub use tether_test_support::{BpfFs, Cgroup, enter_cgroup};

/// Switches to `uid` (and gid = uid, no supplementary groups) just before
/// exec. Registered after [`Cgroup::enter`], so the cgroup move still runs
/// as root.
pub fn become_uid(cmd: &mut Command, uid: u32) {
    become_user(cmd, uid, uid);
}

/// As [`become_uid`], with a separate gid.
pub fn become_user(cmd: &mut Command, uid: u32, gid: u32) {
    // SAFETY: only async-signal-safe libc calls.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A process stopped at its first instruction after exec (ptrace), so a
/// test can wait until the agent has attested the image before it runs.
pub struct Paused {
    pub child: Child,
}

impl Paused {
    /// Spawns `cmd` traced: the kernel stops it with SIGTRAP right after
    /// the exec, before the new image runs. Call from the thread that will
    /// call [`Paused::release`] (ptrace ties the tracer to the thread).
    pub fn spawn(cmd: &mut Command) -> Paused {
        // SAFETY: ptrace(PTRACE_TRACEME) is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn paused process");
        let mut status = 0;
        // SAFETY: waitpid on our own child.
        let r = unsafe { libc::waitpid(child.id() as i32, &mut status, 0) };
        assert!(
            r > 0 && libc::WIFSTOPPED(status) && libc::WSTOPSIG(status) == libc::SIGTRAP,
            "process {} did not stop after exec (status {status:#x})",
            child.id()
        );
        Paused { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Lets it run (detaching the tracer).
    pub fn release(self) -> Child {
        // SAFETY: detaching from our own stopped tracee.
        let r = unsafe { libc::ptrace(libc::PTRACE_DETACH, self.child.id() as i32, 0, 0) };
        assert_eq!(r, 0, "PTRACE_DETACH: {}", std::io::Error::last_os_error());
        self.child
    }
}
