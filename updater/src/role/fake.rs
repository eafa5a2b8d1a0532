//! A faithful fake of the engine boundary, for tests without Docker.
//!
//! It keeps what the real engine keeps: loaded images, the containers of each compose project
//! (a project name has one set of containers; `up` of another release folder replaces them,
//! as compose does), named volumes per project (kept by `down`), and restart counts. How a
//! release folder behaves when it is brought up is set per folder with [`FakeEngine::release`].
//! A "docker save archive" for the fake is a text file of image references, one a line.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use super::engine::{
    ComposeModel, ComposeService, Container, Engine, EngineError, ExecOutput, Inspected, Project,
};

/// What a release folder's stack does when it is brought up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Up {
    /// Every container runs and is healthy.
    #[default]
    Healthy,
    /// The first service's container exits with this code (so `up --wait` fails).
    Exits(i64),
    /// The first service's container stays unhealthy (so `up --wait` fails).
    Unhealthy,
    /// `up --wait` does not return within its limit.
    Hangs,
    /// Up and healthy, then the first service restarts at every `ps` (crash loop).
    RestartsLater,
}

/// One release folder's stack, as the fake engine sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// Service name -> image reference.
    pub services: BTreeMap<String, String>,
    /// Whether the services say `pull_policy: never` (the default).
    pub pull_never: bool,
    /// `compose config -q` fails with this message.
    pub invalid: Option<String>,
    pub up: Up,
}

impl Release {
    pub fn new(services: &[(&str, &str)]) -> Release {
        Release {
            services: services.iter().map(|(s, i)| (s.to_string(), i.to_string())).collect(),
            pull_never: true,
            invalid: None,
            up: Up::Healthy,
        }
    }
}

#[derive(Debug, Default)]
struct World {
    releases: BTreeMap<PathBuf, Release>,
    images: BTreeSet<String>,
    /// Project name -> (release folder it runs, its containers).
    running: BTreeMap<String, Running>,
    /// Project name -> its named volume's content (a text the tests write and read).
    volumes: BTreeMap<String, String>,
    calls: Vec<String>,
    next_id: u64,
    down: bool,
}

#[derive(Debug, Clone)]
struct Running {
    dir: PathBuf,
    containers: Vec<Container>,
    restarts: BTreeMap<String, u64>,
    crash_loop: bool,
}

/// The fake engine. Cloneable views are not needed: tests hold it by reference.
#[derive(Debug, Default)]
pub struct FakeEngine {
    world: Mutex<World>,
}

impl FakeEngine {
    pub fn new() -> FakeEngine {
        FakeEngine::default()
    }

    /// Declares how the stack in `dir` behaves.
    pub fn release(&self, dir: &Path, release: Release) {
        self.with(|w| w.releases.insert(dir.to_path_buf(), release));
    }

    /// Makes every call fail as if the daemon were down (or back up).
    pub fn set_engine_down(&self, down: bool) {
        self.with(|w| w.down = down);
    }

    /// Adds an image as if it had been loaded before.
    pub fn add_image(&self, reference: &str) {
        self.with(|w| w.images.insert(reference.to_string()));
    }

    /// The release folder a project's containers come from, if any are there.
    pub fn running_dir(&self, project: &str) -> Option<PathBuf> {
        self.with(|w| w.running.get(project).map(|r| r.dir.clone()))
    }

    /// The project's named volume (survives `down` and replacement, as in Docker).
    pub fn volume(&self, project: &str) -> Option<String> {
        self.with(|w| w.volumes.get(project).cloned())
    }

    pub fn write_volume(&self, project: &str, content: &str) {
        self.with(|w| w.volumes.insert(project.to_string(), content.to_string()));
    }

    /// The calls made so far, as `verb project-or-argument`.
    pub fn calls(&self) -> Vec<String> {
        self.with(|w| w.calls.clone())
    }

