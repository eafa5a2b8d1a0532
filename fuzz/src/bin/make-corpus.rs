//! Writes the seed corpus of the `bundle_reader` target into the folder given (replacing
//! the files it names): small, valid bundles of each shape a device reads.

use std::path::PathBuf;
use updater::bundle::testkit::{make_bundle, make_bundle_with, test_image, TestMeta};
use updater::bundle::{SlotClass, CHUNKING};

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).expect("usage: make-corpus DIR"));
    std::fs::create_dir_all(&dir)?;
    let key = metrica_fuzz::seed_key();
    let meta = TestMeta::default();
    let boot = test_image(20_000, 1);
    let root = test_image(90_000, 2);
    let zeros = vec![0u8; CHUNKING.max as usize];
    let seeds: [(&str, Vec<u8>); 4] = [
        (
            "boot-root.mfb",
            make_bundle(&meta, &[(SlotClass::Boot, &boot), (SlotClass::Root, &root)], Some(&key)),
        ),
        ("root-only.mfb", make_bundle(&meta, &[(SlotClass::Root, &boot)], Some(&key))),
        ("unsigned.mfb", make_bundle(&meta, &[(SlotClass::Root, &boot)], None)),
        // One 4 MiB chunk of zeros: the reader's zero-chunk path.
        (
            "zero-chunk.mfb",
            make_bundle_with(&meta, &[(SlotClass::Root, &zeros)], Some(&key), CHUNKING),
        ),
    ];
    for (name, bytes) in seeds {
        std::fs::write(dir.join(name), &bytes)?;
        println!("{name}: {} bytes", bytes.len());
    }
    Ok(())
}
