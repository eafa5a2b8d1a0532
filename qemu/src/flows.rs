//! The scenario bodies (registered in [`crate::scenario::SCENARIOS`]). Each copies v1 into its
//! folder, attaches a test disk (hook + bundles, `fixtures::test_disk`), drives the guest with a
//! [`Driver`] plan, then checks three views that must agree: the boots the harness saw (which
//! partition, tryboot, why each ended), what the guest's `updater status --json` printed, and
//! what `imager inspect` reads from the disk on the host afterwards.

use crate::cut::{CutPlan, Delay, Rng};
use crate::driver::{Cmd, Driver, Seen};
use crate::fixtures::{self, Faults, HostView};
use crate::harness::{self, BootRecord, RunEnd, RunReport};
use crate::scenario::{options, sparse_copy, Context, Done};
use anyhow::{bail, ensure, Context as _, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Where the test disk puts its files in the guest.
const MOUNT: &str = "/run/test";

/// What the bodies need besides the context.
struct Env {
    imager: PathBuf,
    v1: PathBuf,
    v2_bundle: PathBuf,
}

fn env(ctx: &Context) -> Result<Env> {
    let v1 = ctx.images.v1()?.to_path_buf();
    let v2_bundle = ctx.images.v2_bundle()?;
    Ok(Env { imager: fixtures::find_imager(ctx.imager.as_deref())?, v1, v2_bundle })
}

/// The fault bundles, made once per v2 image in `<image dir>/faults` (or the work folder when
/// the image folder is not writable).
fn faults(ctx: &Context, env: &Env) -> Result<Faults> {
    let key = fixtures::find_signing_key(ctx.signing_key.as_deref())?;
    let v2 = ctx.images.v2()?;
    let dir = v2.parent().map(|p| p.join("faults")).unwrap_or_else(|| ctx.work_dir.join("faults"));
    match fixtures::faults(v2, &key, &env.imager, &dir) {
        Ok(f) => Ok(f),
        Err(e) if std::fs::create_dir_all(&dir).is_err() => {
            let dir = ctx.work_dir.join("faults");
            fixtures::faults(v2, &key, &env.imager, &dir).with_context(|| format!("after {e:#}"))
        }
        Err(e) => Err(e),
    }
}

fn file_name(p: &Path) -> String {
    p.file_name().unwrap_or_default().to_string_lossy().into_owned()
}

/// One harness run of a copy of v1 with a test disk, driven by `plan`.
struct Run {
    report: RunReport,
    driver: Driver,
    disk: PathBuf,
}

/// The test disk of a scenario: hook.sh and these bundles, under their file names.
fn test_disk(dir: &Path, bundles: &[&Path]) -> Result<PathBuf> {
    let test = dir.join("test-disk.img");
    let files: Vec<(String, &Path)> = bundles.iter().map(|b| (file_name(b), *b)).collect();
    let files: Vec<(&str, &Path)> = files.iter().map(|(n, p)| (n.as_str(), *p)).collect();
    fixtures::test_disk(&test, &files)?;
    Ok(test)
}

/// Runs `disk` with the test disk attached, driven by `plan`, with power cuts `cuts`.
#[allow(clippy::too_many_arguments)]
fn drive(
    ctx: &Context,
    dir: &Path,
    logs: &mut Vec<PathBuf>,
    name: &str,
    disk: &Path,
    test: &Path,
    plan: Vec<(usize, Vec<Cmd>)>,
    cuts: Vec<CutPlan>,
    seed: Option<u64>,
) -> Result<Run> {
    let mut o = options(ctx, disk, dir, name);
    o.machine.extra_disks.push(test.to_path_buf());
    o.cuts = cuts;
    if seed.is_some() {
        o.seed = seed;
    }
    let mut driver = Driver::new(&ctx.healthy_pattern, plan);
    let report = harness::run(&o, &mut driver)?;
    logs.extend(report.log_dir.clone());
    Ok(Run { report, driver, disk: disk.to_path_buf() })
}

impl Run {
    fn log(&self) -> String {
        match &self.report.log_dir {
            Some(d) => d.join("console.log").display().to_string(),
            None => "(not kept)".into(),
        }
    }

    /// The run must have ended because every command ran.
    fn must_finish(&self) -> Result<()> {
        match &self.report.end {
            RunEnd::Stopped(_) => Ok(()),
            other => bail!(
                "the run did not get through its plan: {} (boots {}; log {})",
                match other {
                    RunEnd::Failed(f) => f.to_string(),
                    o => format!("{o:?}"),
                },
                trail_text(&self.report.boots),
                self.log()
            ),
        }
    }

    /// Checks the boots: (partition, tryboot, reset) of each; "stopped" for the last one.
    fn expect_boots(&self, expected: &[(u32, bool, &str)]) -> Result<()> {
        let got = trail(&self.report.boots);
        let want: Vec<(u32, bool, String)> =
            expected.iter().map(|(p, t, r)| (*p, *t, r.to_string())).collect();
        ensure!(
            got == want,
            "expected boots {}, saw {} (log {})",
            trail_text_of(&want),
            trail_text_of(&got),
            self.log()
        );
        Ok(())
    }

    fn seen(&self, index: usize) -> Result<&Seen> {
        self.driver
            .seen
            .iter()
            .find(|s| s.index == index)
            .with_context(|| format!("boot {index} printed nothing (log {})", self.log()))
    }

    /// The last `updater status --json` printed in boot `index`.
    fn status(&self, index: usize) -> Result<&Value> {
        self.seen(index)?.last_status().with_context(|| {
            format!("boot {index} printed no `updater status --json` (log {})", self.log())
        })
    }

    fn host(&self, env: &Env) -> Result<HostView> {
        fixtures::host_view(&env.imager, &self.disk)
    }
}

fn trail(boots: &[BootRecord]) -> Vec<(u32, bool, String)> {
    boots
        .iter()
        .map(|b| (b.partition, b.tryboot, b.reset.clone().unwrap_or_else(|| "stopped".into())))
        .collect()
}

fn trail_text_of(t: &[(u32, bool, String)]) -> String {
    let parts: Vec<String> = t
        .iter()
        .map(|(p, tb, r)| format!("{p}{} -> {r}", if *tb { " (tryboot)" } else { "" }))
        .collect();
    format!("[{}]", parts.join(", "))
}

fn trail_text(boots: &[BootRecord]) -> String {
    trail_text_of(&trail(boots))
}

/// `status["state"]...` as a string, for messages and checks.
fn at<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(v, |v, k| &v[*k])
}

