//! The per-node intercepting CA for HTTPS injection: a self-signed root the
//! agent makes and holds, short-lived, name-constrained to the hostnames of
//! the Services it intercepts, trusted only by the processes it is
//! delivered to. It is never part of the SPIFFE trust bundle and never
//! signs anything but TLS server leaves for those names (no URI SANs: it
//! cannot mint SVIDs, and its name constraints would refuse them anyway).

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    GeneralSubtree, IsCa, Issuer, KeyUsagePurpose, NameConstraints, SanType,
};
use rustls_pki_types::CertificateDer;

use crate::{CaError, PrivateKey, unix_to_time};

/// Backdating, as for SVIDs (a client's clock slightly behind).
const BACKDATE_SECS: i64 = 30;

/// A CA made by [`new_intercept_ca`].
pub struct InterceptCa {
    pub cert_der: Vec<u8>,
    pub key: PrivateKey,
    pub not_after: i64,
}

/// A new intercepting CA for `node`, valid for `ttl_secs`, that may only
/// issue for `names` (DNS names; a name also permits its subdomains, as
/// RFC 5280 name constraints do).
pub fn new_intercept_ca(
    node: &str,
    names: &[String],
    now: i64,
    ttl_secs: i64,
) -> Result<InterceptCa, CaError> {
    if names.is_empty() {
        return Err(CaError::Cert(
            "an intercepting CA needs at least one hostname to be constrained to".into(),
        ));
    }
    let key = PrivateKey::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Tether");
    dn.push(
        DnType::CommonName,
        format!("Tether intercepting CA, node {node}"),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.name_constraints = Some(NameConstraints {
        permitted_subtrees: names
            .iter()
            .map(|n| GeneralSubtree::DnsName(n.clone()))
            .collect(),
        // DNS names only: every IP address is excluded (RFC 5280 leaves
        // other name forms unconstrained otherwise).
        excluded_subtrees: vec![
            GeneralSubtree::IpAddress(rcgen::CidrSubnet::V4([0; 4], [0; 4])),
            GeneralSubtree::IpAddress(rcgen::CidrSubnet::V6([0; 16], [0; 16])),
        ],
    });
    params.not_before = unix_to_time(now - BACKDATE_SECS)?;
    params.not_after = unix_to_time(now + ttl_secs)?;
    params.serial_number = Some(crate::authority::random_serial());
    let cert = params.self_signed(&key)?;
    Ok(InterceptCa {
        cert_der: cert.der().to_vec(),
        key,
        not_after: now + ttl_secs,
    })
}

/// A TLS server leaf for `name` (DNS SAN only), signed by `ca`, with a key
/// of its own; valid until `not_after` (at most the CA's).
pub fn sign_intercept_leaf(
    ca: &InterceptCa,
    name: &str,
    now: i64,
    not_after: i64,
) -> Result<(Vec<u8>, PrivateKey), CaError> {
    let key = PrivateKey::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.subject_alt_names =
        vec![SanType::DnsName(name.try_into().map_err(|e| {
            CaError::Cert(format!("hostname {name:?}: {e}"))
        })?)];
    params.not_before = unix_to_time(now - BACKDATE_SECS)?;
    params.not_after = unix_to_time(not_after.min(ca.not_after))?;
    params.serial_number = Some(crate::authority::random_serial());
    params.use_authority_key_identifier_extension = true;
    let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(ca.cert_der.as_slice()), &ca.key)?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.der().to_vec(), key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_is_constrained_and_its_leaves_verify_for_their_name_only() {
        let now = 1_800_000_000;
        let ca = new_intercept_ca("n1", &["web.example".into()], now, 3600).expect("ca");
        let (leaf, _) = sign_intercept_leaf(&ca, "web.example", now, now + 600).expect("leaf");
        let anchor =
            webpki::anchor_from_trusted_cert(&CertificateDer::from(ca.cert_der.as_slice()))
                .expect("anchor")
                .to_owned();
        let leaf_der = CertificateDer::from(leaf.as_slice());
        let ee = webpki::EndEntityCert::try_from(&leaf_der).expect("ee");
        let t = rustls_pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            now as u64 + 10,
        ));
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            std::slice::from_ref(&anchor),
            &[],
            t,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .expect("chains to the CA");
        let name = rustls_pki_types::ServerName::try_from("web.example").expect("name");
        ee.verify_is_valid_for_subject_name(&name)
            .expect("its name");
        // A leaf outside the constraint does not verify, even signed by it.
        let (bad, _) = sign_intercept_leaf(&ca, "bank.example", now, now + 600).expect("leaf");
        let bad_der = CertificateDer::from(bad.as_slice());
        let bad_ee = webpki::EndEntityCert::try_from(&bad_der).expect("ee");
        assert!(
            bad_ee
                .verify_for_usage(
                    webpki::ALL_VERIFICATION_ALGS,
                    &[anchor],
                    &[],
                    t,
                    webpki::KeyUsage::server_auth(),
                    None,
                    None,
                )
                .is_err(),
            "a name outside the constraint verified"
        );
        assert!(new_intercept_ca("n1", &[], now, 3600).is_err());
    }
}
