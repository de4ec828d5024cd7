//! Fixtures shared by the kernel tests (`crates/kernel/tests`) and the
//! end-to-end tests (`crates/cli/tests`). Everything a fixture makes has a
//! unique name, is removed on drop, and is swept by the next run if a
//! killed run (a timeout's SIGTERM) could not drop it.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use tether_kernel::cgroup2_mount;

pub mod pg;

const CGROUP_PREFIX: &str = "tether-test-";
const BPFFS_PREFIX: &str = "tether-bpffs-";
static SEQ: AtomicU32 = AtomicU32::new(0);

/// `<cgroup2 mount>/tether-test-<pid>-<tag>-<n>`: a cgroup of this test's
/// own, never the root. On drop, whatever is still inside (only the test's
/// own children can be) is killed and the cgroup removed.
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new(tag: &str) -> Self {
        let mnt = cgroup2_mount().expect("the tests need a cgroup2 mount (none in /proc/mounts)");
        sweep_stale(&mnt);
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let path = mnt.join(format!("{CGROUP_PREFIX}{}-{tag}-{n}", std::process::id()));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self { path }
    }

    /// Moves a running process in.
    pub fn add(&self, pid: u32) {
        fs::write(self.path.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("move {pid} into {}: {e}", self.path.display()));
    }

    /// Makes `cmd` join this cgroup before it execs, so nothing it runs is
    /// ever outside, and without cargo's loader variables (see
    /// [`no_loader_env`]).
    pub fn enter(&self, cmd: &mut Command) {
        enter_cgroup(&self.path, cmd);
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for _ in 0..500 {
            let procs = fs::read_to_string(self.path.join("cgroup.procs")).unwrap_or_default();
            if procs.trim().is_empty() {
                break;
            }
            for pid in procs
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                // SAFETY: plain kill(2); these are children this test started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Err(e) = fs::remove_dir(&self.path) {
            eprintln!("warning: could not remove {}: {e}", self.path.display());
        }
    }
}

/// Makes `cmd` join the cgroup at `dir` before it execs, without cargo's
/// loader variables.
pub fn enter_cgroup(dir: &Path, cmd: &mut Command) {
    no_loader_env(cmd);
    let procs = dir.join("cgroup.procs");
    // SAFETY: the closure only writes a file (no locks shared with the
    // parent are taken).
    unsafe {
        cmd.pre_exec(move || fs::write(&procs, "0"));
    }
}

/// Removes the loader variables `cargo test` puts in the environment
/// (LD_LIBRARY_PATH): a process exec'd with them has its loader steered and
/// gets no identity unless the identity accepts that.
pub fn no_loader_env(cmd: &mut Command) -> &mut Command {
    cmd.env_remove("LD_LIBRARY_PATH").env_remove("LD_PRELOAD")
}

/// A private bpffs on a temporary directory. Unmounting it drops every pin
/// made in it.
pub struct BpfFs {
    dir: tempfile::TempDir,
}

impl BpfFs {
    pub fn new() -> Self {
        if let Some(mnt) = cgroup2_mount() {
            sweep_stale(&mnt);
        }
        let prefix = format!("{BPFFS_PREFIX}{}-", std::process::id());
        let dir = tempfile::Builder::new()
            .prefix(&prefix)
            .tempdir()
            .expect("tempdir");
        let target = CString::new(dir.path().as_os_str().as_bytes()).expect("path");
        // SAFETY: valid NUL-terminated strings; no data argument.
        let r = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                target.as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        assert_eq!(r, 0, "mount bpffs: {}", std::io::Error::last_os_error());
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Where an agent or enforcer pins in it.
    pub fn pin_dir(&self) -> PathBuf {
        self.dir.path().join("tether")
    }
}

impl Default for BpfFs {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let target = CString::new(self.dir.path().as_os_str().as_bytes()).expect("path");
        // SAFETY: valid NUL-terminated path. MNT_DETACH so an fd still open
        // somewhere cannot keep the mount point busy.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

/// The pid in `<prefix><pid>-...` names a process that no longer exists.
fn pid_is_gone(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix)
        .and_then(|rest| rest.split('-').next())
        .and_then(|pid| pid.parse::<u32>().ok())
        .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

/// Drop cannot run when a test run is killed, so the next run removes what
/// dead test processes left: empty cgroups and bpffs mounts named after a
/// pid that no longer exists.
fn sweep_stale(cgroup_mnt: &Path) {
    if let Ok(entries) = fs::read_dir(cgroup_mnt) {
        for e in entries.flatten() {
            if pid_is_gone(&e.file_name().to_string_lossy(), CGROUP_PREFIX) {
                let _ = fs::remove_dir(e.path());
            }
        }
    }
    let tmp = std::env::temp_dir();
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    for line in mounts.lines() {
        let mut f = line.split_whitespace();
        let (Some(_), Some(dir), Some("bpf")) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let dir = Path::new(dir);
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if dir.parent() == Some(tmp.as_path()) && pid_is_gone(&name, BPFFS_PREFIX) {
            let Ok(c) = CString::new(dir.as_os_str().as_bytes()) else {
                continue;
            };
            // SAFETY: valid NUL-terminated path of a mount only these
            // fixtures make.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            let _ = fs::remove_dir(dir);
        }
    }
}

/// Polls `f` until it holds or `timeout` passes; true if it held.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A TCP port free on both 127.0.0.1 and [::1] right now.
pub fn free_port() -> u16 {
    for _ in 0..50 {
        let v4 = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = v4.local_addr().expect("addr").port();
        if std::net::TcpListener::bind(("::1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free on both loopback addresses");
}

/// The variable that lets a test whose requirement is missing skip instead
/// of failing. `make test` never sets it.
pub const ALLOW_SKIP: &str = "TETHER_TEST_ALLOW_SKIP";

/// A test's requirement: true when `ok`. Otherwise the test fails naming
/// `what`, unless the run sets [`ALLOW_SKIP`]`=1`; then it returns false
/// (the caller returns) and prints `SKIPPED` with the test's name straight
/// to the terminal's stderr, past libtest's capture, so the skip shows in
/// the run's output even though the test reports ok.
pub fn require(what: &str, ok: bool) -> bool {
    if ok {
        return true;
    }
    if std::env::var_os(ALLOW_SKIP).is_none_or(|v| v != "1") {
        panic!("{what} (set {ALLOW_SKIP}=1 to skip instead)");
    }
    let test = std::thread::current().name().unwrap_or("?").to_owned();
    let line = format!("SKIPPED {test}: {what}\n");
    // libtest captures the print macros only; a write to the stderr handle
    // itself goes straight to fd 2.
    let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
    false
}

/// Whether a TCP socket listens on `port` (any address) in this network
/// namespace, read from /proc/net/tcp and tcp6: for servers that print
/// nothing when they are ready.
pub fn listening(port: u16) -> bool {
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
        fs::read_to_string(f).is_ok_and(|t| {
            t.lines().skip(1).any(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                // local_address is HEXIP:HEXPORT; state 0A is LISTEN.
                cols.len() > 3
                    && cols[3] == "0A"
                    && cols[1]
                        .rsplit(':')
                        .next()
                        .and_then(|p| u16::from_str_radix(p, 16).ok())
                        == Some(port)
            })
        })
    })
}
