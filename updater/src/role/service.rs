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
//! Safe mode is entered by stopping every role's stack and starting the safe-mode stack
//! ([`super::safe_mode::switch_stacks`]); it is left by stopping that stack and bringing every
//! role's `current` release up again. An apply in safe mode first stops the safe-mode stack
//! (the role may need its ports), and starts it again when the device stays in safe mode.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use thiserror::Error;

use super::apply::{self, Event, Options, Outcome, Recovery};
use super::bundle::{self, RoleBundleError};
use super::engine::{Container, Engine, EngineError, Project};
use super::health::{self, CheckResult};
use super::layout::{Link, RoleLayout, ROLES_DIR};
use super::safe_mode::{self, Command, Decision, ExitReason, Marker, Reason, Signals};
use super::spec::{self, RoleName, RoleSpec, ROLE_FILE};
use crate::history::{Entry, History, HistoryEvent};
use crate::sign::Keyring;

/// Where bundles are unpacked before they are applied (under `roles/`, so on /data): a
/// dot-folder, which [`role_names`] skips; emptied under the lock before each use.
pub const STAGING_DIR: &str = ".staging";

/// Interval of the health and probation polls.
const POLL: Duration =
    if cfg!(test) { Duration::from_millis(5) } else { Duration::from_millis(500) };

/// Limit of a role's own validation command.
const VALIDATE_TIMEOUT: Duration = Duration::from_secs(120);

