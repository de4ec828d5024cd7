//! Connection-time enforcement: compiles the registry (Services,
//! AccessPolicies) and each attested process's identities into the kernel's
//! verdict maps, re-evaluates Cedar conditions as time passes, and turns
//! kernel decision events into audit records.
//!
//! Every attested process gets a *subject*: a number unique to that process
//! instance and registry view. The kernel looks up (subject, service) on
//! connect; no entry means deny. Verdicts are written before the process's
//! subject, so a process never runs with half its verdicts.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use tether_attest::ProcessInfo;
use tether_kernel::{Decision, DstPrefix, Enforcer, ExecId, Proto};
use tokio::sync::watch;

use crate::audit::AuditLog;
use crate::metrics::Metrics;
use crate::state::registry::Registry;

pub use crate::decide::DEFAULT_DENY;
use crate::decide::{self, Names, Subject};

pub use crate::clock::Clock;

struct ProcEntry {
    start_time: u64,
    exec_id: ExecId,
    /// Process start, CLOCK_BOOTTIME ns (the kernel's key with exec_id).
    start_ns: u64,
    subject: u32,
    info: ProcessInfo,
    identities: Vec<String>,
    spiffe_ids: Vec<String>,
    /// service id -> rule id, as written to the kernel (those resting on a
    /// condition with an expiry, refreshed on every condition tick).
    allowed: BTreeMap<u32, u32>,
    /// Allowed Services whose connections the agent injects into.
    inject: BTreeSet<u32>,
}

/// The registry and what was compiled from it, under one lock so no reader
/// ever pairs a registry with another registry's numbering.
struct Compiled {
    registry: Arc<Registry>,
    names: Names,
    installed: HashSet<DstPrefix>,
    local_ports: HashSet<(Proto, u16)>,
}

pub struct Enforcement {
    kernel: Arc<Enforcer>,
    /// This host's addresses (netlink), for Services that name one.
    host_addrs: Mutex<Vec<IpAddr>>,
    node: String,
    clock: Clock,
    next_subject: AtomicU32,
    procs: Mutex<HashMap<i32, ProcEntry>>,
    /// Recently replaced or exited subjects, so audit records of decisions
    /// read after the process changed still name who decided (bounded).
    retired: Mutex<std::collections::VecDeque<(u32, ProcessInfo, Vec<String>)>>,
    compiled: Mutex<Compiled>,
    /// Where every decision record goes.
    pub audit: Arc<AuditLog>,
    metrics: Arc<Metrics>,
    /// Bumped whenever a process's kernel entry is written or removed; the
    /// hold path waits on it.
    verdicts_changed: watch::Sender<u64>,
    /// Held connections seen from one side only: kernel "held" events not
    /// yet decided by the hold listener, and decisions whose kernel event
    /// has not been read yet. Pairs them so each held connection is one
    /// audit record, and none goes unrecorded.
    holds: Mutex<HashMap<u64, (std::time::Instant, Option<tether_kernel::Event>)>>,
    /// Where requests for a listener in another network namespace go (the
    /// proxy plane's namespace table, by the pid that asked).
    netns_requests: std::sync::OnceLock<Box<dyn Fn(i32, u64) + Send + Sync>>,
    /// Where the kernel's process events go (the tracker's event queue).
    proc_events: std::sync::OnceLock<Box<dyn Fn(tether_attest::ProcEvent) + Send + Sync>>,
}

/// What the hold listener decided for a held connection.
#[derive(Debug, Clone)]
pub struct HeldDecision {
    pub allow: bool,
    /// Allowed, and a CredentialBinding of the process's identities
    /// injects into the Service: the agent carries it and adds it.
    pub inject: bool,
    pub rule: String,
    /// Why, for denials that are not policy (attestation failed, ...).
    pub reason: Option<String>,
    pub proc: Option<(ProcessInfo, Vec<String>)>,
}

/// A kernel "held" event with no decision after this long never reached
/// the agent (the client gave up, or the agent was restarting). Longer than
/// the hold listener's own attestation timeout, so a slow decision is not
/// recorded twice.
const HOLD_UNCLAIMED_AFTER: std::time::Duration = std::time::Duration::from_secs(30);
/// A decision whose kernel event never came (ring buffer full) is forgotten.
const HOLD_FORGET_AFTER: std::time::Duration = std::time::Duration::from_secs(60);
const RETIRED: usize = 4096;
/// How long a verdict that rests on a condition (a time window) allows
/// without being refreshed: the agent refreshes every 500 ms, so a stalled
/// agent's conditional verdicts lapse in the kernel within this.
const CONDITIONAL_TTL_NS: u64 = 2_000_000_000;

