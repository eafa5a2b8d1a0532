//! The writer of role bundles: a role folder (and image archives) to a signed `.mfr` stream.
//! The same inputs and `created` give the same bytes.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use ed25519_dalek::SigningKey;
use sha2::{Digest, Sha256};

use super::{check_path, FileEntry, Manifest, FORMAT, IMAGES_DIR};
use crate::bundle::{datetime_from_unix, MANIFEST_NAME, SIGNATURE_NAME};
use crate::role::spec::{self, RoleSpec, ROLE_FILE};
use crate::sign::SignatureFile;

/// One file to put into a bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Path inside the bundle.
    pub path: String,
    /// Where its bytes are read from.
    pub source: PathBuf,
    pub size: u64,
}

/// What goes into a bundle: the checked role.toml and every file, ordered by path.
#[derive(Debug, Clone)]
pub struct Contents {
    pub spec: RoleSpec,
    pub members: Vec<Member>,
}

impl Contents {
    /// Sum of the member sizes.
    pub fn total_size(&self) -> u64 {
        self.members.iter().map(|m| m.size).sum()
    }
}

/// Gathers a role folder (every regular file in it, recursively; a link or any other kind of
/// file is an error) and `images` (each becomes `images/FILE_NAME`, and must end in `.tar`).
/// role.toml is checked with the strict [`spec`] first.
pub fn collect(dir: &Path, images: &[PathBuf]) -> Result<Contents> {
    let spec = spec::load(&dir.join(ROLE_FILE))?;
    let mut members = Vec::new();
    walk(dir, "", &mut members)?;
    for image in images {
        let name = image
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("image archive {}: no usable file name", image.display()))?;
        members.push(member(format!("{IMAGES_DIR}/{name}"), image)?);
    }
    members.sort_by(|a, b| a.path.cmp(&b.path));
    for pair in members.windows(2) {
        ensure!(
            pair[0].path != pair[1].path,
            "{} and {} would both be {} in the bundle",
            pair[0].source.display(),
            pair[1].source.display(),
            pair[1].path
        );
    }
    let compose = spec.role.compose.0.to_string_lossy().into_owned();
    ensure!(
        members.iter().any(|m| m.path == compose),
        "{}: the compose file {compose:?} named by {ROLE_FILE} is missing",
        dir.display()
    );
    Ok(Contents { spec, members })
}

fn walk(dir: &Path, prefix: &str, out: &mut Vec<Member>) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading folder {}", dir.display()))?
        .collect::<io::Result<_>>()
        .with_context(|| format!("reading folder {}", dir.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let name = e.file_name();
        let name =
            name.to_str().with_context(|| format!("{}: name is not UTF-8", path.display()))?;
        let rel = format!("{prefix}{name}");
        let kind = e.file_type().with_context(|| format!("reading {}", path.display()))?;
        if kind.is_dir() {
            walk(&path, &format!("{rel}/"), out)?;
        } else {
            out.push(member(rel, &path)?);
        }
    }
    Ok(())
}

fn member(path: String, source: &Path) -> Result<Member> {
    let meta = std::fs::symlink_metadata(source)
        .with_context(|| format!("reading {}", source.display()))?;
    if !meta.file_type().is_file() {
        bail!(
            "{}: not a regular file (links and special files cannot go into a role bundle)",
            source.display()
        );
    }
    check_path(&path)
        .map_err(|e| anyhow::anyhow!("{}: as bundle member {path:?}: {e}", source.display()))?;
    Ok(Member { path, source: source.to_path_buf(), size: meta.len() })
}

/// Writes the bundle of `contents` to `out`, signed with `key`, every entry dated `created`
/// (seconds since the epoch). `progress` gets byte counts: each file is read twice (hashed,
/// then copied and hashed again; a file that changed in between is an error).
pub fn write(
    out: impl Write,
    contents: &Contents,
    created: u64,
    key: &SigningKey,
    progress: &mut dyn FnMut(u64),
) -> Result<Manifest> {
    let mut files = Vec::with_capacity(contents.members.len());
    for m in &contents.members {
        let (digest, size) = hash_file(&m.source, &mut *progress)?;
        ensure!(size == m.size, "{}: changed size while the bundle was built", m.source.display());
        files.push(FileEntry { path: m.path.clone(), size, sha256: hex::encode(digest) });
    }
    let role = &contents.spec.role;
    let manifest = Manifest {
        format: FORMAT,
        name: role.name.0.clone(),
        version: role.version.clone(),
        os: role.os.clone(),
        created: datetime_from_unix(created),
        files,
    };
    manifest.check().map_err(|e| anyhow::anyhow!("the bundle would be refused: {e}"))?;
    let text = manifest.to_toml();
    let sig = SignatureFile::sign(key, text.as_bytes()).to_bytes();
    let mut tar = tar::Builder::new(out);
    append(&mut tar, MANIFEST_NAME, created, text.len() as u64, &mut text.as_bytes())?;
    append(&mut tar, SIGNATURE_NAME, created, sig.len() as u64, &mut &sig[..])?;
    for (m, f) in contents.members.iter().zip(&manifest.files) {
        let file =
            File::open(&m.source).with_context(|| format!("opening {}", m.source.display()))?;
        let mut reader =
            Hashing { inner: file.take(f.size), hash: Sha256::new(), progress: &mut *progress };
        append(&mut tar, &f.path, created, f.size, &mut reader)?;
        ensure!(
            hex::encode(reader.hash.finalize()) == f.sha256,
            "{}: changed while the bundle was built",
            m.source.display()
        );
    }
    tar.into_inner()
        .context("writing the end of the bundle")?
        .flush()
        .context("writing the bundle")?;
    Ok(manifest)
}

/// One member: ustar, regular file, mode 0644, owner root, `mtime`, exactly `size` bytes of
/// `data` (fewer is an error).
fn append<W: Write>(
    tar: &mut tar::Builder<W>,
    path: &str,
    mtime: u64,
    size: u64,
    data: &mut dyn Read,
) -> Result<()> {
    let header = || -> io::Result<tar::Header> {
        let mut h = tar::Header::new_ustar();
        h.set_path(path)?;
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(size);
        h.set_mtime(mtime);
        h.set_username("root")?;
        h.set_groupname("root")?;
        h.set_cksum();
        Ok(h)
    };
    let h = header().with_context(|| format!("bundle member {path}"))?;
    let mut exact = Exact { inner: data.take(size), left: size };
    tar.append(&h, &mut exact).with_context(|| format!("writing bundle member {path}"))
}

/// Exactly `left` more bytes: ending early is an error, not a short member.
struct Exact<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.left > 0 && !buf.is_empty() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank while read"));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Reads through, hashing and reporting progress.
struct Hashing<'a, R> {
    inner: R,
    hash: Sha256,
    progress: &'a mut dyn FnMut(u64),
}

impl<R: Read> Read for Hashing<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        (self.progress)(n as u64);
        Ok(n)
    }
}

fn hash_file(path: &Path, progress: &mut dyn FnMut(u64)) -> Result<([u8; 32], u64)> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut reader = Hashing { inner: file, hash: Sha256::new(), progress };
    let size = io::copy(&mut reader, &mut io::sink())
        .with_context(|| format!("reading {}", path.display()))?;
    Ok((reader.hash.finalize().into(), size))
}
