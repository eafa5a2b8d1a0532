//! A role's `role.toml` (`role::spec::parse`) (docs/fuzzing.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| metrica_fuzz::role_spec(data));