impl Enforcement {
    pub fn new(
        kernel: Arc<Enforcer>,
        node: String,
        clock: Clock,
        audit: Arc<AuditLog>,
        metrics: Arc<Metrics>,
        registry: Arc<Registry>,
    ) -> anyhow::Result<Arc<Self>> {
        // Over adopted maps, continue numbering after the previous agent's
        // subjects so none of its still-valid verdicts is reused.
        let first_subject = if kernel.adopted() {
            let procs = kernel
                .processes()
                .map_err(|e| anyhow::anyhow!("reading adopted processes: {e}"))?;
            let verdicts = kernel
                .verdicts()
                .map_err(|e| anyhow::anyhow!("reading adopted verdicts: {e}"))?;
            procs
                .iter()
                .map(|(_, p)| p.subject)
                .chain(verdicts.iter().map(|v| v.subject))
                .max()
                .unwrap_or(0)
                .saturating_add(1)
        } else {
            1
        };
        let e = Arc::new(Enforcement {
            kernel,
            host_addrs: Mutex::new(Vec::new()),
            node,
            clock,
            next_subject: AtomicU32::new(first_subject),
            procs: Mutex::new(HashMap::new()),
            retired: Mutex::new(Default::default()),
            compiled: Mutex::new(Compiled {
                registry: registry.clone(),
                names: Names::default(),
                installed: HashSet::new(),
                local_ports: HashSet::new(),
            }),
            audit,
            metrics,
            verdicts_changed: watch::channel(0).0,
            holds: Mutex::new(HashMap::new()),
            netns_requests: std::sync::OnceLock::new(),
            proc_events: std::sync::OnceLock::new(),
        });
        e.sync_registry(registry);
        Ok(e)
    }

    /// Kernel requests for a listener in another network namespace go to
    /// `request` from now on.
    pub fn on_netns_request(&self, request: impl Fn(i32, u64) + Send + Sync + 'static) {
        let _ = self.netns_requests.set(Box::new(request));
    }

    /// The kernel's exec, fork and exit events of workload processes go to
    /// `sink` from now on.
    pub fn on_proc_event(&self, sink: impl Fn(tether_attest::ProcEvent) + Send + Sync + 'static) {
        let _ = self.proc_events.set(Box::new(sink));
    }

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn kernel(&self) -> &Enforcer {
        &self.kernel
    }

    /// Installs the registry's Services in the kernel (adding new keys
    /// before removing old ones, so no protected address is ever open) and
    /// recompiles every process.
    pub fn sync_registry(&self, reg: Arc<Registry>) {
        let mut c = Self::lock(&self.compiled);
        c.registry = reg.clone();
        c.names.assign(&reg);
        let wanted = decide::service_keys(&reg, &c.names, &resolve_host);
        for (k, (id, flags)) in &wanted {
            if let Err(e) = self.kernel.set_service_flags(*k, *id, *flags) {
                tracing::error!(error = %e, "installing Service in the kernel failed");
            }
        }
        let mut stale: Vec<DstPrefix> = c
            .installed
            .iter()
            .filter(|k| !wanted.contains_key(k))
            .copied()
            .collect();
        // Entries a previous agent installed (adopted maps) that no Service
        // covers any more.
        if let Ok(existing) = self.kernel.services() {
            stale.extend(
                existing
                    .into_iter()
                    .map(|(k, _)| k)
                    .filter(|k| !wanted.contains_key(k)),
            );
        }
        for k in stale {
            let _ = self.kernel.remove_service(k);
        }
        c.installed = wanted.into_keys().collect();
        // Services of this host: their ports are protected at every local
        // destination (see decide::local_ports).
        let host = Self::lock(&self.host_addrs).clone();
        let ports = decide::local_ports(&reg, &c.names, &host);
        for ((proto, p), (id, flags, _)) in &ports {
            if let Err(e) = self.kernel.set_local_port(*proto, *p, *id, *flags) {
                tracing::error!(port = p, error = %e, "protecting a Service's port of this host failed");
            }
        }
        let mut stale: Vec<(Proto, u16)> = c
            .local_ports
            .iter()
            .filter(|k| !ports.contains_key(k))
            .copied()
            .collect();
        if let Ok(existing) = self.kernel.local_ports() {
            stale.extend(existing.into_iter().filter(|k| !ports.contains_key(k)));
        }
        for (proto, p) in stale {
            let _ = self.kernel.remove_local_port(proto, p);
        }
        c.local_ports = ports.into_keys().collect();
        drop(c);
        self.recompile_all();
    }

