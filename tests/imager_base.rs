//! End to end: a `[base] type = "mmdebstrap"` recipe built with a fake mmdebstrap first on the
//! child's PATH (a shell script that writes a tiny root tarball or prints apt's errors), boot
//! files found in that root by `root:` globs, the bootstrap cache and `--offline`; and one real
//! bootstrap, ignored by default because it needs the network and qemu-user binfmt.

mod common;

use common::{mini_recipe, run};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A fake mmdebstrap: `--version`, else records its arguments in `calls` beside itself and runs
/// `body` with `$suite` and `$out` set from its arguments.
fn fake_mmdebstrap(dir: &Path, body: &str) -> PathBuf {
    let bin = dir.join("fakebin");
    std::fs::create_dir_all(&bin).unwrap();
    let script = format!(
        r#"#!/bin/sh
if [ "$1" = --version ]; then echo 'mmdebstrap 9.9-fake'; exit 0; fi
echo "$@" >> "$(dirname "$0")/calls"
suite=""; out=""
for a in "$@"; do case "$a" in --*) ;; *) if [ -z "$suite" ]; then suite=$a; elif [ -z "$out" ]; then out=$a; fi ;; esac; done
{body}
"#
    );
    std::fs::write(bin.join("mmdebstrap"), script).unwrap();
    std::fs::set_permissions(bin.join("mmdebstrap"), std::fs::Permissions::from_mode(0o755))
        .unwrap();
    bin
}

/// A root with a kernel and two Pi 4 DTBs under a versioned folder, `/lib` -> `usr/lib`.
const WRITES_ROOT: &str = r#"d=$(mktemp -d)
mkdir -p "$d/boot" "$d/usr/lib/linux-image-6.12.9-arm64/broadcom" "$d/etc"
echo "$suite" > "$d/etc/debian_version"
head -c 200000 /dev/zero | tr '\0' 'v' > "$d/boot/vmlinuz-6.12.9-arm64"
echo pi4 > "$d/usr/lib/linux-image-6.12.9-arm64/broadcom/bcm2711-rpi-4-b.dtb"
echo pi400 > "$d/usr/lib/linux-image-6.12.9-arm64/broadcom/bcm2711-rpi-400.dtb"
ln -s usr/lib "$d/lib"
tar --owner=0 --group=0 -C "$d" -cf "$out" .
rm -rf "$d"
echo 'I: success' >&2"#;

