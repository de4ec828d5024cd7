//! Fuzzes SPIFFE ID and trust domain parsing.
//!
//! Besides "never panics", checks the invariants other code relies on:
//! an accepted ID is already canonical, splits into parts that rebuild it,
//! and survives a serde round trip.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tether_fuzz_bodies::spiffe_id(data));
