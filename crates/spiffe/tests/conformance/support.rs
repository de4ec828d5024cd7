//! Shared helpers: clocks, trust domains and rcgen-built certificates.

use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tether_spiffe::TrustDomain;

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

fn uri_san(uri: &str) -> SanType {
    SanType::URI(uri.try_into().unwrap())
}

/// A signing certificate with its key, able to issue further certificates.
pub struct Ca {
    pub der: Vec<u8>,
    pub issuer: Issuer<'static, KeyPair>,
}

fn ca_params(td: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![uri_san(&format!("spiffe://{td}"))];
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// A self-signed P-256 root for `td`.
pub fn root_ca(td: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let params = ca_params(td);
    let der = params.self_signed(&key).unwrap().der().to_vec();
    Ca {
        der,
        issuer: Issuer::new(params, key),
    }
}

/// A self-signed root with a P-384 key.
pub fn root_ca_p384(td: &str) -> Ca {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let params = ca_params(td);
    let der = params.self_signed(&key).unwrap().der().to_vec();
    Ca {
        der,
        issuer: Issuer::new(params, key),
    }
}

/// An intermediate signing certificate for `td` issued by `parent`.
pub fn intermediate_ca(parent: &Ca, td: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let params = ca_params(td);
    let der = params
        .signed_by(&key, &parent.issuer)
        .unwrap()
        .der()
        .to_vec();
    Ca {
        der,
        issuer: Issuer::new(params, key),
    }
}

/// Parameters of a conforming leaf X.509-SVID for `id`.
pub fn leaf_params(id: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![uri_san(id)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params
}

pub fn with_uris(mut params: CertificateParams, uris: &[&str]) -> CertificateParams {
    params.subject_alt_names = uris.iter().map(|u| uri_san(u)).collect();
    params
}

/// Issues a leaf from `params` under `ca`.
pub fn issue(params: &CertificateParams, ca: &Ca) -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    params.signed_by(&key, &ca.issuer).unwrap().der().to_vec()
}
