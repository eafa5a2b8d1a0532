//! Where `imager flash` writes: a block device or a regular file, and the checks that keep it
//! from overwriting a disk in use (mounted, or holding the running root filesystem) or one too
//! small for the image.
//!
//! The decision ([`check`]) is pure: it takes the target, the parsed `/proc/self/mountinfo` and
//! a [`Topology`] (which partition belongs to which disk), so that it is tested with fakes; the
//! real topology is read from `/sys/dev/block`.

use anyhow::{Context, Result};
use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// A block device number (major, minor).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Dev {
    pub major: u32,
    pub minor: u32,
}

impl Dev {
    pub fn from_raw(raw: u64) -> Dev {
        Dev { major: nix::sys::stat::major(raw) as u32, minor: nix::sys::stat::minor(raw) as u32 }
    }

    /// Parses `MAJ:MIN`.
    pub fn parse(s: &str) -> Option<Dev> {
        let (a, b) = s.trim().split_once(':')?;
        Some(Dev { major: a.parse().ok()?, minor: b.parse().ok()? })
    }
}

impl fmt::Display for Dev {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub dev: Dev,
    pub mount_point: String,
    pub source: String,
}

/// Parses `/proc/self/mountinfo` (proc(5)): field 3 is MAJ:MIN, field 5 the mount point, and
/// the source follows the ` - fstype` separator. Lines that do not parse are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    let mut out = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else { continue };
        let (Some(dev), Some(mp)) = (fields.get(2).and_then(|d| Dev::parse(d)), fields.get(4))
        else {
            continue;
        };
        out.push(Mount {
            dev,
            mount_point: unescape(mp),
            source: fields.get(sep + 2).map(|s| unescape(s)).unwrap_or_default(),
        });
    }
    out
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = u32::from(b[i + 1] - b'0') * 64
                + u32::from(b[i + 2] - b'0') * 8
                + u32::from(b[i + 3] - b'0');
            out.push(u8::try_from(v).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Which whole disk a partition belongs to.
pub trait Topology {
    /// The whole disk of `dev` when `dev` is a partition, else `None`.
    fn whole_disk(&self, dev: Dev) -> Option<Dev>;
}

/// The kernel's view, from `/sys/dev/block/MAJ:MIN` (a partition's folder has a `partition`
/// file and sits inside its disk's folder).
#[derive(Debug, Default)]
pub struct SysTopology;

impl Topology for SysTopology {
    fn whole_disk(&self, dev: Dev) -> Option<Dev> {
        let dir = std::fs::canonicalize(format!("/sys/dev/block/{dev}")).ok()?;
        if !dir.join("partition").exists() {
            return None;
        }
        Dev::parse(&std::fs::read_to_string(dir.parent()?.join("dev")).ok()?)
    }
}

/// A fixed map, for tests.
impl Topology for HashMap<Dev, Dev> {
    fn whole_disk(&self, dev: Dev) -> Option<Dev> {
        self.get(&dev).copied()
    }
}

/// What the target path is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A block device of `size` bytes.
    Block { dev: Dev, size: u64, model: Option<String> },
    /// An existing regular file of `len` bytes (a "card" when it is not empty).
    File { len: u64, loop_devs: Vec<Dev> },
    /// No file yet: it is created with the image's size.
    Missing,
}

/// The target as found on disk.
#[derive(Debug, Clone)]
pub struct Target {
    pub path: PathBuf,
    pub kind: Kind,
    /// (st_dev, st_ino) of an existing file, to refuse flashing an image onto itself.
    pub inode: Option<(u64, u64)>,
}

impl Target {
    /// Looks at `path` (no writes).
    pub fn probe(path: &Path) -> Result<Target> {
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Target { path: path.to_path_buf(), kind: Kind::Missing, inode: None })
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let ft = meta.file_type();
        let kind = if ft.is_block_device() {
            let dev = Dev::from_raw(meta.rdev());
            let size = File::open(path)
                .and_then(|mut f| f.seek(SeekFrom::End(0)))
                .with_context(|| format!("reading the size of {}", path.display()))?;
            let model = std::fs::read_to_string(format!("/sys/dev/block/{dev}/device/model"))
                .ok()
                .map(|m| m.trim().to_string())
                .filter(|m| !m.is_empty());
            Kind::Block { dev, size, model }
        } else if ft.is_file() {
            Kind::File { len: meta.len(), loop_devs: loop_devices_backed_by(path) }
        } else {
            anyhow::bail!(
                "{}: is neither a block device nor a regular file (a {}); expected a disk such as /dev/sdX or an image file",
                path.display(),
                if ft.is_dir() { "folder" } else if ft.is_char_device() { "character device" } else { "special file" }
            );
        };
        Ok(Target { path: path.to_path_buf(), kind, inode: Some((meta.dev(), meta.ino())) })
    }

    /// Bytes the target can hold (`None`: a file, which grows).
    pub fn capacity(&self) -> Option<u64> {
        match &self.kind {
            Kind::Block { size, .. } => Some(*size),
            Kind::File { len, .. } if *len > 0 => Some(*len),
            _ => None,
        }
    }

    /// One line for the confirmation question.
    pub fn describe(&self) -> String {
        let gb = updater::units::size;
        match &self.kind {
            Kind::Block { size, model, .. } => format!(
                "block device {} ({}{})",
                self.path.display(),
                gb(*size),
                model.as_deref().map(|m| format!(", {m}")).unwrap_or_default()
            ),
            Kind::File { len, .. } => format!("file {} ({})", self.path.display(), gb(*len)),
            Kind::Missing => format!("new file {}", self.path.display()),
        }
    }
}

