//! SPIFFE primitives for Tether: SPIFFE IDs and trust domains, JWT-SVIDs,
//! SPIFFE bundles (JWK Sets) and X.509-SVID conformance and verification.
//!
//! Everything here treats its input as hostile: parsers never panic, bound
//! their work, and return errors that name the offending field.
//!
//! Specifications followed (github.com/spiffe/spiffe, `standards/`):
//! SPIFFE-ID.md, X509-SVID.md, JWT-SVID.md, SPIFFE_Trust_Domain_and_Bundle.md.
//! The only crypto provider used is aws-lc-rs.

#![deny(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod bundle;
pub mod id;
mod json;
pub mod jwt;
pub mod x509;
pub mod x509pop;

pub use bundle::Bundle;
pub use id::{IdError, SpiffeId, TrustDomain};
