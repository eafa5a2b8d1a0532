//! The provision partition's files: strict types, validation, and reading them from a card.
//!
//! The `provision` FAT partition (DESIGN.md section 7) holds one device's provisioning:
//! `device.toml` (required), and optionally `wifi.toml`, `authorized_keys` and `secrets.age`
//! (an age file encrypted to the device; never plain text). Nothing else may be on it.
//! The imager validates with this same code before it writes anything, and the device's
//! first boot ([`crate::firstboot`]) validates again before it applies anything, so the host
//! cannot produce what the device would reject. docs/provisioning.md is the reference.
//!
//! Every parser is pure (bytes in, typed value or [`ProvisionError`] out); the only I/O here
//! is [`Provisioning::from_dir`] and [`read_partition`] at the edges.

pub mod identity;
pub mod secrets;

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;
use std::time::Duration;
use thiserror::Error;

pub use secrets::{EncryptedSecrets, Secrets};

/// The device's settings (required).
pub const DEVICE_TOML: &str = "device.toml";
/// Wi-Fi networks (optional).
pub const WIFI_TOML: &str = "wifi.toml";
/// SSH public keys allowed to log in as root (optional).
pub const AUTHORIZED_KEYS: &str = "authorized_keys";
/// Secrets, age-encrypted to the device's recipient (optional).
pub const SECRETS_AGE: &str = "secrets.age";

/// Where first boot copies the validated provisioning files, under the data partition
/// (`/data/metrica/provision/<file>`), and where the daemon reads the CA bundle named by
/// `channel.ca_bundle`.
pub const COPY_DIR: &str = "metrica/provision";

/// Every file name the provision partition may hold, in the order they are written (and the
/// CA bundle named by `channel.ca_bundle`, written last).
pub const FILE_NAMES: [&str; 4] = [DEVICE_TOML, WIFI_TOML, AUTHORIZED_KEYS, SECRETS_AGE];

/// Largest provisioning file accepted (the partition is 16 MiB; these files are small).
pub const MAX_FILE_LEN: usize = 1 << 20;

/// What kind of problem a [`ProvisionError`] is, for callers that branch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A required file is absent.
    MissingFile,
    /// A file that is not one of [`FILE_NAMES`], or a file given twice.
    UnexpectedFile,
    /// Not valid UTF-8 / TOML / age, or too large.
    Syntax,
    /// A required field is absent.
    MissingField,
    /// A field that the schema does not have.
    UnknownField,
    /// A field whose value is wrong.
    InvalidValue,
    /// A secret written in plain text where only a reference to `secrets.age` is allowed.
    PlainTextSecret,
    /// `secrets.age` cannot be decrypted with this device's identity.
    NotDecryptable,
}

/// One problem with one provisioning file: names the file, the field (or line) and what was
/// expected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub struct ProvisionError {
    pub file: String,
    /// The field (`channel.url`, `network[1].ssid`) or line (`line 3`), when there is one.
    pub field: Option<String>,
    pub kind: ErrorKind,
    pub message: String,
}

impl fmt::Display for ProvisionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{}: {field}: {}", self.file, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

impl ProvisionError {
    pub fn new(
        file: &str,
        field: Option<&str>,
        kind: ErrorKind,
        message: impl Into<String>,
    ) -> Self {
        ProvisionError {
            file: file.to_string(),
            field: field.map(str::to_string),
            kind,
            message: message.into(),
        }
    }

    fn invalid(file: &str, field: &str, message: impl Into<String>) -> Self {
        Self::new(file, Some(field), ErrorKind::InvalidValue, message)
    }
}

/// Every problem found in a set of provisioning files (validation does not stop at the first).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub struct ProvisionErrors(pub Vec<ProvisionError>);

