//! Fuzzes JWT-SVID validation.
//!
//! The first byte picks a mode: either the rest is a whole token, or it is
//! a claims set (or header) that gets a genuine signature, so the fuzzer
//! also reaches the claim checks behind signature verification.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tether_fuzz_bodies::jwt_validate(data));
