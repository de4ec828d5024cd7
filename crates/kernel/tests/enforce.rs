//! Connection-time enforcement against real sockets on loopback. Each test
//! attaches to a cgroup it creates and moves only its own child processes
//! into it. Run as root (they skip otherwise).

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use common::{
    Client, EPERM, EnforceHere as _, TestCgroup, attest, can_run, drain, tcp_listeners, udp_server,
};
use tether_kernel::{Decision, DstPrefix, Enforcer, ExecId, Hook, Proto};

const LO4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const LO6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

#[test]
fn tcp_allow_deny_and_untouched() {
    if !can_run() {
        return;
    }
    let cg = TestCgroup::new("kernel");
    let e = Enforcer::load(&cg.config(None)).expect("load");
    let protected = tcp_listeners();
    let open = tcp_listeners();
    e.set_service(DstPrefix::host(LO4, protected.port, Proto::Tcp), 1)
        .expect("service");

    // Attested, with an allow verdict.
    let mut ok = Client::spawn(&cg);
    attest(&e, ok.pid, 7);
    e.set_verdict(7, 1, true, 42, 0).expect("verdict");
    assert_eq!(
        ok.run(&format!("connect 4 127.0.0.1 {}", protected.port)),
        "OK"
    );

    // Attested, but no verdict for this service: deny by default.
    let mut no_rule = Client::spawn(&cg);
    attest(&e, no_rule.pid, 8);
    assert_eq!(
        no_rule.run(&format!("connect 4 127.0.0.1 {}", protected.port)),
        EPERM
    );

    // Explicit deny.
    e.set_verdict(8, 1, false, 43, 0).expect("verdict");
    assert_eq!(
        no_rule.run(&format!("connect 4 127.0.0.1 {}", protected.port)),
        EPERM
    );

    // Never attested.
    let mut stranger = Client::spawn(&cg);
    assert_eq!(
        stranger.run(&format!("connect 4 127.0.0.1 {}", protected.port)),
        EPERM
    );

    // Destinations no service covers are untouched, for everyone.
    assert_eq!(
        stranger.run(&format!("connect 4 127.0.0.1 {}", open.port)),
        "OK"
    );
    // A UDP service on the same port does not protect TCP.
    e.remove_service(DstPrefix::host(LO4, protected.port, Proto::Tcp))
        .expect("remove");
    e.set_service(DstPrefix::host(LO4, protected.port, Proto::Udp), 1)
        .expect("service");
    assert_eq!(
        stranger.run(&format!("connect 4 127.0.0.1 {}", protected.port)),
        "OK"
    );

    // Revoking the verdict applies to the next connection.
    e.set_service(DstPrefix::host(LO4, protected.port, Proto::Tcp), 1)
        .expect("service");
    assert_eq!(
        ok.run(&format!("connect 4 127.0.0.1 {}", protected.port)),
        "OK"
    );
    e.remove_verdict(7, 1).expect("remove verdict");
    assert_eq!(
        ok.run(&format!("connect 4 127.0.0.1 {}", protected.port)),
        EPERM
    );

    let s = e.stats().expect("stats");
    assert_eq!(
        (s.allowed, s.denied, s.unattested, s.dropped_events),
        (2, 3, 1, 0),
        "{s:?}"
    );
}

#[test]
fn cidr_and_any_port_services() {
    if !can_run() {
        return;
    }
    let cg = TestCgroup::new("kernel");
    let e = Enforcer::load(&cg.config(None)).expect("load");
    let a = tcp_listeners();
    let b = tcp_listeners();
    // All of 127.0.0.0/8, any port, is service 5; one port of it is service 6.
    e.set_service(
        DstPrefix {
            net: "127.9.9.9".parse().unwrap(),
            prefix_len: 8,
            port: 0,
            proto: Proto::Tcp,
        },
        5,
    )
    .expect("service");
    e.set_service(DstPrefix::host(LO4, b.port, Proto::Tcp), 6)
        .expect("service");
    let mut c = Client::spawn(&cg);
    attest(&e, c.pid, 1);
    e.set_verdict(1, 6, true, 1, 0).expect("verdict");
    assert_eq!(
        c.run(&format!("connect 4 127.0.0.1 {}", a.port)),
        EPERM,
        "any-port /8 rule"
    );
    assert_eq!(
        c.run(&format!("connect 4 127.0.0.1 {}", b.port)),
        "OK",
        "exact port wins"
    );
    e.set_verdict(1, 5, true, 2, 0).expect("verdict");
    assert_eq!(c.run(&format!("connect 4 127.0.0.1 {}", a.port)), "OK");

    let listed = e.services().expect("services");
    assert!(listed.contains(&(
        DstPrefix {
            net: "127.0.0.0".parse().unwrap(),
            prefix_len: 8,
            port: 0,
            proto: Proto::Tcp
        },
        5
    )));
    assert!(listed.contains(&(DstPrefix::host(LO4, b.port, Proto::Tcp), 6)));
}

