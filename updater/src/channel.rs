//! Channel documents: `channels/<name>.toml` and its detached signature `<name>.toml.sig`.
//!
//! A channel document (docs/channels.md) says which OS version (and role versions) the devices
//! following the channel should run, and how the rollout proceeds: percent, segments,
//! `not_before`, a schedule of waves, `paused`, a fleet-wide `pin`, and per-device overrides.
//!
//! The document is untrusted input until [`verify`] has checked, in this order: its size, that a
//! signature exists ([`ChannelError::Unsigned`]), the ed25519 signature over the exact bytes
//! against the keyring ([`ChannelError::Signature`]; same signature file format and keys as
//! bundles, `sign.rs`), the strict schema ([`ChannelError::Malformed`], unknown keys are
//! errors, and [`ChannelError::Invalid`] naming the field), that it is the channel asked for
//! ([`ChannelError::WrongChannel`]), that its `sequence` is not lower than the last one seen
//! ([`ChannelError::Replayed`]), that the device clock is not far behind its `published` time
//! ([`ChannelError::ClockBehind`]) and that it has not expired ([`ChannelError::Expired`],
//! the freeze attack). Every error has a stable [`ChannelError::code`] for logs and metrics;
//! on any of them the device keeps running what it has and keeps its last good document.
//!
//! The last seen sequence per channel is kept in the device state
//! (`State::channel_sequences`, `state/`); the daemon records it after a successful
//! [`verify`]. What to do with a verified document is decided by `rollout::decide`.

use crate::sign::{KeyId, Keyring, SignError, SignatureFile, MAX_SIGNATURE_FILE};
use ed25519_dalek::SigningKey;
use semver::Version;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;
use thiserror::Error;

/// The only channel document format this updater reads.
pub const CHANNEL_FORMAT: u32 = 1;
/// Largest channel document accepted (a `devices` table of some 20,000 devices fits).
pub const MAX_CHANNEL_DOC: usize = 4 << 20;
/// How far the device clock may be behind the publisher's before a document is refused
/// ([`ChannelError::ClockBehind`]); the same margin is documented for `expires`.
pub const MAX_CLOCK_SKEW: u64 = 5 * 60;
/// Folder of channel documents in a published folder.
pub const CHANNELS_DIR: &str = "channels";
/// Folder of OS bundles in a published folder.
pub const BUNDLES_DIR: &str = "bundles";
/// Suffix of a channel document's signature file.
pub const SIGNATURE_SUFFIX: &str = ".sig";

/// Path of a channel document inside a published folder: `channels/<name>.toml`.
pub fn document_path(name: &str) -> String {
    format!("{CHANNELS_DIR}/{name}.toml")
}

/// Path of a channel document's signature: `channels/<name>.toml.sig`.
pub fn signature_path(name: &str) -> String {
    format!("{}{SIGNATURE_SUFFIX}", document_path(name))
}

/// Path of an OS bundle inside a published folder: `bundles/<name>-<version>.mfb`.
pub fn bundle_path(name: &str, version: &Version) -> String {
    format!("{BUNDLES_DIR}/{name}-{version}.mfb")
}

/// Folder of role bundles in a published folder.
pub const ROLES_DIR: &str = "roles";

/// Path of a role bundle inside a published folder: `roles/<name>/<version>.mfr`.
pub fn role_bundle_path(name: &str, version: &Version) -> String {
    format!("{ROLES_DIR}/{name}/{version}.{}", crate::role::bundle::EXTENSION)
}

/// Whether `name` is a valid channel (or role, or bundle) name: 1 to 64 characters of
/// lowercase ASCII letters, digits, `.`, `_` and `-`, starting with a letter or digit.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric()
}

/// A point in time, in Unix seconds (UTC). In the TOML document it is an offset date-time
/// (`2026-11-24T08:00:00Z` or with `+01:00`); local times without an offset are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// RFC 3339 in UTC, whole seconds.
    pub fn to_rfc3339(self) -> String {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(self.0);
        humantime::format_rfc3339_seconds(t).to_string()
    }

    /// From a TOML offset date-time; `None` for local or partial date-times, or before 1970.
    pub fn from_datetime(dt: &toml::value::Datetime) -> Option<Timestamp> {
        let (date, time, offset) = (dt.date?, dt.time?, dt.offset?);
        let days = days_from_civil(i64::from(date.year), date.month.into(), date.day.into());
        let offset_minutes = match offset {
            toml::value::Offset::Z => 0,
            toml::value::Offset::Custom { minutes } => i64::from(minutes),
        };
        let secs = days * 86_400
            + i64::from(time.hour) * 3600
            + i64::from(time.minute) * 60
            + i64::from(time.second)
            - offset_minutes * 60;
        u64::try_from(secs).ok().map(Timestamp)
    }

    /// The TOML date-time of this instant (UTC).
    pub fn to_datetime(self) -> toml::value::Datetime {
        self.to_rfc3339().parse().expect("RFC 3339 is a TOML datetime")
    }
}

