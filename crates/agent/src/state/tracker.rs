//! Per-process identity: which processes are alive, who they are, and the
//! keys and X.509-SVIDs each matching process holds.
//!
//! Kernel process events (proc connector) drive it: exec and fork attest
//! the process and issue SVIDs; exit drops them at once (the key's memory is
//! cleansed on drop). A periodic rescan repairs anything missed, e.g. after
//! the event socket overflowed. Each process instance gets its own key,
//! generated here; the server only ever sees a CSR.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tether_attest::{Attestor, PidFd, ProcEvent, ProcessInfo};
use tether_spiffe::SpiffeId;
use tokio::sync::{mpsc, watch};

use crate::clock::unix_now;
use crate::identity::Issuer;
pub use crate::identity::{IssueError, MeshSvid, ProcSvid};
use crate::metrics::Metrics;
use crate::state::registry::{AgentIdentity, Registry};

/// What the process table tells the parts that act on processes. The
/// table calls its observers in the order the agent registered them (kernel
/// verdicts first, so they are in place before any SVID exists), and holds
/// no other reference to them: an observer may depend on the table, never
/// the reverse.
pub trait ProcessObserver: Send + Sync {
    /// A new registry, before any process is evaluated against it.
    fn registry_changed(&self, _registry: &Arc<Registry>) {}
    /// A process was attested (again) and matches these identities (names
    /// and SPIFFE IDs); called before any SVID for it is issued. `exec` is
    /// the kernel's (exec id, start) read before the attestation.
    fn process_updated(
        &self,
        _info: &ProcessInfo,
        _exec: (tether_kernel::ExecId, u64),
        _identities: Vec<String>,
        _spiffe_ids: Vec<String>,
    ) {
    }
    /// The process is gone (or lost its identity): its keys are destroyed.
    fn process_removed(&self, _pid: i32) {}
    /// Twice a second, for what changes with time alone (time windows).
    fn tick(&self) {}
    /// The agent is stopping: let go of every per-process key.
    fn shutdown(&self) {}
}

pub struct Tracked {
    pub pidfd: Arc<PidFd>,
    pub info: ProcessInfo,
    /// The registry revision these SVIDs were evaluated against.
    pub evaluated_rev: i64,
    pub svids: Vec<Arc<ProcSvid>>,
    /// An exit watcher is polling this instance's pidfd.
    pub watched: bool,
    /// The kernel exec id and process start the verdicts were written for.
    pub exec: Option<(tether_kernel::ExecId, u64)>,
}

/// A process instance as the table holds it now (see [`Tracker::current`]).
#[derive(Clone)]
pub struct Current {
    pub pid: i32,
    pub start_time: u64,
    pub uid: u32,
    pub gid: u32,
    pub exe_path: String,
    pub svids: Vec<Arc<ProcSvid>>,
}

pub struct Tracker {
    pub attestor: Attestor,
    /// The kernel's exec records (and marks): what each process really
    /// executed. None only where the programs could not be loaded, and then
    /// no process holds an identity.
    pub kernel: Option<Arc<tether_kernel::Enforcer>>,
    /// The agent's own mount namespace (inode): the host's view. A process
    /// in another one fails the `mount-namespace` exec check. 0 when it
    /// cannot be read, and then every process does.
    host_mnt_ns: u32,
    procs: Mutex<HashMap<i32, Tracked>>,
    /// Serializes evaluation per pid so the event path and a Workload API
    /// call for the same process do not both issue.
    pid_locks: Mutex<HashMap<i32, Arc<tokio::sync::Mutex<()>>>>,
    pub registry: watch::Receiver<Arc<Registry>>,
    /// Keys and their signing.
    issuer: Issuer,
    /// Told about every change, in this order (see [`ProcessObserver`]).
    observers: Vec<Arc<dyn ProcessObserver>>,
    /// Set once the agent stops: nothing is attested or issued after it.
    stopped: watch::Sender<bool>,
    /// Pids with a rotation in flight, so the 1 s rotation tick does not
    /// start a second one.
    rotating: Mutex<std::collections::HashSet<i32>>,
    /// Bumped whenever any process's SVIDs change; Workload API streams
    /// follow it.
    pub changes: watch::Sender<u64>,
    metrics: Arc<Metrics>,
}

