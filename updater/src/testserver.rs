//! A small HTTP/1.1 server on 127.0.0.1 for tests, the one every test that fetches uses (the
//! bundle fetcher, the daemon's channel fetcher, the imager's publish tests through the
//! `testkit` feature).
//!
//! It serves files put in memory ([`TestServer::put`]) or read from a folder at each request
//! ([`TestServer::folder`]), with `Range: bytes=N-` (`206`, or `416` past the end), an `ETag`
//! answered with `304` to a matching `If-None-Match`, and `404` for the rest. It counts
//! requests and bytes, records each request's `Range`, and misbehaves on request ([`Mode`]):
//! ignoring ranges, dropping connections mid-body, answering a chosen status, HTML, a slow
//! loris, or nothing at all. Over plain TCP, or TLS ([`TestServer::start_tls`]). Each
//! connection has its own thread; the server stops when dropped.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Where [`TestServer::start`] puts its one body.
pub const BUNDLE_PATH: &str = "/bundle.mfb";

/// How the server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Serves the files; honours `Range` with `206`.
    Normal,
    /// Like `Normal`, but always `200` with the whole file.
    IgnoreRange,
    /// Like `Normal` (or `IgnoreRange` when `ignore_range`), but the first `times` responses
    /// close the connection after `after` body bytes (the headers promise more).
    Cut { after: u64, times: usize, ignore_range: bool },
    /// Answers every request with this status and no body.
    Status(u16),
    /// `200` with an HTML page, whatever was asked (a captive portal).
    Html,
    /// Headers, then one body byte every 200 ms (for a minute, or until dropped).
    SlowLoris,
    /// Reads the request and never answers (until dropped, at most 10 s).
    Hang,
}

/// What the server and its connection threads share.
#[derive(Debug)]
struct Shared {
    files: Mutex<BTreeMap<String, Vec<u8>>>,
    /// Files not in `files` are read from here.
    folder: Option<PathBuf>,
    mode: Mutex<Mode>,
    requests: AtomicU64,
    not_modified: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    /// The `Range` header of each request (`None` without one), in order.
    ranges: Mutex<Vec<Option<String>>>,
    /// Responses cut so far ([`Mode::Cut`]).
    cuts: AtomicUsize,
    tls: Option<Arc<rustls::ServerConfig>>,
    stop: AtomicBool,
}

/// See the module documentation.
#[derive(Debug)]
pub struct TestServer {
    /// `http://127.0.0.1:PORT` (or `https://`), without a trailing slash.
    pub base: String,
    /// The URL of [`BUNDLE_PATH`], where [`TestServer::start`] puts its body.
    pub url: String,
    shared: Arc<Shared>,
    addr: std::net::SocketAddr,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    /// A server of one body, at [`BUNDLE_PATH`] (its URL in `url`).
    pub fn start(body: Vec<u8>, mode: Mode) -> TestServer {
        let server = TestServer::launch(mode, None, None);
        server.shared.files.lock().unwrap().insert(BUNDLE_PATH.to_string(), body);
        server
    }

    /// Like [`TestServer::start`], over HTTPS with this configuration (certificate and key).
    pub fn start_tls(body: Vec<u8>, mode: Mode, tls: Arc<rustls::ServerConfig>) -> TestServer {
        let server = TestServer::launch(mode, None, Some(tls));
        server.shared.files.lock().unwrap().insert(BUNDLE_PATH.to_string(), body);
        server
    }

    /// A server with no files yet ([`TestServer::put`] adds them).
    pub fn empty(mode: Mode) -> TestServer {
        TestServer::launch(mode, None, None)
    }

    /// A server of the files under `root`, as they are at each request.
    pub fn folder(root: impl Into<PathBuf>) -> TestServer {
        TestServer::launch(Mode::Normal, Some(root.into()), None)
    }