impl FromStr for Timestamp {
    type Err = String;
    /// Parses an RFC 3339 date-time with an offset (`Z` or `+hh:mm`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let dt: toml::value::Datetime =
            s.parse().map_err(|_| format!("{s:?} is not an RFC 3339 date-time"))?;
        Timestamp::from_datetime(&dt).ok_or_else(|| {
            format!("{s:?} needs a date, a time and an offset (e.g. 2026-11-24T08:00:00Z)")
        })
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

/// In JSON (logs, status) a timestamp is an RFC 3339 string.
impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// In a channel document a timestamp is a TOML offset date-time (not a string).
mod toml_time {
    use super::Timestamp;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(t: &Timestamp, s: S) -> Result<S::Ok, S::Error> {
        t.to_datetime().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Timestamp, D::Error> {
        let dt = toml::value::Datetime::deserialize(d)?;
        Timestamp::from_datetime(&dt).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "date-time {dt} needs a date, a time and an offset (e.g. 2026-11-24T08:00:00Z)"
            ))
        })
    }

    /// The same for an optional timestamp.
    pub mod option {
        use super::Timestamp;
        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(t: &Option<Timestamp>, s: S) -> Result<S::Ok, S::Error> {
            match t {
                Some(t) => super::serialize(t, s),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Timestamp>, D::Error> {
            #[derive(Deserialize)]
            struct Wrap(#[serde(with = "super")] Timestamp);
            Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
        }
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A fleet segment. A device has one (from its provisioning); a rollout allows some.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Segment {
    Canary,
    Early,
    General,
}

impl Segment {
    pub const ALL: [Segment; 3] = [Segment::Canary, Segment::Early, Segment::General];

    pub fn as_str(self) -> &'static str {
        match self {
            Segment::Canary => "canary",
            Segment::Early => "early",
            Segment::General => "general",
        }
    }
}

impl fmt::Display for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Segment {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Segment::ALL
            .into_iter()
            .find(|seg| seg.as_str() == s)
            .ok_or_else(|| format!("unknown segment {s:?}; expected one of canary, early, general"))
    }
}

fn all_segments() -> BTreeSet<Segment> {
    Segment::ALL.into_iter().collect()
}

/// One step of a time-based rollout: from `at` on, `percent` of the devices are eligible.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Wave {
    #[serde(with = "toml_time")]
    pub at: Timestamp,
    pub percent: u8,
}

/// How a target is rolled out (`[os.rollout]`, `[roles.<name>.rollout]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    /// Share of the devices (0 to 100) that are eligible; with `waves`, the share before the
    /// first wave opens.
    pub percent: u8,
    /// Segments allowed; all three when absent.
    #[serde(default = "all_segments")]
    pub segments: BTreeSet<Segment>,
    /// No device acts on this target before this time.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "toml_time::option")]
    pub not_before: Option<Timestamp>,
    /// Time schedule: each wave raises the percent at its time. Sorted by `at`, percents
    /// never decreasing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waves: Vec<Wave>,
}

impl Rollout {
    /// Everyone, now.
    pub fn everyone() -> Rollout {
        Rollout { percent: 100, segments: all_segments(), not_before: None, waves: Vec::new() }
    }

    /// The percent in force at `now`: the last wave whose time has come, else `percent`.
    pub fn percent_at(&self, now: u64) -> u8 {
        self.waves.iter().rev().find(|w| w.at.0 <= now).map_or(self.percent, |w| w.percent)
    }

    /// The time at which the percent in force next changes after `now`, if it does.
    pub fn next_wave(&self, now: u64) -> Option<Timestamp> {
        self.waves.iter().find(|w| w.at.0 > now).map(|w| w.at)
    }

