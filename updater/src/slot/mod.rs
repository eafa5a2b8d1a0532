//! Slots on a disk: the updater's slot flows over a [`Device`] (a disk, its boot selection
//! and a data folder).
//!
//! Each flow opens the state, takes it through [`crate::state::transition`] (which decides
//! every precondition), saves it, and appends to the history. The files by concept:
//!
//! - `selector`: the boot selection backend trait ([`BootSelector`]) and its test fake;
//! - `config_partition`: the real backend, `autoboot.txt` on the `config` partition and its
//!   power-safe in-place commit; `partio`: the partition streams it reads through;
//! - `lock`: one command that changes state at a time;
//! - `recovery`: opening the state, creating or rebuilding it from the disk;
//! - `boot`: what init runs at every start (reconciliation, the trial's checks, commit);
//! - `flows`: trial, commit, mark-good, mark-bad, install bookkeeping, `autoboot.txt` repair;
//! - `install_policy`: what the `install` command and the daemon check a bundle against.
//!
//! Status aggregation lives in `crate::status`, above this module.

mod boot;
mod config_partition;
mod flows;
mod install_policy;
mod lock;
mod partio;
mod recovery;
mod selector;
#[cfg(test)]
mod tests;

pub use boot::{BootReport, HealthPlan, MAX_WRONG_SLOT_REBOOTS};
pub use config_partition::{
    locate_autoboot, read_autoboot, write_autoboot, ConfigPartition, AUTOBOOT_FILE,
    COMMIT_FAILPOINTS,
};
pub use install_policy::InstallPolicy;
pub use lock::{lock_data_dir, LockBusy};
pub use partio::config_partition;
#[cfg(test)]
pub use selector::FileSelector;
pub use selector::{BootSelector, OnDisk, WriteMethod};

use crate::history::{Entry, History};
use crate::state::{self, Event, State};
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::sync::Arc;

/// A disk, its boot selection and a data folder: everything the slot flows read and write.
#[derive(Debug, Clone)]
pub struct Device {
    pub disk: PathBuf,
    pub data_dir: PathBuf,
    /// Where the committed slot is recorded for the firmware (`autoboot.txt` on the disk's
    /// `config` partition unless replaced with [`Device::with_selector`]).
    pub selector: Arc<dyn BootSelector>,
}

impl Device {
    pub fn new(disk: impl Into<PathBuf>, data_dir: impl Into<PathBuf>) -> Device {
        let disk = disk.into();
        let selector = Arc::new(ConfigPartition { disk: disk.clone() });
        Device { disk, data_dir: data_dir.into(), selector }
    }

    /// The same device with another boot selection backend.
    pub fn with_selector(self, selector: Arc<dyn BootSelector>) -> Device {
        Device { selector, ..self }
    }

    pub fn state_path(&self) -> PathBuf {
        state::state_path(&self.data_dir)
    }

    pub fn history(&self) -> History {
        History::new(&self.data_dir)
    }

    fn record(&self, entry: &Entry) -> Result<()> {
        self.history().append(entry).context("appending to the history")
    }

    /// Applies one event: refused events are errors naming the refusal; a changed state is
    /// saved atomically.
    pub fn apply(&self, s: &State, event: &Event) -> Result<State> {
        let next = state::transition(s, event)?;
        if next != *s {
            state::save(&self.state_path(), &next)?;
        }
        Ok(next)
    }
}

/// The current unix time.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
