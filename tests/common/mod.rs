//! Helpers shared by the end-to-end scenarios in tests/ (each scenario file is a test target of
//! the crate whose binary it drives, so Cargo builds that binary fresh for it).
#![allow(dead_code)]

pub mod help;

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("crates sit in the repository")
        .to_path_buf()
}

/// sha256 of a file, hex.
pub fn sha256(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    let mut f =
        std::fs::File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).expect("hashing");
    hex::encode(h.finalize())
}

/// Runs a command and returns its output, failing the test with its stderr if it fails.
pub fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Makes the `mini` recipe fixture in `dir` by running tests/fixtures/make-mini.sh, which
/// builds a tiny local `.deb` (a root-owned, setuid `/bin/busybox` stand-in) into the recipe's
/// package cache so that no download is needed. Returns the recipe path.
pub fn mini_recipe(dir: &Path) -> PathBuf {
    run(Command::new("bash").arg(repo().join("tests/fixtures/make-mini.sh")).arg(dir));
    dir.join("recipes/mini.toml")
}

/// A small image laid out as `imager build` does (GPT, an empty provision FAT), with its bmap
/// and `.img.zst`.
pub fn golden(dir: &Path) -> PathBuf {
    use imager::image::{write_gpt, Ids, Layout};
    let layout = Layout::new(&imager::recipe::Partitions {
        config: 4 << 20,
        boot: 4 << 20,
        root: 8 << 20,
        provision: 16 << 20,
        data: 4 << 20,
    });
    let img = dir.join("fleet-1.0.0.img");
    let f = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&img).unwrap();
    f.set_len(layout.disk_size).unwrap();
    write_gpt(&f, &layout, &Ids::new("fleet", &"1.0.0".parse().unwrap())).unwrap();
    let p = layout.get("provision");
    let region = imager::fat::Region { file: &f, start: p.start, len: p.len };
    imager::fat::format(region, "provision", 7).unwrap();
    f.sync_all().unwrap();
    imager::output::write_bmap(&img, &dir.join("fleet-1.0.0.bmap")).unwrap();
    let quiet = imager::progress::Progress::quiet();
    imager::output::compress_zstd(&img, &dir.join("fleet-1.0.0.img.zst"), 3, &quiet).unwrap();
    img
}

/// An operator's SSH key (the site's ops.pub).
pub const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHJ0b3G9xq1P2W5Cxw3Y5CwG9ywJvn6dzQp2oOSs4mFr ops@example";

/// A site folder: a device.toml template with every required field but the per-device ones,
/// an operator key (ops.pub) and a secrets file.
pub fn site(dir: &Path) -> PathBuf {
    let site = dir.join("site");
    std::fs::create_dir_all(&site).unwrap();
    std::fs::write(
        site.join("device.toml"),
        "role = \"camera-single\"\nsegment = \"canary\"\n[channel]\nname = \"stable\"\nurl = \"https://updates.example.com/fleet\"\n",
    )
    .unwrap();
    std::fs::write(site.join("ops.pub"), format!("{KEY}\n")).unwrap();
    std::fs::write(site.join("secrets.toml"), "api_token = \"s3cr3t-do-not-show\"\n").unwrap();
    site
}
