//! The initramfs: a gzip-compressed newc cpio archive, built without root or host tools.
//!
//! Entries are written in path order with fixed inode numbers and `SOURCE_DATE_EPOCH` as every
//! mtime; gzip's header carries no name or time. So the archive is reproducible. Kernel
//! modules go to `/lib/modules/<name>.ko` and their load order to `/etc/modules.order`, which
//! the `/init` script reads.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::io::Write;

/// One entry of the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir { mode: u32 },
    File { mode: u32, data: Vec<u8> },
    Symlink { target: String },
    CharDev { mode: u32, major: u32, minor: u32 },
}

/// The archive's contents by absolute path.
#[derive(Debug, Default)]
pub struct Initramfs {
    entries: BTreeMap<String, Entry>,
}

const DIRS: [&str; 12] = [
    "/bin",
    "/dev",
    "/etc",
    "/lib",
    "/lib/modules",
    "/newroot",
    "/proc",
    "/run",
    "/sbin",
    "/sys",
    "/tmp",
    "/usr",
];

impl Initramfs {
    /// The skeleton every initramfs has: the usual folders and `/dev/console`.
    pub fn new() -> Initramfs {
        let mut i = Initramfs::default();
        for d in DIRS {
            i.entries.insert(d.to_string(), Entry::Dir { mode: 0o755 });
        }
        // The kernel opens /dev/console for init before devtmpfs is mounted.
        i.entries.insert("/dev/console".into(), Entry::CharDev { mode: 0o600, major: 5, minor: 1 });
        i
    }

    /// Adds a file, creating its parent folders.
    pub fn add_file(&mut self, path: &str, mode: u32, data: Vec<u8>) -> Result<()> {
        if !path.starts_with('/') || path.ends_with('/') {
            bail!("initramfs path {path:?} must be absolute and name a file");
        }
        let mut parent = String::new();
        for part in path
            .trim_start_matches('/')
            .split('/')
            .collect::<Vec<_>>()
            .split_last()
            .expect("non-empty")
            .1
        {
            parent.push('/');
            parent.push_str(part);
            self.entries.entry(parent.clone()).or_insert(Entry::Dir { mode: 0o755 });
        }
        self.entries.insert(path.to_string(), Entry::File { mode, data });
        Ok(())
    }

    /// Adds kernel modules in load order, and `/etc/modules.order` naming them.
    pub fn add_modules(&mut self, modules: &[(String, Vec<u8>)]) -> Result<()> {
        let mut order = String::new();
        for (name, data) in modules {
            self.add_file(&format!("/lib/modules/{name}.ko"), 0o644, data.clone())?;
            order.push_str(name);
            order.push('\n');
        }
        self.add_file("/etc/modules.order", 0o644, order.into_bytes())
    }

    pub fn add_symlink(&mut self, path: &str, target: &str) {
        self.entries.insert(path.to_string(), Entry::Symlink { target: target.to_string() });
    }

    /// Writes the gzip-compressed cpio archive; every mtime is `epoch`.
    pub fn write(&self, out: impl Write, epoch: u64) -> Result<()> {
        let mtime = u32::try_from(epoch).context("SOURCE_DATE_EPOCH does not fit a cpio header")?;
        let mut gz = flate2::GzBuilder::new()
            .mtime(0)
            .operating_system(3)
            .write(out, flate2::Compression::new(6));
        for (ino, (path, entry)) in self.entries.iter().enumerate() {
            let name = path.trim_start_matches('/');
            let b = cpio::newc::Builder::new(name).ino(ino as u32 + 1).uid(0).gid(0).mtime(mtime);
            let (b, data): (_, &[u8]) = match entry {
                Entry::Dir { mode } => (b.mode(0o040000 | mode).nlink(2), &[]),
                Entry::File { mode, data } => (b.mode(0o100000 | mode).nlink(1), data),
                Entry::Symlink { target } => (b.mode(0o120777).nlink(1), target.as_bytes()),
                Entry::CharDev { mode, major, minor } => {
                    (b.mode(0o020000 | mode).nlink(1).rdev_major(*major).rdev_minor(*minor), &[])
                }
            };
            let len = u32::try_from(data.len())
                .with_context(|| format!("{path} is too large for cpio"))?;
            let mut w = b.write(&mut gz, len);
            w.write_all(data)?;
            w.finish()?;
        }
        cpio::newc::trailer(&mut gz)?;
        gz.finish()?.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn build(epoch: u64) -> Vec<u8> {
        let mut i = Initramfs::new();
        i.add_file("/init", 0o755, b"#!/bin/sh\n".to_vec()).unwrap();
        i.add_file("/usr/bin/updater", 0o755, vec![1, 2, 3]).unwrap();
        i.add_modules(&[("virtio_blk".into(), vec![0x7f]), ("ext4".into(), vec![0x7e])]).unwrap();
        i.add_symlink("/bin/sh", "busybox");
        let mut out = Vec::new();
        i.write(&mut out, epoch).unwrap();
        out
    }

    #[test]
    fn reproducible_and_readable() {
        assert_eq!(build(1_700_000_000), build(1_700_000_000));
        assert_ne!(build(1_700_000_000), build(1_700_000_001));
        let mut cpio = Vec::new();
        flate2::read::GzDecoder::new(&build(1)[..]).read_to_end(&mut cpio).unwrap();
        let mut r = &cpio[..];
        let mut seen = BTreeMap::new();
        loop {
            let mut entry = cpio::newc::Reader::new(r).unwrap();
            if entry.entry().is_trailer() {
                break;
            }
            let name = entry.entry().name().to_string();
            let mode = entry.entry().mode();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            seen.insert(name, (mode, data));
            r = entry.finish().unwrap();
        }
        assert_eq!(seen["init"], (0o100755, b"#!/bin/sh\n".to_vec()));
        assert_eq!(seen["etc/modules.order"].1, b"virtio_blk\next4\n");
        assert_eq!(seen["dev/console"].0, 0o020600);
        assert_eq!(seen["bin/sh"], (0o120777, b"busybox".to_vec()));
        assert!(seen.contains_key("usr/bin"), "parent folders are created");
        assert!(Initramfs::new().add_file("relative", 0o644, vec![]).is_err());
    }
}
