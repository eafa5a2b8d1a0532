//! Role bundles (`.mfr`): a signed release of one role, the format, its writer and its verified
//! reader (docs/bundle.md, "Role bundles").
//!
//! A role bundle is a plain ustar archive: `manifest.toml` (the list of files with their sizes
//! and sha256), `manifest.toml.sig` (the same signature file and keyring as OS bundles,
//! [`crate::sign`]), then every file of the manifest, in manifest order (paths ascending), then
//! the end-of-archive marker and nothing after it. The reader checks the signature before it
//! parses the manifest, bounds every size and count before it reads, checks every member's
//! name, type and sha256, and that `role.toml` (the strict [`super::spec`]) names the same role,
//! version and OS range as the signed manifest.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use super::spec::{self, RoleName, RoleSpec, SpecError, ROLE_FILE};
use crate::bundle::{
    parse_sha256, parse_tar_header, TarEntry, BLOCK, MANIFEST_NAME, SIGNATURE_NAME,
};
use crate::sign::{KeyId, Keyring, SignError, SignatureFile, MAX_SIGNATURE_FILE};

#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
#[cfg(test)]
mod tests;
mod write;

pub use write::{collect, write, Contents, Member};

/// File extension of a role bundle.
pub const EXTENSION: &str = "mfr";
/// The manifest's `format`.
pub const FORMAT: u32 = 1;
/// Largest `manifest.toml` accepted.
pub const MAX_MANIFEST: u64 = 64 * 1024;
/// Largest `role.toml` accepted (it is read into memory).
pub const MAX_ROLE_FILE: u64 = 64 * 1024;
/// Most files a bundle may list.
pub const MAX_FILES: usize = 1024;
/// Largest file outside `images/`.
pub const MAX_FILE: u64 = 16 << 20;
/// Largest image archive (`images/*.tar`).
pub const MAX_IMAGE: u64 = 8 << 30;
/// Largest sum of all file sizes.
pub const MAX_TOTAL: u64 = 16 << 30;
/// Longest member path (it must fit the ustar name field).
pub const MAX_PATH: usize = 99;
/// The folder of image archives inside a bundle.
pub const IMAGES_DIR: &str = super::apply::IMAGES_DIR;
/// Where an OS image carries the role bundles baked into it (one per role).
pub const BAKED_DIR: &str = "/usr/share/metrica/roles";

/// The path of the baked bundle of role `name` in a root filesystem.
pub fn baked_path(name: &str) -> PathBuf {
    Path::new(BAKED_DIR).join(format!("{name}.{EXTENSION}"))
}

/// The file name of a bundle: `NAME-VERSION.mfr`.
pub fn file_name(name: &str, version: &semver::Version) -> String {
    format!("{name}-{version}.{EXTENSION}")
}

/// A verified role bundle unpacked into a folder that [`super::apply::apply`] takes as its
/// `source`: `role.toml`, the compose file and its files, `images/*.tar`.
#[derive(Debug)]
pub struct Unpacked {
    pub name: String,
    pub version: semver::Version,
    /// The folder the bundle was unpacked into (the `dest` given to [`unpack`]).
    pub dir: PathBuf,
    /// The key that signed it.
    pub signer: KeyId,
}

/// A bundle whose signature, members and role.toml were all checked.
#[derive(Debug, Clone)]
pub struct Verified {
    pub manifest: Manifest,
    pub signer: KeyId,
    pub spec: RoleSpec,
}

/// Why a role bundle was refused. Nothing outside `dest` is touched by a refusal. `path` is
/// the bundle; `member` a path inside it.
#[derive(Debug, Error)]
pub enum RoleBundleError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: not a role bundle: {reason}", path.display())]
    NotABundle { path: PathBuf, reason: String },
    #[error("{}: truncated in {member}", path.display())]
    Truncated { path: PathBuf, member: String },
    #[error("{}: {SIGNATURE_NAME}: {source}", path.display())]
    Signature { path: PathBuf, source: SignError },
    #[error("{}: {MANIFEST_NAME}: {reason}", path.display())]
    Manifest { path: PathBuf, reason: String },
    #[error("{}: member {member:?}: {reason}", path.display())]
    Member { path: PathBuf, member: String, reason: String },
    #[error("{}: member {member}: sha256 does not match the signed manifest", path.display())]
    Tampered { path: PathBuf, member: String },
    #[error("{}: member {member}: {size} bytes, more than the limit of {limit}", path.display())]
    TooLarge { path: PathBuf, member: String, size: u64, limit: u64 },
    #[error("{}: {ROLE_FILE} has {field} {role_toml:?}, the signed manifest {manifest:?}", path.display())]
    Mismatch { path: PathBuf, field: &'static str, role_toml: String, manifest: String },
    #[error("{}: {source}", path.display())]
    Spec { path: PathBuf, source: SpecError },
    #[error("{}: unpacking into {}: {source}", path.display(), dest.display())]
    Dest { path: PathBuf, dest: PathBuf, source: io::Error },
}

