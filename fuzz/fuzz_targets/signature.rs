//! A detached signature file (`.sig`): parsed, then checked over a message (docs/fuzzing.md).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use updater::sign::Keyring;

fuzz_target!(|data: &[u8]| {
    static KEYRING: OnceLock<Keyring> = OnceLock::new();
    metrica_fuzz::signature_file(data, KEYRING.get_or_init(metrica_fuzz::keyring));
});
