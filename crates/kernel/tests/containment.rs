//! Containment in the kernel half: what was executed is recorded at exec
//! (and how the loader was steered); a process whose memory or image
//! someone else may have changed loses its authority; a protected port of
//! this host is reached at every local address; a socket used by a process
//! that did not make it carries nothing; raw and packet sockets are not
//! created; conditional verdicts lapse on their own.

mod common;

use std::{
    io::Read as _,
    net::{IpAddr, Ipv4Addr},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    time::Duration,
};

use common::{Client, EPERM, EnforceHere as _, TestCgroup, attest, can_run, drain, tcp_listeners};
use tether_kernel::{Decision, DstPrefix, Enforcer, ExecFlags, Hook, Proto, Reason, ServiceFlags};

const LO4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn protect(e: &Enforcer, port: u16) {
    e.set_service(DstPrefix::host(LO4, port, Proto::Tcp), 1)
        .expect("service");
}

#[test]
fn the_exec_record_names_the_file_and_the_loaders_environment() {
    assert!(can_run());
    let cg = TestCgroup::new("kernel");
    let e = Enforcer::load(&cg.config(None)).expect("load");

    let plain = Client::spawn(&cg);
    let rec = e
        .exec_record(plain.pid)
        .expect("lookup")
        .expect("a record for a process exec'd after the load");
    let exe = std::fs::metadata(format!("/proc/{}/exe", plain.pid)).expect("stat exe");
    assert_eq!((rec.dev, rec.ino), (exe.dev(), exe.ino()));
    let real = std::fs::read_link(format!("/proc/{}/exe", plain.pid)).expect("exe link");
    assert_eq!(
        Some(rec.name.as_str()),
        real.file_name().and_then(|n| n.to_str())
    );
    assert!(rec.exec_id > 0 && rec.start_ns > 0);
    let my_mnt = std::fs::metadata("/proc/self/ns/mnt").expect("mnt ns");
    assert_eq!(u64::from(rec.mnt_ns), my_mnt.ino());
    assert_eq!(
        rec.flags.0 & !ExecFlags::CHROOT,
        0,
        "{:?}",
        rec.flags.names()
    );

    let steered = Client::spawn_with_env(
        &cg,
        &[
            ("LD_PRELOAD", "/nonexistent/evil.so"),
            ("LD_AUDIT", "/nonexistent/audit.so"),
            ("LD_LIBRARY_PATH", "/nonexistent"),
            ("LD_BIND_NOW", "1"),
            ("GCONV_PATH", "/nonexistent"),
            ("OPENSSL_CONF", "/nonexistent/openssl.cnf"),
        ],
    );
    let f = e
        .exec_record(steered.pid)
        .expect("lookup")
        .expect("record")
        .flags;
    for bit in [
        ExecFlags::LD_PRELOAD,
        ExecFlags::LD_AUDIT,
        ExecFlags::LD_LIBRARY_PATH,
        ExecFlags::LD_OTHER,
        ExecFlags::GCONV_PATH,
        ExecFlags::RUNTIME_ENV,
    ] {
        assert!(f.has(bit), "{bit:#x} missing from {:?}", f.names());
    }
    assert!(!f.tainted());

    // A long environment is scanned past its first chunks.
    let long = "x".repeat(100_000);
    let late = Client::spawn_with_env(
        &cg,
        &[("AAA_PADDING", &long), ("ZZ", "1"), ("LD_PRELOAD", "")],
    );
    let f = e
        .exec_record(late.pid)
        .expect("lookup")
        .expect("record")
        .flags;
    assert!(f.has(ExecFlags::LD_PRELOAD), "{:?}", f.names());
    assert!(!f.has(ExecFlags::ENV_UNSCANNED));

    // Exec'd in a user namespace of its own (its mounts still the host's).
    let f = flags_of_exec(
        &e,
        "import ctypes\nassert ctypes.CDLL(None).unshare(0x10000000) == 0\nnow_exec()",
    );
    assert!(f.has(ExecFlags::USER_NS), "{:?}", f.names());
    assert!(!f.has(ExecFlags::USERNS_MOUNTS), "{:?}", f.names());
    // With a seccomp filter whose listener another process holds.
    let f = flags_of_exec(
        &e,
        "import ctypes, struct\n\
         libc = ctypes.CDLL(None, use_errno=True)\n\
         assert libc.prctl(38, 1, 0, 0, 0) == 0\n\
         insn = ctypes.create_string_buffer(struct.pack('HBBI', 0x06, 0, 0, 0x7fff0000))\n\
         class Prog(ctypes.Structure):\n\
         \x20   _fields_ = [('len', ctypes.c_ushort), ('insns', ctypes.c_void_p)]\n\
         prog = Prog(1, ctypes.addressof(insn))\n\
         listener = libc.syscall(317, 1, 8, ctypes.byref(prog))\n\
         assert listener >= 0, ctypes.get_errno()\n\
         now_exec()",
    );
    assert!(f.has(ExecFlags::SECCOMP_NOTIFY), "{:?}", f.names());
    assert!(!f.has(ExecFlags::USER_NS), "{:?}", f.names());
}

