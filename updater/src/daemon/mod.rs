//! `updater run`: the daemon that follows a channel and installs what the rollout says.
//!
//! One poll ([`Daemon::poll`]) is: fetch the channel document from the mirrors in order
//! ([`fetch`], conditional GETs), verify it and ask the rollout what to do ([`Planner`]; a new
//! document that fails its checks is not cached and the last good one stays in force), log
//! the decision, and when it says install: check free space on `/data` and the target
//! partitions, install the bundle into the inactive slot, then reboot for the trial (unless
//! `--no-reboot`). Connectivity ([`connectivity`]) follows from the last contact and is logged
//! when it changes. After the OS decision, [`role::RoleRunner`] runs the device's role from the
//! same verified document (docs/daemon.md, "The role"). What the daemon knows is kept in [`record`] (`/data/metrica/daemon.json`).
//!
//! [`run`] is the loop: a poll, then a wait of the interval with ±20 % jitter
//! ([`crate::rollout::poll_delay`]), cut short by
//! `updater check-now` (a `POST /check-now` to the local endpoints, [`crate::serve`]) or ended
//! by SIGTERM/SIGINT. Each poll that may change the state holds the updater's lock (flock,
//! released by the kernel if the process dies), so it never runs beside `updater install`.

pub mod fetch;
#[cfg(test)]
mod fleet;
pub mod role;
#[cfg(test)]
mod tests;

/// The record and connectivity live below both the daemon and the status (which reads them).
pub use crate::{connectivity, daemon_record as record};

use crate::bootinfo::BootInfo;
use crate::history::{Entry, HistoryEvent};
use crate::layout::Slot;
use crate::log::Log;
use crate::reboot::{Reboot, RebootMode};
use crate::release::Release;
use crate::slot::{Device, LockBusy};
use crate::state::{policy, SlotState, State};
use connectivity::Connectivity;
use fetch::{ChannelFetcher, Document, Fetched, Validators};
use record::{Attempt, ChannelRecord, DaemonRecord, DecisionOutcome, DecisionRecord, NamedError};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default poll interval (DESIGN.md section 6).
pub const DEFAULT_INTERVAL: Duration = crate::rollout::DEFAULT_POLL_INTERVAL;
/// Default local address of the endpoints.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9731";
/// Default floor of free space on `/data` below which no install starts (500 MiB).
pub const DEFAULT_MIN_FREE: u64 = 500 << 20;

/// What the daemon needs to know, from `updater run`'s flags.
#[derive(Debug, Clone)]
pub struct Config {
    /// Base URLs of the published folder, tried in order.
    pub mirrors: Vec<String>,
    pub channel: String,
    pub interval: Duration,
    pub listen: String,
    /// No install starts with less free space than this on the data partition.
    pub min_free_bytes: u64,
    /// Deadline of one HTTP request, whole response included.
    pub request_deadline: Duration,
    /// Install, but never reboot for the trial.
    pub no_reboot: bool,
    pub device_id: String,
    pub segment: String,
    /// Why the device has no channel to follow: its provisioning is missing or invalid and no
    /// `--mirror` was given. The daemon then polls nothing but still serves its endpoints and
    /// runs the safe-mode stack, so that whoever comes to the device sees why.
    pub unprovisioned: Option<String>,
}

impl Config {
    /// Checks the flags before the daemon starts: each error names the flag, the value and
    /// what was expected.
    pub fn validate(&self) -> anyhow::Result<()> {
        use anyhow::bail;
        if self.mirrors.is_empty() && self.unprovisioned.is_none() {
            bail!("--mirror: at least one mirror is needed");
        }
        for m in &self.mirrors {
            let rest = m.strip_prefix("http://").or_else(|| m.strip_prefix("https://"));
            if rest.is_none_or(|r| r.is_empty() || r.starts_with('/')) {
                bail!("--mirror {m:?}: expected an http:// or https:// URL with a host");
            }
        }
        if !crate::channel::is_valid_name(&self.channel) {
            bail!("--channel {:?}: not a valid channel name (see docs/channels.md)", self.channel);
        }
        self.segment
            .parse::<crate::channel::Segment>()
            .map_err(|e| anyhow::anyhow!("--segment: {e}"))?;
        if self.interval.is_zero() {
            bail!("--interval 0: expected at least 1 second");
        }
        if self.request_deadline.is_zero() {
            bail!("--request-timeout 0: expected at least 1 second");
        }
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            bail!(
                "--listen {:?}: expected an IP address and port, e.g. {DEFAULT_LISTEN}",
                self.listen
            );
        }
        if self.device_id.trim().is_empty() {
            bail!("--device-id: empty");
        }
        Ok(())
    }
}

/// What the channel document says, once verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelView {
    pub sequence: u64,
    pub expires: Option<u64>,
    pub target_version: Option<semver::Version>,
    /// The verified document, for the role targets ([`role::RoleRunner`]).
    pub document: Option<std::sync::Arc<crate::channel::Channel>>,
}

