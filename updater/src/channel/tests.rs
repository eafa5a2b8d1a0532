use super::*;
use crate::sign::tests::test_key;

/// 2026-11-24T08:00:00Z
pub(crate) const T0: u64 = 1_795_507_200;

/// A valid channel `stable`, published at T0, expiring a week later, offering 2.0.0 to 10%.
pub(crate) fn sample() -> Channel {
    Channel {
        format: CHANNEL_FORMAT,
        name: "stable".into(),
        sequence: 7,
        published: Timestamp(T0),
        expires: Timestamp(T0 + 7 * 86_400),
        paused: false,
        os: OsTarget {
            compatible: "metrica-rpi4-arm64".into(),
            version: Version::new(2, 0, 0),
            urls: vec!["../bundles/pi-2.0.0.mfb".into()],
            size: 1234,
            sha256: "ab".repeat(32),
            security_epoch: 1,
            rollout: Rollout { percent: 10, ..Rollout::everyone() },
        },
        pin: None,
        roles: BTreeMap::new(),
        devices: BTreeMap::new(),
    }
}

fn ring() -> Keyring {
    Keyring::from_keys([test_key(1).verifying_key()])
}

fn expect(ring: &Keyring, last: Option<u64>, now: u64) -> Expect<'_> {
    Expect { keyring: ring, name: "stable", last_sequence: last, now }
}

#[test]
fn timestamps_convert_both_ways_and_need_an_offset() {
    assert_eq!("2026-11-24T08:00:00Z".parse::<Timestamp>().unwrap(), Timestamp(T0));
    assert_eq!("2026-11-24T09:30:00+01:30".parse::<Timestamp>().unwrap(), Timestamp(T0));
    assert_eq!("1970-01-01T00:00:00Z".parse::<Timestamp>().unwrap(), Timestamp(0));
    assert_eq!("2000-02-29T00:00:00Z".parse::<Timestamp>().unwrap(), Timestamp(951_782_400));
    assert_eq!(Timestamp(T0).to_rfc3339(), "2026-11-24T08:00:00Z");
    for t in [0, 59, 951_782_400, T0, T0 + 12_345_678, 4_102_444_800] {
        assert_eq!(Timestamp(t).to_rfc3339().parse::<Timestamp>().unwrap(), Timestamp(t));
    }
    for bad in ["2026-11-24T08:00:00", "2026-11-24", "08:00:00", "soon", "1969-12-31T23:59:59Z"] {
        assert!(bad.parse::<Timestamp>().is_err(), "{bad}");
    }
}

#[test]
fn a_document_round_trips_and_reads_as_documented() {
    let mut ch = sample();
    ch.os.rollout.waves = vec![
        Wave { at: Timestamp(T0), percent: 10 },
        Wave { at: Timestamp(T0 + 3600), percent: 25 },
    ];
    ch.pin = Some(Pin {
        version: Version::new(1, 9, 0),
        reason: "camera driver regression".into(),
        expires: Some(Timestamp(T0 + 86_400)),
        compatible: "metrica-rpi4-arm64".into(),
        urls: vec!["../bundles/pi-1.9.0.mfb".into()],
        size: 99,
        sha256: "cd".repeat(32),
        security_epoch: 1,
    });
    ch.devices.insert(
        "pi-042".into(),
        DeviceOverride { version_lock: Some(Version::new(1, 8, 0)), ..Default::default() },
    );
    ch.roles.insert(
        "camera-single".into(),
        RoleTarget::new(
            Version::new(3, 1, 0),
            vec!["../roles/camera-single/3.1.0.mfr".into()],
            10,
            "ef".repeat(32),
            Rollout::everyone(),
        ),
    );
    let text = ch.to_toml();
    assert_eq!(Channel::parse(text.as_bytes()).unwrap(), ch, "{text}");
    assert!(text.contains("published = 2026-11-24T08:00:00Z"), "{text}");

    // A hand-written document with defaults (paused, segments) and an offset time.
    let hand = r#"
format = 1
name = "stable"
sequence = 3
published = 2026-11-24T09:00:00+01:00
expires = 2026-12-01T08:00:00Z

[os]
compatible = "metrica-qemu-arm64"
version = "1.2.0"
urls = ["../bundles/qemu-1.2.0.mfb", "https://mirror.example/metrica/bundles/qemu-1.2.0.mfb"]
size = 4096
sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
security_epoch = 0

[os.rollout]
percent = 5
"#;
    let ch = Channel::parse(hand.as_bytes()).unwrap();
    assert_eq!(ch.published, Timestamp(T0));
    assert!(!ch.paused);
    assert_eq!(ch.os.rollout.segments.len(), 3);
    assert_eq!(ch.os.urls.len(), 2);
}

