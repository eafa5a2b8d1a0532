//! `imager flash IMAGE TARGET`: writes an image (`.img`, or `.img.zst` decompressed as it
//! streams) to a block device or a file through its block map.
//!
//! The path reads as a chain: parse the `.bmap` -> check the target (not mounted, not the root
//! disk, large enough) -> check the image against the bmap (size, then every range's sha256:
//! a damaged image is refused before anything is written) -> ask -> write the mapped ranges
//! only -> fsync -> drop the target's cached pages and read every mapped range back against
//! its checksum -> optionally write one partition more (provisioning) and check it the same way.

use crate::bmap::{Bmap, MappedRange};
use crate::progress::Progress;
use crate::target::{self, Kind, Target};
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Size of one read or write.
const CHUNK: usize = 4 << 20;
/// A block device gets an fdatasync after this many bytes, so that the progress bar shows what
/// reached the card rather than what the page cache took.
const SYNC_EVERY: u64 = 256 << 20;
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// What to flash where.
#[derive(Debug, Clone)]
pub struct FlashOptions {
    pub image: PathBuf,
    /// The block map; default: found next to the image (see [`find_bmap`]).
    pub bmap: Option<PathBuf>,
    pub target: PathBuf,
    /// Read the written ranges back and check them (default on).
    pub verify: bool,
}

/// Bytes written over the flashed image at `offset` (a provision partition), after the image
/// has been written and verified; then read back and checked too.
#[derive(Debug, Clone)]
pub struct Overlay {
    /// What it is, for messages (e.g. "provision partition").
    pub what: String,
    pub offset: u64,
    pub bytes: Vec<u8>,
}

/// Says yes or no before a target is overwritten.
pub trait Confirm {
    /// `Ok(true)` to go on; an error when no one can be asked.
    fn confirm(&mut self, question: &str) -> Result<bool>;
}

impl<F: FnMut(&str) -> Result<bool>> Confirm for F {
    fn confirm(&mut self, question: &str) -> Result<bool> {
        self(question)
    }
}

/// `--yes`: no question.
#[derive(Debug)]
pub struct AssumeYes;

impl Confirm for AssumeYes {
    fn confirm(&mut self, _: &str) -> Result<bool> {
        Ok(true)
    }
}

/// Asks on the terminal; refuses when standard input is not one.
#[derive(Debug)]
pub struct AskTerminal;

impl Confirm for AskTerminal {
    fn confirm(&mut self, question: &str) -> Result<bool> {
        if !std::io::stdin().is_terminal() {
            bail!("{question}\nrefusing to write without confirmation: standard input is not a terminal; pass --yes to write anyway");
        }
        eprint!("{question}\nType 'yes' to go on: ");
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).context("reading the answer")?;
        Ok(matches!(line.trim(), "yes" | "y" | "YES" | "Yes"))
    }
}

/// The confirmation for `--yes` or its absence.
pub fn confirmation(yes: bool) -> Box<dyn Confirm> {
    if yes {
        Box::new(AssumeYes)
    } else {
        Box::new(AskTerminal)
    }
}

/// What a flash did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FlashReport {
    pub image: PathBuf,
    pub target: PathBuf,
    pub image_size: u64,
    pub mapped_bytes: u64,
    pub check_seconds: f64,
    pub write_seconds: f64,
    pub verify_seconds: Option<f64>,
    pub overlay_bytes: u64,
}

impl FlashReport {
    /// Write speed in MB/s (10^6 bytes), fsync included.
    pub fn write_mbps(&self) -> f64 {
        mbps(self.mapped_bytes, self.write_seconds)
    }

    /// A few lines for the terminal.
    pub fn summary(&self) -> String {
        let mb = |b: u64| format!("{:.1} MB", b as f64 / 1e6);
        let mut s = format!(
            "flashed {} to {}\n  image    {} ({} mapped, {:.0}%)\n  checked  image against its bmap in {:.1} s\n  written  {} in {:.1} s: {:.1} MB/s (fsync included)",
            self.image.display(),
            self.target.display(),
            mb(self.image_size),
            mb(self.mapped_bytes),
            100.0 * self.mapped_bytes as f64 / self.image_size.max(1) as f64,
            self.check_seconds,
            mb(self.mapped_bytes),
            self.write_seconds,
            self.write_mbps()
        );
        match self.verify_seconds {
            Some(v) => {
                s += &format!(
                    "\n  verified {} read back in {:.1} s: {:.1} MB/s",
                    mb(self.mapped_bytes),
                    v,
                    mbps(self.mapped_bytes, v)
                );
            }
            None => s += "\n  verified no (--no-verify)",
        }
        if self.overlay_bytes > 0 {
            s += &format!(
                "\n  provision partition written and verified ({})",
                mb(self.overlay_bytes)
            );
        }
        s
    }
}

