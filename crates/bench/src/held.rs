//! First connects of freshly started processes, under a running agent that
//! enforces a cgroup of the bench's own: how many new processes per second
//! can each make one connection to a protected destination, when the agent
//! has to attest every one of them (most connect before it has, and are
//! held), against the same processes connecting to an unprotected port.
//!
//! Each process is the bench binary re-executed (`--connect-once PORT`):
//! connect to 127.0.0.1:PORT, read the server's one-byte greeting, exit 0.
//! So a process only counts when its connection really reached the server
//! (directly, or completed by the agent after a hold).

use std::ffi::CString;
use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};

use crate::connect::BenchCgroup;

/// The hidden argument that makes the bench binary a one-shot client.
pub const CHILD_ARG: &str = "--connect-once";

const ROUNDS: usize = 5;
const PROCESSES: usize = 200;
/// Processes in flight at once.
const PARALLEL: usize = 4;

pub fn child_main(args: &[String]) -> anyhow::Result<()> {
    let port: u16 = args.first().context("port")?.parse()?;
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    ensure!(&b == b"+", "unexpected greeting");
    Ok(())
}

/// A listener that greets every connection with one byte.
struct Greeter {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl Greeter {
    fn start() -> anyhow::Result<Self> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        // SAFETY: listen(2) again on our own socket only raises the backlog.
        unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&l), 4096) };
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
        Ok(Self { port, stop })
    }
}

impl Drop for Greeter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Runs PROCESSES fresh clients against `port`, PARALLEL at a time, and
/// returns processes per second (wall clock) and the per-process times.
fn round(
    bin: &std::path::Path,
    cg: &std::path::Path,
    port: u16,
) -> anyhow::Result<(f64, Vec<Duration>)> {
    let procs = CString::new(cg.join("cgroup.procs").as_os_str().as_bytes())?;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..PARALLEL {
        let (bin, procs, next) = (bin.to_path_buf(), procs.clone(), next.clone());
        workers.push(std::thread::spawn(
            move || -> anyhow::Result<Vec<Duration>> {
                let mut times = Vec::new();
                while next.fetch_add(1, Ordering::Relaxed) < PROCESSES {
                    let mut cmd = Command::new(&bin);
                    cmd.args([CHILD_ARG, &port.to_string()])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null());
                    let procs = procs.clone();
                    // SAFETY: only open/write/close, async-signal-safe.
                    unsafe {
                        cmd.pre_exec(move || {
                            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                            if fd < 0 {
                                return Err(std::io::Error::last_os_error());
                            }
                            let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
                            libc::close(fd);
                            if ok {
                                Ok(())
                            } else {
                                Err(std::io::Error::last_os_error())
                            }
                        });
                    }
                    let t = Instant::now();
                    let st = cmd.status()?;
                    ensure!(st.success(), "a client's first connection failed ({st})");
                    times.push(t.elapsed());
                }
                Ok(times)
            },
        ));
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.join().map_err(|_| anyhow::anyhow!("worker panicked"))??);
    }
    Ok((PROCESSES as f64 / t0.elapsed().as_secs_f64(), all))
}

fn held_total(agent: &tether_agent::RunningAgent) -> f64 {
    agent
        .metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with("tether_agent_held_connections_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The section for docs/benchmarks.md. `setup` registers the identity for
/// the bench binary and the Service + AccessPolicy for `protected`.
pub async fn run(
    agent: &tether_agent::RunningAgent,
    cg: &BenchCgroup,
    apply: impl AsyncFn(String) -> anyhow::Result<()>,
) -> anyhow::Result<String> {
    let bin = std::env::current_exe()?;
    let sha = crate::sha256_hex(&std::fs::read(&bin)?);
    let protected = Greeter::start()?;
    let open = Greeter::start()?;
    apply(format!(
        "apiVersion: tether.dev/v1alpha1\nkind: WorkloadIdentity\nmetadata: {{name: bench-client}}\nspec:\n  spiffeId: spiffe://example.org/bench-client\n  selectors: [[\"process:sha256:{sha}\", \"process:path:{}\"]]\n---\napiVersion: tether.dev/v1alpha1\nkind: Service\nmetadata: {{name: bench-db}}\nspec:\n  addresses: [{{cidr: 127.0.0.1/32, ports: [{}]}}]\n---\napiVersion: tether.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {{name: bench}}\nspec:\n  services: [bench-db]\n  identities: [bench-client]\n",
        bin.display(),
        protected.port
    ))
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await; // registry reaches the agent
    let (mut base_rate, mut prot_rate, mut base_t, mut prot_t) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let held_before = held_total(agent);
    for _ in 0..ROUNDS {
        let (bin2, cgp) = (bin.clone(), cg.path.clone());
        let port = open.port;
        let (r, t) = tokio::task::spawn_blocking(move || round(&bin2, &cgp, port)).await??;
        base_rate.push(r);
        base_t.push(crate::pct(&t, 0.5));
        let (bin2, cgp) = (bin.clone(), cg.path.clone());
        let port = protected.port;
        let (r, t) = tokio::task::spawn_blocking(move || round(&bin2, &cgp, port)).await??;
        prot_rate.push(r);
        prot_t.push(crate::pct(&t, 0.5));
    }
    let held = held_total(agent) - held_before;
    let total = (ROUNDS * PROCESSES) as f64;
    let b = crate::median(base_rate);
    let p = crate::median(prot_rate);
    let bt = crate::median(base_t.iter().map(|d| d.as_secs_f64() * 1e3).collect());
    let pt = crate::median(prot_t.iter().map(|d| d.as_secs_f64() * 1e3).collect());
    let mut out = String::new();
    out.push_str("## First connects of processes the agent has to attest first\n\n");
    out.push_str(&format!("| measurement (median of {ROUNDS} rounds of {PROCESSES} processes, {PARALLEL} at a time) | processes/s | p50 spawn to exit | ratio |\n|---|---|---|---|\n"));
    out.push_str(&format!(
        "| baseline: fresh process, connect to an unprotected port | {b:.0} | {bt:.2} ms | 1.00 |\n"
    ));
    out.push_str(&format!(
        "| fresh process, connect to a protected Service (decided by the agent or held for it) | {p:.0} | {pt:.2} ms | {:.2} |\n\n",
        p / b
    ));
    out.push_str(&format!(
        "{:.0} of {total:.0} protected first connects ({:.0}%) came before the agent had attested the process and were held, then completed by the agent; the rest were decided in the kernel. Every one reached the server.\n\n",
        held,
        100.0 * held / total
    ));
    Ok(out)
}
