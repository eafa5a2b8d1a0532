//! OS bundles (`.mfb`): the format, and its verified streaming reader.
//!
//! A bundle is a plain tar stream (docs/bundle.md), read strictly in this order:
//!
//! 1. `manifest.toml` ([`Manifest`]), then 2. `manifest.toml.sig` ([`SignatureFile`]);
//! 3. per image, in manifest order, its chunk index `<class>.index` ([`ChunkIndex`]) and its
//!    payload `<class>.payload`: individually zstd-compressed FastCDC chunks back to back.
//!
//! The signature covers the manifest bytes, the manifest covers each index (sha256), each
//! index covers every chunk (sha256 of the uncompressed bytes), and the manifest covers the
//! whole image twice: its plain sha256, and the sha256 of its chunk list ([`TreeHasher`]),
//! which a device checks at the end of an install without hashing the image a second time.
//! Readers fetch by absolute bundle offset through [`Fetch`] so that a dropped connection or a
//! reboot resumes at the next needed chunk.
//!
//! Whether a verified manifest may go onto a device is [`crate::acceptance`]'s question.

use crate::layout::{PartitionRole, Slot};
use crate::sign::{KeyId, Keyring, SignError, SignatureFile, MAX_SIGNATURE_FILE};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

/// The bundle format the imager writes (3: chunks of up to 4 MiB; see docs/design.md).
pub const FORMAT: u32 = 3;
/// The formats this updater reads: 2 (`tree_sha256` in the manifest, chunks of up to 2 MiB)
/// and 3 (the same layout with chunks of up to 4 MiB). Format 1 had no tree hash.
pub const FORMATS_READ: std::ops::RangeInclusive<u32> = 2..=3;
/// Name of the first tar entry.
pub const MANIFEST_NAME: &str = "manifest.toml";
/// Name of the second tar entry.
pub const SIGNATURE_NAME: &str = "manifest.toml.sig";
/// Largest manifest accepted (before its signature is checked).
pub const MAX_MANIFEST: u64 = 64 * 1024;
/// FastCDC minimum chunk size of the writer.
pub const CHUNK_MIN: u32 = 512 * 1024;
/// FastCDC average chunk size of the writer.
pub const CHUNK_AVG: u32 = 2 * 1024 * 1024;
/// FastCDC maximum chunk size; also the largest uncompressed chunk a reader accepts.
pub const CHUNK_MAX: u32 = 4 * 1024 * 1024;
/// The smallest chunks a reader budgets an index for (an index may list at most one chunk per
/// this many image bytes, plus one): writers choose their FastCDC minimum at or above it.
pub const INDEX_CHUNK_MIN: u32 = 16 * 1024;
/// Largest compressed chunk accepted (zstd's worst case for [`CHUNK_MAX`], rounded up).
pub const MAX_COMPRESSED_CHUNK: u32 = CHUNK_MAX + CHUNK_MAX / 128 + 4096;
/// Largest chunk index accepted whatever the manifest says (images up to about 50 GiB).
pub const MAX_INDEX: u64 = 64 << 20;
/// zstd level used when none is given.
pub const DEFAULT_ZSTD_LEVEL: i32 = 15;
/// Tar block size.
pub const BLOCK: u64 = 512;

/// Which partition of a slot an image is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotClass {
    /// The FAT boot partition (`boot_a`/`boot_b`); slot-independent, `cmdline.txt` is fixed up.
    Boot,
    /// The ext4 root filesystem (`root_a`/`root_b`).
    Root,
}

impl SlotClass {
    pub fn as_str(self) -> &'static str {
        match self {
            SlotClass::Boot => "boot",
            SlotClass::Root => "root",
        }
    }

    /// The partition of `slot` this class of image goes to.
    pub fn partition(self, slot: Slot) -> PartitionRole {
        match self {
            SlotClass::Boot => slot.boot(),
            SlotClass::Root => slot.root(),
        }
    }

    /// Tar entry name of this image's chunk index.
    pub fn index_name(self) -> String {
        format!("{}.index", self.as_str())
    }

    /// Tar entry name of this image's payload.
    pub fn payload_name(self) -> String {
        format!("{}.payload", self.as_str())
    }
}

impl fmt::Display for SlotClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `manifest.toml`. Unknown keys are errors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`FORMAT`] when written; one of [`FORMATS_READ`] when read.
    pub format: u32,
    /// Hardware the bundle is for, e.g. `metrica-rpi4-arm64`.
    pub compatible: String,
    pub version: semver::Version,
    /// Anti-rollback epoch: a device refuses a bundle below its recorded epoch.
    pub security_epoch: u64,
    /// Build time (UTC, from `SOURCE_DATE_EPOCH`).
    pub created: toml::value::Datetime,
    /// One entry per image, in bundle order.
    #[serde(rename = "image")]
    pub images: Vec<ImageEntry>,
}

/// One `[[image]]` of the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageEntry {
    pub slot_class: SlotClass,
    /// Uncompressed size in bytes.
    pub size: u64,
    /// sha256 of the whole uncompressed image (hex).
    pub sha256: String,
    /// sha256 of the image's chunk list ([`TreeHasher`]; hex): the whole-image digest a
    /// device checks at the end of an install.
    pub tree_sha256: String,
    /// Tar entry name of the chunk index.
    pub index: String,
    /// sha256 of the chunk index entry's bytes (hex).
    pub index_sha256: String,
    /// Tar entry name of the payload.
    pub payload: String,
}

impl Manifest {
    /// Renders the manifest; the writer signs exactly these bytes.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("manifest serializes")
    }

    /// Parses and validates manifest bytes (strict: unknown keys, bad hashes, duplicate or
    /// missing images are errors).
    pub fn parse(bytes: &[u8]) -> Result<Manifest, BundleError> {
        let bad = |m: String| BundleError::Manifest(m);
        let text = std::str::from_utf8(bytes).map_err(|_| bad("not UTF-8".into()))?;
        let m: Manifest = toml::from_str(text).map_err(|e| bad(e.message().to_string()))?;
        if !FORMATS_READ.contains(&m.format) {
            return Err(bad(format!(
                "format {} is not supported (expected {} to {})",
                m.format,
                FORMATS_READ.start(),
                FORMATS_READ.end()
            )));
        }
        if m.compatible.is_empty() {
            return Err(bad("compatible is empty".into()));
        }
        if m.images.is_empty() {
            return Err(bad("no [[image]]".into()));
        }
        let mut seen = Vec::new();
        for (i, img) in m.images.iter().enumerate() {
            let at = |what: &str| format!("image {} ({}): {what}", i + 1, img.slot_class);
            if seen.contains(&img.slot_class) {
                return Err(bad(at("slot_class appears twice")));
            }
            seen.push(img.slot_class);
            if img.size == 0 {
                return Err(bad(at("size is 0")));
            }
            for (key, h) in [
                ("sha256", &img.sha256),
                ("tree_sha256", &img.tree_sha256),
                ("index_sha256", &img.index_sha256),
            ] {
                if parse_sha256(h).is_none() {
                    return Err(bad(at(&format!("{key} is not 64 lowercase hex characters"))));
                }
            }
            if img.index != img.slot_class.index_name() {
                return Err(bad(at(&format!("index must be {:?}", img.slot_class.index_name()))));
            }
            if img.payload != img.slot_class.payload_name() {
                return Err(bad(at(&format!(
                    "payload must be {:?}",
                    img.slot_class.payload_name()
                ))));
            }
        }
        Ok(m)
    }

    /// The image entry of this class, if the bundle has one.
    pub fn image(&self, class: SlotClass) -> Option<&ImageEntry> {
        self.images.iter().find(|i| i.slot_class == class)
    }
}

/// A `created` timestamp from Unix seconds (UTC).
pub fn datetime_from_unix(secs: u64) -> toml::value::Datetime {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    humantime::format_rfc3339_seconds(t).to_string().parse().expect("RFC 3339 is a TOML datetime")
}

/// Parses 64 lowercase hex characters.
pub fn parse_sha256(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// One chunk of an image as listed in its index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkEntry {
    /// sha256 of the uncompressed chunk.
    pub sha256: [u8; 32],
    /// Uncompressed length.
    pub len: u32,
    /// Compressed length in the payload.
    pub compressed_len: u32,
}

