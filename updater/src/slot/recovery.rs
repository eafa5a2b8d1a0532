//! Opening the state for a command that may change it: created from the disk on the first
//! boot, and rebuilt from the disk when the file is corrupt (the corrupt file kept aside).

use super::{Device, OnDisk};
use crate::disk;
use crate::history::{Entry, HistoryEvent};
use crate::layout::Slot;
use crate::release::Release;
use crate::state::{self, LoadError, Recovery, State};
use anyhow::{Context, Result};

impl Device {
    /// Loads the state for a command that may change it. With no state file yet, creates one
    /// from the disk. A corrupt file is kept as `state.json.corrupt-<n>` and the state rebuilt
    /// from the disk (committed slot from `autoboot.txt`, or the booted slot), flagged in
    /// `recovered` and in the history. A newer format is an error; the file stays untouched.
    pub fn open_state(
        &self,
        booted: Option<Slot>,
        running: Option<&Release>,
        now: u64,
    ) -> Result<State> {
        let path = self.state_path();
        match state::load(&path) {
            Ok(Some(s)) => Ok(s),
            Ok(None) => {
                let (s, from) = self.rebuild(booted, running)?;
                state::save(&path, &s)?;
                self.record(
                    &Entry::new(now, HistoryEvent::Init)
                        .slot(s.committed)
                        .version(s.slot(s.committed).version.as_ref())
                        .reason(format!("state created; committed slot from {from}")),
                )?;
                Ok(s)
            }
            Err(LoadError::Corrupt { what, .. }) => {
                let backup = state::keep_corrupt(&path)
                    .with_context(|| format!("keeping the corrupt {} aside", path.display()))?;
                let (mut s, from) = self.rebuild(booted, running)?;
                let reason = format!(
                    "state.json was corrupt ({what}); kept as {}; rebuilt with the committed \
                     slot from {from}",
                    backup.display()
                );
                s.recovered = Some(Recovery { at: now, backup, reason: reason.clone() });
                s.last_error = Some(reason.clone());
                state::save(&path, &s)?;
                self.record(
                    &Entry::new(now, HistoryEvent::Repair).slot(s.committed).reason(reason),
                )?;
                Ok(s)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn rebuild(&self, booted: Option<Slot>, running: Option<&Release>) -> Result<(State, String)> {
        let (committed, from) = match self.selector.read()? {
            OnDisk::Valid(a) => (a.committed, "autoboot.txt".to_string()),
            other => match booted {
                Some(b) => (b, format!("the booted slot (autoboot.txt {})", other.describe())),
                None => {
                    (Slot::A, format!("the firmware's default (autoboot.txt {})", other.describe()))
                }
            },
        };
        let release = self
            .slot_release(committed)
            .or_else(|| running.filter(|_| booted == Some(committed)).cloned());
        let mut s = State::new(committed, release.as_ref().map(|r| r.version.clone()));
        if let Some(r) = &release {
            // The committed build's epoch is the floor from the first boot on.
            s.security_epoch = r.security_epoch;
            s.slots.get_mut(committed).security_epoch = Some(r.security_epoch);
        }
        if let Some(r) = self.slot_release(committed.other()) {
            *s.slots.get_mut(committed.other()) = state::SlotInfo {
                state: state::SlotState::Installed,
                version: Some(r.version),
                security_epoch: Some(r.security_epoch),
            };
        }
        Ok((s, from))
    }

    /// The release file in `slot`'s root filesystem, read from the disk; `None` when the
    /// root holds no readable one.
    pub fn slot_release(&self, slot: Slot) -> Option<Release> {
        let p = disk::find_label(&self.disk, slot.root().label).ok()?;
        disk::read_release(&self.disk, &p).ok()
    }
}
