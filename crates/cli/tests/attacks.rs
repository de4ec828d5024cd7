//! Containment on every path, tried as an attacker inside the workload
//! would: with the Redis password in its environment, against the real
//! Debian Redis, whose Service is written the natural way (one loopback
//! address). Each class is refused (or, for a socket stolen after connect,
//! unusable), audited with the attacker's real pid and executable, and
//! Redis's own counters show nothing reached it, while the legitimate
//! client keeps working on its first try in the same run.

mod common;

use std::io::{Read as _, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::kernel::Cgroup;
use common::netns::Lan;
use common::servers::{PASSWORD, Redis, which};
use common::*;

/// The files under tests/attacks at the repository root.
fn attack_src(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/attacks")
        .join(name)
}

/// Compiles tests/attacks/<name>.c into `dir` (a shared object with
/// `shared`), world-readable.
fn compile(dir: &Path, name: &str, shared: bool) -> PathBuf {
    let out = dir.join(if shared {
        format!("{name}.so")
    } else {
        name.to_string()
    });
    let mut cc = Command::new("cc");
    cc.args(["-O2", "-Wall", "-Wl,-z,now"]);
    if shared {
        cc.args(["-shared", "-fPIC"]);
    }
    let st = cc
        .arg("-o")
        .arg(&out)
        .arg(attack_src(&format!("{name}.c")))
        .status()
        .expect("run cc");
    assert!(st.success(), "compiling {name}.c");
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    out
}

fn output_text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs `cmd` to completion: its pid and its output.
fn run(cmd: &mut Command) -> (u32, String) {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    (pid, output_text(&child.wait_with_output().expect("wait")))
}

fn denied(e: &serde_json::Value) -> bool {
    e["verdict"].as_str().is_some_and(|v| v.starts_with("deny"))
}

/// The redis-cli identity (by sha256, path and uid 0), a Service naming
/// only 127.0.0.1 (TCP and UDP), and the policy letting redis-cli reach it.
fn apply_redis_policy(up: &Up, redis_cli: &Path, port: u16, extra: &str) {
    up.apply_ok(&format!(
        "{identity}apiVersion: tether.dev/v1alpha1
kind: Service
metadata: {{name: redis}}
spec:
  addresses:
    - {{cidr: 127.0.0.1/32, ports: [{port}], protocol: both}}
---
apiVersion: tether.dev/v1alpha1
kind: AccessPolicy
metadata: {{name: redis-clients}}
spec:
  services: [redis]
  identities: [redis-cli]
{extra}",
        identity = binary_identity("redis-cli", redis_cli),
    ));
    let to = format!("127.0.0.1:{port}");
    let ready = wait_until(Duration::from_secs(10), || {
        up.try_ok(&["policy", "check", "--identity", "redis-cli", "--to", &to])
            .is_some_and(|o| o.contains("redis-clients"))
    });
    assert!(ready, "policies never reached the agent:\n{}", up.logs());
}

/// A command in `cg` with the Redis password in its environment, as an
/// attacker inside the workload holds it.
fn in_workload(cg: &Cgroup, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new(program);
    c.env("REDISCLI_AUTH", PASSWORD);
    cg.enter(&mut c);
    c
}

/// One gRPC call, FetchX509SVID, as raw HTTP/2 bytes (the preface, empty
/// SETTINGS, one HEADERS frame of literal fields, one DATA frame with an
/// empty message): what a program without a gRPC library writes.
fn fetch_x509_request() -> Vec<u8> {
    fn literal(out: &mut Vec<u8>, name: &str, value: &str) {
        out.push(0x00);
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
        out.push(value.len() as u8);
        out.extend_from_slice(value.as_bytes());
    }
    fn frame(out: &mut Vec<u8>, ftype: u8, flags: u8, stream: u32, payload: &[u8]) {
        let len = payload.len();
        out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, ftype, flags]);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
    }
    let mut headers = Vec::new();
    for (n, v) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/SpiffeWorkloadAPI/FetchX509SVID"),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("workload.spiffe.io", "true"),
    ] {
        literal(&mut headers, n, v);
    }
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut out, 0x4, 0, 0, &[]);
    frame(&mut out, 0x1, 0x4, 1, &headers);
    frame(&mut out, 0x0, 0x1, 1, &[0, 0, 0, 0, 0]);
    out
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

// ---------------------------------------------------------------------------

/// A UDP service of the test's own on every address of a host, recording
/// every datagram it gets (its own counter).
struct UdpSink {
    child: std::process::Child,
    log: PathBuf,
}

