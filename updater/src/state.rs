//! `/data/metrica/state.json`: what the updater knows about its slots, and the one pure
//! function that decides every change of it.
//!
//! [`transition`] takes a state and an [`Event`] (install started, installed, trial started,
//! booted, health passed or failed, deadline, committed, mark-good, mark-bad) and returns the
//! next state or a [`Refusal`] naming why the event is not allowed now. It does no I/O; the
//! callers in `slot.rs` write the result with [`save`] (temp file, fsync, rename, fsync of the
//! folder) and log what happened in the history.
//!
//! Format rules: `format` is bumped only for changes an older updater would misread. Adding a
//! field with a default is not such a change: unknown fields are ignored. A file whose
//! `format` is newer than [`STATE_FORMAT`] is refused and never overwritten; a file that does
//! not parse is reported as corrupt, and the caller keeps it aside (see `slot.rs`).

use crate::failpoint;
use crate::layout::Slot;
use semver::Version;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt;
use std::io::Write;
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
    InstallStarted { slot: Slot, version: Version, security_epoch: u64, allow_bad: bool },
    /// The install into `slot` finished and verified.
    Installed { slot: Slot, version: Version },
    /// A tryboot reboot into `slot` is about to be requested, at unix time `at`.
    TrialStarted { slot: Slot, at: u64 },
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
}

/// What a boot means, given the state before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootCase {
    /// The committed slot, no trial pending.
    Normal,
    /// The pending trial's slot with the tryboot flag: run the health checks.
    TrialBoot { slot: Slot },
    /// The committed slot while a trial was pending: the trial failed.
    TrialFailed { slot: Slot, reason: String },
    /// The committed slot while a commit was under way: the `autoboot.txt` write did not land.
    CommitInterrupted { slot: Slot },
    /// The trial's slot, plainly, while a commit was under way: the write landed.
    CommitLanded { slot: Slot },
    /// A plain boot of a slot that is not committed (the firmware's partition walk after a
    /// torn or missing `autoboot.txt`, or an edited one).
    NotCommitted { slot: Slot, committed: Slot },
    /// The tryboot flag with no pending trial.
    UnexpectedTryboot { slot: Slot },
}

/// Classifies a boot of `slot` (with or without `tryboot`) against `state`.
pub fn classify_boot(state: &State, slot: Slot, tryboot: bool) -> BootCase {
    let c = state.committed;
    match &state.trial {
        Some(t) if slot == t.slot && tryboot => BootCase::TrialBoot { slot },
        Some(t) if slot == t.slot && t.phase == TrialPhase::Committing => {
            BootCase::CommitLanded { slot }
        }
        Some(t) if slot == c => {
            if t.phase == TrialPhase::Committing {
                BootCase::CommitInterrupted { slot: t.slot }
            } else {
                BootCase::TrialFailed { slot: t.slot, reason: trial_failure_reason(t, c) }
            }
        }
        Some(_) => BootCase::NotCommitted { slot, committed: c },
        None if slot == c => BootCase::Normal,
        None if tryboot => BootCase::UnexpectedTryboot { slot },
        None => BootCase::NotCommitted { slot, committed: c },
    }
}

fn trial_failure_reason(t: &Trial, committed: Slot) -> String {
    let what = describe(t.slot, t.version.as_ref());
    match t.phase {
        TrialPhase::Requested => format!(
            "trial boot of {what} never reached the updater (kernel panic, hang, watchdog \
             reset or power cut); the firmware booted committed slot {committed}"
        ),
        _ => format!(
            "trial boot of {what} ended before it was committed (reset, hang or power cut \
             during the checks); the firmware booted committed slot {committed}"
        ),
    }
}

fn describe(slot: Slot, version: Option<&Version>) -> String {
    match version {
        Some(v) => format!("slot {slot} ({v})"),
        None => format!("slot {slot}"),
    }
}

