//! What each fuzz target does with its input, as plain functions: the
//! libFuzzer binaries in `fuzz/` call them, and `tests/seeds.rs` feeds
//! them every seed in `fuzz/seeds/<target>/` on every `make test`. Each
//! must never panic on any input; the asserts state properties of what a
//! parser accepts (round trips, bounds).

use std::sync::OnceLock;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tether_spiffe::jwt::{self, JwtKey};
use tether_spiffe::{Bundle, SpiffeId, TrustDomain};

/// A target's body.
pub type Body = fn(&[u8]);

/// Every target by the name of its binary and corpus directory.
pub const TARGETS: &[(&str, Body)] = &[
    ("bundle_json", bundle_json),
    ("csr_parse", csr_parse),
    ("elf_interp", elf_interp),
    ("h2_authority", h2_authority),
    ("http_requests", http_requests),
    ("jwt_validate", jwt_validate),
    ("kernel_records", kernel_records),
    ("manifest_parse", manifest_parse),
    ("postgres_messages", postgres_messages),
    ("proc_events", proc_events),
    ("redis_commands", redis_commands),
    ("redis_reply", redis_reply),
    ("selector_parse", selector_parse),
    ("spiffe_id", spiffe_id),
    ("token_response", token_response),
    ("tunnel_request", tunnel_request),
    ("x509_svid", x509_svid),
];

/// A client's request stream through the HTTP injector, fed in pieces of
/// every size the first byte picks: never a panic; what goes out carries
/// the injected header once per request head.
pub fn http_requests(data: &[u8]) {
    use tether_agent::inject_http::{Inject, Rewriter};
    use tether_manifest::HttpScheme;
    let Some((&step, input)) = data.split_first() else {
        return;
    };
    let inject = Inject::new("Authorization", HttpScheme::Bearer, b"INJECTED").expect("valid");
    let mut rw = Rewriter::new(inject);
    let (mut out, mut buf) = (Vec::new(), Vec::new());
    for piece in input.chunks(usize::from(step).max(1)) {
        buf.extend_from_slice(piece);
        let Ok(n) = rw.feed(&buf, &mut out) else {
            return;
        };
        assert!(n <= buf.len());
        buf.drain(..n);
        if buf.len() > rw.limit() {
            return;
        }
    }
    let text = String::from_utf8_lossy(&out).to_ascii_lowercase();
    let injected = text.matches("authorization: bearer injected\r\n").count() as u64;
    assert_eq!(injected, rw.requests, "one injected header per request");
}

/// PostgreSQL bytes the injector parses: a client's first packet (bounded,
/// and a startup re-written for the configured user parses back with that
/// user), and server messages during authentication with the SCRAM client
/// answering whatever SASLContinue data they carry. Never a panic.
pub fn postgres_messages(data: &[u8]) {
    use tether_agent::inject_postgres::{
        First, MAX_AUTH_MESSAGE, MAX_STARTUP, Scram, error_message, first_packet, mechanisms,
        message, startup_for,
    };
    if let Ok(Some((first, n))) = first_packet(data) {
        assert!(n <= MAX_STARTUP && n <= data.len());
        if let First::Startup { version, params } = first {
            let out = startup_for(version, &params, "app");
            match first_packet(&out) {
                Ok(Some((First::Startup { params: again, .. }, m))) => {
                    assert_eq!(m, out.len());
                    assert_eq!(again[0], ("user".to_string(), "app".to_string()));
                }
                // Re-written parameters can outgrow the bound.
                Err(_) if out.len() > MAX_STARTUP => {}
                other => panic!("re-written startup does not parse: {other:?}"),
            }
        }
    }
    let mut rest = data;
    while let Ok(Some((ty, payload, n))) = message(rest) {
        assert!(n <= MAX_AUTH_MESSAGE + 1 && n <= rest.len() && n >= 5);
        let _ = error_message(payload);
        let _ = mechanisms(payload);
        if ty == b'R'
            && let Ok(mut s) = Scram::new(b"pw")
        {
            let _ = s.respond(payload);
            let _ = s.verify(payload);
        }
        rest = &rest[n..];
    }
}

