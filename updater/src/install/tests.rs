//! Tests of the install data path on sparse test disks (crate::testutil) with bundles made by
//! `bundle::testkit`.

use super::*;
use crate::bundle::testkit::{entry_offset, make_bundle, make_bundle_with, test_image, TestMeta};
use crate::sign::tests::test_key;
use crate::sign::{KeyId, SignError};
use crate::testserver::{Mode, TestServer};
use crate::testutil::disk_committed;
use std::io::Cursor;

/// A FAT boot image (1 MiB) with a kernel and a slot-independent cmdline.txt.
fn boot_image() -> Vec<u8> {
    let mut img = Cursor::new(vec![0u8; 1 << 20]);
    fatfs::format_volume(&mut img, fatfs::FormatVolumeOptions::new()).unwrap();
    {
        let fs = fatfs::FileSystem::new(&mut img, fatfs::FsOptions::new()).unwrap();
        {
            let root = fs.root_dir();
            root.create_file("kernel8.img").unwrap().write_all(&test_image(300_000, 9)).unwrap();
            root.create_file("cmdline.txt")
                .unwrap()
                .write_all(
                    b"console=ttyAMA0 root=PARTUUID=00000000-0000-0000-0000-000000000000 ro\n",
                )
                .unwrap();
        }
        fs.unmount().unwrap();
    }
    img.into_inner()
}

struct Fixture {
    dir: tempfile::TempDir,
    disk: PathBuf,
    boot: Vec<u8>,
    root: Vec<u8>,
    bundle: Vec<u8>,
    bundle_path: PathBuf,
    keyring: Keyring,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture::with(&TestMeta::default(), 900_000)
    }

    fn with(meta: &TestMeta, root_len: usize) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.img");
        disk_committed(&disk, Slot::A);
        let boot = boot_image();
        let root = test_image(root_len, 3);
        let key = test_key(1);
        let bundle =
            make_bundle(meta, &[(SlotClass::Boot, &boot), (SlotClass::Root, &root)], Some(&key));
        let bundle_path = dir.path().join("v2.mfb");
        std::fs::write(&bundle_path, &bundle).unwrap();
        let keyring = Keyring::from_keys([key.verifying_key()]);
        Fixture { dir, disk, boot, root, bundle, bundle_path, keyring }
    }

    fn resume_file(&self) -> PathBuf {
        progress_path(&self.dir.path().join("data"))
    }

    /// Installs the fixture's bundle file into slot B with the fixture's request.
    fn install(&self, progress: &mut dyn Progress) -> Result<InstalledImages, InstallError> {
        install_bundle(Source::File(self.bundle_path.clone()), &self.request(&AcceptAll), progress)
    }

    fn request<'a>(&'a self, policy: &'a dyn Policy) -> InstallRequest<'a> {
        let mut req = InstallRequest::new(&self.disk, Slot::B, &self.keyring, policy);
        req.resume_file = Some(self.resume_file());
        req.checkpoint_bytes = 64 * 1024;
        req.retry = RetryPolicy { attempts: 4, backoff: Duration::from_millis(10) };
        req.http_timeout = Duration::from_secs(5);
        req
    }

    fn partition(&self, label: &str) -> Vec<u8> {
        let p = crate::disk::find_label(&self.disk, label).unwrap();
        let mut buf = vec![0; p.len as usize];
        std::fs::File::open(&self.disk).unwrap().read_exact_at(&mut buf, p.start).unwrap();
        buf
    }

    /// Asserts that slot B holds the bundle's images with a fixed cmdline.txt.
    fn assert_installed(&self) {
        assert_eq!(&self.partition("root_b")[..self.root.len()], &self.root[..]);
        let boot_b = self.partition("boot_b");
        let fs = fatfs::FileSystem::new(Cursor::new(boot_b), fatfs::FsOptions::new()).unwrap();
        let mut kernel = Vec::new();
        fs.root_dir().open_file("kernel8.img").unwrap().read_to_end(&mut kernel).unwrap();
        assert_eq!(kernel, test_image(300_000, 9));
        let mut cmdline = String::new();
        fs.root_dir().open_file("cmdline.txt").unwrap().read_to_string(&mut cmdline).unwrap();
        let root_b = crate::disk::find_label(&self.disk, "root_b").unwrap();
        assert_eq!(crate::cmdline::root_partuuid(&cmdline), Some(root_b.partuuid), "{cmdline}");
        assert!(cmdline.starts_with("console=ttyAMA0 "), "{cmdline}");
        assert!(!self.resume_file().exists(), "the resume record is removed when done");
    }
}