/// The safe-mode stack's release folder under `/data/metrica`: unpacked there by the daemon
/// from the bundle baked into the image, used by the daemon and the `safe-mode` commands.
pub const SAFE_MODE_STACK: &str = "safe-mode-stack";

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
    /// The role's own health checks (role.toml `[health]`), run once; `None` when there is
    /// no current release or the engine did not answer.
    pub checks: Option<Vec<CheckResult>>,
    /// Whether every container is up (and healthy where it has a check) and every check of
    /// the role passes; `None` when unknown.
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
        self.apply_as(source, None, force)
    }

    /// [`Roles::apply`], refusing a release of another role than `expected` (`--role`).
    pub fn apply_as(
        &self,
        source: &Source,
        expected: Option<&str>,
        force: bool,
    ) -> Result<Applied, ServiceError> {
        if let Some(name) = expected {
            RoleName::try_from(name.to_string())
                .map_err(|_| ServiceError::RoleName(name.into()))?;
        }
        let _lock = self.lock()?;
        let staging = self.roles_dir().join(STAGING_DIR);
        remove_dir(&staging)?;
        let result = self.apply_locked(source, expected, force, &staging);
        if let Err(e) = remove_dir(&staging) {
            self.say("", "", "warning", &format!("{e:#}"));
        }
        if let Err(e) = &result {
            let what = source_path(source).display().to_string();
            self.record(HistoryEvent::RoleRefused, None, format!("{what}: {e}"));
        }
        result
    }

    fn apply_locked(
        &self,
        source: &Source,
        expected: Option<&str>,
        force: bool,
        staging: &Path,
    ) -> Result<Applied, ServiceError> {
        self.check_space(source)?;
        let folder = match source {
            Source::Folder(dir) => dir.clone(),
            Source::Bundle(path) => {
                std::fs::create_dir_all(staging)
                    .with_context(|| format!("creating {}", staging.display()))?;
                let unpacked = bundle::unpack(path, self.keyring, &staging.join("release"))?;
                self.say(&unpacked.name, &unpacked.version.to_string(), "info", "bundle verified");
                unpacked.dir
            }
        };
        let spec = spec::load(&folder.join(ROLE_FILE));
        let release = spec.as_ref().ok().map(|s| s.role.version.clone());
        let role = match (spec, expected) {
            (_, Some(name)) => name.to_string(),
            (Ok(spec), None) => spec.role.name.0,
            (Err(e), None) => {
                return Ok(self.refused_unreadable(&folder, e));
            }
        };
        let layout = RoleLayout::new(&self.metrica_dir, &role);
        let active = safe_mode::read_marker(&self.metrica_dir).is_some();
        if active {
            self.stop_safe_mode_stack();
        }
        let outcome = match apply::apply(self.engine, &layout, &folder, &self.options(force)) {
            Ok(o) => o,
            Err(e) => {
                if active {
                    self.switch_to_safe_mode();
                }
                return Err(e.into());
            }
        };
        self.record_outcome(&role, release.as_ref(), &outcome);
        let signals = Signals {
            active,
            role: role.clone(),
            consecutive_failures: layout.read_state()?.consecutive_failures,
            good_update: matches!(outcome, Outcome::Committed { .. }),
            ..Signals::default()
        };
        let safe_mode = self.settle(&signals)?;
        if active && safe_mode.is_none() {
            // Still in safe mode: the safe-mode stack runs instead of the role (which a
            // rollback may have brought up again).
            self.switch_to_safe_mode();
        }
        Ok(Applied { role, outcome, safe_mode })
    }

    /// A release folder whose role.toml does not read, applied without `--role`: refused,
    /// named by the folder (no role's state changes).
    fn refused_unreadable(&self, folder: &Path, e: spec::SpecError) -> Applied {
        let role = folder.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let outcome = Outcome::Refused { error: e.into(), recorded: false };
        self.record_outcome(&role, None, &outcome);
        Applied { role, outcome, safe_mode: None }
    }

    /// Run at start, under the lock: finishes every role's interrupted apply
    /// ([`super::apply::recover`]) and brings the right stack up (the safe-mode stack when the
    /// marker says so).
    pub fn recover(&self) -> Result<Vec<(String, Recovery)>, ServiceError> {
        let _lock = self.lock()?;
        remove_dir(&self.roles_dir().join(STAGING_DIR))?;
        let mut out = Vec::new();
        let active = safe_mode::read_marker(&self.metrica_dir).is_some();
        for role in role_names(&self.metrica_dir)? {
            let layout = RoleLayout::new(&self.metrica_dir, &role);
            let recovery = apply::recover(self.engine, &layout, &self.options(false))?;
            let (event, version, what) = match &recovery {
                Recovery::Clean(_) => (None, None, String::new()),
                Recovery::KeptOld { interrupted, running } => {
                    (Some(HistoryEvent::RoleRecovered), Some(interrupted), kept(running))
                }
                Recovery::RolledBack { interrupted, running } => {
                    (Some(HistoryEvent::RoleRolledBack), Some(interrupted), kept(running))
                }
            };
            if let Some(event) = event {
                let reason = format!("role {role}: the apply was interrupted; {what}");
                self.record(event, version, reason);
            }
            if !active {
                let state = layout.read_state()?;
                let s = Signals {
                    role: role.clone(),
                    consecutive_failures: state.consecutive_failures,
                    ..Signals::default()
                };
                self.settle(&s)?;
            }
            out.push((role, recovery));
        }
        if active {
            // Recovery brought the roles' current releases up; safe mode runs its stack instead.
            self.switch_to_safe_mode();
        }
        Ok(out)
    }

    /// An operator's `safe-mode enter|exit`.
    pub fn command(&self, command: Command) -> Result<Option<SafeModeChange>, ServiceError> {
        let _lock = self.lock()?;
        let active = safe_mode::read_marker(&self.metrica_dir).is_some();
        self.settle(&Signals { active, command: Some(command), ..Signals::default() })
    }

    /// Enters safe mode for a reason the daemon found (crash loop, invalid provisioning).
    pub fn enter_safe_mode(&self, reason: &Reason) -> Result<Option<SafeModeChange>, ServiceError> {
        let _lock = self.lock()?;
        let mut s = Signals {
            active: safe_mode::read_marker(&self.metrica_dir).is_some(),
            ..Signals::default()
        };
        match reason {
            Reason::FailedUpdates { count } => s.consecutive_failures = *count,
            Reason::CrashLoop { role } => (s.role, s.crash_loop) = (role.clone(), true),
            Reason::BadProvisioning { error } => s.provisioning_error = Some(error.clone()),
            Reason::Operator => s.command = Some(Command::Enter),
        }
        self.settle(&s)
    }

    /// The roles and safe mode, read without the lock.
    pub fn status(&self) -> anyhow::Result<RolesStatus> {
        // One cheap call that needs the engine: `docker image ls` of a name nobody has.
        let engine_up = match self.engine.image_present("metrica.invalid/engine-probe:0") {
            Ok(_) => true,
            Err(e) => !engine_down(&e),
        };
        let mut roles = Vec::new();
        for name in role_names(&self.metrica_dir)? {
            roles.push(self.role_status(&name, engine_up)?);
        }
        Ok(RolesStatus { roles, safe_mode: safe_mode::read_marker(&self.metrica_dir), engine_up })
    }

    fn role_status(&self, name: &str, engine_up: bool) -> anyhow::Result<RoleStatus> {
        let layout = RoleLayout::new(&self.metrica_dir, name);
        let state = layout.read_state()?;
        let current = layout.read_link(Link::Current)?;
        let previous = layout.read_link(Link::Previous)?;
        let release = current.as_ref().and_then(|v| release_spec(&layout, v).ok());
        let (containers, checks) = match (&release, engine_up) {
            (Some((p, spec)), true) => {
                (self.engine.ps(p).ok(), Some(health::run_checks(self.engine, p, &spec.health)))
            }
            (None, true) => (Some(Vec::new()), None),
            _ => (None, None),
        };
        let checks_pass = checks.iter().flatten().all(|c| c.ok);
        let healthy = containers
            .as_ref()
            .map(|c| !c.is_empty() && c.iter().all(Container::is_up) && checks_pass);
        let v = |v: Option<semver::Version>| v.map(|v| v.to_string());
        Ok(RoleStatus {
            name: name.to_string(),
            current: v(current),
            previous: v(previous),
            committed: v(state.committed),
            pending: v(state.pending),
            failed: state.failed.iter().map(ToString::to_string).collect(),
            consecutive_failures: state.consecutive_failures,
            rollbacks_total: state.rollbacks_total,
            last_error: state.last_error,
            containers,
            checks,
            healthy,
        })
    }
}

