//! Install an OS bundle into a slot: verify, then stream each image onto its partition.
//!
//! # API (stable; other modules code against it)
//!
//! ```text
//! install_bundle(source: Source, req: &InstallRequest, progress: &mut dyn Progress)
//!     -> Result<InstalledImages, InstallError>
//! Source::parse("-" | "http(s)://..." | path)          Source::{File, Stdin, Url, Reader, Fetch}
//! InstallRequest::new(disk, target_slot, &keyring, &policy)   .resume_file(Some(path)) etc.
//! trait Policy { fn check(&self, &Manifest) -> Result<(), Refusal> }  (DeviceFacts implements it)
//! acceptance::check_manifest(&Manifest, &DeviceFacts) -> Result<(), Refusal>   (pure)
//! progress_path(data_dir) -> data_dir/metrica/install-progress.json       (the resume record)
//! trait Progress { fn event(&mut self, &ProgressEvent) }: NoProgress, JsonLines, TerminalBar
//! read_manifest(source, &keyring) -> Result<VerifiedManifest, InstallError>  (verify only)
//! ```
//!
//! Order of work, and what each failure leaves behind:
//! 1. read `manifest.toml` + `.sig`, verify against the keyring (`InstallError::Bundle`);
//! 2. `policy.check` (`InstallError::Refused`), then every image must fit its partition of the
//!    target slot (`InstallError::DoesNotFit`). Nothing has been written up to here.
//! 3. per image: read its index (sha256 from the manifest), then per chunk: read, decompress,
//!    check its sha256, and only then write it at its place in the partition; every
//!    `checkpoint_bytes` fsync the partition and record the position in the resume file;
//!    at the end check the whole image's digest (`tree_sha256`: the list of chunks written,
//!    in order, each with the sha256 it was verified by) and fsync. The writeback, fsyncs and
//!    resume records run on a settling thread beside the writing ([`crate::durable`]). A
//!    resume record that does not lead to its image's index is dropped and the images are
//!    written from the start.
//! 4. rewrite the target boot partition's `cmdline.txt` with `root=PARTUUID=<target root>`
//!    (FAT through `fatfs`, no mount), fsync, delete the resume record.
//!
//! The caller records the slot as installed only after `Ok`. A power cut or dropped source
//! at any point is resumed by calling again with the same bundle: the resume record names the
//! bundle (manifest sha256), the slot and its partitions, the image and the next chunk.
//! Failpoints (see [`crate::failpoint`]): `install.before-first-write`, `install.write-chunk`
//! (torn), `install.before-sync`, `install.after-sync`, `install.progress.*` (resume record
//! writes), `install.image-verified`, `install.before-cmdline`, `install.after-cmdline`,
//! `install.before-clear-progress`, `install.done`.

pub use crate::acceptance::{check_manifest, DeviceFacts, Refusal};
use crate::bundle::{
    decode_chunk, is_zero_chunk, read_image_layout, read_verified_manifest, BundleCursor,
    BundleError, ChunkEntry, Fetch, FetchError, FileFetch, ImageLayout, Manifest, ReaderFetch,
    RetryPolicy, SlotClass, TreeHasher, VerifiedManifest, CHUNK_MAX, MAX_COMPRESSED_CHUNK,
};
use crate::disk::Partition;
use crate::durable::{self, DurableError, Job, OnDurable, Span};
use crate::failpoint::{self, PowerCut};
use crate::layout::Slot;
use crate::sign::Keyring;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::time::{Duration, Instant};
use thiserror::Error;
use uuid::Uuid;

/// Decides whether a verified manifest may be installed on this device.
pub trait Policy {
    fn check(&self, manifest: &Manifest) -> Result<(), Refusal>;
}

impl Policy for DeviceFacts {
    fn check(&self, manifest: &Manifest) -> Result<(), Refusal> {
        check_manifest(manifest, self)
    }
}

/// Accepts any bundle whose signature verified (tests, benchmarks, operator overrides).
#[derive(Debug, Clone, Copy, Default)]
pub struct AcceptAll;

impl Policy for AcceptAll {
    fn check(&self, _: &Manifest) -> Result<(), Refusal> {
        Ok(())
    }
}

/// Where a bundle comes from.
pub enum Source {
    File(PathBuf),
    /// Standard input, read once, forward only (resume skips what is already written).
    Stdin,
    /// An `http://` or `https://` URL, fetched with `Range` requests.
    Url(String),
    /// Any reader, read once like stdin.
    Reader(Box<dyn Read + Send>),
    /// Any [`Fetch`] implementation.
    Fetch(Box<dyn Fetch>),
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(p) => write!(f, "File({})", p.display()),
            Source::Stdin => f.write_str("Stdin"),
            Source::Url(u) => write!(f, "Url({u})"),
            Source::Reader(_) => f.write_str("Reader"),
            Source::Fetch(x) => write!(f, "Fetch({})", x.describe()),
        }
    }
}

impl Source {
    /// `-` is stdin, `http://` and `https://` are URLs, anything else a file path.
    pub fn parse(arg: &str) -> Source {
        if arg == "-" {
            Source::Stdin
        } else if arg.starts_with("http://") || arg.starts_with("https://") {
            Source::Url(arg.to_string())
        } else {
            Source::File(PathBuf::from(arg))
        }
    }

    fn into_fetch(
        self,
        http_timeout: Duration,
        ca_bundle: Option<&Path>,
    ) -> Result<Box<dyn Fetch>, FetchError> {
        use crate::http::HttpFetch;
        Ok(match self {
            Source::File(path) => Box::new(FileFetch { path }),
            Source::Stdin => Box::new(ReaderFetch::new(Box::new(std::io::stdin()), "stdin")),
            Source::Url(url) => match ca_bundle {
                None => Box::new(HttpFetch::new(&url, http_timeout)),
                Some(ca) => Box::new(HttpFetch::with_ca_bundle(&url, http_timeout, ca)?),
            },
            Source::Reader(r) => Box::new(ReaderFetch::new(r, "input stream")),
            Source::Fetch(f) => f,
        })
    }
}

/// Connect and read timeout of HTTP sources, unless a request says otherwise.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything an install needs besides the source and the progress sink.
pub struct InstallRequest<'a> {
    /// The whole disk: block device or disk image file.
    pub disk: &'a Path,
    /// The slot to write (the inactive one; the caller decides).
    pub target: Slot,
    pub keyring: &'a Keyring,
    pub policy: &'a dyn Policy,
    /// The resume record, normally [`progress_path`]; `None` disables resuming.
    pub resume_file: Option<PathBuf>,
    /// How often to fsync the partition and update the resume record.
    pub checkpoint_bytes: u64,
    pub retry: RetryPolicy,
    /// Connect and read timeout of HTTP sources.
    pub http_timeout: Duration,
    /// A PEM file of the only CA certificates HTTPS sources may chain to (`None`: the
    /// built-in Mozilla roots).
    pub ca_bundle: Option<PathBuf>,
}

