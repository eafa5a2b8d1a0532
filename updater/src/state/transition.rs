//! [`transition`]: the next state after an event. Each event's preconditions are asked of
//! `policy`; this file holds only what changes. Pure: no I/O, no clock.

use super::boot::{classify_boot, BootCase};
use super::{policy, Event, Refusal, SlotInfo, SlotState, State, Trial, TrialPhase};
use crate::layout::Slot;

/// The next state after `event`, or why `event` is refused. Pure: no I/O, no clock.
pub fn transition(state: &State, event: &Event) -> Result<State, Refusal> {
    let mut s = state.clone();
    match event {
        Event::InstallStarted { slot, version, security_epoch, allow_bad, booted } => {
            policy::install(&s, *slot, version, *allow_bad, booted.as_ref())?;
            *s.slots.get_mut(*slot) = SlotInfo {
                state: SlotState::Installing,
                version: Some(version.clone()),
                security_epoch: Some(*security_epoch),
            };
        }
        Event::Installed { slot, version } => {
            policy::installed(&s, *slot, version)?;
            s.slots.get_mut(*slot).state = SlotState::Installed;
            s.counters.installs += 1;
        }
        Event::TrialStarted { slot, at, booted } => {
            policy::trial(&s, *slot, booted.as_ref())?;
            let version = s.slot(*slot).version.clone();
            s.trial =
                Some(Trial { slot: *slot, version, started: *at, phase: TrialPhase::Requested });
        }
        Event::Booted { slot, tryboot } => booted(&mut s, classify_boot(state, *slot, *tryboot))?,
        Event::HealthPassed => {
            policy::booted_trial(&s)?;
            if let Some(t) = s.trial.as_mut() {
                t.phase = TrialPhase::Committing;
            }
        }
        Event::HealthFailed { check } => {
            health_failed(&mut s, format!("health check failed: {check}"))?;
        }
        Event::Deadline { failing } => {
            health_failed(&mut s, format!("health deadline passed; failing: {failing}"))?;
        }
        Event::Committed { slot } => {
            policy::commit(&s, *slot)?;
            commit(&mut s, *slot);
        }
        Event::AutobootRepaired => s.counters.repairs += 1,
        Event::MarkGood { slot } => {
            policy::mark_good(&s, *slot)?;
            mark_good(&mut s, *slot);
        }
        Event::MarkBad { slot, reason } => {
            policy::mark_bad(&s, *slot)?;
            mark_bad(&mut s, *slot, reason.clone());
        }
    }
    Ok(s)
}

/// What a boot changes, by what it means.
fn booted(s: &mut State, case: BootCase) -> Result<(), Refusal> {
    match case {
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
            mark_bad(s, slot, reason);
        }
        BootCase::CommitInterrupted { slot } => {
            s.trial = None;
            s.counters.wrong_slot_boots = 0;
            s.last_error = Some(format!(
                "the commit of slot {slot} was interrupted before autoboot.txt changed; \
                 slot {slot} stays installed and can be tried again"
            ));
        }
        BootCase::CommitLanded { slot } => commit(s, slot),
        BootCase::NotCommitted { slot, committed } => {
            s.counters.wrong_slot_boots += 1;
            s.last_error = Some(format!(
                "booted slot {slot} without the tryboot flag while slot {committed} is \
                 committed"
            ));
        }
        BootCase::UnexpectedTryboot { slot } => return Err(Refusal::UnexpectedTryboot(slot)),
    }
    Ok(())
}

/// A failed check or a passed deadline of the booted trial: a rollback, the slot marked bad.
fn health_failed(s: &mut State, reason: String) -> Result<(), Refusal> {
    let slot = policy::booted_trial(s)?.slot;
    s.counters.rollbacks += 1;
    s.counters.health_failures += 1;
    mark_bad(s, slot, reason);
    Ok(())
}

fn mark_good(s: &mut State, slot: Slot) {
    if let Some(t) = s.trial.as_mut().filter(|t| t.slot == slot) {
        t.phase = TrialPhase::Committing;
    } else if slot == s.committed {
        s.slots.get_mut(slot).state = SlotState::Good;
    } else {
        let info = s.slots.get_mut(slot);
        if let SlotState::Bad { .. } = info.state {
            info.state = SlotState::Installed;
            if let Some(v) = info.version.clone() {
                s.bad_versions.remove(&v);
            }
        }
    }
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
