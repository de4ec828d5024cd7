//! The hold path: a TCP connect by a process the agent has not attested yet
//! is redirected to the agent's hold listener, the agent can claim exactly
//! which process was going where, and the application still sees the
//! original destination. The test process plays the agent (it is outside
//! the test cgroup, as a real agent's own connections are exempt).

mod common;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use common::{
    Client, EPERM, EnforceHere as _, TestCgroup, attest, can_run, drain, tcp_listeners, udp_server,
};
use tether_kernel::{Decision, DstPrefix, Enforcer, HeldConnection, HoldConfig, Proto};

const LO4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const LO6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

/// Hold listeners on 127.0.0.1 and [::1] with one port.
fn hold_listeners() -> (TcpListener, TcpListener, u16) {
    let l = tcp_listeners();
    (l.v4, l.v6.expect("an IPv6 loopback listener"), l.port)
}

fn me() -> u32 {
    std::process::id()
}

/// This test process becomes the agent, holding on both loopbacks.
fn register_agent(e: &Enforcer, hold_port: u16) {
    e.set_agent(me()).expect("set_agent");
    e.set_hold(
        me(),
        HoldConfig {
            port: hold_port,
            v4: true,
            v6: true,
        },
    )
    .expect("set_hold");
}

/// Accepts one connection on `l`, claims its held record, answers "held".
fn serve_one(e: &Enforcer, l: &TcpListener) -> (Option<HeldConnection>, SocketAddr) {
    let (s, peer) = l.accept().expect("accept on the hold listener");
    // Same port, another loopback address: must not claim this record.
    if peer.is_ipv4() {
        let spoof = connect_from(
            Ipv4Addr::new(127, 0, 0, 2),
            peer.port(),
            l.local_addr().expect("addr").port(),
        );
        let (_s2, spoof_peer) = l.accept().expect("accept the spoofing connection");
        assert_eq!(spoof_peer.port(), peer.port());
        assert_eq!(
            e.take_held(spoof_peer, tether_kernel::netns_cookie().unwrap())
                .expect("take_held"),
            None,
            "claimed by address and port"
        );
        drop(spoof);
    }
    let rec = e
        .take_held(peer, tether_kernel::netns_cookie().unwrap())
        .expect("take_held");
    let mut line = String::new();
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    BufReader::new(&s).read_line(&mut line).expect("read hello");
    assert_eq!(line, "hello\n");
    (&s).write_all(b"held\n").expect("answer");
    (rec, peer)
}

/// A TCP connection from `src:src_port` to 127.0.0.1:`port` (std cannot
/// bind before connecting).
fn connect_from(src: Ipv4Addr, src_port: u16, port: u16) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd as _;
    let sa = |ip: Ipv4Addr, p: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: p.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a fd we own; the sockaddrs outlive them.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0);
        let owned = std::os::fd::OwnedFd::from_raw_fd(fd);
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&raw const one).cast(),
            4,
        );
        let a = sa(src, src_port);
        assert_eq!(
            libc::bind(fd, (&raw const a).cast(), len),
            0,
            "bind {src}:{src_port}: {}",
            std::io::Error::last_os_error()
        );
        let d = sa(Ipv4Addr::LOCALHOST, port);
        assert_eq!(
            libc::connect(fd, (&raw const d).cast(), len),
            0,
            "connect: {}",
            std::io::Error::last_os_error()
        );
        owned
    }
}

/// /proc/<pid>/stat starttime, in clock ticks.
fn start_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    after
        .split(' ')
        .nth(19)
        .expect("field 22")
        .parse()
        .expect("number")
}

