//! `imager provision`: writes the `provision` partition (FAT, label `provision`) of an image
//! file or an SD card, for one device (`--device device.toml` and/or flags) or for a batch
//! (`--batch fleet.csv`, a row per device) into per-device images or card after card.
//!
//! Everything is validated before anything is written: each device's `device.toml` is built
//! from the template, the flags and the CSV cells, then checked with the updater's own code
//! (`updater::provision`), together with the files it names (`authorized_keys`, `wifi.toml`,
//! secrets encrypted to the device's age recipients); device ids must be unique in a batch;
//! and the FAT filesystem of every device is built in memory against the image's partition
//! size, so a partition too small is found before the first write. Every error names where
//! the value came from: the flag, the template file and its field, or the CSV file, row,
//! line and column.

use crate::fat::{self, Region};
use crate::flash::{self, Confirm, Overlay};
use crate::progress::Progress;
use crate::target::{self, Kind};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use updater::disk::Partition;
use updater::provision::{self as prov, DeviceToml, ProvisionError, Provisioning};

/// GPT label and FAT label of the partition.
pub const PARTITION: &str = "provision";

/// How a CSV column or flag is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Use {
    /// A `device.toml` field (dotted path) holding a string.
    Text(&'static str),
    /// A `device.toml` field holding a list of strings (space-separated in a cell).
    List(&'static str),
    /// A `device.toml` field holding a boolean (`true`/`false`).
    Bool(&'static str),
    /// The path of a file copied to the partition under this name, checked by the updater.
    File(&'static str),
    /// The path of a plain-text secrets TOML, encrypted to the recipients into `secrets.age`.
    Secrets,
    /// age recipients (`age1...`), space-separated.
    Recipients,
    /// The path of a file of age recipients, one per line (`#` comments).
    RecipientsFile,
}

/// One CSV column, with its flag and what it holds. docs/provisioning.md lists the same.
#[derive(Debug, Clone, Copy)]
pub struct Column {
    pub name: &'static str,
    pub flag: &'static str,
    use_: Use,
    pub help: &'static str,
}

const fn col(name: &'static str, flag: &'static str, use_: Use, help: &'static str) -> Column {
    Column { name, flag, use_, help }
}

/// The columns of `fleet.csv`, in documentation order.
pub const COLUMNS: [Column; 19] = [
    col("device_id", "--device-id", Use::Text("device_id"), "device id (required in every row)"),
    col("role", "--role", Use::Text("role"), "role name"),
    col("segment", "--segment", Use::Text("segment"), "canary, early or general"),
    col("hostname", "--hostname", Use::Text("hostname"), "host name (RFC 1123 label)"),
    col("timezone", "--timezone", Use::Text("timezone"), "IANA time zone (default UTC)"),
    col("channel", "--channel", Use::Text("channel.name"), "channel name"),
    col("channel_url", "--channel-url", Use::Text("channel.url"), "channel base URL"),
    col("mirrors", "--mirror", Use::List("channel.mirrors"), "mirror URLs, space-separated"),
    col("interval", "--interval", Use::Text("update.interval"), "poll interval (5m, 1h)"),
    col(
        "maintenance_window",
        "--maintenance-window",
        Use::Text("update.maintenance_window"),
        "HH:MM-HH:MM",
    ),
    col(
        "version_lock",
        "--version-lock",
        Use::Text("overrides.version_lock"),
        "stay on this OS version",
    ),
    col("auto_update", "--auto-update", Use::Bool("overrides.auto_update"), "true or false"),
    col(
        "channel_override",
        "--channel-override",
        Use::Text("overrides.channel"),
        "follow this channel instead",
    ),
    col(
        "authorized_keys",
        "--authorized-keys",
        Use::File(prov::AUTHORIZED_KEYS),
        "file of SSH public keys",
    ),
    col("wifi", "--wifi", Use::File(prov::WIFI_TOML), "wifi.toml file"),
    col("secrets", "--secrets", Use::Secrets, "plain-text secrets TOML file, encrypted on write"),
    col(
        "secrets_age",
        "--secrets-age",
        Use::File(prov::SECRETS_AGE),
        "already encrypted secrets.age file",
    ),
    col("recipients", "--recipient", Use::Recipients, "age recipients (age1...), space-separated"),
    col(
        "recipients_file",
        "--recipients-file",
        Use::RecipientsFile,
        "file of age recipients, one per line",
    ),
];

fn column(name: &str) -> Option<&'static Column> {
    COLUMNS.iter().find(|c| c.name == name)
}

/// The device flags of `imager provision` and `imager flash`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DeviceArgs {
    /// device.toml of the device; with --batch, the template each row completes. Flags and
    /// CSV cells override its fields.
    #[arg(long, value_name = "FILE")]
    pub device: Option<PathBuf>,
    /// device.toml `device_id`.
    #[arg(long, value_name = "ID")]
    pub device_id: Option<String>,
    /// device.toml `role`.
    #[arg(long)]
    pub role: Option<String>,
    /// device.toml `segment`: canary, early or general.
    #[arg(long)]
    pub segment: Option<String>,
    /// device.toml `hostname`.
    #[arg(long)]
    pub hostname: Option<String>,
    /// device.toml `timezone` (IANA name; default UTC).
    #[arg(long)]
    pub timezone: Option<String>,
    /// device.toml `channel.name`.
    #[arg(long, value_name = "NAME")]
    pub channel: Option<String>,
    /// device.toml `channel.url`.
    #[arg(long, value_name = "URL")]
    pub channel_url: Option<String>,
    /// device.toml `channel.mirrors` (repeat for several).
    #[arg(long = "mirror", value_name = "URL")]
    pub mirrors: Vec<String>,
    /// device.toml `update.interval` (e.g. 5m, 1h).
    #[arg(long, value_name = "DURATION")]
    pub interval: Option<String>,
    /// device.toml `update.maintenance_window` (HH:MM-HH:MM, local time).
    #[arg(long, value_name = "HH:MM-HH:MM")]
    pub maintenance_window: Option<String>,
    /// device.toml `overrides.version_lock`.
    #[arg(long, value_name = "VERSION")]
    pub version_lock: Option<String>,
    /// device.toml `overrides.auto_update`.
    #[arg(long, value_name = "true|false")]
    pub auto_update: Option<String>,
    /// device.toml `overrides.channel`.
    #[arg(long, value_name = "NAME")]
    pub channel_override: Option<String>,
    /// File of SSH public keys, written as `authorized_keys`.
    #[arg(long, value_name = "FILE")]
    pub authorized_keys: Option<PathBuf>,
    /// wifi.toml to write.
    #[arg(long, value_name = "FILE")]
    pub wifi: Option<PathBuf>,
    /// Plain-text secrets (TOML of name = "value"), encrypted to the recipients into
    /// `secrets.age`; the plain text never reaches the card.
    #[arg(long, value_name = "FILE")]
    pub secrets: Option<PathBuf>,
    /// An already encrypted `secrets.age` to copy.
    #[arg(long, value_name = "FILE")]
    pub secrets_age: Option<PathBuf>,
    /// age recipient (age1...) to encrypt --secrets to (repeat for several).
    #[arg(long = "recipient", value_name = "AGE1...")]
    pub recipients: Vec<String>,
    /// File of age recipients, one per line.
    #[arg(long, value_name = "FILE")]
    pub recipients_file: Option<PathBuf>,
}

impl DeviceArgs {
    /// True when any device flag is given (so `imager flash` provisions).
    pub fn any(&self) -> bool {
        !self.values().is_empty() || self.device.is_some()
    }

    /// The flags given, by column name.
    fn values(&self) -> Vec<(&'static str, String)> {
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        let list = |v: &Vec<String>| (!v.is_empty()).then(|| v.join(" "));
        let all = [
            ("device_id", self.device_id.clone()),
            ("role", self.role.clone()),
            ("segment", self.segment.clone()),
            ("hostname", self.hostname.clone()),
            ("timezone", self.timezone.clone()),
            ("channel", self.channel.clone()),
            ("channel_url", self.channel_url.clone()),
            ("mirrors", list(&self.mirrors)),
            ("interval", self.interval.clone()),
            ("maintenance_window", self.maintenance_window.clone()),
            ("version_lock", self.version_lock.clone()),
            ("auto_update", self.auto_update.clone()),
            ("channel_override", self.channel_override.clone()),
            ("authorized_keys", path(&self.authorized_keys)),
            ("wifi", path(&self.wifi)),
            ("secrets", path(&self.secrets)),
            ("secrets_age", path(&self.secrets_age)),
            ("recipients", list(&self.recipients)),
            ("recipients_file", path(&self.recipients_file)),
        ];
        all.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))).collect()
    }
}

