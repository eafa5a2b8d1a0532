//! The updater binary under a (pretend) systemd: `NOTIFY_SOCKET` and `WATCHDOG_USEC` are set
//! on the child process only (the test's own environment is never changed), a unix datagram
//! socket in a temp folder plays systemd's, and `--sysroot` holds a fake `/dev/watchdog`.
//! `updater run` says READY=1 once it serves, pings WATCHDOG=1, says STOPPING=1 on SIGTERM;
//! `updater boot` sends STATUS= lines and leaves /dev/watchdog alone, which it feeds when no
//! NOTIFY_SOCKET is set (the busybox QEMU image).

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The common device root, with a `/dev/watchdog` the updater would feed without systemd.
fn fixture(dir: &Path) {
    common::fixture(dir);
    std::fs::create_dir_all(dir.join("root/dev")).unwrap();
    std::fs::write(dir.join("root/dev/watchdog"), b"").unwrap();
}

/// The updater with the fixture's global flags, its environment cleared of any real
/// systemd's variables.
fn updater(d: &Path) -> Command {
    let arg = |p: &str| d.join(p).display().to_string();
    let mut c = Command::new(env!("CARGO_BIN_EXE_updater"));
    c.args(["--disk", &arg("disk.img"), "--data-dir", &arg("data"), "--keyring", &arg("keyring")])
        .args(["--sysroot", &arg("root"), "--log-file", &arg("log.jsonl"), "--no-reboot"])
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

/// systemd's side: a bound datagram socket in the temp folder.
fn listener(d: &Path) -> (UnixDatagram, std::path::PathBuf) {
    let path = d.join("notify");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    (sock, path)
}

/// Datagrams until `done` holds of what arrived, or 20 s.
fn receive_until(sock: &UnixDatagram, done: impl Fn(&[String]) -> bool) -> Vec<String> {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !done(&got) {
        assert!(start.elapsed() < Duration::from_secs(20), "timed out; got {got:?}");
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    got
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn run_is_ready_once_serving_pings_its_watchdog_and_says_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fixture(d);
    let (sock, path) = listener(d);
    let listen = format!("127.0.0.1:{}", free_port());
    let mut child = updater(d)
        .args(["run", "--mirror", "http://127.0.0.1:1", "--interval", "3600"])
        .args(["--listen", &listen, "--request-timeout", "2", "--min-free-mib", "1"])
        .env("NOTIFY_SOCKET", &path)
        // 200 ms: a ping every 100 ms.
        .env("WATCHDOG_USEC", "200000")
        .spawn()
        .unwrap();
    let ready = receive_until(&sock, |g| g.iter().any(|m| m.starts_with("READY=1\n")));
    let msg = ready.iter().find(|m| m.starts_with("READY=1\n")).unwrap();
    assert!(msg.contains("STATUS=following channel stable from 1 mirror(s)"), "{msg}");
    // READY=1 means serving: the endpoints answer now.
    let health = ureq::get(&format!("http://{listen}/health")).call();
    assert!(health.is_ok() || matches!(health, Err(ureq::Error::Status(503, _))), "{health:?}");
    let pings = |g: &[String]| g.iter().filter(|m| *m == "WATCHDOG=1\n").count();
    let got = receive_until(&sock, |g| pings(g) >= 3);
    assert!(pings(&got) >= 3, "{got:?}");

    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    receive_until(&sock, |g| g.iter().any(|m| m.starts_with("STOPPING=1\n")));
    let code = child.wait().unwrap();
    assert!(code.success(), "exit {code:?}");
    assert_eq!(std::fs::read(d.join("root/dev/watchdog")).unwrap(), b"", "/dev/watchdog written");
}

#[test]
fn boot_tells_systemd_and_leaves_the_watchdog_device_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fixture(d);
    let (sock, path) = listener(d);
    // The disk image is no card: the boot step fails after it started, which is enough here.
    let _ = updater(d).arg("boot").env("NOTIFY_SOCKET", &path).status().unwrap();
    let mut got = receive_until(&sock, |g| !g.is_empty());
    let mut buf = [0u8; 4096];
    while let Ok(n) = sock.recv(&mut buf) {
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(got[0].starts_with("STATUS=booted "), "{got:?}");
    assert_eq!(std::fs::read(d.join("root/dev/watchdog")).unwrap(), b"", "/dev/watchdog written");

    // Without NOTIFY_SOCKET (the busybox image) it feeds the device itself.
    let _ = updater(d).arg("boot").status().unwrap();
    assert!(!std::fs::read(d.join("root/dev/watchdog")).unwrap().is_empty(), "not fed");
    assert!(sock.recv(&mut buf).is_err(), "nothing sent without NOTIFY_SOCKET");
}