impl fmt::Display for ProvisionErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Maps a TOML error to a [`ProvisionError`]: unknown and missing fields name the field,
/// anything else names the line.
fn toml_error(file: &str, text: &str, e: &toml::de::Error) -> ProvisionError {
    let msg = e.message().trim().to_string();
    let quoted = msg.split('`').nth(1).map(str::to_string);
    let line = e.span().map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
    let line_field = line.map(|l| format!("line {l}"));
    if msg.starts_with("unknown field") {
        let field = quoted.unwrap_or_default();
        let at = line.map(|l| format!(" (line {l})")).unwrap_or_default();
        return ProvisionError::new(
            file,
            Some(&field),
            ErrorKind::UnknownField,
            format!("{msg}{at}"),
        );
    }
    if msg.starts_with("missing field") {
        let field = quoted.unwrap_or_default();
        return ProvisionError::new(file, Some(&field), ErrorKind::MissingField, msg);
    }
    ProvisionError::new(file, line_field.as_deref(), ErrorKind::Syntax, msg)
}

fn utf8<'a>(file: &str, bytes: &'a [u8]) -> Result<&'a str, ProvisionError> {
    if bytes.len() > MAX_FILE_LEN {
        return Err(ProvisionError::new(
            file,
            None,
            ErrorKind::Syntax,
            format!("{} bytes; expected at most {MAX_FILE_LEN}", bytes.len()),
        ));
    }
    std::str::from_utf8(bytes).map_err(|e| {
        ProvisionError::new(file, None, ErrorKind::Syntax, format!("not UTF-8 text: {e}"))
    })
}

// ---------------------------------------------------------------------------------------------
// Field checks (pure)

/// An RFC 1123 host name label: 1 to 63 letters, digits and hyphens, not starting or ending
/// with a hyphen.
pub fn check_hostname(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a valid host name; expected an RFC 1123 label: 1 to 63 letters, digits \
             and hyphens, not starting or ending with a hyphen"
        ))
    }
}

/// A device id: 1 to 64 lowercase letters, digits, `-`, `_` or `.`, starting with a letter or
/// digit. It is hashed for rollouts and used in file names, so it is kept plain.
pub fn check_device_id(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
        && s.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a valid device id; expected 1 to 64 lowercase letters, digits, '-', \
             '_' or '.', starting with a letter or digit"
        ))
    }
}

/// A role or channel name: 1 to 64 lowercase letters, digits and hyphens, starting with a letter.
pub fn check_name(what: &str, s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.as_bytes()[0].is_ascii_lowercase();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a valid {what} name; expected 1 to 64 lowercase letters, digits and \
             hyphens, starting with a letter"
        ))
    }
}

/// A channel base URL: `https://` or `http://`, a host, no spaces.
pub fn check_url(s: &str) -> Result<(), String> {
    let rest = s.strip_prefix("https://").or_else(|| s.strip_prefix("http://"));
    let ok = match rest {
        Some(r) => {
            let host = r.split(['/', '?', '#']).next().unwrap_or("");
            !host.is_empty() && !s.chars().any(|c| c.is_whitespace() || c.is_control())
        }
        None => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("{s:?} is not a valid URL; expected https://HOST/PATH (or http://)"))
    }
}

/// An IANA time zone name (`UTC`, `Europe/Berlin`, `America/Argentina/Buenos_Aires`). The
/// device has no zone database to check against, so the shape is checked.
/// A CA bundle's file name: a plain name ending in `.pem`, beside the other files.
pub fn check_ca_bundle_name(s: &str) -> Result<(), String> {
    let plain = s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !plain || s.starts_with('.') || s.len() > 64 || !s.ends_with(".pem") {
        return Err(format!(
            "{s:?} is not a CA bundle file name; expected a file on the provision partition \
             such as \"ca.pem\" (letters, digits, . _ -, ending in .pem)"
        ));
    }
    Ok(())
}

