//! First connections of freshly started container processes against the
//! same fresh process on the host, under one `tether up` enforcing the
//! bench's cgroup. The client is this binary (`--timed-connect ADDR`): it
//! times one connect() to a protected greeter up to its one-byte greeting
//! and prints the nanoseconds, so container start-up is not counted. The
//! greeter listens on the host end of a veth pair; containers (podman with
//! runc, an image assembled here, the host's /usr mounted read-only) reach
//! it over their own network namespace.
//!
//! Sides: *host*, a fresh process in the enforced cgroup on the host;
//! *container, served namespace*, a fresh container in a namespace the
//! agent already listens in; *container, new namespace*, a fresh container
//! in a network namespace made just before it, which the agent has not
//! seen (its first connect may come before the agent's listener there).

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};

use crate::connect::BenchCgroup;
use crate::mesh::{Procs, place_cgroup, run_ok, sha256_file, start_up};
use crate::{median, pct};

pub const CHILD_ARG: &str = "--timed-connect";

const ROUNDS: usize = 3;
const PER_ROUND: usize = 8;

/// Child: one connect to `addr`, then the greeting; prints ns.
pub fn child_main(args: &[String]) -> anyhow::Result<()> {
    let addr: SocketAddr = args.first().context("address")?.parse()?;
    let t = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(30))?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    let d = t.elapsed();
    ensure!(&b == b"+", "unexpected greeting");
    println!("{}", d.as_nanos());
    Ok(())
}

struct Net {
    name: String,
    host_if: String,
}

impl Net {
    fn new(tag: &str, host: &str, ct: &str) -> anyhow::Result<Net> {
        let name = format!("tether-bench-{}-{tag}", std::process::id());
        let host_if = format!("tbh{}{tag}", std::process::id() % 10000);
        let ct_if = format!("tbc{}{tag}", std::process::id() % 10000);
        let ip = |args: &[&str]| run_ok(Command::new("ip").args(args));
        ip(&["netns", "add", &name])?;
        let net = Net {
            name: name.clone(),
            host_if: host_if.clone(),
        };
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ct_if,
        ])?;
        ip(&["link", "set", &ct_if, "netns", &name])?;
        ip(&["addr", "add", &format!("{host}/30"), "dev", &host_if])?;
        ip(&["link", "set", &host_if, "up"])?;
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{ct}/30"),
            "dev",
            &ct_if,
        ])?;
        ip(&["-n", &name, "link", "set", &ct_if, "up"])?;
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        Ok(net)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

struct Image(String);

