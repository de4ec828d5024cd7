//! The mesh between two hosts, against direct plaintext and stunnel4 with
//! mutual TLS, on the same topology: network namespaces A and B on a
//! bridge in a third one (no route out). B runs `tether up` (server and
//! agent) and the servers; A runs `tether agent` and the clients.
//!
//! Measured: time from connect() to the first byte back on a new
//! connection (a one-byte echo), and single-stream iperf3 throughput.

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};

use crate::connect::BenchCgroup;
use crate::{median, pct};

pub const ECHO_ARG: &str = "--echo";
pub const TTFB_ARG: &str = "--ttfb";

const A: &str = "10.99.0.1";
const B: &str = "10.99.0.2";
const SERVER_PORT: u16 = 7700;
/// Servers on B: behind the mesh (Services) and plain (not Services; the
/// baseline and stunnel's backends).
const ECHO_MESH: u16 = 7801;
const ECHO_PLAIN: u16 = 7802;
const IPERF_MESH: u16 = 7901;
const IPERF_PLAIN: u16 = 7902;
/// stunnel: client listeners on A's loopback, TLS ports on B.
const ECHO_STUNNEL_A: u16 = 7811;
const ECHO_STUNNEL_B: u16 = 7812;
const IPERF_STUNNEL_A: u16 = 7911;
const IPERF_STUNNEL_B: u16 = 7912;

const ROUNDS: usize = 5;
const CONNECTS: usize = 300;
const IPERF_SECS: u32 = 4;
const IPERF_ROUNDS: usize = 3;

