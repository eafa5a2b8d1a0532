//! The A/B scenarios of issue 5 as a registry of named runs against images built into an image
//! folder. Each scenario copies the images it needs into its own work folder (sparse), drives
//! one or more harness runs, and checks the boot records. A scenario that is not written yet
//! is registered without a body and fails with "not implemented": never a silent pass.

use crate::cut::{CutPlan, Delay, Rng};
use crate::flows::{
    bad_init, bad_kernel, first_boot, hang, power_cut_commit, power_cut_install, unhealthy,
    update_commit,
};
use crate::harness::{self, BootRecord, Director, Echo, Options, RunEnd, Timeouts};
use crate::machine::MachineConfig;
use anyhow::{bail, Context as _, Result};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The console line of a healthy device: the QEMU image's `/sbin/init` prints it when
/// `updater boot` exits 0 (and `metrica-updater: unhealthy (exit N)` otherwise);
/// `--healthy-pattern` overrides it.
pub const DEFAULT_HEALTHY_PATTERN: &str = "metrica-updater: healthy";

/// What every scenario gets.
#[derive(Debug, Clone)]
pub struct Context {
    pub images: ImageSet,
    /// Each scenario gets a subfolder here for its disk copies and logs.
    pub work_dir: PathBuf,
    pub cuts: usize,
    pub qemu: PathBuf,
    pub memory_mib: u32,
    pub timeouts: Timeouts,
    pub echo: Echo,
    pub keep_logs: bool,
    pub healthy_pattern: String,
    pub seed: Option<u64>,
    /// The `imager` binary (`None`: found beside pi-qemu or in PATH).
    pub imager: Option<PathBuf>,
    /// The key that signs the fault bundles (`None`: keys/dev.key).
    pub signing_key: Option<PathBuf>,
}

/// The images and bundles found in the image folder, oldest version first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageSet {
    pub images: Vec<PathBuf>,
    pub bundles: Vec<PathBuf>,
}

impl ImageSet {
    /// Finds `*.img` and `*.mfb` files; names sort by their version numbers, so that
    /// `qemu-1.0.0.img` comes before `qemu-2.0.0.img` and `1.10` after `1.9`.
    pub fn find(dir: &Path) -> Result<ImageSet> {
        let mut set = ImageSet::default();
        for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            match path.extension().and_then(|e| e.to_str()) {
                Some("img") => set.images.push(path),
                Some("mfb") => set.bundles.push(path),
                _ => {}
            }
        }
        let key = |p: &PathBuf| version_key(&p.file_name().unwrap_or_default().to_string_lossy());
        set.images.sort_by_key(key);
        set.bundles.sort_by_key(key);
        Ok(set)
    }

    /// The oldest image (v1).
    pub fn v1(&self) -> Result<&Path> {
        match self.images.first() {
            Some(p) => Ok(p),
            None => bail!(
                "no *.img in the image folder (build it with the imager from recipes/qemu.toml)"
            ),
        }
    }

    /// The second oldest image (v2).
    pub fn v2(&self) -> Result<&Path> {
        match self.images.get(1) {
            Some(p) => Ok(p),
            None => bail!(
                "the image folder needs two versions (v1 and v2: imager build recipes/qemu.toml \
                 -o DIR, then again with --version 2.0.0); found {}",
                self.images.len()
            ),
        }
    }

    /// The signed bundle of v2 (the v2 image's name with `.mfb`).
    pub fn v2_bundle(&self) -> Result<PathBuf> {
        let b = self.v2()?.with_extension("mfb");
        if self.bundles.contains(&b) {
            Ok(b)
        } else {
            bail!("no bundle {} beside the v2 image", b.display())
        }
    }
}

/// Sort key: text with every digit run compared as a number.
fn version_key(name: &str) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut text = String::new();
    let mut chars = name.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            let mut n = c.to_digit(10).map_or(0, u64::from);
            while let Some(d) = chars.peek().and_then(|d| d.to_digit(10)) {
                n = n.saturating_mul(10).saturating_add(u64::from(d));
                chars.next();
            }
            out.push((std::mem::take(&mut text), n));
        } else {
            text.push(c);
        }
    }
    out.push((text, 0));
    out
}

