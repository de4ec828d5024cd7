//! The ELF interpreter (PT_INTERP) of an executable: the file is the
//! attacker's own, so its headers are untrusted input. Must never panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tether_fuzz_bodies::elf_interp(data));
