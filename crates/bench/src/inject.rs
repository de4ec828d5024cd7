//! Credential injection against direct, on one host: keep-alive HTTP/1.1
//! requests to Debian's nginx (bearer token added by the agent, against
//! the same nginx on a port no Service covers), and Redis PING round trips
//! (AUTH injected, against a Redis without a password on a port no Service
//! covers). Clients are this binary re-executed in the enforced cgroup:
//! one connection, one request in flight, each timed.

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};

use crate::connect::BenchCgroup;
use crate::mesh::{Procs, place_cgroup, run_ok, sha256_file, start_up, wait_for};
use crate::{median, pct};

pub const HTTP_ARG: &str = "--http-keepalive";
pub const REDIS_ARG: &str = "--redis-ping";

const ROUNDS: usize = 5;
const REQUESTS: usize = 5000;
const TOKEN: &str = "bench-token-0123456789";
const REDIS_PASSWORD: &str = "bench-redis-password";

/// Child: `n` requests on one keep-alive connection to `addr`, each timed
/// from the write to the end of its response; prints the times in ns.
pub fn http_main(args: &[String]) -> anyhow::Result<()> {
    let addr: SocketAddr = args.first().context("address")?.parse()?;
    let n: usize = args.get(1).context("count")?.parse()?;
    let mut s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    let req = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";
    let mut out = String::new();
    let mut buf = vec![0u8; 16384];
    for i in 0..n + 100 {
        let t0 = Instant::now();
        s.write_all(req)?;
        // One response: head, then Content-Length bytes.
        let mut got = Vec::new();
        let body_at = loop {
            let k = s.read(&mut buf)?;
            ensure!(k > 0, "the server closed the connection after {i} requests");
            got.extend_from_slice(&buf[..k]);
            if let Some(p) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
        };
        let head = String::from_utf8_lossy(&got[..body_at]).to_ascii_lowercase();
        ensure!(head.starts_with("http/1.1 200"), "not 200: {head}");
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .context("no content-length")?;
        while got.len() < body_at + len {
            let k = s.read(&mut buf)?;
            ensure!(k > 0, "short body");
            got.extend_from_slice(&buf[..k]);
        }
        // The first requests of a fresh process may wait for attestation.
        if i >= 100 {
            writeln!(out, "{}", t0.elapsed().as_nanos())?;
        }
    }
    print!("{out}");
    Ok(())
}