#[test]
fn ipv6_and_ipv4_mapped_hit_the_same_policy() {
    if !can_run() {
        return;
    }
    let cg = TestCgroup::new("kernel");
    let e = Enforcer::load(&cg.config(None)).expect("load");
    let l = tcp_listeners();
    assert!(l.v6.is_some(), "this test needs IPv6 loopback");
    e.set_service(DstPrefix::host(LO4, l.port, Proto::Tcp), 1)
        .expect("service");
    e.set_service(DstPrefix::host(LO6, l.port, Proto::Tcp), 1)
        .expect("service");

    let mut denied = Client::spawn(&cg);
    assert_eq!(denied.run(&format!("connect 6 ::1 {}", l.port)), EPERM);
    assert_eq!(
        denied.run(&format!("connect 6 ::ffff:127.0.0.1 {}", l.port)),
        EPERM
    );

    let mut allowed = Client::spawn(&cg);
    attest(&e, allowed.pid, 3);
    e.set_verdict(3, 1, true, 9, 0).expect("verdict");
    assert_eq!(allowed.run(&format!("connect 6 ::1 {}", l.port)), "OK");
    assert_eq!(
        allowed.run(&format!("connect 6 ::ffff:127.0.0.1 {}", l.port)),
        "OK"
    );

    // Only the IPv4 entry exists now: the mapped form still hits it.
    e.remove_service(DstPrefix::host(LO6, l.port, Proto::Tcp))
        .expect("remove");
    assert_eq!(
        denied.run(&format!("connect 6 ::ffff:127.0.0.1 {}", l.port)),
        EPERM
    );
    assert_eq!(
        denied.run(&format!("connect 6 ::1 {}", l.port)),
        "OK",
        "::1 no longer protected"
    );

    let evs = drain(&e);
    let mapped: Vec<_> = evs
        .iter()
        .filter(|ev| ev.hook == Hook::Connect6 && ev.addr == LO4)
        .collect();
    assert_eq!(mapped.len(), 3, "{evs:#?}");
    assert!(
        evs.iter()
            .any(|ev| ev.addr == LO6 && ev.decision == Decision::Unattested)
    );
}

#[test]
fn udp_sendto_and_connected_udp_are_enforced() {
    if !can_run() {
        return;
    }
    let cg = TestCgroup::new("kernel");
    let e = Enforcer::load(&cg.config(None)).expect("load");
    let (server, port) = udp_server();
    let (_other, open_port) = udp_server();
    e.set_service(DstPrefix::host(LO4, port, Proto::Udp), 2)
        .expect("service");

    let mut c = Client::spawn(&cg);
    assert_eq!(c.run(&format!("sendto 4 127.0.0.1 {port}")), EPERM);
    assert_eq!(c.run(&format!("udpconnect 4 127.0.0.1 {port}")), EPERM);
    assert_eq!(c.run(&format!("sendto 6 ::ffff:127.0.0.1 {port}")), EPERM);
    assert_eq!(c.run(&format!("sendto 4 127.0.0.1 {open_port}")), "OK");
    // A UDP service on ::1 is decided by sendmsg6.
    e.set_service(DstPrefix::host(LO6, port, Proto::Udp), 2)
        .expect("service");
    assert_eq!(c.run(&format!("sendto 6 ::1 {port}")), EPERM);
    e.remove_service(DstPrefix::host(LO6, port, Proto::Udp))
        .expect("remove");

    attest(&e, c.pid, 4);
    e.set_verdict(4, 2, true, 1, 0).expect("verdict");
    assert_eq!(c.run(&format!("sendto 4 127.0.0.1 {port}")), "OK");
    let mut buf = [0u8; 8];
    let (n, _) = server.recv_from(&mut buf).expect("datagram arrives");
    assert_eq!(&buf[..n], b"ping");

    // An IPv6 UDP socket sending to a v4-mapped address is handed to the
    // IPv4 path by the kernel, so sendmsg4 decides it.
    let hooks: Vec<(Hook, IpAddr)> = drain(&e).iter().map(|ev| (ev.hook, ev.addr)).collect();
    assert_eq!(
        hooks,
        [
            (Hook::Sendmsg4, LO4),
            (Hook::Connect4, LO4),
            (Hook::Sendmsg4, LO4),
            (Hook::Sendmsg6, LO6),
            (Hook::Sendmsg4, LO4)
        ]
    );
}

