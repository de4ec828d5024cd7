//! Container attestation from the runtime's own state.
//!
//! A cgroup path names a container id, but a cgroup name is only a name.
//! What the container *is* (its name, its image, the runtime that started
//! it) comes from files the runtime keeps on the host, which nothing inside
//! the container can write:
//!
//! - the OCI runtime's state (`/run/runc/<id>/state.json`,
//!   `/run/crun/<id>/status`): the container's init process (pid and start
//!   time) and the bundle it was created from;
//! - the container engine's store (containers/storage, used by podman,
//!   buildah and CRI-O: `overlay-containers/containers.json`): the names and
//!   the image ID recorded when the container was created.
//!
//! The process is tied to that container by its cgroup (the id) and by its
//! pid namespace, which must be the one of the container's init process as
//! the runtime recorded it (same pid, same start time): a process that
//! moved into a pid namespace of its own, or a cgroup named after another
//! container, gets no container attributes at all, so every
//! `container:*` selector fails closed.

use std::fs::File;
use std::io::Read as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// The state files are small; anything larger is not a runtime's.
const STATE_LIMIT: u64 = 1 << 20;
/// The store's container list grows with the number of containers.
const STORE_LIMIT: u64 = 64 << 20;

/// What the runtime says of the container a process runs in.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ContainerInfo {
    pub id: String,
    /// The first name the engine recorded.
    pub name: String,
    /// Image ID, 64 lowercase hex digits.
    pub image: String,
    /// The image reference it was created from (informational: tags move).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_name: Option<String>,
    /// `runc` or `crun`.
    pub runtime: String,
    /// The executable path as the container sees it, when that path names
    /// the same file inside the container's root.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// Where runtimes keep their state.
#[derive(Debug, Clone)]
pub struct Runtimes {
    /// (runtime name, state root), tried in order.
    pub roots: Vec<(String, PathBuf)>,
    /// containers/storage's root.
    pub storage: PathBuf,
}

impl Default for Runtimes {
    fn default() -> Self {
        Runtimes {
            roots: vec![
                ("runc".into(), PathBuf::from("/run/runc")),
                ("crun".into(), PathBuf::from("/run/crun")),
            ],
            storage: PathBuf::from("/var/lib/containers/storage"),
        }
    }
}

#[derive(Deserialize)]
struct RuncState {
    init_process_pid: i32,
    init_process_start: u64,
}

#[derive(Deserialize)]
struct CrunStatus {
    pid: i32,
}

#[derive(Deserialize)]
struct StoredContainer {
    id: String,
    #[serde(default)]
    names: Vec<String>,
    #[serde(default)]
    image: String,
    #[serde(default)]
    metadata: String,
}

#[derive(Deserialize, Default)]
struct StoredMetadata {
    #[serde(rename = "image-name", default)]
    image_name: Option<String>,
}

/// The store's container list, cached while the file is unchanged.
#[derive(Default)]
pub struct Store {
    cache: Mutex<Option<(SystemTime, u64, Vec<StoredContainer>)>>,
}

impl Store {
    fn find(&self, storage: &Path, id: &str) -> Option<(String, String, Option<String>)> {
        let path = storage.join("overlay-containers/containers.json");
        let md = std::fs::metadata(&path).ok()?;
        let stamp = (md.modified().ok()?, md.len());
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = cache
            .as_ref()
            .is_some_and(|(t, len, _)| (*t, *len) == stamp);
        if !fresh {
            let bytes = read_bounded(&path, STORE_LIMIT)?;
            let list: Vec<StoredContainer> = serde_json::from_slice(&bytes).ok()?;
            *cache = Some((stamp.0, stamp.1, list));
        }
        let (_, _, list) = cache.as_ref()?;
        let c = list.iter().find(|c| c.id == id)?;
        let name = c.names.first()?.clone();
        let meta: StoredMetadata = serde_json::from_str(&c.metadata).unwrap_or_default();
        let image = c.image.to_ascii_lowercase();
        if image.len() != 64 || !image.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        Some((name, image, meta.image_name))
    }
}

fn read_bounded(path: &Path, limit: u64) -> Option<Vec<u8>> {
    let f = File::open(path).ok()?;
    // Root-owned only: a runtime's state is never anyone else's file.
    let md = f.metadata().ok()?;
    if md.uid() != 0 || md.mode() & 0o022 != 0 || md.len() > limit {
        return None;
    }
    let mut out = Vec::new();
    f.take(limit + 1).read_to_end(&mut out).ok()?;
    (out.len() as u64 <= limit).then_some(out)
}

fn stat_starttime(pid: i32) -> Option<u64> {
    let bytes = std::fs::read(format!("/proc/{pid}/stat")).ok()?;
    crate::process::parse_stat(pid, &bytes)
        .ok()
        .map(|s| s.start_time)
}

fn ns_inode(pid: i32, kind: &str) -> Option<u64> {
    std::fs::metadata(format!("/proc/{pid}/ns/{kind}"))
        .ok()
        .map(|m| m.ino())
}

fn pidns(pid: i32) -> Option<u64> {
    ns_inode(pid, "pid")
}

/// Whether `pid` is the first process of its own pid namespace (the last
/// NSpid is 1): what a container's init is.
fn is_ns_init(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .and_then(|v| v.split_whitespace().last().map(|x| x == "1"))
        })
        .unwrap_or(false)
}

