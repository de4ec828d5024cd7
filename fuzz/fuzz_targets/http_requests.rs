//! A client's HTTP/1.1 request stream as the injector frames and rewrites
//! it: bytes from a workload the agent adds a credential for. Must never
//! panic, and never let a request through without the injected header.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tether_fuzz_bodies::http_requests(data));
