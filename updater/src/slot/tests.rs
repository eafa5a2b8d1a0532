//! The slot flows end to end on disk images (and on the file-backed boot selector): boot
//! reconciliation, trials, commits, repairs, recovery, the lock, and power cuts at every
//! failpoint of a commit.

use super::*;
use crate::autoboot::Autoboot;
use crate::bootinfo::{BootInfo, BootInfoSource};
use crate::failpoint;
use crate::health::CheckError;
use crate::layout::Slot;
use crate::reboot::RebootMode;
use crate::release::Release;
use crate::state::SlotState;
use crate::state::{Event, TrialPhase};
use crate::testutil::{self, disk_committed, firmware_boots, FakeTimer, FixedCheck};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn v(s: &str) -> semver::Version {
    s.parse().unwrap()
}

fn booted(slot: Slot, tryboot: bool) -> BootInfo {
    BootInfo { partition: slot.boot().number, tryboot, source: BootInfoSource::KernelCmdline }
}

fn release(version: &str) -> Release {
    Release {
        name: "metrica-test".into(),
        version: v(version),
        compatible: "metrica-test".into(),
        build_epoch: 1,
        security_epoch: 0,
    }
}

/// A device whose disk commits `slot` and whose data folder is empty.
fn device(slot: Slot) -> (tempfile::TempDir, Device) {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    disk_committed(&disk, slot);
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("metrica")).unwrap();
    (dir, Device::new(disk, data))
}

fn pass() -> FixedCheck {
    FixedCheck("ok", Ok(()))
}

fn boot_with(dev: &Device, slot: Slot, tryboot: bool, check: &FixedCheck) -> BootReport {
    let timer = FakeTimer::default();
    let plan = HealthPlan { checks: vec![check], deadline: Duration::from_secs(20), timer: &timer };
    dev.boot(&booted(slot, tryboot), Some(&release("1.0.0")), &plan, &|| 1000)
}

/// First boot on A, then B installed with 1.1.0 and its trial requested.
fn trial_requested() -> (tempfile::TempDir, Device) {
    let (dir, dev) = device(Slot::A);
    assert!(boot_with(&dev, Slot::A, false, &pass()).ok);
    let (_, target) =
        dev.begin_install(&v("1.1.0"), 2, false, Some(&booted(Slot::A, false)), 10).unwrap();
    assert_eq!(target, Slot::B);
    dev.finish_install(Slot::B, &v("1.1.0"), 11).unwrap();
    dev.start_trial(Some(&booted(Slot::A, false)), 12).unwrap();
    (dir, dev)
}

fn state(dev: &Device) -> State {
    state::load(&dev.state_path()).unwrap().unwrap()
}

fn events(dev: &Device) -> Vec<String> {
    dev.history().tail(100).unwrap().into_iter().map(|e| e.event.to_string()).collect()
}

/// A device whose boot selection is a plain file (no disk image): the flows only talk to
/// the [`BootSelector`].
fn file_device(committed: Option<Slot>) -> (tempfile::TempDir, Device, FileSelector) {
    let dir = tempfile::tempdir().unwrap();
    let sel = FileSelector { path: dir.path().join("autoboot.txt") };
    if let Some(slot) = committed {
        std::fs::write(&sel.path, Autoboot::committed(slot).render()).unwrap();
    }
    let dev = Device::new(dir.path().join("no-disk.img"), dir.path().join("data"))
        .with_selector(std::sync::Arc::new(sel.clone()));
    (dir, dev, sel)
}

#[test]
fn the_flows_run_on_any_boot_selector() {
    let (_d, dev, sel) = file_device(Some(Slot::B));
    assert!(boot_with(&dev, Slot::B, false, &pass()).ok);
    assert_eq!(state(&dev).committed, Slot::B);
    dev.begin_install(&v("1.1.0"), 1, false, Some(&booted(Slot::B, false)), 10).unwrap();
    dev.finish_install(Slot::A, &v("1.1.0"), 11).unwrap();
    dev.start_trial(Some(&booted(Slot::B, false)), 12).unwrap();
    let r = boot_with(&dev, Slot::A, true, &pass());
    assert!(r.ok && r.summary.ends_with("committed slot a (1.1.0)"), "{}", r.summary);
    assert_eq!(sel.read().unwrap(), OnDisk::Valid(Autoboot::committed(Slot::A)));
    assert_eq!(events(&dev), ["init", "install-started", "install", "trial", "commit"]);
    let st = dev.status(Ok(booted(Slot::A, false)), 5);
    assert_eq!(st.autoboot.map(|a| a.committed), Some(Slot::A));
    assert!(st.drift.is_empty(), "{:?}", st.drift);
}

