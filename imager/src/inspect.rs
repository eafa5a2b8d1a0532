//! `imager inspect`: what an image holds, read without root or mounts (gpt, fatfs, ext4-view).

use crate::fat::{self, Region};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::fmt::Write as _;
use std::fs::File;
use std::path::Path;
use updater::autoboot::Autoboot;
use updater::disk::{read_partitions, Partition};
use updater::layout::{FsKind, PartitionRole, Slot};
use updater::release::{Release, RELEASE_PATH};

/// Opens the ext4 filesystem of a partition (the updater's reader, so both read disks alike).
pub use updater::disk::open_ext4;

/// Summary of one partition.
#[derive(Debug, Serialize)]
pub struct PartInfo {
    pub number: u32,
    pub label: String,
    pub start: u64,
    pub size: u64,
    pub type_guid: String,
    pub partuuid: String,
    pub fs_label: Option<String>,
    pub error: Option<String>,
}

/// Summary of one slot.
#[derive(Debug, Serialize)]
pub struct SlotInfo {
    pub slot: Slot,
    pub cmdline: Option<String>,
    pub release: Option<Release>,
}

/// What `imager inspect IMAGE` reports.
#[derive(Debug, Serialize)]
pub struct ImageInfo {
    pub path: String,
    pub size: u64,
    pub partitions: Vec<PartInfo>,
    pub autoboot: Option<String>,
    pub committed_slot: Option<Slot>,
    pub slots: Vec<SlotInfo>,
    /// What the provision partition holds (never a secret's content).
    pub provision: Option<crate::provision::ProvisionInfo>,
}

fn region<'a>(file: &'a File, p: &Partition) -> Region<'a> {
    Region { file, start: p.start, len: p.len }
}

/// Reads what an image holds.
pub fn inspect_image(image: &Path) -> Result<ImageInfo> {
    let parts = read_partitions(image)?;
    let file = File::open(image).with_context(|| format!("opening {}", image.display()))?;
    // The end, not the metadata: a card's metadata says 0 bytes.
    let size = std::io::Seek::seek(&mut &file, std::io::SeekFrom::End(0))?;
    let mut infos = Vec::new();
    for p in &parts {
        let kind = PartitionRole::by_label(&p.label).map(|r| r.fs);
        let (fs_label, error) = match kind {
            Some(FsKind::Fat) => match fat::label(region(&file, p)) {
                Ok(l) => (Some(l), None),
                Err(e) => (None, Some(format!("{e:#}"))),
            },
            Some(FsKind::Ext4) => match open_ext4(image, p) {
                Ok(fs) => (Some(fs.label().to_str().unwrap_or("?").to_string()), None),
                Err(e) => (None, Some(format!("{e:#}"))),
            },
            None => (None, None),
        };
        infos.push(PartInfo {
            number: p.number,
            label: p.label.clone(),
            start: p.start,
            size: p.len,
            type_guid: p.type_guid.hyphenated().to_string().to_uppercase(),
            partuuid: p.partuuid.hyphenated().to_string(),
            fs_label,
            error,
        });
    }
    let find = |label: &str| parts.iter().find(|p| p.label == label);
    let autoboot =
        find("config").and_then(|p| fat::read_file(region(&file, p), "autoboot.txt").ok());
    let committed_slot =
        autoboot.as_deref().and_then(|a| Autoboot::parse(a).ok()).map(|a| a.committed);
    let autoboot =
        autoboot.map(|a| String::from_utf8_lossy(&a).trim_end_matches('\n').to_string() + "\n");
    let mut slots = Vec::new();
    for slot in Slot::ALL {
        let cmdline = find(slot.boot().label)
            .and_then(|p| fat::read_file(region(&file, p), "cmdline.txt").ok())
            .map(|c| String::from_utf8_lossy(&c).trim().to_string());
        let release = find(slot.root().label)
            .and_then(|p| open_ext4(image, p).ok())
            .and_then(|fs| fs.read_to_string(RELEASE_PATH).ok())
            .and_then(|t| Release::from_toml(&t).ok());
        slots.push(SlotInfo { slot, cmdline, release });
    }
    let provision = find(crate::provision::PARTITION).map(|_| {
        crate::provision::inspect(image).unwrap_or_else(|e| crate::provision::ProvisionInfo {
            problems: vec![format!("{e:#}")],
            ..Default::default()
        })
    });
    Ok(ImageInfo {
        path: image.display().to_string(),
        size,
        partitions: infos,
        autoboot,
        committed_slot,
        slots,
        provision,
    })
}

