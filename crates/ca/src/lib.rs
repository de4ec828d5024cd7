//! Tether's certificate authority: key material, CSRs and signing.
//!
//! Every key Tether creates (CA, node and per-process workload keys) is a
//! [`PrivateKey`]: an aws-lc-rs key pair plus a zeroize-on-drop PKCS#8 copy,
//! so key bytes never linger in freed memory. The CA signs only what the
//! server has already decided a caller is entitled to; it checks the CSR's
//! proof of possession and builds the certificate itself, never copying
//! requested extensions.

mod authority;
mod csr;
mod intercept;
mod key;

pub use authority::{
    CaMaterial, SignedCert, Signer, SvidExtras, Upstream, new_intermediate_ca, new_self_signed_ca,
};
pub use csr::{CsrInfo, build_csr, parse_csr};
pub use intercept::{InterceptCa, new_intercept_ca, sign_intercept_leaf};
pub use key::{PrivateKey, pem_encode};

/// Everything that can go wrong while handling keys, CSRs and certificates.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("key generation failed: {0}")]
    KeyGen(String),
    #[error("invalid private key: {0}")]
    InvalidKey(String),
    #[error("malformed CSR: {0}")]
    MalformedCsr(String),
    #[error("CSR rejected: {0}")]
    CsrRejected(String),
    #[error("certificate generation failed: {0}")]
    Cert(String),
    #[error("invalid upstream CA: {0}")]
    Upstream(String),
    #[error("CA expired at {not_after} (now {now}); rotate the CA")]
    Expired { not_after: i64, now: i64 },
}

impl From<rcgen::Error> for CaError {
    fn from(e: rcgen::Error) -> Self {
        CaError::Cert(e.to_string())
    }
}

pub(crate) fn unix_to_time(secs: i64) -> Result<time::OffsetDateTime, CaError> {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .map_err(|e| CaError::Cert(format!("time {secs}: {e}")))
}