/// Child: `n` PINGs on one connection to `addr`, each timed.
pub fn redis_main(args: &[String]) -> anyhow::Result<()> {
    let addr: SocketAddr = args.first().context("address")?.parse()?;
    let n: usize = args.get(1).context("count")?.parse()?;
    let mut s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    let mut out = String::new();
    let mut buf = [0u8; 64];
    for i in 0..n + 100 {
        let t0 = Instant::now();
        s.write_all(b"*1\r\n$4\r\nPING\r\n")?;
        let mut got = 0;
        while got < 7 {
            let k = s.read(&mut buf[got..])?;
            ensure!(k > 0, "redis closed the connection");
            got += k;
        }
        ensure!(&buf[..7] == b"+PONG\r\n", "not PONG: {:?}", &buf[..got]);
        if i >= 100 {
            writeln!(out, "{}", t0.elapsed().as_nanos())?;
        }
    }
    print!("{out}");
    Ok(())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn samples(bench: &Path, cg: &Path, arg: &str, port: u16) -> anyhow::Result<Vec<Duration>> {
    let mut c = Command::new(bench);
    c.args([arg, &format!("127.0.0.1:{port}"), &REQUESTS.to_string()]);
    place_cgroup(&mut c, cg);
    let out = run_ok(&mut c)?;
    let v: Vec<Duration> = out
        .lines()
        .filter_map(|l| l.trim().parse::<u64>().ok())
        .map(Duration::from_nanos)
        .collect();
    ensure!(v.len() == REQUESTS, "{arg}: {} samples", v.len());
    Ok(v)
}

struct Side {
    rps: Vec<f64>,
    p50: Vec<Duration>,
    p99: Vec<Duration>,
}

impl Side {
    fn new() -> Self {
        Side {
            rps: Vec::new(),
            p50: Vec::new(),
            p99: Vec::new(),
        }
    }

    fn add(&mut self, v: &[Duration]) {
        let total: Duration = v.iter().sum();
        self.rps.push(v.len() as f64 / total.as_secs_f64());
        self.p50.push(pct(v, 0.5));
        self.p99.push(pct(v, 0.99));
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn spread(v: &[f64]) -> String {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{lo:.0}–{hi:.0}")
}

pub fn run() -> anyhow::Result<String> {
    let bench = std::fs::canonicalize(std::env::current_exe()?)?;
    let tether = bench.with_file_name("tether");
    ensure!(tether.is_file(), "{} not found", tether.display());
    for tool in ["nginx", "redis-server"] {
        ensure!(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()?
                .success(),
            "{tool} not found (make bench installs it)"
        );
    }
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let cg = BenchCgroup::new("inject")?;
    let mut procs = Procs(Vec::new());

    // nginx: one port behind injection (checks the token), one direct.
    let (web_inj, web_direct) = (free_port()?, free_port()?);
    std::fs::create_dir_all(d.join("nginx/logs"))?;
    let p = |n: &str| d.join("nginx").join(n).display().to_string();
    std::fs::write(
        d.join("nginx/nginx.conf"),
        format!(
            "daemon off;\nmaster_process on;\nuser root;\nworker_processes 1;\npid {pid};\nerror_log {err} warn;\nevents {{ worker_connections 256; }}\nhttp {{\n  access_log off;\n  keepalive_requests 1000000;\n  client_body_temp_path {t}/body; proxy_temp_path {t}/proxy; fastcgi_temp_path {t}/fcgi; uwsgi_temp_path {t}/uwsgi; scgi_temp_path {t}/scgi;\n  server {{ listen 127.0.0.1:{web_inj}; location / {{ if ($http_authorization != \"Bearer {TOKEN}\") {{ return 401; }} return 200 \"ok\\n\"; }} }}\n  server {{ listen 127.0.0.1:{web_direct}; location / {{ return 200 \"ok\\n\"; }} }}\n}}\n",
            pid = p("nginx.pid"),
            err = p("logs/error.log"),
            t = p("logs"),
        ),
    )?;
    procs.0.push(
        Command::new("nginx")
            .args(["-p", &p(""), "-c", &p("nginx.conf")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    // Redis: one with a password behind injection, one without, direct.
    let (redis_inj, redis_direct) = (free_port()?, free_port()?);
    for (port, pass) in [(redis_inj, Some(REDIS_PASSWORD)), (redis_direct, None)] {
        let mut c = Command::new("redis-server");
        c.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(d);
        if let Some(pw) = pass {
            c.args(["--requirepass", pw]);
        }
        procs
            .0
            .push(c.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?);
    }
    for port in [web_inj, web_direct, redis_inj, redis_direct] {
        wait_for("servers", Duration::from_secs(20), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        })?;
    }

    // tether up enforcing the bench's cgroup.
    start_up(&tether, d, &cg.path, &[], &mut procs)?;
    let manifest = format!(
        "apiVersion: tether.dev/v1alpha1
kind: WorkloadIdentity
metadata: {{name: client}}
spec:
  spiffeId: spiffe://example.org/bench-client
  selectors: [[\"process:sha256:{sha}\", \"process:path:{path}\"]]
---
apiVersion: tether.dev/v1alpha1
kind: Service
metadata: {{name: web}}
spec: {{addresses: [{{cidr: 127.0.0.1/32, ports: [{web_inj}]}}]}}
---
apiVersion: tether.dev/v1alpha1
kind: Service
metadata: {{name: cache}}
spec: {{addresses: [{{cidr: 127.0.0.1/32, ports: [{redis_inj}]}}]}}
---
apiVersion: tether.dev/v1alpha1
kind: AccessPolicy
metadata: {{name: client}}
spec: {{services: [web, cache], identities: [client]}}
---
apiVersion: tether.dev/v1alpha1
kind: CredentialSource
metadata: {{name: token}}
spec: {{static: {{value: {TOKEN}}}}}
---
apiVersion: tether.dev/v1alpha1
kind: CredentialSource
metadata: {{name: redis-password}}
spec: {{static: {{value: {REDIS_PASSWORD}}}}}
---
apiVersion: tether.dev/v1alpha1
kind: CredentialBinding
metadata: {{name: web-token}}
spec: {{identity: client, source: token, inject: {{service: web, http: {{}}}}}}
---
apiVersion: tether.dev/v1alpha1
kind: CredentialBinding
metadata: {{name: cache-password}}
spec: {{identity: client, source: redis-password, inject: {{service: cache, redis: {{}}}}}}
",
        sha = sha256_file(&bench)?,
        path = bench.display(),
    );
    std::fs::write(d.join("bench.yaml"), manifest)?;
    run_ok(
        Command::new(&tether)
            .args(["apply", "-f"])
            .arg(d.join("bench.yaml"))
            .env("TETHER_ADMIN_SOCKET", d.join("run/admin.sock")),
    )?;
    // The bindings reach the agent: one injected request works.
    wait_for("injection ready", Duration::from_secs(20), || {
        let mut c = Command::new(&bench);
        c.args([HTTP_ARG, &format!("127.0.0.1:{web_inj}"), "1"]);
        place_cgroup(&mut c, &cg.path);
        run_ok(&mut c).is_ok()
    })?;

    let (mut h_direct, mut h_inj) = (Side::new(), Side::new());
    let (mut r_direct, mut r_inj) = (Side::new(), Side::new());
    let (mut h_ratio, mut h_added) = (Vec::new(), Vec::new());
    let mut r_added = Vec::new();
    for _ in 0..ROUNDS {
        let a = samples(&bench, &cg.path, HTTP_ARG, web_direct)?;
        let b = samples(&bench, &cg.path, HTTP_ARG, web_inj)?;
        h_direct.add(&a);
        h_inj.add(&b);
        let (ra, rb) = (
            h_direct.rps[h_direct.rps.len() - 1],
            h_inj.rps[h_inj.rps.len() - 1],
        );
        h_ratio.push(rb / ra);
        h_added.push(us(pct(&b, 0.5)) - us(pct(&a, 0.5)));
        let a = samples(&bench, &cg.path, REDIS_ARG, redis_direct)?;
        let b = samples(&bench, &cg.path, REDIS_ARG, redis_inj)?;
        r_direct.add(&a);
        r_inj.add(&b);
        r_added.push(us(pct(&b, 0.5)) - us(pct(&a, 0.5)));
    }
    let med_us = |v: &[Duration]| {
        us(Duration::from_nanos(
            median(v.iter().map(|d| d.as_nanos() as f64).collect()) as u64,
        ))
    };
    let mut out = String::new();
    writeln!(
        out,
        "## Credential injection (HTTP/1.1 keep-alive, Redis PING)\n"
    )?;
    writeln!(
        out,
        "One client connection, one request in flight, {REQUESTS} timed requests per run (after 100 untimed), {ROUNDS} rounds, direct and injected interleaved. Median over rounds; spread is the range of the per-round values.\n"
    )?;
    writeln!(
        out,
        "| path | requests/s (median, spread) | p50 µs | p99 µs |"
    )?;
    writeln!(out, "|---|---|---|---|")?;
    for (name, s) in [
        ("HTTP direct (nginx, no Service)", &h_direct),
        ("HTTP injected (bearer added by the agent)", &h_inj),
        ("Redis PING direct (no password, no Service)", &r_direct),
        ("Redis PING injected (AUTH by the agent)", &r_inj),
    ] {
        writeln!(
            out,
            "| {name} | {:.0} ({}) | {:.1} | {:.1} |",
            median(s.rps.clone()),
            spread(&s.rps),
            med_us(&s.p50),
            med_us(&s.p99),
        )?;
    }
    let lo = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = |v: &[f64]| v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    writeln!(
        out,
        "\nHTTP injected / direct requests/s, paired per round: median {:.2}× (range {:.2}–{:.2}; goal ≥ 0.5×). Added p50 per request: median {:.0} µs (range {:.0}–{:.0}; goal < 150 µs). Redis PING added p50: median {:.0} µs (range {:.0}–{:.0}).\n",
        median(h_ratio.clone()),
        lo(&h_ratio),
        hi(&h_ratio),
        median(h_added.clone()),
        lo(&h_added),
        hi(&h_added),
        median(r_added.clone()),
        lo(&r_added),
        hi(&r_added),
    )?;
    drop(procs);
    Ok(out)
}
