//! The Workload API's `:authority` shim: HTTP/2 and HPACK bytes from any
//! local process. Must never panic, whatever way the bytes arrive.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tether_fuzz_bodies::h2_authority(data));