#[test]
fn exec_clears_fork_inherits_threads_share() {
    if !can_run() {
        return;
    }
    let cg = TestCgroup::new("kernel");
    let e = Enforcer::load(&cg.config(None)).expect("load");
    let l = tcp_listeners();
    e.set_service(DstPrefix::host(LO4, l.port, Proto::Tcp), 1)
        .expect("service");
    e.set_verdict(5, 1, true, 1, 0).expect("verdict");
    let connect = format!("connect 4 127.0.0.1 {}", l.port);

    let mut c = Client::spawn(&cg);
    attest(&e, c.pid, 5);
    assert_eq!(c.run(&connect), "OK");

    // A forked child inherits; its entry is keyed by its own pid.
    let out = c.run(&format!("fork-connect 4 127.0.0.1 {}", l.port));
    assert!(out.starts_with("OK child="), "{out}");
    // A thread uses the process's entry and gets none of its own.
    let out = c.run(&format!("thread-connect 4 127.0.0.1 {}", l.port));
    let tid: u32 = out
        .strip_prefix("OK tid=")
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(
        e.process(tid).expect("lookup"),
        None,
        "no entry for thread {tid}"
    );

    // exec: the same pid, a new image, no authority.
    c.exec();
    assert_eq!(c.run(&connect), EPERM);
    assert_eq!(e.process(c.pid).expect("lookup"), None);

    // And the forked child's entry was freed when it exited.
    let child: u32 = out_child(&drain(&e));
    assert_eq!(
        e.process(child).expect("lookup"),
        None,
        "exited child {child} freed"
    );
}

fn out_child(evs: &[tether_kernel::Event]) -> u32 {
    // The fork-connect event is the allowed one whose tgid is not the client.
    let first = evs.first().expect("events").tgid;
    evs.iter()
        .find(|ev| ev.tgid != first)
        .map(|ev| ev.tgid)
        .expect("child event")
}

#[test]
fn a_verdict_written_for_the_previous_image_never_applies() {
    if !can_run() {
        return;
    }
    let cg = TestCgroup::new("kernel");
    let e = Enforcer::load(&cg.config(None)).expect("load");
    let l = tcp_listeners();
    e.set_service(DstPrefix::host(LO4, l.port, Proto::Tcp), 1)
        .expect("service");
    e.set_verdict(5, 1, true, 1, 0).expect("verdict");

    let mut c = Client::spawn(&cg);
    // The agent reads the exec id and starts attesting the old image...
    let stale = e
        .exec_record(c.pid)
        .expect("exec record")
        .expect("a record");
    // ...the process execs meanwhile...
    c.exec();
    // ...and the agent's write lands late.
    e.set_process(c.pid, 5, ExecId(stale.exec_id), stale.start_ns)
        .expect("set_process");
    assert_eq!(c.run(&format!("connect 4 127.0.0.1 {}", l.port)), EPERM);
    let ev = drain(&e).pop().expect("event");
    assert_eq!(ev.decision, Decision::Unattested);

    // Attested with the current exec id, it is allowed.
    attest(&e, c.pid, 5);
    assert_eq!(c.run(&format!("connect 4 127.0.0.1 {}", l.port)), "OK");
}

