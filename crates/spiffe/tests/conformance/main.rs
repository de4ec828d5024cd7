//! Conformance tests for tether-spiffe against the SPIFFE specifications.

mod bundle;
mod id;
mod jwt;
mod support;
mod x509;
mod x509pop;
