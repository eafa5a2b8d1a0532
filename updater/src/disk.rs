//! Disks and their GPT partitions, addressed by label or PARTUUID.
//!
//! A disk is a whole block device (`/dev/mmcblk0`, `/dev/vda`) or a disk image file; the
//! updater never needs loop devices or mounts to find a partition.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use uuid::Uuid;

/// Logical block size used for GPT on SD cards and virtio disks.
pub const SECTOR: u64 = 512;

/// One GPT partition as the updater sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub number: u32,
    pub label: String,
    pub partuuid: Uuid,
    pub type_guid: Uuid,
    /// Byte offset of the first byte on the disk.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Reads the GPT partition table of a disk or disk image.
pub fn read_partitions(disk: &Path) -> Result<Vec<Partition>> {
    let file = std::fs::File::open(disk).with_context(|| format!("opening {}", disk.display()))?;
    read_partitions_from(file, &disk.display().to_string())
}

/// Reads the GPT partition table from any seekable reader of a disk's first bytes (for
/// example a decompressed head of an `.img.zst`); `what` names it in errors.
pub fn read_partitions_from<D: gpt::DiskDevice>(device: D, what: &str) -> Result<Vec<Partition>> {
    let gdisk = gpt::GptConfig::new()
        .writable(false)
        .logical_block_size(gpt::disk::LogicalBlockSize::Lb512)
        .open_from_device(device)
        .with_context(|| format!("reading the GPT of {what}"))?;
    let mut parts: Vec<Partition> = gdisk
        .partitions()
        .iter()
        .filter(|(_, p)| p.is_used())
        .map(|(&number, p)| Partition {
            number,
            label: p.name.clone(),
            partuuid: p.part_guid,
            type_guid: p.part_type_guid.guid,
            start: p.first_lba * SECTOR,
            len: (p.last_lba + 1 - p.first_lba) * SECTOR,
        })
        .collect();
    parts.sort_by_key(|p| p.number);
    Ok(parts)
}

/// Finds the partition with this label on a disk.
pub fn find_label(disk: &Path, label: &str) -> Result<Partition> {
    read_partitions(disk)?
        .into_iter()
        .find(|p| p.label == label)
        .with_context(|| format!("{} has no partition labelled {label:?}", disk.display()))
}

/// Opens a disk (block device or image file) for reading, or reading and writing.
pub fn open_disk(disk: &Path, write: bool) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open(disk)
        .with_context(|| format!("opening {}", disk.display()))
}

/// A partition of an open disk as a bounded `Read + Write + Seek` stream (offset 0 is the
/// partition's first byte), e.g. for `fatfs` on an unmounted FAT partition.
pub fn partition_stream(
    file: std::fs::File,
    part: &Partition,
) -> Result<fscommon::StreamSlice<std::fs::File>> {
    fscommon::StreamSlice::new(file, part.start, part.start + part.len)
        .with_context(|| format!("opening partition {}", part.label))
}

/// The device node of partition `number` of the block device `disk`
/// (`/dev/vda` -> `/dev/vda2`, `/dev/mmcblk0` -> `/dev/mmcblk0p2`).
pub fn partition_node(disk: &Path, number: u32) -> PathBuf {
    let s = disk.as_os_str().to_string_lossy();
    if s.ends_with(|c: char| c.is_ascii_digit()) {
        PathBuf::from(format!("{s}p{number}"))
    } else {
        PathBuf::from(format!("{s}{number}"))
    }
}

/// Whole disks listed in `sys_block` (normally `/sys/class/block`), as `/dev` paths under `dev`.
fn whole_disks(sys_block: &Path, dev: &Path) -> Result<Vec<PathBuf>> {
    let mut disks = Vec::new();
    for entry in
        std::fs::read_dir(sys_block).with_context(|| format!("listing {}", sys_block.display()))?
    {
        let entry = entry?;
        // Partitions have a `partition` attribute; whole disks do not.
        if entry.path().join("partition").exists() {
            continue;
        }
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("loop") || name.starts_with("ram") {
            continue;
        }
        disks.push(dev.join(&*name));
    }
    disks.sort();
    Ok(disks)
}

/// Finds the disk and partition whose PARTUUID is `partuuid`, scanning every whole disk.
pub fn locate_partuuid(
    sys_block: &Path,
    dev: &Path,
    partuuid: &Uuid,
) -> Result<(PathBuf, Partition)> {
    locate(sys_block, dev, |p| p.partuuid == *partuuid)
        .with_context(|| format!("no disk has a partition with PARTUUID {partuuid}"))
}

/// Finds a partition labelled `label` on the disk that holds `partuuid`-less systems (the
/// first disk with such a label).
pub fn locate_label(sys_block: &Path, dev: &Path, label: &str) -> Result<(PathBuf, Partition)> {
    locate(sys_block, dev, |p| p.label == label)
        .with_context(|| format!("no disk has a partition labelled {label:?}"))
}

fn locate(
    sys_block: &Path,
    dev: &Path,
    want: impl Fn(&Partition) -> bool,
) -> Result<(PathBuf, Partition)> {
    for disk in whole_disks(sys_block, dev)? {
        let Ok(parts) = read_partitions(&disk) else { continue };
        if let Some(p) = parts.into_iter().find(&want) {
            return Ok((disk, p));
        }
    }
    bail!("not found")
}

/// One partition of a disk as ext4-view storage.
struct PartitionReader {
    file: std::fs::File,
    start: u64,
    len: u64,
}

impl ext4_view::Ext4Read for PartitionReader {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        use std::os::unix::fs::FileExt;
        if start_byte.saturating_add(dst.len() as u64) > self.len {
            return Err("read past the end of the partition".into());
        }
        self.file.read_exact_at(dst, self.start + start_byte)?;
        Ok(())
    }
}

/// Opens the ext4 filesystem in partition `part` of `disk` (a block device or an image file)
/// for reading, without mounting it.
pub fn open_ext4(disk: &Path, part: &Partition) -> Result<ext4_view::Ext4> {
    let file = std::fs::File::open(disk).with_context(|| format!("opening {}", disk.display()))?;
    let reader = PartitionReader { file, start: part.start, len: part.len };
    ext4_view::Ext4::load(Box::new(reader))
        .map_err(|e| anyhow::anyhow!("{}: not an ext4 file system: {e}", part.label))
}

/// Reads `/etc/metrica/release.toml` from the ext4 root filesystem in partition `part` of
/// `disk`, without mounting it.
pub fn read_release(disk: &Path, part: &Partition) -> Result<crate::release::Release> {
    let fs = open_ext4(disk, part)?;
    let text = fs.read_to_string(crate::release::RELEASE_PATH).map_err(|e| {
        anyhow::anyhow!("{}: reading {}: {e}", part.label, crate::release::RELEASE_PATH)
    })?;
    crate::release::Release::from_toml(&text)
        .with_context(|| format!("{}: parsing {}", part.label, crate::release::RELEASE_PATH))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_nodes_follow_kernel_naming() {
        assert_eq!(partition_node(Path::new("/dev/vda"), 2), PathBuf::from("/dev/vda2"));
        assert_eq!(partition_node(Path::new("/dev/mmcblk0"), 7), PathBuf::from("/dev/mmcblk0p7"));
        assert_eq!(partition_node(Path::new("/dev/nvme0n1"), 1), PathBuf::from("/dev/nvme0n1p1"));
    }
}
