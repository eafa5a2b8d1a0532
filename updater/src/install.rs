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
//! bundle::check_manifest(&Manifest, &DeviceFacts) -> Result<(), Refusal>   (pure)
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
//!    in order, each with the sha256 it was verified by) and fsync.
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
use crate::failpoint::{self, PowerCut};
use crate::layout::Slot;
use crate::sign::Keyring;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
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
            http_timeout: Duration::from_secs(30),
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

/// One JSON object per line; `written` events at most every 10 %.
#[derive(Debug)]
pub struct JsonLines<W: Write> {
    out: W,
    last_tenth: Option<(SlotClass, u64)>,
}

impl<W: Write> JsonLines<W> {
    pub fn new(out: W) -> JsonLines<W> {
        JsonLines { out, last_tenth: None }
    }
}

impl<W: Write> Progress for JsonLines<W> {
    fn event(&mut self, event: &ProgressEvent) {
        if let ProgressEvent::Written { image, done, total } = event {
            let tenth = done * 10 / (*total).max(1);
            if done != total && self.last_tenth == Some((*image, tenth)) {
                return;
            }
            self.last_tenth = Some((*image, tenth));
        }
        if let Ok(line) = serde_json::to_string(event) {
            let _ = writeln!(self.out, "{line}");
        }
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
                let rate =
                    *done as f64 / 1048576.0 / self.started.elapsed().as_secs_f64().max(0.001);
                write!(
                    self.out,
                    "\r{image:>4} [{}{}] {pct:>3}% {:>7.1} MiB {rate:>6.1} MiB/s",
                    "#".repeat(filled),
                    " ".repeat(20 - filled),
                    *done as f64 / 1048576.0
                )
                .and_then(|()| if done == total { writeln!(self.out) } else { Ok(()) })
            }
            ProgressEvent::ImageStarted { .. } => {
                self.started = Instant::now();
                Ok(())
            }
            ProgressEvent::Verified { compatible, version, key_id } => {
                writeln!(self.out, "bundle {compatible} {version}, signed by key {key_id}")
            }
            ProgressEvent::Resuming { image, skipped } => {
                writeln!(self.out, "resuming {image} after {skipped} bytes already written")
            }
            ProgressEvent::Retrying { offset, attempt, error } => {
                writeln!(self.out, "\nretry {attempt} from byte {offset}: {error}")
            }
            ProgressEvent::ImageVerified { .. } | ProgressEvent::CmdlineFixed { .. } => Ok(()),
            ProgressEvent::Finished { version, .. } => writeln!(self.out, "installed {version}"),
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
    let mut fetch = source.into_fetch(Duration::from_secs(30), None).map_err(BundleError::from)?;
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

fn install_from(
    cur: &mut BundleCursor<'_>,
    req: &InstallRequest<'_>,
    progress: &mut dyn Progress,
) -> Result<InstalledImages, InstallError> {
    // 1. Signature, before anything else is believed.
    let vm = read_verified_manifest(cur, req.keyring)?;
    report_retries(cur, progress);
    let m = &vm.manifest;
    progress.event(&ProgressEvent::Verified {
        compatible: m.compatible.clone(),
        version: m.version.to_string(),
        key_id: vm.key_id.to_string(),
    });

    // 2. Policy and sizes.
    req.policy.check(m)?;
    let parts = crate::disk::read_partitions(req.disk)
        .map_err(|e| disk_err(e, "reading the partition table"))?;
    let mut targets: Vec<Partition> = Vec::new();
    for img in &m.images {
        let label = img.slot_class.partition(req.target).label;
        let part = parts.iter().find(|p| p.label == label).cloned().ok_or_else(|| {
            InstallError::Disk(anyhow::anyhow!(
                "{} has no partition labelled {label}",
                req.disk.display()
            ))
        })?;
        if img.size > part.len {
            return Err(InstallError::DoesNotFit {
                class: img.slot_class,
                size: img.size,
                partition: label.to_string(),
                available: part.len,
            });
        }
        targets.push(part);
    }
    let partuuids: Vec<Uuid> = targets.iter().map(|p| p.partuuid).collect();
    // The resume record for "image `image` is written up to chunk `next_chunk`".
    let position =
        |image: usize, index_offset: u64, next_chunk: usize, written: u64| ResumeRecord {
            format: RESUME_FORMAT,
            manifest_sha256: vm.sha256.clone(),
            slot: req.target,
            partuuids: partuuids.clone(),
            image,
            index_offset,
            next_chunk,
            written,
        };

    // 3. Resume record: only for this very bundle, slot and partitions.
    let resume = req.resume_file.as_deref().and_then(load_resume).filter(|r| {
        r.manifest_sha256 == vm.sha256
            && r.slot == req.target
            && r.partuuids == partuuids
            && r.image <= m.images.len()
    });
    if resume.is_none() {
        if let Some(path) = &req.resume_file {
            clear_resume(path)?;
        }
    }
    failpoint::hit("install.before-first-write")?;
    let disk =
        crate::disk::open_disk(req.disk, true).map_err(|e| disk_err(e, "opening the disk"))?;

    let mut installed = Vec::new();
    let mut resumed_bytes = 0;
    let mut offset = vm.images_offset;
    let (first_image, mut resume_at) = match &resume {
        Some(r) => {
            offset = r.index_offset;
            (r.image, Some((r.next_chunk, r.written)))
        }
        None => (0, None),
    };
    for (i, img) in m.images.iter().enumerate() {
        let part = &targets[i];
        if i < first_image {
            // Written and verified before the interruption.
            installed.push(InstalledImage {
                slot_class: img.slot_class,
                partition: part.label.clone(),
                partuuid: part.partuuid,
                size: img.size,
                sha256: img.sha256.clone(),
            });
            continue;
        }
        let layout = match read_image_layout(cur, offset, img) {
            Ok(layout) => layout,
            // A resume record that does not lead to this image's index (damaged, or from a
            // different layout): forget it and start over.
            Err(e)
                if resume.is_some() && i == first_image && !matches!(e, BundleError::Fetch(_)) =>
            {
                if let Some(path) = &req.resume_file {
                    clear_resume(path)?;
                }
                return install_from(cur, req, progress);
            }
            Err(e) => return Err(e.into()),
        };
        report_retries(cur, progress);
        let chunks = &layout.index.chunks;
        // Where to start: a resume point must fall on a chunk boundary of this index.
        let (mut k, mut done) = (0usize, 0u64);
        if let Some((next, written)) = resume_at.take() {
            let prefix: u64 = chunks.iter().take(next).map(|c| u64::from(c.len)).sum();
            if next <= chunks.len() && prefix == written {
                (k, done) = (next, written);
            }
        }
        progress.event(&ProgressEvent::ImageStarted {
            image: img.slot_class,
            partition: part.label.clone(),
            size: img.size,
        });
        let mut tree = TreeHasher::new();
        if done > 0 {
            rehash_prefix(&disk, part, &chunks[..k], &mut tree)?;
            resumed_bytes += done;
            progress.event(&ProgressEvent::Resuming { image: img.slot_class, skipped: done });
        }
        let (mut since_checkpoint, mut unflushed) = (0u64, 0u64);
        let sink = Sink { disk: &disk, at: part.start + done, label: &part.label };
        settling(&disk, &part.label, req.resume_file.as_deref(), |settler| {
            stream_chunks(cur, &layout, k, sink, &mut |k, len, cur| {
                // The whole-image digest, over what was handed to the disk, in that order.
                tree.chunk(&chunks[k].sha256, u32::try_from(len).expect("chunk length"));
                done += len as u64;
                since_checkpoint += len as u64;
                unflushed += len as u64;
                if unflushed >= WRITEBACK_BYTES {
                    settler.send(Settle::Writeback(part.start + done - unflushed, unflushed))?;
                    unflushed = 0;
                }
                report_retries(cur, progress);
                progress.event(&ProgressEvent::Written {
                    image: img.slot_class,
                    done,
                    total: img.size,
                });
                if since_checkpoint >= req.checkpoint_bytes && k + 1 < chunks.len() {
                    since_checkpoint = 0;
                    settler.send(Settle::Checkpoint(position(
                        i,
                        layout.index_offset,
                        k + 1,
                        done,
                    )))?;
                }
                Ok(())
            })
        })?;
        let actual = hex::encode(tree.finalize());
        if done != img.size || actual != img.tree_sha256 {
            // What is on the partition cannot be trusted: the next attempt starts over.
            if let Some(path) = &req.resume_file {
                clear_resume(path)?;
            }
            return Err(BundleError::ImageHash {
                image: img.slot_class,
                what: "tree_sha256",
                expected: img.tree_sha256.clone(),
                actual,
            }
            .into());
        }
        failpoint::hit("install.image-verified")?;
        sync(&disk, &part.label)?;
        progress.event(&ProgressEvent::ImageVerified {
            image: img.slot_class,
            sha256: img.sha256.clone(),
        });
        offset = layout.end_offset;
        if let Some(path) = &req.resume_file {
            save_resume(path, &position(i + 1, offset, 0, 0))?;
        }
        installed.push(InstalledImage {
            slot_class: img.slot_class,
            partition: part.label.clone(),
            partuuid: part.partuuid,
            size: img.size,
            sha256: img.sha256.clone(),
        });
    }
    drop(disk);

    // 4. The boot image is slot-independent: point its cmdline.txt at this slot's root.
    if let Some(bi) = m.images.iter().position(|i| i.slot_class == SlotClass::Boot) {
        let root_label = req.target.root().label;
        let root = parts.iter().find(|p| p.label == root_label).ok_or_else(|| {
            InstallError::Disk(anyhow::anyhow!(
                "{} has no partition {root_label}",
                req.disk.display()
            ))
        })?;
        failpoint::hit("install.before-cmdline")?;
        fix_cmdline(req.disk, &targets[bi], &root.partuuid)?;
        failpoint::hit("install.after-cmdline")?;
        progress.event(&ProgressEvent::CmdlineFixed { partition: targets[bi].label.clone() });
    }
    failpoint::hit("install.before-clear-progress")?;
    if let Some(path) = &req.resume_file {
        clear_resume(path)?;
    }
    failpoint::hit("install.done")?;
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
        slot: req.target,
        images: installed,
        resumed_bytes,
    })
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
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc::channel;
    use std::sync::{Arc, Mutex};
    let chunks = &layout.index.chunks;
    let class = layout.entry.slot_class;
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 4);
    // Batches handed out but not yet written; one more than the workers keeps each of them
    // busy while this thread reads the next batch.
    let max_in_flight = workers + 1;
    // Compressed buffers are free again once decoded: one per worker is enough.
    let (max_comp, mut comp_made) = (workers, 0usize);
    let mut offset = layout.payload_offset
        + chunks.iter().take(start).map(|c| u64::from(c.compressed_len)).sum::<u64>();
    let mut disk_at = sink.at;
    // Set when this thread stops early: workers then write nothing more.
    let stop = AtomicBool::new(false);
    /// A batch: its first chunk, chunk count, bundle offset, disk offset and compressed bytes.
    type Job = (usize, usize, u64, u64, Vec<u8>);
    let failpoints = failpoint::handle();
    /// Back: first chunk, the compressed buffer (for reuse), `ok` chunks written, and the
    /// error of chunk `first + ok` if any.
    type Done = (usize, Vec<u8>, usize, Option<InstallError>);
    std::thread::scope(|s| {
        let (work_tx, work_rx) = channel::<Job>();
        let work_rx = Arc::new(Mutex::new(work_rx));
        let (done_tx, done_rx) = channel::<Done>();
        for _ in 0..workers {
            let (rx, tx, stop, fp) = (work_rx.clone(), done_tx.clone(), &stop, &failpoints);
            s.spawn(move || {
                failpoint::adopt(fp);
                let mut dec = zstd::bulk::Decompressor::new();
                let mut plain = Vec::with_capacity(CHUNK_MAX as usize);
                loop {
                    let job = match rx.lock() {
                        Ok(r) => r.recv(),
                        Err(_) => break,
                    };
                    let Ok((first, count, batch_offset, mut at, comp)) = job else { break };
                    let (mut ok, mut pos, mut err) = (0, 0usize, None);
                    for (k, c) in chunks.iter().enumerate().skip(first).take(count) {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let end = pos + c.compressed_len as usize;
                        let data = if is_zero_chunk(c) {
                            Verified::Zeros(c.len as usize)
                        } else {
                            let result = match dec.as_mut() {
                                Ok(d) => decode_chunk(d, &comp[pos..end], c, &mut plain),
                                Err(e) => Err(format!("zstd: {e}")),
                            };
                            if let Err(reason) = result {
                                err = Some(
                                    BundleError::ChunkCorrupt {
                                        image: class,
                                        chunk: k,
                                        offset: batch_offset + pos as u64,
                                        reason,
                                    }
                                    .into(),
                                );
                                break;
                            }
                            Verified::Bytes(&plain)
                        };
                        pos = end;
                        if let Some(n) = failpoint::torn("install.write-chunk", data.len()) {
                            err = Some(match data.write_at(sink.disk, at, n) {
                                Ok(()) => PowerCut("install.write-chunk".into()).into(),
                                Err(e) => disk_err(e, "writing a chunk"),
                            });
                            break;
                        }
                        if let Err(e) = data.write_at(sink.disk, at, data.len()) {
                            err = Some(disk_err(e, format!("writing {}", sink.label)));
                            break;
                        }
                        at += data.len() as u64;
                        ok += 1;
                    }
                    if tx.send((first, comp, ok, err)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(done_tx);
        let result = (|| {
            let (mut next_read, mut next_write, mut in_flight) = (start, start, 0usize);
            let mut pending: BTreeMap<usize, (usize, Option<InstallError>)> = BTreeMap::new();
            let mut comp_pool: Vec<Vec<u8>> = Vec::new();
            while next_write < chunks.len() {
                while next_read < chunks.len()
                    && in_flight < max_in_flight
                    && (!comp_pool.is_empty() || comp_made < max_comp)
                {
                    // One batch: whole chunks up to BATCH_BYTES uncompressed, at least one.
                    let (mut count, mut plain_len, mut comp_len, mut len) = (0, 0u64, 0u64, 0u64);
                    for c in &chunks[next_read..] {
                        let plain = if is_zero_chunk(c) { 0 } else { u64::from(c.len) };
                        if count > 0 && plain_len + plain > BATCH_BYTES {
                            break;
                        }
                        count += 1;
                        plain_len += plain;
                        comp_len += u64::from(c.compressed_len);
                        len += u64::from(c.len);
                    }
                    let mut buf = comp_pool.pop().unwrap_or_else(|| {
                        comp_made += 1;
                        Vec::with_capacity(MAX_COMPRESSED_CHUNK as usize)
                    });
                    buf.resize(comp_len as usize, 0);
                    cur.read_exact_at(offset, &mut buf)?;
                    if work_tx.send((next_read, count, offset, disk_at, buf)).is_err() {
                        break;
                    }
                    offset += comp_len;
                    disk_at += len;
                    next_read += count;
                    in_flight += 1;
                }
                let Ok((first, comp, ok, err)) = done_rx.recv() else {
                    return Err(InstallError::Disk(anyhow::anyhow!("the chunk writers stopped")));
                };
                comp_pool.push(comp);
                pending.insert(first, (ok, err));
                while let Some((ok, err)) = pending.remove(&next_write) {
                    let first = next_write;
                    for (k, c) in chunks.iter().enumerate().skip(first).take(ok) {
                        on_written(k, c.len as usize, cur)?;
                    }
                    if let Some(e) = err {
                        return Err(e);
                    }
                    in_flight -= 1;
                    next_write = first + ok;
                }
            }
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        drop(work_tx);
        result
    })
}

/// Work for the [`settling`] thread, in the order the chunks were written.
enum Settle {
    /// Start writing back this byte range of the disk ([`start_writeback`]).
    Writeback(u64, u64),
    /// Everything up to this position is written: fsync, then record it as the resume point.
    Checkpoint(ResumeRecord),
}

/// The sending end of the [`settling`] thread.
struct Settler(std::sync::mpsc::Sender<Settle>);

impl Settler {
    /// Queues `job`; fails once a job before it failed: the settling thread then has stopped
    /// and dropped its end (its error is the one [`settling`] returns).
    fn send(&self, job: Settle) -> Result<(), InstallError> {
        self.0.send(job).map_err(|_| InstallError::Disk(anyhow::anyhow!("a checkpoint failed")))
    }
}

/// Runs `f` (the writing of one image) with a helper thread that does the blocking parts of
/// making the writes durable, in order: starting the writeback of written ranges and, at each
/// checkpoint, the fsync and then the resume record. On the calling thread they stalled the
/// reading and handing out of chunks (about 140 ms of a 0.8 s install of 1.1 GiB), and the
/// chunk workers ran dry meanwhile. A checkpoint is recorded only after its fsync, and it only
/// names chunks that were written before it was queued, so the resume record never runs ahead
/// of the disk. When `f` fails (a chunk write, a power cut in a test), the checkpoints already
/// queued are still made: they name whole chunks written before the failure, so the result is
/// what a slightly later failure would have left. When the helper fails, `f` stops at its next
/// job and the helper's error is returned (the calling thread's is only its echo). The helper
/// shares the caller's failpoints.
fn settling<T>(
    disk: &std::fs::File,
    label: &str,
    resume_file: Option<&Path>,
    f: impl FnOnce(&Settler) -> Result<T, InstallError>,
) -> Result<T, InstallError> {
    let failpoints = failpoint::handle();
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel::<Settle>();
        let failpoints = &failpoints;
        // On an error the helper returns, which drops `rx`: the next `send` fails.
        let helper = s.spawn(move || {
            failpoint::adopt(failpoints);
            for job in rx {
                let done = match job {
                    Settle::Writeback(at, len) => {
                        start_writeback(disk, at, len);
                        Ok(())
                    }
                    Settle::Checkpoint(rec) => sync(disk, label).and_then(|()| match resume_file {
                        Some(path) => save_resume(path, &rec),
                        None => Ok(()),
                    }),
                };
                done?;
            }
            Ok(())
        });
        let result = f(&Settler(tx));
        let settled = helper.join().unwrap_or_else(|_| {
            Err(InstallError::Disk(anyhow::anyhow!("the settling thread panicked")))
        });
        settled.and(result)
    })
}

/// Written bytes after which their writeback is started ([`start_writeback`]).
const WRITEBACK_BYTES: u64 = 8 << 20;

/// Starts writing `len` bytes at `offset` of the disk back to storage without waiting (like
/// GNU dd's `oflag=nocache`: `posix_fadvise(DONTNEED)` queues the dirty pages for writeback
/// and drops clean ones). The storage then works while the next chunks are decompressed and
/// verified, each checkpoint's fsync finds little left to do, and an image of several GiB
/// does not push the device's other pages out of its cache. Purely advisory: durability still
/// comes from the fsyncs, and errors are ignored.
fn start_writeback(disk: &std::fs::File, offset: u64, len: u64) {
    use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else { return };
    let _ = posix_fadvise(disk.as_raw_fd(), offset, len, PosixFadviseAdvice::POSIX_FADV_DONTNEED);
}

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
