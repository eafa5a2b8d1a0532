//! The roles service: the one entry point through which the CLI (`updater role ...`,
//! `updater safe-mode ...`) and the daemon change a device's roles.
//!
//! Every change runs under the updater's lock ([`crate::slot::lock_data_dir`]), checks free
//! space first, unpacks a bundle (verified against the keyring) or takes a folder, applies it
//! with [`super::apply::apply`], appends the history ([`crate::history::HistoryEvent`]'s
//! `role-*` and `safe-mode-*` events), and settles safe mode with [`super::safe_mode::decide`]
//! (entered after [`super::safe_mode::FAILED_UPDATES_LIMIT`] failed updates, left on a good
//! update): the rule is applied here and nowhere else.
//!
//! INTERFACE ONLY (lead, stop 22): the bodies are written on the `rolecli` branch; the daemon
//! (`roledaemon` branch) codes against these signatures. Every method refuses until then.

use std::path::{Path, PathBuf};

use serde::Serialize;
use thiserror::Error;

use super::apply::{Event, Outcome, Recovery};
use super::bundle::RoleBundleError;
use super::engine::{Container, Engine};
use super::safe_mode::{Command, ExitReason, Marker, Reason};
use crate::sign::Keyring;

/// Where a release comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A signed role bundle (`.mfr`), verified against the keyring before anything changes.
    Bundle(PathBuf),
    /// An unpacked release folder (`role.toml`, compose file, `images/`): development and the
    /// images baked into the root filesystem, which dm-verity/the slot signature cover.
    Folder(PathBuf),
}

/// Why the service did not get as far as an apply. A refused or rolled-back release is not an
/// error: it is an [`Outcome`].
#[derive(Debug, Error)]
pub enum ServiceError {
    /// Another updater command holds the lock: try again later.
    #[error(transparent)]
    Busy(#[from] crate::slot::LockBusy),
    /// Not enough free space on /data to unpack and load the release.
    #[error("{dir}: {free} bytes free, {need} needed to unpack and load the release")]
    NoSpace { dir: PathBuf, free: u64, need: u64 },
    #[error(transparent)]
    Bundle(#[from] RoleBundleError),
    /// The role name is not a valid name (`a-z`, `0-9`, `-`).
    #[error("{0:?} is not a valid role name")]
    RoleName(String),
    #[error("{0}")]
    NotWritten(&'static str),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// How safe mode changed during a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SafeModeChange {
    Entered(Reason),
    Left(ExitReason),
}

/// What [`Roles::apply`] did.
#[derive(Debug)]
pub struct Applied {
    pub role: String,
    pub outcome: Outcome,
    pub safe_mode: Option<SafeModeChange>,
}

/// One role as `updater role status`, /status and /metrics show it.
#[derive(Debug, Clone, Serialize)]
pub struct RoleStatus {
    pub name: String,
    pub current: Option<String>,
    pub previous: Option<String>,
    pub committed: Option<String>,
    pub pending: Option<String>,
    pub failed: Vec<String>,
    pub consecutive_failures: u32,
    pub rollbacks_total: u64,
    pub last_error: Option<String>,
    /// The stack's containers; `None` when the engine could not be asked.
    pub containers: Option<Vec<Container>>,
    /// Whether every container is up (and healthy where it has a check); `None` when unknown.
    pub healthy: Option<bool>,
}

/// Every role of the device and safe mode.
#[derive(Debug, Clone, Serialize)]
pub struct RolesStatus {
    pub roles: Vec<RoleStatus>,
    pub safe_mode: Option<Marker>,
    /// Whether the container engine answered.
    pub engine_up: bool,
}

/// The device's roles: what the service needs to know of it.
pub struct Roles<'a> {
    /// `/data/metrica`.
    pub metrica_dir: PathBuf,
    pub engine: &'a dyn Engine,
    pub keyring: &'a Keyring,
    pub os_version: semver::Version,
    /// Where required devices are looked for (`/` on a device).
    pub dev_root: PathBuf,
    /// The safe-mode stack's release folder, when the device has one.
    pub safe_mode_stack: Option<PathBuf>,
    /// Free space kept on /data beyond what a release needs.
    pub min_free_bytes: u64,
    pub log: &'a dyn Fn(&Event),
}

impl Roles<'_> {
    /// Applies one release (bundle or folder) under the lock, records it in the history and
    /// settles safe mode.
    pub fn apply(&self, source: &Source, force: bool) -> Result<Applied, ServiceError> {
        let _ = (source, force);
        Err(ServiceError::NotWritten("role apply is not written yet"))
    }

    /// Run at start, under the lock: finishes every role's interrupted apply
    /// ([`super::apply::recover`]) and brings the right stack up (the safe-mode stack when the
    /// marker says so).
    pub fn recover(&self) -> Result<Vec<(String, Recovery)>, ServiceError> {
        Err(ServiceError::NotWritten("role recover is not written yet"))
    }

    /// An operator's `safe-mode enter|exit`.
    pub fn command(&self, command: Command) -> Result<Option<SafeModeChange>, ServiceError> {
        let _ = command;
        Err(ServiceError::NotWritten("safe-mode commands are not written yet"))
    }

    /// Enters safe mode for a reason the daemon found (crash loop, invalid provisioning).
    pub fn enter_safe_mode(&self, reason: &Reason) -> Result<Option<SafeModeChange>, ServiceError> {
        let _ = reason;
        Err(ServiceError::NotWritten("entering safe mode is not written yet"))
    }

    /// The roles and safe mode, read without the lock.
    pub fn status(&self) -> anyhow::Result<RolesStatus> {
        anyhow::bail!("role status is not written yet")
    }
}

/// The roles on the device: the folders under `metrica_dir/roles`.
pub fn role_names(metrica_dir: &Path) -> anyhow::Result<Vec<String>> {
    let _ = metrica_dir;
    anyhow::bail!("listing roles is not written yet")
}