/// Human-readable report.
pub fn render(info: &ImageInfo) -> String {
    let mib = updater::units::size;
    let mut s = String::new();
    let _ = writeln!(s, "image {} ({})", info.path, mib(info.size));
    let _ = writeln!(s, "\n  # label      start        size         fs label   partuuid                              type");
    for p in &info.partitions {
        let _ = writeln!(
            s,
            "  {} {:<10} {:<12} {:<12} {:<10} {} {}",
            p.number,
            p.label,
            mib(p.start),
            mib(p.size),
            p.fs_label.as_deref().unwrap_or("-"),
            p.partuuid,
            p.type_guid
        );
        if let Some(e) = &p.error {
            let _ = writeln!(s, "    error: {e}");
        }
    }
    match &info.autoboot {
        Some(a) => {
            let _ = writeln!(
                s,
                "\nautoboot.txt (committed slot: {}):",
                info.committed_slot.map_or("unparseable".into(), |c| c.to_string())
            );
            for line in a.lines() {
                let _ = writeln!(s, "  {line}");
            }
        }
        None => {
            let _ = writeln!(s, "\nautoboot.txt: missing");
        }
    }
    for slot in &info.slots {
        let _ = writeln!(s, "\nslot {}:", slot.slot);
        let _ = writeln!(s, "  cmdline.txt: {}", slot.cmdline.as_deref().unwrap_or("(missing)"));
        match &slot.release {
            Some(r) => {
                let _ = writeln!(
                    s,
                    "  version:     {} {} (compatible {})",
                    r.name, r.version, r.compatible
                );
            }
            None => {
                let _ = writeln!(s, "  version:     (no readable {RELEASE_PATH})");
            }
        }
    }
    if let Some(p) = &info.provision {
        s += &crate::provision::render(p);
    }
    s
}

/// What a command was given, told by its content (and a name where content cannot say).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// A raw disk image file (starts with a protective MBR).
    Image,
    /// A zstd-compressed disk image (`.img.zst`).
    ZstImage,
    /// A card or other block device.
    Card,
    /// An OS bundle (`.mfb`).
    Bundle,
    /// A role bundle (`.mfr`).
    RoleBundle,
    /// A block map (`.bmap`).
    Bmap,
    /// The build manifest (`NAME-VERSION.manifest.json`).
    BuildManifest,
    // What no command of the imager reads as an image:
    Folder,
    Empty,
    Csv,
    Toml,
    Unknown,
}

impl Input {
    /// What it is, for messages: `X is {what}`.
    pub fn what(self) -> &'static str {
        match self {
            Input::Image => "a disk image",
            Input::ZstImage => "a compressed disk image (.img.zst)",
            Input::Card => "a block device",
            Input::Bundle => "an OS bundle (.mfb)",
            Input::RoleBundle => "a role bundle (.mfr)",
            Input::Bmap => "a block map (.bmap)",
            Input::BuildManifest => "a build manifest",
            Input::Folder => "a folder",
            Input::Empty => "an empty file",
            Input::Csv => {
                "a CSV file (a provisioning fleet file? `imager provision --batch` reads it)"
            }
            Input::Toml => "a TOML text file (a recipe or device file?)",
            Input::Unknown => {
                "none of the files the imager reads (no MBR, zstd, bundle, bmap or manifest header)"
            }
        }
    }

    /// A disk image, raw, compressed or on a card.
    pub fn is_image(self) -> bool {
        matches!(self, Input::Image | Input::ZstImage | Input::Card)
    }

    /// `PATH is WHAT; EXPECTED`: the error of a command given the wrong kind of file.
    pub fn refuse(self, path: &Path, expected: &str) -> anyhow::Error {
        anyhow::anyhow!("{} is {}; {expected}", path.display(), self.what())
    }
}