fn slot_a(f: &Fixture) -> (Vec<u8>, Vec<u8>) {
    (f.partition("boot_a"), f.partition("root_a"))
}

#[test]
fn installs_both_images_and_points_cmdline_at_the_target_root() {
    let f = Fixture::new();
    let before_a = slot_a(&f);
    let mut events = Vec::new();
    let done = f.install(&mut events).unwrap();
    f.assert_installed();
    assert_eq!(slot_a(&f), before_a, "the active slot is untouched");
    assert_eq!(done.version, semver::Version::new(2, 0, 0));
    assert_eq!(done.key_id, KeyId::of(&test_key(1).verifying_key()).to_string());
    assert_eq!(done.images.len(), 2);
    assert_eq!(done.images[1].partition, "root_b");
    assert_eq!(done.images[1].sha256, hex::encode(Sha256::digest(&f.root)));
    assert_eq!(done.resumed_bytes, 0);
    assert!(matches!(events.first(), Some(ProgressEvent::Verified { .. })));
    assert!(matches!(events.last(), Some(ProgressEvent::Finished { .. })));
    assert!(events
        .iter()
        .any(|e| matches!(e, ProgressEvent::CmdlineFixed { partition } if partition == "boot_b")));
    assert_eq!(f.boot.len(), 1 << 20);
}

#[test]
fn installs_from_a_pipe_and_into_slot_a() {
    let f = Fixture::new();
    let mut req = f.request(&AcceptAll);
    req.target = Slot::A;
    let before_b = (f.partition("boot_b"), f.partition("root_b"));
    install_bundle(Source::Reader(Box::new(Cursor::new(f.bundle.clone()))), &req, &mut NoProgress)
        .unwrap();
    assert_eq!(&f.partition("root_a")[..f.root.len()], &f.root[..]);
    assert_eq!((f.partition("boot_b"), f.partition("root_b")), before_b);
}

type Check = fn(&InstallError) -> bool;

/// Every bad bundle or refusal is a clear, typed error and leaves the disk as it was.
#[test]
fn bad_bundles_and_refusals_write_nothing() {
    let f = Fixture::new();
    let images: &[(SlotClass, &[u8])] = &[(SlotClass::Boot, &f.boot), (SlotClass::Root, &f.root)];
    let meta = TestMeta::default();
    let (mdata, _) = entry_offset(&f.bundle, crate::bundle::MANIFEST_NAME).unwrap();
    let mut edited = f.bundle.clone();
    let text = String::from_utf8_lossy(&f.bundle[mdata as usize..mdata as usize + 300]).to_string();
    edited[mdata as usize + text.find("metrica-test").unwrap()] = b'M';
    let too_big = Fixture::with(&TestMeta::default(), 1_500_000);
    let device = |compat: &str, version: &str, epoch: u64| DeviceFacts {
        compatible: compat.into(),
        committed_version: Some(version.parse().unwrap()),
        security_epoch: epoch,
        pinned_version: None,
    };
    let cases: Vec<(&str, Vec<u8>, DeviceFacts, Check)> = vec![
        ("unsigned", make_bundle(&meta, images, None), device("metrica-test", "1.0.0", 1), |e| {
            matches!(e, InstallError::Bundle(BundleError::Unsigned))
        }),
        (
            "unknown key",
            make_bundle(&meta, images, Some(&test_key(2))),
            device("metrica-test", "1.0.0", 1),
            |e| matches!(e, InstallError::Bundle(BundleError::Signature(SignError::UnknownKey(_)))),
        ),
        ("manifest edited after signing", edited, device("metrica-test", "1.0.0", 1), |e| {
            matches!(e, InstallError::Bundle(BundleError::Signature(SignError::BadSignature(_))))
        }),
        ("garbage", test_image(50_000, 4), device("metrica-test", "1.0.0", 1), |e| {
            matches!(e, InstallError::Bundle(BundleError::NotABundle(_)))
        }),
        ("truncated manifest", f.bundle[..700].to_vec(), device("metrica-test", "1.0.0", 1), |e| {
            matches!(e, InstallError::Bundle(BundleError::Truncated { .. }))
        }),
        ("another compatible", f.bundle.clone(), device("metrica-other", "1.0.0", 1), |e| {
            matches!(e, InstallError::Refused(Refusal::Incompatible { .. }))
        }),
        ("older version", f.bundle.clone(), device("metrica-test", "3.0.0", 1), |e| {
            matches!(e, InstallError::Refused(Refusal::NotNewer { .. }))
        }),
        ("same version", f.bundle.clone(), device("metrica-test", "2.0.0", 1), |e| {
            matches!(e, InstallError::Refused(Refusal::NotNewer { .. }))
        }),
        ("lower epoch", f.bundle.clone(), device("metrica-test", "1.0.0", 2), |e| {
            matches!(e, InstallError::Refused(Refusal::EpochTooLow { bundle: 1, device: 2 }))
        }),
        (
            "image larger than its partition",
            too_big.bundle,
            device("metrica-test", "1.0.0", 1),
            |e| {
                matches!(
                    e,
                    InstallError::DoesNotFit { class: SlotClass::Root, size: 1_500_000, .. }
                )
            },
        ),
    ];
    for (name, bytes, facts, want) in cases {
        let before = std::fs::read(&f.disk).unwrap();
        let path = f.dir.path().join("bad.mfb");
        std::fs::write(&path, &bytes).unwrap();
        let err =
            install_bundle(Source::File(path), &f.request(&facts), &mut NoProgress).unwrap_err();
        assert!(want(&err), "{name}: {err}");
        assert!(!err.to_string().is_empty());
        assert!(std::fs::read(&f.disk).unwrap() == before, "{name}: the disk changed");
    }
}

