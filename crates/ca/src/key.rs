use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair as _};
use zeroize::Zeroizing;

use crate::CaError;

/// An ECDSA P-256 private key.
///
/// The aws-lc key object cleanses its memory when freed; the PKCS#8 copy we
/// keep for the Workload API and for the CA store is `Zeroizing`, so
/// dropping a `PrivateKey` leaves no key bytes behind.
pub struct PrivateKey {
    pair: EcdsaKeyPair,
    pkcs8: Zeroizing<Vec<u8>>,
    /// SubjectPublicKeyInfo's BIT STRING content: the uncompressed point.
    public: Vec<u8>,
}

impl PrivateKey {
    pub fn generate() -> Result<Self, CaError> {
        let rng = SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
            .map_err(|e| CaError::KeyGen(e.to_string()))?;
        Self::from_pkcs8(doc.as_ref())
    }

    pub fn from_pkcs8(der: &[u8]) -> Result<Self, CaError> {
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, der)
            .map_err(|e| CaError::InvalidKey(format!("not an ECDSA P-256 PKCS#8 key: {e}")))?;
        let public = pair.public_key().as_ref().to_vec();
        Ok(PrivateKey {
            pair,
            pkcs8: Zeroizing::new(der.to_vec()),
            public,
        })
    }

    /// Accepts "PRIVATE KEY" (PKCS#8) and "EC PRIVATE KEY" (SEC1) PEM.
    pub fn from_pem(pem: &str) -> Result<Self, CaError> {
        use rustls_pki_types::PrivateKeyDer;
        use rustls_pki_types::pem::PemObject;
        let der = PrivateKeyDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| CaError::InvalidKey(format!("no private key in PEM: {e}")))?;
        match der {
            PrivateKeyDer::Pkcs8(k) => Self::from_pkcs8(k.secret_pkcs8_der()),
            PrivateKeyDer::Sec1(k) => {
                let pair = EcdsaKeyPair::from_private_key_der(
                    &ECDSA_P256_SHA256_ASN1_SIGNING,
                    k.secret_sec1_der(),
                )
                .map_err(|e| CaError::InvalidKey(format!("not an ECDSA P-256 key: {e}")))?;
                let doc = pair
                    .to_pkcs8v1()
                    .map_err(|e| CaError::InvalidKey(e.to_string()))?;
                Self::from_pkcs8(doc.as_ref())
            }
            _ => Err(CaError::InvalidKey(
                "only ECDSA P-256 keys are supported".into(),
            )),
        }
    }

    /// An ECDSA P-256 SHA-256 signature (ASN.1 DER) over `msg`.
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, CaError> {
        self.pair
            .sign(&SystemRandom::new(), msg)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| CaError::InvalidKey("signing failed".into()))
    }

    pub fn pkcs8_der(&self) -> &[u8] {
        &self.pkcs8
    }

    pub fn to_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(pem_encode("PRIVATE KEY", &self.pkcs8))
    }

    /// The DER SubjectPublicKeyInfo.
    pub fn spki_der(&self) -> Vec<u8> {
        rcgen::PublicKeyData::subject_public_key_info(self)
    }
}

impl rcgen::PublicKeyData for PrivateKey {
    fn der_bytes(&self) -> &[u8] {
        &self.public
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl rcgen::SigningKey for PrivateKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        let sig = self
            .pair
            .sign(&SystemRandom::new(), msg)
            .map_err(|_| rcgen::Error::RingUnspecified)?;
        Ok(sig.as_ref().to_vec())
    }
}

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrivateKey(P-256, redacted)")
    }
}

/// PEM armour for DER (certificates and keys) without another dependency.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}