/// For a command that reads one kind of file: refuses what `path` is known to be instead
/// (`X is a CSV file (...); EXPECTED`), before anything is read or written. Unknown bytes
/// pass: the command's own reader says what is wrong with them.
pub fn expect(path: &Path, ok: impl Fn(Input) -> bool, expected: &str) -> Result<Input> {
    let kind = identify(path)?;
    if ok(kind) || kind == Input::Unknown {
        Ok(kind)
    } else {
        Err(kind.refuse(path, expected))
    }
}

/// [`expect`] a disk image (raw, compressed, or a card).
pub fn expect_image(path: &Path, expected: &str) -> Result<Input> {
    expect(path, Input::is_image, expected)
}

/// [`expect`] an OS bundle.
pub fn expect_bundle(path: &Path, expected: &str) -> Result<Input> {
    expect(path, |k| k == Input::Bundle, expected)
}

/// What `inspect` reads, for the errors that refuse anything else.
pub const EXPECTED: &str = "inspect reads an image (.img, .img.zst), an OS bundle (.mfb), a role bundle (.mfr), a block map (.bmap), a build manifest (.manifest.json) or a card";

const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Tells what `path` is from its first bytes (errors only when it cannot be read).
pub fn identify(path: &Path) -> Result<Input> {
    use std::io::Read;
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::metadata(path).with_context(|| format!("opening {}", path.display()))?;
    if meta.is_dir() {
        return Ok(Input::Folder);
    }
    if meta.file_type().is_block_device() {
        return Ok(Input::Card);
    }
    if meta.len() == 0 {
        return Ok(Input::Empty);
    }
    let mut head = vec![0u8; 4096];
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let n = f.read(&mut head).with_context(|| format!("reading {}", path.display()))?;
    head.truncate(n);
    let text = std::str::from_utf8(&head).ok().map(str::trim_start);
    let ext = |e: &str| path.to_string_lossy().ends_with(e);
    if head.starts_with(&ZSTD_MAGIC) {
        return Ok(Input::ZstImage);
    }
    let manifest_first = head.starts_with(updater::bundle::MANIFEST_NAME.as_bytes());
    if ext(".mfr") || (manifest_first && crate::role::is_role_bundle(path)) {
        return Ok(Input::RoleBundle);
    }
    if ext(".mfb") || manifest_first {
        return Ok(Input::Bundle);
    }
    if head.len() >= 512 && head[510..512] == [0x55, 0xaa] {
        return Ok(Input::Image);
    }
    Ok(match text {
        Some(t) if t.starts_with("<?xml") || t.starts_with("<bmap") => Input::Bmap,
        Some(t) if t.starts_with('{') && t.contains("\"recipe_sha256\"") => Input::BuildManifest,
        Some(_) if ext(".toml") => Input::Toml,
        Some(t) if ext(".csv") || t.lines().next().is_some_and(csv_header) => Input::Csv,
        Some(t) if t.starts_with('[') || t.contains(" = ") => Input::Toml,
        _ => Input::Unknown,
    })
}

/// A line that looks like a CSV header (`device_id,hostname`), not TOML (`a = ["x", "y"]`).
fn csv_header(line: &str) -> bool {
    line.contains(',') && !line.contains('=') && !line.starts_with(['[', '#'])
}

