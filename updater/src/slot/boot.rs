//! What init runs at every start ([`Device::boot`]): reconcile the state with where the
//! system booted, repair `autoboot.txt`, and in a trial boot run the health checks, then
//! commit or reboot to the committed slot.

use super::Device;
use crate::bootinfo::BootInfo;
use crate::health::{self, Check, Timer, Verdict};
use crate::history::{Entry, HistoryEvent};
use crate::layout::Slot;
use crate::reboot::RebootMode;
use crate::release::Release;
use crate::state::{self, BootCase, Event, State, TrialPhase};
use anyhow::{bail, Result};
use std::time::Duration;

/// Plain reboots out of a slot that is not committed, in a row, before the updater stays put.
pub const MAX_WRONG_SLOT_REBOOTS: u64 = 2;

/// What to run in a trial boot, and how long to wait.
pub struct HealthPlan<'a> {
    pub checks: Vec<&'a dyn Check>,
    pub deadline: Duration,
    pub timer: &'a dyn Timer,
}

/// What `boot` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootReport {
    /// One line for the console, e.g. `metrica: booted slot b (trial): checks passed; committed`.
    pub summary: String,
    pub reboot: Option<RebootMode>,
    /// False when something failed (exit code 1).
    pub ok: bool,
}

/// One boot under way: where it booted, the clock, and the console line's head and notes.
struct Boot<'a> {
    slot: Slot,
    plan: &'a HealthPlan<'a>,
    now: &'a dyn Fn() -> u64,
    /// `metrica: booted <info>`.
    head: String,
    /// What happened so far, joined with `; ` after the head.
    notes: Vec<String>,
}

impl Boot<'_> {
    /// `<head>: <notes...>; <last>`.
    fn line(&self, last: &str) -> String {
        let mut all: Vec<&str> = self.notes.iter().map(String::as_str).collect();
        all.push(last);
        format!("{}: {}", self.head, all.join("; "))
    }

    /// `<head>` or `<head>: <notes>`.
    fn prefix(&self) -> String {
        if self.notes.is_empty() {
            self.head.clone()
        } else {
            format!("{}: {}", self.head, self.notes.join("; "))
        }
    }
}

impl Device {
    /// What init runs at every start: reconcile the state with where the system booted,
    /// repair `autoboot.txt`, and in a trial boot run the checks, then commit or reboot.
    pub fn boot(
        &self,
        info: &BootInfo,
        running: Option<&Release>,
        plan: &HealthPlan,
        now: &dyn Fn() -> u64,
    ) -> BootReport {
        match self.boot_inner(info, running, plan, now) {
            Ok(r) => r,
            Err(e) => {
                let mut summary = format!("metrica: booted {info}: error: {e:#}");
                let reboot = if info.tryboot {
                    summary.push_str("; rebooting to the committed slot");
                    Some(RebootMode::Plain)
                } else {
                    None
                };
                BootReport { summary, reboot, ok: false }
            }
        }
    }

    fn boot_inner(
        &self,
        info: &BootInfo,
        running: Option<&Release>,
        plan: &HealthPlan,
        now: &dyn Fn() -> u64,
    ) -> Result<BootReport> {
        let Some(slot) = info.slot() else {
            bail!("booted partition {} is not a boot slot", info.partition)
        };
        let mut boot =
            Boot { slot, plan, now, head: format!("metrica: booted {info}"), notes: Vec::new() };
        let t0 = now();
        let s = self.open_state(Some(slot), running, t0)?;
        let case = state::classify_boot(&s, slot, info.tryboot);
        if let BootCase::UnexpectedTryboot { slot } = case {
            return self.unexpected_tryboot(&s, slot, &boot);
        }
        let s = self.apply(&s, &Event::Booted { slot, tryboot: info.tryboot })?;
        self.record_boot_case(&s, &case, &mut boot)?;
        if s.recovered.as_ref().is_some_and(|r| r.at == t0) {
            boot.notes.push("state.json was corrupt: kept aside and rebuilt (see status)".into());
        }
        let (s, repair) = self.ensure_autoboot(&s, now())?;
        if repair.is_some() {
            boot.notes.push("autoboot.txt repaired".into());
        }
        match case {
            BootCase::TrialBoot { slot } => self.run_trial(&s, slot, &boot),
            BootCase::NotCommitted { committed, .. } => {
                if repair.is_some() && s.counters.wrong_slot_boots <= MAX_WRONG_SLOT_REBOOTS {
                    let summary = boot.line(&format!("rebooting to committed slot {committed}"));
                    Ok(BootReport { summary, reboot: Some(RebootMode::Plain), ok: true })
                } else {
                    let summary = boot
                        .line(&format!("running slot {slot} while slot {committed} is committed"));
                    Ok(BootReport { summary, reboot: None, ok: true })
                }
            }
            _ => {
                let v = s
                    .slot(s.committed)
                    .version
                    .as_ref()
                    .map(|v| format!(" ({v})"))
                    .unwrap_or_default();
                let summary = boot.line(&format!("slot {}{v} ok", s.committed));
                Ok(BootReport { summary, reboot: None, ok: true })
            }
        }
    }

