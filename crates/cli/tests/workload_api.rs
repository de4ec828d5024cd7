//! The SPIFFE Workload API served by a running agent, exercised by clients
//! this project did not write (the Rust `spiffe` crate, Python `spiffe`),
//! and the certificates it hands out checked with OpenSSL.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// Kept in the binary so a test can flip one byte of a copy of it.
static MUTATION_MARKER: &str = "tether-mutation-marker:0123456789abcdef";

/// Entry point for workload child processes (see
/// `common::workload_command`); a no-op in a normal test run.
#[test]
fn child_entry() {
    std::hint::black_box(MUTATION_MARKER);
    child_entry_if_asked();
}

fn identity(name: &str, selectors: &[&str]) -> String {
    let sel: Vec<String> = selectors.iter().map(|s| format!("{s:?}")).collect();
    format!(
        "apiVersion: tether.dev/v1alpha1\nkind: WorkloadIdentity\nmetadata: {{name: {name}}}\nspec:\n  spiffeId: spiffe://example.org/{name}\n  selectors: [[{}]]\n",
        sel.join(", ")
    )
}

fn openssl(args: &[&str]) -> std::process::Output {
    Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl")
}

fn verify(dir: &Path, ca: &str) -> std::process::Output {
    let chain = dir.join("chain.pem");
    let mut args = vec!["verify".to_string(), "-CAfile".into(), ca.to_string()];
    if std::fs::metadata(&chain)
        .map(|m| m.len() > 0)
        .unwrap_or(false)
    {
        args.push("-untrusted".into());
        args.push(chain.display().to_string());
    }
    args.push(dir.join("svid.pem").display().to_string());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    openssl(&a)
}

