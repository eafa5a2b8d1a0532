//! Downloading a role bundle onto /data: resumable and verified.
//!
//! The bytes come through the updater's one HTTP client ([`crate::http::HttpFetch`],
//! `Range: bytes=N-`) read by the bundle cursor ([`crate::bundle::BundleCursor`]), which
//! reopens the source after a failed read with backoff: no second HTTP stack. The bundle is
//! written to `DEST.part` and fsynced; a download cut short (a dropped connection, a power
//! cut, a restart of the updater) goes on from the bytes already there the next time. Only a
//! file of the expected size and sha256 (the channel's `[roles.NAME]` `size` and `sha256`) is
//! renamed to `DEST`; a wrong one is deleted so the next try starts clean.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::bundle::{BundleCursor, BundleError, Fetch, FetchError, FileFetch, RetryPolicy};

/// What the bundle must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    pub size: u64,
    /// Lowercase or uppercase hex.
    pub sha256: String,
}

/// How to reach the server.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Bounds connecting and each read.
    pub timeout: Duration,
    /// Whom HTTPS servers are checked against: the daemon's one trust (the provisioned CA
    /// bundle, `http::tls_config`), or the built-in roots.
    pub trust: crate::http::Trust,
    pub retry: RetryPolicy,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions { timeout: Duration::from_secs(30), trust: None, retry: RetryPolicy::default() }
    }
}

/// Why a role bundle was not downloaded. [`DownloadError::kind`] names it for logs and the
/// daemon's record.
#[derive(Debug, Error)]
pub enum DownloadError {
    #[error("expected sha256 {0:?}: not 64 hex digits")]
    BadExpected(String),
    #[error("{0}")]
    Fetch(#[from] FetchError),
    #[error("{url}: the bundle ends at byte {got}, {expected} expected")]
    Truncated { url: String, got: u64, expected: u64 },
    #[error("{url}: sha256 {found}, the channel says {expected}; the download is deleted")]
    Hash { url: String, expected: String, found: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{url}: more than {limit} bytes, larger than any role bundle")]
    TooLarge { url: String, limit: u64 },
}

impl DownloadError {
    /// A short stable name: `download` (may pass by itself: retried), `hash` or `truncated`
    /// (the published file is not the one the channel names), `disk`.
    pub fn kind(&self) -> &'static str {
        match self {
            DownloadError::BadExpected(_) => "channel",
            DownloadError::Fetch(_) => "download",
            DownloadError::Truncated { .. } => "truncated",
            DownloadError::Hash { .. } => "hash",
            DownloadError::Io { .. } => "disk",
            DownloadError::TooLarge { .. } => "truncated",
        }
    }
}

/// What [`fetch_bundle`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downloaded {
    pub path: PathBuf,
    /// Bytes found in `DEST.part` and kept (not fetched again).
    pub resumed_from: u64,
    /// Bytes fetched by this call.
    pub fetched: u64,
}

/// Size of one read (and the step of progress reports).
const CHUNK: usize = 256 * 1024;

/// The partial file of `dest`.
pub fn part_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    dest.with_file_name(name)
}

