//! The A/B scenarios of issue 5 against the real images: `pi-qemu scenario all`, in process.
//!
//! The QEMU tier (docs/testing.md): `#[ignore]`d, so a plain `cargo test` reports it as ignored;
//! `cargo test -p qemu --test scenarios -- --ignored` runs it, with `METRICA_IMAGE_DIR` naming
//! the folder where `imager build recipes/qemu.toml` put v1 and v2 (CI: out/qemu).
//! `METRICA_QEMU_CUTS` sets the number of power cuts per power-cut scenario (default 10). When
//! it runs, a missing qemu-system-aarch64 or image folder is a failure, never a skip.
//! The `imager` binary is found beside this test binary (target/debug/imager, built by
//! `cargo test --workspace` or `cargo build --workspace`) or through `METRICA_IMAGER`.

use qemu::harness::{Echo, Timeouts};
use qemu::scenario::{self, Context, ImageSet, DEFAULT_HEALTHY_PATTERN, SCENARIOS};
use std::path::PathBuf;
use std::time::Instant;

#[test]
#[ignore = "QEMU aarch64 boot test: run with --ignored (see docs/testing.md)"]
fn every_scenario_passes_against_the_built_images() {
    let image_dir = std::env::var_os("METRICA_IMAGE_DIR").map(PathBuf::from).expect(
        "the QEMU scenarios need METRICA_IMAGE_DIR: the folder with the v1 and v2 images \
         built from recipes/qemu.toml (e.g. out/qemu; see docs/testing.md)",
    );
    let qemu = std::env::var_os("METRICA_QEMU")
        .map_or_else(|| qemu::machine::DEFAULT_QEMU.into(), PathBuf::from);
    assert!(
        qemu::machine::find_qemu(&qemu).is_some(),
        "the QEMU scenarios cannot run: {} is not installed (Debian package qemu-system-arm; \
         or set METRICA_QEMU)",
        qemu.display()
    );
    let cuts = std::env::var("METRICA_QEMU_CUTS")
        .ok()
        .map_or(10, |c| c.parse().expect("METRICA_QEMU_CUTS must be a number"));
    let work = tempfile::Builder::new().prefix("pi-qemu-scenarios-").tempdir().unwrap();
    let ctx = Context {
        images: ImageSet::find(&image_dir).unwrap(),
        work_dir: work.path().to_path_buf(),
        cuts,
        qemu,
        memory_mib: 512,
        timeouts: Timeouts::default(),
        echo: Echo::Notes,
        keep_logs: false,
        healthy_pattern: DEFAULT_HEALTHY_PATTERN.into(),
        seed: None,
        imager: std::env::var_os("METRICA_IMAGER").map(PathBuf::from),
        signing_key: std::env::var_os("METRICA_SIGNING_KEY").map(PathBuf::from),
    };
    let started = Instant::now();
    let reports: Vec<_> = SCENARIOS.iter().map(|s| scenario::run(s, &ctx)).collect();
    let all_passed = scenario::summarize(&reports, started.elapsed());
    let failed: Vec<String> = reports
        .iter()
        .filter(|r| !r.passed)
        .map(|r| format!("{}: {} (logs {:?})", r.name, r.detail, r.logs))
        .collect();
    if !all_passed {
        // Keep the work folder (disk copies, console logs) for the person reading the failure.
        let kept = work.keep();
        panic!("scenarios failed (work folder {}):\n{}", kept.display(), failed.join("\n"));
    }
    // Real outcomes, not only "no error": every scenario booted, and the boots add up.
    for r in &reports {
        assert!(!r.boots.is_empty(), "{} passed without a boot", r.name);
    }
    let times = scenario::HealthyTimes::of(&reports).expect("no boot reached the healthy marker");
    assert!(times.boots >= 10, "{times}");
    let cuts_seen = reports
        .iter()
        .flat_map(|r| &r.boots)
        .filter(|b| b.reset.as_deref() == Some("power cut"))
        .count();
    // power-cut-install, power-cut-commit and provision-cuts.
    let cut_scenarios = SCENARIOS.iter().filter(|s| s.name.contains("cut")).count();
    assert_eq!(cut_scenarios, 3);
    assert_eq!(cuts_seen, cut_scenarios * cuts, "each power-cut scenario cuts --cuts times");
}
