//! Connection-time enforcement end to end: `tether up` with kernel
//! enforcement on a cgroup this test creates, Services and AccessPolicies
//! applied with `tether apply`, and real processes in that cgroup trying to
//! connect. Only loopback traffic; every cgroup is removed even on failure.

mod common;

use std::net::{TcpListener, UdpSocket};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::kernel::{BpfFs, Cgroup};
use common::*;

#[test]
fn child_entry() {
    if let (Ok(mode), Ok(out)) = (
        std::env::var("TETHER_TEST_CHILD"),
        std::env::var("TETHER_TEST_OUT"),
    ) {
        if mode == "connect" {
            connect_main(Path::new(&out));
        } else {
            child_main(&mode, Path::new(&out));
        }
    }
}

/// Workload side: after an optional delay, try every target in
/// TETHER_TEST_TARGETS ("tcp|udp ADDR" separated by ';') and write one
/// result line per target: "ok" or the error ("EPERM" for denials).
fn connect_main(out: &Path) {
    // With TETHER_TEST_WAIT, wait for the test to say "go" (it does once
    // the agent holds this process's SVID, i.e. has attested it).
    if std::env::var_os("TETHER_TEST_WAIT").is_some() {
        let _ = std::fs::write(out.join("pid"), std::process::id().to_string());
        for _ in 0..1000 {
            if out.join("go").exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let delay = std::env::var("TETHER_TEST_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    std::thread::sleep(Duration::from_millis(delay));
    let targets = std::env::var("TETHER_TEST_TARGETS").unwrap_or_default();
    let mut lines = Vec::new();
    for t in targets.split(';').filter(|t| !t.is_empty()) {
        let (proto, addr) = t.split_once(' ').unwrap_or(("tcp", t));
        let addr: std::net::SocketAddr = addr.parse().expect("target address");
        let res = if proto == "udp" {
            let bind = if addr.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            };
            UdpSocket::bind(bind)
                .and_then(|s| s.send_to(b"x", addr))
                .map(|_| ())
        } else {
            // Connected is not enough: a held connection is accepted by the
            // agent first. Only the server's greeting proves it got there.
            let t0 = std::time::Instant::now();
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))
                .map_err(|e| match e.raw_os_error() {
                    Some(libc::EPERM) => e,
                    _ => std::io::Error::new(
                        e.kind(),
                        format!("connect after {:?}: {e}", t0.elapsed()),
                    ),
                })
                .and_then(|mut s| {
                    // Longer than the agent's 10 s bound on deciding a held
                    // connection (attestation hashes the binary first).
                    s.set_read_timeout(Some(Duration::from_secs(15)))?;
                    let mut b = [0u8; 1];
                    match std::io::Read::read(&mut s, &mut b) {
                        Ok(1) if b[0] == b'+' => Ok(()),
                        Ok(_) => Err(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Err(e),
                        // A guarded connection (the kernel's send guard attaches
                        // a psock) reports a peer's reset to a blocking read as
                        // EAGAIN, well before the read timeout.
                        Err(e)
                            if e.kind() == std::io::ErrorKind::WouldBlock
                                && t0.elapsed() < Duration::from_secs(14) =>
                        {
                            Err(std::io::Error::from(std::io::ErrorKind::ConnectionReset))
                        }
                        Err(e) => Err(std::io::Error::other(format!(
                            "read after {:?}: {e}",
                            t0.elapsed()
                        ))),
                    }
                })
        };
        let r = match res {
            Ok(()) => "ok".to_string(),
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => "EPERM".to_string(),
            // Held, then refused by the agent.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => "reset".to_string(),
            Err(e) => format!("error: {e}"),
        };
        lines.push(format!("{t} => {r}"));
    }
    let _ = std::fs::write(out.join("results"), lines.join("\n"));
    // Then, if asked, become a shell: the new image must not keep this
    // process's authority.
    if let Ok(script) = std::env::var("TETHER_TEST_EXEC") {
        let err = Command::new("/bin/bash").args(["-c", &script]).exec();
        let _ = std::fs::write(out.join("exec-error"), err.to_string());
    }
}

struct Fixture {
    up: Up,
    cg: Cgroup,
    port: u16,
    udp_port: u16,
    exe: PathBuf,
    _tcp4: TcpListener,
    _tcp6: Option<TcpListener>,
    /// Connections the protected TCP server accepted (its own count).
    accepted: Arc<AtomicUsize>,
    _udp: UdpSocket,
}

/// Greets every connection with one byte (what clients wait for) and
/// counts it.
fn accept_forever(l: TcpListener, accepted: Arc<AtomicUsize>) {
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            accepted.fetch_add(1, Ordering::SeqCst);
            let _ = std::io::Write::write_all(&mut s, b"+");
        }
    });
}

