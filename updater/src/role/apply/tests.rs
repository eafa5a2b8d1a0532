//! Tests of the apply chain on the fake engine: every outcome, and a power cut at every step.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;
use crate::role::fake::{FakeEngine, Release, Up};
use crate::role::safe_mode;

const ROLE: &str = "web";
const PROJECT: &str = "metrica-web";

/// A device folder, a fake engine, and bundle folders made on demand.
struct Bench {
    dir: tempfile::TempDir,
    fake: FakeEngine,
    layout: RoleLayout,
    events: RefCell<Vec<Event>>,
}

impl Bench {
    fn new() -> Bench {
        let dir = tempfile::tempdir().unwrap();
        let layout = RoleLayout::new(&dir.path().join("data/metrica"), ROLE);
        std::fs::create_dir_all(dir.path().join("root/dev")).unwrap();
        Bench { dir, fake: FakeEngine::new(), layout, events: RefCell::new(Vec::new()) }
    }

    /// A bundle folder of `version` with `extra` appended to its role.toml, whose stack
    /// behaves as `release` says once staged.
    fn bundle(&self, version: &str, extra: &str, release: Release) -> PathBuf {
        let src = self.dir.path().join(format!("bundle-{version}"));
        std::fs::create_dir_all(src.join(IMAGES_DIR)).unwrap();
        let toml = format!(
            "[role]\nname = \"web\"\nversion = \"{version}\"\nos = \">=1.0.0\"\nupdate_interval = \"1h\"\n\
             [apply]\nwait_timeout = \"1s\"\nhealth_timeout = \"50ms\"\nprobation = \"30ms\"\n\
             [[health.container]]\nservice = \"web\"\n{extra}"
        );
        std::fs::write(src.join(ROLE_FILE), toml).unwrap();
        std::fs::write(src.join("compose.yaml"), "services: {}\n").unwrap();
        let images: Vec<&String> = release.services.values().collect();
        let archive = images.iter().map(|i| format!("{i}\n")).collect::<String>();
        std::fs::write(src.join(IMAGES_DIR).join("web.tar"), archive).unwrap();
        self.fake.release(&self.layout.release(&v(version)), release);
        src
    }

    fn good(&self, version: &str) -> PathBuf {
        self.bundle(
            version,
            "",
            Release::new(&[("web", &format!("metrica.invalid/web:{version}"))]),
        )
    }

    fn failing(&self, version: &str, up: Up) -> PathBuf {
        self.bundle(
            version,
            "",
            Release { up, ..Release::new(&[("web", &format!("metrica.invalid/web:{version}"))]) },
        )
    }

    fn apply(&self, src: &Path) -> Result<Outcome> {
        self.apply_with(src, false)
    }

    fn apply_with(&self, src: &Path, force: bool) -> Result<Outcome> {
        let log = |e: &Event| self.events.borrow_mut().push(e.clone());
        apply(&self.fake, &self.layout, src, &self.opts(force, &log))
    }

    fn recover(&self) -> Recovery {
        let log = |e: &Event| self.events.borrow_mut().push(e.clone());
        recover(&self.fake, &self.layout, &self.opts(false, &log)).unwrap()
    }

    fn opts<'a>(&self, force: bool, log: &'a dyn Fn(&Event)) -> Options<'a> {
        Options {
            os_version: v("2.0.0"),
            force,
            dev_root: self.dir.path().join("root"),
            poll: Duration::from_millis(5),
            validate_timeout: Duration::from_secs(5),
            log,
        }
    }

    fn running(&self) -> Option<semver::Version> {
        self.fake
            .running_dir(PROJECT)
            .map(|d| d.file_name().unwrap().to_string_lossy().parse().unwrap())
    }

    fn current(&self) -> Option<semver::Version> {
        self.layout.read_link(Link::Current).unwrap()
    }

    fn state(&self) -> RoleState {
        self.layout.read_state().unwrap()
    }
}

