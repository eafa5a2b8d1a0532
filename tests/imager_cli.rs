//! End to end: the `imager` command line as a provisioning engineer and a fleet operator meet
//! it (issue 18): one error style, `inspect` telling what it was given, `--help` naming only
//! flags that exist, the rollback in one command, `--json` shapes (docs/cli-json.md).

mod common;

use common::{golden, site};

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn imager() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_imager"));
    c.stdin(Stdio::null());
    c
}

fn run(args: &[&std::ffi::OsStr]) -> Output {
    imager().args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs `imager ARGS` expecting failure with exit code 1; returns stderr.
fn fails(args: &[&dyn AsRef<std::ffi::OsStr>]) -> String {
    let out = imager().args(args.iter().map(|a| a.as_ref())).output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    // Progress lines may come first; the error is the last thing said.
    let at = err.find("imager: error: ").unwrap_or_else(|| panic!("no error line in {err}"));
    assert_eq!(err[at..].matches("imager: error: ").count(), 1, "{err}");
    err[at..].to_string()
}

/// Runs `imager ARGS` expecting success; returns stdout.
fn ok(args: &[&dyn AsRef<std::ffi::OsStr>]) -> String {
    let out = imager().args(args.iter().map(|a| a.as_ref())).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn errors_have_one_style_and_each_cause_once() {
    // clap's own errors carry the program's prefix and exit 2.
    let out = run(&["inspect".as_ref(), "--nope".as_ref()]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.starts_with("imager: error: unexpected argument '--nope'"), "{err}");
    assert_eq!(err.matches("error:").count(), 1, "{err}");
    let out = run(&["frobnicate".as_ref()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).starts_with("imager: error: unrecognized subcommand"), "{}", stderr(&out));
    // No subcommand: the help, not an error line; exit 2.
    let out = run(&["channel".as_ref()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("Usage: imager channel <COMMAND>"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("error:"), "{}", stderr(&out));
    // --help and --version still print and succeed.
    assert!(run(&["--version".as_ref()]).status.success());
    assert!(run(&["inspect".as_ref(), "--help".as_ref()]).status.success());

    // An OS error is said once.
    let err = fails(&[&"inspect", &"nonexist"]);
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    assert!(err.contains("nonexist"), "{err}");
}

#[test]
fn inspect_tells_what_it_was_given() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = golden(d);

    // Refused by name: a folder, an empty file, a CSV, a TOML file, random bytes.
    let err = fails(&[&"inspect", &d]);
    assert!(err.contains("is a folder; inspect reads an image (.img, .img.zst)"), "{err}");
    std::fs::write(d.join("empty.img"), b"").unwrap();
    assert!(fails(&[&"inspect", &d.join("empty.img")]).contains("is an empty file"));
    std::fs::write(d.join("fleet.csv"), "device_id,hostname\npi-1,cam-1\n").unwrap();
    let err = fails(&[&"inspect", &d.join("fleet.csv")]);
    assert!(err.contains("fleet.csv is a CSV file"), "{err}");
    assert!(!err.contains("GPT"), "{err}");
    std::fs::write(d.join("qemu.toml"), "name = \"x\"\n").unwrap();
    assert!(fails(&[&"inspect", &d.join("qemu.toml")]).contains("is a TOML text file"));
    std::fs::write(d.join("noise.bin"), [7u8; 600]).unwrap();
    assert!(fails(&[&"inspect", &d.join("noise.bin")])
        .contains("is none of the files the imager reads"));

    // The image, raw and compressed: the same partitions.
    let raw: serde_json::Value = serde_json::from_str(&ok(&[&"inspect", &img, &"--json"])).unwrap();
    assert_eq!(raw["kind"], "image");
    let zst = d.join("fleet-1.0.0.img.zst");
    let text = ok(&[&"inspect", &zst]);
    assert!(text.contains("provision") && text.contains("MiB"), "{text}");
    assert!(text.starts_with(&format!("{}: a compressed disk image", zst.display())), "{text}");
    let z: serde_json::Value = serde_json::from_str(&ok(&[&"inspect", &zst, &"--json"])).unwrap();
    assert_eq!(z["kind"], "zst-image");
    assert_eq!(z["partitions"], raw["partitions"]);
    assert_eq!(z["size"], raw["size"]);
    assert!(z["compressed_size"].as_u64().unwrap() < raw["size"].as_u64().unwrap());

    // A truncated .img.zst is blamed on the zstd stream.
    let bytes = std::fs::read(&zst).unwrap();
    let cut = d.join("cut.img.zst");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = fails(&[&"inspect", &cut]);
    assert!(err.contains("cut.img.zst: the zstd stream is truncated or corrupt"), "{err}");
    assert!(!err.contains("GPT"), "{err}");

    // The block map.
    let bmap = d.join("fleet-1.0.0.bmap");
    assert!(ok(&[&"inspect", &bmap]).contains("block map"));
    let b: serde_json::Value = serde_json::from_str(&ok(&[&"inspect", &bmap, &"--json"])).unwrap();
    assert_eq!(b["kind"], "bmap");
    assert_eq!(b["image_size"], raw["size"]);
    assert!(b["mapped_bytes"].as_u64().unwrap() > 0);
    let err = fails(&[&"inspect", &bmap, &"--cat", &"boot_a:/cmdline.txt"]);
    assert!(err.contains("is a block map, not a disk image"), "{err}");

    // A build manifest.
    let manifest = d.join("fleet-1.0.0.manifest.json");
    std::fs::write(
        &manifest,
        r#"{"name":"fleet","version":"1.0.0","compatible":"fleet","security_epoch":0,
            "source_date_epoch":0,"recipe_sha256":"00","packages":[],"root_files":1,
            "root_content_bytes":1,"partitions":[{"number":1,"label":"config","start":1048576,
            "size":4194304,"partuuid":"x","sha256":"ab"}]}"#,
    )
    .unwrap();
    let text = ok(&[&"inspect", &manifest]);
    assert!(text.contains("build manifest") && text.contains("4.0 MiB"), "{text}");
    let m: serde_json::Value =
        serde_json::from_str(&ok(&[&"inspect", &manifest, &"--json"])).unwrap();
    assert_eq!(m["kind"], "build-manifest");
    assert_eq!(m["manifest"]["version"], "1.0.0");
}

#[test]
fn inspect_bundle_json() {
    use updater::bundle::testkit::{make_bundle, test_image, TestMeta};
    let dir = tempfile::tempdir().unwrap();
    let pair = imager::keys::generate(&dir.path().join("keys"), "fleet").unwrap();
    let key = imager::keys::load_signing_key(&pair.private).unwrap();
    let meta = TestMeta {
        compatible: "fleet".into(),
        version: "1.2.0".parse().unwrap(),
        security_epoch: 0,
    };
    let img = test_image(20_000, 5);
    let b = make_bundle(&meta, &[(updater::bundle::SlotClass::Root, &img[..])], Some(&key));
    let path = dir.path().join("fleet-1.2.0.mfb");
    std::fs::File::create(&path).unwrap().write_all(&b).unwrap();
    let out = ok(&[&"inspect", &path, &"--json", &"--keyring", &dir.path().join("keys")]);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["kind"], "bundle");
    assert_eq!(j["manifest"]["version"], "1.2.0");
    assert_eq!(j["signature"]["status"], "valid");
    assert_eq!(j["images"][0]["size"], 20_000);
    // The text report: IEC units for people.
    let text = ok(&[&"inspect", &path]);
    assert!(text.contains("image       root 19.5 KiB sha256"), "{text}");
    assert!(text.contains("version     1.2.0"), "{text}");
    // --keyring takes one key file too: the public key, or a private key's public half.
    for file in [&pair.public, &pair.private] {
        let out = ok(&[&"inspect", &path, &"--json", &"--keyring", file]);
        let j: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(j["signature"]["status"], "valid", "{}", file.display());
    }
    let other = imager::keys::generate(&dir.path().join("other"), "x").unwrap();
    let err = fails(&[&"inspect", &path, &"--keyring", &other.public]);
    assert!(err.contains("the signature is not valid for the keyring"), "{err}");
    let err = fails(&[&"inspect", &path, &"--keyring", &path]);
    assert!(err.contains("expected a keyring folder (of *.pub.pem files), a public key"), "{err}");
}

/// Every subcommand's --help, recursively: each `--flag` it names exists.
#[test]
fn every_flag_named_in_help_exists() {
    common::help::every_flag_named_in_help_exists(Path::new(env!("CARGO_BIN_EXE_imager")), 15, 100);
}

#[test]
fn flash_nobmap_bundles_and_truncated_zst() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = golden(d);
    let zst = d.join("fleet-1.0.0.img.zst");

    // --nobmap: the whole image, read back; the same bytes as the image, from .img and .img.zst.
    std::fs::remove_file(d.join("fleet-1.0.0.bmap")).unwrap();
    let err = fails(&[&"flash", &img, &d.join("card.img"), &"-y"]);
    assert!(err.contains("no block map found") && err.contains("--bmap FILE"), "{err}");
    for (src, card) in [(&img, d.join("card1.img")), (&zst, d.join("card2.img"))] {
        let out = ok(&[&"flash", src, &card, &"-y", &"--nobmap", &"--json"]);
        let j: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(j["image_size"], j["mapped_bytes"], "every byte is written");
        assert!(j["verify_seconds"].is_number(), "read back: {j}");
        assert_eq!(common::sha256(&card), common::sha256(&img));
    }
    let out = run(&["flash".as_ref(), "--nobmap".as_ref(), "--bmap".as_ref(), "x".as_ref()]);
    assert_eq!(out.status.code(), Some(2), "--nobmap and --bmap conflict");

    // A bundle, a block map, a CSV: said what they are, nothing written.
    let mfb = d.join("os.mfb");
    std::fs::write(&mfb, b"manifest.toml\0\0\0").unwrap();
    let err = fails(&[&"flash", &mfb, &d.join("card3.img"), &"-y"]);
    assert!(err.contains("os.mfb is an OS bundle (.mfb); flash writes a disk image"), "{err}");
    assert!(err.contains("updater install"), "{err}");
    std::fs::write(d.join("fleet.csv"), "device_id,hostname\n").unwrap();
    let err = fails(&[&"flash", &d.join("fleet.csv"), &d.join("card3.img"), &"-y"]);
    assert!(err.contains("is a CSV file"), "{err}");
    assert!(!d.join("card3.img").exists(), "nothing written");

    // A truncated .img.zst is blamed on the zstd stream, not on the block map.
    let bytes = std::fs::read(&zst).unwrap();
    let cut = d.join("cut.img.zst");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = fails(&[&"flash", &cut, &d.join("card4.img"), &"-y", &"--nobmap"]);
    assert!(err.contains("the zstd stream is truncated or corrupt"), "{err}");
    imager::output::write_bmap(&img, &d.join("fleet-1.0.0.bmap")).unwrap();
    let err = fails(&[
        &"flash",
        &cut,
        &d.join("card5.img"),
        &"-y",
        &"--bmap",
        &d.join("fleet-1.0.0.bmap"),
    ]);
    assert!(err.contains("the zstd stream is truncated or corrupt"), "{err}");
    assert!(!err.contains("does not match its block map"), "{err}");
}

