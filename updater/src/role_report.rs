//! What the daemon reports of the roles: the role runner's record
//! (`/data/metrica/role-daemon.json`, written by [`crate::daemon::role`]) and the `role`
//! section that `/status`, `/health`, `/metrics` and the status page show
//! ([`RoleSection`], from a [`RoleSource`]). Below `metrics` and `serve`, which read it, and
//! `daemon`, which writes it (docs/design.md, the module layers).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::daemon_record::NamedError;
use crate::role::safe_mode::Marker;
use crate::role::service::RolesStatus;

/// The runner's record, under `/data/metrica`.
pub const RECORD: &str = "role-daemon.json";

/// The `role` section of the daemon's `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct RoleSection {
    /// The roles service's view (roles, versions, containers, health, safe mode, engine);
    /// `None` when it could not be read, and `error` says why.
    pub roles: Option<RolesStatus>,
    pub error: Option<String>,
    /// The summed restart count of each role's running stack.
    pub restarts: BTreeMap<String, u64>,
    /// The daemon's role runner: last decision, barred versions, errors, crash rollbacks.
    pub daemon: RoleRecord,
    /// Whether the container engine answered (the service's view, else the runner's last
    /// look; `None`: unknown).
    pub engine_up: Option<bool>,
    /// The safe-mode marker: why and since when (`None`: not in safe mode).
    pub safe_mode: Option<Marker>,
}

/// Where the daemon's endpoints get the role section from.
pub trait RoleSource: Send + Sync {
    fn section(&self) -> RoleSection;
}

/// The baked safe-mode stack as last unpacked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BakedStack {
    /// Size and modification time of the baked file (a new OS brings a new one).
    pub key: String,
    pub version: String,
}

/// The last role decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleDecision {
    pub time: u64,
    pub role: String,
    pub code: String,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// What the runner remembers (`/data/metrica/role-daemon.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleRecord {
    #[serde(default)]
    pub safe_mode_stack: Option<BakedStack>,
    #[serde(default)]
    pub decision: Option<RoleDecision>,
    #[serde(default)]
    pub last_attempt: Option<u64>,
    #[serde(default)]
    pub last_failure: Option<u64>,
    /// `ROLE@VERSION` that failed: never taken again automatically.
    #[serde(default)]
    pub failed: BTreeSet<String>,
    /// `ROLE@VERSION:KIND` already reported (each failure is reported once).
    #[serde(default)]
    pub reported: BTreeSet<String>,
    /// Rollbacks the runner made after a crash loop, per role.
    #[serde(default)]
    pub crash_rollbacks: BTreeMap<String, u64>,
    /// The last errors, newest last.
    #[serde(default)]
    pub errors: Vec<NamedError>,
    /// Whether the engine answered at the last look.
    #[serde(default)]
    pub engine_up: Option<bool>,
}

impl RoleRecord {
    pub fn path(metrica_dir: &Path) -> PathBuf {
        metrica_dir.join(RECORD)
    }

    /// The record, or an empty one when there is none or it cannot be read.
    pub fn load(metrica_dir: &Path) -> RoleRecord {
        std::fs::read(Self::path(metrica_dir))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub fn save(&self, metrica_dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(metrica_dir)?;
        let bytes = serde_json::to_vec_pretty(self)?;
        crate::state::write_atomic(&Self::path(metrica_dir), &bytes, "role-daemon")
    }

    pub fn failed_versions(&self, role: &str) -> impl Iterator<Item = semver::Version> + '_ {
        let prefix = format!("{role}@");
        self.failed.iter().filter_map(move |k| k.strip_prefix(&prefix)?.parse().ok())
    }
}
