//! parse_datagram sees raw kernel netlink bytes; it must never panic or
//! loop, and only ever yields events with positive pids.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_attest::{ProcEvent, parse_datagram};

fuzz_target!(|data: &[u8]| {
    let mut out = Vec::new();
    parse_datagram(data, &mut out);
    for ev in &out {
        match *ev {
            ProcEvent::Exec { pid } | ProcEvent::Exit { pid } | ProcEvent::Uid { pid } => {
                assert!(pid > 0)
            }
            ProcEvent::Fork { parent, child } => assert!(parent > 0 && child > 0),
            ProcEvent::Overrun => panic!("Overrun only comes from the socket"),
        }
    }
});
