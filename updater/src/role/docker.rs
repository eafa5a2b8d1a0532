//! [`Engine`] on the real Docker engine, through the `docker` CLI and its Compose v2 plugin.
//!
//! Every call is one child process with a time limit; a failure carries the command line and
//! the end of its stderr. Nothing here pulls: the roles' images are pinned and loaded from
//! their bundle, and `up` runs with `--pull never`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::engine::{
    parse_inspect, parse_ps, ComposeModel, Container, Engine, EngineError, ExecOutput, Inspected,
    Project,
};

/// How much of a failed command's stderr an error keeps (its end, where the reason is).
const STDERR_TAIL: usize = 2000;

/// The `docker` CLI.
#[derive(Debug, Clone)]
pub struct DockerCli {
    /// The `docker` program.
    pub program: PathBuf,
    /// Limit of the calls that have no limit of their own (load, config, ps, down, inspect).
    pub timeout: Duration,
}

impl Default for DockerCli {
    fn default() -> Self {
        DockerCli { program: PathBuf::from("docker"), timeout: Duration::from_secs(300) }
    }
}

/// A finished child process.
struct Finished {
    status: Option<i32>,
    stdout: String,
    stderr: String,
}

impl DockerCli {
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.program);
        c.args(args);
        c
    }

    fn compose(&self, p: &Project, args: &[&str]) -> Command {
        let mut c = Command::new(&self.program);
        c.args(["compose", "--project-name", &p.name, "--project-directory"]).arg(&p.dir);
        for f in &p.files {
            c.arg("--file").arg(f);
        }
        c.args(args);
        c
    }

    fn checked(&self, cmd: Command, timeout: Duration) -> Result<String, EngineError> {
        run_checked(cmd, timeout)
    }
}

impl Engine for DockerCli {
    fn load_images(&self, archive: &Path) -> Result<(), EngineError> {
        let mut c = self.command(&["load", "--quiet", "--input"]);
        c.arg(archive);
        self.checked(c, self.timeout).map(drop)
    }

    fn image_present(&self, reference: &str) -> Result<bool, EngineError> {
        let out =
            self.checked(self.command(&["image", "ls", "--quiet", reference]), self.timeout)?;
        Ok(!out.trim().is_empty())
    }

    fn config_check(&self, project: &Project) -> Result<(), EngineError> {
        self.checked(self.compose(project, &["config", "--quiet"]), self.timeout).map(drop)
    }

    fn config(&self, project: &Project) -> Result<ComposeModel, EngineError> {
        let cmd = self.compose(project, &["config", "--format", "json"]);
        let line = describe(&cmd);
        let out = self.checked(cmd, self.timeout)?;
        serde_json::from_str(&out)
            .map_err(|e| EngineError::Output { command: line, detail: e.to_string() })
    }

    fn up(&self, project: &Project, wait_timeout: Duration) -> Result<(), EngineError> {
        let secs = wait_timeout.as_secs().max(1).to_string();
        let args = [
            "up",
            "--detach",
            "--remove-orphans",
            "--pull",
            "never",
            "--wait",
            "--wait-timeout",
            &secs,
        ];
        // The engine's own limit plus a margin for creating the containers.
        self.checked(self.compose(project, &args), wait_timeout + Duration::from_secs(60)).map(drop)
    }

    fn ps(&self, project: &Project) -> Result<Vec<Container>, EngineError> {
        let cmd = self.compose(project, &["ps", "--all", "--format", "json"]);
        let line = describe(&cmd);
        let out = self.checked(cmd, self.timeout)?;
        parse_ps(&out).map_err(|detail| EngineError::Output { command: line, detail })
    }

    fn down(&self, project: &Project) -> Result<(), EngineError> {
        self.checked(self.compose(project, &["down", "--remove-orphans"]), self.timeout).map(drop)
    }

