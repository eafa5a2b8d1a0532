//! The preconditions of the state's events: the one place each rule is written.
//!
//! [`super::transition`] calls these before it changes anything. A caller that must refuse
//! before it does any I/O (the `install` command and the daemon, before a download; `trial`,
//! before it repairs `autoboot.txt`) calls the same function, so a rule never has a second
//! copy. Pure: no I/O, no clock.

use super::{Refusal, SlotState, State, Trial, TrialPhase};
use crate::bootinfo::BootInfo;
use crate::layout::Slot;
use semver::Version;
use std::fmt;

/// What is asked of the committed slot: where it must run from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Install,
    Trial,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Install => "installs run from the committed slot",
            Action::Trial => "a trial starts from the committed slot",
        })
    }
}

/// Installs and trials start only from the committed slot, booted without the tryboot flag.
/// `booted` is `None` when where the system booted is unknown (a host working on an image
/// file): allowed.
pub fn from_committed(s: &State, booted: Option<&BootInfo>, action: Action) -> Result<(), Refusal> {
    match booted {
        Some(b) if b.tryboot || b.slot() != Some(s.committed) => {
            Err(Refusal::NotFromCommitted { booted: *b, committed: s.committed, action })
        }
        _ => Ok(()),
    }
}

/// No trial is pending.
pub fn no_trial(s: &State) -> Result<(), Refusal> {
    match &s.trial {
        Some(t) => Err(Refusal::TrialPending(t.slot)),
        None => Ok(()),
    }
}

/// `slot` is not the committed one.
pub fn not_committed(s: &State, slot: Slot) -> Result<(), Refusal> {
    if slot == s.committed {
        return Err(Refusal::Committed(slot));
    }
    Ok(())
}

/// Whether an install may start now, whatever the version (what the daemon asks before it
/// downloads): from the committed slot, with no trial pending. Returns the slot to write.
pub fn install_target(s: &State, booted: Option<&BootInfo>) -> Result<Slot, Refusal> {
    from_committed(s, booted, Action::Install)?;
    no_trial(s)?;
    Ok(s.committed.other())
}

/// An install of `version` into `slot`: from the committed slot, into the other one, with no
/// trial pending, and not a version that failed before unless `allow_bad`.
pub fn install(
    s: &State,
    slot: Slot,
    version: &Version,
    allow_bad: bool,
    booted: Option<&BootInfo>,
) -> Result<(), Refusal> {
    from_committed(s, booted, Action::Install)?;
    not_committed(s, slot)?;
    no_trial(s)?;
    if s.bad_versions.contains(version) && !allow_bad {
        return Err(Refusal::BadVersion(version.clone()));
    }
    Ok(())
}

/// The end of an install: `slot` is being installed with exactly `version`.
pub fn installed(s: &State, slot: Slot, version: &Version) -> Result<(), Refusal> {
    let info = s.slot(slot);
    if info.state != SlotState::Installing || info.version.as_ref() != Some(version) {
        return Err(Refusal::NotInstalling {
            slot,
            state: info.state.name(),
            version: version.clone(),
        });
    }
    Ok(())
}

/// A trial of `slot`: from the committed slot, of the other one, which holds an installed
/// system not marked bad; asking again before the reboot happened is allowed.
pub fn trial(s: &State, slot: Slot, booted: Option<&BootInfo>) -> Result<(), Refusal> {
    from_committed(s, booted, Action::Trial)?;
    not_committed(s, slot)?;
    match &s.trial {
        Some(t) if t.slot == slot && t.phase == TrialPhase::Requested => {}
        Some(t) => return Err(Refusal::TrialPending(t.slot)),
        None => {}
    }
    match s.slot(slot).state {
        SlotState::Installed | SlotState::Good => Ok(()),
        SlotState::Bad { .. } => Err(Refusal::SlotBad(slot)),
        SlotState::Empty | SlotState::Installing => Err(Refusal::NothingInstalled(slot)),
    }
}

/// The pending trial, once it booted: what health results and a passing check apply to.
pub fn booted_trial(s: &State) -> Result<&Trial, Refusal> {
    let t = s.trial.as_ref().ok_or(Refusal::NoTrial)?;
    if t.phase == TrialPhase::Requested {
        return Err(Refusal::TrialNotBooted(t.slot));
    }
    Ok(t)
}

/// The trial whose checks passed, ready for its commit (phase `committing`).
pub fn ready_to_commit(s: &State) -> Result<&Trial, Refusal> {
    let t = s.trial.as_ref().ok_or(Refusal::NoTrial)?;
    if t.phase != TrialPhase::Committing {
        return Err(Refusal::TrialNotBooted(t.slot));
    }
    Ok(t)
}

/// The commit of `slot`: it is the pending trial's slot, and that trial is ready.
pub fn commit(s: &State, slot: Slot) -> Result<(), Refusal> {
    match &s.trial {
        Some(t) if t.slot != slot => Err(Refusal::TrialPending(t.slot)),
        _ => ready_to_commit(s).map(|_| ()),
    }
}

/// An operator's mark-good of `slot`: a pending trial of it must have booted; any other slot
/// but the committed one must hold an installed system.
pub fn mark_good(s: &State, slot: Slot) -> Result<(), Refusal> {
    if let Some(t) = s.trial.as_ref().filter(|t| t.slot == slot) {
        if t.phase == TrialPhase::Requested {
            return Err(Refusal::TrialNotBooted(slot));
        }
    } else if slot != s.committed
        && matches!(s.slot(slot).state, SlotState::Empty | SlotState::Installing)
    {
        return Err(Refusal::NothingInstalled(slot));
    }
    Ok(())
}

/// A mark-bad of `slot`: never the committed slot, never an empty one.
pub fn mark_bad(s: &State, slot: Slot) -> Result<(), Refusal> {
    not_committed(s, slot)?;
    if matches!(s.slot(slot).state, SlotState::Empty) {
        return Err(Refusal::NothingInstalled(slot));
    }
    Ok(())
}