/// Where a value came from, to name it in errors.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Origin {
    /// A command-line flag.
    Flag(&'static str),
    /// A cell of the batch CSV (row counts data rows from 1; line is the file's line).
    Cell { csv: PathBuf, row: usize, line: u64, column: &'static str },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Flag(flag) => write!(f, "{flag}"),
            Origin::Cell { csv, row, line, column } => {
                write!(f, "{}: row {row} (line {line}), column {column}", csv.display())
            }
        }
    }
}

impl Origin {
    /// Relative paths in a CSV are relative to the CSV's folder; a flag's to the current one.
    fn resolve(&self, value: &str) -> PathBuf {
        match self {
            Origin::Cell { csv, .. } => csv.parent().unwrap_or(Path::new(".")).join(value),
            Origin::Flag(_) => PathBuf::from(value),
        }
    }
}

/// A `device.toml` template: a partial table, checked for unknown keys when it is completed.
#[derive(Debug, Clone)]
pub struct Template {
    path: PathBuf,
    text: String,
    table: toml::Table,
}

impl Template {
    pub fn load(path: &Path) -> Result<Template> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let table: toml::Table =
            toml::from_str(&text).with_context(|| format!("{}: not valid TOML", path.display()))?;
        Ok(Template { path: path.to_path_buf(), text, table })
    }
}

/// One device's inputs before validation.
#[derive(Debug, Clone)]
struct Spec {
    /// For messages: `--device-id pi-1` or `fleet.csv: row 3 (line 4)`.
    label: String,
    values: BTreeMap<&'static str, (String, Origin)>,
}

/// One device, validated: the files to write, in the updater's order.
#[derive(Debug, Clone)]
pub struct Device {
    pub id: String,
    pub hostname: String,
    /// For messages (`fleet.csv row 3` or the device id).
    pub label: String,
    pub provisioning: Provisioning,
}

impl Device {
    pub fn files(&self) -> &[(String, Vec<u8>)] {
        self.provisioning.files()
    }
}

/// Sets `path` (dotted) in `table` to `value`, creating sub-tables.
fn set_path(table: &mut toml::Table, path: &str, value: toml::Value) {
    let mut parts: Vec<&str> = path.split('.').collect();
    let last = parts.pop().expect("a path has a name");
    let mut t = table;
    for p in parts {
        let entry =
            t.entry(p.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        t = entry.as_table_mut().expect("made a table");
    }
    t.insert(last.to_string(), value);
}

/// Builds and validates one device from its inputs. Returns every problem, each naming where
/// the value came from.
fn build(spec: &Spec, template: Option<&Template>, batch: bool) -> Result<Device, Vec<String>> {
    let mut errs = Vec::new();
    let config = device_config(spec, template, batch, &mut errs);
    let mut files = device_files(spec, batch, &mut errs);
    let Some(config) = config else { return Err(errs) };
    files.list.insert(0, (prov::DEVICE_TOML.to_string(), config.to_toml().into_bytes()));
    if !errs.is_empty() {
        return Err(errs);
    }
    match prov::validate_files(&files.list) {
        Ok(provisioning) => Ok(Device {
            id: config.device_id.clone(),
            hostname: config.hostname,
            label: spec.label.clone(),
            provisioning,
        }),
        Err(list) => {
            for e in list.0 {
                let at = match files.origin.get(e.file.as_str()) {
                    Some((o, path)) => format!("{o} ({})", path.display()),
                    None => spec.label.clone(),
                };
                errs.push(format!("{at}: {}", describe(&e)));
            }
            Err(errs)
        }
    }
}

/// The device.toml table of a device: the template with the text, list and boolean inputs set
/// over it; and the input that set each field (to name it in validation errors).
fn device_table<'s>(
    spec: &'s Spec,
    template: Option<&Template>,
    errs: &mut Vec<String>,
) -> (toml::Table, BTreeMap<&'static str, &'s Origin>) {
    let mut table = template.map(|t| t.table.clone()).unwrap_or_default();
    let mut field_origin: BTreeMap<&'static str, &Origin> = BTreeMap::new();
    for (name, (value, origin)) in &spec.values {
        let c = column(name).expect("only known columns are read");
        match c.use_ {
            Use::Text(p) => {
                set_path(&mut table, p, toml::Value::String(value.clone()));
                field_origin.insert(p, origin);
            }
            Use::List(p) => {
                let items = value.split_whitespace().map(|s| toml::Value::String(s.into()));
                set_path(&mut table, p, toml::Value::Array(items.collect()));
                field_origin.insert(p, origin);
            }
            Use::Bool(p) => match value.to_ascii_lowercase().as_str() {
                "true" | "yes" | "1" => set_path(&mut table, p, toml::Value::Boolean(true)),
                "false" | "no" | "0" => set_path(&mut table, p, toml::Value::Boolean(false)),
                _ => errs
                    .push(format!("{origin}: {value:?} is not a boolean; expected true or false")),
            },
            _ => {}
        }
    }
    (table, field_origin)
}

/// The device's validated device.toml, or None with its problems added to `errs`.
fn device_config(
    spec: &Spec,
    template: Option<&Template>,
    batch: bool,
    errs: &mut Vec<String>,
) -> Option<prov::DeviceConfig> {
    let (table, field_origin) = device_table(spec, template, errs);
    let where_from = |field: &str| -> String {
        let top = field.split('[').next().unwrap_or(field);
        match field_origin.get(top) {
            Some(o) => o.to_string(),
            None => match template {
                Some(t) => format!("{}: {field}", t.path.display()),
                None => format!("device.toml {field}"),
            },
        }
    };
    let raw = match device_toml_all(table) {
        Ok(d) => d,
        Err(problems) => {
            for p in problems {
                errs.push(key_problem(spec, template, batch, p));
            }
            return None;
        }
    };
    match raw.validate() {
        Ok(c) => Some(c),
        Err(list) => {
            for e in list.0 {
                let field = e.field.clone().unwrap_or_default();
                errs.push(format!("{}: {}", where_from(&field), e.message));
            }
            None
        }
    }
}

/// A key of device.toml that is missing, unknown, or otherwise wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
enum KeyProblem {
    /// The dotted path of a required key.
    Missing(String),
    /// A key no table of device.toml has; `table` is dotted ("" at the top).
    Unknown {
        table: String,
        key: String,
        expected: Vec<String>,
    },
    Other(String),
}

/// Deserializes device.toml reporting every missing and unknown key in one pass: serde stops at
/// the first, so each is noted and patched (a missing key gets a placeholder, an unknown one
/// is removed) and deserializing tried again.
fn device_toml_all(mut table: toml::Table) -> Result<DeviceToml, Vec<KeyProblem>> {
    let mut problems = Vec::new();
    for _ in 0..64 {
        let err = match toml::Value::Table(table.clone()).try_into::<DeviceToml>() {
            Ok(d) if problems.is_empty() => return Ok(d),
            Ok(_) => return Err(problems),
            Err(e) => e.message().to_string(),
        };
        let quoted: Vec<String> = err.split('`').skip(1).step_by(2).map(str::to_string).collect();
        let name = quoted.first().cloned().unwrap_or_default();
        if err.starts_with("missing field") {
            let path = missing_path(&name);
            if path == "channel" {
                // Its own missing keys (name, url) are reported on the next try.
                table.insert(path, toml::Value::Table(toml::Table::new()));
            } else {
                set_path(&mut table, &path, toml::Value::String(String::new()));
                problems.push(KeyProblem::Missing(path));
            }
        } else if err.starts_with("unknown field") {
            let Some(at) = remove_key(&mut table, &name, &quoted[1..]) else {
                problems.push(KeyProblem::Other(err));
                return Err(problems);
            };
            problems.push(KeyProblem::Unknown {
                table: at,
                key: name,
                expected: quoted[1..].to_vec(),
            });
        } else {
            problems.push(KeyProblem::Other(err));
            return Err(problems);
        }
    }
    Err(problems)
}