#[test]
fn a_missing_selection_is_repaired_through_the_backend() {
    let (_d, dev, sel) = file_device(None);
    let r = boot_with(&dev, Slot::A, false, &pass());
    assert!(r.ok && r.summary.contains("autoboot.txt repaired"), "{}", r.summary);
    assert_eq!(sel.read().unwrap(), OnDisk::Valid(Autoboot::committed(Slot::A)));
    assert_eq!(state(&dev).counters.repairs, 1);
    assert_eq!(sel.write(&Autoboot::committed(Slot::A)).unwrap(), WriteMethod::InPlace);
}

#[test]
fn reads_and_locates_the_imagers_autoboot() {
    let (_d, dev) = device(Slot::A);
    assert_eq!(read_autoboot(&dev.disk).unwrap(), OnDisk::Valid(Autoboot::committed(Slot::A)));
    let offset = locate_autoboot(&dev.disk).unwrap().unwrap();
    assert_eq!(offset % 512, 0);
    let p = config_partition(&dev.disk).unwrap();
    assert!(offset > p.start && offset < p.start + p.len);
    assert_eq!(firmware_boots(&dev.disk, false), (Slot::A, "autoboot.txt".into()));
    assert_eq!(firmware_boots(&dev.disk, true).0, Slot::B);
}

#[test]
fn a_commit_rewrites_exactly_one_sector() {
    let (_d, dev) = device(Slot::A);
    let before = std::fs::read(&dev.disk).unwrap();
    let offset = locate_autoboot(&dev.disk).unwrap().unwrap() as usize;
    assert_eq!(
        write_autoboot(&dev.disk, &Autoboot::committed(Slot::B)).unwrap(),
        WriteMethod::InPlace
    );
    let after = std::fs::read(&dev.disk).unwrap();
    let changed: Vec<usize> = (0..before.len()).filter(|&i| before[i] != after[i]).collect();
    assert!(!changed.is_empty());
    assert!(changed.iter().all(|&i| i >= offset && i < offset + 512), "{changed:?}");
    assert_eq!(firmware_boots(&dev.disk, false).0, Slot::B);
    assert_eq!(firmware_boots(&dev.disk, true).0, Slot::A);
}

#[test]
fn a_missing_or_misshapen_file_is_rewritten_through_the_file_system() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    testutil::build_disk(&disk, None);
    assert_eq!(read_autoboot(&disk).unwrap(), OnDisk::Missing);
    assert_eq!(firmware_boots(&disk, false), (Slot::A, "default partition".into()));
    assert_eq!(write_autoboot(&disk, &Autoboot::committed(Slot::B)).unwrap(), WriteMethod::Rewrite);
    assert_eq!(firmware_boots(&disk, false).0, Slot::B);
    // Now in the fixed shape: the next write is in place.
    assert_eq!(write_autoboot(&disk, &Autoboot::committed(Slot::A)).unwrap(), WriteMethod::InPlace);
    // A short, unpadded file parses but is not in the fixed shape.
    testutil::build_disk(
        &disk,
        Some(b"[all]\ntryboot_a_b=1\nboot_partition=3\n[tryboot]\nboot_partition=2\n"),
    );
    assert_eq!(read_autoboot(&disk).unwrap(), OnDisk::Valid(Autoboot::committed(Slot::B)));
    assert_eq!(locate_autoboot(&disk).unwrap(), None);
    assert_eq!(write_autoboot(&disk, &Autoboot::committed(Slot::A)).unwrap(), WriteMethod::Rewrite);
    assert!(locate_autoboot(&disk).unwrap().is_some());
}

#[test]
fn a_config_partition_in_the_wrong_place_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let e = read_autoboot(&dir.path().join("nope.img")).unwrap_err();
    assert!(format!("{e:#}").contains("nope.img"), "{e:#}");
}

#[test]
fn first_boot_creates_the_state_from_the_disk() {
    let (_d, dev) = device(Slot::A);
    let r = boot_with(&dev, Slot::A, false, &pass());
    assert_eq!(
        r,
        BootReport {
            summary: "metrica: booted slot a: slot a (1.0.0) ok".into(),
            reboot: None,
            ok: true
        }
    );
    let s = state(&dev);
    assert_eq!((s.committed, s.slot(Slot::A).version.clone()), (Slot::A, Some(v("1.0.0"))));
    assert_eq!(s.slot(Slot::B).state, SlotState::Empty);
    assert_eq!(events(&dev), ["init"]);
    // Again: nothing new.
    assert!(boot_with(&dev, Slot::A, false, &pass()).ok);
    assert_eq!(events(&dev), ["init"]);
}

