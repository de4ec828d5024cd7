//! The hold listener: where the kernel sends TCP connections of processes
//! the agent has not attested yet (see tether-kernel's module docs).
//!
//! For each accepted connection the agent claims the kernel's record by the
//! client's port (which process, which image, where it was going), attests
//! that exact process, and decides with the same verdicts the kernel would
//! use. Allowed: the agent connects to the original destination itself (its
//! own connections are exempt in the kernel) and copies bytes both ways.
//! Denied: the connection is reset before a byte reaches the service. A
//! connection to this port that the kernel did not redirect has no record
//! and is reset too.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tether_attest::PidFd;
use tether_kernel::{ExecId, HeldConnection};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::enforce::{Enforcement, HeldDecision};
use crate::mesh::Mesh;
use crate::metrics::Metrics;
use crate::tracker::Tracker;
use tether_attest::KeyedSlots;

/// How long a held connection may wait for its process to be attested.
const ATTEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the agent tries to reach the original destination.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(10);
/// Held connections being decided or spliced at once; beyond it new ones
/// are reset, so a connect flood cannot exhaust the agent's descriptors.
const MAX_HELD: usize = 4096;
/// Held connections of one process being decided at once: a process that
/// floods connects waits for its own attestation, not everyone's slots.
const MAX_DECIDING_PER_PROCESS: usize = 64;

/// What every held connection's task shares.
struct Ctx {
    tracker: Arc<Tracker>,
    enf: Arc<Enforcement>,
    /// The mesh, when this agent runs one: allowed connects to meshed
    /// Services are tunnelled.
    mesh: Option<Arc<Mesh>>,
    metrics: Arc<Metrics>,
    /// Held connections being decided, per process.
    deciding: Arc<KeyedSlots<u32>>,
}

pub struct HoldListeners {
    v4: TcpListener,
    v6: Option<TcpListener>,
    pub port: u16,
}

impl HoldListeners {
    /// Binds 127.0.0.1 and [::1] on one port (`port` 0: any free port). A
    /// host without IPv6 loopback gets only the IPv4 listener, and the
    /// kernel refuses, rather than holds, unattested IPv6 connects there.
    pub async fn bind(port: u16) -> anyhow::Result<Self> {
        let mut last_err = None;
        for _ in 0..if port == 0 { 20 } else { 1 } {
            let v4 = TcpListener::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port))
                .await
                .map_err(|e| {
                    anyhow::anyhow!("binding the hold listener on 127.0.0.1:{port}: {e}")
                })?;
            let bound = v4.local_addr()?.port();
            match TcpListener::bind(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), bound)).await {
                Ok(v6) => {
                    return Ok(HoldListeners {
                        v4,
                        v6: Some(v6),
                        port: bound,
                    });
                }
                // Someone holds that port on [::1]; with an ephemeral port,
                // try another.
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => last_err = Some(e),
                Err(e) => {
                    tracing::warn!(error = %e, "no IPv6 loopback hold listener; unattested IPv6 connects are refused");
                    return Ok(HoldListeners {
                        v4,
                        v6: None,
                        port: bound,
                    });
                }
            }
        }
        Err(anyhow::anyhow!(
            "binding the hold listener on [::1]:{port}: {}",
            last_err.map(|e| e.to_string()).unwrap_or_default()
        ))
    }

    pub fn has_v6(&self) -> bool {
        self.v6.is_some()
    }

    /// Accepts on both listeners; one task per held connection (each gets
    /// the shared [`Ctx`]).
    pub fn serve(
        self,
        tracker: Arc<Tracker>,
        enforcement: Arc<Enforcement>,
        mesh: Option<Arc<Mesh>>,
        metrics: Arc<Metrics>,
    ) -> Vec<JoinHandle<()>> {
        let mut tasks = Vec::new();
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HELD));
        let ctx = Arc::new(Ctx {
            tracker,
            enf: enforcement,
            mesh,
            metrics,
            deciding: KeyedSlots::new(MAX_DECIDING_PER_PROCESS, MAX_HELD),
        });
        for l in std::iter::once(self.v4).chain(self.v6) {
            let (ctx, slots) = (ctx.clone(), slots.clone());
            let m = ctx.metrics.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    match l.accept().await {
                        Ok((s, peer)) => {
                            let Ok(slot) = slots.clone().try_acquire_owned() else {
                                tracing::warn!(%peer, "too many held connections; reset");
                                m.held_connection("overload");
                                reset(s);
                                continue;
                            };
                            tokio::spawn(handle(s, peer, ctx.clone(), slot));
                        }
                        Err(err) => {
                            // EMFILE and friends: back off rather than spin.
                            tracing::warn!(error = %err, "hold listener accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }));
        }
        tasks
    }
}

/// Closes with a reset, so the client sees the refusal at once and no
/// FIN could be mistaken for an empty answer.
fn reset(s: TcpStream) {
    let _ = s.set_zero_linger();
    drop(s);
}

/// `slot` is held while the connection is being decided or spliced; a
/// tunnel gives it back and takes one of the mesh's own.
async fn handle(
    client: TcpStream,
    peer: SocketAddr,
    ctx: Arc<Ctx>,
    slot: tokio::sync::OwnedSemaphorePermit,
) {
    let Ctx {
        tracker,
        enf,
        mesh,
        metrics,
        deciding,
    } = &*ctx;
    let _ = client.set_nodelay(true);
    // Only the kernel's record (keyed by the full client address) makes a
    // connection here legitimate; a client bound to a non-loopback source
    // still has one.
    let rec = match enf.kernel().take_held(peer) {
        Ok(Some(r)) => r,
        Ok(None) => {
            tracing::warn!(%peer, "connection to the hold port that the kernel did not redirect; reset");
            metrics.held_connection("unredirected");
            return reset(client);
        }
        Err(e) => {
            tracing::error!(%peer, error = %e, "reading the held connection record failed; reset");
            metrics.held_connection("error");
            return reset(client);
        }
    };
    let Some(deciding) = deciding.take(rec.tgid) else {
        tracing::warn!(
            pid = rec.tgid,
            "too many held connections of one process being decided; reset"
        );
        metrics.held_connection("overload");
        return reset(client);
    };
    let decision = decide(tracker, enf, &rec).await;
    drop(deciding);
    let meshed = enf
        .service_by_id(rec.service_id)
        .filter(|s| s.spec.mesh.is_some());
    let mesh = mesh.clone();
    // A connect the kernel already allowed into the mesh has its record
    // (allow-mesh) and the tunnel adds its own; anything else that differs
    // from what the kernel recorded gets a record here.
    let mut decision = decision;
    if decision.allow && meshed.is_some() && mesh.is_none() {
        decision.allow = false;
        decision.reason =
            Some("the Service is meshed, but this agent runs without a mesh port".into());
    }
    if !rec.mesh || !decision.allow || meshed.is_none() {
        enf.audit_held(&rec, &decision);
    }
    if !decision.allow {
        metrics.held_connection("denied");
        return reset(client);
    }
    if let (Some(service), Some(mesh)) = (meshed, mesh) {
        if !rec.mesh {
            metrics.held_connection("allowed");
        }
        let ticks = start_ticks(&rec);
        drop(slot);
        mesh.outbound(client, &rec, ticks, &service, &decision.rule, decision.proc)
            .await;
        return;
    }
    let upstream = match tokio::time::timeout(
        UPSTREAM_TIMEOUT,
        TcpStream::connect(rec.original_dst),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(dst = %rec.original_dst, error = %e, "held connection allowed, but the destination refused");
            metrics.held_connection("upstream_failed");
            return reset(client);
        }
        Err(_) => {
            tracing::info!(dst = %rec.original_dst, "held connection allowed, but the destination did not answer");
            metrics.held_connection("upstream_failed");
            return reset(client);
        }
    };
    metrics.held_connection("allowed");
    let _ = upstream.set_nodelay(true);
    splice(client, upstream).await;
}