/// Every kind of malformed or invalid document gives its error, naming the field (or line).
#[test]
fn bad_documents_name_the_field() {
    let good = sample().to_toml();
    let cases: Vec<(&str, String, &str)> = vec![
        ("empty", String::new(), "missing field `format`"),
        ("not toml", "format = [".into(), "line 1"),
        ("unknown key", good.replace("paused = false", "paused = false\npasued = true"), "pasued"),
        ("unknown rollout key", good.replace("percent = 10", "percent = 10\npercnt = 3"), "percnt"),
        (
            "missing sequence",
            good.replace("sequence = 7\n", ""),
            "document (line 1): missing field `sequence`",
        ),
        (
            "missing sha256",
            good.replace(&format!("sha256 = \"{}\"\n", "ab".repeat(32)), ""),
            "os (line 8): missing field `sha256`",
        ),
        (
            "local time",
            good.replace("published = 2026-11-24T08:00:00Z", "published = 2026-11-24T08:00:00"),
            "offset",
        ),
        (
            "string time",
            good.replace("published = 2026-11-24T08:00:00Z", "published = \"today\""),
            "published (line 4)",
        ),
        ("bad version", good.replace("version = \"2.0.0\"", "version = \"two\""), "os.version"),
        ("bad segment", good.replace("\"canary\"", "\"beta\""), "beta"),
        ("percent type", good.replace("percent = 10", "percent = 300"), "os.rollout.percent"),
        ("format 2", good.replace("format = 1", "format = 2"), "format: 2 is not supported"),
        ("bad name", good.replace("name = \"stable\"", "name = \"Stable/../x\""), "name:"),
        (
            "expires before published",
            good.replace("expires = 2026-12-01", "expires = 2026-11-01"),
            "expires:",
        ),
        (
            "percent above 100",
            good.replace("percent = 10", "percent = 101"),
            "os.rollout.percent: 101",
        ),
        (
            "no segments",
            good.replace("segments = [\"canary\", \"early\", \"general\"]", "segments = []"),
            "os.rollout.segments",
        ),
        ("no urls", good.replace("urls = [\"../bundles/pi-2.0.0.mfb\"]", "urls = []"), "os.urls"),
        ("url with space", good.replace("../bundles/pi-2.0.0.mfb", "a b"), "os.urls[0]"),
        ("size 0", good.replace("size = 1234", "size = 0"), "os.size"),
        ("bad sha", good.replace(&"ab".repeat(32), &"AB".repeat(32)), "os.sha256"),
        (
            "empty compatible",
            good.replace("compatible = \"metrica-rpi4-arm64\"", "compatible = \"\""),
            "os.compatible",
        ),
    ];
    assert!(good.contains("segments = [\"canary\", \"early\", \"general\"]"), "{good}");
    for (what, text, want) in cases {
        assert_ne!(text, good, "{what}: the case changed nothing");
        let err = Channel::parse(text.as_bytes()).unwrap_err();
        assert!(
            matches!(err, ChannelError::Malformed { .. } | ChannelError::Invalid { .. }),
            "{what}: {err}"
        );
        assert!(err.to_string().contains(want), "{what}: {err}");
    }
    let err = Channel::parse(b"format = 1\n\xff\n").unwrap_err();
    assert!(matches!(err, ChannelError::Malformed { line: Some(2), .. }), "{err}");
}

