use super::*;
use crate::channel::tests::{sample, T0};
use crate::channel::{DeviceOverride, Pin, Rollout, Wave};

fn v(s: &str) -> Version {
    Version::parse(s).unwrap()
}

/// A device on 1.0.0, general segment, epoch 1, compatible with `sample()`.
fn device(id: &str) -> Device {
    Device {
        device_id: id.into(),
        segment: Segment::General,
        facts: DeviceFacts {
            compatible: "metrica-rpi4-arm64".into(),
            committed_version: Some(v("1.0.0")),
            security_epoch: 1,
            pinned_version: None,
        },
    }
}

/// `d` with some of its facts changed.
fn with(mut d: Device, change: impl FnOnce(&mut DeviceFacts)) -> Device {
    change(&mut d.facts);
    d
}

/// `sample()` offering 2.0.0 to everyone.
fn everyone() -> Channel {
    let mut c = sample();
    c.os.rollout = Rollout::everyone();
    c
}

fn pin(version: &str, epoch: u64, expires: Option<u64>) -> Pin {
    Pin {
        version: v(version),
        reason: "rollback: camera regression".into(),
        expires: expires.map(Timestamp),
        compatible: "metrica-rpi4-arm64".into(),
        urls: vec![format!("../bundles/pi-{version}.mfb")],
        size: 77,
        sha256: "cd".repeat(32),
        security_epoch: epoch,
    }
}

fn run(c: &Channel, d: &Device, o: &Overrides, h: &AttemptHistory, now: u64) -> Decision {
    decide(c, d, o, h, now)
}

fn code(c: &Channel, d: &Device, o: &Overrides, h: &AttemptHistory, now: u64) -> &'static str {
    run(c, d, o, h, now).code()
}

const NOW: u64 = T0 + 3600;

#[test]
fn bucket_is_sha256_of_id_at_version_mod_100() {
    // Values from Python's hashlib: int.from_bytes(sha256(f"{id}@{v}")[:8], "big") % 100.
    assert_eq!(bucket("pi-camera-042", &v("2.3.4")), 86);
    assert_eq!(bucket("device-0", &v("1.0.0")), 78);
    assert_eq!(bucket("a", &v("0.1.0-rc.1")), 55);
    assert!(selected("device-0", &v("1.0.0"), 79));
    assert!(!selected("device-0", &v("1.0.0"), 78));
}

/// Percent P selects about P% of 10,000 device ids (within 4 standard deviations of the
/// binomial), every selection at P is kept at a higher P, and different versions pick
/// different devices.
#[test]
fn percent_selects_about_that_share_of_10000_devices() {
    let ids: Vec<String> = (0..10_000).map(|i| format!("pi-{i:05}")).collect();
    let ver = v("2.0.0");
    let buckets: Vec<u8> = ids.iter().map(|id| bucket(id, &ver)).collect();
    for p in [0u8, 1, 5, 10, 25, 50, 75, 90, 99, 100] {
        let n = buckets.iter().filter(|b| **b < p).count() as f64;
        let expected = 10_000.0 * f64::from(p) / 100.0;
        let sd = (10_000.0 * f64::from(p) / 100.0 * (1.0 - f64::from(p) / 100.0)).sqrt();
        assert!((n - expected).abs() <= 4.0 * sd + 0.5, "{p}%: {n} selected, expected {expected}");
    }
    for p in 0..100u8 {
        for (id, b) in ids.iter().zip(&buckets).take(500) {
            if selected(id, &ver, p) {
                assert!(selected(id, &ver, p + 1) && *b < p);
            }
        }
    }
    let other: Vec<u8> = ids.iter().map(|id| bucket(id, &v("2.0.1"))).collect();
    let same_first = buckets.iter().zip(&other).filter(|(a, b)| **a < 10 && **b < 10).count();
    assert!(same_first < 300, "{same_first} of ~1000 first devices are first again");
    // Each bucket holds about 100 devices.
    let mut counts = [0u32; 100];
    for b in &buckets {
        counts[*b as usize] += 1;
    }
    assert!(counts.iter().all(|c| (50..=150).contains(c)), "{counts:?}");
}

#[test]
fn poll_delay_is_interval_plus_or_minus_20_percent_and_deterministic() {
    let i = Duration::from_secs(300);
    assert_eq!(poll_delay(i, 0), Duration::from_secs(240));
    assert_eq!(poll_delay(i, u64::MAX), Duration::from_secs(360));
    assert_eq!(poll_delay(i, 1 << 63), Duration::from_secs(300));
    assert_eq!(poll_delay(i, 12345), poll_delay(i, 12345));
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut sum = 0u128;
    for _ in 0..10_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let d = poll_delay(i, x);
        assert!(d >= Duration::from_secs(240) && d <= Duration::from_secs(360), "{d:?}");
        sum += d.as_millis();
    }
    let mean = sum as f64 / 10_000.0 / 1000.0;
    assert!((mean - 300.0).abs() < 3.0, "mean {mean}");
    assert_eq!(poll_delay(Duration::ZERO, 99), Duration::ZERO);
}