    fn validate(&self, at: &str) -> Result<(), ChannelError> {
        let invalid = |field: String, message: String| ChannelError::Invalid { field, message };
        if self.percent > 100 {
            return Err(invalid(format!("{at}.percent"), format!("{} is above 100", self.percent)));
        }
        if self.segments.is_empty() {
            return Err(invalid(
                format!("{at}.segments"),
                "is empty: no device could ever be eligible (use percent = 0 to hold)".into(),
            ));
        }
        let mut prev: Option<&Wave> = None;
        for (i, w) in self.waves.iter().enumerate() {
            let field = format!("{at}.waves[{i}]");
            if w.percent > 100 {
                return Err(invalid(
                    format!("{field}.percent"),
                    format!("{} is above 100", w.percent),
                ));
            }
            if let Some(p) = prev {
                if w.at <= p.at {
                    return Err(invalid(
                        format!("{field}.at"),
                        format!("{} is not after the previous wave's {}", w.at, p.at),
                    ));
                }
                if w.percent < p.percent {
                    return Err(invalid(
                        format!("{field}.percent"),
                        format!("{} is below the previous wave's {}", w.percent, p.percent),
                    ));
                }
            } else if w.percent < self.percent {
                return Err(invalid(
                    format!("{field}.percent"),
                    format!(
                        "{} is below the rollout's starting percent {}",
                        w.percent, self.percent
                    ),
                ));
            }
            prev = Some(w);
        }
        Ok(())
    }
}

/// The OS target of a channel (`[os]`): one bundle, and how it is rolled out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OsTarget {
    /// Hardware the bundle is for (the bundle manifest's `compatible`).
    pub compatible: String,
    pub version: Version,
    /// Where the bundle is, tried in order. A relative URL (the usual
    /// `../bundles/<name>-<version>.mfb`) is resolved against the channel document's URL,
    /// so the same folder works on every mirror ([`resolve_url`]).
    pub urls: Vec<String>,
    /// Bytes of the `.mfb` file.
    pub size: u64,
    /// sha256 of the `.mfb` file (hex).
    pub sha256: String,
    /// The bundle manifest's `security_epoch`.
    pub security_epoch: u64,
    pub rollout: Rollout,
}

/// A role target (`[roles.<name>]`): one role bundle (`.mfr`, `../roles/<name>/<version>.mfr`),
/// rolled out like the OS, with its own pause and pin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleTarget {
    pub version: Version,
    pub urls: Vec<String>,
    /// Bytes of the `.mfr` file.
    pub size: u64,
    /// sha256 of the `.mfr` file (hex).
    pub sha256: String,
    pub rollout: Rollout,
    /// Emergency stop of this role only (the channel's `paused` stops every target).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// Forces every device of the channel to this release of the role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<RolePin>,
}

impl RoleTarget {
    /// A target of this bundle, rolled out by `rollout`, not paused, not pinned.
    pub fn new(
        version: Version,
        urls: Vec<String>,
        size: u64,
        sha256: String,
        rollout: Rollout,
    ) -> RoleTarget {
        RoleTarget { version, urls, size, sha256, rollout, paused: false, pin: None }
    }
}

/// A forced release of one role (`[roles.<name>.pin]`): acted on even when paused, ignores the
/// rollout, and may go down in version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolePin {
    pub version: Version,
    /// Why (shown in logs and status).
    pub reason: String,
    /// The pin is ignored from this time on; absent: until unpinned.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "toml_time::option")]
    pub expires: Option<Timestamp>,
    pub urls: Vec<String>,
    pub size: u64,
    pub sha256: String,
}

impl RolePin {
    /// Whether the pin is in force at `now`.
    pub fn active_at(&self, now: u64) -> bool {
        self.expires.is_none_or(|e| now < e.0)
    }
}

/// Per-device overrides of one role (`[devices.<device_id>.roles.<name>]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleOverride {
    /// Stay on (or go to) exactly this release of the role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_lock: Option<Version>,
    /// `false`: never update this role automatically.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_update: Option<bool>,
    /// Why (shown in logs and status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A fleet-wide forced version (`[pin]`): the emergency rollback. It is acted on even when
/// the channel is paused, ignores the rollout (everyone, now), and may go down in version as
/// long as the security epoch allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pin {
    pub version: Version,
    /// Why (shown in logs and status).
    pub reason: String,
    /// The pin is ignored from this time on; absent: until unpinned.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "toml_time::option")]
    pub expires: Option<Timestamp>,
    pub compatible: String,
    pub urls: Vec<String>,
    pub size: u64,
    pub sha256: String,
    pub security_epoch: u64,
}

