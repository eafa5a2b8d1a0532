//! `autoboot.txt` and the kernel command line's `root=` (docs/fuzzing.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| metrica_fuzz::boot_config(data));