#[test]
fn provision_reports_every_problem_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = golden(d);
    let site = site(d);
    let fleet = site.join("fleet.csv");

    // Four missing fields, four lines, one run; each hint names the flag, the column, the file.
    std::fs::write(site.join("empty.toml"), "").unwrap();
    let err = fails(&[
        &"provision",
        &img,
        &"--check",
        &"--device",
        &site.join("empty.toml"),
        &"--device-id",
        &"pi-1",
        &"--hostname",
        &"cam-1",
    ]);
    for field in ["role", "segment", "channel.name", "channel.url"] {
        assert!(err.contains(&format!("{field}: missing; give it as --")), "{field} in {err}");
    }
    assert!(
        err.contains(
            "--channel-url (or a channel_url column with --batch) or channel.url in --device FILE"
        ),
        "{err}"
    );

    // An unknown key hides nothing: file, line, table, did-you-mean, and the missing url too.
    std::fs::write(
        site.join("typo.toml"),
        "role = \"camera-single\"\nsegment = \"canary\"\n[channel]\nname = \"stable\"\nulr = \"https://x.example\"\n",
    )
    .unwrap();
    let err = fails(&[
        &"provision",
        &img,
        &"--check",
        &"--device",
        &site.join("typo.toml"),
        &"--device-id",
        &"pi-1",
        &"--hostname",
        &"cam-1",
    ]);
    assert!(
        err.contains("typo.toml: line 5: [channel]: unknown key \"ulr\"; did you mean \"url\"?"),
        "{err}"
    );
    assert!(err.contains("channel.url: missing"), "{err}");
    assert_eq!(err.matches("typo.toml: line 5").count(), 1, "the cause once: {err}");

    // Every misspelled column, with did-you-mean; duplicate host names, in --check.
    std::fs::write(&fleet, "device_id,hostnme,segmnt\npi-1,cam-1,canary\n").unwrap();
    let tmpl = site.join("device.toml");
    let check_batch =
        || fails(&[&"provision", &img, &"--check", &"--batch", &fleet, &"--device", &tmpl]);
    let err = check_batch();
    assert!(err.contains("\"hostnme\" is not a known column; did you mean \"hostname\"?"), "{err}");
    assert!(err.contains("\"segmnt\" is not a known column; did you mean \"segment\"?"), "{err}");
    std::fs::write(&fleet, "device_id,hostname\npi-1,cam-1\npi-2,cam-2\npi-3,cam-1\n").unwrap();
    let err = check_batch();
    assert!(
        err.contains(
            "row 3 (line 4), column hostname: \"cam-1\" is already the host name of row 1 (line 2)"
        ),
        "{err}"
    );

    // --check --json: the devices, nothing written.
    std::fs::write(&fleet, "device_id,hostname\npi-1,cam-1\npi-2,cam-2\n").unwrap();
    let out =
        ok(&[&"provision", &img, &"--check", &"--json", &"--batch", &fleet, &"--device", &tmpl]);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["checked"], true);
    assert_eq!(j["devices"][1]["hostname"], "cam-2");
    assert_eq!(j["written"].as_array().unwrap().len(), 0);
}