    /// This host's addresses changed (netlink): the hooks treat them as local
    /// destinations, and Services naming one of them protect their ports at
    /// every local address.
    pub fn set_host_addrs(&self, addrs: Vec<IpAddr>) {
        if let Err(e) = self.kernel.set_local_addrs(&addrs) {
            tracing::error!(error = %e, "updating this host's addresses in the kernel failed");
        }
        let changed = {
            let mut h = Self::lock(&self.host_addrs);
            let changed = *h != addrs;
            *h = addrs;
            changed
        };
        if changed {
            let reg = Self::lock(&self.compiled).registry.clone();
            self.sync_registry(reg);
        }
    }

    /// The verdicts `who` gets now (see decide::evaluate).
    fn evaluate(
        &self,
        info: Option<&ProcessInfo>,
        identities: &[String],
        spiffe_ids: &[String],
    ) -> decide::Verdicts {
        let c = Self::lock(&self.compiled);
        decide::evaluate(
            &c.registry,
            &c.names,
            &self.node,
            (self.clock)(),
            &Subject {
                info,
                identities,
                spiffe_ids,
            },
        )
    }

    /// A process was attested (again): give it a subject and verdicts.
    /// `exec` (exec id, start) must come from the exec record read before
    /// the attestation.
    pub fn process_updated(
        &self,
        info: &ProcessInfo,
        exec: (ExecId, u64),
        identities: Vec<String>,
        spiffe_ids: Vec<String>,
    ) {
        // The agent's own entry (PROC_AGENT) must never be replaced by an
        // ordinary subject.
        if info.pid as u32 == std::process::id() {
            return;
        }
        let (exec_id, start_ns) = exec;
        let decide::Verdicts {
            allowed,
            conditional,
            inject,
        } = self.evaluate(Some(info), &identities, &spiffe_ids);
        let expires = tether_kernel::boottime_ns().saturating_add(CONDITIONAL_TTL_NS);
        let expiry = |svc: &u32| {
            if conditional.contains(svc) {
                expires
            } else {
                0
            }
        };
        let mut procs = Self::lock(&self.procs);
        let same = procs.get(&info.pid).is_some_and(|p| {
            p.start_time == info.start_time
                && p.exec_id == exec_id
                && p.start_ns == start_ns
                && p.identities == identities
                && p.info.selectors() == info.selectors()
                && p.info.exec == info.exec
        });
        if same
            && let Some(p) = procs
                .get(&info.pid)
                .filter(|p| p.allowed == allowed && p.inject == inject)
        {
            // Unchanged: only the conditional verdicts need a new expiry.
            for svc in &conditional {
                if let Some(rule) = p.allowed.get(svc)
                    && let Err(e) = self.kernel.set_verdict_with(
                        p.subject,
                        *svc,
                        true,
                        p.inject.contains(svc),
                        *rule,
                        expires,
                    )
                {
                    tracing::error!(error = %e, "refreshing a conditional verdict failed");
                }
            }
            return;
        }
        // A new subject for every change, so verdicts of the old view can
        // never apply to the new one.
        let subject = self.next_subject.fetch_add(1, Ordering::Relaxed);
        for (svc, rule) in &allowed {
            if let Err(e) = self.kernel.set_verdict_with(
                subject,
                *svc,
                true,
                inject.contains(svc),
                *rule,
                expiry(svc),
            ) {
                tracing::error!(error = %e, "writing verdict failed");
            }
        }
        if let Err(e) = self
            .kernel
            .set_process(info.pid as u32, subject, exec_id, start_ns)
        {
            tracing::error!(error = %e, pid = info.pid, "writing process subject failed");
        }
        if let Some(old) = procs.insert(
            info.pid,
            ProcEntry {
                start_time: info.start_time,
                exec_id,
                start_ns,
                subject,
                info: info.clone(),
                identities,
                spiffe_ids,
                allowed,
                inject,
            },
        ) {
            for svc in old.allowed.keys() {
                let _ = self.kernel.remove_verdict(old.subject, *svc);
            }
            self.retire(old);
        }
        drop(procs);
        self.verdicts_changed.send_modify(|v| *v += 1);
    }

    /// Whether the kernel holds a current entry for `tgid` (attested for
    /// the image it runs now), and its subject.
    pub fn kernel_state(&self, tgid: u32) -> serde_json::Value {
        let entry = self.kernel.process(tgid).ok().flatten();
        let exec_id = self.kernel.exec_id(tgid).ok();
        match entry {
            Some(p) if Some(p.exec_id) == exec_id => {
                serde_json::json!({ "attested": true, "subject": p.subject })
            }
            _ => serde_json::json!({ "attested": false }),
        }
    }

    /// Follows changes of process entries (see [`Self::held_verdict`]).
    pub fn subscribe_verdicts(&self) -> watch::Receiver<u64> {
        self.verdicts_changed.subscribe()
    }

