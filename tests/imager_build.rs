//! End to end: `imager build` on the mini recipe fixture: reproducible bytes, owners from
//! packages when built by an unprivileged user, bmaptool-valid block maps, `inspect`, and bad
//! recipes that fail cleanly without leaving an image behind.

mod common;

use common::{mini_recipe, run, sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

const EPOCH: &str = "1700000000";

fn imager() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_imager"));
    c.env("SOURCE_DATE_EPOCH", EPOCH);
    c
}

fn build(recipe: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    run(imager().arg("build").arg(recipe).arg("--output").arg(out).args(extra))
}

fn outputs(out: &Path, stem: &str) -> [PathBuf; 4] {
    ["img", "img.zst", "bmap", "manifest.json"].map(|ext| out.join(format!("{stem}.{ext}")))
}

#[test]
fn same_inputs_give_identical_images_in_different_folders() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = mini_recipe(dir.path());
    let (a, b) = (dir.path().join("out-a"), dir.path().join("elsewhere/out-b"));
    build(&recipe, &a, &[]);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    build(&recipe, &b, &[]);
    for (x, y) in outputs(&a, "mini-1.0.0").iter().zip(outputs(&b, "mini-1.0.0").iter()) {
        assert!(x.is_file(), "{} missing", x.display());
        if x.extension().is_some_and(|e| e == "bmap") {
            continue; // names the image file, otherwise identical
        }
        assert_eq!(sha256(x), sha256(y), "{} differs between builds", x.display());
    }
    // A different epoch changes the bytes: the test can fail.
    let c = dir.path().join("out-c");
    run(imager()
        .env("SOURCE_DATE_EPOCH", "1700000001")
        .arg("build")
        .arg(&recipe)
        .arg("-o")
        .arg(&c));
    assert_ne!(sha256(&a.join("mini-1.0.0.img")), sha256(&c.join("mini-1.0.0.img")));
}

/// Runs the build as an unprivileged user: `nobody` when the test runs as root, else the
/// (already unprivileged) current user.
#[test]
fn unprivileged_build_gives_root_owned_files_with_package_modes() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = mini_recipe(dir.path());
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let is_root = run(Command::new("id").arg("-u")).stdout == b"0\n";
    let mut cmd = if is_root {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o777)).unwrap();
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(env!("CARGO_BIN_EXE_imager"));
        c.env("TMPDIR", &out);
        c
    } else {
        Command::new(env!("CARGO_BIN_EXE_imager"))
    };
    run(cmd.env("SOURCE_DATE_EPOCH", EPOCH).arg("build").arg(&recipe).arg("-o").arg(&out));
    let img = out.join("mini-1.0.0.img");
    if is_root {
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&img).unwrap().uid(), 65534, "the build really ran as nobody");
    }
    let parts = updater::disk::read_partitions(&img).unwrap();
    let root_a = parts.iter().find(|p| p.label == "root_a").unwrap();
    let fs = imager::inspect::open_ext4(&img, root_a).unwrap();
    let m = fs.metadata("/bin/busybox").unwrap();
    assert_eq!(
        (m.uid(), m.gid(), m.mode() & 0o7777),
        (0, 0, 0o4755),
        "/bin/busybox keeps the package's owner and mode"
    );
    let m = fs.metadata("/etc/shadow").unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (0, 42, 0o640), "file layer owner and mode");
    let m = fs.metadata("/etc/motd").unwrap();
    assert_eq!(
        (m.uid(), m.gid(), m.mode() & 0o7777),
        (0, 0, 0o644),
        "overlay files are root-owned"
    );
    assert_eq!(fs.read("/bin/busybox").unwrap(), b"#!/bin/sh\necho mini busybox\n");
}

