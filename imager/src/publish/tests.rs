//! Publishing tests: the folder layout, sequence and signatures, every edit, the bad inputs,
//! and a device's view of the folder served by a static HTTP server on loopback.

use super::*;
use updater::bundle::testkit::{make_bundle, test_image, TestMeta};
use updater::bundle::{Fetch, SlotClass};
use updater::channel::{verify, ChannelError, Expect};
use updater::rollout::{
    decide, AttemptHistory, Decision, Device, DeviceFacts, InstallReason, Overrides,
};
use updater::testserver::TestServer;

/// 2026-11-24T08:00:00Z
pub(super) const T0: u64 = 1_795_507_200;

/// A temp folder with a generated key pair, its keyring and the channel folder `www`; the
/// role publishing tests (publish::roles) share it.
pub(super) struct Setup {
    pub(super) dir: tempfile::TempDir,
    pub(super) key: SigningKey,
    pub(super) ring: Keyring,
    pub(super) folder: PathBuf,
}

pub(super) fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let pair = crate::keys::generate(&dir.path().join("keys"), "fleet").unwrap();
    let key = crate::keys::load_signing_key(&pair.private).unwrap();
    let ring = Keyring::load(&dir.path().join("keys")).unwrap();
    let folder = dir.path().join("www");
    Setup { dir, key, ring, folder }
}

impl Setup {
    /// A signed bundle `qemu-<version>.mfb` (compatible `metrica-test`) in the temp folder.
    pub(super) fn bundle(&self, version: &str, epoch: u64) -> PathBuf {
        let meta = TestMeta {
            compatible: "metrica-test".into(),
            version: version.parse().unwrap(),
            security_epoch: epoch,
        };
        let boot = test_image(40_000, 1);
        let root = test_image(300_000, epoch + 7);
        let bytes = make_bundle(
            &meta,
            &[(SlotClass::Boot, &boot[..]), (SlotClass::Root, &root[..])],
            Some(&self.key),
        );
        let p = self.dir.path().join(format!("qemu-{version}.mfb"));
        std::fs::write(&p, bytes).unwrap();
        p
    }

    pub(super) fn signer(&self, now: u64) -> Signer<'_> {
        Signer { key: &self.key, expires_in: DEFAULT_EXPIRES_IN, now }
    }

    pub(super) fn publish(&self, bundle: &Path, percent: u8, now: u64) -> Result<Published> {
        let req = PublishRequest {
            folder: &self.folder,
            channel: "stable",
            bundle,
            name: None,
            keyring: &self.ring,
            rollout: Rollout { percent, ..Rollout::everyone() },
            sequence: None,
        };
        publish(&req, &self.signer(now), &Progress::quiet())
    }

    fn edit(&self, e: &Edit, now: u64) -> Result<Published> {
        edit(&self.folder, "stable", e, &self.ring, &self.signer(now), &Progress::quiet())
    }

    fn files(&self) -> (Vec<u8>, Vec<u8>) {
        (
            std::fs::read(self.folder.join("channels/stable.toml")).unwrap(),
            std::fs::read(self.folder.join("channels/stable.toml.sig")).unwrap(),
        )
    }

    fn verified(&self, last: Option<u64>, now: u64) -> Result<Channel, ChannelError> {
        let (doc, sig) = self.files();
        let e = Expect { keyring: &self.ring, name: "stable", last_sequence: last, now };
        verify(&doc, Some(&sig), &e).map(|v| v.channel)
    }
}

fn device(id: &str, version: &str) -> Device {
    Device {
        device_id: id.into(),
        segment: updater::channel::Segment::General,
        facts: DeviceFacts {
            compatible: "metrica-test".into(),
            committed_version: Some(version.parse().unwrap()),
            security_epoch: 1,
            pinned_version: None,
        },
    }
}

