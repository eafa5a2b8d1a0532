//! `role.toml`: what a role is, in a strict schema.
//!
//! Every table refuses unknown keys, and every value is checked while it is read, so that an
//! error carries the line of the key (the TOML parser's span) and names file, key and line:
//! `roles/zigbee-hub/role.toml:7: key `helth`: unknown field ...`. A role must have at least
//! one health check. Pure: [`parse`] takes the text; [`load`] reads the file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

/// The file name of a role's description inside its folder and its release folder.
pub const ROLE_FILE: &str = "role.toml";

/// A role.toml that cannot be used: the file, the line (1-based) and key where known.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{file}:{line}: {}{message}", key.as_ref().map(|k| format!("key `{k}`: ")).unwrap_or_default())]
pub struct SpecError {
    pub file: String,
    /// 0 when the parser gave no position (e.g. a missing top-level table).
    pub line: usize,
    pub key: Option<String>,
    pub message: String,
}

/// A role: `[role]`, `[apply]`, `[crash_loop]`, `[resources]`, `[devices]`, `[images]`, `[health]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RoleSpec {
    pub role: RoleInfo,
    #[serde(default)]
    pub apply: ApplySettings,
    #[serde(default)]
    pub crash_loop: CrashLoop,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default)]
    pub devices: Devices,
    /// Bundle-local image tag -> the upstream reference it is made from (documentation for
    /// the bundle builder; the device only sees the local tag).
    #[serde(default)]
    pub images: BTreeMap<String, String>,
    pub health: HealthChecks,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RoleInfo {
    pub name: RoleName,
    pub version: semver::Version,
    #[serde(default)]
    pub description: String,
    /// The OS versions this release runs on, e.g. `">=1.0.0, <3.0.0"`.
    pub os: semver::VersionReq,
    /// How often the device looks for a new release of this role.
    pub update_interval: Dur,
    /// The compose file, relative to the role folder.
    #[serde(default = "default_compose")]
    pub compose: RelPath,
    /// The role's own validation command (argv, run in the release folder), e.g.
    /// `["sh", "validate.sh"]`: exit status 0 accepts the release.
    #[serde(default)]
    pub validate: Option<Argv>,
}

/// Timing of one apply.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ApplySettings {
    /// `docker compose up --wait --wait-timeout`.
    pub wait_timeout: Dur,
    /// How long the role's health checks may take to pass after `up`.
    pub health_timeout: Dur,
    /// How long the new release is watched (restarts, health) before it is committed.
    pub probation: Dur,
}

impl Default for ApplySettings {
    fn default() -> Self {
        ApplySettings {
            wait_timeout: Dur(Duration::from_secs(120)),
            health_timeout: Dur(Duration::from_secs(60)),
            probation: Dur(Duration::from_secs(60)),
        }
    }
}

/// A running role that restarts `restarts` times within `window` is crash-looping.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CrashLoop {
    pub restarts: u32,
    pub window: Dur,
}

impl Default for CrashLoop {
    fn default() -> Self {
        CrashLoop { restarts: 5, window: Dur(Duration::from_secs(600)) }
    }
}

/// Limits applied by the engine to every service (`[resources]`), or to one
/// (`[resources.service.NAME]`, which replaces the role-wide values it names).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    pub memory: Option<ByteSize>,
    pub cpus: Option<Cpus>,
    pub pids: Option<u32>,
    #[serde(default)]
    pub service: BTreeMap<String, Limits>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub memory: Option<ByteSize>,
    pub cpus: Option<Cpus>,
    pub pids: Option<u32>,
}

/// Host devices the role needs: a release is refused when one is absent.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Devices {
    #[serde(default)]
    pub required: Vec<DevicePath>,
}

/// The role's health checks; at least one.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(try_from = "RawHealth")]
pub struct HealthChecks {
    pub http: Vec<HttpCheck>,
    pub tcp: Vec<TcpCheck>,
    pub command: Vec<CommandCheck>,
    pub container: Vec<ContainerCheck>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    #[serde(default)]
    http: Vec<HttpCheck>,
    #[serde(default)]
    tcp: Vec<TcpCheck>,
    #[serde(default)]
    command: Vec<CommandCheck>,
    #[serde(default)]
    container: Vec<ContainerCheck>,
}

