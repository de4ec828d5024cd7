//! Manifests come from operators' files; a malformed one must produce an
//! error, never a panic, and whatever parses must survive a round trip
//! through `tether get`'s YAML.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(resources) = tether_manifest::parse("fuzz.yaml", data) {
        for r in resources {
            let again = tether_manifest::parse("again.yaml", r.to_yaml().as_bytes()).expect("own output must parse");
            assert_eq!(again, vec![r]);
        }
    }
});