#[test]
fn rollout_selects_by_segment_percent_and_not_before() {
    let (o, h) = (Overrides::default(), AttemptHistory::default());
    let d = device("pi-camera-042"); // bucket 86 for 2.3.4; find its bucket for 2.0.0
    let b = bucket(&d.device_id, &v("2.0.0"));
    let mut c = everyone();
    c.os.rollout.percent = b;
    let got = run(&c, &d, &o, &h, NOW);
    assert_eq!(
        got,
        Decision::Stay {
            reason: StayReason::NotSelected { bucket: b, percent: b, next_wave: None }
        }
    );
    c.os.rollout.percent = b + 1;
    assert_eq!(
        run(&c, &d, &o, &h, NOW),
        Decision::Install {
            version: v("2.0.0"),
            urls: vec!["../bundles/pi-2.0.0.mfb".into()],
            size: 1234,
            sha256: "ab".repeat(32),
            security_epoch: 1,
            reason: InstallReason::Rollout { bucket: b, percent: b + 1 },
        }
    );
    c.os.rollout.segments = [Segment::Canary, Segment::Early].into_iter().collect();
    assert_eq!(code(&c, &d, &o, &h, NOW), "segment_not_allowed");
    let canary = Device { segment: Segment::Canary, ..d };
    assert_eq!(code(&c, &canary, &o, &h, NOW), "rollout");
    c.os.rollout.not_before = Some(Timestamp(NOW + 1));
    assert_eq!(
        run(&c, &canary, &o, &h, NOW),
        Decision::Stay { reason: StayReason::NotBefore { at: Timestamp(NOW + 1) } }
    );
    assert_eq!(code(&c, &canary, &o, &h, NOW + 1), "rollout");
}

/// Waves advance with no operator: 1% from T, 5% from T+1h, 25% from T+4h, 100% from T+24h,
/// measured over 10,000 devices.
#[test]
fn waves_open_over_time() {
    let mut c = everyone();
    c.os.rollout.percent = 0;
    c.os.rollout.waves = [(0, 1), (3600, 5), (4 * 3600, 25), (24 * 3600, 100)]
        .into_iter()
        .map(|(at, percent)| Wave { at: Timestamp(T0 + at), percent })
        .collect();
    let (o, h) = (Overrides::default(), AttemptHistory::default());
    let devices: Vec<Device> = (0..10_000).map(|i| device(&format!("dev-{i}"))).collect();
    let installing = |c: &Channel, now: u64| {
        devices.iter().filter(|d| run(c, d, &o, &h, now).is_install()).count()
    };
    assert_eq!(installing(&c, T0 - 1), 0);
    for (at, p) in [(0, 1), (3600, 5), (4 * 3600, 25), (24 * 3600, 100), (90 * 86_400, 100)] {
        let n = installing(&c, T0 + at) as f64;
        let want = 100.0 * f64::from(p);
        let sd = (want * (1.0 - f64::from(p) / 100.0)).sqrt();
        assert!((n - want).abs() <= 4.0 * sd + 0.5, "T+{at}s: {n}, expected {want}");
    }
    let waiting =
        devices.iter().map(|d| run(&c, d, &o, &h, T0 + 60)).find(|d| !d.is_install()).unwrap();
    assert!(
        matches!(
            waiting,
            Decision::Stay { reason: StayReason::NotSelected { percent: 1, next_wave: Some(t), .. } }
                if t == Timestamp(T0 + 3600)
        ),
        "{waiting:?}"
    );
    // Paused stops the schedule at any wave.
    c.paused = true;
    assert_eq!(installing(&c, T0 + 30 * 86_400), 0);
}

#[test]
fn paused_is_an_emergency_stop_but_a_pin_still_applies() {
    let (o, h) = (Overrides::default(), AttemptHistory::default());
    let d = device("pi-1");
    let mut c = everyone();
    c.paused = true;
    assert_eq!(run(&c, &d, &o, &h, NOW), Decision::Stay { reason: StayReason::Paused });
    c.pin = Some(pin("1.5.0", 1, None));
    let got = run(&c, &d, &o, &h, NOW);
    assert!(
        matches!(&got, Decision::Install { version, reason: InstallReason::Pinned { .. }, sha256, .. }
            if *version == v("1.5.0") && *sha256 == "cd".repeat(32)),
        "{got:?}"
    );
}

#[test]
fn pin_forces_a_version_down_within_the_epoch_and_expires() {
    let (o, h) = (Overrides::default(), AttemptHistory::default());
    let on_2 = with(device("pi-1"), |f| f.committed_version = Some(v("2.0.0")));
    let mut c = everyone();
    assert_eq!(code(&c, &on_2, &o, &h, NOW), "up_to_date");
    // Downgrade to 1.5.0, epoch 1 (= device's): allowed, whatever the rollout says.
    c.os.rollout.percent = 0;
    c.pin = Some(pin("1.5.0", 1, Some(NOW + 10)));
    assert_eq!(code(&c, &on_2, &o, &h, NOW), "pinned");
    assert!(run(&c, &on_2, &o, &h, NOW).is_install());
    // Once there, it stays, reported as pinned.
    let on_15 = with(on_2.clone(), |f| f.committed_version = Some(v("1.5.0")));
    assert_eq!(
        run(&c, &on_15, &o, &h, NOW),
        Decision::Stay { reason: StayReason::Pinned { version: v("1.5.0") } }
    );
    // Expired pin: the rollout applies again (percent 0 here).
    assert_eq!(code(&c, &on_2, &o, &h, NOW + 10), "up_to_date");
    assert_eq!(code(&c, &device("pi-1"), &o, &h, NOW + 10), "not_selected");
    assert_eq!(code(&c, &device("pi-1"), &o, &h, NOW + 9), "pinned");
    // A pin below the device's epoch is refused.
    c.pin = Some(pin("1.5.0", 0, None));
    assert_eq!(
        run(&c, &on_2, &o, &h, NOW),
        Decision::Stay { reason: StayReason::EpochTooLow { offered: 0, device: 1 } }
    );
    // Without a pin a rollout never goes down.
    let mut old = everyone();
    old.os.version = v("1.5.0");
    assert_eq!(
        run(&old, &on_2, &o, &h, NOW),
        Decision::Stay {
            reason: StayReason::NotNewer { offered: v("1.5.0"), committed: v("2.0.0") }
        }
    );
    // Build metadata does not make a version different.
    let on_2b = with(on_2, |f| f.committed_version = Some(v("2.0.0+build.7")));
    assert_eq!(code(&everyone(), &on_2b, &o, &h, NOW), "up_to_date");
}

