//! Fixtures for the kernel tests: a cgroup of our own (never the root), a
//! private bpffs mount, loopback listeners, and a scriptable child process
//! that is moved into the cgroup before it opens any socket. Every fixture
//! cleans up in Drop, so a failing assertion still leaves nothing behind.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{TcpListener, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::Duration,
};

use tether_kernel::{Enforcer, EnforcerConfig, Event};

/// The kernel tests load BPF programs into a cgroup of their own: they
/// need root, cgroup2 and python3 (the test clients). Without them a test
/// fails naming what is missing; it never passes having done nothing
/// (unless the run sets `TETHER_TEST_ALLOW_SKIP=1`, and then the skip is
/// printed; see `tether_test_support::require`).
pub fn can_run() -> bool {
    use tether_test_support::require;
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    require("the kernel tests load BPF programs and need root", root)
        && require(
            "the kernel tests need a cgroup2 mount (none in /proc/mounts)",
            tether_kernel::cgroup2_mount().is_some(),
        )
        && require(
            "the kernel tests need python3 for the test clients",
            Command::new("python3")
                .arg("-c")
                .arg("")
                .status()
                .is_ok_and(|s| s.success()),
        )
}

#[allow(unused_imports, reason = "each test binary uses a different subset")]
pub use tether_test_support::{BpfFs, Cgroup as TestCgroup};

/// The enforcer's configuration for a test cgroup.
pub trait EnforceHere {
    fn config(&self, pin_dir: Option<&Path>) -> EnforcerConfig;
}

impl EnforceHere for TestCgroup {
    fn config(&self, pin_dir: Option<&Path>) -> EnforcerConfig {
        EnforcerConfig {
            cgroup: Some(self.path.clone()),
            pin_dir: pin_dir.map(Path::to_path_buf),
        }
    }
}

/// A TCP listener on 127.0.0.1 and one on [::1] with the same port, so the
/// v4, v6 and v4-mapped tests share one protected port number.
pub struct Listeners {
    pub v4: TcpListener,
    pub v6: Option<TcpListener>,
    pub port: u16,
}

pub fn tcp_listeners() -> Listeners {
    for _ in 0..50 {
        let v4 = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let port = v4.local_addr().expect("addr").port();
        match TcpListener::bind(("::1", port)) {
            Ok(v6) => {
                return Listeners {
                    v4,
                    v6: Some(v6),
                    port,
                };
            }
            Err(_) => continue,
        }
    }
    let v4 = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
    let port = v4.local_addr().expect("addr").port();
    Listeners { v4, v6: None, port }
}

pub fn udp_server() -> (UdpSocket, u16) {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
    let port = s.local_addr().expect("addr").port();
    (s, port)
}

/// The test client: a Python process that runs one command per stdin line
/// and answers with one line ("OK ..." or "ERR <errno> <name>").
const CLIENT: &str = r#"
BOOT = "import os\nexec(os.environ['TETHER_CLIENT'])"
import errno, os, socket, sys, threading

def attempt(f):
    try:
        extra = f()
        return "OK" + ("" if extra is None else " " + str(extra))
    except OSError as e:
        return "ERR %d %s" % (e.errno, errno.errorcode.get(e.errno, "?"))

def fam(v):
    return socket.AF_INET if v == "4" else socket.AF_INET6

def connect(v, host, port, proto=0):
    s = socket.socket(fam(v), socket.SOCK_STREAM, proto)
    s.settimeout(5)
    try:
        s.connect((host, int(port)))
    finally:
        s.close()

