//! Real servers from Debian's packages, started by the test that needs them
//! (on loopback, or on a host of a `netns::Lan`) and stopped on drop, also
//! when the test fails.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::kernel::{Cgroup, become_user, enter_cgroup};
use super::netns::{Lan, enter_fd};
use super::{free_port, open_tempdir, rand_suffix, wait_until};

pub const PASSWORD: &str = "s3cret-in-the-environment";

/// Runs `cmd` in a host's network namespace and/or a cgroup.
fn place(cmd: &mut Command, netns_fd: Option<i32>, cgroup: Option<&PathBuf>) {
    if let Some(fd) = netns_fd {
        enter_fd(fd, cmd);
    }
    if let Some(cg) = cgroup {
        enter_cgroup(cg, cmd);
    }
}
pub fn which(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{name} not found: install the test dependencies (`make test-deps`)")
        })
}

/// redis-server on 127.0.0.1 and ::1 with `requirepass`.
pub struct Redis {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
    netns_fd: Option<i32>,
}

impl Redis {
    pub fn start() -> Redis {
        Self::start_in(None, None, "127.0.0.1 ::1")
    }

    /// On `host`, in `cgroup`, listening on every IPv4 address (as many
    /// servers do: the Service names only some of them).
    pub fn start_on(lan: &Lan, host: &str, cgroup: &Cgroup) -> Redis {
        Self::start_in(Some(lan.fd(host)), Some(&cgroup.path), "0.0.0.0")
    }

