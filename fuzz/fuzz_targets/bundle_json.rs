//! Fuzzes SPIFFE bundle parsing. Any bundle that parses must serialise and
//! parse back to the same value.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tether_fuzz_bodies::bundle_json(data));
