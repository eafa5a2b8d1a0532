//! The slot flows an operator or the daemon asks for: trial, commit, mark-good, mark-bad,
//! the install bookkeeping (started, finished), and the repair of `autoboot.txt`. Every
//! precondition is the state's (`state::policy`, through [`crate::state::transition`]).

use super::{Device, OnDisk};
use crate::autoboot::Autoboot;
use crate::bootinfo::BootInfo;
use crate::history::{Entry, HistoryEvent};
use crate::layout::Slot;
use crate::state::{policy, Action, Event, State};
use anyhow::{Context, Result};

impl Device {
    /// Makes `autoboot.txt` agree with the state's committed slot. Returns the repair done,
    /// if one was needed.
    pub fn ensure_autoboot(&self, s: &State, now: u64) -> Result<(State, Option<String>)> {
        let want = Autoboot::committed(s.committed);
        let found = self.selector.read()?;
        if found == OnDisk::Valid(want) {
            return Ok((s.clone(), None));
        }
        let what = format!(
            "autoboot.txt was {}; rewritten for committed slot {}",
            found.describe(),
            s.committed
        );
        self.selector.write(&want).context("repairing autoboot.txt")?;
        let s = self.apply(s, &Event::AutobootRepaired)?;
        self.record(&Entry::new(now, HistoryEvent::Repair).slot(s.committed).reason(what.clone()))?;
        Ok((s, Some(what)))
    }

    /// Finishes a trial whose checks passed (phase `committing`): rewrites `autoboot.txt`,
    /// then records the commit.
    pub fn commit_trial(&self, s: &State, now: u64) -> Result<State> {
        let t = policy::ready_to_commit(s).context("no trial is ready to commit")?.clone();
        self.selector
            .write(&Autoboot::committed(t.slot))
            .with_context(|| format!("committing slot {}", t.slot))?;
        let s = self.apply(s, &Event::Committed { slot: t.slot })?;
        self.record(
            &Entry::new(now, HistoryEvent::Commit).slot(t.slot).version(t.version.as_ref()),
        )?;
        Ok(s)
    }

    /// Prepares a trial of the non-committed slot; the caller then reboots with tryboot.
    /// Refused from a trial boot, or when the system did not boot its committed slot (asked
    /// before `autoboot.txt` is repaired).
    pub fn start_trial(&self, booted: Option<&BootInfo>, now: u64) -> Result<(State, Slot)> {
        let s = self.open_state(booted.and_then(BootInfo::slot), None, now)?;
        policy::from_committed(&s, booted, Action::Trial)?;
        let target = s.committed.other();
        let (s, _) = self.ensure_autoboot(&s, now)?;
        let s = self
            .apply(&s, &Event::TrialStarted { slot: target, at: now, booted: booted.copied() })?;
        let v = s.slot(target).version.clone();
        self.record(
            &Entry::new(now, HistoryEvent::Trial)
                .slot(target)
                .version(v.as_ref())
                .reason("tryboot reboot requested"),
        )?;
        Ok((s, target))
    }

    /// Marks `slot` good. In its trial boot this commits it, as passing checks would.
    pub fn mark_good(
        &self,
        slot: Slot,
        booted: Option<&BootInfo>,
        now: u64,
    ) -> Result<(State, String)> {
        let s = self.open_state(booted.and_then(BootInfo::slot), None, now)?;
        let before_trial = s.trial.clone();
        let s = self.apply(&s, &Event::MarkGood { slot })?;
        let v = s.slot(slot).version.clone();
        self.record(&Entry::new(now, HistoryEvent::MarkGood).slot(slot).version(v.as_ref()))?;
        if before_trial.is_some_and(|t| t.slot == slot) {
            if booted.is_some_and(|b| b.slot() == Some(slot) && b.tryboot) {
                let s = self.commit_trial(&s, now)?;
                return Ok((s, format!("slot {slot} marked good and committed")));
            }
            return Ok((s, format!("slot {slot} marked good; it is committed when its trial boot runs `updater boot`")));
        }
        Ok((s, format!("slot {slot} marked good")))
    }

    /// Marks `slot` bad: its version is not tried again automatically.
    pub fn mark_bad(
        &self,
        slot: Slot,
        reason: &str,
        booted: Option<&BootInfo>,
        now: u64,
    ) -> Result<State> {
        let s = self.open_state(booted.and_then(BootInfo::slot), None, now)?;
        let s = self.apply(&s, &Event::MarkBad { slot, reason: reason.to_string() })?;
        let v = s.slot(slot).version.clone();
        self.record(
            &Entry::new(now, HistoryEvent::MarkBad).slot(slot).version(v.as_ref()).reason(reason),
        )?;
        Ok(s)
    }

    /// Records that an install of `version` into the non-committed slot starts; returns the
    /// slot to write. Refused when the system did not boot its committed slot.
    pub fn begin_install(
        &self,
        version: &semver::Version,
        security_epoch: u64,
        allow_bad: bool,
        booted: Option<&BootInfo>,
        now: u64,
    ) -> Result<(State, Slot)> {
        let s = self.open_state(booted.and_then(BootInfo::slot), None, now)?;
        let target = s.committed.other();
        let event = Event::InstallStarted {
            slot: target,
            version: version.clone(),
            security_epoch,
            allow_bad,
            booted: booted.copied(),
        };
        let s = self.apply(&s, &event)?;
        self.record(
            &Entry::new(now, HistoryEvent::InstallStarted).slot(target).version(Some(version)),
        )?;
        Ok((s, target))
    }

    /// Records that the install into `slot` finished and verified.
    pub fn finish_install(&self, slot: Slot, version: &semver::Version, now: u64) -> Result<State> {
        let s = self.open_state(None, None, now)?;
        let s = self.apply(&s, &Event::Installed { slot, version: version.clone() })?;
        self.record(&Entry::new(now, HistoryEvent::Install).slot(slot).version(Some(version)))?;
        Ok(s)
    }
}
