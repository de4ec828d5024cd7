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
    spawn_server_with(dir, name, url, kek, &[])
}

fn spawn_server_with(dir: &Path, name: &str, url: &str, kek: &Path, extra: &[&str]) -> Server {
    spawn_server_at(dir, name, url, kek, free_port(), extra)
}

fn spawn_server_at(
    dir: &Path,
    name: &str,
    url: &str,
    kek: &Path,
    port: u16,
    extra: &[&str],
) -> Server {
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
        // Key checks an hour apart: what one server changes reaches the
        // others through the database's change feed, not by polling.
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--key-check", "1h"])
        .args(extra)
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
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .expect("log"),
        )
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

/// The hex key identifier `ext` (subjectKeyIdentifier or
/// authorityKeyIdentifier) of a certificate given as base64 DER.
fn key_id(dir: &Path, b64_der: &str, ext: &str) -> String {
    use base64::Engine as _;
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64_der)
        .expect("base64 certificate");
    let f = dir.join(format!("cert-{}.der", rand_suffix()));
    std::fs::write(&f, der).expect("write cert");
    let o = Command::new("openssl")
        .args(["x509", "-inform", "DER", "-noout", "-ext", ext, "-in"])
        .arg(&f)
        .output()
        .expect("openssl x509");
    let text = String::from_utf8_lossy(&o.stdout);
    // The last line holds the identifier (AKI may prefix it with keyid:).
    text.lines()
        .last()
        .unwrap_or_default()
        .trim()
        .trim_start_matches("keyid:")
        .to_owned()
}

/// The key identifier of the CA that signed the certificate server `s`
/// presents on its node API now (openssl s_client).
fn signer_of(dir: &Path, s: &Server) -> String {
    let o = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &s.addr,
            "-servername",
            "tether-server",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("openssl s_client");
    let text = String::from_utf8_lossy(&o.stdout);
    let pem: String = text
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE-----"))
        .take_while(|l| !l.starts_with("-----END CERTIFICATE-----"))
        .filter(|l| !l.starts_with("-----"))
        .collect();
    assert!(!pem.is_empty(), "no certificate from {}: {text}", s.addr);
    key_id(dir, &pem, "authorityKeyIdentifier")
}

/// An agent process that does not enforce: it attests, serves the
/// Workload API and follows the registry.
struct Agent {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    metrics: String,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    /// With `token` empty, none is given (`extra` says how it attests).
    fn spawn(
        dir: &Path,
        name: &str,
        servers: &str,
        bundle: &Path,
        token: &str,
        extra: &[&str],
    ) -> Agent {
        let log = dir.join(format!("agent-{name}.log"));
        let socket = dir.join(format!("{name}-workload.sock"));
        let metrics = format!("127.0.0.1:{}", free_port());
        // A socket an earlier agent of this name left would read as "up".
        let _ = std::fs::remove_file(&socket);
        let mut cmd = Command::new(TETHER);
        if !token.is_empty() {
            cmd.env("TETHER_JOIN_TOKEN", token);
        }
        let child = cmd
            .args(["--log-format", "text", "agent", "--server", servers])
            .args(extra)
            .args(["--trust-domain", "example.org", "--node-name", name])
            .arg("--trust-bundle")
            .arg(bundle)
            .args(["--metrics", &metrics])
            .args(["--bpf-pin-dir", "none"])
            .args(["--credentials-dir", "none"])
            .arg("--data-dir")
            .arg(dir.join(format!("agent-{name}")))
            .arg("--workload-socket")
            .arg(&socket)
            .arg("--admin-socket")
            .arg(dir.join(format!("{name}-agent.sock")))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("tether agent");
        Agent {
            child,
            socket,
            log,
            metrics,
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The value of metric `name` (no labels).
    fn metric(&self, name: &str) -> Option<f64> {
        std::net::TcpStream::connect(&self.metrics).ok()?;
        http_get(&self.metrics, "/metrics")
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} "))?.trim().parse().ok())
    }

    /// Waits until it serves the Workload API (true) or exits (false).
    fn settle(&mut self) -> bool {
        let mut exited = false;
        let settled = wait_until(Duration::from_secs(30), || {
            if let Ok(Some(_)) = self.child.try_wait() {
                exited = true;
                return true;
            }
            self.socket.exists()
        });
        assert!(
            settled,
            "the agent neither attested nor failed:\n{}",
            self.logs()
        );
        !exited
    }
}

/// Attests a node through `server` with `token`: whether it did, and the
/// agent's log.
fn attest(dir: &Path, name: &str, server: &Server, bundle: &Path, token: &str) -> (bool, String) {
    let mut agent = Agent::spawn(dir, name, &server.addr, bundle, token, &[]);
    let ok = agent.settle();
    (ok, agent.logs())
}

/// The `server` field `tether get node NAME` shows.
fn node_server(s: &Server, name: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(&s.ok(&["get", "node", name])).expect("node JSON");
    v[0]["server"].as_str().unwrap_or_default().to_owned()
}

/// The server's name as nodes see it (host name and node API port).
fn server_name(s: &Server) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let port = s.addr.rsplit(':').next().unwrap_or_default();
    format!("{}:{port}", host.trim())
}

