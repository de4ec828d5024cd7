use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use tether_spiffe::{SpiffeId, TrustDomain};
use zeroize::Zeroizing;

use crate::{CaError, PrivateKey, parse_csr, unix_to_time};

/// Certificates are backdated this much so a peer whose clock is slightly
/// behind does not reject a fresh SVID as "not yet valid".
const BACKDATE_SECS: i64 = 30;

/// A CA as stored: its certificate, key, and the chain from it up to (not
/// including) the trust anchor in the bundle.
#[derive(Clone)]
pub struct CaMaterial {
    pub cert_der: Vec<u8>,
    pub key_pkcs8: Zeroizing<Vec<u8>>,
    pub chain: Vec<Vec<u8>>,
    /// The certificates that go into the trust bundle for this CA.
    pub anchors: Vec<Vec<u8>>,
    pub not_after: i64,
}

/// An operator-provided CA that Tether's signing CAs chain to.
pub struct Upstream {
    /// The upstream CA certificate first, then its chain to the root.
    pub chain: Vec<Vec<u8>>,
    pub key: PrivateKey,
    pub not_after: i64,
}

impl Upstream {
    /// Loads an upstream CA from PEM: `cert_pem` holds the CA certificate
    /// (optionally followed by its chain to a root), `key_pem` its P-256 key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        use rustls_pki_types::pem::PemObject;
        let chain: Vec<Vec<u8>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .map(|c| c.map(|c| c.to_vec()))
            .collect::<Result<_, _>>()
            .map_err(|e| CaError::Upstream(format!("certificate PEM: {e}")))?;
        let first = chain
            .first()
            .ok_or_else(|| CaError::Upstream("no certificate in PEM".into()))?;
        let key = PrivateKey::from_pem(key_pem)?;
        // Tether adds one intermediate below the upstream CA, so every CA in
        // the supplied chain must allow one more CA below it than the chain
        // already has, and must be allowed to sign certificates. Otherwise
        // relying parties (OpenSSL, browsers) would reject every SVID.
        for (i, der) in chain.iter().enumerate() {
            let (_, c) = x509_parser::parse_x509_certificate(der).map_err(|e| {
                CaError::Upstream(format!("certificate {} of the chain: {e}", i + 1))
            })?;
            let which = if i == 0 {
                "certificate".to_string()
            } else {
                format!("chain certificate {}", i + 1)
            };
            if !c.is_ca() {
                return Err(CaError::Upstream(format!(
                    "{which} is not a CA (basicConstraints cA is not true)"
                )));
            }
            if let Ok(Some(bc)) = c.basic_constraints()
                && let Some(len) = bc.value.path_len_constraint
                && (len as usize) < i + 1
            {
                return Err(CaError::Upstream(format!(
                    "{which} has pathLenConstraint {len}, which leaves no room for Tether's intermediate CA (needs at least {})",
                    i + 1
                )));
            }
            if let Ok(Some(ku)) = c.key_usage()
                && !ku.value.key_cert_sign()
            {
                return Err(CaError::Upstream(format!(
                    "{which} has a keyUsage without keyCertSign; it cannot sign CAs"
                )));
            }
        }
        let (_, cert) = x509_parser::parse_x509_certificate(first)
            .map_err(|e| CaError::Upstream(format!("certificate: {e}")))?;
        if cert.public_key().raw != key.spki_der().as_slice() {
            return Err(CaError::Upstream(
                "private key does not match the certificate".into(),
            ));
        }
        let not_after = cert.validity().not_after.timestamp();
        Ok(Upstream {
            chain,
            key,
            not_after,
        })
    }
}

fn ca_params(
    td: &TrustDomain,
    cn: &str,
    not_before: i64,
    not_after: i64,
) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Tether");
    dn.push(DnType::CommonName, format!("{cn} {}", td.as_str()));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.subject_alt_names =
        vec![SanType::URI(td.id_string().try_into().map_err(|e| {
            CaError::Cert(format!("trust domain URI: {e}"))
        })?)];
    params.not_before = unix_to_time(not_before - BACKDATE_SECS)?;
    params.not_after = unix_to_time(not_after)?;
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// A new self-signed root for `td`, valid for `ttl_secs` from `now`.
pub fn new_self_signed_ca(
    td: &TrustDomain,
    ttl_secs: i64,
    now: i64,
) -> Result<CaMaterial, CaError> {
    let key = PrivateKey::generate()?;
    let mut params = ca_params(td, "Tether CA", now, now + ttl_secs)?;
    params.use_authority_key_identifier_extension = false;
    let cert = params.self_signed(&key)?;
    Ok(CaMaterial {
        cert_der: cert.der().to_vec(),
        key_pkcs8: Zeroizing::new(key.pkcs8_der().to_vec()),
        chain: Vec::new(),
        anchors: vec![cert.der().to_vec()],
        not_after: now + ttl_secs,
    })
}

