use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Value, json};
use tether_spiffe::Bundle;
use tether_spiffe::bundle::{BundleError, Curve, JwtAuthority};
use tether_spiffe::jwt::JwtKey;

use crate::support::{issue, leaf_params, root_ca, root_ca_p384, td};

fn sample_bundle() -> (Bundle, JwtKey) {
    let ca = root_ca("example.org");
    let key = JwtKey::generate("jwt-1").unwrap();
    let mut bundle = Bundle::new(td("example.org"));
    bundle.x509_authorities.push(ca.der.clone());
    bundle
        .x509_authorities
        .push(root_ca_p384("example.org").der);
    bundle.jwt_authorities.push(key.authority());
    bundle.sequence = 42;
    bundle.refresh_hint_secs = Some(300);
    (bundle, key)
}

fn parse(json: &Value) -> Result<Bundle, BundleError> {
    Bundle::from_json(td("example.org"), json.to_string().as_bytes())
}

#[test]
fn round_trip() {
    let (bundle, _key) = sample_bundle();
    let text = bundle.to_json().unwrap();
    let back = Bundle::from_json(td("example.org"), text.as_bytes()).unwrap();
    assert_eq!(back, bundle);

    let doc: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(doc["spiffe_sequence"], json!(42));
    assert_eq!(doc["spiffe_refresh_hint"], json!(300));
    let keys = doc["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 3);
    let x509 = &keys[0];
    assert_eq!(x509["use"], "x509-svid");
    assert_eq!(x509["kty"], "EC");
    assert_eq!(x509["crv"], "P-256");
    assert!(
        x509.get("kid").is_none(),
        "x509-svid entries must not carry kid"
    );
    assert_eq!(
        STANDARD.decode(x509["x5c"][0].as_str().unwrap()).unwrap(),
        bundle.x509_authorities[0]
    );
    assert_eq!(keys[1]["crv"], "P-384");
    let jwt = &keys[2];
    assert_eq!(jwt["use"], "jwt-svid");
    assert_eq!(jwt["kid"], "jwt-1");
    assert_eq!(jwt["crv"], "P-256");
    assert_eq!(
        URL_SAFE_NO_PAD
            .decode(jwt["x"].as_str().unwrap())
            .unwrap()
            .len(),
        32
    );

    assert_eq!(
        bundle.x509_authorities_der_concat(),
        [
            bundle.x509_authorities[0].clone(),
            bundle.x509_authorities[1].clone()
        ]
        .concat()
    );
}

#[test]
fn jwks_only_has_jwt_keys() {
    let (bundle, key) = sample_bundle();
    let jwks: Value = serde_json::from_slice(&bundle.jwks_json().unwrap()).unwrap();
    let keys = jwks["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["kid"], key.kid());
    assert!(jwks.get("spiffe_sequence").is_none());
}

#[test]
fn optional_members_and_unknown_entries() {
    let (bundle, _) = sample_bundle();
    let mut doc: Value = serde_json::from_str(&bundle.to_json().unwrap()).unwrap();
    let obj = doc.as_object_mut().unwrap();
    obj.remove("spiffe_sequence");
    obj.remove("spiffe_refresh_hint");
    obj.insert("future_member".into(), json!({"anything": [1, 2]}));
    let keys = obj.get_mut("keys").unwrap().as_array_mut().unwrap();
    // Unknown use and unknown kty must be ignored (bundle spec 4.1.3, 4.2).
    keys.push(json!({"use": "wit-svid", "kty": "EC", "whatever": true}));
    keys.push(json!({"use": "jwt-svid", "kty": "oct", "k": "AAAA"}));
    keys.push(json!({"use": "x509-svid", "kty": "PQ", "x5c": ["???"]}));
    // x509-svid entries without x5c, or with an empty one, are ignored.
    let jwk = keys[0].clone();
    let mut no_x5c = jwk.clone();
    no_x5c.as_object_mut().unwrap().remove("x5c");
    keys.push(no_x5c);
    let mut empty_x5c = jwk.clone();
    empty_x5c["x5c"] = json!([]);
    keys.push(empty_x5c);

    let parsed = parse(&doc).unwrap();
    assert_eq!(parsed.sequence, 0);
    assert_eq!(parsed.refresh_hint_secs, None);
    assert_eq!(parsed.x509_authorities, bundle.x509_authorities);
    assert_eq!(parsed.jwt_authorities, bundle.jwt_authorities);
}

#[test]
fn only_the_first_x5c_certificate_counts() {
    let (bundle, _) = sample_bundle();
    let mut doc: Value = serde_json::from_str(&bundle.to_json().unwrap()).unwrap();
    let extra = STANDARD.encode(&bundle.x509_authorities[1]);
    doc["keys"][0]["x5c"]
        .as_array_mut()
        .unwrap()
        .push(json!(extra));
    let parsed = parse(&doc).unwrap();
    assert_eq!(parsed.x509_authorities, bundle.x509_authorities);
}

/// Builds a bundle whose key #1 is `bad`, and returns the error.
fn key_error(bad: Value) -> BundleError {
    let (bundle, _) = sample_bundle();
    let mut doc: Value = serde_json::from_str(&bundle.to_json().unwrap()).unwrap();
    doc["keys"].as_array_mut().unwrap()[1] = bad;
    parse(&doc).unwrap_err()
}

fn assert_key_error(bad: Value, want_index: usize, want_field: &str) {
    let err = key_error(bad.clone());
    let msg = err.to_string();
    match &err {
        BundleError::Key { index, field, .. } => {
            assert_eq!((*index, *field), (want_index, want_field), "{bad}: {msg}");
            assert!(msg.contains(&format!("#{want_index}")), "{msg}");
            assert!(msg.contains(want_field), "{msg}");
        }
        other => panic!("{bad}: expected a key error, got {other}"),
    }
}

#[test]
fn malformed_keys_name_index_and_field() {
    let (bundle, _) = sample_bundle();
    let doc: Value = serde_json::from_str(&bundle.to_json().unwrap()).unwrap();
    let x509 = doc["keys"][0].clone();
    let jwt = doc["keys"][2].clone();
    let with = |base: &Value, field: &str, value: Value| {
        let mut v = base.clone();
        v[field] = value;
        v
    };
    let without = |base: &Value, field: &str| {
        let mut v = base.clone();
        v.as_object_mut().unwrap().remove(field);
        v
    };

    assert_key_error(without(&x509, "use"), 1, "use");
    assert_key_error(with(&x509, "use", json!(5)), 1, "use");
    assert_key_error(without(&x509, "kty"), 1, "kty");
    assert_key_error(with(&x509, "x5c", json!("notarray")), 1, "x5c");
    assert_key_error(with(&x509, "x5c", json!([17])), 1, "x5c");
    assert_key_error(with(&x509, "x5c", json!(["***"])), 1, "x5c");
    assert_key_error(
        with(&x509, "x5c", json!([STANDARD.encode(b"not a cert")])),
        1,
        "x5c",
    );
    // URL-safe unpadded base64 is not what x5c uses.
    let der = STANDARD.decode(x509["x5c"][0].as_str().unwrap()).unwrap();
    assert_key_error(
        with(&x509, "x5c", json!([URL_SAFE_NO_PAD.encode(&der)])),
        1,
        "x5c",
    );
    // The JWK describes a different key than the certificate holds.
    assert_key_error(with(&x509, "x", jwt["x"].clone()), 1, "x5c");
    assert_key_error(without(&x509, "y"), 1, "y");
    assert_key_error(with(&x509, "x", json!("AAAA")), 1, "x");
    // A leaf (non-CA) certificate is not an authority.
    let leaf = issue(
        &leaf_params("spiffe://example.org/w"),
        &root_ca("example.org"),
    );
    assert_key_error(
        with(&x509, "x5c", json!([STANDARD.encode(&leaf)])),
        1,
        "x5c",
    );

    assert_key_error(without(&jwt, "kid"), 1, "kid");
    assert_key_error(with(&jwt, "kid", json!("")), 1, "kid");
    assert_key_error(with(&jwt, "x", json!("AAAA")), 1, "x");
    assert_key_error(with(&jwt, "y", json!("not base64!")), 1, "y");
    assert_key_error(without(&jwt, "crv"), 1, "crv");
    // Coordinates of the right size that are not on the curve.
    assert_key_error(
        with(&jwt, "y", json!(URL_SAFE_NO_PAD.encode([7u8; 32]))),
        1,
        "x",
    );

    let err = key_error(json!("a string"));
    assert!(
        matches!(err, BundleError::KeyNotAnObject { index: 1 }),
        "{err}"
    );
}

#[test]
fn malformed_documents() {
    let td = || td("example.org");
    let cases: Vec<(&[u8], &str)> = vec![
        (b"", "JSON"),
        (b"[]", "object"),
        (b"{}", "keys"),
        (br#"{"keys":{}}"#, "keys"),
        (br#"{"keys":[],"spiffe_sequence":-1}"#, "spiffe_sequence"),
        (br#"{"keys":[],"spiffe_sequence":1.5}"#, "spiffe_sequence"),
        (
            br#"{"keys":[],"spiffe_refresh_hint":"60"}"#,
            "spiffe_refresh_hint",
        ),
        (br#"{"keys":[],"keys":[]}"#, "duplicate"),
        (
            br#"{"keys":[{"use":"jwt-svid","use":"x509-svid","kty":"EC"}]}"#,
            "duplicate",
        ),
    ];
    for (json, needle) in cases {
        let err = Bundle::from_json(td(), json).unwrap_err();
        assert!(
            err.to_string().contains(needle),
            "{}: {err}",
            String::from_utf8_lossy(json)
        );
    }
    let empty = Bundle::from_json(td(), br#"{"keys":[]}"#).unwrap();
    assert_eq!(empty, Bundle::new(td()));
    let huge = vec![b' '; tether_spiffe::bundle::MAX_BUNDLE_JSON_BYTES + 1];
    assert!(matches!(
        Bundle::from_json(td(), &huge),
        Err(BundleError::TooLarge { .. })
    ));
}

#[test]
fn duplicate_jwt_kids_rejected() {
    let (mut bundle, key) = sample_bundle();
    bundle.jwt_authorities.push(key.authority());
    let text = bundle.to_json().unwrap();
    let err = Bundle::from_json(td("example.org"), text.as_bytes()).unwrap_err();
    assert!(
        matches!(
            err,
            BundleError::DuplicateKid {
                first: 2,
                second: 3,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn jwt_authority_constructor_checks_point() {
    let key = JwtKey::generate("a").unwrap();
    let auth = key.authority();
    assert_eq!(
        JwtAuthority::new("a", Curve::P256, &auth.public_key).unwrap(),
        auth
    );
    assert!(JwtAuthority::new("", Curve::P256, &auth.public_key).is_err());
    assert!(JwtAuthority::new("a", Curve::P384, &auth.public_key).is_err());
    assert!(JwtAuthority::new("a", Curve::P256, &[4u8; 65]).is_err());

    // A bundle holding a broken authority refuses to serialise it.
    let mut bundle = Bundle::new(td("example.org"));
    bundle.jwt_authorities.push(JwtAuthority {
        kid: "bad".into(),
        alg_curve: Curve::P256,
        public_key: vec![1, 2, 3],
    });
    assert!(matches!(
        bundle.to_json(),
        Err(BundleError::JwtAuthority { .. })
    ));
    let mut bundle = Bundle::new(td("example.org"));
    bundle.x509_authorities.push(b"garbage".to_vec());
    assert!(matches!(
        bundle.to_json(),
        Err(BundleError::X509Authority { index: 0, .. })
    ));
}