fn v(s: &str) -> semver::Version {
    s.parse().unwrap()
}

fn committed(o: Outcome) -> semver::Version {
    match o {
        Outcome::Committed { version, .. } => version,
        other => panic!("not committed: {other:?}"),
    }
}

#[test]
fn a_first_release_and_an_update_commit_and_keep_the_data_volume() {
    let b = Bench::new();
    assert_eq!(committed(b.apply(&b.good("1.0.0")).unwrap()), v("1.0.0"));
    assert_eq!((b.current(), b.running()), (Some(v("1.0.0")), Some(v("1.0.0"))));
    b.fake.write_volume(PROJECT, "recordings");
    match b.apply(&b.good("1.1.0")).unwrap() {
        Outcome::Committed { version, previous } => {
            assert_eq!((version, previous), (v("1.1.0"), Some(v("1.0.0"))));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!((b.current(), b.running()), (Some(v("1.1.0")), Some(v("1.1.0"))));
    assert_eq!(b.layout.read_link(Link::Previous).unwrap(), Some(v("1.0.0")));
    assert_eq!(b.fake.volume(PROJECT).as_deref(), Some("recordings"));
    let s = b.state();
    assert_eq!((s.committed, s.pending, s.consecutive_failures), (Some(v("1.1.0")), None, 0));
    // The images were loaded before the switch, while 1.0.0 still ran.
    let calls = b.fake.calls();
    let load = calls.iter().rposition(|c| c.starts_with("load ")).unwrap();
    let up = calls.iter().rposition(|c| c.starts_with("up ")).unwrap();
    assert!(load < up, "{calls:?}");
    // Every log line names the role and the version; images are not copied into the release.
    assert!(b.events.borrow().iter().all(|e| e.role == ROLE && !e.version.is_empty()));
    assert!(!b.layout.release(&v("1.1.0")).join(IMAGES_DIR).exists());
    assert!(matches!(b.apply(&b.good("1.1.0")).unwrap(), Outcome::AlreadyCurrent(_)));
}

#[test]
fn only_the_current_and_previous_releases_are_kept() {
    let b = Bench::new();
    for r in ["1.0.0", "1.1.0", "1.2.0"] {
        committed(b.apply(&b.good(r)).unwrap());
    }
    assert_eq!(b.layout.other_releases(&[]).unwrap(), [v("1.1.0"), v("1.2.0")]);
}

#[test]
fn failures_after_the_switch_roll_back_to_the_previous_stack() {
    let cases: &[(Up, &str)] = &[
        (Up::Exits(3), "bringing the stack up"),
        (Up::Unhealthy, "bringing the stack up"),
        (Up::Hangs, "did not finish"),
        (Up::RestartsLater, "probation: container"),
    ];
    for (up, words) in cases {
        let b = Bench::new();
        committed(b.apply(&b.good("1.0.0")).unwrap());
        b.fake.write_volume(PROJECT, "kept");
        match b.apply(&b.failing("2.0.0", up.clone())).unwrap() {
            Outcome::RolledBack { version, error, restored } => {
                assert_eq!((version, restored), (v("2.0.0"), Some(v("1.0.0"))), "{up:?}");
                assert!(error.to_string().contains(words), "{up:?}: {error}");
            }
            other => panic!("{up:?}: {other:?}"),
        }
        assert_eq!((b.current(), b.running()), (Some(v("1.0.0")), Some(v("1.0.0"))), "{up:?}");
        assert_eq!(b.fake.volume(PROJECT).as_deref(), Some("kept"));
        let s = b.state();
        assert_eq!(
            (s.failed, s.consecutive_failures, s.rollbacks_total, s.pending),
            (vec![v("2.0.0")], 1, 1, None)
        );
        assert!(s.last_error.is_some());
    }
}

#[test]
fn a_failing_health_check_rolls_back() {
    let b = Bench::new();
    committed(b.apply(&b.good("1.0.0")).unwrap());
    let check = "[[health.command]]\nservice = \"web\"\ncommand = [\"false\"]\n";
    let src = b.bundle("1.1.0", check, Release::new(&[("web", "metrica.invalid/web:1.1.0")]));
    match b.apply(&src).unwrap() {
        Outcome::RolledBack { error: ApplyError::Unhealthy(r), .. } => {
            assert_eq!(r[0].detail, "exit status 1");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(b.running(), Some(v("1.0.0")));
}

#[test]
fn a_failed_version_is_not_retried_unless_forced() {
    let b = Bench::new();
    committed(b.apply(&b.good("1.0.0")).unwrap());
    let bad = b.failing("1.1.0", Up::Exits(1));
    assert!(matches!(b.apply(&bad).unwrap(), Outcome::RolledBack { .. }));
    let calls = b.fake.calls().len();
    match b.apply(&bad).unwrap() {
        Outcome::Refused { error: ApplyError::FailedBefore(ver), recorded: false } => {
            assert_eq!(ver, v("1.1.0"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(b.fake.calls().len(), calls, "a refused release does not touch the engine");
    // Fixed (same version, the operator forces it): it commits and is no longer "failed".
    b.fake.release(
        &b.layout.release(&v("1.1.0")),
        Release::new(&[("web", "metrica.invalid/web:1.1.0")]),
    );
    committed(b.apply_with(&bad, true).unwrap());
    assert!(b.state().failed.is_empty());
}

/// Bad input refused before the switch: the running role stays up, untouched.
#[test]
fn bad_releases_are_refused_and_the_running_role_stays() {
    type Make = fn(&Bench) -> PathBuf;
    let cases: &[(&str, Make, bool)] = &[
        (
            "for role other",
            |b| {
                let src = b.good("1.1.0");
                let t = std::fs::read_to_string(src.join(ROLE_FILE))
                    .unwrap()
                    .replace("name = \"web\"", "name = \"other\"");
                std::fs::write(src.join(ROLE_FILE), t).unwrap();
                src
            },
            false,
        ),
        (
            "needs OS >=3",
            |b| {
                b.bundle("1.1.0", "", Release::new(&[("web", "w:1")])).tap(|s| {
                    let t = std::fs::read_to_string(s.join(ROLE_FILE))
                        .unwrap()
                        .replace(">=1.0.0", ">=3");
                    std::fs::write(s.join(ROLE_FILE), t).unwrap();
                })
            },
            false,
        ),
        (
            "unknown field `helth`",
            |b| b.bundle("1.1.0", "[helth]\n", Release::new(&[("web", "w:1")])),
            false,
        ),
        (
            "device /dev/video0",
            |b| {
                b.bundle(
                    "1.1.0",
                    "[devices]\nrequired = [\"/dev/video0\"]\n",
                    Release::new(&[("web", "w:1")]),
                )
            },
            true,
        ),
        (
            "invalid tar header",
            |b| {
                let src = b.good("1.1.0");
                std::fs::write(src.join(IMAGES_DIR).join("web.tar"), "\u{1}\u{2} garbage").unwrap();
                src
            },
            true,
        ),
        (
            "does not validate: ",
            |b| {
                b.bundle(
                    "1.1.0",
                    "",
                    Release {
                        invalid: Some("services.web.ports must be a list".into()),
                        ..Release::new(&[("web", "w:1")])
                    },
                )
            },
            true,
        ),
        (
            "neither pinned",
            |b| {
                b.bundle(
                    "1.1.0",
                    "",
                    Release { pull_never: false, ..Release::new(&[("web", "w:latest")]) },
                )
            },
            true,
        ),
        (
            "not on the device",
            |b| {
                let src =
                    b.bundle("1.1.0", "", Release::new(&[("web", "w:1"), ("side", "w:missing")]));
                std::fs::write(src.join(IMAGES_DIR).join("web.tar"), "w:1\n").unwrap();
                src
            },
            true,
        ),
        (
            "validation sh check.sh failed",
            |b| {
                let src = b.bundle("1.1.0", "", Release::new(&[("web", "w:1")]));
                with_validation_script(
                    src,
                    "echo \"MQTT_PASSWORD is not set for $METRICA_ROLE\" >&2; exit 1\n",
                )
            },
            true,
        ),
        (
            "[resources.service.db]",
            |b| {
                b.bundle(
                    "1.1.0",
                    "[resources.service.db]\npids = 10\n",
                    Release::new(&[("web", "w:1")]),
                )
            },
            true,
        ),
    ];
    for (words, make, recorded) in cases {
        let b = Bench::new();
        committed(b.apply(&b.good("1.0.0")).unwrap());
        let ups = b.fake.calls().iter().filter(|c| c.starts_with("up ")).count();
        match b.apply(&make(&b)).unwrap() {
            Outcome::Refused { error, recorded: r } => {
                assert!(error.to_string().contains(words), "{words}: {error}");
                assert_eq!(r, *recorded, "{words}");
            }
            other => panic!("{words}: {other:?}"),
        }
        assert_eq!(b.fake.calls().iter().filter(|c| c.starts_with("up ")).count(), ups, "{words}");
        assert_eq!((b.current(), b.running()), (Some(v("1.0.0")), Some(v("1.0.0"))), "{words}");
        assert_eq!(b.state().consecutive_failures, u32::from(*recorded), "{words}");
    }
}

trait Tap: Sized {
    fn tap(self, f: impl FnOnce(&Self)) -> Self {
        f(&self);
        self
    }
}
impl Tap for PathBuf {}

#[test]
fn the_validation_script_sees_the_role_and_a_present_device_passes() {
    let b = Bench::new();
    std::fs::write(b.dir.path().join("root/dev/video0"), "").unwrap();
    let src = b.bundle(
        "1.0.0",
        "[devices]\nrequired = [\"/dev/video0\"]\n",
        Release::new(&[("web", "w:1")]),
    );
    let src = with_validation_script(
        src,
        "test \"$METRICA_ROLE $METRICA_ROLE_VERSION\" = \"web 1.0.0\" && test -f compose.yaml\n",
    );
    committed(b.apply(&src).unwrap());
}

/// The release folder `src` with `check.sh` (this script) as its role's validation command.
fn with_validation_script(src: PathBuf, script: &str) -> PathBuf {
    let t = std::fs::read_to_string(src.join(ROLE_FILE))
        .unwrap()
        .replace("[apply]", "validate = [\"sh\", \"check.sh\"]\n[apply]");
    std::fs::write(src.join(ROLE_FILE), t).unwrap();
    std::fs::write(src.join("check.sh"), script).unwrap();
    src
}

#[test]
fn a_first_release_that_fails_leaves_no_stack_and_no_current() {
    let b = Bench::new();
    match b.apply(&b.failing("1.0.0", Up::Exits(1))).unwrap() {
        Outcome::RolledBack { restored: None, .. } => {}
        other => panic!("{other:?}"),
    }
    assert_eq!((b.current(), b.running()), (None, None));
    assert_eq!(b.state().rollbacks_total, 0);
}

#[test]
fn three_failed_updates_make_the_safe_mode_decision() {
    let b = Bench::new();
    committed(b.apply(&b.good("1.0.0")).unwrap());
    for (i, r) in ["1.1.0", "1.2.0", "1.3.0"].iter().enumerate() {
        assert!(matches!(
            b.apply(&b.failing(r, Up::Exits(1))).unwrap(),
            Outcome::RolledBack { .. }
        ));
        let s = b.state();
        let sig = safe_mode::Signals {
            role: ROLE.into(),
            consecutive_failures: s.consecutive_failures,
            ..Default::default()
        };
        let expect = if i < 2 {
            safe_mode::Decision::Stay
        } else {
            safe_mode::Decision::Enter(safe_mode::Reason::FailedUpdates { count: 3 })
        };
        assert_eq!(safe_mode::decide(&sig), expect);
    }
    assert_eq!(b.running(), Some(v("1.0.0")));
    // A good update resets the count and leaves safe mode.
    committed(b.apply(&b.good("1.4.0")).unwrap());
    let sig = safe_mode::Signals {
        active: true,
        good_update: true,
        consecutive_failures: b.state().consecutive_failures,
        ..Default::default()
    };
    assert_eq!(
        (sig.consecutive_failures, safe_mode::decide(&sig)),
        (0, safe_mode::Decision::Exit(safe_mode::ExitReason::GoodUpdate))
    );
}

/// The failpoints one successful update passes, in order.
fn update_failpoints() -> Vec<String> {
    let b = Bench::new();
    committed(b.apply(&b.good("1.0.0")).unwrap());
    let src = b.good("2.0.0");
    failpoint::record();
    committed(b.apply(&src).unwrap());
    failpoint::recorded()
}

#[test]
fn a_power_cut_at_every_step_leaves_the_old_or_the_new_release_running() {
    let names = update_failpoints();
    let passed: Vec<&str> =
        names.iter().map(String::as_str).filter(|n| STEPS.contains(n)).collect();
    assert_eq!(passed, STEPS, "the steps an apply passes, in order: {names:?}");
    let mut seen_new = false;
    for (i, name) in names.iter().enumerate() {
        let b = Bench::new();
        committed(b.apply(&b.good("1.0.0")).unwrap());
        let src = b.good("2.0.0");
        let skip = names[..i].iter().filter(|n| *n == name).count();
        failpoint::arm_after(name, skip, None);
        let e = b.apply(&src).unwrap_err();
        failpoint::disarm();
        assert!(e.downcast_ref::<failpoint::PowerCut>().is_some(), "{name}: {e:#}");
        // The restart: the engine keeps what ran (containers restart), the updater recovers.
        let rec = b.recover();
        let (cur, run, s) = (b.current(), b.running(), b.state());
        assert_eq!(cur, run, "{name}: {rec:?}");
        assert!(run == Some(v("1.0.0")) || run == Some(v("2.0.0")), "{name}: {run:?}");
        assert_eq!(s.pending, None, "{name}");
        seen_new |= run == Some(v("2.0.0"));
        // An interrupted update is not marked failed: the next attempt applies it.
        if run == Some(v("1.0.0")) {
            assert!(s.failed.is_empty(), "{name}");
            committed(b.apply(&src).unwrap());
        }
    }
    assert!(seen_new, "a cut after the commit keeps the new release");
}

#[test]
fn a_power_cut_during_a_rollback_still_ends_on_the_previous_release() {
    let b = Bench::new();
    committed(b.apply(&b.good("1.0.0")).unwrap());
    let bad = b.failing("2.0.0", Up::Exits(1));
    failpoint::arm("role-rollback", None);
    assert!(b.apply(&bad).unwrap_err().downcast_ref::<failpoint::PowerCut>().is_some());
    assert!(matches!(b.recover(), Recovery::RolledBack { running: Some(_), .. }));
    assert_eq!((b.current(), b.running()), (Some(v("1.0.0")), Some(v("1.0.0"))));
    let s = b.state();
    assert_eq!((s.failed, s.consecutive_failures), (vec![v("2.0.0")], 1), "counted once");
}

#[test]
fn recovery_with_nothing_pending_brings_the_current_release_up() {
    let b = Bench::new();
    assert_eq!(b.recover(), Recovery::Clean(None));
    committed(b.apply(&b.good("1.0.0")).unwrap());
    b.fake.down(&Project { name: PROJECT.into(), dir: PathBuf::new(), files: vec![] }).unwrap();
    assert_eq!(b.recover(), Recovery::Clean(Some(v("1.0.0"))));
    assert_eq!(b.running(), Some(v("1.0.0")));
}