/// Removes the unknown `key` from the table (top level or a sub-table) whose other keys are
/// among `expected`; returns that table's dotted name.
fn remove_key(table: &mut toml::Table, key: &str, expected: &[String]) -> Option<String> {
    let fits = |t: &toml::Table| {
        t.contains_key(key) && t.keys().all(|k| k == key || expected.iter().any(|e| e == k))
    };
    if fits(table) {
        table.remove(key);
        return Some(String::new());
    }
    for (name, value) in table.iter_mut() {
        if let Some(sub) = value.as_table_mut() {
            if let Some(inner) = remove_key(sub, key, expected) {
                return Some(if inner.is_empty() {
                    name.clone()
                } else {
                    format!("{name}.{inner}")
                });
            }
        }
    }
    None
}

/// The closest of `candidates` to a misspelled `word`, if one is close enough (any command may
/// use it for a "did you mean").
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| {
            // Jaro-Winkler for shared prefixes (hostnme), Damerau for swaps in short words (ulr).
            let score =
                strsim::jaro_winkler(word, c).max(strsim::normalized_damerau_levenshtein(word, c));
            (score, c)
        })
        .filter(|(score, _)| *score > 0.65)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

/// The line of `key` inside `[table]` of a TOML text (1-based), if it is found.
fn key_line(text: &str, table: &str, key: &str) -> Option<usize> {
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if let Some(h) = t.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            current = h.trim().to_string();
            continue;
        }
        let Some((k, _)) = t.split_once('=') else { continue };
        let k = k.trim().trim_matches('"');
        let full = if current.is_empty() { k.to_string() } else { format!("{current}.{k}") };
        let want = if table.is_empty() { key.to_string() } else { format!("{table}.{key}") };
        if full == want {
            return Some(i + 1);
        }
    }
    None
}

/// One problem of device.toml as a message naming where to fix it.
fn key_problem(spec: &Spec, template: Option<&Template>, batch: bool, p: KeyProblem) -> String {
    let file = template.map_or("device.toml".to_string(), |t| t.path.display().to_string());
    match p {
        KeyProblem::Missing(path) => {
            let how = match column_for(&path) {
                Some(c) if batch => {
                    format!("a {} column, {} or {path} in --device FILE", c.name, c.flag)
                }
                Some(c) => format!(
                    "{} (or a {} column with --batch) or {path} in --device FILE",
                    c.flag, c.name
                ),
                None => format!("{path} in --device FILE"),
            };
            format!("{}: {path}: missing; give it as {how}", spec.label)
        }
        KeyProblem::Unknown { table, key, expected } => {
            let line = template
                .and_then(|t| key_line(&t.text, &table, &key))
                .map_or(String::new(), |l| format!("line {l}: "));
            let where_ =
                if table.is_empty() { "top level".to_string() } else { format!("[{table}]") };
            let hint = match did_you_mean(&key, expected.iter().map(String::as_str)) {
                Some(m) => format!("did you mean {m:?}? "),
                None => String::new(),
            };
            format!(
                "{file}: {line}{where_}: unknown key {key:?}; {hint}expected one of: {}",
                expected.join(", ")
            )
        }
        KeyProblem::Other(msg) => format!("{}: {file}: {msg}", spec.label),
    }
}

/// The files of one device, in input order, with the input and path each came from.
#[derive(Debug, Default)]
struct DeviceFiles {
    list: Vec<(String, Vec<u8>)>,
    origin: BTreeMap<&'static str, (Origin, PathBuf)>,
}

/// Plain-text secrets as read, before they are encrypted.
#[derive(Debug)]
struct PlainSecrets {
    origin: Origin,
    path: PathBuf,
    bytes: Vec<u8>,
}

/// An age recipient and where it was given.
#[derive(Debug)]
struct Recipient {
    key: String,
    given: String,
}

/// Reads the files a device's inputs name (problems go to `errs`), and encrypts plain-text
/// secrets to its recipients.
fn device_files(spec: &Spec, batch: bool, errs: &mut Vec<String>) -> DeviceFiles {
    let mut files = DeviceFiles::default();
    let mut read = |origin: &Origin, value: &str| -> Option<(PathBuf, Vec<u8>)> {
        let path = origin.resolve(value);
        match std::fs::read(&path) {
            Ok(b) => Some((path, b)),
            Err(e) => {
                errs.push(format!("{origin}: cannot read {}: {e}", path.display()));
                None
            }
        }
    };
    let mut plain_secrets = None;
    let mut recipients: Vec<Recipient> = Vec::new();
    for (name, (value, origin)) in &spec.values {
        match column(name).expect("known").use_ {
            Use::File(file) => {
                if let Some((path, bytes)) = read(origin, value) {
                    files.list.push((file.to_string(), bytes));
                    files.origin.insert(file, (origin.clone(), path));
                }
            }
            Use::Secrets => {
                if let Some((path, bytes)) = read(origin, value) {
                    plain_secrets = Some(PlainSecrets { origin: origin.clone(), path, bytes });
                }
            }
            Use::Recipients => {
                recipients.extend(
                    value
                        .split_whitespace()
                        .map(|r| Recipient { key: r.to_string(), given: origin.to_string() }),
                );
            }
            Use::RecipientsFile => {
                if let Some((path, bytes)) = read(origin, value) {
                    let text = String::from_utf8_lossy(&bytes);
                    for line in text.lines().map(str::trim) {
                        if !line.is_empty() && !line.starts_with('#') {
                            recipients.push(Recipient {
                                key: line.to_string(),
                                given: format!("{origin} ({})", path.display()),
                            });
                        }
                    }
                }
            }
            _ => {}
        }
    }
    if let Some(plain) = plain_secrets {
        encrypt_secrets(plain, &recipients, batch, &mut files, errs);
    }
    files
}

/// Encrypts plain-text secrets to the recipients into `secrets.age`; problems go to `errs`.
fn encrypt_secrets(
    plain: PlainSecrets,
    recipients: &[Recipient],
    batch: bool,
    files: &mut DeviceFiles,
    errs: &mut Vec<String>,
) {
    let PlainSecrets { origin, path, bytes } = plain;
    if files.origin.contains_key(prov::SECRETS_AGE) {
        errs.push(format!(
            "{origin}: give either plain-text secrets (secrets) or an encrypted secrets.age (secrets_age), not both"
        ));
        return;
    }
    if recipients.is_empty() {
        errs.push(format!(
            "{origin}: {} must be encrypted to the device: give its age recipient ({} or {})",
            path.display(),
            if batch { "a recipients column" } else { "--recipient" },
            if batch { "recipients_file" } else { "--recipients-file" },
        ));
        return;
    }
    let mut parsed = Vec::new();
    for r in recipients {
        match prov::secrets::parse_recipient(&r.given, &r.key) {
            Ok(p) => parsed.push(p),
            Err(e) => errs.push(e),
        }
    }
    if parsed.len() != recipients.len() {
        return;
    }
    match prov::secrets::encrypt(&bytes, &parsed) {
        Ok(sealed) => {
            files.list.push((prov::SECRETS_AGE.to_string(), sealed));
            files.origin.insert(prov::SECRETS_AGE, (origin, path));
        }
        Err(e) => errs.push(format!("{origin} ({}): {}", path.display(), describe(&e))),
    }
}

/// `file: field: message` of an updater error, with the file name the partition uses.
fn describe(e: &ProvisionError) -> String {
    e.to_string()
}

/// The dotted device.toml path of a missing field named by serde (`url` inside `channel`).
fn missing_path(name: &str) -> String {
    match name {
        "name" => "channel.name".into(),
        "url" => "channel.url".into(),
        other => other.to_string(),
    }
}

fn column_for(path: &str) -> Option<&'static Column> {
    COLUMNS
        .iter()
        .find(|c| matches!(c.use_, Use::Text(p) | Use::List(p) | Use::Bool(p) if p == path))
}

/// One device from `--device` and the flags.
pub fn single(args: &DeviceArgs) -> Result<Device> {
    let template = args.device.as_deref().map(Template::load).transpose()?;
    let values: BTreeMap<_, _> = args
        .values()
        .into_iter()
        .map(|(k, v)| (k, (v, Origin::Flag(column(k).expect("known").flag))))
        .collect();
    let label = match (&args.device_id, &args.device) {
        (Some(id), _) => format!("device {id}"),
        (None, Some(p)) => p.display().to_string(),
        (None, None) => "device".to_string(),
    };
    build(&Spec { label, values }, template.as_ref(), false).map_err(|errs| {
        anyhow::anyhow!("invalid provisioning, nothing written:\n  {}", errs.join("\n  "))
    })
}

