//! The container engine boundary: the few things the roles layer asks of Docker.
//!
//! [`Engine`] is the whole interface; [`super::docker::DockerCli`] implements it with the
//! `docker` CLI (Compose v2 plugin), and [`super::fake::FakeEngine`] with a model in memory
//! for unit tests. The parsers of the engine's JSON output live here, as pure functions:
//! `docker compose ps --format json` prints JSON Lines since Compose 2.21 and one JSON array
//! before, and [`parse_ps`] reads both.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

/// A failed engine call: what was run and what the engine said.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum EngineError {
    /// The command ran and failed; `stderr` is its last words.
    #[error("{command} failed ({status}): {stderr}")]
    Failed { command: String, status: String, stderr: String },
    /// The command did not finish in time and was killed.
    #[error("{command} did not finish within {}", humantime::format_duration(*timeout))]
    Timeout { command: String, timeout: Duration },
    /// The engine cannot be reached (no `docker`, or the daemon is down).
    #[error("the container engine is not available: {0}")]
    Unavailable(String),
    /// The engine answered something this code cannot read.
    #[error("unexpected output of {command}: {detail}")]
    Output { command: String, detail: String },
}

/// One compose project: the role's stack, one release folder, its compose files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Project {
    /// The compose project name: the same for every release of a role, so that a new
    /// release replaces the containers of the old one and keeps its named volumes.
    pub name: String,
    /// The release folder (compose's project directory: relative paths start here).
    pub dir: PathBuf,
    /// Compose files, in order (later ones override earlier ones).
    pub files: Vec<PathBuf>,
}

impl Project {
    /// The project of a role's release folder: `metrica-<role>`, `dir/<compose>`, and the
    /// generated limits file when it exists.
    pub fn for_release(role: &str, dir: &Path, compose: &Path) -> Project {
        let mut files = vec![dir.join(compose)];
        let limits = dir.join(super::limits::LIMITS_FILE);
        if limits.exists() {
            files.push(limits);
        }
        Project { name: project_name(role), dir: dir.to_path_buf(), files }
    }
}

/// The compose project name of a role.
pub fn project_name(role: &str) -> String {
    format!("metrica-{role}")
}

/// One container of a project, as `docker compose ps` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct Container {
    #[serde(rename(deserialize = "ID"))]
    pub id: String,
    #[serde(rename(deserialize = "Name"))]
    pub name: String,
    #[serde(rename(deserialize = "Service"))]
    pub service: String,
    /// `running`, `exited`, `restarting`, `created`, ...
    #[serde(rename(deserialize = "State"))]
    pub state: String,
    /// `healthy`, `unhealthy`, `starting`, or empty when the image has no health check.
    #[serde(rename(deserialize = "Health"), default)]
    pub health: String,
    #[serde(rename(deserialize = "ExitCode"), default)]
    pub exit_code: i64,
}

impl Container {
    /// Running, and healthy when it has a health check.
    pub fn is_up(&self) -> bool {
        self.state == "running" && (self.health.is_empty() || self.health == "healthy")
    }
}

/// What `docker inspect` adds: the restart count the engine keeps per container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspected {
    pub id: String,
    pub restart_count: u64,
    pub status: String,
    pub health: Option<String>,
}

/// Output of a command run in a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub status: i32,
    pub stdout: String,
}

/// What the roles layer needs of a container engine. Every call is synchronous and bounded.
pub trait Engine {
    /// `docker load -i ARCHIVE`: adds the images of a `docker save` archive.
    fn load_images(&self, archive: &Path) -> Result<(), EngineError>;
    /// Whether the engine has an image of this reference.
    fn image_present(&self, reference: &str) -> Result<bool, EngineError>;
    /// `docker compose config -q`: the files parse and resolve.
    fn config_check(&self, project: &Project) -> Result<(), EngineError>;
    /// `docker compose config --format json`: the resolved model.
    fn config(&self, project: &Project) -> Result<ComposeModel, EngineError>;
    /// `docker compose up -d --remove-orphans --wait --wait-timeout N`.
    fn up(&self, project: &Project, wait_timeout: Duration) -> Result<(), EngineError>;
    /// `docker compose ps --all --format json`.
    fn ps(&self, project: &Project) -> Result<Vec<Container>, EngineError>;
    /// `docker compose down --remove-orphans` (named volumes are kept).
    fn down(&self, project: &Project) -> Result<(), EngineError>;
    /// `docker inspect`: restart counts and health of these containers, named by the ids as
    /// given (which may be `ps`'s short form).
    fn inspect(&self, ids: &[String]) -> Result<Vec<Inspected>, EngineError>;
    /// `docker compose exec -T SERVICE ARGV...`.
    fn exec(
        &self,
        project: &Project,
        service: &str,
        argv: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, EngineError>;
}

/// The part of the resolved compose model the roles layer reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ComposeModel {
    #[serde(default)]
    pub services: std::collections::BTreeMap<String, ComposeService>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ComposeService {
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub pull_policy: Option<String>,
    #[serde(default)]
    pub build: Option<serde_json::Value>,
}

/// Reads `docker compose ps --format json`: JSON Lines (Compose >= 2.21), a JSON array
/// (older v2), or nothing (no containers).
pub fn parse_ps(text: &str) -> Result<Vec<Container>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(Vec::new());
    }
    if text.starts_with('[') {
        return serde_json::from_str(text).map_err(|e| format!("ps JSON array: {e}"));
    }
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| format!("ps JSON line {}: {e}", i + 1)))
        .collect()
}

