//! The daemon's side of roles: [`RoleRunner`] runs the device's provisioned role from the
//! channel, through the roles service ([`crate::role::service::Roles`]).
//!
//! At start ([`RoleRunner::start`]): the service recovers every interrupted apply; the
//! safe-mode stack baked into the root filesystem ([`BAKED_SAFE_MODE`]) is unpacked into
//! `/data/metrica/safe-mode-stack` (again only when the baked file changed: a new OS);
//! invalid provisioning enters safe mode; and a device whose role has no current release
//! applies the release of its role baked into the image, if there is one (offline first boot).
//!
//! Each poll ([`RoleRunner::cycle`], after the OS decision, outside the OS lock: the service
//! takes the lock itself):
//! 1. the crash-loop watch samples the role's restart count ([`restart_total`]); `N` restarts
//!    in `M` minutes (the release's `[crash_loop]`) rolls back to the previous release when it
//!    ran well (committed, never failed), else enters safe mode;
//! 2. the channel's `[roles.NAME]` target is decided by [`crate::rollout::decide_role`] (the
//!    OS rules: percent, segments, waves, pause, overrides, failed versions, throttle);
//! 3. an install downloads the bundle ([`crate::role::download::fetch_bundle`], resumable)
//!    and applies it through the service.
//!
//! A version that failed (refused, rolled back, crash-looping, a bundle that does not
//! verify) is put on the runner's failed list and never taken again automatically; each
//! failure is reported once (log, record), not at every poll. What the runner knows lives in
//! `/data/metrica/role-daemon.json` ([`RoleRecord`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::channel::{Channel, Segment};
use crate::daemon_record::NamedError;
use crate::log::Log;
use crate::role::apply::{ApplyError, Event, Outcome};
use crate::role::download::{self, DownloadError, Expected, HttpOptions};
use crate::role::engine::{Engine, EngineError, Project};
use crate::role::health::CrashLoopWatch;
use crate::role::layout::{Link, RoleLayout};
use crate::role::safe_mode::{self, Reason};
use crate::role::service::{Applied, Roles, SafeModeChange, ServiceError, Source};
use crate::role::spec::{self, ROLE_FILE};
pub use crate::role_report::{BakedStack, RoleDecision, RoleRecord, RECORD};
use crate::rollout;
use crate::sign::Keyring;

pub use crate::role::service::SAFE_MODE_STACK;

/// The role of the safe-mode stack (its baked bundle is `baked_path(SAFE_MODE_ROLE)`).
pub const SAFE_MODE_ROLE: &str = "safe-mode";

/// The baked bundle of `role` under the system root `sysroot`.
pub fn baked_bundle(sysroot: &Path, role: &str) -> PathBuf {
    let path = crate::role::bundle::baked_path(role);
    sysroot.join(path.strip_prefix("/").unwrap_or(&path))
}
/// Downloaded role bundles, under `/data/metrica`.
pub const DOWNLOADS: &str = "role-downloads";
/// Limit of each engine call the endpoints make.
pub const STATUS_ENGINE_TIMEOUT: Duration = Duration::from_secs(5);
/// Errors kept in the record.
const KEEP_ERRORS: usize = 10;

/// What the runner needs to know of the device.
#[derive(Debug, Clone)]
pub struct RoleConfig {
    /// `/data/metrica`.
    pub metrica_dir: PathBuf,
    /// The system root (`/`): the baked bundles are under it.
    pub sysroot: PathBuf,
    /// The provisioned role, or why the provisioning is invalid (then: safe mode).
    pub role: Result<String, String>,
    pub device_id: String,
    pub segment: Segment,
    pub overrides: rollout::Overrides,
    pub os_version: semver::Version,
    /// Where required devices are looked for (`/`).
    pub dev_root: PathBuf,
    pub min_free_bytes: u64,
    pub http: HttpOptions,
}

/// What one cycle did, for callers and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CycleOutcome {
    /// Provisioning is invalid or absent: the role is not run (safe mode).
    NoRole,
    /// The role crash-looped: rolled back (`true`) or safe mode asked (`false`).
    CrashLoop {
        rolled_back: bool,
    },
    Stayed {
        code: String,
    },
    /// A version was taken: downloaded and applied (`Ok` carries how it ended).
    Took {
        version: semver::Version,
        result: Result<String, String>,
    },
}

