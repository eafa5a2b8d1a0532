//! Rollout policy: the one pure function [`decide`] that says whether this device installs
//! the OS version a verified channel offers, now, and why (or why not).
//!
//! Inputs are plain values: the channel document, the device's facts, its overrides from
//! provisioning, its throttle history and the time. No I/O, no clock, no randomness: the
//! daemon gathers those, calls [`decide`], logs the [`Decision`] (every reason has a stable
//! [`StayReason::code`] / [`InstallReason::code`] for logs and metric labels) and acts.
//!
//! The rules, in the order they are applied (the first that holds decides):
//!
//! 1. **Another channel**: the channel's `devices.<id>.channel`, else the provisioning's
//!    channel override, names a channel other than this document's: stay, follow that one.
//! 2. **`auto_update = false`** (channel's devices table, else provisioning): stay.
//! 3. **The offer**: an active `pin` (not expired) offers the pinned version, even when the
//!    channel is paused; otherwise `paused = true` stops here; otherwise `[os]` is offered.
//! 4. **Hardware**: the offer's `compatible` must be the device's.
//! 5. **`version_lock`** (channel's devices table, else provisioning): the device stays on the
//!    locked version; if it runs another one and the offer is exactly the locked version, it
//!    installs it (rollout ignored, epoch, failures, window and throttle still apply).
//! 6. **Already there**: the offered version is the committed one: stay.
//! 7. **Direction**: a pin (or lock) may go down in version; a rollout only goes up.
//! 8. **Security epoch**: the offer's epoch must not be below the device's.
//! 9. **Failed before**: a version that failed on this device is never retried automatically.
//! 10. **Rollout** (not for a pin or lock): `not_before` has passed, the device's segment is
//!     allowed, and its [`bucket`] is below the percent in force (waves).
//! 11. **Maintenance window**, if the device has one: now is inside it.
//! 12. **Throttle**: 5 minutes since the last attempt, 15 since the last failure.
//!
//! Roles: [`decide_role`] decides whether the device takes the version of its role that the
//! channel's `[roles.NAME]` target offers, by these same rules (one function applies rules 4
//! to 12 to either offer), with the role's running version, failures and attempts.
//!
//! Update bomb: a channel offers one OS version, the newest published; a device that was
//! away while several were published sees only the newest and goes straight to it.

pub use crate::acceptance::DeviceFacts;
use crate::acceptance::{self, against_committed, same_version};
use crate::channel::{Channel, Segment, Timestamp};
use semver::Version;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

/// Least time between two install attempts (seconds).
pub const MIN_ATTEMPT_INTERVAL: u64 = 5 * 60;
/// Least time after a failed attempt before the next one (seconds).
pub const FAILURE_BACKOFF: u64 = 15 * 60;
/// Default poll interval (DESIGN.md section 6).
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(5 * 60);
/// Jitter of the poll interval: plus or minus this many percent.
pub const POLL_JITTER_PERCENT: u64 = 20;

/// The rollout bucket of a device for a version: the first 8 bytes of
/// `sha256(device_id + "@" + version)`, big-endian, modulo 100. Stable across runs, machines
/// and releases; `printf '%s@%s' ID VERSION | sha256sum` shows the digest. Because the
/// version is in the hash, the devices that go first differ from one version to the next.
pub fn bucket(device_id: &str, version: &Version) -> u8 {
    let mut h = Sha256::new();
    h.update(device_id.as_bytes());
    h.update(b"@");
    h.update(version.to_string().as_bytes());
    let d = h.finalize();
    let n = u64::from_be_bytes(d[..8].try_into().expect("8 bytes"));
    (n % 100) as u8
}

/// Whether a device is in a rollout of `percent` for `version` (ignoring segment and time).
pub fn selected(device_id: &str, version: &Version, percent: u8) -> bool {
    bucket(device_id, version) < percent
}