impl Tracker {
    pub fn new(
        registry: watch::Receiver<Arc<Registry>>,
        signer: Arc<dyn crate::identity::Signer>,
        metrics: Arc<Metrics>,
        kernel: Option<Arc<tether_kernel::Enforcer>>,
        hash_limits: tether_attest::HashLimits,
        host_pid: Option<i32>,
        observers: Vec<Arc<dyn ProcessObserver>>,
    ) -> Arc<Self> {
        // The host's mount namespace: the agent's own, or that of the
        // process named to stand for the host when the agent is contained.
        let host = host_pid.map_or_else(|| "self".to_string(), |p| p.to_string());
        Arc::new(Tracker {
            attestor: Attestor::with_limits(hash_limits).with_host_pid(host_pid),
            kernel,
            host_mnt_ns: std::fs::metadata(format!("/proc/{host}/ns/mnt"))
                .map(|m| std::os::unix::fs::MetadataExt::ino(&m) as u32)
                .unwrap_or(0),
            procs: Mutex::new(HashMap::new()),
            pid_locks: Mutex::new(HashMap::new()),
            registry,
            issuer: Issuer::new(signer, metrics.clone()),
            rotating: Mutex::new(Default::default()),
            observers,
            stopped: watch::channel(false).0,
            changes: watch::channel(0).0,
            metrics,
        })
    }

    fn procs(&self) -> std::sync::MutexGuard<'_, HashMap<i32, Tracked>> {
        self.procs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pid_lock(&self, pid: i32) -> Arc<tokio::sync::Mutex<()>> {
        self.pid_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(pid)
            .or_default()
            .clone()
    }

    fn update_gauges(&self) {
        let procs = self.procs();
        self.metrics.tracked_processes.set(procs.len() as i64);
        self.metrics
            .process_svids
            .set(procs.values().map(|t| t.svids.len() as i64).sum());
    }

    /// SVIDs currently held for the process behind `pidfd`, if it is the
    /// tracked instance (same start time).
    pub fn svids_of(&self, pid: i32, start_time: u64) -> Option<Vec<Arc<ProcSvid>>> {
        let procs = self.procs();
        let t = procs.get(&pid)?;
        (t.info.start_time == start_time).then(|| t.svids.clone())
    }

    /// The tracked instance behind `pid`, if its entry still describes it:
    /// the kernel's exec record for `pid` is the one the entry was attested
    /// for (same process, same image), nothing has traced or written into
    /// it since, the process is alive, and the entry was evaluated against
    /// the registry in force. None means "attest again", never "allowed".
    pub fn current(&self, pid: i32) -> Option<Current> {
        let rec = self.exec_record(pid)?;
        if rec.flags.tainted() {
            return None;
        }
        let revision = self.registry.borrow().revision;
        let procs = self.procs();
        let t = procs.get(&pid)?;
        let same = t.exec == Some((tether_kernel::ExecId(rec.exec_id), rec.start_ns))
            && t.evaluated_rev == revision
            && t.pidfd.is_alive();
        same.then(|| Current {
            pid,
            start_time: t.info.start_time,
            uid: t.info.uid,
            gid: t.info.gid,
            exe_path: t.info.exe_path.clone(),
            svids: t.svids.clone(),
        })
    }

    /// Attests a pid on the blocking pool without tracking it (admin
    /// queries), with the kernel's exec checks applied.
    pub async fn attest_pid(self: &Arc<Self>, pid: i32) -> Result<ProcessInfo, String> {
        let fd = Arc::new(PidFd::open(pid).map_err(|e| format!("pid {pid}: {e}"))?);
        self.attest_checked(fd)
            .await
            .map(|(info, _)| info)
            .map_err(|e| e.to_string())
    }

    /// The (exec id, process start) the tracked entry of `pid` was
    /// attested for: whose SVIDs it holds.
    pub fn exec_of(&self, pid: i32) -> Option<(u64, u64)> {
        self.procs()
            .get(&pid)
            .and_then(|t| t.exec)
            .map(|(id, start)| (id.0, start))
    }