impl<'a> InstallRequest<'a> {
    /// A request with defaults: no resume record, 64 MiB checkpoints, 6 retries, 30 s timeout.
    pub fn new(
        disk: &'a Path,
        target: Slot,
        keyring: &'a Keyring,
        policy: &'a dyn Policy,
    ) -> InstallRequest<'a> {
        InstallRequest {
            disk,
            target,
            keyring,
            policy,
            resume_file: None,
            checkpoint_bytes: 64 << 20,
            retry: RetryPolicy::default(),
            http_timeout: HTTP_TIMEOUT,
            ca_bundle: None,
        }
    }
}

/// The resume record of an install in progress: `<data>/metrica/install-progress.json`.
pub fn progress_path(data_dir: &Path) -> PathBuf {
    data_dir.join("metrica").join("install-progress.json")
}

/// What was installed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstalledImages {
    pub compatible: String,
    pub version: semver::Version,
    pub security_epoch: u64,
    /// Key id of the bundle's signer.
    pub key_id: String,
    /// sha256 of the manifest: identifies the bundle.
    pub manifest_sha256: String,
    pub slot: Slot,
    pub images: Vec<InstalledImage>,
    /// Bytes of image data skipped because a resume record said they were already written.
    pub resumed_bytes: u64,
}

/// One image written to its partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstalledImage {
    pub slot_class: SlotClass,
    /// Partition label, e.g. `root_b`.
    pub partition: String,
    pub partuuid: Uuid,
    pub size: u64,
    pub sha256: String,
}

/// Why an install failed. Callers branch on the kind: refusals and bad bundles are final for
/// this bundle; fetch errors may be retried later (resuming); a power cut is a test's cut.
#[derive(Debug, Error)]
pub enum InstallError {
    /// Malformed, unsigned, badly signed, corrupt or truncated bundle; or a fetch failure.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error("refused: {0}")]
    Refused(#[from] Refusal),
    #[error("{class} image ({size} bytes) does not fit partition {partition} ({available} bytes)")]
    DoesNotFit { class: SlotClass, size: u64, partition: String, available: u64 },
    /// A test's power cut (only where failpoints can be armed).
    #[cfg(any(test, feature = "failpoints"))]
    #[error(transparent)]
    PowerCut(#[from] PowerCut),
    /// Disk access failed (partition table, open, write, fsync, resume record).
    #[error("{0:#}")]
    Disk(anyhow::Error),
}

impl InstallError {
    /// Whether trying again later may succeed (network trouble), as opposed to a bundle that
    /// will never install here.
    pub fn is_transient(&self) -> bool {
        match self {
            InstallError::Bundle(BundleError::Fetch(FetchError::Status { status, .. })) => {
                !(400..500).contains(status)
            }
            InstallError::Bundle(BundleError::Fetch(_)) | InstallError::Disk(_) => true,
            _ => false,
        }
    }
}

/// Without failpoints no power cut is ever made; were one made, it would be a disk error.
#[cfg(not(any(test, feature = "failpoints")))]
impl From<PowerCut> for InstallError {
    fn from(cut: PowerCut) -> Self {
        InstallError::Disk(cut.into())
    }
}

fn disk_err(e: impl Into<anyhow::Error>, what: impl std::fmt::Display) -> InstallError {
    let e: anyhow::Error = e.into();
    #[cfg(any(test, feature = "failpoints"))]
    let e = match e.downcast::<PowerCut>() {
        Ok(cut) => return InstallError::PowerCut(cut),
        Err(e) => e,
    };
    InstallError::Disk(e.context(what.to_string()))
}

/// Something that shows install progress: a bar on a terminal, JSON lines in a log.
pub trait Progress {
    fn event(&mut self, event: &ProgressEvent);
}

/// What an install reports, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ProgressEvent {
    /// The manifest's signature verified.
    Verified {
        compatible: String,
        version: String,
        key_id: String,
    },
    /// A resume record was found for this bundle: `skipped` bytes of `image` are already there.
    Resuming {
        image: SlotClass,
        skipped: u64,
    },
    ImageStarted {
        image: SlotClass,
        partition: String,
        size: u64,
    },
    /// `done` of `total` bytes of `image` are verified and written.
    Written {
        image: SlotClass,
        done: u64,
        total: u64,
    },
    ImageVerified {
        image: SlotClass,
        sha256: String,
    },
    /// A read failed and is tried again from `offset`.
    Retrying {
        offset: u64,
        attempt: u32,
        error: String,
    },
    /// `cmdline.txt` of `partition` now names the target root.
    CmdlineFixed {
        partition: String,
    },
    Finished {
        version: String,
        bytes_read: u64,
    },
}

/// Ignores progress.
#[derive(Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn event(&mut self, _: &ProgressEvent) {}
}

impl Progress for Vec<ProgressEvent> {
    fn event(&mut self, event: &ProgressEvent) {
        self.push(event.clone());
    }
}

/// How `updater install` shows its progress on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressStyle {
    /// A redrawn bar on an interactive terminal; plain lines anywhere else (a pipe, a file,
    /// the system console or a serial console, `TERM=dumb`); JSON lines with `--log-file`.
    Auto,
    /// The redrawn bar, wherever stderr is.
    Bar,
    /// Plain text lines, never redrawn: one per step and per tenth of each image.
    Plain,
    /// JSON lines (the progress events), never redrawn.
    Json,
}

impl ProgressStyle {
    /// What `Auto` means for a stderr attached to `tty` (the device it is a terminal of, or
    /// `None`) under `$TERM` `term`.
    pub fn resolve(self, tty: Option<&Path>, term: Option<&str>) -> ProgressStyle {
        if self != ProgressStyle::Auto {
            return self;
        }
        let watched = tty.is_some_and(|t| !is_console(t));
        let dumb = term.is_none_or(|t| t.is_empty() || t == "dumb");
        if watched && !dumb {
            ProgressStyle::Bar
        } else {
            ProgressStyle::Plain
        }
    }

    /// [`ProgressStyle::resolve`] for this process's stderr.
    pub fn for_stderr(self) -> ProgressStyle {
        use std::io::IsTerminal;
        let tty = std::io::stderr()
            .is_terminal()
            .then(|| std::fs::read_link("/proc/self/fd/2").ok())
            .flatten();
        self.resolve(tty.as_deref(), std::env::var("TERM").ok().as_deref())
    }
}