/// The next state after `event`, or why `event` is refused. Pure: no I/O, no clock.
pub fn transition(state: &State, event: &Event) -> Result<State, Refusal> {
    let mut s = state.clone();
    match event {
        Event::InstallStarted { slot, version, security_epoch, allow_bad } => {
            let slot = *slot;
            if slot == s.committed {
                return Err(Refusal::Committed(slot));
            }
            if let Some(t) = &s.trial {
                return Err(Refusal::TrialPending(t.slot));
            }
            if s.bad_versions.contains(version) && !allow_bad {
                return Err(Refusal::BadVersion(version.clone()));
            }
            *s.slots.get_mut(slot) = SlotInfo {
                state: SlotState::Installing,
                version: Some(version.clone()),
                security_epoch: Some(*security_epoch),
            };
        }
        Event::Installed { slot, version } => {
            let info = s.slots.get_mut(*slot);
            if info.state != SlotState::Installing || info.version.as_ref() != Some(version) {
                return Err(Refusal::NotInstalling {
                    slot: *slot,
                    state: info.state.name(),
                    version: version.clone(),
                });
            }
            info.state = SlotState::Installed;
            s.counters.installs += 1;
        }
        Event::TrialStarted { slot, at } => {
            let slot = *slot;
            if slot == s.committed {
                return Err(Refusal::Committed(slot));
            }
            match &s.trial {
                Some(t) if t.slot == slot && t.phase == TrialPhase::Requested => {}
                Some(t) => return Err(Refusal::TrialPending(t.slot)),
                None => {}
            }
            let info = s.slots.get(slot);
            match info.state {
                SlotState::Installed | SlotState::Good => {}
                SlotState::Bad { .. } => return Err(Refusal::SlotBad(slot)),
                SlotState::Empty | SlotState::Installing => {
                    return Err(Refusal::NothingInstalled(slot))
                }
            }
            s.trial = Some(Trial {
                slot,
                version: info.version.clone(),
                started: *at,
                phase: TrialPhase::Requested,
            });
        }
        Event::Booted { slot, tryboot } => match classify_boot(state, *slot, *tryboot) {
            BootCase::Normal => s.counters.wrong_slot_boots = 0,
            BootCase::TrialBoot { .. } => {
                if let Some(t) = s.trial.as_mut() {
                    if t.phase == TrialPhase::Requested {
                        t.phase = TrialPhase::Booted;
                    }
                }
            }
            BootCase::TrialFailed { slot, reason } => {
                s.counters.rollbacks += 1;
                s.counters.wrong_slot_boots = 0;
                mark_bad(&mut s, slot, reason);
            }
            BootCase::CommitInterrupted { slot } => {
                s.trial = None;
                s.counters.wrong_slot_boots = 0;
                s.last_error = Some(format!(
                    "the commit of slot {slot} was interrupted before autoboot.txt changed; \
                     slot {slot} stays installed and can be tried again"
                ));
            }
            BootCase::CommitLanded { slot } => commit(&mut s, slot),
            BootCase::NotCommitted { slot, committed } => {
                s.counters.wrong_slot_boots += 1;
                s.last_error = Some(format!(
                    "booted slot {slot} without the tryboot flag while slot {committed} is \
                     committed"
                ));
            }
            BootCase::UnexpectedTryboot { slot } => return Err(Refusal::UnexpectedTryboot(slot)),
        },
        Event::HealthPassed => {
            let t = s.trial.as_mut().ok_or(Refusal::NoTrial)?;
            match t.phase {
                TrialPhase::Requested => return Err(Refusal::TrialNotBooted(t.slot)),
                TrialPhase::Booted | TrialPhase::Committing => t.phase = TrialPhase::Committing,
            }
        }
        Event::HealthFailed { check } => {
            let t = booted_trial(&s)?;
            s.counters.rollbacks += 1;
            s.counters.health_failures += 1;
            mark_bad(&mut s, t.slot, format!("health check failed: {check}"));
        }
        Event::Deadline { failing } => {
            let t = booted_trial(&s)?;
            s.counters.rollbacks += 1;
            s.counters.health_failures += 1;
            mark_bad(&mut s, t.slot, format!("health deadline passed; failing: {failing}"));
        }
        Event::Committed { slot } => match &s.trial {
            Some(t) if t.slot == *slot && t.phase == TrialPhase::Committing => {
                commit(&mut s, *slot);
            }
            Some(t) if t.slot == *slot => return Err(Refusal::TrialNotBooted(t.slot)),
            Some(t) => return Err(Refusal::TrialPending(t.slot)),
            None => return Err(Refusal::NoTrial),
        },
        Event::AutobootRepaired => s.counters.repairs += 1,
        Event::MarkGood { slot } => {
            let slot = *slot;
            if let Some(t) = s.trial.as_mut().filter(|t| t.slot == slot) {
                match t.phase {
                    TrialPhase::Requested => return Err(Refusal::TrialNotBooted(slot)),
                    TrialPhase::Booted | TrialPhase::Committing => {
                        t.phase = TrialPhase::Committing;
                    }
                }
            } else if slot == s.committed {
                s.slots.get_mut(slot).state = SlotState::Good;
            } else {
                let info = s.slots.get_mut(slot);
                match info.state {
                    SlotState::Empty | SlotState::Installing => {
                        return Err(Refusal::NothingInstalled(slot))
                    }
                    SlotState::Bad { .. } => {
                        info.state = SlotState::Installed;
                        if let Some(v) = info.version.clone() {
                            s.bad_versions.remove(&v);
                        }
                    }
                    SlotState::Installed | SlotState::Good => {}
                }
            }
        }
        Event::MarkBad { slot, reason } => {
            let slot = *slot;
            if slot == s.committed {
                return Err(Refusal::Committed(slot));
            }
            if matches!(s.slot(slot).state, SlotState::Empty) {
                return Err(Refusal::NothingInstalled(slot));
            }
            mark_bad(&mut s, slot, reason.clone());
        }
    }
    Ok(s)
}

