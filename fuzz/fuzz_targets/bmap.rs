//! The imager's block map reader (`.bmap` XML) (docs/fuzzing.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| metrica_fuzz::bmap(data));