#[test]
fn a_healthy_trial_is_committed() {
    let (_d, dev) = trial_requested();
    assert_eq!(firmware_boots(&dev.disk, true).0, Slot::B);
    let r = boot_with(&dev, Slot::B, true, &pass());
    assert_eq!(
        r.summary,
        "metrica: booted slot b (trial): checks passed in 0 s; committed slot b (1.1.0)"
    );
    assert_eq!((r.reboot, r.ok), (None, true));
    let s = state(&dev);
    assert_eq!((s.committed, s.trial.clone(), s.security_epoch), (Slot::B, None, 2));
    assert_eq!(firmware_boots(&dev.disk, false).0, Slot::B);
    assert_eq!(events(&dev), ["init", "install-started", "install", "trial", "commit"]);
    // The next plain boot on B is normal.
    let r = boot_with(&dev, Slot::B, false, &pass());
    assert_eq!(r.summary, "metrica: booted slot b: slot b (1.1.0) ok");
}

#[test]
fn a_failing_check_reboots_to_the_committed_slot_and_marks_bad() {
    let (_d, dev) = trial_requested();
    let bad = FixedCheck("data-writable", Err(CheckError::Fatal("read-only".into())));
    let r = boot_with(&dev, Slot::B, true, &bad);
    assert_eq!((r.reboot, r.ok), (Some(RebootMode::Plain), false));
    assert!(
        r.summary.contains("check failed: data-writable: read-only; rebooting to slot a"),
        "{}",
        r.summary
    );
    let s = state(&dev);
    assert!(
        matches!(&s.slot(Slot::B).state, SlotState::Bad { reason } if reason.contains("data-writable"))
    );
    assert!(s.bad_versions.contains(&v("1.1.0")));
    assert_eq!(firmware_boots(&dev.disk, false).0, Slot::A);
    assert_eq!(events(&dev).last().unwrap(), "rollback");
    assert!(boot_with(&dev, Slot::A, false, &pass()).summary.ends_with("slot a (1.0.0) ok"));
}

#[test]
fn a_deadline_reboots_to_the_committed_slot() {
    let (_d, dev) = trial_requested();
    let slow = FixedCheck("clock-sane", Err(CheckError::NotYet("1970".into())));
    let r = boot_with(&dev, Slot::B, true, &slow);
    assert_eq!(r.reboot, Some(RebootMode::Plain));
    assert!(
        r.summary.contains("health deadline of 20 s passed (failing: clock-sane: 1970)"),
        "{}",
        r.summary
    );
    assert_eq!(state(&dev).counters.rollbacks, 1);
}

#[test]
fn a_trial_that_never_reached_the_updater_is_a_rollback() {
    let (_d, dev) = trial_requested();
    // Kernel panic in B: the firmware boots A plainly.
    let r = boot_with(&dev, Slot::A, false, &pass());
    assert!(
        r.summary.contains("rolled back: trial boot of slot b (1.1.0) never reached the updater"),
        "{}",
        r.summary
    );
    assert!(r.ok && r.reboot.is_none());
    let s = state(&dev);
    assert_eq!(s.counters.rollbacks, 1);
    assert!(matches!(s.slot(Slot::B).state, SlotState::Bad { .. }));
    let h = dev.history().tail(1).unwrap();
    assert_eq!((h[0].event.as_str(), h[0].slot.as_deref()), ("rollback", Some("b")));
    // Never retried automatically; an operator can.
    let e = dev.begin_install(&v("1.1.0"), 2, false, None, 20).unwrap_err();
    assert!(e.to_string().contains("failed before"), "{e}");
    dev.begin_install(&v("1.1.0"), 2, true, None, 20).unwrap();
}

#[test]
fn a_tryboot_without_a_trial_reboots_plainly() {
    let (_d, dev) = device(Slot::A);
    let r = boot_with(&dev, Slot::B, true, &pass());
    assert_eq!(r.reboot, Some(RebootMode::Plain));
    assert!(r.summary.contains("no trial is pending"), "{}", r.summary);
    assert_eq!(state(&dev).committed, Slot::A);
}

