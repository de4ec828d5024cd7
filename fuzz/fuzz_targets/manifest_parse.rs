//! Manifests come from operators' files; a malformed one must produce an
//! error, never a panic, and whatever parses must survive a round trip
//! through `tether get`'s YAML.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tether_fuzz_bodies::manifest_parse(data));