#[test]
fn inspect_shows_layout_slots_and_files_and_bmaptool_accepts_the_bmap() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = mini_recipe(dir.path());
    let out = dir.path().join("out");
    // --json: the report with exact bytes (docs/cli-json.md).
    let report: serde_json::Value =
        serde_json::from_slice(&build(&recipe, &out, &["--version", "2.1.0", "--json"]).stdout)
            .unwrap();
    let img = out.join("mini-2.1.0.img");
    assert_eq!(report["image"], img.display().to_string());
    assert_eq!(report["image_size"], std::fs::metadata(&img).unwrap().len());
    assert!(report["mapped_bytes"].as_u64().unwrap() < report["image_size"].as_u64().unwrap());
    // inspect tells each output for what it is.
    for (file, kind) in [
        ("mini-2.1.0.img.zst", "zst-image"),
        ("mini-2.1.0.bmap", "bmap"),
        ("mini-2.1.0.manifest.json", "build-manifest"),
    ] {
        let out = run(imager().arg("inspect").arg(out.join(file)).arg("--json")).stdout;
        let j: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(j["kind"], kind, "{file}");
    }
    let text = String::from_utf8(run(imager().arg("inspect").arg(&img)).stdout).unwrap();
    for label in ["config", "boot_a", "boot_b", "root_a", "root_b", "provision", "data"] {
        assert!(text.contains(label), "{label} missing from:\n{text}");
    }
    assert!(text.contains("committed slot: a"), "{text}");
    assert!(text.contains("mini 2.1.0"), "{text}");

    let info: serde_json::Value =
        serde_json::from_slice(&run(imager().arg("inspect").arg(&img).arg("--json")).stdout)
            .unwrap();
    let partuuid_b = info["partitions"][4]["partuuid"].as_str().unwrap().to_string();
    let cmdline_b =
        run(imager().arg("inspect").arg(&img).arg("--cat").arg("boot_b:/cmdline.txt")).stdout;
    assert_eq!(
        String::from_utf8(cmdline_b).unwrap(),
        format!("console=ttyAMA0 quiet root=PARTUUID={partuuid_b}\n"),
        "boot_b boots root_b"
    );
    let os_release =
        run(imager().arg("inspect").arg(&img).arg("--cat").arg("root_b:/etc/os-release")).stdout;
    assert!(String::from_utf8_lossy(&os_release).contains("VERSION_ID=2.1.0"));
    // --cat reads a .img.zst too (decompressed to a temporary file).
    let zst = out.join("mini-2.1.0.img.zst");
    let from_zst =
        run(imager().arg("inspect").arg(&zst).arg("--cat").arg("root_b:/etc/os-release")).stdout;
    assert_eq!(from_zst, os_release);
    // `imager bundle --json` (docs/cli-json.md).
    run(imager().args(["keygen", "--name", "k", "--dir"]).arg(dir.path().join("keys")));
    let bundle = run(imager()
        .arg("bundle")
        .arg(&img)
        .arg("--key")
        .arg(dir.path().join("keys/k.key"))
        .arg("-o")
        .arg(dir.path().join("os.mfb"))
        .arg("--json"))
    .stdout;
    let b: serde_json::Value = serde_json::from_slice(&bundle).unwrap();
    assert_eq!(b["manifest"]["version"], "2.1.0");
    assert_eq!(b["size"], std::fs::metadata(dir.path().join("os.mfb")).unwrap().len());
    assert_eq!(b["key_id"].as_str().map(str::len), Some(16));
    let initramfs =
        run(imager().arg("inspect").arg(&img).arg("--cat").arg("boot_a:/initramfs8")).stdout;
    assert_eq!(&initramfs[..2], &[0x1f, 0x8b], "gzip initramfs");
    let bad = imager().arg("inspect").arg(&img).arg("--cat").arg("root_c:/x").output().unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no partition \"root_c\""));

    // The real bmaptool copies the image with our bmap and checks every range's sha256.
    let copy = dir.path().join("copy.img");
    run(Command::new("bmaptool")
        .arg("copy")
        .arg("--bmap")
        .arg(out.join("mini-2.1.0.bmap"))
        .arg(&img)
        .arg(&copy));
    assert_eq!(sha256(&copy), sha256(&img));
}