/// A client's Redis command stream through the injector's filter, in
/// pieces the first byte picks: never a panic, the buffer stays within the
/// filter's bound, and what is relayed is a prefix of the input, unchanged.
pub fn redis_commands(data: &[u8]) {
    use tether_agent::inject_redis::CommandFilter;
    let Some((&step, input)) = data.split_first() else {
        return;
    };
    let mut f = CommandFilter::default();
    let (mut out, mut buf) = (Vec::new(), Vec::new());
    for piece in input.chunks(usize::from(step).max(1)) {
        buf.extend_from_slice(piece);
        let Ok(n) = f.feed(&buf, &mut out) else {
            break;
        };
        assert!(n <= buf.len());
        buf.drain(..n);
        if buf.len() > f.limit() {
            break;
        }
    }
    assert!(
        input.starts_with(&out),
        "the filter changed what it relayed"
    );
}

/// A Redis server's answer to the injected AUTH: never a panic, and an
/// accepted answer is a complete status line within the bound.
pub fn redis_reply(data: &[u8]) {
    use tether_agent::inject_redis::{MAX_REPLY, parse_auth_reply};
    if let Ok(Some(n)) = parse_auth_reply(data) {
        assert!(n <= MAX_REPLY && n <= data.len());
        assert!(data[..n].starts_with(b"+") && data[..n].ends_with(b"\r\n"));
    }
}

/// Token endpoints' answers (STS XML, OAuth2 JSON) under every status
/// class: never a panic, and what is accepted is bounded and usable.
pub fn token_response(data: &[u8]) {
    use tether_agent::exchange::{parse_sts, parse_token};
    for status in [200, 400, 503] {
        if let Ok(c) = parse_sts("https://sts.example", status, data) {
            assert_eq!(status, 200);
            assert!(!c.access_key_id.is_empty() && c.access_key_id.len() <= 16 * 1024);
            assert!(!c.session_token.chars().any(char::is_whitespace));
        }
        if let Ok(t) = parse_token("https://idp.example/token", status, data, 1000) {
            assert_eq!(status, 200);
            assert!(!t.access_token.is_empty() && t.access_token.len() <= 16 * 1024);
            assert!(t.expires_at > 1000);
        }
    }
}

/// SPIFFE bundle documents (federation, the Workload API's bundles).
pub fn bundle_json(data: &[u8]) {
    let td = TrustDomain::new("example.org").expect("valid td");
    let Ok(bundle) = Bundle::from_json(td.clone(), data) else {
        return;
    };
    let json = bundle.to_json().expect("a parsed bundle must serialise");
    let back = Bundle::from_json(td, json.as_bytes()).expect("a serialised bundle must parse");
    assert_eq!(back, bundle);
    let _ = bundle
        .jwks_json()
        .expect("parsed JWT authorities must serialise");
    let _ = bundle.x509_authorities_der_concat();
}

/// Records the kernel writes (held connections, exec records, audit
/// events). The kernel is trusted, but a layout drift or a record from
/// another writer of a pinned map must decode to an error, never a panic.
/// The first byte picks the decoder.
pub fn kernel_records(data: &[u8]) {
    let Some((which, rec)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            if let Some(h) = tether_kernel::decode::held(rec) {
                assert_eq!(rec.len(), 96);
                // IPv4 comes back as IPv4, never as a mapped IPv6 address.
                assert_eq!(h.original_dst.ip(), h.original_dst.ip().to_canonical());
            }
        }
        1 => {
            if let Some(x) = tether_kernel::decode::exec(rec) {
                assert_eq!(rec.len(), 80);
                assert!(
                    x.name.len() <= 32 * 3,
                    "a lossy name is at most 3 bytes per byte"
                );
            }
        }
        _ => {
            if let Ok(ev) = tether_kernel::decode::event(rec) {
                assert!(rec.len() >= 112);
                assert_eq!(ev.addr, ev.addr.to_canonical());
                assert!(ev.comm.len() <= 16 * 3 && ev.executed.len() <= 16 * 3);
            }
        }
    }
}

