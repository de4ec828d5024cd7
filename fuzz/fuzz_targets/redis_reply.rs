//! A Redis server's answer to the AUTH the injector sends. Must never panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tether_fuzz_bodies::redis_reply(data));
