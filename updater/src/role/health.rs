//! A role's health: its checks (HTTP, TCP, command, container), the probation watch after an
//! update, and crash-loop detection for a running role.
//!
//! The checks do I/O (a GET, a connect, a command, the engine's container list); the verdicts
//! over their results ([`probation_verdict`], [`CrashLoopWatch`]) are pure.

use std::collections::BTreeMap;
use std::net::ToSocketAddrs;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::engine::{Container, Engine, EngineError, Inspected, Project};
use super::spec::{CommandCheck, ContainerCheck, HealthChecks, HttpCheck, TcpCheck};

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckResult {
    /// `http http://...`, `tcp host:port`, `command ...`, `container SERVICE`.
    pub check: String,
    pub ok: bool,
    pub detail: String,
}

fn result(check: String, outcome: Result<String, String>) -> CheckResult {
    match outcome {
        Ok(detail) => CheckResult { check, ok: true, detail },
        Err(detail) => CheckResult { check, ok: false, detail },
    }
}

/// Runs every check once.
pub fn run_checks(
    engine: &dyn Engine,
    project: &Project,
    checks: &HealthChecks,
) -> Vec<CheckResult> {
    let ps = engine.ps(project);
    let mut out = Vec::new();
    out.extend(checks.http.iter().map(|c| result(format!("http {}", c.url.0), http(c))));
    out.extend(checks.tcp.iter().map(|c| result(format!("tcp {}", c.address.0), tcp(c))));
    out.extend(checks.command.iter().map(|c| {
        result(format!("command {}", c.command.0.join(" ")), command(engine, project, c))
    }));
    out.extend(
        checks
            .container
            .iter()
            .map(|c| result(format!("container {}", c.service), container(&ps, c))),
    );
    out
}

/// Runs the checks until all pass or `timeout` passes; the last failing results otherwise.
pub fn wait_healthy(
    engine: &dyn Engine,
    project: &Project,
    checks: &HealthChecks,
    timeout: Duration,
    poll: Duration,
) -> Result<Vec<CheckResult>, Vec<CheckResult>> {
    let started = Instant::now();
    loop {
        let results = run_checks(engine, project, checks);
        if results.iter().all(|r| r.ok) {
            return Ok(results);
        }
        if started.elapsed() + poll > timeout {
            return Err(results.into_iter().filter(|r| !r.ok).collect());
        }
        std::thread::sleep(poll);
    }
}

fn http(c: &HttpCheck) -> Result<String, String> {
    let agent = ureq::AgentBuilder::new().timeout(c.timeout.0).redirects(0).build();
    let (status, body) = match agent.get(&c.url.0).call() {
        Ok(resp) => (resp.status(), resp.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(code, resp)) => (code, resp.into_string().unwrap_or_default()),
        Err(e) => return Err(e.to_string()),
    };
    if status != c.status {
        return Err(format!("status {status}, expected {}", c.status));
    }
    match &c.contains {
        Some(words) if !body.contains(words.as_str()) => {
            Err(format!("the answer does not contain {words:?}"))
        }
        _ => Ok(format!("status {status}")),
    }
}

fn tcp(c: &TcpCheck) -> Result<String, String> {
    let addrs: Vec<_> = c.address.0.to_socket_addrs().map_err(|e| e.to_string())?.collect();
    let mut last = String::from("no address");
    for a in addrs {
        match std::net::TcpStream::connect_timeout(&a, c.timeout.0) {
            Ok(_) => return Ok(format!("connected to {a}")),
            Err(e) => last = format!("{a}: {e}"),
        }
    }
    Err(last)
}

fn command(engine: &dyn Engine, project: &Project, c: &CommandCheck) -> Result<String, String> {
    let status = match &c.service {
        Some(service) => {
            engine
                .exec(project, service, &c.command.0, c.timeout.0)
                .map_err(|e| e.to_string())?
                .status
        }
        None => host_command(project, c)?,
    };
    if status == 0 {
        Ok("exit status 0".into())
    } else {
        Err(format!("exit status {status}"))
    }
}