/// A new intermediate CA signed by the operator's upstream CA. Its lifetime
/// is capped at the upstream's.
pub fn new_intermediate_ca(
    td: &TrustDomain,
    upstream: &Upstream,
    ttl_secs: i64,
    now: i64,
) -> Result<CaMaterial, CaError> {
    let not_after = (now + ttl_secs).min(upstream.not_after);
    if not_after <= now {
        return Err(CaError::Expired {
            not_after: upstream.not_after,
            now,
        });
    }
    let key = PrivateKey::generate()?;
    let params = ca_params(td, "Tether intermediate CA", now, not_after)?;
    let first = upstream
        .chain
        .first()
        .ok_or_else(|| CaError::Upstream("empty chain".into()))?;
    let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(first.as_slice()), &upstream.key)?;
    let cert = params.signed_by(&key, &issuer)?;
    // The last certificate of the upstream chain is the trust anchor; the
    // ones before it travel with every SVID.
    let (anchor, between) = upstream
        .chain
        .split_last()
        .ok_or_else(|| CaError::Upstream("empty chain".into()))?;
    Ok(CaMaterial {
        cert_der: cert.der().to_vec(),
        key_pkcs8: Zeroizing::new(key.pkcs8_der().to_vec()),
        chain: between.to_vec(),
        anchors: vec![anchor.clone()],
        not_after,
    })
}

pub(crate) fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive INTEGER, no leading zero issue: clear the top bit, set a low one.
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

/// What an SVID carries besides its SPIFFE ID.
#[derive(Debug, Clone, Copy, Default)]
pub struct SvidExtras<'a> {
    pub dns_names: &'a [String],
    /// IP SANs: the addresses a node SVID vouches for.
    pub ip_addresses: &'a [std::net::IpAddr],
    /// Marks a mesh SVID issued at this node's request (see
    /// `tether_spiffe::x509::mesh_node`).
    pub mesh_node: Option<&'a str>,
}

/// A leaf certificate and the intermediates that go with it.
#[derive(Debug, Clone)]
pub struct SignedCert {
    /// Leaf first, then intermediates up to (not including) the anchor.
    pub chain: Vec<Vec<u8>>,
    pub not_after: i64,
    pub serial_hex: String,
}

/// A CA ready to sign.
pub struct Signer {
    issuer: Issuer<'static, PrivateKey>,
    /// Certificates sent after the leaf: this CA unless it is itself the
    /// trust anchor, then its chain up to (not including) the anchor.
    intermediates: Vec<Vec<u8>>,
    not_after: i64,
}