/// Loop devices whose backing file is `path` (from `/sys/block/loop*/loop/backing_file`).
fn loop_devices_backed_by(path: &Path) -> Vec<Dev> {
    let Ok(want) = std::fs::canonicalize(path) else { return Vec::new() };
    let Ok(entries) = std::fs::read_dir("/sys/block") else { return Vec::new() };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let dir = e.path();
        let Ok(backing) = std::fs::read_to_string(dir.join("loop/backing_file")) else { continue };
        if Path::new(backing.trim_end_matches('\n')) == want {
            if let Some(dev) =
                std::fs::read_to_string(dir.join("dev")).ok().and_then(|d| Dev::parse(&d))
            {
                out.push(dev);
            }
        }
    }
    out
}

/// Why a target is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TargetError {
    #[error("{target}: is on the disk that holds the running root filesystem ({device} on /); refusing to overwrite the disk this machine runs from")]
    HoldsRoot { target: String, device: String },
    #[error("{target}: {what} is mounted ({device} on {mount_point}); unmount it first")]
    Mounted { target: String, what: String, device: String, mount_point: String },
    #[error(
        "{target}: too small: it holds {} ({capacity} bytes), the image needs {} ({needed} bytes)",
        updater::units::size(*capacity),
        updater::units::size(*needed)
    )]
    TooSmall { target: String, capacity: u64, needed: u64 },
    #[error("{target}: is the image itself")]
    IsTheImage { target: String },
}

/// Decides whether `target` may receive an image of `image_size` bytes. Pure.
pub fn check(
    target: &Target,
    image_size: u64,
    mounts: &[Mount],
    topo: &dyn Topology,
) -> Result<(), TargetError> {
    let name = target.path.display().to_string();
    let disk_of = |d: Dev| topo.whole_disk(d).unwrap_or(d);
    // The devices whose mounts matter: the block device itself, or the loop devices that
    // expose a target file.
    let devs: Vec<Dev> = match &target.kind {
        Kind::Block { dev, .. } => vec![*dev],
        Kind::File { loop_devs, .. } => loop_devs.clone(),
        Kind::Missing => Vec::new(),
    };
    if let Kind::Block { dev, .. } = &target.kind {
        if let Some(root) = mounts.iter().find(|m| m.mount_point == "/") {
            if disk_of(root.dev) == disk_of(*dev) && root.dev.major != 0 {
                return Err(TargetError::HoldsRoot { target: name, device: root.source.clone() });
            }
        }
    }
    for d in &devs {
        for m in mounts {
            // The device itself, one of its partitions, or the whole disk it is part of.
            let hit = m.dev == *d || disk_of(m.dev) == *d || disk_of(*d) == m.dev;
            if hit {
                let what = if m.dev == *d {
                    format!("device {d}")
                } else if disk_of(m.dev) == *d {
                    format!("its partition {}", m.dev)
                } else {
                    format!("its disk {}", m.dev)
                };
                let what = match &target.kind {
                    Kind::File { .. } => format!("loop device {d} backed by this file"),
                    _ => what,
                };
                return Err(TargetError::Mounted {
                    target: name,
                    what,
                    device: m.source.clone(),
                    mount_point: m.mount_point.clone(),
                });
            }
        }
    }
    if let Some(capacity) = target.capacity() {
        if capacity < image_size {
            return Err(TargetError::TooSmall { target: name, capacity, needed: image_size });
        }
    }
    Ok(())
}

/// Reads this process's mount table.
pub fn read_mounts() -> Result<Vec<Mount>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .context("reading /proc/self/mountinfo (to refuse a mounted target)")?;
    Ok(parse_mountinfo(&text))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 8:2 / / rw,relatime - ext4 /dev/sda2 rw