/// CSRs from agents.
pub fn csr_parse(data: &[u8]) {
    let _ = tether_ca::parse_csr(data);
}

/// An executable's ELF headers (the file is the workload's own).
pub fn elf_interp(data: &[u8]) {
    if let Ok(Some(path)) = tether_attest::parse_interp(data) {
        assert!(
            path.len() <= data.len() * 3,
            "a lossy path is at most 3 bytes per byte"
        );
    }
}

/// Workload API clients' HTTP/2 bytes through the `:authority` shim, fed
/// whole and split at every 7th byte (frames arrive in pieces).
pub fn h2_authority(data: &[u8]) {
    let mut whole = tether_agent::h2_authority::Rewriter::default();
    let whole_ok = whole.feed(data).is_ok();
    let mut pieces = tether_agent::h2_authority::Rewriter::default();
    let mut pieces_ok = true;
    for chunk in data.chunks(7) {
        if pieces.feed(chunk).is_err() {
            pieces_ok = false;
            break;
        }
    }
    assert_eq!(
        whole_ok, pieces_ok,
        "the verdict must not depend on how bytes arrive"
    );
}

struct JwtFixture {
    pair: EcdsaKeyPair,
    bundle: Bundle,
}

fn jwt_fixture() -> &'static JwtFixture {
    static FIXTURE: OnceLock<JwtFixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let key = JwtKey::generate("fuzz").expect("key generation");
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, key.pkcs8_der())
            .expect("own key reloads");
        let mut bundle = Bundle::new(TrustDomain::new("example.org").expect("valid td"));
        bundle.jwt_authorities.push(key.authority());
        JwtFixture { pair, bundle }
    })
}

fn signed(f: &JwtFixture, header: &[u8], claims: &[u8]) -> String {
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let sig = f
        .pair
        .sign(&SystemRandom::new(), input.as_bytes())
        .expect("signing");
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
}