impl UdpSink {
    fn start(lan: &Lan, host: &str, port: u16, dir: &Path) -> UdpSink {
        let log = dir.join("udp-received");
        std::fs::write(&log, "").expect("log");
        let script = format!(
            "import select, socket\n\
             a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             a.bind(('0.0.0.0', {port}))\n\
             b = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n\
             b.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)\n\
             b.bind(('::', {port}))\n\
             print('ready', flush=True)\n\
             while True:\n\
             \x20   for s in select.select([a, b], [], [])[0]:\n\
             \x20       d, src = s.recvfrom(2048)\n\
             \x20       open({log:?}, 'a').write(repr((src, d)) + '\\n')\n",
            log = log.display().to_string()
        );
        let mut child = lan
            .command(host, python())
            .args(["-c", &script])
            .stdout(Stdio::piped())
            .spawn()
            .expect("udp sink");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
            &mut line,
        )
        .expect("udp sink start");
        assert_eq!(line.trim(), "ready");
        UdpSink { child, log }
    }

    fn received(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for UdpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const ALIAS_PROBE: &str = r#"
import errno, socket, sys
port = int(sys.argv[1])
def fam(h):
    return socket.AF_INET6 if ':' in h else socket.AF_INET
def err(e):
    return errno.errorcode.get(e.errno, str(e.errno))
def tcp(h):
    s = socket.socket(fam(h), socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect((h, port))
        s.sendall(b"PING\r\n")
        return "connected " + repr(s.recv(100))
    except OSError as e:
        return err(e)
    finally:
        s.close()
def udp(h, connected):
    s = socket.socket(fam(h), socket.SOCK_DGRAM)
    try:
        if connected:
            s.connect((h, port))
            s.send(b"stolen")
        else:
            s.sendto(b"stolen", (h, port))
        return "sent"
    except OSError as e:
        return err(e)
    finally:
        s.close()
def raw():
    # A hand-made UDP datagram to the service, past the socket hooks.
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
    except OSError as e:
        return err(e)
    import struct
    payload = b"stolen-raw"
    hdr = struct.pack("!HHHH", 40000, port, 8 + len(payload), 0)
    s.sendto(hdr + payload, ("127.0.0.1", 0))
    return "sent"
for h in sys.argv[2:]:
    print(h, "tcp", tcp(h), flush=True)
    print(h, "udp", udp(h, False), flush=True)
    print(h, "udpc", udp(h, True), flush=True)
print("raw udp", raw(), flush=True)
"#;

#[test]
fn every_address_that_reaches_a_local_redis_is_protected() {
    let lan = Lan::new("al", &["a"]);
    let cg = Cgroup::new("aliases");
    let up = Up::start_on(
        &lan,
        "a",
        &["--enforce-cgroup", &cg.path.display().to_string()],
    );
    // Redis listens on every address of its host (IPv4 and IPv6), outside
    // the enforced cgroup; a UDP service of our own shares its port.
    let redis = Redis::start_in(Some(lan.fd("a")), None, "0.0.0.0 ::");
    let port = redis.port;
    let udp = UdpSink::start(&lan, "a", port, up.dir.path());
    let redis_cli = which("redis-cli");
    apply_redis_policy(&up, &redis_cli, port, "");
    let host_addr = lan.addr("a");

    // The legitimate client, first try: at the address the Service names,
    // and at the host's own address (the same listener).
    for h in ["127.0.0.1", host_addr.as_str(), "0.0.0.0"] {
        let mut c = in_workload(&cg, &redis_cli);
        lan.enter("a", &mut c);
        let (_, out) = run(c.args(["-h", h, "-p", &port.to_string(), "PING"]));
        assert_eq!(out.trim(), "PONG", "redis-cli to {h}:\n{}", up.logs());
    }
    let reached_before = redis.connections_received();

    // An address added after the policy was applied is covered once the
    // agent has seen it (netlink), and `policy check` names the Service.
    lan.add_addr("a", "10.99.0.77/24");
    let later = "10.99.0.77";
    let to_later = format!("{later}:{port}");
    let seen = wait_until(Duration::from_secs(10), || {
        let out = up
            .try_ok(&[
                "policy",
                "check",
                "--identity",
                "redis-cli",
                "--to",
                &to_later,
            ])
            .unwrap_or_default();
        serde_json::from_str::<serde_json::Value>(&out).is_ok_and(|v| v["service"] == "redis")
    });
    assert!(seen, "the new address never reached the agent");

    let targets = [
        "0.0.0.0",
        "::",
        "::ffff:0.0.0.0",
        "127.0.0.2",
        "::ffff:127.0.0.2",
        host_addr.as_str(),
        later,
    ];
    // bash's /dev/tcp, at each alias. (A shell the kernel holds for the
    // agent can see its connect succeed and even write before the agent's
    // reset: the refusal shows in the audit and at Redis.)
    for t in ["0.0.0.0", "127.0.0.2", later] {
        let mut bash = in_workload(&cg, "/bin/bash");
        lan.enter("a", &mut bash);
        let (pid, out) = run(bash.args([
            "-c",
            &format!(
                "exec 3<>/dev/tcp/{t}/{port} && echo AUTH {PASSWORD} >&3 && echo PING >&3 && head -c 20 <&3"
            ),
        ]));
        assert!(
            !out.contains("PONG") && !out.contains("+OK"),
            "bash to {t}: {out}"
        );
        up.audited(pid, &format!("bash to {t}"), |e| {
            denied(e)
                && (e["executed"] == "bash"
                    || e["exe"].as_str().is_some_and(|x| x.ends_with("/bash")))
                && e["service"] == "redis"
                && e["destination"].as_str().is_some_and(|d| d.contains(t))
        });
    }
    // Python: TCP, UDP (sendto and connected) at every alias, and a raw
    // socket for a hand-made datagram.
    let mut py = in_workload(&cg, python());
    lan.enter("a", &mut py);
    let mut args = vec!["-c".to_string(), ALIAS_PROBE.into(), port.to_string()];
    args.extend(targets.iter().map(|t| t.to_string()));
    let (py_pid, out) = run(py.args(&args));
    for t in targets {
        for (kind, refused) in [
            ("tcp", &["EPERM", "ECONNRESET"][..]),
            ("udp", &["EPERM"][..]),
            ("udpc", &["EPERM"][..]),
        ] {
            let line = out
                .lines()
                .find(|l| l.starts_with(&format!("{t} {kind} ")))
                .unwrap_or_else(|| panic!("no {kind} result for {t}: {out}"));
            assert!(
                refused.iter().any(|r| line.ends_with(r)),
                "{t} {kind} was not refused: {line}\n{out}"
            );
        }
    }
    assert!(
        out.contains("raw udp EPERM"),
        "a raw socket was created: {out}"
    );
    for t in targets {
        let want: std::net::IpAddr = t.parse().expect("ip");
        up.audited(py_pid, &format!("python to {t}"), |e| {
            denied(e)
                && e["service"] == "redis"
                && e["destination"].as_str().is_some_and(|d| {
                    d.parse::<std::net::SocketAddr>()
                        .is_ok_and(|a| a.ip() == want.to_canonical() && a.port() == port)
                })
        });
    }
    up.audited(py_pid, "the raw socket", |e| {
        denied(e) && e["hook"] == "socket"
    });
    // Nothing reached Redis or the UDP service: only our own INFO queries.
    assert_eq!(
        redis.connections_received(),
        reached_before + 1,
        "a refused client reached Redis"
    );
    assert_eq!(udp.received(), "", "a datagram reached the UDP service");
    // `policy check` names the address used and the Service it resolves to.
    let c = up.ok(&[
        "policy",
        "check",
        "--identity",
        "redis-cli",
        "--to",
        &format!("0.0.0.0:{port}"),
    ]);
    assert!(c.contains("redis") && c.contains("redis-clients"), "{c}");
}

// ---------------------------------------------------------------------------

/// Redis on the host's loopback and `tether up` enforcing a cgroup of the
/// test's own.
struct Stage {
    up: Up,
    cg: Cgroup,
    redis: Redis,
    redis_cli: PathBuf,
    tools: tempfile::TempDir,
}

impl Stage {
    fn new(tag: &str, extra_args: &[&str], extra_manifest: &str) -> Stage {
        let cg = Cgroup::new(tag);
        let mut args = vec![
            "--enforce-cgroup".to_string(),
            cg.path.display().to_string(),
        ];
        args.extend(extra_args.iter().map(|s| s.to_string()));
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let up = Up::start_with(&a);
        let redis = Redis::start();
        let redis_cli = which("redis-cli");
        apply_redis_policy(&up, &redis_cli, redis.port, extra_manifest);
        let tools = tempfile::Builder::new()
            .prefix("tether-attacks-")
            .tempdir()
            .expect("tempdir");
        std::fs::set_permissions(tools.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        Stage {
            up,
            cg,
            redis,
            redis_cli,
            tools,
        }
    }

    fn ping(&self) -> (u32, String) {
        let mut c = in_workload(&self.cg, &self.redis_cli);
        run(c.args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.redis.port.to_string(),
            "PING",
        ]))
    }

    /// redis-cli in interactive mode: it connects at once and then waits
    /// on its stdin, holding the connection.
    fn idle_redis_cli(&self) -> (std::process::Child, i32) {
        let mut c = in_workload(&self.cg, &self.redis_cli);
        let child = c
            .args(["-h", "127.0.0.1", "-p", &self.redis.port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("redis-cli");
        let pid = child.id();
        let mut fd = None;
        let connected = wait_until(Duration::from_secs(10), || {
            fd = socket_fd(pid);
            fd.is_some() && self.redis.admin(&["CLIENT", "LIST"]).lines().count() >= 2
        });
        assert!(
            connected,
            "redis-cli {pid} did not connect:\n{}",
            self.up.logs()
        );
        (child, fd.expect("fd"))
    }
}

/// The lowest descriptor of `pid` that is a socket.
fn socket_fd(pid: u32) -> Option<i32> {
    let mut fds: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
        })
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    fds.first().copied()
}

#[test]
fn a_forged_exe_link_gets_neither_the_network_nor_the_key() {
    let s = Stage::new("forge", &[], "");
    let forge = compile(s.tools.path(), "forge_exe", false);
    let request = s.tools.path().join("fetch-x509.h2");
    std::fs::write(&request, fetch_x509_request()).expect("request");
    let socket = s.up.workload_socket();
    // Control: the same program, not forging, registered as an identity of
    // its own, gets its SVID with these very bytes.
    s.up.apply_ok(&format!(
        "apiVersion: tether.dev/v1alpha1
kind: WorkloadIdentity
metadata: {{name: forge-control}}
spec:
  spiffeId: spiffe://example.org/forge-control
  selectors: [[\"process:path:{}\", \"unix:uid:0\"]]
",
        forge.display()
    ));
    let control = wait_until(Duration::from_secs(10), || {
        let o = in_workload(&s.cg, &forge)
            .args(["-", "unix"])
            .arg(&socket)
            .arg(&request)
            .output()
            .expect("forge_exe");
        contains(&o.stdout, "spiffe://example.org/forge-control")
    });
    assert!(control, "the raw Workload API request does not work");
    assert_eq!(s.ping().1.trim(), "PONG", "the legitimate client");
    let reached_before = s.redis.connections_received();

    // Forged: /proc/PID/exe names redis-cli (path, hash) while our code runs.
    let (pid, out) = run(in_workload(&s.cg, &forge).args([
        s.redis_cli.to_str().expect("utf8"),
        "tcp",
        "127.0.0.1",
        &s.redis.port.to_string(),
        &format!("AUTH {PASSWORD}\nPING\n"),
    ]));
    assert!(
        !out.contains("PONG") && !out.contains("+OK"),
        "forged exe reached Redis: {out}"
    );
    assert!(
        !out.contains("FAIL prctl"),
        "the forgery itself failed: {out}"
    );
    s.up.audited(pid, "forged exe, network", |e| {
        denied(e) && e["executed"] == "forge_exe" && e["service"] == "redis"
    });
    let o = in_workload(&s.cg, &forge)
        .args([s.redis_cli.to_str().expect("utf8"), "unix"])
        .arg(&socket)
        .arg(&request)
        .output()
        .expect("forge_exe");
    assert!(
        !contains(&o.stdout, "spiffe://example.org/redis-cli"),
        "the forged process got redis-cli's SVID"
    );
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains("FAIL prctl"),
        "{}",
        output_text(&o)
    );
    assert_eq!(
        s.redis.connections_received(),
        reached_before + 1,
        "the forged client reached Redis"
    );
    assert_eq!(s.ping().1.trim(), "PONG", "the legitimate client, after");
}

#[test]
fn code_put_into_redis_cli_through_its_loader_is_refused() {
    let s = Stage::new("loader", &[], "");
    let evil = compile(s.tools.path(), "evil_preload", true);
    assert_eq!(s.ping().1.trim(), "PONG", "the legitimate client");
    let reached_before = s.redis.connections_received();
    let port = s.redis.port.to_string();

    // LD_PRELOAD into the allowed binary.
    let mut c = in_workload(&s.cg, &s.redis_cli);
    c.env("LD_PRELOAD", &evil);
    let (pid, out) = run(c.args(["-h", "127.0.0.1", "-p", &port, "PING"]));
    assert!(out.contains("INJECTED"), "the preload did not run: {out}");
    assert!(
        !out.contains("PONG"),
        "LD_PRELOAD'ed redis-cli reached Redis: {out}"
    );
    s.up.audited(pid, "LD_PRELOAD", |e| {
        denied(e)
            && e["exe"] == s.redis_cli.display().to_string()
            && e["reason"]
                .as_str()
                .is_some_and(|r| r.contains("LD_PRELOAD"))
    });

    // /etc/ld.so.preload in a private user and mount namespace: a fake
    // /etc with it is bind-mounted over the real one, then redis-cli runs.
    let fake_etc = s.tools.path().join("etc");
    std::fs::create_dir_all(&fake_etc).expect("mkdir");
    std::fs::write(
        fake_etc.join("ld.so.preload"),
        format!("{}\n", evil.display()),
    )
    .expect("preload");
    for f in ["passwd", "group", "hosts", "nsswitch.conf", "ld.so.cache"] {
        let _ = std::fs::copy(Path::new("/etc").join(f), fake_etc.join(f));
    }
    let script = format!(
        "mount --bind {} /etc && exec {} -h 127.0.0.1 -p {port} PING",
        fake_etc.display(),
        s.redis_cli.display()
    );
    let (pid, out) = run(in_workload(&s.cg, "unshare").args(["-Urm", "sh", "-c", &script]));
    assert!(out.contains("INJECTED"), "ld.so.preload did not run: {out}");
    assert!(
        !out.contains("PONG"),
        "redis-cli with a private ld.so.preload reached Redis: {out}"
    );
    let _ = pid; // unshare execs sh, which execs redis-cli: same pid.
    s.up.audited(pid, "ld.so.preload in a user namespace", |e| {
        denied(e)
            && e["reason"]
                .as_str()
                .is_some_and(|r| r.contains("mount-namespace"))
    });

    assert_eq!(
        s.redis.connections_received(),
        reached_before + 1,
        "an injected client reached Redis"
    );
    assert_eq!(s.ping().1.trim(), "PONG", "the legitimate client, after");
}

#[test]
fn a_debugger_attached_to_a_running_redis_cli_gets_nothing() {
    let s = Stage::new("gdb", &[], "");
    let (mut victim, fd) = s.idle_redis_cli();
    let vpid = victim.id();
    let reached_before = s.redis.connections_received();
    let port = s.redis.port;
    // gdb, inside the workload, makes redis-cli open a new connection and
    // write a command on the one it has.
    let gdb_script = s.tools.path().join("gdb-commands");
    std::fs::write(
        &gdb_script,
        format!(
            "set $s = (int)socket(2, 1, 0)\n\
             set $a = (char *)malloc(16)\n\
             call (void *)memset($a, 0, 16)\n\
             set *(unsigned short *)$a = 2\n\
             set *(unsigned short *)($a + 2) = {port_be}\n\
             set *(unsigned int *)($a + 4) = 0x0100007f\n\
             printf \"CONNECT %d\\n\", (int)connect($s, $a, 16)\n\
             printf \"WRITE %ld\\n\", (long)write({fd}, \"SET injected yes\\r\\n\", 18)\n\
             detach\n\
             quit\n",
            port_be = port.swap_bytes(),
        ),
    )
    .expect("gdb script");
    let gdb = which("gdb");
    let (gdb_pid, out) = run(in_workload(&s.cg, &gdb).args([
        "-nx",
        "-batch",
        "-p",
        &vpid.to_string(),
        "-x",
        gdb_script.to_str().expect("utf8"),
    ]));
    // gdb's attach is fatal inside the workload: it dies as the call
    // returns, before any request of its tracee (as its next step, opening
    // /proc/PID/mem to plant its calls, would be). Had it gone on, the
    // traced redis-cli would have been refused.
    assert!(
        !out.contains("CONNECT 3") && !out.contains("WRITE 18"),
        "gdb made the traced redis-cli act: {out}"
    );
    assert_eq!(
        s.redis.admin(&["GET", "injected"]),
        "",
        "the command arrived"
    );
    // The marks, naming gdb (what it executed, its pid) and redis-cli.
    s.up.audited(gdb_pid, "the ptrace attach", |e| {
        e["event"] == "taint" && e["executed"] == "gdb" && e["target"]["pid"] == vpid
    });
    // Whatever gdb managed before it died, redis-cli has no authority now:
    // its own connection refuses its writes, naming the tracer. (The
    // attach's SIGSTOP left it stopped: continue it.)
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(vpid as i32, libc::SIGCONT) };
    let mut stdin = victim.stdin.take().expect("stdin");
    writeln!(stdin, "SET after yes").expect("victim stdin");
    drop(stdin);
    let out = victim.wait_with_output().expect("victim");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("OK"),
        "the marked redis-cli still wrote: {}",
        output_text(&out)
    );
    assert_eq!(
        s.redis.admin(&["GET", "after"]),
        "",
        "the marked client wrote"
    );
    s.up.audited(vpid, "redis-cli's write after the attach", |e| {
        denied(e) && e["hook"] == "send" && e["tracer"]["pid"] == gdb_pid
    });
    assert_eq!(
        s.redis.connections_received(),
        reached_before + 3,
        "the traced client reached Redis (only our two GETs and this query count)"
    );
    assert_eq!(s.ping().1.trim(), "PONG", "the legitimate client, after");
}

