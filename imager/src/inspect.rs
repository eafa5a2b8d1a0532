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
    let size = file.metadata()?.len();
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
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64);
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