#[test]
fn overrides_from_the_channel_win_over_the_provisioning() {
    let h = AttemptHistory::default();
    let d = device("pi-7");
    let mut c = everyone();
    let prov_off = Overrides { auto_update: Some(false), ..Default::default() };
    assert_eq!(
        run(&c, &d, &prov_off, &h, NOW),
        Decision::Stay {
            reason: StayReason::AutoUpdateOff { source: OverrideSource::Provisioning }
        }
    );
    // The operator turns it back on from the channel.
    c.devices
        .insert("pi-7".into(), DeviceOverride { auto_update: Some(true), ..Default::default() });
    assert_eq!(code(&c, &d, &prov_off, &h, NOW), "rollout");
    c.devices
        .insert("pi-7".into(), DeviceOverride { auto_update: Some(false), ..Default::default() });
    assert_eq!(
        run(&c, &d, &Overrides::default(), &h, NOW),
        Decision::Stay { reason: StayReason::AutoUpdateOff { source: OverrideSource::Channel } }
    );
    // Other devices are not affected by pi-7's entry.
    assert_eq!(code(&c, &device("pi-8"), &Overrides::default(), &h, NOW), "rollout");

    // Another channel.
    let mut c = everyone();
    let prov_beta = Overrides { channel: Some("beta".into()), ..Default::default() };
    assert_eq!(
        run(&c, &d, &prov_beta, &h, NOW),
        Decision::Stay {
            reason: StayReason::OtherChannel {
                channel: "beta".into(),
                source: OverrideSource::Provisioning
            }
        }
    );
    let prov_stable = Overrides { channel: Some("stable".into()), ..Default::default() };
    assert_eq!(code(&c, &d, &prov_stable, &h, NOW), "rollout");
    c.devices.insert(
        "pi-7".into(),
        DeviceOverride { channel: Some("lts".into()), ..Default::default() },
    );
    assert_eq!(
        run(&c, &d, &prov_stable, &h, NOW),
        Decision::Stay {
            reason: StayReason::OtherChannel {
                channel: "lts".into(),
                source: OverrideSource::Channel
            }
        }
    );
}

#[test]
fn version_lock_holds_a_device_or_brings_it_to_the_locked_version() {
    let h = AttemptHistory::default();
    let d = device("pi-9"); // on 1.0.0
    let c = everyone(); // offers 2.0.0
    let lock_1 = Overrides { version_lock: Some(v("1.0.0")), ..Default::default() };
    assert_eq!(
        run(&c, &d, &lock_1, &h, NOW),
        Decision::Stay {
            reason: StayReason::VersionLocked {
                version: v("1.0.0"),
                source: OverrideSource::Provisioning
            }
        }
    );
    // Locked to the offered version while on another one: install it, rollout ignored.
    let mut c0 = everyone();
    c0.os.rollout.percent = 0;
    let lock_2 = Overrides { version_lock: Some(v("2.0.0")), ..Default::default() };
    assert_eq!(code(&c0, &d, &lock_2, &h, NOW), "version_lock");
    // Locked to a version the channel does not offer: stay.
    let lock_3 = Overrides { version_lock: Some(v("3.0.0")), ..Default::default() };
    assert_eq!(code(&c, &d, &lock_3, &h, NOW), "version_locked");
    // The channel's lock wins over the provisioning's and over a pin.
    let mut cp = everyone();
    cp.pin = Some(pin("1.5.0", 1, None));
    cp.devices.insert(
        "pi-9".into(),
        DeviceOverride { version_lock: Some(v("1.0.0")), ..Default::default() },
    );
    assert_eq!(
        run(&cp, &d, &lock_2, &h, NOW),
        Decision::Stay {
            reason: StayReason::VersionLocked {
                version: v("1.0.0"),
                source: OverrideSource::Channel
            }
        }
    );
}

#[test]
fn failed_versions_are_never_retried_and_newer_ones_are() {
    let o = Overrides::default();
    let d = device("pi-3");
    let h = AttemptHistory { failed_versions: [v("2.0.0")].into(), ..Default::default() };
    assert_eq!(
        run(&everyone(), &d, &o, &h, NOW + 86_400 * 30),
        Decision::Stay { reason: StayReason::VersionFailed { version: v("2.0.0") } }
    );
    let h_build = AttemptHistory { failed_versions: [v("2.0.0+b1")].into(), ..Default::default() };
    assert_eq!(code(&everyone(), &d, &o, &h_build, NOW), "version_failed");
    let mut fixed = everyone();
    fixed.os.version = v("2.0.1");
    assert_eq!(code(&fixed, &d, &o, &h, NOW), "rollout");
}