#[test]
fn invalid_waves_pins_roles_and_devices_name_the_field() {
    fn w(at: u64, percent: u8) -> Wave {
        Wave { at: Timestamp(T0 + at), percent }
    }
    type Edit = Box<dyn Fn(&mut Channel)>;
    let cases: Vec<(Edit, &str)> = vec![
        (Box::new(|c| c.os.rollout.waves = vec![w(0, 15), w(0, 20)]), "os.rollout.waves[1].at"),
        (
            Box::new(|c| c.os.rollout.waves = vec![w(10, 50), w(20, 25)]),
            "os.rollout.waves[1].percent",
        ),
        (
            Box::new(|c| c.os.rollout.waves = vec![w(10, 5)]),
            "os.rollout.waves[0].percent: 5 is below",
        ),
        (Box::new(|c| c.os.rollout.waves = vec![w(10, 200)]), "os.rollout.waves[0].percent: 200"),
        (
            Box::new(|c| {
                let mut p = pin_of(c);
                p.reason = " ".into();
                c.pin = Some(p);
            }),
            "pin.reason",
        ),
        (
            Box::new(|c| {
                let mut p = pin_of(c);
                p.compatible = "other".into();
                c.pin = Some(p);
            }),
            "pin.compatible",
        ),
        (
            Box::new(|c| {
                let mut p = pin_of(c);
                p.urls.clear();
                c.pin = Some(p);
            }),
            "pin.urls",
        ),
        (
            Box::new(|c| {
                c.devices.insert(
                    "pi-1".into(),
                    DeviceOverride { channel: Some("No Such".into()), ..Default::default() },
                );
            }),
            "devices.pi-1.channel",
        ),
        (
            Box::new(|c| {
                c.devices.insert("has space".into(), DeviceOverride::default());
            }),
            "devices.\"has space\"",
        ),
        (
            Box::new(|c| {
                let mut r = RoleTarget::new(
                    Version::new(1, 0, 0),
                    vec!["x".into()],
                    1,
                    "00".repeat(32),
                    Rollout::everyone(),
                );
                r.rollout.percent = 120;
                c.roles.insert("cam".into(), r);
            }),
            "roles.cam.rollout.percent",
        ),
    ];
    for (edit, want) in cases {
        let mut c = sample();
        edit(&mut c);
        let err = Channel::parse(c.to_toml().as_bytes()).unwrap_err();
        assert!(matches!(err, ChannelError::Invalid { .. }), "{want}: {err}");
        assert!(err.to_string().contains(want), "{want}: {err}");
    }
}

fn pin_of(c: &Channel) -> Pin {
    Pin {
        version: Version::new(1, 0, 0),
        reason: "rollback".into(),
        expires: None,
        compatible: c.os.compatible.clone(),
        urls: vec!["../bundles/pi-1.0.0.mfb".into()],
        size: 5,
        sha256: "11".repeat(32),
        security_epoch: 0,
    }
}

#[test]
fn a_signed_fresh_document_verifies() {
    let (doc, sig) = sample().sign(&test_key(1));
    let ring = ring();
    let v = verify(&doc, Some(&sig), &expect(&ring, Some(6), T0 + 60)).unwrap();
    assert_eq!(v.channel, sample());
    assert_eq!(v.key_id, KeyId::of(&test_key(1).verifying_key()));
    assert_eq!(v.sha256.len(), 64);
    // The same sequence again (a re-fetch of the same document) is fine.
    assert!(verify(&doc, Some(&sig), &expect(&ring, Some(7), T0 + 60)).is_ok());
}