#[test]
fn a_corrupt_chunk_is_caught_before_it_is_written_and_slot_a_is_untouched() {
    let f = Fixture::new();
    let before_a = slot_a(&f);
    let old_root_b = f.partition("root_b");
    let (payload, len) = entry_offset(&f.bundle, "root.payload").unwrap();
    let mut bad = f.bundle.clone();
    bad[(payload + len / 2) as usize] ^= 0x20;
    let err = install_bundle(
        Source::Reader(Box::new(Cursor::new(bad))),
        &f.request(&AcceptAll),
        &mut NoProgress,
    )
    .unwrap_err();
    let InstallError::Bundle(BundleError::ChunkCorrupt { image: SlotClass::Root, chunk, .. }) = err
    else {
        panic!("{err}")
    };
    // The bad chunk's place in root_b still holds the old bytes; the chunks before it are good.
    let idx = index_of(&f.bundle, "root.index", f.root.len() as u64);
    let start: usize = idx.chunks[..chunk].iter().map(|c| c.len as usize).sum();
    let end = start + idx.chunks[chunk].len as usize;
    let root_b = f.partition("root_b");
    assert_eq!(&root_b[..start], &f.root[..start]);
    assert_eq!(&root_b[start..end], &old_root_b[start..end]);
    assert_eq!(slot_a(&f), before_a);
}

