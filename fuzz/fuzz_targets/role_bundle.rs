//! A role bundle (`.mfr`) on arbitrary bytes, verified as the device verifies it before it
//! unpacks anything (docs/fuzzing.md).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use updater::sign::Keyring;

fuzz_target!(|data: &[u8]| {
    static KEYRING: OnceLock<Keyring> = OnceLock::new();
    metrica_fuzz::role_bundle(data, KEYRING.get_or_init(metrica_fuzz::keyring));
});
