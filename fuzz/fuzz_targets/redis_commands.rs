//! A client's Redis command stream as the injector judges it: bytes from a
//! bound workload. Must never panic or change what it relays.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tether_fuzz_bodies::redis_commands(data));
