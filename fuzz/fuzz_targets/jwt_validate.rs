//! Fuzzes JWT-SVID validation.
//!
//! The first byte picks a mode: either the rest is a whole token, or it is
//! a claims set (or header) that gets a genuine signature, so the fuzzer
//! also reaches the claim checks behind signature verification.

#![no_main]

use std::sync::OnceLock;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use libfuzzer_sys::fuzz_target;
use tether_spiffe::jwt::{self, JwtKey};
use tether_spiffe::{Bundle, TrustDomain};

const NOW: i64 = 1_700_000_000;

struct Fixture {
    pair: EcdsaKeyPair,
    bundle: Bundle,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let key = JwtKey::generate("fuzz").expect("key generation");
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, key.pkcs8_der())
            .expect("own key reloads");
        let mut bundle = Bundle::new(TrustDomain::new("example.org").expect("valid td"));
        bundle.jwt_authorities.push(key.authority());
        Fixture { pair, bundle }
    })
}

fn signed(f: &Fixture, header: &[u8], claims: &[u8]) -> String {
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

fuzz_target!(|data: &[u8]| {
    let f = fixture();
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
    if let Ok((id, claims)) = jwt::validate(&token, "svc", &f.bundle, NOW) {
        // Whatever passes must satisfy the spec's requirements.
        assert_eq!(id.trust_domain(), &f.bundle.trust_domain);
        assert_eq!(claims.sub, id.as_str());
        assert!(claims.aud.iter().any(|a| a == "svc"));
        assert!(claims.exp + jwt::CLOCK_SKEW_LEEWAY_SECS > NOW);
    }
});