/// `manifest.toml` of a role bundle. Parsing is strict and checks every rule of the format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub name: String,
    pub version: semver::Version,
    /// The OS versions the role runs on (`role.toml`'s `role.os`).
    pub os: semver::VersionReq,
    /// Build time, from `SOURCE_DATE_EPOCH`.
    pub created: toml::value::Datetime,
    #[serde(rename = "file")]
    pub files: Vec<FileEntry>,
}

/// One file of a role bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Relative path inside the release folder, e.g. `compose.yaml`, `images/app.tar`.
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

impl FileEntry {
    /// Whether this is an image archive (`images/NAME.tar`).
    pub fn is_image(&self) -> bool {
        self.path.starts_with(&format!("{IMAGES_DIR}/"))
    }
}

impl Manifest {
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a manifest serializes")
    }

    /// Parses and checks a manifest; the error is the reason, without the bundle's path.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
        let m: Manifest = toml::from_str(text).map_err(|e| e.message().to_string())?;
        m.check()?;
        Ok(m)
    }

    fn check(&self) -> Result<(), String> {
        if self.format != FORMAT {
            return Err(format!("format {}, expected {FORMAT}", self.format));
        }
        RoleName::try_from(self.name.clone()).map_err(|e| format!("name: {e}"))?;
        if self.files.is_empty() || self.files.len() > MAX_FILES {
            return Err(format!("{} files, expected 1 to {MAX_FILES}", self.files.len()));
        }
        let mut total = 0u64;
        let paths: std::collections::BTreeSet<&str> =
            self.files.iter().map(|f| f.path.as_str()).collect();
        for (i, f) in self.files.iter().enumerate() {
            check_path(&f.path).map_err(|e| format!("file {:?}: {e}", f.path))?;
            if parse_sha256(&f.sha256).is_none() {
                return Err(format!("file {:?}: sha256 is not 64 lowercase hex", f.path));
            }
            let limit = size_limit(f);
            if f.size > limit {
                return Err(format!("file {:?}: {} bytes, limit {limit}", f.path, f.size));
            }
            total = total.saturating_add(f.size);
            if let Some(prev) = i.checked_sub(1).map(|p| &self.files[p].path) {
                if prev.as_str() >= f.path.as_str() {
                    return Err(format!("file {:?}: paths must be unique and ascending", f.path));
                }
            }
            let mut parents = f.path.match_indices('/').map(|(at, _)| &f.path[..at]);
            if let Some(parent) = parents.find(|p| paths.contains(p)) {
                return Err(format!("file {:?}: {parent:?} is a file, not a folder", f.path));
            }
        }
        if total > MAX_TOTAL {
            return Err(format!("files total {total} bytes, limit {MAX_TOTAL}"));
        }
        if self.file(ROLE_FILE).is_none() {
            return Err(format!("no {ROLE_FILE}"));
        }
        Ok(())
    }

    /// The entry of `path`, if listed.
    pub fn file(&self, path: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.path == path)
    }

    /// Sum of the file sizes.
    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

fn size_limit(f: &FileEntry) -> u64 {
    if f.path == ROLE_FILE {
        MAX_ROLE_FILE
    } else if f.is_image() {
        MAX_IMAGE
    } else {
        MAX_FILE
    }
}

/// The rule for a member path: relative, `/`-separated plain components (no `.`, `..` or
/// empty parts), printable ASCII without `\`, at most [`MAX_PATH`] bytes; under
/// `images/` only `images/NAME.tar`.
pub fn check_path(p: &str) -> Result<(), String> {
    if p.is_empty() || p.len() > MAX_PATH {
        return Err(format!("path must be 1 to {MAX_PATH} bytes"));
    }
    if !p.bytes().all(|b| b.is_ascii_graphic() && b != b'\\') {
        return Err("path must be printable ASCII without spaces or backslashes".into());
    }
    if p.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err("path must be relative, without empty, . or .. parts".into());
    }
    if let Some(rest) = p.strip_prefix(&format!("{IMAGES_DIR}/")) {
        if rest.contains('/') || !rest.ends_with(".tar") || rest == ".tar" {
            return Err(format!("only {IMAGES_DIR}/NAME.tar may be under {IMAGES_DIR}/"));
        }
    }
    Ok(())
}