    /// The verdict for a held connection, once the agent has attested the
    /// exact process instance and image that made it: same pid, start time
    /// (clock ticks) and exec id. None until then.
    pub fn held_verdict(
        &self,
        pid: i32,
        exec_id: ExecId,
        start_time: u64,
        service_id: u32,
    ) -> Option<HeldDecision> {
        let procs = Self::lock(&self.procs);
        let p = procs
            .get(&pid)
            .filter(|p| p.exec_id == exec_id && p.start_time == start_time)?;
        let rule = p.allowed.get(&service_id).copied();
        let inject = p.inject.contains(&service_id);
        let proc = Some((p.info.clone(), p.spiffe_ids.clone()));
        drop(procs);
        let c = Self::lock(&self.compiled);
        Some(match rule {
            Some(r) => HeldDecision {
                allow: true,
                inject,
                rule: c.names.rule_name(r),
                reason: None,
                proc,
            },
            None => HeldDecision {
                allow: false,
                inject: false,
                rule: DEFAULT_DENY.to_string(),
                // No identity because of the exec checks? Say so.
                reason: proc.as_ref().and_then(|(info, ids)| {
                    ids.is_empty()
                        .then(|| crate::state::verify::refusal(&info.exec, &[]))
                        .flatten()
                }),
                proc,
            },
        })
    }

    fn retire(&self, old: ProcEntry) {
        let mut r = Self::lock(&self.retired);
        if r.len() >= RETIRED {
            r.pop_front();
        }
        r.push_back((old.subject, old.info, old.spiffe_ids));
    }

    /// After the first full rescan of a restarted agent: every live process
    /// has its new subject, so the previous agent's entries can go. Until
    /// now they kept protected destinations working without a gap.
    pub fn collect_adopted(&self) {
        let live: HashMap<i32, u32> = Self::lock(&self.procs)
            .iter()
            .map(|(p, e)| (*p, e.subject))
            .collect();
        let subjects: HashSet<u32> = live.values().copied().collect();
        let mut removed = (0, 0);
        if let Ok(procs) = self.kernel.processes() {
            let me = std::process::id();
            for (tgid, p) in procs {
                if tgid != me && live.get(&(tgid as i32)) != Some(&p.subject) {
                    let _ = self.kernel.remove_process(tgid);
                    removed.0 += 1;
                }
            }
        }
        if let Ok(verdicts) = self.kernel.verdicts() {
            for v in verdicts {
                if !subjects.contains(&v.subject) {
                    let _ = self.kernel.remove_verdict(v.subject, v.service_id);
                    removed.1 += 1;
                }
            }
        }
        if removed != (0, 0) {
            tracing::info!(
                processes = removed.0,
                verdicts = removed.1,
                "removed entries left by the previous agent"
            );
        }
    }

    pub fn process_removed(&self, pid: i32) {
        let old = Self::lock(&self.procs).remove(&pid);
        if let Some(old) = old {
            let _ = self.kernel.remove_process(pid as u32);
            for svc in old.allowed.keys() {
                let _ = self.kernel.remove_verdict(old.subject, *svc);
            }
            self.retire(old);
            self.verdicts_changed.send_modify(|v| *v += 1);
        }
    }

    /// Re-evaluates every process that holds an identity (registry change,
    /// or time passing for conditional policies). Processes without one have
    /// no verdicts that could change; when they gain an identity the tracker
    /// re-attests them.
    pub fn recompile_all(&self) {
        type Entry = (ProcessInfo, (ExecId, u64), Vec<String>, Vec<String>);
        let snapshot: Vec<Entry> = Self::lock(&self.procs)
            .values()
            .filter(|p| !p.identities.is_empty())
            .map(|p| {
                (
                    p.info.clone(),
                    (p.exec_id, p.start_ns),
                    p.identities.clone(),
                    p.spiffe_ids.clone(),
                )
            })
            .collect();
        for (info, exec, ids, sids) in snapshot {
            self.process_updated(&info, exec, ids, sids);
        }
    }

    pub fn has_conditions(&self) -> bool {
        Self::lock(&self.compiled)
            .registry
            .policies
            .iter()
            .any(|p| p.condition.is_some())
    }

    /// The meshed Service covering `dst` (TCP), if any: what a tunnel
    /// request may name.
    pub fn meshed_service_at(
        &self,
        dst: std::net::SocketAddr,
    ) -> Option<crate::state::registry::AgentService> {
        // The lookup a client's kernel on another host made (the Services
        // map, not this host's local ports), so the Service judged here is
        // the one that client's kernel chose.
        let (id, flags) = self
            .kernel
            .remote_service_for(dst, Proto::Tcp)
            .ok()
            .flatten()?;
        if !flags.mesh {
            return None;
        }
        self.service_by_id(id).filter(|s| s.spec.mesh.is_some())
    }