    fn inspect(&self, ids: &[String]) -> Result<Vec<Inspected>, EngineError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = self.command(&["inspect", "--type", "container"]);
        cmd.args(ids);
        let line = describe(&cmd);
        let out = self.checked(cmd, self.timeout)?;
        let mut found =
            parse_inspect(&out).map_err(|detail| EngineError::Output { command: line, detail })?;
        // Answer with the ids as asked (`ps` gives short ones, `inspect` full ones).
        for i in &mut found {
            if let Some(asked) = ids.iter().find(|a| i.id.starts_with(a.as_str())) {
                i.id.clone_from(asked);
            }
        }
        Ok(found)
    }

    fn exec(
        &self,
        project: &Project,
        service: &str,
        argv: &[String],
        timeout: Duration,
    ) -> Result<ExecOutput, EngineError> {
        let mut cmd = self.compose(project, &["exec", "-T", service]);
        cmd.args(argv);
        let done = run(cmd, timeout)?;
        Ok(ExecOutput { status: done.status.unwrap_or(-1), stdout: done.stdout })
    }
}

/// Runs `cmd` to its end or its time limit and returns its stdout; a non-zero exit is an
/// error carrying the end of its stderr.
pub(crate) fn run_checked(cmd: Command, timeout: Duration) -> Result<String, EngineError> {
    let line = describe(&cmd);
    let done = run(cmd, timeout)?;
    match done.status {
        Some(0) => Ok(done.stdout),
        status => Err(EngineError::Failed {
            command: line,
            status: status.map_or("killed by a signal".into(), |s| format!("exit status {s}")),
            stderr: tail(&done.stderr),
        }),
    }
}

/// Runs a child with piped output, reading both pipes on helper threads so neither fills;
/// kills it at `timeout`.
fn run(mut cmd: Command, timeout: Duration) -> Result<Finished, EngineError> {
    let line = describe(&cmd);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| EngineError::Unavailable(format!("{line}: {e}")))?;
    let out = child.stdout.take().map(read_all);
    let err = child.stderr.take().map(read_all);
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if started.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(EngineError::Timeout { command: line, timeout });
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(EngineError::Unavailable(format!("{line}: {e}"))),
        }
    };
    let joined = |h: Option<std::thread::JoinHandle<String>>| {
        h.and_then(|h| h.join().ok()).unwrap_or_default()
    };
    Ok(Finished { status: status.code(), stdout: joined(out), stderr: joined(err) })
}

fn read_all(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// The command line, for errors.
fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn tail(stderr: &str) -> String {
    let t = stderr.trim();
    let cut = t.len().saturating_sub(STDERR_TAIL);
    let start = (cut..=t.len()).find(|&i| t.is_char_boundary(i)).unwrap_or(t.len());
    t[start..].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_command_carries_its_stderr_and_status() {
        let cli = DockerCli { program: "sh".into(), timeout: Duration::from_secs(5) };
        let e = cli
            .checked(
                cli.command(&["-c", "echo out; echo 'no such service' >&2; exit 3"]),
                cli.timeout,
            )
            .unwrap_err();
        assert_eq!(
            e,
            EngineError::Failed {
                command: "sh -c echo out; echo 'no such service' >&2; exit 3".into(),
                status: "exit status 3".into(),
                stderr: "no such service".into(),
            }
        );
        assert_eq!(cli.checked(cli.command(&["-c", "echo fine"]), cli.timeout).unwrap(), "fine\n");
    }

    #[test]
    fn a_hanging_command_is_killed_at_its_limit() {
        let cli = DockerCli { program: "sleep".into(), timeout: Duration::from_millis(200) };
        let t = Instant::now();
        let e = cli.checked(cli.command(&["30"]), cli.timeout).unwrap_err();
        assert!(matches!(e, EngineError::Timeout { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_missing_program_is_an_unavailable_engine() {
        let cli =
            DockerCli { program: "/nonexistent/docker".into(), timeout: Duration::from_secs(1) };
        assert!(matches!(cli.image_present("x"), Err(EngineError::Unavailable(_))));
    }

    #[test]
    fn compose_calls_name_the_project_its_folder_and_files() {
        let cli = DockerCli::default();
        let p = Project {
            name: "metrica-web".into(),
            dir: "/r/1.0.0".into(),
            files: vec!["/r/1.0.0/compose.yaml".into()],
        };
        assert_eq!(
            describe(&cli.compose(&p, &["ps"])),
            "docker compose --project-name metrica-web --project-directory /r/1.0.0 --file /r/1.0.0/compose.yaml ps"
        );
        let t = tail(&"é".repeat(3000));
        assert!(t.len() <= STDERR_TAIL && t.starts_with('é'), "{}", t.len());
    }
}