fn check_record(e: &Enforcer, rec: &HeldConnection, c: &Client, dst: SocketAddr, service: u32) {
    assert_eq!(rec.original_dst, dst);
    assert_eq!(rec.tgid, c.pid);
    assert_eq!(rec.service_id, service);
    assert_eq!(rec.exec_id, e.exec_id(c.pid).expect("exec id").0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    assert_eq!(
        rec.start_boottime_ns / (1_000_000_000 / hz),
        start_ticks(c.pid)
    );
}

#[test]
fn unattested_tcp_is_held_for_the_agent() {
    if !can_run() {
        return;
    }
    let cg = TestCgroup::new("kernel");
    let e = Enforcer::load(&cg.config(None)).expect("load");
    let protected = tcp_listeners();
    let port = protected.port;
    e.set_service(DstPrefix::host(LO4, port, Proto::Tcp), 3)
        .expect("service");
    e.set_service(DstPrefix::host(LO6, port, Proto::Tcp), 3)
        .expect("service");
    e.set_service(DstPrefix::host(LO4, port, Proto::Udp), 3)
        .expect("service");
    let (h4, h6, hold_port) = hold_listeners();

    // No agent registered yet: refused, as before.
    let mut c = Client::spawn(&cg);
    assert_eq!(c.run(&format!("peer 4 127.0.0.1 {port}")), EPERM);

    register_agent(&e, hold_port);

    std::thread::scope(|s| {
        // IPv4: held, claimed by port, and getpeername shows the original.
        let t = s.spawn(|| serve_one(&e, &h4));
        assert_eq!(
            c.run(&format!("peer 4 127.0.0.1 {port}")),
            format!("OK 127.0.0.1 {port} held")
        );
        let (rec, peer) = t.join().expect("hold thread");
        let rec = rec.expect("a held record for the client's port");
        check_record(&e, &rec, &c, SocketAddr::new(LO4, port), 3);
        assert_eq!(rec.local_port, peer.port());
        assert!(!rec.flow_v6);
        // Claimed once only.
        assert_eq!(
            e.take_held(peer, tether_kernel::netns_cookie().unwrap())
                .expect("take_held"),
            None
        );

        // IPv6: held on the [::1] listener.
        let t = s.spawn(|| serve_one(&e, &h6));
        assert_eq!(
            c.run(&format!("peer 6 ::1 {port}")),
            format!("OK ::1 {port} held")
        );
        let rec = t.join().expect("hold thread").0.expect("held record");
        check_record(&e, &rec, &c, SocketAddr::new(LO6, port), 3);
        assert!(rec.flow_v6);

        // IPv4-mapped on an IPv6 socket: an IPv4 flow, held on 127.0.0.1.
        let t = s.spawn(|| serve_one(&e, &h4));
        assert_eq!(
            c.run(&format!("peer 6 ::ffff:127.0.0.1 {port}")),
            format!("OK ::ffff:127.0.0.1 {port} held")
        );
        let rec = t.join().expect("hold thread").0.expect("held record");
        check_record(&e, &rec, &c, SocketAddr::new(LO4, port), 3);
        assert!(!rec.flow_v6);
    });

    // UDP cannot be held: refused.
    let (_udp, _) = udp_server();
    assert_eq!(c.run(&format!("sendto 4 127.0.0.1 {port}")), EPERM);

    // An attested process is decided in the kernel, never held.
    attest(&e, c.pid, 9);
    e.set_verdict(9, 3, true, 1, 0).expect("verdict");
    assert_eq!(c.run(&format!("connect 4 127.0.0.1 {port}")), "OK");
    let (_s, _) = protected
        .v4
        .accept()
        .expect("direct connection reached the service");

    let decisions: Vec<Decision> = drain(&e).into_iter().map(|ev| ev.decision).collect();
    assert_eq!(
        decisions,
        [
            Decision::Unattested,
            Decision::Held,
            Decision::Held,
            Decision::Held,
            Decision::Unattested,
            Decision::Allow
        ]
    );
    assert_eq!(e.stats().expect("stats").held, 3);
}

#[test]
fn a_connection_the_kernel_did_not_redirect_has_no_record() {
    if !can_run() {
        return;
    }
    let cg = TestCgroup::new("kernel");
    let e = Enforcer::load(&cg.config(None)).expect("load");
    let (h4, _h6, hold_port) = hold_listeners();
    register_agent(&e, hold_port);
    // A process in the cgroup dialing the hold port itself.
    let mut c = Client::spawn(&cg);
    std::thread::scope(|s| {
        let t = s.spawn(|| serve_one(&e, &h4));
        assert_eq!(
            c.run(&format!("peer 4 127.0.0.1 {hold_port}")),
            format!("OK 127.0.0.1 {hold_port} held")
        );
        assert_eq!(t.join().expect("thread").0, None);
    });
    // And one from outside it.
    let _out = TcpStream::connect((LO4, hold_port)).expect("connect");
    let (_s, peer) = h4.accept().expect("accept");
    assert_eq!(
        e.take_held(peer, tether_kernel::netns_cookie().unwrap())
            .expect("take_held"),
        None
    );
}

#[test]
fn without_a_live_agent_unattested_connections_are_refused() {
    if !can_run() {
        return;
    }
    let cg = TestCgroup::new("kernel");
    let e = Enforcer::load(&cg.config(None)).expect("load");
    let protected = tcp_listeners();
    e.set_service(DstPrefix::host(LO4, protected.port, Proto::Tcp), 3)
        .expect("service");
    let (_h4, _h6, hold_port) = hold_listeners();
    let connect = format!("connect 4 127.0.0.1 {}", protected.port);

    // The registered agent is a process that has exited: its entry went
    // with it (exit tracepoint), so nothing is held for a dead agent.
    let mut gone = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("spawn");
    let gone_pid = gone.id();
    e.set_agent(gone_pid).expect("set_agent");
    gone.kill().expect("kill");
    gone.wait().expect("wait");
    e.set_hold(
        gone_pid,
        HoldConfig {
            port: hold_port,
            v4: true,
            v6: true,
        },
    )
    .expect("set_hold");
    let mut c = Client::spawn(&cg);
    assert_eq!(c.run(&connect), EPERM);

    // A live agent in another network namespace cannot be reached over
    // this namespace's loopback: not held either. (Simulated by clearing
    // the hold configuration, which is what the agent does on shutdown.)
    e.set_agent(me()).expect("set_agent");
    e.clear_hold().expect("clear_hold");
    assert_eq!(c.run(&connect), EPERM);
    let evs = drain(&e);
    assert!(
        evs.iter().all(|ev| ev.decision == Decision::Unattested),
        "{evs:?}"
    );
}

/// A network namespace of the test's own, removed on drop.
struct Netns(String);

impl Netns {
    fn new() -> Netns {
        let name = format!("tether-kt-{}", std::process::id());
        let ok = |args: &[&str]| {
            let o = std::process::Command::new("ip")
                .args(args)
                .output()
                .expect("ip");
            assert!(
                o.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        };
        ok(&["netns", "add", &name]);
        let ns = Netns(name);
        ok(&["-n", &ns.0, "link", "set", "lo", "up"]);
        ns
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.0)
    }

    /// A listener on 127.0.0.1:`port` inside it, and the namespace cookie.
    fn listen(&self, port: u16) -> (TcpListener, u64) {
        let path = self.path();
        std::thread::spawn(move || {
            let f = std::fs::File::open(&path).expect("netns");
            // SAFETY: setns for this short-lived thread only.
            let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            let l = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("bind in the namespace");
            let cookie =
                tether_kernel::socket_netns_cookie(std::os::fd::AsFd::as_fd(&l)).expect("cookie");
            (l, cookie)
        })
        .join()
        .expect("listener thread")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .output();
    }
}

#[test]
fn a_connection_from_a_namespace_without_a_listener_waits_for_one() {
    if !can_run() {
        return;
    }
    let cg = TestCgroup::new("kernel");
    let e = Enforcer::load(&cg.config(None)).expect("load");
    let port = 6390;
    e.set_service(DstPrefix::host(LO4, port, Proto::Tcp), 5)
        .expect("service");
    let (_h4, _h6, hold_port) = hold_listeners();
    register_agent(&e, hold_port);
    let ns = Netns::new();
    // Something else listens at the hold port in that namespace first: it
    // must never get the connection.
    let (squatter, cookie) = ns.listen(hold_port);
    squatter.set_nonblocking(true).expect("nonblocking");
    assert_ne!(cookie, tether_kernel::netns_cookie().expect("own cookie"));

    let mut c = Client::spawn(&cg);
    assert_eq!(c.run(&format!("setns {}", ns.path())), "OK");
    let _ = drain(&e);
    std::thread::scope(|s| {
        let t = s.spawn(|| c.run(&format!("peer 4 127.0.0.1 {port}")));
        // The kernel asks for a listener in that namespace...
        let mut reader = e.events().expect("events");
        let mut asked = None;
        for _ in 0..50 {
            if let Ok(Some(ev)) = reader.next_timeout(Duration::from_millis(100)) {
                if ev.hook == tether_kernel::Hook::Netns {
                    asked = Some(ev);
                    break;
                }
            }
        }
        let asked = asked.expect("a HOOK_NETNS event");
        assert_eq!(asked.socket_cookie, cookie, "the namespace asked for");
        // ...and meanwhile nothing reaches the port there: SYNs are dropped
        // (1.5 s covers the first retransmission).
        std::thread::sleep(Duration::from_millis(1500));
        assert!(
            matches!(squatter.accept(), Err(ref err) if err.kind() == std::io::ErrorKind::WouldBlock),
            "the connection reached a listener the agent does not own"
        );
        // The agent's listener takes the port (the squatter leaves) and the
        // kernel learns it: the next SYN goes through.
        drop(squatter);
        let (agent, cookie2) = ns.listen(hold_port);
        assert_eq!(cookie2, cookie);
        e.serve_netns(
            cookie,
            HoldConfig {
                port: hold_port,
                v4: true,
                v6: false,
            },
        )
        .expect("serve_netns");
        let (sock, peer) = agent.accept().expect("the held connection arrives");
        // Claimed in its own namespace only.
        assert_eq!(
            e.take_held(peer, tether_kernel::netns_cookie().expect("own"))
                .expect("take_held"),
            None
        );
        let rec = e
            .take_held(peer, cookie)
            .expect("take_held")
            .expect("record");
        assert_eq!(rec.netns, cookie);
        assert_eq!(rec.original_dst, SocketAddr::new(LO4, port));
        let mut line = String::new();
        BufReader::new(&sock).read_line(&mut line).expect("hello");
        (&sock).write_all(b"held\n").expect("answer");
        assert_eq!(
            t.join().expect("client"),
            format!("OK 127.0.0.1 {port} held")
        );
    });
    // A namespace the agent cannot serve: refused at connect.
    e.refuse_netns(cookie).expect("refuse");
    assert_eq!(c.run(&format!("peer 4 127.0.0.1 {port}")), EPERM);
}
