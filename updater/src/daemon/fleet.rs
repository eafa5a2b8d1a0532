//! Fleet simulation (issue 7 item 7): many devices in one process follow one published folder,
//! mirrored by two loopback servers, with the real channel checks, rollout, throttle, bundle
//! install and trial commit, and a fake disk each (a sparse GPT image of the fixed layout).
//!
//! The scenario, in simulated time (each device polls once per round, as the daemon's loop
//! would; a device that installed reboots for its trial, which commits):
//! 1. 2.0.0 is published with waves 1 % at T, 5 % at T+1h, 25 % at T+4h, 100 % at T+24h, and
//!    the fleet is polled once in each wave. After each round exactly the devices whose bucket
//!    (`sha256(id@version)`, recomputed here from the documented formula) is below the wave's
//!    percent run 2.0.0, and that count is within 4 standard deviations of the nominal share.
//! 2. 3.0.0 is published at 10 %, then paused: the paused rounds change nothing.
//! 3. The primary mirror goes down, and a pin to 2.0.0 brings every device on 3.0.0 back,
//!    fetched from the second mirror.
//! 4. A replayed document (an older sequence) and an expired one change nothing, and every
//!    device names the error in its status.
//!
//! `METRICA_FLEET_DEVICES` sets the fleet size (default 500). `bench/fleet.sh` runs this in
//! release mode and prints the figures (requests, bytes, time per round).

use super::*;
use crate::autoboot::Autoboot;
use crate::bootinfo::BootInfoSource;
use crate::bundle::{testkit, SlotClass};
use crate::channel::{Channel, OsTarget, Pin, Rollout, Segment, Timestamp, Wave};
use crate::health::Check;
use crate::sign::tests::test_key;
use crate::slot::HealthPlan;
use crate::testserver::{Mode, TestServer};
use crate::testutil::{build_disk_with_roots, ext4_root, fat_boot_image, release, FakeTimer};
use semver::Version;
use sha2::Digest;
use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::time::Instant;

const T0: u64 = 1_800_000_000;
const HOUR: u64 = 3600;
const COMPATIBLE: &str = "metrica-test";

/// A bundle published in the folder.
struct Published {
    version: Version,
    file: String,
    size: u64,
    sha256: String,
}

/// Reboots are recorded; the simulation then boots the device itself.
struct NoReboot;

impl Reboot for NoReboot {
    fn reboot(&self, _mode: RebootMode) -> anyhow::Result<()> {
        Ok(())
    }
}

struct SimDevice {
    id: String,
    device: Device,
    daemon: Daemon,
}

struct Fleet {
    servers: Vec<Option<TestServer>>,
    mirrors: Vec<String>,
    devices: Vec<SimDevice>,
    keyring: crate::sign::Keyring,
    sequence: u64,
    /// Every document signed so far, by sequence (for the replay).
    signed: BTreeMap<u64, (Vec<u8>, Vec<u8>)>,
    /// Requests, bytes out and 304s of the mirrors taken down.
    gone: (u64, u64, u64),
}

fn fleet_size() -> usize {
    std::env::var("METRICA_FLEET_DEVICES").ok().and_then(|v| v.parse().ok()).unwrap_or(500)
}

/// The 64 KiB blocks of a template card that hold data, for sparse copies.
fn data_blocks(template: &[u8]) -> Vec<(u64, &[u8])> {
    template
        .chunks(64 << 10)
        .enumerate()
        .filter(|(_, b)| b.iter().any(|x| *x != 0))
        .map(|(i, b)| ((i * (64 << 10)) as u64, b))
        .collect()
}

/// A sparse copy of a card of `len` bytes: only its data blocks are written.
fn sparse_copy(blocks: &[(u64, &[u8])], len: u64, to: &Path) {
    let f = std::fs::File::create(to).unwrap();
    f.set_len(len).unwrap();
    for (offset, block) in blocks {
        f.write_all_at(block, *offset).unwrap();
    }
}

fn segment_of(i: usize) -> Segment {
    match i % 20 {
        0 => Segment::Canary,
        1..=4 => Segment::Early,
        _ => Segment::General,
    }
}