    fn launch(
        mode: Mode,
        folder: Option<PathBuf>,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let base = format!("{}://{addr}", if tls.is_some() { "https" } else { "http" });
        let shared = Arc::new(Shared {
            files: Mutex::default(),
            folder,
            mode: Mutex::new(mode),
            requests: AtomicU64::default(),
            not_modified: AtomicU64::default(),
            bytes_in: AtomicU64::default(),
            bytes_out: AtomicU64::default(),
            ranges: Mutex::default(),
            cuts: AtomicUsize::default(),
            tls,
            stop: AtomicBool::default(),
        });
        let s = shared.clone();
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let s = s.clone();
                std::thread::spawn(move || connection(stream, &s));
            }
        });
        let url = format!("{base}{BUNDLE_PATH}");
        TestServer { base, url, shared, addr, thread: Some(thread) }
    }

    /// Serves `body` at `path` (`/channels/stable.toml`) from now on.
    pub fn put(&self, path: &str, body: &[u8]) {
        self.shared.files.lock().unwrap().insert(path.to_string(), body.to_vec());
    }

    /// Stops serving the file put at `path`.
    pub fn remove(&self, path: &str) {
        self.shared.files.lock().unwrap().remove(path);
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap() = mode;
    }

    /// The URL of `path` on this server.
    pub fn url_of(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Requests read so far.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// `304 Not Modified` answers so far.
    pub fn not_modified(&self) -> u64 {
        self.shared.not_modified.load(Ordering::SeqCst)
    }

    /// Bytes sent so far (headers and bodies).
    pub fn bytes_out(&self) -> u64 {
        self.shared.bytes_out.load(Ordering::SeqCst)
    }

    /// The `Range` header of each request so far (`None` without one).
    pub fn ranges(&self) -> Vec<Option<String>> {
        self.shared.ranges.lock().unwrap().clone()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the server reads of a request.
#[derive(Debug)]
struct Request {
    path: String,
    range: Option<String>,
    if_none_match: Option<String>,
}

fn connection(stream: TcpStream, s: &Shared) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    match &s.tls {
        None => serve(stream, s),
        Some(config) => {
            if let Ok(conn) = rustls::ServerConnection::new(config.clone()) {
                serve(rustls::StreamOwned::new(conn, stream), s);
            }
        }
    }
}

/// Reads the request line and headers (a GET has no body: nothing after them is lost).
fn read_request(stream: &mut impl Read, s: &Shared) -> Option<Request> {
    let mut reader = BufReader::new(stream);
    let mut first = String::new();
    if reader.read_line(&mut first).unwrap_or(0) == 0 {
        return None;
    }
    let mut bytes_in = first.len() as u64;
    let mut req = Request {
        path: first.split_whitespace().nth(1).unwrap_or("/").to_string(),
        range: None,
        if_none_match: None,
    };
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return None;
        }
        bytes_in += line.len() as u64;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                req.range = Some(v.trim().to_string());
            } else if k.eq_ignore_ascii_case("if-none-match") {
                req.if_none_match = Some(v.trim().to_string());
            }
        }
    }
    s.requests.fetch_add(1, Ordering::SeqCst);
    s.bytes_in.fetch_add(bytes_in, Ordering::SeqCst);
    s.ranges.lock().unwrap().push(req.range.clone());
    Some(req)
}

fn serve<S: Read + Write>(mut stream: S, s: &Shared) {
    let Some(req) = read_request(&mut stream, s) else { return };
    let mode = *s.mode.lock().unwrap();
    let mut out = Counted { out: stream, count: &s.bytes_out };
    match mode {
        Mode::Status(code) => {
            let _ = write!(out, "HTTP/1.1 {code} Oops\r\n{END}");
        }
        Mode::Html => {
            let body = b"<!DOCTYPE html><html><body>Please log in to the Wi-Fi</body></html>";
            let _ = write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\n{CLOSE}",
                body.len(),
            );
            let _ = out.write_all(body);
        }
        Mode::SlowLoris => {
            let _ = write!(out, "HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n{CLOSE}");
            for _ in 0..300 {
                if s.stop.load(Ordering::SeqCst) || out.write_all(b"a").is_err() {
                    break;
                }
                let _ = out.flush();
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        Mode::Hang => {
            for _ in 0..100 {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Mode::Normal | Mode::IgnoreRange | Mode::Cut { .. } => file(&mut out, s, &req, mode),
    }
    let _ = out.flush();
}

/// The end of a response without a body.
const END: &str = "Content-Length: 0\r\nConnection: close\r\n\r\n";
/// The end of the headers of a response with a body.
const CLOSE: &str = "Connection: close\r\n\r\n";

/// Answers with the file at the request's path: `404`, `304`, `416`, `206` or `200`.
fn file(out: &mut impl Write, s: &Shared, req: &Request, mode: Mode) {
    let Some(body) = lookup(s, &req.path) else {
        let _ = write!(out, "HTTP/1.1 404 Not Found\r\n{END}");
        return;
    };
    let etag = etag(&body);
    if req.if_none_match.as_deref() == Some(etag.as_str()) {
        s.not_modified.fetch_add(1, Ordering::SeqCst);
        let _ = write!(out, "HTTP/1.1 304 Not Modified\r\nETag: {etag}\r\n{CLOSE}");
        return;
    }
    let honour = !matches!(mode, Mode::IgnoreRange | Mode::Cut { ignore_range: true, .. });
    let start = req
        .range
        .as_deref()
        .filter(|_| honour)
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<u64>().ok());
    let len = body.len() as u64;
    let from = start.unwrap_or(0);
    if start.is_some() && from >= len {
        let _ = write!(
            out,
            "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\n{END}"
        );
        return;
    }
    let part = &body[from as usize..];
    let head = match start {
        Some(_) => format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {from}-{}/{len}\r\n",
            len - 1
        ),
        None => "HTTP/1.1 200 OK\r\n".to_string(),
    };
    let _ = write!(out, "{head}ETag: {etag}\r\nContent-Length: {}\r\n{CLOSE}", part.len());
    let send = match mode {
        Mode::Cut { after, times, .. } if s.cuts.fetch_add(1, Ordering::SeqCst) < times => {
            &part[..(after as usize).min(part.len())]
        }
        _ => part,
    };
    let _ = out.write_all(send);
}

/// The file at `path`: put in memory, else under the folder (never above it).
fn lookup(s: &Shared, path: &str) -> Option<Vec<u8>> {
    if let Some(body) = s.files.lock().unwrap().get(path) {
        return Some(body.clone());
    }
    let rel = path.trim_start_matches('/');
    if rel.split('/').any(|c| c == "..") {
        return None;
    }
    std::fs::read(s.folder.as_ref()?.join(rel)).ok()
}

fn etag(body: &[u8]) -> String {
    use sha2::Digest;
    format!("\"{}\"", &hex::encode(sha2::Sha256::digest(body))[..16])
}

/// A writer that counts what it sends.
struct Counted<'a, W> {
    out: W,
    count: &'a AtomicU64,
}

