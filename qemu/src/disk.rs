//! Reading a disk image as the firmware does: the GPT, then FAT file systems on partitions,
//! through the `fatfs` crate on a window of the image file. No mounts, no loop devices, and
//! never a write: the image is opened read-only behind an adapter that refuses writes.

use crate::firmware::{
    AutobootFile, DiskSummary, PartitionSummary, AUTOBOOT, AUTOBOOT_PARTITION, CMDLINE, CONFIG,
    INITRAMFS, KERNEL,
};
use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

/// One GPT entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GptPartition {
    pub number: u32,
    pub label: String,
    pub start: u64,
    pub len: u64,
}

/// The used GPT entries of an image, in number order.
pub fn partitions(image: &Path) -> Result<Vec<GptPartition>> {
    let file = File::open(image).with_context(|| format!("opening {}", image.display()))?;
    let disk = gpt::GptConfig::new()
        .writable(false)
        .open_from_device(ReadOnly(file))
        .with_context(|| format!("reading the GPT of {}", image.display()))?;
    let lb = *disk.logical_block_size();
    let mut out = Vec::new();
    for (number, p) in disk.partitions() {
        if !p.is_used() {
            continue;
        }
        out.push(GptPartition {
            number: *number,
            label: p.name.clone(),
            start: p.bytes_start(lb).context("partition start")?,
            len: p.bytes_len(lb).context("partition length")?,
        });
    }
    Ok(out)
}

type Fat = fatfs::FileSystem<fscommon::BufStream<fscommon::StreamSlice<ReadOnly<File>>>>;

fn open_fat(image: &Path, p: &GptPartition) -> io::Result<Fat> {
    let file = File::open(image)?;
    let slice = fscommon::StreamSlice::new(ReadOnly(file), p.start, p.start + p.len)?;
    fatfs::FileSystem::new(fscommon::BufStream::new(slice), fatfs::FsOptions::new())
}

fn exists(fs: &Fat, name: &str) -> bool {
    fs.root_dir().open_file(name).is_ok()
}

fn read(fs: &Fat, name: &str) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    fs.root_dir().open_file(name)?.read_to_end(&mut buf)?;
    Ok(buf)
}

/// What the firmware sees: every partition (FAT or not, boot files or not) and autoboot.txt.
pub fn summarize(image: &Path) -> Result<DiskSummary> {
    let parts = partitions(image)?;
    let mut summaries = Vec::new();
    let mut autoboot =
        AutobootFile::Missing(format!("partition {AUTOBOOT_PARTITION} does not exist"));
    for p in &parts {
        let mut s =
            PartitionSummary { number: p.number, label: p.label.clone(), ..Default::default() };
        match open_fat(image, p) {
            Ok(fs) => {
                s.fat = true;
                s.has_config = exists(&fs, CONFIG);
                s.has_kernel = exists(&fs, KERNEL);
                if p.number == AUTOBOOT_PARTITION {
                    autoboot = match read(&fs, AUTOBOOT) {
                        Ok(bytes) => AutobootFile::Present(bytes),
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {
                            AutobootFile::Missing(format!(
                                "partition {AUTOBOOT_PARTITION} ({}) has no {AUTOBOOT}",
                                p.label
                            ))
                        }
                        Err(e) => AutobootFile::Missing(format!(
                            "reading {AUTOBOOT} on partition {AUTOBOOT_PARTITION}: {e}"
                        )),
                    };
                }
            }
            Err(e) => {
                if p.number == AUTOBOOT_PARTITION {
                    autoboot = AutobootFile::Missing(format!(
                        "partition {AUTOBOOT_PARTITION} ({}) is not FAT: {e}",
                        p.label
                    ));
                }
            }
        }
        summaries.push(s);
    }
    Ok(DiskSummary { partitions: summaries, autoboot })
}

/// The files the harness loads from a boot partition.
#[derive(Debug, Clone)]
pub struct BootFiles {
    pub kernel: Vec<u8>,
    pub initramfs: Option<Vec<u8>>,
    pub cmdline: String,
}