/// Verifies a whole bundle held in memory, writing nothing: the fuzz target's entry point.
/// Every allocation is bounded by the format's limits (and by `bytes`).
pub fn verify_bytes(bytes: &[u8], keyring: &Keyring) -> Result<Verified, RoleBundleError> {
    let path = Path::new("(bundle in memory)");
    read(bytes, path, keyring, &mut |_| Ok(Box::new(io::sink())))
}

/// Verifies the bundle at `path` (every hash) without unpacking it.
pub fn verify_file(path: &Path, keyring: &Keyring) -> Result<Verified, RoleBundleError> {
    verify_file_with(path, keyring, &mut |_| {})
}

/// [`verify_file`], reporting the bytes read to `progress` as it goes.
pub fn verify_file_with(
    path: &Path,
    keyring: &Keyring,
    progress: &mut dyn FnMut(u64),
) -> Result<Verified, RoleBundleError> {
    let file = File::open(path).map_err(|source| io_err(path, source))?;
    let r = Counting { inner: io::BufReader::new(file), progress };
    read(r, path, keyring, &mut |_| Ok(Box::new(io::sink())))
}

/// Verifies the role bundle at `path` against `keyring` and unpacks it into `dest`, a folder
/// that must not exist yet (its parent must). On error `dest` is removed again.
pub fn unpack(path: &Path, keyring: &Keyring, dest: &Path) -> Result<Unpacked, RoleBundleError> {
    unpack_with(path, keyring, dest, &mut |_| {})
}

/// [`unpack`], reporting the bytes of the bundle read to `progress` as it goes.
pub fn unpack_with(
    path: &Path,
    keyring: &Keyring,
    dest: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<Unpacked, RoleBundleError> {
    let dest_err = |source| RoleBundleError::Dest {
        path: path.to_path_buf(),
        dest: dest.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(|source| io_err(path, source))?;
    std::fs::create_dir(dest).map_err(dest_err)?;
    let r = Counting { inner: io::BufReader::new(file), progress };
    let result = read(r, path, keyring, &mut |rel| {
        let target = dest.join(rel);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let f = std::fs::OpenOptions::new().write(true).create_new(true).open(&target)?;
        Ok(Box::new(SyncOnFlush(BufWriter::new(f))))
    })
    .and_then(|v| {
        sync_dirs(dest).map_err(dest_err)?;
        Ok(v)
    });
    match result.map_err(|e| match e {
        RoleBundleError::Dest { path, source, .. } => {
            RoleBundleError::Dest { path, dest: dest.to_path_buf(), source }
        }
        e => e,
    }) {
        Ok(v) => Ok(Unpacked {
            name: v.manifest.name,
            version: v.manifest.version,
            dir: dest.to_path_buf(),
            signer: v.signer,
        }),
        Err(e) => {
            let _ = std::fs::remove_dir_all(dest);
            Err(e)
        }
    }
}

/// The manifest of a bundle as [`read_manifest`] found it.
#[derive(Debug)]
pub struct ManifestPeek {
    pub manifest: Manifest,
    /// The key id the signature file names.
    pub key_id: KeyId,
    /// The signature check, when a keyring was given.
    pub checked: Option<Result<KeyId, SignError>>,
}

/// Reads only the manifest of the bundle at `path` (at most its first two members, bounded):
/// checks the signature against `keyring` when one is given. Members are not read: use
/// [`verify_file`] to check the whole bundle.
pub fn read_manifest(
    path: &Path,
    keyring: Option<&Keyring>,
) -> Result<ManifestPeek, RoleBundleError> {
    let file = File::open(path).map_err(|source| io_err(path, source))?;
    let mut r = TarReader { r: io::BufReader::new(file), path, buf: Vec::new() };
    let (bytes, sig) = r.signed_manifest()?;
    let checked = keyring.map(|k| k.verify(&bytes, &sig));
    let manifest = Manifest::parse(&bytes).map_err(|reason| r.manifest_err(reason))?;
    Ok(ManifestPeek { manifest, key_id: sig.key_id, checked })
}

/// Fsyncs `dir` and every folder under it (the files were fsynced as they were written).
fn sync_dirs(dir: &Path) -> io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            sync_dirs(&e.path())?;
        }
    }
    File::open(dir)?.sync_all()
}

/// Reads through, reporting byte counts.
struct Counting<'a, R> {
    inner: R,
    progress: &'a mut dyn FnMut(u64),
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        (self.progress)(n as u64);
        Ok(n)
    }
}

/// A writer that fsyncs its file when flushed at the end of a member.
struct SyncOnFlush(BufWriter<File>);