/// Every device of a batch CSV, completed by the template and the flags. Fails with every
/// problem of every row (nothing is written by a caller when it fails).
pub fn batch(csv_path: &Path, args: &DeviceArgs) -> Result<Vec<Device>> {
    if args.device_id.is_some() || args.hostname.is_some() {
        bail!("--device-id and --hostname name one device; with --batch they come from the CSV's device_id and hostname columns");
    }
    let template = args.device.as_deref().map(Template::load).transpose()?;
    let flags: Vec<(&'static str, String)> = args.values();
    let text =
        std::fs::read(csv_path).with_context(|| format!("reading {}", csv_path.display()))?;
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .comment(Some(b'#'))
        .from_reader(text.as_slice());
    let (cols, mut errs) = csv_columns(csv_path, &mut reader)?;
    let mut devices: Vec<Device> = Vec::new();
    let mut seen: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    let mut hosts: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    for (i, record) in reader.records().enumerate() {
        let row = i + 1;
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                let line = e.position().map_or(0, |p| line_at(&text, p.byte()));
                errs.push(format!("{}: row {row} (line {line}): {e}", csv_path.display()));
                continue;
            }
        };
        let line = record.position().map_or(0, |p| line_at(&text, p.byte()));
        let spec = row_spec(csv_path, row, line, &cols, &record, &flags);
        let Some((id, _)) = spec.values.get("device_id") else {
            errs.push(format!(
                "{}, column device_id: missing; every row needs a device_id",
                spec.label
            ));
            continue;
        };
        if let Some((r0, l0)) = seen.get(id) {
            errs.push(format!(
                "{}, column device_id: {id:?} is already the device_id of row {r0} (line {l0}); device ids must be unique",
                spec.label
            ));
            continue;
        }
        seen.insert(id.clone(), (row, line));
        match build(&spec, template.as_ref(), true) {
            Ok(d) => {
                if let Some((r0, l0)) = hosts.get(&d.hostname) {
                    errs.push(format!(
                        "{}, column hostname: {:?} is already the host name of row {r0} (line {l0}); host names must be unique",
                        spec.label, d.hostname
                    ));
                }
                hosts.entry(d.hostname.clone()).or_insert((row, line));
                devices.push(d);
            }
            Err(e) => errs.extend(e),
        }
    }
    // A template's problem is the same for every row: said once.
    let mut said = std::collections::BTreeSet::new();
    errs.retain(|e| said.insert(e.clone()));
    if !errs.is_empty() {
        bail!(
            "{}: {} problem{} found, nothing written:\n  {}",
            csv_path.display(),
            errs.len(),
            if errs.len() == 1 { "" } else { "s" },
            errs.join("\n  ")
        );
    }
    if devices.is_empty() {
        bail!("{}: no rows; expected a header line and one row per device", csv_path.display());
    }
    Ok(devices)
}

/// The file's line of a CSV record at a byte offset. csv's own line count skips comment lines,
/// and a record's offset is where reading started: before the comments and blank lines
/// skipped to reach it.
fn line_at(text: &[u8], byte: u64) -> u64 {
    let mut at = (byte as usize).min(text.len());
    while at < text.len() && matches!(text[at], b'#' | b'\n' | b'\r') {
        at = text[at..].iter().position(|&b| b == b'\n').map_or(text.len(), |n| at + n + 1);
    }
    text[..at].iter().filter(|&&b| b == b'\n').count() as u64 + 1
}

/// The columns of a batch CSV's header line (None: an unknown column, its cells ignored), and
/// every problem of the header: unknown columns (with "did you mean"), repeated ones. Fails
/// only when no device_id column exists, as then no row can be read.
fn csv_columns(
    csv_path: &Path,
    reader: &mut csv::Reader<&[u8]>,
) -> Result<(Vec<Option<&'static Column>>, Vec<String>)> {
    let headers = reader
        .headers()
        .with_context(|| format!("{}: reading the header line", csv_path.display()))?
        .clone();
    let mut cols: Vec<Option<&'static Column>> = Vec::new();
    let mut problems = Vec::new();
    for (i, h) in headers.iter().enumerate() {
        let at = format!("{}: line 1, column {}", csv_path.display(), i + 1);
        match column(h) {
            None => {
                let hint = did_you_mean(h, COLUMNS.iter().map(|c| c.name))
                    .map_or(String::new(), |m| format!("did you mean {m:?}? "));
                problems.push(format!(
                    "{at}: {h:?} is not a known column; {hint}expected some of: {}",
                    COLUMNS.iter().map(|c| c.name).collect::<Vec<_>>().join(", ")
                ));
                cols.push(None);
            }
            Some(c) if cols.iter().flatten().any(|k| k.name == c.name) => {
                problems.push(format!("{at}: column {h:?} appears twice"));
                cols.push(None);
            }
            Some(c) => cols.push(Some(c)),
        }
    }
    if !cols.iter().flatten().any(|c| c.name == "device_id") {
        problems.push(format!(
            "{}: line 1: no device_id column; every row needs a device_id",
            csv_path.display()
        ));
        bail!(
            "{}: {} problem(s) in the header line, nothing written:\n  {}",
            csv_path.display(),
            problems.len(),
            problems.join("\n  ")
        );
    }
    Ok((cols, problems))
}

