//! io_uring is another way to connect(): IORING_OP_CONNECT runs the same
//! socket-layer code, inline in io_uring_enter, on an io-wq worker thread
//! (IOSQE_ASYNC), or on the SQPOLL kernel thread. All of those are threads
//! of the submitting process, and the hook keys on its tgid, so each must be
//! decided exactly like a plain connect(). Python has no io_uring, so the
//! client is this test binary re-executed in helper mode.

mod common;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, Ipv4Addr},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
};

use common::{EnforceHere as _, TestCgroup, attest, can_run, drain, tcp_listeners};
use tether_kernel::{Decision, DstPrefix, Enforcer, Proto};

const HELPER_ENV: &str = "TETHER_KERNEL_IO_URING_HELPER";

/// The child's side. As a normal test it returns at once; with
/// `HELPER_ENV` set it serves `connect PORT MODE` lines on stdin.
#[test]
fn io_uring_helper() {
    if std::env::var_os(HELPER_ENV).is_none() {
        return;
    }
    println!("HELPER READY {}", std::process::id());
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        let out = match words.as_slice() {
            ["connect", port, mode] => match port.parse() {
                Ok(port) => match uring_connect(port, mode) {
                    Ok(()) => "OK".to_owned(),
                    Err(e) => format!("ERR {}", e.raw_os_error().unwrap_or(-1)),
                },
                Err(_) => "BAD port".to_owned(),
            },
            _ => format!("BAD {line}"),
        };
        println!("HELPER {out}");
    }
}

fn uring_connect(port: u16, mode: &str) -> std::io::Result<()> {
    use io_uring::{IoUring, opcode, squeue, types};
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

    let mut ring: IoUring = match mode {
        "sqpoll" => IoUring::builder().setup_sqpoll(1000).build(4)?,
        _ => IoUring::new(4)?,
    };
    // SAFETY: plain socket(2); the fd is owned below.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh fd nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(Ipv4Addr::LOCALHOST).to_be(),
        },
        sin_zero: [0; 8],
    };
    let flags = if mode == "async" {
        squeue::Flags::ASYNC
    } else {
        squeue::Flags::empty()
    };
    let sqe = opcode::Connect::new(
        types::Fd(sock.as_raw_fd()),
        std::ptr::from_ref(&addr).cast::<libc::sockaddr>(),
        size_of::<libc::sockaddr_in>() as libc::socklen_t,
    )
    .build()
    .flags(flags)
    .user_data(1);
    // SAFETY: `addr` and `sock` outlive the submission: we wait for its
    // completion before returning.
    unsafe { ring.submission().push(&sqe) }.map_err(|_| std::io::Error::other("queue full"))?;
    ring.submit_and_wait(1)?;
    let cqe = ring
        .completion()
        .next()
        .ok_or_else(|| std::io::Error::other("no completion"))?;
    match cqe.result() {
        r if r < 0 => Err(std::io::Error::from_raw_os_error(-r)),
        _ => Ok(()),
    }
}

struct Helper {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pid: u32,
}

impl Helper {
    fn spawn(cg: &TestCgroup) -> Self {
        let exe = std::env::current_exe().expect("current_exe");
        let mut child = Command::new(exe)
            .args([
                "--exact",
                "io_uring_helper",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(HELPER_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn helper");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let pid = child.id();
        cg.add(pid);
        let mut h = Self {
            child,
            stdin,
            stdout,
            pid,
        };
        assert_eq!(h.line(), format!("READY {pid}"));
        h
    }

    /// The next line from the helper itself. libtest prints its own lines
    /// too, and "test io_uring_helper ... " without a newline before ours.
    fn line(&mut self) -> String {
        loop {
            let mut l = String::new();
            let n = self.stdout.read_line(&mut l).expect("read helper");
            assert!(n > 0, "helper {} exited", self.pid);
            if let Some((_, rest)) = l.trim().split_once("HELPER ") {
                return rest.to_owned();
            }
        }
    }

    fn connect(&mut self, port: u16, mode: &str) -> String {
        writeln!(self.stdin, "connect {port} {mode}").expect("write helper");
        self.stdin.flush().expect("flush");
        self.line()
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn io_uring_connect_is_enforced_inline_async_and_sqpoll() {
    if !can_run() || std::env::var_os(HELPER_ENV).is_some() {
        return;
    }
    let cg = TestCgroup::new("kernel");
    let e = Enforcer::load(&cg.config(None)).expect("load");
    let l = tcp_listeners();
    e.set_service(
        DstPrefix::host(IpAddr::V4(Ipv4Addr::LOCALHOST), l.port, Proto::Tcp),
        1,
    )
    .expect("service");
    e.set_verdict(9, 1, true, 1, 0).expect("verdict");

    let mut denied = Helper::spawn(&cg);
    let mut allowed = Helper::spawn(&cg);
    attest(&e, allowed.pid, 9);
    let modes = ["inline", "async", "sqpoll"];
    for mode in modes {
        assert_eq!(
            denied.connect(l.port, mode),
            format!("ERR {}", libc::EPERM),
            "{mode}"
        );
        assert_eq!(allowed.connect(l.port, mode), "OK", "{mode}");
    }

    // Decided against the submitting process, whichever thread ran it.
    let evs = drain(&e);
    assert_eq!(evs.len(), 2 * modes.len(), "{evs:#?}");
    for pair in evs.chunks(2) {
        assert_eq!(
            (pair[0].tgid, pair[0].decision),
            (denied.pid, Decision::Unattested)
        );
        assert_eq!(
            (pair[1].tgid, pair[1].decision),
            (allowed.pid, Decision::Allow)
        );
    }
}