/// The flags of the exec record of a `sleep` that Python forks and execs
/// after running `setup` (which calls `now_exec()` at its end). The parent
/// stays alive meanwhile, holding whatever `setup` opened.
fn flags_of_exec(e: &Enforcer, setup: &str) -> ExecFlags {
    let script = format!(
        "import os, sys, time\n\
         def now_exec():\n\
         \x20   r, w = os.pipe()\n\
         \x20   pid = os.fork()\n\
         \x20   if pid == 0:\n\
         \x20       os.close(w)\n\
         \x20       os.read(r, 1)\n\
         \x20       os.execv('/bin/sleep', ['sleep', '5'])\n\
         \x20   print(pid, flush=True)\n\
         \x20   os.write(w, b'x')\n\
         \x20   time.sleep(5)\n\
         {setup}\n"
    );
    let mut child = std::process::Command::new("python3")
        .env_remove("LD_LIBRARY_PATH")
        .args(["-c", &script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("read");
    let pid: u32 = line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no pid from the setup: {line:?}"));
    let mut rec = None;
    for _ in 0..300 {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        if exe.file_name().is_some_and(|n| n == "sleep") {
            rec = e.exec_record(pid).expect("lookup");
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: kill(2) on our own child's child and our child.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
    let _ = child.kill();
    let _ = child.wait();
    rec.expect("a record for the exec'd sleep").flags
}

#[test]
fn a_traced_process_loses_its_authority_until_it_execs() {
    assert!(can_run());
    let cg = TestCgroup::new("kernel");
    let e = Enforcer::load(&cg.config(None)).expect("load");
    let l = tcp_listeners();
    protect(&e, l.port);
    e.set_verdict(3, 1, true, 9, 0).expect("verdict");
    let mut c = Client::spawn(&cg);
    attest(&e, c.pid, 3);
    let connect = format!("connect 4 127.0.0.1 {}", l.port);
    assert_eq!(c.run(&connect), "OK");
    drain(&e);

    // We (outside the workload) attach; the tracee keeps running.
    let me = std::process::id();
    // SAFETY: PTRACE_SEIZE on our own child; detached below.
    let r = unsafe { libc::ptrace(libc::PTRACE_SEIZE, c.pid as i32, 0, 0) };
    assert_eq!(r, 0, "PTRACE_SEIZE: {}", std::io::Error::last_os_error());
    let events = drain(&e);
    let mark = events
        .iter()
        .find(|ev| ev.hook == Hook::Taint && ev.tgid == me)
        .expect("a taint event");
    assert_eq!(
        (mark.tgid, mark.aux, mark.reason, mark.decision),
        (me, c.pid, Reason::Ptrace, Decision::Taint)
    );
    let rec = e.exec_record(c.pid).expect("lookup").expect("record");
    assert!(rec.flags.has(ExecFlags::PTRACE) && rec.tracer == me);

    assert_eq!(c.run(&connect), EPERM, "traced: no authority");
    let ev = drain(&e).pop().expect("event");
    assert_eq!(
        (ev.decision, ev.reason, ev.aux),
        (Decision::Deny, Reason::Tainted, me)
    );

    // SAFETY: stopping and detaching our own tracee (a seized tracee must
    // be stopped to be detached).
    unsafe {
        assert_eq!(libc::ptrace(libc::PTRACE_INTERRUPT, c.pid as i32, 0, 0), 0);
        let mut status = 0;
        libc::waitpid(c.pid as i32, &mut status, libc::__WALL);
        assert_eq!(libc::ptrace(libc::PTRACE_DETACH, c.pid as i32, 0, 0), 0);
    }
    assert_eq!(
        c.run(&connect),
        EPERM,
        "code put in while it was traced stays: so does the mark"
    );
    // A new image is clean (and unattested until the agent looks at it).
    c.exec();
    attest(&e, c.pid, 3);
    assert_eq!(c.run(&connect), "OK");
}

#[test]
fn an_attach_marks_every_process_the_tracer_thread_traces() {
    assert!(can_run());
    let cg = TestCgroup::new("kernel");
    let e = Enforcer::load(&cg.config(None)).expect("load");
    let mut a = Client::spawn(&cg);
    let b = Client::spawn(&cg);
    let seize = |pid: u32| {
        // SAFETY: PTRACE_SEIZE on our own child; detached below.
        let r = unsafe { libc::ptrace(libc::PTRACE_SEIZE, pid as i32, 0, 0) };
        assert_eq!(r, 0, "PTRACE_SEIZE: {}", std::io::Error::last_os_error());
    };
    seize(a.pid);
    // A new image of A, still traced: its record says "traced at exec",
    // not the ptrace mark (that went with the old image).
    a.exec();
    let rec = e.exec_record(a.pid).expect("lookup").expect("record");
    assert!(
        rec.flags.has(ExecFlags::TRACED_AT_EXEC) && !rec.flags.has(ExecFlags::PTRACE),
        "{:?}",
        rec.flags.names()
    );
    // Attaching to B puts B at the head of this thread's list, A behind
    // it: the attach marks everyone on the list, not only the head (a
    // tracee auto-attached in between would be the head otherwise).
    seize(b.pid);
    for (who, pid) in [("B", b.pid), ("A", a.pid)] {
        let rec = e.exec_record(pid).expect("lookup").expect("record");
        assert!(
            rec.flags.has(ExecFlags::PTRACE),
            "{who}: {:?}",
            rec.flags.names()
        );
    }
    for pid in [a.pid, b.pid] {
        // SAFETY: stopping and detaching our own tracees.
        unsafe {
            assert_eq!(libc::ptrace(libc::PTRACE_INTERRUPT, pid as i32, 0, 0), 0);
            let mut status = 0;
            libc::waitpid(pid as i32, &mut status, libc::__WALL);
            assert_eq!(libc::ptrace(libc::PTRACE_DETACH, pid as i32, 0, 0), 0);
        }
    }
}

#[test]
fn writing_another_process_memory_from_the_workload_is_fatal_and_marks_the_target() {
    assert!(can_run());
    let cg = TestCgroup::new("kernel");
    let e = Enforcer::load(&cg.config(None)).expect("load");
    let l = tcp_listeners();
    protect(&e, l.port);
    e.set_verdict(4, 1, true, 9, 0).expect("verdict");
    let connect = format!("connect 4 127.0.0.1 {}", l.port);

    for how in ["vmwrite", "procmem", "creatmem"] {
        let mut victim = Client::spawn(&cg);
        attest(&e, victim.pid, 4);
        assert_eq!(victim.run(&connect), "OK");
        drain(&e);
        let mut attacker = Client::spawn(&cg);
        let answer = attacker.try_run(&format!("{how} {}", victim.pid));
        assert_eq!(answer, None, "{how}: the attacker must not return");
        assert_eq!(attacker.exit_signal(), Some(libc::SIGKILL), "{how}");
        let rec = e.exec_record(victim.pid).expect("lookup").expect("record");
        assert!(
            rec.flags.has(ExecFlags::MEM_WRITE) && rec.tracer == attacker.pid,
            "{how}: {:?}",
            rec.flags.names()
        );
        let mark = drain(&e)
            .into_iter()
            .find(|ev| ev.hook == Hook::Taint && ev.tgid == attacker.pid)
            .expect("taint event");
        assert_eq!(
            (mark.tgid, mark.aux, mark.reason),
            (attacker.pid, victim.pid, Reason::Killed),
            "{how}"
        );
        assert_eq!(
            victim.run(&connect),
            EPERM,
            "{how}: the target has no authority"
        );
    }
}

#[test]
fn re_pointing_the_exe_link_marks_the_process() {
    assert!(can_run());
    let cg = TestCgroup::new("kernel");
    let e = Enforcer::load(&cg.config(None)).expect("load");
    let dir = tempfile::tempdir().expect("tempdir");
    let forge = common::compile_attack("forge_exe", dir.path());
    let mut child = std::process::Command::new(&forge)
        .args(["/bin/true", "wait"])
        .env_remove("LD_LIBRARY_PATH")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn forge_exe");
    let pid = child.id();
    cg.add(pid);
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("read");
    assert_eq!(line.trim(), format!("FORGED {pid}"));
    // /proc says /bin/true, with its hash...
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("exe");
    assert!(exe.ends_with("true"), "{}", exe.display());
    // ...the kernel's record says what really ran, and that it was done.
    let rec = e.exec_record(pid).expect("lookup").expect("record");
    assert!(rec.flags.has(ExecFlags::SET_MM), "{:?}", rec.flags.names());
    let real = std::fs::metadata(&forge).expect("stat");
    assert_eq!(
        (rec.dev, rec.ino, rec.name.as_str()),
        (real.dev(), real.ino(), "forge_exe")
    );
    let ev = drain(&e)
        .into_iter()
        .find(|ev| ev.hook == Hook::Taint && ev.tgid == pid)
        .expect("taint event");
    assert_eq!((ev.tgid, ev.aux, ev.reason), (pid, pid, Reason::SetMm));
    drop(child.stdin.take());
    let _ = child.wait();
}

#[test]
fn a_local_port_is_protected_at_every_address_that_reaches_it() {
    assert!(can_run());
    let cg = TestCgroup::new("kernel");
    let e = Enforcer::load(&cg.config(None)).expect("load");
    // A listener on every address, as Redis with `bind * -::*`.
    let l = std::net::TcpListener::bind("[::]:0").expect("bind [::]");
    let port = l.local_addr().expect("addr").port();
    let u = std::net::UdpSocket::bind(("0.0.0.0", port)).expect("bind udp");
    e.set_local_port(Proto::Tcp, port, 7, ServiceFlags::default())
        .expect("local port");
    e.set_local_port(Proto::Udp, port, 7, ServiceFlags::default())
        .expect("local port");
    let mut c = Client::spawn(&cg);
    for (v, host) in [
        ("4", "127.0.0.1"),
        ("4", "127.0.0.2"),
        ("4", "0.0.0.0"),
        ("6", "::"),
        ("6", "::1"),
        ("6", "::ffff:0.0.0.0"),
        ("6", "::ffff:127.9.9.9"),
    ] {
        assert_eq!(
            c.run(&format!("connect {v} {host} {port}")),
            EPERM,
            "{host}"
        );
        let ev = drain(&e).pop().expect("event");
        assert_eq!(
            (ev.service_id, ev.addr, ev.decision),
            (
                7,
                host.parse::<IpAddr>().unwrap().to_canonical(),
                Decision::Unattested
            ),
            "{host}"
        );
        assert_eq!(
            c.run(&format!("sendto {v} {host} {port}")),
            EPERM,
            "udp {host}"
        );
    }
    u.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 16];
    assert!(u.recv(&mut buf).is_err(), "a datagram got through");

    // An address of the host's own (here one made up, as the agent adds them
    // from netlink): only once it is listed.
    let other = format!("connect 4 192.0.2.77 {port}");
    let before = c.run(&other);
    assert_ne!(before, EPERM, "not local yet");
    e.set_local_addrs(&["192.0.2.77".parse().unwrap()])
        .expect("local addrs");
    assert_eq!(c.run(&other), EPERM);
    e.set_local_addrs(&[]).expect("local addrs");
    assert_ne!(c.run(&other), EPERM);

    // An attested, allowed process reaches it at any of them.
    e.set_verdict(8, 7, true, 1, 0).expect("verdict");
    attest(&e, c.pid, 8);
    assert_eq!(c.run(&format!("connect 4 0.0.0.0 {port}")), "OK");
    assert_eq!(c.run(&format!("connect 6 :: {port}")), "OK");
    // Another port is untouched.
    let free = tcp_listeners();
    assert_eq!(c.run(&format!("connect 4 0.0.0.0 {}", free.port)), "OK");
}

#[test]
fn a_socket_used_by_a_process_that_did_not_make_it_sends_nothing() {
    assert!(can_run());
    let cg = TestCgroup::new("kernel");
    let e = Enforcer::load(&cg.config(None)).expect("load");
    let l = tcp_listeners();
    protect(&e, l.port);
    e.set_verdict(6, 1, true, 9, 0).expect("verdict");
    let mut owner = Client::spawn(&cg);
    attest(&e, owner.pid, 6);
    let answer = owner.run(&format!("hold 4 127.0.0.1 {}", l.port));
    let fd: i32 = answer
        .rsplit("fd=")
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("hold: {answer}"));
    let (mut server_side, _) = l.v4.accept().expect("accept");
    server_side
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    assert_eq!(owner.run("holdsend 0 mine"), "OK");
    let mut got = [0u8; 5];
    server_side.read_exact(&mut got).expect("owner's bytes");
    assert_eq!(&got, b"mine\n");
    drain(&e);

    // Taken out of the owner with pidfd_getfd by a process with no
    // verdict (this test process).
    // SAFETY: plain syscalls; the fds are owned below.
    let stolen = unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, owner.pid, 0);
        assert!(
            pidfd >= 0,
            "pidfd_open: {}",
            std::io::Error::last_os_error()
        );
        let pidfd = OwnedFd::from_raw_fd(pidfd as i32);
        let s = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0);
        assert!(s >= 0, "pidfd_getfd: {}", std::io::Error::last_os_error());
        std::net::TcpStream::from_raw_fd(s as i32)
    };
    use std::io::Write as _;
    let err = (&stolen)
        .write_all(b"STOLEN\n")
        .expect_err("a borrowed socket sent");
    assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
    let ev = drain(&e)
        .into_iter()
        .find(|ev| ev.hook == Hook::Send)
        .expect("send event");
    assert_eq!(
        (ev.tgid, ev.reason, ev.aux, ev.port, ev.service_id),
        (std::process::id(), Reason::Borrowed, owner.pid, l.port, 1)
    );
    // Nothing arrived, and the connection is dead for sends from then on,
    // the owner's included (the kernel keeps a drop verdict on the
    // socket): a connection someone else tried to use is not trusted again.
    assert_eq!(owner.run("holdsend 0 again"), "ERR 13 EACCES");
    let mut rest = Vec::new();
    let _ = server_side.read_to_end(&mut rest);
    assert!(rest.is_empty(), "bytes arrived after the theft: {rest:?}");
    assert!(e.stats().expect("stats").sends_denied >= 1);
}

