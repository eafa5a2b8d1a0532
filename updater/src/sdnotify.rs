//! Telling systemd how a command is doing (sd_notify), and choosing who keeps a watchdog fed
//! while `updater firstboot`, `updater boot` and `updater run` work.
//!
//! Two boards, two owners of the hardware watchdog:
//! - the busybox QEMU image (no systemd): the initramfs arms `/dev/watchdog`, and the updater
//!   feeds it itself while it runs ([`crate::watchdog::Feeder`]);
//! - the Raspberry Pi root with systemd as PID 1: systemd's `RuntimeWatchdogSec=` opens
//!   `/dev/watchdog` and keeps it (a second opener gets `EBUSY`), so the updater must not touch
//!   it. It tells systemd how it is doing instead, through the datagram socket named by
//!   `NOTIFY_SOCKET`: `STATUS=` lines, `READY=1` once the daemon serves, and `WATCHDOG=1` at
//!   half of `WATCHDOG_USEC` (the unit's `WatchdogSec=`), as sd_watchdog_enabled(3) advises.
//!
//! [`select`] makes that choice from the environment, which is passed in as a function so that
//! the tests (which run in parallel) never change the process environment. The messages are
//! the `sd-notify` crate's [`NotifyState`]; the datagram is sent here rather than by
//! `sd_notify::notify`, because that function reads `NOTIFY_SOCKET` from the process
//! environment only (no socket path can be passed in) and does not understand the abstract
//! socket names (`@...`) that systemd may hand out.

use crate::watchdog::Feeder;
use sd_notify::NotifyState;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The environment variable naming systemd's notification socket.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
/// The service watchdog's timeout in microseconds (the unit's `WatchdogSec=`).
pub const WATCHDOG_USEC: &str = "WATCHDOG_USEC";
/// The process the watchdog timeout is meant for (absent: whoever reads it).
pub const WATCHDOG_PID: &str = "WATCHDOG_PID";

/// Reads one environment variable: `std::env::var_os` in production, a table in tests.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<OsString>;

/// The process environment.
pub fn process_env(key: &str) -> Option<OsString> {
    std::env::var_os(key)
}

/// Who keeps the watchdog(s) fed while a command runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Keeper {
    /// systemd supervises: notify it on `socket`; ping it every `ping_every` when its service
    /// watchdog is on. `/dev/watchdog` is systemd's and is never opened.
    Systemd { socket: OsString, ping_every: Option<Duration> },
    /// No service manager to tell: feed this watchdog device (if it exists) directly.
    Device(PathBuf),
    /// Neither (the daemon without systemd: busybox `watchdog` feeds the device).
    Nobody,
}

/// Chooses the [`Keeper`]: systemd when `NOTIFY_SOCKET` is set (not empty), else `device`
/// when the command feeds the hardware watchdog itself, else nobody. `pid` is this process's
/// id, compared with `WATCHDOG_PID`.
pub fn select(env: Env, pid: u32, device: Option<&Path>) -> Keeper {
    match env(NOTIFY_SOCKET).filter(|s| !s.is_empty()) {
        Some(socket) => {
            Keeper::Systemd { socket, ping_every: watchdog_timeout(env, pid).map(|t| t / 2) }
        }
        None => device.map_or(Keeper::Nobody, |d| Keeper::Device(d.to_path_buf())),
    }
}

/// The service watchdog's timeout when it is meant for process `pid`: `WATCHDOG_USEC` is a
/// positive number and `WATCHDOG_PID` is unset or `pid` (sd_watchdog_enabled(3)).
pub fn watchdog_timeout(env: Env, pid: u32) -> Option<Duration> {
    let usec: u64 = env(WATCHDOG_USEC)?.to_str()?.parse().ok().filter(|&u| u > 0)?;
    match env(WATCHDOG_PID) {
        None => Some(Duration::from_micros(usec)),
        Some(p) if p.to_str().and_then(|p| p.parse::<u32>().ok()) == Some(pid) => {
            Some(Duration::from_micros(usec))
        }
        Some(_) => None,
    }
}

/// Sends notifications to one socket: a path, or an abstract name written `@name`.
#[derive(Debug, Clone)]
pub struct Notifier {
    socket: OsString,
}

impl Notifier {
    pub fn new(socket: impl Into<OsString>) -> Notifier {
        Notifier { socket: socket.into() }
    }

    /// Sends `states` as one datagram, one `KEY=VALUE` per line (sd_notify(3)).
    pub fn send(&self, states: &[NotifyState]) -> io::Result<()> {
        let msg: String = states.iter().map(|s| format!("{s}\n")).collect();
        let sock = connect(&self.socket)?;
        let sent = sock.send(msg.as_bytes())?;
        if sent != msg.len() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "notification cut short"));
        }
        Ok(())
    }
}

/// An unbound datagram socket connected to `socket`.
fn connect(socket: &OsStr) -> io::Result<UnixDatagram> {
    let sock = UnixDatagram::unbound()?;
    match socket.as_bytes().strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.connect_addr(&addr)?;
        }
        None => sock.connect(socket)?,
    }
    Ok(sock)
}

