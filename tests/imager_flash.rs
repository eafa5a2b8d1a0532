//! End to end: `imager flash` as a user runs it: the confirmation rule (no terminal and no
//! `--yes`: refused, nothing written), the summary with MiB/s, `--json`, and a `.img.zst`.

mod common;

use common::{golden, sha256, site};
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
        stderr.contains("written") && stderr.contains("MiB/s") && stderr.contains("verified"),
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

/// `imager flash` on a terminal (a pty from util-linux `script`, which feeds it `answer`):
/// returns the exit code and everything the terminal showed.
fn flash_on_a_terminal(img: &Path, target: &Path, answer: &str) -> (Option<i32>, String) {
    use std::io::Write as _;
    let cmd =
        format!("{} flash {} {}", env!("CARGO_BIN_EXE_imager"), img.display(), target.display());
    let mut child = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("util-linux script (Debian bsdutils, essential)");
    child.stdin.take().unwrap().write_all(answer.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The question on a terminal: sizes in IEC units, and only the exact word `yes` writes.
#[test]
fn the_terminal_prompt_takes_only_the_exact_yes() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let target = dir.path().join("card.img");
    std::fs::File::create(&target).unwrap().set_len(32 << 20).unwrap();
    let before = sha256(&target);
    for answer in ["y\n", "YES\n", "yes please\n", "\n"] {
        let (code, shown) = flash_on_a_terminal(&img, &target, answer);
        assert!(shown.contains("file") && shown.contains("(32.0 MiB) with"), "{shown}");
        assert!(shown.contains("Type yes to write"), "{shown}");
        assert!(shown.contains("not confirmed: nothing written"), "{answer:?}: {shown}");
        assert_eq!(code, Some(1), "{answer:?}: {shown}");
        assert_eq!(sha256(&target), before, "{answer:?} wrote to the target");
    }
    let (code, shown) = flash_on_a_terminal(&img, &target, "yes\n");
    assert_eq!(code, Some(0), "{shown}");
    assert!(shown.contains("verified"), "{shown}");
    let written = std::fs::read(&target).unwrap();
    assert_eq!(&written[..16 << 20], &std::fs::read(&img).unwrap()[..]);
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

#[test]
fn flash_and_provision_in_one_pass_then_inspect() {
    let dir = tempfile::tempdir().unwrap();
    let card = dir.path().join("card.img");
    flash_provision_inspect(dir.path(), &card);
}

/// A card (a loop device: root only, the privileged tier) flashed and provisioned in one pass,
/// then inspected as a block device: `imager inspect` says it was given a card and reads its
/// partitions and provisioning like an image file's.
#[test]
#[ignore = "needs root and loop devices: run with --ignored"]
fn a_card_on_a_loop_device_is_flashed_provisioned_and_inspected() {
    assert!(nix::unistd::Uid::effective().is_root(), "the loop device test needs root");
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("loop-backing.img");
    std::fs::File::create(&backing).unwrap().set_len(128 << 20).unwrap();
    let out = Command::new("losetup").args(["--find", "--show"]).arg(&backing).output().unwrap();
    assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
    let dev = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    struct Detach(PathBuf);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
        }
    }
    let _detach = Detach(dev.clone());
    flash_provision_inspect(dir.path(), &dev);
    let out = imager().arg("inspect").arg(&dev).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with(&format!("{}: a block device\n", dev.display())), "{text}");
    assert!(text.contains("provision") && text.contains("root_a"), "{text}");
    let out = imager().arg("inspect").arg(&dev).arg("--json").output().unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["kind"], "card");
    assert_eq!(json["size"], 128u64 << 20, "a card's size is its capacity");
}

/// Flashes the golden image to `target` (a file or a block device) with a device's
/// provisioning in the same pass, then checks what `imager inspect` reads back.
fn flash_provision_inspect(dir: &Path, card: &Path) {
    let img = golden(dir);
    let site = site(dir);
    let recipient = updater::provision::identity::recipient_from_otp_key(&[9; 32]);
    let out = imager()
        .arg("flash")
        .arg(&img)
        .arg(card)
        .arg("--yes")
        .arg("--device")
        .arg(site.join("device.toml"))
        .args(["--device-id", "pi-0042", "--hostname", "cam-0042"])
        .arg("--authorized-keys")
        .arg(site.join("ops.pub"))
        .arg("--secrets")
        .arg(site.join("secrets.toml"))
        .args(["--recipient", &recipient])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("provision partition written and verified"), "{stderr}");

    let out = imager().arg("inspect").arg(card).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for want in [
        "device_id:   pi-0042",
        "hostname:    cam-0042",
        "segment:     canary",
        "secrets.age (encrypted; content not shown)",
        "valid:       yes",
    ] {
        assert!(text.contains(want), "{want:?} in:\n{text}");
    }
    let card_bytes = std::fs::read(card).unwrap();
    assert!(
        !text.contains("s3cr3t") && !card_bytes.windows(6).any(|w| w == b"s3cr3t"),
        "no plain secret anywhere"
    );
    let out = imager().arg("inspect").arg(card).arg("--json").output().unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["provision"]["device_id"], "pi-0042");
}

