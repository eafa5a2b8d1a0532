//! Fetching the channel document from mirrors, in order, with conditional GETs.
//!
//! Each mirror is a base URL of a published folder (DESIGN.md section 6); the document is at
//! `<base>/channels/<channel>.toml` and its detached signature at the same URL plus `.sig`.
//! The first mirror that answers with the document (`200`) or with `304 Not Modified` wins;
//! every other answer is a [`FetchError`] with its own kind, and the next mirror is tried.
//!
//! Every request has a connect timeout and a deadline for the whole response, so a server
//! that trickles bytes (slow loris) fails like one that hangs. The body is capped
//! ([`MAX_DOCUMENT`]). A body that is HTML (a captive portal, an error page served with
//! `200`) or not UTF-8 text is refused here with [`FetchError::NotToml`]; the document's
//! schema, signature and freshness are the channel module's to check.
//!
//! The validators (`ETag`, `Last-Modified`) of the last good document are sent back only to
//! the mirror that gave them: an unchanged channel then costs one request and a `304` with no
//! body.

use crate::http::Trust;
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::time::Duration;
use thiserror::Error;

/// Largest channel document or signature accepted, in bytes.
pub const MAX_DOCUMENT: u64 = 1 << 20;

/// Why one mirror did not give the channel document.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FetchError {
    #[error("{url}: HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("{url}: not a channel document (TOML expected): {found}")]
    NotToml { url: String, found: String },
    #[error("{url}: no complete answer within {secs} s")]
    Timeout { url: String, secs: u64 },
    #[error("{url}: unreachable: {message}")]
    Unreachable { url: String, message: String },
    #[error("{url}: larger than {MAX_DOCUMENT} bytes")]
    TooLarge { url: String },
    #[error("{url}: 304 Not Modified, but no cached document to reuse")]
    UnexpectedNotModified { url: String },
}

impl FetchError {
    /// A short stable name for logs, metrics and `/status`.
    pub fn kind(&self) -> &'static str {
        match self {
            FetchError::Status { status, .. } if *status >= 500 => "http_5xx",
            FetchError::Status { .. } => "http_4xx",
            FetchError::NotToml { .. } => "not_toml",
            FetchError::Timeout { .. } => "timeout",
            FetchError::Unreachable { .. } => "unreachable",
            FetchError::TooLarge { .. } => "too_large",
            FetchError::UnexpectedNotModified { .. } => "unexpected_304",
        }
    }

    pub const KINDS: [&'static str; 7] = crate::daemon_record::FETCH_ERROR_KINDS;
}

/// Every mirror failed; one error per mirror, in the order tried.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("no mirror gave the channel document: {}", join(.0))]
pub struct AllMirrorsFailed(pub Vec<FetchError>);

fn join(errors: &[FetchError]) -> String {
    errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// HTTP cache validators of a document, and the mirror that gave them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Validators {
    pub mirror: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_modified: Option<String>,
}

/// A document and its signature as served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    pub toml: Vec<u8>,
    pub sig: Option<Vec<u8>>,
}

/// What the mirrors gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// The mirror said the cached document is still current.
    NotModified { mirror: String },
    /// A new (or first) document.
    New { mirror: String, document: Document, validators: Validators },
}

impl Fetched {
    pub fn mirror(&self) -> &str {
        match self {
            Fetched::NotModified { mirror } | Fetched::New { mirror, .. } => mirror,
        }
    }
}

/// The outcome of one poll: which mirrors failed (in order) and what the first good one gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Poll {
    pub failed: Vec<FetchError>,
    pub result: Result<Fetched, AllMirrorsFailed>,
}

/// Fetches `channels/<channel>.toml` from mirrors.
pub struct ChannelFetcher {
    pub mirrors: Vec<String>,
    pub channel: String,
    /// Also fetch `<document>.sig` when the document changed.
    pub detached_signature: bool,
    /// Deadline for a whole request (connect, headers and body).
    pub deadline: Duration,
    agent: ureq::Agent,
}

impl ChannelFetcher {
    pub fn new(mirrors: Vec<String>, channel: &str, deadline: Duration) -> ChannelFetcher {
        ChannelFetcher {
            mirrors,
            channel: channel.to_string(),
            detached_signature: true,
            deadline,
            agent: agent(deadline, None),
        }
    }

