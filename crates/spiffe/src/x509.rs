//! X.509-SVID conformance checks and chain verification (X509-SVID.md).
//!
//! [`check_x509_svid_leaf`] applies the SPIFFE-specific leaf rules (sections
//! 2, 3.1, 4.1, 4.3, 4.4 and 5.2); [`verify_x509_svid`] adds RFC 5280 path
//! validation with rustls-webpki over aws-lc-rs, the signing-certificate
//! rules of section 3.2, and the trust domain binding between the leaf's
//! SPIFFE ID and the bundle.
//!
//! Choices where the spec leaves room:
//! * A leaf without basicConstraints is accepted: RFC 5280 defines an absent
//!   extension as cA=false, which is what section 4.1 requires.
//! * When a leaf has extendedKeyUsage, both serverAuth and clientAuth must be
//!   present (section 4.4), so an SVID works on either end of a connection.

use std::time::Duration;

use rustls_pki_types::{CertificateDer, SignatureVerificationAlgorithm, UnixTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{
    BasicConstraints, ExtendedKeyUsage, GeneralName, KeyUsage, ParsedExtension,
    SubjectAlternativeName,
};
use x509_parser::x509::X509Version;

use crate::bundle::Bundle;
use crate::id::{IdError, SpiffeId};

/// Longest chain (leaf plus intermediates) accepted; bounds path building.
pub const MAX_CHAIN_LEN: usize = 8;

/// Signature algorithms accepted in certificate chains, all from aws-lc-rs.
pub(crate) static SUPPORTED_SIG_ALGS: &[&dyn SignatureVerificationAlgorithm] = &[
    webpki::aws_lc_rs::ECDSA_P256_SHA256,
    webpki::aws_lc_rs::ECDSA_P256_SHA384,
    webpki::aws_lc_rs::ECDSA_P384_SHA256,
    webpki::aws_lc_rs::ECDSA_P384_SHA384,
    webpki::aws_lc_rs::ECDSA_P521_SHA256,
    webpki::aws_lc_rs::ECDSA_P521_SHA384,
    webpki::aws_lc_rs::ECDSA_P521_SHA512,
    webpki::aws_lc_rs::ED25519,
    webpki::aws_lc_rs::RSA_PKCS1_2048_8192_SHA256,
    webpki::aws_lc_rs::RSA_PKCS1_2048_8192_SHA384,
    webpki::aws_lc_rs::RSA_PKCS1_2048_8192_SHA512,
    webpki::aws_lc_rs::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
    webpki::aws_lc_rs::RSA_PSS_2048_8192_SHA384_LEGACY_KEY,
    webpki::aws_lc_rs::RSA_PSS_2048_8192_SHA512_LEGACY_KEY,
];

/// Why a certificate or chain is not an acceptable X.509-SVID.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SvidError {
    #[error("{which} is not a DER X.509 certificate: {problem}")]
    Parse { which: String, problem: String },
    #[error("{which} is not an X.509 v3 certificate")]
    NotV3 { which: String },
    #[error("{which} has invalid extensions: {problem}")]
    Extensions { which: String, problem: String },
    #[error("leaf has no subjectAltName extension (an X.509-SVID needs exactly one URI SAN)")]
    NoSubjectAltName,
    #[error("leaf subjectAltName contains a malformed entry")]
    MalformedSubjectAltName,
    #[error("leaf has {count} URI SANs (an X.509-SVID must have exactly one)")]
    UriSanCount { count: usize },
    #[error("leaf URI SAN is not a valid SPIFFE ID: {0}")]
    InvalidSpiffeId(#[source] IdError),
    #[error("leaf SPIFFE ID {0} has no path (a leaf SVID needs a non-root path)")]
    NoPath(String),
    #[error("leaf has an empty subject, so its subjectAltName extension must be critical")]
    SubjectAltNameNotCritical,
    #[error("leaf has basicConstraints cA=true (a leaf X.509-SVID must not be a CA)")]
    LeafIsCa,
    #[error("leaf has no keyUsage extension (required on every X.509-SVID)")]
    NoKeyUsage,
    #[error("leaf keyUsage extension is not marked critical")]
    KeyUsageNotCritical,
    #[error("leaf keyUsage lacks digitalSignature")]
    NoDigitalSignature,
    #[error("leaf keyUsage sets keyCertSign (only signing certificates may)")]
    KeyCertSign,
    #[error("leaf keyUsage sets cRLSign (only signing certificates may)")]
    CrlSign,
    #[error(
        "leaf extendedKeyUsage lacks {0} (serverAuth and clientAuth are both required when the extension is present)"
    )]
    MissingExtendedKeyUsage(&'static str),
    #[error("certificate chain is empty")]
    EmptyChain,
    #[error("certificate chain has {len} certificates (at most {MAX_CHAIN_LEN} accepted)")]
    ChainTooLong { len: usize },
    #[error("intermediate #{index} is not an X.509-SVID signing certificate: {problem}")]
    BadIntermediate { index: usize, problem: String },
    #[error("leaf SPIFFE ID {id} is not in the bundle's trust domain {expected}")]
    TrustDomainMismatch { id: String, expected: String },
    #[error("the bundle for trust domain {0} has no X.509 authorities")]
    NoAuthorities(String),
    #[error("bundle X.509 authority #{index} is not a usable trust anchor: {error}")]
    BadAuthority { index: usize, error: webpki::Error },
    #[error("verification time {0} is before the Unix epoch")]
    BadTime(i64),
    #[error("certificate chain does not verify against the bundle: {0}")]
    Verify(#[source] webpki::Error),
}

/// The extensions the SPIFFE rules look at, after rejecting duplicates and
/// malformed encodings.
#[derive(Default)]
struct SvidExtensions<'c, 'a> {
    san: Option<(bool, &'c SubjectAlternativeName<'a>)>,
    basic_constraints: Option<&'c BasicConstraints>,
    key_usage: Option<(bool, &'c KeyUsage)>,
    extended_key_usage: Option<&'c ExtendedKeyUsage<'a>>,
}

fn parse_cert<'a>(der: &'a [u8], which: &str) -> Result<X509Certificate<'a>, SvidError> {
    let cert = match x509_parser::parse_x509_certificate(der) {
        Ok(([], cert)) => cert,
        Ok(_) => {
            return Err(SvidError::Parse {
                which: which.to_owned(),
                problem: "trailing data after the certificate".to_owned(),
            });
        }
        Err(e) => {
            return Err(SvidError::Parse {
                which: which.to_owned(),
                problem: e.to_string(),
            });
        }
    };
    if cert.version() != X509Version::V3 {
        return Err(SvidError::NotV3 {
            which: which.to_owned(),
        });
    }
    Ok(cert)
}