#[test]
fn bash_dev_tcp_is_refused() {
    if !can_run() {
        return;
    }
    let cg = TestCgroup::new("kernel");
    let e = Enforcer::load(&cg.config(None)).expect("load");
    let l = tcp_listeners();
    e.set_service(DstPrefix::host(LO4, l.port, Proto::Tcp), 1)
        .expect("service");

    let mut child = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!("read _; exec 3<>/dev/tcp/127.0.0.1/{}", l.port))
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("bash");
    cg.add(child.id());
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().expect("stdin");
        writeln!(stdin, "go").expect("write");
    }
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("Operation not permitted"), "{err}");
}

#[test]
fn tcp_fast_open_and_mptcp_are_enforced() {
    if !can_run() {
        return;
    }
    let cg = TestCgroup::new("kernel");
    let e = Enforcer::load(&cg.config(None)).expect("load");
    let l = tcp_listeners();
    e.set_service(DstPrefix::host(LO4, l.port, Proto::Tcp), 1)
        .expect("service");

    let mut c = Client::spawn(&cg);
    // sendto(MSG_FASTOPEN) connects inside sendmsg; the connect hook runs.
    assert_eq!(c.run(&format!("fastopen 4 127.0.0.1 {}", l.port)), EPERM);
    let mptcp = c.run(&format!("mptcp 4 127.0.0.1 {}", l.port));
    assert!(mptcp == EPERM || mptcp == "UNSUPPORTED", "{mptcp}");

    attest(&e, c.pid, 2);
    e.set_verdict(2, 1, true, 1, 0).expect("verdict");
    assert_eq!(c.run(&format!("fastopen 4 127.0.0.1 {}", l.port)), "OK");
    if mptcp == EPERM {
        assert_eq!(c.run(&format!("mptcp 4 127.0.0.1 {}", l.port)), "OK");
    }
}

#[test]
fn every_decision_is_one_event() {
    if !can_run() {
        return;
    }
    let cg = TestCgroup::new("kernel");
    let e = Enforcer::load(&cg.config(None)).expect("load");
    let l = tcp_listeners();
    let open = tcp_listeners();
    e.set_service(DstPrefix::host(LO4, l.port, Proto::Tcp), 11)
        .expect("service");
    e.set_verdict(21, 11, true, 31, 0).expect("verdict");
    e.set_verdict(22, 11, false, 32, 0).expect("verdict");
    let mut reader = e.events().expect("events");

    let mut allowed = Client::spawn(&cg);
    attest(&e, allowed.pid, 21);
    let mut denied = Client::spawn(&cg);
    attest(&e, denied.pid, 22);
    let mut stranger = Client::spawn(&cg);

    let connect = format!("connect 4 127.0.0.1 {}", l.port);
    assert_eq!(allowed.run(&connect), "OK");
    assert_eq!(denied.run(&connect), EPERM);
    assert_eq!(stranger.run(&connect), EPERM);
    assert_eq!(
        stranger.run(&format!("connect 4 127.0.0.1 {}", open.port)),
        "OK"
    );

    let evs = common::decisions(reader.drain().expect("drain"));
    assert_eq!(
        evs.len(),
        3,
        "one per protected decision, none for the open port: {evs:#?}"
    );
    let expect = [
        (allowed.pid, Decision::Allow, 21, 31),
        (denied.pid, Decision::Deny, 22, 32),
        (stranger.pid, Decision::Unattested, 0, 0),
    ];
    for (ev, (pid, decision, subject, rule)) in evs.iter().zip(expect) {
        assert_eq!(ev.tgid, pid);
        assert_eq!(ev.pid, pid, "single-threaded client: thread id is the pid");
        assert_eq!(ev.decision, decision);
        assert_eq!(ev.subject, subject);
        assert_eq!(ev.rule, rule);
        assert_eq!(ev.service_id, 11);
        assert_eq!(ev.port, l.port);
        assert_eq!(ev.addr, LO4);
        assert_eq!(ev.proto, Proto::Tcp);
        assert_eq!(ev.hook, Hook::Connect4);
        assert_eq!(ev.uid, 0);
        assert!(ev.comm.starts_with("python3"), "{}", ev.comm);
        assert_ne!(ev.socket_cookie, 0);
        assert_ne!(ev.ts_boot_ns, 0);
    }
    assert!(evs.windows(2).all(|w| w[0].ts_boot_ns <= w[1].ts_boot_ns));
    assert!(reader.try_next().is_none());
}