    /// HTTPS mirrors are checked against `trust` (a CA bundle's certificates, made by
    /// [`crate::http::tls_config`]) instead of the built-in roots.
    pub fn with_trust(mut self, trust: Trust) -> ChannelFetcher {
        self.agent = agent(self.deadline, trust);
        self
    }

    /// URL of the document on a mirror.
    pub fn url(&self, mirror: &str) -> String {
        format!("{}/channels/{}.toml", mirror.trim_end_matches('/'), self.channel)
    }

    /// Tries each mirror in order. `cached`: the validators of the cached document, if any.
    pub fn poll(&self, cached: Option<&Validators>) -> Poll {
        let mut failed = Vec::new();
        for mirror in &self.mirrors {
            let validators = cached.filter(|v| v.mirror == *mirror);
            match self.fetch_one(mirror, validators) {
                Ok(f) => return Poll { failed: failed.clone(), result: Ok(f) },
                Err(e) => failed.push(e),
            }
        }
        Poll { failed: failed.clone(), result: Err(AllMirrorsFailed(failed)) }
    }

    fn fetch_one(&self, mirror: &str, v: Option<&Validators>) -> Result<Fetched, FetchError> {
        let url = self.url(mirror);
        let mut req = self.agent.get(&url).set("Accept", "application/toml, text/plain");
        if let Some(v) = v {
            if let Some(etag) = &v.etag {
                req = req.set("If-None-Match", etag);
            }
            if let Some(lm) = &v.last_modified {
                req = req.set("If-Modified-Since", lm);
            }
        }
        let resp = self.call(&url, req)?;
        if resp.status() == 304 {
            return if v.is_some() {
                Ok(Fetched::NotModified { mirror: mirror.to_string() })
            } else {
                Err(FetchError::UnexpectedNotModified { url })
            };
        }
        if resp.status() != 200 {
            return Err(FetchError::Status { url, status: resp.status() });
        }
        let validators = Validators {
            mirror: mirror.to_string(),
            etag: resp.header("ETag").map(str::to_string),
            last_modified: resp.header("Last-Modified").map(str::to_string),
        };
        let content_type = resp.header("Content-Type").unwrap_or("").to_ascii_lowercase();
        let toml = self.body(&url, resp)?;
        check_text(&url, &content_type, &toml)?;
        let sig = if self.detached_signature {
            let sig_url = format!("{url}.sig");
            match self.call(&sig_url, self.agent.get(&sig_url)) {
                // No signature published: the channel checks refuse it as unsigned.
                Err(FetchError::Status { status: 404, .. }) => None,
                Err(e) => return Err(e),
                Ok(resp) if resp.status() != 200 => {
                    return Err(FetchError::Status { url: sig_url, status: resp.status() })
                }
                Ok(resp) => Some(self.body(&sig_url, resp)?),
            }
        } else {
            None
        };
        Ok(Fetched::New {
            mirror: mirror.to_string(),
            document: Document { toml, sig },
            validators,
        })
    }

    fn call(&self, url: &str, req: ureq::Request) -> Result<ureq::Response, FetchError> {
        match req.call() {
            Ok(r) => Ok(r),
            Err(ureq::Error::Status(status, _)) => {
                Err(FetchError::Status { url: url.to_string(), status })
            }
            Err(ureq::Error::Transport(t)) => Err(if is_timeout(&t) {
                FetchError::Timeout { url: url.to_string(), secs: self.deadline.as_secs().max(1) }
            } else {
                let message = crate::http::transport_message(&t);
                FetchError::Unreachable { url: url.to_string(), message }
            }),
        }
    }

    fn body(&self, url: &str, resp: ureq::Response) -> Result<Vec<u8>, FetchError> {
        let mut body = Vec::new();
        resp.into_reader().take(MAX_DOCUMENT + 1).read_to_end(&mut body).map_err(|e| {
            if is_timeout(&e) {
                FetchError::Timeout { url: url.to_string(), secs: self.deadline.as_secs().max(1) }
            } else {
                FetchError::Unreachable {
                    url: url.to_string(),
                    message: format!("reading the body: {e}"),
                }
            }
        })?;
        if body.len() as u64 > MAX_DOCUMENT {
            return Err(FetchError::TooLarge { url: url.to_string() });
        }
        Ok(body)
    }
}