/// What the rollout decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Install this version from the first of these URLs that works (absolute, or relative
    /// to the channel document's URL). `pinned`: a pin or version lock forces it (it may be
    /// older than the committed version).
    Install {
        version: semver::Version,
        urls: Vec<String>,
        pinned: bool,
        code: String,
        reason: String,
    },
    /// Keep running what the device has; `code` is the rollout's stable name of the reason.
    /// `follow`: the device belongs to this other channel (the daemon follows it, one hop).
    Stay { code: String, reason: String, follow: Option<String> },
}

/// A verified document and the decision taken from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub channel: ChannelView,
    pub decision: Decision,
}

/// A document refused by the channel checks: `kind` names the check (`signature`,
/// `replay`, `expired`, `malformed`, ...), `message` says what was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelProblem {
    pub kind: String,
    pub message: String,
}

/// Everything the rollout decides from, besides the document.
#[derive(Debug, Clone, Copy)]
pub struct PlanInput<'a> {
    pub state: &'a State,
    /// The release of the running (committed) system.
    pub running: Option<&'a Release>,
    pub last_attempt: Option<&'a Attempt>,
    /// Unix time of the last failed install attempt.
    pub last_failure: Option<u64>,
    /// Versions whose install failed for good on this device (besides the state's bad ones).
    pub failed_versions: &'a std::collections::BTreeSet<String>,
    /// The channel followed (the replay check is per channel).
    pub channel: &'a str,
    /// The device's `compatible`, from the running (committed) release.
    pub compatible: Option<&'a str>,
    pub device_id: &'a str,
    pub segment: &'a str,
}

/// Verifies a channel document and decides (the channel and rollout modules).
pub trait Planner {
    fn plan(&self, doc: &Document, input: &PlanInput<'_>, now: u64)
        -> Result<Plan, ChannelProblem>;
}

/// Why an install did not happen or failed; `kind` is stable for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallFailure {
    pub kind: &'static str,
    pub message: String,
}

/// Installs a bundle into a slot (the real one streams it with [`crate::install`]).
pub trait Installer {
    /// Checks that the bundle fits (`partition_too_small`) and installs it into `target`,
    /// recording the install in the state. Returns the installed version.
    fn install(
        &self,
        url: &str,
        target: Slot,
        pinned: Option<&semver::Version>,
        device: &Device,
        now: u64,
    ) -> Result<semver::Version, InstallFailure>;
}

/// The last good channel document on disk: `<data>/metrica/channel/`.
#[derive(Debug, Clone)]
pub struct Cache {
    pub dir: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CacheMeta {
    channel: String,
    validators: Validators,
    verified_at: u64,
    has_sig: bool,
}

impl Cache {
    pub fn new(data_dir: &Path) -> Cache {
        Cache { dir: data_dir.join("metrica").join("channel") }
    }

    /// The cached document of `channel` and its validators; `None` when there is none (or it
    /// cannot be read: a cache is never trusted without the channel checks anyway).
    pub fn load(&self, channel: &str) -> Option<(Document, Validators)> {
        let meta: CacheMeta =
            serde_json::from_slice(&std::fs::read(self.dir.join(format!("{channel}.json"))).ok()?)
                .ok()?;
        if meta.channel != channel {
            return None;
        }
        let toml = std::fs::read(self.dir.join(format!("{channel}.toml"))).ok()?;
        let sig = if meta.has_sig {
            Some(std::fs::read(self.dir.join(format!("{channel}.toml.sig"))).ok()?)
        } else {
            None
        };
        Some((Document { toml, sig }, meta.validators))
    }

