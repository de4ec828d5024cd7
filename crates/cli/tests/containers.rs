//! Containers end to end with a real OCI runtime: podman and runc from
//! Debian, images the test assembles and imports (no registry), each
//! container in a network namespace of its own wired to the host by a
//! private veth pair, all under a cgroup this test creates and enforces.
//! Everything (containers, images, namespaces, links, cgroups) is removed
//! on drop, also when a test fails.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::containers::*;
use common::servers::{PASSWORD, Redis, which};
use common::*;

fn unique(tag: &str) -> String {
    format!("tether-{tag}-{}", rand_suffix())
}

/// Records of the audit stream matching `pred`, waited for.
fn audited(up: &Up, what: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let mut found = None;
    let ok = wait_until(Duration::from_secs(15), || {
        found = up.events().into_iter().find(|e| pred(e));
        found.is_some()
    });
    assert!(ok, "no audit record for {what}:\n{:#?}", up.events());
    found.unwrap_or_default()
}

fn is_deny(e: &serde_json::Value) -> bool {
    e["verdict"]
        .as_str()
        .is_some_and(|v| v.starts_with("deny") || v == "unattested")
}

fn enforced_agent(scope: &Scope) -> Up {
    Up::start_with(&["--enforce-cgroup", &scope.path().display().to_string()])
}

