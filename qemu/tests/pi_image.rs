//! The Raspberry Pi root (recipes/pi-qemu.toml: Debian trixie, systemd, Docker, the updater's
//! units, read-only) booted under QEMU: no failed unit, Docker up with its data on /data, and
//! the A/B update v1 -> v2 through tryboot and commit; and an unprovisioned card in safe mode
//! (qemu::pi_image).
//!
//! The QEMU tier (docs/testing.md): `#[ignore]`d; `cargo test -p qemu --test pi_image --
//! --ignored` runs it with `METRICA_PI_IMAGE_DIR` naming the folder where
//! `imager build recipes/pi-qemu.toml` put v1 (its .img) and v2 (its .mfb) (CI: out/pi-qemu).
//! When it runs, a missing QEMU or image folder is a failure, never a skip.

use qemu::harness::{Echo, Timeouts};
use qemu::scenario::{Context, ImageSet, DEFAULT_HEALTHY_PATTERN};
use std::path::PathBuf;

/// The context of a Pi image run (the environment names the images, QEMU, the imager).
fn context(work: &std::path::Path) -> Context {
    let image_dir = std::env::var_os("METRICA_PI_IMAGE_DIR").map(PathBuf::from).expect(
        "the Pi image test needs METRICA_PI_IMAGE_DIR: the folder with v1 (.img) and v2 (.mfb) \
         built from recipes/pi-qemu.toml (e.g. out/pi-qemu; see docs/pi.md)",
    );
    let qemu = std::env::var_os("METRICA_QEMU")
        .map_or_else(|| qemu::machine::DEFAULT_QEMU.into(), PathBuf::from);
    assert!(
        qemu::machine::find_qemu(&qemu).is_some(),
        "{} is not installed (Debian package qemu-system-arm; or set METRICA_QEMU)",
        qemu.display()
    );
    Context {
        images: ImageSet::find(&image_dir).unwrap(),
        work_dir: work.to_path_buf(),
        cuts: 0,
        qemu,
        memory_mib: 1024,
        // Boot 1 also installs v2 (a 1.25 GiB root slot) under TCG: minutes, not seconds.
        timeouts: Timeouts {
            boot: std::time::Duration::from_secs(1200),
            silence: std::time::Duration::from_secs(600),
            run: std::time::Duration::from_secs(2700),
            ..Timeouts::default()
        },
        echo: Echo::Notes,
        keep_logs: true,
        healthy_pattern: DEFAULT_HEALTHY_PATTERN.into(),
        seed: None,
        imager: std::env::var_os("METRICA_IMAGER").map(PathBuf::from),
        signing_key: std::env::var_os("METRICA_SIGNING_KEY").map(PathBuf::from),
    }
}

/// Runs `run` in a work folder (kept when it fails) and prints the boots' times.
fn measured(
    what: &str,
    boots: usize,
    run: fn(&Context, &std::path::Path) -> anyhow::Result<qemu::pi_image::PiReport>,
) {
    let work = tempfile::Builder::new().prefix("pi-qemu-image-").tempdir().unwrap();
    match run(&context(work.path()), work.path()) {
        Ok(report) => {
            let secs: Vec<String> = report
                .healthy_ms
                .iter()
                .map(|ms| format!("{:.1} s", *ms as f64 / 1000.0))
                .collect();
            let cpus = qemu::pi_image::CPUS;
            println!(
                "pi-qemu {what}: boot to healthy (QEMU TCG, {cpus} CPUs): {}",
                secs.join(", ")
            );
            assert_eq!(report.healthy_ms.len(), boots, "every boot reached healthy");
        }
        Err(e) => {
            let kept = work.keep();
            panic!("{e:#} (work folder {})", kept.display());
        }
    }
}

#[test]
#[ignore = "QEMU aarch64 boot test: run with --ignored (see docs/testing.md)"]
fn the_pi_root_boots_read_only_with_docker_and_updates_a_to_b() {
    measured("A/B", 3, qemu::pi_image::run);
}

/// A card flashed but never provisioned: the daemon still runs and says why in safe mode.
#[test]
#[ignore = "QEMU aarch64 boot test: run with --ignored (see docs/testing.md)"]
fn the_pi_root_unprovisioned_runs_the_safe_mode_stack() {
    measured("unprovisioned", 1, qemu::pi_image::run_unprovisioned);
}
