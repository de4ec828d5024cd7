//! SPIFFE bundles in their JWK Set form (SPIFFE_Trust_Domain_and_Bundle.md,
//! section 4; X509-SVID.md section 6; JWT-SVID.md bundle representation).
//!
//! A bundle is always held together with the name of the trust domain it is
//! authoritative for: the JSON itself does not name it, and trusting a bundle
//! for the wrong trust domain would let one domain mint identities of another.
//!
//! Parsing rules, in short:
//! * `keys` must be present; `spiffe_sequence` and `spiffe_refresh_hint`
//!   are optional non-negative integers; other top-level members are ignored.
//! * Every key must be an object with string `use` and `kty` members. Keys
//!   whose `use` or `kty` is unknown are skipped, as the spec requires.
//! * `x509-svid` keys without `x5c` (or with an empty one) are skipped; only
//!   the first certificate counts. It must be a CA certificate whose public
//!   key equals the one the JWK describes.
//! * `jwt-svid` keys need a unique `kid`. Only EC P-256/P-384 keys can be
//!   used to validate tokens here; other key types are skipped, which means
//!   tokens signed by them fail with an unknown `kid`.
//! * Any duplicate JSON member, anywhere, is an error.

use std::collections::HashMap;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rustls_pki_types::CertificateDer;
use serde_json::{Map, Value, json};
use x509_parser::certificate::X509Certificate;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_NIST_EC_P521,
    OID_PKCS1_RSAENCRYPTION, OID_SIG_ED25519,
};

use crate::id::TrustDomain;
use crate::json::parse_strict;

/// Largest bundle document accepted, so a hostile endpoint cannot make us
/// buffer and parse arbitrarily much.
pub const MAX_BUNDLE_JSON_BYTES: usize = 4 * 1024 * 1024;

const USE_X509_SVID: &str = "x509-svid";
const USE_JWT_SVID: &str = "jwt-svid";

/// Elliptic curves supported for JWT-SVID signing keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Curve {
    /// NIST P-256, used with ES256.
    P256,
    /// NIST P-384, used with ES384.
    P384,
}

impl Curve {
    /// The JWK `crv` name.
    pub fn jwk_crv(self) -> &'static str {
        match self {
            Curve::P256 => "P-256",
            Curve::P384 => "P-384",
        }
    }

    /// The JWS `alg` that goes with this curve.
    pub fn jws_alg(self) -> &'static str {
        match self {
            Curve::P256 => "ES256",
            Curve::P384 => "ES384",
        }
    }

    /// Length of one affine coordinate (and of r and s in a signature).
    pub fn coordinate_len(self) -> usize {
        match self {
            Curve::P256 => 32,
            Curve::P384 => 48,
        }
    }

    fn from_jwk_crv(crv: &str) -> Option<Self> {
        match crv {
            "P-256" => Some(Curve::P256),
            "P-384" => Some(Curve::P384),
            _ => None,
        }
    }

    pub(crate) fn verification_alg(
        self,
    ) -> &'static aws_lc_rs::signature::EcdsaVerificationAlgorithm {
        match self {
            Curve::P256 => &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED,
            Curve::P384 => &aws_lc_rs::signature::ECDSA_P384_SHA384_FIXED,
        }
    }
}

/// A JWT-SVID signing authority: the public half of a JWT signing key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtAuthority {
    /// Key ID, matched against the JWT `kid` header.
    pub kid: String,
    /// The key's curve, which fixes the JWS algorithm.
    pub alg_curve: Curve,
    /// Uncompressed SEC1 point: `0x04 || x || y`.
    pub public_key: Vec<u8>,
}

impl JwtAuthority {
    /// Builds an authority after checking that `kid` is non-empty and that
    /// `public_key` is an uncompressed point on `curve`.
    pub fn new(kid: &str, curve: Curve, public_key: &[u8]) -> Result<Self, BundleError> {
        let auth = JwtAuthority {
            kid: kid.to_owned(),
            alg_curve: curve,
            public_key: public_key.to_vec(),
        };
        auth.check().map_err(|problem| BundleError::JwtAuthority {
            kid: kid.to_owned(),
            problem,
        })?;
        Ok(auth)
    }