    /// The Service behind a kernel service id.
    pub fn service_by_id(&self, id: u32) -> Option<crate::state::registry::AgentService> {
        let c = Self::lock(&self.compiled);
        let name = c.names.service_names.get(&id)?;
        c.registry
            .services
            .iter()
            .find(|s| &s.name == name)
            .cloned()
    }

    /// Ingress policy: may a peer presenting `peer_id` reach `service`
    /// now? Ok(rule name). See decide::ingress.
    pub fn ingress(&self, service: &str, peer_id: &str) -> Result<String, decide::IngressRefusal> {
        let c = Self::lock(&self.compiled);
        decide::ingress(&c.registry, &c.names, (self.clock)(), service, peer_id)
    }

    /// Explains the verdict for a process or identity and a destination.
    pub fn check(
        &self,
        info: Option<&ProcessInfo>,
        identities: &[String],
        spiffe_ids: &[String],
        dst: std::net::SocketAddr,
        proto: Proto,
    ) -> serde_json::Value {
        let reg = Self::lock(&self.compiled).registry.clone();
        // What the connect hook would find, not a second lookup of our own.
        let found = self.kernel.service_for(dst, proto).ok().flatten();
        let service = found.and_then(|(id, _)| self.service_by_id(id));
        let c = Self::lock(&self.compiled);
        decide::explain(
            &reg,
            &c.names,
            &self.node,
            (self.clock)(),
            &Subject {
                info,
                identities,
                spiffe_ids,
            },
            service.as_ref().map(|s| s.name.as_str()),
        )
    }

