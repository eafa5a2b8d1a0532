//! The disk image: partition layout math (pure), deterministic identities, and the GPT.

use crate::recipe::Partitions;
use anyhow::{Context, Result};
use std::fs::File;
use std::str::FromStr;
use updater::layout::{PartitionRole, PARTITIONS};
use uuid::Uuid;

/// Partition starts are aligned to 4 MiB, the erase-block size of most SD cards.
pub const ALIGN: u64 = 4 << 20;
const SECTOR: u64 = 512;

/// Namespace of every UUID the imager derives (a fixed, random v4 UUID).
const NAMESPACE: Uuid = Uuid::from_u128(0x6d65_7472_6963_4a1b_9c3e_5f0a_2b7d_11e4);

/// One partition placed on the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    pub role: PartitionRole,
    pub start: u64,
    pub len: u64,
}

/// Where every partition goes, and the disk size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub disk_size: u64,
    pub parts: Vec<Placed>,
}

impl Layout {
    /// Lays the seven partitions out back to back in the order of DESIGN.md, each aligned.
    pub fn new(p: &Partitions) -> Layout {
        let mut pos = ALIGN;
        let mut parts = Vec::new();
        for role in PARTITIONS {
            let len = match role.label {
                "config" => p.config,
                "boot_a" | "boot_b" => p.boot,
                "root_a" | "root_b" => p.root,
                "provision" => p.provision,
                "data" => p.data,
                other => unreachable!("unknown partition {other}"),
            };
            parts.push(Placed { role, start: pos, len });
            pos = (pos + len).next_multiple_of(ALIGN);
        }
        // Room for the backup GPT (33 sectors) after the last partition.
        Layout { disk_size: pos + ALIGN, parts }
    }

    pub fn get(&self, label: &str) -> &Placed {
        self.parts.iter().find(|p| p.role.label == label).expect("every label is placed")
    }
}

/// Deterministic identities of an image, derived from its name and version.
#[derive(Debug, Clone)]
pub struct Ids {
    seed: String,
}

impl Ids {
    pub fn new(name: &str, version: &semver::Version) -> Ids {
        Ids { seed: format!("{name}/{version}") }
    }

    fn derive(&self, what: &str) -> Uuid {
        Uuid::new_v5(&NAMESPACE, format!("{}/{what}", self.seed).as_bytes())
    }

    pub fn disk_guid(&self) -> Uuid {
        self.derive("disk")
    }

    pub fn partuuid(&self, label: &str) -> Uuid {
        self.derive(&format!("partuuid/{label}"))
    }

    /// Filesystem UUID. Both root slots share one, since they hold the same image.
    pub fn fs_uuid(&self, label: &str) -> Uuid {
        self.derive(&format!("fs/{}", label.trim_end_matches("_a").trim_end_matches("_b")))
    }

    pub fn hash_seed(&self, label: &str) -> Uuid {
        self.derive(&format!("hash_seed/{}", label.trim_end_matches("_a").trim_end_matches("_b")))
    }

    /// FAT volume id.
    pub fn volume_id(&self, label: &str) -> u32 {
        let b = self.fs_uuid(label).into_bytes();
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}

/// Writes the protective MBR and the GPT (primary and backup) for `layout` onto `file`.
pub fn write_gpt(file: &File, layout: &Layout, ids: &Ids) -> Result<()> {
    let mut dev = file;
    let mbr = gpt::mbr::ProtectiveMBR::with_lb_size(
        u32::try_from(layout.disk_size / SECTOR - 1).unwrap_or(u32::MAX),
    );
    mbr.overwrite_lba0(&mut dev).context("writing the protective MBR")?;
    let mut disk = gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(gpt::disk::LogicalBlockSize::Lb512)
        .create_from_device(dev, Some(ids.disk_guid()))
        .context("creating the GPT")?;
    for p in &layout.parts {
        let ty = gpt::partition_types::Type::from_str(p.role.type_guid()).expect("known type GUID");
        disk.add_partition_at(p.role.label, p.role.number, p.start / SECTOR, p.len / SECTOR, ty, 0)
            .with_context(|| format!("adding partition {}", p.role.label))?;
    }
    let mut parts = disk.partitions().clone();
    for part in parts.values_mut() {
        part.part_guid = ids.partuuid(&part.name);
    }
    disk.update_partitions(parts).context("setting PARTUUIDs")?;
    disk.write().context("writing the GPT")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes() -> Partitions {
        Partitions {
            config: 16 << 20,
            boot: 64 << 20,
            root: 256 << 20,
            provision: 16 << 20,
            data: 64 << 20,
        }
    }

    #[test]
    fn layout_is_aligned_ordered_and_non_overlapping() {
        let l = Layout::new(&sizes());
        assert_eq!(l.parts.len(), 7);
        let mut end = 0;
        for p in &l.parts {
            assert_eq!(p.start % ALIGN, 0, "{}", p.role.label);
            assert!(p.start >= end, "{} overlaps", p.role.label);
            end = p.start + p.len;
        }
        assert!(l.disk_size >= end + 33 * SECTOR);
        assert_eq!(l.get("root_b").len, 256 << 20);
        assert_eq!(l.get("config").start, ALIGN);
    }

    #[test]
    fn ids_are_stable_and_distinct() {
        let v: semver::Version = "1.0.0".parse().unwrap();
        let a = Ids::new("x", &v);
        assert_eq!(a.partuuid("root_a"), Ids::new("x", &v).partuuid("root_a"));
        assert_ne!(a.partuuid("root_a"), a.partuuid("root_b"));
        assert_eq!(a.fs_uuid("root_a"), a.fs_uuid("root_b"), "both slots hold the same filesystem");
        assert_ne!(a.fs_uuid("root_a"), a.fs_uuid("data"));
    }

    #[test]
    fn gpt_round_trips_through_the_updater_reader() {
        let l = Layout::new(&sizes());
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(l.disk_size).unwrap();
        let ids = Ids::new("x", &"1.0.0".parse().unwrap());
        write_gpt(f.as_file(), &l, &ids).unwrap();
        let parts = updater::disk::read_partitions(f.path()).unwrap();
        assert_eq!(parts.len(), 7);
        for (got, want) in parts.iter().zip(&l.parts) {
            assert_eq!(got.label, want.role.label);
            assert_eq!((got.start, got.len), (want.start, want.len));
            assert_eq!(got.partuuid, ids.partuuid(want.role.label));
        }
        // sgdisk, an independent reader, agrees and finds no problems.
        if let Ok(out) = std::process::Command::new("sgdisk").arg("-v").arg(f.path()).output() {
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains("No problems found"), "{text}");
        }
    }
}