fn expect_eq(v: &Value, path: &[&str], want: &str, what: &str) -> Result<()> {
    let got = at(v, path);
    ensure!(
        got.as_str() == Some(want) || (got.is_number() && *got.to_string() == *want),
        "{what}: expected {} = {want}, found {got}",
        path.join(".")
    );
    Ok(())
}

/// The guest's state (from `updater status --json`) and the state file the host reads from
/// the data partition must be the same document, and autoboot.txt as `imager inspect` reads it
/// must name the state's committed slot.
fn agree(guest: &Value, host: &HostView) -> Result<()> {
    let guest_state = &guest["state"];
    let host_state =
        host.state.as_ref().context("the host found no /metrica/state.json on data")?;
    ensure!(
        guest_state == host_state,
        "the guest's `updater status` state and the host's state.json differ:\n guest {guest_state}\n host  {host_state}"
    );
    let committed = guest_state["committed"].as_str().unwrap_or("?");
    ensure!(
        host.committed() == Some(committed),
        "imager inspect reads committed slot {:?} from autoboot.txt, the updater says {committed}",
        host.committed()
    );
    ensure!(
        guest["autoboot"]["committed"].as_str() == Some(committed),
        "the guest's autoboot view {} disagrees with its state (committed {committed})",
        guest["autoboot"]
    );
    Ok(())
}

