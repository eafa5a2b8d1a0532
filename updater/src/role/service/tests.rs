//! Tests of the roles service on the fake engine: the lock, free space, the history, and safe
//! mode entered after three failed updates, left on a good one, and swapped by the operator.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use super::*;
use crate::failpoint;
use crate::history::History;
use crate::role::apply::ApplyError;
use crate::role::fake::{FakeEngine, Release, Up};

const ROLE: &str = "web";
const PROJECT: &str = "metrica-web";
const SAFE: &str = "metrica-safe-mode";

/// A device folder, a fake engine, a safe-mode stack, and release folders made on demand.
struct Bench {
    dir: tempfile::TempDir,
    fake: FakeEngine,
    keyring: Keyring,
    events: Rc<RefCell<Vec<Event>>>,
    log: Box<dyn Fn(&Event)>,
    min_free_bytes: u64,
}

impl Bench {
    fn new() -> Bench {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("root/dev")).unwrap();
        let events = Rc::new(RefCell::new(Vec::new()));
        let b = Bench {
            dir,
            fake: FakeEngine::new(),
            keyring: Keyring::default(),
            events: events.clone(),
            log: Box::new(move |e: &Event| events.borrow_mut().push(e.clone())),
            min_free_bytes: 0,
        };
        // The stack carries its image as an archive, as the baked bundle does: the engine
        // has it only once something loads it.
        let safe = b.safe_stack();
        b.write_release(&safe, "safe-mode", "1.0.0", "status:1\n");
        b.fake.release(&safe, Release::new(&[("status", "status:1")]));
        b
    }

    fn metrica(&self) -> PathBuf {
        self.dir.path().join("data/metrica")
    }

    fn safe_stack(&self) -> PathBuf {
        self.dir.path().join("usr/share/metrica/safe-mode")
    }

    fn layout(&self) -> RoleLayout {
        RoleLayout::new(&self.metrica(), ROLE)
    }

    fn write_release(&self, dir: &Path, name: &str, version: &str, images: &str) {
        std::fs::create_dir_all(dir.join("images")).unwrap();
        let toml = format!(
            "[role]\nname = \"{name}\"\nversion = \"{version}\"\nos = \">=1.0.0\"\nupdate_interval = \"1h\"\n\
             [apply]\nwait_timeout = \"1s\"\nhealth_timeout = \"50ms\"\nprobation = \"20ms\"\n\
             [[health.container]]\nservice = \"web\"\n"
        );
        std::fs::write(dir.join(ROLE_FILE), toml).unwrap();
        std::fs::write(dir.join("compose.yaml"), "services: {}\n").unwrap();
        if !images.is_empty() {
            std::fs::write(dir.join("images/web.tar"), images).unwrap();
        }
    }

    /// A release folder of role `web` whose stack does what `up` says once staged.
    fn release(&self, version: &str, up: Up) -> Source {
        let src = self.dir.path().join(format!("release-{version}"));
        let image = format!("metrica.invalid/web:{version}");
        self.write_release(&src, ROLE, version, &format!("{image}\n"));
        let staged = self.layout().release(&version.parse().unwrap());
        self.fake.release(&staged, Release { up, ..Release::new(&[("web", &image)]) });
        Source::Folder(src)
    }

    fn roles(&self) -> Roles<'_> {
        Roles {
            metrica_dir: self.metrica(),
            engine: &self.fake,
            keyring: &self.keyring,
            os_version: "2.0.0".parse().unwrap(),
            dev_root: self.dir.path().join("root"),
            safe_mode_stack: Some(self.safe_stack()),
            min_free_bytes: self.min_free_bytes,
            log: &*self.log,
        }
    }

    fn apply(&self, source: &Source) -> Applied {
        self.roles().apply(source, false).unwrap()
    }

    /// The version of the role's running stack.
    fn running(&self) -> Option<String> {
        self.fake
            .running_dir(PROJECT)
            .map(|d| d.file_name().unwrap().to_string_lossy().into_owned())
    }

    fn safe_running(&self) -> bool {
        self.fake.running_dir(SAFE) == Some(self.safe_stack())
    }

    fn history(&self) -> Vec<String> {
        let h = History::new(&self.dir.path().join("data"));
        h.tail(100).unwrap().iter().map(|e| e.event.to_string()).collect()
    }
}

