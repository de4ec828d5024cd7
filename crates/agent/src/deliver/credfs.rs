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
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, INodeNo, LockOwner, OpenAccMode, OpenFlags,
    ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen, Request,
};
use serde_json::json;
use tether_manifest::{CredentialFile, CredentialSourceSpec, FileFormat};
use zeroize::Zeroizing;

use super::fetch::{Fetcher, env_name, env_value};
use crate::audit::AuditLog;
use crate::clock::unix_now;
use crate::identity::ProcSvid;
use crate::identity::intercept::Interceptor;
use crate::metrics::Metrics;
use crate::state::registry::{AgentBinding, Registry};
use crate::state::tracker::{Current, Tracker};

/// The default mount point.
pub const DEFAULT_DIR: &str = "/run/tether/credentials";
const ROOT: INodeNo = INodeNo::ROOT;
/// Nothing is cached by the kernel: every access asks again.
const NO_CACHE: Duration = Duration::ZERO;
/// A server round trip (or attestation) longer than this fails the request.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
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

/// Which file of a binding: x509Svid in PEM has three.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Main,
    Key,
    Bundle,
    /// The node's intercepting CA bundle (an `inject.intercept` binding).
    InterceptCa,
}

fn parts(b: &AgentBinding, file: &CredentialFile) -> &'static [(Part, &'static str)] {
    match (&b.source_spec, file.format) {
        (CredentialSourceSpec::X509Svid {}, FileFormat::Json) => &[(Part::Main, "")],
        (CredentialSourceSpec::X509Svid {}, _) => &[
            (Part::Main, ""),
            (Part::Key, ".key"),
            (Part::Bundle, ".bundle"),
        ],
        _ => &[(Part::Main, "")],
    }
}

/// The files a binding delivers (none when it only injects).
pub(super) fn file_names(b: &AgentBinding) -> Vec<String> {
    let Some(file) = &b.file else {
        return Vec::new();
    };
    parts(b, file)
        .iter()
        .map(|(_, suffix)| format!("{}{suffix}", file.name))
        .collect()
}

/// A file in one process's view.
struct ViewFile {
    name: String,
    binding: usize,
    file: CredentialFile,
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
        // The intercepting CA's bundle, for the processes whose HTTPS to
        // the Service the agent intercepts (and no one else).
        if let Some(x) = b.inject.as_ref().and_then(|i| i.intercept.as_ref())
            && !out.iter().any(|f| f.name == x.ca_file)
        {
            out.push(ViewFile {
                name: x.ca_file.clone(),
                binding: i,
                file: CredentialFile {
                    name: x.ca_file.clone(),
                    format: FileFormat::Pem,
                    mode: 0o444,
                },
                part: Part::InterceptCa,
                svid: svid.clone(),
            });
        }
        // Injected only: no file.
        let Some(file) = &b.file else {
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
        for (part, suffix) in parts(b, file) {
            let name = format!("{}{suffix}", file.name);
            if out.iter().any(|f| f.name == name) {
                continue;
            }
            out.push(ViewFile {
                name,
                binding: i,
                file: file.clone(),
                part: *part,
                svid: svid.clone(),
            });
        }
    }
    out
}

/// A file resolved and rendered for a read: who asked, the registry it was
/// resolved in, the file and its bytes.
struct Rendered {
    c: Current,
    reg: Arc<Registry>,
    f: ViewFile,
    bytes: Zeroizing<Vec<u8>>,
}

/// Why a request was refused (audited, then ENOENT or EACCES), and the
/// process (thread group) that asked, when known.
struct Refused(String, Option<i32>);

pub struct CredFs {
    tracker: Arc<Tracker>,
    fetcher: Arc<Fetcher>,
    interceptor: Arc<Interceptor>,
    audit: Arc<AuditLog>,
    metrics: Arc<Metrics>,
    rt: tokio::runtime::Handle,
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
        fetcher: Arc<Fetcher>,
        interceptor: Arc<Interceptor>,
        audit: Arc<AuditLog>,
        metrics: Arc<Metrics>,
        rt: tokio::runtime::Handle,
    ) -> Self {
        CredFs {
            tracker,
            fetcher,
            interceptor,
            audit,
            metrics,
            rt,
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
        let file = &f.file;
        let fetched = || {
            self.rt
                .block_on(self.fetcher.fetched(c, b, &f.svid, file.format))
        };
        if f.part == Part::InterceptCa {
            let service = b.inject.as_ref().map_or("", |i| i.service.as_str());
            return self
                .interceptor
                .bundle_pem(&reg.service_hostnames(service))
                .map(|p| Zeroizing::new(p.into_bytes()));
        }
        match &b.source_spec {
            CredentialSourceSpec::X509Svid {} => Ok(x509_file(file, f, reg)),
            // Rendered when fetched (the file is the whole credential).
            CredentialSourceSpec::AwsSts { .. } => Ok(fetched()?.bytes),
            CredentialSourceSpec::Static { .. }
            | CredentialSourceSpec::JwtSvid { .. }
            | CredentialSourceSpec::OAuth2 { .. } => {
                let v = fetched()?;
                Ok(secret_file(b, file, &v.bytes, v.expires_at))
            }
        }
    }

    /// A file's attributes (size 0, see [`attr`]). The time is the cached
    /// value's or the SVID's: attributes never render or fetch (a value is
    /// fetched on its first read).
    fn file_attr(&self, ino: INodeNo, c: &Current, reg: &Registry, f: &ViewFile) -> FileAttr {
        let b = &reg.bindings[f.binding];
        let fetched_at = self.fetcher.fetched_at(c, b, f.file.format);
        let at = fetched_at.unwrap_or(f.svid.issued_at);
        let t = UNIX_EPOCH + Duration::from_secs(u64::try_from(at).unwrap_or(0));
        attr(ino, FileType::RegularFile, f.file.mode, (c.uid, c.gid), t)
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

/// A static secret or a token as the binding's format asks.
fn secret_file(
    b: &AgentBinding,
    file: &CredentialFile,
    value: &[u8],
    expires_at: Option<i64>,
) -> Zeroizing<Vec<u8>> {
    let text = || String::from_utf8_lossy(value).into_owned();
    Zeroizing::new(match file.format {
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

/// One file of an X.509-SVID binding: in PEM, the chain (`NAME`), the key
/// (`NAME.key`) and the bundle (`NAME.bundle`); in JSON all three in one.
fn x509_file(file: &CredentialFile, f: &ViewFile, reg: &Registry) -> Zeroizing<Vec<u8>> {
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
    Zeroizing::new(match (file.format, f.part) {
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
        // Never an x509Svid file (answered by `content` before this).
        (_, Part::Bundle | Part::InterceptCa) => bundle().into_bytes(),
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