pub fn first_boot(ctx: &Context, dir: &Path, logs: &mut Vec<PathBuf>) -> Result<Done> {
    let env = env(ctx)?;
    let disk = dir.join("disk.img");
    sparse_copy(&env.v1, &disk)?;
    let test = test_disk(dir, &[])?;
    let plan = vec![(1, vec![Cmd::status()])];
    let run = drive(ctx, dir, logs, "run", &disk, &test, plan, vec![], None)?;
    run.must_finish()?;
    run.expect_boots(&[(2, false, "stopped")])?;
    let seen = run.seen(1)?;
    ensure!(seen.healthy == Some(true), "boot 1 never printed {:?}", ctx.healthy_pattern);
    let st = run.status(1)?;
    expect_eq(st, &["booted", "partition"], "2", "first boot")?;
    expect_eq(st, &["state", "committed"], "a", "first boot")?;
    expect_eq(st, &["state", "slots", "a", "state"], "good", "first boot")?;
    let v1 = at(st, &["state", "slots", "a", "version"]).as_str().unwrap_or("?").to_string();
    let history = at(st, &["history"]).as_array().cloned().unwrap_or_default();
    ensure!(
        history.iter().any(|h| h["event"] == "init"),
        "the first boot's history has no `init` entry: {history:?}"
    );
    let host = run.host(&env)?;
    ensure!(host.state.is_some(), "/data has no metrica/state.json after the first boot");
    agree(st, &host)?;
    ensure!(host.version("a") == Some(v1.as_str()), "imager inspect: slot a is not {v1}");
    Ok(run.report.boots.into())
}

pub fn update_commit(ctx: &Context, dir: &Path, logs: &mut Vec<PathBuf>) -> Result<Done> {
    let env = env(ctx)?;
    let disk = dir.join("disk.img");
    sparse_copy(&env.v1, &disk)?;
    let bundle = format!("{MOUNT}/{}", file_name(&env.v2_bundle));
    let plan = vec![
        // A, v1: install v2 and reboot with tryboot.
        (1, vec![Cmd::status(), Cmd::any(format!("updater install {bundle} --reboot"))]),
        // B, trial: `updater boot` has committed; reboot plainly.
        (2, vec![Cmd::status(), Cmd::any("sync; reboot -f")]),
        // B again, from a plain reboot: the firmware's default is now B.
        (3, vec![Cmd::status()]),
    ];
    let test = test_disk(dir, &[&env.v2_bundle])?;
    let run = drive(ctx, dir, logs, "run", &disk, &test, plan, vec![], None)?;
    run.must_finish()?;
    run.expect_boots(&[
        (2, false, "reboot '0 tryboot'"),
        (3, true, "reboot"),
        (3, false, "stopped"),
    ])?;
    let trial = run.seen(2)?;
    let v2 = at(run.status(2)?, &["state", "slots", "b", "version"]).as_str().unwrap_or("?");
    ensure!(
        trial.updater.iter().any(|l| l.contains(&format!("committed slot b ({v2})"))),
        "the trial boot did not commit slot b: {:?}",
        trial.updater
    );
    let st = run.status(3)?;
    expect_eq(st, &["booted", "partition"], "3", "after the commit")?;
    ensure_false(st, &["booted", "tryboot"])?;
    expect_eq(st, &["state", "committed"], "b", "after the commit")?;
    expect_eq(st, &["state", "slots", "b", "state"], "good", "after the commit")?;
    expect_eq(st, &["state", "slots", "b", "version"], v2, "after the commit")?;
    expect_eq(st, &["state", "slots", "a", "state"], "good", "after the commit")?;
    expect_eq(st, &["state", "counters", "commits"], "1", "after the commit")?;
    ensure!(at(st, &["state", "trial"]).is_null(), "a trial is still pending: {}", st["state"]);
    let host = run.host(&env)?;
    agree(st, &host)?;
    ensure!(
        host.committed() == Some("b") && host.version("b") == Some(v2),
        "imager inspect: committed {:?}, slot b {:?}; expected b and {v2}",
        host.committed(),
        host.version("b")
    );
    Ok(run.report.boots.into())
}