fn committed(a: &Applied) -> bool {
    matches!(a.outcome, Outcome::Committed { .. })
}

#[test]
fn a_folder_release_commits_and_status_shows_it() {
    let b = Bench::new();
    let a = b.apply(&b.release("1.0.0", Up::Healthy));
    assert!(committed(&a), "{a:?}");
    assert_eq!((a.role.as_str(), a.safe_mode.clone()), (ROLE, None));
    assert_eq!(b.running().as_deref(), Some("1.0.0"));
    let a = b.apply(&b.release("1.1.0", Up::Healthy));
    assert!(committed(&a));
    let again = b.apply(&b.release("1.1.0", Up::Healthy));
    assert!(matches!(again.outcome, Outcome::AlreadyCurrent(_)), "{again:?}");
    assert_eq!(b.history(), ["role-applied", "role-applied"]);
    let st = b.roles().status().unwrap();
    assert!(st.engine_up && st.safe_mode.is_none());
    let r = &st.roles[0];
    assert_eq!(
        (r.name.as_str(), r.current.as_deref(), r.previous.as_deref(), r.committed.as_deref()),
        (ROLE, Some("1.1.0"), Some("1.0.0"), Some("1.1.0"))
    );
    assert_eq!((r.healthy, r.containers.as_ref().map(Vec::len)), (Some(true), Some(1)));
    let checks = r.checks.clone().unwrap();
    assert_eq!((checks.len(), checks[0].check.as_str(), checks[0].ok), (1, "container web", true));
    // Every line of the apply names the role and the version.
    let events = b.events.borrow();
    assert!(events.iter().all(|e| e.role == ROLE && !e.version.is_empty()), "{events:?}");
    // The staging folder is gone and is not a role.
    assert!(!b.metrica().join("roles").join(STAGING_DIR).exists());
    assert_eq!(role_names(&b.metrica()).unwrap(), [ROLE]);
}

#[test]
fn status_reports_an_engine_that_is_down() {
    let b = Bench::new();
    assert!(committed(&b.apply(&b.release("1.0.0", Up::Healthy))));
    b.fake.set_engine_down(true);
    let st = b.roles().status().unwrap();
    assert!(!st.engine_up);
    assert_eq!((st.roles[0].containers.clone(), st.roles[0].healthy), (None, None));
    assert_eq!(st.roles[0].current.as_deref(), Some("1.0.0"));
}

#[test]
fn another_holder_of_the_lock_makes_it_busy_and_nothing_changes() {
    let b = Bench::new();
    let _held = crate::slot::lock_data_dir(&b.dir.path().join("data")).unwrap();
    let e = b.roles().apply(&b.release("1.0.0", Up::Healthy), false).unwrap_err();
    assert!(matches!(e, ServiceError::Busy(_)), "{e:?}");
    assert!(e.to_string().contains("lock"), "{e}");
    assert!(matches!(b.roles().recover(), Err(ServiceError::Busy(_))));
    assert!(matches!(b.roles().command(Command::Enter), Err(ServiceError::Busy(_))));
    assert_eq!(b.running(), None);
    assert!(!b.layout().root.exists());
}

#[test]
fn too_little_free_space_is_refused_before_anything_is_staged() {
    let mut b = Bench::new();
    b.min_free_bytes = u64::MAX / 2;
    let e = b.roles().apply(&b.release("1.0.0", Up::Healthy), false).unwrap_err();
    let ServiceError::NoSpace { dir, free, need } = &e else { panic!("{e:?}") };
    assert_eq!(dir, &b.metrica());
    assert!(free < need, "{e}");
    assert!(e.to_string().contains("needed to unpack"), "{e}");
    assert!(!b.layout().root.exists());
    assert_eq!(b.history(), ["role-refused"]);
}

