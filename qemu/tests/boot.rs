//! Real boots of Debian's arm64 kernel with a busybox initramfs under QEMU (TCG), on a fixture
//! disk built by `tests/make-fixture.sh`. Each test writes an action script into the fixture's
//! state partition; the fixture's init runs one action per boot (see tests/fixture/init).
//!
//! The QEMU tier (docs/testing.md): every test is `#[ignore]`d, so a plain `cargo test` reports
//! them as ignored; `cargo test -p qemu --test boot -- --ignored` runs them, and then a missing
//! qemu-system-aarch64 or a fixture that cannot be built (the kernel and busybox packages, from
//! cache/debs or apt, and the tools of make-fixture.sh) fails the test, naming what is missing.

use qemu::cut::{CutPlan, Delay};
use qemu::harness::{
    self, Action, BootRecord, Director, Echo, Failure, Options, Passive, RunEnd, RunReport,
};
use qemu::machine::MachineConfig;
use qemu::scenario;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

const READY: &str = "fixture: userspace up";

/// The fixture disk, built once per test binary. Panics, naming what is missing, when QEMU is
/// not installed or the fixture cannot be built: an ignored test that was asked to run must
/// not pass without running.
fn fixture() -> PathBuf {
    static FIXTURE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let built = FIXTURE.get_or_init(|| {
        let qemu = qemu::machine::DEFAULT_QEMU;
        if qemu::machine::find_qemu(Path::new(qemu)).is_none() {
            return Err(format!("{qemu} is not on PATH (Debian package qemu-system-arm)"));
        }
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("qemu-fixture");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/make-fixture.sh");
        let status =
            Command::new("bash").arg(&script).arg(&out).status().map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("{} failed: {status}", script.display()));
        }
        Ok(out.join("disk.img"))
    });
    match built {
        Ok(p) => p.clone(),
        Err(e) => panic!("the QEMU boot tests cannot run: {e} (see docs/testing.md)"),
    }
}

/// A private copy of the fixture with an action script.
fn disk(fixture: &Path, dir: &Path, actions: &str) -> PathBuf {
    let disk = dir.join("disk.img");
    let status =
        Command::new("cp").arg("--sparse=always").arg(fixture).arg(&disk).status().unwrap();
    assert!(status.success());
    let state = qemu::disk::partitions(&disk)
        .unwrap()
        .into_iter()
        .find(|p| p.label == "fixture_state")
        .unwrap();
    let mut f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    f.seek(SeekFrom::Start(state.start)).unwrap();
    let mut sectors = vec![0u8; 1024];
    sectors[512..512 + actions.len()].copy_from_slice(actions.as_bytes());
    f.write_all(&sectors).unwrap();
    f.sync_all().unwrap();
    disk
}

fn options(disk: &Path, dir: &Path) -> Options {
    let mut o = Options::new(MachineConfig::new(disk));
    o.echo = Echo::Notes;
    o.ready_pattern = Some(READY.into());
    o.log_dir = Some(dir.join("logs"));
    o.timeouts.boot = Duration::from_secs(120);
    o.timeouts.silence = Duration::from_secs(60);
    o.seed = Some(42);
    o
}

/// (partition, tryboot, reset) of every boot.
fn trail(report: &RunReport) -> Vec<(u32, bool, String)> {
    report
        .boots
        .iter()
        .map(|b| (b.partition, b.tryboot, b.reset.clone().unwrap_or_default()))
        .collect()
}

fn t(partition: u32, tryboot: bool, reset: &str) -> (u32, bool, String) {
    (partition, tryboot, reset.to_string())
}

#[test]
#[ignore = "QEMU aarch64 boot test: run with --ignored (see docs/testing.md)"]
fn tryboot_flag_is_one_shot_across_every_kind_of_reset() {
    let fixture = fixture();
    let dir = tempfile::tempdir().unwrap();
    let disk = disk(&fixture, dir.path(), "tryboot,reboot,tryboot,panic,tryboot,watchdog,poweroff");
    let report = harness::run(&options(&disk, dir.path()), &mut Passive).unwrap();
    assert_eq!(report.end, RunEnd::PowerOff, "{:?}", report.boots);
    assert_eq!(
        trail(&report),
        [
            t(2, false, "reboot '0 tryboot'"),
            t(3, true, "reboot"),
            t(2, false, "reboot '0 tryboot'"),
            t(3, true, "kernel panic"),
            t(2, false, "reboot '0 tryboot'"),
            t(3, true, "watchdog reset"),
            t(2, false, "power off"),
        ]
    );
    for b in &report.boots {
        assert_eq!(b.selection, "autoboot.txt");
        assert!(b.cmdline.ends_with(&format!(
            "metrica.boot_partition={} metrica.tryboot={}",
            b.partition,
            u8::from(b.tryboot)
        )));
        let ready = b.ready_ms.expect("every boot reached userspace");
        eprintln!("boot {}: userspace after {ready} ms, boot took {} ms", b.index, b.duration_ms);
        assert!(ready < 30_000, "boot {} took {ready} ms to reach userspace", b.index);
    }
    let log = std::fs::read_to_string(&report.console_log).unwrap();
    assert!(log.contains("fixture: userspace up partition=3 tryboot=1"), "{log}");
}

