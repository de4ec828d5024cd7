//! Kernel process events from the proc connector (`NETLINK_CONNECTOR`).
//!
//! The agent re-attests a process when it execs, forks, exits or changes
//! credentials. Messages are decoded by hand from byte offsets with bounds
//! checks; no length found in a datagram is trusted.
//!
//! Events are hints, not facts: the agent must still attest through a pidfd.
//! An `Exit` reports the thread-group leader's exit, which can precede the
//! exit of the remaining threads.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

// Constants from <linux/netlink.h>, <linux/connector.h>, <linux/cn_proc.h>;
// spelled out because libc does not export all of them for every target.
const NETLINK_CONNECTOR: libc::c_int = 11;
const NLMSG_DONE: u16 = 3;
const NLMSG_HDRLEN: usize = 16;
const CN_MSG_LEN: usize = 20;
const CN_IDX_PROC: u32 = 1;
const CN_VAL_PROC: u32 = 1;
const PROC_CN_MCAST_LISTEN: u32 = 1;
const PROC_CN_MCAST_IGNORE: u32 = 2;
const PROC_EVENT_NONE: u32 = 0;
const PROC_EVENT_FORK: u32 = 0x0000_0001;
const PROC_EVENT_EXEC: u32 = 0x0000_0002;
const PROC_EVENT_UID: u32 = 0x0000_0004;
const PROC_EVENT_GID: u32 = 0x0000_0040;
const PROC_EVENT_EXIT: u32 = 0x8000_0000;
/// struct proc_event: what, cpu, timestamp_ns, then the union.
const EVENT_DATA: usize = 16;
/// Receive buffer requested from the kernel; bursts of forks are large.
const RCVBUF_BYTES: libc::c_int = 8 * 1024 * 1024;
const ACK_TIMEOUT: Duration = Duration::from_secs(2);

/// A process-level event. Thread-level forks and exits are filtered out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcEvent {
    /// The process (thread group) `pid` replaced its program.
    Exec { pid: i32 },
    /// Process `parent` created process `child` (not a thread).
    Fork { parent: i32, child: i32 },
    /// The thread-group leader `pid` exited.
    Exit { pid: i32 },
    /// Credentials of `pid` changed (setuid family, and also the setgid
    /// family, since gids are selectors too).
    Uid { pid: i32 },
    /// The kernel dropped events (ENOBUFS); the caller must rescan /proc.
    Overrun,
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    let bytes = b.get(off..off.checked_add(2)?)?;
    Some(u16::from_ne_bytes(bytes.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    let bytes = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_ne_bytes(bytes.try_into().ok()?))
}

fn i32_at(b: &[u8], off: usize) -> Option<i32> {
    u32_at(b, off).map(|v| v as i32)
}

/// One proc-connector message: cn_msg.ack and the proc_event bytes.
struct RawEvent<'a> {
    ack: u32,
    what: u32,
    event: &'a [u8],
}

/// Walks the netlink messages of one datagram, calling `f` for each proc
/// connector message. Malformed or truncated input ends or skips quietly.
fn walk(buf: &[u8], mut f: impl FnMut(RawEvent<'_>)) {
    let mut off = 0usize;
    while let Some(rest) = buf.get(off..) {
        let Some(len) = u32_at(rest, 0).map(|l| l as usize) else {
            break;
        };
        if len < NLMSG_HDRLEN || len > rest.len() {
            break;
        }
        if u16_at(rest, 4) == Some(NLMSG_DONE)
            && let Some(raw) = rest.get(NLMSG_HDRLEN..len).and_then(parse_cn_msg)
        {
            f(raw);
        }
        // Messages are 4-byte aligned within a datagram.
        let Some(next) = len
            .checked_add(3)
            .map(|l| l & !3)
            .and_then(|l| off.checked_add(l))
        else {
            break;
        };
        off = next;
    }
}

fn parse_cn_msg(msg: &[u8]) -> Option<RawEvent<'_>> {
    if u32_at(msg, 0)? != CN_IDX_PROC || u32_at(msg, 4)? != CN_VAL_PROC {
        return None;
    }
    let ack = u32_at(msg, 12)?;
    let data_len = usize::from(u16_at(msg, 16)?);
    let event = msg.get(CN_MSG_LEN..)?.get(..data_len)?;
    let what = u32_at(event, 0)?;
    Some(RawEvent { ack, what, event })
}