/// Whether a terminal device is the system console or a serial line (where a bar redrawn
/// with `\r` becomes a wall of partial lines in the console log).
pub fn is_console(tty: &Path) -> bool {
    let Some(name) = tty.to_str().and_then(|t| t.strip_prefix("/dev/")) else { return false };
    const SERIAL: [&str; 8] =
        ["ttyS", "ttyAMA", "ttyUSB", "ttyACM", "hvc", "ttyGS", "ttyLP", "ttyO"];
    name == "console" || SERIAL.iter().any(|p| name.strip_prefix(p).is_some_and(is_number))
}

fn is_number(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// Lets `written` events through at most once per tenth of each image (and the last one).
#[derive(Debug, Default)]
struct Tenths(Option<(SlotClass, u64)>);

impl Tenths {
    fn due(&mut self, image: SlotClass, done: u64, total: u64) -> bool {
        let tenth = done * 10 / total.max(1);
        if done != total && self.0 == Some((image, tenth)) {
            return false;
        }
        self.0 = Some((image, tenth));
        true
    }
}

/// One JSON object per line; `written` events at most every 10 %.
#[derive(Debug)]
pub struct JsonLines<W: Write> {
    out: W,
    tenths: Tenths,
}

impl<W: Write> JsonLines<W> {
    pub fn new(out: W) -> JsonLines<W> {
        JsonLines { out, tenths: Tenths::default() }
    }
}

impl<W: Write> Progress for JsonLines<W> {
    fn event(&mut self, event: &ProgressEvent) {
        if let ProgressEvent::Written { image, done, total } = event {
            if !self.tenths.due(*image, *done, *total) {
                return;
            }
        }
        if let Ok(line) = serde_json::to_string(event) {
            let _ = writeln!(self.out, "{line}");
        }
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1048576.0
}

/// The text of an event as one line (the bar draws `written` itself).
fn describe(event: &ProgressEvent) -> String {
    match event {
        ProgressEvent::Verified { compatible, version, key_id } => {
            format!("bundle {compatible} {version}, signed by key {key_id}")
        }
        ProgressEvent::Resuming { image, skipped } => {
            format!("resuming {image} after {skipped} bytes already written")
        }
        ProgressEvent::ImageStarted { image, partition, size } => {
            format!("{image}: writing {:.1} MiB to {partition}", mib(*size))
        }
        ProgressEvent::Written { image, done, total } => format!(
            "{image}: {:>3}% ({:.1} of {:.1} MiB)",
            done * 100 / (*total).max(1),
            mib(*done),
            mib(*total)
        ),
        ProgressEvent::ImageVerified { image, sha256 } => {
            format!("{image}: verified, sha256 {sha256}")
        }
        ProgressEvent::Retrying { offset, attempt, error } => {
            format!("retry {attempt} from byte {offset}: {error}")
        }
        ProgressEvent::CmdlineFixed { partition } => {
            format!("cmdline.txt on {partition} names the new root")
        }
        ProgressEvent::Finished { version, .. } => format!("installed {version}"),
    }
}

/// Plain text lines for a console, a pipe or a log: never redrawn; `written` at most every
/// 10 % of each image.
#[derive(Debug)]
pub struct PlainLines<W: Write> {
    out: W,
    tenths: Tenths,
}

impl<W: Write> PlainLines<W> {
    pub fn new(out: W) -> PlainLines<W> {
        PlainLines { out, tenths: Tenths::default() }
    }
}

impl<W: Write> Progress for PlainLines<W> {
    fn event(&mut self, event: &ProgressEvent) {
        if let ProgressEvent::Written { image, done, total } = event {
            if !self.tenths.due(*image, *done, *total) {
                return;
            }
        }
        let _ = writeln!(self.out, "{}", describe(event)).and_then(|()| self.out.flush());
    }
}

/// A one-line progress bar for a terminal (redrawn with `\r`, at most 10 times a second).
#[derive(Debug)]
pub struct TerminalBar<W: Write> {
    out: W,
    last: Option<Instant>,
    started: Instant,
}

impl<W: Write> TerminalBar<W> {
    pub fn new(out: W) -> TerminalBar<W> {
        TerminalBar { out, last: None, started: Instant::now() }
    }
}

impl<W: Write> Progress for TerminalBar<W> {
    fn event(&mut self, event: &ProgressEvent) {
        let _ = match event {
            ProgressEvent::Written { image, done, total } => {
                if done != total
                    && self.last.is_some_and(|t| t.elapsed() < Duration::from_millis(100))
                {
                    return;
                }
                self.last = Some(Instant::now());
                let pct = done * 100 / (*total).max(1);
                let filled = (pct / 5) as usize;
                let rate = mib(*done) / self.started.elapsed().as_secs_f64().max(0.001);
                write!(
                    self.out,
                    "\r{image:>4} [{}{}] {pct:>3}% {:>7.1} MiB {rate:>6.1} MiB/s",
                    "#".repeat(filled),
                    " ".repeat(20 - filled),
                    mib(*done)
                )
                .and_then(|()| if done == total { writeln!(self.out) } else { Ok(()) })
            }
            ProgressEvent::ImageStarted { .. } => {
                self.started = Instant::now();
                Ok(())
            }
            ProgressEvent::ImageVerified { .. } | ProgressEvent::CmdlineFixed { .. } => Ok(()),
            // A retry interrupts the bar: start a new line.
            ProgressEvent::Retrying { .. } => writeln!(self.out, "\n{}", describe(event)),
            other => writeln!(self.out, "{}", describe(other)),
        };
        let _ = self.out.flush();
    }
}

/// The resume record (`install-progress.json`), written atomically at each checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResumeRecord {
    /// Always 1.
    pub format: u32,
    /// Which bundle: sha256 of its manifest.
    pub manifest_sha256: String,
    pub slot: Slot,
    /// PARTUUIDs of the target partitions, in manifest image order.
    pub partuuids: Vec<Uuid>,
    /// Index into the manifest's images of the image being written; equal to their count when
    /// all are written and only the `cmdline.txt` fix-up remains.
    pub image: usize,
    /// Bundle offset of that image's index header.
    pub index_offset: u64,
    /// First chunk not yet known to be on disk.
    pub next_chunk: usize,
    /// Bytes of the image before that chunk (written and fsynced).
    pub written: u64,
}

const RESUME_FORMAT: u32 = 1;

fn load_resume(path: &Path) -> Option<ResumeRecord> {
    let bytes = std::fs::read(path).ok()?;
    let rec: ResumeRecord = serde_json::from_slice(&bytes).ok()?;
    (rec.format == RESUME_FORMAT).then_some(rec)
}

fn save_resume(path: &Path, rec: &ResumeRecord) -> Result<(), InstallError> {
    let mut bytes = serde_json::to_vec(rec).expect("record serializes");
    bytes.push(b'\n');
    crate::state::write_atomic(path, &bytes, "install.progress")
        .map_err(|e| disk_err(e, format!("writing {}", path.display())))
}

fn clear_resume(path: &Path) -> Result<(), InstallError> {
    match std::fs::remove_file(path) {
        Ok(()) => {
            if let Some(dir) = path.parent() {
                let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(disk_err(e, format!("removing {}", path.display()))),
    }
}

/// Reads and verifies a bundle's manifest only (no policy, nothing written).
pub fn read_manifest(source: Source, keyring: &Keyring) -> Result<VerifiedManifest, InstallError> {
    let mut fetch = source.into_fetch(HTTP_TIMEOUT, None).map_err(BundleError::from)?;
    let mut cur = BundleCursor::new(fetch.as_mut(), RetryPolicy::default());
    Ok(read_verified_manifest(&mut cur, keyring)?)
}

/// Installs a bundle into `req.target`'s partitions of `req.disk`. See the module docs.
pub fn install_bundle(
    source: Source,
    req: &InstallRequest<'_>,
    progress: &mut dyn Progress,
) -> Result<InstalledImages, InstallError> {
    let mut fetch =
        source.into_fetch(req.http_timeout, req.ca_bundle.as_deref()).map_err(BundleError::from)?;
    let mut cur = BundleCursor::new(fetch.as_mut(), req.retry);
    let result = install_from(&mut cur, req, progress);
    report_retries(&mut cur, progress);
    result
}

fn report_retries(cur: &mut BundleCursor<'_>, progress: &mut dyn Progress) {
    for note in cur.take_retries() {
        progress.event(&ProgressEvent::Retrying {
            offset: note.offset,
            attempt: note.attempt,
            error: note.error,
        });
    }
}

/// The install as a chain of steps; a resume record that leads nowhere is dropped and the
/// images are written again from the start (once).
fn install_from(
    cur: &mut BundleCursor<'_>,
    req: &InstallRequest<'_>,
    progress: &mut dyn Progress,
) -> Result<InstalledImages, InstallError> {
    let vm = verify(cur, req, progress)?;
    let plan = Plan::new(req, &vm)?;
    let resume = plan.resume_record(req)?;
    let written = match write_images(cur, req, &plan, resume.as_ref(), progress)? {
        Outcome::Written(written) => written,
        Outcome::ResumeLeadsNowhere => {
            if let Some(path) = &req.resume_file {
                clear_resume(path)?;
            }
            match write_images(cur, req, &plan, None, progress)? {
                Outcome::Written(written) => written,
                Outcome::ResumeLeadsNowhere => unreachable!("no resume record was given"),
            }
        }
    };
    point_cmdline_at_target(req, &plan, progress)?;
    finish(cur, req, &plan, written, progress)
}

/// Step 1: the signature, before anything else is believed, then the device's policy.
fn verify(
    cur: &mut BundleCursor<'_>,
    req: &InstallRequest<'_>,
    progress: &mut dyn Progress,
) -> Result<VerifiedManifest, InstallError> {
    let vm = read_verified_manifest(cur, req.keyring)?;
    report_retries(cur, progress);
    progress.event(&ProgressEvent::Verified {
        compatible: vm.manifest.compatible.clone(),
        version: vm.manifest.version.to_string(),
        key_id: vm.key_id.to_string(),
    });
    req.policy.check(&vm.manifest)?;
    Ok(vm)
}

/// Step 2: the verified bundle against the disk: every image's partition in the target slot,
/// each large enough. Nothing has been written up to here.
struct Plan<'v> {
    vm: &'v VerifiedManifest,
    slot: Slot,
    /// The disk's partitions.
    parts: Vec<Partition>,
    /// Per manifest image, its partition in the target slot.
    targets: Vec<Partition>,
}

impl<'v> Plan<'v> {
    fn new(req: &InstallRequest<'_>, vm: &'v VerifiedManifest) -> Result<Plan<'v>, InstallError> {
        let parts = crate::disk::read_partitions(req.disk)
            .map_err(|e| disk_err(e, "reading the partition table"))?;
        let mut targets = Vec::new();
        for img in &vm.manifest.images {
            let label = img.slot_class.partition(req.target).label;
            let part = find_partition(req.disk, &parts, label)?;
            if img.size > part.len {
                return Err(InstallError::DoesNotFit {
                    class: img.slot_class,
                    size: img.size,
                    partition: label.to_string(),
                    available: part.len,
                });
            }
            targets.push(part.clone());
        }
        Ok(Plan { vm, slot: req.target, parts, targets })
    }

    /// The resume record for "image `image` is written up to chunk `next_chunk`".
    fn position(&self, image: usize, index_offset: u64, at: ChunkPosition) -> ResumeRecord {
        ResumeRecord {
            format: RESUME_FORMAT,
            manifest_sha256: self.vm.sha256.clone(),
            slot: self.slot,
            partuuids: self.targets.iter().map(|p| p.partuuid).collect(),
            image,
            index_offset,
            next_chunk: at.chunk,
            written: at.bytes,
        }
    }

    /// Step 3: the resume record, only for this very bundle, slot and partitions; any other
    /// record is removed.
    fn resume_record(
        &self,
        req: &InstallRequest<'_>,
    ) -> Result<Option<ResumeRecord>, InstallError> {
        let Some(path) = req.resume_file.as_deref() else { return Ok(None) };
        let mine = self.position(0, 0, ChunkPosition::default());
        let resume = load_resume(path).filter(|r| {
            r.manifest_sha256 == mine.manifest_sha256
                && r.slot == mine.slot
                && r.partuuids == mine.partuuids
                && r.image <= self.vm.manifest.images.len()
        });
        if resume.is_none() {
            clear_resume(path)?;
        }
        Ok(resume)
    }

    /// Image `i` as installed.
    fn installed(&self, i: usize) -> InstalledImage {
        let (img, part) = (&self.vm.manifest.images[i], &self.targets[i]);
        InstalledImage {
            slot_class: img.slot_class,
            partition: part.label.clone(),
            partuuid: part.partuuid,
            size: img.size,
            sha256: img.sha256.clone(),
        }
    }
}

fn find_partition<'p>(
    disk: &Path,
    parts: &'p [Partition],
    label: &str,
) -> Result<&'p Partition, InstallError> {
    parts.iter().find(|p| p.label == label).ok_or_else(|| {
        InstallError::Disk(anyhow::anyhow!("{} has no partition labelled {label}", disk.display()))
    })
}

