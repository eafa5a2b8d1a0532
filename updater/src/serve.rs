//! The daemon's local endpoints (default `127.0.0.1:9731`, `updater run --listen`):
//!
//! - `GET /health`: `200` with the checks as JSON, or `503` with the failing ones named;
//! - `GET /metrics`: the Prometheus text format ([`crate::metrics`]);
//! - `GET /status`: the same JSON as `updater status --json` ([`crate::status::Status`]);
//! - `POST /check-now`: poll the channel now (what `updater check-now` sends); `202`.
//!
//! Requests are served one at a time on one thread; every answer is built from the files the
//! daemon writes (state, record, history), so the endpoints never disagree with the CLI.

use crate::bootinfo::BootInfo;
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
#[derive(Debug, Clone)]
pub struct Context {
    pub device: Device,
    pub booted: Result<BootInfo, String>,
    /// The free-space floor of `/data` (the `disk-space` check).
    pub min_free_bytes: u64,
    /// How many history entries `/status` shows.
    pub history: usize,
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
    check(
        "safe-mode",
        !st.safe_mode,
        if st.safe_mode { "the device runs its safe-mode stack".into() } else { "off".into() },
    );
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
    match (method, path) {
        ("GET", "/health") => {
            let st = status();
            let h = health(&st, read_only(&st.data_dir), ctx.min_free_bytes);
            let body = serde_json::to_string_pretty(&h).unwrap_or_default();
            (if h.ok { 200 } else { 503 }, JSON, body)
        }
        ("GET", "/metrics") => (
            200,
            crate::metrics::CONTENT_TYPE,
            crate::metrics::render(&status(), true, crate::slot::unix_now()),
        ),
        ("GET", "/status") => {
            (200, JSON, serde_json::to_string_pretty(&status()).unwrap_or_default())
        }
        ("POST", "/check-now") => match wake.send(Wake::CheckNow) {
            Ok(()) => (202, JSON, "{\"check\":\"started\"}".into()),
            Err(_) => (503, JSON, "{\"error\":\"the daemon is stopping\"}".into()),
        },
        (_, "/health" | "/metrics" | "/status" | "/check-now") => {
            (405, JSON, format!("{{\"error\":\"{method} not allowed on {path}\"}}"))
        }
        _ => (404, JSON, format!("{{\"error\":\"no endpoint {}\"}}", path.escape_default())),
    }
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
