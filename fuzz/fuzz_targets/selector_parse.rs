//! Selector::parse must never panic, and anything it accepts must print in
//! canonical form and parse back to the same selector.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tether_fuzz_bodies::selector_parse(data));
