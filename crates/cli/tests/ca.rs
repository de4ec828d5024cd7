//! CA tests against the real binary: two-step rotation (`tether ca rotate
//! prepare|activate`) as relying parties see it, and chaining to an
//! operator's upstream CA. Certificates are checked with the OpenSSL CLI, an
//! independent verifier.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;

/// Entry point for workload child processes (see common::workload_command); a no-op in a normal test run.
#[test]
fn child_entry() {
    if let (Ok(mode), Ok(out)) = (
        std::env::var("TETHER_TEST_CHILD"),
        std::env::var("TETHER_TEST_OUT"),
    ) {
        child_main(&mode, std::path::Path::new(&out));
    }
}

fn identity(name: &str, hash: &str) -> String {
    format!(
        "apiVersion: tether.dev/v1alpha1\nkind: WorkloadIdentity\nmetadata: {{name: {name}}}\nspec:\n  spiffeId: spiffe://example.org/{name}\n  selectors: [[\"process:sha256:{hash}\", \"unix:uid:0\"]]\n"
    )
}

/// A workload binary registered as spiffe://example.org/`name`.
fn registered_workload(up: &Up, name: &str) -> PathBuf {
    let exe = workload_binary(up.dir.path(), name);
    up.apply_ok(&identity(name, &sha256_file(&exe)));
    exe
}

/// Runs a NEW workload process (SVIDs are per process instance) and insists
/// that it got an SVID.
fn fetch(up: &Up, exe: &Path, out_name: &str, want_id: &str) -> ChildResult {
    let out = up.dir.path().join(out_name);
    let r = run_workload(exe, 0, &up.workload_socket(), &out, "fetch");
    assert!(
        r.output.status.success() && r.error().is_empty() && r.spiffe_id() == want_id,
        "workload {out_name} did not get {want_id}: {}\nlogs:\n{}",
        r.describe(),
        up.logs()
    );
    r
}

/// The bundle as `tether get bundle` prints it (SPIFFE bundle JSON).
fn bundle_json(up: &Up) -> serde_json::Value {
    let text = up.ok(&["get", "bundle"]);
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("`tether get bundle` is not JSON ({e}):\n{text}"))
}

fn keys_with_use<'a>(b: &'a serde_json::Value, use_: &str) -> Vec<&'a serde_json::Value> {
    b["keys"]
        .as_array()
        .map(|a| a.iter().filter(|k| k["use"] == use_).collect())
        .unwrap_or_default()
}

/// The X.509 authorities (DER) of a SPIFFE bundle JSON, from each key's x5c.
fn x509_roots(b: &serde_json::Value) -> Vec<Vec<u8>> {
    keys_with_use(b, "x509-svid")
        .into_iter()
        .map(|k| {
            let x5c = k["x5c"]
                .as_array()
                .filter(|a| a.len() == 1)
                .unwrap_or_else(|| panic!("x509-svid key without one x5c: {k}"));
            base64::engine::general_purpose::STANDARD
                .decode(
                    x5c[0]
                        .as_str()
                        .unwrap_or_else(|| panic!("x5c entry not a string: {k}")),
                )
                .unwrap_or_else(|e| panic!("x5c not base64 ({e}): {k}"))
        })
        .collect()
}

fn sequence(b: &serde_json::Value) -> u64 {
    b["spiffe_sequence"]
        .as_u64()
        .unwrap_or_else(|| panic!("bundle without spiffe_sequence: {b}"))
}

/// DER certificates in a PEM file's text.
fn pem_certs(text: &str) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        if line == "-----BEGIN CERTIFICATE-----" {
            cur = Some(String::new());
        } else if line == "-----END CERTIFICATE-----" {
            let b64 = cur.take().expect("END without BEGIN");
            out.push(
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .expect("PEM base64"),
            );
        } else if let Some(c) = cur.as_mut() {
            c.push_str(line);
        }
    }
    assert!(cur.is_none(), "unterminated PEM certificate in:\n{text}");
    out
}