impl Image {
    fn build(dir: &Path) -> anyhow::Result<(Image, String)> {
        let root = dir.join("root");
        for d in ["etc", "tmp", "proc", "sys", "dev", "run", "usr", "var"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        for (link, to) in [
            ("bin", "usr/bin"),
            ("lib", "usr/lib"),
            ("lib64", "usr/lib64"),
        ] {
            std::os::unix::fs::symlink(to, root.join(link))?;
        }
        let reference = format!("localhost/tether-bench-{}:b", std::process::id());
        std::fs::write(root.join("etc/tether-image"), &reference)?;
        let tar = dir.join("image.tar");
        run_ok(
            Command::new("tar")
                .arg("-C")
                .arg(&root)
                .arg("-cf")
                .arg(&tar)
                .arg("."),
        )?;
        let out = run_ok(
            Command::new("podman")
                .arg("import")
                .arg(&tar)
                .arg(&reference),
        )?;
        let id = out
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .trim_start_matches("sha256:")
            .to_string();
        ensure!(id.len() == 64, "podman import: {out}");
        Ok((Image(reference), id))
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = Command::new("podman").args(["rmi", "-f", &self.0]).output();
    }
}

/// A listener that greets every connection with one byte.
fn greeter(addr: &str) -> anyhow::Result<(u16, Arc<AtomicBool>)> {
    let l = TcpListener::bind((addr, 0))?;
    let port = l.local_addr()?.port();
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    std::thread::spawn(move || {
        while !s.load(Ordering::Relaxed) {
            if let Ok((mut c, _)) = l.accept() {
                let _ = c.write_all(b"+");
            }
        }
    });
    Ok((port, stop))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn parse_ns(out: &str) -> anyhow::Result<Duration> {
    let ns: u64 = out
        .lines()
        .last()
        .context("no timing printed")?
        .trim()
        .parse()?;
    Ok(Duration::from_nanos(ns))
}

pub fn run() -> anyhow::Result<String> {
    let bench = std::fs::canonicalize(std::env::current_exe()?)?;
    let tether = bench.with_file_name("tether");
    ensure!(tether.is_file(), "{} not found", tether.display());
    ensure!(
        Command::new("podman").arg("--version").output().is_ok(),
        "podman is needed (apt-get install podman runc)"
    );
    let tmp = tempfile::tempdir()?;
    let d = tmp.path();
    let cg = BenchCgroup::new("containers")?;
    let mnt = tether_kernel::cgroup2_mount().context("cgroup2")?;
    let rel = format!("/{}", cg.path.strip_prefix(&mnt)?.display());
    let tag = std::process::id() % 200;
    let (host_addr, ct_addr) = (format!("10.214.{tag}.1"), format!("10.214.{tag}.2"));
    let served = Net::new("s", &host_addr, &ct_addr)?;
    let (image, image_id) = Image::build(d)?;
    let (port, stop) = greeter(&host_addr)?;
    let target = format!("{host_addr}:{port}");
    let mut procs = Procs(Vec::new());
    start_up(
        &tether,
        d,
        &cg.path,
        &["--credentials-dir", "none"],
        &mut procs,
    )?;
    let sha = sha256_file(&bench)?;
    std::fs::write(
        d.join("bench.yaml"),
        format!(
            "apiVersion: tether.dev/v1alpha1
kind: WorkloadIdentity
metadata: {{name: host-client}}
spec:
  spiffeId: spiffe://example.org/host-client
  selectors: [[\"process:sha256:{sha}\", \"process:path:{path}\"]]
---
apiVersion: tether.dev/v1alpha1
kind: WorkloadIdentity
metadata: {{name: container-client}}
spec:
  spiffeId: spiffe://example.org/container-client
  selectors: [[\"process:sha256:{sha}\", \"container:image:{image_id}\"]]
  allowExec: [mount-namespace]
---
apiVersion: tether.dev/v1alpha1
kind: Service
metadata: {{name: greeter}}
spec: {{addresses: [{{cidr: {host_addr}/32, ports: [{port}]}}]}}
---
apiVersion: tether.dev/v1alpha1
kind: AccessPolicy
metadata: {{name: clients}}
spec: {{services: [greeter], identities: [host-client, container-client]}}
",
            path = bench.display()
        ),
    )?;
    run_ok(
        Command::new(&tether)
            .args(["apply", "-f"])
            .arg(d.join("bench.yaml"))
            .env("TETHER_ADMIN_SOCKET", d.join("run/admin.sock")),
    )?;
    std::thread::sleep(Duration::from_millis(500));

    let bench_dir = bench.parent().context("bench dir")?.display().to_string();
    let container = |net: &str, n: usize| -> anyhow::Result<Duration> {
        let name = format!("tether-bench-{}-{n}", std::process::id());
        let out = run_ok(
            Command::new("podman")
                .args(["run", "--rm", "--runtime", "runc"])
                .args([
                    "--ulimit",
                    "nofile=1024:1024",
                    "--ulimit",
                    "nproc=1024:1024",
                ])
                .args([
                    "-v",
                    "/usr:/usr:ro",
                    "-v",
                    &format!("{bench_dir}:{bench_dir}:ro"),
                ])
                .args([
                    "--cgroup-parent",
                    &rel,
                    "--network",
                    &format!("ns:/run/netns/{net}"),
                ])
                .args(["--name", &name, &image.0])
                .arg(&bench)
                .args([CHILD_ARG, &target]),
        )?;
        parse_ns(&out)
    };
    let host = || -> anyhow::Result<Duration> {
        let mut c = Command::new(&bench);
        c.args([CHILD_ARG, &target]);
        place_cgroup(&mut c, &cg.path);
        parse_ns(&run_ok(&mut c)?)
    };
    // The served namespace is known to the agent after its first container.
    container(&served.name, 0)?;
    let (mut h, mut s, mut f) = (Vec::new(), Vec::new(), Vec::new());
    let mut all: [Vec<Duration>; 3] = Default::default();
    let mut n = 1;
    for round in 0..ROUNDS {
        let (mut hr, mut sr, mut fr) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..PER_ROUND {
            hr.push(host()?);
            sr.push(container(&served.name, n)?);
            n += 1;
            let fresh = Net::new(
                &format!("f{round}{i}"),
                &format!("10.215.{tag}.{}", 4 * i + 1),
                &format!("10.215.{tag}.{}", 4 * i + 2),
            )?;
            run_ok(Command::new("ip").args([
                "-n",
                &fresh.name,
                "route",
                "add",
                &format!("{host_addr}/32"),
                "via",
                &format!("10.215.{tag}.{}", 4 * i + 1),
            ]))?;
            fr.push(container(&fresh.name, n)?);
            n += 1;
        }
        h.push(pct(&hr, 0.5));
        s.push(pct(&sr, 0.5));
        f.push(pct(&fr, 0.5));
        all[0].extend(&hr);
        all[1].extend(&sr);
        all[2].extend(&fr);
    }
    stop.store(true, Ordering::Relaxed);
    let _ = TcpStream::connect((host_addr.as_str(), port));
    drop(procs);
    // podman's own cgroups under the bench cgroup, in every hierarchy.
    for e in std::fs::read_dir("/sys/fs/cgroup")?.flatten() {
        let p = e.path().join(rel.trim_start_matches('/'));
        let _ = std::fs::remove_dir(p.join("conmon"));
        if p != cg.path {
            let _ = std::fs::remove_dir(&p);
        }
    }
    let line = |label: &str, v: &[Duration], every: &[Duration], base: f64| {
        let vs: Vec<f64> = v.iter().map(|d| ms(*d)).collect();
        let lo = vs.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = vs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let m = median(vs);
        let worst = every.iter().map(|d| ms(*d)).fold(0.0, f64::max);
        format!(
            "| {label} | {m:.2} ms | {lo:.2}–{hi:.2} ms | {worst:.2} ms | {:.2} |\n",
            m / base
        )
    };
    let base = median(h.iter().map(|d| ms(*d)).collect());
    let mut out = String::new();
    out.push_str("## First connection of a fresh container process\n\n");
    let _ = writeln!(
        out,
        "| fresh process, first connect to a protected Service (p50 per round of {PER_ROUND}, median of {ROUNDS} rounds) | p50 connect to greeting | spread of round p50s | slowest | ratio |\n|---|---|---|---|---|"
    );
    out.push_str(&line("host process (held or decided)", &h, &all[0], base));
    out.push_str(&line(
        "container, namespace already served",
        &s,
        &all[1],
        base,
    ));
    out.push_str(&line("container, new network namespace", &f, &all[2], base));
    let waited = all[2]
        .iter()
        .filter(|d| **d >= Duration::from_millis(900))
        .count();
    let _ = writeln!(
        out,
        "\n{waited} of {} first connects in a new namespace came before the agent listened there and waited for the SYN to be sent again; every connection reached the greeter.\n",
        all[2].len()
    );
    Ok(out)
}
