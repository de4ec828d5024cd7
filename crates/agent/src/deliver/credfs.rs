//! The credential filesystem: a FUSE mount (default
//! `/run/tether/credentials`) in which each process sees the files of its
//! own CredentialBindings and nothing else.
//!
//! Why FUSE: every lookup, readdir, open and read reaches the agent with the
//! requesting task's pid, so the view is decided per request by who asks,
//! which no file mode can express (same-uid processes and root see nothing
//! either). The kernel caches nothing that could serve one process's view to
//! another: entries and attributes have a zero timeout, files are opened
//! with direct I/O (no page cache), and a failed lookup leaves no negative
//! entry. Contents live in the agent's memory only.
//!
//! The requester is the process instance the tracker holds for that pid,
//! checked against the kernel's exec record on every request (same process,
//! same image, not traced or written into since); otherwise it is attested
//! again first. A file descriptor passed to another process reads nothing
//! there: reads are attested too.
//!
//! Static secrets are fetched from the server on first read (`FetchSecret`);
//! JWT-SVIDs are minted then, and AWS STS and OAuth2 tokens exchanged by
//! the agent (`exchange`). All are cached per process instance,
//! refreshed on a read after their refresh time (half-life, with jitter;
//! failures back off and keep the last good value until it expires), and
//! dropped when the process exits (a [`ProcessObserver`]). X.509-SVIDs are
//! the tracker's own, rotated by it.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, INodeNo, LockOwner, OpenAccMode, OpenFlags,
    ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen, Request,
};
use serde_json::json;
use tether_manifest::{CredentialSourceSpec, FileFormat, OAuthGrant};
use tether_proto::tether::FetchSecretRequest;
use tether_proto::tether::node_client::NodeClient;
use tonic::transport::Channel;
use zeroize::Zeroizing;

use super::exchange::{self, ExchangeError, Upstream};
use crate::audit::AuditLog;
use crate::clock::unix_now;
use crate::identity::ProcSvid;
use crate::identity::node::NodeConn;
use crate::metrics::Metrics;
use crate::state::registry::{AgentBinding, Registry};
use crate::state::tracker::{Current, ProcessObserver, Tracker};

/// The default mount point.
pub const DEFAULT_DIR: &str = "/run/tether/credentials";
const ROOT: INodeNo = INodeNo::ROOT;
/// Nothing is cached by the kernel: every access asks again.
const NO_CACHE: Duration = Duration::ZERO;
/// A server round trip (or attestation) longer than this fails the request.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// A whole fetch (JWT-SVID, client assertion and token endpoint together)
/// longer than this fails: it holds one of the FUSE workers.
const FETCH_BUDGET: Duration = Duration::from_secs(8);
/// A static secret is fetched again after this long, to follow re-applies.
const STATIC_REFRESH_SECS: i64 = 60;
/// Backoff after a failed refresh, doubling to this.
const MAX_BACKOFF_SECS: i64 = 30;
/// Failing sources remembered at once (one per binding in force).
const MAX_FAILING_SOURCES: usize = 4096;
/// Requests served at once (a slow attestation or fetch holds one: up to
/// 5 s, or 8 s for an exchange; moving those off the workers is to do).
const FUSE_THREADS: usize = 16;
/// Refusal records audited per second at most.
const DENY_AUDITS_PER_SEC: u32 = 200;
/// Refusal records audited per second for one process (thread group), so
/// one process probing in a loop cannot use up the budget of the others.
const DENY_AUDITS_PER_PROC_SEC: u32 = 5;
/// Processes whose refusals are counted in one second; past this, a
/// process not yet counted is audited from the global budget alone.
const DENY_TRACKED_PROCS: usize = 4096;
/// File names ever given an inode (names are interned, never reused).
const MAX_NAMES: usize = 65_536;

/// Per-process credentials fetched so far. Shared by the filesystem and the
/// tracker (as an observer, to drop them at exit) and read by `tether
/// credentials`.
#[derive(Default)]
pub struct Held {
    procs: Mutex<HashMap<i32, Instance>>,
    /// Sources that failed recently, by cache key, shared by every process
    /// bound to them (see [`Failing`]).
    failing: Mutex<HashMap<String, Failing>>,
}

/// A source whose last fetch failed: not asked again, for any process,
/// before `retry_at` (backoff doubling with each failure in a row).
struct Failing {
    retry_at: i64,
    failures: u32,
    why: String,
}

struct Instance {
    start_time: u64,
    by_binding: HashMap<String, Fetched>,
}

struct Fetched {
    value: Zeroizing<Vec<u8>>,
    /// When it was fetched (unix seconds); the file's mtime.
    at: i64,
    /// A read after this fetches it again.
    refresh_at: i64,
    /// Never served after this (None: does not expire).
    expires_at: Option<i64>,
}

impl Fetched {
    /// Whether the value may be served at `now`.
    fn live(&self, now: i64) -> bool {
        self.expires_at.is_none_or(|e| now < e)
    }

    fn value(&self) -> Value {
        Value {
            bytes: self.value.clone(),
            expires_at: self.expires_at,
        }
    }
}