#[test]
#[ignore = "QEMU aarch64 boot test: run with --ignored (see docs/testing.md)"]
fn power_cut_during_a_trial_clears_the_flag() {
    let fixture = fixture();
    let dir = tempfile::tempdir().unwrap();
    let disk = disk(&fixture, dir.path(), "tryboot,hang,poweroff");
    let mut o = options(&disk, dir.path());
    o.cuts.push(CutPlan {
        on: Some("fixture: step 1".into()),
        boot: None,
        delay: "0-500".parse().unwrap(),
    });
    let report = harness::run(&o, &mut Passive).unwrap();
    assert_eq!(report.end, RunEnd::PowerOff);
    assert_eq!(
        trail(&report),
        [t(2, false, "reboot '0 tryboot'"), t(3, true, "power cut"), t(2, false, "power off")]
    );
}

#[test]
#[ignore = "QEMU aarch64 boot test: run with --ignored (see docs/testing.md)"]
fn power_cut_at_a_random_time_after_start() {
    let fixture = fixture();
    let dir = tempfile::tempdir().unwrap();
    // The cut may come before or after the guest counts its step (on a loaded host), so the
    // second boot is stopped as soon as it is up, whatever its action.
    let disk = disk(&fixture, dir.path(), "hang,hang");
    let mut o = options(&disk, dir.path());
    o.cuts.push(CutPlan { on: None, boot: Some(1), delay: Delay { min_ms: 3000, max_ms: 4000 } });
    let report = harness::run(&o, &mut StopInBoot2(READY)).unwrap();
    assert_eq!(trail(&report), [t(2, false, "power cut"), t(2, false, "")]);
    assert_eq!(report.end, RunEnd::Stopped(format!("saw {READY:?} in boot 2")));
    let d = report.boots[0].duration_ms;
    assert!((3000..6000).contains(&d), "cut after {d} ms");
}

#[test]
#[ignore = "QEMU aarch64 boot test: run with --ignored (see docs/testing.md)"]
fn reboot_to_a_partition_and_extra_disks() {
    let fixture = fixture();
    let dir = tempfile::tempdir().unwrap();
    let disk = disk(&fixture, dir.path(), "reboot-to-3,poweroff");
    let extra = dir.path().join("bundle.img");
    std::fs::File::create(&extra).unwrap().set_len(1024 * 1024).unwrap();
    let mut o = options(&disk, dir.path());
    o.machine.extra_disks.push(extra);
    let report = harness::run(&o, &mut Passive).unwrap();
    assert_eq!(trail(&report), [t(2, false, "reboot '3'"), t(3, false, "power off")]);
    assert_eq!(report.boots[1].selection, "reboot argument");
}

#[test]
#[ignore = "QEMU aarch64 boot test: run with --ignored (see docs/testing.md)"]
fn a_hung_boot_times_out_and_keeps_its_log() {
    let fixture = fixture();
    let dir = tempfile::tempdir().unwrap();
    let disk = disk(&fixture, dir.path(), "hang");
    let mut o = options(&disk, dir.path());
    o.log_dir = None;
    // Long enough for a loaded host to reach "fixture: hanging" first.
    o.timeouts.silence = Duration::from_secs(15);
    let report = harness::run(&o, &mut Passive).unwrap();
    assert_eq!(
        report.end,
        RunEnd::Failed(Failure::Timeout { boot: 1, what: "no console output".into(), limit_s: 15 })
    );
    let kept = report.log_dir.expect("kept");
    let log = std::fs::read_to_string(kept.join("console.log")).unwrap();
    assert!(log.contains("fixture: hanging"), "{log}");
    std::fs::remove_dir_all(kept).unwrap();
}