fn booted_trial(s: &State) -> Result<Trial, Refusal> {
    let t = s.trial.clone().ok_or(Refusal::NoTrial)?;
    if t.phase == TrialPhase::Requested {
        return Err(Refusal::TrialNotBooted(t.slot));
    }
    Ok(t)
}

fn mark_bad(s: &mut State, slot: Slot, reason: String) {
    if s.trial.as_ref().is_some_and(|t| t.slot == slot) {
        s.trial = None;
    }
    let info = s.slots.get_mut(slot);
    info.state = SlotState::Bad { reason: reason.clone() };
    if let Some(v) = info.version.clone() {
        s.bad_versions.insert(v);
    }
    s.last_error = Some(reason);
}

fn commit(s: &mut State, slot: Slot) {
    s.trial = None;
    s.committed = slot;
    let info = s.slots.get_mut(slot);
    info.state = SlotState::Good;
    let (version, epoch) = (info.version.clone(), info.security_epoch);
    if let Some(v) = version {
        s.bad_versions.remove(&v);
    }
    s.security_epoch = s.security_epoch.max(epoch.unwrap_or(0));
    s.counters.commits += 1;
    s.counters.wrong_slot_boots = 0;
    s.last_error = None;
}

/// Why a state file could not be used.
#[derive(Debug, Error)]
pub enum LoadError {
    #[error(
        "{path}: state format {found} is newer than this updater's {supported}; refusing to \
         read or overwrite it (a newer updater wrote it)"
    )]
    Newer { path: PathBuf, found: u64, supported: u32 },
    #[error("{path}: corrupt state file: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error("reading {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// Parses a state file's bytes.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<State, LoadError> {
    let corrupt = |what: String| LoadError::Corrupt { path: path.to_path_buf(), what };
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    let format = value
        .get("format")
        .and_then(|f| f.as_u64())
        .ok_or_else(|| corrupt("no numeric \"format\"".into()))?;
    if format > u64::from(STATE_FORMAT) {
        return Err(LoadError::Newer {
            path: path.to_path_buf(),
            found: format,
            supported: STATE_FORMAT,
        });
    }
    if format < 1 {
        return Err(corrupt(format!("unknown format {format}")));
    }
    let state: State = serde_json::from_value(value).map_err(|e| corrupt(e.to_string()))?;
    state.validate().map_err(corrupt)?;
    Ok(state)
}

/// Reads the state file; `Ok(None)` when there is none yet.
pub fn load(path: &Path) -> Result<Option<State>, LoadError> {
    match std::fs::read(path) {
        Ok(bytes) => parse(path, &bytes).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(LoadError::Io { path: path.to_path_buf(), source: e }),
    }
}

/// Failpoints of a state write, in order.
pub const SAVE_FAILPOINTS: [&str; 4] =
    ["state.write-temp", "state.before-rename", "state.after-rename", "state.after-dir-fsync"];

/// Writes the state atomically: temp file, fsync, rename over `path`, fsync of the folder.
/// Refuses to replace a file of a newer format.
pub fn save(path: &Path, state: &State) -> anyhow::Result<()> {
    use anyhow::Context;
    if let Ok(bytes) = std::fs::read(path) {
        if let Err(e @ LoadError::Newer { .. }) = parse(path, &bytes) {
            return Err(e.into());
        }
    }
    let mut bytes = serde_json::to_vec_pretty(state).context("serializing the state")?;
    bytes.push(b'\n');
    write_atomic(path, &bytes, "state")
}

/// Atomic replace of `path` with `bytes`: temp file, fsync, rename, fsync of the folder.
/// Failpoints are named `<prefix>.write-temp` (a torn write), `.before-rename`,
/// `.after-rename` and `.after-dir-fsync`.
pub fn write_atomic(path: &Path, bytes: &[u8], prefix: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    let dir = path.parent().context("state path has no folder")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path.file_name().context("path has no file name")?.to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    if let Some(k) = failpoint::torn(&format!("{prefix}.write-temp"), bytes.len()) {
        f.write_all(&bytes[..k])?;
        f.sync_all()?;
        return Err(failpoint::PowerCut(format!("{prefix}.write-temp")).into());
    }
    f.write_all(bytes).with_context(|| format!("writing {}", tmp.display()))?;
    f.sync_all().with_context(|| format!("syncing {}", tmp.display()))?;
    drop(f);
    failpoint::hit(&format!("{prefix}.before-rename"))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    failpoint::hit(&format!("{prefix}.after-rename"))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))?;
    failpoint::hit(&format!("{prefix}.after-dir-fsync"))?;
    Ok(())
}