/// One row's inputs: the flags, with the row's non-empty cells over them.
fn row_spec(
    csv_path: &Path,
    row: usize,
    line: u64,
    cols: &[Option<&'static Column>],
    record: &csv::StringRecord,
    flags: &[(&'static str, String)],
) -> Spec {
    let cell =
        |column: &'static str| Origin::Cell { csv: csv_path.to_path_buf(), row, line, column };
    let mut values: BTreeMap<&'static str, (String, Origin)> = flags
        .iter()
        .map(|(k, v)| (*k, (v.clone(), Origin::Flag(column(k).expect("known").flag))))
        .collect();
    for (c, v) in cols.iter().zip(record.iter()) {
        let Some(c) = c else { continue };
        if !v.is_empty() {
            values.insert(c.name, (v.to_string(), cell(c.name)));
        }
    }
    Spec { label: format!("{}: row {row} (line {line})", csv_path.display()), values }
}

// ---------------------------------------------------------------------------------------------
// The partition

/// The `provision` partition of an image (`.img`, `.img.zst`) or a disk.
pub fn find_partition(image: &Path) -> Result<Partition> {
    let mut f = File::open(image).with_context(|| format!("opening {}", image.display()))?;
    let mut magic = [0u8; 4];
    let n = f.read(&mut magic)?;
    let parts = if n == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd] {
        // The primary GPT (LBA 0-33) sits in the image's first 17 KiB.
        let mut head = Vec::new();
        zstd::stream::read::Decoder::new(File::open(image)?)?
            .take(64 << 10)
            .read_to_end(&mut head)
            .with_context(|| format!("decompressing {}", image.display()))?;
        updater::disk::read_partitions_from(
            std::io::Cursor::new(head),
            &image.display().to_string(),
        )?
    } else {
        updater::disk::read_partitions(image)?
    };
    parts.into_iter().find(|p| p.label == PARTITION).with_context(|| {
        format!(
            "{}: has no partition labelled {PARTITION:?}; is it an image made by `imager build`?",
            image.display()
        )
    })
}

/// FAT volume id of a device's partition (stable for the device).
fn volume_id(device_id: &str) -> u32 {
    let h = Sha256::digest(format!("metrica provision {device_id}").as_bytes());
    u32::from_le_bytes([h[0], h[1], h[2], h[3]])
}

/// Builds the device's FAT filesystem for a partition of `len` bytes, in memory. Fails, naming
/// the image and the device, when the files do not fit.
pub fn build_partition(image: &Path, len: u64, device: &Device) -> Result<Vec<u8>> {
    let needed: u64 = device.files().iter().map(|(_, b)| b.len() as u64).sum();
    let names = device.files().iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ");
    let full = || {
        anyhow::anyhow!(
            "{}: the provision partition ({}) is full: the files of {} ({names}: {}) do not fit; nothing written",
            image.display(),
            updater::units::size(len),
            device.label,
            updater::units::size(needed)
        )
    };
    if needed >= len {
        return Err(full());
    }
    let tmp = tempfile::tempfile().context("creating a temporary file for the FAT")?;
    tmp.set_len(len)?;
    let region = Region { file: &tmp, start: 0, len };
    fat::format(region, PARTITION, volume_id(&device.id))
        .with_context(|| format!("{}: formatting the provision partition", image.display()))?;
    if let Err(e) = fat::write_files(region, PARTITION, device.files()) {
        if format!("{e:#}").contains("too small") {
            return Err(full());
        }
        return Err(e)
            .with_context(|| format!("{}: writing the provision partition", image.display()));
    }
    let mut bytes = vec![0u8; len as usize];
    tmp.read_exact_at(&mut bytes, 0)?;
    Ok(bytes)
}

/// Writes `bytes` at `offset` of `file` and reads them back. On a regular file, zero blocks
/// become holes (so an image stays sparse); a card gets every byte.
fn write_checked(file: &File, path: &Path, offset: u64, bytes: &[u8], sparse: bool) -> Result<()> {
    const BLOCK: usize = 4096;
    if sparse {
        for (i, block) in bytes.chunks(BLOCK).enumerate() {
            let at = offset + (i * BLOCK) as u64;
            if block.iter().all(|&b| b == 0) {
                nix::fcntl::fallocate(
                    std::os::fd::AsRawFd::as_raw_fd(file),
                    nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                        | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
                    at as libc::off_t,
                    block.len() as libc::off_t,
                )
                .map_err(std::io::Error::from)
                .or_else(|_| file.write_all_at(block, at))
                .with_context(|| format!("writing {} at {at}", path.display()))?;
            } else {
                file.write_all_at(block, at)
                    .with_context(|| format!("writing {} at {at}", path.display()))?;
            }
        }
    } else {
        file.write_all_at(bytes, offset)
            .with_context(|| format!("writing {} at {offset}", path.display()))?;
    }
    file.sync_all().with_context(|| format!("syncing {}", path.display()))?;
    let mut back = vec![0u8; bytes.len()];
    file.read_exact_at(&mut back, offset)
        .with_context(|| format!("reading {} back", path.display()))?;
    if back != bytes {
        bail!("verification failed: the provision partition read back from {} differs from what was written", path.display());
    }
    Ok(())
}

/// Provisions an image file or a card in place: checks (not mounted, not the root disk,
/// confirmation for a block device), writes the partition, reads it back. An image file's
/// block map next to it (`NAME.bmap`) is written anew, since the mapped ranges changed.
pub fn in_place(
    dest: &Path,
    device: &Device,
    confirm: &mut dyn Confirm,
    progress: &Progress,
) -> Result<()> {
    let t = target::Target::probe(dest)?;
    let is_block = match &t.kind {
        Kind::Missing => bail!("{}: no such file or device", dest.display()),
        Kind::Block { .. } => true,
        Kind::File { .. } => false,
    };
    let mounts = target::read_mounts()?;
    target::check(&t, 0, &mounts, &target::SysTopology)?;
    let mut magic = [0u8; 4];
    let n = File::open(dest)?.read(&mut magic)?;
    if n == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd] {
        bail!("{}: a compressed image cannot be provisioned in place; use --output DIR for a provisioned copy, or `imager flash --device ...`", dest.display());
    }
    let part = find_partition(dest)?;
    let bytes = build_partition(dest, part.len, device)?;
    if is_block
        && !confirm.confirm(&format!(
            "This rewrites the provision partition of {} for device {}.",
            t.describe(),
            device.id
        ))?
    {
        bail!("not confirmed: nothing written to {}", dest.display());
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dest)
        .with_context(|| format!("opening {} for writing", dest.display()))?;
    write_checked(&file, dest, part.start, &bytes, !is_block)?;
    progress.line(&format!("provisioned {} for device {}", dest.display(), device.id));
    if !is_block {
        if let Ok(bmap) = flash::find_bmap(dest) {
            crate::output::write_bmap(dest, &bmap)?;
            progress.line(&format!("  block map {} rewritten", bmap.display()));
        }
    }
    Ok(())
}

/// The overlay `imager flash` writes after the image: this device's provision partition.
pub fn overlay(image: &Path, device: &Device) -> Result<Overlay> {
    let part = find_partition(image)?;
    Ok(Overlay {
        what: format!("provision partition of device {}", device.id),
        offset: part.start,
        bytes: build_partition(image, part.len, device)?,
    })
}

/// What a batch into a folder wrote.
#[derive(Debug, Clone, Serialize)]
pub struct Written {
    pub device_id: String,
    pub image: PathBuf,
    pub bmap: PathBuf,
}

/// How per-device images are written.
#[derive(Debug, Clone, Copy, Default)]
pub struct FolderOptions {
    /// Replace per-device images that already exist (without it they are refused, all named,
    /// before anything is written).
    pub force: bool,
    /// Write `.img.zst` at this zstd level instead of `.img`.
    pub zstd_level: Option<i32>,
}

/// Writes `DIR/STEM-DEVICE_ID.img` (or `.img.zst`) and `.bmap` for every device: the image
/// (raw or zstd) written sparse through its bmap, then the device's partition. All partitions
/// are built, and existing outputs refused, before the first image is written.
pub fn to_folder(
    image: &Path,
    bmap: Option<&Path>,
    devices: &[Device],
    out: &Path,
    opts: FolderOptions,
    progress: &Progress,
) -> Result<Vec<Written>> {
    let mut img = flash::Image::open(image, bmap)?;
    let overlays = devices.iter().map(|d| overlay(image, d)).collect::<Result<Vec<_>>>()?;
    let name = image.file_name().unwrap_or_default().to_string_lossy().into_owned();
    let stem = name.trim_end_matches(".zst").trim_end_matches(".img").to_string();
    let ext = if opts.zstd_level.is_some() { "img.zst" } else { "img" };
    let dst_of = |d: &Device| out.join(format!("{stem}-{}.{ext}", d.id));
    let existing: Vec<String> = devices
        .iter()
        .map(dst_of)
        .filter(|p| p.exists())
        .map(|p| p.display().to_string())
        .collect();
    if !existing.is_empty() && !opts.force {
        bail!(
            "{} of the per-device images exist already, nothing written (--force replaces them): {}",
            existing.len(),
            existing.join(", ")
        );
    }
    img.check(progress)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut written = Vec::new();
    for (i, (d, o)) in devices.iter().zip(&overlays).enumerate() {
        let dst = dst_of(d);
        let raw = out.join(format!(".{stem}-{}.img.tmp", d.id));
        let _ = std::fs::remove_file(&raw);
        let t = img.check_target(&raw)?;
        flash::write(&img, &t, false, None, &mut flash::AssumeYes, &Progress::quiet())
            .with_context(|| format!("writing the image of device {}", d.id))?;
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&raw)?;
        write_checked(&file, &raw, o.offset, &o.bytes, true)?;
        drop(file);
        let bmap_path = out.join(format!("{stem}-{}.bmap", d.id));
        crate::output::write_bmap(&raw, &bmap_path)?;
        match opts.zstd_level {
            Some(level) => {
                let zst = out.join(format!(".{stem}-{}.img.zst.tmp", d.id));
                crate::output::compress_zstd(&raw, &zst, level, &Progress::quiet())?;
                std::fs::remove_file(&raw)?;
                std::fs::rename(&zst, &dst)
            }
            None => std::fs::rename(&raw, &dst),
        }
        .with_context(|| format!("renaming to {}", dst.display()))?;
        progress.line(&format!(
            "{} of {}: wrote {} ({})",
            i + 1,
            devices.len(),
            dst.display(),
            d.label
        ));
        written.push(Written { device_id: d.id.clone(), image: dst, bmap: bmap_path });
    }
    Ok(written)
}

/// What to do with the next card.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CardAction {
    Write,
    Skip,
    Quit,
}

/// Asks for the next card (card after card).
pub trait CardPrompt {
    /// `problem`: why the last try for this device failed, if it did.
    fn next(
        &mut self,
        device: &Device,
        n: usize,
        total: usize,
        target: &Path,
        problem: Option<&str>,
    ) -> Result<CardAction>;
}

/// Asks on the terminal; refuses without one.
#[derive(Debug)]
pub struct TerminalCards;

impl CardPrompt for TerminalCards {
    fn next(
        &mut self,
        device: &Device,
        n: usize,
        total: usize,
        target: &Path,
        problem: Option<&str>,
    ) -> Result<CardAction> {
        use std::io::IsTerminal;
        if !std::io::stdin().is_terminal() {
            bail!("writing card after card needs a terminal to ask for the next card; standard input is not one (use --output DIR for per-device images instead)");
        }
        if let Some(p) = problem {
            eprintln!("card for {} failed: {p}", device.id);
        }
        eprint!(
            "Insert the card for {} ({}, {n} of {total}) as {}; everything on it is overwritten. Enter to write, s to skip, q to quit: ",
            device.id,
            device.label,
            target.display()
        );
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).context("reading the answer")?;
        Ok(match line.trim() {
            "s" | "skip" => CardAction::Skip,
            "q" | "quit" => CardAction::Quit,
            _ => CardAction::Write,
        })
    }
}