#[test]
fn a_socket_taken_with_pidfd_getfd_carries_nothing() {
    let s = Stage::new("getfd", &[], "");
    let (mut victim, fd) = s.idle_redis_cli();
    let vpid = victim.id();
    let script = format!(
        "import ctypes, errno, os, socket\n\
         libc = ctypes.CDLL(None, use_errno=True)\n\
         pidfd = libc.syscall(434, {vpid}, 0)\n\
         print('PIDFD', pidfd, flush=True)\n\
         fd = libc.syscall(438, pidfd, {fd}, 0)\n\
         print('GOT', fd, flush=True)\n\
         s = socket.socket(fileno=fd)\n\
         s.sendall(b'AUTH {PASSWORD}\\r\\nSET stolen yes\\r\\n')\n\
         print('SENT', flush=True)\n"
    );
    let reached_before = s.redis.connections_received();
    let child = in_workload(&s.cg, python())
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let o = child.wait_with_output().expect("wait");
    let out = output_text(&o);
    // It had its pidfd; taking the descriptor out of redis-cli was fatal
    // before the call returned, so it never held the socket.
    assert!(out.contains("PIDFD "), "pidfd_open failed: {out}");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&o.status),
        Some(libc::SIGKILL),
        "the caller of pidfd_getfd lived: {out}"
    );
    assert!(!out.contains("GOT ") && !out.contains("SENT"), "{out}");
    assert_eq!(s.redis.admin(&["GET", "stolen"]), "", "the command arrived");
    s.up.audited(pid, "the pidfd_getfd", |e| {
        e["event"] == "taint"
            && e["killed"] == true
            && e["target"]["pid"] == vpid
            && e["reason"]
                .as_str()
                .is_some_and(|r| r.contains("pidfd_getfd"))
    });
    // No connection besides our own two queries.
    assert_eq!(s.redis.connections_received(), reached_before + 2);
    // A socket used by a process that did not make it, however it got it,
    // is refused at the send: the kernel containment tests show it with a
    // descriptor taken by a process outside the enforced cgroup.
    let _ = victim.kill();
    let _ = victim.wait();
    assert_eq!(s.ping().1.trim(), "PONG", "the legitimate client, after");
}