    /// Stores a verified document of `channel` (a valid channel name, checked by the channel
    /// module): the files first, then the metadata that points at them.
    pub fn save(
        &self,
        channel: &str,
        doc: &Document,
        validators: &Validators,
        now: u64,
    ) -> anyhow::Result<()> {
        use anyhow::Context;
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        let toml = self.dir.join(format!("{channel}.toml"));
        crate::state::write_atomic(&toml, &doc.toml, "channel")?;
        if let Some(sig) = &doc.sig {
            let path = self.dir.join(format!("{channel}.toml.sig"));
            crate::state::write_atomic(&path, sig, "channel")?;
        }
        let meta = CacheMeta {
            channel: channel.to_string(),
            validators: validators.clone(),
            verified_at: now,
            has_sig: doc.sig.is_some(),
        };
        let path = self.dir.join(format!("{channel}.json"));
        crate::state::write_atomic(&path, &serde_json::to_vec(&meta)?, "channel")
    }
}

/// A small pseudo-random sequence for jitter (splitmix64); not for secrets.
#[derive(Debug, Clone)]
pub struct Jitter(u64);

impl Jitter {
    pub fn seeded() -> Jitter {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Jitter(t ^ (u64::from(std::process::id()) << 32))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// The daemon's parts. [`Daemon::poll`] does one poll; [`run`] loops.
pub struct Daemon {
    pub config: Config,
    pub device: Device,
    pub booted: Option<BootInfo>,
    pub running: Option<Release>,
    pub fetcher: ChannelFetcher,
    pub planner: Box<dyn Planner>,
    pub installer: Box<dyn Installer>,
    pub rebooter: Box<dyn Reboot>,
    pub log: Log,
    pub cache: Cache,
    pub record: DaemonRecord,
    /// Runs the device's role; `None` on a device without provisioning.
    pub roles: Option<role::RoleRunner>,
}

/// What one poll did, for callers and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PollOutcome {
    /// Another updater command held the lock; nothing decided.
    Busy,
    /// No good document (none ever, or the cached one is refused now).
    NoChannel,
    Stayed {
        reason: String,
    },
    /// An install was wanted but not started or failed.
    InstallFailed(InstallFailure),
    /// Installed; `trial`: the tryboot reboot was requested.
    Installed {
        version: semver::Version,
        trial: bool,
    },
    Error(String),
}

impl Daemon {
    /// Loads (or starts) the daemon record and fills in this process's facts.
    pub fn open_record(device: &Device, config: &Config, now: u64) -> DaemonRecord {
        let path = record::record_path(&device.data_dir);
        let mut r =
            DaemonRecord::load(&path).ok().flatten().unwrap_or_else(|| DaemonRecord::new(now));
        r.started = now;
        r.pid = std::process::id();
        r.listen = config.listen.clone();
        if r.channel.name != config.channel {
            r.channel = ChannelRecord::default();
        }
        r.channel.name = config.channel.clone();
        r.channel.mirrors = config.mirrors.clone();
        r
    }

    fn save_record(&self) {
        let path = record::record_path(&self.device.data_dir);
        if let Err(e) = self.record.save(&path) {
            self.log.error("record_save_failed", &format!("{e:#}"), serde_json::json!({}));
        }
    }

    fn error(&mut self, now: u64, kind: &str, message: String) {
        self.log.error(kind, &message, serde_json::json!({}));
        let e = NamedError { time: now, kind: kind.to_string(), message };
        self.record.poll_errors.push(e.clone());
        self.record.last_error = Some(e);
    }

    fn history(&self, entry: &Entry) {
        if let Err(e) = self.device.history().append(entry) {
            self.log.error("history_append_failed", &format!("{e:#}"), serde_json::json!({}));
        }
    }

    /// One poll. Never fails: every problem is a named error in the log and the record.
    pub fn poll(&mut self, now: u64) -> PollOutcome {
        if let Some(r) = self.roles.as_mut() {
            r.offer(None, String::new());
        }
        let outcome = self.poll_inner(now);
        // After the OS decision and outside its lock (the roles service takes the lock); not
        // while the system reboots for an OS trial.
        let rebooting = matches!(outcome, PollOutcome::Installed { trial: true, .. });
        if let Some(r) = self.roles.as_mut().filter(|_| !rebooting) {
            r.cycle(&self.log, now);
        }
        self.save_record();
        outcome
    }