fn host_arch() -> String {
    let out = run(Command::new("dpkg").arg("--print-architecture"));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The mini recipe with a bootstrapped base (of the host architecture, so no binfmt is
/// needed) whose kernel and DTB come from the root by glob.
fn base_recipe(dir: &Path, base_extra: &str, dtb: &str) -> PathBuf {
    let recipe = mini_recipe(dir);
    let text = std::fs::read_to_string(&recipe).unwrap();
    let base = format!(
        "[base]\ntype = \"mmdebstrap\"\nsuite = \"trixie\"\narchitecture = \"{}\"\n{base_extra}\n[debian]",
        host_arch()
    );
    let text = text
        .replacen("[debian]", &base, 1)
        .replacen("kernel = \"mini/kernel8.img\"", "kernel = \"root:/boot/vmlinuz-*\"", 1)
        .replacen("cmdline = ", &format!("dtbs = [\"{dtb}\"]\ncmdline = "), 1);
    std::fs::write(&recipe, text).unwrap();
    recipe
}

fn imager(fakebin: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_imager"));
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path = std::env::join_paths(
        std::iter::once(fakebin.to_path_buf()).chain(std::env::split_paths(&path)),
    )
    .unwrap();
    c.env("SOURCE_DATE_EPOCH", "1700000000").env("PATH", path);
    c
}

/// Runs a build that must fail; its stderr. The output folder must hold nothing.
fn failing_build(fakebin: &Path, recipe: &Path, out: &Path, extra: &[&str]) -> String {
    let result =
        imager(fakebin).arg("build").arg(recipe).arg("-o").arg(out).args(extra).output().unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr).into_owned();
    assert_eq!(result.status.code(), Some(1), "{stderr}");
    if out.exists() {
        let left: Vec<_> = std::fs::read_dir(out).unwrap().collect();
        assert!(left.is_empty(), "left {left:?} in the output folder");
    }
    stderr
}

const PI4_DTB: &str = "root:/usr/lib/linux-image-*/broadcom/bcm2711-rpi-4-b.dtb";

#[test]
fn a_bootstrapped_base_is_cached_and_its_boot_files_found_by_glob() {
    let dir = tempfile::tempdir().unwrap();
    let fakebin = fake_mmdebstrap(dir.path(), WRITES_ROOT);
    let recipe = base_recipe(dir.path(), "packages = [\"kmod\"]", PI4_DTB);
    let out = dir.path().join("out");
    let result = run(imager(&fakebin).arg("build").arg(&recipe).arg("-o").arg(&out));
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(stderr.contains("bootstrapping trixie"), "{stderr}");
    let img = out.join("mini-1.0.0.img");
    let cat = |what: &str| {
        let o = run(imager(&fakebin).arg("inspect").arg(&img).arg("--cat").arg(what));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert_eq!(cat("root_a:/etc/debian_version"), "trixie\n");
    assert_eq!(cat("boot_a:/bcm2711-rpi-4-b.dtb"), "pi4\n");
    assert_eq!(cat("boot_a:/kernel8.img").len(), 200_000);
    let manifest = std::fs::read_to_string(out.join("mini-1.0.0.manifest.json")).unwrap();
    assert!(
        manifest.contains("\"base_bootstrap\": {\n    \"tarball\": \"mmdebstrap-"),
        "{manifest}"
    );
    assert!(manifest.contains("\"packages\": \"kmod\""), "{manifest}");
    let cached: Vec<String> = std::fs::read_dir(dir.path().join("cache/base"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(cached.len(), 2, "the tarball and its inputs: {cached:?}");
    // The second build takes the cached tarball, offline, with no second bootstrap.
    let out2 = dir.path().join("out2");
    let result =
        run(imager(&fakebin).arg("build").arg(&recipe).arg("-o").arg(&out2).arg("--offline"));
    assert!(String::from_utf8_lossy(&result.stderr).contains("base: cached "));
    let calls = std::fs::read_to_string(fakebin.join("calls")).unwrap();
    assert_eq!(calls.lines().count(), 1, "{calls}");
    assert_eq!(common::sha256(&img), common::sha256(&out2.join("mini-1.0.0.img")));
}

#[test]
fn bad_bases_and_globs_fail_naming_the_recipe_key_before_any_image() {
    let dir = tempfile::tempdir().unwrap();
    let missing = "echo 'E: Unable to locate package dockr.io' >&2; exit 1";
    /// The fake's script, extra `[base]` lines, the DTB source, build arguments, expected errors.
    type Case<'a> = (&'a str, &'a str, &'a str, &'a [&'a str], &'a [&'a str]);
    let cases: &[Case<'_>] = &[
        (missing, "packages = [\"dockr.io\"]", PI4_DTB, &[], &["base.packages: no package \"dockr.io\" in trixie (main)"]),
        (
            "echo \"E: Failed to fetch http://mirror.invalid/debian/dists/trixie/InRelease  Temporary failure resolving 'mirror.invalid'\" >&2; exit 1",
            "mirror = \"http://mirror.invalid/debian\"",
            PI4_DTB,
            &[],
            &["base.mirror: cannot reach http://mirror.invalid/debian"],
        ),
        (WRITES_ROOT, "", PI4_DTB, &["--offline"], &["base: no cached bootstrap for these inputs (suite trixie", "--offline was given"]),
        (WRITES_ROOT, "", "root:/usr/lib/linux-image-*/broadcom/bcm2711-*.dtb", &[], &["boot.dtbs[0]: root:/usr/lib/linux-image-*/broadcom/bcm2711-*.dtb matches 2 paths, expected one"]),
        (WRITES_ROOT, "", "root:/usr/lib/linux-image-*/broadcom/bcm2712-*.dtb", &[], &["boot.dtbs[0]: root:/usr/lib/linux-image-*/broadcom/bcm2712-*.dtb matches nothing"]),
    ];
    for (i, (body, extra, dtb, args, expected)) in cases.iter().enumerate() {
        let case = dir.path().join(format!("case{i}"));
        let fakebin = fake_mmdebstrap(&case, body);
        let recipe = base_recipe(&case, extra, dtb);
        let stderr = failing_build(&fakebin, &recipe, &case.join("out"), args);
        assert!(stderr.contains(&format!("recipes/mini.toml: {}", expected[0])), "{stderr}");
        for e in *expected {
            assert!(stderr.contains(e), "{e:?} not in {stderr}");
        }
    }
}

/// The real thing: trixie arm64 `--variant=essential` through qemu-user (about 70 s on two
/// cores), with a host kernel file so no kernel package is needed.
#[test]
#[ignore = "needs network and qemu-user binfmt: run with --ignored"]
fn a_real_essential_trixie_arm64_bootstrap_builds_an_image() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = mini_recipe(dir.path());
    let text = std::fs::read_to_string(&recipe)
        .unwrap()
        .replacen(
            "[debian]",
            "[base]\ntype = \"mmdebstrap\"\nsuite = \"trixie\"\nvariant = \"essential\"\n[debian]",
            1,
        )
        .replace("root_a = \"16MiB\"", "root_a = \"384MiB\"")
        .replace("root_b = \"16MiB\"", "root_b = \"384MiB\"");
    std::fs::write(&recipe, text).unwrap();
    let out = dir.path().join("out");
    let started = std::time::Instant::now();
    run(imager(Path::new("/nonexistent")).arg("build").arg(&recipe).arg("-o").arg(&out));
    eprintln!("real bootstrap and build: {:.1} s", started.elapsed().as_secs_f64());
    let o = run(imager(Path::new("/nonexistent"))
        .arg("inspect")
        .arg(out.join("mini-1.0.0.img"))
        .arg("--cat")
        .arg("root_a:/etc/debian_version"));
    let version = String::from_utf8_lossy(&o.stdout);
    assert!(version.starts_with("13") || version.contains("trixie"), "{version}");
}