#[test]
fn the_memory_of_another_process_cannot_be_read_from_the_workload() {
    let s = Stage::new("memread", &[], "");
    let (mut victim, _) = s.idle_redis_cli();
    let vpid = victim.id();
    // Both ways to read another process's memory, at its first mapping.
    let script = |how: &str, vpid: u32| {
        format!(
            "import ctypes, os\n\
             libc = ctypes.CDLL(None, use_errno=True)\n\
             start = int(open('/proc/{vpid}/maps').readline().split('-')[0], 16)\n\
             print('MAPPED', hex(start), flush=True)\n\
             if '{how}' == 'readv':\n\
             \x20   class iovec(ctypes.Structure):\n\
             \x20       _fields_ = [('base', ctypes.c_void_p), ('len', ctypes.c_size_t)]\n\
             \x20   buf = ctypes.create_string_buffer(64)\n\
             \x20   local, remote = iovec(ctypes.addressof(buf), 64), iovec(start, 64)\n\
             \x20   n = libc.syscall(310, {vpid}, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)\n\
             \x20   print('READ', n, buf.raw[:4], flush=True)\n\
             elif '{how}' == 'environ':\n\
             \x20   f = open('/proc/{vpid}/environ', 'rb', buffering=0)\n\
             \x20   print('OPENED', flush=True)\n\
             \x20   print('READ', f.read(64)[:4], flush=True)\n\
             else:\n\
             \x20   f = open('/proc/{vpid}/mem', 'rb', buffering=0)\n\
             \x20   print('OPENED', flush=True)\n\
             \x20   f.seek(start)\n\
             \x20   print('READ', f.read(64)[:4], flush=True)\n"
        )
    };
    for (how, named) in [
        ("readv", "process_vm_readv"),
        ("procmem", "/proc/PID/mem opened"),
        ("environ", "/proc/PID/environ opened"),
    ] {
        let child = in_workload(&s.cg, python())
            .args(["-c", &script(how, vpid)])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let pid = child.id();
        let o = child.wait_with_output().expect("wait");
        let out = output_text(&o);
        // It could see the victim's map, so the read itself was possible;
        // it was fatal before any byte came back.
        assert!(out.contains("MAPPED 0x"), "{how}: {out}");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&o.status),
            Some(libc::SIGKILL),
            "{how}: the reader lived: {out}"
        );
        assert!(
            !out.contains("READ") && !out.contains("OPENED"),
            "{how}: {out}"
        );
        s.up.audited(pid, &format!("the {how} attempt"), |e| {
            e["event"] == "taint"
                && e["killed"] == true
                && e["target"]["pid"] == vpid
                && e["reason"].as_str().is_some_and(|r| r.contains(named))
        });
    }
    // The same read through the 32-bit entry, whose numbers differ.
    let compat = compile(s.tools.path(), "compat_readv", false);
    let (pid, out) = run(in_workload(&s.cg, &compat).args([&vpid.to_string(), "10000"]));
    assert!(
        out.contains("CALLING") && !out.contains("RETURNED"),
        "compat readv: {out}"
    );
    s.up.audited(pid, "the 32-bit process_vm_readv", |e| {
        e["event"] == "taint"
            && e["killed"] == true
            && e["reason"]
                .as_str()
                .is_some_and(|r| r.contains("32-bit entry"))
    });
    let _ = victim.kill();
    let _ = victim.wait();

    // Attempts that read nothing mark nothing (else anyone could strip any
    // process of its authority with a call that fails): a fresh victim,
    // after the workload's fatal process_vm_readv, another uid's, which the
    // kernel refuses, and that uid's O_PATH opens of its mem and environ,
    // keeps its authority.
    let (mut victim, _) = s.idle_redis_cli();
    let vpid = victim.id();
    let o = in_workload(&s.cg, python())
        .args(["-c", &script("readv", vpid)])
        .output()
        .expect("reader");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&o.status),
        Some(libc::SIGKILL),
        "{}",
        output_text(&o)
    );
    let reader = compile(s.tools.path(), "vm_readv", false);
    let mut c = Command::new(&reader);
    no_loader_env(&mut c).args([&vpid.to_string(), "10000"]);
    std::os::unix::process::CommandExt::uid(&mut c, 65534);
    let (_, out) = run(&mut c);
    assert!(
        out.contains(&format!("RETURNED -1 {}", libc::EPERM)),
        "another uid read the victim: {out}"
    );
    // Nor does a descriptor of its memory that reads nothing (O_PATH, which
    // any user may open).
    assert!(
        out.contains("OPATH mem 1") && out.contains("OPATH environ 1"),
        "O_PATH opens of the victim's mem and environ: {out}"
    );
    let mut stdin = victim.stdin.take().expect("stdin");
    writeln!(stdin, "SET still yes").expect("victim stdin");
    drop(stdin);
    let o = victim.wait_with_output().expect("victim");
    assert_eq!(
        s.redis.admin(&["GET", "still"]),
        "yes",
        "the victim lost its authority to attempts that read nothing: {}",
        output_text(&o)
    );
}

