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
use std::sync::Mutex;

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

/// What attestation learned about one process.
#[derive(Debug, Clone, Serialize)]
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
    /// SHA-256 of the executable inode actually mapped, lowercase hex.
    pub sha256: String,
    /// /proc/PID/comm; set by the process itself, so weak on its own.
    pub name: String,
    /// /proc/PID/cmdline; lives in the process's memory, so weak on its own.
    pub cmdline: Vec<String>,
    pub parent_path: Option<String>,
    /// Cgroup v2 path ("0::" line), relative to the reader's cgroup namespace.
    pub cgroup: String,
    pub container_id: Option<String>,
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
            Selector::Path(self.exe_path.clone()),
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
        // Keep only what a manifest could actually contain, so every listed
        // string parses back to a selector that matches this process.
        let mut strings: Vec<String> = all
            .iter()
            .map(ToString::to_string)
            .filter(|s| Selector::parse(s).is_ok_and(|p| all.contains(&p)))
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

/// Reads process attributes and caches executable hashes.
pub struct Attestor {
    hashes: Mutex<HashMap<ExeKey, String>>,
    users: IdNames,
    groups: IdNames,
}

impl Default for Attestor {
    fn default() -> Self {
        Self::new()
    }
}

impl Attestor {
    pub fn new() -> Attestor {
        Attestor {
            hashes: Mutex::new(HashMap::new()),
            users: IdNames::new("/etc/passwd"),
            groups: IdNames::new("/etc/group"),
        }
    }

    /// Attests the process behind `pidfd`. Returns [`AttestError::Exited`]
    /// if it is gone by the end of the reads, because then the pid may have
    /// been reused mid-way and the data cannot be attributed to it.
    pub fn attest(&self, pidfd: &PidFd) -> Result<ProcessInfo, AttestError> {
        let pid = pidfd.pid();
        let mut result = Err(AttestError::Unstable { pid });
        for _ in 0..ATTEMPTS {
            result = self.read_process(pid);
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

    fn read_process(&self, pid: i32) -> Result<ProcessInfo, AttestError> {
        let dir = ProcDir::open(pid)?;
        let first = parse_stat(pid, &dir.read(c"stat", SMALL_FILE_LIMIT)?)?;
        // Zombies have no exe or memory left to read.
        if matches!(first.state, 'Z' | 'X' | 'x') {
            return Err(AttestError::Exited { pid });
        }
        let (uid, gid) = parse_status(pid, &dir.read(c"status", SMALL_FILE_LIMIT)?)?;
        let (exe, exe_path, exe_deleted) = dir.exe()?;
        let sha256 = self.hash_exe(&dir, &exe)?;
        let comm = dir.read(c"comm", SMALL_FILE_LIMIT)?;
        let name = String::from_utf8_lossy(comm.strip_suffix(b"\n").unwrap_or(&comm)).into_owned();
        let cmdline = parse_cmdline(&dir.read(c"cmdline", CMDLINE_LIMIT)?);
        let cgroup = parse_cgroup(pid, &dir.read(c"cgroup", SMALL_FILE_LIMIT)?)?;
        let mut parent_path = if first.ppid > 0 {
            ProcDir::open(first.ppid)
                .and_then(|p| p.exe())
                .ok()
                .map(|(_, path, _)| path)
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
        let md_now = dir
            .open_file(c"exe")?
            .metadata()
            .map_err(|e| dir.io_err(c"exe", e))?;
        let md_then = exe.metadata().map_err(|e| dir.io_err(c"exe", e))?;
        if (md_now.dev(), md_now.ino()) != (md_then.dev(), md_then.ino()) {
            return Err(AttestError::Unstable { pid });
        }

        Ok(ProcessInfo {
            pid,
            ppid: last.ppid,
            start_time: first.start_time,
            uid,
            gid,
            user: self.users.name_of(uid),
            group: self.groups.name_of(gid),
            exe_path,
            exe_deleted,
            sha256,
            name,
            cmdline,
            parent_path,
            container_id: container_id_from_cgroup(&cgroup),
            systemd_unit: systemd_unit_from_cgroup(&cgroup),
            cgroup,
        })
    }

    fn hash_exe(&self, dir: &ProcDir, exe: &File) -> Result<String, AttestError> {
        let before = exe.metadata().map_err(|e| dir.io_err(c"exe", e))?;
        let key = ExeKey::of(&before);
        if let Some(h) = self
            .hashes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(h.clone());
        }
        let mut ctx = digest::Context::new(&digest::SHA256);
        let mut buf = vec![0u8; 64 * 1024];
        let mut total: u64 = 0;
        let mut reader = exe;
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    ctx.update(&buf[..n]);
                    total = total.saturating_add(n as u64);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(dir.io_err(c"exe", e)),
            }
        }
        let after = exe.metadata().map_err(|e| dir.io_err(c"exe", e))?;
        // A file written while we read it yields a hash of no real content.
        if ExeKey::of(&after) != key || total != key.size {
            return Err(AttestError::Parse {
                pid: dir.pid,
                file: dir.name(c"exe"),
                what: "executable changed while it was being hashed".into(),
            });
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
    fn id_db_parsing() {
        let db = parse_id_db(
            "# c\nroot:x:0:0::/root:/bin/sh\nbad\n+nis::5:\ntoor:x:0:0\nnobody:x:65534:65534\n:x:7:\nweird:x:abc:\n",
        );
        assert_eq!(db.get(&0).map(String::as_str), Some("root"));
        assert_eq!(db.get(&65534).map(String::as_str), Some("nobody"));
        assert_eq!(db.len(), 2);
    }
}