#[test]
fn publish_lays_out_the_folder_signs_and_bumps_the_sequence() {
    let s = setup();
    let b1 = s.bundle("1.0.0", 1);
    let p = s.publish(&b1, 100, T0).unwrap();
    assert_eq!(p.channel.sequence, 1);
    let copied = s.folder.join("bundles/qemu-1.0.0.mfb");
    assert_eq!(p.bundle.as_deref(), Some(copied.as_path()));
    assert_eq!(std::fs::read(&copied).unwrap(), std::fs::read(&b1).unwrap());
    let ch = s.verified(None, T0 + 1).unwrap();
    assert_eq!(ch.os.urls, vec!["../bundles/qemu-1.0.0.mfb".to_string()]);
    assert_eq!(ch.os.size, std::fs::metadata(&b1).unwrap().len());
    assert_eq!(ch.os.sha256, hex::encode(Sha256::digest(std::fs::read(&b1).unwrap())));
    assert_eq!((ch.os.compatible.as_str(), ch.os.security_epoch), ("metrica-test", 1));
    assert_eq!((ch.published, ch.expires), (Timestamp(T0), Timestamp(T0 + 7 * 86_400)));

    let b2 = s.bundle("2.0.0", 1);
    let p = s.publish(&b2, 10, T0 + 60).unwrap();
    assert_eq!(p.channel.sequence, 2);
    let ch = s.verified(Some(1), T0 + 61).unwrap();
    assert_eq!((ch.os.version.to_string(), ch.os.rollout.percent), ("2.0.0".into(), 10));
    assert!(s.folder.join("bundles/qemu-1.0.0.mfb").exists(), "old bundles stay");
    // Publishing the same bundle again is allowed (e.g. a new rollout) and bumps the sequence.
    assert_eq!(s.publish(&b2, 20, T0 + 120).unwrap().channel.sequence, 3);

    // The folder is lost: a new one starts at 1, which devices that saw 3 refuse; --sequence
    // continues above what they saw.
    std::fs::remove_dir_all(&s.folder).unwrap();
    let lost = s.publish(&b2, 20, T0 + 180).unwrap();
    assert_eq!(lost.channel.sequence, 1);
    assert_eq!(s.verified(Some(3), T0 + 181).unwrap_err().code(), "replayed");
    std::fs::remove_dir_all(&s.folder).unwrap();
    let req = PublishRequest {
        folder: &s.folder,
        channel: "stable",
        bundle: &b2,
        name: None,
        keyring: &s.ring,
        rollout: Rollout::everyone(),
        sequence: Some(100),
    };
    assert_eq!(
        publish(&req, &s.signer(T0 + 240), &Progress::quiet()).unwrap().channel.sequence,
        100
    );
    assert_eq!(s.verified(Some(3), T0 + 241).unwrap().sequence, 100);
}

#[test]
fn edits_re_sign_with_the_next_sequence() {
    let s = setup();
    let b1 = s.bundle("1.0.0", 1);
    s.publish(&b1, 100, T0).unwrap();
    s.publish(&s.bundle("2.0.0", 1), 5, T0).unwrap();
    let waves = parse_waves("1@+0s,5@+1h,25@+4h,100@+24h", T0).unwrap();
    let change = RolloutChange {
        percent: Some(0),
        segments: Some(parse_segments("canary,early").unwrap()),
        not_before: Some(Some(Timestamp(T0 + 10))),
        waves: Some(waves.clone()),
    };
    let ch = s.edit(&Edit::Set(change), T0 + 1).unwrap().channel;
    assert_eq!(ch.sequence, 3);
    assert_eq!(ch.os.rollout.waves, waves);
    assert_eq!(ch.os.rollout.segments.len(), 2);
    assert_eq!(ch.os.rollout.not_before, Some(Timestamp(T0 + 10)));
    // A set with no change re-signs with a new expiry only.
    let ch = s.edit(&Edit::Set(RolloutChange::default()), T0 + 86_400).unwrap().channel;
    assert_eq!((ch.sequence, ch.expires), (4, Timestamp(T0 + 8 * 86_400)));
    assert_eq!(ch.os.rollout.waves, waves);
    assert!(s.edit(&Edit::Pause, T0 + 86_400).unwrap().channel.paused);
    assert!(s.verified(None, T0 + 86_400).unwrap().paused);
    assert!(!s.edit(&Edit::Resume, T0 + 86_400).unwrap().channel.paused);
    let pin = Edit::Pin {
        version: Some("1.0.0".parse().unwrap()),
        bundle: None,
        reason: "camera regression in 2.0.0".into(),
        expires: Some(Timestamp(T0 + 2 * 86_400)),
    };
    let ch = s.edit(&pin, T0 + 86_400).unwrap().channel;
    let p = ch.pin.unwrap();
    assert_eq!(p.urls, vec!["../bundles/qemu-1.0.0.mfb".to_string()]);
    assert_eq!(p.sha256, hex::encode(Sha256::digest(std::fs::read(&b1).unwrap())));
    let ch = s.edit(&Edit::Unpin, T0 + 86_400).unwrap().channel;
    assert_eq!((ch.pin, ch.sequence), (None, 8));
    assert!(s.verified(Some(8), T0 + 86_400).is_ok());
}