#[test]
fn provision_to_a_folder_counts_refuses_overwriting_and_compresses() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = golden(d);
    let site = site(d);
    let fleet = site.join("fleet.csv");
    std::fs::write(&fleet, "device_id,hostname\npi-1,cam-1\npi-2,cam-2\n").unwrap();
    let tmpl = site.join("device.toml");
    let out_dir = d.join("out");
    let args = |extra: &[&dyn AsRef<std::ffi::OsStr>]| {
        let mut c = imager();
        c.arg("provision").arg(&img).arg("--batch").arg(&fleet).arg("--device").arg(&tmpl);
        c.arg("-o").arg(&out_dir);
        c.args(extra.iter().map(|a| a.as_ref()));
        c.output().unwrap()
    };
    let out = args(&[&"--json"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("1 of 2: wrote") && err.contains("2 of 2: wrote"), "{err}");
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["written"][0]["device_id"], "pi-1");
    let first = out_dir.join("fleet-1.0.0-pi-1.img");
    assert_eq!(j["written"][0]["image"], first.display().to_string());
    let before = common::sha256(&first);

    // Again: refused, both named, nothing touched; --force replaces.
    std::fs::write(&fleet, "device_id,hostname\npi-1,cam-9\npi-2,cam-2\n").unwrap();
    let out = args(&[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(
            "2 of the per-device images exist already, nothing written (--force replaces them)"
        ),
        "{err}"
    );
    assert_eq!(common::sha256(&first), before);
    let out = args(&[&"--force"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_ne!(common::sha256(&first), before);

    // --zstd: .img.zst (and its bmap), which inspect reads.
    let out = args(&[&"--zstd"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let zst = out_dir.join("fleet-1.0.0-pi-2.img.zst");
    let j: serde_json::Value = serde_json::from_str(&ok(&[&"inspect", &zst, &"--json"])).unwrap();
    assert_eq!(j["kind"], "zst-image");
    assert_eq!(j["provision"]["hostname"], "cam-2");
    assert!(out_dir.join("fleet-1.0.0-pi-2.bmap").exists());

    // A truncated .img.zst: blamed on zstd, no per-device image left behind.
    let bytes = std::fs::read(d.join("fleet-1.0.0.img.zst")).unwrap();
    let cut = d.join("cut.img.zst");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let cut_out = d.join("cut-out");
    let err = fails(&[
        &"provision",
        &cut,
        &"--bmap",
        &d.join("fleet-1.0.0.bmap"),
        &"--batch",
        &fleet,
        &"--device",
        &tmpl,
        &"-o",
        &cut_out,
    ]);
    assert!(err.contains("cut.img.zst: the zstd stream is truncated or corrupt"), "{err}");
    let left = std::fs::read_dir(&cut_out).map_or(0, |r| r.count());
    assert_eq!(left, 0, "nothing written");
}

/// A signed test bundle of `version` at DIR/NAME.
fn bundle(dir: &Path, name: &str, version: &str) -> PathBuf {
    use updater::bundle::testkit::{make_bundle, test_image, TestMeta};
    let key = imager::keys::load_signing_key(&dir.join("keys/fleet.key")).unwrap();
    let meta = TestMeta {
        compatible: "fleet".into(),
        version: version.parse().unwrap(),
        security_epoch: 0,
    };
    let img = test_image(20_000, 5);
    let b = make_bundle(&meta, &[(updater::bundle::SlotClass::Root, &img[..])], Some(&key));
    let path = dir.join(name);
    std::fs::write(&path, b).unwrap();
    path
}

/// The 3 a.m. procedure of docs/channels.md, from a folder that never held the old version:
/// pause, pin the old bundle in one command, check; and every step's --json.
#[test]
fn rollback_in_one_command_and_publish_json() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let keys = d.join("keys");
    let k: serde_json::Value =
        serde_json::from_str(&ok(&[&"keygen", &"--dir", &keys, &"--name", &"fleet", &"--json"]))
            .unwrap();
    assert_eq!(k["private"], keys.join("fleet.key").display().to_string());
    assert_eq!(k["key_id"].as_str().unwrap().len(), 16);
    let old = bundle(d, "fleet-1.0.0.mfb", "1.0.0");
    let new = bundle(d, "fleet-1.1.0.mfb", "1.1.0");
    let www = d.join("www");
    let key = keys.join("fleet.key");
    let target: [&dyn AsRef<std::ffi::OsStr>; 6] =
        [&"--folder", &www, &"--channel", &"stable", &"--key", &key];
    let with = |cmd: &[&dyn AsRef<std::ffi::OsStr>], extra: &[&dyn AsRef<std::ffi::OsStr>]| {
        let all = cmd.iter().chain(&target).chain(extra);
        all.map(|a| a.as_ref().to_os_string()).collect::<Vec<_>>()
    };
    let ok = |v: Vec<std::ffi::OsString>| ok(&v.iter().map(|a| a as _).collect::<Vec<_>>());
    let fails = |v: Vec<std::ffi::OsString>| fails(&v.iter().map(|a| a as _).collect::<Vec<_>>());

    // Publish 1.1.0 (the folder never saw 1.0.0): the bundle is world-readable like the channel.
    let out = ok(with(&[&"publish", &new], &[&"--percent", &"100", &"--json"]));
    let p: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(p["channel"]["sequence"], 1);
    assert_eq!(p["channel"]["os"]["version"], "1.1.0");
    let published = PathBuf::from(p["bundle"].as_str().unwrap());
    let mode = |f: &Path| std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&published), 0o644);
    assert_eq!(mode(Path::new(p["document"].as_str().unwrap())), 0o644);

    // Publishing the older one says the one command that works.
    let err = fails(with(&[&"publish", &old], &[&"--percent", &"100"]));
    assert!(err.contains("imager channel pin --folder") && err.contains("--bundle"), "{err}");
    // --version alone: not among the published bundles; the error says what to give.
    let err = fails(with(&[&"channel", &"pin"], &[&"--version", &"1.0.0", &"--reason", &"x"]));
    assert!(err.contains("no bundle of version 1.0.0") && err.contains("--bundle FILE"), "{err}");

    // The procedure: pause, pin the old bundle (archived into bundles/), show.
    let out = ok(with(&[&"channel", &"pause"], &[&"--json"]));
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap()["channel"]["paused"], true);
    let out = ok(with(
        &[&"channel", &"pin"],
        &[&"--bundle", &old, &"--reason", &"regression", &"--json"],
    ));
    let pin: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(pin["channel"]["pin"]["version"], "1.0.0");
    assert_eq!(pin["channel"]["pin"]["urls"][0], "../bundles/fleet-1.0.0.mfb");
    let archived = www.join("bundles/fleet-1.0.0.mfb");
    assert_eq!(common::sha256(&archived), common::sha256(&old));
    assert_eq!(mode(&archived), 0o644);
    // Once archived, --version finds it among the published versions.
    ok(with(&[&"channel", &"unpin"], &[]));
    ok(with(&[&"channel", &"pin"], &[&"--version", &"1.0.0", &"--reason", &"again"]));
    let err = fails(with(
        &[&"channel", &"pin"],
        &[&"--bundle", &new, &"--version", &"1.0.0", &"--reason", &"x"],
    ));
    assert!(err.contains("holds version 1.1.0, not 1.0.0"), "{err}");

    let show = ok(vec![
        "channel".into(),
        "show".into(),
        "--folder".into(),
        www.clone().into_os_string(),
        "--channel".into(),
        "stable".into(),
        "--keyring".into(),
        keys.into_os_string(),
        "--json".into(),
    ]);
    let s: serde_json::Value = serde_json::from_str(&show).unwrap();
    assert_eq!(s["signature"]["valid"], true);
    assert_eq!(s["channel"]["pin"]["version"], "1.0.0");
    assert_eq!(s["channel"]["paused"], true);
}

