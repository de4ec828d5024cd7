use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P256_SHA256_FIXED_SIGNING,
    ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair,
};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use tether_spiffe::bundle::Curve;
use tether_spiffe::jwt::{self, JwtClaims, JwtError, JwtKey, MAX_TOKEN_LEN};
use tether_spiffe::{Bundle, SpiffeId};

use crate::support::{now, td};

struct Fixture {
    key: JwtKey,
    bundle: Bundle,
    sub: SpiffeId,
}

fn fixture() -> Fixture {
    let key = JwtKey::generate("k1").unwrap();
    let mut bundle = Bundle::new(td("example.org"));
    bundle.jwt_authorities.push(key.authority());
    Fixture {
        key,
        bundle,
        sub: SpiffeId::parse("spiffe://example.org/web").unwrap(),
    }
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Signs raw header and claims bytes with `key`, for tokens `jwt::sign`
/// would refuse to make.
fn forge_raw(key: &JwtKey, header: &[u8], claims: &[u8]) -> String {
    let alg = match key.curve() {
        Curve::P256 => &ECDSA_P256_SHA256_FIXED_SIGNING,
        Curve::P384 => &ECDSA_P384_SHA384_FIXED_SIGNING,
    };
    let pair = EcdsaKeyPair::from_pkcs8(alg, key.pkcs8_der()).unwrap();
    let input = format!("{}.{}", b64(header), b64(claims));
    let sig = pair.sign(&SystemRandom::new(), input.as_bytes()).unwrap();
    format!("{input}.{}", b64(sig.as_ref()))
}

fn forge(key: &JwtKey, header: &Value, claims: &Value) -> String {
    forge_raw(
        key,
        &serde_json::to_vec(header).unwrap(),
        &serde_json::to_vec(claims).unwrap(),
    )
}

fn std_header() -> Value {
    json!({"alg": "ES256", "kid": "k1", "typ": "JWT"})
}

fn std_claims(t: i64) -> Value {
    json!({"sub": "spiffe://example.org/web", "aud": "svc", "exp": t + 300, "iat": t})
}

fn aud(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn sign_then_validate() {
    let f = fixture();
    let t = now();
    let token = jwt::sign(&f.key, &f.sub, &aud(&["svc"]), t, t + 300).unwrap();
    let (id, claims) = jwt::validate(&token, "svc", &f.bundle, t).unwrap();
    assert_eq!(id, f.sub);
    assert_eq!(claims.sub, f.sub.as_str());
    assert_eq!(claims.aud, aud(&["svc"]));
    assert_eq!(claims.exp, t + 300);
    assert_eq!(claims.iat, Some(t));
    assert!(claims.extra.is_empty());

    // Header is exactly what the spec allows.
    let header = URL_SAFE_NO_PAD
        .decode(token.split('.').next().unwrap())
        .unwrap();
    let header: Value = serde_json::from_slice(&header).unwrap();
    assert_eq!(header, json!({"alg": "ES256", "kid": "k1", "typ": "JWT"}));

    assert_eq!(jwt::peek_subject(&token).unwrap(), f.sub);
    assert_eq!(jwt::peek_expiry(&token).unwrap(), t + 300);
}

#[test]
fn multiple_audiences() {
    let f = fixture();
    let t = now();
    let token = jwt::sign(&f.key, &f.sub, &aud(&["a", "b"]), t, t + 60).unwrap();
    let (_, claims) = jwt::validate(&token, "b", &f.bundle, t).unwrap();
    assert_eq!(claims.aud, aud(&["a", "b"]));
    assert!(matches!(
        jwt::validate(&token, "c", &f.bundle, t),
        Err(JwtError::AudienceMismatch { .. })
    ));
}

#[test]
fn wrong_audience_rejected() {
    let f = fixture();
    let t = now();
    let token = jwt::sign(&f.key, &f.sub, &aud(&["svc"]), t, t + 60).unwrap();
    let err = jwt::validate(&token, "other", &f.bundle, t).unwrap_err();
    assert!(
        matches!(err, JwtError::AudienceMismatch { ref expected } if expected == "other"),
        "{err}"
    );
    assert!(matches!(
        jwt::validate(&token, "", &f.bundle, t),
        Err(JwtError::AudienceMismatch { .. })
    ));
}

#[test]
fn expired_rejected_with_small_leeway() {
    let f = fixture();
    let t = now();
    let token = jwt::sign(&f.key, &f.sub, &aud(&["svc"]), t - 600, t - 100).unwrap();
    let err = jwt::validate(&token, "svc", &f.bundle, t).unwrap_err();
    assert!(
        matches!(err, JwtError::Expired { exp, .. } if exp == t - 100),
        "{err}"
    );

    // Within the documented leeway the token still passes.
    let token = jwt::sign(&f.key, &f.sub, &aud(&["svc"]), t - 600, t - 5).unwrap();
    assert!(jwt::validate(&token, "svc", &f.bundle, t).is_ok());
    let at_limit = t - 5 + jwt::CLOCK_SKEW_LEEWAY_SECS;
    assert!(matches!(
        jwt::validate(&token, "svc", &f.bundle, at_limit),
        Err(JwtError::Expired { .. })
    ));
}

#[test]
fn missing_or_bad_required_claims() {
    let f = fixture();
    let t = now();
    let mut claims = std_claims(t);
    claims.as_object_mut().unwrap().remove("exp");
    let err =
        jwt::validate(&forge(&f.key, &std_header(), &claims), "svc", &f.bundle, t).unwrap_err();
    assert!(matches!(err, JwtError::MissingClaim("exp")), "{err}");

    let mut claims = std_claims(t);
    claims.as_object_mut().unwrap().remove("aud");
    let err =
        jwt::validate(&forge(&f.key, &std_header(), &claims), "svc", &f.bundle, t).unwrap_err();
    assert!(matches!(err, JwtError::MissingClaim("aud")), "{err}");

    let mut claims = std_claims(t);
    claims["aud"] = json!([]);
    let err =
        jwt::validate(&forge(&f.key, &std_header(), &claims), "svc", &f.bundle, t).unwrap_err();
    assert!(
        matches!(err, JwtError::InvalidClaim { claim: "aud", .. }),
        "{err}"
    );

    let mut claims = std_claims(t);
    claims.as_object_mut().unwrap().remove("sub");
    let err =
        jwt::validate(&forge(&f.key, &std_header(), &claims), "svc", &f.bundle, t).unwrap_err();
    assert!(matches!(err, JwtError::MissingClaim("sub")), "{err}");

    let mut claims = std_claims(t);
    claims["exp"] = json!("tomorrow");
    let err =
        jwt::validate(&forge(&f.key, &std_header(), &claims), "svc", &f.bundle, t).unwrap_err();
    assert!(
        matches!(err, JwtError::InvalidClaim { claim: "exp", .. }),
        "{err}"
    );

    let mut claims = std_claims(t);
    claims["sub"] = json!("spiffe://example.org/a/../b");
    let err =
        jwt::validate(&forge(&f.key, &std_header(), &claims), "svc", &f.bundle, t).unwrap_err();
    assert!(matches!(err, JwtError::InvalidSubject(_)), "{err}");
}

#[test]
fn array_audience_and_fractional_dates_accepted() {
    let f = fixture();
    let t = now();
    let mut claims = std_claims(t);
    claims["aud"] = json!(["x", "svc"]);
    claims["exp"] = json!(t as f64 + 300.5);
    claims["jti"] = json!("abc");
    let (_, got) =
        jwt::validate(&forge(&f.key, &std_header(), &claims), "svc", &f.bundle, t).unwrap();
    assert_eq!(got.aud, aud(&["x", "svc"]));
    assert_eq!(got.exp, t + 300);
    assert_eq!(got.extra.get("jti"), Some(&json!("abc")));
}

#[test]
fn not_before_enforced() {
    let f = fixture();
    let t = now();
    let mut claims = std_claims(t);
    claims["nbf"] = json!(t + 120);
    let err =
        jwt::validate(&forge(&f.key, &std_header(), &claims), "svc", &f.bundle, t).unwrap_err();
    assert!(matches!(err, JwtError::NotYetValid { .. }), "{err}");
}

#[test]
fn alg_none_and_hmac_rejected() {
    let f = fixture();
    let t = now();
    let claims = b64(&serde_json::to_vec(&std_claims(t)).unwrap());
    for alg in ["none", "None", "HS256", "HS384", "HS512", "", "EdDSA"] {
        let header =
            b64(&serde_json::to_vec(&json!({"alg": alg, "kid": "k1", "typ": "JWT"})).unwrap());
        for sig in ["", "AAAA"] {
            let token = format!("{header}.{claims}.{sig}");
            let err = jwt::validate(&token, "svc", &f.bundle, t).unwrap_err();
            assert!(matches!(err, JwtError::AlgNotAllowed(_)), "{alg}: {err}");
        }
    }
    for alg in ["RS256", "PS256", "ES512"] {
        let header = b64(&serde_json::to_vec(&json!({"alg": alg, "kid": "k1"})).unwrap());
        let err =
            jwt::validate(&format!("{header}.{claims}.AAAA"), "svc", &f.bundle, t).unwrap_err();
        assert!(matches!(err, JwtError::UnsupportedAlg(_)), "{alg}: {err}");
    }
    let header = b64(br#"{"kid":"k1"}"#);
    let err = jwt::validate(&format!("{header}.{claims}.AAAA"), "svc", &f.bundle, t).unwrap_err();
    assert!(matches!(err, JwtError::MissingHeader("alg")), "{err}");
}

#[test]
fn unknown_or_missing_kid_rejected() {
    let f = fixture();
    let t = now();
    let other = JwtKey::generate("k2").unwrap();
    let token = jwt::sign(&other, &f.sub, &aud(&["svc"]), t, t + 60).unwrap();
    let err = jwt::validate(&token, "svc", &f.bundle, t).unwrap_err();
    assert!(
        matches!(err, JwtError::UnknownKid { ref kid, .. } if kid == "k2"),
        "{err}"
    );

    let token = forge(&f.key, &json!({"alg": "ES256"}), &std_claims(t));
    let err = jwt::validate(&token, "svc", &f.bundle, t).unwrap_err();
    assert!(matches!(err, JwtError::MissingHeader("kid")), "{err}");

    let token = forge(&f.key, &json!({"alg": "ES256", "kid": 7}), &std_claims(t));
    let err = jwt::validate(&token, "svc", &f.bundle, t).unwrap_err();
    assert!(matches!(err, JwtError::HeaderNotString("kid")), "{err}");
}

#[test]
fn unexpected_headers_rejected() {
    let f = fixture();
    let t = now();
    for extra in ["jku", "jwk", "x5u", "crit", "cty", "b64"] {
        let mut header = std_header();
        header[extra] = json!("x");
        let err = jwt::validate(&forge(&f.key, &header, &std_claims(t)), "svc", &f.bundle, t)
            .unwrap_err();
        assert!(
            matches!(err, JwtError::UnexpectedHeader(ref h) if h == extra),
            "{err}"
        );
    }
    let mut header = std_header();
    header["typ"] = json!("at+jwt");
    let err =
        jwt::validate(&forge(&f.key, &header, &std_claims(t)), "svc", &f.bundle, t).unwrap_err();
    assert!(matches!(err, JwtError::BadTyp(_)), "{err}");
    header["typ"] = json!("JOSE");
    assert!(jwt::validate(&forge(&f.key, &header, &std_claims(t)), "svc", &f.bundle, t).is_ok());
    header.as_object_mut().unwrap().remove("typ");
    assert!(jwt::validate(&forge(&f.key, &header, &std_claims(t)), "svc", &f.bundle, t).is_ok());
}

#[test]
fn tampering_rejected() {
    let f = fixture();
    let t = now();
    let token = jwt::sign(&f.key, &f.sub, &aud(&["svc"]), t, t + 60).unwrap();
    let parts: Vec<&str> = token.split('.').collect();

    // Payload swapped for one naming another workload.
    let mut claims = std_claims(t);
    claims["sub"] = json!("spiffe://example.org/admin");
    let evil = b64(&serde_json::to_vec(&claims).unwrap());
    let tampered = format!("{}.{}.{}", parts[0], evil, parts[2]);
    let err = jwt::validate(&tampered, "svc", &f.bundle, t).unwrap_err();
    assert!(matches!(err, JwtError::BadSignature), "{err}");

    // One bit of the signature flipped.
    let mut sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
    sig[10] ^= 1;
    let tampered = format!("{}.{}.{}", parts[0], parts[1], b64(&sig));
    assert!(matches!(
        jwt::validate(&tampered, "svc", &f.bundle, t),
        Err(JwtError::BadSignature)
    ));

    // Signature truncated or empty.
    let tampered = format!("{}.{}.{}", parts[0], parts[1], b64(&sig[..63]));
    assert!(matches!(
        jwt::validate(&tampered, "svc", &f.bundle, t),
        Err(JwtError::BadSignature)
    ));
    let tampered = format!("{}.{}.", parts[0], parts[1]);
    assert!(matches!(
        jwt::validate(&tampered, "svc", &f.bundle, t),
        Err(JwtError::BadSignature)
    ));

    // An ASN.1/DER signature is not the JOSE form.
    let pair =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, f.key.pkcs8_der()).unwrap();
    let input = format!("{}.{}", parts[0], parts[1]);
    let der_sig = pair.sign(&SystemRandom::new(), input.as_bytes()).unwrap();
    let tampered = format!("{input}.{}", b64(der_sig.as_ref()));
    assert!(matches!(
        jwt::validate(&tampered, "svc", &f.bundle, t),
        Err(JwtError::BadSignature)
    ));

    // Padding or standard-alphabet base64 is not base64url.
    let tampered = format!("{}.{}.{}=", parts[0], parts[1], parts[2]);
    assert!(matches!(
        jwt::validate(&tampered, "svc", &f.bundle, t),
        Err(JwtError::Encoding { part: "signature" })
    ));
}

#[test]
fn subject_from_other_trust_domain_rejected() {
    let f = fixture();
    let t = now();
    let foreign = SpiffeId::parse("spiffe://evil.org/web").unwrap();
    let token = jwt::sign(&f.key, &foreign, &aud(&["svc"]), t, t + 60).unwrap();
    let err = jwt::validate(&token, "svc", &f.bundle, t).unwrap_err();
    assert!(matches!(err, JwtError::TrustDomainMismatch { .. }), "{err}");
    assert_eq!(jwt::peek_subject(&token).unwrap(), foreign);
}

#[test]
fn duplicate_json_members_rejected() {
    let f = fixture();
    let t = now();
    let claims = format!(
        r#"{{"sub":"spiffe://example.org/web","sub":"spiffe://example.org/admin","aud":"svc","exp":{}}}"#,
        t + 60
    );
    let token = forge_raw(
        &f.key,
        &serde_json::to_vec(&std_header()).unwrap(),
        claims.as_bytes(),
    );
    let err = jwt::validate(&token, "svc", &f.bundle, t).unwrap_err();
    assert!(
        matches!(err, JwtError::Json { part: "claims", .. }),
        "{err}"
    );

    let header = br#"{"alg":"ES256","kid":"k1","alg":"none"}"#;
    let token = forge_raw(&f.key, header, &serde_json::to_vec(&std_claims(t)).unwrap());
    let err = jwt::validate(&token, "svc", &f.bundle, t).unwrap_err();
    assert!(
        matches!(err, JwtError::Json { part: "header", .. }),
        "{err}"
    );
}

#[test]
fn malformed_tokens_rejected() {
    let f = fixture();
    let t = now();
    for token in ["", "a", "a.b", "a.b.c.d", "....", "!!!.e30.AAAA"] {
        assert!(
            jwt::validate(token, "svc", &f.bundle, t).is_err(),
            "{token:?}"
        );
        assert!(jwt::peek_subject(token).is_err(), "{token:?}");
        assert!(jwt::peek_expiry(token).is_err(), "{token:?}");
    }
    let err = jwt::validate("a.b", "svc", &f.bundle, t).unwrap_err();
    assert!(matches!(err, JwtError::Malformed(_)), "{err}");
    let huge = "a".repeat(MAX_TOKEN_LEN + 1);
    assert!(matches!(
        jwt::validate(&huge, "svc", &f.bundle, t),
        Err(JwtError::TooLarge { .. })
    ));
    let not_object = format!("{}.{}.AAAA", b64(b"[1]"), b64(b"{}"));
    assert!(matches!(
        jwt::validate(&not_object, "svc", &f.bundle, t),
        Err(JwtError::Json { part: "header", .. })
    ));
}

#[test]
fn es384_keys_and_alg_key_mismatch() {
    let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &SystemRandom::new())
        .unwrap();
    let key = JwtKey::from_pkcs8("p384", doc.as_ref()).unwrap();
    assert_eq!(key.curve(), Curve::P384);
    let mut bundle = Bundle::new(td("example.org"));
    bundle.jwt_authorities.push(key.authority());
    let sub = SpiffeId::parse("spiffe://example.org/w").unwrap();
    let t = now();
    let token = jwt::sign(&key, &sub, &aud(&["svc"]), t, t + 60).unwrap();
    assert!(token.starts_with(&b64(br#"{"alg":"ES384""#)[..10]));
    assert_eq!(jwt::validate(&token, "svc", &bundle, t).unwrap().0, sub);

    // The header claims ES256 for a P-384 key.
    let header = json!({"alg": "ES256", "kid": "p384"});
    let token = forge(&key, &header, &std_claims(t));
    let err = jwt::validate(&token, "svc", &bundle, t).unwrap_err();
    assert!(matches!(err, JwtError::AlgKeyMismatch { .. }), "{err}");
}

#[test]
fn key_persistence_round_trip() {
    let key = JwtKey::generate("persist").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwt.pk8");
    std::fs::write(&path, key.pkcs8_der()).unwrap();
    let loaded = JwtKey::from_pkcs8("persist", &std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(loaded.authority(), key.authority());
    assert_eq!(loaded.kid(), "persist");
    assert!(!format!("{loaded:?}").contains(&format!("{:?}", &key.pkcs8_der()[..8])));

    // A token from the reloaded key validates with the original's authority.
    let mut bundle = Bundle::new(td("example.org"));
    bundle.jwt_authorities.push(key.authority());
    let sub = SpiffeId::parse("spiffe://example.org/w").unwrap();
    let t = now();
    let token = jwt::sign(&loaded, &sub, &aud(&["svc"]), t, t + 60).unwrap();
    assert!(jwt::validate(&token, "svc", &bundle, t).is_ok());

    assert!(matches!(
        JwtKey::from_pkcs8("x", b"not a key"),
        Err(JwtError::KeyRejected(_))
    ));
}

#[test]
fn sign_rejects_bad_arguments() {
    let f = fixture();
    let t = now();
    assert!(matches!(
        jwt::sign(&f.key, &f.sub, &[], t, t + 1),
        Err(JwtError::EmptyAudience)
    ));
    assert!(matches!(
        jwt::sign(&f.key, &f.sub, &aud(&[""]), t, t + 1),
        Err(JwtError::EmptyAudience)
    ));
    assert!(matches!(
        jwt::sign(&f.key, &f.sub, &aud(&["a"]), t, t),
        Err(JwtError::InvalidLifetime { .. })
    ));
    for kid in ["", "has space", "tab\t", &"k".repeat(256)] {
        assert!(
            matches!(JwtKey::generate(kid), Err(JwtError::InvalidKid { .. })),
            "{kid:?}"
        );
    }
}

#[test]
fn claims_serde_accepts_both_audience_forms() {
    let one: JwtClaims = serde_json::from_str(r#"{"sub":"s","aud":"a","exp":5,"x":1}"#).unwrap();
    assert_eq!(one.aud, aud(&["a"]));
    assert_eq!(one.iat, None);
    assert_eq!(one.extra.get("x"), Some(&json!(1)));
    let many: JwtClaims =
        serde_json::from_str(r#"{"sub":"s","aud":["a","b"],"exp":5,"iat":1}"#).unwrap();
    assert_eq!(many.aud, aud(&["a", "b"]));

    let json = serde_json::to_value(&one).unwrap();
    assert_eq!(json, json!({"sub": "s", "aud": "a", "exp": 5, "x": 1}));
    let json = serde_json::to_value(&many).unwrap();
    assert_eq!(json["aud"], json!(["a", "b"]));
}

#[test]
fn a_client_assertion_is_never_a_jwt_svid() {
    // Even for a client id that is a SPIFFE ID of the trust domain and an
    // audience a relying party expects, the typ alone refuses it.
    let f = fixture();
    let t = now();
    let token = jwt::sign_client_assertion(
        &f.key,
        "spiffe://example.org/admin",
        "svc",
        "0123456789abcdef",
        t,
        t + 60,
    )
    .expect("sign");
    let err = jwt::validate(&token, "svc", &f.bundle, t).unwrap_err();
    assert!(matches!(err, JwtError::BadTyp(_)), "{err}");
    for (client, jti) in [("", "j"), ("c", "")] {
        assert!(jwt::sign_client_assertion(&f.key, client, "svc", jti, t, t + 60).is_err());
    }
}
