//! Partition I/O on a whole-disk file: one partition of it as a `Read + Write + Seek` stream
//! (what `fatfs` opens), optionally read-only, logging the reads on demand so a caller can
//! tell where on the disk a file's data lies.

use crate::disk::{self, Partition};
use crate::layout::CONFIG;
use anyhow::{bail, Context, Result};
use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::rc::Rc;

/// The reads done through a [`PartIo`] (offset in the partition, length), when logging.
pub(super) type ReadLog = Rc<RefCell<Option<Vec<(u64, usize)>>>>;

/// One partition of the disk file as a stream, optionally read-only, logging reads on demand.
pub(super) struct PartIo {
    file: File,
    start: u64,
    len: u64,
    pos: u64,
    writable: bool,
    log: ReadLog,
}

impl Read for PartIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (buf.len() as u64).min(self.len.saturating_sub(self.pos)) as usize;
        let got = self.file.read_at(&mut buf[..n], self.start + self.pos)?;
        if let Some(log) = self.log.borrow_mut().as_mut() {
            log.push((self.pos, got));
        }
        self.pos += got as u64;
        Ok(got)
    }
}

impl Write for PartIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !self.writable {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, "opened read-only"));
        }
        let n = (buf.len() as u64).min(self.len.saturating_sub(self.pos)) as usize;
        if n == 0 && !buf.is_empty() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "end of partition"));
        }
        let put = self.file.write_at(&buf[..n], self.start + self.pos)?;
        self.pos += put as u64;
        Ok(put)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for PartIo {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let pos = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
        };
        match pos {
            Some(p) if p <= self.len => {
                self.pos = p;
                Ok(p)
            }
            _ => Err(io::Error::new(io::ErrorKind::InvalidInput, "seek outside the partition")),
        }
    }
}

/// The `config` partition of `disk` (it must be partition 1: the firmware reads that one).
pub fn config_partition(disk: &Path) -> Result<Partition> {
    let p = disk::find_label(disk, CONFIG.label)?;
    if p.number != CONFIG.number {
        bail!(
            "{}: partition {:?} is number {}, but the firmware reads autoboot.txt from {}",
            disk.display(),
            CONFIG.label,
            p.number,
            CONFIG.number
        );
    }
    Ok(p)
}

pub(super) fn open_part(disk: &Path, p: &Partition, writable: bool) -> Result<(PartIo, ReadLog)> {
    let file = OpenOptions::new()
        .read(true)
        .write(writable)
        .open(disk)
        .with_context(|| format!("opening {}", disk.display()))?;
    let log: ReadLog = Rc::new(RefCell::new(None));
    Ok((PartIo { file, start: p.start, len: p.len, pos: 0, writable, log: log.clone() }, log))
}