43 27 8:17 / /media/my\\040card rw,relatime - vfat /dev/sdb1 rw
44 27 7:0 / /mnt/loop rw,relatime - ext4 /dev/loop0 rw
garbage line
";

    fn dev(major: u32, minor: u32) -> Dev {
        Dev { major, minor }
    }

    fn topo() -> HashMap<Dev, Dev> {
        // sda1, sda2 on sda (8:0); sdb1 on sdb (8:16); sdc1 on sdc (8:32).
        [
            (dev(8, 1), dev(8, 0)),
            (dev(8, 2), dev(8, 0)),
            (dev(8, 17), dev(8, 16)),
            (dev(8, 33), dev(8, 32)),
        ]
        .into_iter()
        .collect()
    }

    fn block(d: Dev, size: u64) -> Target {
        Target {
            path: PathBuf::from(format!("/dev/x{d}")),
            kind: Kind::Block { dev: d, size, model: None },
            inode: None,
        }
    }

    #[test]
    fn mountinfo_parses_and_unescapes() {
        let m = parse_mountinfo(MOUNTINFO);
        assert_eq!(m.len(), 4);
        assert_eq!(
            m[1],
            Mount { dev: dev(8, 2), mount_point: "/".into(), source: "/dev/sda2".into() }
        );
        assert_eq!(m[2].mount_point, "/media/my card");
        assert_eq!(m[2].source, "/dev/sdb1");
    }

    #[test]
    fn refuses_root_disk_mounted_and_small_targets() {
        let mounts = parse_mountinfo(MOUNTINFO);
        let t = topo();
        let err = |target: Target| check(&target, 1000, &mounts, &t).unwrap_err().to_string();
        // The root disk, its root partition and another partition of it.
        for d in [dev(8, 0), dev(8, 2), dev(8, 1)] {
            let e = err(block(d, 1 << 30));
            assert!(e.contains("holds the running root filesystem (/dev/sda2 on /)"), "{e}");
        }
        // A whole disk whose partition is mounted; the partition itself.
        let e = err(block(dev(8, 16), 1 << 30));
        assert!(e.contains("its partition 8:17 is mounted (/dev/sdb1 on /media/my card)"), "{e}");
        let e = err(block(dev(8, 17), 1 << 30));
        assert!(e.contains("device 8:17 is mounted"), "{e}");
        // A file behind a mounted loop device.
        let file = Target {
            path: "/tmp/card.img".into(),
            kind: Kind::File { len: 1 << 30, loop_devs: vec![dev(7, 0)] },
            inode: None,
        };
        let e = err(file);
        assert!(
            e.contains("loop device 7:0 backed by this file is mounted (/dev/loop0 on /mnt/loop)"),
            "{e}"
        );
        // Too small.
        let e = err(block(dev(8, 32), 999));
        assert!(
            e.contains(
                "too small: it holds 999 B (999 bytes), the image needs 1000 B (1000 bytes)"
            ),
            "{e}"
        );
        let small_file = Target {
            path: "/tmp/c.img".into(),
            kind: Kind::File { len: 10, loop_devs: vec![] },
            inode: None,
        };
        assert!(err(small_file).contains("too small"));
    }

    #[test]
    fn accepts_a_free_disk_an_empty_file_and_a_missing_one() {
        let mounts = parse_mountinfo(MOUNTINFO);
        let t = topo();
        check(&block(dev(8, 32), 1000), 1000, &mounts, &t).unwrap();
        for kind in [
            Kind::Missing,
            Kind::File { len: 0, loop_devs: vec![] },
            Kind::File { len: 5000, loop_devs: vec![dev(7, 3)] },
        ] {
            let target = Target { path: "/tmp/x.img".into(), kind, inode: None };
            check(&target, 1000, &mounts, &t).unwrap();
        }
        // A root on a virtual device (overlay, major 0) protects no block device.
        let overlay = parse_mountinfo("1 0 0:30 / / rw - overlay overlay rw\n");
        check(&block(dev(8, 0), 1000), 1000, &overlay, &t).unwrap();
    }

    #[test]
    fn probes_files_and_refuses_folders() {
        let dir = tempfile::tempdir().unwrap();
        let missing = Target::probe(&dir.path().join("new.img")).unwrap();
        assert_eq!(missing.kind, Kind::Missing);
        let f = dir.path().join("card.img");
        std::fs::write(&f, [0u8; 512]).unwrap();
        let card = Target::probe(&f).unwrap();
        assert_eq!(card.kind, Kind::File { len: 512, loop_devs: vec![] });
        assert_eq!(card.capacity(), Some(512));
        let e = format!("{:#}", Target::probe(dir.path()).unwrap_err());
        assert!(e.contains("is neither a block device nor a regular file (a folder)"), "{e}");
    }
}
