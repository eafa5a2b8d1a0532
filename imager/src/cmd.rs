//! Running external tools: every child is logged at debug level (shown with
//! `IMAGER_LOG=debug`, see [`crate::logger`]) and a failure carries its stderr.

use anyhow::{bail, Context, Result};
use std::process::{Command, Output};

pub trait CommandExt {
    /// The command line: the program and its arguments, space-separated.
    fn line(&self) -> String;

    /// Logs the command line at debug level; for a child started with `spawn` or `output`.
    fn logged(&mut self) -> &mut Self;

    /// Runs the command to completion; fails with its stderr when it exits non-zero.
    fn run_checked(&mut self) -> Result<Output>;
}

impl CommandExt for Command {
    fn line(&self) -> String {
        std::iter::once(self.get_program())
            .chain(self.get_args())
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn logged(&mut self) -> &mut Self {
        log::debug!("running {}", self.line());
        self
    }

    fn run_checked(&mut self) -> Result<Output> {
        let program = self.get_program().to_string_lossy().into_owned();
        let line = self.line();
        let out = self
            .logged()
            .output()
            .with_context(|| format!("running {program} (is it installed?)"))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            bail!("{line} failed ({}): {}", out.status, stderr.trim());
        }
        Ok(out)
    }
}

/// Finds a tool on PATH, or in /usr/sbin and /sbin, which are not on an unprivileged user's
/// PATH on Debian (mke2fs and debugfs live there).
pub fn tool(name: &str) -> std::path::PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].iter().map(std::path::PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| std::path::PathBuf::from(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records every log line (the logger of this test binary; nothing else installs one).
    struct Capture(std::sync::Mutex<Vec<String>>);

    impl log::Log for Capture {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, record: &log::Record<'_>) {
            self.0.lock().unwrap().push(crate::logger::line(record));
        }
        fn flush(&self) {}
    }

    static CAPTURE: Capture = Capture(std::sync::Mutex::new(Vec::new()));

    /// The promise of this module: the child's command line is logged, and a failing child's
    /// stderr is in the error.
    #[test]
    fn a_failing_child_is_logged_and_its_stderr_reaches_the_error() {
        log::set_logger(&CAPTURE).expect("no other logger in this test binary");
        log::set_max_level(log::LevelFilter::Debug);
        let e = Command::new("sh")
            .args(["-c", "echo disk full >&2; exit 4"])
            .run_checked()
            .unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains("disk full") && e.contains("exit status: 4"), "{e}");
        let logged = CAPTURE.0.lock().unwrap().clone();
        assert!(
            logged.contains(&"imager: debug: running sh -c echo disk full >&2; exit 4".to_string()),
            "{logged:?}"
        );
    }

    #[test]
    fn failure_carries_stderr() {
        let e = Command::new("sh").args(["-c", "echo boom >&2; exit 3"]).run_checked().unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains("boom") && e.contains("exit status: 3"), "{e}");
        assert!(Command::new("/nonexistent-tool").run_checked().is_err());
        let out = Command::new("sh").args(["-c", "echo ok"]).run_checked().unwrap();
        assert_eq!(out.stdout, b"ok\n");
    }
}
