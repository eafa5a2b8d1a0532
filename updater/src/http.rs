//! Bundles over HTTP(S): a [`Fetch`] that asks for `Range: bytes=N-` (ureq, rustls).
//!
//! HTTPS servers are checked against the Mozilla roots compiled into ureq, or, when a CA
//! bundle is given ([`HttpFetch::with_ca_bundle`]), against the certificates of that PEM file
//! only (a fleet's own update server CA).
//!
//! A server that answers `206` is read from the asked offset; one that ignores `Range` and
//! answers `200` with the whole file is skipped forward to the offset; `416` means the offset
//! is past the end (a truncated bundle). Other statuses and transport failures become
//! [`FetchError`]s; the bundle cursor retries those that can pass (5xx, drops, timeouts).

use crate::bundle::{Fetch, FetchError};
use std::io::{self, Read};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Fetches a bundle from an `http://` or `https://` URL.
pub struct HttpFetch {
    url: String,
    agent: ureq::Agent,
}

impl HttpFetch {
    /// `timeout` bounds connecting and each read of the body.
    pub fn new(url: &str, timeout: Duration) -> HttpFetch {
        HttpFetch { url: url.to_string(), agent: agent_builder(timeout).build() }
    }

    /// Like [`HttpFetch::new`], but HTTPS servers must present a certificate chain to one of
    /// the certificates in the PEM file `ca_bundle` (and only those: the built-in roots are
    /// not used). A file that cannot be read or holds no usable certificate is an error naming
    /// it.
    pub fn with_ca_bundle(
        url: &str,
        timeout: Duration,
        ca_bundle: &Path,
    ) -> Result<HttpFetch, FetchError> {
        let tls = tls_config(ca_bundle)?;
        Ok(HttpFetch {
            url: url.to_string(),
            agent: agent_builder(timeout).tls_config(tls).build(),
        })
    }
}

fn agent_builder(timeout: Duration) -> ureq::AgentBuilder {
    ureq::AgentBuilder::new()
        .timeout_connect(timeout)
        .timeout_read(timeout)
        .user_agent(concat!("metrica-updater/", env!("CARGO_PKG_VERSION")))
}