/// The outcome of one scenario.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ScenarioReport {
    pub name: String,
    pub passed: bool,
    pub detail: String,
    pub boots: Vec<BootRecord>,
    pub elapsed_ms: u64,
    /// Kept logs (console.log, run.json) of the runs, when kept.
    pub logs: Vec<PathBuf>,
}

/// A scenario body: returns the boots it saw (and adds kept logs), or an error saying what
/// failed.
pub type Body = fn(&Context, &Path, &mut Vec<PathBuf>) -> Result<Done>;

/// What a passing scenario body returns.
#[derive(Debug, Clone, Default)]
pub struct Done {
    pub boots: Vec<BootRecord>,
    /// Shown after "passed" (for example what the power cuts hit).
    pub note: String,
}

impl From<Vec<BootRecord>> for Done {
    fn from(boots: Vec<BootRecord>) -> Done {
        Done { boots, note: String::new() }
    }
}

/// One registered scenario.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    pub name: &'static str,
    pub summary: &'static str,
    /// `None`: not implemented yet (the scenario fails).
    pub body: Option<Body>,
}

/// Every scenario of issue 5, in the order `all` runs them.
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "first-boot",
        summary: "fresh v1 image: boots slot A (partition 2) without tryboot and reports healthy",
        body: Some(first_boot),
    },
    Scenario {
        name: "update-commit",
        summary: "A -> B: install v2 from a second disk, tryboot into B, health checks pass, commit; next plain boot is B",
        body: Some(update_commit),
    },
    Scenario {
        name: "bad-kernel",
        summary: "B's kernel panics: the trial ends, the device is back on A, the rollback is recorded",
        body: Some(bad_kernel),
    },
    Scenario {
        name: "bad-init",
        summary: "B's init fails: kernel panic, back on A, the rollback is recorded",
        body: Some(bad_init),
    },
    Scenario {
        name: "hang",
        summary: "B's userspace hangs and stops feeding the watchdog: watchdog reset, back on A",
        body: Some(hang),
    },
    Scenario {
        name: "unhealthy",
        summary: "B's health checks fail: the updater reboots out of the trial by itself, back on A",
        body: Some(unhealthy),
    },
    Scenario {
        name: "power-cut-install",
        summary: "SIGKILL at random moments during an install (--cuts N): a good slot boots, a new install succeeds",
        body: Some(power_cut_install),
    },
    Scenario {
        name: "power-cut-commit",
        summary: "SIGKILL at random moments during a commit (--cuts N): a good slot boots, a new install succeeds",
        body: Some(power_cut_commit),
    },
    Scenario {
        name: "provision-grow",
        summary: "2 GiB image flashed to a 4 GiB card and provisioned: first boot grows /data to the card, applies host name and SSH keys; status reports the device_id",
        body: Some(crate::provisioning::provision_grow),
    },
    Scenario {
        name: "provision-cuts",
        summary: "power cuts across first boot of the provision-grow card (--cuts N): the next boot completes it, the GPT and /data stay sound",
        body: Some(crate::provisioning::provision_cuts),
    },
];

/// Looks a scenario up by name.
pub fn find(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.name == name)
}

/// Runs one scenario; never panics on a failing body, and always gives a report.
pub fn run(scenario: &Scenario, ctx: &Context) -> ScenarioReport {
    let started = Instant::now();
    let mut logs = Vec::new();
    let (passed, detail, boots) = match scenario.body {
        None => (false, "not implemented yet".to_string(), Vec::new()),
        Some(body) => {
            let dir = ctx.work_dir.join(scenario.name);
            let result = std::fs::create_dir_all(&dir)
                .with_context(|| format!("creating {}", dir.display()))
                .and_then(|()| body(ctx, &dir, &mut logs));
            match result {
                Ok(Done { boots, note }) if note.is_empty() => (true, "passed".to_string(), boots),
                Ok(Done { boots, note }) => (true, format!("passed: {note}"), boots),
                Err(e) => (false, format!("{e:#}"), Vec::new()),
            }
        }
    };
    ScenarioReport {
        name: scenario.name.to_string(),
        passed,
        detail,
        boots,
        elapsed_ms: started.elapsed().as_millis() as u64,
        logs,
    }
}