/// Reads `docker inspect` (a JSON array of container objects).
pub fn parse_inspect(text: &str) -> Result<Vec<Inspected>, String> {
    #[derive(Deserialize)]
    struct Raw {
        #[serde(rename = "Id")]
        id: String,
        #[serde(rename = "RestartCount", default)]
        restart_count: u64,
        #[serde(rename = "State")]
        state: RawState,
    }
    #[derive(Deserialize)]
    struct RawState {
        #[serde(rename = "Status", default)]
        status: String,
        #[serde(rename = "Health", default)]
        health: Option<RawHealth>,
    }
    #[derive(Deserialize)]
    struct RawHealth {
        #[serde(rename = "Status", default)]
        status: String,
    }
    let raw: Vec<Raw> = serde_json::from_str(text).map_err(|e| format!("inspect JSON: {e}"))?;
    Ok(raw
        .into_iter()
        .map(|r| Inspected {
            id: r.id,
            restart_count: r.restart_count,
            status: r.state.status,
            health: r.state.health.map(|h| h.status),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINES: &str = r#"{"Command":"\"httpd -f\"","CreatedAt":"2026-12-05 12:00:00 +0000 UTC","ExitCode":0,"Health":"healthy","ID":"4f1c","Image":"metrica.invalid/web:1","Labels":"","LocalVolumes":"1","Mounts":"data","Name":"metrica-web-web-1","Names":"metrica-web-web-1","Networks":"metrica-web_default","Ports":"","Project":"metrica-web","Publishers":[],"RunningFor":"2 seconds ago","Service":"web","Size":"0B","State":"running","Status":"Up 2 seconds (healthy)"}
{"ExitCode":3,"Health":"","ID":"9a2b","Name":"metrica-web-side-1","Service":"side","State":"exited"}
"#;

    #[test]
    fn ps_reads_json_lines_and_the_older_array() {
        let lines = parse_ps(LINES).unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!((lines[0].service.as_str(), lines[0].is_up()), ("web", true));
        assert_eq!(
            (lines[1].state.as_str(), lines[1].exit_code, lines[1].is_up()),
            ("exited", 3, false)
        );
        let array = format!("[{}]", LINES.trim().replace('\n', ","));
        assert_eq!(parse_ps(&array).unwrap(), lines);
        assert_eq!(parse_ps("\n").unwrap(), []);
        let e = parse_ps("{\"ID\":\"x\"}\nnot json").unwrap_err();
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn a_starting_or_unhealthy_container_is_not_up() {
        let mut c = parse_ps(LINES).unwrap().remove(0);
        c.health = "starting".into();
        assert!(!c.is_up());
        c.health = "unhealthy".into();
        assert!(!c.is_up());
    }

    #[test]
    fn inspect_reads_restart_counts_and_health() {
        let text = r#"[{"Id":"4f1c","RestartCount":4,"State":{"Status":"restarting","Health":{"Status":"unhealthy","FailingStreak":3}}},
                       {"Id":"9a2b","State":{"Status":"running"}}]"#;
        let got = parse_inspect(text).unwrap();
        assert_eq!(
            got[0],
            Inspected {
                id: "4f1c".into(),
                restart_count: 4,
                status: "restarting".into(),
                health: Some("unhealthy".into())
            }
        );
        assert_eq!((got[1].restart_count, got[1].health.as_deref()), (0, None));
        assert!(parse_inspect("{}").is_err());
    }
}