#[test]
fn a_release_of_another_role_or_a_bad_role_name_is_refused() {
    let b = Bench::new();
    let a = b.roles().apply_as(&b.release("1.0.0", Up::Healthy), Some("audio"), false).unwrap();
    assert!(
        matches!(&a.outcome, Outcome::Refused { error: ApplyError::WrongRole { .. }, .. }),
        "{a:?}"
    );
    assert_eq!(a.role, "audio");
    let e = b.roles().apply_as(&b.release("1.0.0", Up::Healthy), Some("Bad/Name"), false);
    assert!(matches!(e, Err(ServiceError::RoleName(n)) if n == "Bad/Name"));
    let empty = b.dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let a = b.apply(&Source::Folder(empty));
    assert!(matches!(&a.outcome, Outcome::Refused { error: ApplyError::Spec(_), .. }), "{a:?}");
    assert_eq!(b.history(), ["role-refused", "role-refused"]);
}

#[test]
fn three_failed_updates_enter_safe_mode_and_a_good_update_leaves_it() {
    let b = Bench::new();
    assert!(committed(&b.apply(&b.release("1.0.0", Up::Healthy))));
    for (i, v) in ["1.1.0", "1.2.0"].iter().enumerate() {
        let a = b.apply(&b.release(v, Up::Exits(1)));
        assert!(matches!(a.outcome, Outcome::RolledBack { .. }), "{i}: {a:?}");
        assert_eq!(a.safe_mode, None);
    }
    assert_eq!(b.running().as_deref(), Some("1.0.0"));
    let a = b.apply(&b.release("1.3.0", Up::Unhealthy));
    assert_eq!(a.safe_mode, Some(SafeModeChange::Entered(Reason::FailedUpdates { count: 3 })));
    assert_eq!((b.running(), b.safe_running()), (None, true));
    let st = b.roles().status().unwrap();
    assert_eq!(st.safe_mode.map(|m| m.reason), Some(Reason::FailedUpdates { count: 3 }));
    // The role is stopped in safe mode: its status says it is not healthy, and why.
    assert_eq!(st.roles[0].healthy, Some(false));
    assert!(st.roles[0].checks.iter().flatten().any(|c| !c.ok), "{:?}", st.roles[0]);
    // In safe mode a failed update keeps safe mode and its stack.
    let a = b.apply(&b.release("1.4.0", Up::Exits(2)));
    assert_eq!(a.safe_mode, None);
    assert_eq!((b.running(), b.safe_running()), (None, true));
    let a = b.apply(&b.release("1.5.0", Up::Healthy));
    assert!(committed(&a));
    assert_eq!(a.safe_mode, Some(SafeModeChange::Left(ExitReason::GoodUpdate)));
    assert_eq!((b.running().as_deref(), b.safe_running()), (Some("1.5.0"), false));
    assert!(safe_mode::read_marker(&b.metrica()).is_none());
    let h = b.history();
    assert!(h.contains(&"safe-mode-enter".to_string()), "{h:?}");
    assert_eq!(h.last().map(String::as_str), Some("safe-mode-exit"), "{h:?}");
    assert_eq!(h.iter().filter(|e| *e == "role-rolled-back").count(), 4, "{h:?}");
}

