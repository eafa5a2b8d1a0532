//! Running external tools: every child is logged and a failure carries its stderr.

use anyhow::{bail, Context, Result};
use std::process::{Command, Output};

pub trait CommandExt {
    /// Runs the command to completion; fails with its stderr when it exits non-zero.
    fn run_checked(&mut self) -> Result<Output>;
}

impl CommandExt for Command {
    fn run_checked(&mut self) -> Result<Output> {
        let program = self.get_program().to_string_lossy().into_owned();
        let line = std::iter::once(program.clone())
            .chain(self.get_args().map(|a| a.to_string_lossy().into_owned()))
            .collect::<Vec<_>>()
            .join(" ");
        log::debug!("running {line}");
        let out = self.output().with_context(|| format!("running {program} (is it installed?)"))?;
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