/// Card after card: for each device, asks for its card, then flashes the image and its
/// provision partition onto `target`. Returns the device ids written.
pub fn cards(
    image: &Path,
    bmap: Option<&Path>,
    devices: &[Device],
    target_path: &Path,
    verify: bool,
    prompt: &mut dyn CardPrompt,
    progress: &Progress,
) -> Result<Vec<String>> {
    let mut img = flash::Image::open(image, bmap)?;
    let overlays = devices.iter().map(|d| overlay(image, d)).collect::<Result<Vec<_>>>()?;
    img.check(progress)?;
    let mut done = Vec::new();
    for (i, (d, o)) in devices.iter().zip(&overlays).enumerate() {
        let mut problem: Option<String> = None;
        loop {
            match prompt.next(d, i + 1, devices.len(), target_path, problem.as_deref())? {
                CardAction::Quit => return Ok(done),
                CardAction::Skip => break,
                CardAction::Write => {}
            }
            let attempt = img.check_target(target_path).and_then(|t| {
                flash::write(&img, &t, verify, Some(o), &mut flash::AssumeYes, progress)
            });
            match attempt {
                Ok(report) => {
                    progress.line(&format!("card {} of {}: device {}", i + 1, devices.len(), d.id));
                    progress.line(&report.summary());
                    done.push(d.id.clone());
                    break;
                }
                Err(e) => problem = Some(format!("{e:#}")),
            }
        }
    }
    Ok(done)
}

// ---------------------------------------------------------------------------------------------
// Inspect

/// What `imager inspect` shows of a provision partition (never a secret's content).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProvisionInfo {
    /// Files present, with sizes.
    pub files: Vec<(String, u64)>,
    pub device_id: Option<String>,
    pub role: Option<String>,
    pub segment: Option<String>,
    pub hostname: Option<String>,
    pub channel: Option<String>,
    /// SHA256 fingerprints of the authorized SSH keys.
    pub ssh_keys: Vec<String>,
    /// Wi-Fi network names.
    pub wifi_networks: Vec<String>,
    /// `secrets.age` is present (encrypted; its content is not shown).
    pub secrets: bool,
    /// Problems the device would report at first boot.
    pub problems: Vec<String>,
}

impl ProvisionInfo {
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

/// Reads the provision partition of an image or card with the updater's reader and checks it
/// with the updater's validation.
pub fn inspect(image: &Path) -> Result<ProvisionInfo> {
    let files = prov::read_partition(image)?;
    let mut info = ProvisionInfo {
        files: files.iter().map(|(n, b)| (n.clone(), b.len() as u64)).collect(),
        device_id: None,
        role: None,
        segment: None,
        hostname: None,
        channel: None,
        ssh_keys: Vec::new(),
        wifi_networks: Vec::new(),
        secrets: files.iter().any(|(n, _)| n == prov::SECRETS_AGE),
        problems: Vec::new(),
    };
    if files.is_empty() {
        return Ok(info);
    }
    // device.toml's fields, even when something else is wrong.
    if let Some((_, b)) = files.iter().find(|(n, _)| n == prov::DEVICE_TOML) {
        if let Ok(d) = prov::DeviceConfig::parse(b) {
            info.device_id = Some(d.device_id.clone());
            info.role = Some(d.role.clone());
            info.segment = Some(d.segment.as_str().to_string());
            info.hostname = Some(d.hostname.clone());
            info.channel = Some(d.effective_channel().to_string());
        }
    }
    match prov::validate_files(&files) {
        Ok(p) => {
            if let Some(k) = &p.authorized_keys {
                info.ssh_keys = k.fingerprints.clone();
            }
            if let Some(w) = &p.wifi {
                info.wifi_networks = w.networks.iter().map(|n| n.ssid.clone()).collect();
            }
        }
        Err(list) => info.problems = list.0.iter().map(ToString::to_string).collect(),
    }
    Ok(info)
}

/// Text for `imager inspect`.
pub fn render(info: &ProvisionInfo) -> String {
    let mut s = String::from("\nprovision partition:\n");
    if info.is_empty() && info.problems.is_empty() {
        s += "  (empty: not provisioned)\n";
        return s;
    }
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "?".into());
    s += &format!("  device_id:   {}\n", opt(&info.device_id));
    s += &format!("  role:        {}\n", opt(&info.role));
    s += &format!("  segment:     {}\n", opt(&info.segment));
    s += &format!("  hostname:    {}\n", opt(&info.hostname));
    s += &format!("  channel:     {}\n", opt(&info.channel));
    s += &format!(
        "  files:       {}\n",
        info.files.iter().map(|(n, l)| format!("{n} ({l} bytes)")).collect::<Vec<_>>().join(", ")
    );
    if !info.ssh_keys.is_empty() {
        s += &format!("  ssh keys:    {}\n", info.ssh_keys.join(", "));
    }
    if !info.wifi_networks.is_empty() {
        s += &format!("  wifi:        {}\n", info.wifi_networks.join(", "));
    }
    if info.secrets {
        s += "  secrets:     secrets.age (encrypted; content not shown)\n";
    }
    if info.problems.is_empty() {
        s += "  valid:       yes\n";
    } else {
        s += "  valid:       no\n";
        for p in &info.problems {
            s += &format!("    {p}\n");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{write_gpt, Ids, Layout};
    use crate::output::{sha256_file, write_bmap};
    use crate::recipe::Partitions;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHJ0b3G9xq1P2W5Cxw3Y5CwG9ywJvn6dzQp2oOSs4mFr ops@example";
    const SECRET: &str = "correct horse battery staple";

    /// A small image as `imager build` lays it out (GPT, a formatted provision partition, data
    /// in root_a), with its bmap and .zst.
    fn golden(dir: &Path, provision: u64) -> PathBuf {
        let layout = Layout::new(&Partitions {
            config: 4 << 20,
            boot: 4 << 20,
            root: 8 << 20,
            provision,
            data: 4 << 20,
        });
        std::fs::create_dir_all(dir).unwrap();
        let img = dir.join("fleet-1.0.0.img");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&img)
            .unwrap();
        f.set_len(layout.disk_size).unwrap();
        write_gpt(&f, &layout, &Ids::new("fleet", &"1.0.0".parse().unwrap())).unwrap();
        let p = layout.get(PARTITION);
        fat::format(Region { file: &f, start: p.start, len: p.len }, PARTITION, 7).unwrap();
        f.write_all_at(&[0x5a; 300_000], layout.get("root_a").start).unwrap();
        f.sync_all().unwrap();
        write_bmap(&img, &dir.join("fleet-1.0.0.bmap")).unwrap();
        crate::output::compress_zstd(&img, &dir.join("fleet-1.0.0.img.zst"), 3, &Progress::quiet())
            .unwrap();
        img
    }

    /// A site folder: template, keys, wifi, secrets, recipients.
    fn site(dir: &Path) -> PathBuf {
        let site = dir.join("site");
        std::fs::create_dir_all(site.join("keys")).unwrap();
        std::fs::write(
            site.join("template.toml"),
            "role = \"camera-single\"\nsegment = \"canary\"\n[channel]\nname = \"stable\"\nurl = \"https://updates.example.com/fleet\"\n",
        )
        .unwrap();
        std::fs::write(site.join("keys/ops.pub"), format!("{KEY}\n")).unwrap();
        std::fs::write(
            site.join("wifi.toml"),
            "country = \"DE\"\n[[network]]\nssid = \"Shop floor\"\npsk_secret = \"wifi_shop\"\n",
        )
        .unwrap();
        std::fs::write(site.join("secrets.toml"), format!("wifi_shop = \"{SECRET}\"\n")).unwrap();
        let r1 = prov::identity::recipient_from_otp_key(&[1; 32]);
        let r2 = prov::identity::recipient_from_otp_key(&[2; 32]);
        std::fs::write(site.join("recipients.txt"), format!("# the board\n{r1}\n# escrow\n{r2}\n"))
            .unwrap();
        site
    }

    fn csv(site: &Path, text: &str) -> PathBuf {
        let p = site.join("fleet.csv");
        std::fs::write(&p, text).unwrap();
        p
    }

    fn template_args(site: &Path) -> DeviceArgs {
        DeviceArgs { device: Some(site.join("template.toml")), ..Default::default() }
    }

    const HEADER: &str =
        "device_id,hostname,segment,authorized_keys,wifi,secrets,recipients_file\n";

    #[test]
    fn a_batch_is_completed_from_template_flags_and_cells() {
        let dir = tempfile::tempdir().unwrap();
        let site = site(dir.path());
        let fleet = csv(
            &site,
            &format!(
                "{HEADER}cam-1,cam-1,,keys/ops.pub,wifi.toml,secrets.toml,recipients.txt\n# a comment\ncam-2,cam-2,general,,,,\n"
            ),
        );
        let mut args = template_args(&site);
        args.timezone = Some("Europe/Berlin".into());
        args.mirrors = vec!["https://m1.example.net/f".into(), "https://m2.example.net/f".into()];
        let devices = batch(&fleet, &args).unwrap();
        assert_eq!(devices.len(), 2);
        let one = &devices[0];
        assert_eq!((one.id.as_str(), one.hostname.as_str()), ("cam-1", "cam-1"));
        let names: Vec<_> = one.files().iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["device.toml", "wifi.toml", "authorized_keys", "secrets.age"]);
        let p = &one.provisioning;
        assert_eq!(p.device.segment.as_str(), "canary", "from the template");
        assert_eq!(p.device.timezone, "Europe/Berlin", "from the flag");
        assert_eq!(p.device.channel.urls.len(), 3, "url and two mirrors");
        // The secret is encrypted to both recipients: each board's identity opens it; the
        // plain text is nowhere in the files.
        let age = p.secrets.as_ref().unwrap();
        for otp in [[1u8; 32], [2; 32]] {
            let s = age.decrypt(&prov::identity::from_otp_key(&otp)).unwrap();
            assert_eq!(s.get("wifi_shop"), Some(SECRET));
        }
        assert!(one
            .files()
            .iter()
            .all(|(_, b)| !b.windows(SECRET.len()).any(|w| w == SECRET.as_bytes())));
        let two = &devices[1];
        assert_eq!(two.provisioning.device.segment.as_str(), "general", "the cell wins");
        assert_eq!(two.files().len(), 1);
        assert_eq!(two.label, format!("{}: row 2 (line 4)", fleet.display()));
    }

