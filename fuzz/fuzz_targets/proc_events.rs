//! parse_datagram sees raw kernel netlink bytes; it must never panic or
//! loop, and only ever yields events with positive pids.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tether_fuzz_bodies::proc_events(data));
