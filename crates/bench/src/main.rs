//! `make bench`: SVID issuance throughput, exec-to-SVID latency and
//! connect() latency under the enforcement hook, each with a baseline
//! measured in the same run. Prints one Markdown section per benchmark.
//! Needs root (the agent reads kernel process events; the connect benchmark
//! loads BPF programs into a cgroup of its own).

mod connect;
mod containers;
mod credfs;
mod held;
mod inject;
mod mesh;

use std::process::Command;
use std::time::{Duration, Instant};

use tether_proto::tether::admin_client::AdminClient;
use tether_proto::tether::{ApplyRequest, CreateJoinTokenRequest, SignX509SvidsRequest, SvidCsr};
use tether_spiffe::{SpiffeId, TrustDomain};

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// Runs `f` `n` times; returns (ops per wall second, ops per CPU second).
async fn rate<F, Fut>(n: usize, mut f: F) -> (f64, f64)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let c0 = cpu_seconds();
    let t0 = Instant::now();
    for _ in 0..n {
        f().await;
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - c0;
    (n as f64 / wall, n as f64 / cpu.max(1e-9))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn pct(v: &[Duration], p: f64) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    s[((s.len() as f64 - 1.0) * p).round() as usize]
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(connect::CHILD_ARG) {
        return connect::child_main(&args[2..]);
    }
    if args.get(1).map(String::as_str) == Some(credfs::CHILD_ARG) {
        return credfs::child_main(&args[2..]);
    }
    if args.get(1).map(String::as_str) == Some(held::CHILD_ARG) {
        return held::child_main(&args[2..]);
    }
    if args.get(1).map(String::as_str) == Some(inject::HTTP_ARG) {
        return inject::http_main(&args[2..]);
    }
    if args.get(1).map(String::as_str) == Some(inject::REDIS_ARG) {
        return inject::redis_main(&args[2..]);
    }
    if args.get(1).map(String::as_str) == Some(containers::CHILD_ARG) {
        return containers::child_main(&args[2..]);
    }
    if args.get(1).map(String::as_str) == Some(mesh::ECHO_ARG) {
        return mesh::echo_main(&args[2..]);
    }
    if args.get(1).map(String::as_str) == Some(mesh::TTFB_ARG) {
        return mesh::ttfb_main(&args[2..]);
    }
    // `tether-bench mesh`: only the mesh section (it runs its own server
    // and agents as separate processes).
    if args.get(1).map(String::as_str) == Some("mesh") {
        print!("{}", mesh::run()?);
        return Ok(());
    }
    // `tether-bench inject`: only the credential injection section.
    if args.get(1).map(String::as_str) == Some("inject") {
        print!("{}", inject::run()?);
        return Ok(());
    }
    // `tether-bench containers`: only the container first-connection section.
    if args.get(1).map(String::as_str) == Some("containers") {
        print!("{}", containers::run()?);
        return Ok(());
    }
    // `tether-bench credfs`: only the credential filesystem section.
    if args.get(1).map(String::as_str) == Some("credfs") {
        return tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(issuance(true));
    }
    // `tether-bench connect`: only the connect() section.
    if args.get(1).map(String::as_str) == Some("connect") {
        print!("{}", connect::run());
        return Ok(());
    }
    // Before the server and agent exist: the agent follows every exec on the
    // machine, and this benchmark's children would keep it busy meanwhile.
    let connect_section = connect::run();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(issuance(false))?;
    print!("{connect_section}");
    print!("{}", mesh::run()?);
    print!("{}", inject::run()?);
    print!("{}", containers::run()?);
    Ok(())
}