    /// The x and y coordinates, if the key is well-formed.
    fn coordinates(&self) -> Result<(&[u8], &[u8]), String> {
        let n = self.alg_curve.coordinate_len();
        match self.public_key.split_first() {
            Some((0x04, xy)) if xy.len() == 2 * n => Ok(xy.split_at(n)),
            _ => Err(format!(
                "public_key must be an uncompressed {} point (0x04 followed by {} bytes)",
                self.alg_curve.jwk_crv(),
                2 * n
            )),
        }
    }

    fn check(&self) -> Result<(), String> {
        if self.kid.is_empty() {
            return Err("kid must not be empty".to_owned());
        }
        self.coordinates()?;
        aws_lc_rs::signature::ParsedPublicKey::new(
            self.alg_curve.verification_alg(),
            &self.public_key,
        )
        .map_err(|_| format!("public_key is not a point on {}", self.alg_curve.jwk_crv()))?;
        Ok(())
    }

    fn to_jwk(&self) -> Result<Value, BundleError> {
        self.jwk_with_use(USE_JWT_SVID)
    }

    /// The key as an OIDC relying party expects it in a `jwks_uri` document:
    /// `"use": "sig"` (RFC 7517 4.2; JWKS clients skip other uses) and the
    /// one algorithm it signs with.
    pub fn to_oidc_jwk(&self) -> Result<Value, BundleError> {
        let mut jwk = self.jwk_with_use("sig")?;
        if let Some(o) = jwk.as_object_mut() {
            o.insert("alg".to_owned(), json!(self.alg_curve.jws_alg()));
        }
        Ok(jwk)
    }

    fn jwk_with_use(&self, use_: &str) -> Result<Value, BundleError> {
        let (x, y) = self
            .coordinates()
            .map_err(|problem| BundleError::JwtAuthority {
                kid: self.kid.clone(),
                problem,
            })?;
        Ok(json!({
            "use": use_,
            "kty": "EC",
            "kid": self.kid,
            "crv": self.alg_curve.jwk_crv(),
            "x": URL_SAFE_NO_PAD.encode(x),
            "y": URL_SAFE_NO_PAD.encode(y),
        }))
    }
}

/// Errors from reading or writing a SPIFFE bundle.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    #[error("bundle JSON is {len} bytes long (at most {MAX_BUNDLE_JSON_BYTES} accepted)")]
    TooLarge { len: usize },
    #[error("bundle is not valid JSON: {0}")]
    Json(#[source] serde_json::Error),
    #[error("bundle must be a JSON object (a JWK Set)")]
    NotAnObject,
    #[error("bundle member {field:?} {problem}")]
    Member {
        field: &'static str,
        problem: String,
    },
    #[error("bundle key #{index} must be a JSON object")]
    KeyNotAnObject { index: usize },
    #[error("bundle key #{index}: member {field:?} {problem}")]
    Key {
        index: usize,
        field: &'static str,
        problem: String,
    },
    #[error(
        "bundle keys #{first} and #{second} both use jwt-svid kid {kid:?} (kids must be unique)"
    )]
    DuplicateKid {
        kid: String,
        first: usize,
        second: usize,
    },
    #[error("x509 authority #{index} cannot be written as a JWK: {problem}")]
    X509Authority { index: usize, problem: String },
    #[error("JWT authority {kid:?}: {problem}")]
    JwtAuthority { kid: String, problem: String },
}

