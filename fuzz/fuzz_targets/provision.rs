//! The provisioning files: device.toml, wifi.toml, authorized_keys, secrets.age, the
//! decrypted secrets, and whole sets (docs/fuzzing.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| metrica_fuzz::provisioning(data));
