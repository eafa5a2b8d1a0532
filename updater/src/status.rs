//! Everything `updater status` and the daemon's `/status` show, gathered from the disk, the
//! state, the history and the daemon's record ([`Device::status`]). Reads only; never repairs.

use crate::bootinfo::BootInfo;
use crate::connectivity::Connectivity;
use crate::daemon_record::{record_path, DaemonRecord};
use crate::history::{Entry, HistoryEvent};
use crate::layout::Slot;
use crate::slot::{unix_now, Device, OnDisk};
use crate::state::{self, State};
use serde::Serialize;
use std::path::{Path, PathBuf};

impl Device {
    /// Everything `updater status` shows. Reads only; never repairs.
    pub fn status(&self, booted: Result<BootInfo, String>, history_len: usize) -> Status {
        let (autoboot, autoboot_error) = match self.selector.read() {
            Ok(OnDisk::Valid(a)) => {
                (Some(AutobootStatus { committed: a.committed, tryboot: a.tryboot }), None)
            }
            Ok(other) => (None, Some(other.describe())),
            Err(e) => (None, Some(format!("{e:#}"))),
        };
        let (state, state_error) = match state::load(&self.state_path()) {
            Ok(s) => (s, None),
            Err(e) => (None, Some(e.to_string())),
        };
        let (booted, booted_error) = match booted {
            Ok(b) => (Some(b), None),
            Err(e) => (None, Some(e)),
        };
        let (daemon, daemon_error) = match DaemonRecord::load(&record_path(&self.data_dir)) {
            Ok(d) => (d, None),
            Err(e) => (None, Some(format!("{e:#}"))),
        };
        let now = unix_now();
        let drift = drift(state.as_ref(), autoboot.as_ref(), booted.as_ref());
        let history = self.history();
        let last_update_success = history
            .tail(history.max_entries)
            .unwrap_or_default()
            .iter()
            .rev()
            .find(|e| e.event == HistoryEvent::Commit)
            .map(|e| e.time);
        Status {
            disk: self.disk.clone(),
            data_dir: self.data_dir.clone(),
            booted,
            booted_error,
            autoboot,
            autoboot_error,
            state,
            state_error,
            history: history.tail(history_len).unwrap_or_default(),
            connectivity: daemon.as_ref().map(|d| d.connectivity_at(now)),
            daemon,
            daemon_error,
            disk_free_bytes: disk_free_bytes(&self.data_dir),
            safe_mode: self.data_dir.join("metrica").join(SAFE_MODE_MARKER).exists(),
            drift,
            last_update_success,
        }
    }
}

/// The file whose presence means the device runs its safe-mode stack (written by whatever
/// starts safe mode; DESIGN.md section 8).
pub const SAFE_MODE_MARKER: &str = "safe-mode";

/// Free bytes for unprivileged writers on the filesystem holding `dir`.
pub fn disk_free_bytes(dir: &Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(dir).ok()?;
    Some((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
}

/// Where the disk disagrees with the state: `autoboot.txt` names another committed slot, or
/// the system runs a slot other than the committed one with no trial pending.
pub fn drift(
    state: Option<&State>,
    autoboot: Option<&AutobootStatus>,
    booted: Option<&BootInfo>,
) -> Vec<String> {
    let mut found = Vec::new();
    let Some(s) = state else { return found };
    if let Some(a) = autoboot {
        if a.committed != s.committed {
            found.push(format!(
                "autoboot.txt commits slot {}, the state slot {}",
                a.committed, s.committed
            ));
        }
    }
    if let Some(slot) = booted.and_then(BootInfo::slot) {
        let in_trial = s.trial.as_ref().is_some_and(|t| t.slot == slot);
        if slot != s.committed && !in_trial {
            found.push(format!(
                "running slot {slot}, but slot {} is committed and no trial is pending",
                s.committed
            ));
        }
    }
    found
}

/// What `autoboot.txt` says.
#[derive(Debug, Clone, Serialize)]
pub struct AutobootStatus {
    pub committed: Slot,
    pub tryboot: Slot,
}

/// The status of a device, as `updater status --json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub disk: PathBuf,
    pub data_dir: PathBuf,
    pub booted: Option<BootInfo>,
    pub booted_error: Option<String>,
    pub autoboot: Option<AutobootStatus>,
    pub autoboot_error: Option<String>,
    pub state: Option<State>,
    pub state_error: Option<String>,
    pub history: Vec<Entry>,
    /// The daemon's record (channel, decision, last contact, last error, counters); `None`
    /// until `updater run` has polled once.
    pub daemon: Option<DaemonRecord>,
    pub daemon_error: Option<String>,
    /// Connectivity now, from the daemon's last contact (`None` without a record).
    pub connectivity: Option<Connectivity>,
    /// Free bytes on the data partition (`None` when it cannot be read).
    pub disk_free_bytes: Option<u64>,
    /// The safe-mode marker `/data/metrica/safe-mode` exists.
    pub safe_mode: bool,
    /// Where the disk disagrees with the state (empty: no drift).
    pub drift: Vec<String>,
    /// Unix time of the last commit in the history.
    pub last_update_success: Option<u64>,
}