impl Runtimes {
    /// The container `id` (from `pid`'s cgroup), if the runtime's state
    /// says `pid` runs in it. `exe` is the process's executable (dev, ino)
    /// and `exe_path` its path as /proc names it, for `container:path`.
    pub fn lookup(
        &self,
        store: &Store,
        id: &str,
        pid: i32,
        exe: Option<(u64, u64)>,
        exe_path: &str,
    ) -> Option<ContainerInfo> {
        let (runtime, init) = self.init_of(id)?;
        // The process shares the init's pid namespace: it is inside the
        // container the runtime started, not merely under its cgroup name.
        let ns = pidns(pid)?;
        if pidns(init)? != ns {
            return None;
        }
        let (name, image, image_name) = store.find(&self.storage, id)?;
        // The path as the container sees it: in the init's root, and only
        // for a process that shares the init's mount namespace (one with
        // mounts of its own could show any file at any path).
        let same_mounts = ns_inode(pid, "mnt").is_some_and(|m| ns_inode(init, "mnt") == Some(m));
        let path = exe
            .filter(|&(dev, ino)| same_mounts && names_in_root(init, exe_path, dev, ino))
            .map(|_| exe_path.to_owned());
        Some(ContainerInfo {
            id: id.to_owned(),
            name,
            image,
            image_name,
            runtime,
            path,
        })
    }

    /// The runtime and the live init pid of container `id`.
    fn init_of(&self, id: &str) -> Option<(String, i32)> {
        for (runtime, root) in &self.roots {
            let dir = root.join(id);
            if let Some(b) = read_bounded(&dir.join("state.json"), STATE_LIMIT) {
                let st: RuncState = serde_json::from_slice(&b).ok()?;
                // The recorded start time makes a reused pid no match.
                if st.init_process_pid <= 0
                    || stat_starttime(st.init_process_pid)? != st.init_process_start
                {
                    return None;
                }
                return Some((runtime.clone(), st.init_process_pid));
            }
            if let Some(b) = read_bounded(&dir.join("status"), STATE_LIMIT) {
                let st: CrunStatus = serde_json::from_slice(&b).ok()?;
                // crun records no start time: a reused pid must at least be
                // the init of a pid namespace of its own.
                if st.pid <= 0 || !is_ns_init(st.pid) {
                    return None;
                }
                return Some((runtime.clone(), st.pid));
            }
        }
        None
    }
}

/// Whether `path`, resolved inside `pid`'s root without leaving it (its
/// symlinks too), names the file (dev, ino).
pub fn names_in_root(pid: i32, path: &str, dev: u64, ino: u64) -> bool {
    File::open(format!("/proc/{pid}/root")).is_ok_and(|root| names_in(&root, path, dev, ino))
}

/// As [`names_in_root`], in a root directory held open.
pub fn names_in(root: &File, exe_path: &str, dev: u64, ino: u64) -> bool {
    path_inside(root, exe_path, dev, ino).is_some()
}

fn path_inside(root: &File, exe_path: &str, dev: u64, ino: u64) -> Option<String> {
    if !exe_path.starts_with('/') || exe_path.contains('\0') {
        return None;
    }
    let rel = std::ffi::CString::new(exe_path.trim_start_matches('/')).ok()?;
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
    const RESOLVE_IN_ROOT: u64 = 0x10;
    let how = OpenHow {
        flags: (libc::O_PATH | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS,
    };
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    // SAFETY: openat2(2) with a valid dirfd, a NUL-terminated path and a
    // correctly sized open_how; the returned fd is owned below.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            rel.as_ptr(),
            std::ptr::from_ref(&how),
            size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: a new fd nobody else owns.
    let f = File::from(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    let md = f.metadata().ok()?;
    (md.dev() == dev && md.ino() == ino).then(|| exe_path.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_entry_gives_name_and_image() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("overlay-containers")).expect("mkdir");
        let id = "a".repeat(64);
        let image = "B".repeat(64);
        std::fs::write(
            dir.path().join("overlay-containers/containers.json"),
            format!(
                r#"[{{"id":"{id}","names":["web"],"image":"{image}","metadata":"{{\"image-name\":\"localhost/web:1\"}}"}}]"#
            ),
        )
        .expect("write");
        let store = Store::default();
        let found = store.find(dir.path(), &id);
        assert_eq!(
            found,
            Some(("web".into(), "b".repeat(64), Some("localhost/web:1".into())))
        );
        assert_eq!(store.find(dir.path(), &"c".repeat(64)), None);
    }

    #[test]
    fn a_malformed_store_gives_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("overlay-containers")).expect("mkdir");
        for body in [
            "",
            "{",
            "[{\"id\":1}]",
            "[{\"id\":\"x\",\"names\":[],\"image\":\"zz\"}]",
        ] {
            std::fs::write(dir.path().join("overlay-containers/containers.json"), body)
                .expect("write");
            assert_eq!(Store::default().find(dir.path(), "x"), None, "{body:?}");
        }
    }

    #[test]
    fn a_container_without_runtime_state_is_none() {
        let rt = Runtimes {
            roots: vec![("runc".into(), PathBuf::from("/nonexistent-tether"))],
            storage: PathBuf::from("/nonexistent-tether"),
        };
        assert_eq!(
            rt.lookup(
                &Store::default(),
                &"a".repeat(64),
                std::process::id() as i32,
                None,
                "/x"
            ),
            None
        );
    }
}