/// The next poll's delay: `interval` plus or minus [`POLL_JITTER_PERCENT`], spread uniformly by
/// `random` (any u64 from the caller's random source; the same value gives the same delay).
pub fn poll_delay(interval: Duration, random: u64) -> Duration {
    let ms = interval.as_millis().min(u128::from(u64::MAX));
    let low = ms * u128::from(100 - POLL_JITTER_PERCENT) / 100;
    let span = ms * u128::from(2 * POLL_JITTER_PERCENT) / 100;
    let offset = (u128::from(random) * (span + 1)) >> 64;
    Duration::from_millis((low + offset) as u64)
}

/// A day of the week.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Weekday {
    Sun,
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
}

impl Weekday {
    pub const ALL: [Weekday; 7] = [
        Weekday::Sun,
        Weekday::Mon,
        Weekday::Tue,
        Weekday::Wed,
        Weekday::Thu,
        Weekday::Fri,
        Weekday::Sat,
    ];

    /// The weekday of a day number since 1970-01-01 (a Thursday).
    pub fn of_day(day: i64) -> Weekday {
        Weekday::ALL[(day + 4).rem_euclid(7) as usize]
    }
}

/// A time of day in minutes since midnight, written `"HH:MM"` (`"24:00"` allowed as an end).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TimeOfDay(pub u16);

impl std::str::FromStr for TimeOfDay {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not a time of day HH:MM (00:00 to 24:00)");
        let (h, m) = s.split_once(':').ok_or_else(bad)?;
        if h.len() != 2 || m.len() != 2 {
            return Err(bad());
        }
        let (h, m): (u16, u16) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
        if m >= 60 || h > 24 || (h == 24 && m != 0) {
            return Err(bad());
        }
        Ok(TimeOfDay(h * 60 + m))
    }
}

impl fmt::Display for TimeOfDay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02}:{:02}", self.0 / 60, self.0 % 60)
    }
}

impl Serialize for TimeOfDay {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TimeOfDay {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// When a device may install: on `days` (all days when empty), from `start` to `end` local
/// time, where local time is UTC plus `utc_offset_minutes` (the daemon derives the offset
/// from the device's time zone). A window whose end is before its start crosses midnight and
/// belongs to the day it starts on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceWindow {
    #[serde(default)]
    pub days: BTreeSet<Weekday>,
    pub start: TimeOfDay,
    pub end: TimeOfDay,
    #[serde(default)]
    pub utc_offset_minutes: i32,
}

impl MaintenanceWindow {
    /// Checks the window: start before 24:00, end after 00:00, start and end differ, offset
    /// within a day.
    pub fn validate(&self) -> Result<(), String> {
        if self.start.0 >= 1440 {
            return Err(format!("start {} must be before 24:00", self.start));
        }
        if self.end.0 == 0 {
            return Err("end 00:00 is ambiguous: write 24:00 for midnight".into());
        }
        if self.start == self.end {
            return Err(format!("start and end are both {}: the window is empty", self.start));
        }
        if self.utc_offset_minutes.abs() >= 1440 {
            return Err(format!("utc_offset_minutes {} is a day or more", self.utc_offset_minutes));
        }
        Ok(())
    }

    fn day_allowed(&self, day: i64) -> bool {
        self.days.is_empty() || self.days.contains(&Weekday::of_day(day))
    }

    /// Whether `now` (Unix seconds) is inside the window.
    pub fn contains(&self, now: u64) -> bool {
        let local = now as i64 + i64::from(self.utc_offset_minutes) * 60;
        let day = local.div_euclid(86_400);
        let minute = (local.rem_euclid(86_400) / 60) as u16;
        let (start, end) = (self.start.0, self.end.0);
        if start < end {
            self.day_allowed(day) && start <= minute && minute < end
        } else {
            (self.day_allowed(day) && minute >= start)
                || (self.day_allowed(day - 1) && minute < end)
        }
    }