    fn poll_inner(&mut self, now: u64) -> PollOutcome {
        self.record.poll_errors.clear();
        self.record.last_poll = Some(now);
        self.record.counters.polls += 1;
        if let Some(why) = &self.config.unprovisioned {
            let why = format!("no channel to follow: {why}");
            self.decide(now, DecisionOutcome::Stay, "unprovisioned", None, &why);
            return PollOutcome::NoChannel;
        }
        self.fetcher.channel = self.config.channel.clone();
        let (fresh, cached) = self.fetch(now);
        let c = self.record.connectivity_at(now);
        if c != self.record.connectivity {
            let msg = format!("connectivity {} -> {c}", self.record.connectivity);
            let level = if c == Connectivity::Online { "info" } else { "warning" };
            self.log.line(
                level,
                "connectivity_changed",
                &msg,
                serde_json::json!({ "state": c.name() }),
            );
            self.history(&Entry::new(now, HistoryEvent::Connectivity).reason(msg));
            self.record.connectivity = c;
        }

        let _lock = match self.device.lock() {
            Ok(l) => l,
            Err(e) if e.downcast_ref::<LockBusy>().is_some() => {
                self.log.info(
                    "poll_skipped",
                    &format!("{e}; deciding next time"),
                    serde_json::json!({}),
                );
                return PollOutcome::Busy;
            }
            Err(e) => {
                self.error(now, "lock", format!("{e:#}"));
                return PollOutcome::Error(format!("{e:#}"));
            }
        };
        let mut state = match self.device.open_state(
            self.booted.as_ref().and_then(BootInfo::slot),
            self.running.as_ref(),
            now,
        ) {
            Ok(s) => s,
            Err(e) => {
                let msg = format!("{e:#}");
                self.error(now, "state", msg.clone());
                return PollOutcome::Error(msg);
            }
        };
        let mut plan = self.settle(fresh, cached, &mut state, now);
        self.record.channel.followed_from = None;
        // The channel's devices table (or the provisioning) may send this device to another
        // channel: follow it, one hop, in the same poll. The configured channel is still
        // polled first every time (a conditional GET), so removing the entry brings the
        // device back.
        if let Some(Plan { decision: Decision::Stay { follow: Some(other), .. }, .. }) = &plan {
            let other = other.clone();
            if other != self.config.channel && crate::channel::is_valid_name(&other) {
                self.log.info(
                    "channel_followed",
                    &format!(
                        "channel {} sends this device to channel {other}",
                        self.config.channel
                    ),
                    serde_json::json!({ "channel": other }),
                );
                self.fetcher.channel = other;
                let (fresh, cached) = self.fetch(now);
                plan = self.settle(fresh, cached, &mut state, now);
                self.record.channel.followed_from = Some(self.config.channel.clone());
            }
        }
        self.record.channel.name = self.fetcher.channel.clone();
        let Some(plan) = plan else {
            let why = "no good channel document: running what is installed";
            self.decide(now, DecisionOutcome::Stay, "no_channel", None, why);
            return PollOutcome::NoChannel;
        };
        let doc_url = self.doc_url();
        if let Some(r) = self.roles.as_mut() {
            r.offer(plan.channel.document.clone(), doc_url);
        }
        self.record.channel.sequence = Some(plan.channel.sequence);
        self.record.channel.expires = plan.channel.expires;
        self.record.channel.target_version =
            plan.channel.target_version.as_ref().map(ToString::to_string);
        match plan.decision {
            Decision::Stay { code, reason, .. } => {
                self.decide(now, DecisionOutcome::Stay, &code, None, &reason);
                PollOutcome::Stayed { reason }
            }
            Decision::Install { version, urls, pinned, code, reason } => {
                self.decide(now, DecisionOutcome::Install, &code, Some(&version), &reason);
                let doc_url = self.doc_url();
                let urls: Vec<String> =
                    urls.iter().map(|u| crate::channel::resolve_url(&doc_url, u)).collect();
                self.install(now, &state, &version, &urls, pinned)
            }
        }
    }

    /// The URL of the document acted on (relative bundle URLs resolve against it): on the
    /// mirror that gave it, else the first.
    fn doc_url(&self) -> String {
        let mirror = self.record.channel.mirror.clone();
        let mirror = mirror.or_else(|| self.config.mirrors.first().cloned()).unwrap_or_default();
        self.fetcher.url(&mirror)
    }

    /// Fetches the fetcher's channel: the new document (if it changed) and the cached one.
    #[allow(clippy::type_complexity)]
    fn fetch(
        &mut self,
        now: u64,
    ) -> (Option<(String, Document, Validators)>, Option<(Document, Validators)>) {
        let cached = self.cache.load(&self.fetcher.channel);
        let poll = self.fetcher.poll(cached.as_ref().map(|(_, v)| v));
        for e in &poll.failed {
            *self.record.counters.fetch_errors.entry(e.kind().to_string()).or_default() += 1;
            self.log.warn(
                "channel_fetch_failed",
                &e.to_string(),
                serde_json::json!({ "kind": e.kind() }),
            );
        }
        let mut fresh = None;
        match poll.result {
            Ok(Fetched::NotModified { mirror }) => {
                self.record.last_contact = Some(now);
                self.record.counters.not_modified += 1;
                self.log.debug("channel_not_modified", &mirror, serde_json::json!({}));
            }
            Ok(Fetched::New { mirror, document, validators }) => {
                self.record.last_contact = Some(now);
                self.record.counters.new_documents += 1;
                self.log.info(
                    "channel_fetched",
                    &format!("new document of channel {} from {mirror}", self.fetcher.channel),
                    serde_json::json!({ "bytes": document.toml.len() }),
                );
                fresh = Some((mirror, document, validators));
            }
            Err(all) => {
                self.error(now, "channel_unreachable", all.to_string());
            }
        }
        (fresh, cached)
    }

    /// The plan from the new document if it passes its checks (then cached, its sequence
    /// recorded), else from the cached one if that still passes; `None` when neither does.
    fn settle(
        &mut self,
        fresh: Option<(String, Document, Validators)>,
        cached: Option<(Document, Validators)>,
        state: &mut State,
        now: u64,
    ) -> Option<Plan> {
        let channel = self.fetcher.channel.clone();
        if let Some((mirror, doc, validators)) = fresh {
            match self.plan(&doc, state, now) {
                Ok(p) => {
                    if let Err(e) = self.cache.save(&channel, &doc, &validators, now) {
                        self.error(now, "cache", format!("caching the channel document: {e:#}"));
                    }
                    if let Err(e) = self.note_sequence(state, p.channel.sequence) {
                        self.error(now, "state", format!("recording the channel sequence: {e:#}"));
                    }
                    self.record.channel.mirror = Some(mirror);
                    self.record.channel.verified_at = Some(now);
                    return Some(p);
                }
                Err(problem) => {
                    *self
                        .record
                        .counters
                        .channel_errors
                        .entry(problem.kind.clone())
                        .or_default() += 1;
                    let msg = format!(
                        "document of channel {channel} from {mirror} refused ({}): {}; keeping the last good one",
                        problem.kind, problem.message
                    );
                    self.error(now, &format!("channel_{}", problem.kind), msg);
                }
            }
        }
        let (doc, validators) = cached?;
        match self.plan(&doc, state, now) {
            Ok(p) => {
                self.record.channel.mirror = Some(validators.mirror);
                Some(p)
            }
            Err(problem) => {
                let msg = format!(
                    "cached document of channel {channel} not acted on ({}): {}",
                    problem.kind, problem.message
                );
                self.error(now, &format!("channel_{}", problem.kind), msg);
                None
            }
        }
    }