impl TryFrom<RawHealth> for HealthChecks {
    type Error = String;
    fn try_from(r: RawHealth) -> Result<Self, String> {
        if r.http.is_empty() && r.tcp.is_empty() && r.command.is_empty() && r.container.is_empty() {
            return Err("a role needs at least one health check ([[health.http]], \
                        [[health.tcp]], [[health.command]] or [[health.container]])"
                .into());
        }
        Ok(HealthChecks { http: r.http, tcp: r.tcp, command: r.command, container: r.container })
    }
}

/// An HTTP GET that must answer `status` (and contain `contains`, when given).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpCheck {
    pub url: HttpUrl,
    #[serde(default = "default_status")]
    pub status: u16,
    #[serde(default)]
    pub contains: Option<String>,
    #[serde(default = "default_check_timeout")]
    pub timeout: Dur,
}

/// A TCP connect to `address` (`host:port`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TcpCheck {
    pub address: HostPort,
    #[serde(default = "default_check_timeout")]
    pub timeout: Dur,
}

/// A command that must exit 0: on the host in the release folder, or inside `service`'s
/// container (`docker compose exec`) when it is given.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CommandCheck {
    pub command: Argv,
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default = "default_check_timeout")]
    pub timeout: Dur,
}

/// A service whose containers must be running and, when the image defines a health check,
/// healthy.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ContainerCheck {
    pub service: String,
}

fn default_compose() -> RelPath {
    RelPath(PathBuf::from("compose.yaml"))
}
fn default_status() -> u16 {
    200
}
fn default_check_timeout() -> Dur {
    Dur(Duration::from_secs(5))
}

/// Defines a string newtype checked by `$check` while it is deserialized (so its errors
/// carry the key's line).
macro_rules! checked_string {
    ($(#[$doc:meta])* $name:ident($inner:ty), $check:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Deserialize)]
        #[serde(try_from = "String")]
        pub struct $name(pub $inner);
        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                let check: fn(&str) -> Result<$inner, String> = $check;
                check(&s).map($name)
            }
        }
    };
}

checked_string!(
    /// Lowercase letters, digits and `-`, starting with a letter; at most 63 characters
    /// (it names a folder and the compose project).
    RoleName(String),
    |s| {
        let ok = s.len() <= 63
            && s.starts_with(|c: char| c.is_ascii_lowercase())
            && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if ok {
            Ok(s.to_string())
        } else {
            Err(format!("invalid role name {s:?}: use a-z, 0-9 and -"))
        }
    }
);

checked_string!(
    /// A duration such as `"90s"`, `"5m"`, `"6h"`.
    Dur(Duration),
    |s| humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))
);

checked_string!(
    /// A size such as `"512MiB"`, `"2GiB"`, `"65536"` (bytes).
    ByteSize(u64),
    parse_size
);

checked_string!(
    /// A relative path inside the role folder (no `..`, not absolute).
    RelPath(PathBuf),
    |s| {
        let p = Path::new(s);
        let inside = !s.is_empty()
            && p.components().all(|c| matches!(c, std::path::Component::Normal(_)));
        if inside {
            Ok(p.to_path_buf())
        } else {
            Err(format!("{s:?} must be a relative path inside the role folder"))
        }
    }
);

checked_string!(
    /// An absolute path under /dev.
    DevicePath(PathBuf),
    |s| {
        if s.starts_with("/dev/") && !s.contains("..") {
            Ok(PathBuf::from(s))
        } else {
            Err(format!("{s:?} is not a path under /dev/"))
        }
    }
);

checked_string!(
    /// A plain `http://` URL (the checks reach the role on the device itself).
    HttpUrl(String),
    |s| {
        if s.starts_with("http://") && s.len() > 7 {
            Ok(s.to_string())
        } else {
            Err(format!("{s:?} is not an http:// URL"))
        }
    }
);

checked_string!(
    /// `host:port`.
    HostPort(String),
    |s| match s.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
            Ok(s.to_string())
        }
        _ => Err(format!("{s:?} is not host:port")),
    }
);

/// A CPU share such as `1.5`: positive and finite.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(try_from = "f64")]
pub struct Cpus(pub f64);

impl TryFrom<f64> for Cpus {
    type Error = String;
    fn try_from(v: f64) -> Result<Self, String> {
        if v.is_finite() && v > 0.0 {
            Ok(Cpus(v))
        } else {
            Err(format!("cpus must be a positive number, not {v}"))
        }
    }
}

/// A command line: a non-empty list of strings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "Vec<String>")]
pub struct Argv(pub Vec<String>);

