//! Reading a process's attributes from /proc, pinned by a pidfd.
//!
//! Every file is opened with `openat` relative to one `/proc/PID` directory
//! fd, and liveness is checked through the pidfd only after all reads: if
//! the process is still alive then, its pid was never free to be reused, so
//! everything read belonged to it.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use aws_lc_rs::digest;
use serde::Serialize;

use crate::pidfd::PidFd;
use crate::selector::Selector;

/// Cap for small /proc text files (stat, status, cgroup, comm).
const SMALL_FILE_LIMIT: u64 = 64 * 1024;
/// Cap for cmdline: argv can be many MiB, but no selector can be longer than
/// 4096 bytes, so reading further buys nothing and costs memory.
const CMDLINE_LIMIT: u64 = 1024 * 1024;
/// Upper bound on cached executable hashes before eviction.
const HASH_CACHE_MAX: usize = 4096;
/// How often to re-read a process that exec'd while we were reading it.
const ATTEMPTS: usize = 3;

/// Errors from attestation. Messages name the pid and the file involved.
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    /// The process is gone (or a zombie); whatever was read may belong to a
    /// different process that reused the pid, so nothing is returned.
    #[error("pid {pid}: process has exited")]
    Exited { pid: i32 },
    #[error("pid {pid}: reading {file}: {source}")]
    Io {
        pid: i32,
        file: String,
        #[source]
        source: io::Error,
    },
    #[error("pid {pid}: parsing {file}: {what}")]
    Parse {
        pid: i32,
        file: String,
        what: String,
    },
    /// The process exec'd repeatedly while it was being read.
    #[error("pid {pid}: executable changed while attesting (exec in progress); retry later")]
    Unstable { pid: i32 },
    #[error("pid {pid}: not a valid process id")]
    InvalidPid { pid: i32 },
    #[error("pid {pid}: pidfd_open: {source}")]
    PidFdOpen {
        pid: i32,
        #[source]
        source: io::Error,
    },
    /// An fd handed to `PidFd::from_owned` is unusable.
    #[error("fd {fd}: {what}")]
    FdInfo { fd: i32, what: String },
    #[error("getsockopt(SO_PEERPIDFD): {source}")]
    PeerPidFd {
        #[source]
        source: io::Error,
    },
}

/// What the kernel's record of a process's exec says about it, filled in
/// by whoever owns that record (the agent). A process with `blocking`
/// entries holds no identity; `findings` name the checks it failed that an
/// identity may explicitly accept (`spec.allowExec`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ExecCheck {
    /// Failed checks an identity may accept by name: `LD_PRELOAD`,
    /// `LD_AUDIT`, `LD_LIBRARY_PATH`, `LD_*`, `GCONV_PATH`,
    /// `GLIBC_TUNABLES`, `runtime-env`, `mount-namespace`, `chroot`,
    /// `filesystem`, `interpreter`, `seccomp-notify`, `user-namespace`.
    pub findings: Vec<String>,
    /// Why no identity is possible at all (not recorded, the exe is not
    /// what was executed, marked since).
    pub blocking: Vec<String>,
    /// The name of the file the kernel recorded as executed (what audit
    /// shows when /proc's exe link says something else).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub executed: Option<String>,
}

/// The names of [`ExecCheck::findings`] an identity may accept.
pub const EXEC_CHECKS: [&str; 13] = [
    "LD_PRELOAD",
    "LD_AUDIT",
    "LD_LIBRARY_PATH",
    "LD_*",
    "GCONV_PATH",
    "GLIBC_TUNABLES",
    "runtime-env",
    "mount-namespace",
    "chroot",
    "filesystem",
    "interpreter",
    "seccomp-notify",
    "user-namespace",
];

/// How far attestation may touch the executable file itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FileAccess {
    /// Open, hash and parse it (a local filesystem of the host's).
    #[default]
    Full,
    /// Read only links: the file may be served by its own user (FUSE) or
    /// live in someone's private mounts, where opening it can block or
    /// lie. No hash, no path check, no interpreter.
    LinksOnly,
}

/// What attestation learned about one process.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProcessInfo {
    pub pid: i32,
    pub ppid: i32,
    /// Field 22 of /proc/PID/stat: clock ticks since boot. With the pid it
    /// identifies a process instance.
    pub start_time: u64,
    /// Effective uid and gid.
    pub uid: u32,
    pub gid: u32,
    /// Names from the host's /etc/passwd and /etc/group.
    pub user: Option<String>,
    pub group: Option<String>,
    pub exe_path: String,
    /// The executable's inode has no links left (replaced or removed).
    pub exe_deleted: bool,
    /// Device (`st_dev`) and inode of the file /proc/PID/exe opens.
    pub exe_dev: u64,
    pub exe_ino: u64,
    /// `exe_path` names that same file in this agent's (the host's) view of
    /// the filesystem. Only then can a `process:path` selector match.
    pub exe_path_host: bool,
    /// SHA-256 of the executable inode actually mapped, lowercase hex;
    /// empty when it was not hashed (see `sha256_skipped`).
    pub sha256: String,
    /// Why the executable was not hashed (too large, too slow, not a file
    /// we may open).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256_skipped: Option<String>,
    /// The ELF interpreter (PT_INTERP) the executable names, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interpreter: Option<String>,
    /// The interpreter is a standard one: an `ld-*.so*` under the system
    /// library directories, owned by root and writable by root only (or
    /// there is none: a static executable).
    pub interpreter_standard: bool,
    /// The kernel's exec record checks (filled in by the agent).
    pub exec: ExecCheck,
    /// /proc/PID/comm; set by the process itself, so weak on its own.
    pub name: String,
    /// /proc/PID/cmdline; lives in the process's memory, so weak on its own.
    pub cmdline: Vec<String>,
    pub parent_path: Option<String>,
    /// Cgroup v2 path ("0::" line), relative to the reader's cgroup namespace.
    pub cgroup: String,
    pub container_id: Option<String>,
    /// What the container runtime's own state says of that container (see
    /// [`crate::container`]); None when it does not vouch for this process.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<crate::container::ContainerInfo>,
    pub systemd_unit: Option<String>,
}

