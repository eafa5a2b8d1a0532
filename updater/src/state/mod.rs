//! `/data/metrica/state.json`: what the updater knows about its slots, and the one pure
//! function that decides every change of it.
//!
//! [`transition`] takes a state and an [`Event`] (install started, installed, trial started,
//! booted, health passed or failed, deadline, committed, mark-good, mark-bad) and returns the
//! next state or a [`Refusal`] naming why the event is not allowed now. It does no I/O; the
//! slot flows (`slot/`) write the result with [`save`] (temp file, fsync, rename, fsync of the
//! folder) and log what happened in the history.
//!
//! Submodules: `policy` (the preconditions of every event: the one place each rule is
//! written), `transition` (the effects), `boot` (what a boot means), `store` (the file).
//!
//! Format rules: `format` is bumped only for changes an older updater would misread. Adding a
//! field with a default is not such a change: unknown fields are ignored. A file whose
//! `format` is newer than [`STATE_FORMAT`] is refused and never overwritten; a file that does
//! not parse is reported as corrupt, and the caller keeps it aside (see `slot/recovery.rs`).

mod boot;
pub mod policy;
mod store;
mod transition;

pub use boot::{classify_boot, BootCase};
pub use policy::Action;
pub use store::{keep_corrupt, load, parse, save, write_atomic, LoadError, SAVE_FAILPOINTS};
pub use transition::transition;

use crate::bootinfo::BootInfo;
use crate::layout::Slot;
use semver::Version;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// The state format this updater reads and writes.
pub const STATE_FORMAT: u32 = 1;

/// Path of the state file under the data directory.
pub fn state_path(data_dir: &Path) -> PathBuf {
    data_dir.join("metrica").join("state.json")
}

/// What a slot holds, as far as the updater knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum SlotState {
    /// Nothing the updater knows of.
    Empty,
    /// An install into the slot started and has not finished.
    Installing,
    /// Written and verified, not yet booted successfully.
    Installed,
    /// Booted and passed its checks (or marked good by an operator).
    Good,
    /// Failed its trial or marked bad; `reason` says why.
    Bad { reason: String },
}

impl SlotState {
    pub fn name(&self) -> &'static str {
        match self {
            SlotState::Empty => "empty",
            SlotState::Installing => "installing",
            SlotState::Installed => "installed",
            SlotState::Good => "good",
            SlotState::Bad { .. } => "bad",
        }
    }
}

/// One slot's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotInfo {
    #[serde(flatten)]
    pub state: SlotState,
    /// Version of the OS in the slot, when known.
    #[serde(default)]
    pub version: Option<Version>,
    /// `security_epoch` of the bundle installed there, when known.
    #[serde(default)]
    pub security_epoch: Option<u64>,
}

impl SlotInfo {
    pub fn empty() -> SlotInfo {
        SlotInfo { state: SlotState::Empty, version: None, security_epoch: None }
    }
}

/// Both slots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slots {
    pub a: SlotInfo,
    pub b: SlotInfo,
}

impl Slots {
    pub fn get(&self, slot: Slot) -> &SlotInfo {
        match slot {
            Slot::A => &self.a,
            Slot::B => &self.b,
        }
    }
    pub fn get_mut(&mut self, slot: Slot) -> &mut SlotInfo {
        match slot {
            Slot::A => &mut self.a,
            Slot::B => &mut self.b,
        }
    }
}

/// How far a trial has gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrialPhase {
    /// The tryboot reboot was requested; the trial slot has not started the updater yet.
    Requested,
    /// The updater runs on the trial slot, in the trial boot; health checks run.
    Booted,
    /// Checks passed; `autoboot.txt` is being rewritten. A boot in this phase tells from
    /// where it booted whether that write landed.
    Committing,
}

/// A pending trial: the slot will be booted once with the tryboot flag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trial {
    pub slot: Slot,
    #[serde(default)]
    pub version: Option<Version>,
    /// Unix time when the trial was requested.
    pub started: u64,
    pub phase: TrialPhase,
}

/// Counters, for metrics and status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Counters {
    pub installs: u64,
    pub commits: u64,
    /// Trials that ended on the committed slot (`metrica_rollback_total`).
    pub rollbacks: u64,
    pub health_failures: u64,
    /// Repairs of `autoboot.txt`.
    pub repairs: u64,
    /// Consecutive plain boots of a slot that is not the committed one.
    pub wrong_slot_boots: u64,
}

/// Set when the state was rebuilt from the disk because the file was corrupt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recovery {
    /// Unix time of the rebuild.
    pub at: u64,
    /// Where the corrupt file was kept.
    pub backup: PathBuf,
    pub reason: String,
}