#[test]
fn zero_chunks_are_written_from_the_signed_index_without_decompressing() {
    // The imager's chunking: a run of zeros becomes CHUNK_MAX chunks whose bytes the index fixes.
    let mut root = test_image(1 << 20, 5);
    root.extend(std::iter::repeat_n(0u8, 3 * CHUNK_MAX as usize + 12345));
    root.extend(test_image(1 << 20, 6));
    let key = test_key(1);
    let keyring = Keyring::from_keys([key.verifying_key()]);
    let meta = TestMeta::default();
    let bundle =
        make_bundle_with(&meta, &[(SlotClass::Root, &root)], Some(&key), crate::bundle::CHUNKING);
    let idx = index_of(&bundle, "root.index", root.len() as u64);
    let zero: Vec<usize> =
        (0..idx.chunks.len()).filter(|&k| is_zero_chunk(&idx.chunks[k])).collect();
    assert_eq!(zero.len(), 2, "{:?}", idx.chunks.iter().map(|c| c.len).collect::<Vec<_>>());
    let (payload, _) = entry_offset(&bundle, "root.payload").unwrap();
    let chunk_at = |k: usize| -> usize {
        payload as usize + idx.chunks[..k].iter().map(|c| c.compressed_len as usize).sum::<usize>()
    };
    // Streams the root image into a file that holds 0xAA bytes before.
    let dir = tempfile::tempdir().unwrap();
    let run = |bundle: Vec<u8>| -> Result<Vec<u8>, InstallError> {
        let path = dir.path().join("root");
        std::fs::write(&path, vec![0xAA; root.len()]).unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let mut fetch = crate::bundle::ReaderFetch::new(Box::new(Cursor::new(bundle)), "test");
        let mut cur = BundleCursor::new(&mut fetch, RetryPolicy::default());
        let vm = read_verified_manifest(&mut cur, &keyring)?;
        let layout = read_image_layout(&mut cur, vm.images_offset, &vm.manifest.images[0])?;
        let mut written = 0usize;
        let sink = Sink { disk: &file, at: 0, label: "root" };
        stream_chunks(&mut cur, &layout, 0, sink, &mut |_, len, _| {
            written += len;
            Ok(())
        })?;
        assert_eq!(written, root.len());
        Ok(std::fs::read(&path).unwrap())
    };
    assert!(run(bundle.clone()).unwrap() == root);
    // The zero chunk's payload is not what is written: damaging it changes nothing.
    let mut bad = bundle.clone();
    bad[chunk_at(zero[0]) + 2] ^= 0xFF;
    assert!(run(bad).unwrap() == root);
    // Any other chunk is decompressed and checked.
    let data_chunk = zero[1] + 1;
    let mut bad = bundle;
    bad[chunk_at(data_chunk) + idx.chunks[data_chunk].compressed_len as usize / 2] ^= 0x20;
    let err = run(bad).unwrap_err();
    assert!(
        matches!(err, InstallError::Bundle(BundleError::ChunkCorrupt { chunk, .. }) if chunk == data_chunk),
        "{err}"
    );
}

fn index_of(bundle: &[u8], name: &str, size: u64) -> crate::bundle::ChunkIndex {
    let (off, len) = entry_offset(bundle, name).unwrap();
    crate::bundle::ChunkIndex::decode(&bundle[off as usize..(off + len) as usize], size).unwrap()
}

#[test]
fn a_truncated_bundle_is_an_error_and_slot_a_is_untouched() {
    let f = Fixture::new();
    let before_a = slot_a(&f);
    let (payload, len) = entry_offset(&f.bundle, "root.payload").unwrap();
    let cut = f.bundle[..(payload + len / 3) as usize].to_vec();
    let path = f.dir.path().join("cut.mfb");
    std::fs::write(&path, cut).unwrap();
    let err =
        install_bundle(Source::File(path), &f.request(&AcceptAll), &mut NoProgress).unwrap_err();
    assert!(matches!(err, InstallError::Bundle(BundleError::Truncated { .. })), "{err}");
    assert!(err.to_string().contains("truncated"), "{err}");
    assert_eq!(slot_a(&f), before_a);
}

#[test]
fn http_install_survives_dropped_connections_and_servers_that_ignore_range() {
    for ignore_range in [false, true] {
        let f = Fixture::new();
        let server = TestServer::start(
            f.bundle.clone(),
            Mode::Cut { after: 40_000, times: 2, ignore_range },
        );
        let mut events = Vec::new();
        install_bundle(Source::Url(server.url.clone()), &f.request(&AcceptAll), &mut events)
            .unwrap();
        f.assert_installed();
        let retries: Vec<u64> = events
            .iter()
            .filter_map(|e| match e {
                ProgressEvent::Retrying { offset, .. } => Some(*offset),
                _ => None,
            })
            .collect();
        assert_eq!(retries.len(), 2, "{events:?}");
        // Each retry asked for the bundle from the chunk it needed, not from byte 0.
        let ranges = server.ranges();
        assert_eq!(ranges.len(), 3, "{ranges:?}");
        for (r, off) in ranges[1..].iter().zip(&retries) {
            assert_eq!(r.as_deref(), Some(format!("bytes={off}-").as_str()));
        }
        assert!(retries.iter().all(|&o| o > 0));
    }
}