impl ProcessInfo {
    /// Every selector this process satisfies, canonical strings, sorted.
    ///
    /// `process:cmdline-prefix` is omitted (it is a matching form, every
    /// prefix would qualify), as are values a selector could not hold
    /// (empty, over 4096 bytes, a relative path, an empty cgroup).
    pub fn selectors(&self) -> Vec<String> {
        let mut all = vec![
            Selector::Uid(self.uid),
            Selector::Gid(self.gid),
            Selector::Sha256(self.sha256.clone()),
            Selector::Name(self.name.clone()),
            Selector::Cmdline(self.cmdline.join(" ")),
            Selector::CgroupPath(self.cgroup.clone()),
        ];
        let optional = [
            (Selector::User as fn(String) -> Selector, &self.user),
            (Selector::Group, &self.group),
            (Selector::ParentPath, &self.parent_path),
            (Selector::ContainerId, &self.container_id),
            (Selector::SystemdUnit, &self.systemd_unit),
        ];
        for (make, value) in optional {
            if let Some(v) = value {
                all.push(make(v.clone()));
            }
        }
        if self.exe_path_host {
            all.push(Selector::Path(self.exe_path.clone()));
        }
        if let Some(c) = &self.container {
            all.push(Selector::ContainerName(c.name.clone()));
            all.push(Selector::ContainerImage(c.image.clone()));
            all.push(Selector::ContainerRuntime(c.runtime.clone()));
            if let Some(p) = &c.path {
                all.push(Selector::ContainerPath(p.clone()));
            }
        }
        // Keep only what a manifest could actually contain, so every listed
        // string parses back to a selector that matches this process.
        let mut strings: Vec<String> = all
            .iter()
            .map(ToString::to_string)
            .filter(|s| Selector::parse(s).is_ok_and(|p| all.contains(&p) && p.matches(self)))
            .collect();
        strings.sort();
        strings.dedup();
        strings
    }
}

/// The fields of /proc/PID/stat that attestation uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatFields {
    /// Field 3 (R, S, D, Z, X, ...).
    pub state: char,
    /// Field 4.
    pub ppid: i32,
    /// Field 22.
    pub start_time: u64,
}

/// Parses /proc/PID/stat. The comm field (2) may contain spaces and
/// parentheses, so the fixed fields start after the LAST ')'.
pub fn parse_stat(pid: i32, content: &[u8]) -> Result<StatFields, AttestError> {
    let err = |what: String| AttestError::Parse {
        pid,
        file: format!("/proc/{pid}/stat"),
        what,
    };
    let close = content
        .iter()
        .rposition(|&b| b == b')')
        .ok_or_else(|| err("no ')' closing the comm field".into()))?;
    let open = content
        .iter()
        .position(|&b| b == b'(')
        .filter(|&o| o < close)
        .ok_or_else(|| err("no '(' opening the comm field".into()))?;
    let head =
        std::str::from_utf8(&content[..open]).map_err(|_| err("pid field is not UTF-8".into()))?;
    if head.trim().parse::<i32>().ok() != Some(pid) {
        return Err(err(format!("pid field {:?} does not match", head.trim())));
    }
    let tail = std::str::from_utf8(&content[close + 1..])
        .map_err(|_| err("fields after comm are not UTF-8".into()))?;
    let fields: Vec<&str> = tail.split_ascii_whitespace().collect();
    // fields[0] is field 3 of the file, so field N is fields[N - 3].
    let get = |n: usize| {
        fields
            .get(n - 3)
            .copied()
            .ok_or_else(|| err(format!("field {n} missing")))
    };
    let state_str = get(3)?;
    let mut chars = state_str.chars();
    let state = match (chars.next(), chars.next()) {
        (Some(c), None) => c,
        _ => {
            return Err(err(format!(
                "field 3 (state) {state_str:?} is not one character"
            )));
        }
    };
    let ppid_str = get(4)?;
    let ppid = ppid_str
        .parse::<i32>()
        .map_err(|_| err(format!("field 4 (ppid) {ppid_str:?} is not an integer")))?;
    let start_str = get(22)?;
    let start_time = start_str.parse::<u64>().map_err(|_| {
        err(format!(
            "field 22 (starttime) {start_str:?} is not an integer"
        ))
    })?;
    Ok(StatFields {
        state,
        ppid,
        start_time,
    })
}

