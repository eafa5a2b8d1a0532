//! `updater run` as a process: it starts, serves its endpoints, polls at once on
//! `updater check-now`, reports an unreachable mirror as a named error in /status, and stops
//! cleanly (exit status 0, `stopped` logged) on SIGTERM.

mod common;

use common::fixture;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(20), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn run_serves_wakes_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fixture(d);
    let listen = format!("127.0.0.1:{}", free_port());
    let log = d.join("log.jsonl");
    let bin = env!("CARGO_BIN_EXE_updater");
    let arg = |p: &str| d.join(p).display().to_string();
    let mut child = Command::new(bin)
        .args([
            "--disk",
            &arg("disk.img"),
            "--data-dir",
            &arg("data"),
            "--keyring",
            &arg("keyring"),
        ])
        .args(["--sysroot", &arg("root"), "--log-file", &arg("log.jsonl"), "--no-reboot", "run"])
        .args(["--mirror", "http://127.0.0.1:1", "--interval", "3600", "--listen", &listen])
        .args(["--request-timeout", "2", "--min-free-mib", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for("the first decision", || read_log().contains("\"event\":\"decision\""));

    let status: serde_json::Value = serde_json::from_str(
        &ureq::get(&format!("http://{listen}/status")).call().unwrap().into_string().unwrap(),
    )
    .unwrap();
    assert_eq!(status["daemon"]["last_error"]["kind"], "channel_unreachable", "{status:#}");
    assert_eq!(status["daemon"]["channel"]["name"], "stable");
    assert_eq!(status["connectivity"], "online");
    let metrics =
        ureq::get(&format!("http://{listen}/metrics")).call().unwrap().into_string().unwrap();
    assert!(
        metrics.contains("metrica_channel_fetch_errors_total{kind=\"unreachable\"} 1\n"),
        "{metrics}"
    );

    let out = Command::new(bin).args(["check-now", "--listen", &listen]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for("the second poll", || {
        read_log().matches("\"event\":\"channel_unreachable\"").count() == 2
    });
    assert!(read_log().contains("\"event\":\"check_now\""));

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let start = Instant::now();
    let code = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(code.success(), "exit {code:?}: {stderr}");
    let last = read_log().lines().last().unwrap().to_string();
    assert!(last.contains("\"event\":\"stopped\""), "{last}");
    assert!(read_log().lines().all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()));

    // check-now with no daemon is an error naming the address.
    let out = Command::new(bin).args(["check-now", "--listen", &listen]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("is `updater run` running with --listen {listen}?")), "{err}");
}
