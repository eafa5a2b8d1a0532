//! `imager flash IMAGE TARGET`: writes an image (`.img`, or `.img.zst` decompressed as it
//! streams) to a block device or a file through its block map.
//!
//! The path reads as a chain: parse the `.bmap` -> check the target (not mounted, not the root
//! disk, large enough) -> check the image against the bmap (size, then every range's sha256:
//! a damaged image is refused before anything is written) -> ask -> write the mapped ranges
//! only, and while writing, window by window: make the window durable, drop its cached pages
//! and read its mapped ranges back against their checksums (a second thread) -> fsync ->
//! optionally write one partition more (provisioning) and check it the same way.

use crate::bmap::{Bmap, MappedRange};
use crate::progress::{Progress, Step};
use crate::target::{self, Kind, Target};
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;
use updater::durable::{self, Job, JustSettle, OnDurable, Span};

/// Size of one read or write.
const CHUNK: usize = 4 << 20;
/// The target is written, made durable, dropped from the page cache and read back in windows
/// of this many bytes of the target (windows are aligned to it; see [`write_ranges`]).
const WINDOW: u64 = 64 << 20;
/// The window on a block device (a card). After the last write only the last window is left
/// to read back, so its size is the verification's tail: 64 MiB at an SD card's 80 MB/s of
/// reads is 0.8 s, 16 MiB 0.2 s, for a sync every 16 MiB (under a second at card speed).
const CARD_WINDOW: u64 = 16 << 20;
/// Finished windows the writer may hand on before the settling thread has taken them, and
/// windows the settling thread may run ahead of the read-back: the writer is at most about
/// `LEAD + 1` windows ahead of what is on the device and `2 * LEAD + 1` ahead of what has been
/// read back, so that the progress bar shows the device's pace rather than the page cache's.
const LEAD: usize = 4;
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// Block size of the map made for `--nobmap`.
const BLOCK: u64 = 4096;

/// What to flash where.
#[derive(Debug, Clone)]
pub struct FlashOptions {
    pub image: PathBuf,
    /// The block map; default: found next to the image (see [`find_bmap`]).
    pub bmap: Option<PathBuf>,
    pub target: PathBuf,
    /// Read the written ranges back and check them (default on).
    pub verify: bool,
    /// No block map (`--nobmap`): write every byte, checked against the image's own checksums
    /// taken in a first pass (see [`Image::open_whole`]).
    pub whole: bool,
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
        eprint!("{question}\nType yes to write (anything else cancels): ");
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).context("reading the answer")?;
        Ok(accepts(&line))
    }
}

/// The answer that confirms: exactly `yes` (not `y`, not `YES`), as bmaptool's users expect a
/// destructive prompt to be strict.
pub fn accepts(answer: &str) -> bool {
    answer.trim_end_matches(['\n', '\r']) == "yes"
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
    /// The image's mapped ranges hashed against the bmap, before anything was written.
    pub check_seconds: f64,
    /// From the first write until the final `fsync` of the target returned. With verification
    /// the read-back of the written windows runs alongside, in its own thread, and may hold the
    /// writer back (see [`LEAD`]).
    pub write_seconds: f64,
    /// With verification: the time from the end of the final `fsync` until the last range had
    /// been read back and checked, i.e. the verification not done alongside the writing.
    pub verify_seconds: Option<f64>,
    pub overlay_bytes: u64,
}

impl FlashReport {
    /// Write speed in MiB/s, fsync (and with verification, the read-back done alongside)
    /// included.
    pub fn write_mib_per_sec(&self) -> f64 {
        updater::units::mib_per_sec(self.mapped_bytes, self.write_seconds)
    }