/// Decompresses an `.img.zst` into a sparse temporary file (zero blocks stay holes), so it
/// can be read like an image. A truncated or corrupt stream is blamed on zstd, by name.
pub fn decompress_to_temp(
    zst: &Path,
    progress: &crate::progress::Progress,
) -> Result<tempfile::NamedTempFile> {
    use std::io::{Seek, SeekFrom, Write};
    let input = File::open(zst).with_context(|| format!("opening {}", zst.display()))?;
    let len = input.metadata()?.len();
    let step = progress.bytes(len, "decompressing");
    let counted = CountingReader { inner: input, step: &step };
    let mut dec = zstd::stream::Decoder::new(counted)
        .with_context(|| format!("{}: not a zstd stream", zst.display()))?;
    let mut out = tempfile::NamedTempFile::new().context("creating a temporary file")?;
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = crate::output::read_zstd_piece(&mut dec, &mut buf, zst, total)?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().all(|&b| b == 0) {
            out.as_file_mut().seek(SeekFrom::Current(n as i64))?;
        } else {
            out.as_file_mut().write_all(&buf[..n]).context("writing the temporary image")?;
        }
        total += n as u64;
    }
    out.as_file_mut().set_len(total)?;
    step.finish();
    Ok(out)
}

struct CountingReader<'a> {
    inner: File,
    step: &'a crate::progress::Step,
}

impl std::io::Read for CountingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.step.inc(n as u64);
        Ok(n)
    }
}

/// What `imager inspect FILE.bmap` reports.
#[derive(Debug, Serialize)]
pub struct BmapInfo {
    pub path: String,
    pub image_size: u64,
    pub block_size: u64,
    pub mapped_bytes: u64,
    pub ranges: usize,
}

/// Reads a block map.
pub fn inspect_bmap(path: &Path) -> Result<BmapInfo> {
    let bmap = crate::flash::read_bmap(path)?;
    Ok(BmapInfo {
        path: path.display().to_string(),
        image_size: bmap.image_size,
        block_size: bmap.block_size,
        mapped_bytes: bmap.ranges.iter().map(|r| r.end - r.start).sum(),
        ranges: bmap.ranges.len(),
    })
}

/// Human-readable report of a block map.
pub fn render_bmap(b: &BmapInfo) -> String {
    format!(
        "block map {}\n  image size  {} ({} bytes)\n  block size  {}\n  mapped      {} in {} range(s)\n",
        b.path,
        updater::units::size(b.image_size),
        b.image_size,
        updater::units::size(b.block_size),
        updater::units::size(b.mapped_bytes),
        b.ranges
    )
}

/// Reads a build manifest (JSON written by `imager build`), as its JSON value.
pub fn read_build_manifest(path: &Path) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid build manifest", path.display()))
}

/// Human-readable report of a build manifest.
pub fn render_build_manifest(path: &Path, m: &serde_json::Value) -> String {
    let str_of = |k: &str| m[k].as_str().map_or_else(|| m[k].to_string(), str::to_string);
    let mut s = format!(
        "build manifest {}\n  name        {}\n  version     {}\n  compatible  {}\n  epoch       {}\n  packages    {}\n",
        path.display(),
        str_of("name"),
        str_of("version"),
        str_of("compatible"),
        m["security_epoch"],
        m["packages"].as_array().map_or(0, Vec::len),
    );
    for p in m["partitions"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "  partition   {} {:<10} {:>10}  sha256 {}",
            p["number"],
            p["label"].as_str().unwrap_or("?"),
            updater::units::size(p["size"].as_u64().unwrap_or(0)),
            p["sha256"].as_str().unwrap_or("?")
        );
    }
    s
}

/// Human-readable report of a bundle (IEC units; the exact bytes are in `--json`).
pub fn render_bundle(i: &crate::bundle::Inspection) -> String {
    use updater::units::size;
    let m = &i.manifest;
    let mut s = format!(
        "bundle      {} ({})\nformat      {}\ncompatible  {}\nversion     {}\nepoch       {}\ncreated     {}\nsignature   {}\n",
        i.path.display(),
        size(i.size),
        m.format,
        m.compatible,
        m.version,
        m.security_epoch,
        m.created,
        i.signature
    );
    for img in &i.images {
        let e = &img.entry;
        let _ = write!(s, "image       {:<4} {} sha256 {}", e.slot_class, size(e.size), e.sha256);
        let _ = match (img.chunks, img.payload_len) {
            (Some(c), Some(p)) => writeln!(s, ", {c} chunks, {} compressed", size(p)),
            _ => writeln!(s, ", index unreadable"),
        };
    }
    s
}