/// See the module documentation.
pub struct RoleRunner {
    pub cfg: RoleConfig,
    pub engine: Arc<dyn Engine + Send + Sync>,
    pub keyring: Keyring,
    pub record: RoleRecord,
    /// The engine the endpoints ask (a short timeout: a hung engine must not hold the
    /// endpoints for minutes); `engine` when `None`.
    pub status_engine: Option<Arc<dyn Engine + Send + Sync>>,
    /// The verified channel of this poll and its URL (relative bundle URLs resolve on it).
    channel: Option<(Arc<Channel>, String)>,
    watch: Option<(semver::Version, CrashLoopWatch)>,
}

/// The roles service of the device `cfg` describes.
fn service<'a>(
    cfg: &RoleConfig,
    engine: &'a dyn Engine,
    keyring: &'a Keyring,
    log: &'a dyn Fn(&Event),
) -> Roles<'a> {
    let stack = cfg.metrica_dir.join(SAFE_MODE_STACK);
    Roles {
        metrica_dir: cfg.metrica_dir.clone(),
        engine,
        keyring,
        os_version: cfg.os_version.clone(),
        dev_root: cfg.dev_root.clone(),
        safe_mode_stack: stack.join(ROLE_FILE).exists().then_some(stack),
        min_free_bytes: cfg.min_free_bytes,
        log,
    }
}

/// The service's log lines in the daemon's log: every one names the role and the version.
fn event_logger(log: &Log) -> impl Fn(&Event) + '_ {
    move |e: &Event| {
        log.line(
            e.level,
            &format!("role_{}", e.step),
            &e.msg,
            serde_json::json!({ "role": e.role, "version": e.version }),
        );
    }
}

impl RoleRunner {
    pub fn new(cfg: RoleConfig, engine: Arc<dyn Engine + Send + Sync>, keyring: Keyring) -> Self {
        let record = RoleRecord::load(&cfg.metrica_dir);
        RoleRunner { cfg, engine, keyring, record, status_engine: None, channel: None, watch: None }
    }

    /// The service, as this device has it.
    pub fn roles<'a>(&'a self, log: &'a dyn Fn(&Event)) -> Roles<'a> {
        service(&self.cfg, self.engine.as_ref(), &self.keyring, log)
    }

    fn save(&self, log: &Log) {
        if let Err(e) = self.record.save(&self.cfg.metrica_dir) {
            log.error("role_record_save_failed", &format!("{e:#}"), serde_json::json!({}));
        }
    }

    /// Records an error and logs it, once per `key` (later repeats are debug lines).
    fn report(&mut self, log: &Log, now: u64, key: &str, kind: &str, message: String) {
        if self.record.reported.insert(key.to_string()) {
            log.error(kind, &message, serde_json::json!({ "key": key }));
            self.record.errors.push(NamedError { time: now, kind: kind.into(), message });
            let excess = self.record.errors.len().saturating_sub(KEEP_ERRORS);
            self.record.errors.drain(..excess);
        } else {
            log.debug(kind, &format!("(reported before) {message}"), serde_json::json!({}));
        }
    }

    /// The start of the daemon: recovery, the safe-mode stack, provisioning, first boot.
    pub fn start(&mut self, log: &Log, now: u64) {
        let events = event_logger(log);
        match self.roles(&events).recover() {
            Ok(done) => {
                for (role, r) in done {
                    let msg = format!("role {role}: {r:?}");
                    log.info("role_recovered", &msg, serde_json::json!({ "role": role }));
                }
            }
            Err(e) => self.service_error(log, now, "recover", &e),
        }
        self.prepare_safe_mode_stack(log, now);
        let role = match self.cfg.role.clone() {
            Ok(r) => r,
            Err(error) => {
                self.enter_safe_mode(log, now, &Reason::BadProvisioning { error });
                self.save(log);
                return;
            }
        };
        self.first_boot(log, now, &role);
        self.save(log);
    }