/// Effective uid and gid: the second column of the Uid:/Gid: lines.
fn parse_status(pid: i32, content: &[u8]) -> Result<(u32, u32), AttestError> {
    let file = || format!("/proc/{pid}/status");
    let text = std::str::from_utf8(content).map_err(|_| AttestError::Parse {
        pid,
        file: file(),
        what: "not UTF-8".into(),
    })?;
    let effective = |key: &str| -> Result<u32, AttestError> {
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .ok_or_else(|| AttestError::Parse {
                pid,
                file: file(),
                what: format!("no {key} line"),
            })?;
        line.split_ascii_whitespace()
            .nth(1)
            .and_then(|v| v.parse::<u32>().ok())
            .ok_or_else(|| AttestError::Parse {
                pid,
                file: file(),
                what: format!("{key} line {line:?} has no effective id"),
            })
    };
    Ok((effective("Uid:")?, effective("Gid:")?))
}

/// The cgroup v2 path from /proc/PID/cgroup ("0::PATH"); empty when the
/// process has no v2 membership (pure cgroup v1 host).
fn parse_cgroup(pid: i32, content: &[u8]) -> Result<String, AttestError> {
    let text = std::str::from_utf8(content).map_err(|_| AttestError::Parse {
        pid,
        file: format!("/proc/{pid}/cgroup"),
        what: "not UTF-8".into(),
    })?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("")
        .to_owned())
}

fn parse_cmdline(content: &[u8]) -> Vec<String> {
    let body = content.strip_suffix(b"\0").unwrap_or(content);
    if body.is_empty() {
        return Vec::new();
    }
    body.split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

fn cgroup_segments(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|s| !s.is_empty())
}

fn is_unit(segment: &str) -> bool {
    [".service", ".scope"]
        .iter()
        .any(|suf| segment.len() > suf.len() && segment.ends_with(suf))
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The systemd unit a cgroup path belongs to: the OUTERMOST segment that
/// is a unit (`.service` or `.scope`).
///
/// Outermost, because segments below a unit are chosen by whoever the
/// subtree is delegated to (a user's systemd under `user@1000.service`, a
/// container's init): otherwise any user could run
/// `systemd-run --user --unit=nginx.service` and claim
/// `systemd:unit:nginx.service`. System units never nest, so the outermost
/// unit is the one PID 1 placed the process in.
pub fn systemd_unit_from_cgroup(path: &str) -> Option<String> {
    cgroup_segments(path)
        .find(|s| is_unit(s))
        .map(str::to_owned)
}

/// The container id in a cgroup path: a 64-hex id in a runtime's scope
/// segment (docker-, cri-containerd-, crio-, libpod-<id>.scope), a bare id
/// under a `docker` segment, or a bare id under a kubepods `pod<uid>` segment.
///
/// The outermost match wins and scanning stops at the first systemd unit,
/// because names below a delegation point are chosen by its owner (nested
/// containers, rootless runtimes under user@UID.service) and could imitate
/// another container's id.
pub fn container_id_from_cgroup(path: &str) -> Option<String> {
    const RUNTIME_PREFIXES: [&str; 4] = ["docker-", "cri-containerd-", "crio-", "libpod-"];
    let mut prev: Option<&str> = None;
    let mut kubepods = false;
    for seg in cgroup_segments(path) {
        if seg.starts_with("kubepods") {
            kubepods = true;
        }
        if let Some(base) = seg.strip_suffix(".scope") {
            let id = RUNTIME_PREFIXES.iter().find_map(|p| base.strip_prefix(p));
            if let Some(id) = id.filter(|id| is_hex64(id)) {
                return Some(id.to_owned());
            }
        }
        // podman with the cgroupfs manager: `<parent>/libpod-<id>`.
        if let Some(id) = seg.strip_prefix("libpod-").filter(|id| is_hex64(id)) {
            return Some(id.to_owned());
        }
        let under_docker = prev == Some("docker");
        let under_pod = kubepods && prev.is_some_and(|p| p.starts_with("pod"));
        if (under_docker || under_pod) && is_hex64(seg) {
            return Some(seg.to_owned());
        }
        if is_unit(seg) {
            return None;
        }
        prev = Some(seg);
    }
    None
}

/// Cache key for executable hashes. ctime cannot be set by users and moves
/// on every content or metadata change (with multigrain timestamps, even
/// within one tick after we looked), so a rewritten file never hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ExeKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl ExeKey {
    fn of(md: &std::fs::Metadata) -> ExeKey {
        ExeKey {
            dev: md.dev(),
            ino: md.ino(),
            size: md.size(),
            mtime: (md.mtime(), md.mtime_nsec()),
            ctime: (md.ctime(), md.ctime_nsec()),
        }
    }
}

/// uid/gid → name from a colon-separated database (/etc/passwd,
/// /etc/group), re-read only when the file changes.
struct IdNames {
    path: PathBuf,
    cache: Mutex<Option<(ExeKey, HashMap<u32, String>)>>,
}

impl IdNames {
    fn new(path: impl Into<PathBuf>) -> IdNames {
        IdNames {
            path: path.into(),
            cache: Mutex::new(None),
        }
    }

    fn name_of(&self, id: u32) -> Option<String> {
        let file = File::open(&self.path).ok()?;
        let key = ExeKey::of(&file.metadata().ok()?);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = matches!(&*cache, Some((k, _)) if *k == key);
        if !fresh {
            let mut text = Vec::new();
            file.take(16 * 1024 * 1024).read_to_end(&mut text).ok()?;
            *cache = Some((key, parse_id_db(&String::from_utf8_lossy(&text))));
        }
        cache.as_ref().and_then(|(_, map)| map.get(&id).cloned())
    }
}