/// A trust domain's bundle: its X.509 and JWT signing authorities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// The trust domain these authorities are authoritative for.
    pub trust_domain: TrustDomain,
    /// X.509-SVID CA certificates (DER), used as trust anchors.
    pub x509_authorities: Vec<Vec<u8>>,
    /// JWT-SVID signing keys.
    pub jwt_authorities: Vec<JwtAuthority>,
    /// `spiffe_sequence`; 0 when the document had none.
    pub sequence: u64,
    /// `spiffe_refresh_hint`, in seconds.
    pub refresh_hint_secs: Option<u64>,
}

impl Bundle {
    /// An empty bundle for `td`.
    pub fn new(td: TrustDomain) -> Self {
        Bundle {
            trust_domain: td,
            x509_authorities: Vec::new(),
            jwt_authorities: Vec::new(),
            sequence: 0,
            refresh_hint_secs: None,
        }
    }

    /// The JWT authority with key ID `kid`, if any.
    pub fn jwt_authority(&self, kid: &str) -> Option<&JwtAuthority> {
        self.jwt_authorities.iter().find(|a| a.kid == kid)
    }

    /// Serialises the bundle as a SPIFFE bundle JWK Set.
    pub fn to_json(&self) -> Result<String, BundleError> {
        let mut keys = Vec::with_capacity(self.x509_authorities.len() + self.jwt_authorities.len());
        for (index, der) in self.x509_authorities.iter().enumerate() {
            keys.push(
                x509_authority_jwk(der)
                    .map_err(|problem| BundleError::X509Authority { index, problem })?,
            );
        }
        for auth in &self.jwt_authorities {
            keys.push(auth.to_jwk()?);
        }
        let mut root = Map::new();
        root.insert("keys".to_owned(), Value::Array(keys));
        root.insert("spiffe_sequence".to_owned(), Value::from(self.sequence));
        if let Some(hint) = self.refresh_hint_secs {
            root.insert("spiffe_refresh_hint".to_owned(), Value::from(hint));
        }
        serde_json::to_string(&Value::Object(root)).map_err(BundleError::Json)
    }

    /// Only the JWT authorities, as a JWK Set (`{"keys":[...]}`), which is
    /// what the Workload API's JWT bundles carry per trust domain.
    pub fn jwks_json(&self) -> Result<Vec<u8>, BundleError> {
        let keys = self
            .jwt_authorities
            .iter()
            .map(JwtAuthority::to_jwk)
            .collect::<Result<Vec<_>, _>>()?;
        serde_json::to_vec(&json!({ "keys": keys })).map_err(BundleError::Json)
    }

    /// All X.509 authorities as one concatenation of DER certificates, the
    /// form the Workload API uses for bundles.
    pub fn x509_authorities_der_concat(&self) -> Vec<u8> {
        self.x509_authorities.concat()
    }

    /// Parses a SPIFFE bundle document for trust domain `td`.
    pub fn from_json(td: TrustDomain, json: &[u8]) -> Result<Self, BundleError> {
        if json.len() > MAX_BUNDLE_JSON_BYTES {
            return Err(BundleError::TooLarge { len: json.len() });
        }
        let Value::Object(root) = parse_strict(json).map_err(BundleError::Json)? else {
            return Err(BundleError::NotAnObject);
        };
        let mut bundle = Bundle::new(td);
        bundle.sequence = optional_u64(&root, "spiffe_sequence")?.unwrap_or(0);
        bundle.refresh_hint_secs = optional_u64(&root, "spiffe_refresh_hint")?;

        let keys = match root.get("keys") {
            None => {
                return Err(BundleError::Member {
                    field: "keys",
                    problem: "is missing".to_owned(),
                });
            }
            Some(Value::Array(keys)) => keys,
            Some(_) => {
                return Err(BundleError::Member {
                    field: "keys",
                    problem: "must be an array".to_owned(),
                });
            }
        };

        // kid -> index of the key that introduced it, to report duplicates.
        let mut kid_index: HashMap<String, usize> = HashMap::new();
        for (index, key) in keys.iter().enumerate() {
            let Value::Object(key) = key else {
                return Err(BundleError::KeyNotAnObject { index });
            };
            match parse_key(key).map_err(|(field, problem)| BundleError::Key {
                index,
                field,
                problem,
            })? {
                ParsedKey::Skipped => {}
                ParsedKey::X509(der) => bundle.x509_authorities.push(der),
                ParsedKey::Jwt(auth) => {
                    if let Some(first) = kid_index.get(&auth.kid) {
                        return Err(BundleError::DuplicateKid {
                            kid: crate::id::clip(&auth.kid),
                            first: *first,
                            second: index,
                        });
                    }
                    kid_index.insert(auth.kid.clone(), index);
                    bundle.jwt_authorities.push(auth);
                }
            }
        }
        Ok(bundle)
    }
}