#[test]
fn the_operator_swaps_the_stacks_and_a_crash_loop_enters() {
    let b = Bench::new();
    assert!(committed(&b.apply(&b.release("1.0.0", Up::Healthy))));
    let r = b.roles();
    assert_eq!(r.command(Command::Exit).unwrap(), None, "not in safe mode: nothing to leave");
    assert_eq!(r.command(Command::Enter).unwrap(), Some(SafeModeChange::Entered(Reason::Operator)));
    assert_eq!((b.running(), b.safe_running()), (None, true));
    assert_eq!(r.command(Command::Enter).unwrap(), None);
    assert_eq!(r.command(Command::Exit).unwrap(), Some(SafeModeChange::Left(ExitReason::Operator)));
    assert_eq!((b.running().as_deref(), b.safe_running()), (Some("1.0.0"), false));
    let crash = Reason::CrashLoop { role: ROLE.into() };
    assert_eq!(r.enter_safe_mode(&crash).unwrap(), Some(SafeModeChange::Entered(crash.clone())));
    assert_eq!(r.enter_safe_mode(&crash).unwrap(), None, "already in safe mode");
    assert_eq!(
        b.history(),
        ["role-applied", "safe-mode-enter", "safe-mode-exit", "safe-mode-enter"]
    );
}

/// A device that never applied a role (bad provisioning at first boot): entering safe mode
/// loads the stack's own images, and the stack runs.
#[test]
fn safe_mode_on_a_fresh_device_loads_the_stacks_images() {
    let b = Bench::new();
    let bad = Reason::BadProvisioning { error: "device.toml: missing".into() };
    assert_eq!(b.roles().enter_safe_mode(&bad).unwrap(), Some(SafeModeChange::Entered(bad)));
    assert!(b.safe_running());
    let calls = b.fake.calls();
    let load = format!("load {}", b.safe_stack().join("images/web.tar").display());
    assert!(calls.contains(&load), "{calls:?}");
}

#[test]
fn safe_mode_with_the_engine_down_still_writes_the_marker() {
    let b = Bench::new();
    assert!(committed(&b.apply(&b.release("1.0.0", Up::Healthy))));
    b.fake.set_engine_down(true);
    let bad = Reason::BadProvisioning { error: "no device id".into() };
    assert!(b.roles().enter_safe_mode(&bad).unwrap().is_some());
    assert_eq!(safe_mode::read_marker(&b.metrica()).map(|m| m.reason), Some(bad));
    let events = b.events.borrow();
    assert!(events.iter().any(|e| e.msg.contains("engine is down")), "{events:?}");
}

#[test]
fn recover_finishes_a_cut_apply_and_runs_the_stack_safe_mode_says() {
    let b = Bench::new();
    assert!(committed(&b.apply(&b.release("1.0.0", Up::Healthy))));
    failpoint::arm("role-health", None);
    let e = b.roles().apply(&b.release("1.1.0", Up::Healthy), false).unwrap_err();
    failpoint::disarm();
    assert!(format!("{e:#}").contains("power cut at failpoint role-health"), "{e:#}");
    let got = b.roles().recover().unwrap();
    assert_eq!(
        got,
        [(
            ROLE.to_string(),
            Recovery::RolledBack {
                interrupted: "1.1.0".parse().unwrap(),
                running: Some("1.0.0".parse().unwrap())
            }
        )]
    );
    assert_eq!(b.running().as_deref(), Some("1.0.0"));
    assert_eq!(b.history().last().map(String::as_str), Some("role-rolled-back"));
    // With the marker, recover leaves the safe-mode stack running and the role stopped.
    safe_mode::write_marker(&b.metrica(), Reason::Operator).unwrap();
    let got = b.roles().recover().unwrap();
    assert_eq!(got, [(ROLE.to_string(), Recovery::Clean(Some("1.0.0".parse().unwrap())))]);
    assert_eq!((b.running(), b.safe_running()), (None, true));
}

#[test]
fn role_names_are_the_role_folders_only() {
    let b = Bench::new();
    assert_eq!(role_names(&b.metrica()).unwrap(), Vec::<String>::new());
    let roles = b.metrica().join("roles");
    for d in ["zigbee-hub", "audio-player", ".staging", "Bad"] {
        std::fs::create_dir_all(roles.join(d)).unwrap();
    }
    std::fs::write(roles.join("notes"), "").unwrap();
    assert_eq!(role_names(&b.metrica()).unwrap(), ["audio-player", "zigbee-hub"]);
}