/// Downloads `url` (`http://`, `https://`, or a local path) to `dest`, resuming `DEST.part`,
/// and verifies its size and sha256. `progress(done, total)` is called after each chunk.
/// An existing `dest` that already matches is kept as it is.
pub fn fetch_bundle(
    url: &str,
    dest: &Path,
    expected: &Expected,
    http: &HttpOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Downloaded, DownloadError> {
    let want = expected.sha256.to_ascii_lowercase();
    if want.len() != 64 || !want.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(DownloadError::BadExpected(expected.sha256.clone()));
    }
    if matches!(file_digest(dest), Ok((len, d)) if len == expected.size && d == want) {
        return Ok(Downloaded {
            path: dest.to_path_buf(),
            resumed_from: expected.size,
            fetched: 0,
        });
    }
    let part = part_path(dest);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DownloadError::Io { path, source }
    };
    let (mut have, mut hasher) = resume_point(&part, expected.size).map_err(io(&part))?;
    let resumed_from = have;
    let mut out =
        std::fs::OpenOptions::new().create(true).append(true).open(&part).map_err(io(&part))?;
    let mut fetch = open(url, http)?;
    let mut cursor = BundleCursor::new(fetch.as_mut(), http.retry);
    let mut buf = vec![0u8; CHUNK];
    while have < expected.size {
        let n = (expected.size - have).min(CHUNK as u64) as usize;
        match cursor.read_exact_at(have, &mut buf[..n]) {
            Ok(()) => {}
            Err(BundleError::Truncated { .. }) => {
                out.sync_all().map_err(io(&part))?;
                let got = have + short_tail(url, http, have, &mut out, &mut hasher);
                out.sync_all().map_err(io(&part))?;
                return Err(DownloadError::Truncated {
                    url: url.to_string(),
                    got,
                    expected: expected.size,
                });
            }
            Err(BundleError::Fetch(e)) => {
                // Keep what arrived: the next try goes on from there.
                out.sync_all().map_err(io(&part))?;
                return Err(e.into());
            }
            Err(other) => {
                return Err(FetchError::Transport {
                    url: url.to_string(),
                    message: other.to_string(),
                }
                .into())
            }
        }
        out.write_all(&buf[..n]).map_err(io(&part))?;
        hasher.update(&buf[..n]);
        have += n as u64;
        progress(have, expected.size);
    }
    out.sync_all().map_err(io(&part))?;
    drop(out);
    let found = hex::encode(hasher.finalize());
    if found != want {
        let _ = std::fs::remove_file(&part);
        return Err(DownloadError::Hash { url: url.to_string(), expected: want, found });
    }
    std::fs::rename(&part, dest).map_err(io(dest))?;
    if let Some(dir) = dest.parent() {
        crate::role::layout::sync_dir(dir).map_err(|e| DownloadError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::other(format!("{e:#}")),
        })?;
    }
    Ok(Downloaded { path: dest.to_path_buf(), resumed_from, fetched: expected.size - resumed_from })
}

/// Downloads `url` whole to `dest` (through `DEST.part`, fsynced, renamed) with no expected
/// size or hash: `updater role apply URL`, where the bundle's signature, checked when it is
/// unpacked, is what is trusted. At most `limit` bytes are read. Returns the bytes written.
pub fn fetch_whole(
    url: &str,
    dest: &Path,
    limit: u64,
    http: &HttpOptions,
) -> Result<u64, DownloadError> {
    let part = part_path(dest);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DownloadError::Io { path, source }
    };
    let mut fetch = open(url, http)?;
    let Some(body) = fetch.open_at(0)? else { return Ok(0) };
    let mut out = std::fs::File::create(&part).map_err(io(&part))?;
    let copied = std::io::copy(&mut body.take(limit + 1), &mut out);
    let n = match copied {
        Ok(n) if n > limit => {
            let _ = std::fs::remove_file(&part);
            return Err(DownloadError::TooLarge { url: url.to_string(), limit });
        }
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_file(&part);
            return Err(
                FetchError::Transport { url: url.to_string(), message: e.to_string() }.into()
            );
        }
    };
    out.sync_all().map_err(io(&part))?;
    drop(out);
    std::fs::rename(&part, dest).map_err(io(dest))?;
    Ok(n)
}

/// The source of `url`: the HTTP client for `http(s)://`, else a file.
fn open(url: &str, http: &HttpOptions) -> Result<Box<dyn Fetch>, DownloadError> {
    if url.starts_with("http://") || url.starts_with("https://") {
        Ok(Box::new(crate::http::HttpFetch::with_trust(url, http.timeout, http.trust.clone())))
    } else {
        Ok(Box::new(FileFetch { path: PathBuf::from(url.strip_prefix("file://").unwrap_or(url)) }))
    }
}