    /// When the window is next open at or after `now`: `now` itself when inside, else the
    /// next start time on an allowed day (within 8 days). `None` when it never opens.
    pub fn next_open(&self, now: u64) -> Option<u64> {
        if self.contains(now) {
            return Some(now);
        }
        let offset = i64::from(self.utc_offset_minutes) * 60;
        let local_day = (now as i64 + offset).div_euclid(86_400);
        (0..=8)
            .map(|d| (local_day + d) * 86_400 + i64::from(self.start.0) * 60 - offset)
            .filter_map(|t| u64::try_from(t).ok())
            .find(|t| *t >= now && self.contains(*t))
    }
}

/// The device the rollout decides for: who it is, and what it is and runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub device_id: String,
    pub segment: Segment,
    /// `compatible`, committed version (`None`: unknown, any offer is newer) and security
    /// epoch; the rollout takes its pin from the channel (`pinned_version` stays `None`).
    pub facts: DeviceFacts,
}

/// Per-device overrides from the device's provisioning. The same fields of the channel's
/// `devices.<id>` table win over these.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    pub version_lock: Option<Version>,
    /// `Some(false)`: never update automatically. `None` means true.
    pub auto_update: Option<bool>,
    /// The channel this device follows, when not the default one.
    pub channel: Option<String>,
    pub maintenance_window: Option<MaintenanceWindow>,
}

/// The device's past attempts, for throttling.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttemptHistory {
    /// Unix time of the last install attempt (started), if any.
    pub last_attempt: Option<u64>,
    /// Unix time of the last failed attempt (download, install or trial), if any.
    pub last_failure: Option<u64>,
    /// Versions that failed on this device (state.json `bad_versions` plus failed installs).
    pub failed_versions: BTreeSet<Version>,
}

/// Where an override came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OverrideSource {
    /// The channel's `devices` table.
    Channel,
    /// The device's provisioning.
    Provisioning,
}

impl fmt::Display for OverrideSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OverrideSource::Channel => "the channel's devices table",
            OverrideSource::Provisioning => "the provisioning",
        })
    }
}

/// Why the device installs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "code", rename_all = "snake_case")]
pub enum InstallReason {
    /// Selected by the rollout: bucket below the percent in force.
    Rollout { bucket: u8, percent: u8 },
    /// The fleet is pinned to this version.
    Pinned { reason: String },
    /// The device's version lock names this version.
    VersionLock { source: OverrideSource },
}

impl InstallReason {
    /// A stable, short name for logs and metric labels.
    pub fn code(&self) -> &'static str {
        match self {
            InstallReason::Rollout { .. } => "rollout",
            InstallReason::Pinned { .. } => "pinned",
            InstallReason::VersionLock { .. } => "version_lock",
        }
    }
}

impl fmt::Display for InstallReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InstallReason::Rollout { bucket, percent } => {
                write!(f, "selected by the rollout (bucket {bucket} < {percent}%)")
            }
            InstallReason::Pinned { reason } => write!(f, "the fleet is pinned: {reason}"),
            InstallReason::VersionLock { source } => write!(f, "version lock in {source}"),
        }
    }
}

/// Why the device stays on what it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "code", rename_all = "snake_case")]
pub enum StayReason {
    /// The device follows another channel: fetch that one (follow at most one redirect).
    OtherChannel {
        channel: String,
        source: OverrideSource,
    },
    AutoUpdateOff {
        source: OverrideSource,
    },
    Paused,
    Incompatible {
        offered: String,
        device: String,
    },
    /// Locked to a version the channel does not offer, or already on it.
    VersionLocked {
        version: Version,
        source: OverrideSource,
    },
    /// The device runs the version offered by the rollout.
    UpToDate {
        version: Version,
    },
    /// The device runs the pinned version.
    Pinned {
        version: Version,
    },
    /// The rollout offers an older version than the committed one (only a pin goes down).
    NotNewer {
        offered: Version,
        committed: Version,
    },
    EpochTooLow {
        offered: u64,
        device: u64,
    },
    /// This version failed on this device before; it is not retried automatically.
    VersionFailed {
        version: Version,
    },
    NotBefore {
        at: Timestamp,
    },
    SegmentNotAllowed {
        segment: Segment,
    },
    /// Not (yet) in the rollout; `next_wave` is when the percent next rises.
    NotSelected {
        bucket: u8,
        percent: u8,
        next_wave: Option<Timestamp>,
    },
    /// Outside the maintenance window; it next opens at `opens`.
    MaintenanceWindow {
        opens: Option<Timestamp>,
    },
    /// Too soon after the last attempt (or failure); try again at `until`.
    Throttled {
        until: Timestamp,
        after_failure: bool,
    },
    /// The channel has no `[roles.ROLE]` target for the device's role.
    NoTarget {
        role: String,
    },
}

