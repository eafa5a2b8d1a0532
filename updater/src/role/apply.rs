//! One role release applied, as a short chain of steps:
//!
//! check -> stage (copy into `releases/VERSION`) -> load images (the old stack keeps running)
//! -> validate (devices, pins, limits, `compose config -q`, the role's own command) -> switch
//! `current` -> `up --wait` -> health checks -> probation -> commit; or, after the switch, roll
//! back: `current` back to `previous`, and that stack up again.
//!
//! Each step passes a named failpoint (`role-stage`, `role-load-images`, `role-validate`,
//! `role-switch`, `role-up`, `role-health`, `role-probation`, `role-commit`,
//! `role-rollback`). The role's state file records `pending` before `current` moves, so that
//! [`recover`], run at start, finds an apply cut short and leaves the old or the new release
//! running. A version that failed is recorded and not applied again unless forced.
//! The caller holds the updater's lock around [`apply`] and [`recover`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use thiserror::Error;

use super::engine::{Engine, EngineError, Project};
use super::health::{self, CheckResult};
use super::layout::{Link, RoleLayout, RoleState};
use super::limits::{self, LIMITS_FILE};
use super::spec::{self, RoleSpec, SpecError, ROLE_FILE};
use crate::failpoint;

/// The failpoints a successful apply passes, in order (a rollback passes `role-rollback`).
pub const STEPS: [&str; 8] = [
    "role-stage",
    "role-load-images",
    "role-validate",
    "role-switch",
    "role-up",
    "role-health",
    "role-probation",
    "role-commit",
];

/// A release's image archives (`docker save`), in the bundle's folder.
pub const IMAGES_DIR: &str = "images";

/// Why a release was refused or rolled back. The running role is untouched by a refusal.
#[derive(Debug, Error)]
pub enum ApplyError {
    #[error("invalid role description: {0}")]
    Spec(#[from] SpecError),
    #[error("the release is for role {found}, not {expected}")]
    WrongRole { expected: String, found: String },
    #[error("release {version} needs OS {range}, this device runs {os}")]
    IncompatibleOs { version: semver::Version, range: semver::VersionReq, os: semver::Version },
    #[error("release {0} failed before and is not applied again unless forced")]
    FailedBefore(semver::Version),
    #[error("the role needs device {0}, which is absent")]
    MissingDevice(PathBuf),
    #[error("loading images from {archive}: {source}")]
    ImageLoad { archive: PathBuf, source: EngineError },
    #[error("the compose file does not validate: {0}")]
    Compose(EngineError),
    #[error(
        "service {service}: image {image:?} is neither pinned by digest nor `pull_policy: never`"
    )]
    Unpinned { service: String, image: String },
    #[error("service {service}: image {image} is not on the device (nothing is pulled)")]
    ImageMissing { service: String, image: String },
    #[error("{0}")]
    Limits(String),
    #[error("the role's validation {command} failed: {detail}")]
    Validation { command: String, detail: String },
    #[error("bringing the stack up: {0}")]
    Up(EngineError),
    #[error("health checks failed: {}", describe_checks(.0))]
    Unhealthy(Vec<CheckResult>),
    #[error("probation: {0}")]
    Probation(String),
    #[error("the container engine: {0}")]
    Engine(EngineError),
    #[error("the previous apply of {0} was interrupted")]
    Interrupted(semver::Version),
    /// A simulated power cut (tests): the apply stops there, as the process would.
    #[error(transparent)]
    PowerCut(#[from] failpoint::PowerCut),
}

fn describe_checks(r: &[CheckResult]) -> String {
    r.iter().map(|c| format!("{}: {}", c.check, c.detail)).collect::<Vec<_>>().join("; ")
}

/// How an apply ended (errors of the updater itself, and power cuts, are `Err`).
#[derive(Debug)]
pub enum Outcome {
    /// The release runs and is committed.
    Committed { version: semver::Version, previous: Option<semver::Version> },
    /// The release already runs; nothing was done.
    AlreadyCurrent(semver::Version),
    /// Refused before anything changed. `recorded`: counted as a failed update of this role.
    Refused { error: ApplyError, recorded: bool },
    /// Failed after the switch; `restored` runs again (or nothing, when there was none).
    RolledBack { version: semver::Version, error: ApplyError, restored: Option<semver::Version> },
}