fn optional_u64(
    root: &Map<String, Value>,
    field: &'static str,
) -> Result<Option<u64>, BundleError> {
    match root.get(field) {
        None => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| BundleError::Member {
            field,
            problem: "must be a non-negative integer below 2^64".to_owned(),
        }),
    }
}

enum ParsedKey {
    Skipped,
    X509(Vec<u8>),
    Jwt(JwtAuthority),
}

type KeyProblem = (&'static str, String);

fn problem(field: &'static str, what: impl Into<String>) -> KeyProblem {
    (field, what.into())
}

fn required_str<'a>(
    key: &'a Map<String, Value>,
    field: &'static str,
) -> Result<&'a str, KeyProblem> {
    match key.get(field) {
        None => Err(problem(field, "is missing")),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(problem(field, "must be a string")),
    }
}

fn b64url_field(key: &Map<String, Value>, field: &'static str) -> Result<Vec<u8>, KeyProblem> {
    let s = required_str(key, field)?;
    let bytes = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|e| problem(field, format!("is not unpadded base64url: {e}")))?;
    if bytes.is_empty() {
        return Err(problem(field, "must not be empty"));
    }
    Ok(bytes)
}

fn parse_key(key: &Map<String, Value>) -> Result<ParsedKey, KeyProblem> {
    let key_use = required_str(key, "use")?;
    let kty = required_str(key, "kty")?;
    match key_use {
        USE_X509_SVID => parse_x509_key(key, kty),
        USE_JWT_SVID => parse_jwt_key(key, kty),
        // Unknown uses must be ignored so new SVID types can be added.
        _ => Ok(ParsedKey::Skipped),
    }
}

/// The public key a JWK describes, in the form a certificate's SPKI has.
#[derive(Debug, PartialEq, Eq)]
enum JwkPublicKey {
    /// curve OID name and SEC1 uncompressed point
    Ec {
        crv: &'static str,
        point: Vec<u8>,
    },
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    Ed25519(Vec<u8>),
}

/// Reads the key material of an x509-svid JWK; `None` for key types and
/// curves this crate does not know (the entry is then ignored).
fn jwk_public_key(key: &Map<String, Value>, kty: &str) -> Result<Option<JwkPublicKey>, KeyProblem> {
    match kty {
        "EC" => {
            let crv = required_str(key, "crv")?;
            let (crv, len) = match crv {
                "P-256" => ("P-256", 32),
                "P-384" => ("P-384", 48),
                "P-521" => ("P-521", 66),
                _ => return Ok(None),
            };
            let x = b64url_field(key, "x")?;
            let y = b64url_field(key, "y")?;
            if x.len() != len {
                return Err(problem(
                    "x",
                    format!("must be {len} bytes for {crv}, got {}", x.len()),
                ));
            }
            if y.len() != len {
                return Err(problem(
                    "y",
                    format!("must be {len} bytes for {crv}, got {}", y.len()),
                ));
            }
            let mut point = Vec::with_capacity(1 + 2 * len);
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            Ok(Some(JwkPublicKey::Ec { crv, point }))
        }
        "RSA" => {
            let n = b64url_field(key, "n")?;
            let e = b64url_field(key, "e")?;
            Ok(Some(JwkPublicKey::Rsa {
                n: strip_leading_zeros(&n).to_vec(),
                e: strip_leading_zeros(&e).to_vec(),
            }))
        }
        "OKP" => {
            if required_str(key, "crv")? != "Ed25519" {
                return Ok(None);
            }
            let x = b64url_field(key, "x")?;
            if x.len() != 32 {
                return Err(problem(
                    "x",
                    format!("must be 32 bytes for Ed25519, got {}", x.len()),
                ));
            }
            Ok(Some(JwkPublicKey::Ed25519(x)))
        }
        _ => Ok(None),
    }
}