/// name:passwd:id:... lines; the first entry for an id wins, as with NSS
/// "files".
fn parse_id_db(text: &str) -> HashMap<u32, String> {
    let mut map = HashMap::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let mut fields = line.split(':');
        let (Some(name), Some(_), Some(id)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        // NIS compat lines (+/-) are not local names.
        if name.is_empty() || name.starts_with(['+', '-']) {
            continue;
        }
        if let Ok(id) = id.parse::<u32>() {
            map.entry(id).or_insert_with(|| name.to_owned());
        }
    }
    map
}

/// A `/proc/PID` directory fd; every read goes through `openat` on it.
struct ProcDir {
    pid: i32,
    fd: OwnedFd,
}

impl ProcDir {
    fn open(pid: i32) -> Result<ProcDir, AttestError> {
        let path = format!("/proc/{pid}");
        let cpath = CString::new(path.clone()).map_err(|_| AttestError::InvalidPid { pid })?;
        // SAFETY: cpath is a valid NUL-terminated string.
        let raw = unsafe {
            libc::open(
                cpath.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            let source = io::Error::last_os_error();
            if matches!(source.raw_os_error(), Some(libc::ENOENT | libc::ESRCH)) {
                return Err(AttestError::Exited { pid });
            }
            return Err(AttestError::Io {
                pid,
                file: path,
                source,
            });
        }
        // SAFETY: fresh fd from open(2), owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(ProcDir { pid, fd })
    }

    fn name(&self, file: &CStr) -> String {
        format!("/proc/{}/{}", self.pid, file.to_string_lossy())
    }

    fn io_err(&self, file: &CStr, source: io::Error) -> AttestError {
        AttestError::Io {
            pid: self.pid,
            file: self.name(file),
            source,
        }
    }

    fn open_file(&self, file: &CStr) -> Result<File, AttestError> {
        // SAFETY: the dir fd is open and file is NUL-terminated.
        let raw = unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                file.as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOCTTY,
            )
        };
        if raw < 0 {
            return Err(self.io_err(file, io::Error::last_os_error()));
        }
        // SAFETY: fresh fd from openat(2), owned by nobody else.
        Ok(File::from(unsafe { OwnedFd::from_raw_fd(raw) }))
    }

    fn read(&self, file: &CStr, limit: u64) -> Result<Vec<u8>, AttestError> {
        let f = self.open_file(file)?;
        let mut buf = Vec::new();
        f.take(limit)
            .read_to_end(&mut buf)
            .map_err(|e| self.io_err(file, e))?;
        Ok(buf)
    }

    fn readlink(&self, file: &CStr) -> Result<Vec<u8>, AttestError> {
        let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
        // SAFETY: buf is valid for buf.len() bytes of writes.
        let n = unsafe {
            libc::readlinkat(
                self.fd.as_raw_fd(),
                file.as_ptr(),
                buf.as_mut_ptr().cast::<libc::c_char>(),
                buf.len(),
            )
        };
        let n = usize::try_from(n).map_err(|_| self.io_err(file, io::Error::last_os_error()))?;
        if n >= buf.len() {
            return Err(AttestError::Parse {
                pid: self.pid,
                file: self.name(file),
                what: "link target longer than PATH_MAX".into(),
            });
        }
        buf.truncate(n);
        Ok(buf)
    }

    /// The exe link target only (nothing is opened), without a
    /// " (deleted)" suffix.
    fn exe_link(&self) -> Result<String, AttestError> {
        let link = String::from_utf8_lossy(&self.readlink(c"exe")?).into_owned();
        Ok(match link.strip_suffix(" (deleted)") {
            Some(p) => p.to_owned(),
            None => link,
        })
    }

    /// The exe link target and the open executable. The path loses a
    /// " (deleted)" suffix only when the inode really has no links, so a file
    /// literally named "x (deleted)" keeps its name.
    fn exe(&self) -> Result<(File, String, bool), AttestError> {
        let exe = self.open_file(c"exe")?;
        let md = exe.metadata().map_err(|e| self.io_err(c"exe", e))?;
        let deleted = md.nlink() == 0;
        let link = String::from_utf8_lossy(&self.readlink(c"exe")?).into_owned();
        let path = match link.strip_suffix(" (deleted)") {
            Some(p) if deleted => p.to_owned(),
            _ => link,
        };
        Ok((exe, path, deleted))
    }
}

/// Bounds on hashing executables: an attacker can exec a huge (sparse)
/// file or many of them, and hashing must never stall attestation of
/// everyone else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashLimits {
    /// Larger executables are not hashed (their `process:sha256` selectors
    /// cannot match).
    pub max_bytes: u64,
    /// Hashing one file stops after this long.
    pub max_time: std::time::Duration,
    /// Hashes running at once, and per uid of the process being attested.
    pub parallel: usize,
    pub per_uid: usize,
}

impl Default for HashLimits {
    fn default() -> Self {
        HashLimits {
            max_bytes: 1 << 30,
            max_time: std::time::Duration::from_secs(10),
            parallel: 2,
            per_uid: 1,
        }
    }
}

