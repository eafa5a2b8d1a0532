//! Bundle writer tests: the updater's reader accepts what is written, `tar` lists it, output is
//! reproducible, and a bundle made from a disk image region installs with the updater.

use super::*;
use std::process::Command;
use updater::bundle::{BundleError, DEFAULT_ZSTD_LEVEL};
use updater::install::{install_bundle, AcceptAll, InstallRequest, NoProgress, Source};
use updater::layout::Slot;

/// Compressible data that still cuts into many content-defined chunks.
fn data(len: usize, seed: u64) -> Vec<u8> {
    updater::bundle::testkit::test_image(len, seed)
}

fn meta() -> BundleMeta {
    BundleMeta {
        compatible: "metrica-test".into(),
        version: "1.4.0".parse().unwrap(),
        security_epoch: 3,
        created: 1_700_000_000,
        zstd_level: DEFAULT_ZSTD_LEVEL,
    }
}

struct Setup {
    dir: tempfile::TempDir,
    key: SigningKey,
    keyring: PathBuf,
    boot: PathBuf,
    root: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let keyring = dir.path().join("keys");
    let pair = crate::keys::generate(&keyring, "test").unwrap();
    let key = crate::keys::load_signing_key(&pair.private).unwrap();
    let boot = dir.path().join("boot.img");
    let root = dir.path().join("root.img");
    std::fs::write(&boot, data(300_000, 1)).unwrap();
    std::fs::write(&root, data(40_000_000, 2)).unwrap();
    Setup { dir, key, keyring, boot, root }
}

impl Setup {
    fn images(&self) -> Vec<ImageSource> {
        vec![
            ImageSource::file(SlotClass::Boot, &self.boot).unwrap(),
            ImageSource::file(SlotClass::Root, &self.root).unwrap(),
        ]
    }
}

#[test]
fn written_bundles_verify_list_with_tar_and_are_reproducible() {
    let s = setup();
    let out = s.dir.path().join("out/os-1.4.0.mfb");
    let summary = write_bundle(&out, &meta(), &s.images(), &s.key, &Progress::quiet()).unwrap();
    assert_eq!(summary.size, std::fs::metadata(&out).unwrap().len());
    // Production chunking (about 2 MiB a chunk): enough chunks to reorder across workers.
    assert!(summary.chunks[1] > 10, "{:?}", summary.chunks);
    let check = verify(&out, &s.keyring).unwrap();
    assert_eq!(check.manifest.manifest, summary.manifest);
    assert_eq!(check.bundle_len, summary.size);
    let root = std::fs::read(&s.root).unwrap();
    assert_eq!(summary.manifest.images[1].sha256, hex::encode(Sha256::digest(&root)));

    let listing = Command::new("tar").arg("tvf").arg(&out).output().unwrap();
    assert!(listing.status.success(), "{}", String::from_utf8_lossy(&listing.stderr));
    let names: Vec<String> = String::from_utf8(listing.stdout)
        .unwrap()
        .lines()
        .map(|l| l.split_whitespace().last().unwrap().to_string())
        .collect();
    assert_eq!(
        names,
        [
            "manifest.toml",
            "manifest.toml.sig",
            "boot.index",
            "boot.payload",
            "root.index",
            "root.payload"
        ]
    );

    let again = s.dir.path().join("again.mfb");
    write_bundle(&again, &meta(), &s.images(), &s.key, &Progress::quiet()).unwrap();
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&again).unwrap(), "not reproducible");
}

#[test]
fn inspect_reports_the_manifest_and_signature_status() {
    let s = setup();
    let out = s.dir.path().join("b.mfb");
    let summary = write_bundle(&out, &meta(), &s.images(), &s.key, &Progress::quiet()).unwrap();
    let i = inspect(&out, Some(&s.keyring)).unwrap();
    assert_eq!(i.signature, SignatureStatus::Valid { key_id: summary.key_id });
    let text = i.to_string();
    for want in ["metrica-test", "1.4.0", "epoch       3", "valid, by key", "root", "chunks"] {
        assert!(text.contains(want), "{want:?} not in\n{text}");
    }
    let i = inspect(&out, None).unwrap();
    assert!(matches!(i.signature, SignatureStatus::NotChecked { .. }));
    let other = s.dir.path().join("other");
    crate::keys::generate(&other, "other").unwrap();
    let i = inspect(&out, Some(&other)).unwrap();
    assert!(
        matches!(&i.signature, SignatureStatus::Invalid { reason, .. } if reason.contains("not in the keyring")),
        "{}",
        i.signature
    );
    assert!(!i.signature.is_valid());
    let garbage = s.dir.path().join("garbage.mfb");
    std::fs::write(&garbage, data(5000, 7)).unwrap();
    assert!(inspect(&garbage, None).is_err());
}

#[test]
fn a_region_of_a_disk_image_is_bundled_and_installs_with_the_updater() {
    let s = setup();
    // A GPT disk image with root_a and root_b; the bundle is made from root_a's region.
    let disk = s.dir.path().join("disk.img");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&disk)
        .unwrap();
    file.set_len(16 << 20).unwrap();
    let mut g = gpt::GptConfig::new().writable(true).create_from_device(file, None).unwrap();
    for label in ["root_a", "root_b"] {
        g.add_partition(label, 6 << 20, gpt::partition_types::LINUX_FS, 0, Some(2048)).unwrap();
    }
    g.write().unwrap();
    let root = data(6 << 20, 3);
    let a = updater::disk::find_label(&disk, "root_a").unwrap();
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .unwrap()
        .write_all_at(&root, a.start)
        .unwrap();

    let src = ImageSource::partition(SlotClass::Root, &disk, "root_a").unwrap();
    assert_eq!(src.len, root.len() as u64);
    let out = s.dir.path().join("root-only.mfb");
    write_bundle(&out, &meta(), &[src], &s.key, &Progress::quiet()).unwrap();

    let ring = Keyring::load(&s.keyring).unwrap();
    let req = InstallRequest::new(&disk, Slot::B, &ring, &AcceptAll);
    let done = install_bundle(Source::File(out), &req, &mut NoProgress).unwrap();
    assert_eq!(done.images[0].partition, "root_b");
    let b = updater::disk::find_label(&disk, "root_b").unwrap();
    let mut got = vec![0; root.len()];
    std::fs::File::open(&disk).unwrap().read_exact_at(&mut got, b.start).unwrap();
    assert!(got == root, "root_b differs from the bundled root_a");

    // A region past the end of the file is an error, not a short image.
    let bad = ImageSource::region(SlotClass::Root, &disk, 15 << 20, 2 << 20);
    assert!(write_bundle(&s.dir.path().join("x.mfb"), &meta(), &[bad], &s.key, &Progress::quiet())
        .is_err());
}

#[test]
fn a_flipped_byte_in_a_written_bundle_is_caught() {
    let s = setup();
    let out = s.dir.path().join("b.mfb");
    write_bundle(&out, &meta(), &s.images(), &s.key, &Progress::quiet()).unwrap();
    let mut bytes = std::fs::read(&out).unwrap();
    let n = bytes.len();
    bytes[n - 20_000] ^= 1;
    std::fs::write(&out, &bytes).unwrap();
    let err = verify(&out, &s.keyring).unwrap_err();
    let root = err.root_cause().downcast_ref::<BundleError>();
    assert!(matches!(root, Some(BundleError::ChunkCorrupt { .. })), "{err:#}");
}
