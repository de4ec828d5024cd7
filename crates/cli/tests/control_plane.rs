//! Several `tether server` processes on one PostgreSQL database (Debian's
//! server, started by the test): one trust domain, one set of keys sealed
//! by the operator's key-encryption key, a registry every server serves,
//! join tokens used once across servers, key rotation decided by one server
//! and followed by the others.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use tether_test_support::pg::Cluster;

struct Server {
    child: Child,
    admin: PathBuf,
    addr: String,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_server(dir: &Path, name: &str, url: &str, kek: &Path) -> Server {
    let port = free_port();
    let admin = dir.join(format!("{name}-admin.sock"));
    let log = dir.join(format!("{name}.log"));
    let child = Command::new(TETHER)
        .args([
            "--log-format",
            "text",
            "server",
            "--trust-domain",
            "example.org",
        ])
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--key-check",
            "1s",
        ])
        .arg("--data-dir")
        .arg(dir.join(name))
        .arg("--admin-socket")
        .arg(&admin)
        .arg("--kek-file")
        .arg(kek)
        // The password stays out of the process list.
        .env("TETHER_DATABASE", url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("tether server");
    Server {
        child,
        admin,
        addr: format!("127.0.0.1:{port}"),
        log,
    }
}

impl Server {
    fn tether(&self, args: &[&str]) -> std::process::Output {
        Command::new(TETHER)
            .args(args)
            .arg("--admin-socket")
            .arg(&self.admin)
            .output()
            .expect("tether")
    }
    fn ok(&self, args: &[&str]) -> String {
        let o = self.tether(args);
        assert!(
            o.status.success(),
            "tether {args:?}: {}\nserver log:\n{}",
            String::from_utf8_lossy(&o.stderr),
            self.logs()
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    fn wait_ready(&self) {
        let up = wait_until(Duration::from_secs(60), || {
            self.tether(&["get", "bundle"]).status.success()
        });
        assert!(up, "server did not come up:\n{}", self.logs());
    }
    /// The bundle's X.509 authorities (base64 DER) and JWT key ids.
    fn bundle(&self) -> (Vec<String>, Vec<String>, u64) {
        let b: serde_json::Value =
            serde_json::from_str(&self.ok(&["get", "bundle"])).expect("bundle JSON");
        let keys = b["keys"].as_array().cloned().unwrap_or_default();
        let mut x509: Vec<String> = keys
            .iter()
            .filter(|k| k["use"] == "x509-svid")
            .filter_map(|k| k["x5c"][0].as_str().map(str::to_owned))
            .collect();
        let mut jwt: Vec<String> = keys
            .iter()
            .filter(|k| k["use"] == "jwt-svid")
            .filter_map(|k| k["kid"].as_str().map(str::to_owned))
            .collect();
        x509.sort();
        jwt.sort();
        (x509, jwt, b["spiffe_sequence"].as_u64().unwrap_or(0))
    }
}

fn make_kek(dir: &Path) -> PathBuf {
    use std::os::unix::fs::OpenOptionsExt as _;
    let p = dir.join("kek");
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut key))
        .expect("urandom");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&p)
        .expect("kek");
    std::io::Write::write_all(&mut f, &key).expect("kek");
    p
}

