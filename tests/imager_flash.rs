//! End to end: `imager flash` as a user runs it: the confirmation rule (no terminal and no
//! `--yes`: refused, nothing written), the summary with MB/s, `--json`, and a `.img.zst`.

mod common;

use common::sha256;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn imager() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_imager"));
    c.stdin(Stdio::null());
    c
}

/// A sparse image with two data regions, its bmap and its .zst, as `imager build` names them.
fn image(dir: &Path) -> PathBuf {
    let img = dir.join("fleet-1.0.0.img");
    let mut f = std::fs::File::create(&img).unwrap();
    f.set_len(16 << 20).unwrap();
    f.write_all(&[1u8; 100_000]).unwrap();
    f.seek(SeekFrom::Start(10 << 20)).unwrap();
    f.write_all(&vec![2u8; 3 << 20]).unwrap();
    f.sync_all().unwrap();
    let progress = imager::progress::Progress::quiet();
    imager::output::write_bmap(&img, &dir.join("fleet-1.0.0.bmap")).unwrap();
    imager::output::compress_zstd(&img, &dir.join("fleet-1.0.0.img.zst"), 3, &progress).unwrap();
    img
}

#[test]
fn refuses_without_terminal_or_yes_and_writes_with_yes() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let target = dir.path().join("card.img");

    let out = imager().arg("flash").arg(&img).arg(&target).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "refusing to write without confirmation: standard input is not a terminal; pass --yes"
        ),
        "{stderr}"
    );
    assert!(!target.exists(), "nothing written without confirmation");

    let out = imager().arg("flash").arg(&img).arg(&target).arg("--yes").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("written") && stderr.contains("MB/s") && stderr.contains("verified"),
        "{stderr}"
    );
    assert_eq!(sha256(&target), sha256(&img));

    // The compressed image to a new file, with a JSON report.
    let target2 = dir.path().join("card2.img");
    let zst = dir.path().join("fleet-1.0.0.img.zst");
    let out =
        imager().arg("flash").arg(&zst).arg(&target2).args(["-y", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["image_size"], 16 << 20);
    assert!(report["mapped_bytes"].as_u64().unwrap() < 4 << 20);
    assert_eq!(sha256(&target2), sha256(&img));
}

#[test]
fn refuses_a_folder_and_a_missing_image() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let out = imager().arg("flash").arg(&img).arg(dir.path()).arg("-y").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("is neither a block device nor a regular file (a folder)"), "{stderr}");
    let out = imager()
        .arg("flash")
        .arg(dir.path().join("nope.img"))
        .arg(dir.path().join("t"))
        .arg("--bmap")
        .arg(dir.path().join("fleet-1.0.0.bmap"))
        .arg("-y")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("opening") && stderr.contains("nope.img"), "{stderr}");
}