/// One line of the apply's log: every line names the role and the version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub role: String,
    pub version: String,
    pub level: &'static str,
    pub step: &'static str,
    pub msg: String,
}

/// What the apply needs to know of the device.
pub struct Options<'a> {
    pub os_version: semver::Version,
    /// Applies a version that failed before.
    pub force: bool,
    /// The root under which required devices are looked for (`/` on a device).
    pub dev_root: PathBuf,
    /// Interval of the health and probation polls.
    pub poll: Duration,
    /// Limit of the role's validation command.
    pub validate_timeout: Duration,
    pub log: &'a dyn Fn(&Event),
}

impl std::fmt::Debug for Options<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("os_version", &self.os_version)
            .field("force", &self.force)
            .finish()
    }
}

/// The step context: who logs what.
struct Ctx<'a, 'o> {
    engine: &'a dyn Engine,
    layout: &'a RoleLayout,
    opts: &'a Options<'o>,
    version: semver::Version,
}

impl Ctx<'_, '_> {
    fn log(&self, level: &'static str, step: &'static str, msg: impl Into<String>) {
        (self.opts.log)(&Event {
            role: self.layout.name.clone(),
            version: self.version.to_string(),
            level,
            step,
            msg: msg.into(),
        });
    }

    fn project(&self, spec: &RoleSpec, version: &semver::Version) -> Project {
        Project::for_release(&self.layout.name, &self.layout.release(version), &spec.role.compose.0)
    }
}

/// Applies the release in `source` (a verified, unpacked bundle folder: `role.toml`, the
/// compose file, its files, `images/*.tar`) to the role of `layout`.
pub fn apply(
    engine: &dyn Engine,
    layout: &RoleLayout,
    source: &Path,
    opts: &Options,
) -> Result<Outcome> {
    let spec = match spec::load(&source.join(ROLE_FILE)) {
        Ok(s) => s,
        Err(e) => return Ok(Outcome::Refused { error: e.into(), recorded: false }),
    };
    let cx = Ctx { engine, layout, opts, version: spec.role.version.clone() };
    let mut state = layout.read_state()?;
    if let Some(done) = check(&cx, &spec, &state)? {
        cx.log("warning", "check", outcome_words(&done));
        return Ok(done);
    }
    cx.log("info", "stage", format!("applying release {} of role {}", cx.version, layout.name));
    stage(&cx, source)?;
    if let Err(error) = prepare(&cx, &spec, source) {
        if let ApplyError::PowerCut(cut) = error {
            return Err(cut.into());
        }
        cx.log("error", "validate", format!("refused: {error}"));
        record_failure(&mut state, &cx.version, &error, true);
        layout.write_state(&state)?;
        return Ok(Outcome::Refused { error, recorded: true });
    }
    let previous = switch(&cx, &mut state)?;
    match bring_up(&cx, &spec) {
        Ok(()) => {
            commit(&cx, &mut state, previous.as_ref())?;
            Ok(Outcome::Committed { version: cx.version.clone(), previous })
        }
        Err(error) => roll_back(&cx, &mut state, error, true),
    }
}

fn outcome_words(o: &Outcome) -> String {
    match o {
        Outcome::AlreadyCurrent(v) => format!("release {v} already runs"),
        Outcome::Refused { error, .. } => format!("refused: {error}"),
        other => format!("{other:?}"),
    }
}

/// The checks that need no work: right role, compatible OS, not failed before, not running.
fn check(cx: &Ctx, spec: &RoleSpec, state: &RoleState) -> Result<Option<Outcome>> {
    let v = &cx.version;
    let refuse = |error| Ok(Some(Outcome::Refused { error, recorded: false }));
    if spec.role.name.0 != cx.layout.name {
        return refuse(ApplyError::WrongRole {
            expected: cx.layout.name.clone(),
            found: spec.role.name.0.clone(),
        });
    }
    if !spec.role.os.matches(&cx.opts.os_version) {
        let e = ApplyError::IncompatibleOs {
            version: v.clone(),
            range: spec.role.os.clone(),
            os: cx.opts.os_version.clone(),
        };
        return refuse(e);
    }
    if state.failed.contains(v) && !cx.opts.force {
        return refuse(ApplyError::FailedBefore(v.clone()));
    }
    if state.committed.as_ref() == Some(v)
        && cx.layout.read_link(Link::Current)?.as_ref() == Some(v)
    {
        return Ok(Some(Outcome::AlreadyCurrent(v.clone())));
    }
    Ok(None)
}