/// An agent process that only attests (no enforcement): its exit status
/// and log, or None while it runs.
fn attest(dir: &Path, name: &str, server: &Server, bundle: &Path, token: &str) -> (bool, String) {
    let log = dir.join(format!("agent-{name}.log"));
    let mut child = Command::new(TETHER)
        .args(["--log-format", "text", "agent", "--server", &server.addr])
        .args(["--trust-domain", "example.org", "--node-name", name])
        .arg("--trust-bundle")
        .arg(bundle)
        .args([
            "--metrics",
            "off",
            "--bpf-pin-dir",
            "none",
            "--credentials-dir",
            "none",
        ])
        .arg("--data-dir")
        .arg(dir.join(format!("agent-{name}")))
        .arg("--workload-socket")
        .arg(dir.join(format!("{name}-workload.sock")))
        .arg("--admin-socket")
        .arg(dir.join(format!("{name}-agent.sock")))
        .env("TETHER_JOIN_TOKEN", token)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("tether agent");
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    let mut exited = None;
    let settled = wait_until(Duration::from_secs(30), || {
        if let Ok(Some(st)) = child.try_wait() {
            exited = Some(st);
            return true;
        }
        dir.join(format!("{name}-workload.sock")).exists()
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        settled,
        "the agent neither attested nor failed:\n{}",
        read()
    );
    (exited.is_none(), read())
}

#[test]
fn two_servers_share_one_postgres_database() {
    let pg = Cluster::shared();
    let url = pg.database();
    let db = url
        .rsplit('/')
        .next()
        .and_then(|s| s.split('?').next())
        .expect("db name")
        .to_owned();
    let dir = open_tempdir();
    let kek = make_kek(dir.path());
    // Both at once: the schema is made once, and one of them makes the keys.
    let a = spawn_server(dir.path(), "a", &url, &kek);
    let b = spawn_server(dir.path(), "b", &url, &kek);
    a.wait_ready();
    b.wait_ready();

    // One trust domain: the same authorities from both.
    let (xa, ja, _) = a.bundle();
    let (xb, jb, _) = b.bundle();
    assert_eq!(xa.len(), 1, "one CA made, not one per server: {xa:?}");
    assert_eq!(ja.len(), 1, "one JWT key: {ja:?}");
    assert_eq!((&xa, &ja), (&xb, &jb), "both servers publish one bundle");

    // No private key in clear in the database.
    let clear = pg.sql(
        &db,
        "SELECT (SELECT count(*) FROM x509_cas WHERE position('sealed:v1:'::bytea in key_pkcs8) <> 1) + (SELECT count(*) FROM jwt_keys WHERE position('sealed:v1:'::bytea in key_pkcs8) <> 1)",
    );
    assert_eq!(clear, "0", "private keys are sealed at rest");
    assert_eq!(pg.sql(&db, "SELECT count(*) FROM x509_cas"), "1");

    // A resource applied through one server is served by the other.
    let exe = workload_binary(dir.path(), "cp-workload");
    let manifest = dir.path().join("wi.yaml");
    std::fs::write(&manifest, binary_identity("shared-wi", &exe)).expect("manifest");
    a.ok(&["apply", "-f", manifest.to_str().expect("path")]);
    assert!(
        b.ok(&["get", "wi"]).contains("shared-wi"),
        "server b serves what a stored"
    );

    // A join token made on a is used once, on b; a second use through a
    // is refused.
    let bundle = dir.path().join("bundle.json");
    std::fs::write(&bundle, a.ok(&["get", "bundle"])).expect("bundle");
    let token = a
        .ok(&["token", "create", "--ttl", "5m"])
        .split_whitespace()
        .next()
        .expect("a token")
        .to_owned();
    let (attested, log) = attest(dir.path(), "n1", &b, &bundle, &token);
    assert!(attested, "the agent attests through b:\n{log}");
    assert!(
        a.ok(&["get", "node"]).contains("n1"),
        "a sees the node b attested"
    );
    let (attested, log) = attest(dir.path(), "n2", &a, &bundle, &token);
    assert!(!attested, "a used token attests nobody:\n{log}");
    assert!(log.contains("join token already used"), "{log}");

    // A rotation step on a is followed by b: the prepared CA appears in
    // both bundles, once.
    a.ok(&["ca", "rotate", "prepare"]);
    let followed = wait_until(Duration::from_secs(20), || {
        let (x, _, _) = b.bundle();
        x.len() == 2
    });
    let (xa, _, _) = a.bundle();
    let (xb, _, _) = b.bundle();
    assert!(
        followed,
        "b did not follow a's rotation: {xb:?}\n{}",
        b.logs()
    );
    assert_eq!(xa, xb);
    assert_eq!(pg.sql(&db, "SELECT count(*) FROM x509_cas"), "2");

    // A server without the right key-encryption key cannot use the keys,
    // and says why.
    let wrong = dir.path().join("wrong");
    std::fs::create_dir(&wrong).expect("mkdir");
    let bad_kek = make_kek(&wrong);
    let mut c = spawn_server(&wrong, "c", &url, &bad_kek);
    let st = c.child.wait().expect("wait");
    assert!(!st.success(), "a server with another KEK started");
    assert!(
        c.logs().contains("not a sealed value this server can open"),
        "{}",
        c.logs()
    );
    // The password never shows in the logs.
    for s in [&a, &b, &c] {
        assert!(!s.logs().contains(tether_test_support::pg::PASSWORD));
    }
}