    fn plan(&self, doc: &Document, state: &State, now: u64) -> Result<Plan, ChannelProblem> {
        let input = PlanInput {
            state,
            running: self.running.as_ref(),
            last_attempt: self.record.last_attempt.as_ref(),
            last_failure: self.record.last_failure,
            failed_versions: &self.record.failed_versions,
            channel: &self.fetcher.channel,
            compatible: self.running.as_ref().map(|r| r.compatible.as_str()),
            device_id: &self.config.device_id,
            segment: &self.config.segment,
        };
        self.planner.plan(doc, &input, now)
    }

    /// Records the highest sequence seen in the state (replay protection survives restarts
    /// and a lost cache).
    fn note_sequence(&self, state: &mut State, sequence: u64) -> anyhow::Result<()> {
        let name = &self.fetcher.channel;
        if state.channel_sequence(name).is_some_and(|s| s >= sequence) {
            return Ok(());
        }
        state.record_channel_sequence(name, sequence);
        crate::state::save(&self.device.state_path(), state)
    }

    /// Logs every decision; appends it to the history when it differs from the last one.
    fn decide(
        &mut self,
        now: u64,
        outcome: DecisionOutcome,
        code: &str,
        version: Option<&semver::Version>,
        reason: &str,
    ) {
        let d = DecisionRecord {
            time: now,
            outcome,
            code: code.to_string(),
            version: version.map(ToString::to_string),
            reason: reason.to_string(),
        };
        self.log.info(
            "decision",
            &format!("{outcome}{}: {reason}", version.map(|v| format!(" {v}")).unwrap_or_default()),
            serde_json::json!({ "outcome": outcome, "code": code, "version": d.version }),
        );
        let changed = self.record.decision.as_ref().is_none_or(|last| {
            (&last.outcome, &last.version, &last.reason) != (&d.outcome, &d.version, &d.reason)
        });
        if changed {
            self.history(
                &Entry::new(now, HistoryEvent::Decision)
                    .version(version)
                    .reason(format!("{outcome}: {reason}")),
            );
        }
        self.record.decision = Some(d);
    }

    fn refuse(&mut self, now: u64, kind: &'static str, message: String) -> PollOutcome {
        self.error(now, kind, message.clone());
        self.history_once(
            kind,
            &Entry::new(now, HistoryEvent::Refused).reason(format!("{kind}: {message}")),
        );
        PollOutcome::InstallFailed(InstallFailure { kind, message })
    }

    /// Appends a refusal or failure to the history unless the previous one was the same
    /// (`key`): a disk that stays full refuses at every poll, and the bounded history must
    /// keep its installs and commits. The log gets every occurrence.
    fn history_once(&mut self, key: &str, entry: &Entry) {
        let key = format!("{key} {}", entry.version.as_deref().unwrap_or(""));
        if self.record.last_history_error.as_deref() != Some(key.as_str()) {
            self.history(entry);
            self.record.last_history_error = Some(key);
        }
    }