pub fn check_timezone(s: &str) -> Result<(), String> {
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 30
            && p.as_bytes()[0].is_ascii_alphabetic()
            && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"_+-".contains(&b))
    };
    let parts: Vec<&str> = s.split('/').collect();
    if parts.len() <= 3 && parts.iter().all(|p| part_ok(p)) {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a time zone name; expected an IANA name such as UTC or Europe/Berlin"
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// device.toml

/// Which rollout segment the device belongs to (DESIGN.md section 6): the channel's type.
pub use crate::channel::Segment;

/// A daily maintenance window in the device's local time (`"02:00-04:30"`); it may wrap
/// midnight (`"22:00-02:00"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaintenanceWindow {
    /// Minutes after midnight.
    pub start: u16,
    pub end: u16,
}

impl MaintenanceWindow {
    pub fn parse(s: &str) -> Result<Self, String> {
        let expected =
            || format!("{s:?} is not a window; expected \"HH:MM-HH:MM\" (24-hour clock)");
        let hm = |t: &str| -> Option<u16> {
            let (h, m) = t.trim().split_once(':')?;
            if h.len() != 2 || m.len() != 2 {
                return None;
            }
            let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
            (h < 24 && m < 60).then_some(h * 60 + m)
        };
        let (a, b) = s.split_once('-').ok_or_else(expected)?;
        let (start, end) = (hm(a).ok_or_else(expected)?, hm(b).ok_or_else(expected)?);
        if start == end {
            return Err(format!("{s:?} is an empty window; start and end must differ"));
        }
        Ok(MaintenanceWindow { start, end })
    }

    /// Whether `minute` (after local midnight) is inside the window.
    pub fn contains(&self, minute: u16) -> bool {
        if self.start < self.end {
            (self.start..self.end).contains(&minute)
        } else {
            minute >= self.start || minute < self.end
        }
    }
}

impl fmt::Display for MaintenanceWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (s, e) = (self.start, self.end);
        write!(f, "{:02}:{:02}-{:02}:{:02}", s / 60, s % 60, e / 60, e % 60)
    }
}

/// `device.toml` as written in the file (every field as text). The imager fills one from
/// flags or a CSV row and calls [`DeviceToml::validate`]; the device parses one with
/// [`DeviceConfig::parse`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceToml {
    pub device_id: String,
    pub role: String,
    pub segment: String,
    pub hostname: String,
    #[serde(default = "default_timezone")]
    pub timezone: String,
    pub channel: ChannelToml,
    #[serde(default)]
    pub update: UpdateToml,
    #[serde(default)]
    pub overrides: OverridesToml,
}

fn default_timezone() -> String {
    "UTC".into()
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelToml {
    /// Channel name (`stable`, `beta`): the document is `channels/<name>.toml`.
    pub name: String,
    /// Base URL of the published folder.
    pub url: String,
    /// Other base URLs serving the same folder, tried in order after `url`.
    #[serde(default)]
    pub mirrors: Vec<String>,
    /// A PEM file of CA certificates on the provision partition (`ca.pem`): HTTPS update
    /// servers are then checked against these only (a private update server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateToml {
    /// How often to poll the channel (`"5m"`, `"1h"`), 1 minute to 1 day.
    #[serde(default = "default_interval")]
    pub interval: String,
    /// Daily window for installs and reboots (`"02:00-04:00"`, local time); none = any time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance_window: Option<String>,
}

impl Default for UpdateToml {
    fn default() -> Self {
        UpdateToml { interval: default_interval(), maintenance_window: None }
    }
}

fn default_interval() -> String {
    "5m".into()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverridesToml {
    /// Stay on this OS version (semver) whatever the channel offers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_lock: Option<String>,
    /// `false`: never install on its own (an operator's command still can).
    #[serde(default = "yes")]
    pub auto_update: bool,
    /// Follow this channel instead of `channel.name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
}

impl Default for OverridesToml {
    fn default() -> Self {
        OverridesToml { version_lock: None, auto_update: true, channel: None }
    }
}

fn yes() -> bool {
    true
}

/// The channel a device follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Channel {
    pub name: String,
    /// `url` first, then the mirrors, in the order to try them.
    pub urls: Vec<String>,
    /// The file name of the CA bundle on the provision partition, if any.
    pub ca_bundle: Option<String>,
}

impl Channel {
    /// Where the daemon reads the CA bundle: its copy on the data partition.
    pub fn ca_bundle_path(&self, data_dir: &Path) -> Option<std::path::PathBuf> {
        self.ca_bundle.as_ref().map(|name| data_dir.join(COPY_DIR).join(name))
    }
}

/// Per-device overrides of what the channel says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overrides {
    pub version_lock: Option<semver::Version>,
    pub auto_update: bool,
    pub channel: Option<String>,
}