/// Copies the release (without its image archives, which the engine keeps once loaded) into
/// `releases/VERSION`, through a temporary folder renamed into place.
fn stage(cx: &Ctx, source: &Path) -> Result<()> {
    failpoint::hit("role-stage")?;
    let dest = cx.layout.release(&cx.version);
    if dest == source {
        return Ok(());
    }
    let releases = cx.layout.releases();
    let tmp = releases.join(format!(".{}.tmp", cx.version));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    copy_tree(source, &tmp, true)
        .with_context(|| format!("copying the release into {}", tmp.display()))?;
    if dest.exists() {
        std::fs::remove_dir_all(&dest)
            .with_context(|| format!("removing the old {}", dest.display()))?;
    }
    std::fs::rename(&tmp, &dest).with_context(|| format!("renaming {}", tmp.display()))?;
    super::layout::sync_dir(&releases)
}

fn copy_tree(from: &Path, to: &Path, top: bool) -> std::io::Result<()> {
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type()?;
        if top && entry.file_name() == IMAGES_DIR {
            continue;
        }
        if kind.is_dir() {
            std::fs::create_dir(&dst)?;
            copy_tree(&src, &dst, false)?;
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
        } else {
            std::fs::copy(&src, &dst)?;
            std::fs::File::open(&dst)?.sync_all()?;
        }
    }
    std::fs::File::open(to)?.sync_all()
}

/// Everything that can refuse the release while the old stack keeps running.
fn prepare(cx: &Ctx, spec: &RoleSpec, source: &Path) -> Result<(), ApplyError> {
    if let Some(dev) = spec
        .devices
        .required
        .iter()
        .find(|d| !cx.opts.dev_root.join(d.0.strip_prefix("/").unwrap_or(&d.0)).exists())
    {
        return Err(ApplyError::MissingDevice(dev.0.clone()));
    }
    failpoint::hit("role-load-images")?;
    for archive in image_archives(source) {
        cx.log("info", "load-images", format!("loading {}", archive.display()));
        cx.engine
            .load_images(&archive)
            .map_err(|source| ApplyError::ImageLoad { archive, source })?;
    }
    failpoint::hit("role-validate")?;
    validate(cx, spec)
}

/// The image archives (`images/*.tar`) of a release or stack folder, in name order.
pub(crate) fn image_archives(source: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(source.join(IMAGES_DIR))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "tar"))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Compose model, pins, limits file, `config -q`, and the role's own validation command.
fn validate(cx: &Ctx, spec: &RoleSpec) -> Result<(), ApplyError> {
    let dir = cx.layout.release(&cx.version);
    let _ = std::fs::remove_file(dir.join(LIMITS_FILE));
    let bare = cx.project(spec, &cx.version);
    let model = cx.engine.config(&bare).map_err(ApplyError::Compose)?;
    for (service, svc) in &model.services {
        let image = svc.image.clone().unwrap_or_default();
        let pinned = image.contains("@sha256:") || svc.pull_policy.as_deref() == Some("never");
        if svc.build.is_some() || image.is_empty() || !pinned {
            return Err(ApplyError::Unpinned { service: service.clone(), image });
        }
        if !cx.engine.image_present(&image).map_err(ApplyError::Engine)? {
            return Err(ApplyError::ImageMissing { service: service.clone(), image });
        }
    }
    let names = model.services.keys().cloned().collect();
    if let Some(doc) = limits::document(&spec.resources, &names).map_err(ApplyError::Limits)? {
        let text =
            serde_json::to_vec_pretty(&doc).map_err(|e| ApplyError::Limits(e.to_string()))?;
        std::fs::write(dir.join(LIMITS_FILE), text)
            .map_err(|e| ApplyError::Limits(format!("writing {LIMITS_FILE}: {e}")))?;
    }
    cx.engine.config_check(&cx.project(spec, &cx.version)).map_err(ApplyError::Compose)?;
    match &spec.role.validate {
        Some(argv) => run_validation(cx, &dir, &argv.0),
        None => Ok(()),
    }
}

