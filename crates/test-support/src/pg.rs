//! A PostgreSQL cluster of the tests' own, from Debian's server binaries:
//! `initdb` as the `postgres` user in a directory named after this process,
//! scram passwords, listening on 127.0.0.1 only, on a free port. The
//! server is killed when the process that started it exits (its parent
//! thread never does before then), and directories of dead processes are
//! removed by the next start.

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use crate::{free_port, pid_is_gone, wait_until};

const DIR_PREFIX: &str = "tether-pgc-";
/// The superuser's password (tests only).
pub const PASSWORD: &str = "tether-test-postgres";

/// The newest server under /usr/lib/postgresql.
pub fn bindir() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| rd.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    dirs.retain(|d| d.join("postgres").is_file() && d.join("initdb").is_file());
    dirs.sort_by_key(|d| {
        d.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.pop().unwrap_or_else(|| {
        panic!("no PostgreSQL server under /usr/lib/postgresql: `make test-deps` installs it")
    })
}

/// A self-signed P-256 certificate in `dir` (server.crt, and server.key
/// owned by `uid`:`gid`, mode 0600, as PostgreSQL insists) for `san`: a
/// leaf clients can verify by name (webpki wants a SAN and no CA flag).
pub fn server_cert(dir: &Path, san: &str, uid: u32, gid: u32) -> (PathBuf, PathBuf) {
    let (crt, key) = (dir.join("server.crt"), dir.join("server.key"));
    let o = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=postgres"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-addext")
        .arg(format!("subjectAltName={san}"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .output()
        .expect("openssl");
    assert!(
        o.status.success(),
        "openssl req: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    for p in [&crt, &key] {
        std::os::unix::fs::chown(p, Some(uid), Some(gid)).expect("chown");
    }
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    (crt, key)
}

/// Makes `dir` (owned by the postgres user, 0700) and a cluster in
/// `dir/data` whose superuser `postgres` logs in with `password` (scram).
pub fn initdb(bin: &Path, dir: &Path, password: &str) {
    let (uid, gid) = postgres_ids();
    std::fs::create_dir_all(&dir).expect("mkdir");
    let pwfile = dir.join("pw");
    std::fs::write(&pwfile, password).expect("pwfile");
    for p in [dir, pwfile.as_path()] {
        std::os::unix::fs::chown(p, Some(uid), Some(gid)).expect("chown");
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let o = Command::new(bin.join("initdb"))
        .arg("-D")
        .arg(dir.join("data"))
        .args([
            "-U",
            "postgres",
            "--auth=scram-sha-256",
            "--no-sync",
            "-E",
            "UTF8",
        ])
        .arg(format!("--pwfile={}", pwfile.display()))
        .uid(uid)
        .gid(gid)
        .current_dir(&dir)
        .output()
        .expect("initdb");
    assert!(
        o.status.success(),
        "initdb failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Runs `sql` with psql from `bin` as the superuser (`password`) in `db`
/// on 127.0.0.1:`port`; its output (unaligned, tuples only). Fails the
/// test on an error.
pub fn psql(bin: &Path, port: u16, password: &str, db: &str, sql: &str) -> String {
    let o = Command::new(bin.join("psql"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .args(["-d", db, "-v", "ON_ERROR_STOP=1", "-At", "-c", sql])
        .env("PGPASSWORD", password)
        .output()
        .expect("psql");
    assert!(
        o.status.success(),
        "psql {sql:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

/// The uid and gid of the `postgres` user (PostgreSQL refuses root).
pub fn postgres_ids() -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let o = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .expect("id");
        String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("no user postgres: `make test-deps` installs PostgreSQL"))
    };
    (id("-u"), id("-g"))
}

pub struct Cluster {
    pub port: u16,
    pub dir: PathBuf,
    bin: PathBuf,
    child: Mutex<Option<Child>>,
    seq: std::sync::atomic::AtomicU32,
}

impl Cluster {
    /// The process's one cluster, started on first use.
    pub fn shared() -> &'static Cluster {
        static C: OnceLock<&'static Cluster> = OnceLock::new();
        C.get_or_init(|| {
            // Started from a thread that lives as long as the process, so
            // the server's parent-death signal fires only when it exits.
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let c: &'static Cluster = Box::leak(Box::new(Cluster::init()));
                let _ = tx.send(c);
                loop {
                    std::thread::park();
                }
            });
            rx.recv().expect("the cluster's thread died starting it")
        })
    }

    fn init() -> Cluster {
        let tmp = std::env::temp_dir();
        if let Ok(rd) = std::fs::read_dir(&tmp) {
            for e in rd.flatten() {
                if pid_is_gone(&e.file_name().to_string_lossy(), DIR_PREFIX) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let bin = bindir();
        let (uid, gid) = postgres_ids();
        let dir = tmp.join(format!(
            "{DIR_PREFIX}{}-{}",
            std::process::id(),
            free_port()
        ));
        initdb(&bin, &dir, PASSWORD);
        // A certificate for 127.0.0.1, so clients can require TLS and verify
        // it ([`Cluster::cert`]).
        server_cert(&dir, "DNS:postgres,IP:127.0.0.1", uid, gid);
        let c = Cluster {
            port: free_port(),
            dir,
            bin,
            child: Mutex::new(None),
            seq: Default::default(),
        };
        c.start();
        c
    }

    /// Starts the server (again, after [`Cluster::kill`]).
    pub fn start(&self) {
        let (uid, gid) = postgres_ids();
        let mut cmd = Command::new(self.bin.join("postgres"));
        cmd.arg("-D")
            .arg(self.dir.join("data"))
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(&self.dir)
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .args(["-c", "max_connections=200", "-c", "ssl=on"])
            .arg("-c")
            .arg(format!(
                "ssl_cert_file={}",
                self.dir.join("server.crt").display()
            ))
            .arg("-c")
            .arg(format!(
                "ssl_key_file={}",
                self.dir.join("server.key").display()
            ))
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.join("postgres.log"))
                    .expect("postgres.log"),
            )
            .uid(uid)
            .gid(gid)
            .current_dir(&self.dir);
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start postgres");
        *self.child.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
        let ready = wait_until(Duration::from_secs(60), || {
            Command::new(self.bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
        assert!(
            ready,
            "postgres did not come up on port {}: {}",
            self.port,
            std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
        );
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&self) {
        if let Some(mut c) = self.child.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs SQL as the superuser in `db`; its output (unaligned, tuples only).
    pub fn sql(&self, db: &str, sql: &str) -> String {
        psql(&self.bin, self.port, PASSWORD, db, sql)
    }

    /// The server's certificate (PEM), self-signed for 127.0.0.1.
    pub fn cert(&self) -> Vec<u8> {
        std::fs::read(self.dir.join("server.crt")).expect("server.crt")
    }

    /// A new, empty database; its URL (TLS off: see [`Cluster::url`]).
    pub fn database(&self) -> String {
        let n = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("t{}_{n}", std::process::id());
        self.sql("postgres", &format!("CREATE DATABASE {name}"));
        self.url(&name)
    }

    /// The URL of `db` with TLS off (loopback); drop the `sslmode` for a
    /// client that must use TLS.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres:{PASSWORD}@127.0.0.1:{}/{db}?sslmode=disable",
            self.port
        )
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}