fn ensure_false(v: &Value, path: &[&str]) -> Result<()> {
    ensure!(at(v, path) == &Value::Bool(false), "expected {} = false", path.join("."));
    Ok(())
}

/// A v2 with a fault: installed from A, tried with tryboot, the trial ends with `reset`, and
/// the device must be back on A with the rollback recorded.
fn faulty(
    ctx: &Context,
    dir: &Path,
    logs: &mut Vec<PathBuf>,
    stem: &str,
    reset: &str,
    rollback_seen_on_a: bool,
    trial_check: &dyn Fn(&Seen) -> Result<()>,
) -> Result<Done> {
    let env = env(ctx)?;
    let faults = faults(ctx, &env)?;
    let bundle = faults.bundle(stem);
    let disk = dir.join("disk.img");
    sparse_copy(&env.v1, &disk)?;
    // Boot 2, the faulty trial, must never reach the hook.
    let plan = vec![
        (
            1,
            vec![
                Cmd::status(),
                Cmd::any(format!("updater install {MOUNT}/{} --reboot", file_name(&bundle))),
            ],
        ),
        (3, vec![Cmd::status()]),
    ];
    let test = test_disk(dir, &[&bundle])?;
    let run = drive(ctx, dir, logs, "run", &disk, &test, plan, vec![], None)?;
    run.must_finish()?;
    run.expect_boots(&[(2, false, "reboot '0 tryboot'"), (3, true, reset), (2, false, "stopped")])?;
    let trial = run.seen(2)?;
    ensure!(trial.healthy != Some(true), "the faulty trial boot reported healthy");
    trial_check(trial).with_context(|| format!("trial boot (log {})", run.log()))?;
    let back = run.seen(3)?;
    ensure!(back.healthy == Some(true), "slot A did not come back healthy (log {})", run.log());
    // A trial that never reached its checks is found failed by the updater on A; a trial whose
    // checks failed was marked bad by the updater on B before it rebooted.
    ensure!(
        !rollback_seen_on_a || back.updater.iter().any(|l| l.contains("rolled back")),
        "the updater on A did not report the rollback: {:?}",
        back.updater
    );
    let st = run.status(3)?;
    expect_eq(st, &["booted", "partition"], "2", "after the failed trial")?;
    expect_eq(st, &["state", "committed"], "a", "after the failed trial")?;
    expect_eq(st, &["state", "slots", "a", "state"], "good", "after the failed trial")?;
    expect_eq(st, &["state", "slots", "b", "state"], "bad", "after the failed trial")?;
    expect_eq(st, &["state", "counters", "rollbacks"], "1", "after the failed trial")?;
    ensure!(at(st, &["state", "trial"]).is_null(), "a trial is still pending: {}", st["state"]);
    let reason = at(st, &["state", "slots", "b", "reason"]).as_str().unwrap_or("");
    ensure!(!reason.is_empty(), "slot b is bad without a reason: {}", st["state"]);
    let version = at(st, &["state", "slots", "b", "version"]).clone();
    let bad = at(st, &["state", "bad_versions"]).as_array().cloned().unwrap_or_default();
    ensure!(bad.contains(&version), "bad_versions {bad:?} lacks the tried version {version}");
    let history = at(st, &["history"]).as_array().cloned().unwrap_or_default();
    ensure!(
        history.iter().any(|h| h["event"] == "rollback" && h["slot"] == "b"),
        "the history has no rollback of slot b: {history:?}"
    );
    let host = run.host(&env)?;
    agree(st, &host)?;
    ensure!(host.committed() == Some("a"), "imager inspect: committed {:?}", host.committed());
    Ok(run.report.boots.into())
}