fn scan_extensions<'c, 'a>(
    cert: &'c X509Certificate<'a>,
    which: &str,
) -> Result<SvidExtensions<'c, 'a>, SvidError> {
    let invalid = |problem: String| SvidError::Extensions {
        which: which.to_owned(),
        problem,
    };
    // RFC 5280 4.2: an extension must not appear more than once.
    cert.extensions_map()
        .map_err(|_| invalid("an extension appears more than once".to_owned()))?;
    let mut out = SvidExtensions::default();
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::ParseError { error } => {
                return Err(invalid(format!(
                    "extension {} is malformed: {error}",
                    ext.oid
                )));
            }
            ParsedExtension::SubjectAlternativeName(san) => out.san = Some((ext.critical, san)),
            ParsedExtension::BasicConstraints(bc) => out.basic_constraints = Some(bc),
            ParsedExtension::KeyUsage(ku) => out.key_usage = Some((ext.critical, ku)),
            ParsedExtension::ExtendedKeyUsage(eku) => out.extended_key_usage = Some(eku),
            _ => {}
        }
    }
    Ok(out)
}

/// Checks that `der` is a conforming leaf X.509-SVID and returns its SPIFFE
/// ID. This does not check signatures, validity dates or trust; see
/// [`verify_x509_svid`].
pub fn check_x509_svid_leaf(der: &[u8]) -> Result<SpiffeId, SvidError> {
    let cert = parse_cert(der, "leaf")?;
    let exts = scan_extensions(&cert, "leaf")?;

    // Section 2: exactly one URI SAN, which is the SPIFFE ID.
    let (san_critical, san) = exts.san.ok_or(SvidError::NoSubjectAltName)?;
    let mut uris = Vec::new();
    for name in &san.general_names {
        match name {
            GeneralName::URI(uri) => uris.push(*uri),
            GeneralName::Invalid(..) => return Err(SvidError::MalformedSubjectAltName),
            _ => {}
        }
    }
    let [uri] = uris.as_slice() else {
        return Err(SvidError::UriSanCount { count: uris.len() });
    };
    let id = SpiffeId::parse(uri).map_err(SvidError::InvalidSpiffeId)?;
    // Sections 3.1 and 5.2: a leaf identifies a workload, never a domain.
    if !id.has_path() {
        return Err(SvidError::NoPath(id.to_string()));
    }
    // Section 3.1, RFC 5280 4.1.2.6.
    if cert.subject().iter().next().is_none() && !san_critical {
        return Err(SvidError::SubjectAltNameNotCritical);
    }

    // Sections 4.1 and 5.2.
    if exts.basic_constraints.is_some_and(|bc| bc.ca) {
        return Err(SvidError::LeafIsCa);
    }

    // Sections 4.3 and 5.2.
    let (ku_critical, ku) = exts.key_usage.ok_or(SvidError::NoKeyUsage)?;
    if !ku_critical {
        return Err(SvidError::KeyUsageNotCritical);
    }
    if ku.key_cert_sign() {
        return Err(SvidError::KeyCertSign);
    }
    if ku.crl_sign() {
        return Err(SvidError::CrlSign);
    }
    if !ku.digital_signature() {
        return Err(SvidError::NoDigitalSignature);
    }

    // Section 4.4.
    if let Some(eku) = exts.extended_key_usage {
        if !eku.server_auth {
            return Err(SvidError::MissingExtendedKeyUsage("serverAuth"));
        }
        if !eku.client_auth {
            return Err(SvidError::MissingExtendedKeyUsage("clientAuth"));
        }
    }
    Ok(id)
}