/// A handshake between `openssl s_server -Verify` holding the server's SVID
/// and `openssl s_client` holding the client's; returns (ok, transcript).
fn openssl_mtls(server: &Path, client_cert: &Path, client_key: &Path, ca: &Path) -> (bool, String) {
    let port = free_port().to_string();
    let s = |p: &Path| p.display().to_string();
    let mut srv = Command::new("openssl")
        .args([
            "s_server",
            "-accept",
            &format!("127.0.0.1:{port}"),
            "-tls1_3",
            "-naccept",
            "1",
            "-Verify",
            "1",
        ])
        .args([
            "-verify_return_error",
            "-cert",
            &s(&server.join("svid.pem")),
            "-key",
            &s(&server.join("key.pem")),
        ])
        .args(["-CAfile", &s(&server.join("bundle.pem"))])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("s_server");
    // s_server prints nothing machine-readable when it listens.
    let listening = wait_until(Duration::from_secs(10), || {
        tether_test_support::listening(port.parse().expect("port"))
    });
    assert!(listening, "openssl s_server did not listen on {port}");
    let mut cli = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-tls1_3",
            "-verify_return_error",
            "-verify",
            "1",
        ])
        .args([
            "-cert",
            &s(client_cert),
            "-key",
            &s(client_key),
            "-CAfile",
            &s(ca),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("s_client");
    {
        use std::io::Write as _;
        let mut stdin = cli.stdin.take().expect("stdin");
        let _ = stdin.write_all(b"ping-from-client\n");
        std::thread::sleep(Duration::from_millis(500));
    }
    let c = cli.wait_with_output().expect("s_client output");
    let _ = srv.kill();
    let s_out = srv.wait_with_output().expect("s_server output");
    let transcript = format!(
        "client stdout:\n{}\nclient stderr:\n{}\nserver stdout:\n{}\nserver stderr:\n{}",
        String::from_utf8_lossy(&c.stdout),
        String::from_utf8_lossy(&c.stderr),
        String::from_utf8_lossy(&s_out.stdout),
        String::from_utf8_lossy(&s_out.stderr)
    );
    let server_got_data = String::from_utf8_lossy(&s_out.stdout).contains("ping-from-client");
    let client_verified = String::from_utf8_lossy(&c.stdout).contains("Verify return code: 0 (ok)");
    (server_got_data && client_verified, transcript)
}

#[test]
fn two_users_get_their_identities_rust_client_and_openssl_accept_them() {
    let up = Up::start();
    let exe = workload_binary(up.dir.path(), "workload");
    let h = sha256_file(&exe);
    up.apply_ok(
        &(identity("alpha", &[&format!("process:sha256:{h}"), "unix:uid:0"])
            + "---\n"
            + &identity("beta", &[&format!("process:sha256:{h}"), "unix:uid:1001"])),
    );

    // Same binary, two users, two identities: X.509-SVID, bundle and a
    // JWT-SVID (validated by the agent) through the Rust `spiffe` crate.
    let a = run_workload(
        &exe,
        0,
        &up.workload_socket(),
        &up.dir.path().join("a"),
        "fetch",
    );
    assert_eq!(
        a.spiffe_id(),
        "spiffe://example.org/alpha",
        "{}",
        a.describe()
    );
    assert_eq!(a.read("jwt_validated_sub"), "spiffe://example.org/alpha");
    let b = run_workload(
        &exe,
        1001,
        &up.workload_socket(),
        &up.dir.path().join("b"),
        "fetch",
    );
    assert_eq!(
        b.spiffe_id(),
        "spiffe://example.org/beta",
        "{}",
        b.describe()
    );
    assert!(!b.read("jwt").is_empty());

    // OpenSSL accepts each SVID chain against the trust bundle.
    for r in [&a, &b] {
        let bundle = r.out.join("bundle.pem").display().to_string();
        let v = verify(&r.out, &bundle);
        assert!(
            v.status.success(),
            "openssl verify: {}",
            String::from_utf8_lossy(&v.stderr)
        );
        // The leaf carries exactly the SPIFFE ID as URI SAN.
        let t = openssl(&[
            "x509",
            "-in",
            &r.out.join("svid.pem").display().to_string(),
            "-noout",
            "-ext",
            "subjectAltName,keyUsage,basicConstraints",
        ]);
        let text = String::from_utf8_lossy(&t.stdout);
        assert!(text.contains(&format!("URI:{}", r.spiffe_id())), "{text}");
        assert!(
            text.contains("CA:FALSE") && text.contains("Digital Signature"),
            "{text}"
        );
    }

    // Mutual TLS between the two workloads' SVIDs with OpenSSL.
    let (ok, t) = openssl_mtls(
        &a.out,
        &b.out.join("svid.pem"),
        &b.out.join("key.pem"),
        &b.out.join("bundle.pem"),
    );
    assert!(ok, "mTLS with two SVIDs failed:\n{t}");

    // A certificate from another trust domain is refused by the same server.
    let other = up.dir.path().join("other");
    std::fs::create_dir_all(&other).expect("mkdir");
    let p = |n: &str| other.join(n).display().to_string();
    for args in [
        vec![
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            &p("ca.key"),
        ],
        vec![
            "req",
            "-x509",
            "-new",
            "-key",
            &p("ca.key"),
            "-subj",
            "/CN=other",
            "-days",
            "1",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
            "-addext",
            "subjectAltName=URI:spiffe://other.org",
            "-out",
            &p("ca.pem"),
        ],
        vec![
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            &p("key.pem"),
        ],
        vec![
            "req",
            "-new",
            "-key",
            &p("key.pem"),
            "-subj",
            "/O=evil",
            "-out",
            &p("req.csr"),
        ],
    ] {
        let o = openssl(&args);
        assert!(
            o.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    // Leaf certificates for `uri`, signed by the other trust domain's CA.
    let sign_other = |uri: &str, out: &str| {
        let ext = p(&format!("{out}.cnf"));
        std::fs::write(&ext, format!("subjectAltName=URI:{uri}\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth,serverAuth\nbasicConstraints=critical,CA:FALSE\n")).expect("ext");
        let o = openssl(&[
            "x509",
            "-req",
            "-in",
            &p("req.csr"),
            "-CA",
            &p("ca.pem"),
            "-CAkey",
            &p("ca.key"),
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &ext,
            "-out",
            &p(out),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    sign_other("spiffe://other.org/alpha", "svid.pem");
    let (ok, t) = openssl_mtls(
        &a.out,
        &other.join("svid.pem"),
        &other.join("key.pem"),
        &b.out.join("bundle.pem"),
    );
    assert!(
        !ok,
        "a client certificate from another trust domain was accepted:\n{t}"
    );

    // Tether's own verifier (the one its mesh uses on every peer) draws the
    // same line: it accepts b's SVID against the bundle the Workload API
    // served, refuses the other trust domain's, and refuses a certificate
    // that claims this trust domain but chains to the other CA.
    sign_other("spiffe://example.org/alpha", "forged.pem");
    let der = |pem: &Path| -> Vec<u8> {
        let o = openssl(&["x509", "-in", &pem.display().to_string(), "-outform", "DER"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        o.stdout
    };
    let mut bundle =
        tether_spiffe::Bundle::new(tether_spiffe::TrustDomain::new("example.org").expect("td"));
    bundle.x509_authorities.push(der(&b.out.join("bundle.pem")));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_secs() as i64;
    let verify = |leaf: &Path| {
        let mut chain = vec![der(leaf)];
        let extra = leaf.with_file_name("chain.pem");
        if std::fs::metadata(&extra).is_ok_and(|m| m.len() > 0) {
            chain.push(der(&extra));
        }
        tether_spiffe::x509::verify_x509_svid(&chain, &bundle, now)
    };
    let id = verify(&b.out.join("svid.pem")).expect("b's SVID verifies");
    assert_eq!(
        id.to_string(),
        b.spiffe_id().to_string(),
        "b's SVID names b"
    );
    let err = verify(&other.join("svid.pem")).expect_err("another trust domain");
    assert!(
        matches!(
            err,
            tether_spiffe::x509::SvidError::TrustDomainMismatch { .. }
        ),
        "{err}"
    );
    let err = verify(&other.join("forged.pem")).expect_err("forged issuer");
    assert!(
        !matches!(
            err,
            tether_spiffe::x509::SvidError::TrustDomainMismatch { .. }
        ),
        "refused by the chain, not the name: {err}"
    );
}

#[test]
fn copy_with_one_byte_changed_is_denied() {
    let up = Up::start();
    let exe = workload_binary(up.dir.path(), "workload");
    let h = sha256_file(&exe);
    up.apply_ok(&identity(
        "alpha",
        &[&format!("process:sha256:{h}"), "unix:uid:0"],
    ));
    let ok = run_workload(
        &exe,
        0,
        &up.workload_socket(),
        &up.dir.path().join("ok"),
        "fetch",
    );
    assert_eq!(
        ok.spiffe_id(),
        "spiffe://example.org/alpha",
        "{}",
        ok.describe()
    );

    // Flip one byte inside the marker string: same program, other hash.
    let mut bytes = std::fs::read(&exe).expect("read copy");
    let at = bytes
        .windows(MUTATION_MARKER.len())
        .position(|w| w == MUTATION_MARKER.as_bytes())
        .expect("marker in binary");
    bytes[at + MUTATION_MARKER.len() - 1] ^= 0x01;
    let evil = exe.with_file_name("workload-evil");
    std::fs::write(&evil, &bytes).expect("write");
    std::fs::set_permissions(&evil, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    assert_ne!(sha256_file(&evil), h);
    let r = run_workload(
        &evil,
        0,
        &up.workload_socket(),
        &up.dir.path().join("evil"),
        "fetch",
    );
    assert!(
        r.spiffe_id().is_empty(),
        "modified binary got an identity: {}",
        r.describe()
    );
    let err = r.error();
    assert!(
        err.contains("PermissionDenied")
            || err.contains("permission")
            || err.contains("no identity"),
        "{}",
        r.describe()
    );

    // And whoami explains why.
    let mut child = workload_command(
        &evil,
        0,
        &up.workload_socket(),
        &up.dir.path().join("evil2"),
        "sleep",
    )
    .spawn()
    .expect("spawn");
    let evil_path = std::fs::canonicalize(&evil).expect("evil path");
    let execd = wait_until(Duration::from_secs(10), || {
        std::fs::read_link(format!("/proc/{}/exe", child.id())).is_ok_and(|l| l == evil_path)
    });
    assert!(execd, "the workload did not exec");
    let pid = child.id().to_string();
    let text = up.ok(&["whoami", "--pid", &pid]);
    let _ = child.kill();
    let _ = child.wait();
    assert!(text.contains("no identity matches this process"), "{text}");
    assert!(text.contains("fails on: process:sha256:"), "{text}");
}

#[test]
fn exited_process_loses_key_and_svid_within_one_second() {
    let up = Up::start();
    let exe = workload_binary(up.dir.path(), "workload");
    up.apply_ok(&identity(
        "alpha",
        &[
            &format!("process:sha256:{}", sha256_file(&exe)),
            "unix:uid:0",
        ],
    ));
    let out = up.dir.path().join("hold");
    let mut child = workload_command(&exe, 0, &up.workload_socket(), &out, "hold")
        .spawn()
        .expect("spawn");
    assert!(wait_until(Duration::from_secs(30), || out
        .join("ready")
        .exists()
        || out.join("error").exists()));
    assert!(
        !out.join("error").exists(),
        "{}",
        std::fs::read_to_string(out.join("error")).unwrap_or_default()
    );
    let pid = child.id();
    let listed = |up: &Up| up.ok(&["svids"]).contains(&format!("\"pid\": {pid},"));
    assert!(listed(&up), "live process not listed by `tether svids`");
    assert!(up.metric("tether_agent_process_svids") >= 1.0);
    let destroyed_before = up.metric("tether_agent_svids_destroyed_total");

    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let t0 = std::time::Instant::now();
    let _ = child.wait();
    assert!(
        wait_until(Duration::from_millis(1000), || !listed(&up)),
        "SVID still listed {:?} after the process exited",
        t0.elapsed()
    );
    assert!(up.metric("tether_agent_svids_destroyed_total") > destroyed_before);
}

#[test]
fn python_spiffe_client_fetches_svids_and_bundles() {
    let python = Command::new("python3")
        .args([
            "-c",
            "import os,sys;print(os.path.realpath(sys.executable))",
        ])
        .output()
        .expect("python3");
    let python = String::from_utf8_lossy(&python.stdout).trim().to_string();
    let up = Up::start();
    up.apply_ok(&identity(
        "python",
        &[&format!("process:path:{python}"), "unix:uid:0"],
    ));
    let script = r#"
import sys
from spiffe import WorkloadApiClient
c = WorkloadApiClient()
s = c.fetch_x509_svid()
print("x509", s.spiffe_id)
print("chain", len(s.cert_chain))
b = c.fetch_x509_bundles()
print("bundle", ",".join(str(x.trust_domain) for x in b.bundles))
j = c.fetch_jwt_svid(audience={"db"})
print("jwt", j.spiffe_id)
v = c.validate_jwt_svid(j.token, "db")
print("validated", v.spiffe_id)
try:
    c.validate_jwt_svid(j.token, "other-audience")
    print("wrong audience ACCEPTED")
except Exception as e:
    print("wrong audience rejected")
"#;
    let o = no_loader_env(&mut Command::new(&python))
        .args(["-c", script])
        .env(
            "SPIFFE_ENDPOINT_SOCKET",
            format!("unix://{}", up.workload_socket().display()),
        )
        .output()
        .expect("python");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "python client failed: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        text
    );
    assert!(text.contains("x509 spiffe://example.org/python"), "{text}");
    assert!(text.contains("bundle example.org"), "{text}");
    assert!(text.contains("jwt spiffe://example.org/python"), "{text}");
    assert!(
        text.contains("validated spiffe://example.org/python"),
        "{text}"
    );
    assert!(text.contains("wrong audience rejected"), "{text}");
}

#[tokio::test]
async fn workload_api_requires_metadata_and_an_identity() {
    use tether_proto::workload::X509svidRequest;
    use tether_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
    let up = Up::start();
    let mut client =
        SpiffeWorkloadApiClient::new(tether_proto::uds::channel(&up.workload_socket()));
    // No `workload.spiffe.io: true` metadata: InvalidArgument.
    let Err(err) = client.fetch_x509svid(X509svidRequest {}).await else {
        panic!("call without metadata succeeded")
    };
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("workload.spiffe.io"), "{err:?}");
    // With it, but this test process matches no identity: PermissionDenied.
    let mut req = tonic::Request::new(X509svidRequest {});
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().expect("ascii"));
    let err = match client.fetch_x509svid(req).await {
        Ok(mut s) => s
            .get_mut()
            .message()
            .await
            .expect_err("caller without identity got an SVID"),
        Err(e) => e,
    };
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(up.metrics_text().contains("code=\"invalidargument\""));
}

#[test]
fn svids_rotate_at_half_life_and_the_stream_pushes_them() {
    let up = Up::start();
    let exe = workload_binary(up.dir.path(), "rotating");
    // 10 s TTL rotates at 5 s.
    up.apply_ok(
        &(identity(
            "self",
            &[&format!("process:path:{}", exe.display()), "unix:uid:0"],
        )
        .replace("selectors:", "x509Ttl: 10s\n  selectors:")),
    );
    let r = run_workload(
        &exe,
        0,
        &up.workload_socket(),
        &up.dir.path().join("o"),
        "rotate",
    );
    assert_eq!(
        r.spiffe_id(),
        "spiffe://example.org/self",
        "{}",
        r.describe()
    );
    assert_eq!(
        r.read("key_changed"),
        "true",
        "rotation must also replace the key: {}",
        r.describe()
    );
    assert!(up.metric("tether_agent_svids_rotated_total") >= 1.0);
}

#[test]
fn identity_without_workload_api_delivery_is_held_but_not_handed_out() {
    let up = Up::start();
    let exe = workload_binary(up.dir.path(), "workload");
    up.apply_ok(
        &(identity(
            "sealed",
            &[
                &format!("process:sha256:{}", sha256_file(&exe)),
                "unix:uid:0",
            ],
        ) + "  workloadApi: false\n"),
    );
    let r = run_workload(
        &exe,
        0,
        &up.workload_socket(),
        &up.dir.path().join("o"),
        "fetch",
    );
    assert!(
        r.spiffe_id().is_empty(),
        "key handed out despite workloadApi: false: {}",
        r.describe()
    );
    assert!(
        r.error().contains("PermissionDenied") || r.error().contains("no identity"),
        "{}",
        r.describe()
    );
    // The agent still holds an SVID for it (for the in-agent mesh later).
    let out = up.dir.path().join("s");
    let mut child = workload_command(&exe, 0, &up.workload_socket(), &out, "sleep")
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let held = wait_until(Duration::from_secs(10), || {
        up.ok(&["svids"]).contains(&format!("\"pid\": {pid},"))
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(held, "agent did not hold the sealed identity's SVID");
}
