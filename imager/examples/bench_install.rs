//! Install benchmark helper; driven by `bench/install.sh` (see docs/bundle.md, "Benchmark").
//!
//! - `bench_install prepare DIR LEVEL`: from `DIR/root.img`, writes `DIR/root.mfb` (a root-only
//!   bundle at zstd LEVEL, signed by a fresh key in `DIR/keys`) and a sparse GPT disk image
//!   `DIR/disk.img` with `root_a` and `root_b` large enough for it.
//! - `bench_install install DIR`: installs `DIR/root.mfb` into `root_b` of `DIR/disk.img` with
//!   the updater's install path (verification and fsync included) and prints one JSON line:
//!   seconds, bytes, MiB/s and this process's peak RSS (VmHWM).

use anyhow::{bail, Context, Result};
use imager::bundle::{write_bundle, BundleMeta, ImageSource};
use std::path::Path;
use std::time::Instant;
use updater::bundle::SlotClass;
use updater::install::{install_bundle, AcceptAll, InstallRequest, NoProgress, Source};
use updater::layout::Slot;
use updater::sign::Keyring;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("prepare") if args.len() == 4 => {
            prepare(Path::new(&args[2]), args[3].parse().context("zstd level")?)
        }
        Some("install") if args.len() == 3 => install(Path::new(&args[2])),
        _ => bail!("usage: bench_install prepare DIR LEVEL | install DIR"),
    }
}

fn prepare(dir: &Path, level: i32) -> Result<()> {
    let root = dir.join("root.img");
    let keys = dir.join("keys");
    if keys.exists() {
        std::fs::remove_dir_all(&keys)?;
    }
    let pair = imager::keys::generate(&keys, "bench")?;
    let key = imager::keys::load_signing_key(&pair.private)?;
    let meta = BundleMeta {
        compatible: "metrica-bench".into(),
        version: semver::Version::new(1, 0, 0),
        security_epoch: 0,
        created: 1_700_000_000,
        zstd_level: level,
    };
    let t = Instant::now();
    let src = ImageSource::file(SlotClass::Root, &root)?;
    let summary = write_bundle(
        &dir.join("root.mfb"),
        &meta,
        std::slice::from_ref(&src),
        &key,
        &imager::progress::Progress::quiet(),
    )?;
    eprintln!(
        "bundle: {} bytes, {} chunks, written in {:.1} s",
        summary.size,
        summary.chunks[0],
        t.elapsed().as_secs_f64()
    );
    // Sparse disk: two root partitions of the image's size (rounded up to 1 MiB).
    let part = src.len.div_ceil(1 << 20) << 20;
    let disk = dir.join("disk.img");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&disk)?;
    file.set_len(2 * part + (4 << 20))?;
    let mut g = gpt::GptConfig::new().writable(true).create_from_device(file, None)?;
    for label in ["root_a", "root_b"] {
        g.add_partition(label, part, gpt::partition_types::LINUX_FS, 0, Some(2048))?;
    }
    g.write()?;
    Ok(())
}

fn install(dir: &Path) -> Result<()> {
    let keyring = Keyring::load(&dir.join("keys"))?;
    let disk = dir.join("disk.img");
    let mut req = InstallRequest::new(&disk, Slot::B, &keyring, &AcceptAll);
    if let Some(mib) =
        std::env::var("BENCH_CHECKPOINT_MIB").ok().and_then(|v| v.parse::<u64>().ok())
    {
        req.checkpoint_bytes = mib << 20;
    }
    let t = Instant::now();
    let done = install_bundle(Source::File(dir.join("root.mfb")), &req, &mut NoProgress)?;
    let secs = t.elapsed().as_secs_f64();
    let bytes = done.images[0].size;
    let status = std::fs::read_to_string("/proc/self/status")?;
    let hwm_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    // utime and stime of all threads, in clock ticks (100 a second on Linux).
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    println!(
        "{{\"seconds\":{secs:.3},\"cpu_seconds\":{cpu:.2},\"bytes\":{bytes},\"mib_per_s\":{:.1},\"peak_rss_kib\":{hwm_kib}}}",
        bytes as f64 / 1048576.0 / secs
    );
    Ok(())
}
