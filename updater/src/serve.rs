//! The daemon's local endpoints (default `127.0.0.1:9731`, `updater run --listen`):
//!
//! - `GET /health`: `200` with the checks as JSON, or `503` with the failing ones named;
//! - `GET /metrics`: the Prometheus text format ([`crate::metrics`]);
//! - `GET /status`: the same JSON as `updater status --json` ([`crate::status::Status`]);
//! - `GET /`: a small HTML status page (version, slot, role, safe mode, last errors), served
//!   by the updater itself so that safe mode has a page even when the container engine will
//!   not start;
//! - `POST /check-now`: poll the channel now (what `updater check-now` sends); `202`.
//!
//! Requests are served one at a time on one thread; every answer is built from the files the
//! daemon writes (state, record, history), so the endpoints never disagree with the CLI.

use crate::bootinfo::BootInfo;
use crate::role_report::{RoleSection, RoleSource};
use crate::slot::Device;
use crate::status::Status;
use serde::Serialize;
use std::sync::mpsc::Sender;
use std::sync::Arc;

/// Why the loop wakes up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    CheckNow,
    Stop,
}

/// What the endpoints read.
#[derive(Clone)]
pub struct Context {
    pub device: Device,
    pub booted: Result<BootInfo, String>,
    /// The free-space floor of `/data` (the `disk-space` check).
    pub min_free_bytes: u64,
    /// How many history entries `/status` shows.
    pub history: usize,
    /// The roles section of `/status`, `/health`, `/metrics` and the page (the daemon's role
    /// runner); `None` on a device without a role.
    pub roles: Option<Arc<dyn RoleSource>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("device", &self.device)
            .field("roles", &self.roles.is_some())
            .finish()
    }
}

/// One health check's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckResult {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

/// The `/health` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Health {
    pub ok: bool,
    pub checks: Vec<CheckResult>,
    /// Names of the failing checks.
    pub failing: Vec<&'static str>,
}

/// The health of a device from its status (pure): state readable, `/data` writable and above
/// its floor, no drift, not in safe mode.
pub fn health(st: &Status, data_read_only: Option<bool>, min_free: u64) -> Health {
    health_with_role(st, None, data_read_only, min_free)
}

/// [`health`], with the daemon's role section: why safe mode is on (the marker), and the
/// `container-engine` check.
pub fn health_with_role(
    st: &Status,
    role: Option<&RoleSection>,
    data_read_only: Option<bool>,
    min_free: u64,
) -> Health {
    let mut checks = Vec::new();
    let mut check = |name: &'static str, ok: bool, detail: String| {
        checks.push(CheckResult { name, ok, detail });
    };
    match (&st.state, &st.state_error) {
        (_, Some(e)) => check("state", false, e.clone()),
        (None, None) => check("state", false, "no state file yet".into()),
        (Some(s), None) => check("state", true, format!("committed slot {}", s.committed)),
    }
    let data = st.data_dir.display();
    let (ok, detail) = match data_read_only {
        Some(false) => (true, format!("{data} is read-write")),
        Some(true) => (false, format!("{data} is mounted read-only")),
        None => (false, format!("cannot stat {data}")),
    };
    check("data-writable", ok, detail);
    let (ok, detail) = match st.disk_free_bytes {
        Some(free) if free >= min_free => (true, format!("{free} bytes free (floor {min_free})")),
        Some(free) => (false, format!("{free} bytes free, below the floor of {min_free}")),
        None => (false, "free space unknown".into()),
    };
    check("disk-space", ok, detail);
    if st.drift.is_empty() {
        check("drift", true, "disk agrees with the state".into());
    } else {
        check("drift", false, st.drift.join("; "));
    }
    let safe_mode = match (role.and_then(|r| r.safe_mode.as_ref()), st.safe_mode) {
        (Some(m), _) => format!(
            "the device runs its safe-mode stack: {} (since {})",
            m.reason,
            crate::cli::utc(m.since)
        ),
        (None, true) => "the device runs its safe-mode stack".into(),
        (None, false) => "off".into(),
    };
    check("safe-mode", !st.safe_mode, safe_mode);
    if let Some(up) = role.and_then(|r| r.engine_up) {
        let detail = if up {
            "the container engine answers".into()
        } else {
            "the container engine is down: no stack runs; the updater serves the status page \
             and the host serves SSH"
                .to_string()
        };
        check("container-engine", up, detail);
    }
    let failing: Vec<&'static str> = checks.iter().filter(|c| !c.ok).map(|c| c.name).collect();
    Health { ok: failing.is_empty(), checks, failing }
}