fn strip_leading_zeros(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    &b[start..]
}

/// The certificate's public key in JWK terms, or why it cannot be expressed.
fn cert_public_key(cert: &X509Certificate<'_>) -> Result<JwkPublicKey, String> {
    let spki = cert.public_key();
    let alg = &spki.algorithm.algorithm;
    let data: &[u8] = &spki.subject_public_key.data;
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .ok_or_else(|| "EC public key has no named curve".to_owned())?;
        let (crv, len) = if curve == OID_EC_P256 {
            ("P-256", 32)
        } else if curve == OID_NIST_EC_P384 {
            ("P-384", 48)
        } else if curve == OID_NIST_EC_P521 {
            ("P-521", 66)
        } else {
            return Err(format!("unsupported EC curve {curve}"));
        };
        if data.len() != 1 + 2 * len || data.first() != Some(&0x04) {
            return Err(format!("EC public key is not an uncompressed {crv} point"));
        }
        Ok(JwkPublicKey::Ec {
            crv,
            point: data.to_vec(),
        })
    } else if *alg == OID_PKCS1_RSAENCRYPTION {
        match spki.parsed() {
            Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => Ok(JwkPublicKey::Rsa {
                n: strip_leading_zeros(rsa.modulus).to_vec(),
                e: strip_leading_zeros(rsa.exponent).to_vec(),
            }),
            _ => Err("RSA public key is malformed".to_owned()),
        }
    } else if *alg == OID_SIG_ED25519 {
        if data.len() != 32 {
            return Err("Ed25519 public key is not 32 bytes".to_owned());
        }
        Ok(JwkPublicKey::Ed25519(data.to_vec()))
    } else {
        Err(format!("unsupported public key algorithm {alg}"))
    }
}

fn parse_x509_key(key: &Map<String, Value>, kty: &str) -> Result<ParsedKey, KeyProblem> {
    let Some(jwk_key) = jwk_public_key(key, kty)? else {
        return Ok(ParsedKey::Skipped);
    };
    // X509-SVID.md 6.2: no x5c, or an empty one, means the entry is ignored;
    // of several certificates only the first counts.
    let first = match key.get("x5c") {
        None => return Ok(ParsedKey::Skipped),
        Some(Value::Array(certs)) => match certs.first() {
            None => return Ok(ParsedKey::Skipped),
            Some(Value::String(s)) => s,
            Some(_) => return Err(problem("x5c", "element 0 must be a string")),
        },
        Some(_) => return Err(problem("x5c", "must be an array of strings")),
    };
    // RFC 7517 4.7: x5c holds standard (not URL-safe) padded base64.
    let der = STANDARD
        .decode(first)
        .map_err(|e| problem("x5c", format!("element 0 is not standard base64: {e}")))?;
    let cert = match x509_parser::parse_x509_certificate(&der) {
        Ok(([], cert)) => cert,
        Ok(_) => {
            return Err(problem(
                "x5c",
                "element 0 has trailing data after the certificate",
            ));
        }
        Err(e) => {
            return Err(problem(
                "x5c",
                format!("element 0 is not a DER certificate: {e}"),
            ));
        }
    };
    match cert.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        _ => {
            return Err(problem(
                "x5c",
                "element 0 is not a CA certificate (basicConstraints cA must be true)",
            ));
        }
    }
    let cert_key = cert_public_key(&cert).map_err(|e| problem("x5c", format!("element 0: {e}")))?;
    if cert_key != jwk_key {
        return Err(problem(
            "x5c",
            "element 0's public key does not match the key described by the JWK",
        ));
    }
    webpki::anchor_from_trusted_cert(&CertificateDer::from(der.as_slice())).map_err(|e| {
        problem(
            "x5c",
            format!("element 0 is not usable as a trust anchor: {e}"),
        )
    })?;
    Ok(ParsedKey::X509(der))
}