    fn with<T>(&self, f: impl FnOnce(&mut World) -> T) -> T {
        f(&mut self.world.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Records a call; fails when the engine is down.
    fn call(&self, what: String) -> Result<(), EngineError> {
        self.with(|w| {
            w.calls.push(what);
            if w.down {
                Err(EngineError::Unavailable("Cannot connect to the Docker daemon".into()))
            } else {
                Ok(())
            }
        })
    }

    fn release_of(&self, p: &Project) -> Result<Release, EngineError> {
        self.with(|w| w.releases.get(&p.dir).cloned())
            .ok_or_else(|| failed("compose", "no compose file"))
    }
}

fn failed(command: &str, stderr: &str) -> EngineError {
    EngineError::Failed {
        command: command.into(),
        status: "exit status 1".into(),
        stderr: stderr.into(),
    }
}

fn container(
    id: u64,
    project: &str,
    service: &str,
    state: &str,
    health: &str,
    exit: i64,
) -> Container {
    Container {
        id: format!("c{id}"),
        name: format!("{project}-{service}-1"),
        service: service.into(),
        state: state.into(),
        health: health.into(),
        exit_code: exit,
    }
}

impl Engine for FakeEngine {
    fn load_images(&self, archive: &Path) -> Result<(), EngineError> {
        self.call(format!("load {}", archive.display()))?;
        let text =
            std::fs::read_to_string(archive).map_err(|e| failed("docker load", &e.to_string()))?;
        let refs: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        if refs.is_empty() || refs.iter().any(|r| r.contains(char::is_whitespace)) {
            return Err(failed("docker load", "archive/tar: invalid tar header"));
        }
        self.with(|w| w.images.extend(refs.iter().map(|r| r.to_string())));
        Ok(())
    }

    fn image_present(&self, reference: &str) -> Result<bool, EngineError> {
        self.call(format!("image {reference}"))?;
        Ok(self.with(|w| w.images.contains(reference)))
    }

    fn config_check(&self, p: &Project) -> Result<(), EngineError> {
        self.call(format!("config {}", p.dir.display()))?;
        match self.release_of(p)?.invalid {
            Some(msg) => Err(failed("docker compose config", &msg)),
            None => Ok(()),
        }
    }

    fn config(&self, p: &Project) -> Result<ComposeModel, EngineError> {
        self.config_check(p)?;
        let r = self.release_of(p)?;
        let policy = r.pull_never.then(|| "never".to_string());
        let services = r
            .services
            .into_iter()
            .map(|(name, image)| {
                let svc =
                    ComposeService { image: Some(image), pull_policy: policy.clone(), build: None };
                (name, svc)
            })
            .collect();
        Ok(ComposeModel { services })
    }

    fn up(&self, p: &Project, wait_timeout: Duration) -> Result<(), EngineError> {
        self.call(format!("up {}", p.dir.display()))?;
        let r = self.release_of(p)?;
        if let Some(missing) = r.services.values().find(|i| !self.with(|w| w.images.contains(*i))) {
            return Err(failed("docker compose up", &format!("pull access denied for {missing}")));
        }
        let outcome = self.with(|w| {
            let mut containers = Vec::new();
            for (i, service) in r.services.keys().enumerate() {
                w.next_id += 1;
                let c = match (&r.up, i) {
                    (Up::Exits(code), 0) => {
                        container(w.next_id, &p.name, service, "exited", "", *code)
                    }
                    (Up::Unhealthy, 0) => {
                        container(w.next_id, &p.name, service, "running", "unhealthy", 0)
                    }
                    _ => container(w.next_id, &p.name, service, "running", "healthy", 0),
                };
                containers.push(c);
            }
            w.volumes.entry(p.name.clone()).or_default();
            let failing = containers.iter().find(|c| !c.is_up()).map(|c| c.name.clone());
            let crash_loop = r.up == Up::RestartsLater;
            w.running.insert(
                p.name.clone(),
                Running { dir: p.dir.clone(), containers, restarts: BTreeMap::new(), crash_loop },
            );
            failing
        });
        match (&r.up, outcome) {
            (Up::Hangs, _) => Err(EngineError::Timeout {
                command: "docker compose up".into(),
                timeout: wait_timeout,
            }),
            (_, Some(name)) => Err(failed(
                "docker compose up",
                &format!("container {name} is unhealthy or exited"),
            )),
            (_, None) => Ok(()),
        }
    }

    fn ps(&self, p: &Project) -> Result<Vec<Container>, EngineError> {
        self.call(format!("ps {}", p.name))?;
        Ok(self.with(|w| match w.running.get_mut(&p.name) {
            Some(r) => {
                if r.crash_loop {
                    let first = r.containers[0].id.clone();
                    *r.restarts.entry(first).or_default() += 1;
                }
                r.containers.clone()
            }
            None => Vec::new(),
        }))
    }

    fn down(&self, p: &Project) -> Result<(), EngineError> {
        self.call(format!("down {}", p.name))?;
        self.with(|w| w.running.remove(&p.name));
        Ok(())
    }

    fn inspect(&self, ids: &[String]) -> Result<Vec<Inspected>, EngineError> {
        self.call(format!("inspect {}", ids.join(",")))?;
        Ok(self.with(|w| {
            let all = w.running.values().flat_map(|r| r.containers.iter().map(move |c| (r, c)));
            all.filter(|(_, c)| ids.contains(&c.id))
                .map(|(r, c)| Inspected {
                    id: c.id.clone(),
                    restart_count: r.restarts.get(&c.id).copied().unwrap_or(0),
                    status: c.state.clone(),
                    health: (!c.health.is_empty()).then(|| c.health.clone()),
                })
                .collect()
        }))
    }

    fn exec(
        &self,
        p: &Project,
        service: &str,
        argv: &[String],
        _: Duration,
    ) -> Result<ExecOutput, EngineError> {
        self.call(format!("exec {} {service} {}", p.name, argv.join(" ")))?;
        let up = self.with(|w| {
            w.running
                .get(&p.name)
                .is_some_and(|r| r.containers.iter().any(|c| c.service == service && c.is_up()))
        });
        if !up {
            return Err(failed(
                "docker compose exec",
                &format!("service {service:?} is not running"),
            ));
        }
        // The fake runs `true` and `false`; anything else succeeds.
        let status = i32::from(argv.first().is_some_and(|a| a == "false"));
        Ok(ExecOutput { status, stdout: String::new() })
    }
}