/// Types on the console and stops the run when the guest has answered.
struct StopAt(&'static str);
impl Director for StopAt {
    fn on_line(&mut self, boot: &BootRecord, line: &str) -> Action {
        if line.contains(self.0) {
            Action::Stop(format!("saw {:?} in boot {}", self.0, boot.index))
        } else {
            Action::Continue
        }
    }
}

#[test]
#[ignore = "QEMU aarch64 boot test: run with --ignored (see docs/testing.md)"]
fn a_director_stops_the_run() {
    let fixture = fixture();
    let dir = tempfile::tempdir().unwrap();
    let disk = disk(&fixture, dir.path(), "tryboot,hang");
    let report = harness::run(&options(&disk, dir.path()), &mut StopAt("tryboot=1")).unwrap();
    assert_eq!(report.end, RunEnd::Stopped("saw \"tryboot=1\" in boot 2".into()));
    assert_eq!(report.boots.len(), 2);
}

#[test]
#[ignore = "QEMU aarch64 boot test: run with --ignored (see docs/testing.md)"]
fn unparseable_autoboot_walks_to_boot_a() {
    let fixture = fixture();
    let dir = tempfile::tempdir().unwrap();
    let disk = disk(&fixture, dir.path(), "poweroff");
    // Tear autoboot.txt: its first bytes become zeros, as a torn write could leave them.
    let config =
        qemu::disk::partitions(&disk).unwrap().into_iter().find(|p| p.number == 1).unwrap();
    {
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&disk).unwrap();
        let slice =
            fscommon::StreamSlice::new(file, config.start, config.start + config.len).unwrap();
        let fs = fatfs::FileSystem::new(slice, fatfs::FsOptions::new()).unwrap();
        let mut f = fs.root_dir().open_file("autoboot.txt").unwrap();
        f.write_all(&[0u8; 16]).unwrap();
        drop(f);
        fs.unmount().unwrap();
    }
    let mut o = options(&disk, dir.path());
    o.first_request = qemu::firmware::BootRequest { partition: 0, tryboot: true };
    let report = harness::run(&o, &mut Passive).unwrap();
    assert_eq!(trail(&report), [t(2, true, "power off")]);
    let b = &report.boots[0];
    assert_eq!(b.selection, "partition walk");
    assert!(b.warnings.iter().any(|w| w.contains("not ASCII text")), "{:?}", b.warnings);
}

#[test]
#[ignore = "QEMU aarch64 boot test: run with --ignored (see docs/testing.md)"]
fn a_halt_ends_the_run() {
    let fixture = fixture();
    let dir = tempfile::tempdir().unwrap();
    let disk = disk(&fixture, dir.path(), "halt");
    let report = harness::run(&options(&disk, dir.path()), &mut Passive).unwrap();
    assert_eq!(report.end, RunEnd::Halt);
    assert_eq!(trail(&report), [t(2, false, "halt")]);
    assert!(report.boots[0].duration_ms < 30_000);
}

#[test]
#[ignore = "QEMU aarch64 boot test: run with --ignored (see docs/testing.md)"]
fn cli_boot_prints_a_json_report() {
    let fixture = fixture();
    let dir = tempfile::tempdir().unwrap();
    let disk = disk(&fixture, dir.path(), "tryboot,poweroff");
    let out = Command::new(env!("CARGO_BIN_EXE_pi-qemu"))
        .args(["boot", disk.to_str().unwrap(), "--json", "--ready", READY])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["end"], "PowerOff");
    assert_eq!(report["boots"][1]["partition"], 3);
    assert_eq!(report["boots"][1]["tryboot"], true);
    let notes = String::from_utf8_lossy(&out.stderr);
    assert!(
        notes.contains("pi-qemu: boot 2: partition 3 (boot_b) tryboot=1 via autoboot.txt"),
        "{notes}"
    );
}

/// Types a line when the guest asks for one.
struct Typist;
impl Director for Typist {
    fn on_line(&mut self, _boot: &BootRecord, line: &str) -> Action {
        if line.contains("fixture: waiting for input") {
            Action::Send("hello from the host".into())
        } else {
            Action::Continue
        }
    }
}

#[test]
#[ignore = "QEMU aarch64 boot test: run with --ignored (see docs/testing.md)"]
fn a_director_types_on_the_console() {
    let fixture = fixture();
    let dir = tempfile::tempdir().unwrap();
    let disk = disk(&fixture, dir.path(), "echo");
    let report = harness::run(&options(&disk, dir.path()), &mut Typist).unwrap();
    assert_eq!(report.end, RunEnd::PowerOff);
    let log = std::fs::read_to_string(&report.console_log).unwrap();
    assert!(log.contains("fixture: got hello from the host"), "{log}");
}