fn read_only(dir: &std::path::Path) -> Option<bool> {
    let st = nix::sys::statvfs::statvfs(dir).ok()?;
    Some(st.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY))
}

/// The answer to one request: status code, content type, body.
pub fn respond(
    ctx: &Context,
    method: &str,
    path: &str,
    wake: &Sender<Wake>,
) -> (u16, &'static str, String) {
    const JSON: &str = "application/json";
    let path = path.split('?').next().unwrap_or(path);
    let status = || ctx.device.status(ctx.booted.clone(), ctx.history);
    let role = || ctx.roles.as_ref().map(|r| r.section());
    match (method, path) {
        ("GET", "/health") => {
            let st = status();
            let h =
                health_with_role(&st, role().as_ref(), read_only(&st.data_dir), ctx.min_free_bytes);
            let body = serde_json::to_string_pretty(&h).unwrap_or_default();
            (if h.ok { 200 } else { 503 }, JSON, body)
        }
        ("GET", "/metrics") => (
            200,
            crate::metrics::CONTENT_TYPE,
            crate::metrics::render_with_role(
                &status(),
                role().as_ref(),
                true,
                crate::slot::unix_now(),
            ),
        ),
        ("GET", "/status") => {
            let mut j = serde_json::to_value(status()).unwrap_or_default();
            if let (Some(r), Some(map)) = (role(), j.as_object_mut()) {
                map.insert("role".into(), serde_json::to_value(r).unwrap_or_default());
            }
            (200, JSON, serde_json::to_string_pretty(&j).unwrap_or_default())
        }
        ("GET", "/") => (200, "text/html; charset=utf-8", page(&status(), role().as_ref())),
        ("POST", "/check-now") => match wake.send(Wake::CheckNow) {
            Ok(()) => (202, JSON, "{\"check\":\"started\"}".into()),
            Err(_) => (503, JSON, "{\"error\":\"the daemon is stopping\"}".into()),
        },
        (_, "/" | "/health" | "/metrics" | "/status" | "/check-now") => {
            (405, JSON, format!("{{\"error\":\"{method} not allowed on {path}\"}}"))
        }
        _ => (404, JSON, format!("{{\"error\":\"no endpoint {}\"}}", path.escape_default())),
    }
}

/// Escapes text for HTML.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The status page: what an operator on the LAN needs when the role (or the engine) is down.
pub fn page(st: &Status, role: Option<&RoleSection>) -> String {
    let mut rows: Vec<(&str, String)> = Vec::new();
    let slot = st.booted.as_ref().and_then(BootInfo::slot);
    let version = match (&st.state, slot) {
        (Some(s), Some(slot)) => s.slot(slot).version.as_ref().map(ToString::to_string),
        (Some(s), None) => s.slot(s.committed).version.as_ref().map(ToString::to_string),
        _ => None,
    };
    rows.push(("OS version", version.unwrap_or_else(|| "unknown".into())));
    rows.push(("Slot", slot.map_or_else(|| "unknown".into(), |s| s.to_string())));
    let safe = match role.and_then(|r| r.safe_mode.as_ref()) {
        Some(m) => format!("ON: {} (since {})", m.reason, crate::cli::utc(m.since)),
        None if st.safe_mode => "ON".into(),
        None => "off".into(),
    };
    rows.push(("Safe mode", safe));
    let mut errors: Vec<String> = Vec::new();
    if let Some(r) = role {
        for role in r.roles.iter().flat_map(|s| &s.roles) {
            let health = match role.healthy {
                Some(true) => "healthy",
                Some(false) => "NOT healthy",
                None => "health unknown",
            };
            let current = role.current.as_deref().unwrap_or("none");
            let previous = role.previous.as_deref().unwrap_or("none");
            rows.push(("Role", format!("{} {current} ({health}; previous {previous})", role.name)));
        }
        if let Some(e) = &r.error {
            errors.push(format!("roles: {e}"));
        }
        let engine = match r.engine_up {
            Some(true) => "up",
            Some(false) => "DOWN (the updater serves this page; SSH is up)",
            None => "unknown",
        };
        rows.push(("Container engine", engine.into()));
        if let Some(d) = &r.daemon.decision {
            rows.push(("Role decision", format!("{}: {}", d.code, d.reason)));
        }
        errors.extend(r.daemon.errors.iter().rev().map(|e| format!("{}: {}", e.kind, e.message)));
    }
    if let Some(d) = &st.daemon {
        errors.extend(d.last_error.iter().map(|e| format!("{}: {}", e.kind, e.message)));
    }
    let mut html = String::from(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>Metrica device</title></head>\n\
         <body><h1>Metrica device</h1>\n<table>\n",
    );
    for (k, v) in rows {
        html.push_str(&format!("<tr><th>{}</th><td>{}</td></tr>\n", esc(k), esc(&v)));
    }
    html.push_str("</table>\n<h2>Last errors</h2>\n<ul>\n");
    if errors.is_empty() {
        html.push_str("<li>none</li>\n");
    }
    for e in errors.iter().take(10) {
        html.push_str(&format!("<li>{}</li>\n", esc(e)));
    }
    html.push_str(
        "</ul>\n<p>JSON: <a href=\"/status\">/status</a>, <a href=\"/health\">/health</a>, \
                   <a href=\"/metrics\">/metrics</a></p>\n</body></html>\n",
    );
    html
}