    /// The exec record of `pid`, if the kernel has one.
    pub fn exec_record(&self, pid: i32) -> Option<tether_kernel::ExecRecord> {
        let k = self.kernel.as_ref()?;
        u32::try_from(pid)
            .ok()
            .and_then(|p| k.exec_record(p).ok().flatten())
    }

    /// Attests the process and applies the exec checks of its kernel
    /// record, read before and after the /proc reads: if the process exec'd
    /// (or the pid changed hands) in between, the reads may mix two images,
    /// so it is attested again; a process that keeps exec'ing is refused,
    /// never guessed. Returns the record the result belongs to.
    async fn attest_checked(
        self: &Arc<Self>,
        pidfd: Arc<PidFd>,
    ) -> Result<(ProcessInfo, Option<tether_kernel::ExecRecord>), EnsureError> {
        let pid = pidfd.pid();
        let key =
            |r: &Option<tether_kernel::ExecRecord>| r.as_ref().map(|r| (r.exec_id, r.start_ns));
        let mut before = self.exec_record(pid);
        for _ in 0..3 {
            let access = crate::state::verify::file_access(before.as_ref());
            let me = self.clone();
            let pfd = pidfd.clone();
            let mut info =
                tokio::task::spawn_blocking(move || me.attestor.attest_with(&pfd, access))
                    .await
                    .map_err(|e| EnsureError::Internal(e.to_string()))?
                    .map_err(|e| {
                        // A process that exited before we looked is not an error.
                        if !matches!(e, tether_attest::AttestError::Exited { .. }) {
                            self.metrics.attestation_errors.inc();
                        }
                        EnsureError::Attest(e.to_string())
                    })?;
            let after = self.exec_record(pid);
            if key(&after) == key(&before) {
                info.exec = if self.kernel.is_some() {
                    crate::state::verify::exec_check(
                        after.as_ref(),
                        &info,
                        access,
                        self.host_mnt_ns,
                    )
                } else {
                    tether_attest::ExecCheck {
                        blocking: vec!["the agent has no kernel exec records".into()],
                        ..tether_attest::ExecCheck::default()
                    }
                };
                return Ok((info, after));
            }
            before = after;
        }
        Err(EnsureError::Attest(format!(
            "process {pid} exec'd again each time it was attested; not guessing which image it runs"
        )))
    }

    /// How many SVIDs the process with this pid holds (any instance).
    pub fn svid_count(&self, pid: i32) -> usize {
        self.procs().get(&pid).map_or(0, |t| t.svids.len())
    }

    pub fn snapshot(&self) -> Vec<(ProcessInfo, Vec<Arc<ProcSvid>>)> {
        let procs = self.procs();
        let mut v: Vec<_> = procs
            .values()
            .filter(|t| !t.svids.is_empty())
            .map(|t| (t.info.clone(), t.svids.clone()))
            .collect();
        v.sort_by_key(|(i, _)| i.pid);
        v
    }