/// Child process: echo server on `addr` (one thread per connection).
pub fn echo_main(args: &[String]) -> anyhow::Result<()> {
    let addr: SocketAddr = args.first().context("echo address")?.parse()?;
    let l = TcpListener::bind(addr)?;
    for s in l.incoming() {
        let Ok(mut s) = s else { continue };
        std::thread::spawn(move || {
            let _ = s.set_nodelay(true);
            let mut buf = [0u8; 16384];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
    Ok(())
}

/// Child process: `n` new connections to `addr`, each timed from before
/// connect() to the echoed byte; prints the times in ns, one per line.
pub fn ttfb_main(args: &[String]) -> anyhow::Result<()> {
    let addr: SocketAddr = args.first().context("address")?.parse()?;
    let n: usize = args.get(1).context("count")?.parse()?;
    let mut out = String::new();
    // The first connects of a fresh process may wait for its attestation:
    // warm up, untimed.
    for i in 0..n + 20 {
        let t0 = Instant::now();
        let mut s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
        s.set_nodelay(true)?;
        s.write_all(b"x")?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        let dt = t0.elapsed();
        if i >= 20 {
            writeln!(out, "{}", dt.as_nanos())?;
        }
    }
    print!("{out}");
    Ok(())
}

/// The namespaces; deleted (with their veths and the bridge) on drop.
struct Net {
    prefix: String,
    a: std::fs::File,
    b: std::fs::File,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let o = Command::new("ip")
        .args(args)
        .output()
        .context("ip (iproute2)")?;
    ensure!(
        o.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(())
}

impl Net {
    fn new() -> anyhow::Result<Net> {
        let prefix = format!("tbench{}", std::process::id());
        let sw = format!("{prefix}sw");
        ip(&["netns", "add", &sw])?;
        let mut net = Net {
            prefix: prefix.clone(),
            a: std::fs::File::open("/dev/null")?,
            b: std::fs::File::open("/dev/null")?,
        };
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        for (i, (h, addr)) in [("a", A), ("b", B)].into_iter().enumerate() {
            let ns = format!("{prefix}{h}");
            ip(&["netns", "add", &ns])?;
            let port = format!("p{i}");
            ip(&[
                "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ])?;
            ip(&["-n", &sw, "link", "set", &port, "master", "br0", "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            let f = std::fs::File::open(format!("/run/netns/{ns}"))?;
            if h == "a" {
                net.a = f;
            } else {
                net.b = f;
            }
        }
        Ok(net)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for h in ["a", "b", "sw"] {
            let _ = Command::new("ip")
                .args(["netns", "del", &format!("{}{h}", self.prefix)])
                .output();
        }
    }
}

/// Runs `cmd` on the host whose namespace is `ns`, in `cgroup` if given.
fn place(cmd: &mut Command, ns: &std::fs::File, cgroup: Option<&Path>) {
    let fd = ns.as_raw_fd();
    let procs = cgroup.map(|c| c.join("cgroup.procs"));
    // SAFETY: setns(2) and a file write, both async-signal-safe enough for
    // a freshly forked child; the fd outlives the spawn.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(p) = &procs {
                std::fs::write(p, "0")?;
            }
            Ok(())
        });
    }
}

/// Runs `cmd` in `cgroup` (this host's network namespace).
pub(crate) fn place_cgroup(cmd: &mut Command, cgroup: &Path) {
    let procs = cgroup.join("cgroup.procs");
    // SAFETY: a file write in a freshly forked child.
    unsafe {
        cmd.pre_exec(move || std::fs::write(&procs, "0"));
    }
}

/// Children killed on drop.
pub(crate) struct Procs(pub(crate) Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        std::thread::sleep(Duration::from_millis(300));
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `tether up` for a bench in `dir` (its data, run dir and up.log),
/// enforcing `cgroup`, with `extra` flags; returns once it is up.
pub(crate) fn start_up(
    tether: &Path,
    dir: &Path,
    cgroup: &Path,
    extra: &[&str],
    procs: &mut Procs,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let mut up = Command::new(tether);
    up.args(["--log-format", "json", "up", "--listen", "127.0.0.1:0"])
        .args([
            "--metrics",
            "off",
            "--bpf-pin-dir",
            "none",
            "--mesh-port",
            "0",
        ])
        .args(extra)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--run-dir")
        .arg(dir.join("run"))
        .arg("--enforce-cgroup")
        .arg(cgroup)
        .env("RUST_LOG", "warn,tether=info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("up.log"))?);
    procs.0.push(up.spawn()?);
    let log = || std::fs::read_to_string(dir.join("up.log")).unwrap_or_default();
    wait_for("tether up", Duration::from_secs(60), || {
        log().contains("tether is up")
    })
    .with_context(log)
}

pub(crate) fn wait_for(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if f() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{what} did not happen within {timeout:?}")
}

pub(crate) fn sha256_file(p: &Path) -> anyhow::Result<String> {
    Ok(crate::sha256_hex(&std::fs::read(p)?))
}

pub(crate) fn run_ok(cmd: &mut Command) -> anyhow::Result<String> {
    let o = cmd.output().with_context(|| format!("{cmd:?}"))?;
    ensure!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// A CA, a server and a client certificate for stunnel (P-256, as SVIDs).
fn stunnel_pki(dir: &Path) -> anyhow::Result<()> {
    let ssl = |args: &[&str]| run_ok(Command::new("openssl").args(args).current_dir(dir));
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    ssl(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=bench-ca",
        ],
    ]
    .concat())?;
    for name in ["server", "client"] {
        ssl(&[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={name}"),
            ],
        ]
        .concat())?;
        ssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &format!("{name}.crt"),
        ])?;
    }
    Ok(())
}

fn stunnel_conf(dir: &Path, client: bool) -> String {
    let d = dir.display();
    let (role, cert, routes) = if client {
        (
            "client = yes\n",
            "client",
            [
                (
                    ECHO_STUNNEL_A,
                    format!("127.0.0.1:{ECHO_STUNNEL_A}"),
                    format!("{B}:{ECHO_STUNNEL_B}"),
                ),
                (
                    IPERF_STUNNEL_A,
                    format!("127.0.0.1:{IPERF_STUNNEL_A}"),
                    format!("{B}:{IPERF_STUNNEL_B}"),
                ),
            ],
        )
    } else {
        (
            "",
            "server",
            [
                (
                    ECHO_STUNNEL_B,
                    format!("{B}:{ECHO_STUNNEL_B}"),
                    format!("127.0.0.1:{ECHO_PLAIN}"),
                ),
                (
                    IPERF_STUNNEL_B,
                    format!("{B}:{IPERF_STUNNEL_B}"),
                    format!("127.0.0.1:{IPERF_PLAIN}"),
                ),
            ],
        )
    };
    let mut s = format!(
        // Logging off: with no syslog socket stunnel falls back to
        // /dev/console, which costs ~10 ms per connection on these VMs.
        "foreground = yes\npid =\nsyslog = no\ndebug = 3\n{role}cert = {d}/{cert}.crt\nkey = {d}/{cert}.key\nCAfile = {d}/ca.crt\nverifyChain = yes\nrequireCert = yes\nsslVersionMin = TLSv1.3\nsocket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n"
    );
    for (name, accept, connect) in routes {
        // libwrap: Debian builds stunnel with TCP wrappers, which would add
        // an access-control lookup per connection that no other setup does.
        let _ = write!(
            s,
            "[r{name}]\naccept = {accept}\nconnect = {connect}\nlibwrap = no\n"
        );
    }
    s
}

struct Setup {
    tether: PathBuf,
    bench: PathBuf,
    dir: tempfile::TempDir,
}

impl Setup {
    fn tether_cli(&self, sock_env: (&str, PathBuf), args: &[&str]) -> anyhow::Result<String> {
        run_ok(
            Command::new(&self.tether)
                .args(args)
                .env(sock_env.0, sock_env.1),
        )
    }
}

/// TTFB samples (ns) of `n` connects from A, in A's enforced cgroup.
fn ttfb(s: &Setup, net: &Net, cg: &Path, addr: &str, n: usize) -> anyhow::Result<Vec<Duration>> {
    let mut cmd = Command::new(&s.bench);
    cmd.args([TTFB_ARG, addr, &n.to_string()]);
    place(&mut cmd, &net.a, Some(cg));
    let out = run_ok(&mut cmd)?;
    Ok(out
        .lines()
        .filter_map(|l| l.trim().parse::<u64>().ok())
        .map(Duration::from_nanos)
        .collect())
}

/// iperf3 from A, one stream, receiver-side bits per second.
fn iperf(net: &Net, cg: &Path, host: &str, port: u16) -> anyhow::Result<f64> {
    let mut cmd = Command::new("iperf3");
    cmd.args([
        "-c",
        host,
        "-p",
        &port.to_string(),
        "-t",
        &IPERF_SECS.to_string(),
        "-J",
    ]);
    place(&mut cmd, &net.a, Some(cg));
    let out = run_ok(&mut cmd)?;
    let v: serde_json::Value = serde_json::from_str(&out).context("iperf3 -J output")?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("no throughput in iperf3 output: {}", v["error"]))
}

pub fn run() -> anyhow::Result<String> {
    let bench = std::env::current_exe()?;
    let tether = bench.with_file_name("tether");
    ensure!(
        tether.is_file(),
        "{} not found: build it first (cargo build --release -p tether)",
        tether.display()
    );
    for tool in ["iperf3", "stunnel4", "openssl"] {
        ensure!(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()?
                .success(),
            "{tool} not found (make bench installs it)"
        );
    }
    let s = Setup {
        tether,
        bench: std::fs::canonicalize(&bench)?,
        dir: tempfile::tempdir()?,
    };
    let d = s.dir.path();
    let net = Net::new()?;
    let cg_a = BenchCgroup::new("mesh-a")?;
    let cg_b = BenchCgroup::new("mesh-b")?;
    let mut procs = Procs(Vec::new());
    let log =
        |name: &str| -> anyhow::Result<std::fs::File> { Ok(std::fs::File::create(d.join(name))?) };
    let read = |name: &str| std::fs::read_to_string(d.join(name)).unwrap_or_default();

    // B: server and agent.
    let mut up = Command::new(&s.tether);
    up.args([
        "--log-format",
        "json",
        "up",
        "--listen",
        &format!("{B}:{SERVER_PORT}"),
    ])
    .args([
        "--metrics",
        "off",
        "--node-name",
        "host-b",
        "--bpf-pin-dir",
        "none",
    ])
    .arg("--data-dir")
    .arg(d.join("b"))
    .arg("--run-dir")
    .arg(d.join("b-run"))
    .arg("--enforce-cgroup")
    .arg(&cg_b.path)
    .env("RUST_LOG", "warn,tether_agent=info,tether=info")
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(log("b.log")?);
    place(&mut up, &net.b, None);
    procs.0.push(up.spawn()?);
    wait_for("tether up on B", Duration::from_secs(60), || {
        read("b.log").contains("tether is up")
    })
    .with_context(|| read("b.log"))?;
    let admin = ("TETHER_ADMIN_SOCKET", d.join("b-run/admin.sock"));
    let token = s.tether_cli(admin.clone(), &["token", "create"])?;
    std::fs::write(
        d.join("bundle.json"),
        s.tether_cli(admin.clone(), &["get", "bundle"])?,
    )?;

    // A: agent.
    let mut agent = Command::new(&s.tether);
    agent
        .args([
            "--log-format",
            "json",
            "agent",
            "--server",
            &format!("{B}:{SERVER_PORT}"),
            // Not the host's default mount point.
            "--credentials-dir",
            "none",
        ])
        .args([
            "--node-name",
            "host-a",
            "--join-token",
            token.trim(),
            "--metrics",
            "off",
            "--bpf-pin-dir",
            "none",
        ])
        .arg("--trust-bundle")
        .arg(d.join("bundle.json"))
        .arg("--data-dir")
        .arg(d.join("a"))
        .arg("--workload-socket")
        .arg(d.join("a-w.sock"))
        .arg("--admin-socket")
        .arg(d.join("a-agent.sock"))
        .arg("--enforce-cgroup")
        .arg(&cg_a.path)
        .env("RUST_LOG", "warn,tether_agent=info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log("a.log")?);
    place(&mut agent, &net.a, None);
    procs.0.push(agent.spawn()?);
    wait_for("tether agent on A", Duration::from_secs(60), || {
        read("a.log").contains("mesh active")
    })
    .with_context(|| read("a.log"))?;

    // Servers on B, in its enforced cgroup.
    for (port, tag) in [(ECHO_MESH, "echo-m"), (ECHO_PLAIN, "echo-p")] {
        let mut c = Command::new(&s.bench);
        c.args([ECHO_ARG, &format!("{B}:{port}")])
            .stdout(Stdio::null())
            .stderr(log(&format!("{tag}.log"))?);
        place(&mut c, &net.b, Some(&cg_b.path));
        procs.0.push(c.spawn()?);
    }
    // The plain echo is stunnel's backend too: it must answer on loopback.
    let mut c = Command::new(&s.bench);
    c.args([ECHO_ARG, &format!("127.0.0.1:{ECHO_PLAIN}")])
        .stdout(Stdio::null());
    place(&mut c, &net.b, Some(&cg_b.path));
    procs.0.push(c.spawn()?);
    for port in [IPERF_MESH, IPERF_PLAIN] {
        let mut c = Command::new("iperf3");
        c.args(["-s", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        place(&mut c, &net.b, Some(&cg_b.path));
        procs.0.push(c.spawn()?);
    }
    stunnel_pki(d)?;
    for (client, ns, name) in [(false, &net.b, "stunnel-b"), (true, &net.a, "stunnel-a")] {
        let conf = d.join(format!("{name}.conf"));
        std::fs::write(&conf, stunnel_conf(d, client))?;
        let mut c = Command::new("stunnel4");
        c.arg(&conf)
            .stdout(Stdio::null())
            .stderr(log(&format!("{name}.log"))?);
        place(&mut c, ns, None);
        procs.0.push(c.spawn()?);
    }

    // Identities for the clients, the Services they reach through the mesh.
    let iperf3 = std::fs::canonicalize(
        run_ok(Command::new("sh").args(["-c", "command -v iperf3"]))?.trim(),
    )?;
    let manifest = format!(
        "apiVersion: tether.dev/v1alpha1
kind: WorkloadIdentity
metadata: {{name: bench-client}}
spec:
  spiffeId: spiffe://example.org/bench-client
  selectors: [[\"process:sha256:{bs}\", \"process:path:{bp}\"]]
---
apiVersion: tether.dev/v1alpha1
kind: WorkloadIdentity
metadata: {{name: iperf3}}
spec:
  spiffeId: spiffe://example.org/iperf3
  selectors: [[\"process:sha256:{is}\", \"process:path:{ip}\"]]
---
apiVersion: tether.dev/v1alpha1
kind: Service
metadata: {{name: echo}}
spec:
  addresses: [{{cidr: {B}/32, ports: [{ECHO_MESH}]}}]
  mesh: {{mode: mutual}}
---
apiVersion: tether.dev/v1alpha1
kind: Service
metadata: {{name: iperf}}
spec:
  addresses: [{{cidr: {B}/32, ports: [{IPERF_MESH}]}}]
  mesh: {{mode: mutual}}
---
apiVersion: tether.dev/v1alpha1
kind: AccessPolicy
metadata: {{name: bench-clients}}
spec:
  services: [echo, iperf]
  identities: [bench-client, iperf3]
",
        bs = sha256_file(&s.bench)?,
        bp = s.bench.display(),
        is = sha256_file(&iperf3)?,
        ip = iperf3.display(),
    );
    let mf = d.join("bench.yaml");
    std::fs::write(&mf, manifest)?;
    s.tether_cli(admin.clone(), &["apply", "-f", &mf.display().to_string()])?;
    let agent_a = ("TETHER_AGENT_SOCKET", d.join("a-agent.sock"));
    wait_for("policies on A", Duration::from_secs(20), || {
        s.tether_cli(
            agent_a.clone(),
            &[
                "policy",
                "check",
                "--identity",
                "iperf3",
                "--to",
                &format!("{B}:{IPERF_MESH}"),
            ],
        )
        .is_ok_and(|o| o.contains("bench-clients"))
    })?;
    // Everything answers before timing starts.
    let targets = [
        ("plain", format!("{B}:{ECHO_PLAIN}")),
        ("tether", format!("{B}:{ECHO_MESH}")),
        ("stunnel", format!("127.0.0.1:{ECHO_STUNNEL_A}")),
    ];
    for (name, addr) in &targets {
        wait_for(&format!("{name} echo"), Duration::from_secs(20), || {
            ttfb(&s, &net, &cg_a.path, addr, 1).is_ok_and(|v| v.len() == 1)
        })
        .with_context(|| format!("{}\n{}", read("a.log"), read("stunnel-a.log")))?;
    }

    // --- time to first byte, modes interleaved per round ---
    let mut p50: [Vec<f64>; 3] = Default::default();
    let mut p99: [Vec<f64>; 3] = Default::default();
    let mut rate: [Vec<f64>; 3] = Default::default();
    for _ in 0..ROUNDS {
        for (i, (_, addr)) in targets.iter().enumerate() {
            let v = ttfb(&s, &net, &cg_a.path, addr, CONNECTS)?;
            ensure!(v.len() == CONNECTS, "short TTFB run for {addr}");
            p50[i].push(pct(&v, 0.5).as_secs_f64() * 1e6);
            p99[i].push(pct(&v, 0.99).as_secs_f64() * 1e6);
            // Back to back: connects per second of connecting time.
            let busy: f64 = v.iter().map(Duration::as_secs_f64).sum();
            rate[i].push(v.len() as f64 / busy.max(1e-9));
        }
    }
    // --- bulk throughput ---
    let bulk = [
        (B, IPERF_PLAIN),
        (B, IPERF_MESH),
        ("127.0.0.1", IPERF_STUNNEL_A),
    ];
    let mut gbps: [Vec<f64>; 3] = Default::default();
    for _ in 0..IPERF_ROUNDS {
        for (i, (host, port)) in bulk.iter().enumerate() {
            gbps[i].push(iperf(&net, &cg_a.path, host, *port)? / 1e9);
        }
    }
    drop(procs);

    let m = |v: &[Vec<f64>; 3], i: usize| median(v[i].clone());
    let mut out = String::new();
    writeln!(
        out,
        "## Mesh between two hosts: time to first byte and throughput"
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "| new connection, 1-byte echo (median of {ROUNDS} rounds of {CONNECTS}) | p50 µs | p99 µs | added p50 µs | conn/s (sequential) |"
    )?;
    writeln!(out, "|---|---|---|---|---|")?;
    let names = [
        "direct plaintext (baseline)",
        "Tether mesh (mutual TLS 1.3, per-process SVID)",
        "stunnel4 mutual TLS 1.3",
    ];
    for (i, name) in names.iter().enumerate() {
        writeln!(
            out,
            "| {name} | {:.0} | {:.0} | {:.0} | {:.0} |",
            m(&p50, i),
            m(&p99, i),
            m(&p50, i) - m(&p50, 0),
            m(&rate, i)
        )?;
    }
    writeln!(out)?;
    let (t, st) = (m(&p50, 1) - m(&p50, 0), m(&p50, 2) - m(&p50, 0));
    writeln!(
        out,
        "Added latency on a new connection: Tether {t:.0} µs, stunnel4 {st:.0} µs (Tether/stunnel {:.2}).",
        t / st.max(1e-9)
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "| iperf3, one stream, {IPERF_SECS} s (median of {IPERF_ROUNDS}) | Gbit/s | ratio to plaintext | ratio to stunnel4 |"
    )?;
    writeln!(out, "|---|---|---|---|")?;
    for (i, name) in names.iter().enumerate() {
        writeln!(
            out,
            "| {name} | {:.2} | {:.2} | {:.2} |",
            m(&gbps, i),
            m(&gbps, i) / m(&gbps, 0),
            m(&gbps, i) / m(&gbps, 2)
        )?;
    }
    writeln!(out)?;
    Ok(out)
}
