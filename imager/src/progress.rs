//! Progress for long steps: indicatif bars on a terminal, plain lines otherwise.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::Instant;

/// How progress is shown for one run.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    mode: Mode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Bars,
    Lines,
    Quiet,
}

impl Progress {
    /// Bars when stderr is a terminal, plain lines otherwise.
    pub fn detect() -> Progress {
        let mode = if std::io::stderr().is_terminal() { Mode::Bars } else { Mode::Lines };
        Progress { mode }
    }

    /// No output (tests).
    pub fn quiet() -> Progress {
        Progress { mode: Mode::Quiet }
    }

    /// A step of `len` units (bytes when `bytes` is used, else items).
    pub fn bar(&self, len: u64, msg: &str) -> Step {
        self.step(len, msg, false)
    }

    /// A step measured in bytes.
    pub fn bytes(&self, len: u64, msg: &str) -> Step {
        self.step(len, msg, true)
    }

    /// A step of unknown length (a spinner whose message [`Step::message`] updates).
    pub fn spinner(&self, msg: &str) -> Step {
        self.start(msg, || {
            let pb = ProgressBar::new_spinner();
            pb.set_style(
                ProgressStyle::with_template("{spinner} {prefix} [{elapsed}] {wide_msg}")
                    .expect("valid template"),
            );
            pb.set_prefix(msg.to_string());
            pb.enable_steady_tick(std::time::Duration::from_millis(200));
            pb
        })
    }

    fn step(&self, len: u64, msg: &str, bytes: bool) -> Step {
        self.start(msg, || {
            let pb = ProgressBar::new(len);
            let template = if bytes {
                "{msg:>24} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}"
            } else {
                "{msg:>24} [{bar:30}] {pos}/{len} {eta}"
            };
            pb.set_style(
                ProgressStyle::with_template(template)
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            pb.set_message(msg.to_string());
            pb
        })
    }

    /// A step: `bar` makes its indicatif bar on a terminal; plain mode prints `msg...`.
    fn start(&self, msg: &str, bar: impl FnOnce() -> ProgressBar) -> Step {
        let bar = match self.mode {
            Mode::Bars => Some(bar()),
            Mode::Lines => {
                eprintln!("{msg}...");
                None
            }
            Mode::Quiet => None,
        };
        Step { bar, msg: msg.to_string(), mode: self.mode, start: Instant::now() }
    }

    /// A one-off line (plain in every mode but quiet).
    pub fn line(&self, msg: &str) {
        if self.mode != Mode::Quiet {
            eprintln!("{msg}");
        }
    }
}

/// One running step.
#[derive(Debug)]
pub struct Step {
    bar: Option<ProgressBar>,
    msg: String,
    mode: Mode,
    start: Instant,
}

impl Step {
    pub fn inc(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
    }

    pub fn set(&self, pos: u64) {
        if let Some(b) = &self.bar {
            b.set_position(pos);
        }
    }

    /// Shows `msg` beside a spinner (nothing in plain or quiet mode).
    pub fn message(&self, msg: &str) {
        if let Some(b) = &self.bar {
            b.set_message(msg.to_string());
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        if self.mode != Mode::Quiet {
            eprintln!("{} done in {:.1} s", self.msg, self.start.elapsed().as_secs_f64());
        }
    }
}
