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

/// A small HTTP/1.1 server on 127.0.0.1 for tests: serves one body with `Range` support and
/// misbehaves on request, over plain TCP or TLS ([`TestServer::start_tls`]). It handles a
/// bounded number of connections and stops when dropped.
#[cfg(test)]
pub(crate) mod testserver {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// How the server behaves.
    #[derive(Debug, Clone, Copy)]
    pub(crate) enum Mode {
        /// Honours `Range` with 206.
        Normal,
        /// Always 200 with the whole body.
        IgnoreRange,
        /// Like `Normal` (or `IgnoreRange` when `ignore_range`), but the first `times`
        /// responses close the connection after `after` body bytes (the headers promise more).
        Cut { after: u64, times: usize, ignore_range: bool },
        /// Answers every request with this status.
        Status(u16),
        /// Reads the request and never answers (until dropped, at most 10 s).
        Hang,
    }

    pub(crate) struct TestServer {
        pub url: String,
        /// The `Range` header of each request (`None` without one).
        pub ranges: Arc<Mutex<Vec<Option<String>>>>,
        stop: Arc<AtomicBool>,
        addr: std::net::SocketAddr,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl TestServer {
        pub(crate) fn start(body: Vec<u8>, mode: Mode) -> TestServer {
            TestServer::start_with(body, mode, None)
        }

        /// An HTTPS server with this TLS configuration (certificate and key).
        pub(crate) fn start_tls(
            body: Vec<u8>,
            mode: Mode,
            tls: Arc<rustls::ServerConfig>,
        ) -> TestServer {
            TestServer::start_with(body, mode, Some(tls))
        }

        fn start_with(
            body: Vec<u8>,
            mode: Mode,
            tls: Option<Arc<rustls::ServerConfig>>,
        ) -> TestServer {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let scheme = if tls.is_some() { "https" } else { "http" };
            let stop = Arc::new(AtomicBool::new(false));
            let ranges = Arc::new(Mutex::new(Vec::new()));
            let (stop2, ranges2) = (stop.clone(), ranges.clone());
            let thread = std::thread::spawn(move || {
                let mut cuts = 0usize;
                // Bounded: at most 200 connections.
                for _ in 0..200 {
                    let Ok((stream, _)) = listener.accept() else { break };
                    if stop2.load(Ordering::SeqCst) {
                        break;
                    }
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                    match &tls {
                        None => serve(stream, &body, mode, &mut cuts, &ranges2, &stop2),
                        Some(config) => {
                            let Ok(conn) = rustls::ServerConnection::new(config.clone()) else {
                                continue;
                            };
                            let tls_stream = rustls::StreamOwned::new(conn, stream);
                            serve(tls_stream, &body, mode, &mut cuts, &ranges2, &stop2);
                        }
                    }
                }
            });
            TestServer {
                url: format!("{scheme}://{addr}/bundle.mfb"),
                ranges,
                stop,
                addr,
                thread: Some(thread),
            }
        }

        pub(crate) fn ranges(&self) -> Vec<Option<String>> {
            self.ranges.lock().unwrap().clone()
        }
    }

    /// A test CA and a server configuration with a certificate for `127.0.0.1` signed by it:
    /// the CA's certificate (PEM, for a CA bundle) and the server's TLS configuration.
    pub(crate) fn test_tls() -> (String, Arc<rustls::ServerConfig>) {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "metrica test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let der = rustls_pki_types::PrivatePkcs8KeyDer::from(key.serialize_der());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], der.into())
            .unwrap();
        (ca.pem(), Arc::new(config))
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            let _ = TcpStream::connect(self.addr);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn serve<S: Read + Write>(
        mut stream: S,
        body: &[u8],
        mode: Mode,
        cuts: &mut usize,
        ranges: &Mutex<Vec<Option<String>>>,
        stop: &AtomicBool,
    ) {
        let mut range = None;
        {
            // A GET has no body: nothing after the headers is lost with this reader.
            let mut reader = BufReader::new(&mut stream);
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                let line = line.trim_end();
                if line.is_empty() {
                    break;
                }
                if let Some((k, v)) = line.split_once(':') {
                    if k.eq_ignore_ascii_case("range") {
                        range = Some(v.trim().to_string());
                    }
                }
            }
        }
        ranges.lock().unwrap().push(range.clone());
        let mut out = stream;
        let start: Option<u64> = range
            .as_deref()
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|n| n.parse().ok());
        let len = body.len() as u64;
        match mode {
            Mode::Status(code) => {
                let _ = write!(
                    out,
                    "HTTP/1.1 {code} Oops\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
            }
            Mode::Hang => {
                for _ in 0..100 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            Mode::IgnoreRange => {
                let _ = write!(
                    out,
                    "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
                );
                let _ = out.write_all(body);
            }
            Mode::Normal | Mode::Cut { .. } => {
                let start = match mode {
                    Mode::Cut { ignore_range: true, .. } => None,
                    _ => start,
                };
                let from = start.unwrap_or(0);
                if from >= len && start.is_some() {
                    let _ = write!(out, "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                    return;
                }
                let part = &body[from as usize..];
                if start.is_some() {
                    let _ = write!(out, "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {from}-{}/{len}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", len - 1, part.len());
                } else {
                    let _ = write!(
                        out,
                        "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
                    );
                }
                let send = match mode {
                    Mode::Cut { after, times, .. } if *cuts < times => {
                        *cuts += 1;
                        &part[..(after as usize).min(part.len())]
                    }
                    _ => part,
                };
                let _ = out.write_all(send);
            }
        }
        let _ = out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::testserver::{Mode, TestServer};
    use super::*;

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
        let (ca_pem, tls) = super::testserver::test_tls();
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
        let (other_pem, _) = super::testserver::test_tls();
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