impl StayReason {
    /// A stable, short name for logs and metric labels.
    pub fn code(&self) -> &'static str {
        match self {
            StayReason::OtherChannel { .. } => "other_channel",
            StayReason::AutoUpdateOff { .. } => "auto_update_off",
            StayReason::Paused => "paused",
            StayReason::Incompatible { .. } => "incompatible",
            StayReason::VersionLocked { .. } => "version_locked",
            StayReason::UpToDate { .. } => "up_to_date",
            StayReason::Pinned { .. } => "pinned",
            StayReason::NotNewer { .. } => "not_newer",
            StayReason::EpochTooLow { .. } => "epoch_too_low",
            StayReason::VersionFailed { .. } => "version_failed",
            StayReason::NotBefore { .. } => "not_before",
            StayReason::SegmentNotAllowed { .. } => "segment_not_allowed",
            StayReason::NotSelected { .. } => "not_selected",
            StayReason::MaintenanceWindow { .. } => "maintenance_window",
            StayReason::Throttled { .. } => "throttled",
            StayReason::NoTarget { .. } => "no_target",
        }
    }

    /// Every code, for metrics that list all label values.
    pub const CODES: [&'static str; 16] = [
        "other_channel",
        "auto_update_off",
        "paused",
        "incompatible",
        "version_locked",
        "up_to_date",
        "pinned",
        "not_newer",
        "epoch_too_low",
        "version_failed",
        "not_before",
        "segment_not_allowed",
        "not_selected",
        "maintenance_window",
        "throttled",
        "no_target",
    ];
}

impl fmt::Display for StayReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StayReason::OtherChannel { channel, source } => {
                write!(f, "follows channel {channel:?} ({source})")
            }
            StayReason::AutoUpdateOff { source } => write!(f, "auto_update = false in {source}"),
            StayReason::Paused => f.write_str("the channel is paused"),
            StayReason::Incompatible { offered, device } => {
                write!(f, "the offered bundle is for {offered:?}, this device is {device:?}")
            }
            StayReason::VersionLocked { version, source } => {
                write!(f, "locked to version {version} by {source}")
            }
            StayReason::UpToDate { version } => write!(f, "already runs {version}"),
            StayReason::Pinned { version } => write!(f, "runs the pinned version {version}"),
            StayReason::NotNewer { offered, committed } => {
                write!(f, "offered {offered} is not newer than the committed {committed}")
            }
            StayReason::EpochTooLow { offered, device } => {
                write!(f, "offered security epoch {offered} is below the device's {device}")
            }
            StayReason::VersionFailed { version } => {
                write!(f, "version {version} failed on this device before; not retried")
            }
            StayReason::NotBefore { at } => write!(f, "the rollout starts at {at}"),
            StayReason::SegmentNotAllowed { segment } => {
                write!(f, "segment {segment} is not in the rollout")
            }
            StayReason::NotSelected { bucket, percent, next_wave } => {
                write!(f, "not selected (bucket {bucket} >= {percent}%)")?;
                if let Some(at) = next_wave {
                    write!(f, "; next wave at {at}")?;
                }
                Ok(())
            }
            StayReason::MaintenanceWindow { opens } => match opens {
                Some(at) => write!(f, "outside the maintenance window (opens at {at})"),
                None => f.write_str("outside the maintenance window (it never opens)"),
            },
            StayReason::Throttled { until, after_failure } => {
                let why = if *after_failure { "a failure" } else { "the last attempt" };
                write!(f, "throttled after {why} until {until}")
            }
            StayReason::NoTarget { role } => write!(f, "the channel has no [roles.{role}] target"),
        }
    }
}

