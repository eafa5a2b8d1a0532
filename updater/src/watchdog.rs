//! Feeding the hardware watchdog while `updater boot` runs.
//!
//! On a Raspberry Pi the firmware arms the watchdog before the kernel starts
//! (`kernel_watchdog_timeout` in `config.txt`); the QEMU image models that in its initramfs
//! (i6300esb loaded with `nowayout=1`, `/dev/watchdog` written once). From then on userspace must
//! keep writing to `/dev/watchdog`, or the board resets, and a reset during a trial boot clears
//! the firmware's one-shot tryboot flag: a slot whose userspace hangs goes back to the
//! committed slot by itself.
//!
//! `updater boot` may run for minutes in a trial boot (health checks until the deadline), so it
//! feeds the watchdog from a thread while it runs ([`Feeder`]). The feeder never writes the
//! magic character `V`: closing the device never stops the watchdog, so the next feeder (the
//! init system, or busybox `watchdog` in the QEMU image) must take over. The feeder also stops
//! feeding after a limit, so that an updater stuck in a way its own deadline cannot catch is
//! still reset by the hardware.
//!
//! Under systemd (the Raspberry Pi root) PID 1 owns `/dev/watchdog` (`RuntimeWatchdogSec=`)
//! and the updater never opens it: sdnotify.rs chooses, from `NOTIFY_SOCKET`, between this
//! feeder and telling systemd `WATCHDOG=1` (docs/pi-root.md, "Watchdog chain on a Pi").

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The watchdog device node.
pub const DEVICE: &str = "/dev/watchdog";
/// How often the feeder writes: well inside the shortest heartbeat in use (10 s in the QEMU
/// image, 15 s at most on older `bcm2835_wdt` kernels).
pub const FEED_EVERY: Duration = Duration::from_secs(1);

/// An open watchdog device.
#[derive(Debug)]
pub struct Watchdog {
    file: File,
    path: PathBuf,
}

impl Watchdog {
    /// Opens the watchdog device; `Ok(None)` when there is none (a host, or a board without
    /// one). Opening starts the timer if it was not running yet.
    pub fn open(path: &Path) -> std::io::Result<Option<Watchdog>> {
        match std::fs::OpenOptions::new().write(true).open(path) {
            Ok(file) => Ok(Some(Watchdog { file, path: path.to_path_buf() })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Restarts the timer. Writes one byte that is not the magic `V`.
    pub fn feed(&mut self) -> std::io::Result<()> {
        self.file.write_all(b"\0")?;
        self.file.flush()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Feeds a watchdog from a thread until dropped, or until `limit` has passed.
#[derive(Debug)]
pub struct Feeder {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Feeder {
    /// Feeds `dog` at once and then every `every`; stops feeding (but keeps the device open, so
    /// the timer keeps running) once `limit` has passed.
    pub fn start(mut dog: Watchdog, every: Duration, limit: Duration) -> std::io::Result<Feeder> {
        dog.feed()?;
        let (stop, stopped) = mpsc::channel::<()>();
        let started = Instant::now();
        let thread = std::thread::Builder::new().name("watchdog".into()).spawn(move || loop {
            match stopped.recv_timeout(every) {
                Err(RecvTimeoutError::Timeout) if started.elapsed() < limit => {
                    // A failed write is retried at the next tick; nothing else can be done.
                    let _ = dog.feed();
                }
                Err(RecvTimeoutError::Timeout) => {}
                // Dropped: close the device without the magic character.
                Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
            }
        })?;
        Ok(Feeder { stop: Some(stop), thread: Some(thread) })
    }

    /// Opens `path` and starts feeding it; `Ok(None)` when there is no watchdog.
    pub fn open(path: &Path, every: Duration, limit: Duration) -> std::io::Result<Option<Feeder>> {
        match Watchdog::open(path)? {
            Some(dog) => Ok(Some(Feeder::start(dog, every, limit)?)),
            None => Ok(None),
        }
    }
}

impl Drop for Feeder {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(path: &Path) -> Vec<u8> {
        std::fs::read(path).unwrap()
    }

    #[test]
    fn no_device_means_no_feeder() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("watchdog");
        assert!(Watchdog::open(&missing).unwrap().is_none());
        assert!(Feeder::open(&missing, FEED_EVERY, Duration::from_secs(1)).unwrap().is_none());
    }

    #[test]
    fn feeds_until_dropped_and_never_writes_the_magic_close() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("watchdog");
        std::fs::write(&dev, b"").unwrap();
        let feeder = Feeder::open(&dev, Duration::from_millis(10), Duration::from_secs(60))
            .unwrap()
            .unwrap();
        let t = Instant::now();
        while written(&dev).len() < 5 && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(feeder);
        let after_drop = written(&dev);
        assert!(after_drop.len() >= 5, "{after_drop:?}");
        assert!(!after_drop.contains(&b'V'));
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(written(&dev), after_drop, "no feeding after the drop");
    }

    #[test]
    fn stops_feeding_after_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("watchdog");
        std::fs::write(&dev, b"").unwrap();
        let feeder = Feeder::open(&dev, Duration::from_millis(5), Duration::ZERO).unwrap().unwrap();
        std::thread::sleep(Duration::from_millis(60));
        // Only the first feed, at the start.
        assert_eq!(written(&dev), b"\0");
        drop(feeder);
    }
}