#[test]
fn https_install_trusts_a_ca_bundle_and_resumes_over_tls() {
    let f = Fixture::new();
    let (ca_pem, tls) = crate::testutil::test_tls();
    let ca = f.dir.path().join("ca.pem");
    std::fs::write(&ca, ca_pem).unwrap();
    let before = std::fs::read(&f.disk).unwrap();
    let cut = Mode::Cut { after: 40_000, times: 1, ignore_range: false };
    let server = TestServer::start_tls(f.bundle.clone(), cut, tls);
    // Without the CA bundle the server is not trusted: an error before anything is written.
    let err =
        install_bundle(Source::Url(server.url.clone()), &f.request(&AcceptAll), &mut NoProgress)
            .unwrap_err();
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    assert!(std::fs::read(&f.disk).unwrap() == before);
    let mut req = f.request(&AcceptAll);
    req.ca_bundle = Some(ca);
    let mut events = Vec::new();
    install_bundle(Source::Url(server.url.clone()), &req, &mut events).unwrap();
    f.assert_installed();
    // The cut connection was resumed with a Range request.
    assert!(events.iter().any(|e| matches!(e, ProgressEvent::Retrying { .. })), "{events:?}");
    assert!(server.ranges().iter().any(|r| r.as_deref().is_some_and(|r| r != "bytes=0-")));
}

#[test]
fn http_errors_are_clear() {
    let f = Fixture::new();
    let before = std::fs::read(&f.disk).unwrap();
    for code in [404u16, 500] {
        let server = TestServer::start(f.bundle.clone(), Mode::Status(code));
        let err = install_bundle(
            Source::Url(server.url.clone()),
            &f.request(&AcceptAll),
            &mut NoProgress,
        )
        .unwrap_err();
        assert!(err.to_string().contains(&format!("HTTP {code}")), "{err}");
        assert_eq!(code == 500, err.is_transient(), "{err}");
    }
    let server = TestServer::start(f.bundle.clone(), Mode::Hang);
    let mut req = f.request(&AcceptAll);
    req.http_timeout = Duration::from_millis(200);
    req.retry = RetryPolicy { attempts: 2, backoff: Duration::from_millis(10) };
    let err = install_bundle(Source::Url(server.url.clone()), &req, &mut NoProgress).unwrap_err();
    assert!(err.to_string().contains("timed out"), "{err}");
    assert!(err.is_transient());
    assert!(std::fs::read(&f.disk).unwrap() == before);
}

/// Arms the chunk-write failpoint for the first root chunk that ends past `at` bytes (the
/// boot image's chunk writes, which come first, pass): a power cut mid-root, `torn` bytes of
/// that chunk landing first.
fn arm_root_write_at(f: &Fixture, at: u64, torn: Option<usize>) {
    let boot = index_of(&f.bundle, "boot.index", f.boot.len() as u64).chunks.len();
    let root = index_of(&f.bundle, "root.index", f.root.len() as u64);
    let mut end = 0u64;
    let before = root.chunks.iter().take_while(|c| {
        end += u64::from(c.len);
        end <= at
    });
    crate::failpoint::arm_after("install.write-chunk", boot + before.count(), torn);
}

#[test]
fn a_power_cut_mid_image_resumes_from_the_last_checkpoint() {
    let f = Fixture::new();
    arm_root_write_at(&f, 500_000, Some(1000));
    let err = f.install(&mut NoProgress).unwrap_err();
    crate::failpoint::disarm();
    assert!(matches!(err, InstallError::PowerCut(_)), "{err}");
    let rec: ResumeRecord =
        serde_json::from_slice(&std::fs::read(f.resume_file()).unwrap()).unwrap();
    assert_eq!((rec.image, rec.slot), (1, Slot::B));
    assert!(rec.written > 300_000, "{rec:?}");
    // Resume from a forward-only pipe: what is on disk is skipped, not fetched again.
    let mut events = Vec::new();
    let done = install_bundle(
        Source::Reader(Box::new(Cursor::new(f.bundle.clone()))),
        &f.request(&AcceptAll),
        &mut events,
    )
    .unwrap();
    assert_eq!(done.resumed_bytes, rec.written);
    assert!(
        events.contains(&ProgressEvent::Resuming { image: SlotClass::Root, skipped: rec.written })
    );
    f.assert_installed();
}