/// The running server; stops when [`Server::stop`] is called or it is dropped.
pub struct Server {
    inner: Arc<tiny_http::Server>,
    pub addr: std::net::SocketAddr,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Server({})", self.addr)
    }
}

impl Server {
    /// Binds `listen` (e.g. `127.0.0.1:9731`; port 0 picks one) and serves on a thread.
    pub fn start(listen: &str, ctx: Context, wake: Sender<Wake>) -> anyhow::Result<Server> {
        let inner = Arc::new(
            tiny_http::Server::http(listen)
                .map_err(|e| anyhow::anyhow!("listening on {listen}: {e}"))?,
        );
        let addr = inner
            .server_addr()
            .to_ip()
            .ok_or_else(|| anyhow::anyhow!("listening on {listen}: not an IP address"))?;
        let server = inner.clone();
        let thread = std::thread::Builder::new().name("endpoints".into()).spawn(move || {
            while let Ok(req) = server.recv() {
                let (code, ctype, body) = respond(&ctx, req.method().as_str(), req.url(), &wake);
                let header = tiny_http::Header::from_bytes("Content-Type", ctype)
                    .expect("a static header is valid");
                let resp = tiny_http::Response::from_string(body)
                    .with_status_code(code)
                    .with_header(header);
                let _ = req.respond(resp);
            }
        })?;
        Ok(Server { inner, addr, thread: Some(thread) })
    }