fn agent(deadline: Duration, trust: Trust) -> ureq::Agent {
    crate::http::agent_builder(trust)
        .timeout_connect(deadline.min(Duration::from_secs(10)))
        .timeout(deadline)
        .redirects(3)
        .user_agent(concat!("metrica-updater/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Refuses HTML (by type or by content) and anything that is not UTF-8 text.
pub fn check_text(url: &str, content_type: &str, body: &[u8]) -> Result<(), FetchError> {
    let not_toml = |found: String| Err(FetchError::NotToml { url: url.to_string(), found });
    if content_type.contains("html") {
        return not_toml(format!("Content-Type {content_type}"));
    }
    let Ok(text) = std::str::from_utf8(body) else {
        return not_toml("a body that is not UTF-8 text".into());
    };
    let start = text.trim_start();
    if start.starts_with('<') {
        let head: String = start.chars().take(40).collect();
        return not_toml(format!("markup starting {head:?}"));
    }
    Ok(())
}

fn is_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if matches!(io.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock) {
                return true;
            }
        }
        if err.to_string().contains("timed out") {
            return true;
        }
        cur = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testserver::{Mode, TestServer};
    use std::path::PathBuf;
    use std::time::Instant;

    const DOC: &[u8] = b"sequence = 1\n";

    fn server(mode: Mode) -> TestServer {
        let s = TestServer::empty(mode);
        s.put("/channels/stable.toml", DOC);
        s.put("/channels/stable.toml.sig", b"sig");
        s
    }

    fn fetcher(mirrors: &[&str]) -> ChannelFetcher {
        ChannelFetcher::new(
            mirrors.iter().map(|m| m.to_string()).collect(),
            "stable",
            Duration::from_millis(1500),
        )
    }

    #[test]
    fn a_new_document_then_not_modified() {
        let s = server(Mode::Normal);
        let f = fetcher(&[&s.base]);
        let poll = f.poll(None);
        let Ok(Fetched::New { document, validators, .. }) = poll.result else { panic!("{poll:?}") };
        assert_eq!(document.toml, DOC);
        assert_eq!(document.sig.as_deref(), Some(&b"sig"[..]));
        assert!(validators.etag.is_some());
        let poll = f.poll(Some(&validators));
        assert_eq!(poll.result, Ok(Fetched::NotModified { mirror: s.base.clone() }));
        assert_eq!(s.requests(), 3, "document, signature, then one conditional GET");
        // A changed document is fetched again.
        s.put("/channels/stable.toml", b"sequence = 2\n");
        assert!(matches!(f.poll(Some(&validators)).result, Ok(Fetched::New { .. })));
    }

    #[test]
    fn validators_go_only_to_the_mirror_that_gave_them() {
        let (a, b) = (server(Mode::Normal), server(Mode::Normal));
        let f = fetcher(&[&a.base, &b.base]);
        let v =
            Validators { mirror: b.base.clone(), etag: Some("\"x\"".into()), last_modified: None };
        assert!(matches!(f.poll(Some(&v)).result, Ok(Fetched::New { .. })));
    }

    #[test]
    fn failover_past_a_down_mirror_a_500_html_and_a_slow_loris() {
        let good = server(Mode::Normal);
        let (html, e500, loris) =
            (server(Mode::Html), server(Mode::Status(500)), server(Mode::SlowLoris));
        let down = "http://127.0.0.1:1";
        let f = fetcher(&[down, &html.base, &e500.base, &loris.base, &good.base]);
        let started = Instant::now();
        let poll = f.poll(None);
        assert!(matches!(&poll.result, Ok(Fetched::New { mirror, .. }) if *mirror == good.base));
        let kinds: Vec<&str> = poll.failed.iter().map(FetchError::kind).collect();
        assert_eq!(kinds, ["unreachable", "not_toml", "http_5xx", "timeout"], "{poll:?}");
        // The slow loris sends a byte every 200 ms: only the whole-response deadline ends it.
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        let msg = poll.failed[1].to_string();
        assert!(
            msg.contains("not a channel document (TOML expected): Content-Type text/html"),
            "{msg}"
        );
    }

    #[test]
    fn all_mirrors_failing_is_one_error_naming_each() {
        let e500 = server(Mode::Status(500));
        let f = fetcher(&["http://127.0.0.1:1", &e500.base]);
        let err = f.poll(None).result.unwrap_err();
        assert_eq!(err.0.len(), 2);
        let msg = err.to_string();
        assert!(msg.starts_with("no mirror gave the channel document: http://127.0.0.1:1/channels/stable.toml: unreachable"), "{msg}");
        assert!(msg.contains("/channels/stable.toml: HTTP 500"), "{msg}");
    }

    #[test]
    fn a_missing_signature_is_none_and_a_missing_channel_is_4xx() {
        let s = TestServer::empty(Mode::Normal);
        s.put("/channels/stable.toml", DOC);
        let Ok(Fetched::New { document, .. }) = fetcher(&[&s.base]).poll(None).result else {
            panic!("a document without a signature is still a document")
        };
        assert_eq!(document.sig, None);
        let mut f = fetcher(&[&s.base]);
        f.channel = "beta".into();
        let err = f.poll(None).result.unwrap_err();
        assert_eq!(err.0[0].kind(), "http_4xx");
        assert!(err.0[0].to_string().ends_with("/channels/beta.toml: HTTP 404"), "{err}");
    }

    /// A TLS mirror with the channel files, its CA bundle written to `dir`.
    fn tls_server(dir: &std::path::Path, name: &str, expired: bool) -> (TestServer, PathBuf) {
        let (ca_pem, tls) = crate::testutil::test_tls_for(name, expired);
        let s = TestServer::start_tls(Vec::new(), Mode::Normal, tls);
        s.put("/channels/stable.toml", DOC);
        let ca = dir.join(format!("{name}-{expired}.pem"));
        std::fs::write(&ca, ca_pem).unwrap();
        (s, ca)
    }

    #[test]
    fn https_mirrors_are_checked_against_the_ca_bundle_and_refusals_name_why() {
        let dir = tempfile::tempdir().unwrap();
        let (good, good_ca) = tls_server(dir.path(), "127.0.0.1", false);
        let (expired, expired_ca) = tls_server(dir.path(), "127.0.0.1", true);
        let (other_host, other_host_ca) = tls_server(dir.path(), "updates.example.com", false);
        let with = |ca: &std::path::Path, base: &str| {
            let trust = crate::http::tls_config(ca).unwrap();
            fetcher(&[base]).with_trust(Some(trust)).poll(None)
        };
        let poll = with(&good_ca, &good.base);
        let Ok(Fetched::New { document, .. }) = poll.result else { panic!("{poll:?}") };
        assert_eq!(document.toml, DOC);
        // Each refusal is "unreachable", and its message names the certificate's problem.
        for (ca, base, why) in [
            (&expired_ca, &good.base, "server certificate not issued by a trusted CA"),
            (&expired_ca, &expired.base, "server certificate expired"),
            (&other_host_ca, &other_host.base, "server certificate not valid for the host name"),
        ] {
            let poll = with(ca, base);
            let err = &poll.result.unwrap_err().0[0];
            assert_eq!(err.kind(), "unreachable", "{err}");
            assert!(err.to_string().contains(why), "{why}: {err}");
        }
        // Without the bundle, the built-in roots do not know the private CA.
        let err = &fetcher(&[&good.base]).poll(None).result.unwrap_err().0[0];
        assert!(err.to_string().contains("not issued by a trusted CA"), "{err}");
    }

    #[test]
    fn bodies_that_are_not_toml_text() {
        let u = "http://m/channels/x.toml";
        assert!(check_text(u, "application/toml", b"sequence = 1").is_ok());
        assert!(check_text(u, "", b"  \n<html>")
            .unwrap_err()
            .to_string()
            .contains("markup starting \"<html>\""));
        assert!(check_text(u, "text/html; charset=utf-8", b"a = 1").is_err());
        assert_eq!(check_text(u, "", &[0xff, 0xfe]).unwrap_err().kind(), "not_toml");
    }
}