fn mbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / 1e6 / secs.max(1e-9)
}

/// The bmap of `image`: `X.bmap` or `X.img.bmap` next to `X.img` / `X.img.zst`.
pub fn find_bmap(image: &Path) -> Result<PathBuf> {
    let name = image.file_name().unwrap_or_default().to_string_lossy().into_owned();
    let base = name.strip_suffix(".zst").unwrap_or(&name);
    let stem = base.strip_suffix(".img").unwrap_or(base);
    let candidates = [format!("{stem}.bmap"), format!("{base}.bmap")];
    let dir = image.parent().unwrap_or(Path::new("."));
    candidates.iter().map(|c| dir.join(c)).find(|p| p.is_file()).with_context(|| {
        format!(
            "{}: no block map found (looked for {}); pass --bmap FILE",
            image.display(),
            candidates
                .iter()
                .map(|c| dir.join(c).display().to_string())
                .collect::<Vec<_>>()
                .join(" and ")
        )
    })
}

/// Reads and parses a bmap file; errors name the file.
pub fn read_bmap(path: &Path) -> Result<Bmap> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Bmap::parse(&text).with_context(|| format!("{}: invalid block map", path.display()))
}

/// The image: a raw file read at offsets, or a zstd stream read once from the start.
#[derive(Debug)]
enum Source {
    Raw(File),
    Zstd(File),
}

/// One piece of a mapped range, in order; `end` is set on the range's last piece.
struct Piece<'a> {
    index: usize,
    offset: u64,
    bytes: &'a [u8],
    end: bool,
}

impl Source {
    fn open(path: &Path) -> Result<(Source, Option<u64>, (u64, u64))> {
        let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let meta = f.metadata()?;
        let mut magic = [0u8; 4];
        let n = f.read(&mut magic)?;
        if n == 4 && magic == ZSTD_MAGIC {
            // The imager's .img.zst records its decompressed size in the frame header.
            let mut head = vec![0u8; 18];
            let n = f.read_at(&mut head, 0)?;
            let size = zstd::zstd_safe::get_frame_content_size(&head[..n]).ok().flatten();
            Ok((Source::Zstd(f), size, (meta.dev(), meta.ino())))
        } else {
            Ok((Source::Raw(f), Some(meta.len()), (meta.dev(), meta.ino())))
        }
    }