/// Copies both ways until both sides are done, passing half-closes on.
async fn splice(mut a: TcpStream, mut b: TcpStream) {
    if let Err(e) = tokio::io::copy_bidirectional(&mut a, &mut b).await {
        tracing::debug!(error = %e, "held connection ended with an error");
        // Pass an abort on as an abort.
        reset(a);
        reset(b);
    }
}

fn deny(reason: String) -> HeldDecision {
    HeldDecision {
        allow: false,
        rule: "unattested".to_string(),
        reason: Some(reason),
        proc: None,
    }
}

/// Clock ticks per second, as /proc/<pid>/stat counts start times.
fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(hz).ok().filter(|h| *h > 0).unwrap_or(100)
}

/// The process's start time as /proc counts it (clock ticks since boot).
fn start_ticks(rec: &HeldConnection) -> u64 {
    rec.start_boottime_ns / (1_000_000_000 / clock_ticks())
}

/// Attests the process that made the held connection and returns the
/// verdict for it. Only the exact instance (pid and start time) and image
/// (exec id) that called connect() counts: anything else is a denial.
async fn decide(
    tracker: &Arc<Tracker>,
    enf: &Arc<Enforcement>,
    rec: &HeldConnection,
) -> HeldDecision {
    let pid = rec.tgid as i32;
    let start_ticks = start_ticks(rec);
    let exec_id = ExecId(rec.exec_id);
    let mut changes = enf.subscribe_verdicts();
    // Already attested since it connected?
    if let Some(d) = enf.held_verdict(pid, exec_id, start_ticks, rec.service_id) {
        return d;
    }
    let pidfd = match PidFd::open(pid) {
        Ok(fd) => Arc::new(fd),
        Err(e) => {
            return deny(format!(
                "process {pid} is gone ({e}); it could not be attested"
            ));
        }
    };
    // Its own task: the attestation (and SVID issuance) completes even if
    // the verdict is known first.
    let t = tracker.clone();
    let mut ensure = tokio::spawn(async move { t.ensure(pidfd).await.map(|_| ()) });
    let deadline = tokio::time::sleep(ATTEST_TIMEOUT);
    tokio::pin!(deadline);
    let mut ensured: Option<Result<(), String>> = None;
    loop {
        if let Some(d) = enf.held_verdict(pid, exec_id, start_ticks, rec.service_id) {
            return d;
        }
        if let Some(done) = &ensured {
            return deny(match done {
                Err(e) => format!("attesting process {pid} failed: {e}"),
                Ok(()) => format!(
                    "process {pid} is not the one that connected (it exited or exec'd since)"
                ),
            });
        }
        tokio::select! {
            r = &mut ensure, if ensured.is_none() => {
                ensured = Some(match r {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(e) => Err(e.to_string()),
                });
            }
            r = changes.changed() => {
                if r.is_err() {
                    return deny("agent shutting down".to_string());
                }
            }
            _ = &mut deadline => return deny(format!("attesting process {pid} took longer than {ATTEST_TIMEOUT:?}")),
        }
    }
}
