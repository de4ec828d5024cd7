//! Fuzzes SPIFFE bundle parsing. Any bundle that parses must serialise and
//! parse back to the same value.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_spiffe::{Bundle, TrustDomain};

fuzz_target!(|data: &[u8]| {
    let td = TrustDomain::new("example.org").expect("valid td");
    let Ok(bundle) = Bundle::from_json(td.clone(), data) else {
        return;
    };
    let json = bundle.to_json().expect("a parsed bundle must serialise");
    let back = Bundle::from_json(td, json.as_bytes()).expect("a serialised bundle must parse");
    assert_eq!(back, bundle);
    let _ = bundle.jwks_json().expect("parsed JWT authorities must serialise");
    let _ = bundle.x509_authorities_der_concat();
});