/// The bad-input table of the issue: each case gives its named error and code.
#[test]
fn bad_channels_give_named_errors() {
    let ring = ring();
    let (doc, sig) = sample().sign(&test_key(1));
    let (_, other_sig) = sample().sign(&test_key(2));
    let mut tampered = doc.clone();
    let pos = tampered.windows(12).position(|w| w == b"percent = 10").unwrap();
    tampered[pos + 10] = b'9'; // percent = 90, signature unchanged
    let mut beta = sample();
    beta.name = "beta".into();
    let (beta_doc, beta_sig) = beta.sign(&test_key(1));
    let (garbage, garbage_sig) = {
        let g = b"<html>not a channel</html>".to_vec();
        let s = SignatureFile::sign(&test_key(1), &g).to_bytes();
        (g, s)
    };
    let big = vec![b'#'; MAX_CHANNEL_DOC + 1];
    let now = T0 + 60;
    type Case<'a> = (&'a str, &'a [u8], Option<&'a [u8]>, Expect<'a>, &'a str);
    let cases: Vec<Case<'_>> = vec![
        ("too large", &big, Some(&sig), expect(&ring, None, now), "too_large"),
        ("unsigned", &doc, None, expect(&ring, None, now), "unsigned"),
        ("garbage signature", &doc, Some(b"junk"), expect(&ring, None, now), "malformed_signature"),
        ("unknown key", &doc, Some(&other_sig), expect(&ring, None, now), "unknown_key"),
        ("tampered", &tampered, Some(&sig), expect(&ring, None, now), "bad_signature"),
        (
            "signed garbage (html)",
            &garbage,
            Some(&garbage_sig),
            expect(&ring, None, now),
            "malformed",
        ),
        (
            "other channel's document",
            &beta_doc,
            Some(&beta_sig),
            expect(&ring, None, now),
            "wrong_channel",
        ),
        ("replayed", &doc, Some(&sig), expect(&ring, Some(8), now), "replayed"),
        ("expired", &doc, Some(&sig), expect(&ring, None, T0 + 7 * 86_400), "expired"),
        (
            "clock far behind",
            &doc,
            Some(&sig),
            expect(&ring, None, T0 - MAX_CLOCK_SKEW - 1),
            "clock_behind",
        ),
        ("clock at 1970", &doc, Some(&sig), expect(&ring, None, 0), "clock_behind"),
    ];
    for (what, d, s, e, code) in cases {
        let err = verify(d, s, &e).unwrap_err();
        assert_eq!(err.code(), code, "{what}: {err}");
        assert!(!err.to_string().is_empty());
    }
    // A tampered byte anywhere is a bad signature, never accepted.
    for i in 0..doc.len() {
        let mut d = doc.clone();
        d[i] ^= 0x20;
        assert!(verify(&d, Some(&sig), &expect(&ring, None, now)).is_err(), "byte {i}");
    }
}

/// Clock skew: a device clock up to MAX_CLOCK_SKEW behind the publisher still accepts a
/// fresh document; `expires` is exact (the publisher sets it days ahead).
#[test]
fn clock_skew_tolerance() {
    let ring = ring();
    let (doc, sig) = sample().sign(&test_key(1));
    assert!(verify(&doc, Some(&sig), &expect(&ring, None, T0 - MAX_CLOCK_SKEW)).is_ok());
    assert!(verify(&doc, Some(&sig), &expect(&ring, None, T0 + 7 * 86_400 - 1)).is_ok());
    let err = verify(&doc, Some(&sig), &expect(&ring, None, T0 + 7 * 86_400)).unwrap_err();
    assert!(matches!(err, ChannelError::Expired { .. }), "{err}");
    assert!(err.to_string().contains("2026-12-01T08:00:00Z"), "{err}");
}

#[test]
fn relative_urls_resolve_against_the_document() {
    let base = "http://127.0.0.1:8080/fleet/channels/stable.toml";
    let cases = [
        ("../bundles/a-1.0.0.mfb", "http://127.0.0.1:8080/fleet/bundles/a-1.0.0.mfb"),
        ("a.mfb", "http://127.0.0.1:8080/fleet/channels/a.mfb"),
        ("./a.mfb", "http://127.0.0.1:8080/fleet/channels/a.mfb"),
        ("/b/a.mfb", "http://127.0.0.1:8080/b/a.mfb"),
        ("../../../../x", "http://127.0.0.1:8080/x"),
        ("https://cdn.example/a.mfb", "https://cdn.example/a.mfb"),
    ];
    for (target, want) in cases {
        assert_eq!(resolve_url(base, target), want, "{target}");
    }
    assert_eq!(resolve_url("http://h:1", "x"), "http://h:1/x");
    assert_eq!(
        resolve_url("http://h/c/stable.toml?x=1", "../bundles/b.mfb"),
        "http://h/bundles/b.mfb"
    );
}