    /// Unpacks the baked safe-mode stack into `/data/metrica/safe-mode-stack` when the baked
    /// file is new (first start, or a new OS).
    fn prepare_safe_mode_stack(&mut self, log: &Log, now: u64) {
        let baked = baked_bundle(&self.cfg.sysroot, SAFE_MODE_ROLE);
        let Ok(meta) = std::fs::metadata(&baked) else {
            let msg = format!("{}: no baked safe-mode stack in this image", baked.display());
            self.report(log, now, "safe-mode-stack:missing", "safe_mode_stack_missing", msg);
            return;
        };
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        let key = format!("{}:{mtime}", meta.len());
        let dir = self.cfg.metrica_dir.join(SAFE_MODE_STACK);
        let current = self.record.safe_mode_stack.as_ref();
        if current.is_some_and(|s| s.key == key) && dir.join(ROLE_FILE).exists() {
            return;
        }
        match unpack_stack(&baked, &self.keyring, &dir) {
            Ok(version) => {
                log.info(
                    "safe_mode_stack_ready",
                    &format!("safe-mode stack {version} unpacked into {}", dir.display()),
                    serde_json::json!({ "role": "safe-mode", "version": version }),
                );
                self.record.safe_mode_stack = Some(BakedStack { key, version });
            }
            Err(e) => {
                let k = format!("safe-mode-stack:{key}");
                self.report(log, now, &k, "safe_mode_stack_failed", format!("{e:#}"));
            }
        }
    }

    /// Applies the baked release of `role` when the role has none yet (a new device, maybe
    /// offline).
    fn first_boot(&mut self, log: &Log, now: u64, role: &str) {
        let layout = RoleLayout::new(&self.cfg.metrica_dir, role);
        if !matches!(layout.read_link(Link::Current), Ok(None)) {
            return;
        }
        let baked = baked_bundle(&self.cfg.sysroot, role);
        if !baked.exists() {
            let msg = format!(
                "role {role} has no release and the image bakes none ({}): waiting for the channel",
                baked.display()
            );
            log.info("role_first_boot", &msg, serde_json::json!({ "role": role }));
            return;
        }
        log.info(
            "role_first_boot",
            &format!("role {role} has no release: applying the baked {}", baked.display()),
            serde_json::json!({ "role": role }),
        );
        let events = event_logger(log);
        let result = self.roles(&events).apply(&Source::Bundle(baked), false);
        let key = format!("{role}@baked");
        let _ = self.settle(log, now, role, &key, result);
    }

    /// Takes this poll's verified channel (`None`: no good document) and its URL.
    pub fn offer(&mut self, channel: Option<Arc<Channel>>, doc_url: String) {
        self.channel = channel.map(|c| (c, doc_url));
    }

    /// One poll's work for the role (module documentation).
    pub fn cycle(&mut self, log: &Log, now: u64) -> CycleOutcome {
        let outcome = self.cycle_inner(log, now);
        self.save(log);
        outcome
    }

    fn cycle_inner(&mut self, log: &Log, now: u64) -> CycleOutcome {
        let Ok(role) = self.cfg.role.clone() else { return CycleOutcome::NoRole };
        let in_safe_mode = safe_mode::read_marker(&self.cfg.metrica_dir).is_some();
        if !in_safe_mode {
            if let Some(rolled_back) = self.watch_crash_loop(log, now, &role) {
                return CycleOutcome::CrashLoop { rolled_back };
            }
        }
        let Some((channel, doc_url)) = self.channel.clone() else {
            return CycleOutcome::Stayed { code: "no_channel".into() };
        };
        let decision = self.decide(&channel, &role, now);
        let (code, reason) = (decision.code().to_string(), decision.to_string());
        let version = match &decision {
            rollout::Decision::Install { version, .. } => Some(version.to_string()),
            rollout::Decision::Stay { .. } => None,
        };
        let changed = self.record.decision.as_ref().is_none_or(|d| d.code != code);
        self.record.decision = Some(RoleDecision {
            time: now,
            role: role.clone(),
            code: code.clone(),
            reason,
            version,
        });
        match decision {
            rollout::Decision::Stay { reason } => {
                if changed {
                    let msg = format!("role {role}: {reason}");
                    log.info(
                        "role_decision",
                        &msg,
                        serde_json::json!({ "role": role, "code": code }),
                    );
                }
                CycleOutcome::Stayed { code }
            }
            rollout::Decision::Install { version, urls, size, sha256, reason, .. } => {
                log.info(
                    "role_decision",
                    &format!("role {role}: take {version}: {reason}"),
                    serde_json::json!({ "role": role, "version": version.to_string(), "code": code }),
                );
                let urls: Vec<String> =
                    urls.iter().map(|u| crate::channel::resolve_url(&doc_url, u)).collect();
                let result =
                    self.take(log, now, &role, &version, &urls, &Expected { size, sha256 });
                CycleOutcome::Took { version, result }
            }
        }
    }