impl Signer {
    pub fn new(m: &CaMaterial) -> Result<Self, CaError> {
        let key = PrivateKey::from_pkcs8(&m.key_pkcs8)?;
        let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(m.cert_der.as_slice()), key)?;
        let mut intermediates = Vec::new();
        // Decided by the anchors, not by comparing names: an intermediate
        // may carry the same DN as its issuer.
        if !m.anchors.contains(&m.cert_der) {
            intermediates.push(m.cert_der.clone());
            intermediates.extend(m.chain.iter().cloned());
        }
        Ok(Signer {
            issuer,
            intermediates,
            not_after: m.not_after,
        })
    }

    pub fn not_after(&self) -> i64 {
        self.not_after
    }

    /// Signs an X.509-SVID for `id` over the public key in `csr_der`, with
    /// DNS SANs (see [`sign_svid_with`](Self::sign_svid_with)).
    pub fn sign_svid(
        &self,
        csr_der: &[u8],
        id: &SpiffeId,
        dns_names: &[String],
        ttl_secs: i64,
        now: i64,
    ) -> Result<SignedCert, CaError> {
        let extras = SvidExtras {
            dns_names,
            ..SvidExtras::default()
        };
        self.sign_svid_with(csr_der, id, &extras, ttl_secs, now)
    }

    /// Signs an X.509-SVID for `id` over the public key in `csr_der`.
    ///
    /// The caller has already decided that the requester may hold `id`; this
    /// checks proof of possession and that the CSR does not ask for another
    /// identity, then issues a certificate built only from Tether's own
    /// parameters. The lifetime is capped at the CA's.
    pub fn sign_svid_with(
        &self,
        csr_der: &[u8],
        id: &SpiffeId,
        extras: &SvidExtras<'_>,
        ttl_secs: i64,
        now: i64,
    ) -> Result<SignedCert, CaError> {
        if now >= self.not_after {
            return Err(CaError::Expired {
                not_after: self.not_after,
                now,
            });
        }
        if ttl_secs <= 0 {
            return Err(CaError::CsrRejected(format!(
                "TTL must be positive, got {ttl_secs}"
            )));
        }
        let csr = parse_csr(csr_der)?;
        for uri in &csr.uri_sans {
            if uri != id.as_str() {
                return Err(CaError::CsrRejected(format!(
                    "CSR asks for URI SAN {uri:?}, but {id} was requested"
                )));
            }
        }
        let not_after = (now + ttl_secs).min(self.not_after);
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Tether");
        if let Some(node) = extras.mesh_node {
            // An SVID for tunnels between agents only: the node that asked
            // for it (on its authenticated channel) is named in the subject.
            dn.push(DnType::OrganizationalUnitName, tether_spiffe::x509::MESH_OU);
            dn.push(DnType::CommonName, node);
        }
        params.distinguished_name = dn;
        let mut sans =
            vec![SanType::URI(id.as_str().try_into().map_err(|e| {
                CaError::Cert(format!("SPIFFE ID as URI SAN: {e}"))
            })?)];
        for d in extras.dns_names {
            sans.push(SanType::DnsName(
                d.as_str()
                    .try_into()
                    .map_err(|e| CaError::Cert(format!("DNS name {d:?}: {e}")))?,
            ));
        }
        for ip in extras.ip_addresses {
            sans.push(SanType::IpAddress(*ip));
        }
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = unix_to_time(now - BACKDATE_SECS)?;
        params.not_after = unix_to_time(not_after)?;
        let serial = random_serial();
        let serial_hex = hex_string(&serial.to_bytes());
        params.serial_number = Some(serial);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        let mut chain = Vec::with_capacity(1 + self.intermediates.len());
        chain.push(cert.der().to_vec());
        chain.extend(self.intermediates.iter().cloned());
        Ok(SignedCert {
            chain,
            not_after,
            serial_hex,
        })
    }
}

