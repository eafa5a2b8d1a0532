//! Tests of the role runner on the fake engine, through the real roles service: decisions,
//! downloads of signed bundles applied, failures reported once and not retried, the
//! crash-loop watch, safe mode.

use std::time::Duration;

use sha2::{Digest, Sha256};

use super::*;
use crate::channel::tests::{sample, T0};
use crate::channel::{RoleTarget, Rollout};
use crate::role::apply::{self, Options, IMAGES_DIR};
use crate::role::bundle::testkit;
use crate::role::fake::{FakeEngine, Release, Up};
use crate::testserver::{Mode, TestServer};

const ROLE: &str = "web";
const NOW: u64 = T0 + 3600;

struct Bench {
    dir: tempfile::TempDir,
    fake: Arc<FakeEngine>,
    log: Log,
}

impl Bench {
    fn new() -> Bench {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("data/metrica")).unwrap();
        std::fs::create_dir_all(dir.path().join("root/dev")).unwrap();
        let log = Log::new(Some(dir.path().join("log.jsonl")), "dev-1");
        Bench { dir, fake: Arc::new(FakeEngine::new()), log }
    }

    fn metrica(&self) -> PathBuf {
        self.dir.path().join("data/metrica")
    }

    fn runner(&self, role: Result<&str, &str>) -> RoleRunner {
        let cfg = RoleConfig {
            metrica_dir: self.metrica(),
            sysroot: self.dir.path().join("root"),
            role: role.map(str::to_string).map_err(str::to_string),
            device_id: "dev-1".into(),
            segment: Segment::General,
            overrides: rollout::Overrides::default(),
            os_version: "2.0.0".parse().unwrap(),
            dev_root: self.dir.path().join("root"),
            min_free_bytes: 0,
            http: HttpOptions {
                timeout: Duration::from_secs(5),
                trust: None,
                retry: crate::bundle::RetryPolicy {
                    attempts: 2,
                    backoff: Duration::from_millis(5),
                },
            },
        };
        RoleRunner::new(cfg, self.fake.clone(), testkit::keyring_of(&testkit::test_key(7)))
    }

    fn layout(&self) -> RoleLayout {
        RoleLayout::new(&self.metrica(), ROLE)
    }

    /// A release folder of `version` (role.toml with a crash-loop rule of 3 restarts in 10
    /// minutes) whose stack behaves as `up` says.
    fn release(&self, version: &str, up: Up) -> PathBuf {
        let src = self.dir.path().join(format!("src-{version}"));
        std::fs::create_dir_all(src.join(IMAGES_DIR)).unwrap();
        let toml = format!(
            "[role]\nname = \"{ROLE}\"\nversion = \"{version}\"\nos = \">=1.0.0\"\nupdate_interval = \"1h\"\n\
             [apply]\nwait_timeout = \"1s\"\nhealth_timeout = \"50ms\"\nprobation = \"10ms\"\n\
             [crash_loop]\nrestarts = 3\nwindow = \"10m\"\n\
             [[health.container]]\nservice = \"web\"\n"
        );
        std::fs::write(src.join(ROLE_FILE), toml).unwrap();
        std::fs::write(src.join("compose.yaml"), "services: {}\n").unwrap();
        let image = format!("metrica.invalid/web:{version}");
        std::fs::write(src.join(IMAGES_DIR).join("web.tar"), format!("{image}\n")).unwrap();
        let release = Release { up, ..Release::new(&[("web", &image)]) };
        self.fake.release(&self.layout().release(&version.parse().unwrap()), release);
        src
    }

    /// Applies a release directly with the apply chain (not the service): the device's
    /// state before the runner looks. `up`: how the stack behaves once committed
    /// (`RestartsLater`: it starts crash-looping after its probation).
    fn install(&self, version: &str, up: Up) {
        let src = self.release(version, Up::Healthy);
        let log = |_: &Event| {};
        let opts = Options {
            os_version: "2.0.0".parse().unwrap(),
            force: false,
            dev_root: self.dir.path().join("root"),
            poll: Duration::from_millis(2),
            validate_timeout: Duration::from_secs(5),
            log: &log,
        };
        let o = apply::apply(self.fake.as_ref(), &self.layout(), &src, &opts).unwrap();
        assert!(matches!(o, Outcome::Committed { .. }), "{o:?}");
        if up != Up::Healthy {
            let dir = self.layout().release(&version.parse().unwrap());
            let image = format!("metrica.invalid/web:{version}");
            self.fake.release(&dir, Release { up, ..Release::new(&[("web", &image)]) });
            let project = Project::for_release(ROLE, &dir, Path::new("compose.yaml"));
            self.fake.up(&project, Duration::from_secs(1)).unwrap();
        }
    }

    /// A signed bundle of a release folder made by [`Bench::release`] (its image archive
    /// carried as `--images` does), its bytes.
    fn bundle(&self, version: &str, up: Up) -> Vec<u8> {
        let src = self.release(version, up);
        let images = self.dir.path().join(format!("images-{version}"));
        std::fs::rename(src.join(IMAGES_DIR), &images).unwrap();
        let out = self.dir.path().join(format!("out-{version}"));
        std::fs::create_dir_all(&out).unwrap();
        let key = testkit::test_key(7);
        let path = testkit::make_role_bundle(&src, &[images.join("web.tar")], &key, &out);
        std::fs::read(path).unwrap()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log.jsonl")).unwrap_or_default()
    }
}

