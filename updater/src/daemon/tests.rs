//! The daemon's polls against a loopback file server, with a test planner (a tiny document
//! format whose checks name the same kinds as the channel module's) and a test installer
//! that records the install in the state as the real one does.

use super::*;
use crate::testserver::{Mode, TestServer};
use crate::testutil::disk_committed;
use std::cell::RefCell;
use std::rc::Rc;

const T0: u64 = 1_800_000_000;

/// `sequence = N`, `expires = T`, `version = "x"`, `url = "..."`; the signature must be `ok`.
struct TestPlanner;

impl Planner for TestPlanner {
    fn plan(
        &self,
        doc: &Document,
        input: &PlanInput<'_>,
        now: u64,
    ) -> Result<Plan, ChannelProblem> {
        let problem = |kind: &str, message: String| ChannelProblem { kind: kind.into(), message };
        if doc.sig.as_deref() != Some(b"ok") {
            return Err(problem("signature", "signature does not verify".into()));
        }
        let t: toml::Table = std::str::from_utf8(&doc.toml)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| problem("malformed", "not TOML".into()))?;
        let sequence = t["sequence"].as_integer().unwrap() as u64;
        if input.state.channel_sequence("stable").is_some_and(|s| sequence < s) {
            return Err(problem("replay", format!("sequence {sequence} below the last seen")));
        }
        let expires = t["expires"].as_integer().unwrap() as u64;
        if now > expires {
            return Err(problem("expired", format!("expired at {expires}")));
        }
        let version: semver::Version = t["version"].as_str().unwrap().parse().unwrap();
        let committed = input.state.slot(input.state.committed).version.clone();
        let decision = if committed.as_ref().is_some_and(|c| *c >= version) {
            Decision::Stay {
                code: "up_to_date".into(),
                reason: format!("running {version} already"),
                follow: None,
            }
        } else {
            Decision::Install {
                version: version.clone(),
                urls: vec![t["url"].as_str().unwrap().into()],
                pinned: false,
                code: "rollout".into(),
                reason: "selected by the rollout".into(),
            }
        };
        Ok(Plan {
            channel: ChannelView {
                sequence,
                expires: Some(expires),
                target_version: Some(version),
                document: None,
            },
            decision,
        })
    }
}

#[derive(Default)]
struct Calls(RefCell<Vec<String>>);

struct TestInstaller(Rc<Calls>);

impl Installer for TestInstaller {
    fn install(
        &self,
        url: &str,
        target: Slot,
        _pinned: Option<&semver::Version>,
        device: &Device,
        now: u64,
    ) -> Result<semver::Version, InstallFailure> {
        self.0 .0.borrow_mut().push(url.to_string());
        let version: semver::Version =
            url.rsplit('-').next().unwrap().trim_end_matches(".mfb").parse().unwrap();
        device.begin_install(&version, 0, false, None, now).unwrap();
        device.finish_install(target, &version, now).unwrap();
        Ok(version)
    }
}

struct TestReboot(Rc<Calls>);

impl Reboot for TestReboot {
    fn reboot(&self, mode: RebootMode) -> anyhow::Result<()> {
        self.0 .0.borrow_mut().push(mode.describe().to_string());
        Ok(())
    }
}

struct Rig {
    dir: tempfile::TempDir,
    daemon: Daemon,
    installs: Rc<Calls>,
    reboots: Rc<Calls>,
}

fn doc(sequence: u64, version: &str) -> String {
    format!("sequence = {sequence}\nexpires = {}\nversion = \"{version}\"\nurl = \"../bundles/os-{version}.mfb\"\n", T0 + 30 * 86400)
}

fn publish(s: &TestServer, body: &str, sig: &str) {
    s.put("/channels/stable.toml", body.as_bytes());
    s.put("/channels/stable.toml.sig", sig.as_bytes());
}

fn rig(mirrors: &[&str], no_reboot: bool) -> Rig {
    rig_with(mirrors, no_reboot, Box::new(TestPlanner), "c")
}

fn rig_with(mirrors: &[&str], no_reboot: bool, planner: Box<dyn Planner>, compatible: &str) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("card.img");
    disk_committed(&disk, Slot::A);
    let device = Device::new(&disk, dir.path().join("data"));
    let config = Config {
        mirrors: mirrors.iter().map(|m| m.to_string()).collect(),
        channel: "stable".into(),
        interval: DEFAULT_INTERVAL,
        listen: "127.0.0.1:0".into(),
        min_free_bytes: 0,
        request_deadline: Duration::from_millis(1500),
        no_reboot,
        device_id: "dev-1".into(),
        segment: "general".into(),
        unprovisioned: None,
    };
    let installs = Rc::new(Calls::default());
    let reboots = Rc::new(Calls::default());
    let running = Release {
        name: "m".into(),
        version: "1.0.0".parse().unwrap(),
        compatible: compatible.into(),
        build_epoch: 1,
        security_epoch: 0,
    };
    let daemon = Daemon {
        fetcher: ChannelFetcher::new(config.mirrors.clone(), "stable", config.request_deadline),
        record: Daemon::open_record(&device, &config, T0),
        roles: None,
        cache: Cache::new(&device.data_dir),
        log: Log::new(Some(dir.path().join("log.jsonl")), "dev-1"),
        booted: None,
        running: Some(running),
        planner,
        installer: Box::new(TestInstaller(installs.clone())),
        rebooter: Box::new(TestReboot(reboots.clone())),
        device,
        config,
    };
    Rig { dir, daemon, installs, reboots }
}