fn run_validation(cx: &Ctx, dir: &Path, argv: &[String]) -> Result<(), ApplyError> {
    let command = argv.join(" ");
    let mut cmd = std::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .current_dir(dir)
        .env("METRICA_ROLE", &cx.layout.name)
        .env("METRICA_ROLE_VERSION", cx.version.to_string())
        .env("METRICA_DEV_ROOT", &cx.opts.dev_root);
    super::docker::run_checked(cmd, cx.opts.validate_timeout)
        .map(drop)
        .map_err(|e| ApplyError::Validation { command, detail: e.to_string() })
}

/// Records `pending`, then moves `previous` to the old current and `current` to the new one.
fn switch(cx: &Ctx, state: &mut RoleState) -> Result<Option<semver::Version>> {
    state.pending = Some(cx.version.clone());
    cx.layout.write_state(state)?;
    failpoint::hit("role-switch")?;
    let old = cx.layout.read_link(Link::Current)?.filter(|o| *o != cx.version);
    if let Some(old) = &old {
        cx.layout.set_link(Link::Previous, old)?;
    }
    cx.layout.set_link(Link::Current, &cx.version)?;
    cx.log("info", "switch", format!("current -> {}", cx.version));
    Ok(old.or(cx.layout.read_link(Link::Previous)?))
}

/// `up --wait`, the role's health checks, then the probation watch.
fn bring_up(cx: &Ctx, spec: &RoleSpec) -> Result<(), ApplyError> {
    let project = cx.project(spec, &cx.version);
    failpoint::hit("role-up")?;
    cx.engine.up(&project, spec.apply.wait_timeout.0).map_err(ApplyError::Up)?;
    failpoint::hit("role-health")?;
    let checks = health::wait_healthy(
        cx.engine,
        &project,
        &spec.health,
        spec.apply.health_timeout.0,
        cx.opts.poll,
    )
    .map_err(ApplyError::Unhealthy)?;
    cx.log("info", "health", format!("{} health checks pass", checks.len()));
    failpoint::hit("role-probation")?;
    health::probation(cx.engine, &project, spec.apply.probation.0, cx.opts.poll)
        .map_err(ApplyError::Probation)
}

fn commit(cx: &Ctx, state: &mut RoleState, previous: Option<&semver::Version>) -> Result<()> {
    failpoint::hit("role-commit")?;
    state.committed = Some(cx.version.clone());
    state.pending = None;
    state.consecutive_failures = 0;
    state.last_error = None;
    state.failed.retain(|f| *f != cx.version);
    cx.layout.write_state(state)?;
    cx.log("info", "commit", format!("release {} committed", cx.version));
    // Only the current and previous releases are kept.
    let keep: Vec<&semver::Version> = std::iter::once(&cx.version).chain(previous).collect();
    for old in cx.layout.other_releases(&keep)? {
        let _ = std::fs::remove_dir_all(cx.layout.release(&old));
    }
    Ok(())
}

fn record_failure(
    state: &mut RoleState,
    v: &semver::Version,
    error: &ApplyError,
    mark_failed: bool,
) {
    if mark_failed && !state.failed.contains(v) {
        state.failed.push(v.clone());
    }
    state.consecutive_failures += 1;
    state.last_error = Some(error.to_string());
}

/// After a failed switch: records the failure when `record` (keeping `pending`, so a cut here is finished
/// by [`recover`]), puts `current` back on `previous` and brings that stack up, then clears
/// `pending`. With no previous release, the failed stack is stopped and `current` removed.
fn roll_back(cx: &Ctx, state: &mut RoleState, error: ApplyError, record: bool) -> Result<Outcome> {
    if let ApplyError::PowerCut(cut) = error {
        return Err(cut.into());
    }
    cx.log("error", "rollback", format!("release {} failed: {error}", cx.version));
    let interrupted = matches!(error, ApplyError::Interrupted(_));
    if record {
        record_failure(state, &cx.version, &error, !interrupted);
    }
    cx.layout.write_state(state)?;
    failpoint::hit("role-rollback")?;
    let previous = cx.layout.read_link(Link::Previous)?.filter(|p| *p != cx.version);
    let failed_spec = spec::load(&cx.layout.release(&cx.version).join(ROLE_FILE)).ok();
    if let Some(prev) = &previous {
        cx.layout.set_link(Link::Current, prev)?;
        restore(cx, prev);
        state.rollbacks_total += 1;
    } else {
        if let Some(s) = &failed_spec {
            let _ = cx.engine.down(&cx.project(s, &cx.version));
        }
        remove_current(cx.layout)?;
    }
    state.pending = None;
    cx.layout.write_state(state)?;
    Ok(Outcome::RolledBack { version: cx.version.clone(), error, restored: previous })
}