    /// Exit detection for processes holding keys: the pidfd becomes
    /// readable when the whole process has exited. (The proc connector's
    /// exit event also fires when only the main thread exits.)
    fn watch_exit(self: &Arc<Self>, pid: i32, start_time: u64, pidfd: Arc<PidFd>) {
        struct Fd(Arc<PidFd>);
        impl std::os::fd::AsRawFd for Fd {
            fn as_raw_fd(&self) -> std::os::fd::RawFd {
                use std::os::fd::AsFd as _;
                self.0.as_fd().as_raw_fd()
            }
        }
        // Weak, and ended by shutdown: a watcher of a long-lived process
        // must not keep a stopped agent's table (and keys) alive.
        let t = Arc::downgrade(self);
        let mut stopped = self.stopped();
        tokio::spawn(async move {
            let exited = async {
                // SAFETY: `Fd` owns an Arc of the PidFd, so the descriptor
                // stays open and unchanged for as long as the AsyncFd exists.
                let registered = unsafe {
                    tokio::io::unix::AsyncFd::register_with_interest(
                        Fd(pidfd.clone()),
                        tokio::io::Interest::READABLE,
                    )
                };
                match registered {
                    Ok(afd) => {
                        let _ = afd.readable().await;
                    }
                    Err(e) => {
                        tracing::warn!(pid, error = %e, "cannot poll pidfd; falling back to checking every 200ms");
                        while pidfd.is_alive() {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
            };
            tokio::select! {
                () = exited => {}
                _ = stopped.wait_for(|s| *s) => return,
            }
            let Some(t) = t.upgrade() else { return };
            let same = t
                .procs()
                .get(&pid)
                .is_some_and(|tr| tr.info.start_time == start_time);
            if same {
                t.remove(pid);
            }
        });
    }

    /// The kernel reported an exit: forget the process unless it holds keys
    /// (its exit watcher decides then, see `watch_exit`).
    pub fn exited(&self, pid: i32) {
        let holds_keys = self.procs().get(&pid).is_some_and(|t| t.watched);
        if !holds_keys {
            self.remove(pid);
        }
    }

    /// The agent is stopping: every process's keys are destroyed now, not
    /// whenever the last task that can reach the table lets go of it, and
    /// nothing is issued after. Kernel verdicts stay (they outlive the
    /// agent by design); tunnels and Workload API streams end.
    pub fn shutdown(&self) {
        self.stopped.send_replace(true);
        let all: Vec<Tracked> = self.procs().drain().map(|(_, t)| t).collect();
        drop(all);
        for o in &self.observers {
            o.shutdown();
        }
        self.changes.send_modify(|v| *v += 1);
        self.update_gauges();
    }

    /// Becomes true when the agent stops.
    pub fn stopped(&self) -> watch::Receiver<bool> {
        self.stopped.subscribe()
    }

    /// Forgets a process and destroys its keys.
    pub fn remove(&self, pid: i32) {
        let removed = self.procs().remove(&pid);
        self.pid_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&pid);
        for o in &self.observers {
            o.process_removed(pid);
        }
        if let Some(t) = removed {
            let n = t.svids.len();
            drop(t); // keys are cleansed as the last Arc goes
            if n > 0 {
                self.metrics.svids_destroyed.inc_by(n as u64);
                tracing::info!(pid, svids = n, "process exited; keys destroyed");
                self.changes.send_modify(|v| *v += 1);
            }
            self.update_gauges();
        }
    }

    /// Attests the process and makes sure it holds exactly the SVIDs its
    /// matching identities call for. Returns its info and SVIDs.
    pub async fn ensure(
        self: &Arc<Self>,
        pidfd: Arc<PidFd>,
    ) -> Result<(ProcessInfo, Vec<Arc<ProcSvid>>), EnsureError> {
        let pid = pidfd.pid();
        let lock = self.pid_lock(pid);
        let _guard = lock.lock().await;
        let reg = self.registry.borrow().clone();
        let (info, rec) = self.attest_checked(pidfd.clone()).await?;
        let exec = rec
            .as_ref()
            .map(|r| (tether_kernel::ExecId(r.exec_id), r.start_ns));
        // Already current for this instance and registry revision?
        {
            let procs = self.procs();
            // Every attribute a selector can test must be unchanged (a
            // process may change uid, cgroup or image under the same pid).
            if let Some(t) = procs.get(&pid)
                && t.info.start_time == info.start_time
                && t.evaluated_rev == reg.revision
                && t.exec == exec
                && t.info.exec == info.exec
                && t.info.selectors() == info.selectors()
            {
                return Ok((t.info.clone(), t.svids.clone()));
            }
        }
        let wanted: Vec<AgentIdentity> = reg.matching(&info).into_iter().cloned().collect();
        // Keep SVIDs that still apply to the same instance; issue the rest.
        let mut keep: Vec<Arc<ProcSvid>> = Vec::new();
        {
            let procs = self.procs();
            if let Some(t) = procs.get(&pid)
                && t.info.start_time == info.start_time
                && t.info.sha256 == info.sha256
                && t.info.uid == info.uid
                && t.info.gid == info.gid
            {
                keep = t
                    .svids
                    .iter()
                    .filter(|s| {
                        wanted.iter().any(|w| {
                            w.name == s.identity
                                && w.spiffe_id == s.spiffe_id
                                && w.workload_api == s.workload_api
                        })
                    })
                    .cloned()
                    .collect();
            }
        }
        // Kernel verdicts first, before any server round trip: a held
        // connection waits on them, they must not depend on the server
        // being reachable, and once the process shows up as attested (SVIDs
        // listed, Workload API answers) they are in place.
        if let Some(exec) = exec {
            // Verdicts follow the identities the process matches, whether or
            // not their SVIDs can be issued.
            let names: Vec<String> = wanted.iter().map(|w| w.name.clone()).collect();
            let ids: Vec<String> = wanted.iter().map(|w| w.spiffe_id.to_string()).collect();
            for o in &self.observers {
                o.process_updated(&info, exec, names.clone(), ids.clone());
            }
        }
        let missing: Vec<&AgentIdentity> = wanted
            .iter()
            .filter(|w| !keep.iter().any(|k| k.identity == w.name))
            .collect();
        let mut issued = if missing.is_empty() {
            Vec::new()
        } else {
            self.issuer.issue(&missing).await?
        };
        if !pidfd.is_alive() {
            // It exited while we were issuing: nothing to keep.
            self.remove(pid);
            return Err(EnsureError::Attest(format!("process {pid} exited")));
        }
        let changed = !issued.is_empty() || {
            let procs = self.procs();
            procs.get(&pid).map(|t| t.svids.len()).unwrap_or(0) != keep.len()
        };
        keep.append(&mut issued);
        keep.sort_by(|a, b| a.identity.cmp(&b.identity));
        let watched = {
            let procs = self.procs();
            procs
                .get(&pid)
                .is_some_and(|t| t.watched && t.info.start_time == info.start_time)
        };
        let watch_now = !keep.is_empty() && !watched;
        let replaced = {
            let mut procs = self.procs();
            // Checked under the table's lock, which shutdown drains under:
            // keys issued while the agent stopped are dropped here.
            if *self.stopped.borrow() {
                return Err(EnsureError::Stopped);
            }
            procs.insert(
                pid,
                Tracked {
                    pidfd: pidfd.clone(),
                    info: info.clone(),
                    evaluated_rev: reg.revision,
                    svids: keep.clone(),
                    watched: watched || watch_now,
                    exec,
                },
            )
        };
        if watch_now {
            self.watch_exit(pid, info.start_time, pidfd);
        }
        if let Some(old) = replaced {
            let dropped = old
                .svids
                .iter()
                .filter(|o| !keep.iter().any(|k| Arc::ptr_eq(k, o)))
                .count();
            if dropped > 0 {
                self.metrics.svids_destroyed.inc_by(dropped as u64);
            }
        }
        if changed {
            self.changes.send_modify(|v| *v += 1);
        }
        self.update_gauges();
        Ok((info, keep))
    }

    /// The mesh SVID for `svid` (see [`Issuer::mesh_svid`]).
    pub async fn mesh_svid(&self, svid: &ProcSvid) -> Result<Arc<MeshSvid>, EnsureError> {
        Ok(self.issuer.mesh_svid(svid).await?)
    }

    /// Has the server mint a JWT-SVID for `id` (see [`Issuer::mint_jwt`]).
    pub async fn mint_jwt(&self, id: &SpiffeId, audience: &[String]) -> Result<String, String> {
        self.issuer.mint_jwt(id, audience).await
    }

    /// Pids whose SVIDs passed half their lifetime.
    fn due_for_rotation(&self, now: i64) -> Vec<(i32, Arc<PidFd>)> {
        let mut rotating = self.rotating.lock().unwrap_or_else(|p| p.into_inner());
        let due: Vec<_> = self
            .procs()
            .iter()
            .filter(|(pid, _)| !rotating.contains(pid))
            .filter(|(_, t)| {
                t.svids
                    .iter()
                    .any(|s| now >= s.issued_at + (s.expires_at - s.issued_at) / 2)
            })
            .map(|(pid, t)| (*pid, t.pidfd.clone()))
            .collect();
        rotating.extend(due.iter().map(|(p, _)| *p));
        due
    }

    fn rotation_done(&self, pid: i32) {
        self.rotating
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&pid);
    }

    /// Rotates one process's SVIDs: new keys, new certificates.
    async fn rotate(self: &Arc<Self>, pid: i32, pidfd: Arc<PidFd>) {
        let lock = self.pid_lock(pid);
        let guard = lock.lock().await;
        let now_s = unix_now();
        let due: Vec<AgentIdentity> = {
            let reg = self.registry.borrow().clone();
            let procs = self.procs();
            let Some(t) = procs.get(&pid) else { return };
            t.svids
                .iter()
                .filter(|s| now_s >= s.issued_at + (s.expires_at - s.issued_at) / 2)
                .filter_map(|s| {
                    reg.identities
                        .iter()
                        .find(|i| i.name == s.identity)
                        .cloned()
                })
                .collect()
        };
        drop(guard);
        if due.is_empty() {
            // Its identity went away: re-evaluate, which drops the SVID.
            if let Some(t) = self.procs().get_mut(&pid) {
                t.evaluated_rev = -2;
            }
            let _ = self.ensure(pidfd).await;
            return;
        }
        let refs: Vec<&AgentIdentity> = due.iter().collect();
        match self.issuer.issue(&refs).await {
            Ok(fresh) => {
                let _g = lock.lock().await;
                let mut procs = self.procs();
                if let Some(t) = procs.get_mut(&pid) {
                    for f in fresh {
                        if let Some(slot) = t.svids.iter_mut().find(|s| s.identity == f.identity) {
                            *slot = f;
                            self.metrics.svids_rotated.inc();
                        }
                    }
                }
                drop(procs);
                tracing::info!(pid, "SVIDs rotated");
                self.changes.send_modify(|v| *v += 1);
            }
            Err(e) => tracing::warn!(pid, error = %e, "SVID rotation failed; will retry"),
        }
    }

    /// Attests every process not yet known and forgets dead ones.
    pub async fn rescan(self: &Arc<Self>) {
        let pids = tokio::task::spawn_blocking(tether_attest::list_pids)
            .await
            .unwrap_or_default();
        let dead: Vec<i32> = self
            .procs()
            .iter()
            .filter(|(_, t)| !t.pidfd.is_alive())
            .map(|(p, _)| *p)
            .collect();
        for pid in dead {
            self.remove(pid);
        }
        let me = std::process::id() as i32;
        for pid in pids {
            let known = self.procs().contains_key(&pid);
            if known || pid == me {
                continue;
            }
            if let Ok(fd) = PidFd::open(pid) {
                let _ = self.ensure(Arc::new(fd)).await;
            }
        }
    }

    /// Re-evaluates every tracked process against a new registry.
    pub async fn reevaluate_all(self: &Arc<Self>) {
        let all: Vec<Arc<PidFd>> = self.procs().values().map(|t| t.pidfd.clone()).collect();
        for fd in all {
            if let Err(e) = self.ensure(fd).await {
                tracing::debug!(error = %e, "re-evaluation failed");
            }
        }
        // Bundle changes reach Workload API streams too.
        self.changes.send_modify(|v| *v += 1);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EnsureError {
    #[error("attestation failed: {0}")]
    Attest(String),
    #[error(transparent)]
    Issue(#[from] IssueError),
    #[error("internal: {0}")]
    Internal(String),
    #[error("the agent is stopping")]
    Stopped,
}

/// Reads proc connector events on a dedicated thread (the socket is
/// blocking) and forwards them; when the queue is full events are dropped
/// and a rescan is requested instead, so a fork storm cannot block the
/// kernel socket reader or grow memory without bound.
///
/// The proc connector only answers in the initial network namespace: an
/// agent running in another one (a host modelled as a namespace, a
/// container with its own network) opens its socket from there. Without
/// it the agent still works, on rescans and on-demand attestation (the
/// kernel holds connections of processes it has not seen yet).
pub fn spawn_event_reader(tx: mpsc::Sender<ProcEvent>) -> anyhow::Result<()> {
    // TETHER_PROC_CONNECTOR=off: the kernel's tracepoints only (what an
    // agent gets where the proc connector is unreachable); tests use it.
    if std::env::var_os("TETHER_PROC_CONNECTOR").is_some_and(|v| v == "off") {
        tracing::info!("proc connector off: process events from the kernel's tracepoints only");
        return Ok(());
    }
    let opened = tether_attest::ProcConnector::open().or_else(|first| {
        open_in_initial_netns().map_err(|e| {
            anyhow::anyhow!("opening the kernel proc connector (needs CAP_NET_ADMIN): {first}; from the initial network namespace: {e}")
        })
    });
    let mut conn = match opened {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "no process events: new processes are attested on rescans and on demand");
            return Ok(());
        }
    };
    std::thread::Builder::new()
        .name("proc-events".into())
        .spawn(move || {
            let mut buf = Vec::with_capacity(64);
            loop {
                buf.clear();
                if let Err(e) = conn.recv(&mut buf) {
                    if e.raw_os_error() == Some(libc::ENOBUFS) {
                        buf.push(ProcEvent::Overrun);
                    } else {
                        tracing::error!(error = %e, "proc connector read failed");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                }
                for ev in buf.drain(..) {
                    match tx.try_send(ev) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            let _ = tx.try_send(ProcEvent::Overrun);
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => return,
                    }
                }
            }
        })?;
    Ok(())
}

/// Opens the proc connector from the initial network namespace, on a
/// short-lived thread (setns changes only the calling thread); the socket
/// keeps that namespace.
fn open_in_initial_netns() -> std::io::Result<tether_attest::ProcConnector> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let ns = std::fs::File::open("/proc/1/ns/net")?;
            use std::os::fd::AsRawFd as _;
            // SAFETY: setns(2) on an fd we hold open, for this thread only.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            tether_attest::ProcConnector::open()
        })
        .join()
        .map_err(|_| std::io::Error::other("proc connector thread panicked"))?
    })
}