    /// A few lines for the terminal (IEC units, updater::units).
    pub fn summary(&self) -> String {
        use updater::units::{size, speed};
        let mut s = format!(
            "flashed {} to {}\n  image    {} ({} mapped, {:.0}%)\n  checked  image against its bmap in {:.1} s\n  written  {} in {:.1} s: {} (fsync included)",
            self.image.display(),
            self.target.display(),
            size(self.image_size),
            size(self.mapped_bytes),
            100.0 * self.mapped_bytes as f64 / self.image_size.max(1) as f64,
            self.check_seconds,
            size(self.mapped_bytes),
            self.write_seconds,
            speed(self.mapped_bytes, self.write_seconds)
        );
        match self.verify_seconds {
            Some(v) => {
                s += &format!(
                    "\n  verified {} read back while writing, done {:.1} s after the fsync",
                    size(self.mapped_bytes),
                    v
                );
            }
            None => s += "\n  verified no (--no-verify)",
        }
        if self.overlay_bytes > 0 {
            s += &format!(
                "\n  provision partition written and verified ({})",
                size(self.overlay_bytes)
            );
        }
        s
    }
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
        match self {
            Source::Raw(f) => stream_raw(f, image, bmap, sink),
            Source::Zstd(f) => stream_zstd(f, image, bmap_path, bmap, sink),
        }
    }
}

