//! Attestation against real processes on this machine. Run as root: the
//! uid switch, cgroup creation and the proc connector need it.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_lc_rs::digest;
use tether_attest::{AttestError, Attestor, PidFd, ProcConnector, ProcEvent, Selector, list_pids};

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, data).as_ref())
}

fn my_pid() -> i32 {
    std::process::id() as i32
}

/// Kills and reaps a child even when an assertion fails first.
struct Reaped(Child);

impl Reaped {
    fn pid(&self) -> i32 {
        self.0.id() as i32
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns, retrying ETXTBSY: a freshly written binary can still be open for
/// writing in a child forked concurrently by another test thread.
fn spawn_retry(cmd: &mut Command) -> Child {
    let mut last = None;
    for _ in 0..50 {
        match cmd.spawn() {
            Ok(c) => return c,
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                last = Some(e);
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("spawn {cmd:?}: {e}"),
        }
    }
    panic!("spawn {cmd:?}: {last:?}");
}

fn sleeper(path: &Path) -> Reaped {
    Reaped(spawn_retry(
        Command::new(path).arg("30").stdin(Stdio::null()),
    ))
}

#[test]
fn attest_self() {
    let att = Attestor::new();
    let info = att.attest_pid(my_pid()).unwrap();

    assert_eq!(info.pid, my_pid());
    assert_eq!(info.ppid, std::os::unix::process::parent_id() as i32);
    // SAFETY: geteuid/getegid cannot fail.
    assert_eq!(info.uid, unsafe { libc::geteuid() });
    assert_eq!(info.gid, unsafe { libc::getegid() });
    assert_eq!(info.uid, 0, "these tests are meant to run as root");
    assert_eq!(info.user.as_deref(), Some("root"));
    assert_eq!(info.group.as_deref(), Some("root"));

    let exe = fs::read_link("/proc/self/exe").unwrap();
    assert_eq!(info.exe_path, exe.to_str().unwrap());
    assert!(!info.exe_deleted);
    assert_eq!(
        info.sha256,
        sha256_hex(&fs::read("/proc/self/exe").unwrap())
    );
    assert_eq!(info.sha256, sha256_hex(&fs::read(&exe).unwrap()));

    let comm = fs::read_to_string("/proc/self/comm").unwrap();
    assert_eq!(info.name, comm.trim_end_matches('\n'));
    assert_eq!(info.cmdline, std::env::args().collect::<Vec<_>>());
    let cg = fs::read_to_string("/proc/self/cgroup").unwrap();
    let v2 = cg.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
    assert_eq!(info.cgroup, v2);
    assert!(info.start_time > 0);

    // The second attestation is served from the hash cache.
    assert_eq!(att.hash_cache_len(), 1);
    let again = att.attest_pid(my_pid()).unwrap();
    assert_eq!(again.sha256, info.sha256);
    assert_eq!(again.start_time, info.start_time);
    assert_eq!(att.hash_cache_len(), 1);

    // Every listed selector parses and matches.
    let sels = info.selectors();
    assert!(sels.contains(&"unix:uid:0".to_owned()));
    assert!(sels.contains(&format!("process:sha256:{}", info.sha256)));
    for s in &sels {
        assert!(Selector::parse(s).unwrap().matches(&info), "{s}");
    }
}

#[test]
fn child_as_nobody() {
    let child = Reaped(
        Command::new("/bin/sleep")
            .arg("30")
            .uid(65534)
            .gid(65534)
            .spawn()
            .unwrap(),
    );
    let info = Attestor::new().attest_pid(child.pid()).unwrap();
    assert_eq!(info.uid, 65534);
    assert_eq!(info.gid, 65534);
    let passwd = fs::read_to_string("/etc/passwd").unwrap();
    let want_user = passwd
        .lines()
        .find(|l| l.split(':').nth(2) == Some("65534"))
        .and_then(|l| l.split(':').next());
    assert_eq!(info.user.as_deref(), want_user);
    assert_eq!(
        info.exe_path,
        fs::canonicalize("/bin/sleep").unwrap().to_str().unwrap()
    );
    assert_eq!(info.cmdline, ["/bin/sleep", "30"]);
    assert_eq!(info.name, "sleep");
    assert_eq!(info.ppid, my_pid());
    assert_eq!(
        info.parent_path.as_deref(),
        fs::read_link("/proc/self/exe").unwrap().to_str()
    );
    assert!(Selector::parse("unix:uid:65534").unwrap().matches(&info));
    assert!(!Selector::parse("unix:uid:0").unwrap().matches(&info));
    assert!(
        Selector::parse("process:cmdline-prefix:/bin/sleep")
            .unwrap()
            .matches(&info)
    );
}

#[test]
fn reaped_child_is_exited() {
    let mut child = Command::new("/bin/true").spawn().unwrap();
    let pidfd = PidFd::open(child.id() as i32).unwrap();
    child.wait().unwrap();
    let err = Attestor::new().attest(&pidfd).unwrap_err();
    assert!(
        matches!(err, AttestError::Exited { pid } if pid == pidfd.pid()),
        "{err}"
    );
    assert!(matches!(
        Attestor::new().attest_pid(pidfd.pid()),
        Err(AttestError::Exited { .. })
    ));
}

#[test]
fn zombie_child_is_exited() {
    let mut child = Command::new("/bin/true").spawn().unwrap();
    let pidfd = PidFd::open(child.id() as i32).unwrap();
    // A pidfd polls readable once the process has exited; it stays a zombie
    // until we wait().
    let mut pfd = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(&pidfd),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, 10_000) };
    assert_eq!(n, 1);
    assert!(pidfd.is_alive(), "zombie still exists");
    let err = Attestor::new().attest(&pidfd).unwrap_err();
    assert!(matches!(err, AttestError::Exited { .. }), "{err}");
    child.wait().unwrap();
}

