//! Writes and inspects OS bundles (`.mfb`); the format itself is `updater::bundle`.
//!
//! [`write_bundle`] cuts each image (a file, or a region of a disk image file) into FastCDC
//! chunks on one thread while worker threads (one per core) compress and hash them; the
//! payload goes to a temporary file beside the output, then the tar stream is assembled:
//! manifest, signature, then per image its index and payload. The output is bit-identical
//! for identical inputs and metadata (`created` comes from `SOURCE_DATE_EPOCH`).

use crate::progress::Progress;
use anyhow::{bail, Context, Result};
use ed25519_dalek::SigningKey;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};
use updater::bundle::{
    self as format, chunker, datetime_from_unix, encode_chunk, read_image_layout,
    read_signed_manifest, BundleCursor, ChunkEntry, ChunkIndex, ImageEntry, Manifest, RetryPolicy,
    SlotClass, FORMAT, MANIFEST_NAME, SIGNATURE_NAME,
};
use updater::sign::{KeyId, Keyring, SignatureFile};

/// The manifest fields that are not computed from the images.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleMeta {
    /// e.g. `metrica-rpi4-arm64`.
    pub compatible: String,
    pub version: semver::Version,
    pub security_epoch: u64,
    /// Unix seconds, normally `SOURCE_DATE_EPOCH`; also the tar entries' mtime.
    pub created: u64,
    /// zstd level of every chunk ([`format::DEFAULT_ZSTD_LEVEL`] by default).
    pub zstd_level: i32,
}

/// One image to bundle: `len` bytes at `offset` of `path` (a whole file or a partition of a
/// disk image file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSource {
    pub class: SlotClass,
    pub path: PathBuf,
    pub offset: u64,
    pub len: u64,
}

impl ImageSource {
    /// The whole file.
    pub fn file(class: SlotClass, path: &Path) -> Result<ImageSource> {
        let len =
            std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?.len();
        Ok(ImageSource { class, path: path.to_path_buf(), offset: 0, len })
    }

    /// `len` bytes from `offset` of a file (e.g. a partition of an `.img`).
    pub fn region(class: SlotClass, path: &Path, offset: u64, len: u64) -> ImageSource {
        ImageSource { class, path: path.to_path_buf(), offset, len }
    }

    /// The partition labelled `label` of a GPT disk image.
    pub fn partition(class: SlotClass, disk: &Path, label: &str) -> Result<ImageSource> {
        let p = updater::disk::find_label(disk, label)?;
        Ok(ImageSource::region(class, disk, p.start, p.len))
    }
}

/// What [`write_bundle`] wrote.
#[derive(Debug, Clone)]
pub struct BundleSummary {
    pub path: PathBuf,
    pub manifest: Manifest,
    pub key_id: KeyId,
    /// Bytes of the `.mfb`.
    pub size: u64,
    /// Chunk count per image, in manifest order.
    pub chunks: Vec<usize>,
}

/// Writes a signed bundle of `images` (in that order; at most one per slot class) to `out`,
/// replacing it atomically. Uses every core for compression.
pub fn write_bundle(
    out: &Path,
    meta: &BundleMeta,
    images: &[ImageSource],
    signing_key: &SigningKey,
    progress: &Progress,
) -> Result<BundleSummary> {
    if images.is_empty() {
        bail!("a bundle needs at least one image");
    }
    let dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut entries = Vec::new();
    let mut encoded = Vec::new();
    for img in images {
        if img.len == 0 {
            bail!("{} image {} is empty", img.class, img.path.display());
        }
        let mut payload = tempfile::tempfile_in(dir)
            .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
        let step = progress.bytes(img.len, &format!("bundling {}", img.class));
        let (index, sha) = encode_image(img, meta.zstd_level, &mut payload, &|n| step.inc(n))
            .with_context(|| format!("bundling the {} image {}", img.class, img.path.display()))?;
        step.finish();
        let index_bytes = index.encode();
        entries.push(ImageEntry {
            slot_class: img.class,
            size: img.len,
            sha256: hex::encode(sha),
            tree_sha256: hex::encode(index.tree_sha256()),
            index: img.class.index_name(),
            index_sha256: hex::encode(Sha256::digest(&index_bytes)),
            payload: img.class.payload_name(),
        });
        payload.seek(SeekFrom::Start(0))?;
        encoded.push((img.class, index_bytes, index, payload));
    }
    let manifest = Manifest {
        format: FORMAT,
        compatible: meta.compatible.clone(),
        version: meta.version.clone(),
        security_epoch: meta.security_epoch,
        created: datetime_from_unix(meta.created),
        images: entries,
    };
    let manifest_bytes = manifest.to_toml().into_bytes();
    // The device's parser decides: never write what it would reject.
    let checked = Manifest::parse(&manifest_bytes).context("checking the manifest")?;
    let sig = SignatureFile::sign(signing_key, &manifest_bytes);

    let tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    write_archive(tmp.as_file(), meta.created, &manifest_bytes, &sig.to_bytes(), &mut encoded)
        .with_context(|| format!("writing {}", out.display()))?;
    tmp.as_file().sync_all().with_context(|| format!("syncing {}", out.display()))?;
    let size = tmp.as_file().metadata()?.len();
    tmp.persist(out).with_context(|| format!("renaming the bundle to {}", out.display()))?;
    Ok(BundleSummary {
        path: out.to_path_buf(),
        manifest: checked,
        key_id: sig.key_id,
        size,
        chunks: encoded.iter().map(|e| e.2.chunks.len()).collect(),
    })
}