pub fn bad_kernel(ctx: &Context, dir: &Path, logs: &mut Vec<PathBuf>) -> Result<Done> {
    faulty(ctx, dir, logs, "bad-kernel", "kernel panic", true, &|trial| {
        ensure!(trial.updater.is_empty(), "the updater ran in a boot without an initramfs");
        ensure!(
            trial.panic.as_deref().is_some_and(|p| p.contains("Unable to mount root fs")),
            "expected the panic \"Unable to mount root fs\", saw {:?}",
            trial.panic
        );
        Ok(())
    })
}

pub fn bad_init(ctx: &Context, dir: &Path, logs: &mut Vec<PathBuf>) -> Result<Done> {
    faulty(ctx, dir, logs, "bad-init", "kernel panic", true, &|trial| {
        ensure!(
            trial.faults.iter().any(|f| f.contains("exits with 1")),
            "the faulty init did not run: {:?}",
            trial.faults
        );
        ensure!(trial.updater.is_empty(), "the updater ran although init exited");
        ensure!(
            trial.panic.as_deref().is_some_and(|p| p.contains("Attempted to kill init")),
            "expected the panic \"Attempted to kill init\", saw {:?}",
            trial.panic
        );
        Ok(())
    })
}

pub fn hang(ctx: &Context, dir: &Path, logs: &mut Vec<PathBuf>) -> Result<Done> {
    faulty(ctx, dir, logs, "hang", "watchdog reset", true, &|trial| {
        ensure!(
            trial.faults.iter().any(|f| f.contains("hangs before updater boot")),
            "the hanging init did not run: {:?}",
            trial.faults
        );
        ensure!(trial.updater.is_empty(), "the updater ran although init hung");
        Ok(())
    })
}

pub fn unhealthy(ctx: &Context, dir: &Path, logs: &mut Vec<PathBuf>) -> Result<Done> {
    faulty(ctx, dir, logs, "unhealthy", "reboot", false, &|trial| {
        ensure!(
            trial
                .updater
                .iter()
                .any(|l| l.contains("50-always-fails") && l.contains("rebooting to slot a")),
            "the updater did not name the failing check and reboot: {:?}",
            trial.updater
        );
        Ok(())
    })
}

/// The marker a power-cut command prints just before the step that is cut.
const CUT_MARK: &str = "metrica-test: power cut window opens";

/// Drives and checks one power-cut run: (run number, its folder, its disk, its seed, logs to
/// keep if it fails) -> the run and a word for what the cut hit.
type CutRun<'a> =
    dyn FnMut(usize, &Path, &Path, u64, &mut Vec<PathBuf>) -> Result<(Run, String)> + 'a;