/// Sends `WATCHDOG=1` from a thread every `every`, until dropped, or until `limit` has passed
/// since the last [`Pinger::touch`] (or the start): a command stuck past its own deadlines is
/// then killed by systemd (`WatchdogSec=`), as the hardware would reset it on the QEMU image.
#[derive(Debug)]
pub struct Pinger {
    touched: Arc<Mutex<Instant>>,
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Pinger {
    /// Pings at once, then every `every`.
    pub fn start(notifier: Notifier, every: Duration, limit: Duration) -> io::Result<Pinger> {
        let touched = Arc::new(Mutex::new(Instant::now()));
        notifier.send(&[NotifyState::Watchdog])?;
        let (stop, stopped) = mpsc::channel::<()>();
        let last = Arc::clone(&touched);
        let thread = spawn_without_stop_signals(move || loop {
            match stopped.recv_timeout(every) {
                Err(RecvTimeoutError::Timeout) => {
                    let fresh = last.lock().map(|t| t.elapsed() < limit).unwrap_or(false);
                    if fresh {
                        // A failed send is retried at the next tick; nothing else can be done.
                        let _ = notifier.send(&[NotifyState::Watchdog]);
                    }
                }
                Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
            }
        })?;
        Ok(Pinger { touched, stop: Some(stop), thread: Some(thread) })
    }

    /// Says the command is still making progress: the limit starts again.
    pub fn touch(&self) {
        if let Ok(mut t) = self.touched.lock() {
            *t = Instant::now();
        }
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Spawns the pinger's thread with SIGTERM and SIGINT blocked, as the daemon blocks them in
/// every thread but the one that waits for them (daemon::run): a stop signal delivered to a
/// thread that had them unblocked would kill the process instead of stopping it cleanly.
fn spawn_without_stop_signals(f: impl FnOnce() + Send + 'static) -> io::Result<JoinHandle<()>> {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal};
    let mut stop = SigSet::empty();
    stop.add(Signal::SIGTERM);
    stop.add(Signal::SIGINT);
    let old = stop.thread_swap_mask(SigmaskHow::SIG_BLOCK).map_err(io::Error::from)?;
    let spawned = std::thread::Builder::new().name("sd-watchdog".into()).spawn(f);
    old.thread_set_mask().map_err(io::Error::from)?;
    spawned
}

/// What a running command holds to stay supervised: a notifier and its pinger under systemd,
/// a watchdog feeder on the busybox image, or nothing. Dropping it stops the pings or feeding.
#[derive(Debug, Default)]
pub struct Alive {
    notifier: Option<Notifier>,
    pinger: Option<Pinger>,
    feeder: Option<Feeder>,
}

impl Alive {
    /// Nothing to tell and nothing to feed (tests, hosts).
    pub fn none() -> Alive {
        Alive::default()
    }

    /// Starts what `keeper` asks for. Pings or feeds stop once `limit` passes with no
    /// [`Alive::touch`]. A device feeder feeds every [`crate::watchdog::FEED_EVERY`].
    pub fn start(keeper: Keeper, limit: Duration) -> io::Result<Alive> {
        match keeper {
            Keeper::Systemd { socket, ping_every } => {
                let notifier = Notifier::new(socket);
                let pinger = match ping_every {
                    Some(every) => Some(Pinger::start(notifier.clone(), every, limit)?),
                    None => None,
                };
                Ok(Alive { notifier: Some(notifier), pinger, feeder: None })
            }
            Keeper::Device(path) => {
                let feeder = Feeder::open(&path, crate::watchdog::FEED_EVERY, limit)?;
                Ok(Alive { feeder, ..Alive::default() })
            }
            Keeper::Nobody => Ok(Alive::none()),
        }
    }

    /// Whether systemd is told (a notification socket is known).
    pub fn notifies(&self) -> bool {
        self.notifier.is_some()
    }

    /// Whether the hardware watchdog is fed by this process.
    pub fn feeds_device(&self) -> bool {
        self.feeder.is_some()
    }

    /// `STATUS=msg` (one line: newlines become spaces).
    pub fn status(&self, msg: &str) -> io::Result<()> {
        self.send(&[NotifyState::Status(&one_line(msg))])
    }

    /// `READY=1` and `STATUS=msg`: the daemon is serving.
    pub fn ready(&self, msg: &str) -> io::Result<()> {
        self.send(&[NotifyState::Ready, NotifyState::Status(&one_line(msg))])
    }

    /// `STOPPING=1` and `STATUS=msg`.
    pub fn stopping(&self, msg: &str) -> io::Result<()> {
        self.send(&[NotifyState::Stopping, NotifyState::Status(&one_line(msg))])
    }

    /// Progress was made: the pinger's limit starts again.
    pub fn touch(&self) {
        if let Some(p) = &self.pinger {
            p.touch();
        }
    }

    fn send(&self, states: &[NotifyState]) -> io::Result<()> {
        match &self.notifier {
            Some(n) => n.send(states),
            None => Ok(()),
        }
    }
}

/// A notification field holds one line.
fn one_line(msg: &str) -> String {
    msg.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests;
