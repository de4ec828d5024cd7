//! Kernel-side fixtures for the enforcement tests: a cgroup of the test's
//! own (never the root), a private bpffs, and processes started paused
//! right after exec so a test can decide when the agent has attested them.

use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

/// A cgroup of this test's own, removed (after killing what is left in it)
/// on drop.
pub struct Cgroup(pub PathBuf);

impl Cgroup {
    pub fn new(tag: &str) -> Cgroup {
        let mnt = tether_kernel::cgroup2_mount().expect("cgroup2 mount");
        let p = mnt.join(format!("tether-cli-test-{}-{tag}", std::process::id()));
        std::fs::create_dir(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        Cgroup(p)
    }

    /// Makes `cmd` join this cgroup before it execs (while still root).
    pub fn enter(&self, cmd: &mut Command) {
        enter_cgroup(&self.0, cmd);
    }
}

/// Makes `cmd` join the cgroup at `dir` before it execs. It also drops the
/// loader variables cargo sets for test binaries (LD_LIBRARY_PATH): a
/// workload started with them has its loader steered, and no identity.
pub fn enter_cgroup(dir: &std::path::Path, cmd: &mut Command) {
    super::no_loader_env(cmd);
    let procs = dir.join("cgroup.procs");
    // SAFETY: the closure only writes a file (no locks shared with the
    // parent are taken).
    unsafe {
        cmd.pre_exec(move || std::fs::write(&procs, "0"));
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for _ in 0..300 {
            let procs = std::fs::read_to_string(self.0.join("cgroup.procs")).unwrap_or_default();
            if procs.trim().is_empty() {
                break;
            }
            for pid in procs
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                // SAFETY: kill(2) on processes this test started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// A private bpffs for pinned programs and maps, unmounted on drop.
pub struct BpfMount(pub tempfile::TempDir);

impl BpfMount {
    pub fn new() -> BpfMount {
        let d = tempfile::Builder::new()
            .prefix("tether-cli-bpffs-")
            .tempdir()
            .expect("tempdir");
        let st = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(d.path())
            .status()
            .expect("mount");
        assert!(st.success(), "mounting bpffs failed");
        BpfMount(d)
    }
}

impl Drop for BpfMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

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