    /// Reads kernel decision events and writes audit records; runs on its
    /// own thread so a burst cannot delay the async runtime.
    pub fn spawn_event_pump(self: &Arc<Self>) {
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("audit-events".into())
            .spawn(move || {
                let mut reader = match me.kernel.events() {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read kernel events; no audit records");
                        return;
                    }
                };
                loop {
                    // The kernel wakes us only when the buffer fills (see the
                    // submit in tether.bpf.c); otherwise drain every 20 ms.
                    let batch = reader
                        .wait(std::time::Duration::from_millis(20))
                        .and_then(|_| reader.drain());
                    match batch {
                        Ok(b) => {
                            for ev in b {
                                if ev.hook == tether_kernel::Hook::Proc {
                                    if let Some(sink) = me.proc_events.get() {
                                        sink(proc_event(&ev));
                                    }
                                } else if ev.hook == tether_kernel::Hook::Netns {
                                    // Not a decision: a connection waits
                                    // for a listener in its namespace.
                                    if let Some(request) = me.netns_requests.get() {
                                        request(ev.tgid as i32, ev.socket_cookie);
                                    }
                                } else if ev.decision == Decision::Held {
                                    me.kernel_held(ev);
                                } else {
                                    me.audit_event(&ev);
                                }
                            }
                            me.sweep_holds();
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "reading kernel events failed");
                            std::thread::sleep(std::time::Duration::from_millis(200));
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the audit event thread");
        }
    }

    /// Who made the decision: the process entry whose subject the kernel
    /// used (never a later view of the same pid, which may be another image).
    fn decided_by(&self, ev: &tether_kernel::Event) -> Option<(ProcessInfo, Vec<String>)> {
        if ev.subject == 0 {
            return None;
        }
        let current = Self::lock(&self.procs)
            .get(&(ev.tgid as i32))
            .filter(|p| p.subject == ev.subject)
            .map(|p| (p.info.clone(), p.spiffe_ids.clone()));
        current.or_else(|| {
            Self::lock(&self.retired)
                .iter()
                .rev()
                .find(|(s, _, _)| *s == ev.subject)
                .map(|(_, i, ids)| (i.clone(), ids.clone()))
        })
    }

    fn audit_event(&self, ev: &tether_kernel::Event) {
        use tether_kernel::{Hook, Reason};
        if ev.hook == Hook::Taint {
            return self.audit_taint(ev);
        }
        let c = Self::lock(&self.compiled);
        let service = c
            .names
            .service_names
            .get(&ev.service_id)
            .cloned()
            .unwrap_or_default();
        let rule = match (ev.decision, ev.reason) {
            (_, Reason::Tainted | Reason::Traced | Reason::ExeChanged) => "exec-check".to_string(),
            (_, Reason::Borrowed) => "borrowed-socket".to_string(),
            (_, Reason::RawSocket) => "raw-socket".to_string(),
            (_, Reason::Expired) => "expired".to_string(),
            (_, Reason::Unguarded) => "unguarded".to_string(),
            (
                Decision::Allow
                | Decision::Mesh
                | Decision::MeshDown
                | Decision::Inject
                | Decision::InjectDown,
                _,
            ) => c.names.rule_name(ev.rule),
            (Decision::Unattested | Decision::Held, _) => "unattested".to_string(),
            (Decision::Deny | Decision::Taint, _) => DEFAULT_DENY.to_string(),
            (Decision::Plaintext, _) => "permissive".to_string(),
        };
        drop(c);
        let verdict = match ev.decision {
            Decision::Allow => "allow",
            // The tunnel's own record follows, naming the peer.
            Decision::Mesh => "allow-mesh",
            Decision::MeshDown => "deny-mesh-unavailable",
            // The injector's own record follows, naming the binding.
            Decision::Inject => "allow-inject",
            Decision::InjectDown => "deny-inject-unavailable",
            Decision::Deny | Decision::Taint => "deny",
            Decision::Unattested => "deny-unattested",
            // Only for a held connection the agent never received.
            Decision::Held => "held-unclaimed",
            // `dst` is the peer that sent plaintext to a permissive Service.
            Decision::Plaintext => "allow-plaintext",
        };
        let mut extra = serde_json::Map::new();
        let reason = match ev.reason {
            Reason::None => None,
            Reason::Tainted => Some(format!(
                "marked since its exec ({}) by pid {}",
                ev.flags.names().join(", "),
                ev.aux
            )),
            Reason::Traced => Some(format!("being traced by pid {}", ev.aux)),
            Reason::ExeChanged => Some("its exe is no longer the file it executed".to_string()),
            Reason::Borrowed => Some(format!(
                "a connection made by pid {}, which this process may not use",
                ev.aux2
            )),
            Reason::RawSocket => Some(format!(
                "raw or packet socket (family {}, type {}) in the enforced cgroup",
                ev.aux2 >> 16,
                ev.aux2 & 0xffff
            )),
            Reason::Expired => {
                Some("a conditional verdict the agent did not refresh in time".to_string())
            }
            Reason::Unguarded => Some(
                "no room in the kernel to record who made the connection (fails closed)"
                    .to_string(),
            ),
            other => Some(format!("{other:?}")),
        };
        if matches!(ev.reason, Reason::Tainted | Reason::Traced) && ev.aux != 0 && ev.aux != ev.tgid
        {
            extra.insert("tracer".into(), self.actor(ev.aux));
        }
        if ev.reason == Reason::Borrowed {
            extra.insert("owner".into(), serde_json::json!(ev.aux2));
        }
        let proc = self.decided_by(ev);
        // A process refused because it holds no identity: say why the exec
        // checks kept it from one, when they did.
        let reason = reason.or_else(|| match (&proc, ev.decision) {
            (Some((info, ids)), Decision::Deny) if ids.is_empty() => {
                crate::state::verify::refusal(&info.exec, &[])
            }
            _ => None,
        });
        self.emit(Audit {
            tgid: ev.tgid,
            tid: ev.pid,
            comm: ev.comm.clone(),
            uid: ev.uid,
            gid: ev.gid,
            proc,
            dst: std::net::SocketAddr::new(ev.addr, ev.port),
            proto: ev.proto,
            hook: format!("{:?}", ev.hook).to_lowercase(),
            service,
            verdict,
            rule,
            held: ev.decision == Decision::Held,
            reason,
            extra,
            executed: (!ev.executed.is_empty()).then(|| ev.executed.clone()),
        });
    }

    /// Who a pid is, as far as /proc tells now (for naming a tracer or the
    /// target of a mark; unverified, like any unattested process).
    fn actor(&self, pid: u32) -> serde_json::Value {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        serde_json::json!({ "pid": pid, "exe": exe, "comm": comm.trim() })
    }

    /// A process was marked: someone traced it, wrote its memory or
    /// re-pointed its exe. One record naming both, and whether the one who
    /// did it was killed.
    fn audit_taint(&self, ev: &tether_kernel::Event) {
        use tether_kernel::Reason;
        let (what, killed) = match ev.reason {
            Reason::Killed => (Reason::from_code(ev.aux2), true),
            r => (Some(r), false),
        };
        let how = match what {
            Some(Reason::Ptrace) => "ptrace attach",
            Some(Reason::MemWrite) => "process_vm_writev",
            Some(Reason::MemRead) => "process_vm_readv",
            Some(Reason::ProcMem) => "/proc/PID/mem opened",
            Some(Reason::ProcEnviron) => "/proc/PID/environ opened",
            Some(Reason::SetMm) => "prctl(PR_SET_MM)",
            Some(Reason::Compat) => "a watched system call made through the 32-bit entry",
            Some(Reason::Getfd) => "pidfd_getfd took a descriptor of another process",
            _ => "unknown",
        };
        let reason = match what {
            // No target: the caller itself was the problem.
            Some(Reason::Compat) => format!("{how}: the caller was killed"),
            Some(Reason::Getfd) => format!("{how} (pid {}): the caller was killed", ev.aux),
            _ => format!(
                "{how}: pid {} has no authority until it execs again",
                ev.aux
            ),
        };
        let mut rec = serde_json::json!({
            "event": "taint",
            "verdict": "deny",
            "pid": ev.tgid,
            "tid": ev.pid,
            "comm": ev.comm,
            "uid": ev.uid,
            "exe": std::fs::read_link(format!("/proc/{}/exe", ev.tgid))
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            "executed": ev.executed,
            "target": self.actor(ev.aux),
            "reason": reason,
        });
        if killed {
            rec["killed"] = serde_json::json!(true);
        }
        self.metrics.connect_decision("taint", "unattested", "");
        self.publish(rec);
    }

    /// A kernel event for a held connection: the hold listener writes the
    /// audit record when it decides; remember the event until then.
    fn kernel_held(&self, ev: tether_kernel::Event) {
        let mut holds = Self::lock(&self.holds);
        match holds.remove(&ev.socket_cookie) {
            Some((_, None)) => {} // already decided and recorded
            _ => {
                holds.insert(ev.socket_cookie, (std::time::Instant::now(), Some(ev)));
            }
        }
    }

    /// Held connections nobody decided within a few seconds get their own
    /// record; stale "decided" marks are dropped.
    fn sweep_holds(&self) {
        let now = std::time::Instant::now();
        let mut unclaimed = Vec::new();
        Self::lock(&self.holds).retain(|_, (seen, ev)| match ev {
            Some(_) if now.duration_since(*seen) >= HOLD_UNCLAIMED_AFTER => {
                unclaimed.extend(ev.take());
                false
            }
            None => now.duration_since(*seen) < HOLD_FORGET_AFTER,
            Some(_) => true,
        });
        for ev in unclaimed {
            self.metrics.held_connection("unclaimed");
            self.audit_event(&ev);
        }
    }

    /// The one audit record of a held connection, from the hold listener.
    pub fn audit_held(&self, rec: &tether_kernel::HeldConnection, d: &HeldDecision) {
        let kernel_event = {
            let mut holds = Self::lock(&self.holds);
            match holds.remove(&rec.socket_cookie) {
                Some((_, Some(ev))) => Some(ev),
                _ => {
                    holds.insert(rec.socket_cookie, (std::time::Instant::now(), None));
                    None
                }
            }
        };
        let service = Self::lock(&self.compiled)
            .names
            .service_names
            .get(&rec.service_id)
            .cloned()
            .unwrap_or_default();
        let comm = match (&kernel_event, &d.proc) {
            (Some(ev), _) => ev.comm.clone(),
            (None, Some((info, _))) => info.name.clone(),
            (None, None) => std::fs::read_to_string(format!("/proc/{}/comm", rec.tgid))
                .unwrap_or_default()
                .trim()
                .to_string(),
        };
        // The kernel event names the hook; without it, the flow's family
        // is the best guess (an IPv4-mapped connect6 reads as connect4).
        let hook = match &kernel_event {
            Some(ev) => format!("{:?}", ev.hook).to_lowercase(),
            None if rec.flow_v6 => "connect6".to_string(),
            None => "connect4".to_string(),
        };
        self.emit(Audit {
            tgid: rec.tgid,
            tid: rec.pid,
            comm,
            uid: rec.uid,
            gid: kernel_event
                .as_ref()
                .map_or_else(|| d.proc.as_ref().map_or(0, |(i, _)| i.gid), |e| e.gid),
            proc: d.proc.clone(),
            dst: rec.original_dst,
            proto: Proto::Tcp,
            hook,
            service,
            verdict: if d.allow { "allow" } else { "deny" },
            rule: d.rule.clone(),
            held: true,
            reason: d.reason.clone(),
            extra: serde_json::Map::new(),
            executed: None,
        });
    }

    fn emit(&self, a: Audit) {
        let (exe, sha, cgroup, spiffe) = match &a.proc {
            Some((i, ids)) => (
                i.exe_path.clone(),
                i.sha256.clone(),
                i.cgroup.clone(),
                serde_json::json!(ids),
            ),
            // Unattested: what /proc says now, best effort and unverified.
            None => (
                std::fs::read_link(format!("/proc/{}/exe", a.tgid))
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                String::new(),
                String::new(),
                serde_json::json!("unattested"),
            ),
        };
        // What the kernel recorded as executed: the truth when /proc's exe
        // link was re-pointed (a forgery shows up here as a mismatch).
        let executed = a
            .proc
            .as_ref()
            .and_then(|(i, _)| i.exec.executed.clone())
            .or_else(|| a.executed.clone())
            .or_else(|| {
                self.kernel
                    .exec_record(a.tgid)
                    .ok()
                    .flatten()
                    .map(|r| r.name)
            });
        let time = (self.clock)();
        let mut rec = serde_json::json!({
            "time": time, "node": self.node, "pid": a.tgid, "tid": a.tid, "comm": a.comm,
            "exe": exe, "sha256": sha, "uid": a.uid, "gid": a.gid, "cgroup": cgroup,
            "spiffeId": spiffe, "destination": a.dst.to_string(),
            "protocol": if a.proto == Proto::Udp { "udp" } else { "tcp" },
            "hook": a.hook, "service": a.service, "verdict": a.verdict, "rule": a.rule,
        });
        if a.held {
            rec["held"] = serde_json::json!(true);
        }
        // Which container, as its runtime recorded it (or only the id the
        // cgroup names, when the runtime does not vouch for the process).
        if let Some((i, _)) = &a.proc {
            if let Some(c) = &i.container {
                rec["container"] = serde_json::json!({
                    "id": c.id, "name": c.name, "image": c.image, "runtime": c.runtime,
                });
            } else if let Some(id) = &i.container_id {
                rec["container"] = serde_json::json!({ "id": id });
            }
        }
        if let Some(r) = &a.reason {
            rec["reason"] = serde_json::json!(r);
        }
        if let Some(x) = executed {
            rec["executed"] = serde_json::json!(x);
        }
        if let Some(o) = rec.as_object_mut() {
            o.extend(a.extra);
        }
        if a.hook == "ingress" {
            // Not a local process's connect: the peer is `destination`.
            rec["peer"] = rec["destination"].take();
            for k in [
                "pid", "tid", "comm", "exe", "sha256", "uid", "gid", "cgroup", "spiffeId",
            ] {
                if let Some(o) = rec.as_object_mut() {
                    o.remove(k);
                }
            }
        }
        // "none": attested, but no identity; "unattested": not known.
        let ident = match &a.proc {
            Some((_, ids)) => ids.first().cloned().unwrap_or_else(|| "none".into()),
            None => "unattested".into(),
        };
        self.metrics.connect_decision(a.verdict, &ident, &a.service);
        self.publish(rec);
    }

    /// Writes one audit record (see [`AuditLog::publish`]).
    pub fn publish(&self, rec: serde_json::Value) {
        self.audit.publish(rec)
    }
}

/// One audit record's facts, whichever path decided.
struct Audit {
    tgid: u32,
    tid: u32,
    comm: String,
    uid: u32,
    gid: u32,
    proc: Option<(ProcessInfo, Vec<String>)>,
    dst: std::net::SocketAddr,
    proto: Proto,
    hook: String,
    service: String,
    verdict: &'static str,
    rule: String,
    held: bool,
    reason: Option<String>,
    /// More fields for this kind of record (tracer, owner, ...).
    extra: serde_json::Map<String, serde_json::Value>,
    /// What the kernel's record says the caller executed, as the event
    /// carried it.
    executed: Option<String>,
}

/// Kernel verdicts follow the process table: written when a process is
/// attested (before its SVIDs exist), removed when it goes, recompiled when
/// the registry changes or a time window opens or closes.
impl crate::state::tracker::ProcessObserver for Enforcement {
    fn registry_changed(&self, registry: &Arc<Registry>) {
        self.sync_registry(registry.clone());
    }

    fn process_updated(
        &self,
        info: &ProcessInfo,
        exec: (ExecId, u64),
        identities: Vec<String>,
        spiffe_ids: Vec<String>,
    ) {
        Enforcement::process_updated(self, info, exec, identities, spiffe_ids);
    }

    fn process_removed(&self, pid: i32) {
        Enforcement::process_removed(self, pid);
    }

    fn tick(&self) {
        if self.has_conditions() {
            self.recompile_all();
        }
    }
}

/// Hostnames of Services, resolved now (a failure adds nothing; the next
/// registry sync tries again).
fn resolve_host(h: &str) -> Vec<IpAddr> {
    match std::net::ToSocketAddrs::to_socket_addrs(&(h, 0)) {
        Ok(addrs) => addrs.map(|a| a.ip()).collect(),
        Err(e) => {
            tracing::warn!(hostname = %h, error = %e, "cannot resolve Service hostname; retrying later");
            Vec::new()
        }
    }
}

/// A [`tether_kernel::Hook::Proc`] event as the tracker's process event.
fn proc_event(ev: &tether_kernel::Event) -> tether_attest::ProcEvent {
    use tether_attest::ProcEvent;
    let pid = ev.tgid as i32;
    match ev.aux {
        tether_kernel::PROC_EV_FORK => ProcEvent::Fork {
            parent: ev.aux2 as i32,
            child: pid,
        },
        tether_kernel::PROC_EV_EXIT => ProcEvent::Exit { pid },
        // Exec, and anything newer than this agent: attest it again.
        _ => ProcEvent::Exec { pid },
    }
}