fn hex_string(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build_csr;

    const NOW: i64 = 1_800_000_000;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    #[test]
    fn signs_conforming_svid_for_csr() {
        let ca = new_self_signed_ca(&td(), 86400, NOW).unwrap();
        let signer = Signer::new(&ca).unwrap();
        let key = PrivateKey::generate().unwrap();
        let id = SpiffeId::parse("spiffe://example.org/web").unwrap();
        let csr = build_csr(&key, &id).unwrap();
        let cert = signer
            .sign_svid(&csr, &id, &["web.local".into()], 3600, NOW)
            .unwrap();
        assert_eq!(
            cert.chain.len(),
            1,
            "self-signed root is not sent in the chain"
        );
        assert_eq!(cert.not_after, NOW + 3600);
        let got = tether_spiffe::x509::check_x509_svid_leaf(&cert.chain[0]).unwrap();
        assert_eq!(got, id);
        let mut bundle = tether_spiffe::Bundle::new(td());
        bundle.x509_authorities = ca.anchors.clone();
        assert_eq!(
            tether_spiffe::x509::verify_x509_svid(&cert.chain, &bundle, NOW + 10).unwrap(),
            id
        );
        // The certificate carries the CSR's key, not some other key.
        let (_, leaf) = x509_parser::parse_x509_certificate(&cert.chain[0]).unwrap();
        assert_eq!(leaf.public_key().raw, key.spki_der().as_slice());
    }

    #[test]
    fn ttl_is_capped_by_ca_lifetime() {
        let ca = new_self_signed_ca(&td(), 100, NOW).unwrap();
        let signer = Signer::new(&ca).unwrap();
        let key = PrivateKey::generate().unwrap();
        let id = SpiffeId::parse("spiffe://example.org/a").unwrap();
        let cert = signer
            .sign_svid(&build_csr(&key, &id).unwrap(), &id, &[], 3600, NOW)
            .unwrap();
        assert_eq!(cert.not_after, NOW + 100);
        assert!(matches!(
            signer.sign_svid(&build_csr(&key, &id).unwrap(), &id, &[], 10, NOW + 100),
            Err(CaError::Expired { .. })
        ));
    }

    #[test]
    fn rejects_csr_for_other_id() {
        let signer = Signer::new(&new_self_signed_ca(&td(), 86400, NOW).unwrap()).unwrap();
        let key = PrivateKey::generate().unwrap();
        let asked = SpiffeId::parse("spiffe://example.org/admin").unwrap();
        let granted = SpiffeId::parse("spiffe://example.org/web").unwrap();
        let err = signer
            .sign_svid(&build_csr(&key, &asked).unwrap(), &granted, &[], 60, NOW)
            .unwrap_err();
        assert!(
            err.to_string().contains("spiffe://example.org/admin"),
            "{err}"
        );
    }

    #[test]
    fn rejects_malformed_and_tampered_csrs() {
        let signer = Signer::new(&new_self_signed_ca(&td(), 86400, NOW).unwrap()).unwrap();
        let id = SpiffeId::parse("spiffe://example.org/web").unwrap();
        for bad in [
            vec![],
            vec![0x30, 0x03, 0x02, 0x01, 0x00],
            vec![0xff; 100],
            vec![0u8; MAX + 1],
        ] {
            assert!(signer.sign_svid(&bad, &id, &[], 60, NOW).is_err());
        }
        let key = PrivateKey::generate().unwrap();
        let mut csr = build_csr(&key, &id).unwrap();
        // Flip a bit in the signature (the last byte): proof of possession fails.
        let last = csr.len() - 1;
        csr[last] ^= 1;
        let err = signer.sign_svid(&csr, &id, &[], 60, NOW).unwrap_err();
        assert!(
            matches!(err, CaError::CsrRejected(_) | CaError::MalformedCsr(_)),
            "{err}"
        );
    }
    const MAX: usize = crate::csr::MAX_CSR_LEN;

    fn operator_root(bc: BasicConstraints, ku: Vec<KeyUsagePurpose>) -> (String, String) {
        let key = PrivateKey::generate().unwrap();
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(bc);
        p.key_usages = ku;
        let cert = p.self_signed(&key).unwrap();
        (
            crate::key::pem_encode("CERTIFICATE", cert.der()),
            key.to_pem().to_string(),
        )
    }

    #[test]
    fn upstream_that_cannot_hold_an_intermediate_is_refused() {
        let (c, k) = operator_root(
            BasicConstraints::Constrained(0),
            vec![KeyUsagePurpose::KeyCertSign],
        );
        let e = Upstream::from_pem(&c, &k).err().unwrap().to_string();
        assert!(e.contains("pathLenConstraint 0"), "{e}");
        let (c, k) = operator_root(
            BasicConstraints::Unconstrained,
            vec![KeyUsagePurpose::DigitalSignature],
        );
        let e = Upstream::from_pem(&c, &k).err().unwrap().to_string();
        assert!(e.contains("keyCertSign"), "{e}");
        let (c, k) = operator_root(
            BasicConstraints::Constrained(1),
            vec![KeyUsagePurpose::KeyCertSign],
        );
        assert!(Upstream::from_pem(&c, &k).is_ok());
    }

    #[test]
    fn intermediate_chains_to_upstream() {
        // The operator's root, made here with our own code.
        let root = new_self_signed_ca(&td(), 10 * 86400, NOW).unwrap();
        let root_key = PrivateKey::from_pkcs8(&root.key_pkcs8).unwrap();
        let cert_pem = crate::key::pem_encode("CERTIFICATE", &root.cert_der);
        let upstream = Upstream::from_pem(&cert_pem, &root_key.to_pem()).unwrap();
        let ca = new_intermediate_ca(&td(), &upstream, 86400, NOW).unwrap();
        assert_eq!(ca.anchors, vec![root.cert_der.clone()]);
        let signer = Signer::new(&ca).unwrap();
        let key = PrivateKey::generate().unwrap();
        let id = SpiffeId::parse("spiffe://example.org/w").unwrap();
        let cert = signer
            .sign_svid(&build_csr(&key, &id).unwrap(), &id, &[], 600, NOW)
            .unwrap();
        assert_eq!(cert.chain.len(), 2, "leaf + intermediate");
        let mut bundle = tether_spiffe::Bundle::new(td());
        bundle.x509_authorities = ca.anchors.clone();
        assert_eq!(
            tether_spiffe::x509::verify_x509_svid(&cert.chain, &bundle, NOW + 1).unwrap(),
            id
        );
        // A mismatched key is refused.
        let other = PrivateKey::generate().unwrap();
        assert!(Upstream::from_pem(&cert_pem, &other.to_pem()).is_err());
    }
}