/// Bad inputs of the operator side, each with a clear error.
#[test]
fn bad_publish_and_edit_inputs_are_refused() {
    let s = setup();
    let err = |r: Result<Published>| format!("{:#}", r.unwrap_err());
    // Edit before anything was published.
    let e = err(s.edit(&Edit::Pause, T0));
    assert!(e.contains("does not exist") && e.contains("imager publish"), "{e}");
    let b2 = s.bundle("2.0.0", 1);
    s.publish(&b2, 10, T0).unwrap();
    // Unsigned, unknown key, corrupt bundles.
    let unsigned = s.dir.path().join("unsigned-3.0.0.mfb");
    let meta = TestMeta {
        compatible: "metrica-test".into(),
        version: "3.0.0".parse().unwrap(),
        security_epoch: 1,
    };
    let img = test_image(50_000, 3);
    std::fs::write(&unsigned, make_bundle(&meta, &[(SlotClass::Root, &img[..])], None)).unwrap();
    assert!(err(s.publish(&unsigned, 10, T0)).contains("unsigned"), "unsigned");
    let stranger = SigningKey::from_bytes(&[9; 32]);
    let foreign = s.dir.path().join("foreign-3.0.0.mfb");
    std::fs::write(&foreign, make_bundle(&meta, &[(SlotClass::Root, &img[..])], Some(&stranger)))
        .unwrap();
    assert!(err(s.publish(&foreign, 10, T0)).contains("not in the keyring"), "foreign");
    let corrupt = s.dir.path().join("corrupt-3.0.0.mfb");
    let mut bytes = std::fs::read(s.bundle("3.0.0", 1)).unwrap();
    let n = bytes.len();
    bytes[n - 3000] ^= 0xff;
    std::fs::write(&corrupt, bytes).unwrap();
    assert!(err(s.publish(&corrupt, 10, T0)).contains("verifying the bundle"), "corrupt");
    // Older than what the channel offers.
    let e = err(s.publish(&s.bundle("1.0.0", 1), 10, T0));
    assert!(e.contains("older") && e.contains("pin"), "{e}");
    // Another file under a published name is never replaced.
    let other = s.dir.path().join("other").join("qemu-2.0.0.mfb");
    std::fs::create_dir_all(other.parent().unwrap()).unwrap();
    let meta2 = TestMeta {
        compatible: "metrica-test".into(),
        version: "2.0.0".parse().unwrap(),
        security_epoch: 1,
    };
    std::fs::write(&other, make_bundle(&meta2, &[(SlotClass::Root, &img[..])], Some(&s.key)))
        .unwrap();
    let e = err(s.publish(&other, 10, T0));
    assert!(e.contains("never replaced"), "{e}");
    // Other hardware.
    let meta3 = TestMeta {
        compatible: "metrica-rpi4-arm64".into(),
        version: "4.0.0".parse().unwrap(),
        security_epoch: 1,
    };
    let rpi = s.dir.path().join("rpi-4.0.0.mfb");
    std::fs::write(&rpi, make_bundle(&meta3, &[(SlotClass::Root, &img[..])], Some(&s.key)))
        .unwrap();
    assert!(err(s.publish(&rpi, 10, T0)).contains("is for \"metrica-test\""));
    // Bad channel name.
    let req = PublishRequest {
        folder: &s.folder,
        channel: "Stable/..",
        bundle: &b2,
        name: None,
        keyring: &s.ring,
        rollout: Rollout::everyone(),
        sequence: None,
    };
    assert!(err(publish(&req, &s.signer(T0), &Progress::quiet())).contains("channel name"));
    // An explicit sequence must be above the current document's.
    let req = PublishRequest { channel: "stable", sequence: Some(1), ..req };
    assert!(err(publish(&req, &s.signer(T0), &Progress::quiet())).contains("not above"));
    // Pins: missing version (names what exists), no reason, past expiry.
    let pin = |v: &str, reason: &str, exp: Option<u64>| Edit::Pin {
        version: Some(v.parse().unwrap()),
        bundle: None,
        reason: reason.into(),
        expires: exp.map(Timestamp),
    };
    let e = err(s.edit(&pin("1.5.0", "x", None), T0));
    assert!(e.contains("no bundle of version 1.5.0") && e.contains("qemu-2.0.0.mfb"), "{e}");
    assert!(err(s.edit(&pin("2.0.0", " ", None), T0)).contains("reason"));
    assert!(err(s.edit(&pin("2.0.0", "x", Some(T0)), T0)).contains("in the past"));
    assert!(err(s.edit(&Edit::Unpin, T0)).contains("not pinned"));
    // Rollout values the document refuses.
    let e = err(s.publish(&b2, 101, T0));
    assert!(e.contains("os.rollout.percent"), "{e}");
    // A corrupt channel document in the folder is reported, not overwritten.
    let doc = s.folder.join("channels/stable.toml");
    std::fs::write(&doc, "format = 1\nbogus = true\n").unwrap();
    let e = err(s.edit(&Edit::Pause, T0));
    assert!(e.contains("stable.toml") && e.contains("bogus"), "{e}");
    assert_eq!(std::fs::read_to_string(&doc).unwrap(), "format = 1\nbogus = true\n");
}