#[test]
fn throttle_5_minutes_between_attempts_15_after_a_failure() {
    let (o, c, d) = (Overrides::default(), everyone(), device("pi-4"));
    let attempt = AttemptHistory { last_attempt: Some(NOW), ..Default::default() };
    assert_eq!(
        run(&c, &d, &o, &attempt, NOW + 299),
        Decision::Stay {
            reason: StayReason::Throttled { until: Timestamp(NOW + 300), after_failure: false }
        }
    );
    assert_eq!(code(&c, &d, &o, &attempt, NOW + 300), "rollout");
    let failure = AttemptHistory {
        last_attempt: Some(NOW),
        last_failure: Some(NOW + 10),
        ..Default::default()
    };
    assert_eq!(
        run(&c, &d, &o, &failure, NOW + 899),
        Decision::Stay {
            reason: StayReason::Throttled { until: Timestamp(NOW + 910), after_failure: true }
        }
    );
    assert_eq!(code(&c, &d, &o, &failure, NOW + 910), "rollout");
    let failure_only = AttemptHistory { last_failure: Some(NOW), ..Default::default() };
    assert_eq!(code(&c, &d, &o, &failure_only, NOW + 899), "throttled");
    assert_eq!(code(&c, &d, &o, &failure_only, NOW + 900), "rollout");
    // A clock that went backwards keeps the throttle (never negative time).
    assert_eq!(code(&c, &d, &o, &attempt, NOW - 1000), "throttled");
}