/// The rollout bucket, recomputed from the formula documented in docs/channels.md (an
/// oracle independent of `rollout::bucket`).
fn oracle_bucket(id: &str, version: &Version) -> u64 {
    let d = sha2::Sha256::digest(format!("{id}@{version}").as_bytes());
    u64::from_be_bytes(d[..8].try_into().unwrap()) % 100
}

impl Fleet {
    fn daemon(&self, id: &str, segment: Segment, device: &Device, running: Release) -> Daemon {
        let config = Config {
            mirrors: self.mirrors.clone(),
            channel: "stable".into(),
            interval: DEFAULT_INTERVAL,
            listen: "127.0.0.1:0".into(),
            min_free_bytes: 0,
            request_deadline: Duration::from_secs(10),
            no_reboot: false,
            device_id: id.into(),
            segment: segment.to_string(),
            unprovisioned: None,
        };
        let log = device.data_dir.join("log.jsonl");
        Daemon {
            fetcher: ChannelFetcher::new(config.mirrors.clone(), "stable", config.request_deadline),
            record: Daemon::open_record(device, &config, T0),
            roles: None,
            cache: Cache::new(&device.data_dir),
            log: Log::new(Some(log.clone()), id),
            booted: None,
            running: Some(running.clone()),
            planner: Box::new(ChannelPlanner {
                keyring: self.keyring.clone(),
                overrides: crate::rollout::Overrides::default(),
            }),
            installer: Box::new(BundleInstaller {
                keyring: self.keyring.clone(),
                running: Some(running),
                booted: None,
                log_file: Some(log),
                trust: None,
            }),
            rebooter: Box::new(NoReboot),
            device: device.clone(),
            config,
        }
    }

    /// Puts a file of the published folder on every mirror (down ones included: they come
    /// back with the folder in sync).
    fn put(&self, path: &str, body: &[u8]) {
        for s in self.servers.iter().flatten() {
            s.put(path, body);
        }
    }

    fn publish_bundle(&self, version: &str) -> Published {
        let meta = testkit::TestMeta {
            compatible: COMPATIBLE.into(),
            version: version.parse().unwrap(),
            security_epoch: 0,
        };
        let body = testkit::make_bundle(
            &meta,
            &[
                (SlotClass::Boot, &fat_boot_image()),
                (SlotClass::Root, &ext4_root(&release(version))),
            ],
            Some(&test_key(1)),
        );
        let file = format!("{COMPATIBLE}-{version}.mfb");
        self.put(&format!("/bundles/{file}"), &body);
        Published {
            version: meta.version,
            file,
            size: body.len() as u64,
            sha256: hex::encode(sha2::Sha256::digest(&body)),
        }
    }

    /// Signs `edit` applied to a channel offering `b`, with the next sequence, and publishes it.
    fn publish_channel(&mut self, b: &Published, now: u64, edit: impl FnOnce(&mut Channel)) {
        self.sequence += 1;
        let mut ch = Channel {
            format: crate::channel::CHANNEL_FORMAT,
            name: "stable".into(),
            sequence: self.sequence,
            published: Timestamp(now),
            expires: Timestamp(now + 7 * 24 * HOUR),
            paused: false,
            os: OsTarget {
                compatible: COMPATIBLE.into(),
                version: b.version.clone(),
                urls: vec![format!("../bundles/{}", b.file)],
                size: b.size,
                sha256: b.sha256.clone(),
                security_epoch: 0,
                rollout: Rollout::everyone(),
            },
            pin: None,
            roles: BTreeMap::new(),
            devices: BTreeMap::new(),
        };
        edit(&mut ch);
        let (doc, sig) = ch.sign(&test_key(1));
        self.put_channel(&doc, &sig);
        self.signed.insert(self.sequence, (doc, sig));
    }

    fn put_channel(&self, doc: &[u8], sig: &[u8]) {
        self.put("/channels/stable.toml", doc);
        self.put("/channels/stable.toml.sig", sig);
    }