#[test]
fn an_http_install_cut_by_a_reboot_resumes_where_it_stopped() {
    let f = Fixture::new();
    let server = TestServer::start(f.bundle.clone(), Mode::Normal);
    arm_root_write_at(&f, 500_000, Some(10));
    let err =
        install_bundle(Source::Url(server.url.clone()), &f.request(&AcceptAll), &mut NoProgress)
            .unwrap_err();
    crate::failpoint::disarm();
    assert!(matches!(err, InstallError::PowerCut(_)), "{err}");
    let rec: ResumeRecord =
        serde_json::from_slice(&std::fs::read(f.resume_file()).unwrap()).unwrap();
    let before = server.ranges().len();
    let done =
        install_bundle(Source::Url(server.url.clone()), &f.request(&AcceptAll), &mut NoProgress)
            .unwrap();
    assert_eq!(done.resumed_bytes, rec.written);
    f.assert_installed();
    // The second run read the manifest from the start and skipped forward in the same
    // response (this bundle is small: gaps under 256 KiB are read through, larger ones are a
    // new `Range` request, as the dropped-connection test shows).
    assert_eq!(&server.ranges()[before..], [None]);
}

#[test]
fn a_resume_record_pointing_nowhere_is_dropped_and_the_install_starts_over() {
    let f = Fixture::new();
    arm_root_write_at(&f, 500_000, None);
    f.install(&mut NoProgress).unwrap_err();
    crate::failpoint::disarm();
    let mut rec: ResumeRecord =
        serde_json::from_slice(&std::fs::read(f.resume_file()).unwrap()).unwrap();
    rec.index_offset += 512;
    std::fs::write(f.resume_file(), serde_json::to_vec(&rec).unwrap()).unwrap();
    let done = f.install(&mut NoProgress).unwrap();
    assert_eq!(done.resumed_bytes, 0);
    f.assert_installed();
}

#[test]
fn a_resume_record_of_another_bundle_is_ignored_and_replaced() {
    let f = Fixture::new();
    let stale = ResumeRecord {
        format: 1,
        manifest_sha256: "00".repeat(32),
        slot: Slot::B,
        partuuids: vec![],
        image: 1,
        index_offset: 12345,
        next_chunk: 3,
        written: 100,
    };
    std::fs::create_dir_all(f.resume_file().parent().unwrap()).unwrap();
    std::fs::write(f.resume_file(), serde_json::to_vec(&stale).unwrap()).unwrap();
    let done = f.install(&mut NoProgress).unwrap();
    assert_eq!(done.resumed_bytes, 0);
    f.assert_installed();
}

/// Every failpoint of the install path, each cut in turn (and torn chunk writes at several
/// sizes): afterwards slot A is unchanged and the same install, run again, completes.
#[test]
fn power_cut_at_every_install_failpoint_then_resume() {
    let f = Fixture::new();
    crate::failpoint::record();
    f.install(&mut NoProgress).unwrap();
    let mut names = crate::failpoint::recorded();
    names.dedup();
    let mut unique: Vec<String> = Vec::new();
    for n in names {
        if !unique.contains(&n) {
            unique.push(n);
        }
    }
    for want in [
        "install.before-first-write",
        "install.write-chunk",
        "install.before-sync",
        "install.after-sync",
        "install.image-verified",
        "install.before-cmdline",
        "install.after-cmdline",
        "install.before-clear-progress",
        "install.done",
        "install.progress.before-rename",
    ] {
        assert!(unique.iter().any(|n| n == want), "{want} not hit: {unique:?}");
    }
    let mut cases: Vec<(String, Option<usize>)> =
        unique.iter().map(|n| (n.clone(), None)).collect();
    for torn in [0, 1, 4096, 30_000] {
        cases.push(("install.write-chunk".into(), Some(torn)));
    }
    for (name, torn) in cases {
        let f = Fixture::new();
        let before_a = slot_a(&f);
        crate::failpoint::arm(&name, torn);
        let first = f.install(&mut NoProgress);
        crate::failpoint::disarm();
        assert!(matches!(first, Err(InstallError::PowerCut(_))), "{name}: {first:?}");
        assert_eq!(slot_a(&f), before_a, "{name}");
        f.install(&mut NoProgress)
            .unwrap_or_else(|e| panic!("{name} {torn:?}: resume failed: {e}"));
        f.assert_installed();
        assert_eq!(slot_a(&f), before_a, "{name}");
    }
}

