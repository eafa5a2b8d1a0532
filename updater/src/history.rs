//! `/data/metrica/history.jsonl`: one JSON line per install, trial, commit, rollback,
//! mark-good, mark-bad and repair, appended and fsynced, bounded in lines and bytes.
//!
//! An append that would take the file past its bounds rewrites it atomically with only the
//! newest entries (half the byte bound), so the file never grows without limit and a power
//! cut during that rewrite leaves the old file or the new one. A line torn by a power cut
//! during an append is skipped by the reader, and the next append starts on a fresh line.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Path of the history under the data directory.
pub fn history_path(data_dir: &Path) -> PathBuf {
    data_dir.join("metrica").join("history.jsonl")
}

/// What a history entry records; in the file, its name ([`HistoryEvent::as_str`], the one
/// table of names; docs/slots.md, docs/daemon.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HistoryEvent {
    /// A device's first state.
    Init,
    InstallStarted,
    Install,
    Trial,
    Commit,
    Rollback,
    /// A power cut between the trial's commit and its bookkeeping, finished at boot.
    CommitInterrupted,
    WrongSlot,
    UnexpectedTryboot,
    Repair,
    MarkGood,
    MarkBad,
    /// The daemon: the network came or went.
    Connectivity,
    /// The daemon: a rollout decision that differs from the last one.
    Decision,
    /// The daemon: an install it would not start.
    Refused,
    InstallFailed,
    /// A role release committed (version: the release; reason: the role's name).
    RoleApplied,
    /// A role release failed after its switch and the previous one runs again.
    RoleRolledBack,
    /// A role release refused before anything that runs was touched.
    RoleRefused,
    /// A role apply cut short (power cut, crash) finished at start.
    RoleRecovered,
    SafeModeEnter,
    SafeModeExit,
    /// An event this version does not know (written by another one), kept as it was.
    Other(String),
}

impl HistoryEvent {
    /// Every known event, in the order of [`HistoryEvent`].
    pub const KNOWN: [HistoryEvent; 22] = [
        HistoryEvent::Init,
        HistoryEvent::InstallStarted,
        HistoryEvent::Install,
        HistoryEvent::Trial,
        HistoryEvent::Commit,
        HistoryEvent::Rollback,
        HistoryEvent::CommitInterrupted,
        HistoryEvent::WrongSlot,
        HistoryEvent::UnexpectedTryboot,
        HistoryEvent::Repair,
        HistoryEvent::MarkGood,
        HistoryEvent::MarkBad,
        HistoryEvent::Connectivity,
        HistoryEvent::Decision,
        HistoryEvent::Refused,
        HistoryEvent::InstallFailed,
        HistoryEvent::RoleApplied,
        HistoryEvent::RoleRolledBack,
        HistoryEvent::RoleRefused,
        HistoryEvent::RoleRecovered,
        HistoryEvent::SafeModeEnter,
        HistoryEvent::SafeModeExit,
    ];

    /// The name in the file and in `updater status` (as serialized).
    pub fn as_str(&self) -> &str {
        match self {
            HistoryEvent::Init => "init",
            HistoryEvent::InstallStarted => "install-started",
            HistoryEvent::Install => "install",
            HistoryEvent::Trial => "trial",
            HistoryEvent::Commit => "commit",
            HistoryEvent::Rollback => "rollback",
            HistoryEvent::CommitInterrupted => "commit-interrupted",
            HistoryEvent::WrongSlot => "wrong-slot",
            HistoryEvent::UnexpectedTryboot => "unexpected-tryboot",
            HistoryEvent::Repair => "repair",
            HistoryEvent::MarkGood => "mark-good",
            HistoryEvent::MarkBad => "mark-bad",
            HistoryEvent::Connectivity => "connectivity",
            HistoryEvent::Decision => "decision",
            HistoryEvent::Refused => "refused",
            HistoryEvent::InstallFailed => "install-failed",
            HistoryEvent::RoleApplied => "role-applied",
            HistoryEvent::RoleRolledBack => "role-rolled-back",
            HistoryEvent::RoleRefused => "role-refused",
            HistoryEvent::RoleRecovered => "role-recovered",
            HistoryEvent::SafeModeEnter => "safe-mode-enter",
            HistoryEvent::SafeModeExit => "safe-mode-exit",
            HistoryEvent::Other(name) => name,
        }
    }
}