impl Held {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i32, Instance>> {
        self.procs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn failing(&self) -> std::sync::MutexGuard<'_, HashMap<String, Failing>> {
        self.failing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// For `tether credentials`: each live process with bindings, what it
    /// holds and until when. Never a value.
    pub fn listing(&self, tracker: &Tracker) -> serde_json::Value {
        let reg = tracker.registry.borrow().clone();
        let failing = self.failing();
        let procs = self.lock();
        let mut out = Vec::new();
        for (info, svids) in tracker.snapshot() {
            let mut bindings = Vec::new();
            for b in reg
                .bindings
                .iter()
                .filter(|b| svids.iter().any(|s| s.identity == b.identity))
            {
                let key = cache_key(b);
                let fetched = procs
                    .get(&info.pid)
                    .filter(|i| i.start_time == info.start_time)
                    .and_then(|i| i.by_binding.get(&key));
                let expires = match &b.source_spec {
                    CredentialSourceSpec::X509Svid {} => svids
                        .iter()
                        .find(|s| s.identity == b.identity)
                        .map(|s| s.expires_at),
                    _ => fetched.and_then(|f| f.expires_at),
                };
                bindings.push(json!({
                    "binding": b.name,
                    "identity": b.identity,
                    "source": b.source,
                    "kind": b.source_spec.kind(),
                    "files": file_names(b),
                    "fetched": fetched.map(|f| f.at),
                    "expiresAt": expires,
                    "lastError": failing.get(&key).map(|f| f.why.as_str()),
                }));
            }
            if !bindings.is_empty() {
                out.push(json!({
                    "pid": info.pid,
                    "exe": info.exe_path,
                    "uid": info.uid,
                    "bindings": bindings,
                }));
            }
        }
        json!({ "processes": out })
    }
}

impl ProcessObserver for Held {
    fn process_removed(&self, pid: i32) {
        self.lock().remove(&pid);
    }

    fn shutdown(&self) {
        self.lock().clear();
        self.failing().clear();
    }
}

/// Which file of a binding: x509Svid in PEM has three.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Main,
    Key,
    Bundle,
}

fn parts(b: &AgentBinding) -> &'static [(Part, &'static str)] {
    match (&b.source_spec, b.file.format) {
        (CredentialSourceSpec::X509Svid {}, FileFormat::Json) => &[(Part::Main, "")],
        (CredentialSourceSpec::X509Svid {}, _) => &[
            (Part::Main, ""),
            (Part::Key, ".key"),
            (Part::Bundle, ".bundle"),
        ],
        _ => &[(Part::Main, "")],
    }
}

fn file_names(b: &AgentBinding) -> Vec<String> {
    parts(b)
        .iter()
        .map(|(_, suffix)| format!("{}{suffix}", b.file.name))
        .collect()
}

/// A file in one process's view.
struct ViewFile {
    name: String,
    binding: usize,
    part: Part,
    svid: Arc<ProcSvid>,
}

/// The files `c` may see: those of the bindings of the identities it holds
/// SVIDs for (an identity not handed to the process, `workloadApi: false`,
/// delivers no SVID). The first binding (by name) to claim a file name has it.
fn view(reg: &Registry, c: &Current) -> Vec<ViewFile> {
    let mut out: Vec<ViewFile> = Vec::new();
    for (i, b) in reg.bindings.iter().enumerate() {
        let Some(svid) = c.svids.iter().find(|s| s.identity == b.identity) else {
            continue;
        };
        // An identity whose SVIDs are not for the process (`workloadApi:
        // false`) hands it none as a file either, X.509 or JWT.
        if matches!(
            b.source_spec,
            CredentialSourceSpec::X509Svid {} | CredentialSourceSpec::JwtSvid { .. }
        ) && !svid.workload_api
        {
            continue;
        }
        for (part, suffix) in parts(b) {
            let name = format!("{}{suffix}", b.file.name);
            if out.iter().any(|f| f.name == name) {
                continue;
            }
            out.push(ViewFile {
                name,
                binding: i,
                part: *part,
                svid: svid.clone(),
            });
        }
    }
    out
}

/// A value just fetched: refreshed on a read after `refresh_at`, never
/// served after `expires_at`.
struct Fresh {
    value: Zeroizing<Vec<u8>>,
    refresh_at: i64,
    expires_at: Option<i64>,
}

/// Why a fetch failed; `refused` when the server said no (then the last
/// value goes at once) rather than could not be reached.
struct FetchError {
    msg: String,
    refused: bool,
}

impl FetchError {
    fn upstream(msg: impl Into<String>) -> Self {
        FetchError {
            msg: msg.into(),
            refused: false,
        }
    }
}

impl From<ExchangeError> for FetchError {
    fn from(e: ExchangeError) -> Self {
        FetchError {
            refused: e.refused(),
            msg: e.to_string(),
        }
    }
}

/// A server answer: refusals (binding or entitlement gone) end the value.
fn server_error(s: tonic::Status) -> FetchError {
    FetchError {
        refused: matches!(
            s.code(),
            tonic::Code::PermissionDenied | tonic::Code::NotFound | tonic::Code::FailedPrecondition
        ),
        msg: format!("server: {}", s.message()),
    }
}

/// A value valid until `exp`, refreshed at half its life (with jitter, so a
/// fleet's refreshes spread out).
fn expiring(value: Zeroizing<Vec<u8>>, now: i64, exp: i64) -> Fresh {
    let life = (exp - now).max(2);
    Fresh {
        value,
        refresh_at: now + life / 2 - jitter(life / 10 + 1),
        expires_at: Some(exp),
    }
}

/// Where a fetched value is cached for a process: the binding and what it
/// said when fetched, so a re-applied binding or source fetches anew.
fn cache_key(b: &AgentBinding) -> String {
    format!(
        "{}\0{}\0{}\0{:?}",
        b.name, b.identity, b.source, b.source_spec
    )
}

/// A file resolved and rendered for a read: who asked, the registry it was
/// resolved in, the file and its bytes.
struct Rendered {
    c: Current,
    reg: Arc<Registry>,
    f: ViewFile,
    bytes: Zeroizing<Vec<u8>>,
}