    /// Feeds every mapped byte of the image to `sink`, range by range.
    fn stream(
        &self,
        image: &Path,
        bmap_path: &Path,
        bmap: &Bmap,
        sink: &mut dyn FnMut(Piece<'_>) -> Result<()>,
    ) -> Result<()> {
        let mut buf = vec![0u8; CHUNK];
        match self {
            Source::Raw(f) => {
                for (index, r) in bmap.ranges.iter().enumerate() {
                    let mut pos = r.start;
                    read_ahead(f, r.start, (r.end - r.start).min(READ_AHEAD));
                    while pos < r.end {
                        let n = (r.end - pos).min(CHUNK as u64) as usize;
                        if pos + READ_AHEAD < r.end {
                            read_ahead(
                                f,
                                pos + READ_AHEAD,
                                (r.end - pos - READ_AHEAD).min(CHUNK as u64),
                            );
                        }
                        f.read_exact_at(&mut buf[..n], pos)
                            .with_context(|| format!("reading {} at {pos}", image.display()))?;
                        sink(Piece {
                            index,
                            offset: pos,
                            bytes: &buf[..n],
                            end: pos + n as u64 == r.end,
                        })?;
                        pos += n as u64;
                    }
                }
                Ok(())
            }
            Source::Zstd(f) => {
                let mut file = f;
                file.seek(SeekFrom::Start(0))?;
                let mut dec = zstd::stream::read::Decoder::new(file)
                    .with_context(|| format!("opening the zstd stream of {}", image.display()))?;
                let mut at = 0u64;
                let read = |dec: &mut dyn Read, buf: &mut [u8], at: u64| -> Result<()> {
                    dec.read_exact(buf).map_err(|e| {
                        if e.kind() == std::io::ErrorKind::UnexpectedEof {
                            anyhow::anyhow!(
                                "{} does not match its block map {}: the image ends before byte {}, the bmap says it is {} bytes (ImageSize)",
                                image.display(),
                                bmap_path.display(),
                                at + buf.len() as u64,
                                bmap.image_size
                            )
                        } else {
                            anyhow::Error::new(e)
                                .context(format!("decompressing {} at {at}", image.display()))
                        }
                    })
                };
                for (index, r) in bmap.ranges.iter().enumerate() {
                    while at < r.start {
                        let n = (r.start - at).min(CHUNK as u64) as usize;
                        read(&mut dec, &mut buf[..n], at)?;
                        at += n as u64;
                    }
                    while at < r.end {
                        let n = (r.end - at).min(CHUNK as u64) as usize;
                        read(&mut dec, &mut buf[..n], at)?;
                        sink(Piece {
                            index,
                            offset: at,
                            bytes: &buf[..n],
                            end: at + n as u64 == r.end,
                        })?;
                        at += n as u64;
                    }
                }
                // The rest must end exactly at ImageSize.
                loop {
                    let n = dec
                        .read(&mut buf)
                        .with_context(|| format!("decompressing {}", image.display()))?;
                    if n == 0 {
                        break;
                    }
                    at += n as u64;
                }
                if at != bmap.image_size {
                    bail!(
                        "{} does not match its block map {}: the image is {at} bytes, the bmap says {} (ImageSize)",
                        image.display(),
                        bmap_path.display(),
                        bmap.image_size
                    );
                }
                Ok(())
            }
        }
    }
}

/// Checks every mapped range of the image against the bmap's checksums; the error names the
/// first range that differs. A raw image is hashed on every core, a range per thread.
fn check_image(
    source: &Source,
    image: &Path,
    bmap_path: &Path,
    bmap: &Bmap,
    progress: &Progress,
) -> Result<()> {
    let step = progress.bytes(bmap.mapped_bytes(), "checking image");
    if let Source::Raw(f) = source {
        if let Some((r, got)) = first_mismatch(f, image, &bmap.ranges, &step)? {
            bail!(mismatch(image, bmap_path, r, &got));
        }
        step.finish();
        return Ok(());
    }
    let mut h = Sha256::new();
    source.stream(image, bmap_path, bmap, &mut |p| {
        h.update(p.bytes);
        step.inc(p.bytes.len() as u64);
        if p.end {
            let got: [u8; 32] = h.finalize_reset().into();
            let r = &bmap.ranges[p.index];
            if got != r.sha256 {
                bail!(mismatch(image, bmap_path, r, &got));
            }
        }
        Ok(())
    })?;
    step.finish();
    Ok(())
}

/// Hashes the ranges of `f` (a range per thread, as many threads as cores, reading ahead) and
/// returns the first range, in order, whose sha256 differs from the bmap's.
fn first_mismatch<'r>(
    f: &File,
    name: &Path,
    ranges: &'r [MappedRange],
    step: &crate::progress::Step,
) -> Result<Option<(&'r MappedRange, [u8; 32])>> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    let next = AtomicUsize::new(0);
    let found: Mutex<Vec<(usize, [u8; 32])>> = Mutex::new(Vec::new());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 4);
    let work = || -> Result<()> {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(r) = ranges.get(i) else { return Ok(()) };
            let mut h = Sha256::new();
            let mut pos = r.start;
            read_ahead(f, r.start, r.len().min(READ_AHEAD));
            while pos < r.end {
                let n = (r.end - pos).min(CHUNK as u64) as usize;
                if pos + READ_AHEAD < r.end {
                    read_ahead(f, pos + READ_AHEAD, (r.end - pos - READ_AHEAD).min(CHUNK as u64));
                }
                f.read_exact_at(&mut buf[..n], pos)
                    .with_context(|| format!("reading {} at {pos}", name.display()))?;
                h.update(&buf[..n]);
                step.inc(n as u64);
                pos += n as u64;
            }
            let got: [u8; 32] = h.finalize().into();
            if got != r.sha256 {
                found.lock().expect("no panics while held").push((i, got));
            }
        }
    };
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads).map(|_| s.spawn(work)).collect();
        handles.into_iter().try_for_each(|h| h.join().expect("hashing thread panicked"))
    })?;
    let found = found.into_inner().expect("no panics while held");
    Ok(found.into_iter().min_by_key(|(i, _)| *i).map(|(i, got)| (&ranges[i], got)))
}