#[test]
fn a_torn_autoboot_with_b_committed_walks_to_a_and_is_repaired() {
    let (_d, dev) = trial_requested();
    assert!(boot_with(&dev, Slot::B, true, &pass()).ok);
    // The sector reads back as zeros (a torn write on a card that erases first).
    let offset = locate_autoboot(&dev.disk).unwrap().unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&dev.disk)
        .unwrap()
        .write_all_at(&[0; 512], offset)
        .unwrap();
    let (walked, how) = firmware_boots(&dev.disk, false);
    assert_eq!((walked, how.as_str()), (Slot::A, "partition walk"));
    let r = boot_with(&dev, walked, false, &pass());
    assert_eq!(r.reboot, Some(RebootMode::Plain), "{}", r.summary);
    assert!(
        r.summary.contains("autoboot.txt repaired; rebooting to committed slot b"),
        "{}",
        r.summary
    );
    assert_eq!(firmware_boots(&dev.disk, false).0, Slot::B);
    assert!(boot_with(&dev, Slot::B, false, &pass()).ok);
    assert_eq!(state(&dev).counters.wrong_slot_boots, 0);
    assert_eq!(state(&dev).counters.repairs, 1);
}

#[test]
fn repeated_wrong_slot_boots_stop_rebooting() {
    let (_d, dev) = trial_requested();
    assert!(boot_with(&dev, Slot::B, true, &pass()).ok);
    let offset = locate_autoboot(&dev.disk).unwrap().unwrap();
    let tear = || {
        let f = std::fs::OpenOptions::new().write(true).open(&dev.disk).unwrap();
        f.write_all_at(&[0xff; 512], offset).unwrap();
    };
    let mut reboots = Vec::new();
    for _ in 0..4 {
        tear();
        assert_eq!(firmware_boots(&dev.disk, false).0, Slot::A);
        reboots.push(boot_with(&dev, Slot::A, false, &pass()).reboot);
    }
    let plain = Some(RebootMode::Plain);
    assert_eq!(reboots, [plain, plain, None, None]);
    // Each boot still repaired the file: the next plain reboot lands on B.
    assert_eq!(firmware_boots(&dev.disk, false).0, Slot::B);
    assert!(boot_with(&dev, Slot::B, false, &pass()).ok);
    assert_eq!(state(&dev).counters.wrong_slot_boots, 0);
}

#[test]
fn a_plain_boot_of_the_other_slot_with_a_good_autoboot_stays_put() {
    let (_d, dev) = device(Slot::A);
    assert!(boot_with(&dev, Slot::A, false, &pass()).ok);
    // e.g. an operator's `reboot 3`: autoboot.txt is fine, so no reboot loop.
    let r = boot_with(&dev, Slot::B, false, &pass());
    assert_eq!(r.reboot, None);
    assert!(r.summary.contains("running slot b while slot a is committed"), "{}", r.summary);
}

#[test]
fn a_corrupt_state_is_kept_aside_and_rebuilt() {
    let (_d, dev) = device(Slot::B);
    std::fs::write(dev.state_path(), b"{\"format\": 1, \"comm").unwrap();
    let r = boot_with(&dev, Slot::B, false, &pass());
    assert!(r.summary.contains("state.json was corrupt: kept aside and rebuilt"), "{}", r.summary);
    let backup = dev.data_dir.join("metrica/state.json.corrupt-1");
    assert_eq!(std::fs::read(&backup).unwrap(), b"{\"format\": 1, \"comm");
    let s = state(&dev);
    assert_eq!(s.committed, Slot::B);
    assert!(s
        .recovered
        .as_ref()
        .unwrap()
        .reason
        .contains("rebuilt with the committed slot from autoboot.txt"));
    assert_eq!(events(&dev), ["repair"]);
    let st = dev.status(Ok(booted(Slot::B, false)), 5);
    assert!(crate::cli::render_status(&st).contains("recovered:"));
}