#[test]
fn raw_and_packet_sockets_are_not_created_in_the_workload() {
    assert!(can_run());
    let cg = TestCgroup::new("kernel");
    let e = Enforcer::load(&cg.config(None)).expect("load");
    let mut c = Client::spawn(&cg);
    // Raw IPv4 and IPv6 sockets for UDP, TCP and IPPROTO_RAW.
    for (family, proto) in [(2, 17), (2, 6), (2, 255), (10, 17), (10, 255)] {
        assert_eq!(
            c.run(&format!("raw {family} {proto}")),
            EPERM,
            "raw {family}/{proto}"
        );
    }
    // ICMP (ping) still works, without crafting its own IP header.
    assert_eq!(c.run("raw 2 1"), "OK");
    assert_eq!(c.run("raw 10 58"), "OK");
    assert_eq!(c.run("hdrincl"), EPERM);
    // A packet socket passes no cgroup hook: creating one is fatal.
    assert_eq!(c.try_run("packet"), None);
    assert_eq!(c.exit_signal(), Some(libc::SIGKILL));
    let evs: Vec<_> = drain(&e)
        .into_iter()
        .filter(|ev| ev.hook == Hook::Socket)
        .collect();
    assert_eq!(evs.len(), 7, "{evs:?}");
    assert!(
        evs.iter()
            .all(|ev| ev.tgid == c.pid && ev.reason == Reason::RawSocket)
    );
    assert_eq!(evs[6].aux2 >> 16, 17, "AF_PACKET");
    assert_eq!(e.stats().expect("stats").sockets_denied, 7);
}