#[test]
fn recipient_from_otp_key_identity_and_status() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let otp = [9u8; 32];
    let want = updater::provision::identity::recipient_from_otp_key(&otp);
    std::fs::write(d.join("otp.bin"), otp).unwrap();
    assert_eq!(ok(&[&"recipient", &"--otp-key", &d.join("otp.bin")]).trim(), want);
    let id = updater::provision::identity::from_otp_key(&otp);
    let text = updater::provision::identity::identity_file_text(
        &id,
        updater::provision::identity::Source::Otp,
    );
    std::fs::write(d.join("age.key"), text).unwrap();
    let j: serde_json::Value =
        serde_json::from_str(&ok(&[&"recipient", &"--identity", &d.join("age.key"), &"--json"]))
            .unwrap();
    assert_eq!(
        (j["recipient"].as_str(), j["from"].as_str()),
        (Some(want.as_str()), Some("identity"))
    );
    std::fs::write(
        d.join("status.json"),
        format!("{{\"provisioning\":{{\"recipient\":\"{want}\"}}}}"),
    )
    .unwrap();
    assert_eq!(ok(&[&"recipient", &"--status", &d.join("status.json")]).trim(), want);
    // Wrong kinds of file say what they got and what was expected; two sources are refused.
    std::fs::write(d.join("fleet.csv"), "device_id,hostname\n").unwrap();
    let err = fails(&[&"recipient", &"--otp-key", &d.join("fleet.csv")]);
    assert!(err.contains("expected an OTP private key"), "{err}");
    assert!(fails(&[&"recipient", &"--status", &d.join("fleet.csv")]).contains("not JSON"));
    let out = run(&[
        "recipient".as_ref(),
        "--otp-key".as_ref(),
        "a".as_ref(),
        "--identity".as_ref(),
        "b".as_ref(),
    ]);
    assert_eq!(out.status.code(), Some(2));
}

