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

use tether_attest::{KeyedSlots, PidFd};
use tether_kernel::{ExecId, HeldConnection};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::BoxFuture;
use crate::enforce::{Enforcement, HeldDecision};
use crate::metrics::Metrics;
use crate::proxy::inject::Injector;
use crate::proxy::mesh::Mesh;
use crate::proxy::netns::{Acceptor, Namespaces};
use crate::state::registry::AgentService;
use crate::state::tracker::Tracker;

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

/// How a held connection ended, as the `held_connections` metric counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldOutcome {
    /// No kernel record: nobody was redirected here from that address.
    Unredirected,
    /// The kernel record could not be read.
    Error,
    /// Too many held connections (in all, or of one process).
    Overload,
    Denied,
    Allowed,
    /// Allowed, but the original destination could not be reached.
    UpstreamFailed,
}

impl HeldOutcome {
    pub fn label(self) -> &'static str {
        match self {
            HeldOutcome::Unredirected => "unredirected",
            HeldOutcome::Error => "error",
            HeldOutcome::Overload => "overload",
            HeldOutcome::Denied => "denied",
            HeldOutcome::Allowed => "allowed",
            HeldOutcome::UpstreamFailed => "upstream_failed",
        }
    }
}

/// What the hold path needs from the rest of the agent. [`AgentPorts`] is
/// the real thing (the kernel's held map, the tracker, the verdicts); the
/// middle-tier tests below put a fake kernel map and a scripted attester
/// behind it.
pub trait HoldPorts: Send + Sync + 'static {
    /// Claims the kernel's record for a connection from `peer` (single
    /// use: the record is gone afterwards).
    fn take_held(&self, peer: SocketAddr, netns: u64) -> Result<Option<HeldConnection>, String>;
    /// The verdict for the record's exact process instance and image, once
    /// the agent has attested it.
    fn verdict(&self, rec: &HeldConnection, start_ticks: u64) -> Option<HeldDecision>;
    /// Bumped whenever verdicts change.
    fn verdict_changes(&self) -> watch::Receiver<u64>;
    /// Attests and tracks the process; resolves once its verdicts are
    /// written, or with why it could not be attested.
    fn attest(&self, pid: i32) -> BoxFuture<Result<(), String>>;
    /// The Service with this kernel id.
    fn service(&self, service_id: u32) -> Option<AgentService>;
    /// Records the decision (paired with the kernel's own event).
    fn audit(&self, rec: &HeldConnection, d: &HeldDecision);
}

/// The agent's own [`HoldPorts`].
pub struct AgentPorts {
    pub tracker: Arc<Tracker>,
    pub enf: Arc<Enforcement>,
}

impl HoldPorts for AgentPorts {
    fn take_held(&self, peer: SocketAddr, netns: u64) -> Result<Option<HeldConnection>, String> {
        self.enf
            .kernel()
            .take_held(peer, netns)
            .map_err(|e| e.to_string())
    }

    fn verdict(&self, rec: &HeldConnection, start_ticks: u64) -> Option<HeldDecision> {
        self.enf.held_verdict(
            rec.tgid as i32,
            ExecId(rec.exec_id),
            start_ticks,
            rec.service_id,
        )
    }

    fn verdict_changes(&self) -> watch::Receiver<u64> {
        self.enf.subscribe_verdicts()
    }

