//! The mesh between hosts: three network namespaces on one bridge (no
//! route out). Host B runs the server, an agent and the services; host A
//! runs its own agent and the clients; host C has no agent. Real Redis,
//! PostgreSQL (with its own TLS), redis-cli, psql, tshark and openssl.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::capture::Capture;
use common::kernel::Cgroup;
use common::netns::{IFACE, Lan};
use common::servers::{PASSWORD, Postgres, Redis, which};
use common::*;

const MESH_PORT: u16 = 15443;
/// 2023-11-14 10:00 UTC and 23:30 UTC: inside and outside the Redis
/// policy's window (hour < 22).
const DAY: i64 = 1_699_956_000;
const NIGHT: i64 = 1_700_004_600;

fn real(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).expect("canonicalize")
}

fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A standalone `tether agent` on a host, joined to the server on B.
struct Agent {
    child: Child,
    dir: tempfile::TempDir,
}

impl Agent {
    fn start(lan: &Lan, host: &str, up: &Up, cg: &Cgroup, clock: &Path) -> Agent {
        let dir = open_tempdir();
        let d = dir.path();
        let token = up.ok(&["token", "create"]).trim().to_string();
        std::fs::write(d.join("bundle.json"), up.ok(&["get", "bundle"])).expect("bundle");
        let log = d.join("log");
        let mut cmd = lan.command(host, TETHER);
        cmd.args(["--log-format", "json", "agent", "--server", &up.node_api])
            // Never the host's default mount point (agents here share the
            // host's mount namespace).
            .args(["--credentials-dir", "none"])
            .args([
                "--node-name",
                &format!("host-{host}"),
                "--join-token",
                &token,
            ])
            .args([
                "--metrics",
                "off",
                "--rescan",
                "5s",
                "--bpf-pin-dir",
                "none",
            ])
            .arg("--trust-bundle")
            .arg(d.join("bundle.json"))
            .arg("--data-dir")
            .arg(d.join("data"))
            .arg("--workload-socket")
            .arg(d.join("workload.sock"))
            .arg("--admin-socket")
            .arg(d.join("agent.sock"))
            .arg("--enforce-cgroup")
            .arg(&cg.path)
            .arg("--audit-log")
            .arg(d.join("audit.log"))
            .arg("--clock-file")
            .arg(clock)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"));
        let mut child = cmd.spawn().expect("spawn agent");
        let started = wait_until(Duration::from_secs(30), || {
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "agent on {host} exited with {st}:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("agent started")
        });
        let a = Agent { child, dir };
        assert!(started, "agent on {host} did not start:\n{}", a.logs());
        assert!(a.logs().contains("mesh active"), "{}", a.logs());
        a
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }

    fn workload_socket(&self) -> PathBuf {
        self.dir.path().join("workload.sock")
    }

    fn audit(&self) -> Vec<serde_json::Value> {
        json_lines(&self.dir.path().join("audit.log"))
    }

    fn command(&self, args: &[&str]) -> Output {
        Command::new(TETHER)
            .args(args)
            .env("TETHER_AGENT_SOCKET", self.socket())
            .output()
            .expect("tether")
    }

