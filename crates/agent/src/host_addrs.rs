//! This host's addresses, followed as they change.
//!
//! A connection to any address the host has reaches a listener bound to
//! the wildcard address, so the kernel hooks must treat every one of them
//! (and the broadcast addresses, which loop back to such listeners) as a
//! local destination. A thread listens for address changes on rtnetlink
//! and re-reads the whole set with getifaddrs(3) on each, which spares us
//! parsing netlink messages: any message (or a lost one, ENOBUFS) means
//! "read again". A periodic re-read covers anything missed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;
/// Re-read even without a notification this often.
const REFRESH: Duration = Duration::from_secs(30);

/// Calls `changed` with the addresses now (so the first registry sync has
/// them), then starts the thread that calls it again on every change.
pub fn follow(mut changed: impl FnMut(Vec<IpAddr>) + Send + 'static) {
    changed(read());
    let socket = match subscribe() {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "no address notifications (rtnetlink); re-reading every 30 s");
            None
        }
    };
    let spawned = std::thread::Builder::new()
        .name("host-addrs".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match &socket {
                    Some(fd) => wait(fd, &mut buf),
                    None => std::thread::sleep(REFRESH),
                }
                changed(read());
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the host address thread");
    }
}

/// This host's own unicast addresses that could identify it to other
/// nodes (not loopback, link-local or broadcast), as strings, sorted: what
/// its node SVID is asked to vouch for.
pub fn own() -> Vec<String> {
    let mut out: Vec<String> = interface_addrs(false)
        .into_iter()
        .filter(|ip| match ip {
            IpAddr::V4(v) => !(v.is_loopback() || v.is_link_local() || v.is_unspecified()),
            IpAddr::V6(v) => !(v.is_loopback() || v.is_unicast_link_local() || v.is_unspecified()),
        })
        .map(|ip| ip.to_string())
        .collect();
    out.sort();
    out.dedup();
    if out.len() > MAX_VOUCHED {
        // The server refuses more in one node SVID; the mesh reaches this
        // host at the others only through an address it does vouch for.
        tracing::warn!(
            addresses = out.len(),
            "more host addresses than a node SVID vouches for; keeping the first {MAX_VOUCHED}"
        );
        out.truncate(MAX_VOUCHED);
    }
    out
}

/// How many addresses the server puts in one node SVID.
const MAX_VOUCHED: usize = 64;

/// Every address of every interface, and IPv4 broadcast addresses, sorted.
pub fn read() -> Vec<IpAddr> {
    interface_addrs(true)
}

fn interface_addrs(with_broadcast: bool) -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&raw mut head) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "getifaddrs failed");
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        out.extend(sockaddr_ip(ifa.ifa_addr));
        if with_broadcast && ifa.ifa_flags & libc::IFF_BROADCAST as u32 != 0 {
            out.extend(sockaddr_ip(ifa.ifa_ifu));
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: freeing the list getifaddrs allocated, once.
    unsafe { libc::freeifaddrs(head) };
    out.sort();
    out.dedup();
    out
}

fn sockaddr_ip(sa: *const libc::sockaddr) -> Option<IpAddr> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: a non-null sockaddr from getifaddrs; its family says which
    // structure it is.
    unsafe {
        match i32::from((*sa).sa_family) {
            libc::AF_INET => {
                let a = &*sa.cast::<libc::sockaddr_in>();
                Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr))))
            }
            libc::AF_INET6 => {
                let a = &*sa.cast::<libc::sockaddr_in6>();
                Some(IpAddr::V6(Ipv6Addr::from(a.sin6_addr.s6_addr)))
            }
            _ => None,
        }
    }
}

fn subscribe() -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh fd, owned by nobody else.
    let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: a zeroed sockaddr_nl is valid; we set family and groups.
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    sa.nl_family = libc::AF_NETLINK as u16;
    sa.nl_groups = RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR;
    // SAFETY: `sa` is a valid sockaddr_nl of the size we pass.
    let r = unsafe {
        libc::bind(
            fd,
            std::ptr::from_ref(&sa).cast(),
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(owned)
}

/// Blocks until a notification arrives (or REFRESH passes), then drains.
fn wait(fd: &std::os::fd::OwnedFd, buf: &mut [u8]) {
    use std::os::fd::AsRawFd as _;
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&raw mut pfd, 1, REFRESH.as_millis() as i32) };
    if r <= 0 {
        return;
    }
    loop {
        // SAFETY: `buf` is writable for its length; non-blocking read.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        // Contents do not matter (we re-read everything); ENOBUFS (lost
        // messages) and EAGAIN (drained) both end the drain.
        if n <= 0 {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_loopback() {
        let a = super::read();
        assert!(
            a.contains(&std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)),
            "{a:?}"
        );
    }
}
