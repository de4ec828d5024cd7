//! Selector::parse must never panic, and anything it accepts must print in
//! canonical form and parse back to the same selector.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_attest::Selector;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(sel) = Selector::parse(text) {
        let canonical = sel.to_string();
        let again = Selector::parse(&canonical).expect("canonical form must parse");
        assert_eq!(again, sel);
        assert_eq!(again.to_string(), canonical);
    }
});
