//! What a boot means for the state: [`classify_boot`] reads where the system started (slot,
//! tryboot flag) against the pending trial and the committed slot. Pure.

use super::{State, Trial, TrialPhase};
use crate::layout::Slot;
use semver::Version;

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

pub(super) fn trial_failure_reason(t: &Trial, committed: Slot) -> String {
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