/// Section 3.2 rules for a signing certificate presented in a chain.
fn check_signing_cert(der: &[u8], index: usize) -> Result<(), SvidError> {
    let which = format!("intermediate #{index}");
    let cert = parse_cert(der, &which)?;
    let exts = scan_extensions(&cert, &which)?;
    let bad = |problem: &str| SvidError::BadIntermediate {
        index,
        problem: problem.to_owned(),
    };
    if !exts.basic_constraints.is_some_and(|bc| bc.ca) {
        return Err(bad("basicConstraints cA must be true"));
    }
    let (ku_critical, ku) = exts
        .key_usage
        .ok_or_else(|| bad("keyUsage extension is missing"))?;
    if !ku_critical {
        return Err(bad("keyUsage extension must be critical"));
    }
    if !ku.key_cert_sign() {
        return Err(bad("keyUsage must include keyCertSign"));
    }
    if let Some((_, san)) = exts.san {
        for name in &san.general_names {
            if let GeneralName::URI(uri) = name {
                let id = SpiffeId::parse(uri).map_err(|e| SvidError::BadIntermediate {
                    index,
                    problem: format!("URI SAN is not a valid SPIFFE ID: {e}"),
                })?;
                if id.has_path() {
                    return Err(bad(
                        "the SPIFFE ID of a signing certificate must not have a path",
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Verifies `chain` (leaf first, then any intermediates) against the X.509
/// authorities of `bundle` at `now_unix`, and returns the leaf's SPIFFE ID,
/// which is guaranteed to be in `bundle.trust_domain`.
pub fn verify_x509_svid(
    chain: &[Vec<u8>],
    bundle: &Bundle,
    now_unix: i64,
) -> Result<SpiffeId, SvidError> {
    let (leaf, intermediates) = chain.split_first().ok_or(SvidError::EmptyChain)?;
    if chain.len() > MAX_CHAIN_LEN {
        return Err(SvidError::ChainTooLong { len: chain.len() });
    }
    let id = check_x509_svid_leaf(leaf)?;
    // Validators must pick the bundle by the SVID's trust domain; a bundle
    // for another domain must never vouch for this ID.
    if id.trust_domain() != &bundle.trust_domain {
        return Err(SvidError::TrustDomainMismatch {
            id: id.to_string(),
            expected: bundle.trust_domain.to_string(),
        });
    }
    for (i, der) in intermediates.iter().enumerate() {
        check_signing_cert(der, i + 1)?;
    }
    if bundle.x509_authorities.is_empty() {
        return Err(SvidError::NoAuthorities(bundle.trust_domain.to_string()));
    }
    let time = u64::try_from(now_unix)
        .map(|secs| UnixTime::since_unix_epoch(Duration::from_secs(secs)))
        .map_err(|_| SvidError::BadTime(now_unix))?;

    let anchor_ders: Vec<CertificateDer<'_>> = bundle
        .x509_authorities
        .iter()
        .map(|der| CertificateDer::from(der.as_slice()))
        .collect();
    let anchors = anchor_ders
        .iter()
        .enumerate()
        .map(|(index, der)| {
            webpki::anchor_from_trusted_cert(der)
                .map_err(|error| SvidError::BadAuthority { index, error })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let intermediate_ders: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .map(|der| CertificateDer::from(der.as_slice()))
        .collect();
    let leaf_der = CertificateDer::from(leaf.as_slice());
    let end_entity = webpki::EndEntityCert::try_from(&leaf_der).map_err(SvidError::Verify)?;
    // The leaf check already demands both serverAuth and clientAuth when the
    // extension is present, so asking webpki for clientAuth loses nothing;
    // it also applies the EKU to intermediates that carry one.
    end_entity
        .verify_for_usage(
            SUPPORTED_SIG_ALGS,
            &anchors,
            &intermediate_ders,
            time,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(SvidError::Verify)?;
    Ok(id)
}

/// Splits concatenated DER certificates (the Workload API's encoding).
pub fn split_certificates(mut der: &[u8]) -> Result<Vec<Vec<u8>>, SvidError> {
    let mut out = Vec::new();
    while !der.is_empty() {
        if out.len() >= MAX_CHAIN_LEN {
            return Err(SvidError::ChainTooLong { len: out.len() + 1 });
        }
        let (rest, _) = x509_parser::parse_x509_certificate(der).map_err(|e| SvidError::Parse {
            which: format!("certificate {}", out.len() + 1),
            problem: e.to_string(),
        })?;
        out.push(der[..der.len() - rest.len()].to_vec());
        der = rest;
    }
    Ok(out)
}

/// The organizational unit of mesh SVIDs: certificates a node's agent
/// holds for tunnels to other agents and never hands to a process. Only
/// the server issues them, only on the asking node's authenticated channel,
/// and it names that node in the subject's common name.
pub const MESH_OU: &str = "tether-mesh";

/// The node a mesh SVID was issued to, or None for any other certificate
/// (a workload's SVID from the Workload API among them).
pub fn mesh_node(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let ou_ok = subject
        .iter_organizational_unit()
        .any(|a| a.as_str() == Ok(MESH_OU));
    if !ou_ok {
        return None;
    }
    let mut cns = subject.iter_common_name();
    let cn = cns.next()?.as_str().ok()?.to_string();
    // Exactly one name: an ambiguous subject names no node.
    cns.next().is_none().then_some(cn)
}

/// The IP address SANs of a certificate (what a node SVID vouches for).
pub fn ip_sans(der: &[u8]) -> Vec<std::net::IpAddr> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::IPAddress(b) => match b.len() {
                4 => <[u8; 4]>::try_from(*b).ok().map(std::net::IpAddr::from),
                16 => <[u8; 16]>::try_from(*b).ok().map(std::net::IpAddr::from),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// The certificate's notAfter as Unix time, if it parses.
pub fn not_after(der: &[u8]) -> Option<i64> {
    x509_parser::parse_x509_certificate(der)
        .ok()
        .map(|(_, c)| c.validity().not_after.timestamp())
}