/// A TLS client configuration that trusts exactly the certificates of a PEM file (ring, as
/// ureq itself uses).
pub fn tls_config(ca_bundle: &Path) -> Result<Arc<rustls::ClientConfig>, FetchError> {
    use rustls_pki_types::{pem::PemObject, CertificateDer};
    let what = format!("CA bundle {}", ca_bundle.display());
    let bad = |msg: String| FetchError::Io {
        what: what.clone(),
        source: io::Error::new(io::ErrorKind::InvalidData, msg),
    };
    let pem =
        std::fs::read(ca_bundle).map_err(|source| FetchError::Io { what: what.clone(), source })?;
    let mut roots = rustls::RootCertStore::empty();
    for (i, cert) in CertificateDer::pem_slice_iter(&pem).enumerate() {
        let cert = cert.map_err(|e| bad(format!("certificate {}: not PEM: {e}", i + 1)))?;
        roots.add(cert).map_err(|e| bad(format!("certificate {}: {e}", i + 1)))?;
    }
    if roots.is_empty() {
        return Err(bad("no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

fn is_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            if matches!(io.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock) {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// Maps body read errors: timeouts get their own kind so they read clearly.
struct BodyReader {
    inner: Box<dyn Read + Send + Sync + 'static>,
}

impl Read for BodyReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).map_err(|e| {
            if is_timeout(&e) {
                io::Error::new(io::ErrorKind::TimedOut, "timed out reading the response body")
            } else {
                e
            }
        })
    }
}

impl Fetch for HttpFetch {
    fn open_at(&mut self, offset: u64) -> Result<Option<Box<dyn Read + Send>>, FetchError> {
        let mut req = self.agent.get(&self.url);
        if offset > 0 {
            req = req.set("Range", &format!("bytes={offset}-"));
        }
        let resp = match req.call() {
            Ok(r) => r,
            Err(ureq::Error::Status(416, _)) => return Ok(None),
            Err(ureq::Error::Status(status, _)) => {
                return Err(FetchError::Status { url: self.url.clone(), status })
            }
            Err(ureq::Error::Transport(t)) => {
                return Err(if is_timeout(&t) {
                    FetchError::Timeout { url: self.url.clone() }
                } else {
                    FetchError::Transport { url: self.url.clone(), message: t.to_string() }
                })
            }
        };
        let status = resp.status();
        let content_range = resp.header("Content-Range").map(str::to_string);
        let mut body: Box<dyn Read + Send> = Box::new(BodyReader { inner: resp.into_reader() });
        match status {
            206 => {
                let want = format!("bytes {offset}-");
                if !content_range.as_deref().is_some_and(|c| c.starts_with(&want)) {
                    return Err(FetchError::Transport {
                        url: self.url.clone(),
                        message: format!(
                            "asked for bytes from {offset}, got Content-Range {content_range:?}"
                        ),
                    });
                }
                Ok(Some(body))
            }
            200 => {
                // The server ignored Range: skip to the offset.
                let skipped = io::copy(&mut (&mut body).take(offset), &mut io::sink())
                    .map_err(|source| FetchError::Io { what: self.url.clone(), source })?;
                if skipped < offset {
                    return Ok(None);
                }
                Ok(Some(body))
            }
            other => Err(FetchError::Status { url: self.url.clone(), status: other }),
        }
    }

    fn retryable(&self) -> bool {
        true
    }

    fn seekable(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        self.url.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testserver::{Mode, TestServer};
    use crate::testutil::test_tls;

    fn read_from(fetch: &mut HttpFetch, offset: u64) -> Result<Option<Vec<u8>>, FetchError> {
        Ok(fetch.open_at(offset)?.map(|mut r| {
            let mut v = Vec::new();
            r.read_to_end(&mut v).unwrap();
            v
        }))
    }

    #[test]
    fn ranges_are_honoured_or_skipped_when_ignored() {
        let body: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        for mode in [Mode::Normal, Mode::IgnoreRange] {
            let server = TestServer::start(body.clone(), mode);
            let mut f = HttpFetch::new(&server.url, Duration::from_secs(5));
            assert_eq!(read_from(&mut f, 0).unwrap().unwrap(), body, "{mode:?}");
            assert_eq!(read_from(&mut f, 1234).unwrap().unwrap(), &body[1234..], "{mode:?}");
            // Past the end: 416, or (ignoring Range) a body with nothing left after skipping.
            let past = read_from(&mut f, 10_000).unwrap();
            assert!(past.is_none_or(|v| v.is_empty()), "{mode:?}");
            assert_eq!(server.ranges()[1].as_deref(), Some("bytes=1234-"));
        }
    }

    #[test]
    fn https_servers_are_checked_against_the_ca_bundle() {
        let body: Vec<u8> = (0..5_000u32).map(|i| (i % 253) as u8).collect();
        let (ca_pem, tls) = test_tls();
        let server = TestServer::start_tls(body.clone(), Mode::Normal, tls);
        assert!(server.url.starts_with("https://"), "{}", server.url);
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, &ca_pem).unwrap();
        let timeout = Duration::from_secs(5);
        let mut f = HttpFetch::with_ca_bundle(&server.url, timeout, &ca).unwrap();
        assert_eq!(read_from(&mut f, 0).unwrap().unwrap(), body);
        assert_eq!(read_from(&mut f, 4000).unwrap().unwrap(), &body[4000..]);
        // The built-in roots, or a bundle of another CA, do not know this server.
        let (other_pem, _) = test_tls();
        let other = dir.path().join("other.pem");
        std::fs::write(&other, other_pem).unwrap();
        for mut f in [
            HttpFetch::new(&server.url, timeout),
            HttpFetch::with_ca_bundle(&server.url, timeout, &other).unwrap(),
        ] {
            let err = f.open_at(0).err().unwrap();
            assert!(matches!(err, FetchError::Transport { .. }), "{err}");
            // UnknownIssuer, or BadSignature for the other CA of the same name.
            assert!(err.to_string().contains("invalid peer certificate"), "{err}");
        }
        // CA bundles that are missing, empty or not PEM name the file.
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate\n").unwrap();
        let broken = dir.path().join("broken.pem");
        std::fs::write(&broken, ca_pem.replace("\n", "\n@")).unwrap();
        for (path, want) in [
            (dir.path().join("missing.pem"), "No such file"),
            (garbage, "no PEM certificate"),
            (broken, "certificate 1"),
        ] {
            let err = HttpFetch::with_ca_bundle(&server.url, timeout, &path).err().unwrap();
            let text = err.to_string();
            assert!(text.contains(&path.display().to_string()) && text.contains(want), "{text}");
        }
    }

    #[test]
    fn statuses_and_timeouts_are_clear_errors() {
        for code in [404u16, 500] {
            let server = TestServer::start(vec![1; 10], Mode::Status(code));
            let mut f = HttpFetch::new(&server.url, Duration::from_secs(5));
            let err = f.open_at(0).err().unwrap();
            assert!(matches!(err, FetchError::Status { status, .. } if status == code), "{err}");
            assert!(err.to_string().contains(&format!("HTTP {code}")), "{err}");
        }
        let server = TestServer::start(vec![1; 10], Mode::Hang);
        let mut f = HttpFetch::new(&server.url, Duration::from_millis(300));
        let err = f.open_at(0).err().unwrap();
        assert!(matches!(err, FetchError::Timeout { .. }), "{err}");
        let mut f = HttpFetch::new("http://127.0.0.1:1/x", Duration::from_millis(300));
        assert!(matches!(f.open_at(0), Err(FetchError::Transport { .. })));
    }
}