    /// The rollout's decision for the role, with its running version and its failures.
    fn decide(&self, channel: &Channel, role: &str, now: u64) -> rollout::Decision {
        let layout = RoleLayout::new(&self.cfg.metrica_dir, role);
        let state = layout.read_state().unwrap_or_default();
        let mut failed: BTreeSet<semver::Version> = state.failed.iter().cloned().collect();
        failed.extend(self.record.failed_versions(role));
        let device = rollout::Device {
            device_id: self.cfg.device_id.clone(),
            segment: self.cfg.segment,
            facts: rollout::DeviceFacts {
                compatible: String::new(),
                committed_version: layout.read_link(Link::Current).ok().flatten(),
                security_epoch: 0,
                pinned_version: None,
            },
        };
        let history = rollout::AttemptHistory {
            last_attempt: self.record.last_attempt,
            last_failure: self.record.last_failure,
            failed_versions: failed,
        };
        rollout::decide_role(channel, role, &device, &self.cfg.overrides, &history, now)
    }

    /// Downloads the version (first URL that works) and applies it.
    fn take(
        &mut self,
        log: &Log,
        now: u64,
        role: &str,
        version: &semver::Version,
        urls: &[String],
        expected: &Expected,
    ) -> Result<String, String> {
        self.record.last_attempt = Some(now);
        let key = format!("{role}@{version}");
        let dir = self.cfg.metrica_dir.join(DOWNLOADS);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            let msg = format!("creating {}: {e}", dir.display());
            self.fail(log, now, &key, "disk", msg.clone(), false);
            return Err(msg);
        }
        let dest = dir.join(format!("{role}-{version}.{}", crate::role::bundle::EXTENSION));
        remove_other_downloads(&dir, &dest);
        let mut last: Option<DownloadError> = None;
        for url in urls {
            let mut step = 0u64;
            let mut progress = |done: u64, total: u64| {
                let tenth = done * 10 / total.max(1);
                if tenth > step {
                    step = tenth;
                    let msg = format!("role {role} {version}: {done} of {total} bytes");
                    log.info(
                        "role_download",
                        &msg,
                        serde_json::json!({ "role": role, "version": version.to_string() }),
                    );
                }
            };
            match download::fetch_bundle(url, &dest, expected, &self.cfg.http, &mut progress) {
                Ok(_) => {
                    last = None;
                    break;
                }
                Err(e) => {
                    log.warn(
                        "role_download_failed",
                        &e.to_string(),
                        serde_json::json!({ "role": role, "version": version.to_string(), "kind": e.kind() }),
                    );
                    last = Some(e);
                }
            }
        }
        if urls.is_empty() {
            last = Some(DownloadError::Fetch(crate::bundle::FetchError::Transport {
                url: String::new(),
                message: format!("the channel gives no URL for role {role} {version}"),
            }));
        }
        if let Some(e) = last {
            // The channel said what the file must be: a mismatch is not retried.
            let permanent = matches!(e, DownloadError::Hash { .. } | DownloadError::BadExpected(_));
            let msg = format!("role {role} {version}: download: {e}");
            self.fail(log, now, &key, &format!("role_{}", e.kind()), msg.clone(), permanent);
            return Err(msg);
        }
        let events = event_logger(log);
        let result = self.roles(&events).apply(&Source::Bundle(dest.clone()), false);
        let done = self.settle(log, now, role, &key, result);
        // Kept only while the same version may be tried again (a transient failure).
        if done.is_ok() || self.record.failed.contains(&key) {
            let _ = std::fs::remove_file(&dest);
        }
        done
    }

    /// Logs and records how an apply through the service ended.
    fn settle(
        &mut self,
        log: &Log,
        now: u64,
        role: &str,
        key: &str,
        result: Result<Applied, ServiceError>,
    ) -> Result<String, String> {
        let applied = match result {
            Ok(a) => a,
            Err(e) => {
                let transient = !matches!(e, ServiceError::Bundle(_) | ServiceError::RoleName(_));
                let msg = format!("role {role}: {e}");
                self.fail(log, now, key, service_kind(&e), msg.clone(), !transient);
                return Err(msg);
            }
        };
        if let Some(change) = &applied.safe_mode {
            log_safe_mode(log, role, change);
        }
        match applied.outcome {
            Outcome::Committed { version, previous } => {
                let prev = previous.map_or("none".to_string(), |p| p.to_string());
                let msg = format!("role {role} {version} committed (previous {prev})");
                log.info(
                    "role_committed",
                    &msg,
                    serde_json::json!({ "role": role, "version": version.to_string() }),
                );
                Ok(msg)
            }
            Outcome::AlreadyCurrent(v) => Ok(format!("role {role} {v} already runs")),
            Outcome::Refused { error, .. } => {
                let transient = matches!(
                    error,
                    ApplyError::Engine(EngineError::Unavailable(_)) | ApplyError::Interrupted(_)
                );
                let msg = format!("role {role}: refused: {error}");
                self.fail(log, now, key, "role_refused", msg.clone(), !transient);
                Err(msg)
            }
            Outcome::RolledBack { version, error, restored } => {
                let back = restored.map_or("nothing".to_string(), |r| r.to_string());
                let msg = format!("role {role} {version} rolled back to {back}: {error}");
                self.fail(log, now, key, "role_rolled_back", msg.clone(), true);
                Err(msg)
            }
        }
    }

    /// A failure of `key` (`ROLE@VERSION`): reported once; `permanent` ones are never
    /// taken again automatically, the others wait for the throttle.
    fn fail(&mut self, log: &Log, now: u64, key: &str, kind: &str, msg: String, permanent: bool) {
        self.record.last_failure = Some(now);
        if permanent {
            self.record.failed.insert(key.to_string());
        }
        self.report(log, now, &format!("{key}:{kind}"), kind, msg);
    }

    fn service_error(&mut self, log: &Log, now: u64, what: &str, e: &ServiceError) {
        let kind = service_kind(e);
        self.report(log, now, &format!("{what}:{kind}"), kind, format!("role {what}: {e}"));
    }

    fn enter_safe_mode(&mut self, log: &Log, now: u64, reason: &Reason) {
        let events = event_logger(log);
        match self.roles(&events).enter_safe_mode(reason) {
            Ok(Some(change)) => log_safe_mode(log, "safe-mode", &change),
            Ok(None) => {}
            Err(e) => {
                let key = format!("safe-mode:{reason}");
                let msg = format!("entering safe mode ({reason}): {e}");
                self.report(log, now, &key, "safe_mode_failed", msg);
            }
        }
    }

    /// Samples the role's restarts; on a crash loop, rolls back or enters safe mode and
    /// tells which (`Some(true)`: rolled back).
    fn watch_crash_loop(&mut self, log: &Log, now: u64, role: &str) -> Option<bool> {
        let layout = RoleLayout::new(&self.cfg.metrica_dir, role);
        let current = layout.read_link(Link::Current).ok().flatten()?;
        let spec = spec::load(&layout.release(&current).join(ROLE_FILE)).ok()?;
        let total = match restart_total(self.engine.as_ref(), &layout, &current) {
            Ok(t) => {
                self.record.engine_up = Some(true);
                t
            }
            Err(e) => {
                self.record.engine_up = Some(!matches!(e, EngineError::Unavailable(_)));
                self.report(log, now, "engine:down", "engine_unavailable", e.to_string());
                return None;
            }
        };
        self.record.reported.remove("engine:down");
        let cl = &spec.crash_loop;
        if self.watch.as_ref().is_none_or(|(v, _)| *v != current) {
            self.watch = Some((current.clone(), CrashLoopWatch::new(cl.restarts, cl.window.0)));
        }
        let (_, watch) = self.watch.as_mut().expect("set above");
        if !watch.observe(Duration::from_secs(now), total) {
            return None;
        }
        self.watch = None;
        let key = format!("{role}@{current}");
        let msg = format!(
            "role {role} {current} is crash-looping: {} restarts within {} s",
            cl.restarts,
            cl.window.0.as_secs()
        );
        self.fail(log, now, &key, "role_crash_loop", msg, true);
        Some(self.leave_crash_loop(log, now, role, &layout, &current))
    }

    /// Back to the previous release when it ran well; else safe mode. `true`: rolled back.
    fn leave_crash_loop(
        &mut self,
        log: &Log,
        now: u64,
        role: &str,
        layout: &RoleLayout,
        current: &semver::Version,
    ) -> bool {
        let state = layout.read_state().unwrap_or_default();
        let previous = layout.read_link(Link::Previous).ok().flatten().filter(|p| {
            p != current
                && !state.failed.contains(p)
                && !self.record.failed.contains(&format!("{role}@{p}"))
                && layout.release(p).join(ROLE_FILE).exists()
        });
        if let Some(prev) = previous {
            let msg = format!("role {role}: rolling back from {current} to {prev}");
            log.warn(
                "role_crash_loop_rollback",
                &msg,
                serde_json::json!({ "role": role, "version": current.to_string() }),
            );
            let events = event_logger(log);
            let source = Source::Folder(layout.release(&prev));
            let result = self.roles(&events).apply(&source, true);
            let ok = matches!(&result, Ok(Applied { outcome: Outcome::Committed { .. }, .. }));
            let _ = self.settle(log, now, role, &format!("{role}@{prev}"), result);
            if ok {
                *self.record.crash_rollbacks.entry(role.to_string()).or_default() += 1;
                return true;
            }
        }
        self.enter_safe_mode(log, now, &Reason::CrashLoop { role: role.to_string() });
        false
    }
}

