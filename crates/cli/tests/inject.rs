//! Credentials injected on the wire, against Debian's Redis and nginx with
//! their unmodified clients: the bound client holds no password or token,
//! the agent adds it to the connection the kernel redirected to it, and
//! everything else in the same cgroup (a same-uid shell, a copy of the
//! client holding the real password) is refused in the kernel, which the
//! servers' own counters confirm. The secret never appears on the
//! client-to-agent leg (tshark on loopback), in Tether's logs, audit or
//! `tether get`; hostile requests from a bound process are refused and
//! audited while the agent keeps serving; removing the binding ends open
//! injected connections and stops injecting new ones.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::capture::Capture;
use common::kernel::Cgroup;
use common::servers::{Nginx, PASSWORD, Postgres, Redis, which};
use common::*;

/// The ACL user's password: only the agent ever holds it.
const ACL_PASSWORD: &str = "acl-pass-known-only-to-tether";
/// nginx's bearer token: only the agent ever holds it.
const TOKEN: &str = "tok-3f9a7c-injected-only";

struct World {
    up: Up,
    cg: Cgroup,
    hold_port: u16,
    audit: PathBuf,
}

impl World {
    fn new(tag: &str) -> World {
        let cg = Cgroup::new(tag);
        let hold_port = free_port();
        let audit = std::env::temp_dir().join(format!("audit-inject-{tag}-{}.log", rand_suffix()));
        let up = Up::start_with(&[
            "--enforce-cgroup",
            &cg.path.display().to_string(),
            "--audit-log",
            &audit.display().to_string(),
            "--hold-port",
            &hold_port.to_string(),
        ]);
        World {
            up,
            cg,
            hold_port,
            audit,
        }
    }

    /// `program` in the enforced cgroup, with no credential of its own.
    fn command(&self, program: &Path) -> Command {
        let mut c = Command::new(program);
        c.env_remove("REDISCLI_AUTH")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        self.cg.enter(&mut c);
        c
    }

    fn run(&self, mut c: Command) -> (u32, Output) {
        let child = c.spawn().expect("spawn");
        let pid = child.id();
        (pid, child.wait_with_output().expect("wait"))
    }

