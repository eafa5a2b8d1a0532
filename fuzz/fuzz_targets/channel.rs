//! A channel document and its signature file, checked as the daemon checks them, then the
//! document alone past the signature gate (docs/fuzzing.md).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use updater::sign::Keyring;

fuzz_target!(|data: &[u8]| {
    static KEYRING: OnceLock<Keyring> = OnceLock::new();
    metrica_fuzz::channel_document(data, KEYRING.get_or_init(metrica_fuzz::keyring));
});
