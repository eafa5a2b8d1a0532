//! Safe mode: when the device stops its role and runs the safe-mode stack instead.
//!
//! [`decide`] is the rule, pure: enter after [`FAILED_UPDATES_LIMIT`] consecutive failed role
//! updates, on a crash-looping role, on invalid provisioning, or on an operator's `enter`;
//! leave on a good role update or an operator's `exit`. The marker file
//! (`/data/metrica/safe-mode`, [`crate::status::SAFE_MODE_MARKER`], which /status and /metrics
//! already read) records it; [`switch_stacks`] stops one stack and starts the other, and
//! reports when the engine itself is down (then the updater and the host's SSH are all that
//! is left, and the report says so).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::engine::{Engine, EngineError, Project};

/// Consecutive failed role updates that start safe mode.
pub const FAILED_UPDATES_LIMIT: u32 = 3;

/// Why safe mode is on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Reason {
    FailedUpdates { count: u32 },
    CrashLoop { role: String },
    BadProvisioning { error: String },
    Operator,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::FailedUpdates { count } => write!(f, "{count} consecutive failed role updates"),
            Reason::CrashLoop { role } => write!(f, "role {role} is crash-looping"),
            Reason::BadProvisioning { error } => write!(f, "invalid provisioning: {error}"),
            Reason::Operator => f.write_str("entered by an operator"),
        }
    }
}

/// An operator's command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Enter,
    Exit,
}

/// What the decision looks at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Signals {
    /// Whether safe mode is on now (the marker exists).
    pub active: bool,
    pub role: String,
    pub consecutive_failures: u32,
    pub crash_loop: bool,
    pub provisioning_error: Option<String>,
    /// A role update just committed (and passed its probation).
    pub good_update: bool,
    pub command: Option<Command>,
}

/// The decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Enter(Reason),
    Exit(ExitReason),
    Stay,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    GoodUpdate,
    Operator,
}

/// The rule. An operator's command wins; in safe mode only a good update or `exit` leaves
/// it; outside it, bad provisioning, the failure count and a crash loop enter it.
pub fn decide(s: &Signals) -> Decision {
    match (s.command, s.active) {
        (Some(Command::Exit), true) => return Decision::Exit(ExitReason::Operator),
        (Some(Command::Enter), false) => return Decision::Enter(Reason::Operator),
        (Some(_), _) => return Decision::Stay,
        (None, true) => {
            return if s.good_update {
                Decision::Exit(ExitReason::GoodUpdate)
            } else {
                Decision::Stay
            };
        }
        (None, false) => {}
    }
    if let Some(error) = &s.provisioning_error {
        return Decision::Enter(Reason::BadProvisioning { error: error.clone() });
    }
    if s.consecutive_failures >= FAILED_UPDATES_LIMIT {
        return Decision::Enter(Reason::FailedUpdates { count: s.consecutive_failures });
    }
    if s.crash_loop {
        return Decision::Enter(Reason::CrashLoop { role: s.role.clone() });
    }
    Decision::Stay
}

/// The marker's content: why and since when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    #[serde(flatten)]
    pub reason: Reason,
    /// Unix seconds.
    pub since: u64,
}

fn marker_path(metrica_dir: &Path) -> PathBuf {
    metrica_dir.join(crate::status::SAFE_MODE_MARKER)
}

/// Writes the marker (atomically): safe mode is on from now, also after a restart.
pub fn write_marker(metrica_dir: &Path, reason: Reason) -> Result<()> {
    let marker = Marker { reason, since: crate::slot::unix_now() };
    let mut bytes = serde_json::to_vec(&marker).context("serializing the safe-mode marker")?;
    bytes.push(b'\n');
    crate::state::write_atomic(&marker_path(metrica_dir), &bytes, "safe-mode-marker")
}

/// The marker, when safe mode is on. An unreadable marker still means on (it was written by
/// something that wanted safe mode), with the operator as the reason.
pub fn read_marker(metrica_dir: &Path) -> Option<Marker> {
    let bytes = std::fs::read(marker_path(metrica_dir)).ok()?;
    Some(serde_json::from_slice(&bytes).unwrap_or(Marker { reason: Reason::Operator, since: 0 }))
}