impl TryFrom<Vec<String>> for Argv {
    type Error = String;
    fn try_from(v: Vec<String>) -> Result<Self, String> {
        if v.first().is_some_and(|p| !p.is_empty()) {
            Ok(Argv(v))
        } else {
            Err("a command is a non-empty list of strings".into())
        }
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(digits);
    let shift = match unit {
        "" | "B" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        _ => return Err(format!("invalid size {s:?}: use B, KiB, MiB or GiB")),
    };
    let n: u64 = n.parse().map_err(|_| format!("invalid size {s:?}"))?;
    n.checked_mul(1 << shift).filter(|&b| b > 0).ok_or_else(|| format!("invalid size {s:?}"))
}

/// Reads and checks a role.toml.
pub fn load(path: &Path) -> Result<RoleSpec, SpecError> {
    let text = std::fs::read_to_string(path).map_err(|e| SpecError {
        file: path.display().to_string(),
        line: 0,
        key: None,
        message: format!("reading: {e}"),
    })?;
    parse(&text, &path.display().to_string())
}

/// Checks the text of a role.toml; `file` names it in errors.
pub fn parse(text: &str, file: &str) -> Result<RoleSpec, SpecError> {
    toml::from_str(text).map_err(|e| spec_error(text, file, &e))
}

fn spec_error(text: &str, file: &str, e: &toml::de::Error) -> SpecError {
    let span = e.span();
    let line =
        span.as_ref().map_or(0, |s| text[..s.start.min(text.len())].matches('\n').count() + 1);
    let key = span.and_then(|s| key_at(text, s.start));
    SpecError { file: file.to_string(), line, key, message: e.message().trim().to_string() }
}

/// The key written on the line at byte `at` (`name = ...` gives `name`; a table header gives
/// the table's name).
fn key_at(text: &str, at: usize) -> Option<String> {
    let start = text[..at.min(text.len())].rfind('\n').map_or(0, |i| i + 1);
    let line = text[start..].lines().next()?.trim();
    let key = match line.split_once('=') {
        Some((k, _)) => k.trim(),
        None => line.trim_start_matches('[').trim_end_matches(']'),
    };
    (!key.is_empty()).then(|| key.trim_matches('"').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const GOOD: &str = r#"
[role]
name = "camera-single"
version = "1.2.0"
os = ">=1.0.0, <3.0.0"
update_interval = "6h"
validate = ["sh", "validate.sh"]

[apply]
wait_timeout = "90s"
probation = "30s"

[resources]
memory = "256MiB"
cpus = 1.5
[resources.service.mediamtx]
memory = "128MiB"

[devices]
required = ["/dev/video0"]

[images]
"metrica.invalid/mediamtx:1.9.3" = "bluenviron/mediamtx:1.9.3"

[[health.http]]
url = "http://127.0.0.1:9997/v3/paths/list"

[[health.tcp]]
address = "127.0.0.1:8554"

[[health.container]]
service = "mediamtx"
"#;

    #[test]
    fn a_good_role_reads_with_its_defaults() {
        let s = parse(GOOD, "role.toml").unwrap();
        assert_eq!(s.role.name.0, "camera-single");
        assert_eq!(s.role.version, semver::Version::new(1, 2, 0));
        assert!(s.role.os.matches(&semver::Version::new(2, 9, 0)));
        assert!(!s.role.os.matches(&semver::Version::new(3, 0, 0)));
        assert_eq!(s.role.update_interval.0, Duration::from_secs(6 * 3600));
        assert_eq!(s.role.compose.0, PathBuf::from("compose.yaml"));
        assert_eq!(s.apply.wait_timeout.0, Duration::from_secs(90));
        assert_eq!(s.apply.health_timeout.0, Duration::from_secs(60));
        assert_eq!(s.crash_loop, CrashLoop::default());
        assert_eq!(s.resources.memory, Some(ByteSize(256 << 20)));
        assert_eq!(s.resources.service["mediamtx"].memory, Some(ByteSize(128 << 20)));
        assert_eq!(s.devices.required, [DevicePath("/dev/video0".into())]);
        assert_eq!(s.health.http[0].status, 200);
        assert_eq!(s.health.http[0].timeout.0, Duration::from_secs(5));
        assert_eq!(s.health.container[0].service, "mediamtx");
    }

    /// Bad input: each edit of the good file and the (line, key, words) of its error.
    #[test]
    fn bad_role_files_name_the_file_key_and_line() {
        let cases: &[(&str, &str, usize, Option<&str>, &str)] = &[
            (
                "update_interval = \"6h\"",
                "update_interval = \"6h\"\nupdate_intervall = 3",
                7,
                Some("update_intervall"),
                "unknown field",
            ),
            ("[apply]", "[apply]\nprobaton = \"1s\"", 10, Some("probaton"), "unknown field"),
            (
                "service = \"mediamtx\"\n",
                "service = \"mediamtx\"\nrestarts = 2\n",
                33,
                Some("restarts"),
                "unknown field",
            ),
            (
                "version = \"1.2.0\"",
                "version = \"1.2\"",
                4,
                Some("version"),
                "unexpected end of input",
            ),
            (
                "update_interval = \"6h\"",
                "update_interval = \"soon\"",
                6,
                Some("update_interval"),
                "invalid duration",
            ),
            ("memory = \"256MiB\"", "memory = \"256MB\"", 14, Some("memory"), "invalid size"),
            ("cpus = 1.5", "cpus = -1.0", 15, Some("cpus"), "positive"),
            (
                "[\"/dev/video0\"]",
                "[\"/tmp/video0\"]",
                20,
                Some("required"),
                "not a path under /dev/",
            ),
            ("name = \"camera-single\"", "name = \"Camera\"", 3, Some("name"), "invalid role name"),
            (
                "address = \"127.0.0.1:8554\"",
                "address = \"127.0.0.1\"",
                29,
                Some("address"),
                "not host:port",
            ),
            ("url = \"http://", "url = \"ftp://", 26, Some("url"), "not an http:// URL"),
            (
                "validate = [\"sh\", \"validate.sh\"]",
                "validate = []",
                7,
                Some("validate"),
                "non-empty",
            ),
            ("os = \">=1.0.0, <3.0.0\"", "os = \"one\"", 5, Some("os"), "unexpected character"),
        ];
        for (from, to, line, key, words) in cases {
            assert!(GOOD.contains(from), "{from}");
            let text = GOOD.replacen(from, to, 1);
            let e = parse(&text, "roles/x/role.toml").unwrap_err();
            assert_eq!((e.line, e.key.as_deref()), (*line, *key), "{to}: {e}");
            assert!(e.message.contains(words), "{to}: {e}");
            assert!(e.to_string().starts_with(&format!("roles/x/role.toml:{line}: key `")), "{e}");
        }
    }

    #[test]
    fn a_role_without_health_checks_is_refused() {
        let head = GOOD.split("[[health.http]]").next().unwrap();
        let e = parse(&format!("{head}[health]\n"), "role.toml").unwrap_err();
        assert!(e.message.contains("at least one health check"), "{e}");
        assert_eq!(e.key.as_deref(), Some("health"));
        let e = parse(head, "role.toml").unwrap_err();
        assert!(e.message.contains("missing field `health`"), "{e}");
    }

    /// The roles of the repository: each reads, lives in a folder of its name, lists every
    /// image its compose file names, and passes its own validation script.
    #[test]
    fn every_role_in_the_repository_reads_and_validates() {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut names = Vec::new();
        let dirs = std::fs::read_dir(repo.join("roles")).unwrap().map(|e| e.unwrap().path());
        // And the QEMU Pi image's test role.
        for dir in dirs.chain([repo.join("qemu/roles/hello")]) {
            let spec = load(&dir.join(ROLE_FILE)).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(dir.file_name().unwrap().to_str(), Some(spec.role.name.0.as_str()));
            let compose = std::fs::read_to_string(dir.join(&spec.role.compose.0)).unwrap();
            for line in compose.lines().filter_map(|l| l.trim().strip_prefix("image: ")) {
                assert!(
                    spec.images.contains_key(line),
                    "{}: {line} not in [images]",
                    dir.display()
                );
            }
            if let Some(argv) = &spec.role.validate {
                let st = std::process::Command::new(&argv.0[0])
                    .args(&argv.0[1..])
                    .current_dir(&dir)
                    .status()
                    .unwrap();
                assert!(st.success(), "{}: {st}", dir.display());
            }
            names.push(spec.role.name.0);
        }
        names.sort();
        let want = [
            "ai-camera",
            "audio-player",
            "camera-dual",
            "camera-single",
            "hello",
            "safe-mode",
            "video-player",
            "zigbee-hub",
        ];
        assert_eq!(names, want);
    }

    #[test]
    fn sizes_take_binary_units_only() {
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("0").is_err());
        assert!(parse_size("1.5GiB").is_err());
        assert!(parse_size("99999999999999GiB").is_err());
    }
}