    fn tether(&self, args: &[&str]) -> String {
        let o = self.command(args);
        assert!(
            o.status.success(),
            "tether {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        if !wait_until(Duration::from_secs(5), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        }) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The live tunnels an agent lists.
fn connections(out: &str) -> Vec<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_str(out).expect("connections json");
    v["connections"].as_array().cloned().unwrap_or_default()
}

/// Hosts A (agent, clients), B (server, agent, services) and C (nothing).
/// Fields drop in order: processes first, the namespaces last.
struct World {
    a: Agent,
    up: Up,
    redis: Redis,
    cg_a: Cgroup,
    cg_b: Cgroup,
    clocks: tempfile::TempDir,
    lan: Lan,
}

impl World {
    fn new(tag: &str) -> World {
        let lan = Lan::new(tag, &["a", "b", "c"]);
        let cg_a = Cgroup::new(&format!("{tag}-a"));
        let cg_b = Cgroup::new(&format!("{tag}-b"));
        let clocks = open_tempdir();
        for h in ["a", "b"] {
            std::fs::write(clocks.path().join(h), DAY.to_string()).expect("clock");
        }
        let audit_b = clocks.path().join("audit-b.log");
        let up = Up::start_on(
            &lan,
            "b",
            &[
                "--node-name",
                "host-b",
                "--enforce-cgroup",
                &cg_b.path.display().to_string(),
                "--audit-log",
                &audit_b.display().to_string(),
                "--clock-file",
                &clocks.path().join("b").display().to_string(),
            ],
        );
        let a = Agent::start(&lan, "a", &up, &cg_a, &clocks.path().join("a"));
        let redis = Redis::start_on(&lan, "b", &cg_b);
        World {
            a,
            up,
            redis,
            cg_a,
            cg_b,
            clocks,
            lan,
        }
    }

    fn b(&self) -> String {
        self.lan.addr("b")
    }

    fn set_clock(&self, host: &str, t: i64) {
        std::fs::write(self.clocks.path().join(host), t.to_string()).expect("clock");
    }

    fn audit_b(&self) -> Vec<serde_json::Value> {
        json_lines(&self.clocks.path().join("audit-b.log"))
    }

    /// Identities, Services and policies; waits until both agents have them.
    fn apply(&self, services: &str) {
        self.apply_with("mutual, nodes: [host-b]", services)
    }

    fn apply_with(&self, redis_mode: &str, services: &str) {
        let redis_cli = real(&which("redis-cli"));
        let py = python();
        self.up.apply_ok(&format!(
            "apiVersion: tether.dev/v1alpha1
kind: WorkloadIdentity
metadata: {{name: redis-cli}}
spec:
  spiffeId: spiffe://example.org/redis-cli
  selectors: [[\"process:sha256:{rs}\", \"process:path:{rc}\", \"unix:uid:0\"]]
---
apiVersion: tether.dev/v1alpha1
kind: WorkloadIdentity
metadata: {{name: streamer}}
spec:
  spiffeId: spiffe://example.org/streamer
  selectors: [[\"process:sha256:{ps}\", \"process:path:{pc}\", \"unix:uid:0\"]]
  x509Ttl: 10s
---
apiVersion: tether.dev/v1alpha1
kind: Service
metadata: {{name: redis}}
spec:
  addresses: [{{cidr: {b}/32, ports: [{rp}]}}]
  mesh: {{mode: {redis_mode}}}
---
apiVersion: tether.dev/v1alpha1
kind: AccessPolicy
metadata: {{name: redis-clients}}
spec:
  services: [redis]
  identities: [redis-cli]
  when: context.time.hour < 22
{services}",
            rs = sha256_file(&redis_cli),
            rc = redis_cli.display(),
            ps = sha256_file(&py),
            pc = py.display(),
            b = self.b(),
            rp = self.redis.port,
        ));
        let to = format!("{}:{}", self.b(), self.redis.port);
        let check = ["policy", "check", "--identity", "redis-cli", "--to", &to];
        // Either agent may not have the new snapshot yet: the check then
        // fails ("not known to this agent") and is retried.
        let says = |o: Output| String::from_utf8_lossy(&o.stdout).contains("redis-clients");
        let ready = wait_until(Duration::from_secs(15), || {
            says(self.up.tether(&check)) && says(self.a.command(&check))
        });
        assert!(ready, "policies never reached both agents");
    }

    /// A command on host A, in its enforced cgroup, with the passwords in
    /// its environment.
    fn on_a(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = self.lan.command("a", program);
        self.cg_a.enter(&mut c);
        c.env("REDISCLI_AUTH", PASSWORD).env("PGPASSWORD", PASSWORD);
        c
    }

    fn redis_cli_on_a(&self, args: &[&str]) -> String {
        let o = self
            .on_a(which("redis-cli"))
            .args(["-h", &self.b(), "-p", &self.redis.port.to_string()])
            .args(args)
            .stderr(Stdio::piped())
            .output()
            .expect("redis-cli");
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout).trim(),
            String::from_utf8_lossy(&o.stderr).trim()
        )
    }
}

/// A certificate authority and an X.509-SVID of another trust domain.
fn foreign_svid(dir: &Path) -> (PathBuf, PathBuf) {
    pki::OpensslCa::new(dir, "ca", "/O=other.org").leaf("svid", "URI:spiffe://other.org/redis-cli")
}

/// A shell holding the password sends AUTH and PING to Redis over
/// /dev/tcp; returns what came back.
fn shell_ping(mut bash: Command, host: &str, port: u16) -> String {
    let script = format!(
        "exec 3<>/dev/tcp/{host}/{port} && printf 'AUTH {PASSWORD}\\r\\nPING\\r\\n' >&3 && timeout 2 cat <&3"
    );
    let o = bash.args(["-c", &script]).output().expect("bash");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn inbound_denials_from(audit: &[serde_json::Value], peer_ip: &str) -> Vec<serde_json::Value> {
    audit
        .iter()
        .filter(|r| {
            r["event"] == "tunnel"
                && r["direction"] == "inbound"
                && r["verdict"] == "deny"
                && r["peerAddress"]
                    .as_str()
                    .is_some_and(|a| a.starts_with(&format!("{peer_ip}:")))
        })
        .cloned()
        .collect()
}

#[test]
fn redis_and_postgres_through_the_mesh() {
    let w = World::new("m1");
    let pg = Postgres::start_on(&w.lan, "b", &w.cg_b);
    let psql = real(&pg.psql());
    w.apply(&format!(
        "---
{identity}apiVersion: tether.dev/v1alpha1
kind: Service
metadata: {{name: postgres}}
spec:
  addresses: [{{cidr: {b}/32, ports: [{pp}]}}]
  mesh: {{mode: passthrough}}
---
apiVersion: tether.dev/v1alpha1
kind: AccessPolicy
metadata: {{name: psql-clients}}
spec:
  services: [postgres]
  identities: [psql]
",
        identity = binary_identity("psql", &psql),
        b = w.b(),
        pp = pg.port,
    ));
    let server_port: u16 =
        w.up.node_api
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("server port");
    let b_ip = w.b();
    let a_ip = w.lan.addr("a");
    let c_ip = w.lan.addr("c");

    // --- the authorized client, through the mesh, on a captured link ---
    let mut cap = Capture::start(IFACE, "", |c| w.lan.enter("a", c));
    let before = w.redis.connections_received();
    assert_eq!(w.redis_cli_on_a(&["PING"]), "PONG", "{}", w.a.logs());
    assert_eq!(
        w.redis_cli_on_a(&["SET", "tether-mesh-key", "mesh-value-7f3a"]),
        "OK"
    );
    assert_eq!(
        w.redis_cli_on_a(&["GET", "tether-mesh-key"]),
        "mesh-value-7f3a"
    );
    // A connection kept open while both agents list it.
    let mut blocked = w
        .on_a(which("redis-cli"))
        .args([
            "-h",
            &b_ip,
            "-p",
            &w.redis.port.to_string(),
            "BLPOP",
            "tether-empty",
            "4",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-cli BLPOP");
    let mut listed_a = Vec::new();
    let mut listed_b = Vec::new();
    let seen = wait_until(Duration::from_secs(3), || {
        listed_a = connections(&w.a.tether(&["connections"]));
        listed_b = connections(&w.up.ok(&["connections"]));
        listed_a.iter().any(|c| c["pid"] == blocked.id())
            && listed_b.iter().any(|c| c["direction"] == "inbound")
    });
    assert!(seen, "tunnel not listed: A {listed_a:?} B {listed_b:?}");
    let out = listed_a
        .iter()
        .find(|c| c["pid"] == blocked.id())
        .expect("outbound");
    assert_eq!(out["direction"], "outbound");
    assert_eq!(out["localSpiffeId"], "spiffe://example.org/redis-cli");
    assert_eq!(
        out["peerSpiffeId"],
        "spiffe://example.org/tether/node/host-b"
    );
    assert_eq!(out["tlsVersion"], "TLSv1.3");
    assert!(
        out["cipherSuite"]
            .as_str()
            .is_some_and(|c| c.starts_with("TLS13_")),
        "{out}"
    );
    assert!(out["bytesSent"].as_u64().is_some_and(|n| n > 0), "{out}");
    assert_eq!(out["destination"], format!("{b_ip}:{}", w.redis.port));
    let inb = listed_b
        .iter()
        .find(|c| c["direction"] == "inbound")
        .expect("inbound");
    assert_eq!(inb["peerSpiffeId"], "spiffe://example.org/redis-cli");
    assert!(
        inb["peerAddress"]
            .as_str()
            .is_some_and(|a| a.starts_with(&format!("{a_ip}:")))
    );
    let _ = blocked.wait();
    assert_eq!(
        w.redis.connections_received() - before,
        4 + 1,
        "three redis-cli runs, the BLPOP and this counter query"
    );
    // Let the capture write out the last tunnels before stopping it (a stop
    // right after the traffic has lost the last stream); the count is
    // asserted below either way.
    let tunnel_streams = |cap: &Capture| {
        let mut t = cap.fields(
            &[MESH_PORT, server_port],
            &format!("tcp.dstport=={MESH_PORT}"),
            "tcp.stream",
        );
        t.sort();
        t.dedup();
        t.len()
    };
    wait_until(Duration::from_secs(10), || tunnel_streams(&cap) >= 4);
    cap.stop();

    // Only TLS 1.3 on the link; no application byte, password, key or
    // SPIFFE ID in cleartext; no certificate visible.
    let raw = std::fs::read(&cap.file).expect("capture");
    for secret in [
        PASSWORD.as_bytes(),
        b"mesh-value-7f3a",
        b"tether-mesh-key",
        b"PING",
        b"PONG",
        b"spiffe://",
        b"example.org",
        b"redis-cli",
    ] {
        assert!(
            !raw.windows(secret.len()).any(|win| win == secret),
            "{:?} appears on the wire",
            String::from_utf8_lossy(secret)
        );
    }
    let ports = [MESH_PORT, server_port];
    // Distinct TCP streams to the mesh port (not SYNs: the capture may
    // start a moment after the first one left).
    let mut tunnels = cap.fields(&ports, &format!("tcp.dstport=={MESH_PORT}"), "tcp.stream");
    tunnels.sort();
    tunnels.dedup();
    assert!(
        tunnels.len() >= 4,
        "expected a tunnel per connection: {tunnels:?}"
    );
    // Retransmitted segments repeat bytes tshark already dissected (a
    // loaded 2-core machine drops and resends now and then); the byte
    // search above covers them.
    const RESENT: &str = "(tcp.analysis.retransmission || tcp.analysis.fast_retransmission || tcp.analysis.spurious_retransmission || tcp.analysis.out_of_order)";
    // Every payload of every stream that began in the capture (the
    // tunnels) is TLS. The control plane's stream began before it, so
    // tshark may not find its record boundaries; the byte search above
    // covers it.
    let not_tls = cap.fields(
        &ports,
        &format!("tcp.port=={MESH_PORT} && tcp.len>0 && !tls && !tcp.reassembled_in && !{RESENT}"),
        "frame.number",
    );
    let described = cap.fields(
        &ports,
        &format!("tcp.len>0 && !tls && !tcp.reassembled_in && !{RESENT}"),
        "_ws.col.Info",
    );
    assert!(
        not_tls.is_empty(),
        "TCP payload that is not TLS: frames {not_tls:?} {described:?}"
    );
    for hello in [1, 2] {
        let v = cap.fields(
            &ports,
            &format!("tls.handshake.type=={hello}"),
            "tls.handshake.extensions.supported_version",
        );
        assert!(!v.is_empty(), "no handshake type {hello} seen");
        assert!(
            v.iter().all(|s| s == "0x0304"),
            "versions offered/chosen: {v:?}"
        );
    }
    assert!(
        cap.fields(&ports, "tls.handshake.type==11", "frame.number")
            .is_empty(),
        "a certificate in cleartext"
    );
    // Hybrid post-quantum key exchange on every tunnel (X25519MLKEM768).
    let groups = cap.fields(
        &ports,
        &format!("tcp.srcport=={MESH_PORT} && tls.handshake.type==2"),
        "tls.handshake.extensions_key_share_group",
    );
    assert!(
        groups.len() >= 4 && groups.iter().all(|g| g == "4588"),
        "key exchange groups chosen: {groups:?}"
    );
    assert!(
        cap.fields(
            &ports,
            &format!("tcp.port=={MESH_PORT} && tls.handshake.extensions_server_name"),
            "frame.number"
        )
        .is_empty(),
        "SNI on a tunnel"
    );
    assert!(
        cap.fields(
            &ports,
            &format!("tcp.port=={}", w.redis.port),
            "frame.number"
        )
        .is_empty(),
        "the service port itself was used on the link"
    );

    // --- unauthorized processes on A are refused, and audited ---
    let before = w.redis.connections_received();
    assert!(
        !shell_ping(w.on_a("bash"), &b_ip, w.redis.port).contains("PONG"),
        "bash reached Redis"
    );
    let o = w
        .on_a(python())
        .args([
            "-c",
            &format!("import socket; s=socket.create_connection(('{b_ip}', {}), 3); s.sendall(b'PING\\r\\n'); print(s.recv(64))", w.redis.port),
        ])
        .output()
        .expect("python");
    assert!(
        !o.status.success(),
        "python (no access to redis) connected: {o:?}"
    );
    assert_eq!(
        w.redis.connections_received() - before,
        1,
        "only the counter query reached Redis"
    );
    // The kernel's refusals reach the audit log on the agent's next drain
    // (every 20 ms), not before the refused process exits.
    let denied_a = || -> Vec<serde_json::Value> {
        w.a.audit()
            .into_iter()
            .filter(|r| {
                r["destination"] == format!("{b_ip}:{}", w.redis.port)
                    && r["verdict"].as_str().is_some_and(|v| v.starts_with("deny"))
            })
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(10), || denied_a().len() >= 2),
        "A's audit lacks the refusals: {:?}\npython: {o:?}",
        denied_a()
    );

    // An unauthorized process on B itself cannot go around the agent
    // either: not at the Service's address, nor over loopback (Redis
    // listens on every address; the Service names one).
    for target in [b_ip.as_str(), "127.0.0.1"] {
        let before = w.redis.connections_received();
        let mut bash_b = w.lan.command("b", "bash");
        w.cg_b.enter(&mut bash_b);
        assert!(
            !shell_ping(bash_b, target, w.redis.port).contains("PONG"),
            "bash on B reached Redis at {target}"
        );
        assert_eq!(w.redis.connections_received() - before, 1, "{target}");
    }

    // `policy check` finds what the connect hook finds, loopback included.
    let local = format!("127.0.0.1:{}", w.redis.port);
    let explained =
        w.up.ok(&["policy", "check", "--identity", "redis-cli", "--to", &local]);
    assert!(explained.contains("redis-clients"), "{explained}");

    // --- a host without an agent reaches neither Redis nor the tunnel ---
    let before = w.redis.connections_received();
    let o = w
        .lan
        .command("c", "timeout")
        .args(["4", which("redis-cli").to_str().unwrap_or("redis-cli")])
        .args(["-h", &b_ip, "-p", &w.redis.port.to_string(), "PING"])
        .env("REDISCLI_AUTH", PASSWORD)
        .output()
        .expect("redis-cli on C");
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains("PONG"),
        "host C reached Redis directly"
    );
    assert_eq!(
        w.redis.connections_received() - before,
        1,
        "only the counter query reached Redis"
    );
    // Nor through another address of B that the Service does not name.
    w.lan.add_addr("b", "10.99.0.12/24");
    let before = w.redis.connections_received();
    let o = w
        .lan
        .command("c", "timeout")
        .args(["4", which("redis-cli").to_str().unwrap_or("redis-cli")])
        .args(["-h", "10.99.0.12", "-p", &w.redis.port.to_string(), "PING"])
        .env("REDISCLI_AUTH", PASSWORD)
        .output()
        .expect("redis-cli on C");
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains("PONG"),
        "host C reached Redis at an address the Service does not name"
    );
    assert_eq!(w.redis.connections_received() - before, 1);
    // Without a certificate, and then with an SVID of another trust domain.
    let dir = open_tempdir();
    let (crt, key) = foreign_svid(dir.path());
    for with_cert in [false, true] {
        let mut c = w.lan.command("c", "openssl");
        c.args([
            "s_client",
            "-tls1_3",
            "-connect",
            &format!("{b_ip}:{MESH_PORT}"),
        ]);
        if with_cert {
            c.arg("-cert").arg(&crt).arg("-key").arg(&key);
        }
        let o = c
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut ch| {
                use std::io::Write as _;
                if let Some(mut i) = ch.stdin.take() {
                    let _ = i.write_all(b"TTHR\x01\x04");
                }
                ch.wait_with_output()
            })
            .expect("openssl s_client");
        let _ = o;
    }
    let refused = wait_until(Duration::from_secs(5), || {
        inbound_denials_from(&w.audit_b(), &c_ip).len() >= 2
    });
    let c_denials = inbound_denials_from(&w.audit_b(), &c_ip);
    assert!(
        refused,
        "B did not audit both refused handshakes from C: {c_denials:?}"
    );
    assert!(
        c_denials.iter().all(|r| r["reason"]
            .as_str()
            .is_some_and(|s| s.contains("TLS handshake failed"))),
        "{c_denials:?}"
    );
    assert!(
        c_denials.iter().any(|r| r["reason"]
            .as_str()
            .is_some_and(|s| s.contains("X.509-SVID rejected"))),
        "the other trust domain's SVID was not rejected as such: {c_denials:?}"
    );
    assert_eq!(w.redis.connections_received() - before, 2);

    // An SVID this trust domain issued, through A's Workload API, to a
    // process that has an identity: valid, but no agent's mesh SVID. Taken
    // to C, a host without an agent, it opens no tunnel.
    let fetch = format!(
        "from spiffe import WorkloadApiClient\n\
         from cryptography.hazmat.primitives import serialization as s\n\
         v = WorkloadApiClient().fetch_x509_svid()\n\
         open({crt:?}, 'wb').write(b''.join(c.public_bytes(s.Encoding.PEM) for c in v.cert_chain))\n\
         open({key:?}, 'wb').write(v.private_key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption()))\n\
         print(v.spiffe_id)\n",
        crt = dir.path().join("wl.pem").display().to_string(),
        key = dir.path().join("wl.key").display().to_string(),
    );
    let o = w
        .on_a(python())
        .args(["-c", &fetch])
        .env(
            "SPIFFE_ENDPOINT_SOCKET",
            format!("unix://{}", w.a.workload_socket().display()),
        )
        .output()
        .expect("python on A");
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("spiffe://example.org/streamer"),
        "no Workload API SVID on A: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let before_wl = inbound_denials_from(&w.audit_b(), &c_ip).len();
    let o = w
        .lan
        .command("c", "openssl")
        .args([
            "s_client",
            "-tls1_3",
            "-connect",
            &format!("{b_ip}:{MESH_PORT}"),
        ])
        .arg("-cert")
        .arg(dir.path().join("wl.pem"))
        .arg("-key")
        .arg(dir.path().join("wl.key"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut ch| {
            use std::io::Write as _;
            if let Some(mut i) = ch.stdin.take() {
                let _ = i.write_all(b"TTHR\x01\x04");
            }
            ch.wait_with_output()
        })
        .expect("openssl s_client");
    let refused = wait_until(Duration::from_secs(5), || {
        inbound_denials_from(&w.audit_b(), &c_ip).len() > before_wl
    });
    let wl_denial = inbound_denials_from(&w.audit_b(), &c_ip);
    assert!(
        refused
            && wl_denial[before_wl..].iter().any(|r| r["reason"]
                .as_str()
                .is_some_and(|s| s.contains("not a mesh SVID"))),
        "a Workload API SVID was not refused as such at B: {wl_denial:?}\n{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert_eq!(w.redis.connections_received() - before, 3);

    // --- ingress policy on B, evaluated with B's own context ---
    w.set_clock("b", NIGHT);
    let out = w.redis_cli_on_a(&["PING"]);
    assert!(
        !out.contains("PONG"),
        "B let a connection through outside the window: {out}"
    );
    let got = wait_until(Duration::from_secs(5), || {
        w.audit_b().iter().any(|r| {
            r["direction"] == "inbound" && r["verdict"] == "deny" && r["service"] == "redis"
        })
    });
    assert!(got, "no ingress denial in B's audit");
    let denial = w
        .audit_b()
        .into_iter()
        .find(|r| r["direction"] == "inbound" && r["verdict"] == "deny" && r["service"] == "redis")
        .expect("denial");
    assert_eq!(
        denial["peerSpiffeId"], "spiffe://example.org/redis-cli",
        "{denial}"
    );
    assert!(
        denial["peerAddress"]
            .as_str()
            .is_some_and(|a| a.starts_with(&format!("{a_ip}:")))
    );
    assert_eq!(denial["node"], "host-b");
    // A's record of the same tunnel names B's refusal.
    let a_saw = wait_until(Duration::from_secs(5), || {
        w.a.audit().iter().any(|r| {
            r["event"] == "tunnel"
                && r["direction"] == "outbound"
                && r["verdict"] == "deny"
                && r["reason"]
                    .as_str()
                    .is_some_and(|s| s.contains("ingress policy"))
        })
    });
    assert!(
        a_saw,
        "A did not record the peer's refusal: {:?}",
        w.a.audit()
    );
    w.set_clock("b", DAY);
    assert_eq!(w.redis_cli_on_a(&["PING"]), "PONG");
    // Both agents' records of an allowed tunnel name both ends.
    let allowed_b = w
        .audit_b()
        .into_iter()
        .rfind(|r| r["direction"] == "inbound" && r["verdict"] == "allow")
        .expect("allowed inbound");
    assert_eq!(allowed_b["peerSpiffeId"], "spiffe://example.org/redis-cli");
    assert_eq!(allowed_b["rule"], "redis-clients");
    let allowed_a =
        w.a.audit()
            .into_iter()
            .rfind(|r| r["direction"] == "outbound" && r["verdict"] == "allow")
            .expect("allowed outbound");
    assert_eq!(allowed_a["spiffeId"], "spiffe://example.org/redis-cli");
    assert_eq!(
        allowed_a["peerSpiffeId"],
        "spiffe://example.org/tether/node/host-b"
    );

    // --- psql with its own TLS, carried unchanged (passthrough) ---
    let o = w
        .on_a(&psql)
        .arg(format!(
            "host={b_ip} port={} user=postgres dbname=postgres sslmode=require connect_timeout=10",
            pg.port
        ))
        .args([
            "-Atc",
            "select ssl, version from pg_stat_ssl where pid = pg_backend_pid()",
        ])
        .output()
        .expect("psql");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "t|TLSv1.3",
        "psql: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        w.a.logs()
    );
}

/// The sink service on B: reads the PROXY v2 header the agent sends, then
/// hashes everything until EOF and answers with the digest and the count
/// (so the client's half-close is what ends the upload). Progress and the
/// end of each connection go to a file.
const SINK: &str = r#"
import hashlib, socket, sys, threading
host, port, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def note(line):
    with open(log, "a") as f:
        f.write(line + "\n")
def header(c):
    buf = b""
    while len(buf) < 16:
        buf += c.recv(16 - len(buf))
    assert buf[:12] == b"\r\n\r\n\x00\r\nQUIT\n", buf
    n = int.from_bytes(buf[14:16], "big")
    body = b""
    while len(body) < n:
        body += c.recv(n - len(body))
    addr = 12 if buf[13] == 0x11 else 36
    src = ".".join(str(b) for b in body[0:4]) if buf[13] == 0x11 else body[0:16].hex()
    tlvs, i, spiffe = body[addr:], 0, ""
    while i + 3 <= len(tlvs):
        t, l = tlvs[i], int.from_bytes(tlvs[i+1:i+3], "big")
        if t == 0xE0:
            spiffe = tlvs[i+3:i+3+l].decode()
        i += 3 + l
    return src, spiffe
def serve(c, k):
    try:
        src, spiffe = header(c)
        note(f"conn {k} from {src} id {spiffe}")
        h, total, mark = hashlib.sha256(), 0, 0
        while True:
            b = c.recv(1 << 20)
            if not b:
                break
            h.update(b)
            total += len(b)
            if total - mark >= 8 << 20:
                mark = total
                note(f"progress {k} {total}")
        c.sendall(f"{h.hexdigest()} {total}\n".encode())
        note(f"end {k} eof {total}")
    except Exception as e:
        note(f"end {k} error {type(e).__name__}")
    finally:
        c.close()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port))
s.listen(16)
note("listening")
k = 0
while True:
    c, _ = s.accept()
    k += 1
    threading.Thread(target=serve, args=(c, k), daemon=True).start()
"#;

/// The client on A: uploads `size` bytes (or forever with -1), half-closes,
/// and prints its own digest next to the server's answer.
const UPLOAD: &str = r#"
import hashlib, os, socket, sys
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection((host, port), 10)
s.settimeout(120)
block = bytearray(os.urandom(1 << 20))
h, sent, n = hashlib.sha256(), 0, 0
while size < 0 or sent < size:
    block[0:8] = n.to_bytes(8, "little")
    chunk = block if size < 0 else block[: min(len(block), size - sent)]
    s.sendall(chunk)
    h.update(chunk)
    sent += len(chunk)
    n += 1
s.shutdown(socket.SHUT_WR)
reply = b""
while not reply.endswith(b"\n"):
    b = s.recv(256)
    if not b:
        break
    reply += b
print(h.hexdigest(), sent)
print(reply.decode().strip())
"#;

#[test]
fn bulk_transfer_half_close_kill_and_proxy_header() {
    let w = World::new("m2");
    let dir = open_tempdir();
    let (sink, upload, log) = (
        dir.path().join("sink.py"),
        dir.path().join("upload.py"),
        dir.path().join("sink.log"),
    );
    std::fs::write(&sink, SINK).expect("sink.py");
    std::fs::write(&upload, UPLOAD).expect("upload.py");
    let port = free_port();
    let b_ip = w.b();
    let mut server = w.lan.command("b", python());
    w.cg_b.enter(&mut server);
    let mut server = server
        .arg(&sink)
        .args([&b_ip, &port.to_string()])
        .arg(&log)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("sink");
    struct Kill<'a>(&'a mut Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _server = Kill(&mut server);
    assert!(
        wait_until(Duration::from_secs(10), || std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("listening")),
        "sink did not start"
    );
    w.apply(&format!(
        "---
apiVersion: tether.dev/v1alpha1
kind: Service
metadata: {{name: sink}}
spec:
  addresses: [{{cidr: {b_ip}/32, ports: [{port}]}}]
  mesh: {{mode: mutual, proxyProtocol: true}}
---
apiVersion: tether.dev/v1alpha1
kind: AccessPolicy
metadata: {{name: streamers}}
spec:
  services: [sink]
  identities: [streamer]
"
    ));
    let sink_log = || std::fs::read_to_string(&log).unwrap_or_default();

    // 2 GiB up, half-close, the digest back over the same tunnel.
    const SIZE: u64 = 2 << 30;
    let o = w
        .on_a(python())
        .arg(&upload)
        .args([&b_ip, &port.to_string(), &SIZE.to_string()])
        .output()
        .expect("upload");
    let out = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        o.status.success() && lines.len() == 2,
        "upload failed: {out}{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        w.a.logs()
    );
    assert_eq!(
        lines[0], lines[1],
        "what arrived differs from what was sent"
    );
    assert!(lines[0].ends_with(&format!(" {SIZE}")), "{out}");
    // The service learned who called, from the agent's PROXY v2 header.
    let first = sink_log();
    assert!(
        first.contains(&format!(
            "conn 1 from {} id spiffe://example.org/streamer",
            w.lan.addr("a")
        )),
        "{first}"
    );

    // Killed mid-transfer: A closes the tunnel, B's service sees the end.
    let mut child = w
        .on_a(python())
        .arg(&upload)
        .args([&b_ip, &port.to_string(), "-1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("endless upload");
    let flowing = wait_until(Duration::from_secs(30), || {
        sink_log().contains("progress 2 ")
    });
    assert!(flowing, "second upload never flowed: {}", sink_log());
    let pid = child.id();
    let listed = connections(&w.a.tether(&["connections"]));
    assert!(
        listed
            .iter()
            .any(|c| c["pid"] == pid && c["service"] == "sink"),
        "{listed:?}"
    );
    assert!(!sink_log().contains("end 2"), "{}", sink_log());
    let _ = child.kill();
    let _ = child.wait();
    let ended = wait_until(Duration::from_secs(10), || sink_log().contains("end 2"));
    assert!(ended, "B's service never saw the client go: {}", sink_log());
    let gone = wait_until(Duration::from_secs(5), || {
        !connections(&w.a.tether(&["connections"]))
            .iter()
            .any(|c| c["pid"] == pid)
            && !connections(&w.up.ok(&["connections"]))
                .iter()
                .any(|c| c["service"] == "sink")
    });
    assert!(gone, "tunnel still listed after the client was killed");

    // SVID rotation (10 s TTL, renewed at half-life) does not disturb an
    // open tunnel; the next one presents the new SVID.
    let slow = w
        .on_a(python())
        .args([
            "-c",
            &format!(
                "import socket, time
s = socket.create_connection(('{b_ip}', {port}), 10)
for i in range(12):
    s.sendall(b'y'); time.sleep(1)
s.shutdown(socket.SHUT_WR)
print(s.recv(200).decode().strip())"
            ),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("slow client");
    let slow_pid = slow.id();
    let svid_of = |pid: u32| -> Option<i64> {
        let v: serde_json::Value = serde_json::from_str(&w.a.tether(&["svids"])).ok()?;
        v.as_array()?
            .iter()
            .find(|r| r["pid"] == pid)
            .and_then(|r| r["issuedAt"].as_i64())
    };
    let mut first = None;
    assert!(
        wait_until(Duration::from_secs(5), || {
            first = svid_of(slow_pid);
            first.is_some()
        }),
        "slow client has no SVID"
    );
    let rotated = wait_until(Duration::from_secs(10), || {
        svid_of(slow_pid).is_some_and(|t| Some(t) != first)
    });
    assert!(rotated, "the slow client's SVID was not rotated");
    let out = slow.wait_with_output().expect("slow client");
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .trim_end()
            .ends_with(" 12"),
        "the tunnel did not survive the rotation: {:?}",
        out
    );

    // Many short tunnels leave no descriptors behind in either agent.
    let fds = |pid: u32| std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    let (a_pid, b_pid) = (w.a.child.id(), w.up.pid().expect("tether up runs"));
    let (a0, b0) = (fds(a_pid), fds(b_pid));
    let o = w
        .on_a(python())
        .args([
            "-c",
            &format!(
                "import socket
for i in range(300):
    s = socket.create_connection(('{b_ip}', {port}), 10)
    assert s.getpeername() == ('{b_ip}', {port}), s.getpeername()
    s.sendall(b'x'); s.shutdown(socket.SHUT_WR)
    assert s.recv(100).endswith(b' 1\\n')
    s.close()
print('done')"
            ),
        ])
        .output()
        .expect("short connections");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "done",
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let settled = wait_until(Duration::from_secs(10), || {
        fds(a_pid) <= a0 + 8 && fds(b_pid) <= b0 + 8
    });
    assert!(
        settled,
        "descriptors grew: A {a0} -> {}, B {b0} -> {}",
        fds(a_pid),
        fds(b_pid)
    );

    // A Service that names the nodes fronting it is reached through them
    // only: B is not "host-x", so A refuses to tunnel there at all.
    w.up.apply_ok(&format!(
        "apiVersion: tether.dev/v1alpha1
kind: Service
metadata: {{name: sink}}
spec:
  addresses: [{{cidr: {b_ip}/32, ports: [{port}]}}]
  mesh: {{mode: mutual, proxyProtocol: true, nodes: [host-x]}}
"
    ));
    let refused = wait_until(Duration::from_secs(15), || {
        let o = w
            .on_a(python())
            .args([
                "-c",
                &format!("import socket; s = socket.create_connection(('{b_ip}', {port}), 5); s.sendall(b'z'); s.shutdown(socket.SHUT_WR); print(s.recv(100))"),
            ])
            .output()
            .expect("client");
        !o.status.success()
    });
    assert!(
        refused,
        "A still tunnels to a node the Service does not name"
    );
    let wrong_peer = w.a.audit().into_iter().any(|r| {
        r["event"] == "tunnel"
            && r["service"] == "sink"
            && r["reason"]
                .as_str()
                .is_some_and(|s| s.contains("not one of the nodes that front sink"))
    });
    assert!(wrong_peer, "A's audit does not name the wrong peer");
}

#[test]
fn permissive_mode_accepts_plaintext_from_hosts_without_an_agent_and_audits_it() {
    let w = World::new("m3");
    w.apply_with("permissive", "");
    let (b_ip, c_ip) = (w.b(), w.lan.addr("c"));
    // Agents still tunnel.
    assert_eq!(w.redis_cli_on_a(&["PING"]), "PONG");
    let tunnelled = wait_until(Duration::from_secs(5), || {
        w.audit_b().iter().any(|r| {
            r["direction"] == "inbound" && r["verdict"] == "allow" && r["service"] == "redis"
        })
    });
    assert!(tunnelled, "A's client did not come through the tunnel");
    // A host without an agent gets through in plaintext, and B records it.
    let o = w
        .lan
        .command("c", which("redis-cli"))
        .args(["-h", &b_ip, "-p", &w.redis.port.to_string(), "PING"])
        .env("REDISCLI_AUTH", PASSWORD)
        .output()
        .expect("redis-cli on C");
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "PONG");
    let audited = wait_until(Duration::from_secs(5), || {
        w.audit_b().iter().any(|r| {
            r["verdict"] == "allow-plaintext"
                && r["service"] == "redis"
                && r["peer"]
                    .as_str()
                    .is_some_and(|p| p.starts_with(&format!("{c_ip}:")))
        })
    });
    assert!(
        audited,
        "no plaintext record in B's audit: {:?}",
        w.audit_b()
    );
    // The tunnel's own loopback connection is not reported as plaintext.
    let plaintext = w
        .audit_b()
        .iter()
        .filter(|r| r["verdict"] == "allow-plaintext")
        .count();
    assert_eq!(plaintext, 1);

    // A scanner on C opening and dropping the mesh port: every failed
    // handshake is accounted for, but the audit log takes at most 20 a
    // second; the rest are counted in the next record's `omittedBefore`.
    let scan = |n: u32| {
        let o = w
            .lan
            .command("c", python())
            .args([
                "-c",
                // A connection over the per-source handshake budget is
                // reset as soon as it is accepted, which a fast client can
                // see as a failed connect: a scanner does not care.
                &format!("import socket\nfor i in range({n}):\n    try:\n        socket.create_connection(('{b_ip}', {MESH_PORT}), 5).close()\n    except OSError:\n        pass"),
            ])
            .output()
            .expect("scan");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    scan(100);
    std::thread::sleep(Duration::from_millis(1100));
    scan(1);
    let accounted = |audit: &[serde_json::Value]| -> (usize, u64) {
        let from_c = inbound_denials_from(audit, &c_ip);
        let omitted = from_c
            .iter()
            .filter_map(|r| r["omittedBefore"].as_u64())
            .sum();
        (from_c.len(), omitted)
    };
    let all = wait_until(Duration::from_secs(10), || {
        let (n, omitted) = accounted(&w.audit_b());
        n as u64 + omitted == 101
    });
    let (n, omitted) = accounted(&w.audit_b());
    assert!(
        all,
        "{n} records and {omitted} omitted for 101 failed handshakes"
    );
    assert!(
        omitted > 0 && n < 100,
        "no rate limit: {n} records, {omitted} omitted"
    );
}

/// A container on host A, in a network namespace of its own, reaches Redis
/// on host B through the mesh: the agent listens in the container's
/// namespace, and the tunnel leaves from host A. Only TLS 1.3 on the link.
#[test]
fn a_container_on_a_reaches_redis_on_b_through_the_mesh() {
    use common::containers::{CtNet, Image, Scope, podman, run, run_args};
    let w = World::new("mc");
    let image = Image::build("mesh");
    let scope = Scope::at(&w.cg_a.path);
    let net = CtNet::on(&w.lan, "a");
    w.apply(&format!(
        "---
apiVersion: tether.dev/v1alpha1
kind: WorkloadIdentity
metadata: {{name: ct-redis-cli}}
spec:
  spiffeId: spiffe://example.org/ct-redis-cli
  selectors: [[\"container:image:{img}\", \"process:sha256:{sha}\"]]
  allowExec: [mount-namespace]
---
apiVersion: tether.dev/v1alpha1
kind: AccessPolicy
metadata: {{name: ct-redis-clients}}
spec:
  services: [redis]
  identities: [ct-redis-cli]
",
        img = image.id,
        sha = sha256_file(&real(&which("redis-cli"))),
    ));
    let mut cap = Capture::start(IFACE, "", |c| w.lan.enter("a", c));
    let before = w.redis.connections_received();
    let name = format!("tether-mesh-{}", rand_suffix());
    let mut args = run_args(&scope, &net, &name, &["--rm"]);
    args.push(image.reference.clone());
    for a in [
        "/usr/bin/redis-cli",
        "-h",
        &w.b(),
        "-p",
        &w.redis.port.to_string(),
        "-a",
        PASSWORD,
        "--no-auth-warning",
        "PING",
    ] {
        args.push(a.to_string());
    }
    let o = run(podman().args(&args));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "PONG",
        "the container's connection through the mesh: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        w.a.logs()
    );
    assert_eq!(
        w.redis.connections_received(),
        before + 2,
        "one connection arrived"
    );
    // The tunnel is recorded by A's agent with the container named.
    let ok = wait_until(Duration::from_secs(10), || {
        w.a.audit().iter().any(|e| {
            e["service"] == "redis"
                && e["verdict"]
                    .as_str()
                    .is_some_and(|v| v.starts_with("allow"))
                && e["container"]["name"] == name.as_str()
        })
    });
    assert!(
        ok,
        "no allow record naming the container: {:#?}",
        w.a.audit()
    );
    let tunnels = |cap: &Capture| {
        let mut t = cap.fields(
            &[MESH_PORT],
            &format!("tcp.dstport=={MESH_PORT}"),
            "tcp.stream",
        );
        t.sort();
        t.dedup();
        t.len()
    };
    wait_until(Duration::from_secs(10), || tunnels(&cap) >= 1);
    cap.stop();
    let raw = std::fs::read(&cap.file).expect("capture");
    for secret in [PASSWORD.as_bytes(), b"PING", b"PONG", b"spiffe://"] {
        assert!(
            !raw.windows(secret.len()).any(|win| win == secret),
            "{:?} appears on the wire",
            String::from_utf8_lossy(secret)
        );
    }
    assert!(tunnels(&cap) >= 1, "no tunnel on the link");
    for hello in [1, 2] {
        let v = cap.fields(
            &[MESH_PORT],
            &format!("tls.handshake.type=={hello}"),
            "tls.handshake.extensions.supported_version",
        );
        assert!(!v.is_empty(), "no handshake type {hello} seen");
        assert!(v.iter().all(|s| s == "0x0304"), "versions: {v:?}");
    }
    drop(net);
}