fn decode(raw: &RawEvent<'_>) -> Option<ProcEvent> {
    let e = raw.event;
    let positive = |v: i32| (v > 0).then_some(v);
    match raw.what {
        PROC_EVENT_FORK => {
            let parent_tgid = positive(i32_at(e, EVENT_DATA + 4)?)?;
            let child_pid = positive(i32_at(e, EVENT_DATA + 8)?)?;
            let child_tgid = positive(i32_at(e, EVENT_DATA + 12)?)?;
            // A new thread has the parent's tgid, not its own.
            (child_pid == child_tgid).then_some(ProcEvent::Fork {
                parent: parent_tgid,
                child: child_tgid,
            })
        }
        PROC_EVENT_EXEC => Some(ProcEvent::Exec {
            pid: positive(i32_at(e, EVENT_DATA + 4)?)?,
        }),
        PROC_EVENT_UID | PROC_EVENT_GID => Some(ProcEvent::Uid {
            pid: positive(i32_at(e, EVENT_DATA + 4)?)?,
        }),
        PROC_EVENT_EXIT => {
            let pid = positive(i32_at(e, EVENT_DATA)?)?;
            let tgid = positive(i32_at(e, EVENT_DATA + 4)?)?;
            (pid == tgid).then_some(ProcEvent::Exit { pid })
        }
        _ => None,
    }
}

/// Parses every proc-connector message in one netlink datagram, appending
/// process-level events to `out`. Never panics, whatever the bytes.
pub fn parse_datagram(buf: &[u8], out: &mut Vec<ProcEvent>) {
    walk(buf, |raw| out.extend(decode(&raw)));
}

/// A netlink socket subscribed to kernel process events. Needs
/// CAP_NET_ADMIN in the initial user namespace.
#[derive(Debug)]
pub struct ProcConnector {
    fd: OwnedFd,
    port: u32,
    /// Events that arrived while waiting for the subscription ack.
    pending: Vec<ProcEvent>,
    buf: Vec<u8>,
}

/// struct sockaddr_nl, declared locally for the same reason as the constants.
#[repr(C)]
struct SockaddrNl {
    nl_family: libc::sa_family_t,
    nl_pad: u16,
    nl_pid: u32,
    nl_groups: u32,
}