#[test]
fn bad_recipes_fail_with_file_and_key_and_leave_no_image() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = mini_recipe(dir.path());
    let good = std::fs::read_to_string(&recipe).unwrap();
    let cases: &[(&str, &str, &str, &[&str])] = &[
        ("missing file", "kernel = \"mini/kernel8.img\"", "kernel = \"mini/vmlinuz\"", &["boot.kernel", "does not exist"]),
        ("wrong mode", "mode = \"0640\"", "mode = \"u=rw\"", &["layers[2].mode", "octal mode"]),
        ("unknown layer type", "type = \"overlay\"", "type = \"squashfs\"", &["unknown variant `squashfs`"]),
        ("two root sizes", "root_b = \"16MiB\"", "root_b = \"32MiB\"", &["partitions.root_b", "same size as partitions.root_a"]),
        ("package not found", "\"mini-tools\" = \"1:1.0-1\" }", "\"mini-tools\" = \"1:1.0-1\", \"no-such-package-metrica\" = \"1.0\" }", &["debian.packages.no-such-package-metrica", "cannot be found"]),
        ("boot too small", "kernel = \"mini/kernel8.img\"", "kernel = \"big.bin\"", &["partitions.boot_a", "partition boot_a is too small", "needs at least"]),
        ("kernel without a module", "files = { \"/bin/busybox\" = \"root:/bin/busybox\" }", "files = { \"/bin/busybox\" = \"root:/bin/busybox\" }\nmodules = [\"sdhci_iproc\"]", &["boot.initramfs.modules", "module sdhci_iproc is not in"]),
        ("root too small", "[[layers]]\ntype = \"overlay\"", "[[layers]]\ntype = \"file\"\nsource = \"big.bin\"\npath = \"/big.bin\"\nmode = \"0644\"\n[[layers]]\ntype = \"overlay\"", &["partitions.root_a", "partition root_a is too small", "needs about", "gives 16 MiB"]),
    ];
    std::fs::write(dir.path().join("recipes/big.bin"), vec![7u8; 20 << 20]).unwrap();
    for (what, from, to, expected) in cases {
        assert!(good.contains(from), "{what}: fixture does not contain {from:?}");
        let path = dir.path().join("recipes/bad.toml");
        std::fs::write(&path, good.replacen(from, to, 1)).unwrap();
        let out = dir.path().join(format!("out-{}", what.replace(' ', "-")));
        let result = imager().arg("build").arg(&path).arg("-o").arg(&out).output().unwrap();
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert_eq!(result.status.code(), Some(1), "{what}: {stderr}");
        assert!(stderr.contains("recipes/bad.toml"), "{what}: no file named in {stderr}");
        for e in *expected {
            assert!(stderr.contains(e), "{what}: {e:?} not in {stderr}");
        }
        if out.exists() {
            let left: Vec<_> =
                std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
            assert!(left.is_empty(), "{what}: left {left:?} in the output folder");
        }
    }
}

/// Every child is logged at debug level with `IMAGER_LOG=debug` (and only then), and a failing
/// child's own stderr reaches the error: here `dpkg-deb` reading a corrupt cached package.
#[test]
fn a_failing_child_is_logged_and_its_stderr_is_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = mini_recipe(dir.path());
    std::fs::write(dir.path().join("cache/mini-tools_1%3a1.0-1_arm64.deb"), b"not a package")
        .unwrap();
    let out = dir.path().join("out");
    for level in [None, Some("debug")] {
        let mut cmd = imager();
        match level {
            Some(l) => cmd.env("IMAGER_LOG", l),
            None => cmd.env_remove("IMAGER_LOG"),
        };
        let result = cmd.arg("build").arg(&recipe).arg("-o").arg(&out).output().unwrap();
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert_eq!(result.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("imager: error: reading ")
                && stderr.contains("mini-tools_1%3a1.0-1_arm64.deb: dpkg-deb -f ")
                && stderr.contains("dpkg-deb: error:"),
            "{stderr}"
        );
        assert_eq!(
            stderr.contains("imager: debug: running dpkg-deb -f "),
            level.is_some(),
            "IMAGER_LOG={level:?}: {stderr}"
        );
    }
}
