//! Fuzz target `x509_svid`: see tether_fuzz_bodies::x509_svid.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tether_fuzz_bodies::x509_svid(data));