/// One image ready to frame: its class, encoded index, index and spooled payload.
type EncodedImage = (SlotClass, Vec<u8>, ChunkIndex, File);

/// The tar stream of a bundle (docs/bundle.md): manifest, signature, then per image its
/// index and payload.
fn write_archive(
    file: &File,
    mtime: u64,
    manifest: &[u8],
    signature: &[u8],
    images: &mut [EncodedImage],
) -> std::io::Result<()> {
    let mut tar = format::TarWriter::new(BufWriter::new(file), mtime);
    tar.entry(MANIFEST_NAME, manifest.len() as u64, manifest)?;
    tar.entry(SIGNATURE_NAME, signature.len() as u64, signature)?;
    for (class, index_bytes, index, payload) in images {
        tar.entry(&class.index_name(), index_bytes.len() as u64, &index_bytes[..])?;
        tar.entry(&class.payload_name(), index.payload_len(), payload)?;
    }
    tar.finish()?.flush()
}

type Encoded = std::io::Result<(ChunkEntry, Vec<u8>)>;
type SharedWork = Arc<Mutex<Receiver<(usize, Vec<u8>)>>>;

/// Chunks, compresses and hashes one image into `payload`; returns its index and sha256.
fn encode_image(
    img: &ImageSource,
    level: i32,
    payload: &mut File,
    on_bytes: &(dyn Fn(u64) + Sync),
) -> Result<(ChunkIndex, [u8; 32])> {
    let mut file =
        File::open(&img.path).with_context(|| format!("opening {}", img.path.display()))?;
    let file_len = file.metadata()?.len();
    if img.offset.checked_add(img.len).is_none_or(|end| end > file_len) {
        bail!(
            "{} bytes at {} go past the end of {} ({file_len} bytes)",
            img.len,
            img.offset,
            img.path.display()
        );
    }
    file.seek(SeekFrom::Start(img.offset))?;
    let reader = std::io::BufReader::with_capacity(1 << 20, file).take(img.len);
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()).max(1);

    std::thread::scope(|s| -> Result<(ChunkIndex, [u8; 32])> {
        let (work_tx, work_rx) = sync_channel::<(usize, Vec<u8>)>(workers * 4);
        let (done_tx, done_rx) = sync_channel::<(usize, Encoded)>(workers * 4);
        let chunking = s.spawn(move || -> Result<[u8; 32]> {
            let mut whole = Sha256::new();
            for (seq, chunk) in chunker(reader).enumerate() {
                let chunk = chunk.context("reading the image")?;
                whole.update(&chunk.data);
                if work_tx.send((seq, chunk.data)).is_err() {
                    break;
                }
            }
            Ok(whole.finalize().into())
        });
        let work_rx: SharedWork = Arc::new(Mutex::new(work_rx));
        for _ in 0..workers {
            let (rx, tx) = (work_rx.clone(), done_tx.clone());
            s.spawn(move || {
                let mut comp = match zstd::bulk::Compressor::new(level) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx.send((usize::MAX, Err(e)));
                        return;
                    }
                };
                loop {
                    let next = rx.lock().map(|r| r.recv());
                    let Ok(Ok((seq, data))) = next else { break };
                    if tx.send((seq, encode_chunk(&mut comp, &data))).is_err() {
                        break;
                    }
                }
            });
        }
        drop(done_tx);
        // Reorder and write in chunk order.
        let mut index = ChunkIndex::default();
        let mut pending: BTreeMap<usize, (ChunkEntry, Vec<u8>)> = BTreeMap::new();
        let mut out = BufWriter::with_capacity(1 << 20, &mut *payload);
        for (seq, result) in done_rx {
            let encoded = result.context("compressing a chunk")?;
            pending.insert(seq, encoded);
            while let Some((entry, data)) = pending.remove(&index.chunks.len()) {
                out.write_all(&data).context("writing the payload")?;
                on_bytes(u64::from(entry.len));
                index.chunks.push(entry);
            }
        }
        out.flush().context("writing the payload")?;
        let sha =
            chunking.join().map_err(|_| anyhow::anyhow!("the chunking thread panicked"))??;
        if !pending.is_empty() || index.image_len() != img.len {
            bail!("chunking lost data: {} of {} bytes", index.image_len(), img.len);
        }
        Ok((index, sha))
    })
}

