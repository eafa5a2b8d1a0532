//! Health checks of a trial boot: what must hold before a slot is committed.
//!
//! Built in: the updater itself is up (it runs and can read its own state folder), `/data` is
//! mounted read-write (a test file is written, fsynced, read back and removed), and the clock
//! is sane (not before the build's `SOURCE_DATE_EPOCH`). Extra checks are executables in a
//! folder (default `/etc/metrica/health.d`), each named by its file name, run with a timeout;
//! exit status 0 passes.
//!
//! [`wait_healthy`] runs every check, and runs the failing ones again every few seconds until
//! all pass or the deadline (default 5 minutes, on the monotonic clock) passes. A check that
//! cannot get better by waiting (a read-only `/data`) fails at once.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Default time a trial boot has to pass its checks.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(300);
/// Pause between attempts: a trial is committed at most this long after its last failing
/// check passes (the role's, on a Pi image, as its containers come up with Docker). Each
/// attempt runs only the checks still failing, and they are cheap (`docker info`,
/// `updater role status --check`); 5 s cost the QEMU Pi image's trial boot up to 5 s.
pub const RETRY_EVERY: Duration = Duration::from_secs(2);

/// Why a check failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckError {
    /// May pass later (clock not yet set, a service still starting).
    NotYet(String),
    /// Will not pass by waiting.
    Fatal(String),
}

impl CheckError {
    pub fn detail(&self) -> &str {
        match self {
            CheckError::NotYet(d) | CheckError::Fatal(d) => d,
        }
    }
}

/// One named health check.
pub trait Check {
    fn name(&self) -> String;
    fn run(&self) -> Result<(), CheckError>;
}

/// The updater is up: it runs (this code) and its state folder is readable.
#[derive(Debug)]
pub struct UpdaterUp {
    pub state_dir: PathBuf,
}

impl Check for UpdaterUp {
    fn name(&self) -> String {
        "updater-up".into()
    }
    fn run(&self) -> Result<(), CheckError> {
        std::fs::read_dir(&self.state_dir)
            .map(drop)
            .map_err(|e| CheckError::NotYet(format!("{}: {e}", self.state_dir.display())))
    }
}

/// `/data` is mounted read-write: a file can be written, synced, read back and removed.
#[derive(Debug)]
pub struct DataWritable {
    pub data_dir: PathBuf,
}

impl Check for DataWritable {
    fn name(&self) -> String {
        "data-writable".into()
    }
    fn run(&self) -> Result<(), CheckError> {
        let path = self.data_dir.join("metrica").join(".health-check");
        let fail = |what: &str, e: std::io::Error| {
            let detail = format!("{what} {}: {e}", path.display());
            if e.raw_os_error() == Some(libc::EROFS) {
                CheckError::Fatal(detail)
            } else {
                CheckError::NotYet(detail)
            }
        };
        let token = format!("metrica health {}\n", std::process::id());
        let mut f = std::fs::File::create(&path).map_err(|e| fail("creating", e))?;
        f.write_all(token.as_bytes()).map_err(|e| fail("writing", e))?;
        f.sync_all().map_err(|e| fail("syncing", e))?;
        let mut back = String::new();
        std::fs::File::open(&path)
            .and_then(|mut f| f.read_to_string(&mut back))
            .map_err(|e| fail("reading", e))?;
        std::fs::remove_file(&path).map_err(|e| fail("removing", e))?;
        if back != token {
            return Err(CheckError::Fatal(format!("{} read back different bytes", path.display())));
        }
        Ok(())
    }
}

/// The wall clock is not before `not_before` (the build's epoch).
pub struct ClockSane {
    pub not_before: u64,
    pub now: Box<dyn Fn() -> u64>,
}

impl Check for ClockSane {
    fn name(&self) -> String {
        "clock-sane".into()
    }
    fn run(&self) -> Result<(), CheckError> {
        let now = (self.now)();
        if now < self.not_before {
            return Err(CheckError::NotYet(format!(
                "clock reads {now}, before the build epoch {}",
                self.not_before
            )));
        }
        Ok(())
    }
}

/// An executable check; passes when it exits 0 within `timeout`.
#[derive(Debug)]
pub struct CommandCheck {
    pub path: PathBuf,
    pub timeout: Duration,
}

impl Check for CommandCheck {
    fn name(&self) -> String {
        self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    }
    fn run(&self) -> Result<(), CheckError> {
        let mut child = std::process::Command::new(&self.path)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| CheckError::NotYet(format!("starting {}: {e}", self.path.display())))?;
        let start = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => {
                    return Err(CheckError::NotYet(format!("exited with {status}")))
                }
                Ok(None) if start.elapsed() >= self.timeout => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(CheckError::NotYet(format!(
                        "no answer within {} s",
                        self.timeout.as_secs()
                    )));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(CheckError::NotYet(format!("waiting: {e}"))),
            }
        }
    }
}

/// The executables in `dir`, sorted by name, as checks. A missing folder means none.
pub fn extra_checks(dir: &Path, timeout: Duration) -> Vec<CommandCheck> {
    use std::os::unix::fs::PermissionsExt;
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .collect();
    paths.sort();
    paths.into_iter().map(|path| CommandCheck { path, timeout }).collect()
}

/// Time as the health wait sees it: monotonic, and fakeable.
pub trait Timer {
    fn elapsed(&self) -> Duration;
    fn sleep(&self, d: Duration);
}

/// The real monotonic clock.
#[derive(Debug)]
pub struct SystemTimer(pub Instant);