    fn install(
        &mut self,
        now: u64,
        state: &State,
        version: &semver::Version,
        urls: &[String],
        pinned: bool,
    ) -> PollOutcome {
        let target = match policy::install_target(state, self.booted.as_ref()) {
            Ok(target) => target,
            Err(refusal) => {
                let (kind, message) = install_refusal(&refusal);
                return self.refuse(now, kind, message);
            }
        };
        let inactive = state.slot(target);
        let already =
            inactive.state == SlotState::Installed && inactive.version.as_ref() == Some(version);
        if !already {
            match crate::status::disk_free_bytes(&self.device.data_dir) {
                Some(free) if free < self.config.min_free_bytes => {
                    return self.refuse(
                        now,
                        "disk_low",
                        format!(
                            "{} has {free} bytes free, below the floor of {} bytes: not installing {version}",
                            self.device.data_dir.display(),
                            self.config.min_free_bytes
                        ),
                    );
                }
                Some(_) => {}
                None => {
                    return self.refuse(
                        now,
                        "disk_low",
                        format!("cannot read the free space of {}", self.device.data_dir.display()),
                    )
                }
            }
            let pin = pinned.then_some(version);
            let mut result =
                Err(InstallFailure { kind: "download", message: "no bundle URL".into() });
            for url in urls {
                self.log.info(
                    "install_started",
                    &format!("installing {version} from {url} into slot {target}"),
                    serde_json::json!({ "version": version.to_string(), "slot": target.to_string() }),
                );
                result = self.installer.install(url, target, pin, &self.device, now);
                match &result {
                    Err(f) if f.kind == "download" => {
                        self.log.warn("install_source_failed", &f.message, serde_json::json!({}));
                    }
                    _ => break,
                }
            }
            self.record.last_attempt =
                Some(Attempt { time: now, version: version.to_string(), ok: result.is_ok() });
            match result {
                Ok(v) => {
                    self.record.counters.installs_ok += 1;
                    self.record.last_history_error = None;
                    self.log.info(
                        "install_done",
                        &format!("installed {v} into slot {target}"),
                        serde_json::json!({ "version": v.to_string() }),
                    );
                }
                Err(f) => {
                    self.record.counters.installs_failed += 1;
                    self.record.last_failure = Some(now);
                    if !TRANSIENT.contains(&f.kind) {
                        // Never retried automatically (the rollout reads this list).
                        self.record.failed_versions.insert(version.to_string());
                    }
                    self.error(now, f.kind, f.message.clone());
                    self.history_once(
                        f.kind,
                        &Entry::new(now, HistoryEvent::InstallFailed)
                            .slot(target)
                            .version(Some(version))
                            .reason(format!("{}: {}", f.kind, f.message)),
                    );
                    return PollOutcome::InstallFailed(f);
                }
            }
        }
        if self.config.no_reboot {
            self.log.info(
                "trial_skipped",
                &format!("slot {target} holds {version}; no trial reboot (--no-reboot): run `updater trial`"),
                serde_json::json!({}),
            );
            return PollOutcome::Installed { version: version.clone(), trial: false };
        }
        match self.device.start_trial(self.booted.as_ref(), now) {
            Ok(_) => {}
            Err(e) => {
                let f = InstallFailure { kind: "trial", message: format!("{e:#}") };
                self.error(now, f.kind, f.message.clone());
                return PollOutcome::InstallFailed(f);
            }
        }
        self.save_record();
        self.log.info(
            "trial_reboot",
            &format!("rebooting into slot {target} ({version}) for its trial"),
            serde_json::json!({}),
        );
        if let Err(e) = self.rebooter.reboot(RebootMode::Tryboot) {
            let f = InstallFailure { kind: "reboot", message: format!("{e:#}") };
            self.error(now, f.kind, f.message.clone());
            return PollOutcome::InstallFailed(f);
        }
        PollOutcome::Installed { version: version.clone(), trial: true }
    }
}

/// Install failure kinds that may pass by themselves (the version is retried after the
/// throttle); any other failure puts the version on the never-again list.
pub const TRANSIENT: [&str; 5] = ["download", "disk", "disk_low", "state", "install"];

/// The real installer: reads the bundle's signed manifest first (nothing written) to check
/// that every image fits its target partition, then streams the bundle into the inactive
/// slot with [`crate::install::install_bundle`] under the device's install policy.
pub struct BundleInstaller {
    pub keyring: crate::sign::Keyring,
    pub running: Option<Release>,
    pub booted: Option<BootInfo>,
    /// Where install progress lines go (the daemon's log file, or stderr).
    pub log_file: Option<PathBuf>,
    /// Whom HTTPS bundle servers are checked against (the provisioned CA bundle, if any).
    pub trust: crate::http::Trust,
}

impl BundleInstaller {
    /// Where a bundle URL is read from: over HTTPS, with [`BundleInstaller::trust`].
    fn source(&self, url: &str) -> crate::install::Source {
        use crate::install::{Source, HTTP_TIMEOUT};
        match Source::parse(url) {
            Source::Url(u) if self.trust.is_some() => Source::Fetch(Box::new(
                crate::http::HttpFetch::with_trust(&u, HTTP_TIMEOUT, self.trust.clone()),
            )),
            other => other,
        }
    }