impl Fixture {
    fn new(tag: &str, policy_when: Option<&str>, extra: &[&str]) -> Fixture {
        let cg = Cgroup::new(tag);
        let clock = std::env::temp_dir().join(format!("tether-clock-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_file(&clock);
        let mut args = vec![
            "--enforce-cgroup".to_string(),
            cg.path.display().to_string(),
            "--clock-file".into(),
            clock.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let up = Up::start_with(&a);
        let tcp4 = TcpListener::bind("127.0.0.1:0").expect("listen");
        let port = tcp4.local_addr().expect("addr").port();
        let tcp6 = TcpListener::bind(("::1", port)).ok();
        let udp = UdpSocket::bind("127.0.0.1:0").expect("udp");
        let udp_port = udp.local_addr().expect("addr").port();
        let accepted = Arc::new(AtomicUsize::new(0));
        accept_forever(tcp4.try_clone().expect("clone"), accepted.clone());
        if let Some(l) = &tcp6 {
            accept_forever(l.try_clone().expect("clone"), accepted.clone());
        }
        let exe = workload_binary(up.dir.path(), "client");
        let sha = sha256_file(&exe);
        let when = policy_when
            .map(|w| format!("  when: '{w}'\n"))
            .unwrap_or_default();
        up.apply_ok(&format!(
            "apiVersion: tether.dev/v1alpha1
kind: WorkloadIdentity
metadata: {{name: client}}
spec:
  spiffeId: spiffe://example.org/client
  selectors: [[\"process:sha256:{sha}\", \"process:path:{}\", \"unix:uid:0\"]]
---
apiVersion: tether.dev/v1alpha1
kind: Service
metadata: {{name: db}}
spec:
  addresses:
    - {{cidr: 127.0.0.1/32, ports: [{port}]}}
    - {{cidr: \"::1/128\", ports: [{port}]}}
    - {{cidr: 127.0.0.1/32, ports: [{udp_port}], protocol: udp}}
---
apiVersion: tether.dev/v1alpha1
kind: AccessPolicy
metadata: {{name: db-clients}}
spec:
  services: [db]
  identities: [client]
{when}",
            exe.display()
        ));
        // The registry has reached the agent once it explains the rule.
        let to = format!("127.0.0.1:{port}");
        assert!(
            wait_until(Duration::from_secs(10), || {
                up.try_ok(&["policy", "check", "--identity", "client", "--to", &to])
                    .is_some_and(|o| o.contains("db-clients") || o.contains("does not hold"))
            }),
            "policies never reached the agent:\n{}",
            up.logs()
        );
        Fixture {
            up,
            cg,
            port,
            udp_port,
            exe,
            _tcp4: tcp4,
            _tcp6: tcp6,
            accepted,
            _udp: udp,
        }
    }

    fn targets(&self) -> String {
        format!(
            "tcp 127.0.0.1:{p};tcp [::1]:{p};tcp [::ffff:127.0.0.1]:{p};udp 127.0.0.1:{u}",
            p = self.port,
            u = self.udp_port
        )
    }

    /// Runs `exe` in the enforced cgroup as a connecting workload. With
    /// `attested`, it connects only once the agent holds its SVID (the
    /// kernel then decides it; connects before that are held, which
    /// tests/containment.rs covers);
    /// otherwise after `delay_ms`.
    fn run(&self, exe: &Path, uid: Option<u32>, name: &str, delay_ms: u32) -> String {
        self.run_opts(exe, uid, name, delay_ms, false)
    }

    fn run_attested(&self, exe: &Path, name: &str) -> String {
        self.run_opts(exe, None, name, 0, true)
    }

    fn run_opts(
        &self,
        exe: &Path,
        uid: Option<u32>,
        name: &str,
        delay_ms: u32,
        attested: bool,
    ) -> String {
        let out = self.up.dir.path().join(format!("out-{name}"));
        std::fs::create_dir_all(&out).expect("mkdir");
        std::fs::set_permissions(&out, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .expect("chmod");
        let mut cmd = match uid {
            Some(u) => {
                let mut c = Command::new("setpriv");
                c.args([
                    format!("--reuid={u}"),
                    format!("--regid={u}"),
                    "--clear-groups".into(),
                ])
                .arg(exe);
                c
            }
            None => Command::new(exe),
        };
        cmd.args(["child_entry", "--exact", "--nocapture", "--test-threads=1"])
            .env("TETHER_TEST_CHILD", "connect")
            .env("TETHER_TEST_OUT", &out)
            .env("TETHER_TEST_TARGETS", self.targets())
            .env("TETHER_TEST_DELAY_MS", delay_ms.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if attested {
            cmd.env("TETHER_TEST_WAIT", "1");
        }
        self.cg.enter(&mut cmd);
        // A binary copied just now can still be open for writing in a child
        // another test thread forked meanwhile (until that child execs):
        // ETXTBSY then, briefly.
        let mut tries = 0;
        let mut child = loop {
            match cmd.spawn() {
                Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 100 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                r => break r.expect("run client"),
            }
        };
        if attested {
            self.release_when_attested(&out, child.id());
        }
        let st = child.wait().expect("wait client");
        let res = std::fs::read_to_string(out.join("results")).unwrap_or_default();
        assert!(
            st.success() || !res.is_empty(),
            "client {name} failed: {st}"
        );
        res
    }

    /// Tells a waiting client to go once `tether svids` lists `pid`.
    fn release_when_attested(&self, out: &Path, pid: u32) {
        let seen = wait_until(Duration::from_secs(20), || {
            self.up.ok(&["svids"]).contains(&format!("\"pid\": {pid},"))
        });
        assert!(
            seen,
            "agent never attested the client {pid}:\n{}\nwhoami:\n{}",
            self.up.logs(),
            String::from_utf8_lossy(
                &self
                    .up
                    .tether(&["whoami", "--pid", &pid.to_string()])
                    .stdout
            )
        );
        std::fs::write(out.join("go"), "").expect("go");
    }

    /// A bash in the enforced cgroup runs `prelude`, then writes to the
    /// protected port over /dev/tcp. It must be refused and audited: EPERM
    /// from the kernel, or, when it connected before the agent attested it,
    /// held and refused by the agent (its small write may even succeed into
    /// the agent's socket before the reset, so only the audit tells).
    fn shell_connect_refused(&self, prelude: &str) -> Result<(), String> {
        let out = self.shell(&format!(
            "{prelude} echo pid=$$; echo hi > /dev/tcp/127.0.0.1/{}",
            self.port
        ));
        let pid: u64 = out
            .lines()
            .find_map(|l| l.strip_prefix("pid="))
            .and_then(|p| p.trim().parse().ok())
            .ok_or_else(|| format!("no pid in {out:?}"))?;
        let eperm = out.contains("Operation not permitted");
        wait_event(&self.up, |e| {
            e["pid"] == pid && e["verdict"] == "deny" && (eperm || e["held"] == true)
        })
        .map_err(|ev| format!("no deny record for pid {pid} (output {out:?}): {ev}"))
    }

    /// Runs a shell command in the enforced cgroup; returns stderr.
    fn shell(&self, script: &str) -> String {
        let mut cmd = Command::new("bash");
        cmd.args(["-c", script])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        self.cg.enter(&mut cmd);
        let o = cmd.output().expect("bash");
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    }
}

/// Audit records are drained on a short timer: poll until one matches.
/// A held connection is decided within the agent's 10 s attestation bound
/// (hashing under load can take most of it), so wait longer than that.
fn wait_event(up: &Up, pred: impl Fn(&serde_json::Value) -> bool) -> Result<(), String> {
    let mut last = String::new();
    if wait_until(Duration::from_secs(15), || {
        last = up.ok(&["events"]);
        last.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|e| pred(&e))
    }) {
        Ok(())
    } else {
        Err(last)
    }
}

fn all(res: &str, want: &str) -> bool {
    !res.is_empty() && res.lines().all(|l| l.ends_with(&format!("=> {want}")))
}

/// Every attempt refused: in the kernel (EPERM), or, for TCP from a process
/// the agent had not attested yet, held and then refused by the agent.
fn refused(res: &str) -> bool {
    !res.is_empty()
        && res
            .lines()
            .all(|l| l.ends_with("=> EPERM") || (l.starts_with("tcp ") && l.ends_with("=> reset")))
}

#[test]
fn only_the_authorized_process_connects_and_every_decision_is_audited() {
    let f = Fixture::new("contain", None, &[]);
    // The authorized client, attested before it connects so the kernel
    // decides (held connects are covered in tests/containment.rs).
    let ok = f.run_attested(&f.exe, "authorized");
    assert!(
        all(&ok, "ok"),
        "authorized client refused:\n{ok}\n{}",
        f.up.logs()
    );

    // Same bytes at another path.
    let copy = f.exe.with_file_name("client-copy");
    std::fs::copy(&f.exe, &copy).expect("copy");
    let before = f.accepted.load(Ordering::SeqCst);
    let r = f.run(&copy, None, "copy", 400);
    assert!(refused(&r), "copy at another path:\n{r}");
    // Same binary, another uid.
    let r = f.run(&f.exe, Some(1001), "other-uid", 400);
    assert!(refused(&r), "other uid:\n{r}");
    assert_eq!(
        f.accepted.load(Ordering::SeqCst),
        before,
        "the server accepted a connection from an unauthorized process"
    );
    // bash /dev/tcp and a python socket, with the "password" at hand.
    f.shell_connect_refused("export REDISCLI_AUTH=secret; sleep 0.3;")
        .unwrap_or_else(|e| panic!("bash /dev/tcp: {e}"));
    // Connected means the server's greeting arrived: a connection held for
    // the agent is accepted first, then refused (reset, which a guarded
    // socket may report as EAGAIN, so any read failure counts).
    let py = format!(
        "sleep 0.3; python3 -c 'import socket,errno\ntry:\n s=socket.create_connection((\"::1\",{}))\nexcept OSError as e:\n print(errno.errorcode[e.errno]); raise SystemExit\ns.settimeout(15)\ntry:\n print(\"connected\" if s.recv(1)==b\"+\" else \"refused-after-hold\")\nexcept OSError:\n print(\"refused-after-hold\")'",
        f.port
    );
    let r = f.shell(&py);
    assert!(
        r.contains("EPERM") || r.contains("refused-after-hold"),
        "python over IPv6: {r}"
    );
    assert_eq!(
        f.accepted.load(Ordering::SeqCst),
        before,
        "the server accepted a connection from an unauthorized process"
    );
    let r = f.shell(&format!("sleep 0.3; python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.sendto(b\"x\", (\"127.0.0.1\", {}))' 2>&1", f.udp_port));
    assert!(
        r.contains("Operation not permitted"),
        "unconnected UDP: {r}"
    );
    // An unprotected port is untouched.
    let other = TcpListener::bind("127.0.0.1:0").expect("listen");
    let r = f.shell(&format!(
        "sleep 0.3; echo hi > /dev/tcp/127.0.0.1/{} && echo connected",
        other.local_addr().expect("a").port()
    ));
    assert!(
        r.contains("connected"),
        "unprotected destination blocked: {r}"
    );

    // Audit: the stream names the denied executable, verdict and rule.
    wait_event(&f.up, |e| {
        e["verdict"] == "allow" && e["rule"] == "db-clients" && e["service"] == "db"
    })
    .expect("allow event");
    wait_event(&f.up, |e| {
        e["verdict"].as_str().is_some_and(|v| v.starts_with("deny")) && e["comm"] == "bash"
    })
    .expect("bash deny event");
    wait_event(&f.up, |e| {
        e["verdict"].as_str().is_some_and(|v| v.starts_with("deny")) && e["protocol"] == "udp"
    })
    .expect("UDP deny event");
    assert!(
        f.up.metrics_text()
            .contains("tether_agent_connect_decisions_total{verdict=\"deny")
    );

    // policy check names the rule.
    let c = f.up.ok(&[
        "policy",
        "check",
        "--identity",
        "client",
        "--to",
        &format!("127.0.0.1:{}", f.port),
    ]);
    assert!(c.contains("\"allow\"") && c.contains("db-clients"), "{c}");
    let c = f.up.ok(&[
        "policy",
        "check",
        "--pid",
        &std::process::id().to_string(),
        "--to",
        &format!("127.0.0.1:{}", f.port),
    ]);
    assert!(c.contains("\"deny\"") && c.contains("default-deny"), "{c}");
}

#[test]
fn exec_of_a_shell_loses_the_verdicts() {
    let f = Fixture::new("exec", None, &[]);
    // The authorized client connects (allowed), then execs bash, which
    // connects to the same destination: refused.
    let out = f.up.dir.path().join("exec-out");
    std::fs::create_dir_all(&out).expect("mkdir");
    let script = format!(
        "{{ echo hi > /dev/tcp/127.0.0.1/{}; }} 2>{}/err; echo $? > {}/rc",
        f.port,
        out.display(),
        out.display()
    );
    let mut cmd = Command::new(&f.exe);
    cmd.args(["child_entry", "--exact", "--nocapture", "--test-threads=1"])
        .env("TETHER_TEST_CHILD", "connect")
        .env("TETHER_TEST_OUT", &out)
        .env("TETHER_TEST_TARGETS", format!("tcp 127.0.0.1:{}", f.port))
        .env("TETHER_TEST_WAIT", "1")
        .env("TETHER_TEST_EXEC", &script)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    f.cg.enter(&mut cmd);
    let mut child = cmd.spawn().expect("client");
    let pid = child.id();
    f.release_when_attested(&out, pid);
    let _ = child.wait();
    let r = std::fs::read_to_string(out.join("results")).unwrap_or_default();
    assert!(all(&r, "ok"), "authorized client before exec: {r}");
    // The shell (same pid, new image) connects straight after the exec.
    // Either the agent has attested it by then and the kernel refuses
    // (EPERM), or it is held and the agent refuses it: by policy, or, if
    // the shell exited first, because it could not be attested. Never the
    // old image's verdict.
    let err = std::fs::read_to_string(out.join("err")).unwrap_or_default();
    let eperm = err.contains("Operation not permitted");
    let dst = format!("127.0.0.1:{}", f.port);
    wait_event(&f.up, |e| {
        e["pid"] == pid
            && e["destination"] == dst.as_str()
            && e["verdict"] == "deny"
            && (eperm || e["held"] == true)
    })
    .unwrap_or_else(|ev| {
        panic!(
            "no deny record for the exec'd shell (stderr {err:?}, exec {:?}): {ev}",
            std::fs::read_to_string(out.join("exec-error"))
        )
    });
}

#[test]
fn time_window_condition_allows_inside_and_denies_outside() {
    let f = Fixture::new(
        "time",
        Some("context.time.hour >= 8 && context.time.hour < 18"),
        &[],
    );
    let clock = std::env::temp_dir().join(format!("tether-clock-{}-time", std::process::id()));
    // 2026-11-23 10:00 UTC: inside the window.
    std::fs::write(&clock, "1795428000").expect("clock");
    std::thread::sleep(Duration::from_millis(1200));
    let r = f.run_attested(&f.exe, "inside");
    assert!(all(&r, "ok"), "inside the window:\n{r}");
    // 20:00 UTC: outside; takes effect within a second.
    std::fs::write(&clock, "1795464000").expect("clock");
    std::thread::sleep(Duration::from_millis(1200));
    let r = f.run_attested(&f.exe, "outside");
    assert!(all(&r, "EPERM"), "outside the window:\n{r}");
    let c = f.up.ok(&[
        "policy",
        "check",
        "--identity",
        "client",
        "--to",
        &format!("127.0.0.1:{}", f.port),
    ]);
    assert!(c.contains("does not hold"), "{c}");
    let _ = std::fs::remove_file(&clock);
}

#[test]
fn agent_sigkill_keeps_destinations_closed_and_a_restart_adopts_without_help() {
    let bpffs = BpfFs::new();
    let pin = bpffs.pin_dir();
    let pin_s = pin.display().to_string();
    let mut f = Fixture::new("failclosed", None, &["--bpf-pin-dir", &pin_s]);
    let r = f.run_attested(&f.exe, "before");
    assert!(all(&r, "ok"), "before the crash:\n{r}");

    f.up.kill();
    // Agent gone: the pinned programs still decide. Nothing new gets
    // through unchecked, authorized binary included (no one can attest it).
    let r = f.shell(&format!("echo hi > /dev/tcp/127.0.0.1/{}", f.port));
    assert!(
        r.contains("Operation not permitted"),
        "unauthorized connect while the agent was down: {r}"
    );
    let r = f.run(&f.exe, None, "while-down", 200);
    assert!(
        all(&r, "EPERM"),
        "a process connected unchecked while the agent was down:\n{r}"
    );

    // Restart: adopts the pinned state; the authorized client works again.
    f.up.restart();
    assert!(
        f.up.logs().contains("kernel enforcement active"),
        "{}",
        f.up.logs()
    );
    let r = f.run_attested(&f.exe, "after");
    assert!(all(&r, "ok"), "after the restart:\n{r}\n{}", f.up.logs());
    // A fresh shell, connecting at once.
    f.shell_connect_refused("")
        .unwrap_or_else(|e| panic!("after the restart: {e}"));

    // The documented removal command takes everything away.
    f.up.kill();
    let o = Command::new(TETHER)
        .args([
            "detach",
            "--cgroup",
            &f.cg.path.display().to_string(),
            "--pin-dir",
            &pin_s,
        ])
        .output()
        .expect("detach");
    assert!(
        o.status.success(),
        "detach: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let r = f.shell(&format!(
        "echo hi > /dev/tcp/127.0.0.1/{} && echo connected",
        f.port
    ));
    assert!(r.contains("connected"), "still enforced after detach: {r}");
}

#[test]
fn policy_changes_reach_new_connections_within_a_second() {
    let f = Fixture::new("change", None, &[]);
    let r = f.run_attested(&f.exe, "with-policy");
    assert!(all(&r, "ok"), "{r}");
    let o = f.up.tether(&["delete", "accesspolicy", "db-clients"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::thread::sleep(Duration::from_millis(1000));
    let r = f.run_attested(&f.exe, "without-policy");
    assert!(
        all(&r, "EPERM"),
        "policy removal not enforced within 1 s:\n{r}"
    );
    let c = f.up.ok(&[
        "policy",
        "check",
        "--identity",
        "client",
        "--to",
        &format!("127.0.0.1:{}", f.port),
    ]);
    assert!(c.contains("default-deny"), "{c}");
}