/// The JSON of `imager inspect BUNDLE --json` (shape: docs/cli-json.md).
pub fn bundle_json(i: &crate::bundle::Inspection) -> serde_json::Value {
    let sig = &i.signature;
    use crate::bundle::SignatureStatus as S;
    let (status, key_id, reason) = match sig {
        S::Valid { key_id } => ("valid", Some(key_id.clone()), None),
        S::NotChecked { key_id } => ("not-checked", Some(key_id.clone()), None),
        S::Invalid { key_id, reason } => ("invalid", Some(key_id.clone()), Some(reason.clone())),
        S::Missing { reason } => ("missing", None, Some(reason.clone())),
    };
    serde_json::json!({
        "kind": "bundle",
        "path": i.path.display().to_string(),
        "size": i.size,
        "manifest": i.manifest,
        "signature": { "status": status, "key_id": key_id, "reason": reason },
        "images": i.images.iter().map(|img| serde_json::json!({
            "slot_class": img.entry.slot_class,
            "size": img.entry.size,
            "sha256": img.entry.sha256,
            "chunks": img.chunks,
            "payload_len": img.payload_len,
        })).collect::<Vec<_>>(),
    })
}

/// Reads `PART:/path` from an image: a file of a FAT or ext4 partition.
pub fn cat(image: &Path, spec: &str) -> Result<Vec<u8>> {
    let Some((label, path)) = spec.split_once(':') else {
        bail!("--cat {spec:?}: expected PARTITION:/path, e.g. root_a:/etc/os-release");
    };
    let parts = read_partitions(image)?;
    let part = parts.iter().find(|p| p.label == label).with_context(|| {
        format!(
            "--cat {spec:?}: {} has no partition {label:?} (it has {})",
            image.display(),
            parts.iter().map(|p| p.label.as_str()).collect::<Vec<_>>().join(", ")
        )
    })?;
    match PartitionRole::by_label(label).map(|r| r.fs) {
        Some(FsKind::Fat) => {
            let file = File::open(image)?;
            fat::read_file(region(&file, part), path).with_context(|| format!("reading {spec}"))
        }
        _ => open_ext4(image, part)?.read(path).with_context(|| format!("reading {spec}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identify_tells_csv_from_toml_and_refuses_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let f = |name: &str, text: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            identify(&p).unwrap()
        };
        assert_eq!(f("fleet", b"device_id,hostname\n"), Input::Csv);
        assert_eq!(f("recipe", b"layers = [\"a\", \"b\"]\nname = \"x\"\n"), Input::Toml);
        assert_eq!(f("r.toml", b"a,b\n"), Input::Toml, "the name wins for .toml");
        assert_eq!(f("x.bmap", b"<?xml version=\"1.0\" ?>\n<bmap>"), Input::Bmap);
        assert_eq!(
            f("m.json", b"{ \"name\": \"x\", \"recipe_sha256\": \"00\" }"),
            Input::BuildManifest
        );
        assert_eq!(f("b.bin", b"manifest.toml\0\0"), Input::Bundle);
        assert_eq!(f("e", b""), Input::Empty);
        assert_eq!(f("z", &[0x28, 0xb5, 0x2f, 0xfd, 0, 0]), Input::ZstImage);
        let mut mbr = vec![0u8; 512];
        mbr[510..].copy_from_slice(&[0x55, 0xaa]);
        assert_eq!(f("i", &mbr), Input::Image);
        assert_eq!(f("n", &[1u8; 600]), Input::Unknown);
        assert_eq!(identify(dir.path()).unwrap(), Input::Folder);
        let e = Input::Csv.refuse(Path::new("fleet.csv"), EXPECTED).to_string();
        assert!(e.starts_with("fleet.csv is a CSV file") && e.contains("inspect reads"), "{e}");
    }
}