impl Pin {
    /// Whether the pin is in force at `now`.
    pub fn active_at(&self, now: u64) -> bool {
        self.expires.is_none_or(|e| now < e.0)
    }
}

/// Per-device overrides in the channel (`[devices.<device_id>]`). A field given here wins
/// over the same field of the device's provisioning.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceOverride {
    /// Stay on (or go to) exactly this version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_lock: Option<Version>,
    /// `false`: never update automatically.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_update: Option<bool>,
    /// Follow this channel instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// Why (shown in logs and status).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Overrides of the device's roles, by role name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub roles: BTreeMap<String, RoleOverride>,
}

/// A channel document (`channels/<name>.toml`). Unknown keys are errors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Channel {
    /// Always [`CHANNEL_FORMAT`].
    pub format: u32,
    /// The channel's name; must match the file the device asked for.
    pub name: String,
    /// Bumped by every publish or edit; a device refuses a lower one than it has seen.
    pub sequence: u64,
    /// When the document was signed.
    #[serde(with = "toml_time")]
    pub published: Timestamp,
    /// A device does not act on the document from this time on (the publisher re-signs
    /// before then).
    #[serde(with = "toml_time")]
    pub expires: Timestamp,
    /// Emergency stop: no device starts an update of this channel (a pin still applies).
    #[serde(default)]
    pub paused: bool,
    pub os: OsTarget,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<Pin>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub roles: BTreeMap<String, RoleTarget>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub devices: BTreeMap<String, DeviceOverride>,
}

/// Why a channel document is not acted on. The device keeps running what it has.
#[derive(Debug, Error)]
pub enum ChannelError {
    #[error("channel document is {size} bytes, more than the {MAX_CHANNEL_DOC} accepted")]
    TooLarge { size: usize },
    #[error("unsigned channel document: no {SIGNATURE_SUFFIX} file")]
    Unsigned,
    #[error("channel signature: {0}")]
    Signature(#[from] SignError),
    #[error("malformed channel document{}{}: {message}",
        field.as_ref().map(|f| format!(": {f}")).unwrap_or_default(),
        line.map(|l| format!(" (line {l})")).unwrap_or_default())]
    Malformed { field: Option<String>, line: Option<usize>, message: String },
    #[error("invalid channel document: {field}: {message}")]
    Invalid { field: String, message: String },
    #[error("channel document is for channel {found:?}, expected {expected:?}")]
    WrongChannel { expected: String, found: String },
    #[error(
        "replayed channel document: sequence {sequence} is lower than {last_seen}, already seen"
    )]
    Replayed { sequence: u64, last_seen: u64 },
    #[error(
        "device clock is behind: the document was published at {published}, the clock says {now}"
    )]
    ClockBehind { published: Timestamp, now: Timestamp },
    #[error("channel document expired at {expires} (now {now}); keeping what runs")]
    Expired { expires: Timestamp, now: Timestamp },
}

impl ChannelError {
    /// A stable, short name for logs, status and metric labels.
    pub fn code(&self) -> &'static str {
        match self {
            ChannelError::TooLarge { .. } => "too_large",
            ChannelError::Unsigned => "unsigned",
            ChannelError::Signature(SignError::UnknownKey(_)) => "unknown_key",
            ChannelError::Signature(SignError::BadSignature(_)) => "bad_signature",
            ChannelError::Signature(_) => "malformed_signature",
            ChannelError::Malformed { .. } => "malformed",
            ChannelError::Invalid { .. } => "invalid",
            ChannelError::WrongChannel { .. } => "wrong_channel",
            ChannelError::Replayed { .. } => "replayed",
            ChannelError::ClockBehind { .. } => "clock_behind",
            ChannelError::Expired { .. } => "expired",
        }
    }
}

fn check_artifact(at: &str, urls: &[String], size: u64, sha256: &str) -> Result<(), ChannelError> {
    let invalid = |field: &str, message: &str| ChannelError::Invalid {
        field: format!("{at}.{field}"),
        message: message.to_string(),
    };
    if urls.is_empty() {
        return Err(invalid("urls", "is empty: at least one URL is needed"));
    }
    for (i, u) in urls.iter().enumerate() {
        if u.is_empty() || u.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ChannelError::Invalid {
                field: format!("{at}.urls[{i}]"),
                message: format!("{u:?} is not a URL"),
            });
        }
    }
    if size == 0 {
        return Err(invalid("size", "is 0"));
    }
    if crate::bundle::parse_sha256(sha256).is_none() {
        return Err(invalid("sha256", "is not 64 lowercase hex characters"));
    }
    Ok(())
}