/// A place in an image: the first chunk not yet written and the bytes before it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct ChunkPosition {
    chunk: usize,
    bytes: u64,
}

impl ChunkPosition {
    /// This position if it falls on a chunk boundary of `chunks`, else the image's start.
    fn on_boundary_of(self, chunks: &[ChunkEntry]) -> ChunkPosition {
        let prefix: u64 = chunks.iter().take(self.chunk).map(|c| u64::from(c.len)).sum();
        if self.chunk <= chunks.len() && prefix == self.bytes {
            self
        } else {
            ChunkPosition::default()
        }
    }
}

/// The images written and verified on the target partitions.
struct Written {
    images: Vec<InstalledImage>,
    /// Bytes skipped because a resume record said they were already written.
    resumed_bytes: u64,
}

/// How [`write_images`] ended when no error stopped it.
enum Outcome {
    Written(Written),
    /// The resume record does not lead to its image's index (damaged, or from a different
    /// layout): nothing was written; forget it and start over.
    ResumeLeadsNowhere,
}

/// Step 3: every image not yet written, from the resume record's position if any, each
/// checked against its digest and fsynced, the resume record moved on after each.
fn write_images(
    cur: &mut BundleCursor<'_>,
    req: &InstallRequest<'_>,
    plan: &Plan<'_>,
    resume: Option<&ResumeRecord>,
    progress: &mut dyn Progress,
) -> Result<Outcome, InstallError> {
    failpoint::hit("install.before-first-write")?;
    let disk =
        crate::disk::open_disk(req.disk, true).map_err(|e| disk_err(e, "opening the disk"))?;
    let images = &plan.vm.manifest.images;
    let first = resume.map_or(0, |r| r.image);
    let mut offset = resume.map_or(plan.vm.images_offset, |r| r.index_offset);
    let mut resume_at = resume.map(|r| ChunkPosition { chunk: r.next_chunk, bytes: r.written });
    // Images before the resume record's were written and verified before the interruption.
    let mut written =
        Written { images: (0..first).map(|i| plan.installed(i)).collect(), resumed_bytes: 0 };
    for (i, img) in images.iter().enumerate().skip(first) {
        let layout = match read_image_layout(cur, offset, img) {
            Ok(layout) => layout,
            Err(e) if resume.is_some() && i == first && !matches!(e, BundleError::Fetch(_)) => {
                return Ok(Outcome::ResumeLeadsNowhere);
            }
            Err(e) => return Err(e.into()),
        };
        report_retries(cur, progress);
        let from = resume_at.take().unwrap_or_default().on_boundary_of(&layout.index.chunks);
        let target = ImageTarget { disk: &disk, index: i, layout: &layout };
        write_image(cur, req, plan, target, from, progress)?;
        written.resumed_bytes += from.bytes;
        offset = layout.end_offset;
        if let Some(path) = &req.resume_file {
            save_resume(path, &plan.position(i + 1, offset, ChunkPosition::default()))?;
        }
        written.images.push(plan.installed(i));
    }
    Ok(Outcome::Written(written))
}

