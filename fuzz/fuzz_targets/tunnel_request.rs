#![no_main]
// The server agent parses this from every authenticated tunnel; the PROXY
// v2 parser reads what agents hand services.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((r, used))) = tether_mesh::Request::parse(data) {
        assert!(used <= data.len());
        assert_eq!(tether_mesh::Request::parse(&r.encode()), Ok(Some((r, used))));
    }
    if let Ok(Some((h, used))) = tether_mesh::proxy_v2::ProxyHeader::parse(data) {
        assert!(used <= data.len());
        let _ = h.encode();
    }
});