impl Write for SyncOnFlush {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()?;
        self.0.get_ref().sync_all()
    }
}

type Open<'a> = dyn FnMut(&str) -> io::Result<Box<dyn Write>> + 'a;

fn io_err(path: &Path, source: io::Error) -> RoleBundleError {
    RoleBundleError::Io { path: path.to_path_buf(), source }
}

/// The whole check: signature, manifest, every member in order (each written to `open(path)`
/// and hashed), the end marker, then role.toml against the manifest.
fn read(
    r: impl Read,
    path: &Path,
    keyring: &Keyring,
    open: &mut Open,
) -> Result<Verified, RoleBundleError> {
    let mut r = TarReader { r, path, buf: Vec::new() };
    let (bytes, sig) = r.signed_manifest()?;
    let signer = keyring
        .verify(&bytes, &sig)
        .map_err(|source| RoleBundleError::Signature { path: path.to_path_buf(), source })?;
    let manifest = Manifest::parse(&bytes).map_err(|reason| r.manifest_err(reason))?;
    let mut role_toml = Vec::new();
    for f in &manifest.files {
        let e = r.expect(&f.path, size_limit(f))?;
        if e.size != f.size {
            return Err(
                r.member_err(&f.path, format!("{} bytes, the manifest says {}", e.size, f.size))
            );
        }
        let mut out = open(&f.path).map_err(|source| r.dest_err(source))?;
        let keep = (f.path == ROLE_FILE).then_some(&mut role_toml);
        let digest = r.copy(&e, &mut out, keep)?;
        out.flush().map_err(|source| r.dest_err(source))?;
        if Some(digest) != parse_sha256(&f.sha256) {
            return Err(RoleBundleError::Tampered {
                path: path.to_path_buf(),
                member: f.path.clone(),
            });
        }
    }
    r.end()?;
    let spec = check_role_toml(path, &manifest, &role_toml)?;
    Ok(Verified { manifest, signer, spec })
}

/// role.toml must parse (strictly) and agree with the signed manifest; its compose file must be
/// in the bundle.
fn check_role_toml(path: &Path, m: &Manifest, bytes: &[u8]) -> Result<RoleSpec, RoleBundleError> {
    let file = format!("{}:{ROLE_FILE}", path.display());
    let text = std::str::from_utf8(bytes).map_err(|_| RoleBundleError::Spec {
        path: path.to_path_buf(),
        source: SpecError { file: file.clone(), line: 0, key: None, message: "not UTF-8".into() },
    })?;
    let spec = spec::parse(text, &file)
        .map_err(|source| RoleBundleError::Spec { path: path.to_path_buf(), source })?;
    let mismatch = |field, role_toml: String, manifest: String| RoleBundleError::Mismatch {
        path: path.to_path_buf(),
        field,
        role_toml,
        manifest,
    };
    if spec.role.name.0 != m.name {
        return Err(mismatch("name", spec.role.name.0, m.name.clone()));
    }
    if spec.role.version != m.version {
        return Err(mismatch("version", spec.role.version.to_string(), m.version.to_string()));
    }
    if spec.role.os != m.os {
        return Err(mismatch("os", spec.role.os.to_string(), m.os.to_string()));
    }
    let compose = spec.role.compose.0.to_string_lossy();
    if m.file(&compose).is_none() {
        return Err(RoleBundleError::Manifest {
            path: path.to_path_buf(),
            reason: format!(
                "the compose file {compose:?} named by {ROLE_FILE} is not in the bundle"
            ),
        });
    }
    Ok(spec)
}

/// Sequential reader of the bundle's tar stream.
struct TarReader<'p, R> {
    r: R,
    path: &'p Path,
    /// The copy buffer, allocated once per bundle.
    buf: Vec<u8>,
}

/// Size of the copy buffer.
const COPY_BUF: usize = 256 * 1024;