/// Harness options for a disk copy in a scenario's folder.
pub fn options(ctx: &Context, disk: &Path, dir: &Path, run_name: &str) -> Options {
    let mut machine = MachineConfig::new(disk);
    machine.qemu = ctx.qemu.clone();
    machine.memory_mib = ctx.memory_mib;
    let mut o = Options::new(machine);
    o.timeouts = ctx.timeouts;
    o.echo = ctx.echo;
    o.seed = ctx.seed;
    o.keep_logs = ctx.keep_logs;
    o.log_dir = Some(dir.join(run_name));
    o.ready_pattern = Some(ctx.healthy_pattern.clone());
    o
}

/// Copies an image, leaving holes where the source has 1 MiB runs of zeros.
pub fn sparse_copy(from: &Path, to: &Path) -> Result<()> {
    const CHUNK: usize = 1024 * 1024;
    let mut src = File::open(from).with_context(|| format!("opening {}", from.display()))?;
    let len = src.metadata()?.len();
    let mut dst = File::create(to).with_context(|| format!("creating {}", to.display()))?;
    let mut buf = vec![0u8; CHUNK];
    let mut offset = 0u64;
    while offset < len {
        let n = (len - offset).min(CHUNK as u64) as usize;
        src.read_exact(&mut buf[..n]).with_context(|| format!("reading {}", from.display()))?;
        if buf[..n].iter().any(|b| *b != 0) {
            dst.seek(SeekFrom::Start(offset))?;
            dst.write_all(&buf[..n]).with_context(|| format!("writing {}", to.display()))?;
        }
        offset += n as u64;
    }
    dst.set_len(len)?;
    dst.sync_all()?;
    Ok(())
}

/// A series of power-cut runs: each on a fresh copy of a template disk, with one cut a random
/// delay in `window` after the first console line containing `cut_on`.
#[derive(Debug, Clone)]
pub struct CutSeries {
    pub runs: usize,
    pub cut_on: String,
    pub window: Delay,
    /// Only cut in this boot of each run.
    pub boot: Option<usize>,
    pub extra_disks: Vec<PathBuf>,
}

/// Runs a [`CutSeries`]. `director(i)` drives run `i` (it sees the boots after the cut too, and
/// stops the run when the device has shown what the scenario needs); `check(i, report)` judges
/// it. Run `i` uses seed `ctx.seed + i`, so a failing cut is replayed by its seed (printed).
/// A run whose cut never fired is a failure: a power-cut test that cut nothing proves nothing.
pub fn cut_series(
    ctx: &Context,
    dir: &Path,
    template: &Path,
    series: &CutSeries,
    director: &mut dyn FnMut(usize) -> Box<dyn Director>,
    check: &mut dyn FnMut(usize, &harness::RunReport) -> Result<()>,
) -> Result<Vec<BootRecord>> {
    let base_seed = ctx.seed.unwrap_or_else(Rng::clock_seed);
    let mut boots = Vec::new();
    for i in 0..series.runs {
        let run_dir = dir.join(format!("cut-{:03}", i + 1));
        std::fs::create_dir_all(&run_dir)
            .with_context(|| format!("creating {}", run_dir.display()))?;
        let disk = run_dir.join("disk.img");
        sparse_copy(template, &disk)?;
        let mut o = options(ctx, &disk, &run_dir, "run");
        o.machine.extra_disks.clone_from(&series.extra_disks);
        o.seed = Some(base_seed.wrapping_add(i as u64));
        o.cuts.push(CutPlan {
            on: Some(series.cut_on.clone()),
            boot: series.boot,
            delay: series.window,
        });
        let report = harness::run(&o, director(i).as_mut())
            .with_context(|| format!("power cut {} of {}", i + 1, series.runs))?;
        let judged = if !report.boots.iter().any(|b| b.reset.as_deref() == Some("power cut")) {
            Err(anyhow::anyhow!(
                "the cut never fired ({:?} never appeared on the console)",
                series.cut_on
            ))
        } else if let RunEnd::Failed(f) = &report.end {
            Err(anyhow::anyhow!("{f}"))
        } else {
            check(i, &report)
        };
        if let Err(e) = judged {
            bail!(
                "power cut {} of {} (seed {}): {e:#}; log {}",
                i + 1,
                series.runs,
                report.seed,
                report.console_log.display()
            );
        }
        boots.extend(report.boots);
        if !ctx.keep_logs {
            std::fs::remove_dir_all(&run_dir)
                .with_context(|| format!("removing {}", run_dir.display()))?;
        }
    }
    Ok(boots)
}