/// One image to write: the open disk, the image's index in the manifest and its layout.
#[derive(Clone, Copy)]
struct ImageTarget<'a> {
    disk: &'a std::fs::File,
    index: usize,
    layout: &'a ImageLayout,
}

/// Writes one image from `from` on: re-hashes what a resume skips, streams the rest with the
/// settling thread beside it, checks the whole image's digest, fsyncs.
fn write_image(
    cur: &mut BundleCursor<'_>,
    req: &InstallRequest<'_>,
    plan: &Plan<'_>,
    target: ImageTarget<'_>,
    from: ChunkPosition,
    progress: &mut dyn Progress,
) -> Result<(), InstallError> {
    let ImageTarget { disk, index: i, layout } = target;
    let (img, part) = (&plan.vm.manifest.images[i], &plan.targets[i]);
    let chunks = &layout.index.chunks;
    progress.event(&ProgressEvent::ImageStarted {
        image: img.slot_class,
        partition: part.label.clone(),
        size: img.size,
    });
    let mut tree = TreeHasher::new();
    if from.bytes > 0 {
        rehash_prefix(disk, part, &chunks[..from.chunk], &mut tree)?;
        progress.event(&ProgressEvent::Resuming { image: img.slot_class, skipped: from.bytes });
    }
    let mut tally = Tally::new(part.start, from.bytes, req.checkpoint_bytes);
    let sink = Sink { disk, at: part.start + from.bytes, label: &part.label };
    let hook = Checkpoints { disk, label: &part.label, resume_file: req.resume_file.as_deref() };
    let durable_target = durable::Target { file: disk, label: &part.label };
    durable::settle_while(durable_target, SETTLE_QUEUE, hook, |settler| {
        stream_chunks(cur, layout, from.chunk, sink, &mut |k, len, cur| {
            // The whole-image digest, over what was handed to the disk, in that order.
            tree.chunk(&chunks[k].sha256, u32::try_from(len).expect("chunk length"));
            let due = tally.written(len as u64, k + 1 == chunks.len());
            if let Some(span) = due.writeback {
                settler.send(Job::Writeback(span))?;
            }
            report_retries(cur, progress);
            progress.event(&ProgressEvent::Written {
                image: img.slot_class,
                done: tally.done,
                total: img.size,
            });
            if due.checkpoint {
                let at = ChunkPosition { chunk: k + 1, bytes: tally.done };
                settler.send(Job::Checkpoint(plan.position(i, layout.index_offset, at)))?;
            }
            Ok(())
        })
    })?;
    check_image_digest(req, img, tally.done, tree)?;
    failpoint::hit("install.image-verified")?;
    sync(disk, &part.label)?;
    progress
        .event(&ProgressEvent::ImageVerified { image: img.slot_class, sha256: img.sha256.clone() });
    Ok(())
}

/// The whole image's digest over the chunks handed to the disk. On a mismatch what is on the
/// partition cannot be trusted: the resume record is removed, the next attempt starts over.
fn check_image_digest(
    req: &InstallRequest<'_>,
    img: &crate::bundle::ImageEntry,
    done: u64,
    tree: TreeHasher,
) -> Result<(), InstallError> {
    let actual = hex::encode(tree.finalize());
    if done == img.size && actual == img.tree_sha256 {
        return Ok(());
    }
    if let Some(path) = &req.resume_file {
        clear_resume(path)?;
    }
    Err(BundleError::ImageHash {
        image: img.slot_class,
        what: "tree_sha256",
        expected: img.tree_sha256.clone(),
        actual,
    }
    .into())
}