/// The line number (from 1) of byte `offset` of a TOML text, and the dotted name of the key
/// set on that line (`os.rollout.percent`) when the line is a `key = value` line.
/// With `table_only` (a missing key), only the enclosing table is named.
fn locate(text: &str, offset: usize, table_only: bool) -> (Option<usize>, Option<String>) {
    let offset = offset.min(text.len());
    let line_no = text[..offset].matches('\n').count() + 1;
    let mut table = String::new();
    let mut field = None;
    for (i, line) in text.lines().enumerate().take(line_no) {
        let l = line.trim();
        if l.starts_with('[') {
            table = l.trim_matches(|c| c == '[' || c == ']').trim().to_string();
            field = None;
        } else if i + 1 == line_no && !table_only {
            field = l.split_once('=').map(|(k, _)| k.trim().trim_matches('"').to_string());
        }
    }
    let field = field.filter(|k| !k.is_empty() && !k.starts_with('#')).map(|k| {
        if table.is_empty() {
            k
        } else {
            format!("{table}.{k}")
        }
    });
    (Some(line_no), field.or_else(|| (!table.is_empty()).then_some(table)))
}

impl Channel {
    /// Parses and validates a document (strict; no signature check: see [`verify`]).
    pub fn parse(bytes: &[u8]) -> Result<Channel, ChannelError> {
        let text = std::str::from_utf8(bytes).map_err(|e| ChannelError::Malformed {
            field: None,
            line: Some(bytes[..e.valid_up_to()].iter().filter(|b| **b == b'\n').count() + 1),
            message: "not UTF-8".into(),
        })?;
        let ch: Channel = toml::from_str(text).map_err(|e| {
            let (line, field) = match e.span() {
                Some(s) => locate(text, s.start, e.message().starts_with("missing field")),
                None => (None, None),
            };
            ChannelError::Malformed { field, line, message: e.message().trim_end().to_string() }
        })?;
        ch.validate()?;
        Ok(ch)
    }