/// The tracker's main loop: events, periodic rescans, rotation, and
/// registry changes.
pub async fn run(
    tracker: Arc<Tracker>,
    mut events: mpsc::Receiver<ProcEvent>,
    rescan_every: Duration,
) {
    let mut registry = tracker.registry.clone();
    let mut rescan = tokio::time::interval(rescan_every);
    let mut rotation = tokio::time::interval(Duration::from_secs(1));
    let mut conditions = tokio::time::interval(Duration::from_millis(500));
    let me = std::process::id() as i32;
    let mut events_open = true;
    loop {
        tokio::select! {
            ev = events.recv(), if events_open => {
                // No event source (see spawn_event_reader): rescans only.
                let Some(ev) = ev else { events_open = false; continue };
                match ev {
                    ProcEvent::Exit { pid } => tracker.exited(pid),
                    ProcEvent::Exec { pid } | ProcEvent::Fork { child: pid, .. } | ProcEvent::Uid { pid } => {
                        if pid == me { continue; }
                        if let Ok(fd) = PidFd::open(pid) {
                            let t = tracker.clone();
                            // Attest concurrently so one slow hash does not delay
                            // every other process.
                            tokio::spawn(async move {
                                if let Err(e) = t.ensure(Arc::new(fd)).await {
                                    tracing::debug!(pid, error = %e, "attestation after event failed");
                                }
                            });
                        }
                    }
                    ProcEvent::Overrun => {
                        tracing::warn!("process events were lost; rescanning");
                        tracker.rescan().await;
                    }
                }
            }
            _ = rescan.tick() => tracker.rescan().await,
            _ = rotation.tick() => {
                for (pid, fd) in tracker.due_for_rotation(unix_now()) {
                    let t = tracker.clone();
                    tokio::spawn(async move {
                        t.rotate(pid, fd).await;
                        t.rotation_done(pid);
                    });
                }
            }
            r = registry.changed() => {
                if r.is_err() { return; }
                registry.mark_unchanged();
                let reg = registry.borrow().clone();
                for o in &tracker.observers {
                    o.registry_changed(&reg);
                }
                tracker.reevaluate_all().await;
            }
            _ = conditions.tick() => {
                // Time-window conditions change verdicts without any event.
                for o in &tracker.observers {
                    o.tick();
                }
            }
        }
    }
}