fn channel_offering(version: &str, url: &str, body: &[u8]) -> Arc<Channel> {
    let mut c = sample();
    c.roles.insert(
        ROLE.into(),
        RoleTarget {
            version: version.parse().unwrap(),
            urls: vec![url.into()],
            size: body.len() as u64,
            sha256: hex::encode(Sha256::digest(body)),
            rollout: Rollout::everyone(),
            paused: false,
            pin: None,
        },
    );
    Arc::new(c)
}

#[test]
fn without_a_good_channel_or_a_target_the_role_stays() {
    let b = Bench::new();
    let mut r = b.runner(Ok(ROLE));
    assert_eq!(r.cycle(&b.log, NOW), CycleOutcome::Stayed { code: "no_channel".into() });
    r.offer(Some(Arc::new(sample())), "http://m/channels/stable.toml".into());
    assert_eq!(r.cycle(&b.log, NOW), CycleOutcome::Stayed { code: "no_target".into() });
    let d = RoleRecord::load(&b.metrica()).decision.unwrap();
    assert_eq!((d.role.as_str(), d.code.as_str()), (ROLE, "no_target"));
    assert!(d.reason.contains("[roles.web]"), "{d:?}");
    // Invalid provisioning: no role is run at all.
    let mut bad = b.runner(Err("device.toml: role: missing"));
    assert_eq!(bad.cycle(&b.log, NOW), CycleOutcome::NoRole);
}

#[test]
fn a_role_at_the_target_version_stays_up_to_date() {
    let b = Bench::new();
    b.install("1.0.0", Up::Healthy);
    let mut r = b.runner(Ok(ROLE));
    r.offer(Some(channel_offering("1.0.0", "x.mfr", b"x")), "http://m/channels/stable.toml".into());
    assert_eq!(r.cycle(&b.log, NOW), CycleOutcome::Stayed { code: "up_to_date".into() });
}

/// The target is downloaded (relative URL resolved on the channel's URL), verified and applied
/// through the service: the new release is committed.
#[test]
fn the_target_is_downloaded_verified_and_applied() {
    let b = Bench::new();
    b.install("1.0.0", Up::Healthy);
    let body = b.bundle("1.1.0", Up::Healthy);
    let s = TestServer::empty(Mode::Normal);
    s.put("/roles/web-1.1.0.mfr", &body);
    // A download of a version the channel no longer offers is removed.
    let stale = b.metrica().join(DOWNLOADS).join("web-1.0.9.mfr.part");
    std::fs::create_dir_all(stale.parent().unwrap()).unwrap();
    std::fs::write(&stale, b"old").unwrap();
    let mut r = b.runner(Ok(ROLE));
    let channel = channel_offering("1.1.0", "../roles/web-1.1.0.mfr", &body);
    r.offer(Some(channel.clone()), s.url_of("/channels/stable.toml"));
    let CycleOutcome::Took { version, result } = r.cycle(&b.log, NOW) else { panic!() };
    assert_eq!(version.to_string(), "1.1.0");
    assert!(result.is_ok(), "{result:?}");
    assert!(!stale.exists());
    assert_eq!(b.layout().read_link(crate::role::layout::Link::Current).unwrap(), Some(version));
    assert!(RoleRecord::load(&b.metrica()).errors.is_empty());
    r.offer(Some(channel), s.url_of("/channels/stable.toml"));
    assert_eq!(r.cycle(&b.log, NOW + 60), CycleOutcome::Stayed { code: "up_to_date".into() });
    assert!(b.log_text().contains("\"role\":\"web\""), "log lines name the role");
}