/// Keeps the bytes a truncated source still had after `have` (so a later try, or the error,
/// counts them); returns how many. Best effort: the error that follows says what matters.
fn short_tail(
    url: &str,
    http: &HttpOptions,
    have: u64,
    out: &mut std::fs::File,
    hasher: &mut Sha256,
) -> u64 {
    let Ok(mut fetch) = open(url, http) else { return 0 };
    let Ok(Some(r)) = fetch.open_at(have) else { return 0 };
    let mut tail = Vec::new();
    if r.take(CHUNK as u64).read_to_end(&mut tail).is_err() || out.write_all(&tail).is_err() {
        return 0;
    }
    hasher.update(&tail);
    tail.len() as u64
}

/// How much of `part` to keep and the hash of those bytes. A partial file longer than the
/// bundle is not this bundle's: it is started again.
fn resume_point(part: &Path, size: u64) -> std::io::Result<(u64, Sha256)> {
    match file_digest_state(part) {
        Ok((len, h)) if len <= size => Ok((len, h)),
        Ok(_) => {
            std::fs::remove_file(part)?;
            Ok((0, Sha256::new()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((0, Sha256::new())),
        Err(e) => Err(e),
    }
}

fn file_digest_state(path: &Path) -> std::io::Result<(u64, Sha256)> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let len = std::io::copy(&mut f, &mut h)?;
    Ok((len, h))
}

fn file_digest(path: &Path) -> std::io::Result<(u64, String)> {
    let (len, h) = file_digest_state(path)?;
    Ok((len, hex::encode(h.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testserver::{Mode, TestServer};

    fn body(n: usize) -> Vec<u8> {
        (0..n as u32).map(|i| (i.wrapping_mul(31) % 251) as u8).collect()
    }

    fn expected(b: &[u8]) -> Expected {
        Expected { size: b.len() as u64, sha256: hex::encode(Sha256::digest(b)) }
    }

    fn opts() -> HttpOptions {
        HttpOptions {
            timeout: Duration::from_secs(5),
            trust: None,
            retry: RetryPolicy { attempts: 3, backoff: Duration::from_millis(10) },
        }
    }

    fn fetch(url: &str, dest: &Path, e: &Expected) -> Result<Downloaded, DownloadError> {
        fetch_bundle(url, dest, e, &opts(), &mut |_, _| {})
    }

    #[test]
    fn downloads_verifies_and_keeps_a_finished_file() {
        let b = body(600_000);
        let s = TestServer::start(b.clone(), Mode::Normal);
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("cam-1.0.0.mfr");
        let mut seen = Vec::new();
        let d = fetch_bundle(&s.url, &dest, &expected(&b), &opts(), &mut |done, total| {
            seen.push((done, total));
        })
        .unwrap();
        assert_eq!((d.resumed_from, d.fetched), (0, b.len() as u64));
        assert_eq!(std::fs::read(&dest).unwrap(), b);
        assert!(!part_path(&dest).exists());
        assert_eq!(seen.last(), Some(&(b.len() as u64, b.len() as u64)));
        assert_eq!(seen.len(), 3, "{seen:?}");
        // Done already: no request at all.
        let before = s.requests();
        let d = fetch(&s.url, &dest, &expected(&b)).unwrap();
        assert_eq!((d.fetched, s.requests()), (0, before));
    }

    #[test]
    fn a_partial_file_is_resumed_with_a_range() {
        let b = body(300_000);
        let s = TestServer::start(b.clone(), Mode::Normal);
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("r.mfr");
        std::fs::write(part_path(&dest), &b[..123_456]).unwrap();
        let d = fetch(&s.url, &dest, &expected(&b)).unwrap();
        assert_eq!((d.resumed_from, d.fetched), (123_456, b.len() as u64 - 123_456));
        assert_eq!(std::fs::read(&dest).unwrap(), b);
        assert_eq!(s.ranges(), vec![Some("bytes=123456-".to_string())]);
    }

    #[test]
    fn a_dropped_connection_is_resumed_in_the_same_call() {
        let b = body(400_000);
        // Cut inside the second chunk: the read goes on from that chunk's start.
        let mode = Mode::Cut { after: 300_000, times: 1, ignore_range: false };
        let s = TestServer::start(b.clone(), mode);
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("r.mfr");
        fetch(&s.url, &dest, &expected(&b)).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b);
        assert_eq!(s.ranges(), vec![None, Some(format!("bytes={CHUNK}-"))]);
    }

    #[test]
    fn a_wrong_hash_deletes_the_download() {
        let b = body(50_000);
        let s = TestServer::start(b.clone(), Mode::Normal);
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("r.mfr");
        let mut e = expected(&b);
        e.sha256 = "ab".repeat(32);
        let err = fetch(&s.url, &dest, &e).unwrap_err();
        assert_eq!(err.kind(), "hash");
        let msg = err.to_string();
        assert!(msg.contains(&s.url) && msg.contains(&"ab".repeat(32)), "{msg}");
        assert!(!dest.exists() && !part_path(&dest).exists());
        // An expected hash that is not one is refused before any request.
        e.sha256 = "xyz".into();
        assert_eq!(fetch(&s.url, &dest, &e).unwrap_err().kind(), "channel");
    }

    #[test]
    fn a_truncated_bundle_is_named_and_its_bytes_kept() {
        let b = body(80_000);
        let s = TestServer::start(b[..60_000].to_vec(), Mode::Normal);
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("r.mfr");
        let err = fetch(&s.url, &dest, &expected(&b)).unwrap_err();
        assert_eq!(err.kind(), "truncated");
        assert!(err.to_string().contains("ends at byte 60000, 80000 expected"), "{err}");
        assert!(!dest.exists());
        assert_eq!(std::fs::metadata(part_path(&dest)).unwrap().len(), 60_000);
        // Once the whole file is published, the next try fetches only the rest.
        s.put(crate::testserver::BUNDLE_PATH, &b);
        let d = fetch(&s.url, &dest, &expected(&b)).unwrap();
        assert_eq!(d.resumed_from, 60_000);
        assert_eq!(std::fs::read(&dest).unwrap(), b);
    }

    #[test]
    fn server_errors_are_download_errors_and_keep_nothing_wrong() {
        let b = body(10_000);
        for status in [404u16, 500] {
            let s = TestServer::start(b.clone(), Mode::Status(status));
            let dir = tempfile::tempdir().unwrap();
            let dest = dir.path().join("r.mfr");
            let err = fetch(&s.url, &dest, &expected(&b)).unwrap_err();
            assert_eq!(err.kind(), "download", "{err}");
            assert!(err.to_string().contains(&format!("HTTP {status}")), "{err}");
            assert!(!dest.exists());
        }
        let dir = tempfile::tempdir().unwrap();
        let err = fetch("http://127.0.0.1:1/r.mfr", &dir.path().join("r.mfr"), &expected(&b))
            .unwrap_err();
        assert_eq!(err.kind(), "download", "{err}");
    }

    #[test]
    fn a_partial_file_longer_than_the_bundle_is_started_again() {
        let b = body(20_000);
        let s = TestServer::start(b.clone(), Mode::Normal);
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("r.mfr");
        std::fs::write(part_path(&dest), vec![7u8; 30_000]).unwrap();
        let d = fetch(&s.url, &dest, &expected(&b)).unwrap();
        assert_eq!(d.resumed_from, 0);
        assert_eq!(std::fs::read(&dest).unwrap(), b);
    }

    #[test]
    fn a_whole_download_is_bounded_and_leaves_nothing_on_error() {
        let s = TestServer::empty(Mode::Normal);
        let body: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        s.put("/web.mfr", &body);
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("web.mfr");
        let http = HttpOptions::default();
        assert_eq!(fetch_whole(&s.url_of("/web.mfr"), &dest, 5000, &http).unwrap(), 5000);
        assert_eq!(std::fs::read(&dest).unwrap(), body);
        let err = fetch_whole(&s.url_of("/web.mfr"), &dest, 4999, &http).unwrap_err();
        assert!(matches!(err, DownloadError::TooLarge { limit: 4999, .. }), "{err}");
        let err = fetch_whole(&s.url_of("/missing.mfr"), &dest, 5000, &http).unwrap_err();
        assert_eq!(err.kind(), "download", "{err}");
        assert!(!part_path(&dest).exists());
    }
}