fn ctx(what: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("proc connector: {what}: {e}"))
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: value lives across the call and its size is passed.
    let ret = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast::<libc::c_void>(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Tags for our control messages, so we recognise our own ack among those
/// multicast to every listener. The tag travels in cn_msg.ack because the
/// kernel (6.x) overwrites the ack's seq with its own event counter.
static NEXT_TAG: AtomicU32 = AtomicU32::new(1);

impl ProcConnector {
    /// Opens the socket, subscribes, and waits for the kernel's ack so that
    /// a missing privilege is an error here rather than silence later.
    /// Events from before `open` returns are not guaranteed: rescan /proc
    /// after opening.
    pub fn open() -> io::Result<ProcConnector> {
        // SAFETY: plain socket(2) call.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                NETLINK_CONNECTOR,
            )
        };
        if raw < 0 {
            return Err(ctx(
                "socket(AF_NETLINK, NETLINK_CONNECTOR)",
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: fresh fd owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };

        // Bursts (a build forking thousands of processes) overflow the
        // default buffer; FORCE passes rmem_max when we have CAP_NET_ADMIN.
        if setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, RCVBUF_BYTES).is_err() {
            setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_RCVBUF, RCVBUF_BYTES)
                .map_err(|e| ctx("setsockopt(SO_RCVBUF)", e))?;
        }

        let addr = SockaddrNl {
            nl_family: libc::AF_NETLINK as libc::sa_family_t,
            nl_pad: 0,
            nl_pid: 0, // let the kernel pick our port id
            nl_groups: CN_IDX_PROC,
        };
        // SAFETY: addr is a valid sockaddr_nl and its size is passed.
        let ret = unsafe {
            libc::bind(
                raw,
                (&raw const addr).cast::<libc::sockaddr>(),
                std::mem::size_of::<SockaddrNl>() as libc::socklen_t,
            )
        };
        if ret != 0 {
            return Err(ctx(
                "bind to CN_IDX_PROC (needs CAP_NET_ADMIN)",
                io::Error::last_os_error(),
            ));
        }
        let mut bound = SockaddrNl {
            nl_family: 0,
            nl_pad: 0,
            nl_pid: 0,
            nl_groups: 0,
        };
        let mut len = std::mem::size_of::<SockaddrNl>() as libc::socklen_t;
        // SAFETY: bound/len are valid for writes of the advertised size.
        let ret =
            unsafe { libc::getsockname(raw, (&raw mut bound).cast::<libc::sockaddr>(), &mut len) };
        if ret != 0 {
            return Err(ctx("getsockname", io::Error::last_os_error()));
        }

        let mut conn = ProcConnector {
            fd,
            port: bound.nl_pid,
            pending: Vec::new(),
            buf: vec![0u8; 64 * 1024],
        };
        let tag = conn
            .send_control(PROC_CN_MCAST_LISTEN)
            .map_err(|e| ctx("send listen", e))?;
        conn.wait_ack(tag)?;
        Ok(conn)
    }

    /// Sends a PROC_CN_MCAST_* op to the kernel; returns the tag whose
    /// successor the ack will carry in cn_msg.ack.
    fn send_control(&self, op: u32) -> io::Result<u32> {
        // Mixing in the pid keeps tags of concurrent agents apart; the
        // bounds keep tag + 1 nonzero (events carry ack 0).
        let tag = (NEXT_TAG.fetch_add(1, Ordering::Relaxed) ^ (std::process::id() << 12)) | 1;
        let tag = tag.min(u32::MAX - 1);
        let total = NLMSG_HDRLEN + CN_MSG_LEN + 4;
        let mut msg = Vec::with_capacity(total);
        // struct nlmsghdr
        msg.extend_from_slice(&(total as u32).to_ne_bytes());
        msg.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        msg.extend_from_slice(&0u16.to_ne_bytes()); // flags
        msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
        msg.extend_from_slice(&self.port.to_ne_bytes());
        // struct cn_msg
        msg.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
        msg.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
        msg.extend_from_slice(&tag.to_ne_bytes()); // ack
        msg.extend_from_slice(&4u16.to_ne_bytes()); // len
        msg.extend_from_slice(&0u16.to_ne_bytes()); // flags
        // The legacy 4-byte op (rather than struct proc_input) works on
        // every kernel and subscribes to all event types.
        msg.extend_from_slice(&op.to_ne_bytes());
        let kernel = SockaddrNl {
            nl_family: libc::AF_NETLINK as libc::sa_family_t,
            nl_pad: 0,
            nl_pid: 0,
            nl_groups: 0,
        };
        // SAFETY: msg and kernel are valid for the lengths passed.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast::<libc::c_void>(),
                msg.len(),
                0,
                (&raw const kernel).cast::<libc::sockaddr>(),
                std::mem::size_of::<SockaddrNl>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != msg.len() {
            return Err(io::Error::other("short send"));
        }
        Ok(tag)
    }

    fn wait_ack(&mut self, tag: u32) -> io::Result<()> {
        self.set_read_timeout(Some(ACK_TIMEOUT))?;
        let result = loop {
            let n = match self.recv_datagram() {
                Ok(Some(n)) => n,
                Ok(None) => continue,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    self.pending.push(ProcEvent::Overrun);
                    continue;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    break Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "proc connector: no acknowledgement for the listen request \
                         (missing CAP_NET_ADMIN in the initial user namespace?)",
                    ));
                }
                Err(e) => break Err(ctx("recv", e)),
            };
            let mut ack_err = None;
            let pending = &mut self.pending;
            walk(&self.buf[..n], |raw| {
                if raw.what == PROC_EVENT_NONE && raw.ack == tag.wrapping_add(1) {
                    ack_err = Some(u32_at(raw.event, EVENT_DATA).unwrap_or(0));
                } else {
                    pending.extend(decode(&raw));
                }
            });
            match ack_err {
                None => continue,
                Some(0) => break Ok(()),
                Some(errno) => {
                    let e = io::Error::from_raw_os_error(errno as i32);
                    break Err(ctx("kernel refused the listen request", e));
                }
            }
        };
        self.set_read_timeout(None)?;
        result
    }

    /// One recv into `self.buf`. Ok(None) for a datagram not from the
    /// kernel (another process cannot forge proc events).
    fn recv_datagram(&mut self) -> io::Result<Option<usize>> {
        loop {
            let mut from = SockaddrNl {
                nl_family: 0,
                nl_pad: 0,
                nl_pid: u32::MAX,
                nl_groups: 0,
            };
            let mut from_len = std::mem::size_of::<SockaddrNl>() as libc::socklen_t;
            // SAFETY: buf, from and from_len are valid for the sizes passed.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast::<libc::c_void>(),
                    self.buf.len(),
                    0,
                    (&raw mut from).cast::<libc::sockaddr>(),
                    &mut from_len,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if from.nl_pid != 0 {
                return Ok(None);
            }
            return Ok(Some((n as usize).min(self.buf.len())));
        }
    }

    /// Blocks for the next datagram and appends its process events to
    /// `out` (possibly none: other event kinds are ignored). ENOBUFS becomes
    /// [`ProcEvent::Overrun`]. In non-blocking mode, returns `WouldBlock`.
    pub fn recv(&mut self, out: &mut Vec<ProcEvent>) -> io::Result<()> {
        if !self.pending.is_empty() {
            out.append(&mut self.pending);
            return Ok(());
        }
        match self.recv_datagram() {
            Ok(Some(n)) => {
                parse_datagram(&self.buf[..n], out);
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                out.push(ProcEvent::Overrun);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Bounds how long [`recv`](Self::recv) blocks (`None`: forever); on
    /// expiry it returns a `WouldBlock` error.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        let tv = match timeout {
            Some(d) => {
                let secs = libc::time_t::try_from(d.as_secs()).unwrap_or(libc::time_t::MAX);
                let mut usec = libc::suseconds_t::from(d.subsec_micros());
                // A zero timeval means "forever", so round tiny timeouts up.
                if secs == 0 && usec == 0 {
                    usec = 1;
                }
                libc::timeval {
                    tv_sec: secs,
                    tv_usec: usec,
                }
            }
            None => libc::timeval {
                tv_sec: 0,
                tv_usec: 0,
            },
        };
        // SAFETY: tv lives across the call and its size is passed.
        let ret = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast::<libc::c_void>(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if ret == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Switches O_NONBLOCK, e.g. to drive the socket from an async reactor.
    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        let fd = self.fd.as_raw_fd();
        // SAFETY: fcntl on an fd we own.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        let flags = if nonblocking {
            flags | libc::O_NONBLOCK
        } else {
            flags & !libc::O_NONBLOCK
        };
        // SAFETY: as above.
        if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for ProcConnector {
    fn drop(&mut self) {
        // Older kernels count listeners and keep generating events until
        // told to stop; closing the socket alone does not decrement.
        let _ = self.send_control(PROC_CN_MCAST_IGNORE);
    }
}

impl AsFd for ProcConnector {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for ProcConnector {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds one netlink message carrying a proc_event with the given
    /// union words.
    fn message(what: u32, words: &[u32]) -> Vec<u8> {
        let mut ev = Vec::new();
        ev.extend_from_slice(&what.to_ne_bytes());
        ev.extend_from_slice(&0u32.to_ne_bytes()); // cpu
        ev.extend_from_slice(&0u64.to_ne_bytes()); // timestamp
        for w in words {
            ev.extend_from_slice(&w.to_ne_bytes());
        }
        // The kernel always sends the full union (24 bytes of exit data).
        ev.resize(EVENT_DATA + 24, 0);
        let total = NLMSG_HDRLEN + CN_MSG_LEN + ev.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(total as u32).to_ne_bytes());
        m.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
        m.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&(ev.len() as u16).to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&ev);
        while m.len() % 4 != 0 {
            m.push(0);
        }
        m
    }

    #[test]
    fn decodes_process_events_and_skips_threads() {
        let mut buf = Vec::new();
        buf.extend(message(PROC_EVENT_FORK, &[10, 10, 11, 11])); // process fork
        buf.extend(message(PROC_EVENT_FORK, &[10, 10, 12, 10])); // thread: ignored
        buf.extend(message(PROC_EVENT_EXEC, &[11, 11]));
        buf.extend(message(PROC_EVENT_UID, &[13, 11, 0, 0])); // a thread's setuid
        buf.extend(message(PROC_EVENT_GID, &[11, 11, 0, 0]));
        buf.extend(message(PROC_EVENT_EXIT, &[12, 10, 0, 17])); // thread exit: ignored
        buf.extend(message(PROC_EVENT_EXIT, &[11, 11, 0, 17]));
        buf.extend(message(PROC_EVENT_NONE, &[0])); // ack: ignored
        buf.extend(message(0x200, &[11, 11])); // comm: ignored
        let mut out = Vec::new();
        parse_datagram(&buf, &mut out);
        assert_eq!(
            out,
            [
                ProcEvent::Fork {
                    parent: 10,
                    child: 11
                },
                ProcEvent::Exec { pid: 11 },
                ProcEvent::Uid { pid: 11 },
                ProcEvent::Uid { pid: 11 },
                ProcEvent::Exit { pid: 11 },
            ]
        );
    }

    #[test]
    fn rejects_lying_lengths() {
        let good = message(PROC_EVENT_EXEC, &[7, 7]);
        // cn_msg.len larger than the message: skipped, no panic.
        let mut m = good.clone();
        m[NLMSG_HDRLEN + 16..NLMSG_HDRLEN + 18].copy_from_slice(&u16::MAX.to_ne_bytes());
        let mut out = Vec::new();
        parse_datagram(&m, &mut out);
        assert!(out.is_empty());
        // nlmsg_len larger than the datagram: stop.
        let mut m = good.clone();
        m[0..4].copy_from_slice(&u32::MAX.to_ne_bytes());
        parse_datagram(&m, &mut out);
        assert!(out.is_empty());
        // nlmsg_len of zero must not loop forever.
        let mut m = good.clone();
        m[0..4].copy_from_slice(&0u32.to_ne_bytes());
        parse_datagram(&m, &mut out);
        assert!(out.is_empty());
        // Wrong connector id.
        let mut m = good.clone();
        m[NLMSG_HDRLEN..NLMSG_HDRLEN + 4].copy_from_slice(&9u32.to_ne_bytes());
        parse_datagram(&m, &mut out);
        assert!(out.is_empty());
        // Non-positive pids are dropped.
        parse_datagram(&message(PROC_EVENT_EXEC, &[0, 0]), &mut out);
        parse_datagram(&message(PROC_EVENT_EXIT, &[u32::MAX, u32::MAX]), &mut out);
        assert!(out.is_empty());
        parse_datagram(&good, &mut out);
        assert_eq!(out, [ProcEvent::Exec { pid: 7 }]);
    }

    #[test]
    fn truncated_and_random_bytes_never_panic() {
        let mut buf = Vec::new();
        buf.extend(message(PROC_EVENT_FORK, &[1, 1, 2, 2]));
        buf.extend(message(PROC_EVENT_EXIT, &[2, 2, 0, 0]));
        let mut out = Vec::new();
        for cut in 0..=buf.len() {
            out.clear();
            parse_datagram(&buf[..cut], &mut out);
            assert!(out.len() <= 2);
        }
        // Deterministic xorshift noise, plus noise with a valid prefix.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for round in 0..2000 {
            let len = (round % 300) + 1;
            let mut noise: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            parse_datagram(&noise, &mut out);
            let mut prefixed = buf[..(round % buf.len())].to_vec();
            prefixed.append(&mut noise);
            parse_datagram(&prefixed, &mut out);
        }
    }
}