#[test]
#[ignore = "QEMU aarch64 boot test: run with --ignored (see docs/testing.md)"]
fn a_series_of_power_cuts_on_fresh_copies() {
    let fixture = fixture();
    let dir = tempfile::tempdir().unwrap();
    let template = disk(&fixture, dir.path(), "tryboot,hang,poweroff");
    let ctx = scenario::Context {
        images: scenario::ImageSet::default(),
        work_dir: dir.path().join("work"),
        cuts: 3,
        qemu: qemu::machine::DEFAULT_QEMU.into(),
        memory_mib: 512,
        timeouts: harness::Timeouts::default(),
        echo: Echo::Notes,
        keep_logs: false,
        healthy_pattern: READY.into(),
        seed: Some(5),
        imager: None,
        signing_key: None,
    };
    let series = scenario::CutSeries {
        runs: 3,
        cut_on: "fixture: step 1".into(),
        window: "0-800".parse().unwrap(),
        boot: Some(2),
        extra_disks: vec![],
    };
    let work = dir.path().join("series");
    let mut checked = Vec::new();
    let boots = scenario::cut_series(
        &ctx,
        &work,
        &template,
        &series,
        &mut |_| Box::new(Passive),
        &mut |i, report| {
            checked.push(i);
            // After the cut in the trial, the committed slot boots without the flag.
            let last = report.boots.last().unwrap();
            anyhow::ensure!(last.partition == 2 && !last.tryboot, "{:?}", trail(report));
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(checked, [0, 1, 2]);
    assert_eq!(boots.len(), 9);
    assert!(!work.join("cut-001").exists(), "passing runs leave nothing behind");

    // A pattern that never appears: the series fails and says so.
    let quick = tempfile::tempdir().unwrap();
    let powers_off = disk(&fixture, quick.path(), "poweroff");
    let never = scenario::CutSeries { runs: 1, cut_on: "never printed".into(), ..series };
    let err = scenario::cut_series(
        &ctx,
        &work,
        &powers_off,
        &never,
        &mut |_| Box::new(Passive),
        &mut |_, _| Ok(()),
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("the cut never fired"), "{err:#}");
}

#[test]
#[ignore = "QEMU aarch64 boot test: run with --ignored (see docs/testing.md)"]
fn cli_boot_until_a_line() {
    let fixture = fixture();
    let dir = tempfile::tempdir().unwrap();
    let disk = disk(&fixture, dir.path(), "tryboot,hang");
    let out = Command::new(env!("CARGO_BIN_EXE_pi-qemu"))
        .args(["boot", disk.to_str().unwrap(), "--quiet", "--until", "tryboot=1"])
        .output()
        .unwrap();
    let notes = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{notes}");
    assert!(notes.contains("boot 2: stopped: saw \"tryboot=1\" in boot 2"), "{notes}");
}

/// Fails the run when a trial boot ends with anything but a plain reboot.
struct TrialMustReboot;
impl Director for TrialMustReboot {
    fn on_boot_end(&mut self, boot: &BootRecord) -> Action {
        match boot.reset.as_deref() {
            Some(r) if boot.tryboot && r != "reboot" => {
                Action::Fail(format!("trial ended with {r}"))
            }
            _ => Action::Continue,
        }
    }
}

#[test]
#[ignore = "QEMU aarch64 boot test: run with --ignored (see docs/testing.md)"]
fn a_director_fails_the_run_at_the_end_of_a_boot() {
    let fixture = fixture();
    let dir = tempfile::tempdir().unwrap();
    let disk = disk(&fixture, dir.path(), "tryboot,panic,poweroff");
    let report = harness::run(&options(&disk, dir.path()), &mut TrialMustReboot).unwrap();
    assert_eq!(
        report.end,
        RunEnd::Failed(Failure::Director { boot: 2, why: "trial ended with kernel panic".into() })
    );
    assert!(report.log_dir.is_some());
}

/// Stops the run at a line, in the second boot only.
struct StopInBoot2(&'static str);
impl Director for StopInBoot2 {
    fn on_line(&mut self, boot: &BootRecord, line: &str) -> Action {
        if boot.index == 2 {
            StopAt(self.0).on_line(boot, line)
        } else {
            Action::Continue
        }
    }
}