/// The service's own steps: the lock, space, history, logs and the switch of stacks.
impl Roles<'_> {
    fn data_dir(&self) -> &Path {
        self.metrica_dir.parent().unwrap_or(&self.metrica_dir)
    }

    fn roles_dir(&self) -> PathBuf {
        self.metrica_dir.join(ROLES_DIR)
    }

    /// The updater's lock; another holder is [`ServiceError::Busy`].
    fn lock(&self) -> Result<nix::fcntl::Flock<std::fs::File>, ServiceError> {
        crate::slot::lock_data_dir(self.data_dir()).map_err(|e| match e.downcast() {
            Ok(busy) => ServiceError::Busy(busy),
            Err(e) => ServiceError::Other(e),
        })
    }

    fn options(&self, force: bool) -> Options<'_> {
        Options {
            os_version: self.os_version.clone(),
            force,
            dev_root: self.dev_root.clone(),
            poll: POLL,
            validate_timeout: VALIDATE_TIMEOUT,
            log: self.log,
        }
    }

    /// A log line of the service: it names the role and version too (empty when unknown).
    fn say(&self, role: &str, version: &str, level: &'static str, msg: &str) {
        (self.log)(&Event {
            role: role.to_string(),
            version: version.to_string(),
            level,
            step: "service",
            msg: msg.to_string(),
        });
    }

    /// Appends to the history; a history that cannot be written is logged, not fatal (the
    /// role's own state file is the record that matters).
    fn record(&self, event: HistoryEvent, version: Option<&semver::Version>, reason: String) {
        let entry = Entry::new(crate::slot::unix_now(), event).version(version).reason(reason);
        if let Err(e) = History::new(self.data_dir()).append(&entry) {
            self.say("", "", "warning", &format!("writing the history: {e:#}"));
        }
    }

    /// The history entry of an apply's outcome. `AlreadyCurrent` changed nothing and is not
    /// recorded (the daemon asks for its target at every poll).
    /// `release`: the version the release names, when its role.toml reads.
    fn record_outcome(&self, role: &str, release: Option<&semver::Version>, outcome: &Outcome) {
        let (event, version, what) = match outcome {
            Outcome::Committed { version, previous } => {
                let prev = previous.as_ref().map_or("none".into(), ToString::to_string);
                (HistoryEvent::RoleApplied, Some(version), format!("committed, previous {prev}"))
            }
            Outcome::AlreadyCurrent(_) => return,
            Outcome::Refused { error, .. } => {
                (HistoryEvent::RoleRefused, release, error.to_string())
            }
            Outcome::RolledBack { version, error, restored } => (
                HistoryEvent::RoleRolledBack,
                Some(version),
                format!("{error}; {}", kept(restored)),
            ),
        };
        let v = version.map(ToString::to_string).unwrap_or_default();
        let level = if event == HistoryEvent::RoleApplied { "info" } else { "error" };
        self.say(role, &v, level, &format!("{event}: {what}"));
        self.record(event, version, format!("role {role}: {what}"));
    }

    /// Refuses a release that would leave less than `min_free_bytes` on /data once unpacked
    /// and loaded: a folder's size (staged copy and loaded images), twice a bundle's (the
    /// unpacked folder and the loaded images).
    fn check_space(&self, source: &Source) -> Result<(), ServiceError> {
        let size = match source {
            Source::Folder(dir) => tree_size(dir)?,
            Source::Bundle(path) => {
                let meta = std::fs::metadata(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                meta.len().saturating_mul(2)
            }
        };
        let dir = self.metrica_dir.clone();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let free = crate::status::disk_free_bytes(&dir)
            .with_context(|| format!("{}: free space unknown", dir.display()))?;
        let need = size.saturating_add(self.min_free_bytes);
        if free < need {
            return Err(ServiceError::NoSpace { dir, free, need });
        }
        Ok(())
    }

    /// Applies [`safe_mode::decide`] and carries its decision out.
    fn settle(&self, signals: &Signals) -> Result<Option<SafeModeChange>, ServiceError> {
        match safe_mode::decide(signals) {
            Decision::Stay => Ok(None),
            Decision::Enter(reason) => {
                safe_mode::write_marker(&self.metrica_dir, reason.clone())?;
                self.say(&signals.role, "", "warning", &format!("safe mode entered: {reason}"));
                self.record(HistoryEvent::SafeModeEnter, None, reason.to_string());
                self.switch_to_safe_mode();
                Ok(Some(SafeModeChange::Entered(reason)))
            }
            Decision::Exit(why) => {
                safe_mode::remove_marker(&self.metrica_dir)?;
                let words = match why {
                    ExitReason::GoodUpdate => format!("a good update of role {}", signals.role),
                    ExitReason::Operator => "left by an operator".to_string(),
                };
                self.say(&signals.role, "", "info", &format!("safe mode left: {words}"));
                self.record(HistoryEvent::SafeModeExit, None, words);
                self.stop_safe_mode_stack();
                self.bring_roles_up()?;
                Ok(Some(SafeModeChange::Left(why)))
            }
        }
    }

    /// Stops every role's stack and starts the safe-mode stack; what fails is logged (safe
    /// mode holds through the marker even when no stack can run).
    fn switch_to_safe_mode(&self) {
        let roles = role_names(&self.metrica_dir).unwrap_or_default();
        for role in &roles {
            if let Some(p) = current_project(&RoleLayout::new(&self.metrica_dir, role)) {
                if let Err(e) = self.engine.down(&p) {
                    self.say(role, "", "error", &format!("stopping the role for safe mode: {e}"));
                }
            }
        }
        self.start_safe_mode_stack();
    }

    fn safe_mode_project(&self) -> Option<(Project, Duration)> {
        let dir = self.safe_mode_stack.as_ref()?;
        match spec::load(&dir.join(ROLE_FILE)) {
            Ok(s) => Some((stack_project(&s, dir), s.apply.wait_timeout.0)),
            Err(e) => {
                self.say("safe-mode", "", "error", &format!("the safe-mode stack: {e}"));
                None
            }
        }
    }

    fn start_safe_mode_stack(&self) {
        let Some((project, wait)) = self.safe_mode_project() else {
            return self.say("safe-mode", "", "error", "no safe-mode stack on this device");
        };
        // Its images, every time: nothing else loads them (a device that never applied a
        // role has none), and a `docker load` of what the engine holds is quick.
        for archive in self.safe_mode_stack.iter().flat_map(|d| apply::image_archives(d)) {
            if let Err(e) = self.engine.load_images(&archive) {
                let msg = format!("loading {}: {e}", archive.display());
                self.say("safe-mode", "", "error", &msg);
            }
        }
        let report = safe_mode::switch_stacks(self.engine, None, &project, wait);
        for e in &report.errors {
            self.say("safe-mode", "", "error", &format!("starting the safe-mode stack: {e}"));
        }
        if !report.engine_up {
            self.say("safe-mode", "", "error", "the container engine is down: no stack runs");
        }
    }

    fn stop_safe_mode_stack(&self) {
        if let Some((project, _)) = self.safe_mode_project() {
            if let Err(e) = self.engine.down(&project) {
                self.say("safe-mode", "", "error", &format!("stopping the safe-mode stack: {e}"));
            }
        }
    }

    /// Brings every role's current release up (finishing any interrupted apply first).
    fn bring_roles_up(&self) -> Result<(), ServiceError> {
        for role in role_names(&self.metrica_dir)? {
            let layout = RoleLayout::new(&self.metrica_dir, &role);
            apply::recover(self.engine, &layout, &self.options(false))?;
        }
        Ok(())
    }
}

