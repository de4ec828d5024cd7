//! Hostile and broken input is refused with a clear error, and the server
//! and agent keep serving afterwards.

mod common;

use std::process::{Command, Stdio};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine as _;
use common::*;
use tether_proto::tether::node_client::NodeClient;
use tether_proto::tether::{
    ApplyRequest, AttestRequest, CreateJoinTokenRequest, SignX509SvidsRequest, SvidCsr,
};
use tether_spiffe::{SpiffeId, TrustDomain};

#[test]
fn child_entry() {
    child_entry_if_asked();
}

const IDENTITY: &str = "apiVersion: tether.dev/v1alpha1
kind: WorkloadIdentity
metadata: {name: web}
spec:
  spiffeId: spiffe://example.org/web
  selectors: [[\"unix:uid:4242\"]]
";

const CLIENT_SOURCES: &str = "apiVersion: tether.dev/v1alpha1
kind: CredentialSource
metadata: {name: idp}
spec:
  oauth2: {tokenEndpoint: 'https://idp.example/token', grant: clientCredentials, clientId: web-client}
---
apiVersion: tether.dev/v1alpha1
kind: CredentialSource
metadata: {name: idp-unbound}
spec:
  oauth2: {tokenEndpoint: 'https://idp.example/token', grant: clientCredentials, clientId: other-client}
---
apiVersion: tether.dev/v1alpha1
kind: CredentialSource
metadata: {name: pw}
spec:
  static: {value: hunter2}
---
apiVersion: tether.dev/v1alpha1
kind: CredentialBinding
metadata: {name: web-idp}
spec: {identity: web, source: idp, file: {name: idp-token}}
---
apiVersion: tether.dev/v1alpha1
kind: CredentialBinding
metadata: {name: web-pw}
spec: {identity: web, source: pw, file: {name: pw}}
";

/// Runs a standalone `tether agent` against `up` and returns (exited?,
/// success?, stderr) after it either exits or reports started.
fn run_agent(up: &Up, name: &str, token: &str) -> (bool, bool, String) {
    let d = up.dir.path().join(format!("agent-{name}"));
    std::fs::create_dir_all(&d).expect("mkdir");
    let bundle = d.join("bundle.json");
    std::fs::write(&bundle, up.ok(&["get", "bundle"])).expect("bundle");
    let log = d.join("log");
    let mut c = Command::new(TETHER)
        .args([
            "agent",
            "--bpf-pin-dir",
            "none",
            // Never the host's default mount point.
            "--credentials-dir",
            "none",
            "--server",
            &up.node_api,
            "--node-name",
            name,
            "--join-token",
            token,
            "--metrics",
            "off",
        ])
        .arg("--trust-bundle")
        .arg(&bundle)
        .arg("--data-dir")
        .arg(d.join("data"))
        .arg("--workload-socket")
        .arg(d.join("w.sock"))
        .arg("--admin-socket")
        .arg(d.join("a.sock"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn agent");
    let mut exited = None;
    wait_until(Duration::from_secs(20), || {
        if let Ok(Some(st)) = c.try_wait() {
            exited = Some(st.success());
            return true;
        }
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("agent started")
    });
    if exited.is_none() {
        let _ = c.kill();
        let _ = c.wait();
    }
    (
        exited.is_some(),
        exited.unwrap_or(true),
        std::fs::read_to_string(&log).unwrap_or_default(),
    )
}

#[test]
fn join_tokens_are_single_use_expire_and_bind_to_a_name() {
    let up = Up::start();
    let token = up
        .ok(&["token", "create", "--ttl", "10m"])
        .trim()
        .to_string();
    let (exited, _, log) = run_agent(&up, "node-b", &token);
    assert!(!exited, "first use of a fresh token must attest:\n{log}");
    assert!(log.contains("node attested"), "{log}");

    // Replay, by another would-be node.
    let (exited, ok, log) = run_agent(&up, "node-c", &token);
    assert!(exited && !ok, "replayed join token accepted:\n{log}");
    assert!(log.contains("join token already used"), "{log}");

    // Expired.
    let short = up
        .ok(&["token", "create", "--ttl", "1s"])
        .trim()
        .to_string();
    std::thread::sleep(Duration::from_millis(2100));
    let (exited, ok, log) = run_agent(&up, "node-d", &short);
    assert!(exited && !ok, "expired join token accepted:\n{log}");
    assert!(log.contains("join token expired"), "{log}");

    // Bound to a name; and an unknown token.
    let bound = up
        .ok(&["token", "create", "--node", "node-e"])
        .trim()
        .to_string();
    let (exited, ok, log) = run_agent(&up, "node-f", &bound);
    assert!(
        exited && !ok && log.contains("bound to another node name"),
        "{log}"
    );
    let (exited, ok, log) = run_agent(&up, "node-g", "0123456789abcdef");
    assert!(exited && !ok && log.contains("unknown join token"), "{log}");

    // The server kept serving throughout.
    let nodes = up.ok(&["get", "nodes"]);
    assert!(
        nodes.contains("\"node-b\"") && !nodes.contains("node-c"),
        "{nodes}"
    );
    up.apply_ok(IDENTITY);
}

#[test]
fn node_svid_is_renewed_and_the_agent_keeps_working() {
    let up = Up::start_with(&["--node-svid-ttl", "12s"]);
    let serial = |up: &Up| {
        let v: serde_json::Value = serde_json::from_str(&up.ok(&["get", "nodes"])).expect("json");
        v[0]["svidSerial"].as_str().unwrap_or_default().to_string()
    };
    let first = serial(&up);
    assert!(
        wait_until(Duration::from_secs(20), || up
            .logs()
            .contains("node SVID renewed")),
        "no renewal:\n{}",
        up.logs()
    );
    assert_ne!(
        serial(&up),
        first,
        "node SVID serial unchanged after renewal"
    );
    // The renewed identity is used for the next calls.
    let exe = workload_binary(up.dir.path(), "w");
    up.apply_ok(&format!(
        "apiVersion: tether.dev/v1alpha1\nkind: WorkloadIdentity\nmetadata: {{name: w}}\nspec:\n  spiffeId: spiffe://example.org/w\n  selectors: [[\"process:sha256:{}\"]]\n",
        sha256_file(&exe)
    ));
    let r = run_workload(
        &exe,
        0,
        &up.workload_socket(),
        &up.dir.path().join("out"),
        "fetch",
    );
    assert_eq!(r.spiffe_id(), "spiffe://example.org/w", "{}", r.describe());
}

#[tokio::test]
async fn node_api_refuses_bad_csrs_and_entitlement_overreach() {
    let dir = open_tempdir();
    let td = TrustDomain::new("example.org").expect("td");
    let (server, admin) = in_process_server(dir.path(), "data").await;
    let addr = server.node_addr.to_string();
    admin
        .clone()
        .apply(ApplyRequest {
            source: "t.yaml".into(),
            manifest: IDENTITY.as_bytes().to_vec(),
        })
        .await
        .expect("apply");
    let token = admin
        .clone()
        .create_join_token(CreateJoinTokenRequest {
            ttl_secs: 60,
            node_name: String::new(),
        })
        .await
        .expect("token")
        .into_inner()
        .token;
    let bundle = Arc::new(RwLock::new(server.state.current_bundle()));

    // Attestation with a malformed CSR is refused and does not burn the token.
    let anon = NodeClient::new(
        tether_agent::server_channel(
            &tether_agent::Servers::parse(&addr).expect("addr"),
            &td,
            &bundle,
            None,
        )
        .expect("channel"),
    );
    let err = anon
        .clone()
        .attest(AttestRequest {
            join_token: token.clone(),
            csr: b"not a csr".to_vec(),
            node_name: "n1".into(),
            addresses: vec![],
            ..Default::default()
        })
        .await
        .expect_err("malformed CSR accepted");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("CSR"), "{err:?}");
    // Without a node SVID, workload signing is refused.
    let err = anon
        .clone()
        .sign_x509_svids(SignX509SvidsRequest { csrs: vec![] })
        .await
        .expect_err("unauthenticated call accepted");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");

    let data = dir.path().join("agent");
    let conn = tether_agent::NodeConn::establish(
        &tether_agent::Servers::parse(&addr).expect("addr"),
        &td,
        Some(server.state.current_bundle()),
        Some(&token),
        None,
        "n1",
        &data,
    )
    .await
    .expect("token still valid after the refused attempt");

    let web = SpiffeId::parse("spiffe://example.org/web").expect("id");
    let admin_id = SpiffeId::parse("spiffe://example.org/admin").expect("id");
    let key = tether_ca::PrivateKey::generate().expect("key");
    let good = tether_ca::build_csr(&key, &web).expect("csr");
    let mut tampered = good.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x01;
    let csrs = vec![
        SvidCsr {
            spiffe_id: web.to_string(),
            csr: b"\x30\x03\x02\x01\x00".to_vec(),
            ttl_secs: 0,
            mesh: false,
        },
        SvidCsr {
            spiffe_id: web.to_string(),
            csr: tampered,
            ttl_secs: 0,
            mesh: false,
        },
        SvidCsr {
            spiffe_id: admin_id.to_string(),
            csr: tether_ca::build_csr(&key, &admin_id).expect("csr"),
            ttl_secs: 0,
            mesh: false,
        },
        SvidCsr {
            spiffe_id: web.to_string(),
            csr: tether_ca::build_csr(&key, &admin_id).expect("csr"),
            ttl_secs: 0,
            mesh: false,
        },
        SvidCsr {
            spiffe_id: "spiffe://Example.org/web".into(),
            csr: good.clone(),
            ttl_secs: 0,
            mesh: false,
        },
        SvidCsr {
            spiffe_id: web.to_string(),
            csr: good,
            ttl_secs: 999_999,
            mesh: false,
        },
    ];
    let resp = conn
        .client()
        .sign_x509_svids(SignX509SvidsRequest { csrs })
        .await
        .expect("call")
        .into_inner()
        .svids;
    assert_eq!(resp.len(), 6);
    assert!(
        resp[0].error.contains("malformed CSR"),
        "{:?}",
        resp[0].error
    );
    assert!(resp[1].error.contains("CSR"), "{:?}", resp[1].error);
    assert!(
        resp[2]
            .error
            .contains("not entitled to spiffe://example.org/admin"),
        "{:?}",
        resp[2].error
    );
    assert!(
        resp[3].error.contains("asks for URI SAN"),
        "{:?}",
        resp[3].error
    );
    assert!(resp[4].error.contains("spiffe_id"), "{:?}", resp[4].error);
    for r in &resp[..5] {
        assert!(r.chain.is_empty());
    }
    // The valid one is signed, with the TTL capped at the identity's 1h.
    assert!(resp[5].error.is_empty(), "{:?}", resp[5].error);
    let leaf = &resp[5].chain[0];
    assert_eq!(
        tether_spiffe::x509::check_x509_svid_leaf(leaf).expect("conforming"),
        web
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_secs() as i64;
    assert!(resp[5].expires_at <= now + 3600 + 5, "TTL not capped");

    // JWT for an ID outside the entitlement.
    let err = conn
        .client()
        .mint_jwt_svid(tether_proto::tether::MintJwtSvidRequest {
            spiffe_id: admin_id.to_string(),
            audience: vec!["x".into()],
        })
        .await
        .expect_err("JWT outside entitlement");
    assert_eq!(err.code(), tonic::Code::PermissionDenied);

    // Client assertions: only for an oauth2 source bound to an identity of
    // this node, and only as that source's client.
    admin
        .clone()
        .apply(ApplyRequest {
            source: "c.yaml".into(),
            manifest: CLIENT_SOURCES.as_bytes().to_vec(),
        })
        .await
        .expect("apply sources");
    let assertion = |source: &str| {
        let mut c = conn.client();
        let req = tether_proto::tether::FetchSecretRequest {
            identity: "web".into(),
            source: source.into(),
        };
        async move { c.mint_client_assertion(req).await }
    };
    let token = assertion("idp")
        .await
        .expect("bound oauth2 source")
        .into_inner()
        .token;
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token.split('.').nth(1).expect("claims"))
            .expect("base64"),
    )
    .expect("json");
    assert_eq!(
        (&claims["iss"], &claims["sub"], &claims["aud"]),
        (
            &serde_json::json!("web-client"),
            &serde_json::json!("web-client"),
            &serde_json::json!("https://idp.example/token")
        ),
        "{claims}"
    );
    assert!(
        claims["jti"].as_str().is_some_and(|j| j.len() >= 32),
        "{claims}"
    );
    let err = assertion("idp-unbound").await.expect_err("unbound source");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let err = assertion("pw").await.expect_err("static source");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");

    // After a renewal the old node SVID (say, a copy someone kept) opens
    // nothing: only the node's current serial is accepted.
    let old = NodeClient::new(
        tether_agent::server_channel(
            &tether_agent::Servers::parse(&addr).expect("addr"),
            &td,
            &conn.bundle,
            Some(&conn.identity()),
        )
        .expect("channel"),
    );
    old.clone()
        .sign_x509_svids(SignX509SvidsRequest { csrs: vec![] })
        .await
        .expect("the current node SVID works");
    conn.renew().await.expect("renew");
    let err = old
        .clone()
        .sign_x509_svids(SignX509SvidsRequest { csrs: vec![] })
        .await
        .expect_err("a replaced node SVID was accepted");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("not its current one"), "{err:?}");
    conn.client()
        .sign_x509_svids(SignX509SvidsRequest { csrs: vec![] })
        .await
        .expect("the renewed node SVID works");
}

#[test]
fn random_bytes_on_every_listening_socket_do_not_stop_service() {
    use std::io::Write as _;
    let up = Up::start();
    let exe = workload_binary(up.dir.path(), "w");
    up.apply_ok(&format!(
        "apiVersion: tether.dev/v1alpha1\nkind: WorkloadIdentity\nmetadata: {{name: w}}\nspec:\n  spiffeId: spiffe://example.org/w\n  selectors: [[\"process:sha256:{}\"]]\n",
        sha256_file(&exe)
    ));
    let mut noise = vec![0u8; 64 * 1024];
    for (i, b) in noise.iter_mut().enumerate() {
        *b = (i as u32).wrapping_mul(2654435761).rotate_left(7) as u8 ^ rand::random::<u8>();
    }
    fn blast<S: std::io::Read + std::io::Write>(mut s: S, noise: &[u8]) {
        let _ = s.write_all(noise);
        let mut sink = [0u8; 4096];
        // Read until the peer closes or 2 s pass.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while std::time::Instant::now() < deadline {
            match s.read(&mut sink) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
    for addr in [up.node_api.clone(), up.metrics.clone()] {
        for _ in 0..3 {
            let s = std::net::TcpStream::connect(&addr).expect("connect tcp");
            s.set_read_timeout(Some(Duration::from_millis(500))).ok();
            blast(s, &noise);
        }
    }
    for p in [up.admin_socket(), up.agent_socket(), up.workload_socket()] {
        for _ in 0..3 {
            let s = std::os::unix::net::UnixStream::connect(&p).expect("connect unix");
            s.set_read_timeout(Some(Duration::from_millis(500))).ok();
            blast(s, &noise);
        }
        // An HTTP/2 preface followed by garbage frames, too.
        let mut s = std::os::unix::net::UnixStream::connect(&p).expect("connect unix");
        s.set_read_timeout(Some(Duration::from_millis(500))).ok();
        let _ = s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        blast(s, &noise);
    }
    // Everything still serves.
    assert!(up.ok(&["get", "wi"]).contains("spiffe://example.org/w"));
    assert!(
        up.ok(&["whoami", "--pid", &std::process::id().to_string()])
            .contains("selectors")
    );
    assert!(up.metrics_text().contains("tether_agent_process_svids"));
    let r = run_workload(
        &exe,
        0,
        &up.workload_socket(),
        &up.dir.path().join("out"),
        "fetch",
    );
    assert_eq!(r.spiffe_id(), "spiffe://example.org/w", "{}", r.describe());
    let token = up.ok(&["token", "create"]).trim().to_string();
    let (exited, _, log) = run_agent(&up, "node-z", &token);
    assert!(
        !exited,
        "node API stopped attesting after the noise:\n{log}"
    );
}

#[test]
fn bad_manifests_are_refused_with_file_and_field_and_nothing_is_applied() {
    let up = Up::start();
    let cases = [
        (
            "spiffeId: spiffe://Example.org/web",
            "spec.spiffeId",
            "uppercase",
        ),
        ("spiffeId: spiffe://example.org/a//b", "spec.spiffeId", ""),
        ("spiffeId: https://example.org/web", "spec.spiffeId", ""),
        (
            "spiffeId: spiffe://other.org/web",
            "spec.spiffeId",
            "trust domain",
        ),
    ];
    for (line, field, word) in cases {
        let yaml = IDENTITY.replace("spiffeId: spiffe://example.org/web", line);
        let o = up.apply(&yaml);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "accepted: {line}");
        assert!(
            err.contains("manifest-") && err.contains(field) && err.contains(word),
            "{line}: {err}"
        );
    }
    for sel in [
        "unix:uid:-1",
        "proc:path:/bin/x",
        "process:sha256:abc",
        "process:path:relative",
        "unix:uid",
    ] {
        let yaml = IDENTITY.replace("unix:uid:4242", sel);
        let o = up.apply(&yaml);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "accepted selector {sel}");
        assert!(err.contains("spec.selectors[0][0]"), "{sel}: {err}");
    }
    // A multi-document file with one bad document applies nothing.
    let two = format!(
        "{IDENTITY}---\n{}",
        IDENTITY
            .replace("name: web", "name: web2")
            .replace("4242", "x")
    );
    assert!(!up.apply(&two).status.success());
    assert!(
        up.ok(&["get", "wi"]).trim().is_empty(),
        "partial apply happened"
    );
    // Idempotent apply.
    assert!(
        up.apply_ok(IDENTITY)
            .contains("WorkloadIdentity/web created")
    );
    assert!(
        up.apply_ok(IDENTITY)
            .contains("WorkloadIdentity/web unchanged")
    );
    assert!(
        up.apply_ok(&IDENTITY.replace("4242", "4243"))
            .contains("WorkloadIdentity/web configured")
    );
    let o = up.tether(&["get", "wi", "nope"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("not found"));
}
