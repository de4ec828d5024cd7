//! Real peers the credential tests exchange with: moto's AWS (peers/aws.py)
//! and the OAuth server (peers/oauth.mjs), and a `tether up` with OIDC
//! discovery they trust.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::*;

/// Where the peers' programs are (peers/: moto's harness, the OAuth server).
pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers")
}

/// A peer server, killed when dropped.
pub struct Peer(Child, &'static str);

impl Peer {
    pub fn start(what: &'static str, mut cmd: Command, ready: &Path, log: &Path) -> Peer {
        let logf = std::fs::File::create(log).expect("log");
        let child = no_loader_env(&mut cmd)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("log"))
            .stderr(logf)
            .spawn()
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let mut p = Peer(child, what);
        assert!(
            wait_until(Duration::from_secs(90), || ready.exists()
                || matches!(p.0.try_wait(), Ok(Some(_)))),
            "{what} did not start in 90 s:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        assert!(
            ready.exists(),
            "{what} exited:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        p.1 = what;
        p
    }

    pub fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `tether up` with OIDC discovery at https://127.0.0.1:PORT, certificates
/// from a test CA that the agent also trusts at token endpoints.
pub struct World {
    pub up: Up,
    pub ca: pki::OpensslCa,
    pub crt: PathBuf,
    pub key: PathBuf,
    pub issuer: String,
    _dir: tempfile::TempDir,
}

pub fn world() -> World {
    world_with(&[])
}

/// [`world`], with more `tether up` arguments (enforcement, say).
pub fn world_with(extra: &[&str]) -> World {
    let dir = open_tempdir();
    let ca = pki::OpensslCa::new(dir.path(), "web-ca", "/CN=web ca");
    let (crt, key) = ca.leaf("loopback", "IP:127.0.0.1");
    let port = free_port();
    let issuer = format!("https://127.0.0.1:{port}");
    let listen = format!("127.0.0.1:{port}");
    let ca_file = ca.cert();
    let mut args = vec![
        "--oidc-issuer",
        &issuer,
        "--oidc-listen",
        &listen,
        "--oidc-tls-cert",
        crt.to_str().expect("utf-8"),
        "--oidc-tls-key",
        key.to_str().expect("utf-8"),
    ];
    args.extend_from_slice(extra);
    let up = Up::start_with_env(
        &args,
        &[("SSL_CERT_FILE", ca_file.to_str().expect("utf-8"))],
    );
    World {
        up,
        ca,
        crt,
        key,
        issuer,
        _dir: dir,
    }
}

/// moto's AWS with request authentication on, trusting JWT-SVIDs of
/// `trusted_sub` from the world's issuer for its role (see peers/aws.py).
pub struct Aws {
    pub endpoint: String,
    port: u16,
    _peer: Peer,
}

impl Aws {
    pub fn start(w: &World, trusted_sub: &str) -> Aws {
        let port = free_port();
        let ready = w.up.dir.path().join("aws.ready");
        let mut cmd = Command::new(python());
        cmd.arg(dir().join("aws.py"))
            .arg(port.to_string())
            .arg(&w.issuer)
            .arg(w.ca.cert())
            .arg(trusted_sub)
            .arg(&ready);
        let peer = Peer::start("moto", cmd, &ready, &w.up.dir.path().join("aws.log"));
        Aws {
            endpoint: format!("http://127.0.0.1:{port}"),
            port,
            _peer: peer,
        }
    }

    /// What the harness accepted and refused (STS and S3 calls).
    pub fn counts(&self) -> serde_json::Value {
        let r = http_get(&format!("127.0.0.1:{}", self.port), "/_tether/counts");
        let body = r.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        serde_json::from_str(body).unwrap_or_else(|e| panic!("moto counts: {e}: {r}"))
    }
}
