//! Token endpoints' answers (AWS STS XML, OAuth2 JSON): bytes from a
//! network peer the agent calls. Must never panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tether_fuzz_bodies::token_response(data));