    /// Fails if a secret is anywhere Tether writes: its log, its audit
    /// log, or what `tether get` prints.
    fn assert_nothing_leaked(&self, secrets: &[&str]) {
        let audit = std::fs::read_to_string(&self.audit).unwrap_or_default();
        assert!(
            !audit.is_empty(),
            "no audit log at {}",
            self.audit.display()
        );
        let get =
            self.up.ok(&["get", "credentialsource"]) + &self.up.ok(&["get", "credentialbinding"]);
        let events = self.up.ok(&["events"]);
        for s in secrets {
            for (what, text) in [
                ("the log", self.up.logs()),
                ("the audit log", audit.clone()),
                ("tether events", events.clone()),
                ("tether get", get.clone()),
            ] {
                assert!(!text.contains(s), "a secret is in {what}");
            }
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.audit);
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn real(p: PathBuf) -> PathBuf {
    std::fs::canonicalize(&p).expect("canonical path")
}

/// A copy of `src` at `dst` (same bytes, another path: another identity).
fn copy_binary(src: &Path, dst: &Path) {
    std::fs::copy(src, dst).expect("copy binary");
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// tshark on loopback, only the client-to-agent leg (the hold port).
fn capture_leg(port: u16) -> Capture {
    Capture::start("lo", &format!("tcp port {port}"), |_| {})
}

/// Stops `cap` once it holds `last` (the last thing the test sent: tshark
/// writes packets a little after they pass); its raw bytes.
fn finish(cap: &mut Capture, last: &str) -> Vec<u8> {
    let seen = wait_until(Duration::from_secs(10), || {
        contains(&std::fs::read(&cap.file).unwrap_or_default(), last)
    });
    assert!(
        seen,
        "the capture never showed {last:?}: it missed the client's leg"
    );
    cap.stop();
    std::fs::read(&cap.file).expect("capture file")
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[test]
fn redis_cli_needs_no_password_and_nothing_else_gets_one() {
    let w = World::new("inj-redis");
    let redis = Redis::start();
    let rp = redis.port;
    assert_eq!(
        redis.admin(&[
            "ACL",
            "SETUSER",
            "app",
            "on",
            &format!(">{ACL_PASSWORD}"),
            "~*",
            "+@all"
        ]),
        "OK"
    );
    let redis_cli = real(which("redis-cli"));
    let mut capture = capture_leg(w.hold_port);
    w.up.apply_ok(&format!(
        "{id}apiVersion: tether.dev/v1alpha1
kind: Service
metadata: {{name: redis}}
spec:
  addresses:
    - {{cidr: 127.0.0.1/32, ports: [{rp}]}}
    - {{cidr: \"::1/128\", ports: [{rp}]}}
---
apiVersion: tether.dev/v1alpha1
kind: AccessPolicy
metadata: {{name: redis-clients}}
spec: {{services: [redis], identities: [redis-cli]}}
---
apiVersion: tether.dev/v1alpha1
kind: CredentialSource
metadata: {{name: redis-password}}
spec: {{static: {{value: \"{PASSWORD}\"}}}}
---
apiVersion: tether.dev/v1alpha1
kind: CredentialBinding
metadata: {{name: redis-inject}}
spec: {{identity: redis-cli, source: redis-password, inject: {{service: redis, redis: {{}}}}}}
",
        id = binary_identity("redis-cli", &redis_cli),
    ));
    let cli = |host: &str, args: &[&str]| {
        let mut c = w.command(&redis_cli);
        c.args(["-h", host, "-p", &rp.to_string()]).args(args);
        c
    };

    // The bound client, no password anywhere: authenticated as the
    // default user, over IPv4 and IPv6.
    let mut last = String::new();
    let ok = wait_until(Duration::from_secs(20), || {
        last = text(&w.run(cli("127.0.0.1", &["PING"])).1);
        last.trim() == "PONG"
    });
    assert!(ok, "bound redis-cli: {last}\n{}", w.up.logs());
    let (pid, o) = w.run(cli("::1", &["ACL", "WHOAMI"]));
    assert!(
        !text(&o).contains("default"),
        "ACL is refused on an injected connection: {}",
        text(&o)
    );
    w.up.audited(pid, "ACL refused", |e| {
        e["event"] == "inject" && e["verdict"] == "refused-request"
    });
    let (pid, o) = w.run(cli("::1", &["CLIENT", "INFO"]));
    assert!(text(&o).contains("user=default"), "{}", text(&o));
    w.up.audited(pid, "the injected connection", |e| {
        e["event"] == "inject"
            && e["verdict"] == "allow"
            && e["binding"] == "redis-inject"
            && e["protocol"] == "redis"
            && e["spiffeId"] == "spiffe://example.org/redis-cli"
    });

    // The bound process cannot read the password back, replace it, or
    // point the server's replication (and its AUTH) elsewhere.
    for args in [
        &["CONFIG", "GET", "requirepass"][..],
        &["CONFIG", "SET", "requirepass", "mine"],
        &["ACL", "SETUSER", "mine", "on", ">pw", "+@all"],
        &["REPLICAOF", "127.0.0.1", "1"],
    ] {
        let (pid, o) = w.run(cli("127.0.0.1", args));
        assert!(!text(&o).contains(PASSWORD), "{args:?} read the password");
        w.up.audited(pid, &format!("{args:?} refused"), |e| {
            e["event"] == "inject"
                && e["verdict"] == "refused-request"
                && e["reason"].as_str().is_some_and(|r| r.contains(args[0]))
        });
    }
    assert_eq!(
        redis
            .admin(&["CONFIG", "GET", "requirepass"])
            .lines()
            .nth(1),
        Some(PASSWORD)
    );
    assert_eq!(redis.admin(&["ROLE"]).lines().next(), Some("master"));

    // `tether connections` marks a live injected connection; removing the
    // binding closes it (audited) and new connections go without the
    // password (the policy still allows them: Redis says NOAUTH).
    let mut long = cli("127.0.0.1", &["-r", "400", "-i", "0.05", "PING"]);
    long.stdout(Stdio::null()).stderr(Stdio::null());
    let mut long = long.spawn().expect("spawn");
    let long_pid = long.id();
    let listed = wait_until(Duration::from_secs(10), || {
        let v: serde_json::Value =
            serde_json::from_str(&w.up.ok(&["connections"])).unwrap_or_default();
        v["connections"].as_array().is_some_and(|cs| {
            cs.iter().any(|c| {
                c["direction"] == "injected"
                    && c["pid"] == long_pid
                    && c["injected"]["binding"] == "redis-inject"
            })
        })
    });
    assert!(
        listed,
        "no injected connection listed: {}",
        w.up.ok(&["connections"])
    );
    w.up.ok(&["delete", "credentialbinding", "redis-inject"]);
    w.up.audited(long_pid, "the revoked connection", |e| {
        e["event"] == "inject" && e["verdict"] == "revoked"
    });
    let _ = long.kill();
    let _ = long.wait();
    // A live bound client's own environment holds no password (a witness
    // of its own: reading /proc/PID/environ marks the process it reads).
    let mut witness = cli("127.0.0.1", &["-r", "100", "-i", "0.1", "PING"]);
    witness.stdout(Stdio::null()).stderr(Stdio::null());
    let mut witness = witness.spawn().expect("spawn");
    let exec = format!("/proc/{}/exe", witness.id());
    let execd = wait_until(Duration::from_secs(5), || {
        std::fs::read_link(&exec).is_ok_and(|p| p == redis_cli)
    });
    assert!(execd, "the witness never ran redis-cli");
    let environ = std::fs::read(format!("/proc/{}/environ", witness.id())).expect("environ");
    let _ = witness.kill();
    let _ = witness.wait();
    assert!(!environ.is_empty(), "no environment read");
    assert!(
        !contains(&environ, PASSWORD),
        "the password is in the client's environment"
    );
    let mut last = String::new();
    let plain = wait_until(Duration::from_secs(10), || {
        last = text(&w.run(cli("127.0.0.1", &["PING"])).1);
        last.contains("NOAUTH")
    });
    assert!(plain, "after the binding went: {last}");

    // An ACL user: the binding names it, the source holds its password.
    w.up.apply_ok(
        "apiVersion: tether.dev/v1alpha1
kind: CredentialSource
metadata: {name: redis-acl}
spec: {static: {value: \"acl-pass-known-only-to-tether\"}}
---
apiVersion: tether.dev/v1alpha1
kind: CredentialBinding
metadata: {name: redis-inject-acl}
spec: {identity: redis-cli, source: redis-acl, inject: {service: redis, redis: {user: app}}}
",
    );
    let as_app = wait_until(Duration::from_secs(10), || {
        last = text(&w.run(cli("127.0.0.1", &["CLIENT", "INFO"])).1);
        last.contains("user=app")
    });
    assert!(as_app, "ACL user: {last}\n{}", w.up.logs());

    // Nothing secret on the client's leg (which did carry the commands),
    // nor in Tether's outputs.
    let leg = finish(&mut capture, "INFO");
    assert!(
        contains(&leg, "PONG"),
        "the capture missed the client's leg"
    );
    for s in [PASSWORD, ACL_PASSWORD] {
        assert!(!contains(&leg, s), "a password crossed the client's leg");
    }
    w.assert_nothing_leaked(&[PASSWORD, ACL_PASSWORD]);

    // A copy of redis-cli (another path: no identity) holding the real
    // password in its environment is refused in the kernel: Redis never
    // sees the connection.
    let copy = w.up.dir.path().join("redis-cli-copy");
    copy_binary(&redis_cli, &copy);
    let before = redis.connections_received();
    let mut c2 = w.command(&copy);
    c2.args(["-h", "127.0.0.1", "-p", &rp.to_string(), "PING"])
        .env("REDISCLI_AUTH", PASSWORD);
    let (copy_pid, o) = w.run(c2);
    assert_ne!(text(&o).trim(), "PONG", "the unbound copy got through");
    // The admin query that reads the counter is the only new connection.
    assert_eq!(
        redis.connections_received(),
        before + 1,
        "Redis saw the refused client"
    );
    w.up.audited(copy_pid, "the refused copy", |e| e["verdict"] == "deny");
    // And a same-uid shell with the password, over bash's /dev/tcp.
    let mut sh = w.command(Path::new("/bin/bash"));
    sh.args([
        "-c",
        &format!(
            "exec 3<>/dev/tcp/127.0.0.1/{rp} && printf 'AUTH {PASSWORD}\\r\\nPING\\r\\n' >&3 && timeout 2 cat <&3"
        ),
    ]);
    let (_, o) = w.run(sh);
    assert!(
        !text(&o).contains("PONG"),
        "the shell reached Redis: {}",
        text(&o)
    );
    assert_eq!(
        redis.connections_received(),
        before + 2,
        "Redis saw the shell"
    );
}

#[test]
fn curl_gets_its_bearer_token_from_the_agent_on_every_request() {
    let w = World::new("inj-http");
    let nginx = Nginx::start(&format!(
        "if ($http_authorization != \"Bearer {TOKEN}\") {{ return 401 \"no\\n\"; }} return 200 \"ok\\n\";"
    ));
    let np = nginx.port;
    // The application: a copy of curl at its own path (the system curl a
    // shell would run is not it).
    let app = w.up.dir.path().join("app-curl");
    copy_binary(&real(which("curl")), &app);
    let mut capture = capture_leg(w.hold_port);
    w.up.apply_ok(&format!(
        "{id}apiVersion: tether.dev/v1alpha1
kind: Service
metadata: {{name: web}}
spec:
  addresses:
    - {{cidr: 127.0.0.1/32, ports: [{np}]}}
---
apiVersion: tether.dev/v1alpha1
kind: AccessPolicy
metadata: {{name: web-clients}}
spec: {{services: [web], identities: [app]}}
---
apiVersion: tether.dev/v1alpha1
kind: CredentialSource
metadata: {{name: api-token}}
spec: {{static: {{value: \"{TOKEN}\"}}}}
---
apiVersion: tether.dev/v1alpha1
kind: CredentialBinding
metadata: {{name: web-token}}
spec: {{identity: app, source: api-token, inject: {{service: web, http: {{scheme: bearer, authority: '127.0.0.1:{np}'}}}}}}
",
        id = binary_identity("app", &app),
    ));
    let url = |p: &str| format!("http://127.0.0.1:{np}{p}");
    let curl = |program: &Path, args: &[&str]| {
        let mut c = w.command(program);
        c.args([
            "-s",
            "--max-time",
            "20",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}\\n",
        ])
        .args(args);
        c
    };

    // No credential in the client: 200.
    let mut last = String::new();
    let ok = wait_until(Duration::from_secs(20), || {
        last = text(&w.run(curl(&app, &[&url("/first")])).1);
        last.trim() == "200"
    });
    assert!(
        ok,
        "bound curl: {last}\n{}\n{}",
        w.up.logs(),
        nginx.error_log()
    );
    // Its own Authorization header is replaced, not passed on.
    let (_, o) = w.run(curl(
        &app,
        &["-H", "Authorization: Bearer stolen-or-wrong", &url("/own")],
    ));
    assert_eq!(
        text(&o).trim(),
        "200",
        "the client's header was not replaced"
    );

    // 1,000 requests on one keep-alive connection: every one injected.
    let urls: Vec<String> = (0..1000).map(|i| url(&format!("/k{i}"))).collect();
    // The base command's `-o /dev/null` is the first URL's; each other
    // URL gets its own.
    let mut args: Vec<&str> = vec!["--keepalive-time", "60", urls[0].as_str()];
    for u in &urls[1..] {
        args.extend(["-o", "/dev/null", u.as_str()]);
    }
    let served_before = nginx.requests().len();
    let (_, o) = w.run(curl(&app, &args));
    let codes = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(codes.lines().count(), 1000, "{}", text(&o));
    assert!(codes.lines().all(|l| l == "200"), "not all 200: {codes}");
    // nginx logs a request just after answering it: the last line may
    // land after curl is done.
    let logged = wait_until(Duration::from_secs(10), || {
        nginx.requests().len() >= served_before + 1000
    });
    assert!(
        logged,
        "nginx logged {} requests",
        nginx.requests().len() - served_before
    );
    let kept: Vec<_> = nginx.requests().split_off(served_before);
    assert_eq!(kept.len(), 1000);
    assert!(
        kept.iter().all(|r| r.0 == kept[0].0),
        "more than one connection"
    );
    assert!(kept.iter().all(|r| r.2 == 200));

    // A same-uid shell running the system curl: refused in the kernel,
    // nginx sees nothing.
    let served = nginx.requests().len();
    let mut sh = w.command(Path::new("/bin/sh"));
    sh.args([
        "-c",
        &format!("curl -s --max-time 5 -w '%{{http_code}}' {}", url("/shell")),
    ]);
    let (_, o) = w.run(sh);
    assert!(
        !text(&o).contains("200") && !text(&o).contains(TOKEN),
        "{}",
        text(&o)
    );
    assert_eq!(
        nginx.requests().len(),
        served,
        "nginx saw the shell's request"
    );

    // Hostile requests from the bound process itself: each refused and
    // audited, none reaches nginx, and the agent keeps serving.
    let big = format!("X-Big: {}", "a".repeat(70 * 1024));
    let served = nginx.requests().len();
    for (what, args, reason) in [
        (
            "smuggling",
            vec![
                "-H".to_string(),
                "Content-Length: 5".to_string(),
                "-H".to_string(),
                "Transfer-Encoding: chunked".to_string(),
                "--data".to_string(),
                "hello".to_string(),
                url("/smuggle"),
            ],
            "smuggling",
        ),
        (
            "oversized head",
            vec!["-H".to_string(), big.clone(), url("/big")],
            "longer than",
        ),
        (
            "a protocol switch",
            vec!["-H".to_string(), "Upgrade: h2c".to_string(), url("/up")],
            "protocol switch",
        ),
        (
            "TRACE (would echo the header)",
            vec!["-X".to_string(), "TRACE".to_string(), url("/trace")],
            "reflect",
        ),
        (
            "another virtual host",
            vec![
                "-H".to_string(),
                "Host: evil.example".to_string(),
                url("/vhost"),
            ],
            "Host",
        ),
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (pid, o) = w.run(curl(&app, &args));
        assert_ne!(text(&o).trim(), "200", "{what} was served");
        eprintln!("{what}: curl said {:?}", text(&o));
        w.up.audited(pid, what, |e| {
            e["event"] == "inject"
                && e["verdict"] == "refused-request"
                && e["reason"].as_str().is_some_and(|r| r.contains(reason))
        });
    }
    // Garbage: raw bytes through curl's telnet client.
    let garbage = w.up.dir.path().join("garbage");
    std::fs::write(&garbage, b"\x16\x03\x01\x00\xffnot http at all\r\n\r\n").expect("write");
    let mut g = w.command(&app);
    g.args(["-s", "--max-time", "5", &format!("telnet://127.0.0.1:{np}")])
        .stdin(std::fs::File::open(&garbage).expect("open"));
    let (gpid, _) = w.run(g);
    w.up.audited(gpid, "garbage", |e| {
        e["event"] == "inject" && e["verdict"] == "refused-request"
    });
    assert_eq!(
        nginx.requests().len(),
        served,
        "a hostile request reached nginx"
    );
    let (_, o) = w.run(curl(&app, &[&url("/after")]));
    assert_eq!(text(&o).trim(), "200", "the agent stopped serving");

    let leg = finish(&mut capture, "/after");
    assert!(
        contains(&leg, "/k999"),
        "the capture missed the client's leg"
    );
    assert!(!contains(&leg, TOKEN), "the token crossed the client's leg");
    w.assert_nothing_leaked(&[TOKEN]);
}

/// The PostgreSQL role's password: only the agent ever holds it.
const PG_PASSWORD: &str = "pg-role-pass-only-tether-knows";

#[test]
fn psql_logs_in_with_scram_over_tls_holding_no_password() {
    let w = World::new("inj-pg");
    let pg = Postgres::start_tls();
    pg.admin(&format!("CREATE ROLE app LOGIN PASSWORD '{PG_PASSWORD}'"));
    let pp = pg.port;
    let psql = real(pg.psql());
    // A raw-bytes client (curl's telnet) bound the same way, for hostile
    // startup packets from an entitled process.
    let raw = w.up.dir.path().join("raw-curl");
    copy_binary(&real(which("curl")), &raw);
    let ca: String = pg
        .cert()
        .lines()
        .map(|l| format!("        {l}\n"))
        .collect();
    let binding = |name: &str, identity: &str| {
        format!(
            "apiVersion: tether.dev/v1alpha1
kind: CredentialBinding
metadata: {{name: {name}}}
spec:
  identity: {identity}
  source: pg-password
  inject:
    service: postgres
    postgresql: {{user: app}}
    tls:
      serverName: postgres
      ca: |
{ca}---
"
        )
    };
    let mut capture = capture_leg(w.hold_port);
    w.up.apply_ok(&format!(
        "{}{}{}{}apiVersion: tether.dev/v1alpha1
kind: Service
metadata: {{name: postgres}}
spec:
  addresses:
    - {{cidr: 127.0.0.1/32, ports: [{pp}]}}
    - {{cidr: \"::1/128\", ports: [{pp}]}}
---
apiVersion: tether.dev/v1alpha1
kind: AccessPolicy
metadata: {{name: db-clients}}
spec: {{services: [postgres], identities: [psql, raw]}}
---
apiVersion: tether.dev/v1alpha1
kind: CredentialSource
metadata: {{name: pg-password}}
spec: {{static: {{value: \"{PG_PASSWORD}\"}}}}
",
        binary_identity("psql", &psql),
        binary_identity("raw", &raw),
        binding("psql-db", "psql"),
        binding("raw-db", "raw"),
    ));
    let empty_home = w.up.dir.path().join("home");
    std::fs::create_dir_all(&empty_home).expect("mkdir");
    let query = |program: &Path, host: &str, sql: &str| {
        let mut c = w.command(program);
        c.args([
            "-w",
            "-h",
            host,
            "-p",
            &pp.to_string(),
            "-U",
            "root",
            "-d",
            "postgres",
        ])
        .args(["-Atc", sql])
        .env_remove("PGPASSWORD")
        .env("HOME", &empty_home)
        .env("PGPASSFILE", empty_home.join("none"));
        c
    };
    let who =
        "select current_user || '|' || s.ssl from pg_stat_ssl s where s.pid = pg_backend_pid()";

    // Bound psql, no password, no .pgpass: logged in as the configured
    // user, and the server's side of the session is TLS.
    let mut last = String::new();
    let ok = wait_until(Duration::from_secs(20), || {
        last = text(&w.run(query(&psql, "127.0.0.1", who)).1);
        last.trim() == "app|true"
    });
    assert!(ok, "bound psql: {last}\n{}", w.up.logs());
    let (pid, o) = w.run(query(
        &psql,
        "::1",
        "select usename from pg_stat_activity where pid = pg_backend_pid()",
    ));
    assert_eq!(text(&o).trim(), "app", "pg_stat_activity");
    w.up.audited(pid, "the injected session", |e| {
        e["event"] == "inject"
            && e["verdict"] == "allow"
            && e["protocol"] == "postgresql"
            && e["upstream"] == "tls"
    });

    // A startup packet with an absurd length from a bound process: refused,
    // audited, and the agent goes on serving.
    let absurd = w.up.dir.path().join("absurd");
    std::fs::write(&absurd, [0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0]).expect("write");
    let mut c = w.command(&raw);
    c.args(["-s", "--max-time", "5", &format!("telnet://127.0.0.1:{pp}")])
        .stdin(std::fs::File::open(&absurd).expect("open"));
    let (rpid, _) = w.run(c);
    w.up.audited(rpid, "the absurd startup packet", |e| {
        e["event"] == "inject"
            && e["verdict"] == "refused-request"
            && e["reason"].as_str().is_some_and(|r| r.contains("length"))
    });
    let (_, o) = w.run(query(&psql, "127.0.0.1", "select 'after'"));
    assert_eq!(text(&o).trim(), "after", "the agent stopped serving");

    let leg = finish(&mut capture, "select 'after'");
    assert!(
        contains(&leg, "pg_stat_ssl"),
        "the capture missed the client's leg"
    );
    assert!(
        !contains(&leg, PG_PASSWORD),
        "the password crossed the client's leg"
    );
    w.assert_nothing_leaked(&[PG_PASSWORD]);

    // An unbound psql (a copy: another path) with the superuser's password
    // in its environment is refused in the kernel.
    let copy = w.up.dir.path().join("psql-copy");
    copy_binary(&psql, &copy);
    let mut c = query(&copy, "127.0.0.1", "select 1");
    c.env("PGPASSWORD", PASSWORD).args(["-U", "postgres"]);
    let (cpid, o) = w.run(c);
    assert!(
        !text(&o).trim().ends_with('1'),
        "the unbound copy got in: {}",
        text(&o)
    );
    w.up.audited(cpid, "the refused copy", |e| e["verdict"] == "deny");
}

/// HTTPS the application insists on: the bound process trusts the node's
/// intercepting CA (a file only it sees) and gets its header injected; an
/// unbound process reaching the same host with the real CA (as from a
/// system trust store) sees the real server certificate, uninjected.
#[test]
fn https_is_intercepted_for_the_bound_process_only() {
    let w = World::new("inj-https");
    let pki_dir = w.up.dir.path().join("pki");
    std::fs::create_dir_all(&pki_dir).expect("mkdir");
    let web_ca = pki::OpensslCa::new(&pki_dir, "webca", "/O=Upstream Web CA/CN=Upstream Web CA");
    let (cert, key) = web_ca.leaf("web", "DNS:localhost");
    let nginx = Nginx::start_tls(
        &format!(
            "if ($http_authorization != \"Bearer {TOKEN}\") {{ return 401 \"no\\n\"; }} return 200 \"ok\\n\";"
        ),
        &cert,
        &key,
    );
    let np = nginx.port;
    let app = w.up.dir.path().join("app-curl");
    let other = w.up.dir.path().join("other-curl");
    copy_binary(&real(which("curl")), &app);
    copy_binary(&real(which("curl")), &other);
    let ca_pem: String = std::fs::read_to_string(web_ca.cert())
        .expect("ca")
        .lines()
        .map(|l| format!("        {l}\n"))
        .collect();
    w.up.apply_ok(&format!(
        "{}{}apiVersion: tether.dev/v1alpha1
kind: Service
metadata: {{name: web}}
spec:
  addresses: [{{cidr: 127.0.0.1/32, ports: [{np}]}}]
  hostnames: [localhost]
  hostPorts: [{np}]
---
apiVersion: tether.dev/v1alpha1
kind: AccessPolicy
metadata: {{name: web-clients}}
spec: {{services: [web], identities: [app, other]}}
---
apiVersion: tether.dev/v1alpha1
kind: CredentialSource
metadata: {{name: api-token}}
spec: {{static: {{value: \"{TOKEN}\"}}}}
---
apiVersion: tether.dev/v1alpha1
kind: CredentialBinding
metadata: {{name: web-token}}
spec:
  identity: app
  source: api-token
  inject:
    service: web
    http: {{}}
    intercept: {{caFile: web-ca}}
    tls:
      ca: |
{ca_pem}",
        binary_identity("app", &app),
        binary_identity("other", &other),
    ));
    let creds = w.up.credentials_dir();
    let url = format!("https://localhost:{np}/");
    let resolve = format!("localhost:{np}:127.0.0.1");
    let get = |program: &Path, cacert: &Path| {
        let mut c = w.command(program);
        c.args(["-sS", "--max-time", "10", "--resolve", &resolve, "--cacert"])
            .arg(cacert)
            .args(["-o", "/dev/null", "-w", "%{http_code} %{certs}", &url]);
        c
    };

    // The bound process: its TLS ends at the agent, with a leaf of the
    // node's intercepting CA for localhost, which it trusts through its
    // file; nginx sees the token.
    let mut last = String::new();
    let ok = wait_until(Duration::from_secs(20), || {
        last = text(&w.run(get(&app, &creds.join("web-ca"))).1);
        last.starts_with("200")
    });
    assert!(
        ok,
        "bound curl over intercepted TLS: {last}\n{}",
        w.up.events()
            .iter()
            .filter(|e| e["event"] == "inject")
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        last.contains("Tether intercepting CA"),
        "not the intercepting leaf: {last}"
    );
    let (pid, _) = w.run(get(&app, &creds.join("web-ca")));
    w.up.audited(pid, "the intercepted connection", |e| {
        e["event"] == "inject" && e["verdict"] == "allow" && e["upstream"] == "tls"
    });
    let bundle = std::fs::read_to_string(creds.join("web-ca")).unwrap_or_default();
    assert!(
        bundle.is_empty(),
        "the test process read the intercepting CA"
    );

    // An unbound process with the upstream's real CA: not intercepted (the
    // real certificate), not injected (401).
    let (_, o) = w.run(get(&other, &web_ca.cert()));
    let out = text(&o);
    assert!(out.starts_with("401"), "unbound: {out}");
    assert!(
        out.contains("Upstream Web CA") && !out.contains("Tether intercepting CA"),
        "{out}"
    );
    // And it cannot see the intercepting CA at all.
    let mut c = w.command(&other);
    c.args(["-sS", "file://"]).arg(creds.join("web-ca"));
    let (_, o) = w.run(c);
    assert!(
        !o.status.success(),
        "the unbound process read the CA: {}",
        text(&o)
    );
    // nginx saw the bound request with the token and the other without.
    let both = wait_until(Duration::from_secs(10), || {
        let statuses: Vec<u16> = nginx.requests().iter().map(|r| r.2).collect();
        statuses.contains(&200) && statuses.contains(&401)
    });
    assert!(both, "nginx log: {:?}", nginx.requests());
}

/// boto3 with placeholder keys, as the application is configured: each
/// request reaches moto signed again by the agent with STS credentials
/// exchanged for the process's JWT-SVID.
const S3_UPLOAD: &str = r#"
import sys
import boto3
from boto3.s3.transfer import TransferConfig
endpoint = sys.argv[1]
s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
    aws_access_key_id="PLACEHOLDER", aws_secret_access_key="placeholder-secret")
try:
    s3.put_object(Bucket="tether-reports", Key="small.txt", Body=b"hello from the bound process")
    print("put ok")
    big = b"x" * (6 * 1024 * 1024) + b"tail"
    with open(sys.argv[2], "wb") as f:
        f.write(big)
    s3.upload_file(sys.argv[2], "tether-reports", "big.bin",
        Config=TransferConfig(multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024))
    print("multipart ok")
    # An unsigned payload (what SDKs send over HTTPS): the signer is told
    # not to hash the body, so the request says UNSIGNED-PAYLOAD.
    from botocore.auth import S3SigV4Auth
    S3SigV4Auth._should_sha256_sign_payload = lambda self, request: False
    s3.put_object(Bucket="tether-reports", Key="unsigned.txt", Body=b"not hashed by the client")
    print("unsigned ok")
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="tether-reports").get("Contents", []))
    print("listed", ",".join(keys))
    body = s3.get_object(Bucket="tether-reports", Key="big.bin")["Body"].read()
    print("roundtrip", body == big)
except Exception as e:
    code = e.response["Error"]["Code"] if hasattr(e, "response") else type(e).__name__
    print("failed", code, e.response.get("Error") if hasattr(e, "response") else e)
"#;

#[test]
fn boto3_with_placeholder_keys_is_signed_by_the_agent() {
    let cg = Cgroup::new("inj-sigv4");
    let hold = free_port().to_string();
    let w = peers::world_with(&[
        "--enforce-cgroup",
        &cg.path.display().to_string(),
        "--hold-port",
        &hold,
    ]);
    let up = &w.up;
    let aws = peers::Aws::start(&w, "spiffe://example.org/s3-app");
    let port = aws.endpoint.rsplit(':').next().expect("port").to_string();
    let python = python();
    let script = up.dir.path().join("s3_upload.py");
    let other = up.dir.path().join("other").join("s3_upload.py");
    std::fs::create_dir_all(other.parent().expect("dir")).expect("mkdir");
    for p in [&script, &other] {
        std::fs::write(p, S3_UPLOAD).expect("script");
    }
    let identity = |name: &str, script: &Path| {
        format!(
            "apiVersion: tether.dev/v1alpha1
kind: WorkloadIdentity
metadata: {{name: {name}}}
spec:
  spiffeId: spiffe://example.org/{name}
  selectors: [[\"process:path:{py}\", \"process:cmdline-prefix:{py} {script}\", \"unix:uid:0\"]]
---
",
            py = python.display(),
            script = script.display()
        )
    };
    up.apply_ok(&format!(
        "{}{}apiVersion: tether.dev/v1alpha1
kind: Service
metadata: {{name: s3}}
spec: {{addresses: [{{cidr: 127.0.0.1/32, ports: [{port}]}}]}}
---
apiVersion: tether.dev/v1alpha1
kind: AccessPolicy
metadata: {{name: s3-clients}}
spec: {{services: [s3], identities: [s3-app, s3-other]}}
---
apiVersion: tether.dev/v1alpha1
kind: CredentialSource
metadata: {{name: reports-aws}}
spec:
  awsSts: {{roleArn: 'arn:aws:iam::123456789012:role/reader', duration: 15m, endpoint: '{endpoint}', region: us-east-1}}
---
apiVersion: tether.dev/v1alpha1
kind: CredentialBinding
metadata: {{name: s3-app-sign}}
spec: {{identity: s3-app, source: reports-aws, inject: {{service: s3, awsSigV4: {{region: us-east-1, service: s3, authority: '127.0.0.1:{port}'}}}}}}
",
        identity("s3-app", &script),
        identity("s3-other", &other),
        endpoint = aws.endpoint,
    ));
    let run = |script: &Path| -> (u32, String) {
        let mut c = Command::new(&python);
        c.arg(script)
            .arg(&aws.endpoint)
            .arg(up.dir.path().join(format!("big-{}", rand_suffix())))
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cg.enter(&mut c);
        let child = c.spawn().expect("python");
        let pid = child.id();
        (pid, text(&child.wait_with_output().expect("python")))
    };

    // The bound process: a one-part upload (signed payload), a multipart
    // upload, a listing and a download, all accepted by moto with request
    // authentication on.
    let mut last = String::new();
    let ok = wait_until(Duration::from_secs(30), || {
        last = run(&script).1;
        last.contains("roundtrip True")
    });
    assert!(
        ok,
        "bound boto3:\n{last}\n{}",
        up.events()
            .iter()
            .filter(|e| e["event"] == "inject")
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        last.contains("put ok") && last.contains("multipart ok") && last.contains("unsigned ok"),
        "{last}"
    );
    assert!(
        last.contains("listed big.bin,q3.csv,small.txt,unsigned.txt"),
        "{last}"
    );
    let before = aws.counts();
    // The same script, unbound (another path): allowed to connect, not
    // signed for, so moto refuses its placeholder keys.
    let (_, out) = run(&other);
    assert!(
        out.contains("failed"),
        "the unbound script got through: {out}"
    );
    let after = aws.counts();
    assert_eq!(after["s3_ok"], before["s3_ok"], "{after}");
    assert!(
        after["s3_refused"].as_u64() > before["s3_refused"].as_u64(),
        "{after}"
    );
}