/// What the daemon should do now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Decision {
    /// Fetch and install this bundle (its URLs are as in the channel: resolve relative ones
    /// with `channel::resolve_url`). The bundle's own checks (signature, compatible, epoch,
    /// pin) still run at install time.
    Install {
        version: Version,
        urls: Vec<String>,
        size: u64,
        sha256: String,
        security_epoch: u64,
        reason: InstallReason,
    },
    /// Keep running what runs.
    Stay { reason: StayReason },
}

impl Decision {
    /// The reason's stable code.
    pub fn code(&self) -> &'static str {
        match self {
            Decision::Install { reason, .. } => reason.code(),
            Decision::Stay { reason } => reason.code(),
        }
    }

    pub fn is_install(&self) -> bool {
        matches!(self, Decision::Install { .. })
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Install { version, reason, .. } => write!(f, "install {version}: {reason}"),
            Decision::Stay { reason } => write!(f, "stay: {reason}"),
        }
    }
}

/// The offer the rules work on: the pin or the OS target, or a role's target.
struct Offer<'a> {
    version: &'a Version,
    /// `None` for a role: its OS range is in its `role.toml`, checked when it is applied.
    compatible: Option<&'a str>,
    urls: &'a [String],
    size: u64,
    sha256: &'a str,
    security_epoch: u64,
    pin_reason: Option<&'a str>,
    rollout: &'a crate::channel::Rollout,
}

impl Offer<'_> {
    /// What the acceptance rules read of the offer.
    fn terms<'b>(&'b self, device: &'b DeviceFacts) -> acceptance::Offer<'b> {
        acceptance::Offer {
            compatible: self.compatible.unwrap_or(&device.compatible),
            version: self.version,
            security_epoch: self.security_epoch,
        }
    }
}

/// Rules 1 and 2, the same for the OS and the roles: another channel, `auto_update = false`.
fn device_gates(channel: &Channel, device: &Device, overrides: &Overrides) -> Option<StayReason> {
    let entry = channel.devices.get(&device.device_id);
    let redirect = entry
        .and_then(|e| e.channel.clone().map(|c| (c, OverrideSource::Channel)))
        .or_else(|| overrides.channel.clone().map(|c| (c, OverrideSource::Provisioning)));
    if let Some((other, source)) = redirect {
        if other != channel.name {
            return Some(StayReason::OtherChannel { channel: other, source });
        }
    }
    let auto_update = entry
        .and_then(|e| e.auto_update.map(|a| (a, OverrideSource::Channel)))
        .or_else(|| overrides.auto_update.map(|a| (a, OverrideSource::Provisioning)));
    if let Some((false, source)) = auto_update {
        return Some(StayReason::AutoUpdateOff { source });
    }
    None
}

/// The rollout decision (rules in the module documentation). Pure: same inputs, same output.
pub fn decide(
    channel: &Channel,
    device: &Device,
    overrides: &Overrides,
    history: &AttemptHistory,
    now: u64,
) -> Decision {
    // 1, 2.
    if let Some(reason) = device_gates(channel, device, overrides) {
        return Decision::Stay { reason };
    }
    // 3. The offer.
    let offer = match channel.pin.as_ref().filter(|p| p.active_at(now)) {
        Some(p) => Offer {
            version: &p.version,
            compatible: Some(&p.compatible),
            urls: &p.urls,
            size: p.size,
            sha256: &p.sha256,
            security_epoch: p.security_epoch,
            pin_reason: Some(&p.reason),
            rollout: &channel.os.rollout,
        },
        None if channel.paused => return Decision::Stay { reason: StayReason::Paused },
        None => Offer {
            version: &channel.os.version,
            compatible: Some(&channel.os.compatible),
            urls: &channel.os.urls,
            size: channel.os.size,
            sha256: &channel.os.sha256,
            security_epoch: channel.os.security_epoch,
            pin_reason: None,
            rollout: &channel.os.rollout,
        },
    };
    let lock = channel
        .devices
        .get(&device.device_id)
        .and_then(|e| e.version_lock.clone().map(|v| (v, OverrideSource::Channel)))
        .or_else(|| overrides.version_lock.clone().map(|v| (v, OverrideSource::Provisioning)));
    let window = overrides.maintenance_window.as_ref();
    decide_offer(&offer, lock, &device.device_id, device, window, history, now)
}