    #[test]
    fn bad_batches_name_file_row_and_column_and_report_every_problem() {
        let dir = tempfile::tempdir().unwrap();
        let site = site(dir.path());
        std::fs::write(site.join("keys/bad.pub"), "ssh-ed25519 AAAAnotbase64!! x\n").unwrap();
        let good = "keys/ops.pub,wifi.toml,secrets.toml,recipients.txt";
        let f = |rows: &str| format!("{HEADER}{rows}");
        let cases: Vec<(String, Vec<&str>)> = vec![
            (f(&format!(",cam-1,,{good}\n")), vec!["row 1 (line 2), column device_id: missing; every row needs a device_id"]),
            (
                f(&format!("cam-1,cam-1,,{good}\ncam-2,cam-2,,,,,\ncam-1,cam-3,,,,,\n")),
                vec!["row 3 (line 4), column device_id: \"cam-1\" is already the device_id of row 1 (line 2); device ids must be unique"],
            ),
            (f("cam-1,cam_1,,,,,\n"), vec!["row 1 (line 2), column hostname: \"cam_1\" is not a valid host name"]),
            (f("cam-1,cam-1,beta,,,,\n"), vec!["row 1 (line 2), column segment: unknown segment \"beta\""]),
            (f("cam-1,cam-1,,keys/missing.pub,,,\n"), vec!["row 1 (line 2), column authorized_keys: cannot read", "keys/missing.pub"]),
            (
                f("cam-1,cam-1,,,wifi.toml,secrets.toml,nope.txt\n"),
                vec!["row 1 (line 2), column recipients_file: cannot read", "nope.txt"],
            ),
            (
                f("cam-1,cam-1,,keys/bad.pub,,,\n"),
                vec!["row 1 (line 2), column authorized_keys (", "keys/bad.pub): authorized_keys: line 1: not an SSH public key"],
            ),
            (
                f("cam-1,cam-1,,,wifi.toml,secrets.toml,\n"),
                vec!["row 1 (line 2), column secrets: ", "must be encrypted to the device: give its age recipient"],
            ),
            (
                "device_id,hostnme\ncam-1,cam-1\n".to_string(),
                vec![
                    "line 1, column 2: \"hostnme\" is not a known column; did you mean \"hostname\"?",
                    // The rows are still read: every problem in one pass.
                    "row 1 (line 2): hostname: missing",
                ],
            ),
            ("hostname\ncam-1\n".to_string(), vec!["line 1: no device_id column"]),
            (f("cam-1,cam-1\n"), vec!["row 1 (line 2): CSV error"]),
            // Every bad row is reported, not just the first.
            (
                f("cam-1,cam_1,,,,,\ncam-2,cam-2,beta,,,,\n"),
                vec!["2 problems found, nothing written", "row 1 (line 2), column hostname", "row 2 (line 3), column segment"],
            ),
        ];
        for (text, wants) in cases {
            let fleet = csv(&site, &text);
            let e = format!("{:#}", batch(&fleet, &template_args(&site)).unwrap_err());
            assert!(e.contains(&fleet.display().to_string()), "names the file: {e}");
            for want in wants {
                assert!(e.contains(want), "want {want:?} in:\n{e}");
            }
        }
        // A value missing everywhere names the ways to give it.
        let fleet = csv(&site, "device_id,hostname\ncam-1,cam-1\n");
        let e = format!("{:#}", batch(&fleet, &DeviceArgs::default()).unwrap_err());
        // Every missing field in one pass, each with the column, the flag and the file.
        for want in [
            "4 problems found",
            "row 1 (line 2): role: missing; give it as a role column, --role or role in --device FILE",
            "segment: missing; give it as a segment column, --segment or segment in --device",
            "channel.name: missing; give it as a channel column, --channel or channel.name in",
            "channel.url: missing; give it as a channel_url column, --channel-url or channel.url in",
        ] {
            assert!(e.contains(want), "want {want:?} in:\n{e}");
        }
        // A flag's bad value names the flag; a template's names the file and field.
        let args = DeviceArgs {
            segment: Some("beta".into()),
            device_id: Some("x".into()),
            hostname: Some("x".into()),
            ..template_args(&site)
        };
        let e = format!("{:#}", single(&args).unwrap_err());
        assert!(e.contains("--segment: unknown segment \"beta\""), "{e}");
        std::fs::write(site.join("t2.toml"), "role = \"Bad Role\"\nsegment = \"canary\"\n[channel]\nname = \"s\"\nurl = \"https://x.example\"\n").unwrap();
        let args = DeviceArgs {
            device: Some(site.join("t2.toml")),
            device_id: Some("x".into()),
            hostname: Some("x".into()),
            ..Default::default()
        };
        let e = format!("{:#}", single(&args).unwrap_err());
        assert!(e.contains("t2.toml: role: "), "{e}");
        // An unknown key names file, line, table and the key it resembles, and hides nothing.
        std::fs::write(site.join("t3.toml"), "rolle = \"x\"\n[channel]\nnmae = \"s\"\n").unwrap();
        let args = DeviceArgs { device: Some(site.join("t3.toml")), ..Default::default() };
        let e = format!("{:#}", single(&args).unwrap_err());
        for want in [
            "t3.toml: line 1: top level: unknown key \"rolle\"; did you mean \"role\"?",
            "t3.toml: line 3: [channel]: unknown key \"nmae\"; did you mean \"name\"?",
            "role: missing; give it as --role (or a role column with --batch) or role in --device",
            "channel.url: missing",
        ] {
            assert!(e.contains(want), "want {want:?} in:\n{e}");
        }
    }