/// A chunk index: magic `MFBIDX01`, chunk count (u64 LE), then per chunk 40 bytes:
/// sha256 (32), uncompressed length (u32 LE), compressed length (u32 LE).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChunkIndex {
    pub chunks: Vec<ChunkEntry>,
}

/// Magic bytes at the start of a chunk index.
pub const INDEX_MAGIC: &[u8; 8] = b"MFBIDX01";
const INDEX_HEADER: u64 = 16;
const INDEX_ENTRY: u64 = 40;

impl ChunkIndex {
    /// The largest index a reader accepts for an image of `size` bytes.
    pub fn max_encoded_len(size: u64) -> u64 {
        INDEX_HEADER + INDEX_ENTRY * (size / u64::from(INDEX_CHUNK_MIN) + 1)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(INDEX_HEADER as usize + self.chunks.len() * 40);
        out.extend_from_slice(INDEX_MAGIC);
        out.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        for c in &self.chunks {
            out.extend_from_slice(&c.sha256);
            out.extend_from_slice(&c.len.to_le_bytes());
            out.extend_from_slice(&c.compressed_len.to_le_bytes());
        }
        out
    }

    /// Decodes an index and checks it against the image size it must describe.
    pub fn decode(bytes: &[u8], image_size: u64) -> Result<ChunkIndex, String> {
        if bytes.len() < INDEX_HEADER as usize || &bytes[..8] != INDEX_MAGIC {
            return Err("not a chunk index (bad magic)".into());
        }
        let count = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
        let body = &bytes[INDEX_HEADER as usize..];
        if count.checked_mul(INDEX_ENTRY) != Some(body.len() as u64) {
            return Err(format!("{count} chunks announced, {} bytes of entries", body.len()));
        }
        let mut chunks = Vec::with_capacity(count as usize);
        let mut total = 0u64;
        for (i, e) in body.chunks_exact(INDEX_ENTRY as usize).enumerate() {
            let sha256: [u8; 32] = e[..32].try_into().expect("32 bytes");
            let len = u32::from_le_bytes(e[32..36].try_into().expect("4 bytes"));
            let compressed_len = u32::from_le_bytes(e[36..40].try_into().expect("4 bytes"));
            if len == 0 || len > CHUNK_MAX {
                return Err(format!("chunk {i}: length {len} outside 1..={CHUNK_MAX}"));
            }
            if compressed_len == 0 || compressed_len > MAX_COMPRESSED_CHUNK {
                return Err(format!("chunk {i}: compressed length {compressed_len} out of range"));
            }
            total += u64::from(len);
            chunks.push(ChunkEntry { sha256, len, compressed_len });
        }
        if total != image_size {
            return Err(format!("chunks add up to {total} bytes, the image has {image_size}"));
        }
        Ok(ChunkIndex { chunks })
    }

    /// Sum of the uncompressed lengths.
    pub fn image_len(&self) -> u64 {
        self.chunks.iter().map(|c| u64::from(c.len)).sum()
    }

    /// Sum of the compressed lengths: the payload entry's size.
    pub fn payload_len(&self) -> u64 {
        self.chunks.iter().map(|c| u64::from(c.compressed_len)).sum()
    }

    /// The image's tree hash ([`TreeHasher`]) as this index describes it: what the manifest's
    /// `tree_sha256` must be.
    pub fn tree_sha256(&self) -> [u8; 32] {
        let mut tree = TreeHasher::new();
        for c in &self.chunks {
            tree.chunk(&c.sha256, c.len);
        }
        tree.finalize()
    }
}

/// The whole-image digest a device checks at the end of an install (`tree_sha256`): sha256 of
/// `MFBTREE1`, then per chunk, in image order, its sha256 (32 bytes) and its length (u32 LE).
/// Given sha256's collision resistance it identifies the image as well as the image's plain
/// sha256 does, and it costs 36 bytes of hashing per chunk instead of a second pass over
/// every byte: the install feeds it the chunks it has verified and written, in write order
/// (and, on a resume, the chunks it reads back and hashes from the partition).
#[derive(Debug, Clone)]
pub struct TreeHasher {
    hasher: Sha256,
}

impl Default for TreeHasher {
    fn default() -> Self {
        TreeHasher::new()
    }
}

impl TreeHasher {
    pub fn new() -> TreeHasher {
        let mut hasher = Sha256::new();
        hasher.update(b"MFBTREE1");
        TreeHasher { hasher }
    }

    /// Appends the next chunk: its sha256 and length.
    pub fn chunk(&mut self, sha256: &[u8; 32], len: u32) {
        self.hasher.update(sha256);
        self.hasher.update(len.to_le_bytes());
    }

    pub fn finalize(self) -> [u8; 32] {
        self.hasher.finalize().into()
    }
}

/// FastCDC parameters (bytes). Readers do not depend on them: they accept any chunk of
/// 1..=[`CHUNK_MAX`] bytes and budget indexes for chunks of [`INDEX_CHUNK_MIN`] and more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkParams {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

/// What the imager writes: [`CHUNK_MIN`], [`CHUNK_AVG`], [`CHUNK_MAX`].
pub const CHUNKING: ChunkParams = ChunkParams { min: CHUNK_MIN, avg: CHUNK_AVG, max: CHUNK_MAX };

/// Cuts an image into content-defined chunks with the bundle's FastCDC parameters.
pub fn chunker<R: Read>(image: R) -> fastcdc::v2020::StreamCDC<R> {
    chunker_with(image, CHUNKING)
}

/// Cuts an image into content-defined chunks with other FastCDC parameters (tests use small
/// chunks to get many of them from small images).
pub fn chunker_with<R: Read>(image: R, p: ChunkParams) -> fastcdc::v2020::StreamCDC<R> {
    assert!(
        INDEX_CHUNK_MIN <= p.min && p.min <= p.avg && p.avg <= p.max && p.max <= CHUNK_MAX,
        "chunk parameters {p:?} outside what readers accept"
    );
    fastcdc::v2020::StreamCDC::new(image, p.min, p.avg, p.max)
}

/// Compresses one chunk on its own and describes it for the index.
pub fn encode_chunk(
    compressor: &mut zstd::bulk::Compressor<'_>,
    data: &[u8],
) -> io::Result<(ChunkEntry, Vec<u8>)> {
    let compressed = compressor.compress(data)?;
    let entry = ChunkEntry {
        sha256: Sha256::digest(data).into(),
        len: u32::try_from(data.len()).map_err(io::Error::other)?,
        compressed_len: u32::try_from(compressed.len()).map_err(io::Error::other)?,
    };
    Ok((entry, compressed))
}

/// Rounds a tar entry size up to whole blocks.
pub fn padded(size: u64) -> u64 {
    size.div_ceil(BLOCK) * BLOCK
}

/// The largest number an 11-digit octal header field holds.
const MAX_OCTAL: u64 = 0o77777777777;

/// The header of one bundle entry as the writer emits it: ustar, a regular file, mode 0644,
/// owner root, `mtime`; sizes of 8 GiB and more in GNU base-256 (the `tar` crate's rule).
/// Names are single path components of at most 99 bytes.
pub fn tar_header(name: &str, size: u64, mtime: u64) -> io::Result<tar::Header> {
    if name.len() > 99 || name.contains('/') || name.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad entry name {name:?}"),
        ));
    }
    let mut h = tar::Header::new_ustar();
    h.set_path(name)?;
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_size(size);
    h.set_mtime(mtime.min(MAX_OCTAL));
    h.set_username("root")?;
    h.set_groupname("root")?;
    h.set_cksum();
    // Bundles have always carried GNU tar's rendering of the checksum (six digits, NUL,
    // space); the crate writes seven digits and a NUL. Same value, same bytes as before.
    let sum = h.cksum()?;
    h.as_old_mut().cksum.copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    Ok(h)
}

/// Writes a bundle's tar stream: the entries in the order they are added, each padded to
/// whole blocks with zeros, then the end-of-archive marker (two zero blocks).
pub struct TarWriter<W: Write> {
    tar: tar::Builder<W>,
    mtime: u64,
}

impl<W: Write> TarWriter<W> {
    /// Entries get `mtime` (the manifest's `created`).
    pub fn new(out: W, mtime: u64) -> TarWriter<W> {
        TarWriter { tar: tar::Builder::new(out), mtime }
    }