/// The compose project of a stack folder that is not under a role's layout (the safe-mode
/// stack baked into the image).
fn stack_project(spec: &RoleSpec, dir: &Path) -> Project {
    Project::for_release(&spec.role.name.0, dir, &spec.role.compose.0)
}

fn release_spec(layout: &RoleLayout, v: &semver::Version) -> anyhow::Result<(Project, RoleSpec)> {
    let dir = layout.release(v);
    let spec = spec::load(&dir.join(ROLE_FILE))?;
    Ok((Project::for_release(&layout.name, &dir, &spec.role.compose.0), spec))
}

fn current_project(layout: &RoleLayout) -> Option<Project> {
    let v = layout.read_link(Link::Current).ok().flatten()?;
    release_spec(layout, &v).ok().map(|(p, _)| p)
}

/// Whether an engine error says the engine itself is unreachable.
fn engine_down(e: &EngineError) -> bool {
    match e {
        EngineError::Unavailable(_) => true,
        EngineError::Failed { stderr, .. } => {
            stderr.contains("Cannot connect to the Docker daemon")
        }
        _ => false,
    }
}

fn kept(running: &Option<semver::Version>) -> String {
    match running {
        Some(v) => format!("release {v} runs"),
        None => "no release runs".into(),
    }
}

fn source_path(source: &Source) -> &Path {
    match source {
        Source::Bundle(p) | Source::Folder(p) => p,
    }
}

fn remove_dir(dir: &Path) -> anyhow::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
    }
}

/// Bytes of the files under `dir`, following links (a release's image archives may be links).
fn tree_size(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for entry in entries {
        let path = entry.with_context(|| format!("reading {}", dir.display()))?.path();
        let meta =
            std::fs::metadata(&path).with_context(|| format!("reading {}", path.display()))?;
        total += if meta.is_dir() { tree_size(&path)? } else { meta.len() };
    }
    Ok(total)
}

/// The roles on the device: the folders under `metrica_dir/roles` (those named like a role;
/// the staging folder and temporary files are not).
pub fn role_names(metrica_dir: &Path) -> anyhow::Result<Vec<String>> {
    let dir = metrica_dir.join(ROLES_DIR);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.path().is_dir() && RoleName::try_from(name.clone()).is_ok() {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests;
