//! `updater role apply|status|recover` and `updater safe-mode enter|exit|status`: the roles
//! service ([`crate::role::service::Roles`]) on the command line (docs/roles.md, "Commands").
//!
//! Exit codes ([`Exit`]): 0 done (committed, already current, safe mode changed or already as
//! asked), 1 failed (an error of the updater or the engine), 2 usage, 3 refused (bad input:
//! the release, the bundle or `--role`), 4 rolled back, 5 busy (another updater command holds
//! the lock), 6 not enough free space on /data.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::cli::Cli;
use crate::log::Log;
use crate::role::apply::{Event, Outcome, Recovery};
use crate::role::docker::DockerCli;
use crate::role::safe_mode::{self, Command as SafeCommand};
use crate::role::service::{Applied, Roles, RolesStatus, SafeModeChange, ServiceError, Source};
use crate::sign::Keyring;

/// Options of every role and safe-mode command.
#[derive(Debug, clap::Args)]
pub struct RoleOptions {
    /// The safe-mode stack's release folder (role.toml, compose file). Default: the one the
    /// daemon unpacks from the image's baked bundle, DATA_DIR/metrica/safe-mode-stack.
    #[arg(long, global = true, value_name = "DIR")]
    pub safe_mode_stack: Option<PathBuf>,
    /// The OS version a release's `os` range is checked against. Default: the running
    /// release's (/etc/metrica/release.toml).
    #[arg(long, global = true, value_name = "VERSION")]
    pub os_version: Option<semver::Version>,
    /// Keep at least this much free on the data partition after unpacking and loading (MiB).
    #[arg(long, global = true, value_name = "MIB", default_value_t = crate::daemon::DEFAULT_MIN_FREE >> 20)]
    pub min_free_mib: u64,
}

#[derive(Debug, clap::Subcommand)]
pub enum RoleCommand {
    /// Apply a role release: verify, load its images while the old stack runs, validate,
    /// switch, bring up, check health and probation, then commit or roll back.
    Apply {
        /// A role bundle (`.mfr`, a file or an http(s) URL), or an unpacked release folder
        /// (role.toml, compose file, images/).
        source: String,
        /// Refuse a release of any other role.
        #[arg(long, value_name = "NAME")]
        role: Option<String>,
        /// Apply a version that failed before.
        #[arg(long)]
        force: bool,
    },
    /// Show every role: current and previous release, committed, pending and failed
    /// versions, containers and health; and safe mode.
    Status {
        /// Exit 1 unless every role that has a release runs healthy (in safe mode the roles
        /// are stopped on purpose: 0). The trial-boot health check of the Pi image
        /// (/etc/metrica/health.d/20-role).
        #[arg(long)]
        check: bool,
    },
    /// Finish applies a power cut interrupted and bring up the stacks that should run
    /// (the safe-mode stack in safe mode). Run at every start.
    Recover,
}

#[derive(Debug, clap::Subcommand)]
pub enum SafeModeCommand {
    /// Stop every role's stack and start the safe-mode stack.
    Enter,
    /// Stop the safe-mode stack and bring every role's current release up again.
    Exit,
    /// Whether safe mode is on, why and since when.
    Status,
}

/// The exit codes of the role and safe-mode commands (documented in docs/roles.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Done = 0,
    Failed = 1,
    Refused = 3,
    RolledBack = 4,
    Busy = 5,
    NoSpace = 6,
}

impl Exit {
    fn of_error(e: &ServiceError) -> Exit {
        match e {
            ServiceError::Busy(_) => Exit::Busy,
            ServiceError::NoSpace { .. } => Exit::NoSpace,
            ServiceError::Bundle(_) | ServiceError::RoleName(_) => Exit::Refused,
            ServiceError::NotWritten(_) | ServiceError::Other(_) => Exit::Failed,
        }
    }

    fn of_outcome(o: &Outcome) -> Exit {
        match o {
            Outcome::Committed { .. } | Outcome::AlreadyCurrent(_) => Exit::Done,
            Outcome::Refused { .. } => Exit::Refused,
            Outcome::RolledBack { .. } => Exit::RolledBack,
        }
    }

    fn words(self) -> &'static str {
        match self {
            Exit::Done => "done",
            Exit::Failed => "failed",
            Exit::Refused => "refused",
            Exit::RolledBack => "rolled-back",
            Exit::Busy => "busy",
            Exit::NoSpace => "no-space",
        }
    }
}

