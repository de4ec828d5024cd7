//! CSRs arrive from agents over the network; parsing must never panic, and
//! anything accepted must carry a verified P-256/P-384 key.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tether_ca::parse_csr(data);
});