    #[test]
    fn in_place_then_inspect_and_flash_with_the_new_bmap() {
        let dir = tempfile::tempdir().unwrap();
        let site = site(dir.path());
        let img = golden(dir.path(), 16 << 20);
        let args = DeviceArgs {
            device_id: Some("pi-0042".into()),
            hostname: Some("cam-0042".into()),
            authorized_keys: Some(site.join("keys/ops.pub")),
            wifi: Some(site.join("wifi.toml")),
            secrets: Some(site.join("secrets.toml")),
            recipients: vec![prov::identity::recipient_from_otp_key(&[1; 32])],
            ..template_args(&site)
        };
        let device = single(&args).unwrap();
        let before = inspect(&img).unwrap();
        assert!(before.is_empty(), "{before:?}");
        let zst = dir.path().join("fleet-1.0.0.img.zst");
        let e = format!(
            "{:#}",
            in_place(&zst, &device, &mut flash::AssumeYes, &Progress::quiet()).unwrap_err()
        );
        assert!(e.contains("a compressed image cannot be provisioned in place"), "{e}");
        in_place(&img, &device, &mut flash::AssumeYes, &Progress::quiet()).unwrap();
        let info = inspect(&img).unwrap();
        assert_eq!(info.device_id.as_deref(), Some("pi-0042"));
        assert_eq!(info.hostname.as_deref(), Some("cam-0042"));
        assert_eq!(info.segment.as_deref(), Some("canary"));
        assert!(info.secrets && info.problems.is_empty(), "{info:?}");
        assert_eq!(info.wifi_networks, ["Shop floor"]);
        assert_eq!(info.ssh_keys.len(), 1);
        let text = render(&info);
        assert!(
            text.contains("device_id:   pi-0042") && text.contains("content not shown"),
            "{text}"
        );
        let bytes = std::fs::read(&img).unwrap();
        assert!(!bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()), "no plain secret");
        // The bmap next to it was rewritten: flashing the provisioned image works.
        let out = dir.path().join("card.img");
        let opts = flash::FlashOptions {
            image: img,
            bmap: None,
            target: out.clone(),
            verify: true,
            whole: false,
        };
        flash::flash(&opts, None, &mut flash::AssumeYes, &Progress::quiet()).unwrap();
        assert_eq!(inspect(&out).unwrap().device_id.as_deref(), Some("pi-0042"));
    }

    #[test]
    fn a_full_partition_or_a_bad_device_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let site = site(dir.path());
        // 4 MiB: formatted, but too small for a megabyte of keys three times over... the
        // largest file accepted is 1 MiB, so the files are sized to the partition instead.
        let img = golden(dir.path(), 4 << 20);
        let before = sha256_file(&img).unwrap();
        let mut keys = String::new();
        while keys.len() < (1 << 20) - 200 {
            keys += KEY;
            keys.push('\n');
        }
        std::fs::write(site.join("keys/many.pub"), &keys).unwrap();
        let mut args = template_args(&site);
        args.device_id = Some("pi-1".into());
        args.hostname = Some("pi-1".into());
        args.authorized_keys = Some(site.join("keys/many.pub"));
        let device = single(&args).unwrap();
        let part = find_partition(&img).unwrap();
        // Fill the room: a partition just larger than the files, so that FAT's own overhead
        // makes it overflow.
        let tight = device.files().iter().map(|(_, b)| b.len() as u64).sum::<u64>() + 4096;
        let e = format!("{:#}", build_partition(&img, tight, &device).unwrap_err());
        assert!(
            e.contains("the provision partition (1.0 MiB) is full") && e.contains("pi-1"),
            "{e}"
        );
        assert!(e.contains("device.toml, authorized_keys"), "{e}");
        assert!(part.len > tight);
        // In place, on an image whose provision partition is too small: refused before
        // anything is written (the image, its bmap and its .zst are unchanged).
        let small_dir = dir.path().join("small");
        let small = golden(&small_dir, 1 << 20);
        let sums = |d: &Path| {
            ["fleet-1.0.0.img", "fleet-1.0.0.bmap"].map(|n| sha256_file(&d.join(n)).unwrap())
        };
        let small_before = sums(&small_dir);
        let e = format!(
            "{:#}",
            in_place(&small, &device, &mut flash::AssumeYes, &Progress::quiet()).unwrap_err()
        );
        assert!(
            e.contains("small/fleet-1.0.0.img: the provision partition (1.0 MiB) is full"),
            "{e}"
        );
        assert_eq!(sums(&small_dir), small_before);
        // So is flashing it with that device: the target is never created.
        let e = format!("{:#}", overlay(&small, &device).unwrap_err());
        assert!(e.contains("is full"), "{e}");
        // A bad device (unknown segment) writes nothing either.
        let mut bad = args;
        bad.segment = Some("beta".into());
        assert!(single(&bad).is_err());
        assert_eq!(sha256_file(&img).unwrap(), before);
    }

    fn two_devices(site: &Path) -> Vec<Device> {
        let fleet = csv(
            site,
            "device_id,hostname,authorized_keys\ncam-1,cam-1,keys/ops.pub\ncam-2,cam-2,\n",
        );
        batch(&fleet, &template_args(site)).unwrap()
    }

    #[test]
    fn a_batch_into_per_device_images() {
        let dir = tempfile::tempdir().unwrap();
        let site = site(dir.path());
        let img = golden(dir.path(), 16 << 20);
        let zst = dir.path().join("fleet-1.0.0.img.zst");
        let golden_sum = sha256_file(&img).unwrap();
        let out = dir.path().join("out");
        // From the compressed image: its GPT is read from the stream's head.
        let opts = FolderOptions::default();
        let written =
            to_folder(&zst, None, &two_devices(&site), &out, opts, &Progress::quiet()).unwrap();
        assert_eq!(written.len(), 2);
        for (w, id) in written.iter().zip(["cam-1", "cam-2"]) {
            assert_eq!(w.image, out.join(format!("fleet-1.0.0-{id}.img")));
            assert_eq!(inspect(&w.image).unwrap().device_id.as_deref(), Some(id));
            // Each comes with a bmap that bmaptool accepts, and stays sparse.
            let copy = dir.path().join(format!("{id}.copy"));
            let st = std::process::Command::new("bmaptool")
                .args(["-q", "copy", "--bmap"])
                .arg(&w.bmap)
                .arg(&w.image)
                .arg(&copy)
                .status()
                .unwrap();
            assert!(st.success());
            assert_eq!(sha256_file(&copy).unwrap(), sha256_file(&w.image).unwrap());
            let f = File::open(&w.image).unwrap();
            let data: u64 =
                crate::output::data_ranges(&f).unwrap().iter().map(|(a, b)| b - a).sum();
            assert!(data < 4 << 20, "{data} bytes of data: not sparse");
        }
        assert_eq!(inspect(&written[0].image).unwrap().ssh_keys.len(), 1);
        assert!(inspect(&written[1].image).unwrap().ssh_keys.is_empty());
        assert_eq!(sha256_file(&img).unwrap(), golden_sum, "the golden image is untouched");
        assert!(std::fs::read_dir(&out).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".tmp")));
    }

    /// Answers the card prompts from a script, and can change the "card" between tries.
    struct Script<F: FnMut(&str, Option<&str>) -> CardAction>(F, Vec<String>);

    impl<F: FnMut(&str, Option<&str>) -> CardAction> CardPrompt for Script<F> {
        fn next(
            &mut self,
            d: &Device,
            _: usize,
            _: usize,
            _: &Path,
            problem: Option<&str>,
        ) -> Result<CardAction> {
            self.1.push(format!("{}:{}", d.id, problem.unwrap_or("-")));
            Ok((self.0)(&d.id, problem))
        }
    }

    #[test]
    fn card_after_card_with_a_retry_a_skip_and_a_quit() {
        let dir = tempfile::tempdir().unwrap();
        let site = site(dir.path());
        let img = golden(dir.path(), 16 << 20);
        let card = dir.path().join("card.img");
        let mut devices = two_devices(&site);
        devices.push(devices[0].clone());
        devices[2].id = "cam-3".into();
        // cam-1: the first "card" is too small; the operator swaps it and it is written.
        // cam-2: skipped. cam-3: quit.
        std::fs::write(&card, vec![1u8; 1 << 20]).unwrap();
        let card2 = card.clone();
        let mut script = Script(
            move |id: &str, problem: Option<&str>| match (id, problem) {
                ("cam-1", Some(_)) => {
                    std::fs::remove_file(&card2).unwrap();
                    CardAction::Write
                }
                ("cam-1", None) => CardAction::Write,
                ("cam-2", _) => CardAction::Skip,
                _ => CardAction::Quit,
            },
            Vec::new(),
        );
        let done =
            cards(&img, None, &devices, &card, true, &mut script, &Progress::quiet()).unwrap();
        assert_eq!(done, ["cam-1"]);
        assert_eq!(script.1.len(), 4, "{:?}", script.1);
        assert!(
            script.1[1].starts_with("cam-1:") && script.1[1].contains("too small"),
            "{:?}",
            script.1
        );
        assert_eq!(inspect(&card).unwrap().device_id.as_deref(), Some("cam-1"));
    }
}
