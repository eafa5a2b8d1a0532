//! What the fuzz targets run, and the key their seed corpus is signed with.

use ed25519_dalek::SigningKey;
use std::io::Cursor;
use updater::bundle::{
    read_image_layout, read_signed_manifest, verify_bundle, BundleCursor, ChunkDecoder, Manifest,
    ReaderFetch, RetryPolicy,
};
use updater::sign::Keyring;

/// The key that signs the seed bundles; the fuzz keyring holds its public half, so mutations
/// of a seed's indexes and payloads get past the signature check.
pub fn seed_key() -> SigningKey {
    SigningKey::from_bytes(&[0x5e; 32])
}

/// The keyring of [`seed_key`].
pub fn keyring() -> Keyring {
    Keyring::from_keys([seed_key().verifying_key()])
}

/// A forward-only source over `data`, like a pipe or a download.
fn stream(data: &[u8]) -> ReaderFetch {
    ReaderFetch::new(Box::new(Cursor::new(data.to_vec())), "fuzz input")
}

/// Reads `data` as an OS bundle the ways the device and `imager inspect` do. Errors are the
/// expected outcome; a panic, an abort, a hang or unbounded memory is a bug.
pub fn read_bundle(data: &[u8], keyring: &Keyring) {
    // The device's path: framing, signature, manifest, indexes, every chunk, image digests.
    let _ = verify_bundle(&mut stream(data), keyring);
    // The same reader past the signature gate, as `imager inspect` reads an unverified
    // manifest: so that mutated manifests are followed into indexes and payloads too.
    let mut fetch = stream(data);
    let mut cur = BundleCursor::new(&mut fetch, RetryPolicy::default());
    let Ok(signed) = read_signed_manifest(&mut cur) else { return };
    let Ok(manifest) = Manifest::parse(&signed.bytes) else { return };
    let Ok(mut decoder) = ChunkDecoder::new() else { return };
    let mut offset = signed.images_offset;
    for entry in &manifest.images {
        let Ok(layout) = read_image_layout(&mut cur, offset, entry) else { return };
        let offsets: Vec<u64> = layout.chunk_offsets().collect();
        for (k, at) in offsets.into_iter().enumerate() {
            if decoder.read_chunk(&mut cur, &layout, k, at).is_err() {
                return;
            }
        }
        offset = layout.end_offset;
    }
}