fn mismatch(what: &Path, bmap_path: &Path, r: &MappedRange, got: &[u8; 32]) -> String {
    format!(
        "{} does not match its block map {}: {r} has sha256 {}, the bmap says {}",
        what.display(),
        bmap_path.display(),
        hex::encode(got),
        hex::encode(r.sha256)
    )
}

/// An image with its block map: opened and sized ([`Image::open`]), then checked range by
/// range ([`Image::check`], once, however many targets it is written to).
#[derive(Debug)]
pub struct Image {
    path: PathBuf,
    bmap_path: PathBuf,
    bmap: Bmap,
    source: Source,
    inode: (u64, u64),
    check_seconds: Option<f64>,
}

impl Image {
    /// Reads the bmap (given, or found next to the image) and compares the image's size with
    /// it. Cheap; the checksums are [`Image::check`]'s.
    pub fn open(path: &Path, bmap: Option<&Path>) -> Result<Image> {
        let bmap_path = match bmap {
            Some(p) => p.to_path_buf(),
            None => find_bmap(path)?,
        };
        let map = read_bmap(&bmap_path)?;
        let (source, size, inode) = Source::open(path)?;
        if let Some(size) = size {
            if size != map.image_size {
                bail!(
                    "{} does not match its block map {}: the image is {size} bytes, the bmap says {} (ImageSize)",
                    path.display(),
                    bmap_path.display(),
                    map.image_size
                );
            }
        }
        Ok(Image {
            path: path.to_path_buf(),
            bmap_path,
            bmap: map,
            source,
            inode,
            check_seconds: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn bmap(&self) -> &Bmap {
        &self.bmap
    }

    /// Checks every mapped range against the bmap (once).
    pub fn check(&mut self, progress: &Progress) -> Result<()> {
        if self.check_seconds.is_none() {
            let t0 = Instant::now();
            check_image(&self.source, &self.path, &self.bmap_path, &self.bmap, progress)?;
            self.check_seconds = Some(t0.elapsed().as_secs_f64());
        }
        Ok(())
    }

    /// Looks at `path` and decides whether this image may be written to it; writes nothing.
    pub fn check_target(&self, path: &Path) -> Result<Target> {
        let target = Target::probe(path)?;
        if target.inode == Some(self.inode) {
            bail!(target::TargetError::IsTheImage { target: path.display().to_string() });
        }
        let mounts = target::read_mounts()?;
        target::check(&target, self.bmap.image_size, &mounts, &target::SysTopology)?;
        Ok(target)
    }

    /// The question asked before writing to `target`.
    pub fn question(&self, target: &Target) -> String {
        format!(
            "This overwrites everything on {} with {} ({:.1} GB).",
            target.describe(),
            self.path.display(),
            self.bmap.image_size as f64 / 1e9
        )
    }
}

/// Opens (or creates) the target for writing.
fn open_target(target: &Target, image_size: u64) -> Result<File> {
    let path = &target.path;
    let mut o = OpenOptions::new();
    o.read(true).write(true);
    match &target.kind {
        Kind::Missing => {
            let f = o
                .create_new(true)
                .open(path)
                .with_context(|| format!("creating {}", path.display()))?;
            f.set_len(image_size).with_context(|| format!("sizing {}", path.display()))?;
            Ok(f)
        }
        Kind::File { len, .. } => {
            let f = o.open(path).with_context(|| format!("opening {}", path.display()))?;
            if *len == 0 {
                f.set_len(image_size).with_context(|| format!("sizing {}", path.display()))?;
            }
            Ok(f)
        }
        Kind::Block { .. } => {
            // O_EXCL on a block device fails while the kernel holds it (mounted, in a RAID or
            // device-mapper table): a second guard after the mountinfo check.
            o.custom_flags(libc::O_EXCL).open(path).map_err(|e| {
                if e.raw_os_error() == Some(libc::EBUSY) {
                    anyhow::anyhow!("{}: is in use (mounted, or held by another program or the kernel); refusing to write", path.display())
                } else {
                    anyhow::Error::new(e).context(format!("opening {} for writing", path.display()))
                }
            })
        }
    }
}

/// Chunks read ahead of the one being read (`posix_fadvise(WILLNEED)`): keeps several reads in
/// flight, which a virtio disk or an SSD serves faster than one at a time.
const READ_AHEAD: u64 = 8 * CHUNK as u64;

/// Asks the kernel to start reading `len` bytes of `f` at `offset` (advisory).
fn read_ahead(f: &File, offset: u64, len: u64) {
    let _ = nix::fcntl::posix_fadvise(
        f.as_raw_fd(),
        offset as libc::off_t,
        len as libc::off_t,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
    );
}

/// Drops the cached pages of `f`, so that what follows is read from the device.
fn drop_cache(f: &File) {
    // Advisory: where it is not supported the read-back still checks the written data.
    let _ = nix::fcntl::posix_fadvise(
        f.as_raw_fd(),
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    );
}

/// Reads the ranges back from `f` and checks them; the error names the first that differs.
fn verify(
    f: &File,
    target: &Path,
    bmap_path: &Path,
    ranges: &[MappedRange],
    progress: &Progress,
    what: &str,
) -> Result<()> {
    let total = ranges.iter().map(MappedRange::len).sum();
    let step = progress.bytes(total, what);
    if let Some((r, got)) = first_mismatch(f, target, ranges, &step)? {
        bail!(
            "verification failed: {} read back differs from what was written: {r} has sha256 {}, expected {} (from {}); the card may be faulty or fake",
            target.display(),
            hex::encode(got),
            hex::encode(r.sha256),
            bmap_path.display()
        );
    }
    step.finish();
    Ok(())
}

/// Asks, then writes, syncs and verifies a checked image to a checked target. Nothing is
/// written when `confirm` says no.
pub fn write(
    image: &Image,
    target: &Target,
    verify_after: bool,
    overlay: Option<&Overlay>,
    confirm: &mut dyn Confirm,
    progress: &Progress,
) -> Result<FlashReport> {
    let Some(check_seconds) = image.check_seconds else {
        bail!("{}: not checked against its bmap yet", image.path.display());
    };
    if !confirm.confirm(&image.question(target))? {
        bail!("not confirmed: nothing written to {}", target.path.display());
    }
    let image_size = image.bmap.image_size;
    if let Some(o) = overlay {
        if o.offset + o.bytes.len() as u64 > image_size {
            bail!(
                "the {} (bytes {}..{}) lies outside the image ({image_size} bytes)",
                o.what,
                o.offset,
                o.offset + o.bytes.len() as u64
            );
        }
    }
    let out = open_target(target, image_size)?;
    let is_block = matches!(target.kind, Kind::Block { .. });
    let tpath = target.path.clone();

    let t0 = Instant::now();
    let step = progress.bytes(image.bmap.mapped_bytes(), "writing");
    let mut since_sync = 0u64;
    image.source.stream(&image.path, &image.bmap_path, &image.bmap, &mut |p| {
        out.write_all_at(p.bytes, p.offset)
            .with_context(|| format!("writing {} at {}", tpath.display(), p.offset))?;
        step.inc(p.bytes.len() as u64);
        since_sync += p.bytes.len() as u64;
        if is_block && since_sync >= SYNC_EVERY {
            out.sync_data().with_context(|| format!("syncing {}", tpath.display()))?;
            since_sync = 0;
        }
        Ok(())
    })?;
    out.sync_all().with_context(|| format!("syncing {}", tpath.display()))?;
    step.finish();
    let write_seconds = t0.elapsed().as_secs_f64();

    let mut verify_seconds = None;
    if verify_after {
        let t1 = Instant::now();
        drop_cache(&out);
        verify(&out, &tpath, &image.bmap_path, &image.bmap.ranges, progress, "verifying")?;
        verify_seconds = Some(t1.elapsed().as_secs_f64());
    }

    let mut overlay_bytes = 0;
    if let Some(o) = overlay {
        out.write_all_at(&o.bytes, o.offset)
            .with_context(|| format!("writing the {} to {}", o.what, tpath.display()))?;
        out.sync_all().with_context(|| format!("syncing {}", tpath.display()))?;
        drop_cache(&out);
        let mut back = vec![0u8; o.bytes.len()];
        out.read_exact_at(&mut back, o.offset)
            .with_context(|| format!("reading the {} back from {}", o.what, tpath.display()))?;
        if back != o.bytes {
            bail!(
                "verification failed: the {} read back from {} differs from what was written",
                o.what,
                tpath.display()
            );
        }
        overlay_bytes = o.bytes.len() as u64;
    }
    Ok(FlashReport {
        image: image.path.clone(),
        target: tpath,
        image_size,
        mapped_bytes: image.bmap.mapped_bytes(),
        check_seconds,
        write_seconds,
        verify_seconds,
        overlay_bytes,
    })
}

/// `imager flash`: open the image and its bmap, check the target, check the image, ask,
/// write, verify, and write the overlay (provisioning) if any.
pub fn flash(
    opts: &FlashOptions,
    overlay: Option<&Overlay>,
    confirm: &mut dyn Confirm,
    progress: &Progress,
) -> Result<FlashReport> {
    let mut image = Image::open(&opts.image, opts.bmap.as_deref())?;
    let target = image.check_target(&opts.target)?;
    image.check(progress)?;
    write(&image, &target, opts.verify, overlay, confirm, progress)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::{compress_zstd, data_ranges, sha256_file, write_bmap};
    use std::io::{Seek, SeekFrom, Write};

    /// A sparse 24 MiB image with three data regions (one ends in a partial block at the end)
    /// and its bmap and .zst, as `imager build` writes them.
    struct Fixture {
        dir: tempfile::TempDir,
        img: PathBuf,
        zst: PathBuf,
        bmap: PathBuf,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("test-1.0.0.img");
        let mut f = File::create(&img).unwrap();
        let size = (24 << 20) + 1000;
        f.set_len(size).unwrap();
        for (at, len, byte) in
            [(0u64, 70_000usize, 1u8), (9 << 20, 5 << 20, 2), (size - 3000, 3000, 3)]
        {
            f.seek(SeekFrom::Start(at)).unwrap();
            let data: Vec<u8> = (0..len).map(|i| byte.wrapping_add((i % 251) as u8)).collect();
            f.write_all(&data).unwrap();
        }
        f.sync_all().unwrap();
        drop(f);
        let zst = dir.path().join("test-1.0.0.img.zst");
        compress_zstd(&img, &zst, 3, &Progress::quiet()).unwrap();
        let bmap = dir.path().join("test-1.0.0.bmap");
        write_bmap(&img, &bmap).unwrap();
        Fixture { dir, img, zst, bmap }
    }

    fn opts(image: &Path, target: &Path) -> FlashOptions {
        FlashOptions { image: image.into(), bmap: None, target: target.into(), verify: true }
    }

    fn run(o: &FlashOptions) -> Result<FlashReport> {
        flash(o, None, &mut AssumeYes, &Progress::quiet())
    }

    fn err(o: &FlashOptions) -> String {
        format!("{:#}", run(o).unwrap_err())
    }

    #[test]
    fn flashes_img_and_zst_to_new_files_sparse_and_identical() {
        let fx = fixture();
        for src in [&fx.img, &fx.zst] {
            let out =
                fx.dir.path().join(format!("out-{}", src.extension().unwrap().to_string_lossy()));
            let r = run(&opts(src, &out)).unwrap();
            assert_eq!(
                sha256_file(&out).unwrap(),
                sha256_file(&fx.img).unwrap(),
                "{}",
                src.display()
            );
            assert_eq!(r.image_size, (24 << 20) + 1000);
            assert!(r.mapped_bytes < 6 << 20 && r.mapped_bytes >= (5 << 20) + 73_000, "{r:?}");
            assert!(r.verify_seconds.is_some());
            // Only the mapped ranges were written: the copy is as sparse as the image.
            let written: u64 =
                data_ranges(&File::open(&out).unwrap()).unwrap().iter().map(|(s, e)| e - s).sum();
            assert!(written <= r.mapped_bytes + (1 << 20), "{written} > {}", r.mapped_bytes);
            assert!(r.summary().contains("MB/s"));
        }
    }

    #[test]
    fn a_card_keeps_its_size_and_its_unmapped_bytes() {
        let fx = fixture();
        let card = fx.dir.path().join("card.img");
        std::fs::write(&card, vec![0xee; 40 << 20]).unwrap();
        run(&opts(&fx.img, &card)).unwrap();
        let bytes = std::fs::read(&card).unwrap();
        let img = std::fs::read(&fx.img).unwrap();
        assert_eq!(bytes.len(), 40 << 20, "a card is not truncated");
        assert_eq!(&bytes[..70_000], &img[..70_000]);
        assert_eq!(&bytes[9 << 20..14 << 20], &img[9 << 20..14 << 20]);
        // Unmapped ranges are skipped, not zeroed (as bmaptool does).
        assert_eq!(bytes[2 << 20], 0xee);
    }

    #[test]
    fn refuses_small_targets_mismatched_images_and_no_confirmation() {
        let fx = fixture();
        let small = fx.dir.path().join("small.img");
        std::fs::write(&small, vec![0xaa; 1 << 20]).unwrap();
        let e = err(&opts(&fx.img, &small));
        assert!(
            e.contains("small.img: too small: it holds 1048576 bytes, the image needs 25166824"),
            "{e}"
        );
        assert_eq!(std::fs::read(&small).unwrap(), vec![0xaa; 1 << 20], "nothing written");

        // A byte of the image changed after its bmap was written: named by range, refused
        // before writing, for the raw and the compressed image.
        let bad = fx.dir.path().join("bad.img");
        std::fs::copy(&fx.img, &bad).unwrap();
        let f = OpenOptions::new().write(true).open(&bad).unwrap();
        f.write_all_at(&[0xff], (9 << 20) + 12345).unwrap();
        let bad_zst = fx.dir.path().join("bad.img.zst");
        compress_zstd(&bad, &bad_zst, 3, &Progress::quiet()).unwrap();
        for image in [&bad, &bad_zst] {
            let out = fx.dir.path().join("never.img");
            let mut o = opts(image, &out);
            o.bmap = Some(fx.bmap.clone());
            let e = err(&o);
            assert!(
                e.contains("does not match its block map")
                    && e.contains(
                        "test-1.0.0.bmap: blocks 2304-3583 (bytes 9437184..14680064) has sha256"
                    ),
                "{e}"
            );
            assert!(!out.exists(), "nothing written for {}", image.display());
        }

        // An image of another size than its bmap says.
        let longer = fx.dir.path().join("longer.img");
        std::fs::copy(&fx.img, &longer).unwrap();
        OpenOptions::new().write(true).open(&longer).unwrap().set_len(30 << 20).unwrap();
        let mut o = opts(&longer, &fx.dir.path().join("never.img"));
        o.bmap = Some(fx.bmap.clone());
        let e = err(&o);
        assert!(
            e.contains("the image is 31457280 bytes, the bmap says 25166824 (ImageSize)"),
            "{e}"
        );
        let longer_zst = fx.dir.path().join("longer.img.zst");
        zstd::stream::copy_encode(
            File::open(&longer).unwrap(),
            File::create(&longer_zst).unwrap(),
            1,
        )
        .unwrap();
        o.image = longer_zst;
        let e = err(&o);
        assert!(
            e.contains("the image is 31457280 bytes, the bmap says 25166824 (ImageSize)"),
            "{e}"
        );
        assert!(!fx.dir.path().join("never.img").exists());

        // No bmap at all.
        let lone = fx.dir.path().join("lone.img");
        std::fs::copy(&fx.img, &lone).unwrap();
        let e = err(&opts(&lone, &fx.dir.path().join("never.img")));
        assert!(e.contains("lone.img: no block map found") && e.contains("--bmap"), "{e}");

        // A damaged bmap is named.
        let broken = fx.dir.path().join("broken.bmap");
        std::fs::write(
            &broken,
            std::fs::read_to_string(&fx.bmap)
                .unwrap()
                .replace("<BlockSize> 4096", "<BlockSize> 4097"),
        )
        .unwrap();
        let mut o = opts(&fx.img, &fx.dir.path().join("never.img"));
        o.bmap = Some(broken);
        let e = err(&o);
        assert!(e.contains("broken.bmap: invalid block map: <BmapFileChecksum>"), "{e}");

        // The image onto itself.
        let e = err(&opts(&fx.img, &fx.img));
        assert!(e.contains("is the image itself"), "{e}");

        // Said no, or no terminal: nothing written.
        let out = fx.dir.path().join("never.img");
        let mut asked = String::new();
        let e = flash(
            &opts(&fx.img, &out),
            None,
            &mut |q: &str| {
                asked = q.to_string();
                Ok(false)
            },
            &Progress::quiet(),
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("not confirmed: nothing written"), "{e:#}");
        assert!(asked.contains("new file") && asked.contains("never.img"), "{asked}");
        assert!(!out.exists());
    }

    #[test]
    fn writes_and_verifies_an_overlay() {
        let fx = fixture();
        let out = fx.dir.path().join("out.img");
        let overlay = Overlay {
            what: "provision partition".into(),
            offset: 16 << 20,
            bytes: vec![5u8; 1 << 20],
        };
        let r = flash(&opts(&fx.img, &out), Some(&overlay), &mut AssumeYes, &Progress::quiet())
            .unwrap();
        assert_eq!(r.overlay_bytes, 1 << 20);
        let bytes = std::fs::read(&out).unwrap();
        assert!(bytes[16 << 20..17 << 20].iter().all(|&b| b == 5));
        assert_eq!(&bytes[..70_000], &std::fs::read(&fx.img).unwrap()[..70_000]);
        // One outside the image is refused before writing.
        let out2 = fx.dir.path().join("out2.img");
        let far =
            Overlay { what: "provision partition".into(), offset: 24 << 20, bytes: vec![1; 4096] };
        assert!(
            flash(&opts(&fx.img, &out2), Some(&far), &mut AssumeYes, &Progress::quiet()).is_err()
        );
        assert!(!out2.exists());
    }

    /// Root only (CI runs as root): flash to a loop device, and refuse it once it is mounted.
    #[test]
    fn loop_device_when_root() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: the loop device test needs root");
            return;
        }
        let losetup = crate::cmd::tool("losetup");
        if !losetup.is_file() {
            eprintln!("skipped: losetup is not installed");
            return;
        }
        let fx = fixture();
        let backing = fx.dir.path().join("loop-backing.img");
        File::create(&backing).unwrap().set_len(32 << 20).unwrap();
        let out = std::process::Command::new(&losetup)
            .args(["--find", "--show"])
            .arg(&backing)
            .output()
            .unwrap();
        if !out.status.success() {
            eprintln!(
                "skipped: losetup could not attach a loop device: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return;
        }
        let dev = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        struct Detach(PathBuf, PathBuf);
        impl Drop for Detach {
            fn drop(&mut self) {
                let _ = std::process::Command::new(&self.0).arg("-d").arg(&self.1).status();
            }
        }
        let _detach = Detach(losetup, dev.clone());

        let r = run(&opts(&fx.zst, &dev)).unwrap();
        assert!(r.verify_seconds.is_some());
        let mut on_dev = vec![0u8; r.image_size as usize];
        File::open(&dev).unwrap().read_exact_at(&mut on_dev, 0).unwrap();
        assert_eq!(on_dev, std::fs::read(&fx.img).unwrap());

        // The backing file of the attached (unmounted) loop device may be written as a file.
        // Mounted (ext4 on the whole device), both the device and its backing file are refused.
        let mkfs = crate::cmd::tool("mkfs.ext4");
        let mnt = fx.dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let ok = std::process::Command::new(&mkfs)
            .args(["-q", "-F"])
            .arg(&dev)
            .status()
            .is_ok_and(|s| s.success())
            && std::process::Command::new("mount")
                .arg(&dev)
                .arg(&mnt)
                .status()
                .is_ok_and(|s| s.success());
        if !ok {
            eprintln!(
                "skipped the mounted part: could not make and mount ext4 on {}",
                dev.display()
            );
            return;
        }
        let e = err(&opts(&fx.img, &dev));
        let e2 = err(&opts(&fx.img, &backing));
        // Provisioning in place refuses it too.
        let args = crate::provision::DeviceArgs {
            device_id: Some("pi-1".into()),
            role: Some("camera-single".into()),
            segment: Some("canary".into()),
            hostname: Some("pi-1".into()),
            channel: Some("stable".into()),
            channel_url: Some("https://updates.example.com/fleet".into()),
            ..Default::default()
        };
        let device = crate::provision::single(&args).unwrap();
        let e3 = crate::provision::in_place(&dev, &device, &mut AssumeYes, &Progress::quiet())
            .map_err(|e| format!("{e:#}"))
            .unwrap_err();
        let _ = std::process::Command::new("umount").arg(&mnt).status();
        assert!(e3.contains("is mounted"), "{e3}");
        assert!(e.contains("is mounted") && e.contains(&mnt.display().to_string()), "{e}");
        assert!(e2.contains("backed by this file is mounted"), "{e2}");
    }
}