impl<R: Read> TarReader<'_, R> {
    fn member_err(&self, member: &str, reason: String) -> RoleBundleError {
        RoleBundleError::Member {
            path: self.path.to_path_buf(),
            member: member.to_string(),
            reason,
        }
    }

    fn manifest_err(&self, reason: String) -> RoleBundleError {
        RoleBundleError::Manifest { path: self.path.to_path_buf(), reason }
    }

    fn dest_err(&self, source: io::Error) -> RoleBundleError {
        RoleBundleError::Dest { path: self.path.to_path_buf(), dest: PathBuf::new(), source }
    }

    /// Fills `buf`; the end of the input is `Truncated` in `member`.
    fn fill(&mut self, buf: &mut [u8], member: &str) -> Result<(), RoleBundleError> {
        self.r.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => RoleBundleError::Truncated {
                path: self.path.to_path_buf(),
                member: member.to_string(),
            },
            _ => io_err(self.path, e),
        })
    }

    /// The next header, `None` at the end marker.
    fn header(&mut self, want: &str) -> Result<Option<TarEntry>, RoleBundleError> {
        let mut block = [0u8; BLOCK as usize];
        self.fill(&mut block, want)?;
        parse_tar_header(&block, 0).map_err(|reason| match want {
            MANIFEST_NAME => RoleBundleError::NotABundle { path: self.path.to_path_buf(), reason },
            _ => self.member_err(want, reason),
        })
    }

    /// The next member, which must be `name` and at most `limit` bytes.
    fn expect(&mut self, name: &str, limit: u64) -> Result<TarEntry, RoleBundleError> {
        let Some(e) = self.header(name)? else {
            return Err(self.member_err(name, "missing: the archive ends before it".into()));
        };
        if e.name != name {
            let reason = format!("found member {:?} where {name:?} was expected", e.name);
            return Err(match name {
                MANIFEST_NAME => {
                    RoleBundleError::NotABundle { path: self.path.to_path_buf(), reason }
                }
                _ => self.member_err(&e.name, reason),
            });
        }
        if e.size > limit {
            let member = name.to_string();
            return Err(RoleBundleError::TooLarge {
                path: self.path.to_path_buf(),
                member,
                size: e.size,
                limit,
            });
        }
        Ok(e)
    }

    /// Reads a small member (bounded by [`expect`]) into memory.
    fn small(&mut self, e: &TarEntry) -> Result<Vec<u8>, RoleBundleError> {
        let mut data = Vec::new();
        self.copy(e, &mut io::sink(), Some(&mut data))?;
        Ok(data)
    }

    /// Copies the member's data to `out` (and `keep`), skips its padding; returns its sha256.
    fn copy(
        &mut self,
        e: &TarEntry,
        out: &mut dyn Write,
        keep: Option<&mut Vec<u8>>,
    ) -> Result<[u8; 32], RoleBundleError> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.resize(COPY_BUF, 0);
        let result = self.copy_with(&mut buf, e, out, keep);
        self.buf = buf;
        result
    }

    fn copy_with(
        &mut self,
        buf: &mut [u8],
        e: &TarEntry,
        out: &mut dyn Write,
        mut keep: Option<&mut Vec<u8>>,
    ) -> Result<[u8; 32], RoleBundleError> {
        let mut hash = Sha256::new();
        let mut left = e.size;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            self.fill(&mut buf[..n], &e.name)?;
            hash.update(&buf[..n]);
            if let Some(k) = keep.as_deref_mut() {
                k.extend_from_slice(&buf[..n]);
            }
            out.write_all(&buf[..n]).map_err(|source| self.dest_err(source))?;
            left -= n as u64;
        }
        let pad = ((BLOCK - e.size % BLOCK) % BLOCK) as usize;
        self.fill(&mut buf[..pad], &e.name)?;
        if buf[..pad].iter().any(|&b| b != 0) {
            return Err(self.member_err(&e.name, "padding after the data is not zeros".into()));
        }
        Ok(hash.finalize().into())
    }

    /// `manifest.toml` and `manifest.toml.sig`, bounded, unparsed.
    fn signed_manifest(&mut self) -> Result<(Vec<u8>, SignatureFile), RoleBundleError> {
        let e = self.expect(MANIFEST_NAME, MAX_MANIFEST)?;
        let bytes = self.small(&e)?;
        let e = self.expect(SIGNATURE_NAME, MAX_SIGNATURE_FILE)?;
        let sig = SignatureFile::parse(&self.small(&e)?).map_err(|source| {
            RoleBundleError::Signature { path: self.path.to_path_buf(), source }
        })?;
        Ok((bytes, sig))
    }

    /// The end marker (two zero blocks) and then the end of the input: a member the manifest
    /// does not list, or any trailing data, is refused.
    fn end(&mut self) -> Result<(), RoleBundleError> {
        const END: &str = "the end-of-archive marker";
        for _ in 0..2 {
            if let Some(e) = self.header(END)? {
                return Err(self.member_err(&e.name, "not listed in the signed manifest".into()));
            }
        }
        let mut one = [0u8; 1];
        match self.r.read(&mut one) {
            Ok(0) => Ok(()),
            Ok(_) => Err(self.member_err(END, "data after the end of the archive".into())),
            Err(e) => Err(io_err(self.path, e)),
        }
    }
}