/// Step 4: the boot image is slot-independent: point its cmdline.txt at this slot's root.
fn point_cmdline_at_target(
    req: &InstallRequest<'_>,
    plan: &Plan<'_>,
    progress: &mut dyn Progress,
) -> Result<(), InstallError> {
    let images = &plan.vm.manifest.images;
    let Some(bi) = images.iter().position(|i| i.slot_class == SlotClass::Boot) else {
        return Ok(());
    };
    let root_label = req.target.root().label;
    let root = plan.parts.iter().find(|p| p.label == root_label).ok_or_else(|| {
        InstallError::Disk(anyhow::anyhow!("{} has no partition {root_label}", req.disk.display()))
    })?;
    failpoint::hit("install.before-cmdline")?;
    fix_cmdline(req.disk, &plan.targets[bi], &root.partuuid)?;
    failpoint::hit("install.after-cmdline")?;
    progress.event(&ProgressEvent::CmdlineFixed { partition: plan.targets[bi].label.clone() });
    Ok(())
}

/// Step 4, the end: the resume record is removed; what was installed.
fn finish(
    cur: &mut BundleCursor<'_>,
    req: &InstallRequest<'_>,
    plan: &Plan<'_>,
    written: Written,
    progress: &mut dyn Progress,
) -> Result<InstalledImages, InstallError> {
    failpoint::hit("install.before-clear-progress")?;
    if let Some(path) = &req.resume_file {
        clear_resume(path)?;
    }
    failpoint::hit("install.done")?;
    let (vm, m) = (plan.vm, &plan.vm.manifest);
    progress.event(&ProgressEvent::Finished {
        version: m.version.to_string(),
        bytes_read: cur.bytes_read(),
    });
    Ok(InstalledImages {
        compatible: m.compatible.clone(),
        version: m.version.clone(),
        security_epoch: m.security_epoch,
        key_id: vm.key_id.to_string(),
        manifest_sha256: vm.sha256.clone(),
        slot: plan.slot,
        images: written.images,
        resumed_bytes: written.resumed_bytes,
    })
}

/// Jobs the install may queue for its settling thread: a checkpoint's fsync then holds back
/// the writer only after this many writebacks and checkpoints (at least 512 MiB of chunks).
const SETTLE_QUEUE: usize = 64;

/// The install's settling hook: at each checkpoint, fsync the partition, then record the
/// checkpoint as the resume point. A checkpoint is recorded only after its fsync, and names
/// only chunks written before it was queued: the resume record never runs ahead of the disk.
/// When the writing fails (a chunk write, a power cut in a test), the checkpoints already
/// queued are still made: they name whole chunks written before the failure, so the result is
/// what a slightly later failure would have left.
struct Checkpoints<'a> {
    disk: &'a std::fs::File,
    label: &'a str,
    resume_file: Option<&'a Path>,
}

impl OnDurable for Checkpoints<'_> {
    type Mark = ResumeRecord;
    type Error = InstallError;

    fn checkpoint(&mut self, rec: ResumeRecord) -> Result<(), InstallError> {
        sync(self.disk, self.label)?;
        match self.resume_file {
            Some(path) => save_resume(path, &rec),
            None => Ok(()),
        }
    }
}

impl From<DurableError> for InstallError {
    fn from(e: DurableError) -> InstallError {
        InstallError::Disk(e.into())
    }
}

/// Counts one image's bytes as they are written, and says when to start the writeback of the
/// last [`WRITEBACK_BYTES`] or more and when to checkpoint (every `checkpoint_bytes`, never
/// after the last chunk: the image's own fsync follows).
#[derive(Debug)]
struct Tally {
    /// Disk offset of the image.
    base: u64,
    /// Bytes of the image written.
    done: u64,
    since_checkpoint: u64,
    unflushed: u64,
    checkpoint_bytes: u64,
}

/// What is due after a chunk.
#[derive(Debug, PartialEq, Eq)]
struct Due {
    writeback: Option<Span>,
    checkpoint: bool,
}

impl Tally {
    fn new(base: u64, done: u64, checkpoint_bytes: u64) -> Tally {
        Tally { base, done, since_checkpoint: 0, unflushed: 0, checkpoint_bytes }
    }

    /// A chunk of `len` bytes was written; `last`: the image's last chunk.
    fn written(&mut self, len: u64, last: bool) -> Due {
        self.done += len;
        self.since_checkpoint += len;
        self.unflushed += len;
        let mut writeback = None;
        if self.unflushed >= WRITEBACK_BYTES {
            writeback = Some(Span::at(self.base + self.done - self.unflushed, self.unflushed));
            self.unflushed = 0;
        }
        let checkpoint = self.since_checkpoint >= self.checkpoint_bytes && !last;
        if checkpoint {
            self.since_checkpoint = 0;
        }
        Due { writeback, checkpoint }
    }
}

/// Called in chunk order with each chunk written (its index and length), and the cursor (for
/// retry reports).
type OnWritten<'c> =
    dyn FnMut(usize, usize, &mut BundleCursor<'_>) -> Result<(), InstallError> + 'c;

/// Where [`stream_chunks`] writes: the disk, the byte offset of its first chunk, and the
/// partition's label (for errors).
#[derive(Clone, Copy)]
struct Sink<'d> {
    disk: &'d std::fs::File,
    at: u64,
    label: &'d str,
}

/// A verified chunk's bytes: decompressed, or a run of zeros known from the index.
#[derive(Clone, Copy)]
enum Verified<'a> {
    Bytes(&'a [u8]),
    Zeros(usize),
}

impl Verified<'_> {
    fn len(&self) -> usize {
        match self {
            Verified::Bytes(b) => b.len(),
            Verified::Zeros(n) => *n,
        }
    }

    /// Writes the first `n` bytes at `at`. Zeros are written from a small shared buffer: a
    /// chunk-sized one would be read in full, and its pages (the kernel's zero page) would
    /// count in the resident set although they take no memory.
    fn write_at(&self, disk: &std::fs::File, at: u64, n: usize) -> std::io::Result<()> {
        match self {
            Verified::Bytes(b) => disk.write_all_at(&b[..n], at),
            Verified::Zeros(_) => {
                static ZEROS: [u8; 256 << 10] = [0; 256 << 10];
                let mut pos = 0;
                while pos < n {
                    let len = (n - pos).min(ZEROS.len());
                    disk.write_all_at(&ZEROS[..len], at + pos as u64)?;
                    pos += len;
                }
                Ok(())
            }
        }
    }
}

/// Uncompressed bytes of chunks handed to a decoder at once (at least one chunk). Zero chunks
/// ([`is_zero_chunk`]) take no room.
const BATCH_BYTES: u64 = CHUNK_MAX as u64;