    /// In a host's network namespace and/or a cgroup, listening on `bind`.
    pub fn start_in(netns_fd: Option<i32>, cgroup: Option<&PathBuf>, bind: &str) -> Redis {
        // A free port can be taken by another test's server before this one
        // binds it: then the PONG comes from that server. Only a server that
        // answers with this child's pid counts; otherwise try another port.
        for _ in 0..5 {
            let dir = open_tempdir();
            let port = free_port();
            let mut cmd = Command::new(which("redis-server"));
            place(&mut cmd, netns_fd, cgroup);
            let child = cmd
                .args(["--port", &port.to_string(), "--bind", bind])
                .args([
                    "--requirepass",
                    PASSWORD,
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .arg("--dir")
                .arg(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start redis-server");
            let mut r = Redis {
                child,
                port,
                _dir: dir,
                netns_fd,
            };
            let pid = format!("process_id:{}", r.child.id());
            // Ends early when the server exits (it could not bind).
            let up = wait_until(Duration::from_secs(20), || {
                matches!(r.child.try_wait(), Ok(Some(_)))
                    || r.admin(&["INFO", "server"])
                        .lines()
                        .any(|l| l.trim() == pid)
            });
            if up && matches!(r.child.try_wait(), Ok(None)) {
                return r;
            }
        }
        panic!("redis-server did not come up on a port of its own in five tries");
    }

    /// A command from the test process (outside the enforced cgroup).
    pub fn admin(&self, args: &[&str]) -> String {
        let mut cmd = Command::new(which("redis-cli"));
        // On its host's loopback, from outside any enforced cgroup.
        place(&mut cmd, self.netns_fd, None);
        let o = cmd
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .env("REDISCLI_AUTH", PASSWORD)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    /// Connections Redis has accepted so far (its own counter, which counts
    /// this query's connection too), so a test can show that a refused
    /// client never reached it.
    pub fn connections_received(&self) -> u64 {
        let info = self.admin(&["INFO", "stats"]);
        info.lines()
            .find_map(|l| l.strip_prefix("total_connections_received:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no connection count in INFO stats: {info}"))
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A PostgreSQL cluster of the test's own (initdb as the postgres user),
/// password authentication (scram) on 127.0.0.1 and ::1.
pub struct Postgres {
    child: Child,
    pub port: u16,
    bin: PathBuf,
    dir: PathBuf,
}

impl Postgres {
    pub fn start() -> Postgres {
        Self::start_in(None, None, "127.0.0.1,::1", false)
    }

    /// On `host`, in `cgroup`, listening on the host's address and its
    /// loopback, with TLS (a self-signed certificate) available to clients.
    pub fn start_on(lan: &Lan, host: &str, cgroup: &Cgroup) -> Postgres {
        let listen = format!("{},127.0.0.1", lan.addr(host));
        Self::start_in(Some(lan.fd(host)), Some(&cgroup.path), &listen, true)
    }

    fn start_in(
        netns_fd: Option<i32>,
        cgroup: Option<&PathBuf>,
        listen: &str,
        tls: bool,
    ) -> Postgres {
        let bin = tether_test_support::pg::bindir();
        let (uid, gid) = tether_test_support::pg::postgres_ids();
        let dir = std::env::temp_dir().join(format!(
            "tether-pg-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        tether_test_support::pg::initdb(&bin, &dir, PASSWORD);
        let port = free_port();
        let mut server = Command::new(bin.join("postgres"));
        place(&mut server, netns_fd, cgroup);
        server
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-p", &port.to_string(), "-k"])
            .arg(&dir)
            .args([
                "-c",
                &format!("listen_addresses={listen}"),
                "-c",
                "fsync=off",
            ])
            .stdout(Stdio::null())
            // Its own log, shown if it does not come up.
            .stderr(std::fs::File::create(dir.join("postgres.log")).expect("postgres.log"));
        if tls {
            // Tunnelled clients arrive from the host's own address.
            let hba = dir.join("data/pg_hba.conf");
            let mut conf = std::fs::read_to_string(&hba).expect("pg_hba.conf");
            conf.push_str("host all all 0.0.0.0/0 scram-sha-256\n");
            std::fs::write(&hba, conf).expect("pg_hba.conf");
            let (crt, key) =
                tether_test_support::pg::server_cert(&dir, "DNS:postgres,IP:127.0.0.1", uid, gid);
            server
                .args(["-c", "ssl=on", "-c"])
                .arg(format!("ssl_cert_file={}", crt.display()));
            server
                .arg("-c")
                .arg(format!("ssl_key_file={}", key.display()));
        }
        // Not `as_pg`: Command::uid applies before pre_exec hooks, and
        // joining the namespace and cgroup needs root.
        become_user(&mut server, uid, gid);
        server.current_dir(&dir);
        let child = server.spawn().expect("start postgres");
        let pg = Postgres {
            child,
            port,
            bin,
            dir,
        };
        // Generous: initdb and the first start compete with the other
        // tests' servers for two cores.
        let ready = wait_until(Duration::from_secs(60), || {
            let mut c = Command::new(pg.bin.join("pg_isready"));
            place(&mut c, netns_fd, None);
            c.args(["-h", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
        assert!(
            ready,
            "postgres did not come up on port {port}: {}",
            std::fs::read_to_string(pg.dir.join("postgres.log")).unwrap_or_default()
        );
        pg
    }

    /// On 127.0.0.1 and ::1 with TLS available ([`Postgres::cert`]).
    pub fn start_tls() -> Postgres {
        Self::start_in(None, None, "127.0.0.1,::1", true)
    }

    pub fn psql(&self) -> PathBuf {
        self.bin.join("psql")
    }

    /// The server's self-signed certificate (PEM), with TLS on.
    pub fn cert(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.crt")).expect("server.crt")
    }

    /// SQL as the postgres superuser, from the test process; its output
    /// (unaligned, tuples only).
    pub fn admin(&self, sql: &str) -> String {
        tether_test_support::pg::psql(&self.bin, self.port, PASSWORD, "postgres", sql)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGQUIT: immediate shutdown, the postmaster takes its children
        // down with it.
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGQUIT) };
        let stopped = wait_until(Duration::from_secs(10), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        });
        if !stopped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Debian's nginx on 127.0.0.1, with the `location /` given, an access log
/// of `connection requests-on-it status uri` lines (never a header: no
/// credential is logged), run from the test's own prefix and stopped on
/// drop.
pub struct Nginx {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Nginx {
    pub fn start(location: &str) -> Nginx {
        Self::start_with(location, None)
    }

    /// HTTPS with this certificate and key.
    pub fn start_tls(location: &str, cert: &std::path::Path, key: &std::path::Path) -> Nginx {
        Self::start_with(location, Some((cert, key)))
    }

    fn start_with(location: &str, tls: Option<(&std::path::Path, &std::path::Path)>) -> Nginx {
        let listen = match tls {
            Some((c, k)) => format!(
                "listen 127.0.0.1:{{port}} ssl;\n    ssl_certificate {};\n    ssl_certificate_key {};",
                c.display(),
                k.display()
            ),
            None => "listen 127.0.0.1:{port};".to_string(),
        };
        let dir = open_tempdir();
        let port = free_port();
        let p = |n: &str| dir.path().join(n).display().to_string();
        std::fs::create_dir_all(dir.path().join("logs")).expect("mkdir");
        std::fs::write(
            dir.path().join("nginx.conf"),
            format!(
                "daemon off;\nmaster_process on;\nuser root;\nworker_processes 1;\npid {pid};\nerror_log {err} info;\nevents {{ worker_connections 256; }}\nhttp {{\n  log_format counts '$connection $connection_requests $status $request_uri';\n  access_log {access} counts;\n  keepalive_requests 100000;\n  client_body_temp_path {t}/body; proxy_temp_path {t}/proxy; fastcgi_temp_path {t}/fcgi; uwsgi_temp_path {t}/uwsgi; scgi_temp_path {t}/scgi;\n  server {{\n    {listen}\n    location / {{ {location} }}\n  }}\n}}\n",
                pid = p("nginx.pid"),
                err = p("logs/error.log"),
                access = p("logs/access.log"),
                t = p("logs"),
                listen = listen.replace("{port}", &port.to_string()),
            ),
        )
        .expect("nginx.conf");
        let child = Command::new(which("nginx"))
            .args(["-p", &p(""), "-c", &p("nginx.conf")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx");
        let n = Nginx { child, port, dir };
        let up = wait_until(Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(up, "nginx did not come up: {}", n.error_log());
        n
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("logs/error.log")).unwrap_or_default()
    }

    /// Every request nginx served so far: (connection, request on it,
    /// status, uri).
    pub fn requests(&self) -> Vec<(u64, u64, u16, String)> {
        std::fs::read_to_string(self.dir.path().join("logs/access.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut f = l.split(' ');
                Some((
                    f.next()?.parse().ok()?,
                    f.next()?.parse().ok()?,
                    f.next()?.parse().ok()?,
                    f.next()?.to_string(),
                ))
            })
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