/// Brings the previous release up again; its health is logged (the rollback stands either
/// way: there is nothing older to go to).
fn restore(cx: &Ctx, prev: &semver::Version) {
    let spec = match spec::load(&cx.layout.release(prev).join(ROLE_FILE)) {
        Ok(s) => s,
        Err(e) => {
            return cx.log("error", "rollback", format!("previous release {prev} unreadable: {e}"))
        }
    };
    let project = cx.project(&spec, prev);
    let healthy =
        cx.engine.up(&project, spec.apply.wait_timeout.0).map_err(|e| e.to_string()).and_then(
            |()| {
                health::wait_healthy(
                    cx.engine,
                    &project,
                    &spec.health,
                    spec.apply.health_timeout.0,
                    cx.opts.poll,
                )
                .map_err(|r| describe_checks(&r))
            },
        );
    match healthy {
        Ok(_) => cx.log("info", "rollback", format!("release {prev} runs again and is healthy")),
        Err(e) => {
            cx.log("error", "rollback", format!("release {prev} is back but not healthy: {e}"));
        }
    }
}

fn remove_current(layout: &RoleLayout) -> Result<()> {
    let path = layout.root.join("current");
    match std::fs::remove_file(&path) {
        Ok(()) => super::layout::sync_dir(&layout.root),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

/// What [`recover`] found and did.
#[derive(Debug, PartialEq, Eq)]
pub enum Recovery {
    /// Nothing was pending: `current` (if any) was brought up.
    Clean(Option<semver::Version>),
    /// An apply was cut before `current` moved, or during its rollback: the old release runs.
    KeptOld { interrupted: semver::Version, running: Option<semver::Version> },
    /// An apply was cut after `current` moved: it was rolled back.
    RolledBack { interrupted: semver::Version, running: Option<semver::Version> },
}

/// Run at start, under the lock: finishes what a power cut interrupted, so that the old or
/// the new release runs, and brings the current stack up.
pub fn recover(engine: &dyn Engine, layout: &RoleLayout, opts: &Options) -> Result<Recovery> {
    let mut state = layout.read_state()?;
    let current = layout.read_link(Link::Current)?;
    let Some(pending) = state.pending.clone() else {
        if let Some(c) = &current {
            bring_up_current(engine, layout, c, opts);
        }
        return Ok(Recovery::Clean(current));
    };
    let cx = Ctx { engine, layout, opts, version: pending.clone() };
    if current.as_ref() == Some(&pending) {
        cx.log(
            "warning",
            "recover",
            format!("the apply of {pending} was interrupted: rolling back"),
        );
        // A failure already recorded means the cut came during the rollback itself.
        let record = !state.failed.contains(&pending);
        let running =
            match roll_back(&cx, &mut state, ApplyError::Interrupted(pending.clone()), record)? {
                Outcome::RolledBack { restored, .. } => restored,
                _ => None,
            };
        return Ok(Recovery::RolledBack { interrupted: pending, running });
    }
    cx.log(
        "warning",
        "recover",
        format!("the apply of {pending} was interrupted before the switch"),
    );
    state.pending = None;
    layout.write_state(&state)?;
    if let Some(c) = &current {
        bring_up_current(engine, layout, c, opts);
    }
    Ok(Recovery::KeptOld { interrupted: pending, running: current })
}

fn bring_up_current(engine: &dyn Engine, layout: &RoleLayout, v: &semver::Version, opts: &Options) {
    let cx = Ctx { engine, layout, opts, version: v.clone() };
    match spec::load(&layout.release(v).join(ROLE_FILE)) {
        Ok(spec) => {
            if let Err(e) = engine.up(&cx.project(&spec, v), spec.apply.wait_timeout.0) {
                cx.log("error", "recover", format!("bringing release {v} up: {e}"));
            }
        }
        Err(e) => cx.log("error", "recover", format!("release {v} unreadable: {e}")),
    }
}

#[cfg(test)]
mod tests;