/// `--offline` forbids `.deb` downloads too: a pinned package that is not cached is an error
/// naming it (and apt-get is never run).
#[test]
fn offline_builds_refuse_to_download_packages() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = mini_recipe(dir.path());
    std::fs::remove_file(dir.path().join("cache/mini-tools_1%3a1.0-1_arm64.deb")).unwrap();
    let stderr =
        failing_build(Path::new("/nonexistent"), &recipe, &dir.path().join("out"), &["--offline"]);
    assert!(
        stderr.contains("recipes/mini.toml: debian.packages.mini-tools: mini-tools_1%3a1.0-1_arm64.deb is not in the package cache")
            && stderr.contains("--offline was given"),
        "{stderr}"
    );
}

/// A recipe part named by `include` builds like the same text in the recipe, and the manifest
/// records it by its path relative to the recipe and its sha256.
#[test]
fn an_included_part_builds_and_is_in_the_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = mini_recipe(dir.path());
    let text = std::fs::read_to_string(&recipe).unwrap();
    let debian = "[debian]\narchitecture = \"arm64\"\ncache = \"../cache\"\npackages = { \"mini-tools\" = \"1:1.0-1\" }\n";
    assert!(text.contains(debian));
    std::fs::create_dir_all(dir.path().join("recipes/common")).unwrap();
    std::fs::write(dir.path().join("recipes/common/debian.toml"), debian).unwrap();
    let text = format!("include = [\"common/debian.toml\"]\n{}", text.replace(debian, ""));
    std::fs::write(&recipe, text).unwrap();
    let out = dir.path().join("out");
    run(imager(Path::new("/nonexistent")).arg("build").arg(&recipe).arg("-o").arg(&out));
    let manifest = std::fs::read_to_string(out.join("mini-1.0.0.manifest.json")).unwrap();
    assert!(manifest.contains("\"path\": \"common/debian.toml\""), "{manifest}");
    assert!(manifest.contains("\"name\": \"mini-tools\""), "{manifest}");
}
