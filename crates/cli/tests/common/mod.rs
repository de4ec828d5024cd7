//! Test harness: runs the real `tether` binary (`tether up`) on private
//! sockets and ports in a temporary directory, and a copy of the test binary
//! as a stand-in workload process. Everything is removed on drop, also when
//! a test fails.

#![allow(dead_code)]

pub mod capture;
pub mod containers;
pub mod kernel;
pub mod netns;
pub mod peers;
pub mod pki;
pub mod servers;

use std::io::{Read as _, Write as _};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const TETHER: &str = env!("CARGO_BIN_EXE_tether");

pub struct Up {
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    extra: Vec<String>,
    pub run: PathBuf,
    pub node_api: String,
    pub metrics: String,
    pub log: PathBuf,
    /// Where the server listens, and the network namespace to run in.
    listen: String,
    netns_fd: Option<i32>,
    /// Extra environment of `tether up`.
    env: Vec<(String, String)>,
}

pub use tether_test_support::{free_port, no_loader_env, wait_until};

/// A server in this process (trust domain example.org, node API on a free
/// loopback port), its data under `dir/<data>` and its admin API on
/// `dir/admin.sock`.
pub async fn in_process_server(
    dir: &Path,
    data: &str,
) -> (
    tether_server::RunningServer,
    tether_proto::tether::admin_client::AdminClient<tonic::transport::Channel>,
) {
    let td = tether_spiffe::TrustDomain::new("example.org").expect("td");
    let mut cfg = tether_server::ServerConfig::new(td, dir.join(data));
    cfg.listen = "127.0.0.1:0".parse().expect("addr");
    cfg.admin_socket = dir.join("admin.sock");
    let server = tether_server::start(cfg).await.expect("server");
    let admin = tether_proto::tether::admin_client::AdminClient::new(tether_proto::uds::channel(
        &dir.join("admin.sock"),
    ));
    (server, admin)
}

/// A world-traversable temp dir, so workloads running as other uids can
/// reach the sockets in it.
pub fn open_tempdir() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("tether-test-")
        .tempdir()
        .expect("tempdir");
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    d
}

fn field(line: &str, key: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    v.get(key)?.as_str().map(str::to_string)
}