    fn progress(&self) -> Box<dyn std::io::Write> {
        Box::new(Log::command_line(self.log_file.clone()).writer())
    }
}

/// The daemon's stable kind and wording of a refusal to start an install
/// ([`policy::install_target`]).
fn install_refusal(refusal: &crate::state::Refusal) -> (&'static str, String) {
    use crate::state::Refusal;
    match refusal {
        Refusal::NotFromCommitted { booted, committed, .. } => (
            "not_committed_slot",
            format!("booted {booted}, not the committed slot {committed}: installs wait"),
        ),
        Refusal::TrialPending(_) => ("trial_pending", refusal.to_string()),
        other => ("refused", other.to_string()),
    }
}

impl Installer for BundleInstaller {
    fn install(
        &self,
        url: &str,
        target: Slot,
        pinned: Option<&semver::Version>,
        device: &Device,
        now: u64,
    ) -> Result<semver::Version, InstallFailure> {
        use crate::install;
        let fail = |kind: &'static str, e: &dyn std::fmt::Display| InstallFailure {
            kind,
            message: format!("{url}: {e}"),
        };
        let vm = install::read_manifest(self.source(url), &self.keyring).map_err(|e| {
            let kind = match &e {
                install::InstallError::Bundle(crate::bundle::BundleError::Fetch(_)) => "download",
                _ => "bundle",
            };
            fail(kind, &e)
        })?;
        for img in &vm.manifest.images {
            let role = img.slot_class.partition(target);
            let p = crate::disk::find_label(&device.disk, role.label)
                .map_err(|e| fail("disk", &format!("{e:#}")))?;
            if img.size > p.len {
                return Err(fail(
                    "partition_too_small",
                    &format!(
                        "{} image of {} is {} bytes, partition {} holds {} bytes",
                        img.slot_class.as_str(),
                        vm.manifest.version,
                        img.size,
                        role.label,
                        p.len
                    ),
                ));
            }
        }
        let s = device
            .open_state(self.booted.as_ref().and_then(BootInfo::slot), self.running.as_ref(), now)
            .map_err(|e| fail("state", &format!("{e:#}")))?;
        let mut facts = device
            .device_facts(&s, self.running.as_ref())
            .map_err(|e| fail("state", &format!("{e:#}")))?;
        facts.pinned_version = pinned.cloned();
        let policy = crate::slot::InstallPolicy {
            device,
            facts,
            target,
            allow_bad: false,
            booted: self.booted.as_ref(),
            now,
        };
        let mut req = install::InstallRequest::new(&device.disk, target, &self.keyring, &policy);
        req.resume_file = Some(install::progress_path(&device.data_dir));
        let mut progress = install::JsonLines::new(self.progress());
        let images =
            install::install_bundle(self.source(url), &req, &mut progress).map_err(|e| {
                let kind = match &e {
                    install::InstallError::Refused(_) => "refused",
                    install::InstallError::DoesNotFit { .. } => "partition_too_small",
                    install::InstallError::Bundle(crate::bundle::BundleError::Fetch(_)) => {
                        "download"
                    }
                    install::InstallError::Bundle(_) => "bundle",
                    _ => "install",
                };
                fail(kind, &e)
            })?;
        device
            .finish_install(target, &images.version, now)
            .map_err(|e| fail("state", &format!("{e:#}")))?;
        Ok(images.version)
    }
}

/// The planner of `updater run`: [`crate::channel::verify`] (signature against the keyring,
/// schema, channel name, replay, clock, expiry), then [`crate::rollout::decide`] with the
/// device's facts, its overrides and its throttle history.
pub struct ChannelPlanner {
    pub keyring: crate::sign::Keyring,
    pub overrides: crate::rollout::Overrides,
}

impl Planner for ChannelPlanner {
    fn plan(
        &self,
        doc: &Document,
        input: &PlanInput<'_>,
        now: u64,
    ) -> Result<Plan, ChannelProblem> {
        use crate::{channel, rollout};
        let expect = channel::Expect {
            keyring: &self.keyring,
            name: input.channel,
            last_sequence: input.state.channel_sequence(input.channel),
            now,
        };
        let verified = channel::verify(&doc.toml, doc.sig.as_deref(), &expect)
            .map_err(|e| ChannelProblem { kind: e.code().to_string(), message: e.to_string() })?;
        let ch = &verified.channel;
        let view = ChannelView {
            sequence: ch.sequence,
            expires: Some(ch.expires.0),
            target_version: Some(ch.os.version.clone()),
            document: Some(std::sync::Arc::new(ch.clone())),
        };
        let segment: channel::Segment = input
            .segment
            .parse()
            .map_err(|e: String| ChannelProblem { kind: "device".into(), message: e })?;
        let compatible = input.compatible.ok_or_else(|| ChannelProblem {
            kind: "device".into(),
            message: "cannot tell this device's compatible (no release file)".into(),
        })?;
        let s = input.state;
        let facts = rollout::Device {
            device_id: input.device_id.to_string(),
            segment,
            facts: rollout::DeviceFacts {
                compatible: compatible.to_string(),
                committed_version: s.slot(s.committed).version.clone(),
                security_epoch: s.security_epoch,
                pinned_version: None,
            },
        };
        let mut failed = s.bad_versions.clone();
        failed.extend(input.failed_versions.iter().filter_map(|v| v.parse().ok()));
        let history = rollout::AttemptHistory {
            last_attempt: input.last_attempt.map(|a| a.time),
            last_failure: input.last_failure,
            failed_versions: failed,
        };
        let d = rollout::decide(ch, &facts, &self.overrides, &history, now);
        let code = d.code().to_string();
        let decision = match d {
            rollout::Decision::Install { version, urls, reason, .. } => Decision::Install {
                pinned: !matches!(reason, rollout::InstallReason::Rollout { .. }),
                reason: reason.to_string(),
                version,
                urls,
                code,
            },
            rollout::Decision::Stay { reason } => Decision::Stay {
                code,
                follow: match &reason {
                    rollout::StayReason::OtherChannel { channel, .. } => Some(channel.clone()),
                    _ => None,
                },
                reason: reason.to_string(),
            },
        };
        Ok(Plan { channel: view, decision })
    }
}

/// Runs the loop until SIGTERM or SIGINT: a poll, then a jittered wait that `check-now` cuts
/// short. The endpoints serve from `listen` meanwhile.
pub fn run(daemon: Daemon, history: usize, alive: &crate::sdnotify::Alive) -> anyhow::Result<()> {
    use crate::serve::Wake;
    use nix::sys::signal::{SigSet, Signal};
    use std::sync::mpsc;

    // Blocked here before any thread starts, so every thread inherits the mask and only the
    // waiting thread below receives these signals.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block().map_err(|e| anyhow::anyhow!("blocking SIGTERM: {e}"))?;
    let (tx, rx) = mpsc::channel();
    let stop_tx = tx.clone();
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        if signals.wait().is_ok() {
            let _ = stop_tx.send(Wake::Stop);
        }
    })?;
    serve_loop(daemon, history, tx, &rx, alive)
}