impl RoleRunner {
    /// What the endpoints read of the roles (their own engine handle and settings).
    pub fn status_source(&self) -> RoleStatusSource {
        RoleStatusSource {
            cfg: self.cfg.clone(),
            engine: self.status_engine.clone().unwrap_or_else(|| self.engine.clone()),
            keyring: self.keyring.clone(),
        }
    }
}

/// The role section of `/status`, `/health`, `/metrics` and the page, read at each request:
/// the service's status (no lock), each role's restarts, and the runner's record.
pub struct RoleStatusSource {
    cfg: RoleConfig,
    engine: Arc<dyn Engine + Send + Sync>,
    keyring: Keyring,
}

impl crate::role_report::RoleSource for RoleStatusSource {
    fn section(&self) -> crate::role_report::RoleSection {
        let quiet = |_: &Event| {};
        let service = service(&self.cfg, self.engine.as_ref(), &self.keyring, &quiet);
        let (roles, error) = match service.status() {
            Ok(s) => (Some(s), None),
            Err(e) => (None, Some(format!("{e:#}"))),
        };
        let daemon = RoleRecord::load(&self.cfg.metrica_dir);
        let mut names: BTreeSet<String> =
            roles.iter().flat_map(|s| s.roles.iter().map(|r| r.name.clone())).collect();
        names.extend(self.cfg.role.clone().ok());
        let mut restarts = BTreeMap::new();
        let mut engine_down = false;
        for name in names {
            let layout = RoleLayout::new(&self.cfg.metrica_dir, &name);
            let Some(current) = layout.read_link(Link::Current).ok().flatten() else { continue };
            match restart_total(self.engine.as_ref(), &layout, &current) {
                Ok(n) => {
                    restarts.insert(name, n);
                }
                Err(e) => engine_down |= matches!(e, EngineError::Unavailable(_)),
            }
        }
        let engine_up = match &roles {
            Some(s) => Some(s.engine_up),
            None if engine_down => Some(false),
            None => daemon.engine_up,
        };
        let safe_mode = safe_mode::read_marker(&self.cfg.metrica_dir);
        crate::role_report::RoleSection { roles, error, restarts, daemon, engine_up, safe_mode }
    }
}