/// A failure that may pass (another updater command holds the lock) is reported once, waits
/// for the throttle, and is tried again from the verified download (no new request).
#[test]
fn a_transient_failure_is_reported_once_and_retried_from_the_download() {
    let b = Bench::new();
    b.install("1.0.0", Up::Healthy);
    let body = b.bundle("1.1.0", Up::Healthy);
    let s = TestServer::empty(Mode::Normal);
    s.put("/roles/web-1.1.0.mfr", &body);
    let mut r = b.runner(Ok(ROLE));
    let channel = channel_offering("1.1.0", "../roles/web-1.1.0.mfr", &body);
    let held = crate::slot::lock_data_dir(&b.dir.path().join("data")).unwrap();
    r.offer(Some(channel.clone()), s.url_of("/channels/stable.toml"));
    let CycleOutcome::Took { result, .. } = r.cycle(&b.log, NOW) else { panic!() };
    let err = result.unwrap_err();
    assert!(err.contains("role web"), "{err}");
    let dest = b.metrica().join(DOWNLOADS).join("web-1.1.0.mfr");
    assert_eq!(std::fs::read(&dest).unwrap(), body, "downloaded and verified before the apply");
    r.offer(Some(channel.clone()), s.url_of("/channels/stable.toml"));
    assert_eq!(r.cycle(&b.log, NOW + 60), CycleOutcome::Stayed { code: "throttled".into() });
    let rec = RoleRecord::load(&b.metrica());
    assert_eq!(rec.errors.len(), 1, "{:?}", rec.errors);
    assert_eq!(rec.errors[0].kind, "role_busy");
    assert!(rec.failed.is_empty(), "a transient failure does not bar the version");
    drop(held);
    let requests = s.requests();
    r.offer(Some(channel), s.url_of("/channels/stable.toml"));
    let CycleOutcome::Took { result, .. } = r.cycle(&b.log, NOW + 3600) else { panic!() };
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(s.requests(), requests);
    assert_eq!(RoleRecord::load(&b.metrica()).errors.len(), 1, "still reported once");
}

#[test]
fn a_bundle_that_does_not_match_the_channel_is_not_taken_again() {
    let b = Bench::new();
    let s = TestServer::empty(Mode::Normal);
    s.put("/web.mfr", b"not the bundle the channel names");
    let mut r = b.runner(Ok(ROLE));
    let channel = channel_offering("1.1.0", "/web.mfr", b"the real bundle");
    r.offer(Some(channel.clone()), s.url_of("/channels/stable.toml"));
    let CycleOutcome::Took { result, .. } = r.cycle(&b.log, NOW) else { panic!() };
    assert!(result.unwrap_err().contains("sha256"));
    assert!(RoleRecord::load(&b.metrica()).failed.contains("web@1.1.0"));
    r.offer(Some(channel), s.url_of("/channels/stable.toml"));
    let later = NOW + 86_400;
    assert_eq!(r.cycle(&b.log, later), CycleOutcome::Stayed { code: "version_failed".into() });
}

#[test]
fn an_unreachable_server_is_a_transient_download_failure() {
    let b = Bench::new();
    let mut r = b.runner(Ok(ROLE));
    r.offer(Some(channel_offering("1.1.0", "http://127.0.0.1:1/web.mfr", b"b")), String::new());
    let CycleOutcome::Took { result, .. } = r.cycle(&b.log, NOW) else { panic!() };
    assert!(result.unwrap_err().contains("download"));
    let rec = RoleRecord::load(&b.metrica());
    assert!(rec.failed.is_empty());
    assert_eq!(rec.errors[0].kind, "role_download");
}