#[test]
fn a_resume_whose_written_prefix_was_damaged_fails_the_image_hash_and_starts_over() {
    let f = Fixture::new();
    arm_root_write_at(&f, 500_000, None);
    f.install(&mut NoProgress).unwrap_err();
    crate::failpoint::disarm();
    // Someone scribbles on the written part of root_b.
    let root_b = crate::disk::find_label(&f.disk, "root_b").unwrap();
    let disk = std::fs::OpenOptions::new().write(true).open(&f.disk).unwrap();
    disk.write_all_at(b"scribble", root_b.start + 1000).unwrap();
    let err = f.install(&mut NoProgress).unwrap_err();
    assert!(
        matches!(err, InstallError::Bundle(BundleError::ImageHash { image: SlotClass::Root, .. })),
        "{err}"
    );
    assert!(!f.resume_file().exists());
    f.install(&mut NoProgress).unwrap();
    f.assert_installed();
}

#[test]
fn json_lines_progress_is_one_object_per_line_and_throttled() {
    let mut out = Vec::new();
    {
        let mut p = JsonLines::new(&mut out);
        for done in (0..=100u64).step_by(1) {
            p.event(&ProgressEvent::Written { image: SlotClass::Root, done, total: 100 });
        }
        p.event(&ProgressEvent::Finished { version: "2.0.0".into(), bytes_read: 5 });
    }
    let text = String::from_utf8(out).unwrap();
    let lines: Vec<serde_json::Value> =
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 12, "{text}");
    assert_eq!(lines[0]["event"], "written");
    assert_eq!(lines[11]["event"], "finished");
}

#[test]
fn read_manifest_verifies_without_writing() {
    let f = Fixture::new();
    let vm = read_manifest(Source::File(f.bundle_path.clone()), &f.keyring).unwrap();
    assert_eq!(vm.manifest.images.len(), 2);
    let other = Keyring::from_keys([test_key(5).verifying_key()]);
    assert!(matches!(
        read_manifest(Source::File(f.bundle_path), &other),
        Err(InstallError::Bundle(BundleError::Signature(SignError::UnknownKey(_))))
    ));
}

#[test]
fn the_tally_starts_writebacks_every_8_mib_and_checkpoints_but_not_after_the_last_chunk() {
    let mut t = Tally::new(1 << 30, 0, 12 << 20);
    let due = |t: &mut Tally, len: u64, last| t.written(len << 20, last);
    assert_eq!(due(&mut t, 4, false), Due { writeback: None, checkpoint: false });
    assert_eq!(
        due(&mut t, 4, false),
        Due { writeback: Some(Span::at(1 << 30, 8 << 20)), checkpoint: false }
    );
    assert_eq!(due(&mut t, 4, false), Due { writeback: None, checkpoint: true });
    assert_eq!(
        due(&mut t, 5, false),
        Due { writeback: Some(Span::at((1 << 30) + (8 << 20), 9 << 20)), checkpoint: false }
    );
    // 13 MiB since the checkpoint, but the image's last chunk: its own fsync follows.
    assert_eq!(due(&mut t, 4, true), Due { writeback: None, checkpoint: false });
    assert_eq!(t.done, 21 << 20);
    // A resumed image counts on from where it was.
    let mut resumed = Tally::new(0, 40 << 20, 64 << 20);
    assert_eq!(
        resumed.written(8 << 20, false),
        Due { writeback: Some(Span::at(40 << 20, 8 << 20)), checkpoint: false }
    );
}