    fn attest(&self, pid: i32) -> BoxFuture<Result<(), String>> {
        let tracker = self.tracker.clone();
        Box::pin(async move {
            let pidfd = PidFd::open(pid).map_err(|e| format!("the process is gone ({e})"))?;
            tracker
                .ensure(Arc::new(pidfd))
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }

    fn service(&self, service_id: u32) -> Option<AgentService> {
        self.enf.service_by_id(service_id)
    }

    fn audit(&self, rec: &HeldConnection, d: &HeldDecision) {
        self.enf.audit_held(rec, d)
    }
}

/// What every held connection's task shares.
struct Ctx {
    ports: Arc<dyn HoldPorts>,
    /// The mesh, when this agent runs one: allowed connects to meshed
    /// Services are tunnelled.
    mesh: Option<Arc<Mesh>>,
    /// Adds credentials to the connections of bound processes.
    inject: Option<Arc<Injector>>,
    metrics: Arc<Metrics>,
    /// Held connections being decided, per process.
    deciding: Arc<KeyedSlots<u32>>,
    attest_timeout: Duration,
    /// Where upstream sockets are made: in the client's own namespace.
    namespaces: Arc<Namespaces>,
}

/// Accepts held connections on listeners in any network namespace.
pub struct HoldServer {
    ctx: Arc<Ctx>,
    slots: Arc<tokio::sync::Semaphore>,
}

impl Acceptor for HoldServer {
    fn accept_on(&self, l: TcpListener, netns: u64) -> JoinHandle<()> {
        let (ctx, slots) = (self.ctx.clone(), self.slots.clone());
        let m = ctx.metrics.clone();
        tokio::spawn(async move {
            loop {
                match l.accept().await {
                    Ok((s, peer)) => {
                        let Ok(slot) = slots.clone().try_acquire_owned() else {
                            tracing::warn!(%peer, "too many held connections; reset");
                            m.held_connection(HeldOutcome::Overload.label());
                            reset(s);
                            continue;
                        };
                        tokio::spawn(handle(s, peer, netns, ctx.clone(), slot));
                    }
                    Err(err) => {
                        // EMFILE and friends: back off rather than spin.
                        tracing::warn!(error = %err, "hold listener accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        })
    }
}

/// What to do with a held connection, decided before any byte moves.
#[derive(Debug)]
pub enum Plan {
    Reset(HeldOutcome),
    /// Allowed: connect to the original destination and splice.
    Direct(HeldConnection),
    /// Allowed to a meshed Service: the tunnel takes it.
    Mesh {
        rec: HeldConnection,
        decision: Box<HeldDecision>,
        service: Box<AgentService>,
    },
    /// Allowed, and a binding injects a credential: the injector carries it.
    Inject {
        rec: HeldConnection,
        decision: Box<HeldDecision>,
        service: Box<AgentService>,
    },
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
    /// the shared [`Ctx`]). The returned server accepts on the listeners
    /// of other network namespaces too.
    pub fn serve(
        self,
        ports: Arc<dyn HoldPorts>,
        mesh: Option<Arc<Mesh>>,
        inject: Option<Arc<Injector>>,
        metrics: Arc<Metrics>,
        namespaces: Arc<Namespaces>,
    ) -> (Vec<JoinHandle<()>>, Arc<HoldServer>) {
        let home = namespaces.home();
        let server = Arc::new(HoldServer {
            ctx: Arc::new(Ctx {
                ports,
                mesh,
                inject,
                metrics,
                deciding: KeyedSlots::new(MAX_DECIDING_PER_PROCESS, MAX_HELD),
                attest_timeout: ATTEST_TIMEOUT,
                namespaces,
            }),
            slots: Arc::new(tokio::sync::Semaphore::new(MAX_HELD)),
        });
        let tasks = std::iter::once(self.v4)
            .chain(self.v6)
            .map(|l| server.accept_on(l, home))
            .collect();
        (tasks, server)
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
    netns: u64,
    ctx: Arc<Ctx>,
    slot: tokio::sync::OwnedSemaphorePermit,
) {
    let _ = client.set_nodelay(true);
    let metrics = &ctx.metrics;
    let plan = plan(
        &*ctx.ports,
        peer,
        netns,
        ctx.mesh.is_some(),
        ctx.inject.is_some(),
        &ctx.deciding,
        ctx.attest_timeout,
    )
    .await;
    let rec = match plan {
        Plan::Reset(outcome) => {
            metrics.held_connection(outcome.label());
            return reset(client);
        }
        Plan::Mesh {
            rec,
            decision,
            service,
        } => {
            let Some(mesh) = ctx.mesh.clone() else {
                // plan() never tunnels without a mesh.
                metrics.held_connection(HeldOutcome::Error.label());
                return reset(client);
            };
            if !rec.mesh {
                metrics.held_connection(HeldOutcome::Allowed.label());
            }
            let ticks = start_ticks(&rec);
            drop(slot);
            mesh.outbound(client, &rec, ticks, &service, &decision.rule, decision.proc)
                .await;
            return;
        }
        Plan::Inject {
            rec,
            decision,
            service,
        } => {
            let Some(inject) = ctx.inject.clone() else {
                // plan() never injects without an injector.
                metrics.held_connection(HeldOutcome::Error.label());
                return reset(client);
            };
            if !rec.inject {
                metrics.held_connection(HeldOutcome::Allowed.label());
            }
            let ticks = start_ticks(&rec);
            // The injector has its own pool: the hold slot is for deciding.
            drop(slot);
            inject
                .serve(client, rec, ticks, *service, *decision, ctx.ports.clone())
                .await;
            return;
        }
        Plan::Direct(rec) => rec,
    };
    let upstream = match tokio::time::timeout(
        UPSTREAM_TIMEOUT,
        ctx.namespaces.connect(rec.netns, rec.original_dst),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(dst = %rec.original_dst, error = %e, "held connection allowed, but the destination refused");
            metrics.held_connection(HeldOutcome::UpstreamFailed.label());
            return reset(client);
        }
        Err(_) => {
            tracing::info!(dst = %rec.original_dst, "held connection allowed, but the destination did not answer");
            metrics.held_connection(HeldOutcome::UpstreamFailed.label());
            return reset(client);
        }
    };
    metrics.held_connection(HeldOutcome::Allowed.label());
    let _ = upstream.set_nodelay(true);
    splice(client, upstream).await;
}

/// The hold state machine up to the first byte: claim the kernel's record,
/// take a per-process slot, decide, audit, and choose the path. Every
/// failure resets.
pub async fn plan(
    ports: &dyn HoldPorts,
    peer: SocketAddr,
    netns: u64,
    has_mesh: bool,
    has_injector: bool,
    deciding: &Arc<KeyedSlots<u32>>,
    attest_timeout: Duration,
) -> Plan {
    // Only the kernel's record (keyed by the full client address) makes a
    // connection here legitimate; a client bound to a non-loopback source
    // still has one.
    let rec = match ports.take_held(peer, netns) {
        Ok(Some(r)) => r,
        Ok(None) => {
            tracing::warn!(%peer, "connection to the hold port that the kernel did not redirect; reset");
            return Plan::Reset(HeldOutcome::Unredirected);
        }
        Err(e) => {
            tracing::error!(%peer, error = %e, "reading the held connection record failed; reset");
            return Plan::Reset(HeldOutcome::Error);
        }
    };
    let Some(slot) = deciding.take(rec.tgid) else {
        tracing::warn!(
            pid = rec.tgid,
            "too many held connections of one process being decided; reset"
        );
        return Plan::Reset(HeldOutcome::Overload);
    };
    let mut decision = decide(ports, &rec, attest_timeout).await;
    drop(slot);
    let service = ports.service(rec.service_id);
    let meshed = service.clone().filter(|s| s.spec.mesh.is_some());
    if decision.allow && meshed.is_some() && !has_mesh {
        decision.allow = false;
        decision.reason =
            Some("the Service is meshed, but this agent runs without a mesh port".into());
    }
    // Fail closed: a credential the agent cannot add is not left out (the
    // service would see the client unauthenticated, or with whatever
    // placeholder it holds).
    if decision.allow && decision.inject {
        let why = if !has_injector {
            Some("a binding injects into this Service, but this agent has no injector")
        } else if meshed.is_some() {
            Some("injection into a meshed Service is not supported")
        } else if service.is_none() {
            Some("the Service is gone")
        } else {
            None
        };
        if let Some(why) = why {
            decision.allow = false;
            decision.reason = Some(why.into());
        }
    }
    // A connect the kernel already allowed into the mesh (allow-mesh) or
    // to the injector (allow-inject) has its record, and the tunnel or
    // injector adds its own; anything else that differs from what the
    // kernel recorded gets a record here.
    let recorded = decision.allow
        && if decision.inject {
            rec.inject
        } else {
            rec.mesh && meshed.is_some()
        };
    if !recorded {
        ports.audit(&rec, &decision);
    }
    if !decision.allow {
        return Plan::Reset(HeldOutcome::Denied);
    }
    match (decision.inject, service, meshed) {
        (true, Some(service), _) => Plan::Inject {
            rec,
            decision: Box::new(decision),
            service: Box::new(service),
        },
        (_, _, Some(service)) => Plan::Mesh {
            rec,
            decision: Box::new(decision),
            service: Box::new(service),
        },
        _ => Plan::Direct(rec),
    }
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
        inject: false,
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
    ports: &dyn HoldPorts,
    rec: &HeldConnection,
    attest_timeout: Duration,
) -> HeldDecision {
    let pid = rec.tgid as i32;
    let start_ticks = start_ticks(rec);
    let mut changes = ports.verdict_changes();
    // Already attested since it connected?
    if let Some(d) = ports.verdict(rec, start_ticks) {
        return d;
    }
    // Its own task: the attestation (and SVID issuance) completes even if
    // the verdict is known first.
    let mut ensure = tokio::spawn(ports.attest(pid));
    let deadline = tokio::time::sleep(attest_timeout);
    tokio::pin!(deadline);
    let mut ensured: Option<Result<(), String>> = None;
    loop {
        if let Some(d) = ports.verdict(rec, start_ticks) {
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
                    Ok(r) => r,
                    Err(e) => Err(e.to_string()),
                });
            }
            r = changes.changed() => {
                if r.is_err() {
                    return deny("agent shutting down".to_string());
                }
            }
            _ = &mut deadline => return deny(format!("attesting process {pid} took longer than {attest_timeout:?}")),
        }
    }
}

/// The middle tier: the hold state machine in process, no root, no
/// kernel. A fake kernel map and a scripted attester stand behind
/// [`HoldPorts`]; the sockets are real loopback ones.
#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// What attesting the process does.
    #[derive(Clone)]
    enum Attest {
        /// Writes this verdict for the process, then resolves.
        Grants(bool),
        /// Resolves, but no verdict matches (it exec'd since).
        NoVerdict,
        Fails(&'static str),
        /// Never resolves.
        Hangs,
    }

    struct Fake {
        /// The kernel's held map, by client address.
        held: Mutex<HashMap<SocketAddr, HeldConnection>>,
        map_broken: bool,
        verdict: Arc<Mutex<Option<HeldDecision>>>,
        changes: Arc<watch::Sender<u64>>,
        attest: Attest,
        meshed: Option<AgentService>,
        audited: Mutex<Vec<HeldDecision>>,
    }

    impl Fake {
        fn new(attest: Attest) -> Self {
            Fake {
                held: Mutex::new(HashMap::new()),
                map_broken: false,
                verdict: Arc::new(Mutex::new(None)),
                changes: Arc::new(watch::channel(0).0),
                attest,
                meshed: None,
                audited: Mutex::new(Vec::new()),
            }
        }

        fn hold(&self, peer: SocketAddr, rec: HeldConnection) {
            self.held.lock().expect("held").insert(peer, rec);
        }

        fn audited(&self) -> Vec<(bool, Option<String>)> {
            let a = self.audited.lock().expect("audited");
            a.iter().map(|d| (d.allow, d.reason.clone())).collect()
        }
    }

    fn decision(allow: bool) -> HeldDecision {
        HeldDecision {
            allow,
            inject: false,
            rule: if allow {
                "p".into()
            } else {
                "default-deny".into()
            },
            reason: None,
            proc: None,
        }
    }

    impl HoldPorts for Fake {
        fn take_held(
            &self,
            peer: SocketAddr,
            _netns: u64,
        ) -> Result<Option<HeldConnection>, String> {
            if self.map_broken {
                return Err("held: lookup failed: EIO".into());
            }
            Ok(self.held.lock().expect("held").remove(&peer))
        }

        fn verdict(&self, _rec: &HeldConnection, _ticks: u64) -> Option<HeldDecision> {
            self.verdict.lock().expect("verdict").clone()
        }

        fn verdict_changes(&self) -> watch::Receiver<u64> {
            self.changes.subscribe()
        }

        fn attest(&self, _pid: i32) -> BoxFuture<Result<(), String>> {
            let (verdict, changes, script) = (
                self.verdict.clone(),
                self.changes.clone(),
                self.attest.clone(),
            );
            Box::pin(async move {
                match script {
                    Attest::Grants(allow) => {
                        *verdict.lock().expect("verdict") = Some(decision(allow));
                        changes.send_modify(|v| *v += 1);
                        Ok(())
                    }
                    Attest::NoVerdict => Ok(()),
                    Attest::Fails(why) => Err(why.to_owned()),
                    Attest::Hangs => std::future::pending().await,
                }
            })
        }

        fn service(&self, _service_id: u32) -> Option<AgentService> {
            self.meshed.clone()
        }

        fn audit(&self, _rec: &HeldConnection, d: &HeldDecision) {
            self.audited.lock().expect("audited").push(d.clone());
        }
    }

    fn record(dst: SocketAddr, mesh: bool) -> HeldConnection {
        HeldConnection {
            original_dst: dst,
            tgid: 4242,
            pid: 4242,
            uid: 1000,
            service_id: 7,
            local_port: 40000,
            flow_v6: false,
            mesh,
            inject: false,
            exec_id: 1,
            start_boottime_ns: 1_000_000_000,
            socket_cookie: 99,
            netns: tether_kernel::netns_cookie().expect("netns cookie"),
        }
    }

    fn meshed_service() -> AgentService {
        let yaml = "apiVersion: tether.dev/v1alpha1\nkind: Service\nmetadata: {name: db}\nspec:\n  addresses: [{cidr: 192.0.2.7/32, ports: [5432]}]\n  mesh: {}\n";
        match tether_manifest::parse("t.yaml", yaml.as_bytes())
            .expect("manifest")
            .remove(0)
        {
            tether_manifest::Resource::Service { name, spec } => AgentService { name, spec },
            other => panic!("unexpected {}", other.kind()),
        }
    }

    const PEER: &str = "127.0.0.1:40000";
    const DST: &str = "192.0.2.7:5432";
    /// Long enough never to fire in a test that does not wait for it.
    const NEVER: Duration = Duration::from_secs(600);

    fn slots() -> Arc<KeyedSlots<u32>> {
        KeyedSlots::new(MAX_DECIDING_PER_PROCESS, MAX_HELD)
    }

    async fn run(fake: &Fake, has_mesh: bool, timeout: Duration) -> Plan {
        plan(
            fake,
            PEER.parse().expect("peer"),
            0,
            has_mesh,
            false,
            &slots(),
            timeout,
        )
        .await
    }

    fn held(attest: Attest, mesh: bool) -> Fake {
        let fake = Fake::new(attest);
        fake.hold(
            PEER.parse().expect("peer"),
            record(DST.parse().expect("dst"), mesh),
        );
        fake
    }

    #[tokio::test]
    async fn a_connection_the_kernel_did_not_redirect_is_reset() {
        let fake = Fake::new(Attest::Grants(true));
        assert!(matches!(
            run(&fake, false, NEVER).await,
            Plan::Reset(HeldOutcome::Unredirected)
        ));
        let mut broken = held(Attest::Grants(true), false);
        broken.map_broken = true;
        assert!(matches!(
            run(&broken, false, NEVER).await,
            Plan::Reset(HeldOutcome::Error)
        ));
        assert!(fake.audited().is_empty() && broken.audited().is_empty());
    }

    #[tokio::test]
    async fn a_record_is_claimed_once() {
        let fake = held(Attest::Grants(true), false);
        assert!(matches!(run(&fake, false, NEVER).await, Plan::Direct(_)));
        assert!(matches!(
            run(&fake, false, NEVER).await,
            Plan::Reset(HeldOutcome::Unredirected)
        ));
    }

    #[tokio::test]
    async fn a_verdict_already_written_decides_without_attesting() {
        // The attester would hang: the verdict is found first.
        let fake = held(Attest::Hangs, false);
        *fake.verdict.lock().expect("verdict") = Some(decision(true));
        match run(&fake, false, NEVER).await {
            Plan::Direct(rec) => assert_eq!(rec.original_dst, DST.parse().expect("dst")),
            other => panic!("expected a direct splice, got {other:?}"),
        }
        assert_eq!(fake.audited(), vec![(true, None)]);
    }

    #[tokio::test]
    async fn attestation_decides_allow_and_deny() {
        let fake = held(Attest::Grants(true), false);
        assert!(matches!(run(&fake, false, NEVER).await, Plan::Direct(_)));
        assert_eq!(fake.audited(), vec![(true, None)]);

        let fake = held(Attest::Grants(false), false);
        assert!(matches!(
            run(&fake, false, NEVER).await,
            Plan::Reset(HeldOutcome::Denied)
        ));
        assert_eq!(fake.audited(), vec![(false, None)]);
    }

    #[tokio::test]
    async fn what_cannot_be_attested_is_denied_and_audited_with_why() {
        let cases = [
            (Attest::NoVerdict, "is not the one that connected"),
            (
                Attest::Fails("the process is gone"),
                "failed: the process is gone",
            ),
            (Attest::Hangs, "took longer than"),
        ];
        for (script, why) in cases {
            let fake = held(script, false);
            // Only the hanging attester ever waits for this.
            let plan = run(&fake, false, Duration::from_millis(50)).await;
            assert!(matches!(plan, Plan::Reset(HeldOutcome::Denied)), "{why}");
            let audited = fake.audited();
            assert_eq!(audited.len(), 1, "{why}");
            assert!(!audited[0].0);
            let reason = audited[0].1.clone().unwrap_or_default();
            assert!(reason.contains(why), "{reason:?} should say {why:?}");
        }
    }

    #[tokio::test]
    async fn one_process_cannot_take_every_deciding_slot() {
        let fake = held(Attest::Grants(true), false);
        let deciding = KeyedSlots::new(1, MAX_HELD);
        let _busy = deciding.take(4242).expect("first slot");
        let first = plan(
            &fake,
            PEER.parse().expect("peer"),
            0,
            false,
            false,
            &deciding,
            NEVER,
        )
        .await;
        assert!(matches!(first, Plan::Reset(HeldOutcome::Overload)));
        assert!(fake.audited().is_empty(), "nothing was decided");
        // Another process still gets its slot.
        let other = Fake::new(Attest::Grants(true));
        let mut rec = record(DST.parse().expect("dst"), false);
        rec.tgid = 4343;
        other.hold(PEER.parse().expect("peer"), rec);
        let second = plan(
            &other,
            PEER.parse().expect("peer"),
            0,
            false,
            false,
            &deciding,
            NEVER,
        )
        .await;
        assert!(matches!(second, Plan::Direct(_)));
    }

    #[tokio::test]
    async fn meshed_services_go_to_the_tunnel_or_are_refused_without_one() {
        // Held (not yet attested) connect to a meshed Service: audited here,
        // then tunnelled.
        let mut fake = held(Attest::Grants(true), false);
        fake.meshed = Some(meshed_service());
        assert!(matches!(run(&fake, true, NEVER).await, Plan::Mesh { .. }));
        assert_eq!(fake.audited().len(), 1);

        // Allowed by the kernel into the mesh: the tunnel audits, not us.
        let mut fake = held(Attest::Grants(true), true);
        fake.meshed = Some(meshed_service());
        assert!(matches!(run(&fake, true, NEVER).await, Plan::Mesh { .. }));
        assert!(fake.audited().is_empty());

        // No mesh port on this agent: refused, with why.
        let mut fake = held(Attest::Grants(true), true);
        fake.meshed = Some(meshed_service());
        assert!(matches!(
            run(&fake, false, NEVER).await,
            Plan::Reset(HeldOutcome::Denied)
        ));
        let audited = fake.audited();
        assert_eq!(audited.len(), 1);
        assert!(
            audited[0]
                .1
                .as_deref()
                .unwrap_or("")
                .contains("without a mesh port")
        );
    }

    /// A loopback server that echoes and counts its connections.
    async fn echo_server() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
        let addr = l.local_addr().expect("addr");
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        (addr, accepted)
    }

    /// One held connection through `handle`: the client's bytes reach the
    /// echo server and come back, or the client sees a reset.
    async fn through_handle(
        attest: Attest,
        upstream: Option<SocketAddr>,
    ) -> (Result<Vec<u8>, std::io::Error>, String) {
        let hold = TcpListener::bind("127.0.0.1:0").await.expect("bind hold");
        let hold_addr = hold.local_addr().expect("addr");
        let client = TcpStream::connect(hold_addr).await.expect("connect");
        let (server_side, peer) = hold.accept().await.expect("accept");
        assert_eq!(peer, client.local_addr().expect("local"));
        let fake = Fake::new(attest);
        // Nothing listens on a port just bound and released.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        fake.hold(peer, record(upstream.unwrap_or(closed), false));
        let metrics = Metrics::new();
        let ctx = Arc::new(Ctx {
            ports: Arc::new(fake),
            mesh: None,
            inject: None,
            metrics: metrics.clone(),
            deciding: slots(),
            attest_timeout: NEVER,
            namespaces: crate::proxy::netns::Namespaces::new(0).expect("namespaces"),
        });
        let slot = Arc::new(tokio::sync::Semaphore::new(1))
            .try_acquire_owned()
            .expect("slot");
        tokio::spawn(handle(server_side, peer, 0, ctx, slot));
        let mut client = client;
        let result = async {
            client.write_all(b"ping").await?;
            let mut buf = [0u8; 4];
            client.read_exact(&mut buf).await?;
            Ok(buf.to_vec())
        }
        .await;
        (result, metrics.encode())
    }

    #[tokio::test]
    async fn handle_splices_allowed_connections_and_resets_the_rest() {
        let (echo, accepted) = echo_server().await;
        let (r, m) = through_handle(Attest::Grants(true), Some(echo)).await;
        assert_eq!(r.expect("allowed connection echoes"), b"ping");
        assert!(m.contains(r#"outcome="allowed"} 1"#), "{m}");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);

        let (r, m) = through_handle(Attest::Grants(false), Some(echo)).await;
        let err = r.expect_err("a denied connection is reset");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
        assert!(m.contains(r#"outcome="denied"} 1"#), "{m}");
        // Refused at the destination too: the server saw no new connection.
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);

        let (r, m) = through_handle(Attest::Grants(true), None).await;
        assert_eq!(
            r.expect_err("an unreachable destination resets").kind(),
            std::io::ErrorKind::ConnectionReset
        );
        assert!(m.contains(r#"outcome="upstream_failed"} 1"#), "{m}");
    }
}