/// One power cut per run, each on a fresh copy of `template`: `run(i, seed)` drives run `i`
/// and checks it, returning a word for what the cut hit. A run whose cut never fired fails.
fn cut_runs(
    ctx: &Context,
    dir: &Path,
    logs: &mut Vec<PathBuf>,
    template: &Path,
    run: &mut CutRun<'_>,
) -> Result<(Vec<BootRecord>, String)> {
    ensure!(ctx.cuts > 0, "--cuts 0: a power-cut scenario needs at least one cut");
    let base = ctx.seed.unwrap_or_else(Rng::clock_seed);
    let mut boots = Vec::new();
    let mut outcomes: Vec<String> = Vec::new();
    for i in 0..ctx.cuts {
        let run_dir = dir.join(format!("cut-{:03}", i + 1));
        std::fs::create_dir_all(&run_dir)
            .with_context(|| format!("creating {}", run_dir.display()))?;
        let disk = run_dir.join("disk.img");
        sparse_copy(template, &disk)?;
        let seed = base.wrapping_add(i as u64);
        let mut kept = Vec::new();
        let result = run(i, &run_dir, &disk, seed, &mut kept).and_then(|(r, outcome)| {
            ensure!(
                r.report.boots.iter().any(|b| b.reset.as_deref() == Some("power cut")),
                "the cut never fired: a power-cut test that cut nothing proves nothing (log {})",
                r.log()
            );
            Ok((r, outcome))
        });
        match result {
            Ok((r, outcome)) => {
                boots.extend(r.report.boots);
                outcomes.push(outcome);
                if !ctx.keep_logs {
                    std::fs::remove_dir_all(&run_dir)
                        .with_context(|| format!("removing {}", run_dir.display()))?;
                }
            }
            Err(e) => {
                logs.extend(kept);
                bail!(
                    "power cut {} of {} (seed {seed}, replay with --seed {seed} --cuts 1): {e:#}",
                    i + 1,
                    ctx.cuts
                );
            }
        }
    }
    let mut counts: Vec<(String, usize)> = Vec::new();
    for o in outcomes {
        match counts.iter_mut().find(|(k, _)| *k == o) {
            Some((_, n)) => *n += 1,
            None => counts.push((o, 1)),
        }
    }
    let summary: Vec<String> = counts.iter().map(|(k, n)| format!("{n} {k}")).collect();
    Ok((boots, format!("{} cuts: {}", ctx.cuts, summary.join(", "))))
}

/// The scenario's detail line carries the outcome counts.
pub type Detailed = (Vec<BootRecord>, String);

/// SIGKILL at a random moment of `updater install` (v2 into B, from A). After each cut the
/// device must boot A healthy, and the same install, run again, must succeed (resuming where
/// the cut left it), tryboot into B and commit.
pub fn power_cut_install(ctx: &Context, dir: &Path, logs: &mut Vec<PathBuf>) -> Result<Done> {
    let (boots, note) = power_cut_install_detailed(ctx, dir, logs)?;
    Ok(Done { boots, note })
}

fn power_cut_install_detailed(
    ctx: &Context,
    dir: &Path,
    logs: &mut Vec<PathBuf>,
) -> Result<Detailed> {
    let env = env(ctx)?;
    let test = test_disk(dir, &[&env.v2_bundle])?;
    let bundle = format!("{MOUNT}/{}", file_name(&env.v2_bundle));
    // The install takes about 5 s under TCG here; the window reaches a little past it, so some
    // cuts land just after the install finished.
    let window = Delay { min_ms: 0, max_ms: 6000 };
    cut_runs(ctx, dir, logs, &env.v1, &mut |_, run_dir, disk, seed, kept| {
        let plan = vec![
            // Cut somewhere in this install; wait for it.
            (1, vec![Cmd::any(format!("echo '{CUT_MARK}'; updater install {bundle}"))]),
            (2, vec![Cmd::status(), Cmd::any(format!("updater install {bundle} --reboot"))]),
            (3, vec![Cmd::status()]),
        ];
        let cut = CutPlan { on: Some(CUT_MARK.into()), boot: Some(1), delay: window };
        let r = drive(ctx, run_dir, kept, "run", disk, &test, plan, vec![cut], Some(seed))?;
        r.must_finish()?;
        r.expect_boots(&[
            (2, false, "power cut"),
            (2, false, "reboot '0 tryboot'"),
            (3, true, "stopped"),
        ])?;
        ensure!(r.seen(2)?.healthy == Some(true), "A was not healthy after the cut ({})", r.log());
        let after_cut = r.status(2)?;
        expect_eq(after_cut, &["state", "committed"], "a", "after the cut")?;
        expect_eq(after_cut, &["state", "slots", "a", "state"], "good", "after the cut")?;
        let b_state =
            at(after_cut, &["state", "slots", "b", "state"]).as_str().unwrap_or("?").to_string();
        let st = r.status(3)?;
        expect_eq(st, &["state", "committed"], "b", "after the install and trial")?;
        expect_eq(st, &["state", "slots", "b", "state"], "good", "after the install and trial")?;
        let host = r.host(&env)?;
        agree(st, &host)?;
        Ok((r, format!("left slot b {b_state}")))
    })
}