    /// Every device polls once at `now`; one that installed boots its trial, which passes its
    /// checks and commits, and its daemon starts again on the new slot. Returns the outcomes
    /// by kind.
    fn round(&mut self, now: u64) -> BTreeMap<&'static str, usize> {
        let mut outcomes = BTreeMap::new();
        let mut rebooted = Vec::new();
        for (i, d) in self.devices.iter_mut().enumerate() {
            let kind = match d.daemon.poll(now) {
                PollOutcome::Installed { trial: true, .. } => {
                    rebooted.push(i);
                    "installed"
                }
                PollOutcome::Installed { trial: false, .. } => "installed-no-trial",
                PollOutcome::Stayed { .. } => "stayed",
                PollOutcome::NoChannel => "no-channel",
                PollOutcome::Busy => "busy",
                PollOutcome::InstallFailed(f) => panic!("{}: install failed: {f:?}", d.id),
                PollOutcome::Error(e) => panic!("{}: poll error: {e}", d.id),
            };
            *outcomes.entry(kind).or_default() += 1;
        }
        for i in rebooted {
            let (id, device) = (self.devices[i].id.clone(), self.devices[i].device.clone());
            let state = device.open_state(None, None, now).unwrap();
            let trial = state.trial.as_ref().unwrap_or_else(|| panic!("{id}: no trial"));
            let slot = trial.slot;
            let running = device.slot_release(slot).unwrap();
            let info = BootInfo {
                partition: slot.boot().number,
                tryboot: true,
                source: BootInfoSource::KernelCmdline,
            };
            let timer = FakeTimer::default();
            let plan = HealthPlan {
                checks: Vec::<&dyn Check>::new(),
                deadline: Duration::from_secs(60),
                timer: &timer,
            };
            let report = device.boot(&info, Some(&running), &plan, &|| now + 60);
            assert!(report.ok, "{id}: {}", report.summary);
            let segment = segment_of(i);
            self.devices[i].daemon = self.daemon(&id, segment, &device, running);
        }
        outcomes
    }

    /// The committed version of every device, from its state file.
    fn versions(&self) -> Vec<Version> {
        self.devices
            .iter()
            .map(|d| {
                let s = crate::state::load(&d.device.state_path()).unwrap().unwrap();
                assert!(s.trial.is_none(), "{}: trial left pending", d.id);
                s.slot(s.committed).version.clone().unwrap()
            })
            .collect()
    }

    fn count(&self, version: &Version) -> usize {
        self.versions().iter().filter(|v| *v == version).count()
    }

    fn requests(&self) -> (u64, u64, u64) {
        let mut t = self.gone;
        for s in self.servers.iter().flatten() {
            t.0 += s.requests();
            t.1 += s.bytes_out();
            t.2 += s.not_modified();
        }
        t
    }

    /// Takes mirror `i` down (connections refused from now on).
    fn take_down(&mut self, i: usize) {
        let all = self.requests();
        self.servers[i] = None;
        let rest = self.requests();
        self.gone = (
            self.gone.0 + all.0 - rest.0,
            self.gone.1 + all.1 - rest.1,
            self.gone.2 + all.2 - rest.2,
        );
    }

    fn last_error_kinds(&self) -> BTreeMap<String, usize> {
        let mut kinds = BTreeMap::new();
        for d in &self.devices {
            let k = d.daemon.record.last_error.as_ref().map(|e| e.kind.clone()).unwrap_or_default();
            *kinds.entry(k).or_default() += 1;
        }
        kinds
    }
}