impl<W: Write> Write for Counted<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.out.write(buf)?;
        self.count.fetch_add(n as u64, Ordering::SeqCst);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One raw request: the status line, the headers and the body that came back.
    fn get(server: &TestServer, path: &str, headers: &str) -> (String, String, Vec<u8>) {
        let mut c = TcpStream::connect(server.base.trim_start_matches("http://")).unwrap();
        write!(c, "GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n").unwrap();
        let mut all = Vec::new();
        c.read_to_end(&mut all).unwrap();
        let at = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8(all[..at].to_vec()).unwrap();
        let (status, headers) = head.split_once("\r\n").unwrap_or((&head, ""));
        (status.to_string(), headers.to_string(), all[at + 4..].to_vec())
    }

    #[test]
    fn files_ranges_etags_and_counts() {
        let server = TestServer::empty(Mode::Normal);
        server.put("/a", b"0123456789");
        let (status, headers, body) = get(&server, "/a", "");
        assert_eq!((status.as_str(), body.as_slice()), ("HTTP/1.1 200 OK", &b"0123456789"[..]));
        let tag = headers.lines().find_map(|l| l.strip_prefix("ETag: ")).unwrap().to_string();
        let (status, headers, body) = get(&server, "/a", "Range: bytes=4-\r\n");
        assert_eq!(
            (status.as_str(), body.as_slice()),
            ("HTTP/1.1 206 Partial Content", &b"456789"[..])
        );
        assert!(headers.contains("Content-Range: bytes 4-9/10"), "{headers}");
        assert_eq!(
            get(&server, "/a", "Range: bytes=10-\r\n").0,
            "HTTP/1.1 416 Range Not Satisfiable"
        );
        let (status, _, body) = get(&server, "/a", &format!("If-None-Match: {tag}\r\n"));
        assert_eq!((status.as_str(), body.len()), ("HTTP/1.1 304 Not Modified", 0));
        assert_eq!(get(&server, "/b", "").0, "HTTP/1.1 404 Not Found");
        assert_eq!((server.requests(), server.not_modified()), (5, 1));
        assert_eq!(server.ranges()[1..3], [Some("bytes=4-".into()), Some("bytes=10-".into())]);
        assert!(server.bytes_out() > 16);
    }

    #[test]
    fn misbehaviour_on_request() {
        let server = TestServer::start(b"0123456789".to_vec(), Mode::IgnoreRange);
        assert_eq!(get(&server, BUNDLE_PATH, "Range: bytes=4-\r\n").2, b"0123456789");
        server.set_mode(Mode::Cut { after: 3, times: 1, ignore_range: false });
        let (_, headers, body) = get(&server, BUNDLE_PATH, "Range: bytes=4-\r\n");
        assert!(headers.contains("Content-Length: 6"), "{headers}");
        assert_eq!(body, b"456", "cut after 3 bytes");
        assert_eq!(get(&server, BUNDLE_PATH, "Range: bytes=4-\r\n").2, b"456789", "once");
        server.set_mode(Mode::Status(503));
        assert_eq!(get(&server, BUNDLE_PATH, "").0, "HTTP/1.1 503 Oops");
        server.set_mode(Mode::Html);
        assert!(get(&server, BUNDLE_PATH, "").1.contains("Content-Type: text/html"));
    }

    #[test]
    fn a_folder_is_read_at_each_request_and_never_above_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("in")).unwrap();
        std::fs::write(dir.path().join("in/f"), "one").unwrap();
        std::fs::write(dir.path().join("secret"), "no").unwrap();
        let server = TestServer::folder(dir.path().join("in"));
        assert_eq!(get(&server, "/f", "").2, b"one");
        std::fs::write(dir.path().join("in/f"), "two").unwrap();
        assert_eq!(get(&server, "/f", "").2, b"two");
        assert_eq!(get(&server, "/../secret", "").0, "HTTP/1.1 404 Not Found");
    }
}