/// Whether and by whom a bundle's manifest is signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignatureStatus {
    /// Verified against the keyring.
    Valid { key_id: KeyId },
    /// No keyring given: the claimed signer only.
    NotChecked { key_id: KeyId },
    /// The keyring does not accept it (unknown key, bad signature).
    Invalid { key_id: KeyId, reason: String },
    /// No usable `manifest.toml.sig`.
    Missing { reason: String },
}

impl SignatureStatus {
    pub fn is_valid(&self) -> bool {
        matches!(self, SignatureStatus::Valid { .. })
    }
}

impl fmt::Display for SignatureStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SignatureStatus::Valid { key_id } => write!(f, "valid, by key {key_id}"),
            SignatureStatus::NotChecked { key_id } => {
                write!(f, "by key {key_id} (not checked: no keyring given)")
            }
            SignatureStatus::Invalid { key_id, reason } => {
                write!(f, "INVALID (key {key_id}): {reason}")
            }
            SignatureStatus::Missing { reason } => write!(f, "MISSING: {reason}"),
        }
    }
}

/// One image as `inspect` sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub entry: ImageEntry,
    /// Chunks in the index (when the index matched the manifest).
    pub chunks: Option<usize>,
    /// Compressed payload bytes.
    pub payload_len: Option<u64>,
}

/// What `imager inspect BUNDLE` prints (`Display`).
#[derive(Debug, Clone)]
pub struct Inspection {
    pub path: PathBuf,
    pub size: u64,
    pub manifest: Manifest,
    pub signature: SignatureStatus,
    pub images: Vec<ImageInfo>,
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = &self.manifest;
        writeln!(f, "bundle      {} ({} bytes)", self.path.display(), self.size)?;
        writeln!(f, "format      {}", m.format)?;
        writeln!(f, "compatible  {}", m.compatible)?;
        writeln!(f, "version     {}", m.version)?;
        writeln!(f, "epoch       {}", m.security_epoch)?;
        writeln!(f, "created     {}", m.created)?;
        writeln!(f, "signature   {}", self.signature)?;
        for img in &self.images {
            let e = &img.entry;
            write!(f, "image       {:<4} {} bytes sha256 {}", e.slot_class, e.size, e.sha256)?;
            match (img.chunks, img.payload_len) {
                (Some(c), Some(p)) => writeln!(f, ", {c} chunks, {p} bytes compressed")?,
                _ => writeln!(f, ", index unreadable")?,
            }
        }
        Ok(())
    }
}

/// Reads a bundle's manifest, checks its signature against the keyring folder when one is
/// given, and reads each image's index. Errors only when the file is not a readable bundle;
/// a bad signature is reported in [`Inspection::signature`].
pub fn inspect(path: &Path, keyring: Option<&Path>) -> Result<Inspection> {
    let mut fetch = format::file_fetch(path);
    let size =
        std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?.len();
    let mut cur = BundleCursor::new(&mut fetch, RetryPolicy::default());
    let (bytes, signature, images_offset) = match read_signed_manifest(&mut cur) {
        Ok(sm) => {
            let status = match keyring {
                None => SignatureStatus::NotChecked { key_id: sm.signature.key_id.clone() },
                Some(dir) => {
                    let ring = Keyring::load(dir)
                        .with_context(|| format!("loading the keyring {}", dir.display()))?;
                    match ring.verify(&sm.bytes, &sm.signature) {
                        Ok(key_id) => SignatureStatus::Valid { key_id },
                        Err(e) => SignatureStatus::Invalid {
                            key_id: sm.signature.key_id.clone(),
                            reason: e.to_string(),
                        },
                    }
                }
            };
            (sm.bytes, status, Some(sm.images_offset))
        }
        Err(format::BundleError::Unsigned | format::BundleError::Signature(_)) => {
            // Show the manifest of an unsigned bundle all the same.
            let first = cur.entry_at(0)?.context("empty bundle")?;
            let bytes = cur.entry_data(&first)?;
            (bytes, SignatureStatus::Missing { reason: "no valid manifest.toml.sig".into() }, None)
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let manifest =
        Manifest::parse(&bytes).with_context(|| format!("reading {}", path.display()))?;
    let mut images = Vec::new();
    let mut offset = images_offset;
    for entry in &manifest.images {
        let layout = offset.and_then(|o| read_image_layout(&mut cur, o, entry).ok());
        offset = layout.as_ref().map(|l| l.end_offset);
        images.push(ImageInfo {
            entry: entry.clone(),
            chunks: layout.as_ref().map(|l| l.index.chunks.len()),
            payload_len: layout.as_ref().map(|l| l.index.payload_len()),
        });
    }
    Ok(Inspection { path: path.to_path_buf(), size, manifest, signature, images })
}

/// Reads the whole bundle and checks every hash against the keyring (what a device would do
/// before writing), without writing anything.
pub fn verify(path: &Path, keyring: &Path) -> Result<format::BundleCheck> {
    let ring = Keyring::load(keyring)
        .with_context(|| format!("loading the keyring {}", keyring.display()))?;
    format::verify_bundle(&mut format::file_fetch(path), &ring)
        .with_context(|| format!("verifying {}", path.display()))
}

#[cfg(test)]
mod tests;