/// Prints one line of figures (shown by `--nocapture`, e.g. in bench/fleet.sh).
fn report(fleet: &Fleet, step: &str, started: Instant, outcomes: &BTreeMap<&'static str, usize>) {
    let (requests, bytes, not_modified) = fleet.requests();
    println!(
        "fleet: {step:<42} {:>7.2} s  outcomes {outcomes:?}  requests {requests} ({not_modified} not modified)  bytes out {bytes}",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn a_fleet_follows_waves_pause_pin_failover_and_ignores_replayed_and_expired_channels() {
    let n = fleet_size();
    let total = Instant::now();
    // Cards and /data in memory where there is a tmpfs: the simulation measures the fleet's
    // logic and traffic, not 500 devices' fsyncs on one disk.
    let shm = Path::new("/dev/shm");
    let root = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() }.unwrap();
    let primary = TestServer::empty(Mode::Normal);
    let secondary = TestServer::empty(Mode::Normal);
    let mut fleet = Fleet {
        mirrors: vec![primary.base.clone(), secondary.base.clone()],
        servers: vec![Some(primary), Some(secondary)],
        devices: Vec::with_capacity(n),
        keyring: crate::sign::Keyring::from_keys([test_key(1).verifying_key()]),
        sequence: 0,
        signed: BTreeMap::new(),
        gone: (0, 0, 0),
    };

    // One template card committed on slot A with 1.0.0, copied sparsely for every device.
    let template_path = root.path().join("template.img");
    build_disk_with_roots(
        &template_path,
        Some(&Autoboot::committed(Slot::A).render()),
        &[Some(ext4_root(&release("1.0.0"))), None],
    );
    let template = std::fs::read(&template_path).unwrap();
    let blocks = data_blocks(&template);
    for i in 0..n {
        let id = format!("dev-{i:04}");
        let dir = root.path().join(&id);
        std::fs::create_dir_all(&dir).unwrap();
        sparse_copy(&blocks, template.len() as u64, &dir.join("card.img"));
        let device = Device::new(dir.join("card.img"), dir.join("data"));
        device.open_state(Some(Slot::A), Some(&release("1.0.0")), T0).unwrap();
        let daemon = fleet.daemon(&id, segment_of(i), &device, release("1.0.0"));
        fleet.devices.push(SimDevice { id, device, daemon });
    }
    println!("fleet: {n} devices set up in {:.2} s", total.elapsed().as_secs_f64());
    let ids: Vec<String> = fleet.devices.iter().map(|d| d.id.clone()).collect();

    // 1. Waves with no operator: 1 %, 5 %, 25 %, 100 %.
    let v2 = fleet.publish_bundle("2.0.0");
    let v2_version = v2.version.clone();
    fleet.publish_channel(&v2, T0, |ch| {
        ch.os.rollout = Rollout {
            percent: 0,
            waves: [(0, 1), (HOUR, 5), (4 * HOUR, 25), (24 * HOUR, 100)]
                .into_iter()
                .map(|(at, percent)| Wave { at: Timestamp(T0 + at), percent })
                .collect(),
            ..Rollout::everyone()
        };
    });
    let converge = Instant::now();
    for (at, percent) in [(0, 1u64), (HOUR, 5), (4 * HOUR, 25), (24 * HOUR, 100)] {
        let started = Instant::now();
        let outcomes = fleet.round(T0 + at + 600);
        report(&fleet, &format!("wave {percent}% of 2.0.0"), started, &outcomes);
        let expected = ids.iter().filter(|id| oracle_bucket(id, &v2_version) < percent).count();
        let got = fleet.count(&v2_version);
        assert_eq!(got, expected, "wave {percent}%: devices on 2.0.0");
        // The hash spreads the fleet: within 4 standard deviations of the nominal share.
        let p = percent as f64 / 100.0;
        let nominal = n as f64 * p;
        let sigma = (n as f64 * p * (1.0 - p)).sqrt();
        assert!(
            (got as f64 - nominal).abs() <= (4.0 * sigma).max(2.0),
            "wave {percent}%: {got} devices, nominal {nominal}"
        );
        println!("fleet:   {got} of {n} on 2.0.0 (nominal {nominal:.0})");
    }
    assert_eq!(fleet.count(&v2_version), n, "the fleet converged on 2.0.0");
    println!(
        "fleet: converged on 2.0.0 in 24 h of simulated time, {:.2} s of wall time",
        converge.elapsed().as_secs_f64()
    );
    // A round with nothing new: every device stays, and the channel costs a conditional GET.
    let (before, _, nm_before) = fleet.requests();
    let outcomes = fleet.round(T0 + 25 * HOUR);
    assert_eq!(outcomes.get("stayed"), Some(&n), "{outcomes:?}");
    let (after, _, nm_after) = fleet.requests();
    assert_eq!(nm_after - nm_before, n as u64, "one 304 per device for an unchanged channel");
    assert!(after - before <= 2 * n as u64, "at most the document and its signature each");

    // 2. 3.0.0 at 10 %, then paused: the pause halts it.
    let t2 = T0 + 48 * HOUR;
    let v3 = fleet.publish_bundle("3.0.0");
    let v3_version = v3.version.clone();
    fleet.publish_channel(&v3, t2, |ch| ch.os.rollout.percent = 10);
    let started = Instant::now();
    let outcomes = fleet.round(t2 + 600);
    report(&fleet, "3.0.0 at 10%", started, &outcomes);
    let on_v3 = fleet.count(&v3_version);
    let expected = ids.iter().filter(|id| oracle_bucket(id, &v3_version) < 10).count();
    assert_eq!(on_v3, expected);
    fleet.publish_channel(&v3, t2 + HOUR, |ch| {
        ch.os.rollout.percent = 100;
        ch.paused = true;
    });
    for k in 1..=2 {
        let started = Instant::now();
        let outcomes = fleet.round(t2 + HOUR + k * 600);
        report(&fleet, "3.0.0 at 100% but paused", started, &outcomes);
        assert_eq!(fleet.count(&v3_version), on_v3, "paused: nobody else updates");
    }

    // 3. The primary mirror goes down; a pin to 2.0.0 brings the fleet back, via the second.
    fleet.take_down(0);
    let secondary_before = fleet.servers[1].as_ref().unwrap().requests();
    fleet.publish_channel(&v3, t2 + 2 * HOUR, |ch| {
        ch.os.rollout.percent = 100;
        ch.paused = true;
        ch.pin = Some(Pin {
            version: v2.version.clone(),
            reason: "3.0.0 drops camera frames".into(),
            expires: None,
            compatible: COMPATIBLE.into(),
            urls: vec![format!("../bundles/{}", v2.file)],
            size: v2.size,
            sha256: v2.sha256.clone(),
            security_epoch: 0,
        });
    });
    let started = Instant::now();
    let outcomes = fleet.round(t2 + 2 * HOUR + 600);
    report(&fleet, "pin 2.0.0 with the primary mirror down", started, &outcomes);
    assert_eq!(outcomes.get("installed"), Some(&on_v3), "{outcomes:?}");
    assert_eq!(fleet.count(&v2_version), n, "the pin brought every device back to 2.0.0");
    let served = fleet.servers[1].as_ref().unwrap().requests() - secondary_before;
    assert!(served >= n as u64, "the second mirror served the fleet ({served} requests)");
    for d in &fleet.devices {
        assert_eq!(d.daemon.record.last_contact, Some(t2 + 2 * HOUR + 600), "{}", d.id);
    }

    // 4. A replayed document (sequence 2: 3.0.0 at 10 %, unpaused) changes nothing...
    let (doc, sig) = fleet.signed[&2].clone();
    fleet.put_channel(&doc, &sig);
    let started = Instant::now();
    let outcomes = fleet.round(t2 + 3 * HOUR);
    report(&fleet, "replayed channel (sequence 2)", started, &outcomes);
    assert_eq!(fleet.count(&v2_version), n);
    assert_eq!(
        fleet.last_error_kinds().get("channel_replayed"),
        Some(&n),
        "{:?}",
        fleet.last_error_kinds()
    );
    // ... and neither does an expired one with a new sequence offering 3.0.0 to everyone.
    fleet.sequence += 10;
    let ch = Channel {
        sequence: fleet.sequence,
        published: Timestamp(t2),
        expires: Timestamp(t2 + HOUR),
        ..Channel::parse(&fleet.signed[&2].0).unwrap()
    };
    let (doc, sig) = ch.sign(&test_key(1));
    fleet.put_channel(&doc, &sig);
    let started = Instant::now();
    let outcomes = fleet.round(t2 + 4 * HOUR);
    report(&fleet, "expired channel", started, &outcomes);
    assert_eq!(fleet.count(&v2_version), n);
    assert_eq!(
        fleet.last_error_kinds().get("channel_expired"),
        Some(&n),
        "{:?}",
        fleet.last_error_kinds()
    );

    let (requests, bytes, not_modified) = fleet.requests();
    println!(
        "fleet: done: {n} devices, {requests} requests ({not_modified} not modified), {bytes} bytes out, {:.2} s in all",
        total.elapsed().as_secs_f64()
    );
}