impl Timer for SystemTimer {
    fn elapsed(&self) -> Duration {
        self.0.elapsed()
    }
    fn sleep(&self, d: Duration) {
        std::thread::sleep(d);
    }
}

/// The outcome of [`wait_healthy`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Passed {
        after: Duration,
    },
    /// A check failed in a way waiting cannot fix.
    Failed {
        check: String,
    },
    /// The deadline passed; `failing` names each failing check and why.
    DeadlinePassed {
        failing: String,
    },
}

/// Runs the checks until all pass or the deadline passes.
pub fn wait_healthy(checks: &[&dyn Check], deadline: Duration, timer: &dyn Timer) -> Verdict {
    let mut pending: Vec<&dyn Check> = checks.to_vec();
    loop {
        let mut failing = Vec::new();
        let mut still = Vec::new();
        for c in pending {
            match c.run() {
                Ok(()) => {}
                Err(CheckError::Fatal(d)) => {
                    return Verdict::Failed { check: format!("{}: {d}", c.name()) }
                }
                Err(CheckError::NotYet(d)) => {
                    failing.push(format!("{}: {d}", c.name()));
                    still.push(c);
                }
            }
        }
        if still.is_empty() {
            return Verdict::Passed { after: timer.elapsed() };
        }
        let left = deadline.saturating_sub(timer.elapsed());
        if left.is_zero() {
            return Verdict::DeadlinePassed { failing: failing.join("; ") };
        }
        timer.sleep(left.min(RETRY_EVERY));
        pending = still;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    struct FakeTimer(Cell<Duration>);
    impl Timer for FakeTimer {
        fn elapsed(&self) -> Duration {
            self.0.get()
        }
        fn sleep(&self, d: Duration) {
            self.0.set(self.0.get() + d);
        }
    }

    /// Fails `n` times, then passes.
    struct Flaky {
        left: Cell<u32>,
        fatal: bool,
    }
    impl Check for Flaky {
        fn name(&self) -> String {
            "flaky".into()
        }
        fn run(&self) -> Result<(), CheckError> {
            if self.left.get() == 0 {
                return Ok(());
            }
            self.left.set(self.left.get() - 1);
            if self.fatal {
                Err(CheckError::Fatal("broken".into()))
            } else {
                Err(CheckError::NotYet("not yet".into()))
            }
        }
    }

    fn timer() -> FakeTimer {
        FakeTimer(Cell::new(Duration::ZERO))
    }

    #[test]
    fn passes_when_checks_pass_within_the_deadline() {
        let f = Flaky { left: Cell::new(3), fatal: false };
        let t = timer();
        assert_eq!(
            wait_healthy(&[&f], DEFAULT_DEADLINE, &t),
            Verdict::Passed { after: RETRY_EVERY * 3 }
        );
    }

    #[test]
    fn names_what_still_fails_at_the_deadline() {
        let f = Flaky { left: Cell::new(1000), fatal: false };
        let clock = ClockSane { not_before: 100, now: Box::new(|| 5) };
        let t = timer();
        let v = wait_healthy(&[&clock, &f], Duration::from_secs(12), &t);
        assert_eq!(
            v,
            Verdict::DeadlinePassed {
                failing: "clock-sane: clock reads 5, before the build epoch 100; flaky: not yet"
                    .into()
            }
        );
        assert_eq!(t.elapsed(), Duration::from_secs(12));
    }

    #[test]
    fn a_fatal_failure_does_not_wait() {
        let f = Flaky { left: Cell::new(1), fatal: true };
        let t = timer();
        assert_eq!(
            wait_healthy(&[&f], DEFAULT_DEADLINE, &t),
            Verdict::Failed { check: "flaky: broken".into() }
        );
        assert_eq!(t.elapsed(), Duration::ZERO);
    }

    #[test]
    fn built_in_checks_on_a_real_folder() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("metrica")).unwrap();
        let data = DataWritable { data_dir: dir.path().to_path_buf() };
        assert_eq!(data.run(), Ok(()));
        assert!(!dir.path().join("metrica/.health-check").exists());
        let up = UpdaterUp { state_dir: dir.path().join("metrica") };
        assert_eq!(up.run(), Ok(()));
        let gone = DataWritable { data_dir: dir.path().join("missing") };
        assert!(matches!(gone.run(), Err(CheckError::NotYet(d)) if d.contains("creating")));
        let clock = ClockSane { not_before: 10, now: Box::new(|| 10) };
        assert_eq!(clock.run(), Ok(()));
    }

    #[test]
    fn command_checks_from_a_folder() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, body: &str, mode: u32| {
            let p = dir.path().join(name);
            std::fs::write(&p, body).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        write("10-ok", "#!/bin/sh\nexit 0\n", 0o755);
        write("20-fails", "#!/bin/sh\nexit 3\n", 0o755);
        write("30-hangs", "#!/bin/sh\nsleep 5\n", 0o755);
        write("README", "not a check", 0o644);
        let checks = extra_checks(dir.path(), Duration::from_millis(200));
        let names: Vec<String> = checks.iter().map(|c| c.name()).collect();
        assert_eq!(names, ["10-ok", "20-fails", "30-hangs"]);
        assert_eq!(checks[0].run(), Ok(()));
        assert!(checks[1].run().unwrap_err().detail().contains("exit status: 3"));
        assert!(checks[2].run().unwrap_err().detail().contains("no answer"));
        assert!(extra_checks(&dir.path().join("none"), Duration::from_secs(1)).is_empty());
    }
}