#[test]
fn names_and_paths() {
    for ok in ["stable", "beta-2", "a", "lts.2026", "x_y"] {
        assert!(is_valid_name(ok), "{ok}");
    }
    for bad in ["", "Stable", "-x", ".x", "a/b", "a b", &"x".repeat(65)] {
        assert!(!is_valid_name(bad), "{bad}");
    }
    assert_eq!(document_path("stable"), "channels/stable.toml");
    assert_eq!(signature_path("stable"), "channels/stable.toml.sig");
    assert_eq!(bundle_path("pi", &Version::new(1, 2, 3)), "bundles/pi-1.2.3.mfb");
}

#[test]
fn percent_at_follows_the_waves() {
    let mut r = Rollout { percent: 0, ..Rollout::everyone() };
    r.waves = [(0, 1), (3600, 5), (4 * 3600, 25), (24 * 3600, 100)]
        .into_iter()
        .map(|(at, percent)| Wave { at: Timestamp(T0 + at), percent })
        .collect();
    let at = |s: u64| r.percent_at(T0 + s);
    assert_eq!(r.percent_at(T0 - 1), 0);
    assert_eq!((at(0), at(3599), at(3600), at(4 * 3600 - 1), at(4 * 3600)), (1, 1, 5, 5, 25));
    assert_eq!((at(24 * 3600 - 1), at(24 * 3600), at(400 * 86_400)), (25, 100, 100));
    assert_eq!(r.next_wave(T0 - 1), Some(Timestamp(T0)));
    assert_eq!(r.next_wave(T0), Some(Timestamp(T0 + 3600)));
    assert_eq!(r.next_wave(T0 + 24 * 3600), None);
    assert_eq!(Rollout::everyone().percent_at(0), 100);
}

/// The example of docs/channels.md parses (with its elided hashes filled in).
#[test]
fn the_documented_example_parses() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/channels.md");
    let text = std::fs::read_to_string(path).unwrap();
    let start = text.find("```toml\n").unwrap() + "```toml\n".len();
    let block = &text[start..start + text[start..].find("```").unwrap()];
    let hex = format!("\"{}\"", "0".repeat(64));
    let block = block.replace("\"…64 hex…\"", &hex).replace("\"…\"", &hex);
    let ch = Channel::parse(block.as_bytes()).unwrap();
    assert_eq!((ch.name.as_str(), ch.sequence), ("stable", 42));
    assert_eq!(ch.os.rollout.waves.len(), 4);
    assert_eq!(ch.os.rollout.percent_at(T0 + 3 * 3600), 5);
    assert_eq!(ch.pin.as_ref().unwrap().version, Version::new(1, 9, 3));
    assert_eq!(ch.devices["pi-camera-042"].channel.as_deref(), Some("beta"));
    assert_eq!(ch.roles["camera-single"].rollout.percent, 100);
}

/// Parsing untrusted bytes never panics: every truncation and many random byte changes of a
/// full document give a document or an error (a fuzz-style sweep, deterministic).
#[test]
fn parsing_never_panics_on_mangled_documents() {
    let mut ch = sample();
    ch.pin = Some(Pin {
        version: Version::new(1, 0, 0),
        reason: "r".into(),
        expires: Some(Timestamp(T0 + 10)),
        compatible: ch.os.compatible.clone(),
        urls: vec!["x".into()],
        size: 1,
        sha256: "00".repeat(32),
        security_epoch: 0,
    });
    ch.os.rollout.waves = vec![Wave { at: Timestamp(T0), percent: 50 }];
    let doc = ch.to_toml().into_bytes();
    for n in 0..doc.len() {
        let _ = Channel::parse(&doc[..n]);
    }
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let alphabet = b"=[]{}\"'.,#\n 0123456789-:TZaz\xff";
    for _ in 0..5000 {
        let mut d = doc.clone();
        for _ in 0..(next() % 4 + 1) {
            let i = (next() % d.len() as u64) as usize;
            d[i] = alphabet[(next() % alphabet.len() as u64) as usize];
        }
        if let Ok(parsed) = Channel::parse(&d) {
            assert!(parsed.validate().is_ok());
        }
    }
}

/// A role target for `roles.cam`.
fn role_target() -> RoleTarget {
    RoleTarget::new(
        Version::new(2, 1, 0),
        vec!["../roles/cam/2.1.0.mfr".into()],
        4096,
        "3c".repeat(32),
        Rollout { percent: 25, ..Rollout::everyone() },
    )
}