impl Up {
    pub fn start() -> Up {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Up {
        Self::start_in(None, "127.0.0.1:0", extra, &[])
    }

    /// With these environment variables set for `tether up` (say,
    /// `SSL_CERT_FILE` for the roots it trusts at token endpoints).
    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Up {
        Self::start_in(None, "127.0.0.1:0", extra, env)
    }

    /// `tether up` on a host of a [`netns::Lan`], its server listening on
    /// that host's address.
    pub fn start_on(lan: &netns::Lan, host: &str, extra: &[&str]) -> Up {
        Self::start_in(
            Some(lan.fd(host)),
            &format!("{}:0", lan.addr(host)),
            extra,
            &[],
        )
    }

    fn start_in(netns_fd: Option<i32>, listen: &str, extra: &[&str], env: &[(&str, &str)]) -> Up {
        let dir = open_tempdir();
        let run = dir.path().join("run");
        let log = dir.path().join("tether.log");
        let mut extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        // Agents in the host's network namespace run side by side: each
        // gets a mesh port of its own (the default one would go to the
        // first, and the others would silently run without a mesh).
        if netns_fd.is_none()
            && extra.iter().any(|a| a == "--enforce-cgroup")
            && !extra.iter().any(|a| a == "--mesh-port")
        {
            extra.extend(["--mesh-port".to_string(), free_port().to_string()]);
        }
        let mut up = Up {
            dir,
            child: None,
            extra,
            run,
            node_api: String::new(),
            metrics: String::new(),
            log,
            listen: listen.to_string(),
            netns_fd,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        up.spawn();
        up
    }

    /// Starts `tether up` again on the same data and sockets (after `kill`).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    fn spawn(&mut self) {
        let logf = std::fs::File::create(&self.log).expect("log file");
        let mut cmd = Command::new(TETHER);
        no_loader_env(&mut cmd);
        if let Some(fd) = self.netns_fd {
            netns::enter_fd(fd, &mut cmd);
        }
        // Tests run many agents at once: nothing pinned unless a test says
        // where (the default pin directory is one per host).
        let pin: &[&str] = if self.extra.iter().any(|a| a == "--bpf-pin-dir") {
            &[]
        } else {
            &["--bpf-pin-dir", "none"]
        };
        // Rescans every 5 s unless the test says otherwise.
        let rescan: &[&str] = if self.extra.iter().any(|a| a == "--rescan") {
            &[]
        } else {
            &["--rescan", "5s"]
        };
        let child = cmd
            .args([
                "up",
                "--log-format",
                "json",
                "--listen",
                &self.listen,
                "--metrics",
                "127.0.0.1:0",
            ])
            .args(rescan)
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .arg("--run-dir")
            .arg(&self.run)
            .args(&self.extra)
            .args(pin)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("spawn tether up");
        self.child = Some(child);
        let up = self;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let logs = up.logs();
            for line in logs.lines() {
                if let Some(a) = field(line, "node_api") {
                    up.node_api = a;
                }
                if field(line, "message").as_deref() == Some("agent started") {
                    up.metrics = field(line, "metrics").unwrap_or_default();
                }
            }
            if logs.contains("tether is up") {
                return;
            }
            if let Some(c) = up.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!("tether up exited with {status}:\n{logs}");
            }
            assert!(
                Instant::now() < deadline,
                "tether up did not start in 60s:\n{logs}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn workload_socket(&self) -> PathBuf {
        self.run.join("workload.sock")
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.run.join("admin.sock")
    }

    pub fn agent_socket(&self) -> PathBuf {
        self.run.join("agent.sock")
    }

    /// Runs the CLI against this instance's sockets.
    pub fn tether(&self, args: &[&str]) -> Output {
        Command::new(TETHER)
            .args(args)
            .env("TETHER_ADMIN_SOCKET", self.admin_socket())
            .env("TETHER_AGENT_SOCKET", self.agent_socket())
            .output()
            .expect("run tether")
    }

    /// Runs the CLI and insists that it succeeds; returns stdout.
    /// Its output when the command succeeds, None when it fails: for
    /// polling until something has reached the agent.
    pub fn try_ok(&self, args: &[&str]) -> Option<String> {
        let o = self.tether(args);
        o.status
            .success()
            .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.tether(args);
        assert!(
            o.status.success(),
            "tether {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&o.stderr),
            self.logs()
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// The audit records so far, parsed.
    pub fn events(&self) -> Vec<serde_json::Value> {
        self.ok(&["events"])
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits until the audit stream has a record for `pid` matching `pred`;
    /// fails naming `what` and listing the pid's records.
    pub fn audited(&self, pid: u32, what: &str, pred: impl Fn(&serde_json::Value) -> bool) {
        let mut last = Vec::new();
        let found = wait_until(Duration::from_secs(10), || {
            last = self.events();
            last.iter().any(|e| e["pid"] == pid && pred(e))
        });
        let mine: Vec<String> = last
            .iter()
            .filter(|e| e["pid"] == pid)
            .map(|e| e.to_string())
            .collect();
        assert!(
            found,
            "no audit record for {what} (pid {pid}); its records: {mine:#?}"
        );
    }

    pub fn apply(&self, yaml: &str) -> Output {
        let f = self
            .dir
            .path()
            .join(format!("manifest-{}.yaml", rand_suffix()));
        std::fs::write(&f, yaml).expect("write manifest");
        self.tether(&["apply", "-f", f.to_str().expect("utf8 path")])
    }

    pub fn apply_ok(&self, yaml: &str) -> String {
        let o = self.apply(yaml);
        assert!(
            o.status.success(),
            "apply failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    pub fn metrics_text(&self) -> String {
        http_get(&self.metrics, "/metrics")
    }

    /// A metric's value (first sample with that exact name).
    pub fn metric(&self, name: &str) -> f64 {
        self.metrics_text()
            .lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix(' '))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or_else(|| panic!("metric {name} not found"))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILLs the instance (a crash, not a clean stop).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // A killed agent leaves its credential mount dead (ENOTCONN), which
        // would keep the temporary directory from being removed.
        if let Ok(p) = std::ffi::CString::new(self.credentials_dir().as_os_str().as_encoded_bytes())
        {
            // SAFETY: umount2 reads a NUL-terminated path.
            unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) };
        }
    }

    /// The agent's credential filesystem (`tether up` mounts it in its run
    /// directory).
    pub fn credentials_dir(&self) -> PathBuf {
        self.run.join("credentials")
    }

    /// The "creds" workload (see `read_credentials`) run from `exe` as
    /// `uid` against this instance's credential directory, with `env`.
    pub fn creds_command(&self, exe: &Path, uid: u32, out: &Path, env: &[(&str, &str)]) -> Command {
        let mut c = workload_command(exe, uid, &self.workload_socket(), out, "creds");
        c.env("TETHER_TEST_CRED_DIR", self.credentials_dir());
        c.envs(env.iter().copied());
        c
    }

    /// A bash (as `uid`) that lists the credential directory and reads
    /// `file` itself: its own pid does the lookups (the redirect is opened
    /// by the shell, not a child). Its pid, and what it printed: the
    /// listing, then `READ:LINE` or `DENIED`.
    pub fn shell_attempt(&self, uid: u32, file: &str, out: &Path) -> (u32, String) {
        std::fs::create_dir_all(out).expect("mkdir");
        std::fs::set_permissions(out, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .expect("chmod");
        let dir = self.credentials_dir();
        let script = format!(
            "echo $$ > {out}/pid; ls -A {dir} 2>&1; if IFS= read -r l < {dir}/{file}; then echo \"READ:$l\"; else echo DENIED; fi",
            out = out.display(),
            dir = dir.display()
        );
        let mut c = Command::new("/bin/bash");
        no_loader_env(&mut c).args(["-c", &script]);
        if uid != 0 {
            std::os::unix::process::CommandExt::uid(&mut c, uid);
            std::os::unix::process::CommandExt::gid(&mut c, uid);
        }
        let o = c.output().expect("shell");
        let text =
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
        let pid = std::fs::read_to_string(out.join("pid"))
            .unwrap_or_default()
            .trim()
            .parse()
            .expect("shell pid");
        (pid, text)
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            // SIGTERM first so sockets are closed cleanly, then make sure.
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill();
    }
}

pub fn rand_suffix() -> String {
    format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    )
}

pub fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect metrics");
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

pub fn sha256_file(p: &Path) -> String {
    let o = Command::new("sha256sum")
        .arg(p)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// A WorkloadIdentity `name` (`spiffe://example.org/NAME`) for the binary
/// `exe`, by its sha256 and path, run as root; a YAML document ending with
/// `---`, to put before the rest of a manifest.
pub fn binary_identity(name: &str, exe: &Path) -> String {
    format!(
        "apiVersion: tether.dev/v1alpha1
kind: WorkloadIdentity
metadata: {{name: {name}}}
spec:
  spiffeId: spiffe://example.org/{name}
  selectors: [[\"process:sha256:{}\", \"process:path:{}\", \"unix:uid:0\"]]
---
",
        sha256_file(exe),
        exe.display()
    )
}

/// Python's own interpreter (not a launcher script that execs it).
pub fn python() -> PathBuf {
    let o = Command::new("python3")
        .args([
            "-c",
            "import os, sys; print(os.path.realpath(sys.executable))",
        ])
        .output()
        .expect("python3");
    PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())
}

/// A copy of the running test binary in a world-readable directory, to run
/// as a workload (as any uid). `name` becomes its file name. Debug info is
/// stripped (binutils, from build-essential): the agent hashes every
/// workload executable within a time limit, and the debug build is over
/// 200 MB, which a page cache crowded by the build can take longer than
/// that to read; then no `process:sha256` selector matches.
pub fn workload_binary(dir: &Path, name: &str) -> PathBuf {
    let me = std::env::current_exe().expect("current_exe");
    let wdir = dir.join("bin");
    std::fs::create_dir_all(&wdir).expect("mkdir bin");
    std::fs::set_permissions(&wdir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let dst = wdir.join(name);
    let o = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&dst)
        .arg(&me)
        .output()
        .expect("strip (binutils) runs");
    assert!(
        o.status.success(),
        "strip {}: {}",
        me.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dst
}

/// Runs `exe` (a copy of this test binary) as a workload: it executes only
/// the `child_entry` test, which does `mode` and writes results to `out`.
pub fn workload_command(exe: &Path, uid: u32, socket: &Path, out: &Path, mode: &str) -> Command {
    std::fs::create_dir_all(out).expect("mkdir out");
    std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o777)).expect("chmod out");
    let mut c = Command::new(exe);
    no_loader_env(&mut c);
    c.args(["child_entry", "--exact", "--nocapture", "--test-threads=1"])
        .env("TETHER_TEST_CHILD", mode)
        .env("TETHER_TEST_OUT", out)
        .env(
            "SPIFFE_ENDPOINT_SOCKET",
            format!("unix://{}", socket.display()),
        )
        .current_dir(out)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if uid != 0 {
        // std clears supplementary groups when root switches uid.
        c.uid(uid).gid(uid);
    }
    c
}

/// What a workload child wrote: its SPIFFE ID and PEM files, or an error.
pub struct ChildResult {
    pub output: Output,
    pub out: PathBuf,
}

impl ChildResult {
    pub fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.out.join(name)).unwrap_or_default()
    }
    pub fn spiffe_id(&self) -> String {
        self.read("spiffe_id").trim().to_string()
    }
    pub fn error(&self) -> String {
        self.read("error")
    }
    pub fn describe(&self) -> String {
        format!(
            "status {}, stdout: {}, stderr: {}, error file: {}",
            self.output.status,
            String::from_utf8_lossy(&self.output.stdout),
            String::from_utf8_lossy(&self.output.stderr),
            self.error()
        )
    }
}

pub fn run_workload(exe: &Path, uid: u32, socket: &Path, out: &Path, mode: &str) -> ChildResult {
    let output = workload_command(exe, uid, socket, out, mode)
        .output()
        .expect("run workload");
    ChildResult {
        output,
        out: out.to_path_buf(),
    }
}

pub fn pem(label: &str, der: &[u8]) -> String {
    tether_ca::pem_encode(label, der)
}

/// Follows the X.509-SVID stream until it has pushed two different
/// certificates (a rotation), then writes their SPIFFE ID, whether the key
/// changed too, and its pid.
async fn rotate(client: &spiffe::WorkloadApiClient, out: &Path) -> Result<(), String> {
    use futures_util::StreamExt as _;
    let mut stream = client
        .stream_x509_svids()
        .await
        .map_err(|e| format!("stream: {e}"))?;
    let mut seen: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while seen.len() < 2 {
        let next = tokio::time::timeout_at(deadline, stream.next())
            .await
            .map_err(|_| "no rotation pushed within 20 s".to_string())?
            .ok_or("stream ended")?
            .map_err(|e| format!("stream error: {e}"))?;
        std::fs::write(out.join("spiffe_id"), next.spiffe_id().to_string())
            .map_err(|e| e.to_string())?;
        let leaf = next.cert_chain()[0].as_bytes().to_vec();
        if !seen.iter().any(|(l, _)| l == &leaf) {
            seen.push((leaf, next.private_key().as_bytes().to_vec()));
        }
    }
    std::fs::write(
        out.join("key_changed"),
        (seen[0].1 != seen[1].1).to_string(),
    )
    .map_err(|e| e.to_string())
}

/// Follows the X.509-SVID stream: writes `ready` at the first SVID and
/// `ended` (with how) when the stream stops.
async fn follow(client: &spiffe::WorkloadApiClient, out: &Path) -> Result<(), String> {
    use futures_util::StreamExt as _;
    let mut stream = client
        .stream_x509_svids()
        .await
        .map_err(|e| format!("stream: {e}"))?;
    let mut n = 0;
    let how = loop {
        match stream.next().await {
            Some(Ok(_)) => {
                n += 1;
                if n == 1 {
                    std::fs::write(out.join("ready"), "").map_err(|e| e.to_string())?;
                }
            }
            Some(Err(e)) => break format!("error after {n} SVIDs: {e}"),
            None => break format!("closed after {n} SVIDs"),
        }
    };
    std::fs::write(out.join("ended"), how).map_err(|e| e.to_string())
}

/// The "creds" workload: lists TETHER_TEST_CRED_DIR into `listing` and
/// copies each file it can read into `files/NAME` (errors into
/// `errors/NAME`); then, if asked, rereads TETHER_TEST_CRED_REREAD for
/// TETHER_TEST_CRED_SECS seconds counting distinct contents (`distinct`;
/// with TETHER_TEST_CRED_LOG, each read's outcome into `timeline`: ms since
/// the first reread, then `ok CONTENT` or `err ERROR`),
/// waits to be killed (TETHER_TEST_CRED_HOLD, after writing `ready`), or
/// execs `/bin/sh -c TETHER_TEST_CRED_EXEC` in place of itself.
fn read_credentials(out: &Path) {
    let var = |k: &str| std::env::var(k).ok();
    let dir = PathBuf::from(var("TETHER_TEST_CRED_DIR").unwrap_or_default());
    let _ = std::fs::create_dir_all(out.join("files"));
    let _ = std::fs::create_dir_all(out.join("errors"));
    let mut names: Vec<String> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(e) => {
            let _ = std::fs::write(out.join("listing_error"), e.to_string());
            Vec::new()
        }
    };
    names.sort();
    let _ = std::fs::write(out.join("listing"), names.join("\n"));
    let mut tried = names.clone();
    if let Some(extra) = var("TETHER_TEST_CRED_TRY") {
        tried.extend(extra.split(',').map(str::to_string));
    }
    for n in tried {
        match std::fs::read(dir.join(&n)) {
            Ok(b) => {
                let _ = std::fs::write(out.join("files").join(&n), b);
            }
            Err(e) => {
                let _ = std::fs::write(out.join("errors").join(&n), e.to_string());
            }
        }
    }
    if let Some(f) = var("TETHER_TEST_CRED_REREAD") {
        let secs: u64 = var("TETHER_TEST_CRED_SECS")
            .and_then(|s| s.parse().ok())
            .unwrap_or(10);
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut seen: Vec<Vec<u8>> = Vec::new();
        let mut failures = 0;
        let started = Instant::now();
        let mut timeline = String::new();
        let log = var("TETHER_TEST_CRED_LOG").is_some();
        while Instant::now() < deadline {
            let r = std::fs::read(dir.join(&f));
            if log {
                let at = started.elapsed().as_millis();
                timeline += &match &r {
                    Ok(b) => format!("{at} ok {}\n", String::from_utf8_lossy(b).trim()),
                    Err(e) => format!("{at} err {e}\n"),
                };
                let _ = std::fs::write(out.join("timeline"), &timeline);
            }
            match r {
                Ok(b) if !seen.contains(&b) => seen.push(b),
                Ok(_) => {}
                Err(_) => failures += 1,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = std::fs::write(out.join("distinct"), format!("{} {failures}", seen.len()));
    }
    let _ = std::fs::write(out.join("pid"), std::process::id().to_string());
    if var("TETHER_TEST_CRED_HOLD").is_some() {
        let _ = std::fs::write(out.join("ready"), "");
        std::thread::sleep(Duration::from_secs(600));
    }
    if let Some(cmd) = var("TETHER_TEST_CRED_EXEC") {
        let e = Command::new("/bin/sh").args(["-c", &cmd]).exec();
        let _ = std::fs::write(out.join("exec_error"), e.to_string());
    }
}

/// The body of each test binary's `child_entry` test: runs the workload
/// side when this process was started as a workload child
/// (see [`workload_command`]), does nothing in a normal run.
pub fn child_entry_if_asked() {
    if let (Ok(mode), Ok(out)) = (
        std::env::var("TETHER_TEST_CHILD"),
        std::env::var("TETHER_TEST_OUT"),
    ) {
        child_main(&mode, Path::new(&out));
    }
}

/// The workload side, run inside the copied test binary. Modes:
/// "fetch": fetch X.509-SVID, bundle and a JWT-SVID, write them out, exit;
/// "hold": fetch, write, then wait to be killed;
/// "sleep": only wait to be killed;
/// "rotate": follow the SVID stream through one rotation;
/// "follow": follow the SVID stream until it ends.
pub fn child_main(mode: &str, out: &Path) {
    if mode == "creds" {
        return read_credentials(out);
    }
    if mode == "sleep" {
        // Just be a live process to attest.
        std::thread::sleep(Duration::from_secs(600));
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let res: Result<(), String> = rt.block_on(async {
        let ep = std::env::var("SPIFFE_ENDPOINT_SOCKET").map_err(|e| e.to_string())?;
        let client = spiffe::WorkloadApiClient::connect_to(&ep)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        if mode == "rotate" {
            return rotate(&client, out).await;
        }
        if mode == "follow" {
            return follow(&client, out).await;
        }
        let svid = client
            .fetch_x509_svid()
            .await
            .map_err(|e| format!("fetch_x509_svid: {e}"))?;
        std::fs::write(out.join("spiffe_id"), svid.spiffe_id().to_string())
            .map_err(|e| e.to_string())?;
        let chain = svid.cert_chain();
        let leaf = chain.first().ok_or("empty chain")?;
        std::fs::write(out.join("svid.pem"), pem("CERTIFICATE", leaf.as_bytes()))
            .map_err(|e| e.to_string())?;
        let inter: String = chain[1..]
            .iter()
            .map(|c| pem("CERTIFICATE", c.as_bytes()))
            .collect();
        std::fs::write(out.join("chain.pem"), inter).map_err(|e| e.to_string())?;
        std::fs::write(
            out.join("key.pem"),
            pem("PRIVATE KEY", svid.private_key().as_bytes()),
        )
        .map_err(|e| e.to_string())?;
        let bundles = client
            .fetch_x509_bundles()
            .await
            .map_err(|e| format!("fetch_x509_bundles: {e}"))?;
        let td = svid.spiffe_id().trust_domain().clone();
        let b = bundles.get(&td).ok_or("no bundle for own trust domain")?;
        let roots: String = b
            .authorities()
            .iter()
            .map(|c| pem("CERTIFICATE", c.as_bytes()))
            .collect();
        std::fs::write(out.join("bundle.pem"), roots).map_err(|e| e.to_string())?;
        let jwt = client
            .fetch_jwt_svid(["tether-test"], None)
            .await
            .map_err(|e| format!("fetch_jwt_svid: {e}"))?;
        std::fs::write(out.join("jwt"), jwt.token()).map_err(|e| e.to_string())?;
        let v = client
            .validate_jwt_token("tether-test", jwt.token())
            .await
            .map_err(|e| format!("validate: {e}"))?;
        std::fs::write(out.join("jwt_validated_sub"), v.spiffe_id().to_string())
            .map_err(|e| e.to_string())?;
        std::fs::write(out.join("pid"), std::process::id().to_string())
            .map_err(|e| e.to_string())?;
        if mode == "hold" {
            std::fs::write(out.join("ready"), "").map_err(|e| e.to_string())?;
            tokio::time::sleep(Duration::from_secs(600)).await;
        }
        Ok(())
    });
    if let Err(e) = res {
        let _ = std::fs::write(out.join("error"), &e);
    }
}