/// Why an executable was not hashed: the attestation goes on without a
/// hash (and `process:sha256` selectors cannot match).
enum HashSkip {
    Skipped(String),
    Failed(AttestError),
}

/// Reads process attributes and caches executable hashes.
pub struct Attestor {
    hashes: Mutex<HashMap<ExeKey, String>>,
    users: IdNames,
    groups: IdNames,
    /// Admission to hashing: `parallel` at once, `per_uid` for any one
    /// uid, so one user's processes cannot take every slot.
    gate: Arc<crate::slots::KeyedSlots<u32>>,
    limits: HashLimits,
    runtimes: crate::container::Runtimes,
    store: crate::container::Store,
    /// Paths are the host's as this root shows them, opened once (the
    /// process named for it may exit, and its pid be reused). Outer None:
    /// the attestor's own root; inner None: it could not be opened, and no
    /// path is the host's.
    host_root: Option<Option<std::fs::File>>,
}

impl Default for Attestor {
    fn default() -> Self {
        Self::new()
    }
}

/// How much of an executable is read to find its ELF interpreter: program
/// headers and PT_INTERP sit at the start of every real ELF file.
const ELF_HEAD: u64 = 64 * 1024;

/// Directories a standard ELF interpreter lives in.
const LOADER_DIRS: [&str; 6] = [
    "/lib",
    "/lib64",
    "/lib32",
    "/usr/lib",
    "/usr/lib64",
    "/usr/lib32",
];

impl Attestor {
    pub fn new() -> Attestor {
        Self::with_limits(HashLimits::default())
    }

    pub fn with_limits(limits: HashLimits) -> Attestor {
        Attestor {
            hashes: Mutex::new(HashMap::new()),
            users: IdNames::new("/etc/passwd"),
            groups: IdNames::new("/etc/group"),
            gate: crate::slots::KeyedSlots::new(limits.per_uid, limits.parallel),
            limits,
            runtimes: crate::container::Runtimes::default(),
            store: crate::container::Store::default(),
            host_root: None,
        }
    }

    /// Takes the host's view of paths from `pid`'s root (an attestor in a
    /// container with the host's pid namespace).
    pub fn with_host_pid(mut self, pid: Option<i32>) -> Attestor {
        self.host_root = pid.map(|p| std::fs::File::open(format!("/proc/{p}/root")).ok());
        self
    }

    /// Reads container runtimes' state from these places instead.
    pub fn with_runtimes(mut self, runtimes: crate::container::Runtimes) -> Attestor {
        self.runtimes = runtimes;
        self
    }

    /// Attests the process behind `pidfd`. Returns [`AttestError::Exited`]
    /// if it is gone by the end of the reads, because then the pid may have
    /// been reused mid-way and the data cannot be attributed to it.
    pub fn attest(&self, pidfd: &PidFd) -> Result<ProcessInfo, AttestError> {
        self.attest_with(pidfd, FileAccess::Full)
    }

    /// As [`attest`](Self::attest), touching the executable only as
    /// `access` allows.
    pub fn attest_with(
        &self,
        pidfd: &PidFd,
        access: FileAccess,
    ) -> Result<ProcessInfo, AttestError> {
        let pid = pidfd.pid();
        let mut result = Err(AttestError::Unstable { pid });
        for _ in 0..ATTEMPTS {
            result = self.read_process(pid, access);
            if !matches!(result, Err(AttestError::Unstable { .. })) {
                break;
            }
        }
        // Checked after the reads, whatever their outcome: a failed read of
        // a dead process is an exit, not an I/O problem.
        if !pidfd.is_alive() {
            return Err(AttestError::Exited { pid });
        }
        result
    }

    /// Convenience: `PidFd::open(pid)` then [`Attestor::attest`].
    pub fn attest_pid(&self, pid: i32) -> Result<ProcessInfo, AttestError> {
        self.attest(&PidFd::open(pid)?)
    }