/// Reads kernel8.img, initramfs8 and cmdline.txt from partition `number`.
pub fn boot_files(image: &Path, number: u32) -> Result<BootFiles> {
    let parts = partitions(image)?;
    let Some(p) = parts.iter().find(|p| p.number == number) else {
        bail!("partition {number} does not exist in {}", image.display());
    };
    let fs = open_fat(image, p).with_context(|| format!("opening FAT on partition {number}"))?;
    let kernel =
        read(&fs, KERNEL).with_context(|| format!("reading {KERNEL} from partition {number}"))?;
    let initramfs = match read(&fs, INITRAMFS) {
        Ok(bytes) => Some(bytes),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).context(format!("reading {INITRAMFS} from partition {number}")),
    };
    let cmdline = match read(&fs, CMDLINE) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).context(format!("reading {CMDLINE} from partition {number}")),
    };
    Ok(BootFiles { kernel, initramfs, cmdline })
}

/// A file that can be read and seeked but refuses every write, so that reading the image can
/// never change what the guest will see.
#[derive(Debug)]
pub struct ReadOnly<T>(pub T);

impl<T: Read> Read for ReadOnly<T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl<T: Seek> Seek for ReadOnly<T> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.0.seek(pos)
    }
}

impl<T> Write for ReadOnly<T> {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::new(io::ErrorKind::PermissionDenied, "pi-qemu reads the image read-only"))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod testdisk {
    //! Builds small GPT + FAT images with the fatfs and gpt crates, for tests.
    use std::fs::{File, OpenOptions};
    use std::io::Write;
    use std::path::Path;

    pub enum Part<'a> {
        /// A FAT partition holding these files.
        Fat(&'a str, &'a [(&'a str, &'a [u8])]),
        /// A partition that is not FAT (zeros).
        Raw(&'a str),
    }

    const MIB: u64 = 1024 * 1024;

    /// Writes a disk with 4 MiB partitions in the given order.
    pub fn build(path: &Path, parts: &[Part]) {
        let size = (parts.len() as u64 + 2) * 4 * MIB;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .unwrap();
        file.set_len(size).unwrap();
        let mut disk = gpt::GptConfig::new().writable(true).create_from_device(file, None).unwrap();
        let mut spans = Vec::new();
        for part in parts {
            let (label, kind) = match part {
                Part::Fat(label, _) => (label, gpt::partition_types::BASIC),
                Part::Raw(label) => (label, gpt::partition_types::LINUX_FS),
            };
            let id = disk.add_partition(label, 4 * MIB, kind, 0, Some(2048)).unwrap();
            let p = disk.partitions()[&id].clone();
            spans.push((p.first_lba * 512, (p.last_lba + 1 - p.first_lba) * 512));
        }
        disk.write().unwrap();
        for (part, (start, len)) in parts.iter().zip(spans) {
            let Part::Fat(_, files) = part else { continue };
            let file = OpenOptions::new().read(true).write(true).open(path).unwrap();
            let mut slice = fscommon::StreamSlice::new(file, start, start + len).unwrap();
            fatfs::format_volume(&mut slice, fatfs::FormatVolumeOptions::new()).unwrap();
            let fs = fatfs::FileSystem::new(slice, fatfs::FsOptions::new()).unwrap();
            for (name, data) in *files {
                fs.root_dir().create_file(name).unwrap().write_all(data).unwrap();
            }
            fs.unmount().unwrap();
        }
        File::open(path).unwrap().sync_all().unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::testdisk::{build, Part};
    use super::*;
    use crate::firmware::{choose, BootRequest, FirmwareError, Selection};

    const AUTOBOOT_A: &[u8] =
        b"[all]\ntryboot_a_b=1\nboot_partition=2\n[tryboot]\nboot_partition=3\n";
    const BOOT: &[(&str, &[u8])] = &[
        ("kernel8.img", b"KERNEL"),
        ("initramfs8", b"INITRD"),
        ("cmdline.txt", b"console=ttyAMA0 quiet\n"),
        ("config.txt", b"arm_64bit=1\n"),
    ];

    #[test]
    fn reads_layout_autoboot_and_boot_files() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        build(
            &img,
            &[
                Part::Fat("config", &[("autoboot.txt", AUTOBOOT_A)]),
                Part::Fat("boot_a", BOOT),
                Part::Fat("boot_b", &[("config.txt", b"x"), ("kernel8.img", b"B")]),
                Part::Raw("root_a"),
            ],
        );
        let summary = summarize(&img).unwrap();
        assert_eq!(summary.autoboot, AutobootFile::Present(AUTOBOOT_A.to_vec()));
        let labels: Vec<_> =
            summary.partitions.iter().map(|p| (p.number, p.label.as_str(), p.bootable())).collect();
        assert_eq!(
            labels,
            [(1, "config", false), (2, "boot_a", true), (3, "boot_b", true), (4, "root_a", false)]
        );

        let c = choose(&summary, BootRequest { partition: 0, tryboot: true }).unwrap();
        assert_eq!(
            (c.partition, c.label.as_str(), c.selection),
            (3, "boot_b", Selection::Autoboot)
        );

        let files = boot_files(&img, 2).unwrap();
        assert_eq!(files.kernel, b"KERNEL");
        assert_eq!(files.initramfs.as_deref(), Some(&b"INITRD"[..]));
        assert_eq!(files.cmdline, "console=ttyAMA0 quiet\n");
        let files = boot_files(&img, 3).unwrap();
        assert_eq!((files.initramfs, files.cmdline.as_str()), (None, ""));
    }

