//! Fuzz target `kernel_records`: see tether_fuzz_bodies::kernel_records.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tether_fuzz_bodies::kernel_records(data));