/// Prints one line per scenario and the total time; returns whether all passed.
pub fn summarize(reports: &[ScenarioReport], total: Duration) -> bool {
    // Written to the stderr handle, not with eprintln!, so that the test harness's output
    // capture does not hide the summary when the scenarios run under `cargo test`.
    let mut err = std::io::stderr();
    macro_rules! say {
        ($($arg:tt)*) => {{
            let _ = writeln!(err, $($arg)*);
        }};
    }
    say!("pi-qemu: scenario results");
    for r in reports {
        let status = if r.passed {
            "PASS"
        } else if r.detail == "not implemented yet" {
            "TODO"
        } else {
            "FAIL"
        };
        say!("  {status} {:<18} {:>6.1} s  {}", r.name, r.elapsed_ms as f64 / 1000.0, r.detail);
        // Long runs (the power-cut series) show their first boots only when they passed.
        let shown = if r.passed && r.boots.len() > 6 { 3 } else { r.boots.len() };
        for b in &r.boots[..shown] {
            say!(
                "       boot {}: partition {} ({}) tryboot={} via {} -> {} in {:.1} s{}",
                b.index,
                b.partition,
                b.label,
                u8::from(b.tryboot),
                b.selection,
                b.reset.as_deref().unwrap_or("(stopped)"),
                b.duration_ms as f64 / 1000.0,
                b.ready_ms.map_or(String::new(), |ms| format!(
                    ", healthy at {:.1} s",
                    ms as f64 / 1000.0
                ))
            );
        }
        if shown < r.boots.len() {
            say!("       ... and {} more boots", r.boots.len() - shown);
        }
        for log in r.logs.iter().filter(|_| !r.passed) {
            say!("       log: {}", log.display());
        }
    }
    let passed = reports.iter().filter(|r| r.passed).count();
    if let Some(t) = HealthyTimes::of(reports) {
        say!("pi-qemu: {t}");
    }
    say!(
        "pi-qemu: {passed} of {} scenarios passed in {:.1} s (the whole suite)",
        reports.len(),
        total.as_secs_f64()
    );
    passed == reports.len()
}

/// Boot-to-healthy times: QEMU's start to the healthy marker, over every boot that got there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthyTimes {
    pub boots: usize,
    pub min_ms: u64,
    pub median_ms: u64,
    pub max_ms: u64,
}

impl HealthyTimes {
    pub fn of(reports: &[ScenarioReport]) -> Option<HealthyTimes> {
        let mut ms: Vec<u64> =
            reports.iter().flat_map(|r| r.boots.iter().filter_map(|b| b.ready_ms)).collect();
        ms.sort_unstable();
        Some(HealthyTimes {
            boots: ms.len(),
            min_ms: *ms.first()?,
            median_ms: ms[ms.len() / 2],
            max_ms: *ms.last()?,
        })
    }
}

