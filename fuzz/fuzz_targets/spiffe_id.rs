//! Fuzzes SPIFFE ID and trust domain parsing.
//!
//! Besides "never panics", checks the invariants other code relies on:
//! an accepted ID is already canonical, splits into parts that rebuild it,
//! and survives a serde round trip.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_spiffe::{SpiffeId, TrustDomain};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = SpiffeId::parse(s) {
        assert_eq!(id.as_str(), s);
        assert!(s.len() <= 2048);
        assert_eq!(format!("spiffe://{}{}", id.trust_domain(), id.path()), s);
        let rebuilt = SpiffeId::new(id.trust_domain(), id.path())
            .expect("the parts of a valid ID must rebuild it");
        assert_eq!(rebuilt, id);
        let json = serde_json::to_string(&id).expect("serialising an ID cannot fail");
        let back: SpiffeId = serde_json::from_str(&json).expect("a serialised ID must parse");
        assert_eq!(back, id);
    }
    if let Ok(td) = TrustDomain::new(s) {
        assert!(td.as_str().len() <= 255);
        assert_eq!(TrustDomain::new(&td.id_string()).ok(), Some(td.clone()));
        assert_eq!(td.to_spiffe_id().trust_domain(), &td);
    }
});