    #[test]
    fn reading_never_writes() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        build(
            &img,
            &[Part::Fat("config", &[("autoboot.txt", AUTOBOOT_A)]), Part::Fat("boot_a", BOOT)],
        );
        let before = std::fs::read(&img).unwrap();
        summarize(&img).unwrap();
        boot_files(&img, 2).unwrap();
        assert!(std::fs::read(&img).unwrap() == before, "the image changed");
    }

    #[test]
    fn missing_autoboot_and_walk_on_a_real_image() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        build(
            &img,
            &[Part::Fat("config", &[]), Part::Fat("boot_a", BOOT), Part::Fat("boot_b", BOOT)],
        );
        let summary = summarize(&img).unwrap();
        assert_eq!(
            summary.autoboot,
            AutobootFile::Missing("partition 1 (config) has no autoboot.txt".into())
        );
        let c = choose(&summary, BootRequest::POWER_ON).unwrap();
        assert_eq!((c.partition, c.selection), (2, Selection::Default));

        build(&img, &[Part::Raw("config"), Part::Fat("boot_a", BOOT)]);
        let summary = summarize(&img).unwrap();
        assert!(matches!(&summary.autoboot, AutobootFile::Missing(m) if m.contains("is not FAT")));
        assert_eq!(choose(&summary, BootRequest::POWER_ON).unwrap().partition, 2);
    }

    #[test]
    fn boot_partition_without_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        build(
            &img,
            &[
                Part::Fat("config", &[("autoboot.txt", AUTOBOOT_A)]),
                Part::Fat("boot_a", &[("config.txt", b"x"), ("cmdline.txt", b"quiet")]),
            ],
        );
        let err = choose(&summarize(&img).unwrap(), BootRequest::POWER_ON).unwrap_err();
        assert_eq!(err, FirmwareError::NoKernel { partition: 2, label: "boot_a".into() });
    }

    #[test]
    fn no_bootable_partition() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        build(&img, &[Part::Fat("config", &[("autoboot.txt", AUTOBOOT_A)]), Part::Raw("root")]);
        let err = choose(&summarize(&img).unwrap(), BootRequest::POWER_ON).unwrap_err();
        assert!(matches!(err, FirmwareError::NoBootablePartition { .. }), "{err}");
    }

    #[test]
    fn not_a_gpt_disk() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("zeros.img");
        File::create(&img).unwrap().set_len(1024 * 1024).unwrap();
        let err = format!("{:#}", summarize(&img).unwrap_err());
        assert!(err.contains("reading the GPT of"), "{err}");
        let err = format!("{:#}", summarize(&dir.path().join("missing.img")).unwrap_err());
        assert!(err.contains("opening"), "{err}");
    }
}