/// Each command given the wrong kind of file says what it got and what it expected, and
/// writes nothing.
#[test]
fn wrong_kinds_of_file_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("fleet.csv"), "device_id,hostname\npi-1,cam-1\n").unwrap();
    std::fs::write(d.join("empty.img"), b"").unwrap();
    std::fs::write(d.join("os.mfb"), b"manifest.toml\0").unwrap();
    let out = d.join("out");
    let cases: [(&[&dyn AsRef<std::ffi::OsStr>], &str); 7] = [
        (&[&"build", &d.join("fleet.csv"), &"-o", &out], "is a CSV file (a provisioning fleet file? `imager provision --batch` reads it); build reads a recipe (.toml)"),
        (&[&"build", &d, &"-o", &out], "is a folder; build reads a recipe"),
        (&[&"build", &d.join("os.mfb"), &"-o", &out], "os.mfb is an OS bundle (.mfb); build reads a recipe"),
        (&[&"bundle", &d.join("fleet.csv"), &"--key", &"k", &"-o", &out], "is a CSV file (a provisioning fleet file? `imager provision --batch` reads it); bundle reads a disk image"),
        (&[&"provision", &d.join("os.mfb"), &"--device-id", &"a", &"--check"], "os.mfb is an OS bundle (.mfb); provision reads a disk image"),
        (&[&"publish", &d.join("empty.img"), &"--folder", &out, &"--channel", &"s", &"--key", &"k", &"--percent", &"1"], "empty.img is an empty file; publish reads an OS bundle (.mfb)"),
        (&[&"channel", &"pin", &"--bundle", &d.join("fleet.csv"), &"--folder", &out, &"--channel", &"s", &"--key", &"k", &"--reason", &"r"], "is a CSV file (a provisioning fleet file? `imager provision --batch` reads it); --bundle takes an OS bundle"),
    ];
    for (args, want) in cases {
        let err = fails(args);
        assert!(err.contains(want), "want {want:?} in {err}");
    }
    assert!(!out.exists(), "nothing written");
}