#[test]
fn wave_and_time_specs() {
    let w = parse_waves("1@+0s, 5@+1h,25%@+4h,100@2026-11-25T08:00:00Z", T0).unwrap();
    let got: Vec<(u64, u8)> = w.iter().map(|w| (w.at.0 - T0, w.percent)).collect();
    assert_eq!(got, vec![(0, 1), (3600, 5), (4 * 3600, 25), (86_400, 100)]);
    for bad in
        ["", "5", "101@+1h", "x@+1h", "5@tomorrow", "5@+1 fortnight", "5@2026-11-25T08:00:00"]
    {
        assert!(parse_waves(bad, T0).is_err(), "{bad}");
    }
    assert_eq!(parse_when("now", T0).unwrap(), Timestamp(T0));
    assert_eq!(parse_when("+90m", T0).unwrap(), Timestamp(T0 + 5400));
    assert!(parse_segments("canary,general").unwrap().len() == 2);
    assert!(parse_segments("beta").is_err() && parse_segments("").is_err());
    let mut facts = BundleFacts {
        compatible: "metrica-test".into(),
        version: "1.2.0".parse().unwrap(),
        security_epoch: 0,
        size: 1,
        sha256: String::new(),
    };
    assert_eq!(bundle_name(None, Path::new("out/qemu-1.2.0.mfb"), &facts).unwrap(), "qemu");
    assert_eq!(bundle_name(None, Path::new("os.mfb"), &facts).unwrap(), "metrica-test");
    assert_eq!(bundle_name(Some("pi"), Path::new("os.mfb"), &facts).unwrap(), "pi");
    assert!(bundle_name(Some("P I"), Path::new("os.mfb"), &facts).is_err());
    facts.compatible = "Bad Name".into();
    assert!(bundle_name(None, Path::new("os.mfb"), &facts).is_err());
}

fn http_get(url: &str) -> Option<Vec<u8>> {
    let mut f = updater::http::HttpFetch::new(url, Duration::from_secs(5));
    let mut r = f.open_at(0).ok()??;
    let mut out = Vec::new();
    r.read_to_end(&mut out).unwrap();
    Some(out)
}