/// SVID issuance throughput and exec-to-SVID latency.
async fn issuance(only_credfs: bool) -> anyhow::Result<()> {
    let reps = 5;
    let n = 300;
    let dir = tempfile::tempdir()?;
    let td = TrustDomain::new("example.org")?;
    let mut cfg = tether_server::ServerConfig::new(td.clone(), dir.path().join("server"));
    cfg.listen = "127.0.0.1:0".parse()?;
    cfg.admin_socket = dir.path().join("admin.sock");
    let server = tether_server::start(cfg).await?;
    let admin = AdminClient::new(tether_proto::uds::channel(&dir.path().join("admin.sock")));

    // A cached binary for the exec benchmark: a copy of /bin/sleep.
    let bin = dir.path().join("bench-workload");
    std::fs::copy("/bin/sleep", &bin)?;
    let sha = sha256_hex(&std::fs::read(&bin)?);
    let manifest = format!(
        "apiVersion: tether.dev/v1alpha1\nkind: WorkloadIdentity\nmetadata: {{name: bench}}\nspec:\n  spiffeId: spiffe://example.org/bench\n  selectors: [[\"process:sha256:{sha}\"]]\n"
    );
    admin
        .clone()
        .apply(ApplyRequest {
            source: "bench".into(),
            manifest: manifest.into_bytes(),
        })
        .await?;
    let agent = start_agent(&admin, &server, &td, dir.path(), "bench", None).await?;
    let credentials = dir.path().join("bench").join("credentials");
    if only_credfs {
        print!("{}", credfs::run(&admin, &credentials).await?);
        return Ok(());
    }

    let id = SpiffeId::parse("spiffe://example.org/bench")?;
    let signer = {
        // CA-only baseline: the signing step without RPC or TLS.
        let m = tether_ca::new_self_signed_ca(&td, 86400, now())?;
        tether_ca::Signer::new(&m)?
    };

    // --- Baselines and issuance ---------------------------------------
    let mut ecdsa = Vec::new();
    let mut ca_only = Vec::new();
    let mut e2e = Vec::new();
    let mut e2e_cpu = Vec::new();
    let mut batch = Vec::new();
    let mut batch_cpu = Vec::new();
    for _ in 0..reps {
        let (r, _) = rate(n, || async {
            let k = tether_ca::PrivateKey::generate().expect("key");
            std::hint::black_box(tether_ca::build_csr(&k, &id).expect("csr"));
        })
        .await;
        ecdsa.push(r);
        let (r, _) = rate(n, || async {
            let k = tether_ca::PrivateKey::generate().expect("key");
            let csr = tether_ca::build_csr(&k, &id).expect("csr");
            std::hint::black_box(signer.sign_svid(&csr, &id, &[], 3600, now()).expect("sign"));
        })
        .await;
        ca_only.push(r);
        let client = agent.node.client();
        let (r, c) = rate(n, || {
            let mut client = client.clone();
            let id = id.clone();
            async move {
                let k = tether_ca::PrivateKey::generate().expect("key");
                let csr = tether_ca::build_csr(&k, &id).expect("csr");
                let resp = client
                    .sign_x509_svids(SignX509SvidsRequest {
                        csrs: vec![SvidCsr {
                            spiffe_id: id.to_string(),
                            csr,
                            ttl_secs: 0,
                            mesh: false,
                        }],
                    })
                    .await
                    .expect("rpc")
                    .into_inner();
                // Encode as the Workload API would: chain DER + PKCS#8.
                let chain: Vec<u8> = resp.svids[0].chain.iter().flatten().copied().collect();
                std::hint::black_box((chain, k.pkcs8_der().to_vec()));
            }
        })
        .await;
        e2e.push(r);
        e2e_cpu.push(c);
        let per = 16;
        let (r, c) = rate(n / per, || {
            let mut client = client.clone();
            let id = id.clone();
            async move {
                let mut keys = Vec::new();
                let mut csrs = Vec::new();
                for _ in 0..per {
                    let k = tether_ca::PrivateKey::generate().expect("key");
                    csrs.push(SvidCsr {
                        spiffe_id: id.to_string(),
                        csr: tether_ca::build_csr(&k, &id).expect("csr"),
                        ttl_secs: 0,
                        mesh: false,
                    });
                    keys.push(k);
                }
                let resp = client
                    .sign_x509_svids(SignX509SvidsRequest { csrs })
                    .await
                    .expect("rpc")
                    .into_inner();
                std::hint::black_box((resp, keys));
            }
        })
        .await;
        batch.push(r * per as f64);
        batch_cpu.push(c * per as f64);
    }

    // --- exec to SVID ready ------------------------------------------
    // Warm the hash cache (the benchmark is for a cached binary).
    let mut warm = Command::new(&bin).arg("5").spawn()?;
    wait_svid(&agent, warm.id() as i32, Duration::from_secs(5)).await;
    let _ = warm.kill();
    let _ = warm.wait();
    let mut spawn_only = Vec::new();
    let mut ready = Vec::new();
    for _ in 0..200 {
        let t0 = Instant::now();
        let mut child = Command::new(&bin).arg("30").spawn()?;
        spawn_only.push(t0.elapsed());
        if wait_svid(&agent, child.id() as i32, Duration::from_secs(5))
            .await
            .is_some()
        {
            ready.push(t0.elapsed());
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    // From just before spawn until the agent holds the process's SVID.
    let ready_time: Vec<Duration> = ready;
    if ready_time.is_empty() {
        anyhow::bail!("no exec reached SVID-ready within 5 s");
    }

    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!("## SVID issuance and exec-to-SVID latency");
    println!();
    println!("| measurement | median of {reps} runs | ratio |");
    println!("|---|---|---|");
    let b = median(ecdsa.clone());
    println!("| baseline: P-256 keygen + CSR, ops/s (one thread) | {b:.0} | 1.00 |");
    let c = median(ca_only);
    println!(
        "| CA only: keygen + CSR + sign, SVIDs/s (one thread) | {c:.0} | {:.2} |",
        c / b
    );
    let e = median(e2e);
    println!(
        "| end to end over gRPC/TLS, one per call, SVIDs/s (wall) | {e:.0} | {:.2} |",
        e / b
    );
    println!(
        "| end to end, one per call, SVIDs per CPU-second (all threads, client+server) | {:.0} | {:.2} |",
        median(e2e_cpu.clone()),
        median(e2e_cpu) / b
    );
    let bt = median(batch);
    println!(
        "| end to end, 16 per call, SVIDs/s (wall) | {bt:.0} | {:.2} |",
        bt / b
    );
    println!(
        "| end to end, 16 per call, SVIDs per CPU-second | {:.0} | {:.2} |",
        median(batch_cpu.clone()),
        median(batch_cpu) / b
    );
    println!();
    println!(
        "| exec to SVID ready (cached binary, {} execs) | p50 | p99 |",
        ready_time.len()
    );
    println!("|---|---|---|");
    println!(
        "| baseline: fork+exec (spawn returns) | {:?} | {:?} |",
        pct(&spawn_only, 0.5),
        pct(&spawn_only, 0.99)
    );
    println!(
        "| spawn to SVID held by the agent | {:?} | {:?} |",
        pct(&ready_time, 0.5),
        pct(&ready_time, 0.99)
    );
    println!();
    println!("cores: {cores}");
    println!();
    print!("{}", credfs::run(&admin, &credentials).await?);
    drop(agent);

    // --- first connects under enforcement ----------------------------
    // A second agent, enforcing a cgroup of the bench's own.
    let cg = connect::BenchCgroup::new("held")?;
    let enforce = tether_agent::EnforceConfig {
        cgroup: cg.path.clone(),
        hold_port: 0,
        mesh_port: None,
    };
    let agent = start_agent(
        &admin,
        &server,
        &td,
        dir.path(),
        "bench-enforce",
        Some(enforce),
    )
    .await?;
    let section = held::run(&agent, &cg, async |manifest: String| {
        admin
            .clone()
            .apply(ApplyRequest {
                source: "bench-held".into(),
                manifest: manifest.into_bytes(),
            })
            .await?;
        Ok(())
    })
    .await?;
    print!("{section}");
    drop(agent);
    drop(server);
    Ok(())
}

/// An in-process agent joined to `server` with a fresh join token, its
/// sockets and state under `dir/<name>`.
async fn start_agent(
    admin: &AdminClient<tonic::transport::Channel>,
    server: &tether_server::RunningServer,
    td: &TrustDomain,
    dir: &std::path::Path,
    name: &str,
    enforce: Option<tether_agent::EnforceConfig>,
) -> anyhow::Result<tether_agent::RunningAgent> {
    let token = admin
        .clone()
        .create_join_token(CreateJoinTokenRequest {
            ttl_secs: 60,
            node_name: name.into(),
        })
        .await?
        .into_inner()
        .token;
    let base = dir.join(name);
    let mut acfg = tether_agent::AgentConfig::new(
        server.node_addr.to_string(),
        td.clone(),
        name.into(),
        base.join("data"),
    );
    acfg.join_token = Some(token);
    acfg.bootstrap_bundle = Some(server.state.current_bundle());
    acfg.workload_socket = base.join("w.sock");
    acfg.credentials_dir = Some(base.join("credentials"));
    acfg.admin_socket = base.join("a.sock");
    acfg.metrics = None;
    acfg.enforce = enforce;
    // The bench's agents are throwaway: nothing pinned.
    acfg.bpf_pin_dir = None;
    tether_agent::start(acfg).await
}

fn sha256_hex(data: &[u8]) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Polls the tracker every 100 µs until the pid holds an SVID.
async fn wait_svid(
    agent: &tether_agent::RunningAgent,
    pid: i32,
    timeout: Duration,
) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if agent.tracker.svid_count(pid) > 0 {
            return Some(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_micros(100)).await;
    }
    None
}
