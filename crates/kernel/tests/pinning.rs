//! Fail closed across agent restarts: pinned links keep enforcing while no
//! agent runs, and the next agent adopts the pinned maps without a gap.
//! Each test mounts its own bpffs and unmounts it (dropping all pins) on
//! exit, even on failure.

mod common;

use std::net::{IpAddr, Ipv4Addr};

use common::{
    BpfFs, Client, EPERM, EnforceHere as _, TestCgroup, attest, can_run, drain, tcp_listeners,
};
use tether_kernel::{Decision, DstPrefix, Enforcer, KernelError, Proto, VerdictEntry};

const LO4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

#[test]
fn a_crashed_agent_stays_closed_and_the_next_one_adopts() {
    if !can_run() {
        return;
    }
    let cg = TestCgroup::new("kernel");
    let fs = BpfFs::new();
    let cfg = cg.config(Some(&fs.pin_dir()));
    let l = tcp_listeners();
    let connect = format!("connect 4 127.0.0.1 {}", l.port);

    let first = Enforcer::load(&cfg).expect("first load");
    assert!(!first.adopted(), "nothing pinned yet");
    first
        .set_service(DstPrefix::host(LO4, l.port, Proto::Tcp), 1)
        .expect("service");
    first.set_verdict(7, 1, true, 70, 0).expect("verdict");
    let mut old = Client::spawn(&cg);
    attest(&first, old.pid, 7);
    assert_eq!(old.run(&connect), "OK");
    for link in [
        "connect4", "connect6", "sendmsg4", "sendmsg6", "exec", "fork", "exit",
    ] {
        assert!(
            fs.pin_dir().join("links").join(link).exists(),
            "link {link} pinned"
        );
    }

    // The agent dies without detaching anything.
    drop(first);

    // Nobody is managing the maps, yet the hooks still enforce them.
    let mut newcomer = Client::spawn(&cg);
    assert_eq!(
        newcomer.run(&connect),
        EPERM,
        "unattested process denied while the agent is down"
    );
    assert_eq!(
        old.run(&connect),
        "OK",
        "verdicts written before the crash still apply"
    );
    // ...and the tracepoints still run: exec still clears.
    old.exec();
    assert_eq!(
        old.run(&connect),
        EPERM,
        "exec clears while the agent is down"
    );

    // The next agent adopts: same maps, programs swapped in place.
    let second = Enforcer::load(&cfg).expect("second load");
    assert!(second.adopted());
    assert_eq!(
        second.verdicts().expect("verdicts"),
        [VerdictEntry {
            subject: 7,
            service_id: 1,
            allow: true,
            inject: false,
            rule: 70,
            expires_ns: 0
        }]
    );
    assert_eq!(
        second.services().expect("services"),
        [(DstPrefix::host(LO4, l.port, Proto::Tcp), 1)]
    );
    let before = second.stats().expect("stats");
    assert_eq!(before.allowed, 2, "counters survive: {before:?}");
    // Decisions made while no agent ran are waiting in the ring buffer.
    let backlog = drain(&second);
    assert_eq!(backlog.len(), 4, "{backlog:#?}");

    attest(&second, newcomer.pid, 7);
    assert_eq!(newcomer.run(&connect), "OK");
    assert_eq!(old.run(&connect), EPERM);
    // One event per decision: the old programs were replaced, not doubled.
    let evs = drain(&second);
    assert_eq!(evs.len(), 2, "{evs:#?}");
    assert_eq!(
        (evs[0].tgid, evs[0].decision),
        (newcomer.pid, Decision::Allow)
    );
    assert_eq!(
        (evs[1].tgid, evs[1].decision),
        (old.pid, Decision::Unattested)
    );

    // Restarting again is just as seamless.
    drop(second);
    let third = Enforcer::load(&cfg).expect("third load");
    assert!(third.adopted());
    assert_eq!(newcomer.run(&connect), "OK");
    assert_eq!(drain(&third).len(), 1);

    // The documented removal command: nothing attached, nothing pinned.
    let report = Enforcer::detach_all(&fs.pin_dir(), Some(&cg.path)).expect("detach_all");
    // The eleven socket hooks (connect, sendmsg, getpeername, sock_ops,
    // ingress, egress, socket creation, setsockopt) are forced off. Tracepoint links
    // cannot be (BPF_LINK_DETACH is unsupported for them); unpinned, they go
    // away with the last fd, here `third`'s. The sk_msg program goes with
    // its map.
    assert_eq!(report.links_detached, 11, "{report:?}");
    // 16 links and 16 maps.
    assert_eq!(report.pins_removed, 32, "{report:?}");
    assert!(!fs.pin_dir().exists());
    assert_eq!(old.run(&connect), "OK", "no longer enforced");
    drop(third);
    assert_eq!(old.run(&connect), "OK");
}

#[test]
fn detach_all_removes_a_live_agents_unpinned_links() {
    if !can_run() {
        return;
    }
    let cg = TestCgroup::new("kernel");
    let l = tcp_listeners();
    let e = Enforcer::load(&cg.config(None)).expect("load");
    e.set_service(DstPrefix::host(LO4, l.port, Proto::Tcp), 1)
        .expect("service");
    let mut c = Client::spawn(&cg);
    let connect = format!("connect 4 127.0.0.1 {}", l.port);
    assert_eq!(c.run(&connect), EPERM);

    let nowhere = std::env::temp_dir().join(format!("tether-no-pins-{}", std::process::id()));
    let report = Enforcer::detach_all(&nowhere, Some(&cg.path)).expect("detach_all");
    assert_eq!(
        report.links_detached, 11,
        "the eleven socket hooks on this cgroup: {report:?}"
    );
    assert_eq!(report.pins_removed, 0);
    assert_eq!(c.run(&connect), "OK");
}

#[test]
fn an_incompatible_pinned_map_is_refused() {
    if !can_run() {
        return;
    }
    let cg = TestCgroup::new("kernel");
    let fs = BpfFs::new();
    let maps = fs.pin_dir().join("maps");
    std::fs::create_dir_all(&maps).expect("mkdir");
    // A `procs` from some other version: value is 8 bytes, not 16.
    let wrong =
        aya::maps::HashMap::<aya::maps::MapData, u32, u64>::create(65536, 0).expect("create map");
    wrong.pin(maps.join("procs")).expect("pin");

    match Enforcer::load(&cg.config(Some(&fs.pin_dir()))) {
        Err(KernelError::IncompatiblePin { map, .. }) => assert_eq!(map, "procs"),
        other => panic!("expected IncompatiblePin, got {other:?}"),
    }
    // Nothing was attached, nothing else pinned.
    assert!(!fs.pin_dir().join("links").join("connect4").exists());
}

#[test]
fn pins_must_be_on_bpffs() {
    if !can_run() {
        return;
    }
    let cg = TestCgroup::new("kernel");
    let dir = tempfile::tempdir().expect("tempdir");
    match Enforcer::load(&cg.config(Some(dir.path()))) {
        Err(e @ KernelError::NotBpffs { .. }) => assert!(e.to_string().contains("mount -t bpf")),
        other => panic!("expected NotBpffs, got {other:?}"),
    }
}

#[test]
fn refuses_a_directory_that_is_not_a_cgroup() {
    if !can_run() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = tether_kernel::EnforcerConfig {
        cgroup: Some(dir.path().to_path_buf()),
        pin_dir: None,
    };
    assert!(matches!(
        Enforcer::load(&cfg),
        Err(KernelError::NotCgroup2 { .. })
    ));
}
