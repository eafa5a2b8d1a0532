//! The roles layer on this machine's real Docker engine (Compose v2): an update that
//! succeeds, one whose container exits, one whose container is unhealthy, one whose health
//! check fails, one whose `up --wait` hangs, the rollback restoring the previous containers
//! and their data volume, three failures deciding safe mode and a good update leaving it, and
//! the repository's role compose files validated by Compose itself.
//!
//! The images are made locally by tests/fixtures/make-role-images.sh (a busybox root through
//! `docker import`; no registry) and reach the engine with `docker load`, from the bundle.
//! These tests are ignored by default; run them with `--ignored`. Then they fail, loudly,
//! when the engine or Compose v2 is missing (.ci/compose-v2 installs it on bookworm).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use updater::role::apply::{self, Event, Options, Outcome};
use updater::role::docker::DockerCli;
use updater::role::engine::{project_name, Engine, Project};
use updater::role::layout::{Link, RoleLayout};
use updater::role::safe_mode::{self, Decision, ExitReason, Reason, Signals};
use updater::role::spec;

const NEEDS: &str = "needs the Docker engine and Compose v2: run with --ignored";

/// The saved test images, made once per run; panics with the fix when the engine or Compose
/// v2 is missing.
fn images() -> &'static Path {
    static ARCHIVE: OnceLock<PathBuf> = OnceLock::new();
    ARCHIVE.get_or_init(|| {
        let compose = Command::new("docker").args(["compose", "version", "--short"]).output();
        match compose {
            Ok(o) if o.status.success() && String::from_utf8_lossy(&o.stdout).trim_start_matches('v').starts_with('2') => {}
            other => panic!(
                "these tests need the Docker engine and Compose v2 (`docker compose`); run .ci/compose-v2 \
                 (and start dockerd): {other:?}"
            ),
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let out = root.join("target/roletest");
        let st = Command::new("bash").arg(root.join("tests/fixtures/make-role-images.sh")).arg(&out).status().unwrap();
        assert!(st.success(), "make-role-images.sh failed: {st}");
        out.join("roletest-images.tar")
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn v(s: &str) -> semver::Version {
    s.parse().unwrap()
}

/// One role on a temporary device folder; its compose projects are removed (with their
/// volumes) when it is dropped.
struct Device {
    dir: tempfile::TempDir,
    layout: RoleLayout,
    engine: DockerCli,
    port: u16,
    extra_projects: Vec<String>,
}

impl Device {
    fn new(role: &str) -> Device {
        images();
        let dir = tempfile::tempdir().unwrap();
        let layout = RoleLayout::new(&dir.path().join("data/metrica"), role);
        let d = Device {
            dir,
            layout,
            engine: DockerCli::default(),
            port: free_port(),
            extra_projects: vec![],
        };
        d.remove_projects();
        d
    }

    /// A bundle folder: role.toml, compose.yaml and images/roletest.tar. `mode` picks the
    /// image's behaviour (see make-role-images.sh).
    fn bundle(&self, version: &str, mode: &str) -> PathBuf {
        let src = self.dir.path().join(format!("bundle-{version}"));
        std::fs::create_dir_all(src.join("images")).unwrap();
        let wait = if mode == "hang" { "4s" } else { "30s" };
        let start = if mode == "hang" { "120s" } else { "1s" };
        let (name, port) = (&self.layout.name, self.port);
        let role = format!(
            "[role]\nname = \"{name}\"\nversion = \"{version}\"\nos = \">=1.0.0\"\nupdate_interval = \"1h\"\n\
             [apply]\nwait_timeout = \"{wait}\"\nhealth_timeout = \"4s\"\nprobation = \"2s\"\n\
             [resources]\nmemory = \"32MiB\"\npids = 64\n\
             [[health.http]]\nurl = \"http://127.0.0.1:{port}/ready\"\n\
             [[health.container]]\nservice = \"web\"\n"
        );
        let compose = format!(
            "services:\n  web:\n    image: metrica.invalid/roletest:{mode}\n    pull_policy: never\n    restart: unless-stopped\n\
             \x20   environment:\n      ROLE_VERSION: \"{version}\"\n    ports: [\"127.0.0.1:{port}:8080\"]\n\
             \x20   volumes: [\"data:/data\"]\n    healthcheck:\n      test: [\"CMD\", \"test\", \"-f\", \"/tmp/healthy\"]\n\
             \x20     interval: 1s\n      timeout: 1s\n      retries: 2\n      start_period: {start}\n\
             volumes:\n  data:\n"
        );
        std::fs::write(src.join("role.toml"), role).unwrap();
        std::fs::write(src.join("compose.yaml"), compose).unwrap();
        let _ = std::fs::remove_file(src.join("images/roletest.tar"));
        std::os::unix::fs::symlink(images(), src.join("images/roletest.tar")).unwrap();
        src
    }

    fn apply(&self, src: &Path) -> Outcome {
        let log =
            |e: &Event| eprintln!("{} {} [{}] {}: {}", e.role, e.version, e.level, e.step, e.msg);
        let opts = Options {
            os_version: v("1.0.0"),
            force: false,
            dev_root: "/".into(),
            poll: Duration::from_millis(200),
            validate_timeout: Duration::from_secs(30),
            log: &log,
        };
        apply::apply(&self.engine, &self.layout, src, &opts).unwrap()
    }

    fn get(&self, path: &str) -> String {
        get(self.port, path)
    }

    /// The project's `web` container's image and ROLE_VERSION.
    fn running(&self) -> (String, String) {
        let out = Command::new("docker")
            .args([
                "ps",
                "--filter",
                &format!("label=com.docker.compose.project={}", project_name(&self.layout.name)),
            ])
            .args(["--format", "{{.Image}} {{.ID}}"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (image, id) =
            text.trim().split_once(' ').unwrap_or_else(|| panic!("no container: {text:?}"));
        let env = Command::new("docker")
            .args(["inspect", "--format", "{{range .Config.Env}}{{println .}}{{end}}", id])
            .output()
            .unwrap();
        let env = String::from_utf8_lossy(&env.stdout).into_owned();
        let version = env
            .lines()
            .find_map(|l| l.strip_prefix("ROLE_VERSION="))
            .unwrap_or_default()
            .to_string();
        (image.to_string(), version)
    }

    fn remove_projects(&self) {
        let names = std::iter::once(project_name(&self.layout.name))
            .chain(self.extra_projects.iter().cloned());
        for p in names {
            let _ = Command::new("docker")
                .args(["compose", "--project-name", &p, "down", "--volumes", "--remove-orphans"])
                .output();
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.remove_projects();
    }
}

fn get(port: u16, path: &str) -> String {
    let url = format!("http://127.0.0.1:{port}{path}");
    match ureq::get(&url).timeout(Duration::from_secs(3)).call() {
        Ok(r) => r.into_string().unwrap(),
        Err(e) => format!("error: {e}"),
    }
}

fn rolled_back(o: Outcome, words: &str) -> semver::Version {
    match o {
        Outcome::RolledBack { error, restored, .. } => {
            assert!(error.to_string().contains(words), "expected {words:?}: {error}");
            restored.expect("a previous release to restore")
        }
        other => panic!("not rolled back: {other:?}"),
    }
}

#[test]
#[ignore = "needs the Docker engine and Compose v2: run with --ignored"]
fn an_update_succeeds_and_keeps_the_data_volume() {
    let d = Device::new("rt-update");
    let t = Instant::now();
    assert!(matches!(d.apply(&d.bundle("1.0.0", "ok")), Outcome::Committed { .. }));
    eprintln!("apply to healthy and committed (first release, probation 2 s): {:?}", t.elapsed());
    assert_eq!(d.get("/"), "version 1.0.0\n");
    let t = Instant::now();
    match d.apply(&d.bundle("1.1.0", "ok")) {
        Outcome::Committed { version, previous } => {
            assert_eq!((version, previous), (v("1.1.0"), Some(v("1.0.0"))));
        }
        other => panic!("{other:?}"),
    }
    eprintln!("apply to healthy and committed (update, probation 2 s): {:?}", t.elapsed());
    assert_eq!(d.get("/"), "version 1.1.0\n");
    assert_eq!(d.get("/boots"), "1.0.0\n1.1.0\n", "the named volume outlives the update");
    assert_eq!(d.running(), ("metrica.invalid/roletest:ok".into(), "1.1.0".into()));
    assert_eq!(d.layout.read_link(Link::Previous).unwrap(), Some(v("1.0.0")));
}

#[test]
#[ignore = "needs the Docker engine and Compose v2: run with --ignored"]
fn a_container_that_exits_is_rolled_back_with_its_data_volume() {
    let d = Device::new("rt-exits");
    assert!(matches!(d.apply(&d.bundle("1.0.0", "ok")), Outcome::Committed { .. }));
    let t = Instant::now();
    assert_eq!(
        rolled_back(d.apply(&d.bundle("2.0.0", "exit")), "bringing the stack up"),
        v("1.0.0")
    );
    eprintln!("failed update to rolled back and healthy: {:?}", t.elapsed());
    assert_eq!(d.get("/"), "version 1.0.0\n");
    assert_eq!(d.running(), ("metrica.invalid/roletest:ok".into(), "1.0.0".into()));
    let boots = d.get("/boots");
    assert!(boots.starts_with("1.0.0\n2.0.0\n") && boots.ends_with("1.0.0\n"), "{boots:?}");
    let state = d.layout.read_state().unwrap();
    assert_eq!(
        (state.failed, state.consecutive_failures, state.rollbacks_total),
        (vec![v("2.0.0")], 1, 1)
    );
    assert_eq!(d.layout.read_link(Link::Current).unwrap(), Some(v("1.0.0")));
}

#[test]
#[ignore = "needs the Docker engine and Compose v2: run with --ignored"]
fn an_unhealthy_container_is_rolled_back() {
    let d = Device::new("rt-unhealthy");
    assert!(matches!(d.apply(&d.bundle("1.0.0", "ok")), Outcome::Committed { .. }));
    assert_eq!(
        rolled_back(d.apply(&d.bundle("2.0.0", "unhealthy")), "bringing the stack up"),
        v("1.0.0")
    );
    assert_eq!(d.running(), ("metrica.invalid/roletest:ok".into(), "1.0.0".into()));
}

#[test]
#[ignore = "needs the Docker engine and Compose v2: run with --ignored"]
fn a_failing_health_check_is_rolled_back() {
    let d = Device::new("rt-check");
    assert!(matches!(d.apply(&d.bundle("1.0.0", "ok")), Outcome::Committed { .. }));
    assert_eq!(
        rolled_back(d.apply(&d.bundle("2.0.0", "noready")), "status 404, expected 200"),
        v("1.0.0")
    );
    assert_eq!(d.get("/"), "version 1.0.0\n");
    assert_eq!(d.get("/ready"), "ready\n");
}

#[test]
#[ignore = "needs the Docker engine and Compose v2: run with --ignored"]
fn an_up_wait_that_hangs_is_rolled_back() {
    let d = Device::new("rt-hang");
    assert!(matches!(d.apply(&d.bundle("1.0.0", "ok")), Outcome::Committed { .. }));
    let t = Instant::now();
    // Which step sees it depends on the engine's timing: `up --wait` times out waiting for
    // the health check (usually), or returns with the container still "starting" and the
    // role's container check then fails on it (seen on a loaded machine). Both roll back.
    match d.apply(&d.bundle("2.0.0", "hang")) {
        Outcome::RolledBack { error, restored, .. } => {
            let e = error.to_string();
            assert!(
                e.contains("bringing the stack up") || e.contains("is running and starting"),
                "{e}"
            );
            assert_eq!(restored, Some(v("1.0.0")));
        }
        other => panic!("not rolled back: {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(90), "{:?}", t.elapsed());
    assert_eq!(d.get("/"), "version 1.0.0\n");
}

#[test]
#[ignore = "needs the Docker engine and Compose v2: run with --ignored"]
fn three_failed_updates_decide_safe_mode_and_a_good_update_leaves_it() {
    let mut d = Device::new("rt-safe");
    let safe = Device::new("rt-safe-mode");
    d.extra_projects.push(project_name("rt-safe-mode"));
    let metrica = d.dir.path().join("data/metrica");
    assert!(matches!(d.apply(&d.bundle("1.0.0", "ok")), Outcome::Committed { .. }));
    for r in ["1.1.0", "1.2.0", "1.3.0"] {
        rolled_back(d.apply(&d.bundle(r, "exit")), "bringing the stack up");
    }
    let state = d.layout.read_state().unwrap();
    let signals = Signals {
        role: "rt-safe".into(),
        consecutive_failures: state.consecutive_failures,
        ..Default::default()
    };
    let Decision::Enter(reason) = safe_mode::decide(&signals) else {
        panic!("no safe mode after 3 failures")
    };
    assert_eq!(reason, Reason::FailedUpdates { count: 3 });
    safe_mode::write_marker(&metrica, reason).unwrap();
    // The safe-mode stack: the same test image, its own project and port.
    let safe_src = safe.bundle("1.0.0", "ok");
    let staged = safe.layout.release(&v("1.0.0"));
    std::fs::create_dir_all(staged.parent().unwrap()).unwrap();
    std::fs::rename(&safe_src, &staged).unwrap();
    let safe_project = Project::for_release("rt-safe-mode", &staged, Path::new("compose.yaml"));
    let role_project =
        Project::for_release("rt-safe", &d.layout.release(&v("1.0.0")), Path::new("compose.yaml"));
    let report = safe_mode::switch_stacks(
        &d.engine,
        Some(&role_project),
        &safe_project,
        Duration::from_secs(30),
    );
    assert_eq!((report.engine_up, report.errors.len()), (true, 0), "{report:?}");
    assert!(d.get("/").starts_with("error"), "the role is stopped");
    assert_eq!(safe.get("/"), "version 1.0.0\n", "the safe-mode stack serves");
    assert!(d.engine.ps(&role_project).unwrap().is_empty());
    // A good update, then the decision to leave.
    assert!(matches!(d.apply(&d.bundle("1.4.0", "ok")), Outcome::Committed { .. }));
    let marker = safe_mode::read_marker(&metrica).is_some();
    let signals = Signals { active: marker, good_update: true, ..signals };
    assert_eq!(safe_mode::decide(&signals), Decision::Exit(ExitReason::GoodUpdate));
    d.engine.down(&safe_project).unwrap();
    safe_mode::remove_marker(&metrica).unwrap();
    assert_eq!(d.get("/"), "version 1.4.0\n");
    assert_eq!(d.layout.read_state().unwrap().consecutive_failures, 0);
}

/// The repository's roles (and the QEMU Pi image's test role): Compose v2 accepts each compose file, and every image is pinned
/// (a bundle-local tag with `pull_policy: never`, or a digest).
#[test]
#[ignore = "needs the Docker engine and Compose v2: run with --ignored"]
fn the_repository_roles_pass_compose_config() {
    images();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let engine = DockerCli::default();
    let mut checked = 0;
    let dirs = std::fs::read_dir(repo.join("roles")).unwrap().map(|e| e.unwrap().path());
    for dir in dirs.chain([repo.join("qemu/roles/hello")]) {
        let spec = spec::load(&dir.join("role.toml")).unwrap();
        let project = Project::for_release(&spec.role.name.0, &dir, &spec.role.compose.0);
        engine.config_check(&project).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let model = engine.config(&project).unwrap();
        for (service, svc) in &model.services {
            let image = svc.image.as_deref().unwrap_or_default();
            let pinned = image.contains("@sha256:") || svc.pull_policy.as_deref() == Some("never");
            assert!(
                pinned && svc.build.is_none(),
                "{}: service {service} image {image:?}",
                dir.display()
            );
        }
        checked += 1;
    }
    assert_eq!(checked, 8, "{NEEDS}");
}

#[test]
#[ignore = "needs the Docker engine and Compose v2: run with --ignored"]
fn a_signed_role_bundle_with_a_docker_save_archive_unpacks_and_applies() {
    use updater::role::bundle;
    let d = Device::new("rt-bundle");
    let src = d.bundle("1.0.0", "ok");
    // The role folder holds no links: the archive goes in with `images`, as `--images` does.
    std::fs::remove_dir_all(src.join("images")).unwrap();
    let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
    let contents = bundle::collect(&src, &[images().to_path_buf()]).unwrap();
    let mfr = d.dir.path().join("rt-bundle-1.0.0.mfr");
    let file = std::io::BufWriter::new(std::fs::File::create(&mfr).unwrap());
    bundle::write(file, &contents, 1_700_000_000, &key, &mut |_| {}).unwrap();
    let ring = updater::sign::Keyring::from_keys([key.verifying_key()]);
    let t = Instant::now();
    let u = bundle::unpack(&mfr, &ring, &d.dir.path().join("unpacked")).unwrap();
    eprintln!("unpacked {} bytes in {:?}", std::fs::metadata(&mfr).unwrap().len(), t.elapsed());
    assert!(u.dir.join("images/roletest-images.tar").is_file());
    assert!(matches!(d.apply(&u.dir), Outcome::Committed { .. }));
    assert_eq!(d.get("/"), "version 1.0.0\n");
    assert_eq!(d.running(), ("metrica.invalid/roletest:ok".into(), "1.0.0".into()));
}

/// `updater role apply URL` (the real binary): the bundle is downloaded into /data, verified
/// against `--keyring` as it is unpacked, applied, and the download is removed.
#[test]
#[ignore = "needs the Docker engine and Compose v2: run with --ignored"]
fn role_apply_of_a_url_downloads_verifies_and_applies_the_bundle() {
    use updater::role::bundle;
    let d = Device::new("rt-url");
    let src = d.bundle("1.0.0", "ok");
    std::fs::remove_dir_all(src.join("images")).unwrap();
    let key = ed25519_dalek::SigningKey::from_bytes(&[2; 32]);
    let contents = bundle::collect(&src, &[images().to_path_buf()]).unwrap();
    let mut bytes = Vec::new();
    bundle::write(&mut bytes, &contents, 1_700_000_000, &key, &mut |_| {}).unwrap();
    let server = updater::testserver::TestServer::empty(updater::testserver::Mode::Normal);
    server.put("/roles/rt-url/1.0.0.mfr", &bytes);
    let keyring = d.dir.path().join("keyring");
    std::fs::create_dir_all(&keyring).unwrap();
    let pem = updater::sign::public_key_to_pem(&key.verifying_key());
    std::fs::write(keyring.join("fleet.pub.pem"), pem).unwrap();
    let url = server.url_of("/roles/rt-url/1.0.0.mfr");
    let args = ["--keyring", keyring.to_str().unwrap(), "role", "apply"];
    let mut argv = args.to_vec();
    argv.extend(["--os-version", "1.0.0", "--min-free-mib", "1", &url]);
    let run = d.updater(&argv, None);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(d.get("/"), "version 1.0.0\n");
    let leftover = d.dir.path().join("data/metrica/role-apply-download.mfr");
    assert!(!leftover.exists(), "the downloaded bundle is removed after the apply");
    // A bundle signed by a key the device does not trust is refused before anything runs.
    let other = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
    let mut forged = Vec::new();
    let contents = bundle::collect(&src, &[images().to_path_buf()]).unwrap();
    bundle::write(&mut forged, &contents, 1_700_000_000, &other, &mut |_| {}).unwrap();
    server.put("/roles/rt-url/1.0.0.mfr", &forged);
    let run = d.updater(&argv, None);
    assert_eq!(run.code, Some(3), "refused: {run:?}");
    assert!(run.stderr.contains("which is not in the keyring"), "{run:?}");
    assert!(!leftover.exists(), "a refused download is removed too");
    assert_eq!(d.get("/"), "version 1.0.0\n", "the running release is untouched");
}

/// What one run of the real `updater` binary did.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    signal: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Device {
    /// Runs `updater --data-dir DIR/data ARGS...` (the real binary, built with failpoints for
    /// the tests), with `METRICA_FAILPOINT` set when `failpoint` is given.
    fn updater(&self, args: &[&str], failpoint: Option<&str>) -> Run {
        use std::os::unix::process::ExitStatusExt;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_updater"));
        cmd.arg("--data-dir").arg(self.dir.path().join("data")).args(args);
        cmd.env_remove("METRICA_FAILPOINT");
        if let Some(name) = failpoint {
            cmd.env("METRICA_FAILPOINT", name);
        }
        let out = cmd.output().unwrap();
        let run = Run {
            code: out.status.code(),
            signal: out.status.signal(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        eprintln!(
            "updater {args:?} (failpoint {failpoint:?}): {:?} {:?}\n{}",
            run.code, run.signal, run.stdout
        );
        run
    }

    fn cli_apply(&self, src: &Path, failpoint: Option<&str>) -> Run {
        let src = src.to_str().unwrap();
        self.updater(
            &["role", "apply", "--os-version", "1.0.0", "--min-free-mib", "1", src],
            failpoint,
        )
    }

    fn status_json(&self) -> serde_json::Value {
        let run = self.updater(&["role", "status", "--json"], None);
        assert_eq!(run.code, Some(0), "{run:?}");
        serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {run:?}"))
    }
}

#[test]
#[ignore = "needs the Docker engine and Compose v2: run with --ignored"]
fn the_updater_binary_applies_a_folder_rolls_back_a_failure_and_reports_status() {
    let d = Device::new("rt-cli");
    let run = d.cli_apply(&d.bundle("1.0.0", "ok"), None);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.stdout, "metrica: role rt-cli: committed 1.0.0\n");
    // Every log line of the apply names the role and its version.
    for line in run.stderr.lines().filter(|l| l.contains("\"event\":\"role\"")) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(
            (v["role"].as_str(), v["version"].as_str()),
            (Some("rt-cli"), Some("1.0.0")),
            "{line}"
        );
    }
    assert_eq!(d.get("/"), "version 1.0.0\n");
    let st = d.status_json();
    let role = &st["roles"][0];
    assert_eq!((role["name"].as_str(), role["current"].as_str()), (Some("rt-cli"), Some("1.0.0")));
    assert_eq!((role["healthy"].as_bool(), st["engine_up"].as_bool()), (Some(true), Some(true)));
    assert_eq!(role["containers"][0]["state"], "running", "{st}");
    // A release whose container exits: rolled back, exit code 4, the old release serves.
    let run = d.cli_apply(&d.bundle("2.0.0", "exit"), None);
    assert_eq!(run.code, Some(4), "{run:?}");
    assert!(run.stdout.contains("rolled-back 2.0.0 (1.0.0 runs again)"), "{run:?}");
    assert_eq!(d.get("/"), "version 1.0.0\n");
    // Applying it again is refused (it failed before): exit code 3; --json says so.
    let src = d.bundle("2.0.0", "exit");
    let run = d.updater(
        &["role", "apply", "--os-version", "1.0.0", "--json", src.to_str().unwrap()],
        None,
    );
    assert_eq!(run.code, Some(3), "{run:?}");
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!((v["result"].as_str(), v["exit_code"].as_u64()), (Some("refused"), Some(3)));
    let st = d.status_json();
    assert_eq!(st["roles"][0]["failed"], serde_json::json!(["2.0.0"]));
    assert_eq!(st["roles"][0]["rollbacks_total"], 1);
    // A release of another role than --role: refused, nothing changes.
    let src = d.bundle("3.0.0", "ok");
    let run = d.updater(
        &["role", "apply", "--os-version", "1.0.0", "--role", "other", src.to_str().unwrap()],
        None,
    );
    assert_eq!(run.code, Some(3), "{run:?}");
    assert_eq!(d.get("/"), "version 1.0.0\n");
}

/// A SIGKILL of the updater at each step of an apply, then `updater role recover`: the old or
/// the new release runs, `current` names it, and the next apply works.
#[test]
#[ignore = "needs the Docker engine and Compose v2: run with --ignored"]
fn a_sigkill_at_every_apply_step_then_recover_leaves_the_old_or_the_new_release() {
    let d = Device::new("rt-kill");
    assert_eq!(d.cli_apply(&d.bundle("1.0.0", "ok"), None).code, Some(0));
    let steps = updater::role::apply::STEPS;
    let mut old = v("1.0.0");
    for (i, step) in steps.iter().enumerate() {
        let new = v(&format!("1.{}.0", i + 1));
        let run = d.cli_apply(&d.bundle(&new.to_string(), "ok"), Some(step));
        assert_eq!(run.signal, Some(9), "{step}: not killed: {run:?}");
        assert!(run.stderr.contains(&format!("power cut at failpoint {step}")), "{step}: {run:?}");
        let run = d.updater(&["role", "recover"], None);
        assert_eq!(run.code, Some(0), "{step}: {run:?}");
        let current = d.layout.read_link(Link::Current).unwrap().expect("a current release");
        assert!(
            current == old || current == new,
            "{step}: current {current}, old {old}, new {new}"
        );
        assert_eq!(d.get("/"), format!("version {current}\n"), "{step}: serves what current names");
        assert_eq!(d.running().1, current.to_string(), "{step}");
        let state = d.layout.read_state().unwrap();
        assert_eq!(state.pending, None, "{step}");
        // A good update afterwards commits (and resets the failure count of the cuts).
        let next = v(&format!("1.{}.5", i + 1));
        let run = d.cli_apply(&d.bundle(&next.to_string(), "ok"), None);
        assert_eq!(run.code, Some(0), "{step}: the next apply: {run:?}");
        assert_eq!(d.get("/"), format!("version {next}\n"));
        old = next;
    }
}

#[test]
#[ignore = "needs the Docker engine and Compose v2: run with --ignored"]
fn safe_mode_enter_and_exit_swap_the_stacks() {
    let mut d = Device::new("rt-cli-safe");
    let safe = Device::new("rt-cli-safe-mode");
    d.extra_projects.push(project_name("rt-cli-safe-mode"));
    assert_eq!(d.cli_apply(&d.bundle("1.0.0", "ok"), None).code, Some(0));
    let stack = safe.bundle("1.0.0", "ok");
    let stack = stack.to_str().unwrap();
    let run = d.updater(&["safe-mode", "--safe-mode-stack", stack, "enter"], None);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.contains("safe mode entered: entered by an operator"), "{run:?}");
    assert!(d.get("/").starts_with("error"), "the role is stopped");
    assert_eq!(safe.get("/"), "version 1.0.0\n", "the safe-mode stack serves");
    let run = d.updater(&["safe-mode", "status", "--json"], None);
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(
        (v["active"].as_bool(), v["marker"]["reason"].as_str()),
        (Some(true), Some("operator"))
    );
    assert_eq!(d.status_json()["safe_mode"]["reason"], "operator");
    // A recover in safe mode keeps the safe-mode stack, not the role.
    let run = d.updater(&["role", "--safe-mode-stack", stack, "recover"], None);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(d.get("/").starts_with("error"), "the role stays stopped in safe mode");
    assert_eq!(safe.get("/"), "version 1.0.0\n");
    let run = d.updater(&["safe-mode", "--safe-mode-stack", stack, "exit"], None);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(d.get("/"), "version 1.0.0\n", "the role runs again");
    assert!(safe.get("/").starts_with("error"), "the safe-mode stack is stopped");
    let run = d.updater(&["safe-mode", "status"], None);
    assert_eq!(run.stdout, "safe mode: off\n");
}

/// The service's rule on the real engine through the binary: three failed updates enter safe
/// mode (the role stopped, the safe-mode stack serving); a good update leaves it.
#[test]
#[ignore = "needs the Docker engine and Compose v2: run with --ignored"]
fn three_failed_applies_enter_safe_mode_and_a_good_apply_leaves_it() {
    let mut d = Device::new("rt-cli-fail");
    let safe = Device::new("rt-cli-fail-safe");
    d.extra_projects.push(project_name("rt-cli-fail-safe"));
    let stack = safe.bundle("1.0.0", "ok");
    let apply = |version: &str, mode: &str| {
        let src = d.bundle(version, mode);
        let args = ["role", "--safe-mode-stack", stack.to_str().unwrap(), "apply"];
        let mut args = args.to_vec();
        args.extend(["--os-version", "1.0.0", "--min-free-mib", "1", src.to_str().unwrap()]);
        d.updater(&args, None)
    };
    assert_eq!(apply("1.0.0", "ok").code, Some(0));
    for v in ["1.1.0", "1.2.0"] {
        let run = apply(v, "exit");
        assert_eq!(run.code, Some(4), "{run:?}");
        assert!(!run.stdout.contains("safe mode"), "{run:?}");
    }
    let run = apply("1.3.0", "exit");
    assert_eq!(run.code, Some(4), "{run:?}");
    assert!(run.stdout.contains("safe mode entered: 3 consecutive failed role updates"), "{run:?}");
    assert!(d.get("/").starts_with("error"), "the role is stopped");
    assert_eq!(safe.get("/"), "version 1.0.0\n", "the safe-mode stack serves");
    assert_eq!(d.status_json()["safe_mode"]["reason"], "failed-updates");
    let run = apply("1.4.0", "ok");
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.contains("safe mode left: a good update"), "{run:?}");
    assert_eq!(d.get("/"), "version 1.4.0\n");
    assert!(safe.get("/").starts_with("error"), "the safe-mode stack is stopped");
    assert!(d.status_json()["safe_mode"].is_null());
}

/// The daemon's crash-loop watch on the real engine: a stack whose container exits at once
/// under `restart: unless-stopped` piles up restarts in `docker inspect`, and the watch's
/// samples (`daemon::role::restart_total`, as the daemon takes them at each poll) see 3
/// restarts within a minute.
#[test]
#[ignore = "needs the Docker engine and Compose v2: run with --ignored"]
fn the_crash_loop_watch_sees_a_container_that_keeps_exiting() {
    use updater::daemon::role::restart_total;
    use updater::role::health::CrashLoopWatch;
    let d = Device::new("crashwatch");
    d.engine.load_images(images()).unwrap();
    let version = v("1.0.0");
    let src = d.bundle("1.0.0", "exit");
    let dir = d.layout.release(&version);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["role.toml", "compose.yaml"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let project = Project::for_release(&d.layout.name, &dir, Path::new("compose.yaml"));
    // `up --wait` fails (the container exits); the engine keeps restarting it.
    assert!(d.engine.up(&project, Duration::from_secs(5)).is_err());
    let mut watch = CrashLoopWatch::new(3, Duration::from_secs(60));
    let started = Instant::now();
    let mut samples = Vec::new();
    let looping = loop {
        let total = restart_total(&d.engine, &d.layout, &version).unwrap();
        samples.push(total);
        if watch.observe(started.elapsed(), total) {
            break true;
        }
        if started.elapsed() > Duration::from_secs(40) {
            break false;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    assert!(looping, "no crash loop seen; restart totals sampled: {samples:?}");
}

/// A stand-in for the updater's endpoints on 127.0.0.1:9731: `/health` answers 503 with a
/// JSON body, anything else 200 with `{"path":...}`; every request line it gets is recorded.
fn fake_updater_endpoints() -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    use std::io::{BufRead, BufReader, Write};
    let listener = TcpListener::bind("127.0.0.1:9731")
        .expect("127.0.0.1:9731 (the updater's port, which the safe-mode API relays) is busy");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut line = String::new();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            // The rest of the header, up to the empty line.
            let mut h = String::new();
            while reader.read_line(&mut h).is_ok_and(|n| n > 2) {
                h.clear();
            }
            let path = line.split(' ').nth(1).unwrap_or_default().to_string();
            record.lock().unwrap().push(line.trim_end().to_string());
            let (status, body) = if path == "/health" {
                (
                    "503 Service Unavailable",
                    "{\"healthy\":false,\"failing\":[\"role\"]}".to_string(),
                )
            } else {
                ("200 OK", format!("{{\"path\":\"{path}\"}}"))
            };
            let _ = write!(
                stream,
                "HTTP/1.0 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
    seen
}

/// The repository's safe-mode stack (roles/safe-mode) on the real engine with its real image,
/// Debian's busybox-static made by recipes/pi/role-bundles.sh: the apply commits (its own
/// health checks pass), port 80 serves the page, and the status API relays the updater's
/// GET endpoints with their status and body, and nothing else.
#[test]
#[ignore = "needs the Docker engine and Compose v2: run with --ignored"]
fn the_repositorys_safe_mode_stack_serves_its_page_and_relays_the_status_api() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = repo.join("target/busybox-image");
    let script = repo.join("recipes/pi/role-bundles.sh");
    let st = Command::new("bash").arg(script).args(["amd64"]).arg(&out).status().unwrap();
    assert!(st.success(), "role-bundles.sh failed: {st}");
    TcpListener::bind("0.0.0.0:80").expect("port 80, which the safe-mode stack serves, is busy");
    let seen = fake_updater_endpoints();
    let d = Device::new("safe-mode");
    let src = d.dir.path().join("safe-mode");
    let copied = Command::new("cp").arg("-r").arg(repo.join("roles/safe-mode")).arg(&src).status();
    assert!(copied.unwrap().success());
    std::fs::create_dir(src.join("images")).unwrap();
    std::os::unix::fs::symlink(
        out.join("busybox-1.35.0-amd64.tar"),
        src.join("images/busybox.tar"),
    )
    .unwrap();
    assert!(matches!(d.apply(&src), Outcome::Committed { .. }));
    assert!(get(80, "/").contains("This device is in safe mode"));
    assert_eq!(get(80, "/cgi-bin/api.sh/status"), "{\"path\":\"/status\"}");
    assert_eq!(get(80, "/cgi-bin/api.sh/metrics"), "{\"path\":\"/metrics\"}");
    let answer = |method: &str, path: &str| -> (u16, String) {
        let url = format!("http://127.0.0.1:80{path}");
        match ureq::request(method, &url).timeout(Duration::from_secs(3)).call() {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
            Err(e) => panic!("{method} {path}: {e}"),
        }
    };
    let (code, body) = answer("GET", "/cgi-bin/api.sh/health");
    assert_eq!((code, body.as_str()), (503, "{\"healthy\":false,\"failing\":[\"role\"]}"));
    assert_eq!(answer("POST", "/cgi-bin/api.sh/status").0, 404);
    assert_eq!(answer("GET", "/cgi-bin/api.sh/check-now").0, 404);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        ["GET /status HTTP/1.0", "GET /metrics HTTP/1.0", "GET /health HTTP/1.0"],
        "only the GET endpoints reach the updater"
    );
}
