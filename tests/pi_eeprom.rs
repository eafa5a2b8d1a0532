//! recipes/pi/check-eeprom, the script a provisioning engineer runs on a Raspberry Pi to check
//! its bootloader EEPROM (docs/pi.md), fed saved `vcgencmd bootloader_version` and
//! `rpi-eeprom-config` outputs: each setting the image relies on is checked, and each problem
//! named.

use std::path::{Path, PathBuf};
use std::process::Command;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes/pi/check-eeprom")
}

/// Runs the script on a version and a config text; returns its exit code and stdout.
fn check(version: &str, config: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let (v, c) = (dir.path().join("version"), dir.path().join("config"));
    std::fs::write(&v, version).unwrap();
    std::fs::write(&c, config).unwrap();
    let out = Command::new("sh").arg(script()).arg(&v).arg(&c).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

const NEW: &str = "2024/04/17 13:45:28 version 84c7ef6a (release) timestamp 1713357928\n";
const WALK: &str = "[all]\nBOOT_UART=1\nPARTITION_WALK=1\nBOOT_ORDER=0xf41\n";

#[test]
fn a_current_bootloader_with_the_partition_walk_passes() {
    let (code, out) = check(NEW, WALK);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("built 20240417") && out.contains("PARTITION_WALK=1: ok"), "{out}");
}

#[test]
fn an_old_bootloader_and_a_missing_walk_are_both_named() {
    let (code, out) =
        check("Sep  3 2020 13:11:43\nversion c305221a\n", "[all]\nBOOT_ORDER=0xf41\n");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("built 20200903, older than 20221018"), "{out}");
    assert!(out.contains("PARTITION_WALK is not set"), "{out}");
    assert!(out.contains("2 problem(s)"), "{out}");
}

#[test]
fn the_day_before_tryboot_a_b_is_too_old_and_a_walk_only_in_tryboot_does_not_count() {
    let (code, out) = check(
        "2022/10/17 10:00:00 version x\n",
        "[all]\nPARTITION_WALK=0\n[tryboot]\nPARTITION_WALK=1\n",
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("older than 20221018"), "{out}");
    assert!(out.contains("PARTITION_WALK is 0"), "{out}");
}

#[test]
fn unreadable_version_output_is_an_error_not_a_pass() {
    let (code, out) = check("vcgencmd: command not found\n", WALK);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("cannot read the bootloader date"), "{out}");
}