#[test]
fn maintenance_windows() {
    let w = |days: &[Weekday], start: &str, end: &str, off: i32| MaintenanceWindow {
        days: days.iter().copied().collect(),
        start: start.parse().unwrap(),
        end: end.parse().unwrap(),
        utc_offset_minutes: off,
    };
    // T0 is Tuesday 2026-11-24 08:00 UTC.
    assert_eq!(Weekday::of_day((T0 / 86_400) as i64), Weekday::Tue);
    assert_eq!(Weekday::of_day(0), Weekday::Thu);
    assert_eq!(Weekday::of_day(-1), Weekday::Wed);
    let day = T0 - 8 * 3600; // Tuesday 00:00 UTC
    let h = |x: u64| day + x * 3600;
    let nightly = w(&[], "02:00", "06:00", 0);
    assert!(!nightly.contains(h(1)) && nightly.contains(h(2)) && nightly.contains(h(6) - 1));
    assert!(!nightly.contains(h(6)));
    assert_eq!(nightly.next_open(h(8)), Some(h(26)));
    assert_eq!(nightly.next_open(h(3)), Some(h(3)));
    // Crossing midnight belongs to the start day: Monday 22:00 to Tuesday 04:00.
    let mon_night = w(&[Weekday::Mon], "22:00", "04:00", 0);
    assert!(mon_night.contains(h(3)), "Tuesday 03:00 is in Monday's window");
    assert!(!mon_night.contains(h(23)), "Tuesday 23:00 is not");
    assert!(mon_night.contains(day - 3600), "Monday 23:00");
    assert_eq!(mon_night.next_open(h(5)), Some(day + 6 * 86_400 + 22 * 3600));
    // Local time: 02:00-06:00 at UTC+2 is 00:00-04:00 UTC.
    let cest = w(&[Weekday::Tue], "02:00", "06:00", 120);
    assert!(cest.contains(h(0)) && cest.contains(h(3)) && !cest.contains(h(4)));
    let all_sunday = w(&[Weekday::Sun], "00:00", "24:00", 0);
    assert!(all_sunday.validate().is_ok());
    assert!(all_sunday.contains(day - 2 * 86_400 + 1) && !all_sunday.contains(day));
    for bad in
        [w(&[], "02:00", "02:00", 0), w(&[], "03:00", "00:00", 0), w(&[], "01:00", "02:00", 1440)]
    {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
    for bad in ["24:01", "2:00", "02:60", "ab:cd", "0200", ""] {
        assert!(bad.parse::<TimeOfDay>().is_err(), "{bad}");
    }
    // In decide: outside the window stays, naming when it opens; inside installs.
    let (c, d, hist) = (everyone(), device("pi-5"), AttemptHistory::default());
    let o = Overrides { maintenance_window: Some(nightly), ..Default::default() };
    assert_eq!(
        run(&c, &d, &o, &hist, h(8)),
        Decision::Stay { reason: StayReason::MaintenanceWindow { opens: Some(Timestamp(h(26))) } }
    );
    assert_eq!(code(&c, &d, &o, &hist, h(26)), "rollout");
    // Serde form.
    let text = "days = [\"sun\", \"sat\"]\nstart = \"22:30\"\nend = \"04:00\"\n";
    let parsed: MaintenanceWindow = toml::from_str(text).unwrap();
    assert_eq!(parsed.start, TimeOfDay(22 * 60 + 30));
    assert!(toml::from_str::<MaintenanceWindow>("start = \"25:00\"\nend = \"01:00\"").is_err());
}

/// Update bomb: versions 1.1 to 1.5 published while a device was away; it sees only the
/// newest document and goes straight to 1.5, once, then stays.
#[test]
fn update_bomb_goes_straight_to_the_newest() {
    let o = Overrides::default();
    let docs: Vec<Channel> = (1..=5)
        .map(|minor| {
            let mut c = everyone();
            c.sequence = 10 + minor;
            c.os.version = Version::new(1, minor, 0);
            c
        })
        .collect();
    let newest = docs.iter().max_by_key(|c| c.sequence).unwrap();
    let mut d = device("pi-away");
    let mut h = AttemptHistory::default();
    let mut installed = Vec::new();
    for step in 0..10u64 {
        let now = NOW + step * 60;
        if let Decision::Install { version, .. } = run(newest, &d, &o, &h, now) {
            installed.push(version.clone());
            h.last_attempt = Some(now);
            d.facts.committed_version = Some(version);
        }
    }
    assert_eq!(installed, vec![v("1.5.0")]);
    // Rapid publishing while the device is mid-update: it is throttled, then takes the newest.
    let mut h = AttemptHistory { last_attempt: Some(NOW), ..Default::default() };
    let d = device("pi-busy");
    for c in &docs {
        assert_eq!(code(c, &d, &o, &h, NOW + 60), "throttled");
    }
    h.last_attempt = Some(NOW);
    assert!(matches!(run(&docs[4], &d, &o, &h, NOW + 300),
        Decision::Install { version, .. } if version == v("1.5.0")));
}

#[test]
fn incompatible_offer_and_unknown_committed_version() {
    let (o, h) = (Overrides::default(), AttemptHistory::default());
    let other_hw = with(device("q"), |f| f.compatible = "metrica-qemu-arm64".into());
    assert_eq!(code(&everyone(), &other_hw, &o, &h, NOW), "incompatible");
    let fresh = with(device("q"), |f| f.committed_version = None);
    assert_eq!(code(&everyone(), &fresh, &o, &h, NOW), "rollout");
    let high_epoch = with(device("q"), |f| f.security_epoch = 2);
    assert_eq!(code(&everyone(), &high_epoch, &o, &h, NOW), "epoch_too_low");
}

#[test]
fn decisions_serialize_for_logs_with_their_code() {
    let d = Decision::Stay {
        reason: StayReason::NotSelected { bucket: 40, percent: 5, next_wave: Some(Timestamp(T0)) },
    };
    let json = serde_json::to_value(&d).unwrap();
    assert_eq!(json["decision"], "stay");
    assert_eq!(json["reason"]["code"], "not_selected");
    assert_eq!(json["reason"]["next_wave"], "2026-11-24T08:00:00Z");
    assert_eq!(
        d.to_string(),
        "stay: not selected (bucket 40 >= 5%); next wave at 2026-11-24T08:00:00Z"
    );
    let i = run(&everyone(), &device("x"), &Overrides::default(), &AttemptHistory::default(), NOW);
    let json = serde_json::to_value(&i).unwrap();
    assert_eq!(json["decision"], "install");
    assert_eq!(json["reason"]["code"], "rollout");
    assert_eq!(json["version"], "2.0.0");
}

/// The matrix: every combination of channel state, device state, overrides, history and
/// time, checked against the rules as independent properties (what must hold for any
/// Install, and which reason must win when a rule applies), and every reason code reached.
#[test]
fn decision_matrix_holds_the_rules() {
    let committed = [None, Some(v("1.0.0")), Some(v("1.5.0")), Some(v("2.0.0")), Some(v("3.0.0"))];
    let pins = [
        None,
        Some(pin("1.5.0", 1, None)),
        Some(pin("1.5.0", 1, Some(NOW))),
        Some(pin("1.5.0", 0, None)),
    ];
    let locks: [(Option<Version>, Option<Version>); 4] = [
        (None, None),
        (Some(v("1.5.0")), None),
        (None, Some(v("2.0.0"))),
        (Some(v("2.0.0")), Some(v("1.0.0"))),
    ];
    let autos: [(Option<bool>, Option<bool>); 4] =
        [(None, None), (Some(false), None), (None, Some(false)), (Some(false), Some(true))];
    let windows = [
        None,
        Some(MaintenanceWindow {
            days: BTreeSet::new(),
            start: TimeOfDay(0),
            end: TimeOfDay(1440),
            utc_offset_minutes: 0,
        }),
        Some(MaintenanceWindow {
            days: [Weekday::Sun].into(),
            start: TimeOfDay(60),
            end: TimeOfDay(120),
            utc_offset_minutes: 0,
        }),
    ];
    let histories = [
        AttemptHistory::default(),
        AttemptHistory { last_attempt: Some(NOW - 60), ..Default::default() },
        AttemptHistory { last_failure: Some(NOW - 600), ..Default::default() },
        AttemptHistory { failed_versions: [v("2.0.0")].into(), ..Default::default() },
        AttemptHistory {
            failed_versions: [v("1.5.0")].into(),
            last_attempt: Some(NOW - 3600),
            last_failure: Some(NOW - 3600),
        },
    ];
    let mut seen = BTreeSet::new();
    let mut total = 0u32;
    for id in ["dev-a", "dev-b"] {
        for c_ver in &committed {
            for epoch in [0u64, 1, 2] {
                for segment in Segment::ALL {
                    let dev = with(Device { segment, ..device(id) }, |f| {
                        f.committed_version = c_ver.clone();
                        f.security_epoch = epoch;
                    });
                    for paused in [false, true] {
                        for p in &pins {
                            for percent in [0u8, 50, 100] {
                                for segs in [Segment::ALL.to_vec(), vec![Segment::Canary]] {
                                    for not_before in [None, Some(NOW + 1)] {
                                        for (prov_lock, chan_lock) in &locks {
                                            for (prov_auto, chan_auto) in &autos {
                                                let mut ch = sample();
                                                ch.paused = paused;
                                                ch.pin = p.clone();
                                                ch.os.rollout.percent = percent;
                                                ch.os.rollout.segments =
                                                    segs.iter().copied().collect();
                                                ch.os.rollout.not_before =
                                                    not_before.map(Timestamp);
                                                if chan_lock.is_some() || chan_auto.is_some() {
                                                    ch.devices.insert(
                                                        id.into(),
                                                        DeviceOverride {
                                                            version_lock: chan_lock.clone(),
                                                            auto_update: *chan_auto,
                                                            ..Default::default()
                                                        },
                                                    );
                                                }
                                                for w in &windows {
                                                    for h in &histories {
                                                        let o = Overrides {
                                                            version_lock: prov_lock.clone(),
                                                            auto_update: *prov_auto,
                                                            channel: None,
                                                            maintenance_window: w.clone(),
                                                        };
                                                        let got = decide(&ch, &dev, &o, h, NOW);
                                                        check_rules(&ch, &dev, &o, h, &got);
                                                        seen.insert(got.code());
                                                        total += 1;
                                                    }
                                                }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(total > 100_000, "{total}");
    for want in [
        "auto_update_off",
        "paused",
        "version_locked",
        "up_to_date",
        "pinned",
        "not_newer",
        "epoch_too_low",
        "version_failed",
        "not_before",
        "segment_not_allowed",
        "not_selected",
        "maintenance_window",
        "throttled",
        "rollout",
        "pinned",
        "version_lock",
    ] {
        assert!(seen.contains(want), "{want} never decided; seen {seen:?}");
    }
}

/// The rules as properties, written from the module documentation independently of the
/// order of the code.
fn check_rules(ch: &Channel, d: &Device, o: &Overrides, h: &AttemptHistory, got: &Decision) {
    let entry = ch.devices.get(&d.device_id);
    let auto = entry.and_then(|e| e.auto_update).or(o.auto_update).unwrap_or(true);
    let lock = entry.and_then(|e| e.version_lock.clone()).or(o.version_lock.clone());
    let pin = ch.pin.as_ref().filter(|p| p.expires.is_none_or(|e| NOW < e.0));
    let ctx = || {
        format!("{got:?}\nchannel paused={} pin={:?} rollout={:?} devices={:?}\ndevice {d:?}\noverrides {o:?}\nhistory {h:?}", ch.paused, ch.pin, ch.os.rollout, ch.devices)
    };
    if !auto {
        assert_eq!(got.code(), "auto_update_off", "{}", ctx());
        return;
    }
    if ch.paused && pin.is_none() {
        assert_eq!(got.code(), "paused", "{}", ctx());
        return;
    }
    let offered = pin.map_or(&ch.os.version, |p| &p.version);
    if let Some(l) = &lock {
        if offered != l || d.facts.committed_version.as_ref() == Some(l) {
            assert_eq!(got.code(), "version_locked", "{}", ctx());
            return;
        }
    }
    if let Decision::Install { version, security_epoch, reason, .. } = got {
        assert_eq!(version, offered, "{}", ctx());
        assert!(*security_epoch >= d.facts.security_epoch, "{}", ctx());
        assert!(!h.failed_versions.contains(version), "{}", ctx());
        assert_ne!(d.facts.committed_version.as_ref(), Some(version), "{}", ctx());
        if let Some(w) = &o.maintenance_window {
            assert!(w.contains(NOW), "{}", ctx());
        }
        assert!(h.last_attempt.is_none_or(|t| NOW >= t + MIN_ATTEMPT_INTERVAL), "{}", ctx());
        assert!(h.last_failure.is_none_or(|t| NOW >= t + FAILURE_BACKOFF), "{}", ctx());
        match reason {
            InstallReason::Pinned { .. } => assert!(pin.is_some(), "{}", ctx()),
            InstallReason::VersionLock { .. } => {
                assert_eq!(lock.as_ref(), Some(version), "{}", ctx());
            }
            InstallReason::Rollout { bucket: b, percent } => {
                assert!(pin.is_none() && lock.is_none() && !ch.paused, "{}", ctx());
                assert!(
                    d.facts.committed_version.as_ref().is_none_or(|c| version > c),
                    "{}",
                    ctx()
                );
                assert!(ch.os.rollout.segments.contains(&d.segment), "{}", ctx());
                assert!(ch.os.rollout.not_before.is_none_or(|t| NOW >= t.0), "{}", ctx());
                assert_eq!(*b, bucket(&d.device_id, version), "{}", ctx());
                assert!(b < percent && *percent == ch.os.rollout.percent_at(NOW), "{}", ctx());
            }
        }
    } else {
        // A stay must have a reason that really holds.
        let Decision::Stay { reason } = got else { unreachable!() };
        let holds = match reason {
            StayReason::UpToDate { version } | StayReason::Pinned { version } => {
                d.facts.committed_version.as_ref() == Some(version)
            }
            StayReason::NotNewer { offered: off, committed } => off < committed && pin.is_none(),
            StayReason::EpochTooLow { offered: e, device } => e < device,
            StayReason::VersionFailed { version } => h.failed_versions.contains(version),
            StayReason::NotBefore { at } => NOW < at.0,
            StayReason::SegmentNotAllowed { segment } => !ch.os.rollout.segments.contains(segment),
            StayReason::NotSelected { bucket: b, percent, .. } => b >= percent,
            StayReason::MaintenanceWindow { .. } => {
                o.maintenance_window.as_ref().is_some_and(|w| !w.contains(NOW))
            }
            StayReason::Throttled { until, .. } => NOW < until.0,
            other => panic!("unexpected {other:?}\n{}", ctx()),
        };
        assert!(holds, "{}", ctx());
    }
}

#[test]
fn every_stay_code_is_listed() {
    let reasons = [
        StayReason::OtherChannel { channel: "x".into(), source: OverrideSource::Channel },
        StayReason::AutoUpdateOff { source: OverrideSource::Channel },
        StayReason::Paused,
        StayReason::Incompatible { offered: "a".into(), device: "b".into() },
        StayReason::VersionLocked { version: v("1.0.0"), source: OverrideSource::Channel },
        StayReason::UpToDate { version: v("1.0.0") },
        StayReason::Pinned { version: v("1.0.0") },
        StayReason::NotNewer { offered: v("1.0.0"), committed: v("2.0.0") },
        StayReason::EpochTooLow { offered: 0, device: 1 },
        StayReason::VersionFailed { version: v("1.0.0") },
        StayReason::NotBefore { at: Timestamp(0) },
        StayReason::SegmentNotAllowed { segment: Segment::Early },
        StayReason::NotSelected { bucket: 1, percent: 0, next_wave: None },
        StayReason::MaintenanceWindow { opens: None },
        StayReason::Throttled { until: Timestamp(0), after_failure: true },
        StayReason::NoTarget { role: "cam".into() },
    ];
    let codes: Vec<&str> = reasons.iter().map(StayReason::code).collect();
    assert_eq!(codes, StayReason::CODES);
    for r in &reasons {
        let json = serde_json::to_value(r).unwrap();
        assert_eq!(json["code"], r.code());
        assert!(!r.to_string().is_empty());
    }
}

/// Roles: `[roles.NAME]` decided by the same rules as the OS.
mod roles {
    use super::*;
    use crate::channel::RoleTarget;

    const ROLE: &str = "camera-single";

    fn target(version: &str, rollout: Rollout) -> RoleTarget {
        RoleTarget {
            version: v(version),
            urls: vec![format!("../roles/{ROLE}-{version}.mfr")],
            size: 1234,
            sha256: "ef".repeat(32),
            rollout,
            paused: false,
            pin: None,
        }
    }

    fn channel_with(t: RoleTarget) -> Channel {
        let mut c = everyone();
        c.roles.insert(ROLE.into(), t);
        c
    }

    /// A device whose role runs `current` (the OS facts are not the role's).
    fn role_device(id: &str, current: Option<&str>) -> Device {
        with(device(id), |f| f.committed_version = current.map(v))
    }

    fn decide_r(c: &Channel, d: &Device, o: &Overrides, h: &AttemptHistory) -> Decision {
        decide_role(c, ROLE, d, o, h, NOW)
    }

    #[test]
    fn a_role_target_is_installed_from_nothing_or_upwards() {
        let c = channel_with(target("3.1.0", Rollout::everyone()));
        let none = AttemptHistory::default();
        for current in [None, Some("3.0.0")] {
            let d = decide_r(&c, &role_device("pi-1", current), &Overrides::default(), &none);
            let Decision::Install { version, urls, size, sha256, security_epoch, reason } = d
            else {
                panic!("{current:?}: {d}")
            };
            assert_eq!((version, size, security_epoch), (v("3.1.0"), 1234, 0));
            assert_eq!(
                (urls[0].as_str(), sha256),
                ("../roles/camera-single-3.1.0.mfr", "ef".repeat(32))
            );
            assert_eq!(reason.code(), "rollout");
        }
        let o = Overrides::default();
        let code_of = |cur: &str| decide_r(&c, &role_device("pi-1", Some(cur)), &o, &none).code();
        assert_eq!(code_of("3.1.0"), "up_to_date");
        assert_eq!(code_of("4.0.0"), "not_newer");
    }

    #[test]
    fn no_target_paused_and_device_gates() {
        let none = AttemptHistory::default();
        let d = role_device("pi-1", Some("3.0.0"));
        let o = Overrides::default();
        let bare = everyone();
        let stay = decide_r(&bare, &d, &o, &none);
        assert_eq!(stay.code(), "no_target");
        assert_eq!(stay.to_string(), "stay: the channel has no [roles.camera-single] target");
        let mut c = channel_with(target("3.1.0", Rollout::everyone()));
        c.paused = true;
        assert_eq!(decide_r(&c, &d, &o, &none).code(), "paused");
        c.paused = false;
        let off = Overrides { auto_update: Some(false), ..Overrides::default() };
        assert_eq!(decide_r(&c, &d, &off, &none).code(), "auto_update_off");
        let mut redirected = c.clone();
        let e = DeviceOverride { channel: Some("beta".into()), ..DeviceOverride::default() };
        redirected.devices.insert("pi-1".into(), e);
        assert_eq!(decide_r(&redirected, &d, &o, &none).code(), "other_channel");
        // The OS version lock is the OS's: it does not hold the role.
        let lock = Overrides { version_lock: Some(v("1.0.0")), ..Overrides::default() };
        assert!(decide_r(&c, &d, &lock, &none).is_install());
    }

    #[test]
    fn the_roles_own_pause_pin_and_device_overrides() {
        use crate::channel::{RoleOverride, RolePin};
        let none = AttemptHistory::default();
        let o = Overrides::default();
        let d = role_device("pi-1", Some("3.0.0"));
        let mut c = channel_with(target("3.1.0", Rollout::everyone()));
        c.roles.get_mut(ROLE).unwrap().paused = true;
        assert_eq!(decide_r(&c, &d, &o, &none).code(), "paused");
        // A pin wins over the pause and takes a running newer version back.
        let pin = RolePin {
            version: v("2.0.0"),
            reason: "3.x stalls".into(),
            expires: None,
            urls: vec!["../roles/camera-single/2.0.0.mfr".into()],
            size: 99,
            sha256: "ab".repeat(32),
        };
        c.roles.get_mut(ROLE).unwrap().pin = Some(pin.clone());
        let Decision::Install { version, size, .. } = decide_r(&c, &d, &o, &none) else {
            panic!("the pin installs")
        };
        assert_eq!((version, size), (v("2.0.0"), 99));
        let expired = RolePin { expires: Some(Timestamp(NOW - 1)), ..pin };
        c.roles.get_mut(ROLE).unwrap().pin = Some(expired);
        assert_eq!(decide_r(&c, &d, &o, &none).code(), "paused", "an expired pin is ignored");
        // Per-device role overrides: auto_update off holds, a version lock pins the device.
        let mut c = channel_with(target("3.1.0", Rollout::everyone()));
        let mut entry = DeviceOverride::default();
        let off = RoleOverride { auto_update: Some(false), ..RoleOverride::default() };
        entry.roles.insert(ROLE.into(), off);
        c.devices.insert("pi-1".into(), entry.clone());
        assert_eq!(decide_r(&c, &d, &o, &none).code(), "auto_update_off");
        assert!(decide_r(&c, &role_device("pi-2", None), &o, &none).is_install());
        let lock = RoleOverride { version_lock: Some(v("3.0.0")), ..RoleOverride::default() };
        entry.roles.insert(ROLE.into(), lock);
        c.devices.insert("pi-1".into(), entry);
        assert!(!decide_r(&c, &d, &o, &none).is_install(), "locked on the version it runs");
    }

    #[test]
    fn failed_versions_and_the_throttle_are_the_roles_own() {
        let c = channel_with(target("3.1.0", Rollout::everyone()));
        let d = role_device("pi-1", Some("3.0.0"));
        let o = Overrides::default();
        let failed = AttemptHistory {
            failed_versions: [v("3.1.0")].into_iter().collect(),
            ..AttemptHistory::default()
        };
        assert_eq!(decide_r(&c, &d, &o, &failed).code(), "version_failed");
        let recent = AttemptHistory { last_failure: Some(NOW - 60), ..AttemptHistory::default() };
        assert_eq!(decide_r(&c, &d, &o, &recent).code(), "throttled");
        // The maintenance window: closed (opening in 10 minutes) holds the role, open lets
        // it go.
        let minute = ((NOW % 86_400) / 60) as u16;
        let window = |from: u16, to: u16| Overrides {
            maintenance_window: Some(MaintenanceWindow {
                days: Default::default(),
                start: TimeOfDay(from % 1440),
                end: TimeOfDay((to - 1) % 1440 + 1),
                utc_offset_minutes: 0,
            }),
            ..Overrides::default()
        };
        let none = AttemptHistory::default();
        let closed = decide_r(&c, &d, &window(minute + 10, minute + 20), &none);
        assert_eq!(closed.code(), "maintenance_window", "{closed}");
        assert!(decide_r(&c, &d, &window(minute, minute + 20), &none).is_install());
    }

    #[test]
    fn percent_segments_and_waves_use_the_role_bucket() {
        let ver = v("3.1.0");
        let ids: Vec<String> = (0..400).map(|i| format!("pi-{i:03}")).collect();
        let rollout = Rollout { percent: 30, ..Rollout::everyone() };
        let c = channel_with(target("3.1.0", rollout));
        let none = AttemptHistory::default();
        let o = Overrides::default();
        let mut differs = 0;
        for id in &ids {
            let b = bucket(&role_bucket_key(id, ROLE), &ver);
            let d = decide_r(&c, &role_device(id, Some("3.0.0")), &o, &none);
            assert_eq!(d.is_install(), b < 30, "{id}: {d}");
            differs += usize::from(b != bucket(id, &ver));
        }
        assert!(differs > 300, "the role bucket is not the OS bucket: {differs}");
        // Segments.
        let mut canary_only = channel_with(target("3.1.0", Rollout::everyone()));
        canary_only.roles.get_mut(ROLE).unwrap().rollout.segments =
            [Segment::Canary].into_iter().collect();
        let d = role_device("pi-1", Some("3.0.0"));
        assert_eq!(decide_r(&canary_only, &d, &o, &none).code(), "segment_not_allowed");
        // A wave that opened raises the percent from 0 to 100.
        let waves = Rollout {
            percent: 0,
            waves: vec![Wave { at: Timestamp(NOW - 1), percent: 100 }],
            ..Rollout::everyone()
        };
        assert!(decide_r(&channel_with(target("3.1.0", waves.clone())), &d, &o, &none).is_install());
        let later =
            Rollout { waves: vec![Wave { at: Timestamp(NOW + 60), percent: 100 }], ..waves };
        let stay = decide_r(&channel_with(target("3.1.0", later)), &d, &o, &none);
        assert!(
            matches!(
                stay,
                Decision::Stay { reason: StayReason::NotSelected { next_wave: Some(_), .. } }
            ),
            "{stay}"
        );
    }
}