    pub fn stop(&mut self) {
        self.inner.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `updater check-now`: asks the daemon at `listen` to poll now.
pub fn check_now(listen: &str) -> anyhow::Result<()> {
    let url = format!("http://{listen}/check-now");
    let agent = ureq::AgentBuilder::new().timeout(std::time::Duration::from_secs(10)).build();
    match agent.post(&url).call() {
        Ok(r) if r.status() == 202 => Ok(()),
        Ok(r) => anyhow::bail!("{url}: HTTP {} (202 expected)", r.status()),
        Err(ureq::Error::Status(code, _)) => anyhow::bail!("{url}: HTTP {code} (202 expected)"),
        Err(e) => anyhow::bail!("{url}: {e} (is `updater run` running with --listen {listen}?)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::tests::{role_section, status};
    use crate::role::safe_mode::{Marker, Reason};

    fn check<'a>(h: &'a Health, name: &str) -> &'a CheckResult {
        h.checks.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no {name}: {h:?}"))
    }

    #[test]
    fn health_says_why_safe_mode_is_on_and_when_the_engine_is_down() {
        let mut st = status();
        st.drift.clear();
        let mut role = role_section();
        let h = health_with_role(&st, Some(&role), Some(false), 0);
        assert!(h.ok, "{h:?}");
        assert_eq!(check(&h, "container-engine").detail, "the container engine answers");
        st.safe_mode = true;
        role.safe_mode =
            Some(Marker { reason: Reason::CrashLoop { role: "camera-single".into() }, since: 0 });
        role.engine_up = Some(false);
        let h = health_with_role(&st, Some(&role), Some(false), 0);
        assert_eq!(h.failing, ["safe-mode", "container-engine"]);
        let safe = &check(&h, "safe-mode").detail;
        assert!(safe.contains("role camera-single is crash-looping (since 1970-01-01"), "{safe}");
        assert!(check(&h, "container-engine").detail.contains("engine is down"));
        // Without the role section (`updater status`, a device without a role) there is no
        // engine check.
        let h = health(&status(), Some(false), 0);
        assert!(h.checks.iter().all(|c| c.name != "container-engine"));
    }

    #[test]
    fn the_page_shows_version_slot_role_safe_mode_and_errors_escaped() {
        let mut st = status();
        st.safe_mode = true;
        let mut r = role_section();
        r.safe_mode = Some(Marker {
            reason: Reason::BadProvisioning { error: "role: <bad>".into() },
            since: 1_795_507_200,
        });
        r.engine_up = Some(false);
        r.daemon.errors.push(crate::daemon_record::NamedError {
            time: 1,
            kind: "role_rolled_back".into(),
            message: "role camera-single 1.3.0 rolled back to 1.2.0: <probation>".into(),
        });
        let html = page(&st, Some(&r));
        for want in [
            "<tr><th>OS version</th><td>1.0.0</td></tr>",
            "<tr><th>Safe mode</th><td>ON: invalid provisioning: role: &lt;bad&gt; (since 2026-11-24T08:00:00Z)</td></tr>",
            "<tr><th>Role</th><td>camera-single 1.2.0 (NOT healthy; previous 1.1.0)</td></tr>",
            "<tr><th>Container engine</th><td>DOWN (the updater serves this page; SSH is up)</td></tr>",
            "<li>role_rolled_back: role camera-single 1.3.0 rolled back to 1.2.0: &lt;probation&gt;</li>",
        ] {
            assert!(html.contains(want), "missing {want:?} in\n{html}");
        }
        assert!(!html.contains("<bad>") && !html.contains("<probation>"));
        let quiet = page(&status(), None);
        assert!(quiet.contains("<tr><th>Safe mode</th><td>off</td></tr>"), "{quiet}");
    }

    struct Fixed;
    impl RoleSource for Fixed {
        fn section(&self) -> RoleSection {
            role_section()
        }
    }

    #[test]
    fn the_endpoints_carry_the_role_section() {
        let dir = tempfile::tempdir().unwrap();
        let device = Device::new(dir.path().join("disk.img"), dir.path().join("data"));
        std::fs::create_dir_all(dir.path().join("data/metrica")).unwrap();
        let mut ctx = Context {
            device,
            booted: Err("unknown".into()),
            min_free_bytes: 0,
            history: 1,
            roles: Some(Arc::new(Fixed)),
        };
        let (tx, _rx) = std::sync::mpsc::channel();
        let (code, ctype, body) = respond(&ctx, "GET", "/", &tx);
        assert_eq!((code, ctype), (200, "text/html; charset=utf-8"));
        assert!(body.contains("camera-single 1.2.0"), "{body}");
        let (code, _, body) = respond(&ctx, "GET", "/status", &tx);
        assert_eq!(code, 200);
        let j: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(j["role"]["roles"]["roles"][0]["name"], "camera-single");
        assert_eq!(j["role"]["restarts"]["camera-single"], 7);
        assert_eq!(j["role"]["safe_mode"], serde_json::Value::Null);
        let (_, _, body) = respond(&ctx, "GET", "/metrics", &tx);
        assert!(body.contains("metrica_role_restarts_total{role=\"camera-single\"} 7\n"));
        let (_, _, body) = respond(&ctx, "GET", "/health", &tx);
        assert!(body.contains("container-engine"), "{body}");
        assert_eq!(respond(&ctx, "POST", "/", &tx).0, 405);
        ctx.roles = None;
        let (_, _, body) = respond(&ctx, "GET", "/status", &tx);
        let j: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(j.get("role").is_none(), "no role section without a role source");
    }
}