/// The watch samples the restart count at each poll; 3 restarts in 10 minutes (the role's
/// `[crash_loop]`) is a crash loop: the version is barred and, with no previous release,
/// safe mode is asked of the service.
#[test]
fn a_crash_loop_is_detected_from_the_restart_count() {
    let b = Bench::new();
    b.install("1.0.0", Up::RestartsLater);
    let mut r = b.runner(Ok(ROLE));
    let mut outcomes = Vec::new();
    for i in 0..4 {
        outcomes.push(r.cycle(&b.log, NOW + i * 60));
    }
    // The fake adds a restart at each `ps`: 0, 1, 2, 3 over three minutes.
    assert_eq!(outcomes[..3], vec![CycleOutcome::Stayed { code: "no_channel".into() }; 3]);
    assert_eq!(outcomes[3], CycleOutcome::CrashLoop { rolled_back: false });
    let rec = RoleRecord::load(&b.metrica());
    assert!(rec.failed.contains("web@1.0.0"), "{rec:?}");
    let kinds: Vec<&str> = rec.errors.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["role_crash_loop"]);
    let marker = safe_mode::read_marker(&b.metrica()).expect("safe mode entered");
    assert_eq!(marker.reason.to_string(), "role web is crash-looping");
}

#[test]
fn restarts_spread_wider_than_the_window_are_no_crash_loop() {
    let b = Bench::new();
    b.install("1.0.0", Up::RestartsLater);
    let mut r = b.runner(Ok(ROLE));
    for i in 0..6 {
        let o = r.cycle(&b.log, NOW + i * 400);
        assert_eq!(o, CycleOutcome::Stayed { code: "no_channel".into() }, "poll {i}");
    }
    assert!(RoleRecord::load(&b.metrica()).failed.is_empty());
}

#[test]
fn a_down_engine_is_recorded_and_reported_once() {
    let b = Bench::new();
    b.install("1.0.0", Up::Healthy);
    b.fake.set_engine_down(true);
    let mut r = b.runner(Ok(ROLE));
    r.cycle(&b.log, NOW);
    r.cycle(&b.log, NOW + 60);
    let rec = RoleRecord::load(&b.metrica());
    assert_eq!(rec.engine_up, Some(false));
    assert_eq!(rec.errors.len(), 1);
    assert_eq!(rec.errors[0].kind, "engine_unavailable");
    b.fake.set_engine_down(false);
    r.cycle(&b.log, NOW + 120);
    assert_eq!(RoleRecord::load(&b.metrica()).engine_up, Some(true));
}

#[test]
fn start_reports_a_missing_safe_mode_stack_and_asks_safe_mode_for_bad_provisioning() {
    let b = Bench::new();
    let mut r = b.runner(Err("provision partition: device.toml: role: expected a role name"));
    r.start(&b.log, NOW);
    r.start(&b.log, NOW + 1);
    let rec = RoleRecord::load(&b.metrica());
    let kinds: Vec<&str> = rec.errors.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["safe_mode_stack_missing"], "reported once over two starts");
    let marker = safe_mode::read_marker(&b.metrica()).expect("safe mode entered");
    assert!(marker.reason.to_string().contains("invalid provisioning: provision partition"));
}

/// A baked file that is not a valid bundle is refused by the bundle reader: reported once,
/// nothing half unpacked is left, and the next start (same file) reports it no more.
#[test]
fn a_baked_safe_mode_stack_that_does_not_verify_is_reported_and_leaves_nothing() {
    let b = Bench::new();
    let baked = baked_bundle(&b.dir.path().join("root"), SAFE_MODE_ROLE);
    std::fs::create_dir_all(baked.parent().unwrap()).unwrap();
    std::fs::write(&baked, b"not a bundle").unwrap();
    let mut r = b.runner(Ok(ROLE));
    r.start(&b.log, NOW);
    r.start(&b.log, NOW + 1);
    let rec = RoleRecord::load(&b.metrica());
    assert_eq!(rec.safe_mode_stack, None);
    let failed: Vec<&NamedError> =
        rec.errors.iter().filter(|e| e.kind == "safe_mode_stack_failed").collect();
    assert_eq!(failed.len(), 1, "{rec:?}");
    assert!(failed[0].message.contains(&baked.display().to_string()), "{failed:?}");
    assert!(!b.metrica().join(SAFE_MODE_STACK).exists());
    assert!(!b.metrica().join(format!(".{SAFE_MODE_STACK}.new")).exists());
}