/// Which command.
#[derive(Debug, Clone, Copy)]
pub enum Which<'a> {
    Role(&'a RoleCommand),
    SafeMode(&'a SafeModeCommand),
}

/// Runs a role or safe-mode command as the process: its exit code.
pub fn main(cli: &Cli, opts: &RoleOptions, which: Which) -> ExitCode {
    let log = Log::command_line(cli.log_file.clone());
    let code = match run(cli, opts, which, &mut std::io::stdout()) {
        Ok(code) => code,
        Err(e) => {
            die_at_power_cut(&e);
            let code = Exit::of_error(&e);
            log.event("error", &format!("{e:#}"));
            if cli.json {
                let doc = json!({ "result": code.words(), "error": error_text(&e) });
                println!("{doc}");
            }
            eprintln!("updater: error: {}", error_text(&e));
            code
        }
    };
    ExitCode::from(code as u8)
}

/// Runs one command, writing what it reports to `out`.
pub fn run(
    cli: &Cli,
    opts: &RoleOptions,
    which: Which,
    out: &mut dyn Write,
) -> Result<Exit, ServiceError> {
    arm_failpoint_from_env();
    let engine = DockerCli::default();
    let log = Log::command_line(cli.log_file.clone());
    let progress = Progress::new();
    let log_event = |e: &Event| progress.event(&log, e);
    let source = match which {
        Which::Role(RoleCommand::Apply { source, .. }) => Some(parse_source(source, cli)?),
        _ => None,
    };
    let bundle = matches!(source, Some(Source::Bundle(_)));
    let keyring = if bundle { load_keyring(&cli.keyring)? } else { Keyring::default() };
    let running = crate::cli::read_release(&cli.sysroot).map(|r| r.version);
    let os_version = match (&opts.os_version, running) {
        (Some(v), _) => v.clone(),
        (None, Some(v)) => v,
        // Only an apply checks a release's OS range; the other commands never read it.
        (None, None) if !matches!(which, Which::Role(RoleCommand::Apply { .. })) => {
            semver::Version::new(0, 0, 0)
        }
        (None, None) => {
            return Err(anyhow::anyhow!(
                "the OS version: {} under {} is missing or invalid (or give --os-version)",
                crate::release::RELEASE_PATH,
                cli.sysroot.display()
            )
            .into())
        }
    };
    let roles = Roles {
        metrica_dir: cli.data_dir.join("metrica"),
        engine: &engine,
        keyring: &keyring,
        os_version,
        dev_root: cli.sysroot.clone(),
        safe_mode_stack: Some(opts.safe_mode_stack.clone().unwrap_or_else(|| {
            cli.data_dir.join("metrica").join(crate::role::service::SAFE_MODE_STACK)
        }))
        .filter(|dir| dir.is_dir()),
        min_free_bytes: opts.min_free_mib << 20,
        log: &log_event,
    };
    let code = match which {
        Which::Role(RoleCommand::Apply { role, force, .. }) => {
            let source = source.expect("parsed above for apply");
            let applied = roles.apply_as(&source, role.as_deref(), *force);
            let downloaded = cli.data_dir.join("metrica").join(CLI_DOWNLOAD);
            if source == Source::Bundle(downloaded.clone()) {
                let _ = std::fs::remove_file(&downloaded);
            }
            progress.finish();
            report_applied(&applied?, cli.json, out)?
        }
        Which::Role(RoleCommand::Status { check }) => {
            let st = roles.status()?;
            let code = report_status(&st, cli.json, out)?;
            match (check, roles_unhealthy(&st)) {
                (true, Some(why)) => {
                    eprintln!("updater: role check: {why}");
                    Exit::Failed
                }
                _ => code,
            }
        }
        Which::Role(RoleCommand::Recover) => recover(&roles, out)?,
        Which::SafeMode(SafeModeCommand::Enter) => {
            report_change(roles.command(SafeCommand::Enter)?.as_ref(), &roles, cli.json, out)?
        }
        Which::SafeMode(SafeModeCommand::Exit) => {
            report_change(roles.command(SafeCommand::Exit)?.as_ref(), &roles, cli.json, out)?
        }
        Which::SafeMode(SafeModeCommand::Status) => report_change(None, &roles, cli.json, out)?,
    };
    progress.finish();
    Ok(code)
}

/// An error's text in the one style of both binaries: each cause once (`cli_error`).
fn error_text(e: &ServiceError) -> String {
    match e {
        ServiceError::Other(a) => crate::cli_error::message(a),
        other => {
            let mut text = other.to_string();
            let mut cause = std::error::Error::source(other);
            while let Some(c) = cause {
                let c_text = c.to_string();
                if !text.contains(&c_text) {
                    text = format!("{text}: {c_text}");
                }
                cause = c.source();
            }
            text
        }
    }
}

fn load_keyring(dir: &Path) -> Result<Keyring> {
    Keyring::load(dir).with_context(|| format!("loading the keyring {}", dir.display()))
}

/// Where `role apply URL` downloads the bundle, under `/data/metrica` (replaced by each
/// download; the daemon's downloads are elsewhere).
pub const CLI_DOWNLOAD: &str = "role-apply-download.mfr";

/// A release folder or a bundle file; a URL is downloaded whole into `/data/metrica` first
/// (bounded by the largest role bundle), and its signature is checked when it is unpacked.
fn parse_source(source: &str, cli: &Cli) -> Result<Source, ServiceError> {
    if source.starts_with("http://") || source.starts_with("https://") {
        let dir = cli.data_dir.join("metrica");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let dest = dir.join(CLI_DOWNLOAD);
        let limit = crate::role::bundle::MAX_TOTAL + crate::role::bundle::MAX_MANIFEST * 2;
        let http = crate::role::download::HttpOptions::default();
        crate::role::download::fetch_whole(source, &dest, limit, &http)
            .map_err(|e| anyhow::anyhow!("downloading {source}: {e}"))?;
        return Ok(Source::Bundle(dest));
    }
    let path = PathBuf::from(source);
    let meta = std::fs::metadata(&path).with_context(|| format!("reading the source {source}"))?;
    Ok(if meta.is_dir() { Source::Folder(path) } else { Source::Bundle(path) })
}

fn report_applied(a: &Applied, json: bool, out: &mut dyn Write) -> Result<Exit> {
    let code = Exit::of_outcome(&a.outcome);
    let (result, version, other, error) = match &a.outcome {
        Outcome::Committed { version, previous } => {
            ("committed", Some(version), previous.as_ref(), None)
        }
        Outcome::AlreadyCurrent(v) => ("already-current", Some(v), None, None),
        Outcome::Refused { error, .. } => ("refused", None, None, Some(error.to_string())),
        Outcome::RolledBack { version, error, restored } => {
            ("rolled-back", Some(version), restored.as_ref(), Some(error.to_string()))
        }
    };
    let safe = a.safe_mode.as_ref().map(change_words);
    if json {
        let doc = json!({
            "result": result, "role": a.role, "version": version.map(ToString::to_string),
            "previous": other.map(ToString::to_string), "error": error, "safe_mode": safe,
            "exit_code": code as u8,
        });
        writeln!(out, "{doc}")?;
        return Ok(code);
    }
    let mut line = format!("metrica: role {}: {result}", a.role);
    if let Some(v) = version {
        line += &format!(" {v}");
    }
    match (&a.outcome, other) {
        (Outcome::Committed { .. }, Some(p)) => line += &format!(" (previous {p})"),
        (Outcome::RolledBack { .. }, Some(p)) => line += &format!(" ({p} runs again)"),
        _ => {}
    }
    if let Some(e) = error {
        line += &format!(": {e}");
    }
    writeln!(out, "{line}")?;
    if let Some(s) = safe {
        writeln!(out, "metrica: safe mode {s}")?;
    }
    Ok(code)
}

fn change_words(c: &SafeModeChange) -> String {
    match c {
        SafeModeChange::Entered(r) => format!("entered: {r}"),
        SafeModeChange::Left(safe_mode::ExitReason::GoodUpdate) => "left: a good update".into(),
        SafeModeChange::Left(safe_mode::ExitReason::Operator) => "left: by an operator".into(),
    }
}

fn report_status(st: &RolesStatus, json: bool, out: &mut dyn Write) -> Result<Exit> {
    if json {
        writeln!(out, "{}", serde_json::to_string(st).context("serializing the status")?)?;
        return Ok(Exit::Done);
    }
    if !st.engine_up {
        writeln!(out, "container engine: DOWN")?;
    }
    writeln!(out, "{}", safe_mode_line(st.safe_mode.as_ref()))?;
    if st.roles.is_empty() {
        writeln!(out, "roles: none")?;
    }
    for r in &st.roles {
        let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        let health = match r.healthy {
            Some(true) => "healthy",
            Some(false) => "NOT healthy",
            None => "health unknown",
        };
        writeln!(
            out,
            "role {}: current {}, previous {}, committed {}, {health}",
            r.name,
            opt(&r.current),
            opt(&r.previous),
            opt(&r.committed)
        )?;
        if let Some(p) = &r.pending {
            writeln!(out, "  pending {p} (an apply was interrupted: run `updater role recover`)")?;
        }
        if !r.failed.is_empty() {
            writeln!(out, "  failed versions: {}", r.failed.join(", "))?;
        }
        writeln!(
            out,
            "  consecutive failures {}, rollbacks {}",
            r.consecutive_failures, r.rollbacks_total
        )?;
        if let Some(e) = &r.last_error {
            writeln!(out, "  last error: {e}")?;
        }
        for c in r.checks.iter().flatten().filter(|c| !c.ok) {
            writeln!(out, "  check {} FAILS: {}", c.check, c.detail)?;
        }
        for c in r.containers.iter().flatten() {
            let h = if c.health.is_empty() { String::new() } else { format!(" ({})", c.health) };
            writeln!(out, "  {} [{}]: {}{h}", c.name, c.service, c.state)?;
        }
    }
    Ok(Exit::Done)
}

/// Why the roles are not as they should be, for `role status --check`: a role with a
/// release whose stack is not up and healthy, or an engine that does not answer. `None`: all
/// well, no role has a release yet (a new device: the daemon applies the baked one), or safe
/// mode is on (the roles are stopped on purpose).
fn roles_unhealthy(st: &RolesStatus) -> Option<String> {
    if st.safe_mode.is_some() {
        return None;
    }
    let bad: Vec<String> = st
        .roles
        .iter()
        .filter(|r| r.current.is_some() && r.healthy != Some(true))
        .map(|r| {
            let version = r.current.as_deref().unwrap_or_default();
            match r.healthy {
                Some(_) => format!("role {} {version} is not healthy", r.name),
                None => format!("the health of role {} {version} is unknown", r.name),
            }
        })
        .collect();
    match (bad.is_empty(), st.engine_up) {
        (true, _) => None,
        (false, false) => Some(format!("{} (the container engine is down)", bad.join("; "))),
        (false, true) => Some(bad.join("; ")),
    }
}

fn recover(roles: &Roles, out: &mut dyn Write) -> Result<Exit, ServiceError> {
    for (role, r) in roles.recover()? {
        let words = match r {
            Recovery::Clean(Some(v)) => format!("nothing was interrupted; release {v} is up"),
            Recovery::Clean(None) => "nothing was interrupted; no release yet".into(),
            Recovery::KeptOld { interrupted, running } => {
                format!("the apply of {interrupted} was cut before the switch; {}", runs(&running))
            }
            Recovery::RolledBack { interrupted, running } => {
                format!("the apply of {interrupted} was cut and rolled back; {}", runs(&running))
            }
        };
        writeln!(out, "metrica: role {role}: {words}").context("writing the report")?;
    }
    if let Some(m) = safe_mode::read_marker(&roles.metrica_dir) {
        writeln!(out, "metrica: safe mode is on ({}): the safe-mode stack runs", m.reason)
            .context("writing the report")?;
    }
    Ok(Exit::Done)
}

fn safe_mode_line(marker: Option<&safe_mode::Marker>) -> String {
    match marker {
        Some(m) => format!("safe mode: ON ({}, since {})", m.reason, crate::cli::utc(m.since)),
        None => "safe mode: off".into(),
    }
}

fn runs(v: &Option<semver::Version>) -> String {
    v.as_ref().map_or("no release runs".into(), |v| format!("release {v} runs"))
}

fn report_change(
    change: Option<&SafeModeChange>,
    roles: &Roles,
    json: bool,
    out: &mut dyn Write,
) -> Result<Exit> {
    let marker = safe_mode::read_marker(&roles.metrica_dir);
    if json {
        let doc = json!({
            "active": marker.is_some(), "marker": marker,
            "changed": change.map(change_words),
        });
        writeln!(out, "{doc}")?;
        return Ok(Exit::Done);
    }
    if let Some(c) = change {
        writeln!(out, "metrica: safe mode {}", change_words(c))?;
    }
    writeln!(out, "{}", safe_mode_line(marker.as_ref()))?;
    Ok(Exit::Done)
}

/// The apply's steps: JSON log lines (stderr or --log-file), and on a terminal a spinner
/// with the current step.
struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    fn new() -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let pb = ProgressBar::new_spinner();
            pb.set_style(
                ProgressStyle::with_template("{spinner} {elapsed} {msg}")
                    .expect("a valid template"),
            );
            pb.enable_steady_tick(std::time::Duration::from_millis(120));
            pb
        });
        Progress { bar }
    }

    fn event(&self, log: &Log, e: &Event) {
        let fields = json!({ "role": e.role, "version": e.version, "step": e.step });
        match &self.bar {
            Some(pb) => {
                pb.set_message(format!("role {} {}: {}: {}", e.role, e.version, e.step, e.msg));
                pb.suspend(|| log.line(e.level, "role", &e.msg, fields));
            }
            None => log.line(e.level, "role", &e.msg, fields),
        }
    }

    fn finish(&self) {
        if let Some(pb) = &self.bar {
            pb.finish_and_clear();
        }
    }
}

