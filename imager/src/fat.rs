//! FAT filesystems inside a disk image, written with the `fatfs` crate (no mounts, no mtools).
//!
//! `fatfs` is built without its clock, so every timestamp is the FAT epoch and the result is
//! reproducible.

use anyhow::{bail, Context, Result};
use fscommon::{BufStream, StreamSlice};
use std::fs::File;
use std::io::{Read, Write};

/// A byte range of a disk image file.
#[derive(Debug, Clone, Copy)]
pub struct Region<'a> {
    pub file: &'a File,
    pub start: u64,
    pub len: u64,
}

impl<'a> Region<'a> {
    fn stream(&self) -> Result<BufStream<StreamSlice<&'a File>>> {
        Ok(BufStream::new(StreamSlice::new(self.file, self.start, self.start + self.len)?))
    }
}

/// Formats the region as FAT with `label` (at most 11 characters; upper-cased).
pub fn format(region: Region<'_>, label: &str, volume_id: u32) -> Result<()> {
    let label = label.to_ascii_uppercase();
    if label.len() > 11 {
        bail!("FAT label {label:?} is longer than 11 characters");
    }
    let mut bytes = [b' '; 11];
    bytes[..label.len()].copy_from_slice(label.as_bytes());
    // FAT16 below 64 MiB (FAT12 is not read by every firmware), FAT32 above.
    let fat_type =
        if region.len < 64 << 20 { fatfs::FatType::Fat16 } else { fatfs::FatType::Fat32 };
    let mut stream = region.stream()?;
    fatfs::format_volume(
        &mut stream,
        fatfs::FormatVolumeOptions::new()
            .volume_label(bytes)
            .volume_id(volume_id)
            .fat_type(fat_type),
    )
    .with_context(|| format!("formatting FAT {label}"))?;
    stream.flush()?;
    Ok(())
}

/// Opens the FAT filesystem in `region`.
pub fn open(region: Region<'_>) -> Result<fatfs::FileSystem<BufStream<StreamSlice<&File>>>> {
    fatfs::FileSystem::new(region.stream()?, fatfs::FsOptions::new())
        .context("opening FAT filesystem")
}

/// Writes files (`path` -> bytes) into the FAT filesystem of `region`, creating folders.
/// `name` is the partition name for errors.
pub fn write_files(region: Region<'_>, name: &str, files: &[(String, Vec<u8>)]) -> Result<()> {
    let fs = open(region)?;
    let needed: u64 = files.iter().map(|(_, b)| b.len() as u64).sum();
    let root = fs.root_dir();
    for (path, bytes) in files {
        let mut dir = root.clone();
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let (file_name, dirs) = parts.split_last().expect("split yields one part");
        for d in dirs {
            dir = match dir.open_dir(d) {
                Ok(existing) => existing,
                Err(_) => {
                    dir.create_dir(d).with_context(|| format!("{name}: creating folder {d}"))?
                }
            };
        }
        let mut f =
            dir.create_file(file_name).with_context(|| format!("{name}: creating {path}"))?;
        f.truncate()?;
        if let Err(e) = f.write_all(bytes) {
            if e.kind() == std::io::ErrorKind::UnexpectedEof || e.to_string().contains("No space") {
                bail!(
                    "partition {name} is too small for its content: it needs at least {} MiB for {} files, the recipe gives {} MiB",
                    (needed + (needed / 16) + (1 << 20)).div_ceil(1 << 20),
                    files.len(),
                    region.len >> 20
                );
            }
            return Err(e).with_context(|| format!("{name}: writing {path}"));
        }
    }
    drop(root);
    fs.unmount().with_context(|| format!("{name}: flushing FAT"))?;
    Ok(())
}

/// Reads a file from the FAT filesystem in `region`.
pub fn read_file(region: Region<'_>, path: &str) -> Result<Vec<u8>> {
    let fs = open(region)?;
    let mut f = fs
        .root_dir()
        .open_file(path.trim_start_matches('/'))
        .with_context(|| format!("opening {path}"))?;
    let mut out = Vec::new();
    f.read_to_end(&mut out)?;
    Ok(out)
}

/// Lists the files of the FAT filesystem in `region`, recursively, with sizes.
pub fn list(region: Region<'_>) -> Result<Vec<(String, u64)>> {
    let fs = open(region)?;
    let mut out = Vec::new();
    let mut stack = vec![(fs.root_dir(), String::new())];
    while let Some((dir, prefix)) = stack.pop() {
        for e in dir.iter() {
            let e = e?;
            let name = e.file_name();
            if name == "." || name == ".." {
                continue;
            }
            let path = format!("{prefix}/{name}");
            if e.is_dir() {
                stack.push((e.to_dir(), path));
            } else {
                out.push((path, e.len()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The volume label of the FAT filesystem in `region`.
pub fn label(region: Region<'_>) -> Result<String> {
    Ok(open(region)?.volume_label().trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_write_read_and_reproducible() {
        let dir = tempfile::tempdir().unwrap();
        let mut images = Vec::new();
        for name in ["a", "b"] {
            let path = dir.path().join(name);
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .unwrap();
            f.set_len(40 << 20).unwrap();
            let region = Region { file: &f, start: 4 << 20, len: 32 << 20 };
            format(region, "boot_a", 0x1234_5678).unwrap();
            let files = vec![
                ("cmdline.txt".to_string(), b"console=ttyAMA0\n".to_vec()),
                ("overlays/x.dtbo".into(), vec![9; 5000]),
            ];
            write_files(region, "boot_a", &files).unwrap();
            assert_eq!(read_file(region, "cmdline.txt").unwrap(), b"console=ttyAMA0\n");
            assert_eq!(label(region).unwrap(), "BOOT_A");
            assert_eq!(
                list(region).unwrap(),
                vec![("/cmdline.txt".into(), 16), ("/overlays/x.dtbo".into(), 5000)]
            );
            images.push(std::fs::read(&path).unwrap());
        }
        assert_eq!(images[0], images[1]);
        assert!(images[0][..4 << 20].iter().all(|&b| b == 0), "nothing written before the region");
    }

    #[test]
    fn full_partition_says_how_much_is_needed() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(16 << 20).unwrap();
        let region = Region { file: &f, start: 0, len: 16 << 20 };
        format(region, "config", 1).unwrap();
        let e = write_files(region, "config", &[("big".into(), vec![1; 20 << 20])]).unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains("partition config is too small") && e.contains("gives 16 MiB"), "{e}");
    }
}