fn write_pem_certs(path: &Path, ders: &[&Vec<u8>]) -> PathBuf {
    let text: String = ders.iter().map(|d| pem("CERTIFICATE", d)).collect();
    std::fs::write(path, text).expect("write PEM");
    path.to_path_buf()
}

fn openssl(args: &[&str]) -> std::process::Output {
    Command::new("openssl")
        .args(args)
        .output()
        .expect("run openssl")
}

fn openssl_ok(args: &[&str]) {
    let o = openssl(args);
    assert!(
        o.status.success(),
        "openssl {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `openssl verify -CAfile ca [-untrusted chain] leaf`: whether it said OK,
/// and everything it printed.
fn verify(ca: &Path, chain: Option<&Path>, leaf: &Path) -> (bool, String) {
    // A missing file would make a "does not verify" check pass vacuously.
    for f in [ca, leaf] {
        assert!(
            std::fs::metadata(f).map(|m| m.len() > 0).unwrap_or(false),
            "{} is missing or empty",
            f.display()
        );
    }
    let mut args = vec![
        "verify".to_string(),
        "-CAfile".into(),
        ca.display().to_string(),
    ];
    if let Some(c) = chain
        && std::fs::metadata(c).map(|m| m.len() > 0).unwrap_or(false)
    {
        args.extend(["-untrusted".into(), c.display().to_string()]);
    }
    args.push(leaf.display().to_string());
    let o = Command::new("openssl")
        .args(&args)
        .output()
        .expect("run openssl verify");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success() && text.contains(": OK"), text)
}

fn verify_child(ca: &Path, r: &ChildResult) -> (bool, String) {
    verify(ca, Some(&r.out.join("chain.pem")), &r.out.join("svid.pem"))
}

/// Checks that OpenSSL refuses the chain for the reason expected when the
/// CA file does not hold the issuer (not for some unrelated failure).
fn assert_untrusted(ca: &Path, chain: Option<&Path>, leaf: &Path, what: &str) {
    let (ok, text) = verify(ca, chain, leaf);
    assert!(!ok, "{what}: verifies, but should not: {text}");
    assert!(
        text.contains("unable to get local issuer certificate"),
        "{what}: refused for an unexpected reason: {text}"
    );
}

fn same_set(a: &[Vec<u8>], b: &[Vec<u8>]) -> bool {
    a.len() == b.len() && a.iter().all(|x| b.contains(x))
}

#[test]
fn ca_rotation_publishes_before_signing_and_old_svids_stay_valid() {
    let up = Up::start();
    let exe = registered_workload(&up, "alpha");
    let id = "spiffe://example.org/alpha";
    let d = up.dir.path();

    // Nothing prepared yet: activate must refuse, and change nothing.
    let b0 = bundle_json(&up);
    let o = up.tether(&["ca", "rotate", "activate"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "activate with nothing prepared succeeded: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(
        err.contains("no prepared CA") && err.contains("rotate prepare"),
        "unclear error for activate without prepare: {err}"
    );

    // SVID #1, signed by the only CA.
    let b0_again = bundle_json(&up);
    assert_eq!(b0, b0_again, "a refused activate changed the bundle");
    let roots0 = x509_roots(&b0);
    assert_eq!(
        roots0.len(),
        1,
        "a fresh server has one X.509 authority: {b0}"
    );
    let old_root = write_pem_certs(&d.join("old-root.pem"), &[&roots0[0]]);
    let s1 = fetch(&up, &exe, "svid1", id);
    assert_eq!(
        pem_certs(&s1.read("bundle.pem")),
        roots0,
        "Workload API bundle differs from `get bundle`"
    );
    assert!(
        pem_certs(&s1.read("chain.pem")).is_empty(),
        "a self-signed CA sends no intermediates"
    );
    let (ok, text) = verify_child(&old_root, &s1);
    assert!(ok, "SVID #1 does not verify against the root: {text}");

    // Prepare: the next CA is published (bundle has both roots, sequence up)...
    let out = up.ok(&["ca", "rotate", "prepare"]);
    assert!(
        out.contains("prepare done") && out.contains("2 X.509 authorities"),
        "prepare output: {out}"
    );
    let b1 = bundle_json(&up);
    let roots1 = x509_roots(&b1);
    assert_eq!(
        roots1.len(),
        2,
        "after prepare the bundle has two X.509 authorities: {b1}"
    );
    assert!(
        roots1.contains(&roots0[0]),
        "the old root left the bundle at prepare: {b1}"
    );
    assert!(
        sequence(&b1) > sequence(&b0),
        "sequence not bumped at prepare: {} -> {}",
        sequence(&b0),
        sequence(&b1)
    );
    assert_eq!(
        keys_with_use(&b1, "jwt-svid").len(),
        2,
        "prepare also publishes the next JWT key: {b1}"
    );
    let new_der = roots1
        .iter()
        .find(|r| **r != roots0[0])
        .expect("new root")
        .clone();
    let new_root = write_pem_certs(&d.join("new-root.pem"), &[&new_der]);
    let both = write_pem_certs(&d.join("both.pem"), &[&roots0[0], &new_der]);

    // A second prepare is refused and changes nothing.
    let o = up.tether(&["ca", "rotate", "prepare"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "a second prepare succeeded: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(
        err.contains("already") && err.contains("rotate activate"),
        "unclear error for a second prepare: {err}"
    );
    assert_eq!(bundle_json(&up), b1, "a refused prepare changed the bundle");

    // ...but does not sign yet. Every new process gets an SVID from the OLD
    // CA; once the agent has the new bundle, the Workload API hands out both
    // roots.
    let mut n = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    let s2 = loop {
        n += 1;
        let s = fetch(&up, &exe, &format!("svid2-{n}"), id);
        let (ok, text) = verify_child(&old_root, &s);
        assert!(
            ok,
            "SVID from a new process after prepare is not signed by the old CA: {text}"
        );
        assert_untrusted(
            &new_root,
            Some(&s.out.join("chain.pem")),
            &s.out.join("svid.pem"),
            "SVID after prepare (before activate) against the prepared root alone",
        );
        if same_set(&pem_certs(&s.read("bundle.pem")), &roots1) {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the Workload API bundle never got the prepared root; last bundle.pem:\n{}\nlogs:\n{}",
            s.read("bundle.pem"),
            up.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let (ok, text) = verify_child(&both, &s2);
    assert!(ok, "SVID #2 does not verify against its own bundle: {text}");

    // Activate: the prepared CA signs; the old root stays in the bundle.
    let out = up.ok(&["ca", "rotate", "activate"]);
    assert!(out.contains("activate done"), "activate output: {out}");
    let b2 = bundle_json(&up);
    assert!(
        same_set(&x509_roots(&b2), &roots1),
        "activate changed the published roots: {b1} -> {b2}"
    );
    assert!(
        sequence(&b2) >= sequence(&b1),
        "sequence went backwards: {} -> {}",
        sequence(&b1),
        sequence(&b2)
    );

    let s3 = fetch(&up, &exe, "svid3", id);
    assert!(
        pem_certs(&s3.read("chain.pem")).is_empty(),
        "a self-signed CA sends no intermediates"
    );
    let (ok, text) = verify_child(&new_root, &s3);
    assert!(
        ok,
        "SVID #3 (after activate) is not signed by the new CA: {text}"
    );
    assert_untrusted(
        &old_root,
        Some(&s3.out.join("chain.pem")),
        &s3.out.join("svid.pem"),
        "SVID #3 (after activate) against the old root alone",
    );
    let current = s3.out.join("bundle.pem");
    assert!(
        same_set(&pem_certs(&s3.read("bundle.pem")), &roots1),
        "Workload API bundle after activate: {}",
        s3.read("bundle.pem")
    );
    let (ok, text) = verify_child(&current, &s3);
    assert!(
        ok,
        "SVID #3 does not verify against the current bundle: {text}"
    );

    // Everything signed before the rotation keeps validating.
    let (ok, text) = verify_child(&current, &s1);
    assert!(
        ok,
        "SVID #1 (old CA) no longer verifies against the current bundle: {text}"
    );
    let (ok, text) = verify_child(&current, &s2);
    assert!(
        ok,
        "SVID #2 (old CA) no longer verifies against the current bundle: {text}"
    );

    // And with nothing prepared again, activate is refused again.
    let o = up.tether(&["ca", "rotate", "activate"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("no prepared CA"),
        "second activate: {} {err}",
        o.status
    );
    assert_eq!(
        bundle_json(&up),
        b2,
        "a refused activate changed the bundle"
    );
}

/// An operator root CA (EC P-256), key in SEC1 ("EC PRIVATE KEY") and PKCS#8.
struct OperatorCa {
    cert: PathBuf,
    sec1_key: PathBuf,
    pkcs8_key: PathBuf,
}

fn operator_ca(dir: &Path, name: &str, ca: bool) -> OperatorCa {
    let key = dir.join(format!("{name}.key"));
    let p8 = dir.join(format!("{name}.p8.key"));
    let cert = dir.join(format!("{name}.pem"));
    let s = |p: &Path| p.display().to_string();
    openssl_ok(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        &s(&key),
    ]);
    openssl_ok(&[
        "pkcs8",
        "-topk8",
        "-nocrypt",
        "-in",
        &s(&key),
        "-out",
        &s(&p8),
    ]);
    let bc = if ca {
        "basicConstraints=critical,CA:TRUE"
    } else {
        "basicConstraints=critical,CA:FALSE"
    };
    let ku = if ca {
        "keyUsage=critical,keyCertSign,cRLSign"
    } else {
        "keyUsage=critical,digitalSignature"
    };
    let subj = format!("/CN=Operator {name}");
    openssl_ok(&[
        "req",
        "-x509",
        "-new",
        "-key",
        &s(&key),
        "-sha256",
        "-days",
        "30",
        "-subj",
        &subj,
        "-addext",
        bc,
        "-addext",
        ku,
        "-out",
        &s(&cert),
    ]);
    assert!(
        std::fs::read_to_string(&key)
            .unwrap_or_default()
            .contains("BEGIN EC PRIVATE KEY"),
        "ecparam did not write SEC1"
    );
    assert!(
        std::fs::read_to_string(&p8)
            .unwrap_or_default()
            .contains("BEGIN PRIVATE KEY"),
        "pkcs8 did not write PKCS#8"
    );
    OperatorCa {
        cert,
        sec1_key: key,
        pkcs8_key: p8,
    }
}

/// Runs `tether up` directly, expecting it to fail at startup; returns its
/// exit status and stderr.
fn up_expecting_failure(dir: &Path, extra: &[&str]) -> (std::process::ExitStatus, String) {
    let run = tempfile::Builder::new()
        .prefix("up-")
        .tempdir_in(dir)
        .expect("tempdir");
    let err_path = run.path().join("stderr");
    let mut child = Command::new(TETHER)
        .args([
            "up",
            "--bpf-pin-dir",
            "none",
            "--log-format",
            "json",
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(run.path().join("data"))
        .arg("--run-dir")
        .arg(run.path().join("run"))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("spawn tether up");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "tether up {extra:?} was expected to fail but still runs after 30s:\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (
        status,
        std::fs::read_to_string(&err_path).unwrap_or_default(),
    )
}

#[test]
fn upstream_ca_chain_verifies_against_operator_root() {
    let keys = open_tempdir();
    let root = operator_ca(keys.path(), "root", true);
    let root_der = pem_certs(&std::fs::read_to_string(&root.cert).expect("root.pem"));
    assert_eq!(root_der.len(), 1);
    let id = "spiffe://example.org/alpha";

    for (variant, key) in [("SEC1", &root.sec1_key), ("PKCS#8", &root.pkcs8_key)] {
        let up = Up::start_with(&[
            "--upstream-ca-cert",
            root.cert.to_str().unwrap(),
            "--upstream-ca-key",
            key.to_str().unwrap(),
        ]);
        let exe = registered_workload(&up, "alpha");
        let b = bundle_json(&up);
        assert_eq!(
            x509_roots(&b),
            root_der,
            "[{variant}] `get bundle` should hold exactly the operator root: {b}"
        );

        let s = fetch(&up, &exe, "svid1", id);
        let chain = pem_certs(&s.read("chain.pem"));
        assert_eq!(
            chain.len(),
            1,
            "[{variant}] expected one intermediate in chain.pem:\n{}",
            s.read("chain.pem")
        );
        assert_eq!(
            pem_certs(&s.read("bundle.pem")),
            root_der,
            "[{variant}] Workload API bundle is not the operator root"
        );
        let (ok, text) = verify_child(&root.cert, &s);
        assert!(
            ok,
            "[{variant}] SVID does not chain to the operator root: {text}"
        );
        // The intermediate is a CA issued by the operator root, and the leaf
        // is not trusted without it.
        openssl_ok(&[
            "verify",
            "-CAfile",
            root.cert.to_str().unwrap(),
            s.out.join("chain.pem").to_str().unwrap(),
        ]);
        assert_untrusted(
            &root.cert,
            None,
            &s.out.join("svid.pem"),
            &format!("[{variant}] leaf against the root without its intermediate"),
        );

        if variant == "PKCS#8" {
            // Rotation under an upstream CA: a new intermediate, same root;
            // the bundle (just the root) does not change.
            let snapshots = || up.logs().matches("registry updated").count();
            let before = snapshots();
            up.ok(&["ca", "rotate", "prepare"]);
            // The prepared JWT key must reach the agent's bundle before
            // activation, as it would between the two steps in practice;
            // otherwise a token signed right after activation cannot be
            // validated yet.
            assert!(
                wait_until(Duration::from_secs(10), || snapshots() > before),
                "the agent never received the prepared bundle"
            );
            assert_eq!(
                x509_roots(&bundle_json(&up)),
                root_der,
                "prepare under an upstream CA changed the roots"
            );
            up.ok(&["ca", "rotate", "activate"]);
            let s2 = fetch(&up, &exe, "svid2", id);
            let chain2 = pem_certs(&s2.read("chain.pem"));
            assert_eq!(
                chain2.len(),
                1,
                "one intermediate after rotation:\n{}",
                s2.read("chain.pem")
            );
            assert_ne!(
                chain2, chain,
                "the new intermediate did not take over signing after activate"
            );
            let (ok, text) = verify_child(&root.cert, &s2);
            assert!(
                ok,
                "SVID after rotation does not chain to the operator root: {text}"
            );
            let (ok, text) = verify_child(&root.cert, &s);
            assert!(
                ok,
                "SVID from the previous intermediate no longer verifies: {text}"
            );
        }
    }

    // A key that does not belong to the certificate: startup fails, saying why.
    let other = operator_ca(keys.path(), "other", true);
    for key in [&other.sec1_key, &other.pkcs8_key] {
        let (status, err) = up_expecting_failure(
            keys.path(),
            &[
                "--upstream-ca-cert",
                root.cert.to_str().unwrap(),
                "--upstream-ca-key",
                key.to_str().unwrap(),
            ],
        );
        assert!(!status.success(), "mismatched upstream key accepted");
        assert!(
            err.contains("upstream CA") && err.contains("does not match"),
            "unclear error for a mismatched upstream key:\n{err}"
        );
    }

    // A certificate that is not a CA is refused too.
    let leaf = operator_ca(keys.path(), "leaf", false);
    let (status, err) = up_expecting_failure(
        keys.path(),
        &[
            "--upstream-ca-cert",
            leaf.cert.to_str().unwrap(),
            "--upstream-ca-key",
            leaf.pkcs8_key.to_str().unwrap(),
        ],
    );
    assert!(!status.success(), "non-CA upstream certificate accepted");
    assert!(
        err.contains("upstream CA") && err.contains("not a CA"),
        "unclear error for a non-CA upstream certificate:\n{err}"
    );
}
