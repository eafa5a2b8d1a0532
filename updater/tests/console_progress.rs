//! `updater install` as a process whose stderr is a pipe, as under init on a serial console
//! or in the journal: its progress is whole plain lines (or JSON lines with
//! `--progress json`), never a bar redrawn with `\r` (docs/daemon.md, "Console logs").
//! Needs the `testkit` feature for the bundle writer (on in `cargo test --workspace`).

use std::io::{Cursor, Write};
use std::path::Path;
use std::process::{Command, Output};
use updater::bundle::testkit::{make_bundle, test_image, TestMeta};
use updater::bundle::SlotClass;
use updater::layout::{FsKind, Slot, PARTITIONS};

const MIB: u64 = 1 << 20;

/// A FAT image holding `files`.
fn fat(len: u64, files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut img = Cursor::new(vec![0u8; len as usize]);
    fatfs::format_volume(&mut img, fatfs::FormatVolumeOptions::new()).unwrap();
    {
        let fs = fatfs::FileSystem::new(&mut img, fatfs::FsOptions::new()).unwrap();
        for (name, bytes) in files {
            fs.root_dir().create_file(name).unwrap().write_all(bytes).unwrap();
        }
        fs.unmount().unwrap();
    }
    img.into_inner()
}

/// A 16 MiB disk image with the seven partitions of the layout (FAT ones formatted, slot A
/// committed in autoboot.txt), and the rest of what `updater install` reads: a keyring, a
/// sysroot booted from slot A, the device state.
fn fixture(dir: &Path, key: &ed25519_dalek::SigningKey) {
    use std::os::unix::fs::FileExt;
    let path = dir.join("disk.img");
    let file =
        std::fs::File::options().read(true).write(true).create_new(true).open(&path).unwrap();
    file.set_len(16 * MIB).unwrap();
    let mut disk = gpt::GptConfig::new().writable(true).create_from_device(file, None).unwrap();
    let mut spans = Vec::new();
    for p in PARTITIONS {
        let (size, kind) = match p.fs {
            FsKind::Fat => (2 * MIB, gpt::partition_types::BASIC),
            FsKind::Ext4 => (MIB, gpt::partition_types::LINUX_FS),
        };
        let id = disk.add_partition(p.label, size, kind, 0, Some(2048)).unwrap();
        let part = disk.partitions()[&id].clone();
        spans.push((p, part.first_lba * 512, (part.last_lba + 1 - part.first_lba) * 512));
    }
    disk.write().unwrap();
    let file = std::fs::File::options().write(true).open(&path).unwrap();
    let autoboot = updater::autoboot::Autoboot::committed(Slot::A).render();
    for (p, start, len) in spans {
        let files: &[(&str, &[u8])] = match p.label {
            "config" => &[("autoboot.txt", &autoboot)],
            "boot_a" | "boot_b" => &[("cmdline.txt", b"console=ttyAMA0 root=PARTUUID=x\n")],
            "provision" => &[],
            _ => continue,
        };
        file.write_all_at(&fat(len, files), start).unwrap();
    }
    std::fs::create_dir_all(dir.join("keyring")).unwrap();
    let pem = updater::sign::public_key_to_pem(&key.verifying_key());
    std::fs::write(dir.join("keyring/test.pub.pem"), pem).unwrap();
    std::fs::create_dir_all(dir.join("root/proc")).unwrap();
    std::fs::create_dir_all(dir.join("root/etc/metrica")).unwrap();
    std::fs::write(dir.join("root/proc/cmdline"), "metrica.boot_partition=2 metrica.tryboot=0\n")
        .unwrap();
    std::fs::write(
        dir.join("root/etc/metrica/release.toml"),
        "name = \"m\"\nversion = \"1.0.0\"\ncompatible = \"metrica-test\"\nbuild_epoch = 1\n",
    )
    .unwrap();
    let state = updater::state::State::new(Slot::A, Some("1.0.0".parse().unwrap()));
    updater::state::save(&updater::state::state_path(&dir.join("data")), &state).unwrap();
}

/// Installs a fresh two-image bundle with stderr a pipe (what `Command::output` gives).
fn install(extra: &[&str]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
    fixture(d, &key);
    let boot = fat(MIB, &[("cmdline.txt", b"console=ttyAMA0 root=PARTUUID=0 ro\n")]);
    let root = test_image(900_000, 3);
    let images = [(SlotClass::Boot, &boot[..]), (SlotClass::Root, &root[..])];
    std::fs::write(d.join("v2.mfb"), make_bundle(&TestMeta::default(), &images, Some(&key)))
        .unwrap();
    let arg = |p: &str| d.join(p).display().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_updater"))
        .args(["--disk", &arg("disk.img"), "--data-dir", &arg("data")])
        .args(["--keyring", &arg("keyring"), "--sysroot", &arg("root")])
        .args(["install", &arg("v2.mfb")])
        .args(extra)
        // Even a terminal type that could draw a bar does not make a pipe a terminal.
        .env("TERM", "xterm-256color")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}\n{stderr}", out.status);
    out
}

#[test]
fn progress_on_a_pipe_is_plain_lines() {
    let out = install(&[]);
    let text = String::from_utf8(out.stderr).unwrap();
    assert!(!text.contains('\r'), "a redrawn bar on a pipe: {text:?}");
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("bundle metrica-test 2.0.0, signed by key "), "{text}");
    for want in ["boot: writing 1.0 MiB to boot_b", "root: 100% (0.9 of 0.9 MiB)"] {
        assert!(lines.contains(&want), "{want:?} in {text}");
    }
    assert!(lines.iter().any(|l| l.starts_with("root: verified, sha256 ")), "{text}");
    assert!(lines.contains(&"cmdline.txt on boot_b names the new root"), "{text}");
    assert!(lines.contains(&"installed 2.0.0"), "{text}");
    // At most one line per tenth of each image, not one per chunk.
    let written = lines.iter().filter(|l| l.contains("% (")).count();
    assert!((2..=22).contains(&written), "{written} progress lines: {text}");
}

#[test]
fn progress_json_gives_one_event_per_line() {
    let out = install(&["--progress", "json"]);
    let text = String::from_utf8(out.stderr).unwrap();
    assert!(!text.contains('\r'), "{text:?}");
    let events: Vec<String> = text
        .lines()
        .filter(|l| l.contains("\"event\""))
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("{e}: {l}"))
        })
        .map(|v| v["event"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(events.first().map(String::as_str), Some("verified"), "{text}");
    assert!(events.iter().any(|e| e == "written"), "{text}");
    assert!(events.contains(&"finished".to_string()), "{text}");
}
