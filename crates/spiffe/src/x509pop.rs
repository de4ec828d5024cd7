//! Node attestation by X.509 proof of possession: a node holds a key and a
//! certificate from an operator CA (a machine certificate from the
//! operator's own PKI), and proves it by signing its attestation request.
//!
//! What is signed binds the proof to this one request: the node name and a
//! SHA-256 of the CSR whose key the node SVID will certify. A replayed
//! request only gets an SVID for a key the replayer does not hold.
//! The node's name is the certificate's subject CN, so a certificate
//! attests one name only.

use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::prelude::FromDer as _;

use crate::x509::{MAX_CHAIN_LEN, SUPPORTED_SIG_ALGS};

const CONTEXT: &[u8] = b"tether x509pop v1\0";

/// Why a proof is refused; each names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum PopError {
    #[error("no certificate chain")]
    Empty,
    #[error("{0} certificates in the chain (at most {MAX_CHAIN_LEN})")]
    TooLong(usize),
    #[error("the node CA (--node-ca) has no usable certificate: {0}")]
    BadAnchor(webpki::Error),
    #[error("the certificate is not issued by the operator's node CA: {0}")]
    Untrusted(webpki::Error),
    #[error("the certificate cannot be read: {0}")]
    Parse(String),
    #[error("the certificate has no subject CN to name the node")]
    NoName,
    #[error("the certificate names node {cert:?}, the request {asked:?}")]
    NameMismatch { cert: String, asked: String },
    #[error("the signature does not verify with the certificate's key")]
    BadSignature,
}

/// The bytes a node signs for `node_name` and `csr`.
pub fn message(node_name: &str, csr: &[u8]) -> Vec<u8> {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, csr);
    let mut m = CONTEXT.to_vec();
    m.extend_from_slice(node_name.as_bytes());
    m.push(0);
    m.extend_from_slice(digest.as_ref());
    m
}

/// Verifies `chain` (leaf first) against `anchors` (DER certificates of the
/// operator's node CA) at `now`, for client authentication, and that the
/// leaf's key signed [`message`]`(node_name, csr)`.
pub fn verify(
    chain: &[Vec<u8>],
    anchors: &[Vec<u8>],
    node_name: &str,
    csr: &[u8],
    signature: &[u8],
    now: i64,
) -> Result<(), PopError> {
    let (leaf, intermediates) = chain.split_first().ok_or(PopError::Empty)?;
    if chain.len() > MAX_CHAIN_LEN {
        return Err(PopError::TooLong(chain.len()));
    }
    let anchor_ders: Vec<CertificateDer<'_>> = anchors
        .iter()
        .map(|d| CertificateDer::from(d.as_slice()))
        .collect();
    let anchors = anchor_ders
        .iter()
        .map(webpki::anchor_from_trusted_cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(PopError::BadAnchor)?;
    let inter: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .map(|d| CertificateDer::from(d.as_slice()))
        .collect();
    let leaf_der = CertificateDer::from(leaf.as_slice());
    let ee = webpki::EndEntityCert::try_from(&leaf_der).map_err(PopError::Untrusted)?;
    let time = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        u64::try_from(now).unwrap_or(0),
    ));
    ee.verify_for_usage(
        SUPPORTED_SIG_ALGS,
        &anchors,
        &inter,
        time,
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map_err(PopError::Untrusted)?;
    let name = common_name(leaf)?;
    if name != node_name {
        return Err(PopError::NameMismatch {
            cert: name,
            asked: node_name.to_owned(),
        });
    }
    let msg = message(node_name, csr);
    if SUPPORTED_SIG_ALGS
        .iter()
        .any(|alg| ee.verify_signature(*alg, &msg, signature).is_ok())
    {
        Ok(())
    } else {
        Err(PopError::BadSignature)
    }
}

/// The subject's one CN.
fn common_name(der: &[u8]) -> Result<String, PopError> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| PopError::Parse(e.to_string()))?;
    let mut cns = cert.subject().iter_common_name();
    let cn = cns.next().ok_or(PopError::NoName)?;
    if cns.next().is_some() {
        return Err(PopError::Parse("more than one subject CN".into()));
    }
    cn.as_str()
        .map(str::to_owned)
        .map_err(|e| PopError::Parse(format!("subject CN: {e}")))
}