    /// Appends one entry: its header, exactly `size` bytes of `data` (fewer is an error),
    /// zero padding.
    pub fn entry(&mut self, name: &str, size: u64, data: impl Read) -> io::Result<()> {
        let header = tar_header(name, size, self.mtime)?;
        self.tar.append(&header, ExactReader { inner: data.take(size), left: size, name })
    }

    /// Writes the end-of-archive marker and hands back the output.
    pub fn finish(self) -> io::Result<W> {
        self.tar.into_inner()
    }
}

/// A reader of exactly `left` more bytes: ending early is an error, not a short entry.
struct ExactReader<'a, R> {
    inner: R,
    left: u64,
    name: &'a str,
}

impl<R: Read> Read for ExactReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.left > 0 && !buf.is_empty() {
            let what = format!("{}: short data", self.name);
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, what));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// A tar entry header as read from a bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarEntry {
    pub name: String,
    pub size: u64,
    /// Bundle offset of the entry's first data byte.
    pub data_offset: u64,
}

impl TarEntry {
    /// Bundle offset of the next header.
    pub fn next_offset(&self) -> u64 {
        self.data_offset + padded(self.size)
    }
}

/// Parses a tar header block at bundle offset `offset` with the `tar` crate. `Ok(None)` is
/// the end-of-archive (zero) block. Only regular files are accepted: links, devices,
/// directories and the pax and GNU extension entries are refused.
pub fn parse_tar_header(block: &[u8; 512], offset: u64) -> Result<Option<TarEntry>, String> {
    if block.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    let h = tar::Header::from_byte_slice(block);
    let stored = h.cksum().map_err(|_| "unreadable header checksum")?;
    let mut computed = h.clone();
    computed.set_cksum();
    if computed.cksum().ok() != Some(stored) {
        return Err("header checksum mismatch".into());
    }
    if h.as_ustar().is_none() && h.as_gnu().is_none() {
        return Err("not a ustar header".into());
    }
    if !h.entry_type().is_file() {
        let t = h.entry_type().as_byte();
        return Err(format!("entry type {:?} is not a regular file", t as char));
    }
    let name = String::from_utf8(h.path_bytes().into_owned())
        .map_err(|_| "entry name is not UTF-8".to_string())?;
    let size = h.entry_size().map_err(|_| "unreadable entry size")?;
    Ok(Some(TarEntry { name, size, data_offset: offset + BLOCK }))
}

/// Why a bundle could not be read or did not verify. Nothing is written when these occur
/// before the first chunk; chunk errors occur before that chunk is written.
#[derive(Debug, Error)]
pub enum BundleError {
    #[error("not a bundle: {0}")]
    NotABundle(String),
    #[error("unsigned bundle: {MANIFEST_NAME} is not followed by {SIGNATURE_NAME}")]
    Unsigned,
    #[error("signature: {0}")]
    Signature(#[from] SignError),
    #[error("manifest: {0}")]
    Manifest(String),
    #[error("bundle layout: {0}")]
    Layout(String),
    #[error("{image} chunk index: {reason}")]
    Index { image: SlotClass, reason: String },
    #[error("{image} chunk {chunk} (bundle offset {offset}) is corrupt: {reason}")]
    ChunkCorrupt { image: SlotClass, chunk: usize, offset: u64, reason: String },
    /// The image written does not hash to the manifest's digest (`what`: `sha256` or
    /// `tree_sha256`).
    #[error(
        "{image} image {what} mismatch: the manifest says {expected}, the data gives {actual}"
    )]
    ImageHash { image: SlotClass, what: &'static str, expected: String, actual: String },
    #[error("truncated bundle: it ends before byte {offset}")]
    Truncated { offset: u64 },
    #[error("{0}")]
    Fetch(#[from] FetchError),
}

/// Why bundle bytes could not be fetched.
#[derive(Debug, Error)]
pub enum FetchError {
    #[error("{url}: HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("{url}: timed out")]
    Timeout { url: String },
    #[error("{url}: {message}")]
    Transport { url: String, message: String },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("{what} cannot be read again from byte {offset}")]
    NotSeekable { what: String, offset: u64 },
    #[error("{what}: gave up after {attempts} attempts: {last}")]
    GaveUp { what: String, attempts: u32, last: String },
}

/// Where bundle bytes come from: a file, a pipe, an HTTP(S) URL. Readers ask for a
/// sequential reader from an absolute offset, and ask again after a failure.
pub trait Fetch: Send {
    /// A reader of the bundle from byte `offset` on. `Ok(None)` means `offset` is at or past
    /// the end of the bundle.
    fn open_at(&mut self, offset: u64) -> Result<Option<Box<dyn Read + Send>>, FetchError>;
    /// Whether a failed read is worth retrying by opening again (networks); files and pipes
    /// are final.
    fn retryable(&self) -> bool;
    /// Whether `open_at` can go to any offset cheaply (files, HTTP ranges) rather than only
    /// forward by reading (pipes).
    fn seekable(&self) -> bool;
    /// Names the source in errors and logs.
    fn describe(&self) -> String;
}

/// A bundle file.
#[derive(Debug)]
pub struct FileFetch {
    pub path: PathBuf,
}

impl Fetch for FileFetch {
    fn open_at(&mut self, offset: u64) -> Result<Option<Box<dyn Read + Send>>, FetchError> {
        use std::io::Seek;
        let io = |source| FetchError::Io { what: self.path.display().to_string(), source };
        let mut f = std::fs::File::open(&self.path).map_err(io)?;
        let len = f.metadata().map_err(io)?.len();
        if offset >= len {
            return Ok(None);
        }
        f.seek(io::SeekFrom::Start(offset)).map_err(io)?;
        Ok(Some(Box::new(f)))
    }
    fn retryable(&self) -> bool {
        false
    }
    fn seekable(&self) -> bool {
        true
    }
    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// A bundle read once from a pipe (stdin) or any reader: forward only.
pub struct ReaderFetch {
    reader: Option<Box<dyn Read + Send>>,
    what: String,
}

impl ReaderFetch {
    pub fn new(reader: Box<dyn Read + Send>, what: &str) -> ReaderFetch {
        ReaderFetch { reader: Some(reader), what: what.to_string() }
    }
}

impl Fetch for ReaderFetch {
    fn open_at(&mut self, offset: u64) -> Result<Option<Box<dyn Read + Send>>, FetchError> {
        let mut r = self
            .reader
            .take()
            .ok_or_else(|| FetchError::NotSeekable { what: self.what.clone(), offset })?;
        let skipped = io::copy(&mut (&mut r).take(offset), &mut io::sink())
            .map_err(|source| FetchError::Io { what: self.what.clone(), source })?;
        if skipped < offset {
            return Ok(None);
        }
        Ok(Some(r))
    }
    fn retryable(&self) -> bool {
        false
    }
    fn seekable(&self) -> bool {
        false
    }
    fn describe(&self) -> String {
        self.what.clone()
    }
}

/// How often and how patiently a retryable source is reopened after a failed read.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Consecutive failures (without progress) before giving up.
    pub attempts: u32,
    /// Wait before the first retry; doubled each time, at most 30 s.
    pub backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { attempts: 6, backoff: Duration::from_millis(500) }
    }
}

/// Reads a bundle by absolute offsets over a [`Fetch`], reopening it after a failed read
/// (from the start of the unit being read: a header, the manifest, an index, one chunk).
pub struct BundleCursor<'a> {
    fetch: &'a mut dyn Fetch,
    reader: Option<Box<dyn Read + Send>>,
    pos: u64,
    retry: RetryPolicy,
    retries: Vec<RetryNote>,
    bytes_read: u64,
}

/// A failed read that was retried (for progress and logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryNote {
    /// Bundle offset the read starts again from.
    pub offset: u64,
    pub attempt: u32,
    pub error: String,
}