/// JWT-SVIDs (ValidateJWTSVID). The first byte picks what the rest is: 0
/// the token itself, 1 the claims of a correctly signed token, 2 its header.
pub fn jwt_validate(data: &[u8]) {
    const NOW: i64 = 1_700_000_000;
    let f = jwt_fixture();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let token = match mode % 3 {
        0 => match std::str::from_utf8(rest) {
            Ok(s) => s.to_owned(),
            Err(_) => return,
        },
        1 => signed(f, br#"{"alg":"ES256","kid":"fuzz","typ":"JWT"}"#, rest),
        _ => signed(
            f,
            rest,
            br#"{"sub":"spiffe://example.org/w","aud":"svc","exp":1700000100}"#,
        ),
    };
    let _ = jwt::peek_subject(&token);
    let _ = jwt::peek_expiry(&token);
    if let Ok((id, claims)) = jwt::validate(&token, "svc", &f.bundle, NOW) {
        // Whatever passes must satisfy the spec's requirements.
        assert_eq!(id.trust_domain(), &f.bundle.trust_domain);
        assert_eq!(claims.sub, id.as_str());
        assert!(claims.aud.iter().any(|a| a == "svc"));
        assert!(claims.exp + jwt::CLOCK_SKEW_LEEWAY_SECS > NOW);
    }
}

/// Manifests (`tether apply`).
pub fn manifest_parse(data: &[u8]) {
    if let Ok(resources) = tether_manifest::parse("fuzz.yaml", data) {
        for r in resources {
            let again = tether_manifest::parse("again.yaml", r.to_yaml().as_bytes())
                .expect("own output must parse");
            assert_eq!(again, vec![r]);
        }
    }
}

/// Kernel process-event datagrams (netlink proc connector).
pub fn proc_events(data: &[u8]) {
    use tether_attest::ProcEvent;
    let mut out = Vec::new();
    tether_attest::parse_datagram(data, &mut out);
    for ev in &out {
        match *ev {
            ProcEvent::Exec { pid } | ProcEvent::Exit { pid } | ProcEvent::Uid { pid } => {
                assert!(pid > 0)
            }
            ProcEvent::Fork { parent, child } => assert!(parent > 0 && child > 0),
            ProcEvent::Overrun => panic!("Overrun only comes from the socket"),
        }
    }
}

/// Selectors (manifests, the CLI).
pub fn selector_parse(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(sel) = tether_attest::Selector::parse(text) {
        let canonical = sel.to_string();
        let again = tether_attest::Selector::parse(&canonical).expect("canonical form must parse");
        assert_eq!(again, sel);
        assert_eq!(again.to_string(), canonical);
    }
}

/// SPIFFE IDs and trust domains (everywhere).
pub fn spiffe_id(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = SpiffeId::parse(s) {
        assert_eq!(id.as_str(), s);
        assert!(s.len() <= 2048);
        assert_eq!(format!("spiffe://{}{}", id.trust_domain(), id.path()), s);
        let rebuilt = SpiffeId::new(id.trust_domain(), id.path())
            .expect("the parts of a valid ID must rebuild it");
        assert_eq!(rebuilt, id);
        let json = serde_json::to_string(&id).expect("serialising an ID cannot fail");
        let back: SpiffeId = serde_json::from_str(&json).expect("a serialised ID must parse");
        assert_eq!(back, id);
    }
    if let Ok(td) = TrustDomain::new(s) {
        assert!(td.as_str().len() <= 255);
        assert_eq!(TrustDomain::new(&td.id_string()).ok(), Some(td.clone()));
        assert_eq!(td.to_spiffe_id().trust_domain(), &td);
    }
}

/// The mesh's tunnel request and the PROXY v2 header it hands servers.
pub fn tunnel_request(data: &[u8]) {
    if let Ok(Some((r, used))) = tether_mesh::Request::parse(data) {
        assert!(used <= data.len());
        assert_eq!(
            tether_mesh::Request::parse(&r.encode()),
            Ok(Some((r, used)))
        );
    }
    if let Ok(Some((h, used))) = tether_mesh::proxy_v2::ProxyHeader::parse(data) {
        assert!(used <= data.len());
        let _ = h.encode();
    }
}

/// A peer's X.509-SVID chain as the mesh and the server's node API see it
/// (concatenated DER): split, leaf checks, the mesh marker, IP SANs, and
/// full path validation against a bundle holding the chain's last
/// certificate (so a well-formed seed reaches signature checks).
pub fn x509_svid(data: &[u8]) {
    use tether_spiffe::x509;
    let _ = x509::check_x509_svid_leaf(data);
    let _ = x509::mesh_node(data);
    let _ = x509::ip_sans(data);
    let _ = x509::not_after(data);
    let Ok(chain) = x509::split_certificates(data) else {
        return;
    };
    assert_eq!(
        chain.iter().map(Vec::len).sum::<usize>(),
        data.len(),
        "split certificates cover the input exactly"
    );
    let (Some(leaf), Some(anchor)) = (chain.first(), chain.last()) else {
        return;
    };
    let mut bundle = Bundle::new(TrustDomain::new("example.org").expect("valid td"));
    bundle.x509_authorities.push(anchor.clone());
    let body = if chain.len() > 1 {
        &chain[..chain.len() - 1]
    } else {
        &chain[..]
    };
    if let Ok(id) = x509::verify_x509_svid(body, &bundle, 1_800_000_000) {
        assert_eq!(id.trust_domain(), &bundle.trust_domain);
        assert_eq!(x509::check_x509_svid_leaf(leaf).ok(), Some(id));
    }
}
