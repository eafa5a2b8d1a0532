//! `autoboot.txt` on the `config` partition: the device's [`BootSelector`].
//!
//! **Commit method.** `autoboot.txt` is a fixed 512-byte file (see `autoboot.rs`). A commit
//! finds, through `fatfs` opened read-only on the `config` partition of the disk, where the
//! file's one data sector lies on the disk, and rewrites that sector in place with one aligned
//! 512-byte `pwrite`, then `fsync`. Nothing else on the partition changes: not the FAT, not
//! the directory entry, not the size. A cut at any byte leaves the sector old, new, or a
//! prefix of new over old; since the two texts differ only in the digits of
//! `boot_partition`, every mix is a valid file naming one of the two slots, and an
//! unreadable sector sends the firmware on its partition walk (docs/slots.md explains what
//! that boots). The rewrite through `fatfs` (truncate and write) is used only to repair a
//! file that is missing or not in the fixed shape, when the firmware already walks.
//! Every write step has a failpoint (see `failpoint.rs`).

use super::partio::{config_partition, open_part};
use super::selector::{BootSelector, OnDisk, WriteMethod};
use crate::autoboot::{Autoboot, AUTOBOOT_SIZE};
use crate::failpoint;
use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Name of the file on the `config` partition.
pub const AUTOBOOT_FILE: &str = "autoboot.txt";

/// Failpoints of the in-place commit write, in order.
pub const COMMIT_FAILPOINTS: [&str; 2] = ["autoboot.write", "autoboot.after-fsync"];

/// `autoboot.txt` on the `config` partition of a whole disk (block device or image file).
#[derive(Debug, Clone)]
pub struct ConfigPartition {
    pub disk: PathBuf,
}

impl BootSelector for ConfigPartition {
    fn read(&self) -> Result<OnDisk> {
        read_autoboot(&self.disk)
    }

    fn write(&self, ab: &Autoboot) -> Result<WriteMethod> {
        write_autoboot(&self.disk, ab)
    }
}

/// Reads `autoboot.txt` from the `config` partition of `disk`, without writing anything.
pub fn read_autoboot(disk: &Path) -> Result<OnDisk> {
    let p = config_partition(disk)?;
    let (io, _) = open_part(disk, &p, false)?;
    let fs = match fatfs::FileSystem::new(io, fatfs::FsOptions::new()) {
        Ok(fs) => fs,
        Err(e) => return Ok(OnDisk::Invalid(format!("config file system: {e}"))),
    };
    let mut file = match fs.root_dir().open_file(AUTOBOOT_FILE) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(OnDisk::Missing),
        Err(e) => return Ok(OnDisk::Invalid(format!("opening {AUTOBOOT_FILE}: {e}"))),
    };
    let mut bytes = Vec::new();
    if let Err(e) = (&mut file).take(64 * 1024).read_to_end(&mut bytes) {
        return Ok(OnDisk::Invalid(format!("reading {AUTOBOOT_FILE}: {e}")));
    }
    Ok(match Autoboot::parse(&bytes) {
        Ok(a) => OnDisk::Valid(a),
        Err(e) => OnDisk::Invalid(e.to_string()),
    })
}

/// The byte offset on the disk of `autoboot.txt`'s data when the file has the fixed shape
/// (exactly [`AUTOBOOT_SIZE`] bytes in one sector-aligned run); `None` otherwise.
pub fn locate_autoboot(disk: &Path) -> Result<Option<u64>> {
    let p = config_partition(disk)?;
    let (io, log) = open_part(disk, &p, false)?;
    let Ok(fs) = fatfs::FileSystem::new(io, fatfs::FsOptions::new()) else { return Ok(None) };
    let Ok(mut file) = fs.root_dir().open_file(AUTOBOOT_FILE) else { return Ok(None) };
    let mut content = vec![0u8; AUTOBOOT_SIZE + 1];
    *log.borrow_mut() = Some(Vec::new());
    let n = read_full(&mut file, &mut content);
    let reads = log.borrow_mut().take().unwrap_or_default();
    if n != Some(AUTOBOOT_SIZE) {
        return Ok(None);
    }
    // The data reads must form one run of exactly one sector.
    let data: Vec<_> = reads.into_iter().filter(|&(_, len)| len > 0).collect();
    let Some(&(first, _)) = data.first() else { return Ok(None) };
    let mut next = first;
    for &(pos, len) in &data {
        if pos != next {
            return Ok(None);
        }
        next += len as u64;
    }
    if next - first != AUTOBOOT_SIZE as u64 || (p.start + first) % AUTOBOOT_SIZE as u64 != 0 {
        return Ok(None);
    }
    let offset = p.start + first;
    // Cross-check: the raw sector is the file's content.
    let mut raw = vec![0u8; AUTOBOOT_SIZE];
    File::open(disk)?.read_exact_at(&mut raw, offset)?;
    Ok((raw == content[..AUTOBOOT_SIZE]).then_some(offset))
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Option<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(_) => return None,
        }
    }
    Some(n)
}

/// Makes `autoboot.txt` on `disk` say `ab`, power-safely when the file has its fixed shape.
/// Reads the file back and checks it before returning.
pub fn write_autoboot(disk: &Path, ab: &Autoboot) -> Result<WriteMethod> {
    let bytes = ab.render();
    let method = match locate_autoboot(disk)? {
        Some(offset) => {
            let f = OpenOptions::new()
                .write(true)
                .open(disk)
                .with_context(|| format!("opening {} for the commit", disk.display()))?;
            if let Some(k) = failpoint::torn("autoboot.write", bytes.len()) {
                f.write_all_at(&bytes[..k], offset)?;
                f.sync_all()?;
                return Err(failpoint::PowerCut("autoboot.write".into()).into());
            }
            f.write_all_at(&bytes, offset)
                .with_context(|| format!("writing autoboot.txt at byte {offset}"))?;
            f.sync_all().with_context(|| format!("syncing {}", disk.display()))?;
            failpoint::hit("autoboot.after-fsync")?;
            WriteMethod::InPlace
        }
        None => {
            failpoint::hit("autoboot.before-rewrite")?;
            let p = config_partition(disk)?;
            let (io, _) = open_part(disk, &p, true)?;
            let fs = fatfs::FileSystem::new(io, fatfs::FsOptions::new())
                .context("opening the config file system")?;
            {
                let mut f =
                    fs.root_dir().create_file(AUTOBOOT_FILE).context("creating autoboot.txt")?;
                f.truncate().context("truncating autoboot.txt")?;
                f.write_all(&bytes).context("writing autoboot.txt")?;
                f.flush().context("flushing autoboot.txt")?;
            }
            fs.unmount().context("closing the config file system")?;
            File::open(disk)?.sync_all().with_context(|| format!("syncing {}", disk.display()))?;
            failpoint::hit("autoboot.after-rewrite")?;
            WriteMethod::Rewrite
        }
    };
    match read_autoboot(disk)? {
        OnDisk::Valid(found) if found == *ab => Ok(method),
        other => bail!("autoboot.txt reads back as {} after the write", other.describe()),
    }
}