/// Runs a check's command on the host, in the release folder, within its time limit.
fn host_command(project: &Project, c: &CommandCheck) -> Result<i32, String> {
    let mut child = std::process::Command::new(&c.command.0[0])
        .args(&c.command.0[1..])
        .current_dir(&project.dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", c.command.0[0]))?;
    let started = Instant::now();
    loop {
        match child.try_wait().map_err(|e| e.to_string())? {
            Some(s) => return Ok(s.code().unwrap_or(-1)),
            None if started.elapsed() >= c.timeout.0 => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "did not finish within {}",
                    humantime::format_duration(c.timeout.0)
                ));
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn container(
    ps: &Result<Vec<Container>, EngineError>,
    c: &ContainerCheck,
) -> Result<String, String> {
    let all = ps.as_ref().map_err(ToString::to_string)?;
    let mine: Vec<&Container> = all.iter().filter(|x| x.service == c.service).collect();
    if mine.is_empty() {
        return Err("no container".into());
    }
    match mine.iter().find(|x| !x.is_up()) {
        Some(bad) => Err(describe(bad)),
        None => Ok(format!("{} up", mine.len())),
    }
}

fn describe(c: &Container) -> String {
    match (c.state.as_str(), c.health.as_str()) {
        ("exited", _) => format!("{} exited with status {}", c.name, c.exit_code),
        (state, "") => format!("{} is {state}", c.name),
        (state, health) => format!("{} is {state} and {health}", c.name),
    }
}

/// The restart count of every container, for the probation's baseline.
pub fn restart_counts(inspected: &[Inspected]) -> BTreeMap<String, u64> {
    inspected.iter().map(|i| (i.id.clone(), i.restart_count)).collect()
}

/// Why the stack fails its probation now, or `None` while it holds: a container that is not
/// up, a container that was not there at the start (replaced), or a restart since `baseline`.
pub fn probation_verdict(
    baseline: &BTreeMap<String, u64>,
    ps: &[Container],
    inspected: &[Inspected],
) -> Option<String> {
    if let Some(bad) = ps.iter().find(|c| !c.is_up()) {
        return Some(describe(bad));
    }
    if let Some(new) = ps.iter().find(|c| !baseline.contains_key(&c.id)) {
        return Some(format!("{} was replaced during probation", new.name));
    }
    inspected.iter().find_map(|i| {
        let before = baseline.get(&i.id).copied().unwrap_or(0);
        (i.restart_count > before)
            .then(|| format!("container {} restarted {} time(s)", i.id, i.restart_count - before))
    })
}

/// Watches the stack for `probation`, polling every `poll`.
pub fn probation(
    engine: &dyn Engine,
    project: &Project,
    probation: Duration,
    poll: Duration,
) -> Result<(), String> {
    let look = || -> Result<(Vec<Container>, Vec<Inspected>), String> {
        let ps = engine.ps(project).map_err(|e| e.to_string())?;
        let ids: Vec<String> = ps.iter().map(|c| c.id.clone()).collect();
        let inspected = engine.inspect(&ids).map_err(|e| e.to_string())?;
        Ok((ps, inspected))
    };
    let (ps, inspected) = look()?;
    let baseline = restart_counts(&inspected);
    if let Some(why) = probation_verdict(&baseline, &ps, &inspected) {
        return Err(why);
    }
    let started = Instant::now();
    while started.elapsed() < probation {
        std::thread::sleep(poll.min(probation.saturating_sub(started.elapsed())));
        let (ps, inspected) = look()?;
        if let Some(why) = probation_verdict(&baseline, &ps, &inspected) {
            return Err(why);
        }
    }
    Ok(())
}

/// Crash-loop detection over samples of the role's total restart count: `restarts` or more
/// restarts within `window` is a crash loop. Pure: the caller brings the clock.
#[derive(Debug, Clone)]
pub struct CrashLoopWatch {
    restarts: u64,
    window: Duration,
    /// (seconds since some origin, total restarts then), oldest first.
    samples: Vec<Sample>,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Duration,
    total: u64,
}

impl CrashLoopWatch {
    pub fn new(restarts: u32, window: Duration) -> CrashLoopWatch {
        CrashLoopWatch { restarts: u64::from(restarts.max(1)), window, samples: Vec::new() }
    }

    /// Adds a sample (`at` grows; `total` is the sum of the containers' restart counts, which
    /// drops when containers are replaced) and tells whether the role is crash-looping.
    pub fn observe(&mut self, at: Duration, total: u64) -> bool {
        if self.samples.last().is_some_and(|s| total < s.total) {
            self.samples.clear();
        }
        self.samples.push(Sample { at, total });
        let since = at.saturating_sub(self.window);
        self.samples.retain(|s| s.at >= since);
        let oldest = self.samples.first().map_or(total, |s| s.total);
        total - oldest >= self.restarts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::role::fake::{FakeEngine, Release, Up};
    use crate::role::spec::{Argv, Dur, HostPort, HttpUrl};
    use std::io::{Read, Write};

    fn c(id: &str, state: &str, health: &str) -> Container {
        Container {
            id: id.into(),
            name: format!("p-{id}-1"),
            service: id.into(),
            state: state.into(),
            health: health.into(),
            exit_code: 0,
        }
    }

    fn insp(id: &str, restarts: u64) -> Inspected {
        Inspected { id: id.into(), restart_count: restarts, status: "running".into(), health: None }
    }

    #[test]
    fn probation_fails_on_a_restart_a_replacement_or_a_container_down() {
        let base = restart_counts(&[insp("a", 2), insp("b", 0)]);
        let ps = [c("a", "running", "healthy"), c("b", "running", "")];
        assert_eq!(probation_verdict(&base, &ps, &[insp("a", 2), insp("b", 0)]), None);
        let why = probation_verdict(&base, &ps, &[insp("a", 3), insp("b", 0)]).unwrap();
        assert_eq!(why, "container a restarted 1 time(s)");
        let why = probation_verdict(&base, &[c("a", "running", "unhealthy")], &[]).unwrap();
        assert_eq!(why, "p-a-1 is running and unhealthy");
        let why = probation_verdict(&base, &[c("z", "running", "")], &[]).unwrap();
        assert!(why.contains("replaced"), "{why}");
    }

    #[test]
    fn a_crash_loop_is_n_restarts_within_the_window() {
        let mut w = CrashLoopWatch::new(3, Duration::from_secs(300));
        let s = Duration::from_secs;
        assert!(!w.observe(s(0), 10));
        assert!(!w.observe(s(100), 12));
        assert!(w.observe(s(200), 13));
        // Slow restarts: 3 in 10 minutes is not a loop in a 5-minute window.
        let mut w = CrashLoopWatch::new(3, s(300));
        assert!(!w.observe(s(0), 0));
        assert!(!w.observe(s(250), 1));
        assert!(!w.observe(s(500), 2));
        assert!(!w.observe(s(750), 3));
        // Containers replaced (counts start over): no false alarm.
        let mut w = CrashLoopWatch::new(2, s(300));
        assert!(!w.observe(s(0), 9));
        assert!(!w.observe(s(10), 0));
        assert!(w.observe(s(20), 2));
    }

    fn checks() -> HealthChecks {
        HealthChecks { http: vec![], tcp: vec![], command: vec![], container: vec![] }
    }

    /// A one-shot HTTP server on a free port that answers `status` with `body`.
    fn serve_once(status: u16, body: &'static str) -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                let _ = write!(
                    s,
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        format!("http://{addr}/")
    }

    #[test]
    fn http_tcp_command_and_container_checks_report_each_result() {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeEngine::new();
        fake.add_image("i:1");
        fake.release(dir.path(), Release::new(&[("web", "i:1")]));
        let p = Project { name: "metrica-t".into(), dir: dir.path().into(), files: vec![] };
        fake.up(&p, Duration::from_secs(1)).unwrap();
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let mut hc = checks();
        let t = Dur(Duration::from_secs(2));
        hc.http.push(HttpCheck {
            url: HttpUrl(serve_once(200, "ok ready")),
            status: 200,
            contains: Some("ready".into()),
            timeout: t.clone(),
        });
        hc.http.push(HttpCheck {
            url: HttpUrl(serve_once(503, "no")),
            status: 200,
            contains: None,
            timeout: t.clone(),
        });
        hc.tcp.push(TcpCheck { address: HostPort(closed.to_string()), timeout: t.clone() });
        hc.command.push(CommandCheck {
            command: Argv(vec!["test".into(), "-d".into(), ".".into()]),
            service: None,
            timeout: t.clone(),
        });
        hc.command.push(CommandCheck {
            command: Argv(vec!["false".into()]),
            service: Some("web".into()),
            timeout: t,
        });
        hc.container.push(ContainerCheck { service: "web".into() });
        hc.container.push(ContainerCheck { service: "db".into() });
        let got: Vec<(bool, String)> =
            run_checks(&fake, &p, &hc).into_iter().map(|r| (r.ok, r.detail)).collect();
        assert_eq!(got[0], (true, "status 200".into()));
        assert_eq!(got[1], (false, "status 503, expected 200".into()));
        assert!(!got[2].0, "{:?}", got[2]);
        assert_eq!(got[3], (true, "exit status 0".into()));
        assert_eq!(got[4], (false, "exit status 1".into()));
        assert_eq!(got[5], (true, "1 up".into()));
        assert_eq!(got[6], (false, "no container".into()));
    }

    #[test]
    fn probation_catches_a_crash_loop_and_passes_a_steady_stack() {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeEngine::new();
        fake.add_image("i:1");
        let p = Project { name: "metrica-t".into(), dir: dir.path().into(), files: vec![] };
        fake.release(dir.path(), Release::new(&[("web", "i:1")]));
        fake.up(&p, Duration::from_secs(1)).unwrap();
        assert_eq!(
            probation(&fake, &p, Duration::from_millis(30), Duration::from_millis(10)),
            Ok(())
        );
        fake.release(
            dir.path(),
            Release { up: Up::RestartsLater, ..Release::new(&[("web", "i:1")]) },
        );
        fake.up(&p, Duration::from_secs(1)).unwrap();
        let why =
            probation(&fake, &p, Duration::from_millis(30), Duration::from_millis(10)).unwrap_err();
        assert!(why.contains("restarted"), "{why}");
    }
}
