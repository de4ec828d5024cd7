//! PostgreSQL bytes the injector parses: a client's startup packet and the
//! server's messages while the agent authenticates. Must never panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tether_fuzz_bodies::postgres_messages(data));