/// Reads chunks `start..` of `layout` in order on this thread, in batches of whole chunks of
/// at most [`BATCH_BYTES`] (or one larger chunk); decompresses, verifies and writes them on
/// worker threads (one per core, at most 4); and calls `on_written` for each written chunk in
/// order, on this thread. A chunk is never written before its sha256 matched; a corrupt chunk
/// is an error once every chunk before it has been written and handed on. Each chunk is written
/// by the thread that decoded and hashed it, from its own cache: handing 4 MiB buffers to
/// another core to copy into the page cache cost about a third of the install's CPU time. A
/// zero chunk ([`is_zero_chunk`]) is not decompressed (its few compressed bytes are read past):
/// its bytes are known from the signed index ([`Verified::Zeros`]).
///
/// Memory: one chunk buffer per worker, and compressed bytes in at most one buffer per worker
/// (given back as soon as a batch is decoded); all allocated once at full size and reused.
///
/// The workers share the calling thread's failpoints ([`failpoint::adopt`]), so a
/// test's torn write `install.write-chunk` lands on the worker that writes that chunk.
fn stream_chunks(
    cur: &mut BundleCursor<'_>,
    layout: &ImageLayout,
    start: usize,
    sink: Sink<'_>,
    on_written: &mut OnWritten<'_>,
) -> Result<(), InstallError> {
    use std::sync::mpsc::channel;
    use std::sync::{Arc, Mutex};
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 4);
    let pool = Pool {
        chunks: &layout.index.chunks,
        class: layout.entry.slot_class,
        sink,
        stop: AtomicBool::new(false),
        failpoints: failpoint::handle(),
    };
    let mut feed = Feed::new(layout, start, sink.at, workers);
    std::thread::scope(|s| {
        let (batch_tx, batch_rx) = channel::<Batch>();
        let batch_rx = Arc::new(Mutex::new(batch_rx));
        let (done_tx, done_rx) = channel::<BatchDone>();
        for _ in 0..workers {
            let (pool, rx, tx) = (&pool, batch_rx.clone(), done_tx.clone());
            s.spawn(move || pool.work(&rx, &tx));
        }
        drop(done_tx);
        let result = feed.run(cur, &batch_tx, &done_rx, on_written);
        // Workers write nothing more once this thread stopped, and end when the batches do.
        pool.stop.store(true, Ordering::Relaxed);
        drop(batch_tx);
        result
    })
}

/// Whole chunks handed to a worker at once.
struct Batch {
    /// Index of its first chunk.
    first: usize,
    count: usize,
    /// Bundle offset of its compressed bytes (for errors).
    offset: u64,
    /// Disk offset of its first chunk.
    disk_at: u64,
    compressed: Vec<u8>,
}

/// A worker's report on a [`Batch`].
struct BatchDone {
    first: usize,
    /// The batch's buffer, given back for the next batch.
    compressed: Vec<u8>,
    /// Chunks written, from `first` on.
    written: usize,
    /// Why chunk `first + written` was not written, if it was not.
    error: Option<InstallError>,
}

/// What the chunk workers share.
struct Pool<'a> {
    chunks: &'a [ChunkEntry],
    class: SlotClass,
    sink: Sink<'a>,
    /// Set when the reading thread stops early: workers then write nothing more.
    stop: AtomicBool,
    failpoints: failpoint::Handle,
}

impl Pool<'_> {
    /// A worker: decodes, verifies and writes batches until there are none or no one listens.
    fn work(&self, batches: &std::sync::Mutex<Receiver<Batch>>, done: &Sender<BatchDone>) {
        failpoint::adopt(&self.failpoints);
        let mut dec = zstd::bulk::Decompressor::new();
        let mut plain = Vec::with_capacity(CHUNK_MAX as usize);
        loop {
            let batch = match batches.lock() {
                Ok(rx) => rx.recv(),
                Err(_) => break,
            };
            let Ok(batch) = batch else { break };
            if done.send(self.write_batch(batch, &mut dec, &mut plain)).is_err() {
                break;
            }
        }
    }

    /// Decodes and verifies each chunk of `batch`, then writes it; stops at the first error.
    fn write_batch(
        &self,
        batch: Batch,
        dec: &mut std::io::Result<zstd::bulk::Decompressor<'static>>,
        plain: &mut Vec<u8>,
    ) -> BatchDone {
        let (mut written, mut pos, mut at) = (0, 0usize, batch.disk_at);
        let mut error = None;
        for (k, c) in self.chunks.iter().enumerate().skip(batch.first).take(batch.count) {
            if self.stop.load(Ordering::Relaxed) {
                break;
            }
            let end = pos + c.compressed_len as usize;
            let data = if is_zero_chunk(c) {
                Verified::Zeros(c.len as usize)
            } else {
                let result = match dec.as_mut() {
                    Ok(d) => decode_chunk(d, &batch.compressed[pos..end], c, plain),
                    Err(e) => Err(format!("zstd: {e}")),
                };
                if let Err(reason) = result {
                    let offset = batch.offset + pos as u64;
                    let e =
                        BundleError::ChunkCorrupt { image: self.class, chunk: k, offset, reason };
                    error = Some(e.into());
                    break;
                }
                Verified::Bytes(plain)
            };
            pos = end;
            if let Err(e) = self.write_chunk(data, at) {
                error = Some(e);
                break;
            }
            at += data.len() as u64;
            written += 1;
        }
        BatchDone { first: batch.first, compressed: batch.compressed, written, error }
    }

    /// Writes a verified chunk at `at` (torn by the `install.write-chunk` failpoint in tests).
    fn write_chunk(&self, data: Verified<'_>, at: u64) -> Result<(), InstallError> {
        if let Some(n) = failpoint::torn("install.write-chunk", data.len()) {
            return Err(match data.write_at(self.sink.disk, at, n) {
                Ok(()) => PowerCut("install.write-chunk".into()).into(),
                Err(e) => disk_err(e, "writing a chunk"),
            });
        }
        data.write_at(self.sink.disk, at, data.len())
            .map_err(|e| disk_err(e, format!("writing {}", self.sink.label)))
    }
}

/// The reading thread's side of [`stream_chunks`]: reads batches in order and hands them out,
/// keeping every worker busy, and takes the reports back in chunk order.
struct Feed<'a> {
    chunks: &'a [ChunkEntry],
    /// Next chunk to read, and next chunk whose report is awaited.
    next_read: usize,
    next_write: usize,
    /// Bundle offset of `next_read`'s compressed bytes, and its disk offset.
    offset: u64,
    disk_at: u64,
    /// Batches handed out and not yet reported, and their limit: one more than the workers
    /// keeps each of them busy while this thread reads the next batch.
    in_flight: usize,
    max_in_flight: usize,
    /// Compressed buffers free again, buffers made, and their limit (one per worker: they are
    /// free again once decoded).
    buffers: Vec<Vec<u8>>,
    made: usize,
    max_buffers: usize,
    /// Reports that came before one of an earlier batch.
    early: std::collections::BTreeMap<usize, BatchDone>,
}