#[test]
fn provision_batches_validate_every_row_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let img = golden(dir.path());
    let site = site(dir.path());
    let tmpl = site.join("device.toml");
    let fleet = site.join("fleet.csv");
    std::fs::write(
        &fleet,
        "device_id,hostname,authorized_keys\ncam-1,cam-1,ops.pub\ncam-2,cam-2,\n",
    )
    .unwrap();

    // --check: validates, writes nothing.
    let out = imager()
        .arg("provision")
        .arg(&img)
        .arg("--batch")
        .arg(&fleet)
        .arg("--device")
        .arg(&tmpl)
        .arg("--check")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().next(), Some("device_id\thostname\tfrom"), "a header line");
    assert_eq!(stdout.lines().count(), 3, "{stdout}");

    // A bad row anywhere: nothing written, every problem named.
    std::fs::write(&fleet, "device_id,hostname,authorized_keys\ncam-1,cam-1,ops.pub\ncam-2,cam_2,missing.pub\ncam-1,cam-3,\n").unwrap();
    let outdir = dir.path().join("out");
    let out = imager()
        .arg("provision")
        .arg(&img)
        .arg("--batch")
        .arg(&fleet)
        .arg("--device")
        .arg(&tmpl)
        .arg("-o")
        .arg(&outdir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    for want in [
        "3 problems found, nothing written",
        "fleet.csv: row 2 (line 3), column hostname: \"cam_2\" is not a valid host name",
        "fleet.csv: row 2 (line 3), column authorized_keys: cannot read",
        "fleet.csv: row 3 (line 4), column device_id: \"cam-1\" is already the device_id of row 1 (line 2)",
    ] {
        assert!(stderr.contains(want), "{want:?} in:\n{stderr}");
    }
    assert!(!outdir.exists(), "nothing written");

    // Good rows into per-device images.
    std::fs::write(
        &fleet,
        "device_id,hostname,authorized_keys\ncam-1,cam-1,ops.pub\ncam-2,cam-2,\n",
    )
    .unwrap();
    let out = imager()
        .arg("provision")
        .arg(&img)
        .arg("--batch")
        .arg(&fleet)
        .arg("--device")
        .arg(&tmpl)
        .arg("-o")
        .arg(&outdir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for id in ["cam-1", "cam-2"] {
        let out = imager()
            .arg("inspect")
            .arg(outdir.join(format!("fleet-1.0.0-{id}.img")))
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("device_id:   {id}")));
    }

    // Card after card needs a terminal; a batch needs somewhere to go.
    let out = imager()
        .arg("provision")
        .arg(&img)
        .arg(dir.path().join("card.img"))
        .arg("--batch")
        .arg(&fleet)
        .arg("--device")
        .arg(&tmpl)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("card after card needs a terminal"), "{stderr}");
    assert!(!dir.path().join("card.img").exists());
    let out = imager()
        .arg("provision")
        .arg(&img)
        .arg("--batch")
        .arg(&fleet)
        .arg("--device")
        .arg(&tmpl)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("give one of them"));

    // One device in place on the image file.
    let out = imager()
        .arg("provision")
        .arg(&img)
        .arg("--device")
        .arg(&tmpl)
        .args(["--device-id", "solo", "--hostname", "solo"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = imager().arg("inspect").arg(&img).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("device_id:   solo"));
}

/// An image built by `imager build` (the mini recipe): its `.img.zst` flashed and provisioned
/// onto a larger "card" in one pass, then inspected; the card boots the same slots.
#[test]
fn a_built_image_flashed_and_provisioned_from_its_zst() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = common::mini_recipe(dir.path());
    let out = dir.path().join("out");
    common::run(
        Command::new(env!("CARGO_BIN_EXE_imager"))
            .env("SOURCE_DATE_EPOCH", "1700000000")
            .arg("build")
            .arg(&recipe)
            .arg("-o")
            .arg(&out),
    );
    let img = out.join("mini-1.0.0.img");
    let site = site(dir.path());
    let card = dir.path().join("card.img");
    let img_len = std::fs::metadata(&img).unwrap().len();
    std::fs::File::create(&card).unwrap().set_len(img_len + (64 << 20)).unwrap();
    let out = imager()
        .arg("flash")
        .arg(img.with_extension("img.zst"))
        .arg(&card)
        .arg("-y")
        .arg("--device")
        .arg(site.join("device.toml"))
        .args(["--device-id", "mini-1", "--hostname", "mini-1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        std::fs::metadata(&card).unwrap().len(),
        img_len + (64 << 20),
        "a card keeps its size"
    );
    let text = String::from_utf8(common::run(imager().arg("inspect").arg(&card)).stdout).unwrap();
    for want in ["committed slot: a", "mini 1.0.0", "device_id:   mini-1", "valid:       yes"] {
        assert!(text.contains(want), "{want:?} in:\n{text}");
    }
    // The image itself was not provisioned.
    let text = String::from_utf8(common::run(imager().arg("inspect").arg(&img)).stdout).unwrap();
    assert!(text.contains("(empty: not provisioned)"), "{text}");
}