/// A fetched value as served: its bytes and when it expires.
struct Value {
    bytes: Zeroizing<Vec<u8>>,
    expires_at: Option<i64>,
}

/// Why a request was refused (audited, then ENOENT or EACCES), and the
/// process (thread group) that asked, when known.
struct Refused(String, Option<i32>);

pub struct CredFs {
    tracker: Arc<Tracker>,
    held: Arc<Held>,
    node: Arc<NodeConn>,
    audit: Arc<AuditLog>,
    metrics: Arc<Metrics>,
    rt: tokio::runtime::Handle,
    /// Token endpoints' client (None: no TLS configuration could be built;
    /// every exchange then fails, audited).
    upstream: Option<Upstream>,
    names: Mutex<(HashMap<String, u64>, Vec<String>)>,
    mounted: SystemTime,
    deny_budget: Mutex<DenyBudget>,
}

/// How many refusals were audited in the current second, in all and per
/// process, and how many were left out since the last audited one.
#[derive(Default)]
struct DenyBudget {
    second: i64,
    total: u32,
    per_proc: HashMap<i32, u32>,
    left_out: u64,
}

impl DenyBudget {
    /// Whether a refusal by `tgid` at `now` is audited: then the count left
    /// out before it (to report with it).
    fn admit(&mut self, tgid: i32, now: i64) -> Option<u64> {
        if self.second != now {
            self.second = now;
            self.total = 0;
            self.per_proc.clear();
        }
        let room = self.per_proc.len() < DENY_TRACKED_PROCS;
        let mine = match self.per_proc.get_mut(&tgid) {
            Some(n) => n,
            None if room => self.per_proc.entry(tgid).or_insert(0),
            None => &mut 0,
        };
        if *mine >= DENY_AUDITS_PER_PROC_SEC || self.total >= DENY_AUDITS_PER_SEC {
            self.left_out += 1;
            return None;
        }
        *mine += 1;
        self.total += 1;
        Some(std::mem::take(&mut self.left_out))
    }
}

impl CredFs {
    pub fn new(
        tracker: Arc<Tracker>,
        held: Arc<Held>,
        node: Arc<NodeConn>,
        audit: Arc<AuditLog>,
        metrics: Arc<Metrics>,
        rt: tokio::runtime::Handle,
    ) -> Self {
        CredFs {
            tracker,
            held,
            node,
            audit,
            metrics,
            rt,
            upstream: Upstream::new()
                .map_err(|e| tracing::error!(error = %e, "no TLS client for token endpoints"))
                .ok(),
            names: Mutex::new((HashMap::new(), Vec::new())),
            mounted: SystemTime::now(),
            deny_budget: Mutex::new(DenyBudget::default()),
        }
    }

    /// The inode of a file name (the same name, the same inode, whoever
    /// asks; what it holds depends on who reads).
    fn ino(&self, name: &str) -> Option<INodeNo> {
        let mut n = self.names.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = n.0.get(name) {
            return Some(INodeNo(*i));
        }
        if n.1.len() >= MAX_NAMES {
            return None;
        }
        n.1.push(name.to_owned());
        let i = n.1.len() as u64 + 1;
        n.0.insert(name.to_owned(), i);
        Some(INodeNo(i))
    }

    fn name_of(&self, ino: INodeNo) -> Option<String> {
        let n = self.names.lock().unwrap_or_else(|p| p.into_inner());
        let i = usize::try_from(ino.0.checked_sub(2)?).ok()?;
        n.1.get(i).cloned()
    }