impl std::fmt::Display for HealthyTimes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = |ms: u64| ms as f64 / 1000.0;
        write!(
            f,
            "boot to healthy (qemu start to the healthy marker, TCG): median {:.1} s, min {:.1} s, max {:.1} s over {} boots",
            s(self.median_ms),
            s(self.min_ms),
            s(self.max_ms),
            self.boots
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_names_are_unique_and_findable() {
        for s in SCENARIOS {
            assert_eq!(find(s.name).unwrap().name, s.name);
            assert_eq!(SCENARIOS.iter().filter(|t| t.name == s.name).count(), 1);
        }
        assert!(find("nope").is_none());
    }

    fn ctx(dir: &Path) -> Context {
        Context {
            images: ImageSet::default(),
            work_dir: dir.to_path_buf(),
            cuts: 10,
            qemu: "qemu-system-aarch64".into(),
            memory_mib: 512,
            timeouts: Timeouts::default(),
            echo: Echo::Silent,
            keep_logs: false,
            healthy_pattern: DEFAULT_HEALTHY_PATTERN.into(),
            seed: Some(1),
            imager: None,
            signing_key: None,
        }
    }

    #[test]
    fn unimplemented_scenarios_fail() {
        let dir = tempfile::tempdir().unwrap();
        let todo = Scenario { name: "todo", summary: "", body: None };
        let r = run(&todo, &ctx(dir.path()));
        assert!(!r.passed);
        assert_eq!(r.detail, "not implemented yet");
    }

    #[test]
    fn every_registered_scenario_has_a_body() {
        assert!(SCENARIOS.iter().all(|s| s.body.is_some()));
    }

    #[test]
    fn scenarios_without_v2_fail_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("out");
        std::fs::create_dir(&images).unwrap();
        File::create(images.join("qemu-1.0.0.img")).unwrap();
        let ctx = Context { images: ImageSet::find(&images).unwrap(), ..ctx(dir.path()) };
        let r = run(find("update-commit").unwrap(), &ctx);
        assert!(!r.passed);
        assert!(r.detail.contains("needs two versions"), "{}", r.detail);
    }

    #[test]
    fn first_boot_without_images_fails_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let r = run(find("first-boot").unwrap(), &ctx(dir.path()));
        assert!(!r.passed);
        assert!(r.detail.contains("no *.img in the image folder"), "{}", r.detail);
    }

    #[test]
    fn images_sort_by_version() {
        let dir = tempfile::tempdir().unwrap();
        for name in
            ["qemu-1.10.0.img", "qemu-1.9.0.img", "qemu-2.0.0.mfb", "notes.txt", "qemu-1.2.0.img"]
        {
            File::create(dir.path().join(name)).unwrap();
        }
        let set = ImageSet::find(dir.path()).unwrap();
        let names: Vec<_> =
            set.images.iter().map(|p| p.file_name().unwrap().to_str().unwrap()).collect();
        assert_eq!(names, ["qemu-1.2.0.img", "qemu-1.9.0.img", "qemu-1.10.0.img"]);
        assert_eq!(set.bundles.len(), 1);
        assert!(set.v1().unwrap().ends_with("qemu-1.2.0.img"));
    }

    #[test]
    fn sparse_copy_keeps_content_and_holes() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.img");
        let f = File::create(&src).unwrap();
        f.set_len(8 * 1024 * 1024).unwrap();
        std::fs::OpenOptions::new().write(true).open(&src).unwrap().write_all(b"head").unwrap();
        let mut f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
        f.seek(SeekFrom::Start(5 * 1024 * 1024 + 3)).unwrap();
        f.write_all(b"middle").unwrap();
        let dst = dir.path().join("dst.img");
        sparse_copy(&src, &dst).unwrap();
        assert!(std::fs::read(&src).unwrap() == std::fs::read(&dst).unwrap());
        // Two 1 MiB chunks hold data; the rest are holes.
        assert!(std::fs::metadata(&dst).unwrap().blocks() * 512 <= 3 * 1024 * 1024);
    }
}
