//! Fuzz target `tunnel_request`: see tether_fuzz_bodies::tunnel_request.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tether_fuzz_bodies::tunnel_request(data));