    /// Number of cached executable hashes.
    pub fn hash_cache_len(&self) -> usize {
        self.hashes.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn read_process(&self, pid: i32, access: FileAccess) -> Result<ProcessInfo, AttestError> {
        let dir = ProcDir::open(pid)?;
        let first = parse_stat(pid, &dir.read(c"stat", SMALL_FILE_LIMIT)?)?;
        // Zombies have no exe or memory left to read.
        if matches!(first.state, 'Z' | 'X' | 'x') {
            return Err(AttestError::Exited { pid });
        }
        let (uid, gid) = parse_status(pid, &dir.read(c"status", SMALL_FILE_LIMIT)?)?;
        let mut info = ProcessInfo {
            pid,
            uid,
            gid,
            start_time: first.start_time,
            ..ProcessInfo::default()
        };
        let exe = match access {
            FileAccess::Full => {
                let (exe, exe_path, exe_deleted) = dir.exe()?;
                let md = exe.metadata().map_err(|e| dir.io_err(c"exe", e))?;
                info.exe_dev = md.dev();
                info.exe_ino = md.ino();
                // The same file at the same path from where we stand: the
                // path means what the host means by it.
                info.exe_path_host = !exe_deleted
                    && match &self.host_root {
                        None => std::fs::metadata(&exe_path)
                            .is_ok_and(|h| (h.dev(), h.ino()) == (md.dev(), md.ino())),
                        Some(Some(root)) => {
                            crate::container::names_in(root, &exe_path, md.dev(), md.ino())
                        }
                        Some(None) => false,
                    };
                info.exe_path = exe_path;
                info.exe_deleted = exe_deleted;
                match self.hash_exe(&dir, &exe, uid) {
                    Ok(h) => info.sha256 = h,
                    Err(HashSkip::Skipped(why)) => info.sha256_skipped = Some(why),
                    Err(HashSkip::Failed(e)) => return Err(e),
                }
                let (interp, standard) = elf_interpreter(&exe);
                info.interpreter = interp;
                info.interpreter_standard = standard;
                Some(exe)
            }
            FileAccess::LinksOnly => {
                info.exe_path = dir.exe_link()?;
                info.sha256_skipped = Some("the executable's filesystem is not trusted".into());
                None
            }
        };
        let comm = dir.read(c"comm", SMALL_FILE_LIMIT)?;
        info.name = String::from_utf8_lossy(comm.strip_suffix(b"\n").unwrap_or(&comm)).into_owned();
        info.cmdline = parse_cmdline(&dir.read(c"cmdline", CMDLINE_LIMIT)?);
        info.cgroup = parse_cgroup(pid, &dir.read(c"cgroup", SMALL_FILE_LIMIT)?)?;
        // The parent's link only: opening its file could block as above.
        let mut parent_path = if first.ppid > 0 {
            ProcDir::open(first.ppid).and_then(|p| p.exe_link()).ok()
        } else {
            None
        };

        let last = parse_stat(pid, &dir.read(c"stat", SMALL_FILE_LIMIT)?)?;
        if last.start_time != first.start_time {
            return Err(AttestError::Exited { pid });
        }
        // A parent that died was replaced by a reaper, and its pid may have
        // been reused before we read its exe: drop what we read.
        if last.ppid != first.ppid {
            parent_path = None;
        }
        // An exec during the reads would mix two programs' attributes.
        if let Some(exe) = exe {
            let md_now = dir
                .open_file(c"exe")?
                .metadata()
                .map_err(|e| dir.io_err(c"exe", e))?;
            let md_then = exe.metadata().map_err(|e| dir.io_err(c"exe", e))?;
            if (md_now.dev(), md_now.ino()) != (md_then.dev(), md_then.ino()) {
                return Err(AttestError::Unstable { pid });
            }
        } else if dir.exe_link()? != info.exe_path {
            return Err(AttestError::Unstable { pid });
        }
        info.ppid = last.ppid;
        info.user = self.users.name_of(uid);
        info.group = self.groups.name_of(gid);
        info.parent_path = parent_path;
        info.container_id = container_id_from_cgroup(&info.cgroup);
        if let Some(id) = &info.container_id {
            let exe =
                (!info.exe_deleted && info.exe_ino != 0).then_some((info.exe_dev, info.exe_ino));
            info.container = self
                .runtimes
                .lookup(&self.store, id, pid, exe, &info.exe_path);
        }
        info.systemd_unit = systemd_unit_from_cgroup(&info.cgroup);
        Ok(info)
    }

    fn hash_exe(&self, dir: &ProcDir, exe: &File, uid: u32) -> Result<String, HashSkip> {
        let before = exe
            .metadata()
            .map_err(|e| HashSkip::Failed(dir.io_err(c"exe", e)))?;
        let key = ExeKey::of(&before);
        if let Some(h) = self
            .hashes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(h.clone());
        }
        let limits = self.limits;
        if key.size > limits.max_bytes {
            return Err(HashSkip::Skipped(format!(
                "executable is {} bytes; files over {} are not hashed",
                key.size, limits.max_bytes
            )));
        }
        let deadline = std::time::Instant::now() + limits.max_time;
        let Some(_slot) = self.gate.take_until(uid, deadline) else {
            return Err(HashSkip::Skipped(format!(
                "no hashing slot for uid {uid} within {:?}",
                limits.max_time
            )));
        };
        let mut ctx = digest::Context::new(&digest::SHA256);
        let mut buf = vec![0u8; 64 * 1024];
        let mut total: u64 = 0;
        let mut reader = exe;
        loop {
            if std::time::Instant::now() > deadline {
                return Err(HashSkip::Skipped(format!(
                    "hashing took longer than {:?}",
                    limits.max_time
                )));
            }
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    ctx.update(&buf[..n]);
                    total = total.saturating_add(n as u64);
                    // A file that grows while we read is not what was
                    // measured, and must not keep us reading.
                    if total > key.size {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(HashSkip::Failed(dir.io_err(c"exe", e))),
            }
        }
        let after = exe
            .metadata()
            .map_err(|e| HashSkip::Failed(dir.io_err(c"exe", e)))?;
        // A file written while we read it yields a hash of no real content.
        if ExeKey::of(&after) != key || total != key.size {
            return Err(HashSkip::Failed(AttestError::Parse {
                pid: dir.pid,
                file: dir.name(c"exe"),
                what: "executable changed while it was being hashed".into(),
            }));
        }
        let hex = hex::encode(ctx.finish().as_ref());
        let mut cache = self.hashes.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= HASH_CACHE_MAX {
            // Arbitrary eviction keeps this O(1); a miss only costs a re-hash.
            if let Some(victim) = cache.keys().next().copied() {
                cache.remove(&victim);
            }
        }
        cache.insert(key, hex.clone());
        Ok(hex)
    }
}