impl Serialize for HistoryEvent {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for HistoryEvent {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        let known = HistoryEvent::KNOWN.iter().find(|e| e.as_str() == name);
        Ok(known.cloned().unwrap_or(HistoryEvent::Other(name)))
    }
}

impl std::fmt::Display for HistoryEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One history entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Unix time in seconds.
    pub time: u64,
    pub event: HistoryEvent,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Why, or what, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Entry {
    pub fn new(time: u64, event: HistoryEvent) -> Entry {
        Entry { time, event, slot: None, version: None, reason: None }
    }
    pub fn slot(mut self, slot: crate::layout::Slot) -> Entry {
        self.slot = Some(slot.to_string());
        self
    }
    pub fn version(mut self, version: Option<&semver::Version>) -> Entry {
        self.version = version.map(|v| v.to_string());
        self
    }
    pub fn reason(mut self, reason: impl Into<String>) -> Entry {
        self.reason = Some(reason.into());
        self
    }
}

/// The history file and its bounds.
#[derive(Debug, Clone)]
pub struct History {
    pub path: PathBuf,
    pub max_entries: usize,
    pub max_bytes: u64,
}

impl History {
    /// The history under `data_dir` with the default bounds (1000 entries, 256 KiB).
    pub fn new(data_dir: &Path) -> History {
        History { path: history_path(data_dir), max_entries: 1000, max_bytes: 256 * 1024 }
    }

