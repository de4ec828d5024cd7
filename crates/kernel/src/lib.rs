//! The kernel half of Tether's connection-time enforcement.
//!
//! `bpf/tether.bpf.c` (C, compiled by clang in `build.rs`) holds:
//!
//! * cgroup `connect4`/`connect6`/`sendmsg4`/`sendmsg6` hooks. A destination
//!   that no service covers is untouched. For a protected one the hook looks
//!   up the calling process (`procs`, by tgid) and its verdict for the
//!   service (`policy`): allow passes, anything else fails the call with
//!   EPERM, and every such decision is one record in the `events` ring
//!   buffer. A TCP connect by a process not attested yet is held: redirected
//!   to the agent, which attests, decides and completes or refuses it.
//! * `getpeername4`/`getpeername6` hooks that report a held connection's
//!   original destination, and a `sock_ops` program that publishes each held
//!   connection under its client address and port for the agent to claim.
//! * raw tracepoints on `sched_process_exec` (clears the process's verdicts
//!   before the new image runs), `sched_process_fork` (a new process inherits
//!   its parent's) and `sched_process_exit` (frees them).
//!
//! [`Enforcer`] loads and attaches them with aya, pins them so enforcement
//! survives the agent (fail closed), adopts pinned state on restart, and
//! gives typed access to the maps. The agent decides; this crate only
//! stores decisions where the kernel can apply them.

mod abi;
#[cfg(test)]
mod abi_btf;
mod enforcer;
mod error;
mod events;
mod sys;

use std::path::PathBuf;

pub use abi::{
    Decision, DstPrefix, Event, EventError, ExecFlags, ExecRecord, HeldConnection, Hook,
    PROC_EV_EXEC, PROC_EV_EXIT, PROC_EV_FORK, Proto, Reason, ServiceFlags, decode,
};
pub use enforcer::{
    DetachReport, Enforcer, EnforcerConfig, ExecId, HoldConfig, ProcessEntry, Stats, VerdictEntry,
    always_local, enable_run_stats,
};
pub use error::KernelError;
pub use events::EventReader;
pub use sys::{netns_cookie, socket_netns_cookie};

/// CLOCK_BOOTTIME in nanoseconds: the clock of exec ids, process starts,
/// event times and verdict expiry.
pub fn boottime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &raw mut ts) } != 0 {
        return 0;
    }
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Where cgroup v2 is mounted, from `/proc/mounts` (the first `cgroup2`
/// entry). Never hard-code it: hosts mount it at `/sys/fs/cgroup` or, in
/// hybrid setups, at `/sys/fs/cgroup/unified`.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    parse_cgroup2_mount(&mounts)
}

fn parse_cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut f = line.split_ascii_whitespace();
        let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(dir)))
    })
}

/// /proc/mounts escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = b[i + 1..i + 4]
                .iter()
                .fold(0u32, |a, c| a * 8 + u32::from(c - b'0'));
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_among_mounts() {
        let m = "sysfs /sys sysfs rw 0 0\n\
                 tmpfs /sys/fs/cgroup tmpfs ro 0 0\n\
                 cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";
        assert_eq!(
            parse_cgroup2_mount(m),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(parse_cgroup2_mount("proc /proc proc rw 0 0\n"), None);
        assert_eq!(
            parse_cgroup2_mount("x /a\\040b cgroup2 rw 0 0"),
            Some(PathBuf::from("/a b"))
        );
        assert_eq!(
            parse_cgroup2_mount("x /a\\04 cgroup2 rw 0 0"),
            Some(PathBuf::from("/a\\04"))
        );
        assert_eq!(parse_cgroup2_mount("garbage"), None);
    }
}