#[test]
fn role_targets_carry_pause_pin_waves_and_per_device_overrides() {
    let mut c = sample();
    let mut r = role_target();
    r.paused = true;
    r.rollout.waves = vec![Wave { at: Timestamp(T0 + 3600), percent: 100 }];
    r.rollout.segments = [Segment::Canary].into_iter().collect();
    r.pin = Some(RolePin {
        version: Version::new(2, 0, 0),
        reason: "stream stalls".into(),
        expires: Some(Timestamp(T0 + 86_400)),
        urls: vec!["../roles/cam/2.0.0.mfr".into()],
        size: 4000,
        sha256: "4d".repeat(32),
    });
    c.roles.insert("cam".into(), r);
    let o = RoleOverride {
        version_lock: Some(Version::new(2, 0, 0)),
        auto_update: Some(false),
        reason: Some("field trial".into()),
    };
    c.devices.insert(
        "pi-9".into(),
        DeviceOverride { roles: [("cam".to_string(), o)].into(), ..Default::default() },
    );
    let text = c.to_toml();
    assert_eq!(Channel::parse(text.as_bytes()).unwrap(), c, "{text}");
    assert!(
        text.contains("[roles.cam.pin]") && text.contains("[devices.pi-9.roles.cam]"),
        "{text}"
    );
    let pin = c.roles["cam"].pin.as_ref().unwrap();
    assert!(pin.active_at(T0) && !pin.active_at(T0 + 86_400));
    // Defaults: an unpaused, unpinned role target writes neither key.
    let mut plain = sample();
    plain.roles.insert("cam".into(), role_target());
    let text = plain.to_toml();
    assert!(!text.contains("paused = false\n[roles") && !text.contains(".pin]"), "{text}");
}

#[test]
fn bad_role_targets_name_the_field() {
    type Edit = Box<dyn Fn(&mut Channel)>;
    let pin = RolePin {
        version: Version::new(1, 0, 0),
        reason: "x".into(),
        expires: None,
        urls: vec!["u".into()],
        size: 1,
        sha256: "00".repeat(32),
    };
    let with_pin = move |edit: fn(&mut RolePin)| -> Edit {
        let mut p = pin.clone();
        edit(&mut p);
        Box::new(move |c: &mut Channel| {
            let mut r = role_target();
            r.pin = Some(p.clone());
            c.roles.insert("cam".into(), r);
        })
    };
    let cases: Vec<(Edit, &str)> = vec![
        (with_pin(|p| p.reason = "  ".into()), "roles.cam.pin.reason"),
        (with_pin(|p| p.urls.clear()), "roles.cam.pin.urls"),
        (with_pin(|p| p.sha256 = "zz".into()), "roles.cam.pin.sha256"),
        (
            Box::new(|c| {
                let mut r = role_target();
                r.rollout.waves = vec![Wave { at: Timestamp(T0), percent: 5 }];
                c.roles.insert("cam".into(), r);
            }),
            "roles.cam.rollout.waves[0].percent",
        ),
        (
            Box::new(|c| {
                let roles = [("Bad Name".to_string(), RoleOverride::default())].into();
                c.devices.insert("pi-1".into(), DeviceOverride { roles, ..Default::default() });
            }),
            "devices.pi-1.roles.\"Bad Name\"",
        ),
    ];
    for (edit, want) in cases {
        let mut c = sample();
        edit(&mut c);
        let err = Channel::parse(c.to_toml().as_bytes()).unwrap_err();
        assert!(err.to_string().contains(want), "{want}: {err}");
    }
    // Unknown keys in a role target, its pin or a device's role override are errors.
    let mut c = sample();
    c.roles.insert("cam".into(), role_target());
    let text = c.to_toml();
    for (anchor, bad) in [
        ("[roles.cam]\n", "[roles.cam]\npuased = true\n"),
        ("[roles.cam]\n", "[devices.d.roles.cam]\nversion_lok = \"1.0.0\"\n\n[roles.cam]\n"),
    ] {
        let doc = text.replace(anchor, bad);
        assert!(doc != text);
        let err = Channel::parse(doc.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{bad}: {err}");
    }
}