/// The endpoints' role section: restarts of the running stack, the runner's record, the
/// safe-mode marker, and the engine's state (here from the sample, the service being
/// unwritten on this branch: its refusal is the section's `error`).
#[test]
fn the_status_source_reads_restarts_record_marker_and_engine() {
    use crate::role_report::RoleSource;
    let b = Bench::new();
    b.install("1.0.0", Up::RestartsLater);
    let mut r = b.runner(Ok(ROLE));
    r.cycle(&b.log, NOW);
    let source = r.status_source();
    let s = source.section();
    assert!(s.restarts.get(ROLE).is_some_and(|n| *n >= 1), "{:?}", s.restarts);
    assert_eq!(s.daemon, RoleRecord::load(&b.metrica()));
    assert!(s.safe_mode.is_none());
    assert_eq!(s.engine_up, Some(true));
    // Until the service lands, its refusal is the section's error.
    assert_eq!(s.roles.is_none(), s.error.as_deref().is_some_and(|e| e.contains("not written")));
    safe_mode::write_marker(&b.metrica(), Reason::Operator).unwrap();
    b.fake.set_engine_down(true);
    let s = source.section();
    assert_eq!(s.safe_mode.map(|m| m.reason), Some(Reason::Operator));
    assert_eq!(s.engine_up, Some(false));
    assert!(s.restarts.is_empty());
}

// ---- Through the roles service (the `rolecli` branch) ----

#[test]
fn a_crash_loop_rolls_back_to_the_previous_release_that_ran_well() {
    let b = Bench::new();
    b.install("1.0.0", Up::Healthy);
    b.install("1.1.0", Up::RestartsLater);
    let mut r = b.runner(Ok(ROLE));
    let mut last = None;
    for i in 0..4 {
        last = Some(r.cycle(&b.log, NOW + i * 60));
    }
    assert_eq!(last, Some(CycleOutcome::CrashLoop { rolled_back: true }));
    assert_eq!(b.layout().read_link(Link::Current).unwrap().unwrap().to_string(), "1.0.0");
    let rec = RoleRecord::load(&b.metrica());
    assert!(rec.failed.contains("web@1.1.0"));
    assert_eq!(rec.crash_rollbacks.get(ROLE), Some(&1));
    assert!(safe_mode::read_marker(&b.metrica()).is_none());
}

#[test]
fn a_crash_loop_without_a_good_previous_enters_safe_mode() {
    let b = Bench::new();
    b.install("1.0.0", Up::RestartsLater);
    let mut r = b.runner(Ok(ROLE));
    let mut last = None;
    for i in 0..4 {
        last = Some(r.cycle(&b.log, NOW + i * 60));
    }
    assert_eq!(last, Some(CycleOutcome::CrashLoop { rolled_back: false }));
    let m = safe_mode::read_marker(&b.metrica()).expect("safe mode");
    assert_eq!(m.reason, Reason::CrashLoop { role: ROLE.into() });
}

#[test]
fn invalid_provisioning_enters_safe_mode_at_start() {
    let b = Bench::new();
    let mut r = b.runner(Err("provision partition: device.toml: role: expected a role name"));
    r.start(&b.log, NOW);
    let m = safe_mode::read_marker(&b.metrica()).expect("safe mode");
    assert!(matches!(m.reason, Reason::BadProvisioning { .. }), "{m:?}");
    assert_eq!(r.cycle(&b.log, NOW), CycleOutcome::NoRole);
}

#[test]
fn start_recovers_an_interrupted_apply() {
    let b = Bench::new();
    b.install("1.0.0", Up::Healthy);
    let mut state = b.layout().read_state().unwrap();
    state.pending = Some("1.1.0".parse().unwrap());
    b.layout().write_state(&state).unwrap();
    let mut r = b.runner(Ok(ROLE));
    r.start(&b.log, NOW);
    assert_eq!(b.layout().read_state().unwrap().pending, None);
    assert!(RoleRecord::load(&b.metrica()).errors.iter().all(|e| e.kind != "role_service"));
}