    /// The process behind a request, as the tracker holds it now; attested
    /// again when the table's entry is not current for it.
    fn caller(&self, req: &Request) -> Result<Current, Refused> {
        let pid = i32::try_from(req.pid())
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| {
                Refused(
                    "request from outside the agent's pid namespace".into(),
                    None,
                )
            })?;
        // The entry also must carry the credentials the kernel reports for
        // this request: a process that changed uid without exec'ing (a
        // root daemon's worker dropping to nobody) is attested again, not
        // served as it was.
        let (uid, gid) = (req.uid(), req.gid());
        let fits = |c: &Current| c.uid == uid && c.gid == gid;
        if let Some(c) = self.tracker.current(pid).filter(fits) {
            return Ok(c);
        }
        // The pid of a request is the thread's; the table is by process.
        let tgid = tgid_of(pid).map_err(|e| Refused(format!("pid {pid}: {e}"), None))?;
        if u32::try_from(tgid).ok() == Some(std::process::id()) {
            // The agent itself (attesting a path under this mount, say):
            // never block a worker on our own attestation.
            return Err(Refused("the agent's own request".into(), Some(tgid)));
        }
        if tgid != pid
            && let Some(c) = self.tracker.current(tgid).filter(fits)
        {
            return Ok(c);
        }
        let pidfd = tether_attest::PidFd::open(tgid)
            .map_err(|e| Refused(format!("pid {tgid}: {e}"), Some(tgid)))?;
        let tracker = self.tracker.clone();
        let attested = self.rt.block_on(async move {
            tokio::time::timeout(FETCH_TIMEOUT, tracker.ensure(Arc::new(pidfd))).await
        });
        match attested {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(Refused(format!("pid {tgid}: {e}"), Some(tgid))),
            Err(_) => {
                return Err(Refused(
                    format!("pid {tgid}: attestation timed out"),
                    Some(tgid),
                ));
            }
        }
        match self.tracker.current(tgid) {
            Some(c) if fits(&c) => Ok(c),
            Some(c) => Err(Refused(
                format!(
                    "pid {tgid}: the request's uid/gid {uid}/{gid} is not the process's {}/{}",
                    c.uid, c.gid
                ),
                Some(tgid),
            )),
            None => Err(Refused(
                format!("pid {tgid} changed while it was attested"),
                Some(tgid),
            )),
        }
    }

    fn deny(&self, op: &str, req: &Request, file: Option<&str>, why: &Refused) {
        self.metrics.credential_read("denied");
        // Refusals are audited at most DENY_AUDITS_PER_PROC_SEC a second
        // per process and DENY_AUDITS_PER_SEC in all, so a process probing
        // the directory in a loop can neither fill the disk, nor push other
        // records out of the recent ring, nor hide another process's
        // refusal; the next record says how many were left out (the metric
        // counts them all).
        let pid = why
            .1
            .unwrap_or_else(|| i32::try_from(req.pid()).unwrap_or(0));
        let Some(left_out) = self
            .deny_budget
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(pid, unix_now())
        else {
            return;
        };
        self.audit.publish(json!({
            "leftOut": (left_out > 0).then_some(left_out),
            "event": "credential",
            "op": op,
            "verdict": "deny",
            "pid": why.1.map_or(i64::from(req.pid()), i64::from),
            "tid": req.pid(),
            "uid": req.uid(),
            "file": file,
            "reason": why.0,
        }));
    }

    /// The caller and the file `name` in its view.
    fn resolve(
        &self,
        op: &str,
        req: &Request,
        name: &str,
    ) -> Result<(Current, Arc<Registry>, ViewFile), Errno> {
        let c = self.caller(req).map_err(|r| {
            self.deny(op, req, Some(name), &r);
            Errno::ENOENT
        })?;
        let reg = self.tracker.registry.borrow().clone();
        let f = view(&reg, &c).into_iter().find(|f| f.name == name);
        match f {
            Some(f) => Ok((c, reg, f)),
            None => {
                let why = Refused(
                    format!(
                        "{} (pid {}, uid {}) holds no binding for this file",
                        c.exe_path, c.pid, c.uid
                    ),
                    Some(c.pid),
                );
                self.deny(op, req, Some(name), &why);
                Err(Errno::ENOENT)
            }
        }
    }

    /// A file's bytes, fetching its source on the first read (and when due).
    fn content(
        &self,
        c: &Current,
        reg: &Registry,
        f: &ViewFile,
    ) -> Result<Zeroizing<Vec<u8>>, String> {
        let b = &reg.bindings[f.binding];
        match &b.source_spec {
            CredentialSourceSpec::X509Svid {} => Ok(x509_file(b, f, reg)),
            // Rendered when fetched (the file is the whole credential).
            CredentialSourceSpec::AwsSts { .. } => Ok(self.fetched(c, b, f)?.bytes),
            CredentialSourceSpec::Static { .. }
            | CredentialSourceSpec::JwtSvid { .. }
            | CredentialSourceSpec::OAuth2 { .. } => {
                let v = self.fetched(c, b, f)?;
                Ok(secret_file(b, &v.bytes, v.expires_at))
            }
        }
    }

    /// The cached value of a fetched source for this process instance,
    /// fetched (or refreshed) now if due.
    fn fetched(&self, c: &Current, b: &AgentBinding, f: &ViewFile) -> Result<Value, String> {
        let now = unix_now();
        let key = cache_key(b);
        // The value held for this instance while still good, and whether a
        // refresh is due.
        let held = self
            .held
            .lock()
            .get(&c.pid)
            .filter(|i| i.start_time == c.start_time)
            .and_then(|i| i.by_binding.get(&key))
            .filter(|h| h.live(now))
            .map(|h| (h.value(), now >= h.refresh_at));
        let kept = match held {
            Some((v, false)) => return Ok(v),
            Some((v, true)) => Some(v),
            None => None,
        };
        // A failing source is not asked again, for this process or any
        // other, before its backoff ends: a fleet of fresh processes cannot
        // hammer an upstream that is down. A value still good is served.
        if let Some(why) = self.backing_off(&key, now) {
            return kept.ok_or(why);
        }
        let kind = b.source_spec.kind();
        let started = Instant::now();
        // Checked against the time after the fetch, which may have taken
        // seconds: a value that expired meanwhile is not delivered.
        let result = self.fetch(c, b, f).and_then(|v| match v.expires_at {
            Some(e) if e <= unix_now() => Err(FetchError::upstream(
                "the value expired before it could be delivered",
            )),
            _ => Ok(v),
        });
        self.metrics
            .credential_fetch_seconds
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(Fresh {
                value,
                refresh_at,
                expires_at,
            }) => {
                self.metrics.credential_fetch(kind, "ok");
                self.held.failing().remove(&key);
                // Kept only while the process is the one it was fetched for
                // (an exit observed meanwhile already dropped its entry).
                if let Some(inst) = self.instance(&mut self.held.lock(), c) {
                    inst.by_binding.insert(
                        key,
                        Fetched {
                            value: value.clone(),
                            at: now,
                            refresh_at,
                            expires_at,
                        },
                    );
                }
                Ok(Value {
                    bytes: value,
                    expires_at,
                })
            }
            Err(e) => {
                self.metrics.credential_fetch(kind, "error");
                self.note_failure(&key, now, &e.msg);
                // A refusal by the server or upstream (binding, entitlement
                // or grant gone) ends the value now; an unreachable or bad
                // upstream keeps the last good one until it expires.
                let kept =
                    kept.filter(|v| !e.refused && v.expires_at.is_none_or(|x| unix_now() < x));
                if kept.is_none()
                    && let Some(i) = self
                        .held
                        .lock()
                        .get_mut(&c.pid)
                        .filter(|i| i.start_time == c.start_time)
                {
                    i.by_binding.remove(&key);
                }
                self.audit.publish(json!({
                    "event": "credential",
                    "op": "fetch",
                    "verdict": "error",
                    "pid": c.pid,
                    "exe": c.exe_path,
                    "identity": b.identity,
                    "binding": b.name,
                    "source": b.source,
                    "sourceKind": kind,
                    "keptUntil": kept.as_ref().map(|k| k.expires_at),
                    "reason": e.msg,
                }));
                kept.ok_or(e.msg)
            }
        }
    }

    /// Why the source of cache key `key` is not asked now: it failed
    /// recently and its backoff has not ended.
    fn backing_off(&self, key: &str, now: i64) -> Option<String> {
        let failing = self.held.failing();
        let f = failing.get(key).filter(|f| now < f.retry_at)?;
        Some(format!(
            "no value: {} (the source is backing off; next try in {} s)",
            f.why,
            f.retry_at - now
        ))
    }

    /// Records a failed fetch of the source of `key`: backoff doubling from
    /// 2 s to [`MAX_BACKOFF_SECS`], jittered.
    fn note_failure(&self, key: &str, now: i64, why: &str) {
        let mut failing = self.held.failing();
        if failing.len() >= MAX_FAILING_SOURCES && !failing.contains_key(key) {
            failing.clear();
        }
        let f = failing.entry(key.to_owned()).or_insert(Failing {
            retry_at: 0,
            failures: 0,
            why: String::new(),
        });
        f.failures = f.failures.saturating_add(1);
        let backoff = (1i64 << f.failures.min(5)).min(MAX_BACKOFF_SECS);
        f.retry_at = now + backoff + jitter(backoff / 2 + 1);
        why.clone_into(&mut f.why);
    }

    /// The cache of process instance `c`, while the tracker still holds
    /// that instance (an exit observed meanwhile already dropped it; a
    /// reused pid starts empty).
    fn instance<'a>(
        &self,
        procs: &'a mut HashMap<i32, Instance>,
        c: &Current,
    ) -> Option<&'a mut Instance> {
        if self
            .tracker
            .current(c.pid)
            .is_none_or(|n| n.start_time != c.start_time)
        {
            return None;
        }
        let inst = procs.entry(c.pid).or_insert_with(|| Instance {
            start_time: c.start_time,
            by_binding: HashMap::new(),
        });
        if inst.start_time != c.start_time {
            inst.start_time = c.start_time;
            inst.by_binding.clear();
        }
        Some(inst)
    }

    /// Fetches a source's value for a process now.
    fn fetch(&self, c: &Current, b: &AgentBinding, f: &ViewFile) -> Result<Fresh, FetchError> {
        let now = unix_now();
        let deadline = tokio::time::Instant::now() + FETCH_BUDGET;
        match &b.source_spec {
            CredentialSourceSpec::Static { .. } => {
                let r =
                    self.ask_server(
                        b,
                        deadline,
                        |mut c, r| async move { c.fetch_secret(r).await },
                    )?;
                let value = Zeroizing::new(r.value);
                if value.len() > tether_manifest::MAX_STATIC_BYTES {
                    return Err(FetchError::upstream(format!(
                        "the server sent {} bytes for a static secret (at most {})",
                        value.len(),
                        tether_manifest::MAX_STATIC_BYTES
                    )));
                }
                Ok(Fresh {
                    value,
                    refresh_at: now + STATIC_REFRESH_SECS,
                    expires_at: None,
                })
            }
            CredentialSourceSpec::JwtSvid { audience } => {
                let (token, exp) = self.mint(f, audience, deadline)?;
                Ok(expiring(Zeroizing::new(token.into_bytes()), now, exp))
            }
            CredentialSourceSpec::AwsSts {
                role_arn,
                audience,
                duration_secs,
                endpoint,
                region,
            } => {
                // The JWT-SVID proves the identity to STS and stays here.
                let (token, _) = self.mint(f, std::slice::from_ref(audience), deadline)?;
                let session = exchange::session_name(&b.identity, c.pid);
                let duration = duration_secs.to_string();
                let form = exchange::sts_form(role_arn, &session, &token, &duration);
                let (status, body) = self.post(endpoint, &form, "text/xml", deadline)?;
                let creds = exchange::parse_sts(endpoint, status, &body)?;
                // Never past what was asked for, whatever the answer says.
                let exp = creds.expiration.min(now + duration_secs + 60);
                if exp <= now + 1 {
                    return Err(FetchError::upstream(format!(
                        "{endpoint}: the credentials expired already (Expiration {})",
                        creds.expiration
                    )));
                }
                Ok(expiring(aws_file(b, &creds, exp, region), now, exp))
            }
            CredentialSourceSpec::OAuth2 {
                token_endpoint,
                grant,
                client_id,
                audience,
                scope,
            } => {
                let scope = scope.join(" ");
                let mut form: Vec<(&str, &str)> = Vec::new();
                let subject;
                match grant {
                    OAuthGrant::ClientCredentials => {
                        form.push(("grant_type", "client_credentials"))
                    }
                    OAuthGrant::TokenExchange => {
                        // The subject token's audience is the token endpoint
                        // that consumes it.
                        subject = self
                            .mint(f, std::slice::from_ref(token_endpoint), deadline)?
                            .0;
                        form.extend([
                            ("grant_type", exchange::GRANT_TOKEN_EXCHANGE),
                            ("subject_token", subject.as_str()),
                            ("subject_token_type", exchange::TOKEN_TYPE_JWT),
                        ]);
                        if !audience.is_empty() {
                            form.push(("audience", audience));
                        }
                    }
                }
                // The client authenticates with an RFC 7523 assertion the
                // server signs for this source's client only.
                let assertion;
                if !client_id.is_empty() {
                    assertion = self.client_assertion(b, deadline)?;
                    form.extend([
                        ("client_id", client_id.as_str()),
                        ("client_assertion_type", exchange::ASSERTION_TYPE_JWT_BEARER),
                        ("client_assertion", assertion.as_str()),
                    ]);
                }
                if !scope.is_empty() {
                    form.push(("scope", &scope));
                }
                let (status, body) =
                    self.post(token_endpoint, &form, "application/json", deadline)?;
                let t = exchange::parse_token(token_endpoint, status, &body, now)?;
                Ok(expiring(
                    Zeroizing::new(t.access_token.as_bytes().to_vec()),
                    now,
                    t.expires_at,
                ))
            }
            // The tracker's own, never fetched.
            CredentialSourceSpec::X509Svid {} => Err(FetchError::upstream(
                "x509Svid sources are not fetched".to_owned(),
            )),
        }
    }

    /// A JWT-SVID of the file's SVID for `audience`, and its expiry.
    fn mint(
        &self,
        f: &ViewFile,
        audience: &[String],
        deadline: tokio::time::Instant,
    ) -> Result<(String, i64), FetchError> {
        let tracker = self.tracker.clone();
        let (id, aud) = (f.svid.spiffe_id.clone(), audience.to_vec());
        let token = self
            .rt
            .block_on(async move {
                tokio::time::timeout_at(deadline, tracker.mint_jwt(&id, &aud)).await
            })
            .map_err(|_| FetchError::upstream("the server did not answer in time"))?
            .map_err(FetchError::upstream)?;
        let exp = tether_spiffe::jwt::peek_expiry(&token)
            .map_err(|e| FetchError::upstream(format!("the server's JWT-SVID: {e}")))?;
        Ok((token, exp))
    }

    /// A client assertion for an oauth2 source, signed by the server.
    fn client_assertion(
        &self,
        b: &AgentBinding,
        deadline: tokio::time::Instant,
    ) -> Result<String, FetchError> {
        let r = self.ask_server(b, deadline, |mut c, r| async move {
            c.mint_client_assertion(r).await
        })?;
        Ok(r.token)
    }

    /// A node API call about a binding (its identity and source), by the
    /// fetch's deadline.
    fn ask_server<T, Fut>(
        &self,
        b: &AgentBinding,
        deadline: tokio::time::Instant,
        call: impl FnOnce(NodeClient<Channel>, FetchSecretRequest) -> Fut,
    ) -> Result<T, FetchError>
    where
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let req = FetchSecretRequest {
            identity: b.identity.clone(),
            source: b.source.clone(),
        };
        let fut = call(self.node.client(), req);
        self.rt
            .block_on(async move { tokio::time::timeout_at(deadline, fut).await })
            .map_err(|_| FetchError::upstream("the server did not answer in time"))?
            .map(tonic::Response::into_inner)
            .map_err(server_error)
    }

    /// POSTs a form to a token endpoint.
    fn post(
        &self,
        endpoint: &str,
        form: &[(&str, &str)],
        accept: &'static str,
        deadline: tokio::time::Instant,
    ) -> Result<(u16, hyper::body::Bytes), FetchError> {
        let up = self.upstream.as_ref().ok_or_else(|| {
            FetchError::upstream("the agent has no TLS client for token endpoints")
        })?;
        let answer = self.rt.block_on(async {
            tokio::time::timeout_at(deadline, up.post_form(endpoint, form, accept)).await
        });
        match answer {
            Ok(r) => Ok(r?),
            Err(_) => Err(FetchError::upstream(format!(
                "{endpoint}: unreachable: no answer within the fetch's {FETCH_BUDGET:?}"
            ))),
        }
    }

    /// A file's attributes (size 0, see [`attr`]). The time is the cached
    /// value's or the SVID's: attributes never render or fetch (a value is
    /// fetched on its first read).
    fn file_attr(&self, ino: INodeNo, c: &Current, reg: &Registry, f: &ViewFile) -> FileAttr {
        let b = &reg.bindings[f.binding];
        let fetched_at = self
            .held
            .lock()
            .get(&c.pid)
            .filter(|i| i.start_time == c.start_time)
            .and_then(|i| i.by_binding.get(&cache_key(b)))
            .map(|h| h.at);
        let at = fetched_at.unwrap_or(f.svid.issued_at);
        let t = UNIX_EPOCH + Duration::from_secs(u64::try_from(at).unwrap_or(0));
        attr(ino, FileType::RegularFile, b.file.mode, (c.uid, c.gid), t)
    }

    /// Resolves and renders a file for a read.
    fn file(&self, op: &str, req: &Request, name: &str) -> Result<Rendered, Errno> {
        let (c, reg, f) = self.resolve(op, req, name)?;
        match self.content(&c, &reg, &f) {
            Ok(bytes) => Ok(Rendered { c, reg, f, bytes }),
            Err(e) => {
                let b = &reg.bindings[f.binding];
                self.metrics.credential_read("error");
                self.audit.publish(json!({
                    "event": "credential",
                    "op": op,
                    "verdict": "error",
                    "pid": c.pid,
                    "exe": c.exe_path,
                    "uid": c.uid,
                    "identity": b.identity,
                    "binding": b.name,
                    "source": b.source,
                    "file": name,
                    "reason": e,
                }));
                Err(Errno::EIO)
            }
        }
    }
}