/// The updater's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub format: u32,
    /// The slot `autoboot.txt` boots by default.
    pub committed: Slot,
    pub slots: Slots,
    /// Highest `security_epoch` committed; bundles below it are refused.
    #[serde(default)]
    pub security_epoch: u64,
    #[serde(default)]
    pub trial: Option<Trial>,
    #[serde(default)]
    pub counters: Counters,
    /// Versions that failed a trial or were marked bad: never tried again automatically.
    #[serde(default)]
    pub bad_versions: BTreeSet<Version>,
    /// Highest `sequence` seen per channel name (replay protection, `channel::verify`).
    /// Kept per channel so that a device moved to another channel accepts that channel's own
    /// numbering; recorded only after a document passed every check.
    #[serde(default)]
    pub channel_sequences: std::collections::BTreeMap<String, u64>,
    #[serde(default)]
    pub last_error: Option<String>,
    #[serde(default)]
    pub recovered: Option<Recovery>,
}

impl State {
    /// The state of a system whose committed slot is `committed` and good, holding `version`.
    pub fn new(committed: Slot, version: Option<Version>) -> State {
        let mut slots = Slots { a: SlotInfo::empty(), b: SlotInfo::empty() };
        *slots.get_mut(committed) =
            SlotInfo { state: SlotState::Good, version, security_epoch: None };
        State {
            format: STATE_FORMAT,
            committed,
            slots,
            security_epoch: 0,
            trial: None,
            counters: Counters::default(),
            bad_versions: BTreeSet::new(),
            channel_sequences: std::collections::BTreeMap::new(),
            last_error: None,
            recovered: None,
        }
    }

    /// The highest sequence of channel `name` seen so far.
    pub fn channel_sequence(&self, name: &str) -> Option<u64> {
        self.channel_sequences.get(name).copied()
    }

    /// Records the sequence of a verified document of channel `name` (never lowers it).
    pub fn record_channel_sequence(&mut self, name: &str, sequence: u64) {
        let seen = self.channel_sequences.entry(name.to_string()).or_insert(sequence);
        *seen = (*seen).max(sequence);
    }

    pub fn slot(&self, slot: Slot) -> &SlotInfo {
        self.slots.get(slot)
    }

    /// Checks the invariants a parsed file must hold.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(t) = &self.trial {
            if t.slot == self.committed {
                return Err(format!("trial slot {} is the committed slot", t.slot));
            }
        }
        if matches!(self.slot(self.committed).state, SlotState::Bad { .. }) {
            return Err(format!("committed slot {} is marked bad", self.committed));
        }
        Ok(())
    }
}

/// Something that happened, or that someone asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An install into `slot` starts. `allow_bad`: an operator asked for a version that
    /// failed before.
    /// `booted`: where the system booted, when known (installs run from the committed slot).
    InstallStarted {
        slot: Slot,
        version: Version,
        security_epoch: u64,
        allow_bad: bool,
        booted: Option<BootInfo>,
    },
    /// The install into `slot` finished and verified.
    Installed { slot: Slot, version: Version },
    /// A tryboot reboot into `slot` is about to be requested, at unix time `at`.
    /// `booted`: where the system booted, when known (trials start from the committed slot).
    TrialStarted { slot: Slot, at: u64, booted: Option<BootInfo> },
    /// The system started from `slot`, with or without the tryboot flag.
    Booted { slot: Slot, tryboot: bool },
    /// The trial boot's health checks passed: commit may start.
    HealthPassed,
    /// A health check of the trial boot failed; `check` names it.
    HealthFailed { check: String },
    /// The health deadline of the trial passed; `failing` names what still failed.
    Deadline { failing: String },
    /// `autoboot.txt` now makes `slot` the default.
    Committed { slot: Slot },
    /// `autoboot.txt` was rewritten to agree with the state.
    AutobootRepaired,
    /// An operator says `slot` is good.
    MarkGood { slot: Slot },
    /// An operator (or a check) says `slot` is bad.
    MarkBad { slot: Slot, reason: String },
}

/// Why an event is not allowed in the current state.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("slot {0} is the committed slot")]
    Committed(Slot),
    #[error("a trial of slot {0} is pending")]
    TrialPending(Slot),
    #[error("no trial is pending")]
    NoTrial,
    #[error("the trial of slot {0} has not booted yet")]
    TrialNotBooted(Slot),
    #[error("version {0} failed before and is not retried automatically")]
    BadVersion(Version),
    #[error("slot {0} holds no installed system")]
    NothingInstalled(Slot),
    #[error("slot {slot} is {state}, not being installed with version {version}")]
    NotInstalling { slot: Slot, state: &'static str, version: Version },
    #[error("slot {0} is marked bad: mark it good first")]
    SlotBad(Slot),
    #[error("booted slot {0} with the tryboot flag but no trial is pending")]
    UnexpectedTryboot(Slot),
    #[error("booted {booted}, not committed slot {committed}: {action}")]
    NotFromCommitted { booted: BootInfo, committed: Slot, action: Action },
}

impl fmt::Display for SlotInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.state.name())?;
        if let Some(v) = &self.version {
            write!(f, " {v}")?;
        }
        if let SlotState::Bad { reason } = &self.state {
            write!(f, " ({reason})")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