/// A fresh workload process, which must get `want` from `socket`.
fn fetch_ok(dir: &Path, exe: &Path, socket: &Path, out: &str, want: &str, agent: &Agent) {
    let ok = wait_until(Duration::from_secs(30), || {
        let r = run_workload(exe, 0, socket, &dir.join(out), "fetch");
        r.output.status.success() && r.spiffe_id() == want
    });
    let r = run_workload(exe, 0, socket, &dir.join(out), "fetch");
    assert!(
        ok,
        "no {want} for a new process: {}\nagent:\n{}",
        r.describe(),
        agent.logs()
    );
}

/// Entry point for workload child processes (see common::workload_command).
#[test]
fn child_entry() {
    if let (Ok(mode), Ok(out)) = (
        std::env::var("TETHER_TEST_CHILD"),
        std::env::var("TETHER_TEST_OUT"),
    ) {
        child_main(&mode, Path::new(&out));
    }
}

/// An agent that knows two servers moves to the second when the first is
/// killed: what is applied through the second reaches it, a new process
/// gets its SVID, and `tether get node` names the server it talks to.
#[test]
fn an_agent_moves_to_another_server_when_its_own_dies() {
    let url = Cluster::shared().database();
    let dir = open_tempdir();
    let kek = make_kek(dir.path());
    let a = spawn_server(dir.path(), "a", &url, &kek);
    a.wait_ready();
    let b = spawn_server(dir.path(), "b", &url, &kek);
    b.wait_ready();
    let bundle = dir.path().join("bundle.json");
    std::fs::write(&bundle, a.ok(&["get", "bundle"])).expect("bundle");
    let token = a.ok(&["token", "create", "--ttl", "5m"]);
    let exe1 = workload_binary(dir.path(), "fo-one");
    let m = dir.path().join("one.yaml");
    std::fs::write(&m, binary_identity("fo-one", &exe1)).expect("manifest");
    a.ok(&["apply", "-f", m.to_str().expect("path")]);

    let mut agent = Agent::spawn(
        dir.path(),
        "fo",
        &format!("{},{}", a.addr, b.addr),
        &bundle,
        token.trim(),
        &[],
    );
    assert!(agent.settle(), "the agent attests:\n{}", agent.logs());
    fetch_ok(
        dir.path(),
        &exe1,
        &agent.socket,
        "o1",
        "spiffe://example.org/fo-one",
        &agent,
    );
    assert_eq!(
        node_server(&b, "fo"),
        server_name(&a),
        "the node talks to a first"
    );

    // Applied through b, followed by a's watch (the change feed).
    let exe0 = workload_binary(dir.path(), "fo-zero");
    let m = dir.path().join("zero.yaml");
    std::fs::write(&m, binary_identity("fo-zero", &exe0)).expect("manifest");
    b.ok(&["apply", "-f", m.to_str().expect("path")]);
    fetch_ok(
        dir.path(),
        &exe0,
        &agent.socket,
        "o0",
        "spiffe://example.org/fo-zero",
        &agent,
    );

    drop(a); // SIGKILL
    let exe2 = workload_binary(dir.path(), "fo-two");
    let m = dir.path().join("two.yaml");
    std::fs::write(&m, binary_identity("fo-two", &exe2)).expect("manifest");
    b.ok(&["apply", "-f", m.to_str().expect("path")]);
    fetch_ok(
        dir.path(),
        &exe2,
        &agent.socket,
        "o2",
        "spiffe://example.org/fo-two",
        &agent,
    );
    assert!(
        wait_until(Duration::from_secs(20), || node_server(&b, "fo")
            == server_name(&b)),
        "the node now talks to b: {}",
        b.ok(&["get", "node", "fo"])
    );
    assert!(
        agent.logs().contains("moved to the next"),
        "the agent says it moved:\n{}",
        agent.logs()
    );
    assert_eq!(
        agent.metric("tether_agent_server_connected"),
        Some(1.0),
        "{}",
        http_get(&agent.metrics, "/metrics")
    );

    // Every server down: the agent says so and keeps what it has.
    let port: u16 = b
        .addr
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    drop(b);
    assert!(
        wait_until(Duration::from_secs(30), || agent
            .metric("tether_agent_server_connected")
            == Some(0.0)),
        "the metric shows no server:\n{}",
        agent.logs()
    );
    assert!(
        agent
            .metric("tether_agent_server_unreachable_since_seconds")
            .unwrap_or(0.0)
            > 0.0
    );
    std::thread::sleep(Duration::from_secs(2));
    // Back: a new process gets its SVID, and the node's outage is on record.
    let b = spawn_server_at(dir.path(), "b", &url, &kek, port, &[]);
    b.wait_ready();
    fetch_ok(
        dir.path(),
        &exe2,
        &agent.socket,
        "o3",
        "spiffe://example.org/fo-two",
        &agent,
    );
    assert!(
        wait_until(Duration::from_secs(30), || agent
            .metric("tether_agent_server_connected")
            == Some(1.0)),
        "the metric shows the server back"
    );
    let v: serde_json::Value =
        serde_json::from_str(&b.ok(&["get", "node", "fo"])).expect("node JSON");
    let secs = v[0]["lastOffline"]["seconds"].as_i64().unwrap_or(-1);
    assert!(secs >= 2, "the outage is recorded: {v}");
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
    let (before, _, _) = a.bundle();
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
    let old_ca = key_id(dir.path(), &before[0], "subjectKeyIdentifier");
    let new_ca = xa
        .iter()
        .find(|c| !before.contains(c))
        .map(|c| key_id(dir.path(), c, "subjectKeyIdentifier"))
        .expect("the prepared CA");
    assert_eq!(
        signer_of(dir.path(), &b),
        old_ca,
        "b signs with the old CA before activation"
    );
    // Activated on a: both sign with the new CA, b without being asked.
    a.ok(&["ca", "rotate", "activate"]);
    assert_eq!(signer_of(dir.path(), &a), new_ca, "a signs with the new CA");
    assert!(
        wait_until(Duration::from_secs(20), || signer_of(dir.path(), &b)
            == new_ca),
        "b did not switch to the new CA:\n{}",
        b.logs()
    );
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

/// x509pop: a node attests with a certificate from the operator's node CA
/// and no join token; one from another CA, or naming another node, is
/// refused with a clear error.
#[test]
fn a_node_attests_with_an_operator_certificate_and_no_token() {
    let url = Cluster::shared().database();
    let dir = open_tempdir();
    let d = dir.path();
    let node_ca = pki::OpensslCa::new(d, "node-ca", "/CN=node-ca");
    let other_ca = pki::OpensslCa::new(d, "other-ca", "/CN=other-ca");
    node_ca.leaf_with_cn("good", "pop-node", "DNS:pop-node");
    node_ca.leaf_with_cn("also-good", "pop-node", "DNS:pop-node");
    other_ca.leaf_with_cn("foreign", "pop-node", "DNS:pop-node");
    let kek = make_kek(d);
    let ca = d.join("node-ca.crt");
    let s = spawn_server_with(
        d,
        "s",
        &url,
        &kek,
        &["--node-ca", ca.to_str().expect("path")],
    );
    s.wait_ready();
    let bundle = d.join("bundle.json");
    std::fs::write(&bundle, s.ok(&["get", "bundle"])).expect("bundle");
    let pop = |cert: &str| {
        [
            "--x509pop-cert".to_owned(),
            d.join(format!("{cert}.crt")).display().to_string(),
            "--x509pop-key".to_owned(),
            d.join(format!("{cert}.key")).display().to_string(),
        ]
    };
    let run = |node: &str, cert: &str| {
        let a = pop(cert);
        let extra: Vec<&str> = a.iter().map(String::as_str).collect();
        let mut agent = Agent::spawn(d, node, &s.addr, &bundle, "", &extra);
        let ok = agent.settle();
        (ok, agent.logs())
    };

    let (ok, log) = run("pop-node", "foreign");
    assert!(!ok, "a certificate of another CA attested:\n{log}");
    assert!(
        log.contains("not issued by the operator's node CA"),
        "{log}"
    );
    let (ok, log) = run("someone-else", "good");
    assert!(!ok, "a certificate attested another node's name:\n{log}");
    assert!(log.contains("names node \"pop-node\""), "{log}");
    assert!(
        !s.ok(&["get", "node"]).contains("pop-node"),
        "nothing was attested yet"
    );

    let (ok, log) = run("pop-node", "good");
    assert!(ok, "the operator's certificate attests:\n{log}");
    let v: serde_json::Value =
        serde_json::from_str(&s.ok(&["get", "node", "pop-node"])).expect("node JSON");
    assert_eq!(
        v[0]["spiffeId"], "spiffe://example.org/tether/node/pop-node",
        "{v}"
    );
    assert!(
        s.logs().contains("method=\"x509pop\"") || s.logs().contains("method=x509pop"),
        "{}",
        s.logs()
    );

    // Deleting the node revokes its certificate: a host still holding it
    // cannot attest again.
    s.ok(&["delete", "node", "pop-node"]);
    std::fs::remove_dir_all(d.join("agent-pop-node")).expect("forget the node SVID");
    let (ok, log) = run("pop-node", "good");
    assert!(!ok, "a deleted node's certificate attested again:\n{log}");
    assert!(log.contains("node was deleted"), "{log}");
    // Nor with another certificate issued before the deletion.
    let (ok, log) = run("pop-node", "also-good");
    assert!(!ok, "an older certificate attested a deleted node:\n{log}");
    assert!(log.contains("node was deleted"), "{log}");
    // A certificate the operator issues afterwards brings it back.
    std::thread::sleep(Duration::from_millis(1100));
    node_ca.leaf_with_cn("renewed", "pop-node", "DNS:pop-node");
    std::fs::remove_dir_all(d.join("agent-pop-node")).ok();
    let (ok, log) = run("pop-node", "renewed");
    assert!(
        ok,
        "a certificate issued after the deletion attests:\n{log}"
    );

    // A name a join token attested is not taken over by a certificate.
    node_ca.leaf_with_cn("tok", "tok-node", "DNS:tok-node");
    let token = s.ok(&["token", "create", "--ttl", "5m"]);
    let (ok, log) = attest(d, "tok-node", &s, &bundle, token.trim());
    assert!(ok, "{log}");
    std::fs::remove_dir_all(d.join("agent-tok-node")).expect("forget the node SVID");
    let (ok, log) = run("tok-node", "tok");
    assert!(!ok, "a certificate took over a token-attested node:\n{log}");
    assert!(log.contains("attested with a join token"), "{log}");
}