#[test]
fn a_workload_api_connection_serves_only_the_process_and_image_that_made_it() {
    let s = Stage::new("wapi", &[], "");
    let forge = compile(s.tools.path(), "forge_exe", false);
    let request = s.tools.path().join("fetch-x509.h2");
    std::fs::write(&request, fetch_x509_request()).expect("request");
    let socket = s.up.workload_socket();
    let sleep = std::fs::canonicalize(which("sleep")).expect("sleep");
    s.up.apply_ok(&format!(
        "apiVersion: tether.dev/v1alpha1
kind: WorkloadIdentity
metadata: {{name: sleeper}}
spec:
  spiffeId: spiffe://example.org/sleeper
  selectors: [[\"process:path:{}\", \"unix:uid:0\"]]
---
apiVersion: tether.dev/v1alpha1
kind: WorkloadIdentity
metadata: {{name: forge-control}}
spec:
  spiffeId: spiffe://example.org/forge-control
  selectors: [[\"process:path:{}\", \"unix:uid:0\"]]
",
        sleep.display(),
        forge.display()
    ));
    // Control: the request works for a process with an identity.
    let control = wait_until(Duration::from_secs(10), || {
        let o = in_workload(&s.cg, &forge)
            .args(["-", "unix"])
            .arg(&socket)
            .arg(&request)
            .output()
            .expect("forge_exe");
        contains(&o.stdout, "spiffe://example.org/forge-control")
    });
    assert!(control, "the raw Workload API request does not work");
    // A shell connects, forks a child that keeps the descriptor, and execs
    // an allowed binary; the child then asks on the connection.
    let answer = s.tools.path().join("answer");
    let script = format!(
        "import os, socket, time\n\
         s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n\
         s.connect({sock:?})\n\
         os.set_inheritable(s.fileno(), True)\n\
         if os.fork() == 0:\n\
         \x20   time.sleep(1.5)\n\
         \x20   s.sendall(open({req:?}, 'rb').read())\n\
         \x20   s.settimeout(3)\n\
         \x20   got = b''\n\
         \x20   try:\n\
         \x20       while True:\n\
         \x20           d = s.recv(65536)\n\
         \x20           if not d: break\n\
         \x20           got += d\n\
         \x20   except OSError:\n\
         \x20       pass\n\
         \x20   open({ans:?}, 'wb').write(got)\n\
         \x20   os._exit(0)\n\
         os.execv({sleep:?}, ['sleep', '5'])\n",
        sock = socket.display().to_string(),
        req = request.display().to_string(),
        ans = answer.display().to_string(),
        sleep = sleep.display().to_string(),
    );
    let mut attacker = in_workload(&s.cg, python())
        .args(["-c", &script])
        .spawn()
        .expect("python");
    let parent = attacker.id();
    // The parent is now the allowed binary, with an identity of its own.
    let exec_d = wait_until(Duration::from_secs(10), || {
        s.up.ok(&["svids"]).contains("spiffe://example.org/sleeper")
    });
    assert!(exec_d, "the exec'd sleeper never got its identity");
    let answered = wait_until(Duration::from_secs(10), || answer.exists());
    assert!(answered, "the child never finished");
    let got = std::fs::read(&answer).expect("answer");
    assert!(
        !contains(&got, "spiffe://example.org/sleeper"),
        "the child got the exec'd binary's SVID over its parent's connection"
    );
    let _ = attacker.kill();
    let _ = attacker.wait();
    let _ = parent;
}

// ---------------------------------------------------------------------------

/// A 1 TiB sparse executable in a memfd (an ELF with a hole after it),
/// exec'd: its hash would read 1 TiB of zeros.
const MEMFD_EXEC: &str = r#"
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.memfd_create(b"huge", 0)
os.write(fd, open(sys.argv[1], "rb").read())
os.ftruncate(fd, 1 << 40)
os.execv("/proc/self/fd/%d" % fd, ["huge", "600"])
"#;

/// An HTTP/2 HEADERS block that adds one 3 KB field to the HPACK table and
/// then names it by index thousands of times: megabytes once decoded.
fn hpack_bomb() -> Vec<u8> {
    // Literal with incremental indexing, new name "x", a 3000-byte value
    // (an HPACK integer: 127 in the 7-bit prefix, then 2873 in base 128).
    let mut block = vec![0x40, 0x01, b'x', 0x7f];
    let mut rest = 3000 - 127;
    while rest >= 128 {
        block.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    block.push(rest as u8);
    block.extend(std::iter::repeat_n(b'a', 3000));
    // Then the new table entry (index 62) 13000 times: ~40 MB decoded from
    // one 16 KB frame.
    block.extend(std::iter::repeat_n(0x80 | 62, 13_000));
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
    let len = block.len();
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, 0x1, 0x4]);
    out.extend_from_slice(&1u32.to_be_bytes());
    out.extend_from_slice(&block);
    out
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn local_denial_of_service_does_not_turn_enforcement_off() {
    let mesh_port = free_port();
    let s = Stage::new("stall", &["--mesh-port", &mesh_port.to_string()], "");
    let agent = s.up.pid().expect("tether up pid");
    let policy = "apiVersion: tether.dev/v1alpha1
kind: AccessPolicy
metadata: {name: redis-clients}
spec:
  services: [redis]
  identities: [redis-cli]
";
    // While a stall is on: the agent is up with bounded memory, a fresh
    // authorized client connects within a second, and deleting the policy
    // refuses the next connect within a second.
    let check = |what: &str| {
        assert!(
            std::path::Path::new(&format!("/proc/{agent}")).exists(),
            "{what}: the agent died:\n{}",
            s.up.logs()
        );
        let rss = rss_kib(agent);
        assert!(rss < 512 * 1024, "{what}: the agent uses {rss} KiB");
        // Every fresh client gets through; one of up to three within the
        // second (a stalled agent makes all of them slow; a busy 2-core
        // machine now and then one).
        let mut took = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            let (_, out) = s.ping();
            took.push(t.elapsed());
            assert_eq!(
                out.trim(),
                "PONG",
                "{what}: a fresh client:\n{}",
                s.up.logs()
            );
            if took.last().is_some_and(|d| *d < Duration::from_secs(1)) {
                break;
            }
        }
        assert!(
            took.last().is_some_and(|d| *d < Duration::from_secs(1)),
            "{what}: fresh clients took {took:?}"
        );
        let o = s.up.tether(&["delete", "accesspolicy", "redis-clients"]);
        assert!(o.status.success(), "{}", output_text(&o));
        std::thread::sleep(Duration::from_secs(1));
        let (_, out) = s.ping();
        assert!(
            !out.contains("PONG"),
            "{what}: policy deletion not enforced within 1 s: {out}"
        );
        s.up.apply_ok(policy);
        let back = wait_until(Duration::from_secs(10), || s.ping().1.trim() == "PONG");
        assert!(back, "{what}: the policy did not come back");
    };
    check("no stall");

    // 1. Twenty processes running 1 TiB sparse executables.
    let sleep = std::fs::canonicalize(which("sleep")).expect("sleep");
    let mut huge = Vec::new();
    for _ in 0..20 {
        let mut c = in_workload(&s.cg, python());
        huge.push(
            c.args(["-c", MEMFD_EXEC])
                .arg(&sleep)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("memfd exec"),
        );
    }
    let running = wait_until(Duration::from_secs(10), || {
        huge.iter().all(|c| {
            std::fs::read_link(format!("/proc/{}/exe", c.id()))
                .is_ok_and(|l| l.to_string_lossy().contains("memfd:huge"))
        })
    });
    assert!(running, "the memfd executables did not start");
    std::thread::sleep(Duration::from_secs(1));
    check("20 x 1 TiB executables");
    for mut c in huge {
        let _ = c.kill();
        let _ = c.wait();
    }

    // 2. HPACK bombs on the Workload API socket, kept coming.
    let socket = s.up.workload_socket();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let bombers: Vec<_> = (0..8)
        .map(|_| {
            let (socket, stop) = (socket.clone(), stop.clone());
            std::thread::spawn(move || {
                let bomb = hpack_bomb();
                let mut closed = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok(mut c) = std::os::unix::net::UnixStream::connect(&socket) {
                        let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                        let _ = c.write_all(&bomb);
                        let mut b = [0u8; 4096];
                        while matches!(c.read(&mut b), Ok(n) if n > 0) {}
                        closed += 1;
                    }
                }
                closed
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    check("8 HPACK bombs");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let bombs: u32 = bombers.into_iter().map(|b| b.join().expect("bomber")).sum();
    assert!(bombs >= 8, "the bombs did not all land: {bombs}");

    // 3. Three hundred idle connections to the mesh port.
    let idle: Vec<_> = (0..300)
        .filter_map(|_| std::net::TcpStream::connect(("127.0.0.1", mesh_port)).ok())
        .collect();
    assert!(
        idle.len() >= 16,
        "the mesh port took {} connections",
        idle.len()
    );
    check("300 idle mesh connections");
    drop(idle);
}