/// A validated `device.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    pub device_id: String,
    pub role: String,
    pub segment: Segment,
    pub hostname: String,
    pub timezone: String,
    pub channel: Channel,
    pub interval: Duration,
    pub maintenance_window: Option<MaintenanceWindow>,
    pub overrides: Overrides,
    /// The file as validated, to be written back unchanged.
    pub raw: DeviceToml,
}

impl DeviceConfig {
    /// Parses and validates `device.toml`.
    pub fn parse(bytes: &[u8]) -> Result<Self, ProvisionError> {
        Self::parse_all(bytes).map_err(|mut e| e.0.remove(0))
    }

    /// Like [`DeviceConfig::parse`], with every problem found.
    pub fn parse_all(bytes: &[u8]) -> Result<Self, ProvisionErrors> {
        let f = DEVICE_TOML;
        let text = utf8(f, bytes).map_err(|e| ProvisionErrors(vec![e]))?;
        let raw: DeviceToml =
            toml::from_str(text).map_err(|e| ProvisionErrors(vec![toml_error(f, text, &e)]))?;
        raw.validate()
    }

    /// The channel the device follows: the override's, if any.
    pub fn effective_channel(&self) -> &str {
        self.overrides.channel.as_deref().unwrap_or(&self.channel.name)
    }

    /// The file's text (canonical TOML of what was validated).
    pub fn to_toml(&self) -> String {
        self.raw.to_toml()
    }
}