/// The rollout key of a role: its bucket is [`bucket`]`("ID/ROLE", version)`, so the devices
/// that take a role's version first are not those that take the OS version of the same
/// number (`printf '%s/%s@%s' ID ROLE VERSION | sha256sum`).
pub fn role_bucket_key(device_id: &str, role: &str) -> String {
    format!("{device_id}/{role}")
}

/// The rollout decision for the device's role `role` from the channel's `[roles.ROLE]`
/// target, by the same rules as the OS (module documentation), with the role's facts:
/// `device.facts.committed_version` is the role's running version (`None`: none yet, any
/// offer is newer), `history` the role's own attempts and failed versions. What differs:
/// no hardware or security-epoch rule (a role's OS range is checked when it is applied), the
/// OS version lock and the fleet `[pin]` are the OS's: a role has its own (`[roles.ROLE]`
/// `pin` and `paused`, `[devices.ID.roles.ROLE]` `version_lock` and `auto_update`), and the
/// channel's `paused` stops roles too.
pub fn decide_role(
    channel: &Channel,
    role: &str,
    device: &Device,
    overrides: &Overrides,
    history: &AttemptHistory,
    now: u64,
) -> Decision {
    if let Some(reason) = device_gates(channel, device, overrides) {
        return Decision::Stay { reason };
    }
    let Some(target) = channel.roles.get(role) else {
        return Decision::Stay { reason: StayReason::NoTarget { role: role.to_string() } };
    };
    let role_override = channel.devices.get(&device.device_id).and_then(|e| e.roles.get(role));
    if role_override.and_then(|o| o.auto_update) == Some(false) {
        return Decision::Stay {
            reason: StayReason::AutoUpdateOff { source: OverrideSource::Channel },
        };
    }
    // The role's pin wins over its pause and the channel's, as the OS pin does.
    let offer = match target.pin.as_ref().filter(|p| p.active_at(now)) {
        Some(p) => Offer {
            version: &p.version,
            compatible: None,
            urls: &p.urls,
            size: p.size,
            sha256: &p.sha256,
            security_epoch: 0,
            pin_reason: Some(&p.reason),
            rollout: &target.rollout,
        },
        None if channel.paused || target.paused => {
            return Decision::Stay { reason: StayReason::Paused };
        }
        None => Offer {
            version: &target.version,
            compatible: None,
            urls: &target.urls,
            size: target.size,
            sha256: &target.sha256,
            security_epoch: 0,
            pin_reason: None,
            rollout: &target.rollout,
        },
    };
    let lock =
        role_override.and_then(|o| o.version_lock.clone()).map(|v| (v, OverrideSource::Channel));
    let mut facts = device.clone();
    facts.facts.security_epoch = 0;
    let key = role_bucket_key(&device.device_id, role);
    let window = overrides.maintenance_window.as_ref();
    decide_offer(&offer, lock, &key, &facts, window, history, now)
}