    /// The checks beyond the schema, each naming its field.
    pub fn validate(&self) -> Result<(), ChannelError> {
        let invalid = |field: &str, message: String| ChannelError::Invalid {
            field: field.to_string(),
            message,
        };
        if self.format != CHANNEL_FORMAT {
            return Err(invalid(
                "format",
                format!("{} is not supported (expected {CHANNEL_FORMAT})", self.format),
            ));
        }
        if !is_valid_name(&self.name) {
            return Err(invalid(
                "name",
                format!("{:?} is not 1-64 of a-z, 0-9, '.', '_', '-'", self.name),
            ));
        }
        if self.expires <= self.published {
            return Err(invalid(
                "expires",
                format!("{} is not after published {}", self.expires, self.published),
            ));
        }
        if self.os.compatible.is_empty() {
            return Err(invalid("os.compatible", "is empty".into()));
        }
        check_artifact("os", &self.os.urls, self.os.size, &self.os.sha256)?;
        self.os.rollout.validate("os.rollout")?;
        if let Some(pin) = &self.pin {
            if pin.reason.trim().is_empty() {
                return Err(invalid("pin.reason", "is empty: say why the fleet is pinned".into()));
            }
            if pin.compatible != self.os.compatible {
                return Err(invalid(
                    "pin.compatible",
                    format!(
                        "{:?} differs from os.compatible {:?}",
                        pin.compatible, self.os.compatible
                    ),
                ));
            }
            check_artifact("pin", &pin.urls, pin.size, &pin.sha256)?;
        }
        for (name, role) in &self.roles {
            if !is_valid_name(name) {
                return Err(invalid(&format!("roles.{name}"), "is not a valid role name".into()));
            }
            let at = format!("roles.{name}");
            check_artifact(&at, &role.urls, role.size, &role.sha256)?;
            role.rollout.validate(&format!("{at}.rollout"))?;
            if let Some(pin) = &role.pin {
                if pin.reason.trim().is_empty() {
                    return Err(invalid(&format!("{at}.pin.reason"), "is empty: say why".into()));
                }
                check_artifact(&format!("{at}.pin"), &pin.urls, pin.size, &pin.sha256)?;
            }
        }
        for (id, o) in &self.devices {
            if id.is_empty()
                || id.len() > 128
                || id.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(invalid(&format!("devices.{id:?}"), "is not a valid device id".into()));
            }
            if let Some(name) = o.roles.keys().find(|n| !is_valid_name(n)) {
                return Err(invalid(
                    &format!("devices.{id}.roles.{name:?}"),
                    "is not a valid role name".into(),
                ));
            }
            if let Some(c) = &o.channel {
                if !is_valid_name(c) {
                    return Err(invalid(
                        &format!("devices.{id}.channel"),
                        format!("{c:?} is not a valid channel name"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Renders the document; the publisher signs exactly these bytes.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a channel serializes")
    }

    /// The document's bytes and its signature file's bytes, signed by `key`.
    pub fn sign(&self, key: &SigningKey) -> (Vec<u8>, Vec<u8>) {
        let doc = self.to_toml().into_bytes();
        let sig = SignatureFile::sign(key, &doc).to_bytes();
        (doc, sig)
    }
}

/// What [`verify`] checks a document against.
#[derive(Debug, Clone, Copy)]
pub struct Expect<'a> {
    pub keyring: &'a Keyring,
    /// The channel the device asked for (the file name without `.toml`).
    pub name: &'a str,
    /// The highest sequence of this channel seen before (from the device state).
    pub last_sequence: Option<u64>,
    /// Unix seconds.
    pub now: u64,
}

/// A document whose signature, schema, name, sequence and freshness have been checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedChannel {
    pub channel: Channel,
    /// Who signed it.
    pub key_id: KeyId,
    /// sha256 of the document bytes (hex), for logs and caching.
    pub sha256: String,
}

/// Checks a fetched document and its signature file (`None`: there was none) in the order
/// given in the module documentation.
pub fn verify(
    doc: &[u8],
    sig: Option<&[u8]>,
    expect: &Expect<'_>,
) -> Result<VerifiedChannel, ChannelError> {
    if doc.len() > MAX_CHANNEL_DOC {
        return Err(ChannelError::TooLarge { size: doc.len() });
    }
    let sig = sig.ok_or(ChannelError::Unsigned)?;
    if sig.len() as u64 > MAX_SIGNATURE_FILE {
        return Err(SignError::MalformedSignature(format!("{} bytes", sig.len())).into());
    }
    let sig = SignatureFile::parse(sig)?;
    let key_id = expect.keyring.verify(doc, &sig)?;
    let channel = Channel::parse(doc)?;
    if channel.name != expect.name {
        return Err(ChannelError::WrongChannel {
            expected: expect.name.to_string(),
            found: channel.name,
        });
    }
    if let Some(last_seen) = expect.last_sequence {
        if channel.sequence < last_seen {
            return Err(ChannelError::Replayed { sequence: channel.sequence, last_seen });
        }
    }
    if expect.now.saturating_add(MAX_CLOCK_SKEW) < channel.published.0 {
        return Err(ChannelError::ClockBehind {
            published: channel.published,
            now: Timestamp(expect.now),
        });
    }
    if expect.now >= channel.expires.0 {
        return Err(ChannelError::Expired { expires: channel.expires, now: Timestamp(expect.now) });
    }
    use sha2::Digest;
    let sha256 = hex::encode(sha2::Sha256::digest(doc));
    Ok(VerifiedChannel { channel, key_id, sha256 })
}

/// Resolves a target URL of a channel against the URL the document was fetched from: an
/// absolute `http://` or `https://` URL is kept; `/path` replaces the path; anything else is
/// relative to the document's folder, with `..` and `.` segments applied (RFC 3986, for the
/// URLs a publisher writes: no query or fragment handling beyond dropping the base's).
pub fn resolve_url(document_url: &str, target: &str) -> String {
    if target.starts_with("http://") || target.starts_with("https://") {
        return target.to_string();
    }
    let base = document_url.split(['?', '#']).next().unwrap_or("");
    let (origin, path) = match base.find("://") {
        Some(i) => match base[i + 3..].find('/') {
            Some(j) => (&base[..i + 3 + j], &base[i + 3 + j..]),
            None => (base, "/"),
        },
        None => ("", base),
    };
    let joined = if target.starts_with('/') {
        target.to_string()
    } else {
        let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
        format!("{dir}{target}")
    };
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = joined.split('/').collect();
    for (i, seg) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        match *seg {
            "." => {
                if last {
                    out.push("");
                }
            }
            ".." => {
                if out.len() > 1 {
                    out.pop();
                }
                if last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    format!("{origin}{}", out.join("/"))
}

#[cfg(test)]
pub(crate) mod tests;