impl DeviceToml {
    /// Canonical TOML text of this file.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("device.toml serializes")
    }

    /// Checks every field; returns the typed configuration or every problem found.
    pub fn validate(&self) -> Result<DeviceConfig, ProvisionErrors> {
        let f = DEVICE_TOML;
        let mut errs = Vec::new();
        let mut check = |field: &str, r: Result<(), String>| {
            if let Err(m) = r {
                errs.push(ProvisionError::invalid(f, field, m));
            }
        };
        check("device_id", check_device_id(&self.device_id));
        check("role", check_name("role", &self.role));
        let segment = self.segment.parse::<Segment>();
        check("segment", segment.as_ref().map(|_| ()).map_err(Clone::clone));
        check("hostname", check_hostname(&self.hostname));
        check("timezone", check_timezone(&self.timezone));
        check("channel.name", check_name("channel", &self.channel.name));
        check("channel.url", check_url(&self.channel.url));
        for (i, m) in self.channel.mirrors.iter().enumerate() {
            check(&format!("channel.mirrors[{i}]"), check_url(m));
        }
        if let Some(name) = &self.channel.ca_bundle {
            check("channel.ca_bundle", check_ca_bundle_name(name));
        }
        let interval = humantime::parse_duration(&self.update.interval)
            .map_err(|e| {
                format!(
                    "{:?} is not a duration ({e}); expected e.g. \"5m\" or \"1h\"",
                    self.update.interval
                )
            })
            .and_then(|d| {
                if (Duration::from_secs(60)..=Duration::from_secs(86_400)).contains(&d) {
                    Ok(d)
                } else {
                    Err(format!("{:?} is out of range; expected 1m to 24h", self.update.interval))
                }
            });
        check("update.interval", interval.as_ref().map(|_| ()).map_err(Clone::clone));
        let window =
            self.update.maintenance_window.as_deref().map(MaintenanceWindow::parse).transpose();
        check("update.maintenance_window", window.as_ref().map(|_| ()).map_err(Clone::clone));
        let lock = self
            .overrides
            .version_lock
            .as_deref()
            .map(|v| {
                semver::Version::parse(v).map_err(|e| {
                    format!("{v:?} is not a version ({e}); expected semver such as 1.4.2")
                })
            })
            .transpose();
        check("overrides.version_lock", lock.as_ref().map(|_| ()).map_err(Clone::clone));
        if let Some(c) = &self.overrides.channel {
            check("overrides.channel", check_name("channel", c));
        }
        if !errs.is_empty() {
            return Err(ProvisionErrors(errs));
        }
        let mut urls = vec![self.channel.url.clone()];
        urls.extend(self.channel.mirrors.iter().cloned());
        Ok(DeviceConfig {
            device_id: self.device_id.clone(),
            role: self.role.clone(),
            segment: segment.expect("checked"),
            hostname: self.hostname.clone(),
            timezone: self.timezone.clone(),
            channel: Channel {
                name: self.channel.name.clone(),
                urls,
                ca_bundle: self.channel.ca_bundle.clone(),
            },
            interval: interval.expect("checked"),
            maintenance_window: window.expect("checked"),
            overrides: Overrides {
                version_lock: lock.expect("checked"),
                auto_update: self.overrides.auto_update,
                channel: self.overrides.channel.clone(),
            },
            raw: self.clone(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// wifi.toml

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct WifiToml {
    country: String,
    #[serde(default)]
    network: Vec<NetworkToml>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkToml {
    ssid: String,
    #[serde(default)]
    psk_secret: Option<String>,
    /// Present only to name the mistake: a plain-text key is refused.
    #[serde(default)]
    psk: Option<toml::Value>,
    #[serde(default)]
    security: Option<String>,
    #[serde(default)]
    hidden: bool,
    #[serde(default)]
    priority: u8,
}

/// How a Wi-Fi network authenticates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WifiSecurity {
    /// No key.
    Open,
    /// WPA2/WPA3 personal; the passphrase is the named secret in `secrets.age`.
    Psk { secret: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WifiNetwork {
    pub ssid: String,
    pub security: WifiSecurity,
    pub hidden: bool,
    pub priority: u8,
}

/// A validated `wifi.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WifiConfig {
    /// ISO 3166-1 alpha-2 regulatory country (`DE`).
    pub country: String,
    pub networks: Vec<WifiNetwork>,
}

impl WifiConfig {
    pub fn parse(bytes: &[u8]) -> Result<Self, ProvisionError> {
        let f = WIFI_TOML;
        let text = utf8(f, bytes)?;
        let raw: WifiToml = toml::from_str(text).map_err(|e| toml_error(f, text, &e))?;
        if raw.country.len() != 2 || !raw.country.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(ProvisionError::invalid(
                f,
                "country",
                format!("{:?} is not a country code; expected two capital letters (ISO 3166-1), e.g. DE", raw.country),
            ));
        }
        if raw.network.is_empty() {
            return Err(ProvisionError::new(
                f,
                Some("network"),
                ErrorKind::MissingField,
                "no [[network]]; expected at least one network (or leave wifi.toml out)",
            ));
        }
        let mut networks = Vec::new();
        let mut seen = BTreeSet::new();
        for (i, n) in raw.network.into_iter().enumerate() {
            let at = |k: &str| format!("network[{i}].{k}");
            if n.psk.is_some() {
                return Err(ProvisionError::new(
                    f,
                    Some(&at("psk")),
                    ErrorKind::PlainTextSecret,
                    "a plain-text key is not allowed on the card; put it in secrets.age and name it \
                     with psk_secret",
                ));
            }
            if n.ssid.is_empty() || n.ssid.len() > 32 || n.ssid.chars().any(char::is_control) {
                return Err(ProvisionError::invalid(
                    f,
                    &at("ssid"),
                    format!(
                        "{:?} is not an SSID; expected 1 to 32 bytes without control characters",
                        n.ssid
                    ),
                ));
            }
            if !seen.insert(n.ssid.clone()) {
                return Err(ProvisionError::invalid(
                    f,
                    &at("ssid"),
                    format!("{:?} is listed twice", n.ssid),
                ));
            }
            let security = match (n.security.as_deref(), n.psk_secret) {
                (Some("open"), None) => WifiSecurity::Open,
                (None | Some("psk"), Some(secret)) => {
                    secrets::check_secret_name(&secret)
                        .map_err(|m| ProvisionError::invalid(f, &at("psk_secret"), m))?;
                    WifiSecurity::Psk { secret }
                }
                (Some("open"), Some(_)) => {
                    return Err(ProvisionError::invalid(f, &at("psk_secret"), "an open network has no key"))
                }
                (None | Some("psk"), None) => {
                    return Err(ProvisionError::new(
                        f,
                        Some(&at("psk_secret")),
                        ErrorKind::MissingField,
                        "missing; expected the name of the passphrase in secrets.age, or security = \"open\"",
                    ))
                }
                (Some(other), _) => {
                    return Err(ProvisionError::invalid(
                        f,
                        &at("security"),
                        format!("{other:?} is not a security mode; expected \"psk\" or \"open\""),
                    ))
                }
            };
            networks.push(WifiNetwork {
                ssid: n.ssid,
                security,
                hidden: n.hidden,
                priority: n.priority,
            });
        }
        Ok(WifiConfig { country: raw.country, networks })
    }

    /// Names of the secrets this configuration needs.
    pub fn secret_names(&self) -> Vec<&str> {
        self.networks
            .iter()
            .filter_map(|n| match &n.security {
                WifiSecurity::Psk { secret } => Some(secret.as_str()),
                WifiSecurity::Open => None,
            })
            .collect()
    }

    /// `wpa_supplicant.conf` text, with each network's passphrase looked up in `secrets`.
    pub fn wpa_supplicant_conf(&self, secrets: &Secrets) -> Result<String, ProvisionError> {
        let mut s = format!(
            "ctrl_interface=DIR=/run/wpa_supplicant\nupdate_config=0\ncountry={}\n",
            self.country
        );
        for (i, n) in self.networks.iter().enumerate() {
            s.push_str("\nnetwork={\n");
            s.push_str(&format!("\tssid={}\n", hex::encode(n.ssid.as_bytes())));
            match &n.security {
                WifiSecurity::Open => s.push_str("\tkey_mgmt=NONE\n"),
                WifiSecurity::Psk { secret } => {
                    let psk = secrets.get(secret).ok_or_else(|| {
                        ProvisionError::new(
                            WIFI_TOML,
                            Some(&format!("network[{i}].psk_secret")),
                            ErrorKind::InvalidValue,
                            format!("secret {secret:?} is not in secrets.age"),
                        )
                    })?;
                    if !(8..=63).contains(&psk.len())
                        || psk.chars().any(|c| !(' '..='~').contains(&c))
                    {
                        return Err(ProvisionError::invalid(
                            SECRETS_AGE,
                            secret,
                            "not a WPA passphrase; expected 8 to 63 printable ASCII characters",
                        ));
                    }
                    s.push_str("\tkey_mgmt=WPA-PSK SAE\n\tieee80211w=1\n");
                    s.push_str(&format!("\tpsk=\"{psk}\"\n"));
                }
            }
            if n.hidden {
                s.push_str("\tscan_ssid=1\n");
            }
            s.push_str(&format!("\tpriority={}\n}}\n", n.priority));
        }
        Ok(s)
    }
}

// ---------------------------------------------------------------------------------------------
// authorized_keys

/// A validated `authorized_keys`: every non-comment line is an OpenSSH public key (with
/// optional options in front).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizedKeys {
    /// The file as validated (written unchanged to the device).
    pub text: String,
    /// SHA256 fingerprints, one per key, in file order.
    pub fingerprints: Vec<String>,
}

impl AuthorizedKeys {
    pub fn parse(bytes: &[u8]) -> Result<Self, ProvisionError> {
        let f = AUTHORIZED_KEYS;
        let text = utf8(f, bytes)?;
        let mut fingerprints = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = format!("line {}", i + 1);
            if line.contains("PRIVATE KEY") {
                return Err(ProvisionError::new(
                    f,
                    Some(&at),
                    ErrorKind::PlainTextSecret,
                    "this is a private key; expected public keys only",
                ));
            }
            let entry: ssh_key::authorized_keys::Entry = line.parse().map_err(|e| {
                ProvisionError::invalid(
                    f,
                    &at,
                    format!("not an SSH public key ({e}); expected e.g. \"ssh-ed25519 AAAA... comment\""),
                )
            })?;
            fingerprints.push(entry.public_key().fingerprint(ssh_key::HashAlg::Sha256).to_string());
        }
        if fingerprints.is_empty() {
            return Err(ProvisionError::new(
                f,
                None,
                ErrorKind::MissingField,
                "no key; expected at least one public key (or leave the file out)",
            ));
        }
        Ok(AuthorizedKeys { text: text.to_string(), fingerprints })
    }
}

// ---------------------------------------------------------------------------------------------
// The whole set

/// One device's provisioning, validated as a whole.
#[derive(Debug, Clone)]
pub struct Provisioning {
    pub device: DeviceConfig,
    pub wifi: Option<WifiConfig>,
    pub authorized_keys: Option<AuthorizedKeys>,
    pub secrets: Option<EncryptedSecrets>,
    /// The files as validated, by name in [`FILE_NAMES`] order: exactly what to write.
    files: Vec<(String, Vec<u8>)>,
}

impl Provisioning {
    /// Validates a set of files given as (name, bytes); see [`validate_files`].
    pub fn from_files(files: &[(String, Vec<u8>)]) -> Result<Self, ProvisionErrors> {
        validate_files(files)
    }

    /// Reads and validates the provisioning files in a folder (every regular file in it is
    /// part of the set; subfolders are refused).
    pub fn from_dir(dir: &Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if !path.is_file() {
                anyhow::bail!(
                    "{}: not a regular file; the provision folder holds files only",
                    path.display()
                );
            }
            let bytes =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            files.push((name, bytes));
        }
        Self::from_files(&files)
            .map_err(|e| anyhow::anyhow!("{}: invalid provisioning:\n{e}", dir.display()))
    }

    /// The files to write, in [`FILE_NAMES`] order, as they were validated.
    pub fn files(&self) -> &[(String, Vec<u8>)] {
        &self.files
    }

    /// Names of the secrets the other files refer to (to check after decryption).
    pub fn required_secrets(&self) -> Vec<&str> {
        self.wifi.as_ref().map(WifiConfig::secret_names).unwrap_or_default()
    }
}

/// Validates a whole provisioning set: `device.toml` present, no unknown or doubled file,
/// each file valid, and the files consistent with each other (a Wi-Fi passphrase needs
/// `secrets.age`). Returns every problem found, each naming its file and field.
pub fn validate_files(files: &[(String, Vec<u8>)]) -> Result<Provisioning, ProvisionErrors> {
    let mut errs = Vec::new();
    let mut seen = BTreeSet::new();
    let get = |n: &str| files.iter().find(|(name, _)| name == n).map(|(_, b)| b.as_slice());
    let device = get(DEVICE_TOML).map(DeviceConfig::parse_all);
    let ca_name = device.as_ref().and_then(|d| d.as_ref().ok()?.channel.ca_bundle.clone());
    for (name, _) in files {
        if !FILE_NAMES.contains(&name.as_str()) && ca_name.as_ref() != Some(name) {
            errs.push(ProvisionError::new(
                name,
                None,
                ErrorKind::UnexpectedFile,
                format!(
                    "unexpected file; the provision partition holds only {} (and the CA \
                     bundle named by device.toml channel.ca_bundle)",
                    FILE_NAMES.join(", ")
                ),
            ));
        } else if !seen.insert(name.as_str()) {
            errs.push(ProvisionError::new(name, None, ErrorKind::UnexpectedFile, "given twice"));
        }
    }
    let device = match device {
        None => {
            errs.push(ProvisionError::new(
                DEVICE_TOML,
                None,
                ErrorKind::MissingFile,
                "missing; it is required",
            ));
            None
        }
        Some(parsed) => parsed.map_err(|e| errs.extend(e.0)).ok(),
    };
    let wifi = get(WIFI_TOML).and_then(|b| WifiConfig::parse(b).map_err(|e| errs.push(e)).ok());
    let keys =
        get(AUTHORIZED_KEYS).and_then(|b| AuthorizedKeys::parse(b).map_err(|e| errs.push(e)).ok());
    let secrets =
        get(SECRETS_AGE).and_then(|b| EncryptedSecrets::parse(b).map_err(|e| errs.push(e)).ok());
    if let Some(w) = &wifi {
        if secrets.is_none() && get(SECRETS_AGE).is_none() {
            if let Some(name) = w.secret_names().first() {
                errs.push(ProvisionError::new(
                    WIFI_TOML,
                    Some("psk_secret"),
                    ErrorKind::MissingFile,
                    format!("names secret {name:?} but there is no secrets.age"),
                ));
            }
        }
    }
    if let Some(name) = &ca_name {
        errs.extend(check_ca_bundle_file(name, get(name)));
    }
    match device {
        Some(device) if errs.is_empty() => {
            let files = FILE_NAMES
                .iter()
                .copied()
                .chain(ca_name.as_deref())
                .filter_map(|n| get(n).map(|b| (n.to_string(), b.to_vec())))
                .collect();
            Ok(Provisioning { device, wifi, authorized_keys: keys, secrets, files })
        }
        _ => Err(ProvisionErrors(errs)),
    }
}

/// The CA bundle `name` that device.toml names: present, and PEM CA certificates.
fn check_ca_bundle_file(name: &str, bytes: Option<&[u8]>) -> Option<ProvisionError> {
    let Some(bytes) = bytes else {
        return Some(ProvisionError::new(
            DEVICE_TOML,
            Some("channel.ca_bundle"),
            ErrorKind::MissingFile,
            format!("names {name:?}, which is not on the provision partition"),
        ));
    };
    let problem = if bytes.len() > MAX_FILE_LEN {
        format!("{} bytes; expected at most {MAX_FILE_LEN}", bytes.len())
    } else {
        crate::http::ca_certificates(bytes).err()?
    };
    Some(ProvisionError::new(
        name,
        None,
        ErrorKind::Syntax,
        format!("{problem}; expected PEM CA certificates"),
    ))
}

/// Reads every file in the root of the `provision` FAT partition of `disk` (a block device
/// or an image file), without mounting it. Subfolders are reported as files named
/// `NAME/` so that validation refuses them.
pub fn read_partition(disk: &Path) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    use anyhow::Context;
    use std::io::Read;
    let part = crate::disk::find_label(disk, "provision")?;
    let file = crate::disk::open_disk(disk, false)?;
    let io = crate::disk::partition_stream(file, &part)?;
    let fs = fatfs::FileSystem::new(io, fatfs::FsOptions::new()).with_context(|| {
        format!("{}: provision partition is not a FAT file system", disk.display())
    })?;
    let mut out = Vec::new();
    for entry in fs.root_dir().iter() {
        let entry = entry.context("listing the provision partition")?;
        let name = entry.file_name();
        if name == "." || name == ".." {
            continue;
        }
        if entry.is_dir() {
            out.push((format!("{name}/"), Vec::new()));
            continue;
        }
        if entry.len() > MAX_FILE_LEN as u64 {
            out.push((name, vec![0; MAX_FILE_LEN + 1]));
            continue;
        }
        let mut bytes = Vec::new();
        entry
            .to_file()
            .read_to_end(&mut bytes)
            .with_context(|| format!("reading {name} from the provision partition"))?;
        out.push((name, bytes));
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests;
