//! CSRs arrive from agents over the network; parsing must never panic, and
//! anything accepted must carry a verified P-256/P-384 key.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tether_fuzz_bodies::csr_parse(data));