#[test]
fn a_rebuilt_state_takes_versions_from_the_root_file_systems() {
    let (_d, dev) = device(Slot::B);
    testutil::build_disk_with_roots(
        &dev.disk,
        Some(&Autoboot::committed(Slot::B).render()),
        &[
            Some(testutil::ext4_root(&release("1.0.0"))),
            Some(testutil::ext4_root(&release("1.1.0"))),
        ],
    );
    assert_eq!(dev.slot_release(Slot::A).unwrap().version, v("1.0.0"));
    std::fs::write(dev.state_path(), b"garbage").unwrap();
    let s = dev.open_state(None, None, 5).unwrap();
    assert_eq!(s.committed, Slot::B);
    assert_eq!(s.slot(Slot::B).version, Some(v("1.1.0")));
    assert_eq!(s.slot(Slot::B).state, SlotState::Good);
    assert_eq!(s.slot(Slot::A).state, SlotState::Installed);
    let facts = dev.device_facts(&s, None).unwrap();
    assert_eq!(
        (facts.compatible.as_str(), facts.committed_version),
        ("metrica-test", Some(v("1.1.0")))
    );
    // Pattern roots hold no file system: no facts, said clearly.
    let (_d, plain) = device(Slot::A);
    let s = plain.open_state(Some(Slot::A), None, 5).unwrap();
    let e = plain.device_facts(&s, None).unwrap_err();
    assert!(e.to_string().contains("cannot tell this device's compatible"), "{e}");
}

#[test]
fn one_command_at_a_time() {
    let (_d, dev) = device(Slot::A);
    let held = dev.lock().unwrap();
    let e = dev.lock().unwrap_err();
    assert!(e.downcast_ref::<LockBusy>().is_some(), "{e:#}");
    drop(held);
    dev.lock().unwrap();
}

#[test]
fn a_newer_state_is_never_touched() {
    let (_d, dev) = device(Slot::A);
    let newer = b"{\"format\": 7}";
    std::fs::write(dev.state_path(), newer).unwrap();
    let r = boot_with(&dev, Slot::A, false, &pass());
    assert!(!r.ok && r.reboot.is_none());
    assert!(r.summary.contains("newer than this updater"), "{}", r.summary);
    let r = boot_with(&dev, Slot::B, true, &pass());
    assert_eq!(r.reboot, Some(RebootMode::Plain));
    assert_eq!(std::fs::read(dev.state_path()).unwrap(), newer);
}

#[test]
fn mark_good_in_a_trial_boot_commits() {
    let (_d, dev) = trial_requested();
    // The updater started in the trial boot but the operator decides.
    let s = state(&dev);
    let s = dev.apply(&s, &Event::Booted { slot: Slot::B, tryboot: true }).unwrap();
    assert_eq!(s.trial.unwrap().phase, TrialPhase::Booted);
    let (s, msg) = dev.mark_good(Slot::B, Some(&booted(Slot::B, true)), 30).unwrap();
    assert_eq!(msg, "slot b marked good and committed");
    assert_eq!(s.committed, Slot::B);
    assert_eq!(firmware_boots(&dev.disk, false).0, Slot::B);
    let e = dev.mark_bad(Slot::B, "x", None, 31).unwrap_err();
    assert!(e.to_string().contains("slot b is the committed slot"), "{e}");
    dev.mark_bad(Slot::A, "old", None, 32).unwrap();
    assert!(matches!(state(&dev).slot(Slot::A).state, SlotState::Bad { .. }));
}

#[test]
fn trials_and_installs_start_only_from_the_committed_slot() {
    let (_d, dev) = trial_requested();
    let e = dev.start_trial(Some(&booted(Slot::B, true)), 40).unwrap_err();
    assert!(e.to_string().contains("a trial starts from the committed slot"), "{e}");
    let e =
        dev.begin_install(&v("2.0.0"), 0, false, Some(&booted(Slot::A, false)), 40).unwrap_err();
    assert!(e.to_string().contains("a trial of slot b is pending"), "{e}");
}

/// Failpoints hit by a trial boot that commits, in order.
fn trial_boot_failpoints() -> Vec<String> {
    let (_d, dev) = trial_requested();
    failpoint::record();
    assert!(boot_with(&dev, Slot::B, true, &pass()).ok);
    failpoint::recorded()
}

fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out
}