impl<'a> BundleCursor<'a> {
    pub fn new(fetch: &'a mut dyn Fetch, retry: RetryPolicy) -> BundleCursor<'a> {
        BundleCursor { fetch, reader: None, pos: 0, retry, retries: Vec::new(), bytes_read: 0 }
    }

    /// The retries since the last call.
    pub fn take_retries(&mut self) -> Vec<RetryNote> {
        std::mem::take(&mut self.retries)
    }

    /// Bytes read from the source so far (including skipped padding).
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    pub fn describe(&self) -> String {
        self.fetch.describe()
    }

    fn position(&mut self, offset: u64) -> Result<bool, BundleError> {
        if let Some(r) = self.reader.as_mut() {
            let gap = offset.checked_sub(self.pos);
            match gap {
                Some(g) if g < 256 * 1024 || !self.fetch.seekable() => {
                    let n = io::copy(&mut r.take(g), &mut io::sink())
                        .map_err(|source| FetchError::Io { what: self.fetch.describe(), source })?;
                    self.pos += n;
                    self.bytes_read += n;
                    if n < g {
                        return Ok(false);
                    }
                    return Ok(true);
                }
                _ => self.reader = None,
            }
        }
        match self.fetch.open_at(offset)? {
            Some(r) => {
                self.reader = Some(r);
                self.pos = offset;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Fills `buf` with the bundle bytes at `offset..offset + buf.len()`.
    pub fn read_exact_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BundleError> {
        let mut attempt = 0u32;
        let mut wait = self.retry.backoff;
        loop {
            let err = match self.try_read(offset, buf) {
                Ok(true) => return Ok(()),
                Ok(false) => {
                    if !self.fetch.retryable() || attempt > 0 {
                        return Err(BundleError::Truncated { offset: offset + buf.len() as u64 });
                    }
                    "the data ended early".to_string()
                }
                Err(e) => {
                    let retry_it = self.fetch.retryable()
                        && !matches!(
                            e,
                            BundleError::Fetch(FetchError::Status { status: 400..=499, .. })
                        );
                    if !retry_it {
                        return Err(e);
                    }
                    e.to_string()
                }
            };
            self.reader = None;
            attempt += 1;
            if attempt >= self.retry.attempts {
                return Err(BundleError::Fetch(FetchError::GaveUp {
                    what: self.fetch.describe(),
                    attempts: attempt,
                    last: err,
                }));
            }
            std::thread::sleep(wait);
            wait = (wait * 2).min(Duration::from_secs(30));
            self.retries.push(RetryNote { offset, attempt, error: err });
        }
    }

    /// `Ok(false)`: the bundle ended before `offset + buf.len()`.
    fn try_read(&mut self, offset: u64, buf: &mut [u8]) -> Result<bool, BundleError> {
        if !self.position(offset)? {
            return Ok(false);
        }
        let r = self.reader.as_mut().expect("positioned");
        let mut filled = 0;
        while filled < buf.len() {
            match r.read(&mut buf[filled..]) {
                Ok(0) => {
                    self.pos += filled as u64;
                    self.bytes_read += filled as u64;
                    self.reader = None;
                    return Ok(false);
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    self.reader = None;
                    return Err(FetchError::Io { what: self.fetch.describe(), source }.into());
                }
            }
        }
        self.pos += filled as u64;
        self.bytes_read += filled as u64;
        Ok(true)
    }

    /// Reads the tar header at `offset`; `Ok(None)` at the end-of-archive block or the end of
    /// the data.
    pub fn entry_at(&mut self, offset: u64) -> Result<Option<TarEntry>, BundleError> {
        let mut block = [0u8; 512];
        self.read_exact_at(offset, &mut block)?;
        parse_tar_header(&block, offset).map_err(|e| {
            if offset == 0 {
                BundleError::NotABundle(e)
            } else {
                BundleError::Layout(format!("tar header at byte {offset}: {e}"))
            }
        })
    }

    /// Reads the tar header at `offset` and checks its name and size limit.
    pub fn expect_entry(
        &mut self,
        offset: u64,
        name: &str,
        max_size: u64,
    ) -> Result<TarEntry, BundleError> {
        let e = self
            .entry_at(offset)?
            .ok_or_else(|| BundleError::Layout(format!("archive ends where {name} should be")))?;
        if e.name != name {
            return Err(BundleError::Layout(format!("found {:?} where {name} should be", e.name)));
        }
        if e.size > max_size {
            return Err(BundleError::Layout(format!(
                "{name} is {} bytes, at most {max_size} are allowed",
                e.size
            )));
        }
        Ok(e)
    }

    /// Reads an entry's whole data (callers bound its size first).
    pub fn entry_data(&mut self, e: &TarEntry) -> Result<Vec<u8>, BundleError> {
        let mut buf = vec![0u8; e.size as usize];
        self.read_exact_at(e.data_offset, &mut buf)?;
        Ok(buf)
    }
}

/// A manifest whose signature has been checked.
#[derive(Debug, Clone)]
pub struct VerifiedManifest {
    pub manifest: Manifest,
    /// The exact signed bytes.
    pub bytes: Vec<u8>,
    /// sha256 of the manifest bytes (hex): identifies the bundle (resume records use it).
    pub sha256: String,
    pub key_id: KeyId,
    /// Bundle offset of the first image's index header.
    pub images_offset: u64,
}

/// The manifest and signature entries as read, before verification (for `inspect`).
#[derive(Debug, Clone)]
pub struct SignedManifest {
    pub bytes: Vec<u8>,
    pub signature: SignatureFile,
    pub images_offset: u64,
}

/// Reads `manifest.toml` and `manifest.toml.sig` from the start of a bundle, unverified.
pub fn read_signed_manifest(cur: &mut BundleCursor<'_>) -> Result<SignedManifest, BundleError> {
    let first = match cur.entry_at(0) {
        Ok(Some(e)) => e,
        Ok(None) => return Err(BundleError::NotABundle("empty tar archive".into())),
        Err(BundleError::Truncated { .. }) => {
            return Err(BundleError::NotABundle("shorter than a tar header".into()))
        }
        Err(e) => return Err(e),
    };
    if first.name != MANIFEST_NAME {
        return Err(BundleError::NotABundle(format!(
            "first entry is {:?}, not {MANIFEST_NAME}",
            first.name
        )));
    }
    if first.size > MAX_MANIFEST {
        return Err(BundleError::Manifest(format!("{} bytes is too large", first.size)));
    }
    let bytes = cur.entry_data(&first)?;
    let sig_entry = cur.entry_at(first.next_offset())?;
    let sig_entry = match sig_entry {
        Some(e) if e.name == SIGNATURE_NAME => e,
        _ => return Err(BundleError::Unsigned),
    };
    if sig_entry.size > MAX_SIGNATURE_FILE {
        return Err(SignError::MalformedSignature(format!("{} bytes", sig_entry.size)).into());
    }
    let signature = SignatureFile::parse(&cur.entry_data(&sig_entry)?)?;
    Ok(SignedManifest { bytes, signature, images_offset: sig_entry.next_offset() })
}

impl SignedManifest {
    /// Checks the signature against `keyring`, then parses the manifest.
    pub fn verify(self, keyring: &Keyring) -> Result<VerifiedManifest, BundleError> {
        let key_id = keyring.verify(&self.bytes, &self.signature)?;
        let manifest = Manifest::parse(&self.bytes)?;
        Ok(VerifiedManifest {
            manifest,
            sha256: hex::encode(Sha256::digest(&self.bytes)),
            bytes: self.bytes,
            key_id,
            images_offset: self.images_offset,
        })
    }
}

/// Reads and verifies the manifest: nothing else of the bundle is trusted before this.
pub fn read_verified_manifest(
    cur: &mut BundleCursor<'_>,
    keyring: &Keyring,
) -> Result<VerifiedManifest, BundleError> {
    read_signed_manifest(cur)?.verify(keyring)
}

/// Where one image's index and payload sit in the bundle, with its verified index.
#[derive(Debug, Clone)]
pub struct ImageLayout {
    pub entry: ImageEntry,
    pub index: ChunkIndex,
    /// Bundle offset of the index's tar header.
    pub index_offset: u64,
    /// Bundle offset of the first payload byte.
    pub payload_offset: u64,
    /// Bundle offset of the header after the payload.
    pub end_offset: u64,
}

impl ImageLayout {
    /// Bundle offset of chunk `k` (and of the end of the payload for `k == len`).
    pub fn chunk_offsets(&self) -> impl Iterator<Item = u64> + '_ {
        let mut off = self.payload_offset;
        self.index.chunks.iter().map(move |c| {
            let here = off;
            off += u64::from(c.compressed_len);
            here
        })
    }
}

/// Reads the chunk index of `entry` at `offset` and checks it against the manifest, then the
/// payload header after it.
pub fn read_image_layout(
    cur: &mut BundleCursor<'_>,
    offset: u64,
    entry: &ImageEntry,
) -> Result<ImageLayout, BundleError> {
    let class = entry.slot_class;
    let max = ChunkIndex::max_encoded_len(entry.size).min(MAX_INDEX);
    let ie = cur.expect_entry(offset, &entry.index, max)?;
    let bytes = cur.entry_data(&ie)?;
    let digest = hex::encode(Sha256::digest(&bytes));
    if digest != entry.index_sha256 {
        return Err(BundleError::Index {
            image: class,
            reason: format!("sha256 {digest} does not match the manifest"),
        });
    }
    let index = ChunkIndex::decode(&bytes, entry.size)
        .map_err(|reason| BundleError::Index { image: class, reason })?;
    let pe = cur.expect_entry(ie.next_offset(), &entry.payload, u64::MAX)?;
    if pe.size != index.payload_len() {
        return Err(BundleError::Layout(format!(
            "{} is {} bytes, its index adds up to {}",
            entry.payload,
            pe.size,
            index.payload_len()
        )));
    }
    Ok(ImageLayout {
        entry: entry.clone(),
        index,
        index_offset: offset,
        payload_offset: pe.data_offset,
        end_offset: pe.next_offset(),
    })
}

/// Decompresses one chunk into `out` (replacing its contents) and checks it against its index
/// entry: exact length and sha256. `out` never grows past its capacity or [`CHUNK_MAX`]; on an
/// error it is left empty.
pub fn decode_chunk(
    decompressor: &mut zstd::bulk::Decompressor<'_>,
    compressed: &[u8],
    entry: &ChunkEntry,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    out.clear();
    out.reserve(entry.len as usize);
    let result = check_decoded(decompressor, compressed, entry, out);
    if result.is_err() {
        out.clear();
    }
    result
}

fn check_decoded(
    decompressor: &mut zstd::bulk::Decompressor<'_>,
    compressed: &[u8],
    entry: &ChunkEntry,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    // Decompressed straight into the spare capacity after `out`'s contents (no zero-fill
    // first); zstd never writes past the capacity, so a chunk longer than that fails here and
    // one longer than its index entry (but within the capacity) just below.
    let start = out.len();
    let mut dest = io::Cursor::new(&mut *out);
    dest.set_position(start as u64);
    let n = decompressor
        .decompress_to_buffer(compressed, &mut dest)
        .map_err(|e| format!("zstd: {e}"))?;
    if n != entry.len as usize {
        return Err(format!("{n} bytes, the index says {}", entry.len));
    }
    let dest = &out[start..];
    // Runs of zeros (free space of a filesystem image) become max-size chunks whose hash is
    // known: for those, "all bytes are zero" is the same check as the sha256, only cheaper.
    if is_zero_chunk(entry) {
        if dest.iter().fold(0u8, |acc, &b| acc | b) == 0 {
            return Ok(());
        }
        return Err("sha256 mismatch".into());
    }
    if <[u8; 32]>::from(Sha256::digest(dest)) != entry.sha256 {
        return Err("sha256 mismatch".into());
    }
    Ok(())
}

/// Whether `entry` is a run of [`CHUNK_MAX`] zero bytes (free space of a filesystem image), by
/// its signed index entry alone. Such a chunk's content is fully known from the index: a reader
/// may write zeros for it without decompressing its payload, and so writes exactly the bytes
/// whose sha256 the index lists.
pub fn is_zero_chunk(entry: &ChunkEntry) -> bool {
    entry.len == CHUNK_MAX && entry.sha256 == *zero_chunk_sha256()
}

/// sha256 of [`CHUNK_MAX`] zero bytes.
fn zero_chunk_sha256() -> &'static [u8; 32] {
    static HASH: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    HASH.get_or_init(|| Sha256::digest(vec![0u8; CHUNK_MAX as usize]).into())
}

/// Reads, decompresses and verifies chunks; reuses its buffers.
pub struct ChunkDecoder {
    decompressor: zstd::bulk::Decompressor<'static>,
    compressed: Vec<u8>,
    plain: Vec<u8>,
}

impl ChunkDecoder {
    pub fn new() -> io::Result<ChunkDecoder> {
        Ok(ChunkDecoder {
            decompressor: zstd::bulk::Decompressor::new()?,
            compressed: Vec::with_capacity(MAX_COMPRESSED_CHUNK as usize),
            plain: Vec::with_capacity(CHUNK_MAX as usize),
        })
    }

    /// Reads chunk `k` of `image` at bundle `offset` and returns its bytes once their sha256
    /// matches the index; a corrupt chunk is an error before anything can use it.
    pub fn read_chunk(
        &mut self,
        cur: &mut BundleCursor<'_>,
        image: &ImageLayout,
        k: usize,
        offset: u64,
    ) -> Result<&[u8], BundleError> {
        let c = image.index.chunks[k];
        self.compressed.resize(c.compressed_len as usize, 0);
        cur.read_exact_at(offset, &mut self.compressed)?;
        decode_chunk(&mut self.decompressor, &self.compressed, &c, &mut self.plain).map_err(
            |reason| BundleError::ChunkCorrupt {
                image: image.entry.slot_class,
                chunk: k,
                offset,
                reason,
            },
        )?;
        Ok(&self.plain)
    }
}

/// A summary of a whole bundle checked end to end (every chunk and image hash).
#[derive(Debug, Clone)]
pub struct BundleCheck {
    pub manifest: VerifiedManifest,
    pub chunks: Vec<usize>,
    pub bundle_len: u64,
}

/// Reads a whole bundle and checks everything, writing nothing (e.g. `imager inspect --verify`).
pub fn verify_bundle(fetch: &mut dyn Fetch, keyring: &Keyring) -> Result<BundleCheck, BundleError> {
    let mut cur = BundleCursor::new(fetch, RetryPolicy::default());
    let vm = read_verified_manifest(&mut cur, keyring)?;
    let mut dec =
        ChunkDecoder::new().map_err(|source| FetchError::Io { what: "zstd".into(), source })?;
    let mut offset = vm.images_offset;
    let mut chunks = Vec::new();
    for entry in &vm.manifest.images {
        let layout = read_image_layout(&mut cur, offset, entry)?;
        // Offline, both whole-image digests are checked: the plain sha256 and the tree.
        let mut whole = Sha256::new();
        let mut tree = TreeHasher::new();
        let offsets: Vec<u64> = layout.chunk_offsets().collect();
        for (k, off) in offsets.into_iter().enumerate() {
            let data = dec.read_chunk(&mut cur, &layout, k, off)?;
            whole.update(data);
            let len = u32::try_from(data.len()).expect("chunks are at most CHUNK_MAX");
            tree.chunk(&Sha256::digest(data).into(), len);
        }
        let plain: [u8; 32] = whole.finalize().into();
        for (what, actual, expected) in
            [("sha256", plain, &entry.sha256), ("tree_sha256", tree.finalize(), &entry.tree_sha256)]
        {
            let actual = hex::encode(actual);
            if actual != *expected {
                return Err(BundleError::ImageHash {
                    image: entry.slot_class,
                    what,
                    expected: expected.clone(),
                    actual,
                });
            }
        }
        chunks.push(layout.index.chunks.len());
        offset = layout.end_offset;
    }
    Ok(BundleCheck { manifest: vm, chunks, bundle_len: offset + 1024 })
}

/// Opens a bundle file for reading by offset.
pub fn file_fetch(path: &Path) -> FileFetch {
    FileFetch { path: path.to_path_buf() }
}

/// A small sequential bundle maker for tests (the real, parallel writer is
/// `imager::bundle::write_bundle`). Enabled in this crate's tests and by the `testkit` feature.
#[cfg(any(test, feature = "testkit"))]
pub mod testkit {
    use super::*;
    use ed25519_dalek::SigningKey;

    /// What to put in a test bundle's manifest.
    #[derive(Debug, Clone)]
    pub struct TestMeta {
        pub compatible: String,
        pub version: semver::Version,
        pub security_epoch: u64,
    }

    impl Default for TestMeta {
        fn default() -> Self {
            TestMeta {
                compatible: "metrica-test".into(),
                version: semver::Version::new(2, 0, 0),
                security_epoch: 1,
            }
        }
    }

    /// Small chunks, so that small test images give many of them.
    pub const TEST_CHUNKING: ChunkParams =
        ChunkParams { min: INDEX_CHUNK_MIN, avg: 32 * 1024, max: 64 * 1024 };

    /// Builds a bundle in memory with [`TEST_CHUNKING`]. `key: None` makes an unsigned bundle.
    pub fn make_bundle(
        meta: &TestMeta,
        images: &[(SlotClass, &[u8])],
        key: Option<&SigningKey>,
    ) -> Vec<u8> {
        make_bundle_with(meta, images, key, TEST_CHUNKING)
    }

    /// [`make_bundle`] with other chunking, e.g. the imager's [`CHUNKING`].
    pub fn make_bundle_with(
        meta: &TestMeta,
        images: &[(SlotClass, &[u8])],
        key: Option<&SigningKey>,
        chunking: ChunkParams,
    ) -> Vec<u8> {
        tar_of(&bundle_entries(meta, images, key, chunking))
    }

    /// Tar entries in order, as (name, bytes).
    pub type Entries = Vec<(String, Vec<u8>)>;

    /// The entries of a test bundle in bundle order: for tests that reorder, rename, resize
    /// or drop entries before framing them with [`tar_of`].
    pub fn bundle_entries(
        meta: &TestMeta,
        images: &[(SlotClass, &[u8])],
        key: Option<&SigningKey>,
        chunking: ChunkParams,
    ) -> Entries {
        let mut parts = Vec::new();
        let mut entries = Vec::new();
        let mut comp = zstd::bulk::Compressor::new(3).expect("zstd");
        for (class, data) in images {
            let mut index = ChunkIndex::default();
            let mut payload = Vec::new();
            for chunk in chunker_with(*data, chunking) {
                let chunk = chunk.expect("in-memory chunking");
                let (e, z) = encode_chunk(&mut comp, &chunk.data).expect("compress");
                index.chunks.push(e);
                payload.extend_from_slice(&z);
            }
            let index_bytes = index.encode();
            entries.push(ImageEntry {
                slot_class: *class,
                size: data.len() as u64,
                sha256: hex::encode(Sha256::digest(data)),
                tree_sha256: hex::encode(index.tree_sha256()),
                index: class.index_name(),
                index_sha256: hex::encode(Sha256::digest(&index_bytes)),
                payload: class.payload_name(),
            });
            parts.push((class.index_name(), index_bytes));
            parts.push((class.payload_name(), payload));
        }
        let manifest = Manifest {
            format: FORMAT,
            compatible: meta.compatible.clone(),
            version: meta.version.clone(),
            security_epoch: meta.security_epoch,
            created: datetime_from_unix(1_700_000_000),
            images: entries,
        };
        let mbytes = manifest.to_toml().into_bytes();
        let mut out = vec![(MANIFEST_NAME.to_string(), mbytes.clone())];
        if let Some(key) = key {
            out.push((SIGNATURE_NAME.to_string(), SignatureFile::sign(key, &mbytes).to_bytes()));
        }
        out.extend(parts);
        out
    }

    /// Frames entries as the writer does (mtime 1700000000).
    pub fn tar_of(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
        let mut tar = TarWriter::new(Vec::new(), 1_700_000_000);
        for (name, data) in entries {
            tar.entry(name, data.len() as u64, &data[..]).expect("in-memory tar");
        }
        tar.finish().expect("in-memory tar")
    }

    /// Deterministic, compressible test data of `len` bytes that still yields many chunks.
    pub fn test_image(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Runs of text-like bytes with some noise: compresses, and chunks by content.
            let run = (x % 64) as usize + 1;
            let byte = b'a' + (x >> 8) as u8 % 26;
            out.extend(std::iter::repeat_n(byte, run.min(len - out.len())));
            if out.len() < len {
                out.push((x >> 16) as u8);
            }
        }
        out
    }

    /// Offset of the data of the tar entry `name` in `bundle`.
    pub fn entry_offset(bundle: &[u8], name: &str) -> Option<(u64, u64)> {
        let mut off = 0u64;
        while off + 512 <= bundle.len() as u64 {
            let block: &[u8; 512] = bundle[off as usize..off as usize + 512].try_into().ok()?;
            let e = parse_tar_header(block, off).ok()??;
            if e.name == name {
                return Some((e.data_offset, e.size));
            }
            off = e.next_offset();
        }
        None
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::testkit::*;
    use super::*;
    use crate::sign::tests::test_key;
    use crate::sign::MAX_SIGNATURE_FILE;

    /// A valid manifest: metrica-test 1.2.3, security epoch 2, one root image.
    pub(crate) fn manifest() -> Manifest {
        let sha = "ab".repeat(32);
        Manifest {
            format: FORMAT,
            compatible: "metrica-test".into(),
            version: "1.2.3".parse().unwrap(),
            security_epoch: 2,
            created: datetime_from_unix(0),
            images: vec![ImageEntry {
                slot_class: SlotClass::Root,
                size: 10,
                sha256: sha.clone(),
                tree_sha256: "cd".repeat(32),
                index: "root.index".into(),
                index_sha256: sha,
                payload: "root.payload".into(),
            }],
        }
    }

    #[test]
    fn manifest_round_trips_and_is_strict() {
        let m = manifest();
        let text = m.to_toml();
        assert!(text.contains("[[image]]"), "{text}");
        assert_eq!(Manifest::parse(text.as_bytes()).unwrap(), m);
        let sha = "ab".repeat(32);
        let bad = [
            text.replace("format = 3", "format = 1"),
            text.replace("format = 3", "format = 4"),
            text.replace(&format!("tree_sha256 = \"{}\"\n", "cd".repeat(32)), ""),
            text.replace(&"cd".repeat(32), &"CD".repeat(32)),
            text.clone() + "extra = 1\n",
            text.replace("slot_class = \"root\"", "slot_class = \"data\""),
            text.replace(&format!("sha256 = \"{sha}\""), "sha256 = \"xyz\""),
            text.replace("version = \"1.2.3\"", "version = \"one\""),
            text.replace("size = 10", "size = 0"),
            text.replace("\"root.index\"", "\"../etc/passwd\""),
            text.replace("compatible = \"metrica-test\"", "compatible = \"\""),
            text.split("[[image]]").next().unwrap().to_string(),
            format!("{text}\n[[image]]\n{}", text.split("[[image]]").nth(1).unwrap()),
            "\u{0}garbage".to_string(),
        ];
        for b in bad {
            assert!(matches!(Manifest::parse(b.as_bytes()), Err(BundleError::Manifest(_))), "{b}");
        }
    }

    #[test]
    fn datetimes_from_unix_seconds() {
        assert_eq!(datetime_from_unix(0).to_string(), "1970-01-01T00:00:00Z");
        assert_eq!(datetime_from_unix(951_782_400).to_string(), "2000-02-29T00:00:00Z");
        assert_eq!(datetime_from_unix(1_795_495_635).to_string(), "2026-11-24T04:47:15Z");
    }

    #[test]
    fn chunk_index_round_trips_and_rejects_bad_input() {
        let idx = ChunkIndex {
            chunks: vec![
                ChunkEntry { sha256: [1; 32], len: 100, compressed_len: 50 },
                ChunkEntry { sha256: [2; 32], len: 30, compressed_len: 31 },
            ],
        };
        let bytes = idx.encode();
        assert_eq!(ChunkIndex::decode(&bytes, 130).unwrap(), idx);
        assert_eq!(idx.payload_len(), 81);
        assert!(ChunkIndex::decode(&bytes, 131).unwrap_err().contains("add up"));
        assert!(ChunkIndex::decode(&bytes[..bytes.len() - 1], 130).is_err());
        assert!(ChunkIndex::decode(b"MFBIDX02", 0).is_err());
        let mut huge = bytes;
        huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(ChunkIndex::decode(&huge, 130).is_err());
        let big = ChunkIndex {
            chunks: vec![ChunkEntry { sha256: [0; 32], len: CHUNK_MAX + 1, compressed_len: 1 }],
        };
        assert!(ChunkIndex::decode(&big.encode(), u64::from(CHUNK_MAX) + 1).is_err());
    }

    #[test]
    fn the_tree_hash_is_the_documented_sha256_and_sees_order_and_boundaries() {
        let image = test_image(200_000, 4);
        let cut = |at: &[usize]| {
            let mut index = ChunkIndex::default();
            let mut from = 0;
            for &to in at.iter().chain([&image.len()]) {
                let part = &image[from..to];
                index.chunks.push(ChunkEntry {
                    sha256: Sha256::digest(part).into(),
                    len: part.len() as u32,
                    compressed_len: 1,
                });
                from = to;
            }
            index
        };
        let two = cut(&[70_000]);
        // docs/bundle.md: sha256("MFBTREE1" || per chunk: sha256 || length u32 LE).
        let mut by_hand = b"MFBTREE1".to_vec();
        for (a, b) in [(0, 70_000), (70_000, image.len())] {
            by_hand.extend_from_slice(&Sha256::digest(&image[a..b]));
            by_hand.extend_from_slice(&((b - a) as u32).to_le_bytes());
        }
        assert_eq!(two.tree_sha256(), <[u8; 32]>::from(Sha256::digest(&by_hand)));
        // The same bytes cut elsewhere, or the chunks in another order, give another tree.
        assert_ne!(cut(&[70_001]).tree_sha256(), two.tree_sha256());
        assert_ne!(cut(&[]).tree_sha256(), two.tree_sha256());
        let mut swapped = two.clone();
        swapped.chunks.swap(0, 1);
        assert_ne!(swapped.tree_sha256(), two.tree_sha256());
    }

    /// A poor man's fuzzer: flip bytes all over a good bundle and cut it at many lengths.
    /// Reading must never panic, and a changed byte in any header, the manifest, the signature
    /// or an index must always be an error. (A flip in a compressed chunk may leave its
    /// decompressed bytes, which are what the chunk hash checks, unchanged; and tar padding is
    /// not read.)
    #[test]
    fn mutated_and_truncated_bundles_never_panic_or_pass_with_changed_data() {
        let key = test_key(1);
        let ring = Keyring::from_keys([key.verifying_key()]);
        let boot = test_image(70_000, 11);
        let root = test_image(400_000, 12);
        let images: &[(SlotClass, &[u8])] = &[(SlotClass::Boot, &boot), (SlotClass::Root, &root)];
        let good = make_bundle(&TestMeta::default(), images, Some(&key));
        // Byte ranges that must never change unnoticed.
        let mut covered = Vec::new();
        for name in [
            MANIFEST_NAME,
            SIGNATURE_NAME,
            "boot.index",
            "boot.payload",
            "root.index",
            "root.payload",
        ] {
            let (off, len) = entry_offset(&good, name).unwrap();
            let end = if name.ends_with(".payload") { off } else { off + len };
            covered.push((off - 512, end));
        }
        let verify = |bytes: Vec<u8>| {
            verify_bundle(&mut ReaderFetch::new(Box::new(io::Cursor::new(bytes)), "t"), &ring)
        };
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let (mut errors, mut passed) = (0, 0);
        for _ in 0..400 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let at = (x % good.len() as u64) as usize;
            let mut bad = good.clone();
            bad[at] ^= 1 << (x >> 60 & 7);
            let inside = covered.iter().any(|&(a, b)| (a..b).contains(&(at as u64)));
            match verify(bad) {
                Err(_) => errors += 1,
                Ok(_) => {
                    assert!(!inside, "a flipped bit at {at} went unnoticed");
                    passed += 1;
                }
            }
        }
        assert!(errors > 300, "{errors} errors, {passed} passed");
        let (last, last_len) = entry_offset(&good, "root.payload").unwrap();
        for cut in (0..(last + last_len) as usize).step_by(997) {
            assert!(verify(good[..cut].to_vec()).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn zero_chunks_are_checked_by_content_and_a_nonzero_byte_is_caught() {
        let mut comp = zstd::bulk::Compressor::new(3).unwrap();
        let mut dec = zstd::bulk::Decompressor::new().unwrap();
        let zeros = vec![0u8; CHUNK_MAX as usize];
        let (entry, z) = encode_chunk(&mut comp, &zeros).unwrap();
        assert_eq!(entry.sha256, *zero_chunk_sha256());
        assert!(is_zero_chunk(&entry));
        let short = ChunkEntry { len: CHUNK_MAX - 1, ..entry };
        assert!(!is_zero_chunk(&short));
        let mut out = Vec::new();
        decode_chunk(&mut dec, &z, &entry, &mut out).unwrap();
        assert_eq!(out, zeros);
        let mut one = zeros.clone();
        one[12345] = 1;
        let (_, z1) = encode_chunk(&mut comp, &one).unwrap();
        assert!(decode_chunk(&mut dec, &z1, &entry, &mut out).unwrap_err().contains("sha256"));
    }

    #[test]
    fn tar_headers_round_trip_including_large_sizes() {
        for size in [0u64, 1, 511, 512, 8 << 30, 100 << 30] {
            let h = tar_header("root.payload", size, 1_700_000_000).unwrap();
            let e = parse_tar_header(h.as_bytes(), 1024).unwrap().unwrap();
            assert_eq!((e.name.as_str(), e.size, e.data_offset), ("root.payload", size, 1536));
        }
        assert!(tar_header("a/b", 0, 0).is_err());
        let mut h = tar_header("x", 5, 0).unwrap();
        h.as_mut_bytes()[0] = b'y';
        assert!(parse_tar_header(h.as_bytes(), 0).unwrap_err().contains("checksum"));
        assert_eq!(parse_tar_header(&[0; 512], 0).unwrap(), None);
    }

    /// The header layout bundles have always had, spelled out field by field (POSIX ustar):
    /// the writer must keep producing these bytes (docs/bundle.md, "Layout").
    #[test]
    fn tar_headers_are_the_documented_bytes() {
        let mut want = [0u8; 512];
        let mut put = |at: usize, bytes: &[u8]| want[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, b"manifest.toml");
        put(100, b"0000644\0");
        put(108, b"0000000\0");
        put(116, b"0000000\0");
        put(124, b"00000001750\0"); // 1000 bytes
        put(136, b"14524770400\0"); // 1700000000
        put(156, b"0");
        put(257, b"ustar\x0000");
        put(265, b"root");
        put(297, b"root");
        put(148, b"        ");
        let sum: u32 = want.iter().map(|&b| u32::from(b)).sum();
        want[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        let got = tar_header(MANIFEST_NAME, 1000, 1_700_000_000).unwrap();
        assert_eq!(got.as_bytes()[..], want[..]);
        // 8 GiB and more: GNU base-256, the high bit set and the size big-endian at the end.
        let big = tar_header("root.payload", 9 << 30, 0).unwrap();
        assert_eq!(big.as_bytes()[124..136], [0x80, 0, 0, 0, 0, 0, 0, 2, 0x40, 0, 0, 0]);
        // mtime past the octal field's range is clamped, as before.
        let late = tar_header("x", 0, u64::MAX).unwrap();
        assert_eq!(&late.as_bytes()[136..148], b"77777777777\0");
    }

    #[test]
    fn the_writer_refuses_short_data_and_bad_names() {
        let mut tar = TarWriter::new(Vec::new(), 0);
        let err = tar.entry("root.index", 10, &b"12345"[..]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
        for name in ["", "a/b", &"n".repeat(100)] {
            assert!(TarWriter::new(Vec::new(), 0).entry(name, 0, io::empty()).is_err(), "{name}");
        }
        // Longer data is cut at `size`: the entry is exactly what the header says.
        let mut tar = TarWriter::new(Vec::new(), 0);
        tar.entry("x", 3, &b"abcdef"[..]).unwrap();
        let out = tar.finish().unwrap();
        assert_eq!(out.len(), 512 + 512 + 1024);
        assert_eq!(&out[512..516], b"abc\0");
    }

    /// Each framing rule, from a good bundle with one thing changed: the error kind (and its
    /// words) a device reports. Header edits keep the header checksum right, so that the rule
    /// itself, not the checksum, refuses them.
    #[test]
    fn the_framing_refuses_entries_out_of_place_of_the_wrong_kind_or_size() {
        let key = test_key(1);
        let ring = Keyring::from_keys([key.verifying_key()]);
        let boot = test_image(70_000, 21);
        let root = test_image(200_000, 22);
        let images: &[(SlotClass, &[u8])] = &[(SlotClass::Boot, &boot), (SlotClass::Root, &root)];
        let entries = bundle_entries(&TestMeta::default(), images, Some(&key), TEST_CHUNKING);
        let good = tar_of(&entries);
        let verify = |bytes: &[u8]| {
            verify_bundle(
                &mut ReaderFetch::new(Box::new(io::Cursor::new(bytes.to_vec())), "t"),
                &ring,
            )
        };
        verify(&good).unwrap();
        let edit = |change: &dyn Fn(&mut Entries)| {
            let mut e = entries.clone();
            change(&mut e);
            tar_of(&e)
        };
        let reheader = |name: &str, change: &dyn Fn(&mut tar::Header)| {
            let mut b = good.clone();
            let at = entry_offset(&b, name).unwrap().0 as usize - 512;
            let mut h = tar::Header::from_byte_slice(&b[at..at + 512]).clone();
            change(&mut h);
            h.set_cksum();
            b[at..at + 512].copy_from_slice(h.as_bytes());
            b
        };
        let typed = |name: &str, t: tar::EntryType| reheader(name, &|h| h.set_entry_type(t));
        let layout = |words: &'static str| move |e: &BundleError| matches!(e, BundleError::Layout(m) if m.contains(words));
        type Check = Box<dyn Fn(&BundleError) -> bool>;
        let mut cases: Vec<(&str, Vec<u8>, Check)> = vec![
            ("payload before its index", edit(&|e| e.swap(2, 3)), Box::new(layout("found"))),
            (
                "images in another order than the manifest's",
                edit(&|e| e[2..].rotate_left(2)),
                Box::new(layout("found \"root.index\" where boot.index should be")),
            ),
            (
                "an unknown entry between the images",
                edit(&|e| e.insert(4, ("notes.txt".into(), b"hi".to_vec()))),
                Box::new(layout("found \"notes.txt\" where root.index should be")),
            ),
            (
                "an unknown entry first",
                edit(&|e| e.insert(0, ("notes.txt".into(), b"hi".to_vec()))),
                Box::new(|e| matches!(e, BundleError::NotABundle(m) if m.contains("first entry"))),
            ),
            (
                "the signature after an image",
                edit(&|e| e[1..4].rotate_left(1)),
                Box::new(|e| matches!(e, BundleError::Unsigned)),
            ),
            (
                "an image missing",
                edit(&|e| e.truncate(4)),
                Box::new(layout("archive ends where root.index should be")),
            ),
            ("a payload one byte short", edit(&|e| _ = e[3].1.pop()), Box::new(layout("adds up"))),
            ("a payload one byte long", edit(&|e| e[5].1.push(0)), Box::new(layout("adds up"))),
            (
                "an index larger than its image can need",
                edit(&|e| e[2].1.resize(ChunkIndex::max_encoded_len(70_000) as usize + 1, 0)),
                Box::new(layout("at most")),
            ),
            (
                "a manifest over 64 KiB",
                edit(&|e| e[0].1.resize(MAX_MANIFEST as usize + 1, b'\n')),
                Box::new(|e| matches!(e, BundleError::Manifest(m) if m.contains("too large"))),
            ),
            (
                "a signature file over 4 KiB",
                edit(&|e| e[1].1.resize(MAX_SIGNATURE_FILE as usize + 1, b'\n')),
                Box::new(|e| matches!(e, BundleError::Signature(SignError::MalformedSignature(_)))),
            ),
            (
                "a manifest that is a symlink",
                typed(MANIFEST_NAME, tar::EntryType::Symlink),
                Box::new(|e| matches!(e, BundleError::NotABundle(m) if m.contains("regular"))),
            ),
            (
                "not ustar",
                reheader("root.index", &|h| h.as_mut_bytes()[257..263].copy_from_slice(b"ustaX\0")),
                Box::new(layout("not a ustar header")),
            ),
            (
                "a name that is not UTF-8",
                reheader("root.index", &|h| h.as_mut_bytes()[0] = 0xff),
                Box::new(layout("not UTF-8")),
            ),
            (
                "a name under a prefix",
                reheader("root.index", &|h| h.as_mut_bytes()[345..348].copy_from_slice(b"dir")),
                Box::new(layout("found \"dir/root.index\"")),
            ),
            (
                "an unreadable size",
                reheader("root.index", &|h| {
                    h.as_mut_bytes()[124..136].copy_from_slice(b"0000000z000\0");
                }),
                Box::new(layout("unreadable entry size")),
            ),
            (
                "a wrong header checksum",
                {
                    let mut b = good.clone();
                    let at = entry_offset(&b, "root.index").unwrap().0 as usize - 512;
                    b[at + 100] ^= 1; // the mode, not covered by anything but the checksum
                    b
                },
                Box::new(layout("checksum mismatch")),
            ),
        ];
        use tar::EntryType as T;
        for t in [T::Link, T::Symlink, T::Char, T::Block, T::Directory, T::Fifo, T::Continuous] {
            cases.push(("a link or device", typed("boot.index", t), Box::new(layout("regular"))));
        }
        for t in [T::XHeader, T::XGlobalHeader, T::GNULongName, T::GNUSparse] {
            cases.push((
                "an extension entry",
                typed("root.payload", t),
                Box::new(layout("regular")),
            ));
        }
        for (what, bytes, check) in cases {
            let err = verify(&bytes).unwrap_err();
            assert!(check(&err), "{what}: {err}");
        }
        // What the framing has always let through: the GNU magic, and the old-style type 0.
        let gnu = reheader("root.index", &|h| {
            h.as_mut_bytes()[257..265].copy_from_slice(b"ustar  \0");
            h.as_mut_bytes()[265..].fill(0);
        });
        verify(&gnu).unwrap();
        verify(&typed("boot.payload", tar::EntryType::new(0))).unwrap();
    }

    #[test]
    fn verify_bundle_accepts_a_good_bundle_and_names_each_bad_one() {
        let key = test_key(1);
        let ring = Keyring::from_keys([key.verifying_key()]);
        let boot = test_image(100_000, 1);
        let root = test_image(1_000_000, 2);
        let images: &[(SlotClass, &[u8])] = &[(SlotClass::Boot, &boot), (SlotClass::Root, &root)];
        let good = make_bundle(&TestMeta::default(), images, Some(&key));
        let check = verify_bundle(
            &mut ReaderFetch::new(Box::new(io::Cursor::new(good.clone())), "t"),
            &ring,
        )
        .unwrap();
        assert_eq!(check.manifest.key_id, KeyId::of(&key.verifying_key()));
        assert!(check.chunks[1] > 5, "{:?}", check.chunks);
        assert_eq!(check.bundle_len, good.len() as u64);

        let (root_payload, root_len) = entry_offset(&good, "root.payload").unwrap();
        let (mdata, _) = entry_offset(&good, MANIFEST_NAME).unwrap();
        let mut corrupt = good.clone();
        corrupt[(root_payload + root_len / 2) as usize] ^= 0x40;
        let mut edited = good.clone();
        let text = String::from_utf8_lossy(&good[mdata as usize..mdata as usize + 200]).to_string();
        let at = mdata as usize + text.find("2.0.0").unwrap();
        edited[at] = b'9';
        let other_key = make_bundle(&TestMeta::default(), images, Some(&test_key(9)));
        let unsigned = make_bundle(&TestMeta::default(), images, None);
        type Check = fn(&BundleError) -> bool;
        let cases: Vec<(&str, Vec<u8>, Check)> = vec![
            ("unsigned", unsigned, |e| matches!(e, BundleError::Unsigned)),
            ("unknown key", other_key, |e| {
                matches!(e, BundleError::Signature(SignError::UnknownKey(_)))
            }),
            ("edited manifest", edited, |e| {
                matches!(e, BundleError::Signature(SignError::BadSignature(_)))
            }),
            ("corrupt payload", corrupt, |e| {
                matches!(e, BundleError::ChunkCorrupt { image: SlotClass::Root, .. })
            }),
            ("truncated", good[..good.len() / 2].to_vec(), |e| {
                matches!(e, BundleError::Truncated { .. })
            }),
            ("truncated in header", good[..100].to_vec(), |e| {
                matches!(e, BundleError::NotABundle(_))
            }),
            ("garbage", test_image(10_000, 5), |e| matches!(e, BundleError::NotABundle(_))),
            ("empty", Vec::new(), |e| matches!(e, BundleError::NotABundle(_))),
        ];
        for (name, bytes, want) in cases {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("b.mfb");
            std::fs::write(&path, &bytes).unwrap();
            let err = verify_bundle(&mut file_fetch(&path), &ring).unwrap_err();
            assert!(want(&err), "{name}: {err}");
        }
    }
}
