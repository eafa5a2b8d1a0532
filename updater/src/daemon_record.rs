//! `/data/metrica/daemon.json`: what the daemon knows between polls and across restarts.
//!
//! The daemon rewrites it atomically after every poll; `updater status` and `/status` read it,
//! so both show the same channel, connectivity, decision and last error. Connectivity is
//! recomputed from `last_contact` whenever it is read, so it stays true between polls.

use crate::connectivity::{self, Connectivity};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const RECORD_FORMAT: u32 = 1;

/// The kinds of failed channel fetch the record counts (`FetchError::kind` in
/// `daemon/fetch.rs`); here, below the daemon, so `/metrics` lists them without importing it.
pub const FETCH_ERROR_KINDS: [&str; 7] =
    ["http_5xx", "http_4xx", "not_toml", "timeout", "unreachable", "too_large", "unexpected_304"];

/// Path of the record under the data directory.
pub fn record_path(data_dir: &Path) -> PathBuf {
    data_dir.join("metrica").join("daemon.json")
}

/// The channel as last verified.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelRecord {
    pub name: String,
    pub mirrors: Vec<String>,
    /// Sequence of the last good document (`None` before the first one).
    pub sequence: Option<u64>,
    /// Unix time after which the document is not acted on.
    pub expires: Option<u64>,
    /// The OS version the channel targets.
    pub target_version: Option<String>,
    /// Mirror that served the last good document, and when it was verified.
    pub mirror: Option<String>,
    pub verified_at: Option<u64>,
    /// The configured channel, when its devices table (or the provisioning) sent this device
    /// to `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub followed_from: Option<String>,
}

/// What the rollout decided; in the record, the log and /status, its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecisionOutcome {
    Install,
    Stay,
}

impl DecisionOutcome {
    /// The name (as serialized).
    pub fn as_str(self) -> &'static str {
        match self {
            DecisionOutcome::Install => "install",
            DecisionOutcome::Stay => "stay",
        }
    }
}

impl std::fmt::Display for DecisionOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One decision of the rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionRecord {
    pub time: u64,
    pub outcome: DecisionOutcome,
    /// The rollout's stable name of the reason (`rollout`, `paused`, `throttled`, ...).
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    pub reason: String,
}

/// A named error: `kind` is stable (logs, metrics, alerts), `message` says what and where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedError {
    pub time: u64,
    pub kind: String,
    pub message: String,
}

/// The last install the daemon started (the throttle's input).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub time: u64,
    pub version: String,
    pub ok: bool,
}

/// Counters, kept across restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonCounters {
    pub polls: u64,
    pub not_modified: u64,
    pub new_documents: u64,
    /// Failed fetches by [`crate::daemon::fetch::FetchError::kind`] (one per mirror that failed).
    pub fetch_errors: BTreeMap<String, u64>,
    /// Documents refused by the channel checks, by kind.
    pub channel_errors: BTreeMap<String, u64>,
    pub installs_ok: u64,
    pub installs_failed: u64,
}

/// The record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonRecord {
    pub format: u32,
    /// When the daemon first ran on this device (connectivity counts from here until the
    /// first contact).
    pub first_start: u64,
    /// When the running daemon started, and its process id.
    pub started: u64,
    pub pid: u32,
    /// Local address of the endpoints.
    pub listen: String,
    pub channel: ChannelRecord,
    pub last_contact: Option<u64>,
    pub last_poll: Option<u64>,
    pub next_poll: Option<u64>,
    /// Connectivity as of the last poll (`updater status` recomputes it on read).
    pub connectivity: Connectivity,
    pub decision: Option<DecisionRecord>,
    pub last_attempt: Option<Attempt>,
    /// Unix time of the last failed install attempt (the throttle waits longer after one).
    #[serde(default)]
    pub last_failure: Option<u64>,
    /// Versions whose install failed for good here: not retried automatically.
    #[serde(default)]
    pub failed_versions: std::collections::BTreeSet<String>,
    pub last_error: Option<NamedError>,
    /// The last refusal or install failure put in the history (kind and version): the
    /// same one again is logged, not appended to the history again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_history_error: Option<String>,
    /// The errors of the latest poll (empty when it went cleanly).
    #[serde(default)]
    pub poll_errors: Vec<NamedError>,
    pub counters: DaemonCounters,
}

impl DaemonRecord {
    pub fn new(now: u64) -> DaemonRecord {
        DaemonRecord {
            format: RECORD_FORMAT,
            first_start: now,
            started: now,
            pid: std::process::id(),
            listen: String::new(),
            channel: ChannelRecord::default(),
            last_contact: None,
            last_poll: None,
            next_poll: None,
            connectivity: Connectivity::Online,
            decision: None,
            last_attempt: None,
            last_failure: None,
            failed_versions: Default::default(),
            last_error: None,
            last_history_error: None,
            poll_errors: Vec::new(),
            counters: DaemonCounters::default(),
        }
    }

    /// Connectivity at `now`.
    pub fn connectivity_at(&self, now: u64) -> Connectivity {
        connectivity::classify(self.last_contact, self.first_start, now)
    }

    /// Loads the record; `Ok(None)` when there is none yet.
    pub fn load(path: &Path) -> anyhow::Result<Option<DaemonRecord>> {
        use anyhow::Context;
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let r: DaemonRecord = serde_json::from_slice(&bytes)
            .with_context(|| format!("parsing {}", path.display()))?;
        if r.format != RECORD_FORMAT {
            anyhow::bail!(
                "{}: format {} (this updater reads {RECORD_FORMAT})",
                path.display(),
                r.format
            );
        }
        Ok(Some(r))
    }

    /// Writes the record atomically.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let mut bytes = serde_json::to_vec_pretty(self)?;
        bytes.push(b'\n');
        crate::state::write_atomic(path, &bytes, "daemon")
    }
}

#[cfg(test)]
mod tests {
    /// The outcomes in the record, the log and /status are the documented names.
    #[test]
    fn decision_outcomes_are_written_as_install_and_stay() {
        use super::DecisionOutcome::{self, *};
        for (outcome, name) in [(Install, "install"), (Stay, "stay")] {
            assert_eq!(serde_json::to_value(outcome).unwrap(), name);
            assert_eq!((outcome.as_str(), outcome.to_string()), (name, name.to_string()));
            let back: DecisionOutcome = serde_json::from_value(name.into()).unwrap();
            assert_eq!(back, outcome);
        }
    }

    use super::*;

    #[test]
    fn round_trip_and_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = record_path(dir.path());
        assert_eq!(DaemonRecord::load(&path).unwrap(), None);
        let mut r = DaemonRecord::new(100);
        r.counters.fetch_errors.insert("timeout".into(), 2);
        r.last_contact = Some(90);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        r.save(&path).unwrap();
        assert_eq!(DaemonRecord::load(&path).unwrap(), Some(r.clone()));
        assert_eq!(r.connectivity_at(90 + 6 * 3600), Connectivity::Degraded);
        std::fs::write(&path, b"{").unwrap();
        let e = format!("{:#}", DaemonRecord::load(&path).unwrap_err());
        assert!(e.starts_with(&format!("parsing {}", path.display())), "{e}");
        let mut v = serde_json::to_value(&r).unwrap();
        v["format"] = 9.into();
        std::fs::write(&path, v.to_string()).unwrap();
        let e = DaemonRecord::load(&path).unwrap_err().to_string();
        assert!(e.ends_with("format 9 (this updater reads 1)"), "{e}");
    }
}