fn restore(dir: &Path, snap: &[(PathBuf, Vec<u8>)]) {
    std::fs::remove_dir_all(dir.join("data")).unwrap();
    for (p, bytes) in snap {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
}

/// Cuts the power at every failpoint of a committing trial boot (and at many byte offsets
/// of the autoboot.txt write), boots what the firmware model picks, and checks that the
/// device ends on its committed slot with its roots intact and a readable state.
#[test]
fn power_cuts_during_a_commit_never_lose_the_committed_slot() {
    let names = trial_boot_failpoints();
    for expected in
        ["autoboot.write", "autoboot.after-fsync", "state.before-rename", "state.after-dir-fsync"]
    {
        assert!(names.iter().any(|n| n == expected), "{expected} not in {names:?}");
    }
    let (dir, dev) = trial_requested();
    let snap = snapshot(dir.path());
    let labels = ["boot_a", "boot_b", "root_a", "root_b"];
    let parts: Vec<Vec<u8>> =
        labels.iter().map(|l| testutil::partition_bytes(&dev.disk, l)).collect();
    let mut cases: Vec<(usize, Option<usize>)> = (0..names.len()).map(|i| (i, None)).collect();
    let write_index = names.iter().position(|n| n == "autoboot.write").unwrap();
    // Torn writes: every byte count around the two digits that differ, and a spread.
    let mut torn: Vec<usize> = (0..80).collect();
    torn.extend((80..=512).step_by(37));
    torn.push(512);
    cases.extend(torn.into_iter().map(|k| (write_index, Some(k))));
    let mut outcomes = std::collections::BTreeSet::new();
    for (index, torn) in cases {
        restore(dir.path(), &snap);
        // Hit the index-th occurrence: arm by name after skipping earlier hits of it.
        let name = &names[index];
        let skip = names[..index].iter().filter(|n| *n == name).count();
        arm_nth(name, skip, torn);
        let r = boot_with(&dev, Slot::B, true, &pass());
        failpoint::disarm();
        assert!(!r.ok && r.summary.contains("power cut"), "{name}#{skip}: {}", r.summary);
        // Power comes back: the tryboot flag is gone.
        let (slot, how) = firmware_boots(&dev.disk, false);
        assert_eq!(how, "autoboot.txt", "{name}#{skip} {torn:?}");
        assert!(state::load(&dev.state_path()).is_ok(), "{name}: state unreadable");
        let r = boot_with(&dev, slot, false, &pass());
        assert!(r.ok, "{name}#{skip} {torn:?}: {}", r.summary);
        let s = state(&dev);
        assert_eq!(s.committed, slot, "{name}#{skip} {torn:?}: {}", r.summary);
        assert_eq!(read_autoboot(&dev.disk).unwrap(), OnDisk::Valid(Autoboot::committed(slot)));
        assert_eq!(firmware_boots(&dev.disk, false).0, slot);
        for (label, bytes) in labels.iter().zip(&parts) {
            assert!(testutil::partition_bytes(&dev.disk, label) == *bytes, "{label} changed");
        }
        // A new install into the other slot is accepted.
        dev.begin_install(&v("3.0.0"), 3, false, Some(&booted(slot, false)), 50).unwrap();
        outcomes.insert((slot, s.slot(Slot::B).state.name()));
    }
    // Every end is reached: a cut before the checks passed fails the trial, a cut before
    // autoboot.txt changed keeps B installed, a cut after it commits B.
    for want in [(Slot::A, "bad"), (Slot::A, "installed"), (Slot::B, "good")] {
        assert!(outcomes.contains(&want), "{want:?} not in {outcomes:?}");
    }
}

/// Cuts the power at every failpoint of `updater trial` (before the reboot happened).
#[test]
fn power_cuts_while_requesting_a_trial_keep_slot_a() {
    let (dir, dev) = device(Slot::A);
    assert!(boot_with(&dev, Slot::A, false, &pass()).ok);
    dev.begin_install(&v("1.1.0"), 2, false, None, 10).unwrap();
    dev.finish_install(Slot::B, &v("1.1.0"), 11).unwrap();
    let snap = snapshot(dir.path());
    failpoint::record();
    dev.start_trial(Some(&booted(Slot::A, false)), 12).unwrap();
    let names = failpoint::recorded();
    assert!(!names.is_empty());
    for (i, name) in names.iter().enumerate() {
        restore(dir.path(), &snap);
        arm_nth(name, names[..i].iter().filter(|n| *n == name).count(), None);
        let e = dev.start_trial(Some(&booted(Slot::A, false)), 12).unwrap_err();
        failpoint::disarm();
        assert!(e.downcast_ref::<failpoint::PowerCut>().is_some(), "{e:#}");
        assert_eq!(firmware_boots(&dev.disk, false).0, Slot::A);
        let r = boot_with(&dev, Slot::A, false, &pass());
        assert!(r.ok, "{name}: {}", r.summary);
        assert_eq!(state(&dev).committed, Slot::A);
    }
}

/// Arms `name` so that its `skip`+1-th hit cuts the power.
fn arm_nth(name: &str, skip: usize, torn: Option<usize>) {
    if skip == 0 {
        failpoint::arm(name, torn);
    } else {
        failpoint::arm_after(name, skip, torn);
    }
}