impl Rig {
    fn log(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("log.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
    fn events(&self, event: &str) -> Vec<serde_json::Value> {
        self.log().into_iter().filter(|l| l["event"] == event).collect()
    }
    fn status(&self) -> serde_json::Value {
        serde_json::to_value(self.daemon.device.status(Err("test".into()), 50)).unwrap()
    }
    fn history(&self, event: &HistoryEvent) -> Vec<Entry> {
        let h = self.daemon.device.history();
        h.tail(1000).unwrap().into_iter().filter(|e| &e.event == event).collect()
    }
    fn committed_version(&self) -> String {
        let s = self.daemon.device.status(Err("test".into()), 0).state.unwrap();
        s.slot(s.committed).version.as_ref().unwrap().to_string()
    }
}

fn seed_state(r: &Rig) {
    let d = &r.daemon.device;
    d.open_state(Some(Slot::A), r.daemon.running.as_ref(), T0).unwrap();
}

#[test]
fn installs_what_the_rollout_says_then_reboots_for_the_trial() {
    let s = TestServer::empty(Mode::Normal);
    publish(&s, &doc(1, "2.0.0"), "ok");
    let mut r = rig(&[&s.base], false);
    seed_state(&r);
    let out = r.daemon.poll(T0);
    assert_eq!(out, PollOutcome::Installed { version: "2.0.0".parse().unwrap(), trial: true });
    assert_eq!(*r.installs.0.borrow(), [format!("{}/bundles/os-2.0.0.mfb", s.base)]);
    assert_eq!(*r.reboots.0.borrow(), ["tryboot"]);
    let st = r.status();
    assert_eq!(st["state"]["trial"]["slot"], "b");
    assert_eq!(st["state"]["channel_sequences"]["stable"], 1);
    assert_eq!(st["daemon"]["channel"]["sequence"], 1);
    assert_eq!(st["daemon"]["decision"]["outcome"], "install");
    assert_eq!(st["connectivity"], "online");
    assert_eq!(
        r.history(&HistoryEvent::Decision)[0].reason.as_deref(),
        Some("install: selected by the rollout")
    );
    // The document is cached for the next poll and for restarts.
    assert!(r.daemon.cache.load("stable").is_some());
}

#[test]
fn no_reboot_installs_once_and_leaves_the_trial_to_the_operator() {
    let s = TestServer::empty(Mode::Normal);
    publish(&s, &doc(1, "2.0.0"), "ok");
    let mut r = rig(&[&s.base], true);
    seed_state(&r);
    assert_eq!(
        r.daemon.poll(T0),
        PollOutcome::Installed { version: "2.0.0".parse().unwrap(), trial: false }
    );
    assert_eq!(
        r.daemon.poll(T0 + 300),
        PollOutcome::Installed { version: "2.0.0".parse().unwrap(), trial: false }
    );
    assert_eq!(r.installs.0.borrow().len(), 1, "slot b already holds 2.0.0: not installed twice");
    assert!(r.reboots.0.borrow().is_empty());
    assert_eq!(r.events("trial_skipped").len(), 2);
}

#[test]
fn an_unchanged_channel_is_a_conditional_get_and_every_decision_is_logged() {
    let s = TestServer::empty(Mode::Normal);
    publish(&s, &doc(1, "1.0.0"), "ok");
    let mut r = rig(&[&s.base], false);
    seed_state(&r);
    for i in 0..3 {
        let out = r.daemon.poll(T0 + i * 300);
        assert_eq!(out, PollOutcome::Stayed { reason: "running 1.0.0 already".into() });
    }
    assert_eq!(s.requests(), 4, "document + signature once, then one 304 per poll");
    assert_eq!(s.not_modified(), 2);
    assert_eq!(r.events("decision").len(), 3, "every decision is logged");
    assert_eq!(
        r.history(&HistoryEvent::Decision).len(),
        1,
        "the history gets a decision when it changes"
    );
    assert_eq!(r.status()["daemon"]["counters"]["not_modified"], 2);
}

#[test]
fn bad_documents_are_named_errors_and_the_last_good_one_stays() {
    let s = TestServer::empty(Mode::Normal);
    publish(&s, &doc(5, "1.0.0"), "ok");
    let mut r = rig(&[&s.base], false);
    seed_state(&r);
    r.daemon.poll(T0);
    for (body, sig, kind) in [
        (doc(6, "9.0.0"), "forged", "channel_signature"),
        (doc(4, "9.0.0"), "ok", "channel_replay"),
        ("sequence = [".to_string(), "ok", "channel_malformed"),
    ] {
        publish(&s, &body, sig);
        let out = r.daemon.poll(T0 + 300);
        assert_eq!(out, PollOutcome::Stayed { reason: "running 1.0.0 already".into() }, "{kind}");
        let st = r.status();
        assert_eq!(st["daemon"]["last_error"]["kind"], kind);
        assert!(st["daemon"]["last_error"]["message"]
            .as_str()
            .unwrap()
            .contains("keeping the last good one"));
        assert_eq!(st["daemon"]["channel"]["sequence"], 5, "{kind}");
        assert!(r.installs.0.borrow().is_empty());
        assert_eq!(r.events(kind).len(), 1, "{kind}");
    }
    assert_eq!(r.committed_version(), "1.0.0");
}

#[test]
fn an_expired_cached_document_is_not_acted_on() {
    let s = TestServer::empty(Mode::Normal);
    publish(&s, &doc(1, "1.0.0"), "ok");
    let mut r = rig(&[&s.base], false);
    seed_state(&r);
    r.daemon.poll(T0);
    publish(&s, &doc(2, "2.0.0"), "ok");
    s.set_mode(Mode::Status(500));
    let out = r.daemon.poll(T0 + 31 * 86400);
    assert_eq!(out, PollOutcome::NoChannel);
    let st = r.status();
    assert_eq!(st["daemon"]["last_error"]["kind"], "channel_expired");
    let kinds: Vec<&str> = st["daemon"]["poll_errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["channel_unreachable", "channel_expired"]);
    assert_eq!(
        st["daemon"]["decision"]["reason"],
        "no good channel document: running what is installed"
    );
    assert!(r.installs.0.borrow().is_empty());
}

/// The bad network answers of the issue, one after the other; each is a named error in the
/// log and in the status, and the device keeps what it runs.
#[test]
fn html_500_slow_loris_and_a_down_mirror_with_failover() {
    let s = TestServer::empty(Mode::Normal);
    publish(&s, &doc(1, "1.0.0"), "ok");
    let mut r = rig(&[&s.base], false);
    seed_state(&r);
    r.daemon.poll(T0);
    for (mode, kind) in
        [(Mode::Html, "not_toml"), (Mode::Status(500), "http_5xx"), (Mode::SlowLoris, "timeout")]
    {
        s.set_mode(mode);
        let out = r.daemon.poll(T0 + 300);
        assert_eq!(out, PollOutcome::Stayed { reason: "running 1.0.0 already".into() }, "{mode:?}");
        let st = r.status();
        assert_eq!(st["daemon"]["last_error"]["kind"], "channel_unreachable", "{mode:?}");
        assert_eq!(st["daemon"]["counters"]["fetch_errors"][kind], 1, "{mode:?}");
        let logged = r.events("channel_fetch_failed");
        assert_eq!(logged.last().unwrap()["kind"], kind);
    }
    s.set_mode(Mode::Normal);
    // A mirror that is down before a good one: failover, and the poll is clean.
    let mut r2 = rig(&["http://127.0.0.1:1", &s.base], false);
    seed_state(&r2);
    let out = r2.daemon.poll(T0);
    assert_eq!(out, PollOutcome::Stayed { reason: "running 1.0.0 already".into() });
    let st = r2.status();
    assert_eq!(st["daemon"]["counters"]["fetch_errors"]["unreachable"], 1);
    assert_eq!(st["daemon"]["channel"]["mirror"], s.base.as_str());
    assert_eq!(st["daemon"]["last_contact"], T0);
    assert_eq!(r.committed_version(), "1.0.0");
}

#[test]
fn long_without_network_goes_degraded_then_airgapped_and_back() {
    let s = TestServer::empty(Mode::Normal);
    publish(&s, &doc(1, "1.0.0"), "ok");
    let mut r = rig(&[&s.base], false);
    seed_state(&r);
    r.daemon.poll(T0);
    s.set_mode(Mode::Status(503));
    let mut seen = Vec::new();
    for h in [1, 5, 6, 12, 23, 24, 48] {
        r.daemon.poll(T0 + h * 3600);
        seen.push(r.status()["daemon"]["connectivity"].as_str().unwrap().to_string());
    }
    assert_eq!(
        seen,
        ["online", "online", "degraded", "degraded", "degraded", "airgapped", "airgapped"]
    );
    s.set_mode(Mode::Normal);
    r.daemon.poll(T0 + 49 * 3600);
    assert_eq!(r.status()["daemon"]["connectivity"], "online");
    let changes: Vec<String> = r
        .events("connectivity_changed")
        .iter()
        .map(|e| e["msg"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        changes,
        [
            "connectivity online -> degraded",
            "connectivity degraded -> airgapped",
            "connectivity airgapped -> online"
        ]
    );
    assert_eq!(r.history(&HistoryEvent::Connectivity).len(), 3);
    // Through it all the cached channel kept deciding, and nothing was installed.
    assert_eq!(r.events("decision").len(), 9);
    assert_eq!(r.committed_version(), "1.0.0");
}

#[test]
fn low_disk_refuses_the_install() {
    let s = TestServer::empty(Mode::Normal);
    publish(&s, &doc(1, "2.0.0"), "ok");
    let mut r = rig(&[&s.base], false);
    seed_state(&r);
    r.daemon.config.min_free_bytes = u64::MAX;
    let out = r.daemon.poll(T0);
    let PollOutcome::InstallFailed(f) = out else { panic!("{out:?}") };
    assert_eq!(f.kind, "disk_low");
    assert!(f.message.contains("below the floor of"), "{}", f.message);
    assert!(r.installs.0.borrow().is_empty());
    assert_eq!(r.status()["daemon"]["last_error"]["kind"], "disk_low");
    assert_eq!(r.history(&HistoryEvent::Refused).len(), 1);
    // The disk stays full: refused at every poll, logged every time, in the history once.
    for i in 1..5 {
        assert!(matches!(r.daemon.poll(T0 + i * 300), PollOutcome::InstallFailed(_)));
    }
    assert_eq!(r.events("disk_low").len(), 5);
    assert_eq!(r.history(&HistoryEvent::Refused).len(), 1);
}

/// Installs wait for the committed slot's plain boot and for no pending trial: the state's
/// one rule, under the daemon's stable kinds and wording.
#[test]
fn installs_wait_outside_the_committed_slot_and_during_a_trial() {
    use crate::bootinfo::{BootInfo, BootInfoSource};
    let s = TestServer::empty(Mode::Normal);
    publish(&s, &doc(1, "2.0.0"), "ok");
    let mut r = rig(&[&s.base], false);
    seed_state(&r);
    let at = |slot: Slot, tryboot: bool| BootInfo {
        partition: slot.boot().number,
        tryboot,
        source: BootInfoSource::KernelCmdline,
    };
    for booted in [at(Slot::B, false), at(Slot::A, true)] {
        r.daemon.booted = Some(booted);
        let out = r.daemon.poll(T0);
        let PollOutcome::InstallFailed(f) = out else { panic!("{out:?}") };
        assert_eq!(f.kind, "not_committed_slot");
        assert_eq!(f.message, format!("booted {booted}, not the committed slot a: installs wait"),);
    }
    r.daemon.booted = Some(at(Slot::A, false));
    let d = &r.daemon.device;
    d.begin_install(&"1.5.0".parse().unwrap(), 0, false, None, T0).unwrap();
    d.finish_install(Slot::B, &"1.5.0".parse().unwrap(), T0).unwrap();
    d.start_trial(None, T0).unwrap();
    let out = r.daemon.poll(T0 + 300);
    let PollOutcome::InstallFailed(f) = out else { panic!("{out:?}") };
    assert_eq!((f.kind, f.message.as_str()), ("trial_pending", "a trial of slot b is pending"));
    assert!(r.installs.0.borrow().is_empty());
}

#[test]
fn a_held_lock_skips_the_decision() {
    let s = TestServer::empty(Mode::Normal);
    publish(&s, &doc(1, "2.0.0"), "ok");
    let mut r = rig(&[&s.base], false);
    seed_state(&r);
    let held = r.daemon.device.lock().unwrap();
    assert_eq!(r.daemon.poll(T0), PollOutcome::Busy);
    drop(held);
    assert!(matches!(r.daemon.poll(T0 + 1), PollOutcome::Installed { .. }));
}

#[test]
fn bad_flags_are_refused_naming_the_flag() {
    let r = rig(&["http://m"], false);
    let ok = r.daemon.config;
    assert!(ok.validate().is_ok());
    type Change = Box<dyn Fn(&mut Config)>;
    let cases: Vec<(Change, &str)> = vec![
        (Box::new(|c| c.mirrors.clear()), "--mirror: at least one mirror is needed"),
        (
            Box::new(|c| c.mirrors = vec!["ftp://m".into()]),
            "--mirror \"ftp://m\": expected an http:// or https:// URL with a host",
        ),
        (Box::new(|c| c.mirrors = vec!["http:///x".into()]), "--mirror \"http:///x\": expected"),
        (
            Box::new(|c| c.channel = "../etc".into()),
            "--channel \"../etc\": not a valid channel name",
        ),
        (
            Box::new(|c| c.segment = "beta".into()),
            "--segment: unknown segment \"beta\"; expected one of canary, early, general",
        ),
        (Box::new(|c| c.interval = Duration::ZERO), "--interval 0"),
        (
            Box::new(|c| c.listen = "localhost".into()),
            "--listen \"localhost\": expected an IP address and port",
        ),
    ];
    for (change, want) in cases {
        let mut c = ok.clone();
        change(&mut c);
        let e = c.validate().unwrap_err().to_string();
        assert!(e.starts_with(want), "{e}");
    }
}

#[test]
fn jitter_stays_within_twenty_percent() {
    let mut j = Jitter(1);
    let (mut lo, mut hi) = (u64::MAX, 0);
    for _ in 0..10_000 {
        let d = crate::rollout::poll_delay(Duration::from_secs(300), j.next_u64()).as_secs();
        lo = lo.min(d);
        hi = hi.max(d);
    }
    assert!(lo >= 240 && hi <= 360, "{lo}..{hi}");
    assert!(lo < 245 && hi > 355, "the source spreads polls over the whole range: {lo}..{hi}");
}

/// The loop with its endpoints: /health, /metrics, /status (the same JSON as `updater
/// status --json`), /check-now waking the loop at once, and a clean stop; systemd is told
/// READY=1 once the endpoints serve, and STOPPING=1.
#[test]
fn the_loop_serves_its_endpoints_and_wakes_on_check_now() {
    let s = TestServer::empty(Mode::Normal);
    publish(&s, &doc(1, "1.0.0"), "ok");
    let mut r = rig(&[&s.base], false);
    seed_state(&r);
    r.daemon.config.interval = Duration::from_secs(3600);
    let record = record::record_path(&r.daemon.device.data_dir);
    let device = r.daemon.device.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let stop = tx.clone();
    let client = std::thread::spawn(move || {
        let wait_for = |what: &dyn Fn(&DaemonRecord) -> bool| {
            for _ in 0..200 {
                if let Ok(Some(rec)) = DaemonRecord::load(&record) {
                    if what(&rec) {
                        return rec;
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            panic!("the daemon record never got there");
        };
        let rec = wait_for(&|r| r.counters.polls == 1 && r.next_poll.is_some());
        let base = format!("http://{}", rec.listen);
        let get = |path: &str| match ureq::get(&format!("{base}{path}")).call() {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
            Err(e) => panic!("{path}: {e}"),
        };
        let (code, health) = get("/health");
        assert_eq!(code, 200, "{health}");
        let (code, metrics) = get("/metrics");
        assert_eq!(code, 200);
        assert!(metrics.contains("metrica_channel_sequence 1\n"), "{metrics}");
        let (code, status) = get("/status");
        assert_eq!(code, 200);
        let status: serde_json::Value = serde_json::from_str(&status).unwrap();
        let cli = serde_json::to_value(device.status(Err("unknown".into()), 10)).unwrap();
        let keys =
            |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&status), keys(&cli), "/status and `updater status --json` are one shape");
        assert_eq!(status["daemon"]["decision"]["code"], "up_to_date");
        let (code, page) = get("/");
        assert_eq!(code, 200);
        assert!(page.contains("<tr><th>Safe mode</th><td>off</td></tr>"), "{page}");
        let (code, _) = get("/nope");
        assert_eq!(code, 404);
        assert_eq!(
            ureq::get(&format!("{base}/check-now")).call().unwrap_err().kind(),
            ureq::ErrorKind::HTTP
        );
        crate::serve::check_now(&rec.listen).unwrap();
        wait_for(&|r| r.counters.polls == 2);
        stop.send(crate::serve::Wake::Stop).unwrap();
    });
    // systemd's notification socket, as for `updater run` in a Type=notify unit.
    let sock_path = r.dir.path().join("notify");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_nonblocking(true).unwrap();
    let keeper = crate::sdnotify::Keeper::Systemd { socket: sock_path.into(), ping_every: None };
    let alive = crate::sdnotify::Alive::start(keeper, Duration::from_secs(60)).unwrap();
    serve_loop(r.daemon, 10, tx, &rx, &alive).unwrap();
    client.join().unwrap();
    let mut told = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = sock.recv(&mut buf) {
        told.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert_eq!(told.len(), 2, "{told:?}");
    assert!(told[0].starts_with("READY=1\nSTATUS=following channel stable"), "{told:?}");
    assert!(told[0].contains("endpoints on 127.0.0.1:"), "READY=1 once serving: {told:?}");
    assert!(told[1].starts_with("STOPPING=1\n"), "{told:?}");
    let log = std::fs::read_to_string(r.dir.path().join("log.jsonl")).unwrap();
    assert!(log.contains("\"event\":\"check_now\""), "{log}");
    assert!(log.lines().last().unwrap().contains("\"event\":\"stopped\""), "{log}");
    let _ = &r.installs;
    let _ = &r.reboots;
}

/// A 503 from /health names the failing checks.
#[test]
fn health_names_failing_checks() {
    let r = rig(&[], false);
    let mut st = r.daemon.device.status(Err("x".into()), 0);
    st.drift = vec!["autoboot.txt commits slot b, the state slot a".into()];
    st.disk_free_bytes = Some(10);
    let h = crate::serve::health(&st, Some(false), 100);
    assert!(!h.ok);
    assert_eq!(h.failing, ["state", "disk-space", "drift"]);
    let json = serde_json::to_value(&h).unwrap();
    assert_eq!(json["checks"][0]["detail"], "no state file yet");
}

/// The real channel checks and rollout (`ChannelPlanner`) on signed documents.
mod signed {
    use super::*;
    use crate::channel::tests::{sample, T0 as CT0};
    use crate::channel::Channel;
    use crate::sign::tests::test_key;

    fn planner() -> Box<dyn Planner> {
        Box::new(ChannelPlanner {
            keyring: crate::sign::Keyring::from_keys([test_key(1).verifying_key()]),
            overrides: crate::rollout::Overrides::default(),
        })
    }

    fn put(s: &TestServer, ch: &Channel, key: u8) {
        let (doc, sig) = ch.sign(&test_key(key));
        s.put("/channels/stable.toml", &doc);
        s.put("/channels/stable.toml.sig", &sig);
    }

    type Publish<'a> = Box<dyn Fn(&TestServer) + 'a>;

    fn everyone() -> Channel {
        let mut ch = sample();
        ch.os.rollout.percent = 100;
        ch
    }

    fn signed_rig(s: &TestServer) -> Rig {
        let r = rig_with(&[&s.base], false, planner(), "metrica-rpi4-arm64");
        seed_state(&r);
        r
    }

    #[test]
    fn a_full_rollout_installs_from_the_url_relative_to_the_document() {
        let s = TestServer::empty(Mode::Normal);
        put(&s, &everyone(), 1);
        let mut r = signed_rig(&s);
        let out = r.daemon.poll(CT0 + 60);
        assert_eq!(out, PollOutcome::Installed { version: "2.0.0".parse().unwrap(), trial: true });
        assert_eq!(*r.installs.0.borrow(), [format!("{}/bundles/pi-2.0.0.mfb", s.base)]);
        let st = r.status();
        assert_eq!(st["daemon"]["decision"]["code"], "rollout");
        assert_eq!(st["state"]["channel_sequences"]["stable"], 7);
    }

    #[test]
    fn paused_and_not_selected_are_logged_stays_with_their_codes() {
        let s = TestServer::empty(Mode::Normal);
        let mut ch = everyone();
        ch.paused = true;
        put(&s, &ch, 1);
        let mut r = signed_rig(&s);
        assert!(matches!(r.daemon.poll(CT0 + 60), PollOutcome::Stayed { .. }));
        assert_eq!(r.status()["daemon"]["decision"]["code"], "paused");
        ch.paused = false;
        ch.sequence = 8;
        ch.os.rollout.percent = 0;
        put(&s, &ch, 1);
        assert!(matches!(r.daemon.poll(CT0 + 120), PollOutcome::Stayed { .. }));
        let st = r.status();
        assert_eq!(st["daemon"]["decision"]["code"], "not_selected");
        let logged: Vec<String> =
            r.events("decision").iter().map(|e| e["code"].as_str().unwrap().to_string()).collect();
        assert_eq!(logged, ["paused", "not_selected"]);
        let hist: Vec<String> =
            r.history(&HistoryEvent::Decision).iter().map(|e| e.reason.clone().unwrap()).collect();
        assert!(hist[0].starts_with("stay: "), "{hist:?}");
        assert_eq!(hist.len(), 2);
        assert!(r.installs.0.borrow().is_empty());
    }

    /// The channel's devices table sends this device to `beta`: it follows (one hop, same
    /// poll), and comes back when the entry is removed.
    #[test]
    fn a_device_sent_to_another_channel_follows_it_and_comes_back() {
        let s = TestServer::empty(Mode::Normal);
        let mut stable = sample();
        stable.os.rollout.percent = 0;
        stable.devices.insert(
            "dev-1".into(),
            crate::channel::DeviceOverride { channel: Some("beta".into()), ..Default::default() },
        );
        put(&s, &stable, 1);
        let mut beta = everyone();
        beta.name = "beta".into();
        beta.sequence = 3;
        let (doc, sig) = beta.sign(&test_key(1));
        s.put("/channels/beta.toml", &doc);
        s.put("/channels/beta.toml.sig", &sig);
        let mut r = signed_rig(&s);
        let out = r.daemon.poll(CT0 + 60);
        assert!(matches!(out, PollOutcome::Installed { .. }), "{out:?}");
        let st = r.status();
        assert_eq!(st["daemon"]["channel"]["name"], "beta");
        assert_eq!(st["daemon"]["channel"]["followed_from"], "stable");
        assert_eq!(st["state"]["channel_sequences"]["stable"], 7);
        assert_eq!(st["state"]["channel_sequences"]["beta"], 3);
        assert_eq!(r.events("channel_followed").len(), 1);
        // The entry is removed: back on stable, which does not select this device.
        stable.devices.clear();
        stable.sequence = 8;
        put(&s, &stable, 1);
        let out = r.daemon.poll(CT0 + 600);
        assert!(matches!(out, PollOutcome::Stayed { .. }), "{out:?}");
        let st = r.status();
        assert_eq!(st["daemon"]["channel"]["name"], "stable");
        assert!(st["daemon"]["channel"].get("followed_from").is_none());
        assert_eq!(st["daemon"]["decision"]["code"], "not_selected");
    }

    /// A device clock far behind the publisher's (clock skew): the document is not acted on,
    /// a named error (and not cached); once the clock is right the document is acted on.
    #[test]
    fn a_clock_behind_the_publisher_is_a_named_error() {
        let s = TestServer::empty(Mode::Normal);
        put(&s, &everyone(), 1);
        let mut r = signed_rig(&s);
        assert_eq!(r.daemon.poll(CT0 - 3600), PollOutcome::NoChannel);
        assert_eq!(r.status()["daemon"]["last_error"]["kind"], "channel_clock_behind");
        assert!(r.installs.0.borrow().is_empty());
        let out = r.daemon.poll(CT0 + 60);
        assert!(matches!(out, PollOutcome::Installed { .. }), "{out:?}");
    }

    /// Unsigned, wrongly signed, replayed, expired and malformed documents: each a named error
    /// in the log and the status; the last good document stays and nothing is installed.
    #[test]
    fn bad_channels_keep_the_last_good_one() {
        let s = TestServer::empty(Mode::Normal);
        let mut good = sample(); // 10 %: this device is not selected, so it stays
        good.os.rollout.percent = 0;
        put(&s, &good, 1);
        let mut r = signed_rig(&s);
        assert!(matches!(r.daemon.poll(CT0 + 60), PollOutcome::Stayed { .. }));
        let mut newer = everyone();
        newer.sequence = 9;
        let mut older = everyone();
        older.sequence = 6;
        let mut stale = everyone();
        stale.sequence = 10;
        stale.expires = crate::channel::Timestamp(CT0 + 100);
        let cases: Vec<(Publish<'_>, &str)> = vec![
            (
                Box::new(|s: &TestServer| {
                    put(s, &newer, 1);
                    s.put("/channels/stable.toml.sig", b"");
                }),
                "channel_malformed_signature",
            ),
            (Box::new(|s: &TestServer| put(s, &newer, 2)), "channel_unknown_key"),
            (Box::new(|s: &TestServer| put(s, &older, 1)), "channel_replayed"),
            (Box::new(|s: &TestServer| put(s, &stale, 1)), "channel_expired"),
            (
                Box::new(|s: &TestServer| {
                    s.put("/channels/stable.toml", b"format = 1\nname = [\n");
                    s.put(
                        "/channels/stable.toml.sig",
                        &crate::sign::SignatureFile::sign(&test_key(1), b"format = 1\nname = [\n")
                            .to_bytes(),
                    );
                }),
                "channel_malformed",
            ),
        ];
        for (publish, kind) in cases {
            publish(&s);
            let out = r.daemon.poll(CT0 + 600);
            assert!(matches!(out, PollOutcome::Stayed { .. }), "{kind}: {out:?}");
            let st = r.status();
            assert_eq!(st["daemon"]["last_error"]["kind"], kind, "{st:#}");
            assert_eq!(st["daemon"]["channel"]["sequence"], 7, "{kind}");
            assert_eq!(r.events(kind).len(), 1, "{kind}");
        }
        // Unsigned: no .sig on the server at all.
        s.remove("/channels/stable.toml.sig");
        put(&s, &newer, 1);
        s.remove("/channels/stable.toml.sig");
        r.daemon.poll(CT0 + 700);
        assert_eq!(r.status()["daemon"]["last_error"]["kind"], "channel_unsigned");
        assert!(r.installs.0.borrow().is_empty());
        assert_eq!(r.committed_version(), "1.0.0");
    }
}

/// The whole path with the real installer: signed channel -> rollout -> bundle streamed into
/// slot b of a disk image -> tryboot requested; and a missing, a corrupt and a too-large
/// bundle, each a named error with the committed slot untouched.
mod real_install {
    use super::*;
    use crate::bundle::{testkit, SlotClass};
    use crate::channel::tests::{sample, T0 as CT0};
    use crate::sign::tests::test_key;
    use crate::testutil::{
        build_disk_with_roots, ext4_root, fat_boot_image, firmware_boots, release,
    };

    fn bundle(version: &str, root: &[u8]) -> Vec<u8> {
        let meta = testkit::TestMeta {
            compatible: "metrica-test".into(),
            version: version.parse().unwrap(),
            security_epoch: 0,
        };
        let boot = fat_boot_image();
        testkit::make_bundle(
            &meta,
            &[(SlotClass::Boot, &boot), (SlotClass::Root, root)],
            Some(&test_key(1)),
        )
    }

    fn channel(s: &TestServer, sequence: u64, version: &str, file: &str, body: &[u8]) {
        use sha2::Digest;
        let mut ch = sample();
        ch.sequence = sequence;
        ch.os.compatible = "metrica-test".into();
        ch.os.version = version.parse().unwrap();
        ch.os.urls = vec![format!("../bundles/{file}")];
        ch.os.size = body.len().max(1) as u64;
        ch.os.sha256 = hex::encode(sha2::Sha256::digest(body));
        ch.os.security_epoch = 0;
        ch.os.rollout.percent = 100;
        let (doc, sig) = ch.sign(&test_key(1));
        s.put("/channels/stable.toml", &doc);
        s.put("/channels/stable.toml.sig", &sig);
    }

    fn daemon(s: &TestServer, dir: &Path, reboots: Rc<Calls>) -> Daemon {
        daemon_trusting(s, dir, reboots, None)
    }

    /// [`daemon`] whose channel and bundle fetches check HTTPS servers against `trust`.
    fn daemon_trusting(
        s: &TestServer,
        dir: &Path,
        reboots: Rc<Calls>,
        trust: crate::http::Trust,
    ) -> Daemon {
        let disk = dir.join("card.img");
        build_disk_with_roots(
            &disk,
            Some(&crate::autoboot::Autoboot::committed(Slot::A).render()),
            &[Some(ext4_root(&release("1.0.0"))), None],
        );
        let device = Device::new(&disk, dir.join("data"));
        let keyring = crate::sign::Keyring::from_keys([test_key(1).verifying_key()]);
        let config = Config {
            mirrors: vec![s.base.clone()],
            channel: "stable".into(),
            interval: DEFAULT_INTERVAL,
            listen: "127.0.0.1:0".into(),
            min_free_bytes: 0,
            request_deadline: Duration::from_secs(5),
            no_reboot: false,
            device_id: "dev-1".into(),
            segment: "general".into(),
            unprovisioned: None,
        };
        device.open_state(Some(Slot::A), Some(&release("1.0.0")), CT0).unwrap();
        Daemon {
            fetcher: ChannelFetcher::new(config.mirrors.clone(), "stable", config.request_deadline)
                .with_trust(trust.clone()),
            record: Daemon::open_record(&device, &config, CT0),
            roles: None,
            cache: Cache::new(&device.data_dir),
            log: Log::new(Some(dir.join("log.jsonl")), "dev-1"),
            booted: None,
            running: Some(release("1.0.0")),
            planner: Box::new(ChannelPlanner {
                keyring: keyring.clone(),
                overrides: crate::rollout::Overrides::default(),
            }),
            installer: Box::new(BundleInstaller {
                keyring,
                running: Some(release("1.0.0")),
                booted: None,
                log_file: Some(dir.join("log.jsonl")),
                trust,
            }),
            rebooter: Box::new(TestReboot(reboots)),
            device,
            config,
        }
    }

    #[test]
    fn installs_a_signed_bundle_and_requests_the_trial() {
        let s = TestServer::empty(Mode::Normal);
        let b = bundle("2.0.0", &ext4_root(&release("2.0.0")));
        s.put("/bundles/metrica-test-2.0.0.mfb", &b);
        channel(&s, 1, "2.0.0", "metrica-test-2.0.0.mfb", &b);
        let dir = tempfile::tempdir().unwrap();
        let reboots = Rc::new(Calls::default());
        let mut d = daemon(&s, dir.path(), reboots.clone());
        let out = d.poll(CT0 + 60);
        assert_eq!(out, PollOutcome::Installed { version: "2.0.0".parse().unwrap(), trial: true });
        assert_eq!(*reboots.0.borrow(), ["tryboot"]);
        assert_eq!(firmware_boots(&d.device.disk, true).0, Slot::B);
        assert_eq!(
            firmware_boots(&d.device.disk, false).0,
            Slot::A,
            "committed slot unchanged until the trial passes"
        );
        let st = d.device.status(Err("x".into()), 20);
        assert_eq!(
            st.state.as_ref().unwrap().slot(Slot::B).version,
            Some("2.0.0".parse().unwrap())
        );
        assert!(st.history.iter().any(|e| e.event == HistoryEvent::Install));
        assert!(st.history.iter().any(|e| e.event == HistoryEvent::Trial));
    }

    /// A private update server: the channel and the bundle come over HTTPS from a server whose
    /// certificate only the CA bundle knows; with another CA's bundle the poll fails, naming why.
    #[test]
    fn a_private_https_server_is_trusted_through_the_ca_bundle() {
        let (ca_pem, tls) = crate::testutil::test_tls();
        let s = TestServer::start_tls(Vec::new(), Mode::Normal, tls);
        let b = bundle("2.0.0", &ext4_root(&release("2.0.0")));
        s.put("/bundles/metrica-test-2.0.0.mfb", &b);
        channel(&s, 1, "2.0.0", "metrica-test-2.0.0.mfb", &b);
        let dir = tempfile::tempdir().unwrap();
        let (other_pem, _) = crate::testutil::test_tls();
        for (name, pem) in [("ca.pem", &ca_pem), ("other.pem", &other_pem)] {
            std::fs::write(dir.path().join(name), pem).unwrap();
        }
        let trust = |name: &str| Some(crate::http::tls_config(&dir.path().join(name)).unwrap());
        let wrong = tempfile::tempdir().unwrap();
        let mut d = daemon_trusting(&s, wrong.path(), Rc::default(), trust("other.pem"));
        assert_eq!(d.poll(CT0 + 60), PollOutcome::NoChannel);
        let err = d.record.last_error.as_ref().unwrap();
        assert!(err.message.contains("server certificate not issued by a trusted CA"), "{err:?}");
        let reboots = Rc::new(Calls::default());
        let mut d = daemon_trusting(&s, dir.path(), reboots.clone(), trust("ca.pem"));
        let out = d.poll(CT0 + 60);
        assert_eq!(out, PollOutcome::Installed { version: "2.0.0".parse().unwrap(), trial: true });
        assert_eq!(*reboots.0.borrow(), ["tryboot"]);
    }

    #[test]
    fn missing_corrupt_and_too_large_bundles_are_named_errors() {
        let s = TestServer::empty(Mode::Normal);
        let dir = tempfile::tempdir().unwrap();
        let reboots = Rc::new(Calls::default());
        let mut d = daemon(&s, dir.path(), reboots.clone());
        // Missing: the channel names a bundle the mirror does not have.
        let b = bundle("2.0.0", &ext4_root(&release("2.0.0")));
        channel(&s, 1, "2.0.0", "metrica-test-2.0.0.mfb", &b);
        let PollOutcome::InstallFailed(f) = d.poll(CT0 + 60) else { panic!() };
        assert_eq!(f.kind, "download", "{}", f.message);
        assert!(f.message.contains("HTTP 404"), "{}", f.message);
        // Retried after the throttle (a missing file may be a mirror still syncing).
        assert!(matches!(d.poll(CT0 + 120), PollOutcome::Stayed { .. }));
        assert_eq!(d.record.decision.as_ref().unwrap().code, "throttled");
        // Corrupt: bytes that are not a bundle; never retried.
        let junk = vec![0x5a; 4096];
        s.put("/bundles/metrica-test-2.1.0.mfb", &junk);
        channel(&s, 2, "2.1.0", "metrica-test-2.1.0.mfb", &junk);
        let PollOutcome::InstallFailed(f) = d.poll(CT0 + 60 + 16 * 60) else { panic!() };
        assert_eq!(f.kind, "bundle", "{}", f.message);
        assert!(d.record.failed_versions.contains("2.1.0"));
        d.poll(CT0 + 60 + 40 * 60);
        assert_eq!(d.record.decision.as_ref().unwrap().code, "version_failed");
        // Too large: the root image does not fit root_b (1 MiB on the test disk); nothing written.
        let big = bundle("2.2.0", &vec![7u8; 3 << 20]);
        s.put("/bundles/metrica-test-2.2.0.mfb", &big);
        channel(&s, 3, "2.2.0", "metrica-test-2.2.0.mfb", &big);
        let PollOutcome::InstallFailed(f) = d.poll(CT0 + 60 + 60 * 60) else { panic!() };
        assert_eq!(f.kind, "partition_too_small", "{}", f.message);
        assert!(f.message.contains("partition root_b holds"), "{}", f.message);
        let st = d.device.status(Err("x".into()), 0);
        assert_eq!(st.state.as_ref().unwrap().slot(Slot::B).state, SlotState::Empty);
        assert_eq!(firmware_boots(&d.device.disk, false).0, Slot::A);
        assert!(reboots.0.borrow().is_empty());
        let log = std::fs::read_to_string(dir.path().join("log.jsonl")).unwrap();
        for kind in
            ["\"event\":\"download\"", "\"event\":\"bundle\"", "\"event\":\"partition_too_small\""]
        {
            assert!(log.contains(kind), "{kind} not in the log");
        }
    }
}

/// The test planner, whose verified document also offers role `web` 1.1.0 (a bundle on the
/// mirror, by a relative URL).
struct RolePlanner(Vec<u8>);

impl Planner for RolePlanner {
    fn plan(
        &self,
        doc: &Document,
        input: &PlanInput<'_>,
        now: u64,
    ) -> Result<Plan, ChannelProblem> {
        use sha2::Digest;
        let mut plan = TestPlanner.plan(doc, input, now)?;
        let mut channel = crate::channel::tests::sample();
        channel.roles.insert(
            "web".into(),
            crate::channel::RoleTarget {
                version: "1.1.0".parse().unwrap(),
                urls: vec!["../roles/web-1.1.0.mfr".into()],
                size: self.0.len() as u64,
                sha256: hex::encode(sha2::Sha256::digest(&self.0)),
                rollout: crate::channel::Rollout::everyone(),
                paused: false,
                pin: None,
            },
        );
        plan.channel.document = Some(std::sync::Arc::new(channel));
        Ok(plan)
    }
}

/// A poll hands its verified document to the role runner, after the OS decision: the role's
/// target is decided, its bundle fetched from the mirror the channel came from, and handed
/// to the roles service (which refuses on this branch: reported, the OS poll unaffected).
#[test]
fn a_poll_runs_the_role_from_the_same_verified_document() {
    use crate::daemon::role::{RoleConfig, RoleRecord, RoleRunner};
    let s = TestServer::empty(Mode::Normal);
    publish(&s, &doc(1, "1.0.0"), "ok");
    let bundle = b"a role bundle".to_vec();
    s.put("/roles/web-1.1.0.mfr", &bundle);
    let mut r = rig_with(&[&s.base], true, Box::new(RolePlanner(bundle)), "c");
    seed_state(&r);
    let metrica = r.daemon.device.data_dir.join("metrica");
    let cfg = RoleConfig {
        metrica_dir: metrica.clone(),
        sysroot: r.dir.path().join("root"),
        role: Ok("web".into()),
        device_id: "dev-1".into(),
        segment: crate::channel::Segment::General,
        overrides: crate::rollout::Overrides::default(),
        os_version: "1.0.0".parse().unwrap(),
        dev_root: r.dir.path().join("root"),
        min_free_bytes: 0,
        http: crate::role::download::HttpOptions::default(),
    };
    let engine = std::sync::Arc::new(crate::role::fake::FakeEngine::new());
    r.daemon.roles = Some(RoleRunner::new(cfg, engine, crate::sign::Keyring::default()));
    let outcome = r.daemon.poll(T0 + 60);
    assert!(matches!(outcome, PollOutcome::Stayed { .. }), "{outcome:?}");
    let rec = RoleRecord::load(&metrica);
    let d = rec.decision.as_ref().unwrap();
    assert_eq!((d.code.as_str(), d.version.as_deref()), ("rollout", Some("1.1.0")));
    // The download verified against the document reached the service, whose bundle reader
    // refused it (these bytes are not a signed bundle): reported once, the version barred.
    assert_eq!(rec.errors.len(), 1, "the service's refusal, once: {:?}", rec.errors);
    assert_eq!(rec.errors[0].kind, "role_bundle", "{:?}", rec.errors);
    assert!(rec.failed.contains("web@1.1.0"), "{rec:?}");
    assert_eq!(r.events("role_decision").len(), 1);
}

/// No mirror and no valid provisioning: the daemon fetches nothing and installs nothing, and
/// its decision (in /status) says why, every poll.
#[test]
fn an_unprovisioned_daemon_follows_no_channel_and_says_why() {
    let mut r = rig(&[], false);
    r.daemon.config.unprovisioned = Some("no --mirror and no valid provisioning: x".into());
    r.daemon.config.validate().unwrap();
    seed_state(&r);
    for t in [T0, T0 + 600] {
        assert_eq!(r.daemon.poll(t), PollOutcome::NoChannel);
    }
    assert!(r.installs.0.borrow().is_empty());
    let st = r.status();
    assert_eq!(st["daemon"]["decision"]["code"], "unprovisioned");
    let reason = st["daemon"]["decision"]["reason"].as_str().unwrap();
    assert_eq!(reason, "no channel to follow: no --mirror and no valid provisioning: x");
    assert_eq!(r.events("decision").len(), 2, "each poll logs its decision");
    // Without the reason, no mirror is still an error of the flags.
    r.daemon.config.unprovisioned = None;
    assert!(r.daemon.config.validate().is_err());
}