/// The PT_INTERP of an ELF executable, and whether it is a standard one.
/// Not ELF (a script's interpreter is the exe itself), static, or
/// unreadable: no interpreter; unreadable counts as non-standard.
fn elf_interpreter(exe: &File) -> (Option<String>, bool) {
    use std::os::unix::fs::FileExt as _;
    let mut head = vec![0u8; ELF_HEAD as usize];
    let mut got = 0usize;
    while got < head.len() {
        match exe.read_at(&mut head[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return (None, false),
        }
    }
    head.truncate(got);
    match parse_interp(&head) {
        Ok(None) => (None, true),
        Ok(Some(path)) => {
            let standard = is_standard_loader(&path);
            (Some(path), standard)
        }
        Err(UnreadableElf) => (None, false),
    }
}

/// An ELF file whose headers cannot be read from the bytes given (the
/// caller treats its interpreter as non-standard).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnreadableElf;

/// PT_INTERP from the first bytes of an ELF file. `Ok(None)`: not ELF or no
/// interpreter; `Err`: ELF whose headers we cannot read from `head`.
pub fn parse_interp(head: &[u8]) -> Result<Option<String>, UnreadableElf> {
    use object::read::elf::ProgramHeader as _;
    if !head.starts_with(b"\x7fELF") {
        return Ok(None);
    }
    fn interp<E: object::read::elf::FileHeader>(
        head: &[u8],
    ) -> Result<Option<String>, UnreadableElf> {
        let hdr = E::parse(head).map_err(|_| UnreadableElf)?;
        let endian = hdr.endian().map_err(|_| UnreadableElf)?;
        for ph in hdr
            .program_headers(endian, head)
            .map_err(|_| UnreadableElf)?
        {
            if ph.p_type(endian) == object::elf::PT_INTERP {
                let raw = ph.data(endian, head).map_err(|_| UnreadableElf)?;
                let raw = raw.split(|&b| b == 0).next().unwrap_or(raw);
                return Ok(Some(String::from_utf8_lossy(raw).into_owned()));
            }
        }
        Ok(None)
    }
    match head.get(4) {
        Some(2) => interp::<object::elf::FileHeader64<object::Endianness>>(head),
        Some(1) => interp::<object::elf::FileHeader32<object::Endianness>>(head),
        _ => Err(UnreadableElf),
    }
}

/// A standard dynamic loader: `ld-*.so*` directly in (or in a multiarch
/// directory of) a system library directory, a regular file owned by root
/// that only root can write.
fn is_standard_loader(path: &str) -> bool {
    let p = std::path::Path::new(path);
    let name_ok = p
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("ld-") && n.contains(".so"));
    let dir_ok = p.parent().and_then(|d| d.to_str()).is_some_and(|d| {
        LOADER_DIRS.iter().any(|l| {
            d == *l
                || d.strip_prefix(l)
                    .and_then(|rest| rest.strip_prefix('/'))
                    .is_some_and(|sub| !sub.is_empty() && !sub.contains('/'))
        })
    });
    if !name_ok || !dir_ok || path.contains("/../") || path.contains("/./") {
        return false;
    }
    std::fs::metadata(p).is_ok_and(|m| {
        use std::os::unix::fs::PermissionsExt as _;
        m.is_file() && m.uid() == 0 && m.permissions().mode() & 0o022 == 0
    })
}