#[test]
fn batches_hold_whole_chunks_up_to_the_batch_size_and_zero_chunks_take_no_room() {
    let f = Fixture::new();
    let chunks = index_of(&f.bundle, "root.index", f.root.len() as u64).chunks;
    let size = BatchSize::of(&chunks);
    assert!(size.count >= 1 && size.count <= chunks.len());
    let sizes = &chunks[..size.count];
    assert_eq!(size.compressed, sizes.iter().map(|c| u64::from(c.compressed_len)).sum::<u64>());
    assert_eq!(size.len, sizes.iter().map(|c| u64::from(c.len)).sum::<u64>());
    let plain = |c: &ChunkEntry| if is_zero_chunk(c) { 0 } else { u64::from(c.len) };
    let held: u64 = sizes.iter().map(plain).sum();
    assert!(size.count == 1 || held <= BATCH_BYTES, "{size:?}");
    if let Some(next) = chunks.get(size.count) {
        assert!(held + plain(next) > BATCH_BYTES, "{size:?} stopped early");
    }
    let zero_sha = Sha256::digest(vec![0u8; CHUNK_MAX as usize]).into();
    let zero = ChunkEntry { sha256: zero_sha, len: CHUNK_MAX, compressed_len: 9 };
    let data = ChunkEntry { sha256: [1; 32], len: CHUNK_MAX, compressed_len: 1000 };
    let zeros_then_data = BatchSize::of(&[zero, zero, data, data]);
    assert!(is_zero_chunk(&zero));
    assert_eq!(
        zeros_then_data,
        BatchSize { count: 3, compressed: 1018, len: 3 * u64::from(CHUNK_MAX) }
    );
}

#[test]
fn a_resume_position_counts_only_on_a_chunk_boundary() {
    let c = |len| ChunkEntry { sha256: [7; 32], len, compressed_len: 10 };
    let chunks = [c(100), c(200), c(50)];
    let at = |chunk, bytes| ChunkPosition { chunk, bytes };
    assert_eq!(at(2, 300).on_boundary_of(&chunks), at(2, 300));
    assert_eq!(at(3, 350).on_boundary_of(&chunks), at(3, 350));
    assert_eq!(at(2, 299).on_boundary_of(&chunks), ChunkPosition::default());
    assert_eq!(at(4, 350).on_boundary_of(&chunks), ChunkPosition::default());
}

#[test]
fn auto_progress_is_a_bar_only_on_a_watched_terminal() {
    use ProgressStyle::{Auto, Bar, Json, Plain};
    let cases: [(Option<&str>, Option<&str>, ProgressStyle); 10] = [
        (Some("/dev/pts/3"), Some("xterm-256color"), Bar),
        (Some("/dev/tty1"), Some("linux"), Bar),
        (Some("/dev/console"), Some("linux"), Plain),
        (Some("/dev/ttyAMA0"), Some("vt220"), Plain),
        (Some("/dev/ttyS0"), Some("vt102"), Plain),
        (Some("/dev/ttyUSB1"), Some("xterm"), Plain),
        (Some("/dev/hvc0"), Some("linux"), Plain),
        (Some("/dev/pts/3"), Some("dumb"), Plain),
        (Some("/dev/pts/3"), None, Plain),
        // Not a terminal: a pipe, a file, the journal.
        (None, Some("xterm"), Plain),
    ];
    for (tty, term, want) in cases {
        assert_eq!(Auto.resolve(tty.map(Path::new), term), want, "{tty:?} {term:?}");
    }
    for chosen in [Bar, Plain, Json] {
        assert_eq!(chosen.resolve(Some(Path::new("/dev/ttyAMA0")), None), chosen);
    }
    assert!(!is_console(Path::new("/dev/ttyAMA")) && !is_console(Path::new("/dev/ttySx")));
}

#[test]
fn plain_lines_are_whole_lines_at_most_one_per_tenth() {
    let mut out = Vec::new();
    {
        let mut p = PlainLines::new(&mut out);
        p.event(&ProgressEvent::ImageStarted {
            image: SlotClass::Root,
            partition: "root_b".into(),
            size: 1 << 20,
        });
        for done in (0..=100u64).map(|i| (i << 20) / 100) {
            p.event(&ProgressEvent::Written { image: SlotClass::Root, done, total: 1 << 20 });
        }
        p.event(&ProgressEvent::Retrying { offset: 7, attempt: 1, error: "reset".into() });
        p.event(&ProgressEvent::Finished { version: "2.0.0".into(), bytes_read: 9 });
    }
    let text = String::from_utf8(out).unwrap();
    assert!(!text.contains('\r'), "{text:?}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "root: writing 1.0 MiB to root_b");
    assert_eq!(lines[1], "root:   0% (0.0 of 1.0 MiB)");
    assert_eq!(lines[11], "root: 100% (1.0 of 1.0 MiB)");
    assert_eq!(lines[12..], ["retry 1 from byte 7: reset", "installed 2.0.0"]);
    assert_eq!(lines.len(), 14, "{text}");
}