fn log_safe_mode(log: &Log, role: &str, change: &SafeModeChange) {
    let (event, msg) = match change {
        SafeModeChange::Entered(r) => ("safe_mode_entered", format!("safe mode entered: {r}")),
        SafeModeChange::Left(r) => ("safe_mode_left", format!("safe mode left: {r:?}")),
    };
    log.warn(event, &msg, serde_json::json!({ "role": role }));
}

/// A stable kind for a service error.
fn service_kind(e: &ServiceError) -> &'static str {
    match e {
        ServiceError::Busy(_) => "role_busy",
        ServiceError::NoSpace { .. } => "role_disk_low",
        ServiceError::Bundle(_) => "role_bundle",
        ServiceError::RoleName(_) => "role_name",
        ServiceError::NotWritten(_) => "role_service",
        ServiceError::Other(_) => "role_error",
    }
}

/// Removes the downloads (and partial downloads) of other versions: one bundle at most
/// waits on /data.
fn remove_other_downloads(dir: &Path, keep: &Path) {
    let part = download::part_path(keep);
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p != keep && p != part {
            let _ = std::fs::remove_file(&p);
        }
    }
}

/// The sum of the restart counts of the containers of `version`'s stack: the crash-loop
/// watch's sample and `metrica_role_restarts_total`.
pub fn restart_total(
    engine: &dyn Engine,
    layout: &RoleLayout,
    version: &semver::Version,
) -> Result<u64, EngineError> {
    let dir = layout.release(version);
    let compose = spec::load(&dir.join(ROLE_FILE))
        .map(|s| s.role.compose.0)
        .unwrap_or_else(|_| PathBuf::from("compose.yaml"));
    let project = Project::for_release(&layout.name, &dir, &compose);
    let ids: Vec<String> = engine.ps(&project)?.into_iter().map(|c| c.id).collect();
    if ids.is_empty() {
        return Ok(0);
    }
    Ok(engine.inspect(&ids)?.iter().map(|i| i.restart_count).sum())
}