/// Pids of all processes visible in /proc (threads are not listed there at
/// top level), ascending.
pub fn list_pids() -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<i32> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
        .filter(|&p| p > 0)
        .collect();
    pids.sort_unstable();
    pids
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat_line(pid: i32, comm: &str, ppid: i32, start: u64) -> Vec<u8> {
        // 52 fields as in Linux 6.x; field 22 is starttime.
        let mut fields: Vec<String> = vec![
            pid.to_string(),
            format!("({comm})"),
            "S".into(),
            ppid.to_string(),
        ];
        for n in 5..=52 {
            fields.push(if n == 22 {
                start.to_string()
            } else {
                "0".into()
            });
        }
        fields.join(" ").into_bytes()
    }

    #[test]
    fn stat_with_weird_comm() {
        for comm in [")) x", "a b c", "(", ")", "x) S 99 (", ""] {
            let line = stat_line(123, comm, 77, 987654);
            let st = parse_stat(123, &line).unwrap();
            assert_eq!(
                st,
                StatFields {
                    state: 'S',
                    ppid: 77,
                    start_time: 987654
                },
                "comm {comm:?}"
            );
        }
    }

    #[test]
    fn stat_garbage_is_error_not_panic() {
        let good = stat_line(5, "sh", 1, 42);
        for cut in 0..good.len() {
            let _ = parse_stat(5, &good[..cut]);
        }
        for bad in [
            &b""[..],
            b")",
            b"(",
            b"5 (x",
            b"5 (x) ",
            b"5 (x) S",
            b"5 (x) SS 1",
            b"\xff (x) S 1",
            b"6 (x) S 1",
        ] {
            assert!(parse_stat(5, bad).is_err(), "{bad:?}");
        }
        // Field 22 missing.
        assert!(parse_stat(5, b"5 (x) S 1 2 3").is_err());
        // Wrong pid is refused.
        assert!(parse_stat(6, &good).is_err());
        let e = parse_stat(5, b"5 (x) S one").unwrap_err().to_string();
        assert!(
            e.contains("pid 5") && e.contains("/proc/5/stat") && e.contains("ppid"),
            "{e}"
        );
    }

    #[test]
    fn status_effective_ids() {
        let s = b"Name:\tx\nUid:\t1000\t65534\t1000\t1000\nGid:\t100\t200\t100\t100\n";
        assert_eq!(parse_status(1, s).unwrap(), (65534, 200));
        assert!(parse_status(1, b"Uid:\t1\n").is_err());
        assert!(parse_status(1, b"Uid:\t1\nGid:\t2\n").is_err());
        assert!(parse_status(1, b"Uid:\t1\tx\nGid:\t2\t2\n").is_err());
    }

    #[test]
    fn cgroup_and_cmdline_parsing() {
        let c = b"12:memory:/foo\n0::/system.slice/nginx.service\n";
        assert_eq!(parse_cgroup(1, c).unwrap(), "/system.slice/nginx.service");
        assert_eq!(parse_cgroup(1, b"1:cpu:/\n").unwrap(), "");
        assert_eq!(
            parse_cmdline(b"/usr/bin/python3\0app.py\0"),
            ["/usr/bin/python3", "app.py"]
        );
        assert_eq!(
            parse_cmdline(b"nginx: worker process"),
            ["nginx: worker process"]
        );
        assert_eq!(parse_cmdline(b"a\0\0b\0"), ["a", "", "b"]);
        assert!(parse_cmdline(b"").is_empty());
    }

    #[test]
    fn container_ids_from_cgroups() {
        let id = "0123456789abcdef".repeat(4);
        for path in [
            format!("/system.slice/docker-{id}.scope"),
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-{id}.scope"
            ),
            format!("/kubepods.slice/x/crio-{id}.scope"),
            format!("/machine.slice/libpod-{id}.scope/container"),
            format!("/libpod_parent/libpod-{id}"),
            format!("/docker/{id}"),
            format!("/docker/{id}/docker/{}", "f".repeat(64)),
            format!("/kubepods/burstable/pod1234-5678/{id}"),
        ] {
            assert_eq!(
                container_id_from_cgroup(&path).as_deref(),
                Some(id.as_str()),
                "{path}"
            );
        }
        let upper = id.to_uppercase();
        for path in [
            "/".to_owned(),
            "/system.slice/nginx.service".to_owned(),
            format!("/system.slice/docker-{upper}.scope"),
            format!("/system.slice/docker-{}.scope", &id[..63]),
            format!("/system.slice/crio-conmon-{id}.scope"),
            format!("/somewhere/{id}"),
            // Inside a delegated subtree: the user could pick any name.
            format!("/user.slice/user-1000.slice/user@1000.service/app.slice/docker-{id}.scope"),
            format!("/system.slice/foo.service/docker/{id}"),
        ] {
            assert_eq!(container_id_from_cgroup(&path), None, "{path}");
        }
    }

    #[test]
    fn systemd_units_from_cgroups() {
        let cases = [
            ("/system.slice/nginx.service", Some("nginx.service")),
            ("/system.slice/nginx.service/sub", Some("nginx.service")),
            (
                "/user.slice/user-1000.slice/session-3.scope",
                Some("session-3.scope"),
            ),
            (
                "/user.slice/user-1000.slice/user@1000.service/app.slice/nginx.service",
                Some("user@1000.service"),
            ),
            (
                "/system.slice/docker-abc.scope/system.slice/sshd.service",
                Some("docker-abc.scope"),
            ),
            ("/init.scope", Some("init.scope")),
            ("/", None),
            ("", None),
            ("/system.slice/.service", None),
        ];
        for (path, want) in cases {
            assert_eq!(systemd_unit_from_cgroup(path).as_deref(), want, "{path}");
        }
    }

    #[test]
    fn elf_interpreters() {
        let f = File::open("/bin/true").expect("/bin/true");
        let (interp, standard) = elf_interpreter(&f);
        let interp = interp.expect("a dynamic executable");
        assert!(interp.contains("/ld-"), "{interp}");
        assert!(standard, "{interp} is the system loader");
        // Not ELF, truncated ELF, garbage: never a panic.
        assert_eq!(parse_interp(b"#!/bin/sh\n"), Ok(None));
        assert_eq!(parse_interp(b"\x7fELF\x02\x01"), Err(UnreadableElf));
        let head = std::fs::read("/bin/true").expect("read");
        for cut in [16, 64, 100, 200] {
            let _ = parse_interp(&head[..cut]);
        }
        assert!(!is_standard_loader("/tmp/ld-linux-x86-64.so.2"));
        assert!(!is_standard_loader("/lib64/../tmp/ld-x.so"));
        assert!(!is_standard_loader("/lib/x86_64-linux-gnu/evil.so"));
        assert!(!is_standard_loader("/lib/a/b/ld-linux.so.2"));
    }

    #[test]
    fn id_db_parsing() {
        let db = parse_id_db(
            "# c\nroot:x:0:0::/root:/bin/sh\nbad\n+nis::5:\ntoor:x:0:0\nnobody:x:65534:65534\n:x:7:\nweird:x:abc:\n",
        );
        assert_eq!(db.get(&0).map(String::as_str), Some("root"));
        assert_eq!(db.get(&65534).map(String::as_str), Some("nobody"));
        assert_eq!(db.len(), 2);
    }
}