    /// The tryboot flag with no trial pending: repair `autoboot.txt` and reboot plainly.
    fn unexpected_tryboot(&self, s: &State, slot: Slot, boot: &Boot) -> Result<BootReport> {
        let now = boot.now;
        let (_, repair) = self.ensure_autoboot(s, now())?;
        self.record(
            &Entry::new(now(), HistoryEvent::UnexpectedTryboot)
                .slot(slot)
                .reason("trial boot without a pending trial; rebooting to the committed slot"),
        )?;
        let mut summary = format!(
            "{}: no trial is pending; rebooting to committed slot {}",
            boot.head, s.committed
        );
        if repair.is_some() {
            summary.push_str(" (autoboot.txt repaired)");
        }
        Ok(BootReport { summary, reboot: Some(RebootMode::Plain), ok: true })
    }

    /// The history entry and console note of what the boot meant (`s`: the state after it).
    fn record_boot_case(&self, s: &State, case: &BootCase, boot: &mut Boot) -> Result<()> {
        let now = boot.now;
        match case {
            BootCase::TrialFailed { slot, reason } => {
                let v = s.slot(*slot).version.clone();
                self.record(
                    &Entry::new(now(), HistoryEvent::Rollback)
                        .slot(*slot)
                        .version(v.as_ref())
                        .reason(reason),
                )?;
                boot.notes.push(format!("rolled back: {reason}"));
            }
            BootCase::CommitInterrupted { slot } => {
                self.record(
                    &Entry::new(now(), HistoryEvent::CommitInterrupted)
                        .slot(*slot)
                        .reason("autoboot.txt still named the old slot; the slot stays installed"),
                )?;
                boot.notes.push(format!(
                    "the commit of slot {slot} did not land; slot {slot} stays installed"
                ));
            }
            BootCase::CommitLanded { slot } => {
                let v = s.slot(*slot).version.clone();
                self.record(
                    &Entry::new(now(), HistoryEvent::Commit)
                        .slot(*slot)
                        .version(v.as_ref())
                        .reason("finished at boot: autoboot.txt already named the slot"),
                )?;
                boot.notes.push(format!("commit of slot {slot} finished"));
            }
            BootCase::NotCommitted { committed, .. } => {
                let slot = boot.slot;
                self.record(&Entry::new(now(), HistoryEvent::WrongSlot).slot(slot).reason(
                    format!("plain boot of slot {slot} while slot {committed} is committed"),
                ))?;
            }
            BootCase::Normal | BootCase::TrialBoot { .. } | BootCase::UnexpectedTryboot { .. } => {}
        }
        Ok(())
    }

    /// The trial boot: run the checks (unless they passed before a reset), then commit, or
    /// mark the slot bad and reboot to the committed slot.
    fn run_trial(&self, s: &State, slot: Slot, boot: &Boot) -> Result<BootReport> {
        let (plan, now, prefix) = (boot.plan, boot.now, boot.prefix());
        let version = s.slot(slot).version.clone();
        let mut s = s.clone();
        let mut passed = String::from("checks passed earlier");
        if s.trial.as_ref().is_some_and(|t| t.phase == TrialPhase::Booted) {
            let (event, failure) =
                match health::wait_healthy(&plan.checks, plan.deadline, plan.timer) {
                    Verdict::Passed { after } => {
                        passed = format!("checks passed in {} s", after.as_secs());
                        (Event::HealthPassed, None)
                    }
                    Verdict::Failed { check } => {
                        let what = format!("check failed: {check}");
                        (Event::HealthFailed { check }, Some(what))
                    }
                    Verdict::DeadlinePassed { failing } => {
                        let what = format!(
                            "health deadline of {} s passed (failing: {failing})",
                            plan.deadline.as_secs()
                        );
                        (Event::Deadline { failing }, Some(what))
                    }
                };
            s = self.apply(&s, &event)?;
            if let Some(what) = failure {
                self.rollback_entry(&s, slot, now())?;
                return Ok(BootReport {
                    summary: format!("{prefix}: {what}; rebooting to slot {}", s.committed),
                    reboot: Some(RebootMode::Plain),
                    ok: false,
                });
            }
        }
        let s = self.commit_trial(&s, now())?;
        let v = version.map(|v| format!(" ({v})")).unwrap_or_default();
        Ok(BootReport {
            summary: format!("{prefix}: {passed}; committed slot {}{v}", s.committed),
            reboot: None,
            ok: true,
        })
    }

    fn rollback_entry(&self, s: &State, slot: Slot, now: u64) -> Result<()> {
        let info = s.slot(slot);
        let reason = match &info.state {
            state::SlotState::Bad { reason } => reason.clone(),
            other => other.name().to_string(),
        };
        self.record(
            &Entry::new(now, HistoryEvent::Rollback)
                .slot(slot)
                .version(info.version.as_ref())
                .reason(reason),
        )
    }
}