/// Moves a corrupt state file aside as `state.json.corrupt-<n>` (the first free `n`) and
/// returns the new path. The file is kept for a person to look at; it is never deleted.
pub fn keep_corrupt(path: &Path) -> std::io::Result<PathBuf> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    for n in 1.. {
        let backup = path.with_file_name(format!("{name}.corrupt-{n}"));
        if !backup.exists() {
            std::fs::rename(path, &backup)?;
            if let Some(dir) = path.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            return Ok(backup);
        }
    }
    unreachable!("some backup name is free")
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
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        s.parse().unwrap()
    }

    /// A committed on 1.0.0, nothing in B.
    fn fresh() -> State {
        State::new(Slot::A, Some(v("1.0.0")))
    }

    #[allow(clippy::needless_pass_by_value)]
    fn step(s: &State, e: Event) -> State {
        transition(s, &e).unwrap_or_else(|r| panic!("{e:?} refused: {r}"))
    }

    fn installed_b() -> State {
        let s = step(
            &fresh(),
            Event::InstallStarted {
                slot: Slot::B,
                version: v("1.1.0"),
                security_epoch: 3,
                allow_bad: false,
            },
        );
        step(&s, Event::Installed { slot: Slot::B, version: v("1.1.0") })
    }

    fn trial_booted_b() -> State {
        let s = step(&installed_b(), Event::TrialStarted { slot: Slot::B, at: 100 });
        step(&s, Event::Booted { slot: Slot::B, tryboot: true })
    }

    #[test]
    fn channel_sequences_are_kept_per_channel_and_never_lowered() {
        let mut s = fresh();
        assert_eq!(s.channel_sequence("stable"), None);
        s.record_channel_sequence("stable", 7);
        s.record_channel_sequence("stable", 5);
        s.record_channel_sequence("beta", 2);
        assert_eq!((s.channel_sequence("stable"), s.channel_sequence("beta")), (Some(7), Some(2)));
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<State>(&json).unwrap(), s);
        // A file written before the field existed (with the old single field) still reads.
        let mut old: serde_json::Value = serde_json::to_value(fresh()).unwrap();
        let obj = old.as_object_mut().unwrap();
        obj.remove("channel_sequences");
        obj.insert("channel_sequence".into(), serde_json::Value::Null);
        let back: State = serde_json::from_value(old).unwrap();
        assert!(back.channel_sequences.is_empty());
    }

    #[test]
    fn the_happy_path_installs_tries_and_commits() {
        let s = installed_b();
        assert_eq!(s.slot(Slot::B).state, SlotState::Installed);
        assert_eq!(s.counters.installs, 1);
        let s = step(&s, Event::TrialStarted { slot: Slot::B, at: 100 });
        let t = s.trial.clone().unwrap();
        assert_eq!((t.slot, t.phase, t.started), (Slot::B, TrialPhase::Requested, 100));
        assert_eq!(t.version, Some(v("1.1.0")));
        let s = step(&s, Event::Booted { slot: Slot::B, tryboot: true });
        assert_eq!(s.trial.as_ref().unwrap().phase, TrialPhase::Booted);
        let s = step(&s, Event::HealthPassed);
        assert_eq!(s.trial.as_ref().unwrap().phase, TrialPhase::Committing);
        let s = step(&s, Event::Committed { slot: Slot::B });
        assert_eq!(s.committed, Slot::B);
        assert_eq!(s.trial, None);
        assert_eq!(s.slot(Slot::B).state, SlotState::Good);
        assert_eq!(s.slot(Slot::A).state, SlotState::Good);
        assert_eq!(s.security_epoch, 3);
        assert_eq!(s.counters.commits, 1);
        // The next plain boot of B is normal.
        assert_eq!(classify_boot(&s, Slot::B, false), BootCase::Normal);
        s.validate().unwrap();
    }

    #[test]
    fn a_trial_that_never_reached_the_updater_marks_the_slot_bad() {
        let s = step(&installed_b(), Event::TrialStarted { slot: Slot::B, at: 1 });
        let case = classify_boot(&s, Slot::A, false);
        assert!(matches!(&case, BootCase::TrialFailed { slot: Slot::B, reason }
            if reason.contains("never reached the updater")));
        let s = step(&s, Event::Booted { slot: Slot::A, tryboot: false });
        assert!(matches!(s.slot(Slot::B).state, SlotState::Bad { .. }));
        assert!(s.bad_versions.contains(&v("1.1.0")));
        assert_eq!(s.counters.rollbacks, 1);
        assert_eq!(s.trial, None);
        assert!(s.last_error.as_deref().unwrap().contains("slot b (1.1.0)"));
        // Never retried automatically.
        let again = Event::InstallStarted {
            slot: Slot::B,
            version: v("1.1.0"),
            security_epoch: 3,
            allow_bad: false,
        };
        assert_eq!(transition(&s, &again), Err(Refusal::BadVersion(v("1.1.0"))));
        assert_eq!(
            transition(&s, &Event::TrialStarted { slot: Slot::B, at: 2 }),
            Err(Refusal::SlotBad(Slot::B))
        );
        // An operator may ask for it.
        let forced = Event::InstallStarted {
            slot: Slot::B,
            version: v("1.1.0"),
            security_epoch: 3,
            allow_bad: true,
        };
        assert_eq!(transition(&s, &forced).unwrap().slot(Slot::B).state, SlotState::Installing);
    }

    #[test]
    fn a_trial_that_booted_and_then_reset_marks_the_slot_bad() {
        let s = trial_booted_b();
        let s = step(&s, Event::Booted { slot: Slot::A, tryboot: false });
        match &s.slot(Slot::B).state {
            SlotState::Bad { reason } => assert!(reason.contains("ended before it was committed")),
            other => panic!("{other:?}"),
        }
        assert_eq!(s.counters.rollbacks, 1);
    }

    #[test]
    fn failed_checks_and_deadlines_mark_bad_at_once() {
        let s = step(&trial_booted_b(), Event::HealthFailed { check: "data-writable".into() });
        assert_eq!(
            s.slot(Slot::B).state,
            SlotState::Bad { reason: "health check failed: data-writable".into() }
        );
        assert_eq!((s.counters.rollbacks, s.counters.health_failures), (1, 1));
        assert_eq!(s.trial, None);
        // The plain reboot that follows lands on A: a normal boot.
        assert_eq!(classify_boot(&s, Slot::A, false), BootCase::Normal);

        let s = step(&trial_booted_b(), Event::Deadline { failing: "clock".into() });
        assert!(
            matches!(&s.slot(Slot::B).state, SlotState::Bad { reason } if reason.contains("deadline"))
        );
    }

    #[test]
    fn health_events_need_a_booted_trial() {
        let requested = step(&installed_b(), Event::TrialStarted { slot: Slot::B, at: 1 });
        for e in [
            Event::HealthPassed,
            Event::HealthFailed { check: "x".into() },
            Event::Deadline { failing: "x".into() },
            Event::Committed { slot: Slot::B },
        ] {
            assert_eq!(transition(&fresh(), &e), Err(Refusal::NoTrial), "{e:?}");
            assert_eq!(transition(&requested, &e), Err(Refusal::TrialNotBooted(Slot::B)), "{e:?}");
        }
        assert_eq!(
            transition(&trial_booted_b(), &Event::Committed { slot: Slot::A }),
            Err(Refusal::TrialPending(Slot::B))
        );
    }

    #[test]
    fn a_commit_whose_autoboot_write_landed_is_finished_at_the_next_boot() {
        let s = step(&trial_booted_b(), Event::HealthPassed);
        assert_eq!(classify_boot(&s, Slot::B, false), BootCase::CommitLanded { slot: Slot::B });
        let s = step(&s, Event::Booted { slot: Slot::B, tryboot: false });
        assert_eq!((s.committed, s.trial.clone()), (Slot::B, None));
        assert_eq!(s.slot(Slot::B).state, SlotState::Good);
    }

    #[test]
    fn a_commit_whose_autoboot_write_did_not_land_keeps_the_slot_installed() {
        let s = step(&trial_booted_b(), Event::HealthPassed);
        assert_eq!(
            classify_boot(&s, Slot::A, false),
            BootCase::CommitInterrupted { slot: Slot::B }
        );
        let s = step(&s, Event::Booted { slot: Slot::A, tryboot: false });
        assert_eq!((s.committed, s.trial.clone()), (Slot::A, None));
        assert_eq!(s.slot(Slot::B).state, SlotState::Installed);
        assert!(s.bad_versions.is_empty());
        assert_eq!(s.counters.rollbacks, 0);
        // It can be tried again.
        step(&s, Event::TrialStarted { slot: Slot::B, at: 5 });
    }

    #[test]
    fn plain_boots_of_the_wrong_slot_are_counted_not_adopted() {
        let committed_b =
            step(&step(&trial_booted_b(), Event::HealthPassed), Event::Committed { slot: Slot::B });
        // A torn autoboot.txt: the partition walk boots A.
        assert_eq!(
            classify_boot(&committed_b, Slot::A, false),
            BootCase::NotCommitted { slot: Slot::A, committed: Slot::B }
        );
        let s = step(&committed_b, Event::Booted { slot: Slot::A, tryboot: false });
        let s = step(&s, Event::Booted { slot: Slot::A, tryboot: false });
        assert_eq!((s.committed, s.counters.wrong_slot_boots), (Slot::B, 2));
        let s = step(&s, Event::Booted { slot: Slot::B, tryboot: false });
        assert_eq!(s.counters.wrong_slot_boots, 0);
        // A trial slot booted plainly before any commit: not adopted either.
        let requested = step(&installed_b(), Event::TrialStarted { slot: Slot::B, at: 1 });
        assert_eq!(
            classify_boot(&requested, Slot::B, false),
            BootCase::NotCommitted { slot: Slot::B, committed: Slot::A }
        );
    }

    #[test]
    fn tryboot_without_a_trial_is_refused() {
        assert_eq!(
            transition(&installed_b(), &Event::Booted { slot: Slot::B, tryboot: true }),
            Err(Refusal::UnexpectedTryboot(Slot::B))
        );
        // The committed slot with the flag (both autoboot sections equal) is harmless.
        assert_eq!(classify_boot(&fresh(), Slot::A, true), BootCase::Normal);
    }

    #[test]
    fn a_tryboot_that_lands_on_the_committed_slot_fails_the_trial() {
        let s = step(&installed_b(), Event::TrialStarted { slot: Slot::B, at: 1 });
        assert!(matches!(
            classify_boot(&s, Slot::A, true),
            BootCase::TrialFailed { slot: Slot::B, .. }
        ));
    }

    #[test]
    fn booted_is_idempotent_within_a_trial() {
        let s = trial_booted_b();
        assert_eq!(step(&s, Event::Booted { slot: Slot::B, tryboot: true }), s);
        let committing = step(&s, Event::HealthPassed);
        assert_eq!(step(&committing, Event::Booted { slot: Slot::B, tryboot: true }), committing);
        assert_eq!(step(&committing, Event::HealthPassed), committing);
    }

    #[test]
    fn installs_are_refused_into_the_committed_slot_or_during_a_trial() {
        let e = |slot| Event::InstallStarted {
            slot,
            version: v("2.0.0"),
            security_epoch: 0,
            allow_bad: false,
        };
        assert_eq!(transition(&fresh(), &e(Slot::A)), Err(Refusal::Committed(Slot::A)));
        assert_eq!(transition(&trial_booted_b(), &e(Slot::B)), Err(Refusal::TrialPending(Slot::B)));
        // Installed must match the install that started.
        assert!(matches!(
            transition(&fresh(), &Event::Installed { slot: Slot::B, version: v("2.0.0") }),
            Err(Refusal::NotInstalling { slot: Slot::B, state: "empty", .. })
        ));
        let started = step(&fresh(), e(Slot::B));
        assert!(
            transition(&started, &Event::Installed { slot: Slot::B, version: v("2.0.1") }).is_err()
        );
    }

    #[test]
    fn trials_need_an_installed_non_committed_slot() {
        let at = 9;
        assert_eq!(
            transition(&fresh(), &Event::TrialStarted { slot: Slot::A, at }),
            Err(Refusal::Committed(Slot::A))
        );
        assert_eq!(
            transition(&fresh(), &Event::TrialStarted { slot: Slot::B, at }),
            Err(Refusal::NothingInstalled(Slot::B))
        );
        let requested = step(&installed_b(), Event::TrialStarted { slot: Slot::B, at: 1 });
        // Asking again before the reboot happened is fine; after it booted, not.
        assert_eq!(
            step(&requested, Event::TrialStarted { slot: Slot::B, at }).trial.unwrap().started,
            at
        );
        assert_eq!(
            transition(&trial_booted_b(), &Event::TrialStarted { slot: Slot::B, at }),
            Err(Refusal::TrialPending(Slot::B))
        );
    }

    #[test]
    fn mark_good_commits_a_booted_trial_or_clears_a_bad_mark() {
        let s = step(&trial_booted_b(), Event::MarkGood { slot: Slot::B });
        assert_eq!(s.trial.unwrap().phase, TrialPhase::Committing);
        let requested = step(&installed_b(), Event::TrialStarted { slot: Slot::B, at: 1 });
        assert_eq!(
            transition(&requested, &Event::MarkGood { slot: Slot::B }),
            Err(Refusal::TrialNotBooted(Slot::B))
        );
        let bad = step(&installed_b(), Event::MarkBad { slot: Slot::B, reason: "broken".into() });
        let cleared = step(&bad, Event::MarkGood { slot: Slot::B });
        assert_eq!(cleared.slot(Slot::B).state, SlotState::Installed);
        assert!(cleared.bad_versions.is_empty());
        assert_eq!(
            transition(&fresh(), &Event::MarkGood { slot: Slot::B }),
            Err(Refusal::NothingInstalled(Slot::B))
        );
        assert_eq!(step(&fresh(), Event::MarkGood { slot: Slot::A }), fresh());
        assert_eq!(step(&installed_b(), Event::MarkGood { slot: Slot::B }), installed_b());
    }

    #[test]
    fn mark_bad_refuses_the_committed_or_empty_slot_and_ends_a_trial() {
        assert_eq!(
            transition(&fresh(), &Event::MarkBad { slot: Slot::A, reason: "x".into() }),
            Err(Refusal::Committed(Slot::A))
        );
        assert_eq!(
            transition(&fresh(), &Event::MarkBad { slot: Slot::B, reason: "x".into() }),
            Err(Refusal::NothingInstalled(Slot::B))
        );
        let s =
            step(&trial_booted_b(), Event::MarkBad { slot: Slot::B, reason: "operator".into() });
        assert_eq!(s.trial, None);
        assert_eq!(s.slot(Slot::B).state, SlotState::Bad { reason: "operator".into() });
        assert!(s.bad_versions.contains(&v("1.1.0")));
    }

    /// Every (pending trial phase, booted slot, tryboot flag) with A committed and a trial of
    /// B, and what it means.
    #[test]
    fn boot_classification_table() {
        use BootCase::*;
        use TrialPhase::*;
        let reason = |phase| {
            let t = Trial { slot: Slot::B, version: Some(v("1.1.0")), started: 1, phase };
            trial_failure_reason(&t, Slot::A)
        };
        let nc = |slot| NotCommitted { slot, committed: Slot::A };
        let table: [(Option<TrialPhase>, Slot, bool, BootCase); 16] = [
            (None, Slot::A, false, Normal),
            (None, Slot::A, true, Normal),
            (None, Slot::B, false, nc(Slot::B)),
            (None, Slot::B, true, UnexpectedTryboot { slot: Slot::B }),
            (
                Some(Requested),
                Slot::A,
                false,
                TrialFailed { slot: Slot::B, reason: reason(Requested) },
            ),
            (
                Some(Requested),
                Slot::A,
                true,
                TrialFailed { slot: Slot::B, reason: reason(Requested) },
            ),
            (Some(Requested), Slot::B, false, nc(Slot::B)),
            (Some(Requested), Slot::B, true, TrialBoot { slot: Slot::B }),
            (Some(Booted), Slot::A, false, TrialFailed { slot: Slot::B, reason: reason(Booted) }),
            (Some(Booted), Slot::A, true, TrialFailed { slot: Slot::B, reason: reason(Booted) }),
            (Some(Booted), Slot::B, false, nc(Slot::B)),
            (Some(Booted), Slot::B, true, TrialBoot { slot: Slot::B }),
            (Some(Committing), Slot::A, false, CommitInterrupted { slot: Slot::B }),
            (Some(Committing), Slot::A, true, CommitInterrupted { slot: Slot::B }),
            (Some(Committing), Slot::B, false, CommitLanded { slot: Slot::B }),
            (Some(Committing), Slot::B, true, TrialBoot { slot: Slot::B }),
        ];
        for (phase, slot, tryboot, want) in table {
            let mut s = installed_b();
            s.trial = phase.map(|phase| Trial {
                slot: Slot::B,
                version: Some(v("1.1.0")),
                started: 1,
                phase,
            });
            assert_eq!(classify_boot(&s, slot, tryboot), want, "{phase:?} {slot} {tryboot}");
            // And the transition agrees with the case.
            match (transition(&s, &Event::Booted { slot, tryboot }), &want) {
                (Err(Refusal::UnexpectedTryboot(_)), UnexpectedTryboot { .. }) => {}
                (Ok(n), TrialFailed { .. }) => {
                    assert!(
                        n.trial.is_none() && matches!(n.slot(Slot::B).state, SlotState::Bad { .. })
                    );
                }
                (Ok(n), CommitInterrupted { .. }) => {
                    assert!(n.trial.is_none() && n.committed == Slot::A);
                    assert_eq!(n.slot(Slot::B).state, SlotState::Installed);
                }
                (Ok(n), CommitLanded { .. }) => assert_eq!((n.committed, n.trial), (Slot::B, None)),
                (Ok(n), TrialBoot { .. }) => assert_ne!(n.trial.unwrap().phase, Requested),
                (Ok(n), NotCommitted { .. }) => assert_eq!(n.counters.wrong_slot_boots, 1),
                (Ok(n), Normal) => assert_eq!(n, s),
                (other, want) => panic!("{want:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn repairs_are_counted() {
        assert_eq!(step(&fresh(), Event::AutobootRepaired).counters.repairs, 1);
    }

    /// Every event from every reachable state either is refused or keeps the invariants.
    #[test]
    fn no_event_sequence_breaks_the_invariants() {
        let events = |at| {
            let mut es = vec![Event::HealthPassed, Event::AutobootRepaired];
            for slot in Slot::ALL {
                es.extend([
                    Event::InstallStarted {
                        slot,
                        version: v("2.0.0"),
                        security_epoch: 1,
                        allow_bad: false,
                    },
                    Event::Installed { slot, version: v("2.0.0") },
                    Event::TrialStarted { slot, at },
                    Event::Booted { slot, tryboot: false },
                    Event::Booted { slot, tryboot: true },
                    Event::Committed { slot },
                    Event::MarkGood { slot },
                    Event::MarkBad { slot, reason: "r".into() },
                ]);
            }
            es.extend([
                Event::HealthFailed { check: "c".into() },
                Event::Deadline { failing: "c".into() },
            ]);
            es
        };
        let mut seen = vec![fresh(), State::new(Slot::B, None)];
        let mut frontier = seen.clone();
        for depth in 0..6u64 {
            let mut next = Vec::new();
            for s in &frontier {
                for e in events(depth) {
                    if let Ok(n) = transition(s, &e) {
                        n.validate().unwrap_or_else(|m| panic!("{e:?} from {s:?}: {m}"));
                        // A parsed-back state is the same state.
                        let json = serde_json::to_vec(&n).unwrap();
                        assert_eq!(parse(Path::new("s"), &json).unwrap(), n);
                        if !seen.contains(&n) {
                            seen.push(n.clone());
                            next.push(n);
                        }
                    }
                }
            }
            frontier = next;
        }
        assert!(seen.len() > 30, "explored {} states", seen.len());
    }

    #[test]
    fn newer_formats_are_refused_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = state_path(dir.path());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let newer = br#"{"format": 2, "committed": "a", "future": true}"#;
        std::fs::write(&path, newer).unwrap();
        let e = load(&path).unwrap_err();
        assert!(matches!(e, LoadError::Newer { found: 2, supported: 1, .. }));
        assert!(e.to_string().contains("newer than this updater"), "{e}");
        let e = save(&path, &fresh()).unwrap_err();
        assert!(e.to_string().contains("newer"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), newer);
    }

    #[test]
    fn corrupt_files_are_reported_and_kept_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = state_path(dir.path());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        for bad in [
            &b"{\"format\": 1, \"committed\": "[..],
            b"",
            b"[1,2]",
            br#"{"format": "one"}"#,
            br#"{"format": 0, "committed": "a"}"#,
            br#"{"format": 1, "committed": "c", "slots": {}}"#,
        ] {
            std::fs::write(&path, bad).unwrap();
            assert!(matches!(load(&path), Err(LoadError::Corrupt { .. })), "{bad:?}");
        }
        // A parseable file that breaks an invariant is corrupt too.
        let mut s = trial_booted_b();
        s.committed = Slot::B;
        std::fs::write(&path, serde_json::to_vec(&s).unwrap()).unwrap();
        assert!(load(&path).unwrap_err().to_string().contains("trial slot b is the committed"));
        let b1 = keep_corrupt(&path).unwrap();
        std::fs::write(&path, b"x").unwrap();
        let b2 = keep_corrupt(&path).unwrap();
        assert!(b1.ends_with("state.json.corrupt-1") && b2.ends_with("state.json.corrupt-2"));
        assert_eq!(std::fs::read(&b2).unwrap(), b"x");
        assert!(load(&path).unwrap().is_none());
    }

    #[test]
    fn saves_round_trip_and_ignore_unknown_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = state_path(dir.path());
        let s = trial_booted_b();
        save(&path, &s).unwrap();
        assert_eq!(load(&path).unwrap(), Some(s.clone()));
        let mut json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        json["added_later"] = serde_json::json!(1);
        std::fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
        assert_eq!(load(&path).unwrap(), Some(s));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"format\": 1") || text.contains("\"format\":1"));
    }

    #[test]
    fn a_power_cut_during_a_save_leaves_the_old_or_the_new_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = state_path(dir.path());
        let old = fresh();
        save(&path, &old).unwrap();
        let new = installed_b();
        failpoint::record();
        save(&path, &new).unwrap();
        let names = failpoint::recorded();
        assert_eq!(names, SAVE_FAILPOINTS);
        for name in &names {
            for torn in [None, Some(0), Some(17)] {
                save(&path, &old).unwrap();
                failpoint::arm(name, torn);
                let e = save(&path, &new).unwrap_err();
                assert!(e.downcast_ref::<failpoint::PowerCut>().is_some(), "{e:#}");
                let found = load(&path).unwrap().unwrap();
                assert!(found == old || found == new, "{name}");
                if name == "state.after-rename" || name == "state.after-dir-fsync" {
                    assert_eq!(found, new, "{name}");
                }
            }
        }
        failpoint::disarm();
    }
}