/// [`Source::stream`] of a raw image: each range read at its offset, reading ahead.
fn stream_raw(
    f: &File,
    image: &Path,
    bmap: &Bmap,
    sink: &mut dyn FnMut(Piece<'_>) -> Result<()>,
) -> Result<()> {
    let mut buf = vec![0u8; CHUNK];
    for (index, r) in bmap.ranges.iter().enumerate() {
        let mut pos = r.start;
        read_ahead(f, r.start, (r.end - r.start).min(READ_AHEAD));
        while pos < r.end {
            let n = (r.end - pos).min(CHUNK as u64) as usize;
            if pos + READ_AHEAD < r.end {
                read_ahead(f, pos + READ_AHEAD, (r.end - pos - READ_AHEAD).min(CHUNK as u64));
            }
            f.read_exact_at(&mut buf[..n], pos)
                .with_context(|| format!("reading {} at {pos}", image.display()))?;
            sink(Piece { index, offset: pos, bytes: &buf[..n], end: pos + n as u64 == r.end })?;
            pos += n as u64;
        }
    }
    Ok(())
}

/// [`Source::stream`] of a `.zst` image: decompressed once from the start, the bytes between
/// ranges read past; the image must end exactly at the bmap's `ImageSize`.
fn stream_zstd(
    f: &File,
    image: &Path,
    bmap_path: &Path,
    bmap: &Bmap,
    sink: &mut dyn FnMut(Piece<'_>) -> Result<()>,
) -> Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut file = f;
    file.seek(SeekFrom::Start(0))?;
    let mut dec = zstd::stream::read::Decoder::new(file)
        .with_context(|| format!("opening the zstd stream of {}", image.display()))?;
    let mut at = 0u64;
    let read = |dec: &mut dyn Read, buf: &mut [u8], at: u64| -> Result<()> {
        dec.read_exact(buf).map_err(|e| {
                // zstd's own errors carry an inner error; read_exact's end of data does not.
                if e.get_ref().is_some() {
                    anyhow::anyhow!(
                        "{}: the zstd stream is truncated or corrupt (it stopped before byte {} of the image): {e}",
                        image.display(),
                        at + buf.len() as u64
                    )
                } else if e.kind() == std::io::ErrorKind::UnexpectedEof {
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
            sink(Piece { index, offset: at, bytes: &buf[..n], end: at + n as u64 == r.end })?;
            at += n as u64;
        }
    }
    // The rest must end exactly at ImageSize.
    loop {
        let n = dec.read(&mut buf).with_context(|| format!("decompressing {}", image.display()))?;
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
            hash_span(f, name, r.start, r.end, &mut h, &mut buf, step)?;
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

/// Reads bytes `from..to` of `f` into `h`, a chunk at a time, with [`READ_AHEAD`] bytes asked
/// for ahead of the chunk being read.
fn hash_span(
    f: &File,
    name: &Path,
    from: u64,
    to: u64,
    h: &mut Sha256,
    buf: &mut [u8],
    step: &crate::progress::Step,
) -> Result<()> {
    let mut pos = from;
    read_ahead(f, from, (to - from).min(READ_AHEAD));
    while pos < to {
        let n = (to - pos).min(buf.len() as u64) as usize;
        if pos + READ_AHEAD < to {
            read_ahead(f, pos + READ_AHEAD, (to - pos - READ_AHEAD).min(buf.len() as u64));
        }
        f.read_exact_at(&mut buf[..n], pos)
            .with_context(|| format!("reading {} at {pos}", name.display()))?;
        h.update(&buf[..n]);
        step.inc(n as u64);
        pos += n as u64;
    }
    Ok(())
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

    /// The whole image as its own map (`--nobmap`): every byte is written, in ranges of
    /// [`CHUNK`] whose checksums are taken from the image in a first pass, so the read-back
    /// still verifies what reached the target. A `.img.zst` is decompressed twice.
    pub fn open_whole(path: &Path, progress: &Progress) -> Result<Image> {
        let t0 = Instant::now();
        let (source, size, inode) = Source::open(path)?;
        let (file, zstd) = match &source {
            Source::Raw(f) => (f.try_clone()?, false),
            Source::Zstd(f) => (f.try_clone()?, true),
        };
        let mut file = file;
        file.seek(SeekFrom::Start(0))?;
        let mut reader: Box<dyn Read> =
            if zstd { Box::new(zstd::stream::read::Decoder::new(file)?) } else { Box::new(file) };
        let step = progress.bytes(size.unwrap_or(0), "hashing the whole image (--nobmap)");
        let mut buf = vec![0u8; CHUNK];
        let (mut ranges, mut at) = (Vec::new(), 0u64);
        loop {
            let n = crate::output::read_zstd_piece(&mut reader, &mut buf, path, at)?;
            if n == 0 {
                break;
            }
            let end = at + n as u64;
            ranges.push(MappedRange {
                first: at / BLOCK,
                last: (end - 1) / BLOCK,
                start: at,
                end,
                sha256: Sha256::digest(&buf[..n]).into(),
            });
            step.inc(n as u64);
            at = end;
        }
        step.finish();
        if at == 0 {
            bail!("{}: the image is empty", path.display());
        }
        Ok(Image {
            path: path.to_path_buf(),
            bmap_path: PathBuf::from("(--nobmap: the image's own checksums)"),
            bmap: Bmap { image_size: at, block_size: BLOCK, ranges },
            source,
            inode,
            check_seconds: Some(t0.elapsed().as_secs_f64()),
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
            "This overwrites everything on {} with {} ({}).",
            target.describe(),
            self.path.display(),
            updater::units::size(self.bmap.image_size)
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

/// A finished window of the target: bytes `start..end` (`end` `None`: to the end of the
/// target) hold everything the writer writes there.
type Window = Span;

/// Cuts the target into windows as pieces are written. Window boundaries are multiples of
/// `size`; a window is finished as soon as the writer has written its last byte, or moves past
/// it over unmapped bytes. Finished windows follow each other from 0 without a gap.
#[derive(Debug)]
struct Windows {
    size: u64,
    /// Start of the window being filled.
    lo: u64,
    /// It holds written bytes.
    open: bool,
}

/// A step of writing a piece: write `len` of its bytes at `at`, or hand on a finished window.
#[derive(Debug, PartialEq, Eq)]
enum Cut {
    Write { at: u64, len: usize },
    Finished(Window),
}

impl Windows {
    fn new(size: u64) -> Windows {
        Windows { size, lo: 0, open: false }
    }

    /// The writes and finished windows of a piece of `len` bytes at `at`, in order.
    fn piece(&mut self, mut at: u64, len: usize) -> Vec<Cut> {
        let mut cuts = Vec::new();
        // Nothing is written between the open window's last byte and this piece: the window
        // ends at the last boundary before the piece.
        let floor = at / self.size * self.size;
        if self.open && floor > self.lo {
            cuts.push(Cut::Finished(Span { start: self.lo, end: Some(floor) }));
            (self.lo, self.open) = (floor, false);
        }
        let mut left = len;
        while left > 0 {
            let boundary = (at / self.size + 1) * self.size;
            let n = left.min((boundary - at) as usize);
            cuts.push(Cut::Write { at, len: n });
            (at, left, self.open) = (at + n as u64, left - n, true);
            if at == boundary {
                cuts.push(Cut::Finished(Span { start: self.lo, end: Some(at) }));
                (self.lo, self.open) = (at, false);
            }
        }
        cuts
    }

    /// The last window: the rest of the target.
    fn last(&self) -> Window {
        Span { start: self.lo, end: None }
    }
}

/// Called by the settling thread with each window once it is durable and out of the page cache,
/// just before it is read back: tests change the target there, as a faulty card would.
type BeforeReadBack<'a> = &'a (dyn Fn(Window) -> Result<()> + Sync);

/// Where the time of [`write_ranges`] went.
#[derive(Debug)]
struct Timings {
    /// From the first write until the target's final `fsync` returned.
    write_seconds: f64,
    /// With verification: from then until the last range had been read back and checked.
    verify_seconds: Option<f64>,
}

/// What the settling thread and the read-back threads of a [`Verifier`] share.
#[derive(Debug)]
struct ReadBack {
    /// Everything below this is durable and out of the page cache: it may be read back.
    durable: u64,
    /// No window comes any more.
    closed: bool,
    /// The next range to read back.
    taken: usize,
    /// Per range: read back and hashed up to here (its end once it matched).
    at: Vec<u64>,
    /// The first range not yet read back and matched (`at[low] < end`).
    low: usize,
    /// Ranges from this index on are not read back any more: the first range that differed,
    /// or 0 after an error.
    stop_at: usize,
    /// The first range that differed.
    bad: Option<Mismatch>,
}

/// A range that read back differently: its index and its sha256 as read back.
#[derive(Debug, Clone, Copy)]
struct Mismatch {
    range: usize,
    sha256: [u8; 32],
}

impl ReadBack {
    /// Everything below this offset has been read back and matched.
    fn checked_to(&mut self, ranges: &[MappedRange]) -> u64 {
        while ranges.get(self.low).is_some_and(|r| self.at[self.low] == r.end) {
            self.low += 1;
        }
        self.at.get(self.low).copied().unwrap_or(u64::MAX)
    }

    fn stopped(&self) -> bool {
        self.stop_at != usize::MAX
    }
}

/// The read-back of the written ranges against the bmap while the writing goes on. As the
/// settling thread's hook ([`OnDurable`]) it learns how far the target is durable, and holds
/// the settling thread back while the read-back is more than `lead` bytes behind; read-back
/// threads ([`Verifier::read_back`]) take the ranges in order, one each, hash each as far as it
/// is durable (a range may span many windows) and compare it when its last byte has been read.
struct Verifier<'a> {
    ranges: &'a [MappedRange],
    lead: u64,
    before_read_back: BeforeReadBack<'a>,
    state: Mutex<ReadBack>,
    changed: Condvar,
}

impl<'a> Verifier<'a> {
    fn new(ranges: &'a [MappedRange], lead: u64, before: BeforeReadBack<'a>) -> Verifier<'a> {
        let state = ReadBack {
            durable: 0,
            closed: false,
            taken: 0,
            at: ranges.iter().map(|r| r.start).collect(),
            low: 0,
            stop_at: usize::MAX,
            bad: None,
        };
        Verifier {
            ranges,
            lead,
            before_read_back: before,
            state: Mutex::new(state),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ReadBack> {
        self.state.lock().expect("no panics while held")
    }

    fn wait<'g>(&self, guard: MutexGuard<'g, ReadBack>) -> MutexGuard<'g, ReadBack> {
        self.changed.wait(guard).expect("no panics while held")
    }

    /// Changes the shared state and wakes everyone waiting on it.
    fn update(&self, f: impl FnOnce(&mut ReadBack)) {
        f(&mut self.lock());
        self.changed.notify_all();
    }

    /// A read-back thread: checks ranges until there are none left or the read-back stopped.
    fn read_back(&self, out: &File, tpath: &Path, step: &Step) -> Result<()> {
        let mut buf = vec![0u8; CHUNK];
        while let Some(i) = self.take() {
            let hashed = self.hash_range(i, out, tpath, &mut buf, step).inspect_err(|_| {
                self.update(|st| st.stop_at = 0);
            })?;
            let Some(sha256) = hashed else { return Ok(()) };
            self.update(|st| {
                if sha256 == self.ranges[i].sha256 {
                    st.at[i] = self.ranges[i].end;
                } else if st.bad.is_none_or(|b| i < b.range) {
                    st.bad = Some(Mismatch { range: i, sha256 });
                    st.stop_at = st.stop_at.min(i);
                }
            });
        }
        Ok(())
    }

    /// The next range to read back, unless the read-back stopped before it.
    fn take(&self) -> Option<usize> {
        let mut st = self.lock();
        let i = st.taken;
        (i < self.ranges.len() && i < st.stop_at).then(|| {
            st.taken += 1;
            i
        })
    }

    /// Hashes range `i` as it becomes durable; `None` when the read-back stopped first.
    fn hash_range(
        &self,
        i: usize,
        out: &File,
        tpath: &Path,
        buf: &mut [u8],
        step: &Step,
    ) -> Result<Option<[u8; 32]>> {
        let r = &self.ranges[i];
        let mut h = Sha256::new();
        let mut pos = r.start;
        while pos < r.end {
            let Some(to) = self.durable_after(i, pos) else { return Ok(None) };
            hash_span(out, tpath, pos, to, &mut h, buf, step)?;
            pos = to;
            if pos < r.end {
                self.update(|st| st.at[i] = pos);
            }
        }
        Ok(Some(h.finalize().into()))
    }

    /// Waits until bytes of range `i` from `pos` on are durable and says up to where; `None`
    /// when the read-back stopped, or the windows ended, first.
    fn durable_after(&self, i: usize, pos: u64) -> Option<u64> {
        let mut st = self.lock();
        loop {
            if st.stop_at <= i {
                return None;
            }
            if st.durable > pos {
                return Some(st.durable.min(self.ranges[i].end));
            }
            if st.closed {
                return None;
            }
            st = self.wait(st);
        }
    }

    /// The first range that read back differently, if any.
    fn mismatch(&self) -> Option<Mismatch> {
        self.lock().bad
    }
}

impl OnDurable for &Verifier<'_> {
    type Mark = ();
    type Error = anyhow::Error;

    /// Waits until the read-back is at most `lead` bytes behind `span`; stops once it stopped.
    fn admit(&mut self, span: Span) -> Result<bool> {
        let mut st = self.lock();
        while !st.stopped() && span.start > st.checked_to(self.ranges).saturating_add(self.lead) {
            st = self.wait(st);
        }
        Ok(!st.stopped())
    }

    fn durable(&mut self, span: Span) -> Result<()> {
        (self.before_read_back)(span)?;
        self.update(|st| st.durable = span.limit());
        Ok(())
    }

    fn closed(&mut self, failed: bool) {
        self.update(|st| {
            st.closed = true;
            if failed {
                st.stop_at = 0;
            }
        });
    }
}

/// The writing side of [`write_ranges`], on the calling thread.
struct Writer<'a> {
    image: &'a Image,
    out: &'a File,
    tpath: &'a Path,
    window: u64,
    step: &'a Step,
    /// Count progress as written (without verification; else the read-back counts it).
    count_written: bool,
}

impl Writer<'_> {
    /// Writes every mapped piece, starting its writeback at once, hands each finished window
    /// to the settling thread (which runs `hook`), hands on the rest of the target as the last
    /// window and `fsync`s the target (data and, for a file, its metadata). Returns when that
    /// `fsync` returned.
    fn run<H: OnDurable<Mark = (), Error = anyhow::Error>>(&self, hook: H) -> Result<Instant> {
        let label = self.tpath.display().to_string();
        let target = durable::Target { file: self.out, label: &label };
        durable::settle_while(target, LEAD, hook, |settler| {
            let send = |w: Window| {
                settler.send(Job::Settle(w)).map_err(|_| {
                    anyhow::anyhow!("the read-back of {} stopped", self.tpath.display())
                })
            };
            let mut windows = Windows::new(self.window);
            let image = self.image;
            image.source.stream(&image.path, &image.bmap_path, &image.bmap, &mut |p| {
                for cut in windows.piece(p.offset, p.bytes.len()) {
                    match cut {
                        Cut::Write { at, len } => {
                            let from = (at - p.offset) as usize;
                            self.write(&p.bytes[from..from + len], at)?;
                        }
                        Cut::Finished(w) => send(w)?,
                    }
                }
                Ok(())
            })?;
            send(windows.last())?;
            self.out.sync_all().with_context(|| format!("syncing {}", self.tpath.display()))?;
            Ok(Instant::now())
        })
    }

    fn write(&self, bytes: &[u8], at: u64) -> Result<()> {
        self.out
            .write_all_at(bytes, at)
            .with_context(|| format!("writing {} at {at}", self.tpath.display()))?;
        // Advisory: where it is not supported the window's wait writes it out.
        durable::start_writeback(self.out, Span::at(at, bytes.len() as u64));
        if self.count_written {
            self.step.inc(bytes.len() as u64);
        }
        Ok(())
    }
}

/// Writes the mapped ranges of `image` to `out` and, with `verify`, reads them back and checks
/// them while writing:
///
/// - the writer (the calling thread, [`Writer`]) writes each piece and at once starts writing
///   it out to the device (`sync_file_range(WRITE)`), so that the device works while the image
///   is read rather than at the final `fsync`. The target is cut into windows of `window`
///   bytes ([`Windows`], aligned to multiples of it and of the page size). At most [`LEAD`]
///   finished windows wait for the settling thread;
/// - the settling thread ([`durable::settle_while`]) takes the windows in order; for each it
///   waits until the window is on the device, drops its pages from the page cache
///   (`posix_fadvise(DONTNEED)`, as `dd oflag=nocache` does) and, with `verify`, tells the
///   read-back threads that everything below the window's end may be read back. It takes the
///   next window only when the read-back is at most `LEAD` windows behind;
/// - with `verify`, read-back threads (as many as cores, at most 4) check the ranges
///   ([`Verifier`]).
///
/// The first range that reads back differently stops the writing (within `2 * LEAD + 1`
/// windows; the rest is not written) and is the error, as in [`first_mismatch`]. After the last
/// piece the writer `fsync`s the target and waits for the read-back.
fn write_ranges(
    image: &Image,
    out: &File,
    tpath: &Path,
    verify: bool,
    window: u64,
    before_read_back: BeforeReadBack<'_>,
    progress: &Progress,
) -> Result<Timings> {
    let page = durable::page_size();
    let window = window.max(page).div_ceil(page) * page;
    let ranges = image.bmap.ranges.as_slice();
    let step = progress
        .bytes(image.bmap.mapped_bytes(), if verify { "writing and verifying" } else { "writing" });
    let readers = if verify {
        std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 4)
    } else {
        0
    };
    let verifier = Verifier::new(ranges, LEAD as u64 * window, before_read_back);
    let writer = Writer { image, out, tpath, window, step: &step, count_written: !verify };
    let t0 = Instant::now();
    let (wrote, read) = std::thread::scope(|s| {
        let (verifier, step) = (&verifier, &step);
        let readers: Vec<_> =
            (0..readers).map(|_| s.spawn(move || verifier.read_back(out, tpath, step))).collect();
        let wrote = if verify { writer.run(verifier) } else { writer.run(JustSettle::default()) };
        let read: Result<()> =
            readers.into_iter().try_for_each(|h| h.join().expect("a read-back thread panicked"));
        (wrote, read)
    });
    // A range read back wrong first: it is why the writer stopped; then the other errors.
    if let Some(Mismatch { range, sha256 }) = verifier.mismatch() {
        let r = &ranges[range];
        bail!(
            "verification failed: {} read back differs from what was written: {r} has sha256 {}, expected {} (from {}); the card may be faulty or fake",
            tpath.display(),
            hex::encode(sha256),
            hex::encode(r.sha256),
            image.bmap_path.display()
        );
    }
    read?;
    let written_at = wrote?;
    step.finish();
    let write_seconds = (written_at - t0).as_secs_f64();
    Ok(if verify {
        Timings { write_seconds, verify_seconds: Some(written_at.elapsed().as_secs_f64()) }
    } else {
        Timings { write_seconds: t0.elapsed().as_secs_f64(), verify_seconds: None }
    })
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
    let tpath = target.path.clone();
    let window = match target.kind {
        crate::target::Kind::Block { .. } => CARD_WINDOW,
        _ => WINDOW,
    };
    let Timings { write_seconds, verify_seconds } =
        write_ranges(image, &out, &tpath, verify_after, window, &|_| Ok(()), progress)?;

    let mut overlay_bytes = 0;
    if let Some(o) = overlay {
        out.write_all_at(&o.bytes, o.offset)
            .with_context(|| format!("writing the {} to {}", o.what, tpath.display()))?;
        out.sync_all().with_context(|| format!("syncing {}", tpath.display()))?;
        durable::drop_pages(&out, Span { start: 0, end: None });
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
    use crate::inspect::{expect_image, identify, Input};
    let hint = match identify(&opts.image)? {
        Input::Bundle | Input::RoleBundle => "flash writes a disk image (.img or .img.zst); a bundle is installed on a running device (`updater install`, `updater role apply`) or published (`imager publish`)",
        Input::Bmap => "flash writes a disk image (.img or .img.zst) and finds its block map next to it (or --bmap FILE)",
        _ => "flash writes a disk image (.img or .img.zst) made by `imager build`",
    };
    expect_image(&opts.image, hint)?;
    let mut image = if opts.whole {
        Image::open_whole(&opts.image, progress)?
    } else {
        Image::open(&opts.image, opts.bmap.as_deref())?
    };
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
        FlashOptions {
            image: image.into(),
            bmap: None,
            target: target.into(),
            verify: true,
            whole: false,
        }
    }

    fn run(o: &FlashOptions) -> Result<FlashReport> {
        flash(o, None, &mut AssumeYes, &Progress::quiet())
    }

    fn err(o: &FlashOptions) -> String {
        format!("{:#}", run(o).unwrap_err())
    }

    #[test]
    fn only_exactly_yes_confirms() {
        assert!(accepts("yes\n") && accepts("yes"));
        for no in ["y\n", "YES\n", "Yes\n", " yes\n", "yes please\n", "\n", ""] {
            assert!(!accepts(no), "{no:?}");
        }
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
            assert!(r.summary().contains("MiB/s"));
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
            e.contains("small.img: too small: it holds 1.0 MiB (1048576 bytes), the image needs 24.0 MiB (25166824 bytes)"),
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

    #[test]
    fn windows_are_cut_at_boundaries_and_follow_each_other_without_gaps() {
        let w = |start, end| Cut::Finished(Span { start, end: Some(end) });
        let write = |at, len| Cut::Write { at, len };
        let mut windows = Windows::new(100);
        // A piece across two boundaries is cut at them.
        assert_eq!(
            windows.piece(0, 250),
            [write(0, 100), w(0, 100), write(100, 100), w(100, 200), write(200, 50)]
        );
        // A piece beyond the open window's end finishes it at the last boundary before it.
        assert_eq!(windows.piece(420, 10), [w(200, 400), write(420, 10)]);
        // One that ends on a boundary finishes its window there.
        assert_eq!(windows.piece(430, 70), [write(430, 70), w(400, 500)]);
        // After a finished window, unmapped bytes join the next window.
        assert_eq!(windows.piece(750, 50), [write(750, 50), w(500, 800)]);
        assert_eq!(windows.last(), Span { start: 800, end: None });
    }

    /// Writes the fixture's image (raw or .zst) to a new file `name` with 256 KiB windows and
    /// verification, calling `hook` before each window is read back.
    fn write_windows(
        fx: &Fixture,
        src: &Path,
        name: &str,
        hook: BeforeReadBack<'_>,
    ) -> (Image, PathBuf, Result<Timings>) {
        let mut img = Image::open(src, Some(&fx.bmap)).unwrap();
        img.check(&Progress::quiet()).unwrap();
        let path = fx.dir.path().join(name);
        let out = OpenOptions::new().read(true).write(true).create_new(true).open(&path).unwrap();
        out.set_len(img.bmap.image_size).unwrap();
        let r = write_ranges(&img, &out, &path, true, 256 << 10, hook, &Progress::quiet());
        (img, path, r)
    }

    #[test]
    fn read_back_goes_window_by_window_behind_the_writer() {
        let fx = fixture();
        let image = std::fs::read(&fx.img).unwrap();
        for src in [&fx.img, &fx.zst] {
            let name = format!("out-{}", src.extension().unwrap().to_string_lossy());
            let path = fx.dir.path().join(&name);
            let seen = std::sync::Mutex::new(Vec::new());
            let hook = |w: Window| {
                // A window is handed on once the writer has written all of it.
                let on_target = std::fs::read(&path)?;
                let end = w.limit().min(image.len() as u64) as usize;
                assert_eq!(on_target[w.start as usize..end], image[w.start as usize..end], "{w:?}");
                seen.lock().unwrap().push(w);
                Ok(())
            };
            let (_, _, r) = write_windows(&fx, src, &name, &hook);
            let t = r.unwrap();
            assert!(t.verify_seconds.is_some());
            assert_eq!(std::fs::read(&path).unwrap(), image, "{}", src.display());
            // Windows follow each other from 0 to the end, on 256 KiB boundaries; the 5 MiB
            // range at 9 MiB spans 20 of them.
            let seen = seen.into_inner().unwrap();
            assert_eq!(seen.first().map(|w| w.start), Some(0));
            assert_eq!(seen.last().map(|w| w.end), Some(None));
            for pair in seen.windows(2) {
                assert_eq!(pair[0].end, Some(pair[1].start), "{seen:?}");
            }
            assert!(seen.iter().all(|w| w.start % (256 << 10) == 0), "{seen:?}");
            assert!(seen.len() >= 20, "{seen:?}");
        }
    }

    #[test]
    fn read_back_catches_a_corrupted_byte_and_stops_the_writing() {
        let fx = fixture();
        let size = (24u64 << 20) + 1000;
        // In the first range; in the 5 MiB range, inside a window and on a window's last byte;
        // and the image's last byte (in its partial last block).
        for at in [1000u64, (11 << 20) + 5, (12 << 20) - 1, size - 1] {
            let name = format!("card-{at}.img");
            let path = fx.dir.path().join(&name);
            let hook = |w: Window| {
                if (w.start..w.limit()).contains(&at) {
                    // The device returns another byte than was written (a faulty card).
                    let f = OpenOptions::new().read(true).write(true).open(&path)?;
                    let mut b = [0u8];
                    f.read_exact_at(&mut b, at)?;
                    f.write_all_at(&[!b[0]], at)?;
                }
                Ok(())
            };
            let (img, _, r) = write_windows(&fx, &fx.img, &name, &hook);
            let e = format!("{:#}", r.unwrap_err());
            let range = img.bmap.ranges.iter().find(|r| r.start <= at && at < r.end).unwrap();
            assert!(
                e.starts_with(&format!(
                    "verification failed: {} read back differs from what was written: {range} has sha256 ",
                    path.display()
                )) && e.contains("the card may be faulty or fake"),
                "{at}: {e}"
            );
            if at == 1000 {
                // The writer stopped a few windows later: the last range was never written.
                let bytes = std::fs::read(&path).unwrap();
                assert!(bytes[(size - 3000) as usize..].iter().all(|&b| b == 0));
                assert!(bytes[14 << 20..].iter().all(|&b| b == 0));
            }
        }
    }

    /// Root and loop devices only: flash to a loop device, and refuse it once it is mounted.
    /// Skipped (reported as ignored) unless run with `--ignored`; then a missing precondition
    /// is a failure, not a silent pass.
    #[test]
    #[ignore = "needs root and loop devices: run with --ignored"]
    fn loop_device_is_flashed_and_refused_once_mounted() {
        assert!(nix::unistd::Uid::effective().is_root(), "the loop device test needs root");
        let losetup = crate::cmd::tool("losetup");
        assert!(losetup.is_file(), "the loop device test needs losetup");
        let fx = fixture();
        let backing = fx.dir.path().join("loop-backing.img");
        File::create(&backing).unwrap().set_len(32 << 20).unwrap();
        let out = std::process::Command::new(&losetup)
            .args(["--find", "--show"])
            .arg(&backing)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "losetup could not attach a loop device: {}",
            String::from_utf8_lossy(&out.stderr)
        );
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
        assert!(ok, "could not make and mount ext4 on {}", dev.display());
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(&self.0).status();
            }
        }
        let unmount = Unmount(mnt.clone());
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
        drop(unmount);
        assert!(e3.contains("is mounted"), "{e3}");
        assert!(e.contains("is mounted") && e.contains(&mnt.display().to_string()), "{e}");
        assert!(e2.contains("backed by this file is mounted"), "{e2}");
    }
}