#[test]
fn the_old_ways_to_the_same_calls_are_fatal_in_the_workload() {
    assert!(can_run());
    let cg = TestCgroup::new("kernel");
    let e = Enforcer::load(&cg.config(None)).expect("load");
    // A 32-bit system call nobody watches works (getpid: 20)...
    let mut c = Client::spawn(&cg);
    assert_eq!(c.run("int80 20"), format!("RET {}", c.pid));
    // ...a watched one (prctl: 172) is not decoded: fatal before it runs.
    assert_eq!(c.try_run("int80 172"), None);
    assert_eq!(c.exit_signal(), Some(libc::SIGKILL));
    let ev = drain(&e)
        .into_iter()
        .find(|ev| ev.hook == Hook::Taint && ev.tgid == c.pid)
        .expect("taint event");
    assert_eq!((ev.tgid, ev.reason, ev.aux2), (c.pid, Reason::Killed, 12));
    // socket(AF_INET, SOCK_PACKET) is a packet socket too.
    let mut c = Client::spawn(&cg);
    assert_eq!(c.try_run("sockpacket"), None);
    assert_eq!(c.exit_signal(), Some(libc::SIGKILL));
    // Any x32 system call (here getpid's number with the x32 bit).
    let mut c = Client::spawn(&cg);
    assert_eq!(c.try_run("x32 39"), None);
    assert_eq!(c.exit_signal(), Some(libc::SIGKILL));
    // PR_SET_MM with high bits in the option register is still PR_SET_MM
    // (the kernel reads an int): marked, whether or not it succeeds.
    let mut c = Client::spawn(&cg);
    let answer = c.run("setmmhi /bin/true");
    let rec = e.exec_record(c.pid).expect("lookup").expect("record");
    assert!(
        rec.flags.has(ExecFlags::SET_MM),
        "{answer}: {:?}",
        rec.flags.names()
    );
    // Outside the workload neither is fatal.
    let mut out = std::process::Command::new("python3")
        .env_remove("LD_LIBRARY_PATH")
        .args([
            "-c",
            "import socket\ntry:\n socket.socket(2, 10, 0)\nexcept OSError:\n pass\nprint('ALIVE')",
        ])
        .output()
        .expect("python3");
    assert!(out.status.success(), "{out:?}");
    out.stdout.retain(|b| !b.is_ascii_whitespace());
    assert_eq!(out.stdout, b"ALIVE");
    assert_eq!(e.stats().expect("stats").sockets_denied, 1);
}

#[test]
fn a_conditional_verdict_lapses_without_the_agent() {
    assert!(can_run());
    let cg = TestCgroup::new("kernel");
    let e = Enforcer::load(&cg.config(None)).expect("load");
    let l = tcp_listeners();
    protect(&e, l.port);
    let expires = tether_kernel::boottime_ns() + 400_000_000;
    e.set_verdict(9, 1, true, 9, expires).expect("verdict");
    let mut c = Client::spawn(&cg);
    attest(&e, c.pid, 9);
    let connect = format!("connect 4 127.0.0.1 {}", l.port);
    assert_eq!(c.run(&connect), "OK");
    while tether_kernel::boottime_ns() <= expires {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(c.run(&connect), EPERM);
    let ev = drain(&e).pop().expect("event");
    assert_eq!((ev.decision, ev.reason), (Decision::Deny, Reason::Expired));
}
