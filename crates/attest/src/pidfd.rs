//! Process file descriptors (pidfds).
//!
//! A pid is only a number and the kernel recycles it; a pidfd refers to one
//! specific process for as long as the fd is open. Attestation reads /proc by
//! pid and then asks the pidfd whether that process is still alive: if it
//! is, the pid cannot have been handed to anyone else in between.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use crate::process::AttestError;

/// `SO_PEERPIDFD` from `<asm-generic/socket.h>` (Linux 6.5+); defined here
/// because not every libc release exports it.
const SO_PEERPIDFD: libc::c_int = 77;

/// A pidfd together with the pid it referred to when it was obtained.
#[derive(Debug)]
pub struct PidFd {
    fd: OwnedFd,
    pid: i32,
}

impl PidFd {
    /// Opens a pidfd for `pid` with `pidfd_open(2)`.
    ///
    /// `pid` must be a process (thread-group leader), not a thread id.
    pub fn open(pid: i32) -> Result<PidFd, AttestError> {
        if pid <= 0 {
            return Err(AttestError::InvalidPid { pid });
        }
        // SAFETY: pidfd_open takes (pid_t, unsigned int) and returns a new fd
        // or -1; no pointers are involved.
        let ret =
            unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0 as libc::c_uint) };
        if ret < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ESRCH) {
                return Err(AttestError::Exited { pid });
            }
            return Err(AttestError::PidFdOpen { pid, source: err });
        }
        let raw = RawFd::try_from(ret).map_err(|_| AttestError::PidFdOpen {
            pid,
            source: io::Error::other("pidfd_open returned an out-of-range fd"),
        })?;
        // SAFETY: the kernel just returned this fd to us and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(PidFd { fd, pid })
    }

    /// Wraps a pidfd obtained elsewhere (e.g. `SO_PEERPIDFD`, `clone3`).
    ///
    /// The pid is learned from the `Pid:` line of `/proc/self/fdinfo/<fd>`,
    /// which the kernel only prints for pidfds. `-1` means the process has
    /// already exited (reported as [`AttestError::Exited`] with pid -1);
    /// `0` means it lives in a pid namespace we cannot see.
    pub fn from_owned(fd: OwnedFd) -> Result<PidFd, AttestError> {
        let raw = fd.as_raw_fd();
        let path = format!("/proc/self/fdinfo/{raw}");
        let text = std::fs::read_to_string(&path).map_err(|source| AttestError::FdInfo {
            fd: raw,
            what: format!("reading {path}: {source}"),
        })?;
        let pid = parse_fdinfo_pid(&text).ok_or_else(|| AttestError::FdInfo {
            fd: raw,
            what: format!("{path} has no valid \"Pid:\" line; not a pidfd"),
        })?;
        match pid {
            -1 => Err(AttestError::Exited { pid: -1 }),
            0 => Err(AttestError::FdInfo {
                fd: raw,
                what: "process is in a pid namespace not visible from here".into(),
            }),
            p if p > 0 => Ok(PidFd { fd, pid: p }),
            p => Err(AttestError::FdInfo {
                fd: raw,
                what: format!("unexpected pid {p} in {path}"),
            }),
        }
    }

    /// The pid this pidfd referred to when it was opened.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// True while the process exists (including as an unreaped zombie, whose
    /// pid cannot be reused either).
    pub fn is_alive(&self) -> bool {
        // SAFETY: pidfd_send_signal(int, int, siginfo_t *, unsigned int);
        // signal 0 only checks existence and a NULL siginfo is allowed.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                0 as libc::c_int,
                std::ptr::null::<libc::siginfo_t>(),
                0 as libc::c_uint,
            )
        };
        if ret == 0 {
            return true;
        }
        // EPERM means the process exists but we may not signal it (an
        // unprivileged agent); only ESRCH means it is gone.
        io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }

    /// Borrows the underlying fd (e.g. to poll it for exit).
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsFd for PidFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for PidFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Finds the `Pid:` value in a pidfd's fdinfo text.
fn parse_fdinfo_pid(text: &str) -> Option<i32> {
    text.lines()
        .find_map(|line| line.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse::<i32>().ok())
}

/// Returns a pidfd for the process at the other end of a Unix socket
/// (`getsockopt(SO_PEERPIDFD)`, Linux 6.5+). Unlike `SO_PEERCRED`'s pid this
/// cannot be confused by pid reuse.
pub fn peer_pidfd(sock: BorrowedFd<'_>) -> Result<PidFd, AttestError> {
    let mut value: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: value and len are valid for writes and len holds value's size.
    let ret = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&raw mut value).cast::<libc::c_void>(),
            &mut len,
        )
    };
    if ret != 0 {
        let err = io::Error::last_os_error();
        // The kernel reports a peer that already exited as ESRCH.
        if err.raw_os_error() == Some(libc::ESRCH) {
            return Err(AttestError::Exited { pid: -1 });
        }
        return Err(AttestError::PeerPidFd { source: err });
    }
    if value < 0 || len as usize != std::mem::size_of::<libc::c_int>() {
        return Err(AttestError::PeerPidFd {
            source: io::Error::other(format!("SO_PEERPIDFD returned fd {value} (len {len})")),
        });
    }
    // SAFETY: the kernel installed a new fd for us; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(value) };
    PidFd::from_owned(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn fdinfo_pid_parsing() {
        assert_eq!(
            parse_fdinfo_pid("pos:\t0\nflags:\t02000002\nPid:\t42\nNSpid:\t42\n"),
            Some(42)
        );
        assert_eq!(parse_fdinfo_pid("Pid:\t-1\n"), Some(-1));
        assert_eq!(parse_fdinfo_pid("pos:\t0\nflags:\t0\n"), None);
        assert_eq!(parse_fdinfo_pid("Pid:\tabc\n"), None);
    }

    #[test]
    fn open_self_is_alive() {
        let me = std::process::id() as i32;
        let fd = PidFd::open(me).unwrap();
        assert_eq!(fd.pid(), me);
        assert!(fd.is_alive());
        // Round trip through from_owned learns the same pid from fdinfo.
        let dup = fd.as_fd().try_clone_to_owned().unwrap();
        assert_eq!(PidFd::from_owned(dup).unwrap().pid(), me);
    }

    #[test]
    fn from_owned_rejects_non_pidfd() {
        let f = std::fs::File::open("/proc/self/stat").unwrap();
        assert!(matches!(
            PidFd::from_owned(f.into()),
            Err(AttestError::FdInfo { .. })
        ));
    }

    #[test]
    fn open_rejects_nonpositive() {
        assert!(PidFd::open(0).is_err());
        assert!(PidFd::open(-5).is_err());
    }

    #[test]
    fn peer_pidfd_on_socketpair_is_self() {
        let (a, _b) = UnixStream::pair().unwrap();
        let pfd = peer_pidfd(a.as_fd()).unwrap();
        assert_eq!(pfd.pid(), std::process::id() as i32);
        assert!(pfd.is_alive());
    }

    #[test]
    fn reaped_child_is_not_alive() {
        let mut child = std::process::Command::new("/bin/true").spawn().unwrap();
        let fd = PidFd::open(child.id() as i32).unwrap();
        child.wait().unwrap();
        assert!(!fd.is_alive());
    }
}