/// Logs a notification systemd could not be sent; the daemon goes on.
fn notify(log: &Log, sent: std::io::Result<()>) {
    if let Err(e) = sent {
        log.warn("sd_notify", &format!("sd_notify: {e}"), serde_json::json!({}));
    }
}

/// The loop of [`run`] without the signal handling: stops when `Wake::Stop` arrives on `rx`
/// (or every sender is gone). `tx` is handed to the endpoints for `/check-now`. `alive` tells
/// systemd (when it supervises) `READY=1` once the endpoints serve, and is touched at every
/// poll so that its watchdog pings go on while the loop makes progress.
pub fn serve_loop(
    mut daemon: Daemon,
    history: usize,
    tx: std::sync::mpsc::Sender<crate::serve::Wake>,
    rx: &std::sync::mpsc::Receiver<crate::serve::Wake>,
    alive: &crate::sdnotify::Alive,
) -> anyhow::Result<()> {
    use crate::serve::{Server, Wake};
    use std::sync::mpsc::RecvTimeoutError;
    let ctx = crate::serve::Context {
        device: daemon.device.clone(),
        booted: daemon.booted.ok_or_else(|| "unknown".to_string()),
        min_free_bytes: daemon.config.min_free_bytes,
        history,
        roles: daemon.roles.as_ref().map(|r| {
            std::sync::Arc::new(r.status_source())
                as std::sync::Arc<dyn crate::role_report::RoleSource>
        }),
    };
    let mut server = Server::start(&daemon.config.listen, ctx, tx)?;
    daemon.record.listen = server.addr.to_string();
    daemon.save_record();
    if let Some(r) = daemon.roles.as_mut() {
        r.start(&daemon.log, crate::slot::unix_now());
    }
    let summary = match &daemon.config.unprovisioned {
        Some(why) => format!("following no channel ({why}); endpoints on {}", server.addr),
        None => format!(
            "following channel {} from {} mirror(s) every {} s ± {} %; endpoints on {}",
            daemon.config.channel,
            daemon.config.mirrors.len(),
            daemon.config.interval.as_secs(),
            crate::rollout::POLL_JITTER_PERCENT,
            server.addr
        ),
    };
    daemon.log.info("started", &summary, serde_json::json!({ "pid": std::process::id() }));
    notify(&daemon.log, alive.ready(&summary));
    let mut jitter = Jitter::seeded();
    loop {
        // One write of the record per poll (it is fsynced: flash wear), next poll included.
        let wait = crate::rollout::poll_delay(daemon.config.interval, jitter.next_u64());
        let started = crate::slot::unix_now();
        let deadline = std::time::Instant::now() + wait;
        daemon.record.next_poll = Some(started + wait.as_secs());
        alive.touch();
        daemon.poll(started);
        alive.touch();
        // A check-now sent during a long poll is already served by it.
        let mut stop = false;
        while let Ok(w) = rx.try_recv() {
            stop |= w == Wake::Stop;
        }
        if stop {
            break;
        }
        match rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())) {
            Ok(Wake::CheckNow) => {
                daemon.log.info("check_now", "poll requested", serde_json::json!({}));
            }
            Ok(Wake::Stop) | Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
    notify(&daemon.log, alive.stopping("SIGTERM or SIGINT: stopping"));
    server.stop();
    daemon.record.next_poll = None;
    daemon.save_record();
    daemon.log.info("stopped", "SIGTERM or SIGINT: stopped cleanly", serde_json::json!({}));
    Ok(())
}
