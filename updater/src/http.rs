//! Bundles over HTTP(S): a [`Fetch`] that asks for `Range: bytes=N-` (ureq, rustls).
//!
//! A server that answers `206` is read from the asked offset; one that ignores `Range` and
//! answers `200` with the whole file is skipped forward to the offset; `416` means the offset
//! is past the end (a truncated bundle). Other statuses and transport failures become
//! [`FetchError`]s; the bundle cursor retries those that can pass (5xx, drops, timeouts).

use crate::bundle::{Fetch, FetchError};
use std::io::{self, Read};
use std::time::Duration;

/// Fetches a bundle from an `http://` or `https://` URL.
pub struct HttpFetch {
    url: String,
    agent: ureq::Agent,
}

impl HttpFetch {
    /// `timeout` bounds connecting and each read of the body.
    pub fn new(url: &str, timeout: Duration) -> HttpFetch {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(timeout)
            .timeout_read(timeout)
            .user_agent(concat!("metrica-updater/", env!("CARGO_PKG_VERSION")))
            .build();
        HttpFetch { url: url.to_string(), agent }
    }
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
/// misbehaves on request. It handles a bounded number of connections and stops when dropped.
#[cfg(test)]
pub(crate) mod testserver {
    use std::io::{BufRead, BufReader, Write};
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
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
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
                    serve(stream, &body, mode, &mut cuts, &ranges2, &stop2);
                }
            });
            TestServer {
                url: format!("http://{addr}/bundle.mfb"),
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

    impl Drop for TestServer {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            let _ = TcpStream::connect(self.addr);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn serve(
        stream: TcpStream,
        body: &[u8],
        mode: Mode,
        cuts: &mut usize,
        ranges: &Mutex<Vec<Option<String>>>,
        stop: &AtomicBool,
    ) {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut range = None;
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