fn parse_jwt_key(key: &Map<String, Value>, kty: &str) -> Result<ParsedKey, KeyProblem> {
    if kty != "EC" {
        return Ok(ParsedKey::Skipped);
    }
    let Some(curve) = Curve::from_jwk_crv(required_str(key, "crv")?) else {
        return Ok(ParsedKey::Skipped);
    };
    let kid = required_str(key, "kid")?;
    if kid.is_empty() {
        return Err(problem("kid", "must not be empty"));
    }
    let n = curve.coordinate_len();
    let x = b64url_field(key, "x")?;
    let y = b64url_field(key, "y")?;
    if x.len() != n {
        return Err(problem(
            "x",
            format!("must be {n} bytes for {}, got {}", curve.jwk_crv(), x.len()),
        ));
    }
    if y.len() != n {
        return Err(problem(
            "y",
            format!("must be {n} bytes for {}, got {}", curve.jwk_crv(), y.len()),
        ));
    }
    let mut point = Vec::with_capacity(1 + 2 * n);
    point.push(0x04);
    point.extend_from_slice(&x);
    point.extend_from_slice(&y);
    let auth = JwtAuthority {
        kid: kid.to_owned(),
        alg_curve: curve,
        public_key: point,
    };
    auth.check()
        .map_err(|_| problem("x", format!("(x, y) is not a point on {}", curve.jwk_crv())))?;
    Ok(ParsedKey::Jwt(auth))
}

/// JWK for an x509 authority: the key members derived from the certificate
/// plus the certificate itself in `x5c`. No `kid`, per X509-SVID.md 6.1.
fn x509_authority_jwk(der: &[u8]) -> Result<Value, String> {
    let cert = match x509_parser::parse_x509_certificate(der) {
        Ok(([], cert)) => cert,
        Ok(_) => return Err("trailing data after the certificate".to_owned()),
        Err(e) => return Err(format!("not a DER certificate: {e}")),
    };
    let mut jwk = Map::new();
    jwk.insert("use".to_owned(), json!(USE_X509_SVID));
    match cert_public_key(&cert)? {
        JwkPublicKey::Ec { crv, point } => {
            let n = (point.len() - 1) / 2;
            let (x, y) = point[1..].split_at(n);
            jwk.insert("kty".to_owned(), json!("EC"));
            jwk.insert("crv".to_owned(), json!(crv));
            jwk.insert("x".to_owned(), json!(URL_SAFE_NO_PAD.encode(x)));
            jwk.insert("y".to_owned(), json!(URL_SAFE_NO_PAD.encode(y)));
        }
        JwkPublicKey::Rsa { n, e } => {
            jwk.insert("kty".to_owned(), json!("RSA"));
            jwk.insert("n".to_owned(), json!(URL_SAFE_NO_PAD.encode(n)));
            jwk.insert("e".to_owned(), json!(URL_SAFE_NO_PAD.encode(e)));
        }
        JwkPublicKey::Ed25519(x) => {
            jwk.insert("kty".to_owned(), json!("OKP"));
            jwk.insert("crv".to_owned(), json!("Ed25519"));
            jwk.insert("x".to_owned(), json!(URL_SAFE_NO_PAD.encode(x)));
        }
    }
    jwk.insert("x5c".to_owned(), json!([STANDARD.encode(der)]));
    Ok(Value::Object(jwk))
}
