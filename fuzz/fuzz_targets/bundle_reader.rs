//! The OS bundle reader on arbitrary bytes: tar framing, manifest, signature file and
//! signature, chunk indexes and chunks (docs/fuzzing.md).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use updater::sign::Keyring;

fuzz_target!(|data: &[u8]| {
    static KEYRING: OnceLock<Keyring> = OnceLock::new();
    metrica_fuzz::read_bundle(data, KEYRING.get_or_init(metrica_fuzz::keyring));
});