/// Changes one byte the loader never reads (a section name), so the copy
/// still runs; appends a byte if the binary has no section names.
fn change_one_byte(data: &mut Vec<u8>) {
    let needle = b".shstrtab";
    match data.windows(needle.len()).position(|w| w == needle) {
        Some(i) => data[i + needle.len() - 1] ^= 0x20,
        None => data.push(0),
    }
}

fn write_exec(path: &Path, data: &[u8]) {
    let mut f = fs::File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
    drop(f);
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn modified_copy_has_different_hash() {
    let dir = tempfile::tempdir().unwrap();
    let original = fs::read("/bin/sleep").unwrap();
    let same: PathBuf = dir.path().join("sleep-copy");
    let changed: PathBuf = dir.path().join("sleep-changed");
    write_exec(&same, &original);
    let mut modified = original.clone();
    change_one_byte(&mut modified);
    assert_ne!(modified, original);
    write_exec(&changed, &modified);

    let att = Attestor::new();
    let a = sleeper(Path::new("/bin/sleep"));
    let b = sleeper(&same);
    let c = sleeper(&changed);
    let ia = att.attest_pid(a.pid()).unwrap();
    let ib = att.attest_pid(b.pid()).unwrap();
    let ic = att.attest_pid(c.pid()).unwrap();

    assert_eq!(ia.sha256, sha256_hex(&original));
    assert_eq!(ib.sha256, ia.sha256, "identical content, different inode");
    assert_eq!(ic.sha256, sha256_hex(&modified));
    assert_ne!(ic.sha256, ia.sha256);
    assert_eq!(ic.exe_path, changed.to_str().unwrap());
    assert_eq!(att.hash_cache_len(), 3);

    let sel = Selector::Sha256(ia.sha256.clone());
    assert!(sel.matches(&ib));
    assert!(!sel.matches(&ic));
}

#[test]
fn deleted_executable_keeps_path_and_hash() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sleep-deleted");
    let data = fs::read("/bin/sleep").unwrap();
    write_exec(&path, &data);
    let child = sleeper(&path);
    let att = Attestor::new();
    let before = att.attest_pid(child.pid()).unwrap();
    assert!(!before.exe_deleted);

    fs::remove_file(&path).unwrap();
    let after = att.attest_pid(child.pid()).unwrap();
    assert!(after.exe_deleted);
    assert_eq!(after.exe_path, path.to_str().unwrap());
    assert_eq!(after.sha256, sha256_hex(&data));
}

fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir))
    })
}

