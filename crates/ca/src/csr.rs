use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType, SanType,
};
use rustls_pki_types::CertificateSigningRequestDer;
use tether_spiffe::SpiffeId;

use crate::{CaError, PrivateKey};

/// CSRs larger than this are refused before parsing: a P-256 CSR with one
/// URI SAN is a few hundred bytes.
pub const MAX_CSR_LEN: usize = 8 * 1024;

/// Builds a PKCS#10 CSR for `id`, signed by `key` (proof of possession).
pub fn build_csr(key: &PrivateKey, id: &SpiffeId) -> Result<Vec<u8>, CaError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Tether");
    params.distinguished_name = dn;
    params.subject_alt_names =
        vec![SanType::URI(id.as_str().try_into().map_err(|e| {
            CaError::Cert(format!("SPIFFE ID as URI SAN: {e}"))
        })?)];
    let csr = params.serialize_request(key)?;
    Ok(csr.der().to_vec())
}

/// What the server learns from a CSR it has verified.
pub struct CsrInfo {
    pub public_key: rcgen::PublicKey,
    /// URI SANs the requester asked for (the server decides what is issued;
    /// these are only checked for consistency).
    pub uri_sans: Vec<String>,
}

/// Parses a CSR and verifies its self-signature (proof that the requester
/// holds the private key). Only ECDSA P-256 and P-384 keys are accepted.
pub fn parse_csr(der: &[u8]) -> Result<CsrInfo, CaError> {
    if der.is_empty() {
        return Err(CaError::MalformedCsr("empty".into()));
    }
    if der.len() > MAX_CSR_LEN {
        return Err(CaError::MalformedCsr(format!(
            "{} bytes, limit {MAX_CSR_LEN}",
            der.len()
        )));
    }
    let parsed =
        CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(der))
            .map_err(|e| match e {
                rcgen::Error::InvalidCertificationRequestSignature => CaError::CsrRejected(
                    "signature does not verify (no proof of key possession)".into(),
                ),
                rcgen::Error::UnsupportedExtension => CaError::CsrRejected(
                    "requests an extension other than SAN, key usage or basic constraints".into(),
                ),
                other => CaError::MalformedCsr(other.to_string()),
            })?;
    let alg = parsed.public_key.algorithm();
    if alg != &rcgen::PKCS_ECDSA_P256_SHA256 && alg != &rcgen::PKCS_ECDSA_P384_SHA384 {
        return Err(CaError::CsrRejected(format!(
            "key algorithm {alg:?} not allowed; use ECDSA P-256 or P-384"
        )));
    }
    if matches!(parsed.params.is_ca, rcgen::IsCa::Ca(_)) {
        return Err(CaError::CsrRejected("requests a CA certificate".into()));
    }
    let mut uri_sans = Vec::new();
    for san in &parsed.params.subject_alt_names {
        match san {
            SanType::URI(u) => uri_sans.push(u.as_str().to_string()),
            SanType::DnsName(_) => {}
            other => return Err(CaError::CsrRejected(format!("unsupported SAN {other:?}"))),
        }
    }
    Ok(CsrInfo {
        public_key: parsed.public_key,
        uri_sans,
    })
}