/// Removes the marker (and fsyncs the folder).
pub fn remove_marker(metrica_dir: &Path) -> Result<()> {
    let path = marker_path(metrica_dir);
    match std::fs::remove_file(&path) {
        Ok(()) => super::layout::sync_dir(metrica_dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

/// What a switch of stacks did.
#[derive(Debug, PartialEq, Eq)]
pub struct SwitchReport {
    /// `false` when the engine could not be reached: no stack runs, the updater serves the
    /// status page and the host's SSH stays; the report says the engine is down.
    pub engine_up: bool,
    pub errors: Vec<String>,
}

/// Stops `stop` (when given) and brings `start` up. Keeps going after an error and reports
/// all of them; an unreachable engine is reported as such.
pub fn switch_stacks(
    engine: &dyn Engine,
    stop: Option<&Project>,
    start: &Project,
    wait_timeout: Duration,
) -> SwitchReport {
    let mut errors = Vec::new();
    let mut engine_up = true;
    let mut note = |e: EngineError| {
        engine_up &= !matches!(e, EngineError::Unavailable(_));
        errors.push(e.to_string());
    };
    if let Some(p) = stop {
        if let Err(e) = engine.down(p) {
            note(e);
        }
    }
    if let Err(e) = engine.up(start, wait_timeout) {
        note(e);
    }
    SwitchReport { engine_up, errors }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::role::fake::{FakeEngine, Release};

    fn sig() -> Signals {
        Signals { role: "zigbee-hub".into(), ..Default::default() }
    }

    #[test]
    fn three_failed_updates_enter_and_two_do_not() {
        assert_eq!(decide(&Signals { consecutive_failures: 2, ..sig() }), Decision::Stay);
        assert_eq!(
            decide(&Signals { consecutive_failures: 3, ..sig() }),
            Decision::Enter(Reason::FailedUpdates { count: 3 })
        );
    }

    #[test]
    fn a_crash_loop_bad_provisioning_and_the_operator_enter() {
        assert_eq!(
            decide(&Signals { crash_loop: true, ..sig() }),
            Decision::Enter(Reason::CrashLoop { role: "zigbee-hub".into() })
        );
        let bad =
            Signals { provisioning_error: Some("no device id".into()), crash_loop: true, ..sig() };
        assert_eq!(
            decide(&bad),
            Decision::Enter(Reason::BadProvisioning { error: "no device id".into() })
        );
        assert_eq!(
            decide(&Signals { command: Some(Command::Enter), ..sig() }),
            Decision::Enter(Reason::Operator)
        );
    }

    #[test]
    fn in_safe_mode_only_a_good_update_or_the_operator_leaves() {
        let on = Signals { active: true, consecutive_failures: 5, crash_loop: true, ..sig() };
        assert_eq!(decide(&on), Decision::Stay);
        assert_eq!(
            decide(&Signals { good_update: true, ..on.clone() }),
            Decision::Exit(ExitReason::GoodUpdate)
        );
        assert_eq!(
            decide(&Signals { command: Some(Command::Exit), ..on.clone() }),
            Decision::Exit(ExitReason::Operator)
        );
        // Commands that change nothing.
        assert_eq!(decide(&Signals { command: Some(Command::Enter), ..on }), Decision::Stay);
        assert_eq!(
            decide(&Signals { command: Some(Command::Exit), consecutive_failures: 9, ..sig() }),
            Decision::Stay
        );
    }

    #[test]
    fn the_marker_records_why_and_is_what_status_reads() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_marker(dir.path()), None);
        write_marker(dir.path(), Reason::FailedUpdates { count: 3 }).unwrap();
        let m = read_marker(dir.path()).unwrap();
        assert_eq!(m.reason, Reason::FailedUpdates { count: 3 });
        assert!(dir.path().join(crate::status::SAFE_MODE_MARKER).exists());
        let text = std::fs::read_to_string(dir.path().join("safe-mode")).unwrap();
        assert!(text.contains("\"reason\":\"failed-updates\""), "{text}");
        remove_marker(dir.path()).unwrap();
        remove_marker(dir.path()).unwrap();
        assert_eq!(read_marker(dir.path()), None);
        std::fs::write(dir.path().join("safe-mode"), "").unwrap();
        assert_eq!(read_marker(dir.path()).map(|m| m.reason), Some(Reason::Operator));
    }

    #[test]
    fn switching_stacks_stops_the_role_and_reports_an_engine_that_is_down() {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeEngine::new();
        fake.add_image("web:1");
        fake.add_image("status:1");
        let role =
            Project { name: "metrica-web".into(), dir: dir.path().join("web"), files: vec![] };
        let safe = Project {
            name: "metrica-safe-mode".into(),
            dir: dir.path().join("safe"),
            files: vec![],
        };
        fake.release(&role.dir, Release::new(&[("web", "web:1")]));
        fake.release(&safe.dir, Release::new(&[("status", "status:1")]));
        fake.up(&role, Duration::from_secs(1)).unwrap();
        let r = switch_stacks(&fake, Some(&role), &safe, Duration::from_secs(1));
        assert_eq!(r, SwitchReport { engine_up: true, errors: vec![] });
        assert_eq!(fake.running_dir("metrica-web"), None);
        assert_eq!(fake.running_dir("metrica-safe-mode"), Some(safe.dir.clone()));
        fake.set_engine_down(true);
        let r = switch_stacks(&fake, Some(&role), &safe, Duration::from_secs(1));
        assert!(!r.engine_up);
        assert_eq!(r.errors.len(), 2);
    }
}