fn apply_redis_policy(up: &Up, image: &Image, addr: &str, port: u16) {
    let sha = sha256_file(&which("redis-cli"));
    up.apply_ok(&format!(
        "apiVersion: tether.dev/v1alpha1
kind: WorkloadIdentity
metadata: {{name: redis-client}}
spec:
  spiffeId: spiffe://example.org/redis-client
  selectors: [[\"container:image:{image}\", \"process:sha256:{sha}\"]]
  # A container's own mount namespace: its loader and libraries are the
  # image's, and the operator accepts them by naming the image.
  allowExec: [mount-namespace]
---
apiVersion: tether.dev/v1alpha1
kind: Service
metadata: {{name: redis}}
spec:
  addresses:
    - {{cidr: {addr}/32, ports: [{port}]}}
---
apiVersion: tether.dev/v1alpha1
kind: AccessPolicy
metadata: {{name: redis-clients}}
spec:
  services: [redis]
  identities: [redis-client]
",
        image = image.id
    ));
    let to = format!("{addr}:{port}");
    assert!(
        wait_until(Duration::from_secs(10), || {
            up.try_ok(&["policy", "check", "--identity", "redis-client", "--to", &to])
                .is_some_and(|o| o.contains("redis-clients"))
        }),
        "policies never reached the agent:\n{}",
        up.logs()
    );
}

fn redis_ping(addr: &str, port: u16) -> Vec<String> {
    [
        "/usr/bin/redis-cli",
        "-h",
        addr,
        "-p",
        &port.to_string(),
        "-a",
        PASSWORD,
        "--no-auth-warning",
        "PING",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn containers_are_enforced_in_their_own_network_namespaces() {
    let scope = Scope::new("ct");
    let net_a = CtNet::new();
    let net_b = CtNet::new();
    let net_fresh = CtNet::new();
    let image_a = Image::build("a");
    let image_b = Image::build("b");
    // Redis on the host, at the host end of container A's link (and
    // loopback for the counter).
    let redis = Redis::start_in(None, None, &format!("127.0.0.1 {}", net_a.host_addr));
    let up = enforced_agent(&scope);
    apply_redis_policy(&up, &image_a, &net_a.host_addr, redis.port);
    // Routes from the other namespaces to container A's host address.
    for n in [&net_b, &net_fresh] {
        run_ok(Command::new("ip").args([
            "-n",
            &n.name,
            "route",
            "add",
            &format!("{}/32", net_a.host_addr),
            "via",
            &n.host_addr,
        ]));
    }
    let ping = redis_ping(&net_a.host_addr, redis.port);

    // A freshly started container whose first process is redis-cli: its
    // first connect comes before the agent has seen it or its namespace,
    // and is held, not refused.
    let fresh = unique("fresh");
    let before = redis.connections_received();
    let mut args = run_args(&scope, &net_fresh, &fresh, &["--rm"]);
    args.push(image_a.reference.clone());
    args.extend(ping.iter().cloned());
    let o = run(podman().args(&args));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "PONG",
        "a fresh container's first connection failed: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        up.logs()
    );
    assert_eq!(
        redis.connections_received(),
        before + 2,
        "one connection arrived"
    );

    // A long-running container of the allowed image.
    let a = start(&scope, &net_a, &image_a, &unique("a"));
    let exec = |c: &Container, argv: &[String]| -> Output { c.exec(argv) };
    let o = exec(&a, &ping);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "PONG",
        "redis-cli in the allowed container: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        up.logs()
    );

    // From the same container: a shell and Python, each refused.
    let before = redis.connections_received();
    let sh = format!(
        "exec 3<>/dev/tcp/{}/{} && printf 'PING\\r\\n' >&3 && timeout 5 head -c 64 <&3",
        net_a.host_addr, redis.port
    );
    let o = exec(&a, &["/usr/bin/bash".into(), "-c".into(), sh]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        !out.contains("NOAUTH") && !out.contains("PONG"),
        "bash reached Redis: {out}"
    );
    let py = format!(
        "import socket\ntry:\n s=socket.create_connection(('{}',{}),timeout=10)\n s.sendall(b'PING\\r\\n')\n print(s.recv(64))\nexcept OSError as e:\n print('refused', e)",
        net_a.host_addr, redis.port
    );
    let o = exec(&a, &["/usr/bin/python3".into(), "-c".into(), py]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("refused") || out.contains("b''"),
        "python reached Redis: {out}"
    );

    // The same redis-cli in a container of another image.
    let b = start(&scope, &net_b, &image_b, &unique("b"));
    let o = exec(&b, &ping);
    assert_ne!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "PONG",
        "redis-cli in a container of another image reached Redis"
    );
    // Redis's own counter: none of the three arrived (the one more is this
    // query's own connection).
    assert_eq!(
        redis.connections_received(),
        before + 1,
        "a refused client reached Redis"
    );

    // Each refusal is audited with the container's id, name and image.
    for (what, c, image, comm) in [
        ("bash", &a, &image_a, "bash"),
        ("python", &a, &image_a, "python3"),
        ("redis-cli of another image", &b, &image_b, "redis-cli"),
    ] {
        let e = audited(&up, what, |e| {
            is_deny(e)
                && e["comm"] == comm
                && e["container"]["id"] == c.id.as_str()
                && e["container"]["name"] == c.name.as_str()
                && e["container"]["image"] == image.id.as_str()
        });
        assert_eq!(e["service"], "redis", "{e}");
    }
    // The allowed ones too, with the container named.
    audited(&up, "the allowed redis-cli", |e| {
        e["verdict"]
            .as_str()
            .is_some_and(|v| v.starts_with("allow"))
            && e["container"]["name"] == a.name.as_str()
    });
}

#[test]
fn names_tell_containers_of_one_image_apart() {
    let scope = Scope::new("ctnames");
    let net = CtNet::new();
    let image = Image::build("n");
    let up = enforced_agent(&scope);
    let (one, two) = (unique("one"), unique("two"));
    let sleep = sha256_file(Path::new("/usr/bin/sleep"));
    up.apply_ok(&format!(
        "apiVersion: tether.dev/v1alpha1
kind: WorkloadIdentity
metadata: {{name: one}}
spec:
  spiffeId: spiffe://example.org/one
  selectors: [[\"container:name:{one}\", \"container:image:{img}\", \"process:sha256:{sleep}\"]]
  allowExec: [mount-namespace]
---
apiVersion: tether.dev/v1alpha1
kind: WorkloadIdentity
metadata: {{name: two}}
spec:
  spiffeId: spiffe://example.org/two
  selectors: [[\"container:name:{two}\", \"container:image:{img}\", \"process:sha256:{sleep}\"]]
  allowExec: [mount-namespace]
",
        img = image.id
    ));
    let c1 = start(&scope, &net, &image, &one);
    let c2 = start(&scope, &net, &image, &two);
    let id_of = |pid: u32| -> Option<String> {
        let v: serde_json::Value = serde_json::from_str(&up.try_ok(&["svids"])?).ok()?;
        v.as_array()?
            .iter()
            .find(|r| r["pid"] == pid)
            .and_then(|r| r["spiffeId"].as_str().map(str::to_string))
    };
    for (c, want) in [
        (&c1, "spiffe://example.org/one"),
        (&c2, "spiffe://example.org/two"),
    ] {
        let ok = wait_until(Duration::from_secs(20), || {
            id_of(c.pid).as_deref() == Some(want)
        });
        assert!(
            ok,
            "container {} (pid {}) never got {want}; it has {:?}\n{}\n{}",
            c.name,
            c.pid,
            id_of(c.pid),
            up.try_ok(&["whoami", "--json", "--pid", &c.pid.to_string()])
                .unwrap_or_default(),
            up.logs()
        );
    }
    // The container's path view, and the runtime, are selectors too.
    let who = up.ok(&["whoami", "--json", "--pid", &c1.pid.to_string()]);
    for s in [
        "container:path:/usr/bin/sleep",
        "container:runtime:runc",
        &format!("container:name:{one}"),
    ] {
        assert!(who.contains(s), "whoami lacks {s}:\n{who}");
    }
}

#[test]
fn identity_and_credentials_inside_a_container() {
    const SECRET: &str = "container-secret-5e1d";
    let scope = Scope::new("ctid");
    let net = CtNet::new();
    let image = Image::build("id");
    let up = enforced_agent(&scope);
    let py = python();
    let home = py
        .ancestors()
        .nth(2)
        .expect("python's prefix")
        .to_path_buf();
    up.apply_ok(&format!(
        "apiVersion: tether.dev/v1alpha1
kind: WorkloadIdentity
metadata: {{name: py}}
spec:
  spiffeId: spiffe://example.org/py
  selectors: [[\"container:image:{img}\", \"process:sha256:{sha}\", \"container:path:{path}\"]]
  allowExec: [mount-namespace]
---
apiVersion: tether.dev/v1alpha1
kind: CredentialSource
metadata: {{name: db-password}}
spec:
  static: {{value: \"{SECRET}\"}}
---
apiVersion: tether.dev/v1alpha1
kind: CredentialBinding
metadata: {{name: py-db}}
spec: {{identity: py, source: db-password, file: {{name: db-password, format: raw, mode: '0400'}}}}
",
        img = image.id,
        sha = sha256_file(&py),
        path = py.display(),
    ));
    // The Workload API socket and the credential filesystem, mounted in;
    // the interpreter's prefix read-only.
    let sock = format!(
        "{}:/run/spire/workload.sock",
        up.workload_socket().display()
    );
    let creds = format!("{}:/run/tether/credentials", up.credentials_dir().display());
    let prefix = format!("{}:{}:ro", home.display(), home.display());
    let c = start_with(
        &scope,
        &net,
        &image,
        &unique("id"),
        &["-v", &sock, "-v", &creds, "-v", &prefix],
    );
    let script = "import os\n\
        from spiffe import WorkloadApiClient\n\
        try:\n print(WorkloadApiClient().fetch_x509_svid().spiffe_id)\n\
        except Exception as e:\n print('no-svid', type(e).__name__)\n\
        try:\n print(open('/run/tether/credentials/db-password').read())\n\
        except OSError as e:\n print('no-file', e.errno)\n";
    let env = "SPIFFE_ENDPOINT_SOCKET=unix:///run/spire/workload.sock";
    let run_py = |exe: &str, extra_env: &[&str]| -> String {
        let mut argv: Vec<String> = vec!["env".into(), env.into()];
        argv.extend(extra_env.iter().map(|s| s.to_string()));
        argv.extend([exe.to_string(), "-c".into(), script.into()]);
        let o = c.exec(&argv);
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    let got = run_py(&py.display().to_string(), &[]);
    assert!(
        got.contains("spiffe://example.org/py") && got.contains(SECRET),
        "the entitled process in the container: {got}\n{}",
        up.logs()
    );
    // The same interpreter's bytes at another path inside the same
    // container: another process, neither the SVID nor the file.
    let copy = "/tmp/python-copy";
    let o = c.exec(&["cp".into(), py.display().to_string(), copy.into()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let pyhome = format!("PYTHONHOME={}", home.display());
    let got = run_py(copy, &[&pyhome]);
    assert!(
        got.contains("no-svid") && got.contains("no-file") && !got.contains(SECRET),
        "another process in the container: {got}"
    );
    // A shell: no file either.
    let o = c.exec(&[
        "/usr/bin/bash".into(),
        "-c".into(),
        "cat /run/tether/credentials/db-password; ls -A /run/tether/credentials".into(),
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        !out.contains(SECRET) && out.trim().is_empty(),
        "a shell in the container: {out}"
    );
}

#[test]
fn an_agent_restart_keeps_containers_closed_and_adopts_them() {
    let bpffs = common::kernel::BpfFs::new();
    let pin = bpffs.pin_dir().display().to_string();
    let scope = Scope::new("ctrestart");
    let net = CtNet::new();
    let net_fresh = CtNet::new();
    let image = Image::build("r");
    let redis = Redis::start_in(None, None, &format!("127.0.0.1 {}", net.host_addr));
    let mut up = Up::start_with(&[
        "--enforce-cgroup",
        &scope.path().display().to_string(),
        "--bpf-pin-dir",
        &pin,
    ]);
    apply_redis_policy(&up, &image, &net.host_addr, redis.port);
    run_ok(Command::new("ip").args([
        "-n",
        &net_fresh.name,
        "route",
        "add",
        &format!("{}/32", net.host_addr),
        "via",
        &net_fresh.host_addr,
    ]));
    let ping = redis_ping(&net.host_addr, redis.port);
    let a = start(&scope, &net, &image, &unique("r"));
    let pong = |o: &Output| String::from_utf8_lossy(&o.stdout).trim() == "PONG";
    assert!(pong(&a.exec(&ping)), "before the restart:\n{}", up.logs());

    up.kill();
    // Agent gone: nothing in the containers reaches Redis, the allowed
    // binary included (nobody can attest a new process).
    let before = redis.connections_received();
    assert!(
        !pong(&a.exec(&ping)),
        "redis-cli connected while the agent was down"
    );
    let mut args = run_args(&scope, &net_fresh, &unique("down"), &["--rm"]);
    args.push(image.reference.clone());
    args.extend(ping.iter().cloned());
    assert!(
        !pong(&run(podman().args(&args))),
        "a fresh container connected while the agent was down"
    );
    assert_eq!(
        redis.connections_received(),
        before + 1,
        "a connection arrived while the agent was down"
    );

    // Restarted: it adopts the pinned state and serves the running
    // container's namespace again.
    up.restart();
    let again = wait_until(Duration::from_secs(20), || pong(&a.exec(&ping)));
    assert!(again, "after the restart:\n{}", up.logs());
    let mut args = run_args(&scope, &net_fresh, &unique("after"), &["--rm"]);
    args.push(image.reference.clone());
    args.extend(ping.iter().cloned());
    let o = run(podman().args(&args));
    assert!(
        pong(&o),
        "a fresh container after the restart: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        up.logs()
    );
}

#[test]
fn process_events_come_from_the_kernel_in_every_namespace() {
    // No proc connector and rescans ten minutes apart: only the kernel's
    // tracepoints can tell the agent a container process started.
    let scope = Scope::new("ctev");
    let net = CtNet::new();
    let image = Image::build("ev");
    let up = Up::start_with_env(
        &[
            "--enforce-cgroup",
            &scope.path().display().to_string(),
            "--rescan",
            "10m",
        ],
        &[("TETHER_PROC_CONNECTOR", "off")],
    );
    assert!(up.logs().contains("proc connector off"), "{}", up.logs());
    up.apply_ok(&format!(
        "apiVersion: tether.dev/v1alpha1
kind: WorkloadIdentity
metadata: {{name: sleeper}}
spec:
  spiffeId: spiffe://example.org/sleeper
  selectors: [[\"container:image:{img}\", \"process:sha256:{sha}\"]]
  allowExec: [mount-namespace]
",
        img = image.id,
        sha = sha256_file(Path::new("/usr/bin/sleep")),
    ));
    // Let the agent's one start-up rescan pass before the container exists.
    std::thread::sleep(Duration::from_millis(500));
    let c = start(&scope, &net, &image, &unique("ev"));
    let has_svid = || {
        up.try_ok(&["svids"])
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .and_then(|v| {
                v.as_array().map(|a| {
                    a.iter().any(|r| {
                        r["pid"] == c.pid && r["spiffeId"] == "spiffe://example.org/sleeper"
                    })
                })
            })
            .unwrap_or(false)
    };
    assert!(
        wait_until(Duration::from_secs(15), has_svid),
        "the container's process (pid {}) got no SVID without a rescan:\n{}",
        c.pid,
        up.logs()
    );
}

/// A directory mounted at the same path inside a container.
fn same_path(p: &Path, mode: &str) -> String {
    format!("{0}:{0}:{mode}", p.display())
}

#[test]
fn the_agent_runs_as_a_privileged_container() {
    // `tether up` (server and agent) in a privileged container with the
    // host's pid, network and cgroup namespaces, enforcing a cgroup of
    // this test's on the host. `--host-pid` names a process in the host's
    // mount namespace (this test; 1 on a real host).
    let scope = Scope::new("ctagent");
    let image = Image::build("agent");
    let dir = open_tempdir();
    let redis = Redis::start();
    let tether = Path::new(TETHER);
    let bin_dir = tether.parent().expect("bin dir");
    let name = unique("agent");
    let log = dir.path().join("agent.log");
    let mut cmd = podman();
    cmd.args(["run", "-d", "--name", &name, "--runtime", "runc"])
        .args([
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
        ])
        .args([
            "--privileged",
            "--pid=host",
            "--network=host",
            "--cgroupns=host",
        ])
        .args(["-v", "/usr:/usr:ro", "-v", "/sys/fs/cgroup:/sys/fs/cgroup"])
        .args([
            "-v",
            &same_path(bin_dir, "ro"),
            "-v",
            &same_path(dir.path(), "rw"),
        ])
        .args(["-v", "/run/runc:/run/runc:ro"])
        .args([
            "-v",
            "/var/lib/containers/storage:/var/lib/containers/storage:ro",
        ])
        .arg(&image.reference)
        .args(["/bin/sh", "-c"])
        .arg(format!(
            "exec {tether} --log-format json up --listen 127.0.0.1:0 --data-dir {d}/data \
             --run-dir {d}/run --enforce-cgroup {cg} --bpf-pin-dir none \
             --credentials-dir none --mesh-port 0 --metrics off --host-pid {host} 2> {log}",
            tether = tether.display(),
            d = dir.path().display(),
            cg = scope.path().display(),
            host = std::process::id(),
            log = log.display(),
        ));
    let _agent = Container {
        name: name.clone(),
        pid: 0,
        id: run_ok(&mut cmd),
    };
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(60), || read_log()
            .contains("tether is up")),
        "the contained agent did not start:\n{}",
        read_log()
    );
    assert!(
        read_log().contains("kernel enforcement active"),
        "{}",
        read_log()
    );
    let admin = dir.path().join("run/admin.sock");
    let agent_sock = dir.path().join("run/agent.sock");
    let cli = |args: &[&str]| {
        let o = run(Command::new(TETHER)
            .args(args)
            .env("TETHER_ADMIN_SOCKET", &admin)
            .env("TETHER_AGENT_SOCKET", &agent_sock));
        assert!(
            o.status.success(),
            "tether {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    // redis-cli on the host, by its host path: only the host's view of
    // paths (through --host-pid) can match, and only the host's mount
    // namespace passes the exec checks without allowExec.
    let redis_cli = std::fs::canonicalize(which("redis-cli")).expect("redis-cli");
    let manifest = dir.path().join("m.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: tether.dev/v1alpha1
kind: WorkloadIdentity
metadata: {{name: redis-cli}}
spec:
  spiffeId: spiffe://example.org/redis-cli
  selectors: [[\"process:sha256:{sha}\", \"process:path:{path}\", \"unix:uid:0\"]]
---
apiVersion: tether.dev/v1alpha1
kind: Service
metadata: {{name: redis}}
spec:
  addresses: [{{cidr: 127.0.0.1/32, ports: [{port}]}}]
---
apiVersion: tether.dev/v1alpha1
kind: AccessPolicy
metadata: {{name: redis-clients}}
spec: {{services: [redis], identities: [redis-cli]}}
",
            sha = sha256_file(&redis_cli),
            path = redis_cli.display(),
            port = redis.port
        ),
    )
    .expect("manifest");
    cli(&["apply", "-f", &manifest.display().to_string()]);
    let to = format!("127.0.0.1:{}", redis.port);
    assert!(
        wait_until(Duration::from_secs(15), || {
            run(Command::new(TETHER)
                .args(["policy", "check", "--identity", "redis-cli", "--to", &to])
                .env("TETHER_AGENT_SOCKET", &agent_sock))
            .stdout
            .windows(13)
            .any(|w| w == b"redis-clients")
        }),
        "policies never reached the contained agent:\n{}",
        read_log()
    );
    let in_scope = |program: &Path, args: &[&str]| -> Output {
        let mut c = Command::new(program);
        c.args(args).env("REDISCLI_AUTH", PASSWORD);
        common::kernel::enter_cgroup(scope.path(), &mut c);
        run(&mut c)
    };
    let port = redis.port.to_string();
    let o = in_scope(&redis_cli, &["-h", "127.0.0.1", "-p", &port, "PING"]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "PONG",
        "redis-cli under the contained agent: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        read_log()
    );
    let before = redis.connections_received();
    let o = in_scope(
        Path::new("/usr/bin/bash"),
        &[
            "-c",
            &format!(
                "exec 3<>/dev/tcp/127.0.0.1/{port} && printf 'PING\\r\\n' >&3 && timeout 5 head -c 64 <&3"
            ),
        ],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        !out.contains("NOAUTH") && !out.contains("PONG"),
        "bash reached Redis: {out}"
    );
    assert_eq!(
        redis.connections_received(),
        before + 1,
        "a refused client reached Redis"
    );
}

#[test]
fn a_network_namespace_of_a_users_own_is_refused_at_once() {
    // A process in the enforced cgroup makes a user and network namespace
    // of its own and connects to a protected address at once: the agent
    // never works in such a namespace, so the connect fails at once
    // (EPERM), not after a wait.
    let scope = Scope::new("ctuserns");
    let up = enforced_agent(&scope);
    let port = free_port();
    up.apply_ok(&format!(
        "apiVersion: tether.dev/v1alpha1
kind: Service
metadata: {{name: db}}
spec:
  addresses: [{{cidr: 127.0.0.1/32, ports: [{port}]}}]
"
    ));
    assert!(
        wait_until(Duration::from_secs(10), || {
            let me = std::process::id().to_string();
            up.try_ok(&[
                "policy",
                "check",
                "--pid",
                &me,
                "--to",
                &format!("127.0.0.1:{port}"),
            ])
            .is_some_and(|o| o.contains("db"))
        }),
        "the Service never reached the agent"
    );
    let mut c = Command::new("unshare");
    c.args(["-Urn", "/usr/bin/bash", "-c"]).arg(format!(
        "ip link set lo up; timeout 20 bash -c 'echo > /dev/tcp/127.0.0.1/{port}' 2>&1; echo rc=$?"
    ));
    common::kernel::enter_cgroup(scope.path(), &mut c);
    let o = run(&mut c);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("Operation not permitted") && out.contains("rc=1"),
        "a connect from a user's own network namespace: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