/// The operator publishes and edits; devices fetch the folder from a static server on
/// loopback, verify the channel, decide, and verify the bundle over HTTP.
#[test]
fn devices_follow_the_published_folder_over_http() {
    let s = setup();
    s.publish(&s.bundle("1.0.0", 1), 100, T0).unwrap();
    s.publish(&s.bundle("2.0.0", 1), 10, T0 + 60).unwrap();
    let server = TestServer::folder(&s.folder);
    let doc_url = server.url_of("/channels/stable.toml");
    let fetch_channel = |last: Option<u64>, now: u64| {
        let doc = http_get(&doc_url).expect("the document is served");
        let sig = http_get(&format!("{doc_url}.sig"));
        let e = Expect { keyring: &s.ring, name: "stable", last_sequence: last, now };
        verify(&doc, sig.as_deref(), &e).map(|v| v.channel)
    };
    let now = T0 + 120;
    let ch = fetch_channel(None, now).unwrap();
    assert_eq!(ch.sequence, 2);
    let (o, h) = (Overrides::default(), AttemptHistory::default());
    let devices: Vec<Device> = (0..1000).map(|i| device(&format!("pi-{i:04}"), "1.0.0")).collect();
    let installing: Vec<&Device> =
        devices.iter().filter(|d| decide(&ch, d, &o, &h, now).is_install()).collect();
    assert!((60..=140).contains(&installing.len()), "10% of 1000: {}", installing.len());

    // One selected device fetches its bundle from the URL in the channel and verifies it.
    let Decision::Install { urls, sha256, size, reason, .. } =
        decide(&ch, installing[0], &o, &h, now)
    else {
        unreachable!()
    };
    assert!(matches!(reason, InstallReason::Rollout { percent: 10, .. }));
    let url = updater::channel::resolve_url(&doc_url, &urls[0]);
    assert_eq!(url, server.url_of("/bundles/qemu-2.0.0.mfb"));
    let bytes = http_get(&url).unwrap();
    assert_eq!((bytes.len() as u64, hex::encode(Sha256::digest(&bytes))), (size, sha256));
    let mut fetch = updater::http::HttpFetch::new(&url, Duration::from_secs(5));
    let check = updater::bundle::verify_bundle(&mut fetch, &s.ring).unwrap();
    assert_eq!(check.manifest.manifest.version.to_string(), "2.0.0");

    // Pause: nobody starts. Pin 1.0.0: the updated devices come back. The stale document of
    // sequence 2 is a replay once a device has seen a later one.
    let old = (http_get(&doc_url).unwrap(), http_get(&format!("{doc_url}.sig")).unwrap());
    s.edit(&Edit::Pause, now).unwrap();
    let ch = fetch_channel(Some(2), now).unwrap();
    assert!(devices.iter().all(|d| decide(&ch, d, &o, &h, now).code() == "paused"));
    let pin = Edit::Pin {
        version: Some("1.0.0".parse().unwrap()),
        bundle: None,
        reason: "rollback".into(),
        expires: None,
    };
    s.edit(&pin, now).unwrap();
    let ch = fetch_channel(Some(3), now).unwrap();
    assert_eq!(ch.sequence, 4);
    let on_2 = device("pi-0001", "2.0.0");
    let d = decide(&ch, &on_2, &o, &h, now);
    assert!(
        matches!(&d, Decision::Install { version, .. } if version.to_string() == "1.0.0"),
        "{d:?}"
    );
    assert_eq!(decide(&ch, &device("pi-0002", "1.0.0"), &o, &h, now).code(), "pinned");
    let e = Expect { keyring: &s.ring, name: "stable", last_sequence: Some(4), now };
    let err = verify(&old.0, Some(&old.1), &e).unwrap_err();
    assert!(matches!(err, ChannelError::Replayed { sequence: 2, last_seen: 4 }), "{err}");
    // Expired: a device whose last document is older than its validity does not act on it.
    let err = fetch_channel(Some(4), now + 8 * 86_400).unwrap_err();
    assert_eq!(err.code(), "expired");
    // A missing signature file on the server: unsigned.
    std::fs::remove_file(s.folder.join("channels/stable.toml.sig")).unwrap();
    assert_eq!(fetch_channel(Some(4), now).unwrap_err().code(), "unsigned");
    assert!(http_get(&server.url_of("/channels/beta.toml")).is_none());
    assert!(server.requests() >= 10);
}