/// The role the provisioning names: `None` on a device without a provision partition (a
/// development machine: no role is run), `Some(Err)` when the provisioning is invalid (safe
/// mode).
pub fn provisioned_role(disk: &Path) -> Option<Result<String, String>> {
    let files = crate::provision::read_partition(disk).ok()?;
    Some(
        crate::provision::Provisioning::from_files(&files)
            .map(|p| p.device.role)
            .map_err(|e| format!("provision partition: {e}")),
    )
}

/// The runner of `updater run`: the provisioned role, the real engine (`docker`), and the
/// daemon's settings. `None` without provisioning.
pub fn runner_for(
    disk: &Path,
    data_dir: &Path,
    sysroot: &Path,
    config: &super::Config,
    overrides: &rollout::Overrides,
    os_version: Option<semver::Version>,
    keyring: Keyring,
) -> Option<RoleRunner> {
    let role = provisioned_role(disk)?;
    let cfg = RoleConfig {
        metrica_dir: data_dir.join("metrica"),
        sysroot: sysroot.to_path_buf(),
        role,
        device_id: config.device_id.clone(),
        segment: config.segment.parse().unwrap_or(Segment::General),
        overrides: overrides.clone(),
        os_version: os_version.unwrap_or_else(|| semver::Version::new(0, 0, 0)),
        dev_root: sysroot.to_path_buf(),
        min_free_bytes: config.min_free_bytes,
        http: HttpOptions { timeout: config.request_deadline, ..HttpOptions::default() },
    };
    let engine = Arc::new(crate::role::docker::DockerCli::default());
    let mut runner = RoleRunner::new(cfg, engine, keyring);
    runner.status_engine = Some(Arc::new(crate::role::docker::DockerCli {
        timeout: STATUS_ENGINE_TIMEOUT,
        ..crate::role::docker::DockerCli::default()
    }));
    Some(runner)
}

impl RoleRunner {
    /// The daemon's one HTTPS trust (the provisioned CA bundle) for role downloads too.
    pub fn with_trust(mut self, trust: crate::http::Trust) -> RoleRunner {
        self.cfg.http.trust = trust;
        self
    }
}

/// Unpacks a baked bundle into `dir` (replacing what is there once the new one is complete)
/// and returns its version.
fn unpack_stack(baked: &Path, keyring: &Keyring, dir: &Path) -> anyhow::Result<String> {
    use anyhow::Context;
    let parent = dir.parent().context("the safe-mode stack folder has no parent")?;
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = parent.join(format!(".{SAFE_MODE_STACK}.new"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    let unpacked = crate::role::bundle::unpack(baked, keyring, &tmp)
        .with_context(|| format!("unpacking the safe-mode stack {}", baked.display()))?;
    if dir.exists() {
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("removing the old {}", dir.display()))?;
    }
    std::fs::rename(&tmp, dir).with_context(|| format!("renaming into {}", dir.display()))?;
    crate::role::layout::sync_dir(parent)?;
    Ok(unpacked.version.to_string())
}

#[cfg(test)]
mod tests;