/// Rules 4 to 12 on one offer. `bucket_key`: what the device's bucket is hashed from.
fn decide_offer(
    offer: &Offer<'_>,
    lock: Option<(Version, OverrideSource)>,
    bucket_key: &str,
    device: &Device,
    window: Option<&MaintenanceWindow>,
    history: &AttemptHistory,
    now: u64,
) -> Decision {
    let stay = |reason| Decision::Stay { reason };
    let facts = &device.facts;
    let terms = offer.terms(facts);

    // 4. Hardware.
    if !acceptance::is_compatible(&terms, facts) {
        return stay(StayReason::Incompatible {
            offered: terms.compatible.to_string(),
            device: facts.compatible.clone(),
        });
    }

    // 5. Version lock.
    let mut lock_source = None;
    if let Some((locked, source)) = lock {
        let runs_it = facts.committed_version.as_ref().is_some_and(|c| same_version(c, &locked));
        if runs_it || !same_version(offer.version, &locked) {
            return stay(StayReason::VersionLocked { version: locked, source });
        }
        lock_source = Some(source);
    }

    // 6. Already there; 7. direction.
    let may_go_down = offer.pin_reason.is_some() || lock_source.is_some();
    if let (Some(order), Some(committed)) =
        (against_committed(offer.version, facts), &facts.committed_version)
    {
        match order {
            std::cmp::Ordering::Equal => {
                return stay(if offer.pin_reason.is_some() {
                    StayReason::Pinned { version: offer.version.clone() }
                } else {
                    StayReason::UpToDate { version: offer.version.clone() }
                });
            }
            std::cmp::Ordering::Less if !may_go_down => {
                return stay(StayReason::NotNewer {
                    offered: offer.version.clone(),
                    committed: committed.clone(),
                });
            }
            _ => {}
        }
    }

    // 8. Security epoch.
    if !acceptance::epoch_allowed(&terms, facts) {
        return stay(StayReason::EpochTooLow {
            offered: offer.security_epoch,
            device: facts.security_epoch,
        });
    }

    // 9. Failed before.
    if history.failed_versions.iter().any(|v| same_version(v, offer.version)) {
        return stay(StayReason::VersionFailed { version: offer.version.clone() });
    }

    // 10. Rollout.
    let reason = if let Some(r) = offer.pin_reason {
        InstallReason::Pinned { reason: r.to_string() }
    } else if let Some(source) = lock_source {
        InstallReason::VersionLock { source }
    } else {
        let rollout = offer.rollout;
        if let Some(at) = rollout.not_before.filter(|t| now < t.0) {
            return stay(StayReason::NotBefore { at });
        }
        if !rollout.segments.contains(&device.segment) {
            return stay(StayReason::SegmentNotAllowed { segment: device.segment });
        }
        let b = bucket(bucket_key, offer.version);
        let percent = rollout.percent_at(now);
        if b >= percent {
            return stay(StayReason::NotSelected {
                bucket: b,
                percent,
                next_wave: rollout.next_wave(now),
            });
        }
        InstallReason::Rollout { bucket: b, percent }
    };

    // 11. Maintenance window.
    if let Some(w) = window {
        if !w.contains(now) {
            return stay(StayReason::MaintenanceWindow { opens: w.next_open(now).map(Timestamp) });
        }
    }

    // 12. Throttle.
    let after_attempt = history.last_attempt.map(|t| t.saturating_add(MIN_ATTEMPT_INTERVAL));
    let after_failure = history.last_failure.map(|t| t.saturating_add(FAILURE_BACKOFF));
    let until = match (after_attempt, after_failure) {
        (Some(a), Some(f)) if f >= a => Some((f, true)),
        (Some(a), _) => Some((a, false)),
        (None, Some(f)) => Some((f, true)),
        (None, None) => None,
    };
    if let Some((until, after_failure)) = until.filter(|(u, _)| now < *u) {
        return stay(StayReason::Throttled { until: Timestamp(until), after_failure });
    }

    Decision::Install {
        version: offer.version.clone(),
        urls: offer.urls.to_vec(),
        size: offer.size,
        sha256: offer.sha256.to_string(),
        security_epoch: offer.security_epoch,
        reason,
    }
}

#[cfg(test)]
mod tests;