impl<'a> Feed<'a> {
    fn new(layout: &'a ImageLayout, start: usize, disk_at: u64, workers: usize) -> Feed<'a> {
        let chunks = &layout.index.chunks;
        let skipped: u64 = chunks.iter().take(start).map(|c| u64::from(c.compressed_len)).sum();
        Feed {
            chunks,
            next_read: start,
            next_write: start,
            offset: layout.payload_offset + skipped,
            disk_at,
            in_flight: 0,
            max_in_flight: workers + 1,
            buffers: Vec::new(),
            made: 0,
            max_buffers: workers,
            early: std::collections::BTreeMap::new(),
        }
    }

    fn run(
        &mut self,
        cur: &mut BundleCursor<'_>,
        batches: &Sender<Batch>,
        done: &Receiver<BatchDone>,
        on_written: &mut OnWritten<'_>,
    ) -> Result<(), InstallError> {
        while self.next_write < self.chunks.len() {
            self.hand_out(cur, batches)?;
            let Ok(mut report) = done.recv() else {
                return Err(InstallError::Disk(anyhow::anyhow!("the chunk writers stopped")));
            };
            self.buffers.push(std::mem::take(&mut report.compressed));
            self.early.insert(report.first, report);
            self.take_in_order(cur, on_written)?;
        }
        Ok(())
    }

    /// Reads and hands out batches while a worker and a buffer are free.
    fn hand_out(
        &mut self,
        cur: &mut BundleCursor<'_>,
        batches: &Sender<Batch>,
    ) -> Result<(), InstallError> {
        while self.next_read < self.chunks.len()
            && self.in_flight < self.max_in_flight
            && (!self.buffers.is_empty() || self.made < self.max_buffers)
        {
            let size = BatchSize::of(&self.chunks[self.next_read..]);
            let mut buf = self.buffers.pop().unwrap_or_else(|| {
                self.made += 1;
                Vec::with_capacity(MAX_COMPRESSED_CHUNK as usize)
            });
            buf.resize(size.compressed as usize, 0);
            cur.read_exact_at(self.offset, &mut buf)?;
            let batch = Batch {
                first: self.next_read,
                count: size.count,
                offset: self.offset,
                disk_at: self.disk_at,
                compressed: buf,
            };
            if batches.send(batch).is_err() {
                break;
            }
            self.offset += size.compressed;
            self.disk_at += size.len;
            self.next_read += size.count;
            self.in_flight += 1;
        }
        Ok(())
    }

    /// Calls `on_written` for the chunks of every report that is next in order; a report's
    /// error is returned once the chunks before it have been handed on.
    fn take_in_order(
        &mut self,
        cur: &mut BundleCursor<'_>,
        on_written: &mut OnWritten<'_>,
    ) -> Result<(), InstallError> {
        while let Some(report) = self.early.remove(&self.next_write) {
            let first = report.first;
            for (k, c) in self.chunks.iter().enumerate().skip(first).take(report.written) {
                on_written(k, c.len as usize, cur)?;
            }
            if let Some(e) = report.error {
                return Err(e);
            }
            self.in_flight -= 1;
            self.next_write = first + report.written;
        }
        Ok(())
    }
}

/// The next batch: whole chunks up to [`BATCH_BYTES`] uncompressed, at least one.
#[derive(Debug, PartialEq, Eq)]
struct BatchSize {
    count: usize,
    /// Its compressed bytes in the bundle.
    compressed: u64,
    /// Its bytes on the disk.
    len: u64,
}

impl BatchSize {
    fn of(chunks: &[ChunkEntry]) -> BatchSize {
        let (mut count, mut plain_len, mut compressed, mut len) = (0, 0u64, 0u64, 0u64);
        for c in chunks {
            let plain = if is_zero_chunk(c) { 0 } else { u64::from(c.len) };
            if count > 0 && plain_len + plain > BATCH_BYTES {
                break;
            }
            count += 1;
            plain_len += plain;
            compressed += u64::from(c.compressed_len);
            len += u64::from(c.len);
        }
        BatchSize { count, compressed, len }
    }
}

/// Written bytes after which their writeback is started ([`Job::Writeback`]).
const WRITEBACK_BYTES: u64 = 8 << 20;

fn sync(disk: &std::fs::File, label: &str) -> Result<(), InstallError> {
    failpoint::hit("install.before-sync")?;
    disk.sync_data().map_err(|e| disk_err(e, format!("syncing {label}")))?;
    failpoint::hit("install.after-sync")?;
    Ok(())
}

/// Reads back the first chunks of `part` (`prefix`, already written and fsynced), hashes each
/// as it is on the partition and feeds it into `tree`: the final check then covers them too.
fn rehash_prefix(
    disk: &std::fs::File,
    part: &Partition,
    prefix: &[ChunkEntry],
    tree: &mut TreeHasher,
) -> Result<(), InstallError> {
    let mut buf = vec![0u8; CHUNK_MAX as usize];
    let mut pos = 0u64;
    for c in prefix {
        let data = &mut buf[..c.len as usize];
        disk.read_exact_at(data, part.start + pos)
            .map_err(|e| disk_err(e, format!("reading back {}", part.label)))?;
        tree.chunk(&Sha256::digest(&*data).into(), c.len);
        pos += u64::from(c.len);
    }
    Ok(())
}

/// Rewrites `cmdline.txt` on the FAT boot partition `boot` so that `root=PARTUUID=` names
/// `root`, then fsyncs the disk. No mount: `fatfs` on the partition's byte range.
pub fn fix_cmdline(disk: &Path, boot: &Partition, root: &Uuid) -> Result<(), InstallError> {
    use anyhow::Context;
    let run = || -> anyhow::Result<()> {
        let file = crate::disk::open_disk(disk, true)?;
        let sync_handle = file.try_clone().context("duplicating the disk handle")?;
        let slice = crate::disk::partition_stream(file, boot)?;
        let fs = fatfs::FileSystem::new(slice, fatfs::FsOptions::new())
            .with_context(|| format!("opening the FAT filesystem of {}", boot.label))?;
        {
            let root_dir = fs.root_dir();
            let mut text = String::new();
            root_dir
                .open_file("cmdline.txt")
                .context("opening cmdline.txt")?
                .read_to_string(&mut text)
                .context("reading cmdline.txt")?;
            let new = crate::cmdline::with_root(&text, root);
            if new != text {
                let mut f = root_dir.create_file("cmdline.txt").context("rewriting cmdline.txt")?;
                f.truncate().context("truncating cmdline.txt")?;
                f.write_all(new.as_bytes()).context("writing cmdline.txt")?;
                f.flush().context("writing cmdline.txt")?;
            }
        }
        fs.unmount().context("closing the FAT filesystem")?;
        sync_handle.sync_data().context("syncing the disk")?;
        Ok(())
    };
    run().map_err(|e| disk_err(e, format!("fixing cmdline.txt on {}", boot.label)))
}

#[cfg(test)]
mod tests;