/// SIGKILL at a random moment of the trial boot that commits (v2 in B, `updater trial` from
/// A). After each cut the device must boot a good slot (A if the commit did not land, B if it
/// did), its state must say which, and a newer install (v3, into the other slot) must succeed.
pub fn power_cut_commit(ctx: &Context, dir: &Path, logs: &mut Vec<PathBuf>) -> Result<Done> {
    let (boots, note) = power_cut_commit_detailed(ctx, dir, logs)?;
    Ok(Done { boots, note })
}

fn power_cut_commit_detailed(
    ctx: &Context,
    dir: &Path,
    logs: &mut Vec<PathBuf>,
) -> Result<Detailed> {
    let env = env(ctx)?;
    let faults = faults(ctx, &env)?;
    let v3 = faults.bundle("v3");
    let test = test_disk(dir, &[&env.v2_bundle, &v3])?;
    // The template: v1 with v2 installed into B, no trial yet.
    let template = dir.join("template.img");
    sparse_copy(&env.v1, &template)?;
    let plan =
        vec![(1, vec![Cmd::ok(format!("updater install {MOUNT}/{}", file_name(&env.v2_bundle)))])];
    let r = drive(ctx, dir, logs, "template", &template, &test, plan, vec![], None)?;
    r.must_finish()?;
    let v3_path = format!("{MOUNT}/{}", file_name(&v3));
    // `updater boot` of the trial runs for about 0.5 s after "userspace up" and commits at its
    // end. The first cuts fall anywhere in 0-900 ms after that line; then the window closes in
    // on the commit: between the latest cut that came before it (B marked bad) and the
    // earliest that came after (B committed), 60 ms wider on each side for the jitter of TCG.
    let mut window = CommitWindow::new(Delay { min_ms: 0, max_ms: 900 });
    cut_runs(ctx, dir, logs, &template, &mut |i, run_dir, disk, seed, kept| {
        let plan = vec![
            (1, vec![Cmd::any("updater trial")]),
            // The trial boot: the cut comes before or after its hook starts; wait for it.
            (2, vec![]),
            (3, vec![Cmd::status(), Cmd::ok(format!("updater install {v3_path}")), Cmd::status()]),
        ];
        let delay_ms = window.draw(i, seed);
        let delay = Delay { min_ms: delay_ms, max_ms: delay_ms };
        let cut = CutPlan { on: Some("metrica: userspace up".into()), boot: Some(2), delay };
        let r = drive(ctx, run_dir, kept, "run", disk, &test, plan, vec![cut], Some(seed))?;
        r.must_finish()?;
        let boots = trail(&r.report.boots);
        ensure!(
            boots.len() == 3
                && boots[0] == (2, false, "reboot '0 tryboot'".to_string())
                && boots[1] == (3, true, "power cut".to_string())
                && !boots[2].1
                && boots[2].2 == "stopped",
            "expected A -> tryboot B (cut) -> a plain boot, saw {} (log {})",
            trail_text_of(&boots),
            r.log()
        );
        let booted = boots[2].0;
        let seen = r.seen(3)?;
        ensure!(seen.healthy == Some(true), "no healthy boot after the cut ({})", r.log());
        let after = seen.statuses.first().context("no status after the cut")?;
        let committed = at(after, &["state", "committed"]).as_str().unwrap_or("?").to_string();
        let slot_booted = if booted == 2 { "a" } else { "b" };
        ensure!(
            committed == slot_booted,
            "booted slot {slot_booted} but the state commits {committed} ({})",
            r.log()
        );
        expect_eq(after, &["state", "slots", committed.as_str(), "state"], "good", "after the cut")?;
        let other = if committed == "a" { "b" } else { "a" };
        let history = at(after, &["history"]).as_array().cloned().unwrap_or_default();
        let event = |name: &str| history.iter().any(|h| h["event"] == name);
        let outcome = if committed == "b" {
            window.after(delay_ms);
            if history.iter().any(|h| {
                h["event"] == "commit"
                    && h["reason"].as_str().is_some_and(|r| r.contains("finished at boot"))
            }) {
                "commit landed, finished at the next boot"
            } else {
                "after the commit"
            }
        } else if event("commit-interrupted") {
            "commit interrupted (B stays installed)"
        } else if event("rollback") {
            window.before(delay_ms);
            expect_eq(after, &["state", "slots", "b", "state"], "bad", "after the cut")?;
            "before the checks passed (B marked bad)"
        } else {
            bail!("A booted after the cut but the history says neither rollback nor commit-interrupted: {history:?}")
        };
        let st = seen.last_status().context("no status after the v3 install")?;
        expect_eq(st, &["state", "slots", other, "state"], "installed", "after the v3 install")?;
        expect_eq(st, &["state", "slots", other, "version"], "3.0.0", "after the v3 install")?;
        let host = r.host(&env)?;
        agree(st, &host)?;
        ensure!(host.version(other) == Some("3.0.0"), "imager inspect: slot {other} is not 3.0.0");
        Ok((r, outcome.to_string()))
    })
    .map(|(boots, note)| (boots, format!("{note}; last window {}", window.current())))
}