/// Tests of the real binary cut the power at a named step: `METRICA_FAILPOINT=role-up`
/// arms that failpoint (builds with failpoints only), and [`die_at_power_cut`] then ends the
/// process with SIGKILL where the step stopped, as a power cut would.
#[cfg(any(test, feature = "failpoints"))]
fn arm_failpoint_from_env() {
    if let Ok(name) = std::env::var("METRICA_FAILPOINT") {
        crate::failpoint::arm(&name, None);
    }
}

#[cfg(not(any(test, feature = "failpoints")))]
fn arm_failpoint_from_env() {}

#[cfg(any(test, feature = "failpoints"))]
fn die_at_power_cut(e: &ServiceError) {
    let ServiceError::Other(e) = e else { return };
    if e.chain().any(|c| c.downcast_ref::<crate::failpoint::PowerCut>().is_some()) {
        eprintln!("updater: {e:#}: SIGKILL");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

#[cfg(not(any(test, feature = "failpoints")))]
fn die_at_power_cut(_: &ServiceError) {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::role::apply::ApplyError;
    use clap::Parser;

    /// Runs `updater --data-dir TMP/data ARGS...` in-process; the exit code or the error.
    fn run_args(dir: &Path, args: &[&str]) -> (Result<Exit, ServiceError>, String) {
        let data = dir.join("data");
        let mut argv = vec!["updater", "--data-dir", data.to_str().unwrap(), "--sysroot"];
        argv.push(dir.to_str().unwrap());
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).unwrap();
        let crate::cli::Command::Role { options, command } = &cli.command else {
            panic!("not a role command")
        };
        let mut out = Vec::new();
        let r = run(&cli, options, Which::Role(command), &mut out);
        (r, String::from_utf8(out).unwrap())
    }

    fn error(r: Result<Exit, ServiceError>) -> (Exit, String) {
        let e = r.unwrap_err();
        (Exit::of_error(&e), format!("{e:#}"))
    }

    #[test]
    fn bad_sources_and_names_are_refused_with_what_was_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let server = crate::testserver::TestServer::empty(crate::testserver::Mode::Normal);
        let url = server.url_of("/roles/web-1.0.0.mfr");
        let (code, msg) = error(run_args(d, &["role", "apply", &url]).0);
        assert_eq!(code, Exit::Failed);
        assert!(msg.starts_with(&format!("downloading {url}: ")), "{msg}");
        let download = d.join("data/metrica").join(CLI_DOWNLOAD);
        assert!(!download.exists(), "nothing is left of a failed download");
        let (code, msg) = error(run_args(d, &["role", "apply", "/nonexistent/web-1.0.0.mfr"]).0);
        assert_eq!(code, Exit::Failed);
        assert!(msg.starts_with("reading the source /nonexistent/web-1.0.0.mfr: "), "{msg}");
        let (code, msg) = error(
            run_args(d, &["role", "apply", "--os-version", "1.0.0", "--role", "Web!", "."]).0,
        );
        assert_eq!((code, msg.as_str()), (Exit::Refused, "\"Web!\" is not a valid role name"));
        // The OS version: neither --os-version nor the release file under --sysroot.
        let folder = d.join("release");
        std::fs::create_dir_all(&folder).unwrap();
        let (code, msg) = error(run_args(d, &["role", "apply", folder.to_str().unwrap()]).0);
        assert_eq!(code, Exit::Failed);
        assert!(msg.contains("the OS version: /etc/metrica/release.toml under"), "{msg}");
        assert!(msg.contains("--os-version"), "{msg}");
    }

    #[test]
    fn the_role_check_passes_only_when_every_released_role_is_healthy() {
        use crate::role::service::RoleStatus;
        let role = |name: &str, current: Option<&str>, healthy: Option<bool>| RoleStatus {
            name: name.into(),
            current: current.map(str::to_string),
            previous: None,
            committed: current.map(str::to_string),
            pending: None,
            failed: vec![],
            consecutive_failures: 0,
            rollbacks_total: 0,
            last_error: None,
            containers: None,
            checks: None,
            healthy,
        };
        let status = |roles, engine_up, safe: bool| RolesStatus {
            roles,
            safe_mode: safe
                .then_some(safe_mode::Marker { reason: safe_mode::Reason::Operator, since: 1 }),
            engine_up,
        };
        let check = |st: RolesStatus| roles_unhealthy(&st);
        assert_eq!(check(status(vec![], true, false)), None, "no role");
        assert_eq!(check(status(vec![role("cam", None, None)], false, false)), None, "no release");
        assert_eq!(check(status(vec![role("cam", Some("1.0.0"), Some(true))], true, false)), None);
        assert_eq!(
            check(status(vec![role("cam", Some("1.0.0"), Some(false))], true, false)).as_deref(),
            Some("role cam 1.0.0 is not healthy")
        );
        assert_eq!(
            check(status(vec![role("cam", Some("1.0.0"), None)], false, false)).as_deref(),
            Some("the health of role cam 1.0.0 is unknown (the container engine is down)")
        );
        // Safe mode: the role is stopped on purpose.
        assert_eq!(check(status(vec![role("cam", Some("1.0.0"), Some(false))], true, true)), None);
    }

    #[test]
    fn a_release_folder_without_role_toml_is_refused_with_exit_code_3() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("release");
        std::fs::create_dir_all(&folder).unwrap();
        let args = ["role", "apply", "--os-version", "1.0.0", "--min-free-mib", "0"];
        let mut args = args.to_vec();
        args.push(folder.to_str().unwrap());
        let (r, out) = run_args(dir.path(), &args);
        assert_eq!(r.unwrap(), Exit::Refused);
        assert!(
            out.starts_with("metrica: role release: refused: invalid role description: "),
            "{out}"
        );
        assert!(out.contains("role.toml"), "{out}");
    }

    #[test]
    fn outcomes_have_their_exit_codes_and_json() {
        let v = |s: &str| s.parse::<semver::Version>().unwrap();
        let cases = [
            (Outcome::Committed { version: v("1.1.0"), previous: Some(v("1.0.0")) }, Exit::Done,
             "metrica: role web: committed 1.1.0 (previous 1.0.0)\n"),
            (Outcome::AlreadyCurrent(v("1.1.0")), Exit::Done, "metrica: role web: already-current 1.1.0\n"),
            (Outcome::Refused { error: ApplyError::FailedBefore(v("2.0.0")), recorded: false }, Exit::Refused,
             "metrica: role web: refused: release 2.0.0 failed before and is not applied again unless forced\n"),
            (Outcome::RolledBack { version: v("2.0.0"), error: ApplyError::Probation("restarted".into()), restored: Some(v("1.1.0")) },
             Exit::RolledBack, "metrica: role web: rolled-back 2.0.0 (1.1.0 runs again): probation: restarted\n"),
        ];
        for (outcome, code, text) in cases {
            let a = Applied { role: "web".into(), outcome, safe_mode: None };
            let mut out = Vec::new();
            assert_eq!(report_applied(&a, false, &mut out).unwrap(), code);
            assert_eq!(String::from_utf8(out).unwrap(), text);
            let mut out = Vec::new();
            report_applied(&a, true, &mut out).unwrap();
            let doc: serde_json::Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(
                (doc["role"].as_str(), doc["exit_code"].as_u64()),
                (Some("web"), Some(code as u64))
            );
        }
        let entered = Applied {
            role: "web".into(),
            outcome: Outcome::RolledBack {
                version: v("2.0.0"),
                error: ApplyError::Interrupted(v("2.0.0")),
                restored: None,
            },
            safe_mode: Some(SafeModeChange::Entered(safe_mode::Reason::FailedUpdates { count: 3 })),
        };
        let mut out = Vec::new();
        report_applied(&entered, false, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.ends_with("metrica: safe mode entered: 3 consecutive failed role updates\n"),
            "{text}"
        );
        let busy = ServiceError::Busy(crate::slot::LockBusy("/data/metrica/lock".into()));
        let space = ServiceError::NoSpace { dir: "/data/metrica".into(), free: 1, need: 2 };
        assert_eq!((Exit::of_error(&busy), Exit::of_error(&space)), (Exit::Busy, Exit::NoSpace));
    }
}