def peer(v, host, port):
    # Connects, reports getpeername(), then says hello and reports the answer.
    s = socket.socket(fam(v), socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect((host, int(port)))
        p = s.getpeername()
        s.sendall(b"hello\n")
        return "%s %d %s" % (p[0], p[1], s.recv(100).decode().strip())
    finally:
        s.close()

def fastopen(v, host, port):
    # Blocking, so an allowed call returns after the handshake instead of
    # EINPROGRESS.
    s = socket.socket(fam(v), socket.SOCK_STREAM)
    try:
        s.sendto(b"x", socket.MSG_FASTOPEN, (host, int(port)))
    finally:
        s.close()

def udp_sendto(v, host, port):
    s = socket.socket(fam(v), socket.SOCK_DGRAM)
    try:
        s.sendto(b"ping", (host, int(port)))
    finally:
        s.close()

def udp_connect(v, host, port):
    s = socket.socket(fam(v), socket.SOCK_DGRAM)
    try:
        s.connect((host, int(port)))
        s.send(b"ping")
    finally:
        s.close()

def in_fork(f):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.write(w, attempt(f).encode())
        os._exit(0)
    os.close(w)
    out = os.read(r, 200).decode()
    os.waitpid(pid, 0)
    return out + " child=%d" % pid

def in_thread(f):
    box = {}
    def run():
        box["tid"] = threading.get_native_id()
        box["out"] = attempt(f)
    t = threading.Thread(target=run)
    t.start()
    t.join()
    return box["out"] + " tid=%d" % box["tid"]

HELD = []

def hold(v, host, port):
    # Connects and keeps the socket; answers with its index.
    s = socket.socket(fam(v), socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect((host, int(port)))
    HELD.append(s)
    return "%d fd=%d" % (len(HELD) - 1, s.fileno())

def holdsend(i, data):
    HELD[int(i)].sendall(data.encode() + b"\n")

def setns_net(path):
    # This (single-threaded) client's sockets are made there from now on.
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc().setns(fd, 0x40000000) != 0:
            import ctypes
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
    finally:
        os.close(fd)
LIBC = None
def libc():
    global LIBC
    if LIBC is None:
        import ctypes
        LIBC = ctypes.CDLL(None, use_errno=True)
    return LIBC

def check(r):
    import ctypes
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r

def raw(family, proto):
    socket.socket(int(family), socket.SOCK_RAW, int(proto)).close()

def hdrincl():
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    try:
        s.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
    finally:
        s.close()

def packet():
    socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0).close()

def creatmem(pid):
    # creat(2) is an open for writing too.
    os.close(check(libc().creat(("/proc/%s/mem" % pid).encode(), 0)))

def x32(nr):
    # An x32 system call number (the ABI bit set): ENOSYS where x32 is off.
    import ctypes
    return check(libc().syscall(ctypes.c_long(0x40000000 | int(nr))))

def setmmhi(path):
    # PR_SET_MM with bits above the int the kernel reads the option as.
    import ctypes
    fd = os.open(path, os.O_RDONLY)
    try:
        L = ctypes.c_long
        check(libc().syscall(L(157), L(0x100000000 | 35), L(13), L(fd), L(0), L(0)))
    finally:
        os.close(fd)

def sockpacket():
    # The old way to a packet socket: the kernel makes it one.
    socket.socket(socket.AF_INET, 10, 0).close()

def int80(nr):
    # One system call through the 32-bit entry from this 64-bit process:
    # mov eax, nr; xor ebx, ebx; int 0x80; ret.
    import ctypes, mmap, struct
    code = b"\xb8" + struct.pack("<I", int(nr)) + b"\x31\xdb\xcd\x80\xc3"
    m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    m.write(code)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    r = ctypes.CFUNCTYPE(ctypes.c_int)(addr)()
    return "RET %d" % r

def vmwrite(pid):
    # process_vm_writev(pid, local iov, 1, remote iov, 1, 0): one byte to
    # the target's first writable mapping.
    import ctypes
    class Iov(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
    addr = None
    for line in open("/proc/%s/maps" % pid):
        f = line.split()
        if f[1].startswith("rw"):
            addr = int(f[0].split("-")[0], 16)
            break
    buf = ctypes.create_string_buffer(b"\0")
    local = Iov(ctypes.cast(buf, ctypes.c_void_p), 1)
    remote = Iov(addr, 0)
    return check(libc().syscall(311, int(pid), ctypes.byref(local), 1, ctypes.byref(remote), 1, 0))

def procmem(pid):
    os.close(os.open("/proc/%s/mem" % pid, os.O_RDWR))

def setmm(path):
    # prctl(PR_SET_MM, PR_SET_MM_EXE_FILE, fd): re-points /proc/self/exe.
    fd = os.open(path, os.O_RDONLY)
    try:
        check(libc().prctl(35, 13, fd, 0, 0))
    finally:
        os.close(fd)

# The readiness line doubles as "this image is the final one": a launcher
# (pyenv shims, for one) may exec several times before we get here.
print("READY %d" % os.getpid(), flush=True)
for line in sys.stdin:
    a = line.split()
    if not a:
        continue
    cmd, args = a[0], a[1:]
    if cmd == "connect":
        out = attempt(lambda: connect(*args))
    elif cmd == "peer":
        out = attempt(lambda: peer(*args))
    elif cmd == "mptcp":
        try:
            socket.socket(fam(args[0]), socket.SOCK_STREAM, socket.IPPROTO_MPTCP).close()
            out = attempt(lambda: connect(*args, proto=socket.IPPROTO_MPTCP))
        except OSError:
            out = "UNSUPPORTED"
    elif cmd == "fastopen":
        out = attempt(lambda: fastopen(*args))
    elif cmd == "sendto":
        out = attempt(lambda: udp_sendto(*args))
    elif cmd == "udpconnect":
        out = attempt(lambda: udp_connect(*args))
    elif cmd == "fork-connect":
        out = in_fork(lambda: connect(*args))
    elif cmd == "thread-connect":
        out = in_thread(lambda: connect(*args))
    elif cmd == "hold":
        out = attempt(lambda: hold(*args))
    elif cmd == "holdsend":
        out = attempt(lambda: holdsend(*args))
    elif cmd == "setns":
        out = attempt(lambda: setns_net(*args))
    elif cmd == "raw":
        out = attempt(lambda: raw(*args))
    elif cmd == "hdrincl":
        out = attempt(hdrincl)
    elif cmd == "packet":
        out = attempt(packet)
    elif cmd == "creatmem":
        out = attempt(lambda: creatmem(*args))
    elif cmd == "x32":
        out = attempt(lambda: x32(*args))
    elif cmd == "setmmhi":
        out = attempt(lambda: setmmhi(*args))
    elif cmd == "sockpacket":
        out = attempt(sockpacket)
    elif cmd == "int80":
        out = int80(*args)
    elif cmd == "vmwrite":
        out = attempt(lambda: vmwrite(*args))
    elif cmd == "procmem":
        out = attempt(lambda: procmem(*args))
    elif cmd == "setmm":
        out = attempt(lambda: setmm(*args))
    elif cmd == "exec":
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-c", BOOT])
    else:
        out = "BADCMD " + cmd
    print(out, flush=True)
"#;

/// Runs [`CLIENT`] from the environment, so an exec'd image can run it again.
const BOOT: &str = "import os\nexec(os.environ['TETHER_CLIENT'])";

/// A client process, already in the test cgroup when [`Client::spawn`]
/// returns and blocked on stdin, so its sockets are created in the cgroup.
pub struct Client {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub pid: u32,
}

impl Client {
    pub fn spawn(cg: &TestCgroup) -> Self {
        Self::spawn_with_env(cg, &[])
    }

    /// As [`spawn`](Self::spawn), with extra environment variables (and
    /// none of the loader's inherited from the test runner: cargo sets
    /// LD_LIBRARY_PATH for tests).
    pub fn spawn_with_env(cg: &TestCgroup, env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new("python3");
        cmd.env_remove("LD_LIBRARY_PATH").env_remove("LD_PRELOAD");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .arg("-c")
            .arg(BOOT)
            .env("TETHER_CLIENT", CLIENT)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn python3");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let pid = child.id();
        cg.add(pid);
        let mut c = Self {
            child,
            stdin,
            stdout,
            pid,
        };
        c.expect_ready();
        c
    }

    fn expect_ready(&mut self) {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("read from client");
        assert_eq!(
            line.trim(),
            format!("READY {}", self.pid),
            "client start-up"
        );
    }

    /// Sends one command and returns the answer line, or None when the
    /// client died (killed) before answering.
    pub fn try_run(&mut self, cmd: &str) -> Option<String> {
        writeln!(self.stdin, "{cmd}").ok()?;
        self.stdin.flush().ok()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line).ok()?;
        (!line.is_empty()).then(|| line.trim().to_owned())
    }

    /// How the client ended, once it has (None while it runs).
    pub fn exit_signal(&mut self) -> Option<i32> {
        use std::os::unix::process::ExitStatusExt as _;
        for _ in 0..200 {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.signal();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// Sends one command and returns the answer line.
    pub fn run(&mut self, cmd: &str) -> String {
        writeln!(self.stdin, "{cmd}").expect("write to client");
        self.stdin.flush().expect("flush");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("read from client");
        assert!(
            !line.is_empty(),
            "client {} exited during `{cmd}`",
            self.pid
        );
        line.trim().to_owned()
    }

    /// Replaces the client's image with a fresh Python running the same
    /// client (a real execve; same pid).
    /// Returns once the new image is running.
    pub fn exec(&mut self) {
        writeln!(self.stdin, "exec").expect("write to client");
        self.stdin.flush().expect("flush");
        self.expect_ready();
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub const EPERM: &str = "ERR 1 EPERM";

/// Compiles `tests/attacks/<name>.c` (repository root) with cc into `dir`.
pub fn compile_attack(name: &str, dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/attacks")
        .join(format!("{name}.c"));
    let out = dir.join(name);
    let st = Command::new("cc")
        .args(["-O2", "-Wall", "-Wl,-z,now", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("run cc");
    assert!(st.success(), "compiling {}", src.display());
    out
}

/// Attests `pid` as `subject` the way the agent must: exec record first.
pub fn attest(e: &Enforcer, pid: u32, subject: u32) {
    let rec = e
        .exec_record(pid)
        .expect("exec record")
        .unwrap_or_else(|| panic!("pid {pid} has no exec record (exec'd before the load?)"));
    e.set_process(
        pid,
        subject,
        tether_kernel::ExecId(rec.exec_id),
        rec.start_ns,
    )
    .expect("set_process");
}

/// Events currently in the ring buffer.
pub fn drain(e: &Enforcer) -> Vec<Event> {
    decisions(e.events().expect("events").drain().expect("drain"))
}

/// The decisions among `evs`: without the process events (exec, fork and
/// exit of the test's clients) that share the ring buffer.
pub fn decisions(evs: Vec<Event>) -> Vec<Event> {
    evs.into_iter()
        .filter(|ev| ev.hook != tether_kernel::Hook::Proc)
        .collect()
}