/// The cut delays of power-cut-commit: uniform in the first window for two runs, then between
/// the latest delay that cut before the commit and the earliest that cut after it.
#[derive(Debug, Clone)]
struct CommitWindow {
    first: Delay,
    latest_before: Option<u64>,
    earliest_after: Option<u64>,
}

impl CommitWindow {
    const SLACK_MS: u64 = 60;

    fn new(first: Delay) -> Self {
        CommitWindow { first, latest_before: None, earliest_after: None }
    }

    fn current(&self) -> Delay {
        let (Some(lo), Some(hi)) = (self.latest_before, self.earliest_after) else {
            return self.first;
        };
        let (lo, hi) = (lo.min(hi), lo.max(hi));
        Delay {
            min_ms: lo.saturating_sub(Self::SLACK_MS).max(self.first.min_ms),
            max_ms: (hi + Self::SLACK_MS).min(self.first.max_ms),
        }
    }

    fn draw(&self, run: usize, seed: u64) -> u64 {
        let w = if run < 2 { self.first } else { self.current() };
        w.draw(&mut Rng::new(seed)).as_millis() as u64
    }

    fn before(&mut self, ms: u64) {
        self.latest_before = Some(self.latest_before.map_or(ms, |b| b.max(ms)));
    }

    fn after(&mut self, ms: u64) {
        self.earliest_after = Some(self.earliest_after.map_or(ms, |a| a.min(ms)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_commit_window_closes_in_on_the_boundary() {
        let mut w = CommitWindow::new(Delay { min_ms: 0, max_ms: 900 });
        assert_eq!(w.current(), Delay { min_ms: 0, max_ms: 900 });
        w.before(300);
        assert_eq!(w.current(), Delay { min_ms: 0, max_ms: 900 }, "one side known only");
        w.after(700);
        w.before(350);
        w.after(500);
        assert_eq!(w.current(), Delay { min_ms: 290, max_ms: 560 });
        // Jitter: a later cut landed before an earlier one; the window spans both.
        w.before(520);
        assert_eq!(w.current(), Delay { min_ms: 440, max_ms: 580 });
        for seed in 0..50 {
            assert!((0..=900).contains(&w.draw(0, seed)));
            assert!((440..=580).contains(&w.draw(2, seed)));
        }
    }

    #[test]
    fn trails_read_like_the_summary() {
        let t = vec![(2, false, "reboot '0 tryboot'".to_string()), (3, true, "stopped".into())];
        assert_eq!(trail_text_of(&t), "[2 -> reboot '0 tryboot', 3 (tryboot) -> stopped]");
    }
}