    /// Appends one entry and fsyncs it; compacts first when the bounds would be passed.
    pub fn append(&self, entry: &Entry) -> Result<()> {
        let mut line = serde_json::to_string(entry).context("serializing a history entry")?;
        line.push('\n');
        let existing = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.path.display())),
        };
        let lines = existing.iter().filter(|&&b| b == b'\n').count();
        if lines + 1 > self.max_entries || (existing.len() + line.len()) as u64 > self.max_bytes {
            return self.compact(&existing, &line);
        }
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .with_context(|| format!("opening {}", self.path.display()))?;
        if existing.last().is_some_and(|&b| b != b'\n') {
            // The last append was torn: end that line so this one stands alone.
            line.insert(0, '\n');
        }
        f.write_all(line.as_bytes())
            .with_context(|| format!("appending to {}", self.path.display()))?;
        f.sync_all().with_context(|| format!("syncing {}", self.path.display()))
    }

    /// Keeps the newest entries within half the bounds, plus `line`, written atomically.
    fn compact(&self, existing: &[u8], line: &str) -> Result<()> {
        let budget = (self.max_bytes / 2) as usize;
        let keep_entries = (self.max_entries / 2).max(1);
        let mut kept: Vec<&[u8]> = Vec::new();
        let mut size = line.len();
        for l in existing.split(|&b| b == b'\n').rev().filter(|l| !l.is_empty()) {
            if kept.len() + 1 >= keep_entries || size + l.len() + 1 > budget {
                break;
            }
            if serde_json::from_slice::<Entry>(l).is_err() {
                continue;
            }
            size += l.len() + 1;
            kept.push(l);
        }
        let mut out = Vec::with_capacity(size);
        for l in kept.iter().rev() {
            out.extend_from_slice(l);
            out.push(b'\n');
        }
        out.extend_from_slice(line.as_bytes());
        crate::state::write_atomic(&self.path, &out, "history")
    }

    /// The newest `n` entries, oldest first; unreadable lines are skipped.
    pub fn tail(&self, n: usize) -> Result<Vec<Entry>> {
        let text = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.path.display())),
        };
        let mut entries: Vec<Entry> = text
            .split(|&b| b == b'\n')
            .rev()
            .filter_map(|l| serde_json::from_slice(l).ok())
            .take(n)
            .collect();
        entries.reverse();
        Ok(entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Slot;

    #[test]
    fn appends_and_reads_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let h = History::new(dir.path());
        assert!(h.tail(5).unwrap().is_empty());
        let v: semver::Version = "1.2.3".parse().unwrap();
        h.append(&Entry::new(1, HistoryEvent::Install).slot(Slot::B).version(Some(&v))).unwrap();
        h.append(&Entry::new(2, HistoryEvent::Rollback).slot(Slot::B).reason("watchdog")).unwrap();
        let t = h.tail(5).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].version.as_deref(), Some("1.2.3"));
        assert_eq!(t[1].reason.as_deref(), Some("watchdog"));
        assert_eq!(h.tail(1).unwrap()[0].event, HistoryEvent::Rollback);
        let text = std::fs::read_to_string(&h.path).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(text.lines().all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()));
    }

    #[test]
    fn stays_within_its_bounds_and_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let h = History { max_entries: 10, max_bytes: 100_000, ..History::new(dir.path()) };
        for i in 0..35 {
            h.append(&Entry::new(i, HistoryEvent::Commit)).unwrap();
            let n = std::fs::read_to_string(&h.path).unwrap().lines().count();
            assert!(n <= 10, "{n} entries after {i}");
        }
        assert_eq!(h.tail(1).unwrap()[0].time, 34);
        let h = History { max_entries: 1000, max_bytes: 600, ..History::new(dir.path()) };
        for i in 0..100 {
            h.append(&Entry::new(i, HistoryEvent::Repair).reason("x".repeat(20))).unwrap();
            assert!(std::fs::metadata(&h.path).unwrap().len() <= 600);
        }
        let t = h.tail(1000).unwrap();
        assert_eq!(t.last().unwrap().time, 99);
        assert!(t.windows(2).all(|w| w[0].time + 1 == w[1].time));
    }

    #[test]
    fn a_torn_last_line_is_skipped_and_ended() {
        let dir = tempfile::tempdir().unwrap();
        let h = History::new(dir.path());
        h.append(&Entry::new(1, HistoryEvent::Trial)).unwrap();
        let mut f = std::fs::OpenOptions::new().append(true).open(&h.path).unwrap();
        f.write_all(b"{\"time\": 2, \"ev").unwrap();
        assert_eq!(h.tail(5).unwrap().len(), 1);
        h.append(&Entry::new(3, HistoryEvent::Commit)).unwrap();
        let times: Vec<u64> = h.tail(5).unwrap().iter().map(|e| e.time).collect();
        assert_eq!(times, [1, 3]);
    }

    /// The names in the file are the documented ones (docs/slots.md, docs/daemon.md), and an
    /// event of another version reads back and is written again unchanged.
    #[test]
    fn events_are_written_as_their_documented_names() {
        let documented = [
            "init",
            "install-started",
            "install",
            "trial",
            "commit",
            "rollback",
            "commit-interrupted",
            "wrong-slot",
            "unexpected-tryboot",
            "repair",
            "mark-good",
            "mark-bad",
            "connectivity",
            "decision",
            "refused",
            "install-failed",
        ];
        for (event, name) in HistoryEvent::KNOWN.iter().zip(documented) {
            let line = serde_json::to_string(&Entry::new(7, event.clone())).unwrap();
            assert_eq!(line, format!("{{\"time\":7,\"event\":\"{name}\"}}"));
            assert_eq!((event.as_str(), event.to_string()), (name, name.to_string()));
            let back: Entry = serde_json::from_str(&line).unwrap();
            assert_eq!(&back.event, event);
        }
        let line = r#"{"time":7,"event":"factory-reset"}"#;
        let back: Entry = serde_json::from_str(line).unwrap();
        assert_eq!(back.event, HistoryEvent::Other("factory-reset".into()));
        assert_eq!(serde_json::to_string(&back).unwrap(), line);
    }
}