/// Removes the test cgroups (after the child in them is reaped).
struct CgroupGuard {
    dirs: Vec<PathBuf>, // innermost first
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        for d in &self.dirs {
            for _ in 0..100 {
                match fs::remove_dir(d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }
    }
}

#[test]
fn cgroup_container_and_unit() {
    let Some(mount) = cgroup2_mount() else {
        panic!("no cgroup2 mount in /proc/mounts");
    };
    let id = sha256_hex(format!("tether-test-{}", my_pid()).as_bytes());
    let top = format!("tether-attest-test-{}", my_pid());
    let leaf_name = format!("docker-{id}.scope");
    let top_dir = mount.join(&top);
    let leaf_dir = top_dir.join(&leaf_name);
    let guard = CgroupGuard {
        dirs: vec![leaf_dir.clone(), top_dir.clone()],
    };
    fs::create_dir_all(&leaf_dir).unwrap();

    let child = sleeper(Path::new("/bin/sleep"));
    fs::write(leaf_dir.join("cgroup.procs"), child.pid().to_string()).unwrap();
    let info = Attestor::new().attest_pid(child.pid()).unwrap();
    assert!(
        info.cgroup.ends_with(&format!("/{top}/{leaf_name}")),
        "{}",
        info.cgroup
    );
    assert_eq!(info.container_id.as_deref(), Some(id.as_str()));
    assert_eq!(info.systemd_unit.as_deref(), Some(leaf_name.as_str()));
    let sels = info.selectors();
    assert!(sels.contains(&format!("container:id:{id}")), "{sels:?}");
    assert!(
        sels.contains(&format!("systemd:unit:{leaf_name}")),
        "{sels:?}"
    );
    assert!(
        sels.contains(&format!("cgroup:path:{}", info.cgroup)),
        "{sels:?}"
    );

    drop(child); // reap before rmdir
    drop(guard);
    assert!(!top_dir.exists());
}

#[test]
fn proc_connector_sees_exec_and_exit() {
    let mut conn = ProcConnector::open().unwrap();
    conn.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut child = Command::new("/bin/true").spawn().unwrap();
    let pid = child.id() as i32;

    let (mut fork, mut exec, mut exit) = (false, false, false);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut events = Vec::new();
    while !(fork && exec && exit) && Instant::now() < deadline {
        events.clear();
        match conn.recv(&mut events) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => panic!("recv: {e}"),
        }
        for ev in &events {
            match *ev {
                ProcEvent::Fork { parent, child } if child == pid => {
                    assert_eq!(parent, my_pid());
                    fork = true;
                }
                ProcEvent::Exec { pid: p } if p == pid => exec = true,
                ProcEvent::Exit { pid: p } if p == pid => exit = true,
                _ => {}
            }
        }
    }
    child.wait().unwrap();
    assert!(fork, "no Fork event for {pid}");
    assert!(exec, "no Exec event for {pid}");
    assert!(exit, "no Exit event for {pid}");
}

#[test]
fn proc_connector_reports_uid_change() {
    let mut conn = ProcConnector::open().unwrap();
    conn.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    // The child changes uid between fork and exec.
    let mut child = Command::new("/bin/true").uid(65534).spawn().unwrap();
    let pid = child.id() as i32;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = false;
    let mut events = Vec::new();
    while !seen && Instant::now() < deadline {
        events.clear();
        match conn.recv(&mut events) {
            Ok(()) => seen = events.contains(&ProcEvent::Uid { pid }),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("recv: {e}"),
        }
    }
    child.wait().unwrap();
    assert!(seen, "no Uid event for {pid}");
}

#[test]
fn list_pids_has_processes_not_threads() {
    let (tx, rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let t = std::thread::spawn(move || {
        // SAFETY: gettid cannot fail.
        tx.send(unsafe { libc::gettid() }).unwrap();
        let _ = stop_rx.recv();
    });
    let tid = rx.recv().unwrap();
    let pids = list_pids();
    stop_tx.send(()).unwrap();
    t.join().unwrap();
    assert!(pids.contains(&my_pid()));
    assert!(pids.contains(&1));
    assert!(!pids.contains(&tid), "thread {tid} listed as a process");
    assert!(pids.windows(2).all(|w| w[0] < w[1]));
}

#[test]
fn attest_everything_never_panics() {
    let att = Attestor::new();
    let mut ok = 0;
    for pid in list_pids() {
        match att.attest_pid(pid) {
            Ok(info) => {
                assert_eq!(info.pid, pid);
                assert_eq!(info.sha256.len(), 64);
                ok += 1;
            }
            // Kernel threads have no exe; processes come and go.
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains(&format!("pid {pid}")), "{msg}");
            }
        }
    }
    assert!(ok >= 1);
}