impl fuser::Filesystem for CredFs {
    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(name) = name.to_str().filter(|_| parent == ROOT) else {
            return reply.error(Errno::ENOENT);
        };
        match self.resolve("lookup", req, name) {
            Ok((c, reg, f)) => {
                let Some(ino) = self.ino(name) else {
                    return reply.error(Errno::ENOSPC);
                };
                let a = self.file_attr(ino, &c, &reg, &f);
                reply.entry(&NO_CACHE, &a, fuser::Generation(0));
            }
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino == ROOT {
            let root = attr(ROOT, FileType::Directory, 0o555, (0, 0), self.mounted);
            return reply.attr(&NO_CACHE, &root);
        }
        let Some(name) = self.name_of(ino) else {
            return reply.error(Errno::ENOENT);
        };
        match self.resolve("getattr", req, &name) {
            Ok((c, reg, f)) => reply.attr(&NO_CACHE, &self.file_attr(ino, &c, &reg, &f)),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EACCES);
        }
        let Some(name) = self.name_of(ino) else {
            return reply.error(Errno::ENOENT);
        };
        match self.resolve("open", req, &name) {
            // Direct I/O: no page cache, every read comes here.
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(name) = self.name_of(ino) else {
            return reply.error(Errno::ENOENT);
        };
        // A descriptor handed to another process reads nothing there.
        let Rendered {
            c, reg, f, bytes, ..
        } = match self.file("read", req, &name) {
            Ok(v) => v,
            Err(e) => return reply.error(if e == Errno::ENOENT { Errno::EACCES } else { e }),
        };
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        let end = start.saturating_add(size as usize).min(bytes.len());
        if end > start {
            let b = &reg.bindings[f.binding];
            self.metrics.credential_read("allowed");
            self.audit.publish(json!({
                "event": "credential",
                "op": "read",
                "verdict": "allow",
                "pid": c.pid,
                "exe": c.exe_path,
                "uid": c.uid,
                "identity": b.identity,
                "spiffeId": f.svid.spiffe_id.to_string(),
                "binding": b.name,
                "source": b.source,
                "sourceKind": b.source_spec.kind(),
                "file": name,
                "offset": offset,
            }));
        }
        reply.data(&bytes[start..end]);
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let mut entries = vec![
            (ROOT, FileType::Directory, ".".to_string()),
            (ROOT, FileType::Directory, "..".to_string()),
        ];
        match self.caller(req) {
            Ok(c) => {
                let reg = self.tracker.registry.borrow().clone();
                let files = view(&reg, &c);
                if files.is_empty() && offset == 0 {
                    self.deny(
                        "readdir",
                        req,
                        None,
                        &Refused(
                            format!(
                                "{} (pid {}, uid {}) holds no credential bindings",
                                c.exe_path, c.pid, c.uid
                            ),
                            Some(c.pid),
                        ),
                    );
                }
                for f in files {
                    if let Some(i) = self.ino(&f.name) {
                        entries.push((i, FileType::RegularFile, f.name));
                    }
                }
            }
            // Audited at every offset: a seek on the directory reaches here
            // without offset 0.
            Err(r) => self.deny("readdir", req, None, &r),
        }
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(skip) {
            if reply.add(ino, (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// The thread group (process) of a task id, from the kernel's own status
/// line.
fn tgid_of(tid: i32) -> std::io::Result<i32> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| std::io::Error::other("no Tgid in its status"))
}

/// A random offset in [0, span) seconds, so refreshes of many processes do
/// not line up.
fn jitter(span: i64) -> i64 {
    let mut b = [0u8; 4];
    if span <= 0 || aws_lc_rs::rand::fill(&mut b).is_err() {
        return 0;
    }
    i64::from(u32::from_le_bytes(b)) % span
}

/// Attributes of a file or the root. Files report size 0, as in procfs:
/// the inode is shared by every process that has a file of that name, and
/// paths that bypass direct I/O (splice, sendfile and private mmap go
/// through the page cache) stop at i_size, so they can never fill or serve
/// a cache another process could read. Reads (direct I/O) go to EOF
/// regardless.
fn attr(
    ino: INodeNo,
    kind: FileType,
    mode: u32,
    (uid, gid): (u32, u32),
    t: SystemTime,
) -> FileAttr {
    FileAttr {
        ino,
        size: 0,
        blocks: 0,
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        kind,
        perm: (mode & 0o777) as u16,
        nlink: if kind == FileType::Directory { 2 } else { 1 },
        uid,
        gid,
        rdev: 0,
        flags: 0,
        blksize: 4096,
    }
}

/// An env-file variable name from a source name: `db-password` becomes
/// `DB_PASSWORD`.
fn env_name(source: &str) -> String {
    source
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// A value for an env file, single-quoted unless it is plainly safe.
fn env_value(v: &str) -> String {
    if !v.is_empty()
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./:@+=,".contains(c))
    {
        return v.to_owned();
    }
    format!("'{}'", v.replace('\'', r"'\''"))
}

/// A static secret or a token as the binding's format asks.
fn secret_file(b: &AgentBinding, value: &[u8], expires_at: Option<i64>) -> Zeroizing<Vec<u8>> {
    let text = || String::from_utf8_lossy(value).into_owned();
    Zeroizing::new(match b.file.format {
        FileFormat::Raw | FileFormat::Pem => value.to_vec(),
        FileFormat::Env => {
            let v = Zeroizing::new(text());
            format!("{}={}\n", env_name(&b.source), env_value(&v)).into_bytes()
        }
        FileFormat::Json => {
            let v = Zeroizing::new(text());
            let key = if matches!(
                b.source_spec,
                CredentialSourceSpec::JwtSvid { .. } | CredentialSourceSpec::OAuth2 { .. }
            ) {
                "token"
            } else {
                "value"
            };
            let mut o = json!({ key: v.as_str() });
            if let Some(e) = expires_at {
                o["expiresAt"] = json!(e);
            }
            let mut s = o.to_string();
            s.push('\n');
            s.into_bytes()
        }
    })
}

/// STS credentials as the binding's format asks: `json` is the
/// `credential_process` document (Version 1), `env` the SDKs' variables,
/// and `raw` (or `pem`) a shared credentials file (`[default]` profile),
/// for `AWS_SHARED_CREDENTIALS_FILE`.
fn aws_file(
    b: &AgentBinding,
    c: &exchange::AwsCredentials,
    expires_at: i64,
    region: &str,
) -> Zeroizing<Vec<u8>> {
    // When Tether stops serving it (capped at the duration asked for), not
    // what the upstream said.
    let expiration = time::OffsetDateTime::from_unix_timestamp(expires_at)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default();
    Zeroizing::new(match b.file.format {
        FileFormat::Json => {
            let mut s = json!({
                "Version": 1,
                "AccessKeyId": c.access_key_id,
                "SecretAccessKey": c.secret_access_key.as_str(),
                "SessionToken": c.session_token.as_str(),
                "Expiration": expiration,
            })
            .to_string();
            s.push('\n');
            s.into_bytes()
        }
        FileFormat::Env => format!(
            "AWS_ACCESS_KEY_ID={}\nAWS_SECRET_ACCESS_KEY={}\nAWS_SESSION_TOKEN={}\nAWS_REGION={}\n",
            env_value(&c.access_key_id),
            env_value(&c.secret_access_key),
            env_value(&c.session_token),
            env_value(region),
        )
        .into_bytes(),
        FileFormat::Raw | FileFormat::Pem => format!(
            "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\naws_session_token = {}\n",
            c.access_key_id,
            c.secret_access_key.as_str(),
            c.session_token.as_str(),
        )
        .into_bytes(),
    })
}

/// One file of an X.509-SVID binding: in PEM, the chain (`NAME`), the key
/// (`NAME.key`) and the bundle (`NAME.bundle`); in JSON all three in one.
fn x509_file(b: &AgentBinding, f: &ViewFile, reg: &Registry) -> Zeroizing<Vec<u8>> {
    let chain = || -> String {
        f.svid
            .chain
            .iter()
            .map(|c| tether_ca::pem_encode("CERTIFICATE", c))
            .collect()
    };
    let bundle = || -> String {
        reg.bundle
            .x509_authorities
            .iter()
            .map(|c| tether_ca::pem_encode("CERTIFICATE", c))
            .collect()
    };
    Zeroizing::new(match (b.file.format, f.part) {
        (FileFormat::Json, _) => {
            let key = f.svid.key.to_pem();
            let mut s = json!({
                "spiffeId": f.svid.spiffe_id.to_string(),
                "certificates": chain(),
                "privateKey": key.as_str(),
                "bundle": bundle(),
                "expiresAt": f.svid.expires_at,
            })
            .to_string();
            s.push('\n');
            s.into_bytes()
        }
        (_, Part::Main) => chain().into_bytes(),
        (_, Part::Key) => f.svid.key.to_pem().as_bytes().to_vec(),
        (_, Part::Bundle) => bundle().into_bytes(),
    })
}

/// Mounts the filesystem at `dir` (created if missing; a dead earlier
/// mount there is detached first). Unmounted when the session is dropped;
/// if the agent dies instead, the kernel answers every access with ENOTCONN
/// and nothing is readable.
pub fn mount(fs: CredFs, dir: &Path) -> anyhow::Result<fuser::BackgroundSession> {
    use fuser::MountOption as O;
    if let Err(e) = std::fs::metadata(dir)
        && e.raw_os_error() == Some(libc::ENOTCONN)
    {
        detach(dir);
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("creating credential directory {}: {e}", dir.display()))?;
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        O::FSName("tether".into()),
        O::Subtype("credentials".into()),
        O::RO,
        O::NoSuid,
        O::NoDev,
        O::NoExec,
        O::NoAtime,
    ];
    cfg.acl = fuser::SessionACL::All;
    cfg.n_threads = Some(FUSE_THREADS);
    cfg.clone_fd = true;
    fuser::spawn_mount(fs, dir, &cfg).map_err(|e| {
        anyhow::anyhow!(
            "mounting the credential filesystem at {}: {e}",
            dir.display()
        )
    })
}

/// Lazily detaches whatever is mounted at `dir` (a dead credential mount).
pub fn detach(dir: &Path) {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: umount2 reads a NUL-terminated path.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_noisy_process_does_not_hide_another_s_refusals() {
        let mut b = DenyBudget::default();
        let noisy = (0..1000).filter(|_| b.admit(7, 100).is_some()).count();
        assert_eq!(noisy, DENY_AUDITS_PER_PROC_SEC as usize);
        // Another process in the same second is still audited, and told
        // how many were left out before it.
        assert_eq!(b.admit(8, 100), Some(1000 - noisy as u64));
        // Past the global budget nobody is, until the next second.
        for p in 100..100 + DENY_AUDITS_PER_SEC as i32 {
            b.admit(p, 100);
        }
        assert_eq!(b.admit(9, 100), None);
        assert!(b.admit(7, 101).is_some());
    }

    #[test]
    fn env_values_are_quoted_unless_plain() {
        assert_eq!(env_name("db-password.v2"), "DB_PASSWORD_V2");
        assert_eq!(env_value("s3cr3t/x+y=="), "s3cr3t/x+y==");
        assert_eq!(env_value("it's $HOME"), r"'it'\''s $HOME'");
        assert_eq!(env_value(""), "''");
        assert_eq!(env_value("a\nb"), "'a\nb'");
    }
}
