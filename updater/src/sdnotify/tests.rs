//! Tests of the keeper choice (pure) and of the notifier and pinger against a real unix
//! datagram socket in a temp folder. The environment is a table: no test sets process env.

use super::*;
use std::collections::HashMap;

fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
    let map: HashMap<String, OsString> =
        pairs.iter().map(|(k, v)| ((*k).to_string(), OsString::from(v))).collect();
    move |k| map.get(k).cloned()
}

/// A bound socket standing in for systemd's, with a short receive timeout.
struct Listener {
    _dir: tempfile::TempDir,
    path: PathBuf,
    sock: UnixDatagram,
}

impl Listener {
    fn new() -> Listener {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        Listener { _dir: dir, path, sock }
    }

    fn keeper(&self, ping_every: Option<Duration>) -> Keeper {
        Keeper::Systemd { socket: self.path.clone().into(), ping_every }
    }

    /// Every datagram that arrives within `wait`.
    fn drain(&self, wait: Duration) -> Vec<String> {
        let until = Instant::now() + wait;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < until {
            if let Ok(n) = self.sock.recv(&mut buf) {
                got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        got
    }
}

const PID: u32 = 4242;

/// One row of the keeper table: the environment, the device passed in, the keeper wanted.
type Case<'a> = (Vec<(&'a str, &'a str)>, Option<&'a Path>, Keeper);

#[test]
fn the_keeper_follows_notify_socket_and_the_watchdog_variables() {
    let dev = Path::new("/dev/watchdog");
    let systemd = |ping: Option<u64>| Keeper::Systemd {
        socket: "/run/systemd/notify".into(),
        ping_every: ping.map(Duration::from_millis),
    };
    let sock = ("NOTIFY_SOCKET", "/run/systemd/notify");
    let cases: Vec<Case> = vec![
        (vec![], Some(dev), Keeper::Device(dev.into())),
        (vec![], None, Keeper::Nobody),
        (vec![("NOTIFY_SOCKET", "")], Some(dev), Keeper::Device(dev.into())),
        (vec![("WATCHDOG_USEC", "30000000")], Some(dev), Keeper::Device(dev.into())),
        (vec![sock], Some(dev), systemd(None)),
        (vec![sock], None, systemd(None)),
        (vec![sock, ("WATCHDOG_USEC", "30000000")], Some(dev), systemd(Some(15_000))),
        (
            vec![sock, ("WATCHDOG_USEC", "30000000"), ("WATCHDOG_PID", "4242")],
            None,
            systemd(Some(15_000)),
        ),
        (vec![sock, ("WATCHDOG_USEC", "30000000"), ("WATCHDOG_PID", "1")], None, systemd(None)),
        (vec![sock, ("WATCHDOG_USEC", "30000000"), ("WATCHDOG_PID", "x")], None, systemd(None)),
        (vec![sock, ("WATCHDOG_USEC", "0")], Some(dev), systemd(None)),
        (vec![sock, ("WATCHDOG_USEC", "-5")], Some(dev), systemd(None)),
        (vec![sock, ("WATCHDOG_USEC", "soon")], Some(dev), systemd(None)),
    ];
    for (vars, device, want) in cases {
        let env = env_of(&vars);
        assert_eq!(select(&env, PID, device), want, "{vars:?} device {device:?}");
    }
}

#[test]
fn an_abstract_socket_name_is_accepted() {
    let env = env_of(&[("NOTIFY_SOCKET", "@/org/freedesktop/systemd1/notify")]);
    let want =
        Keeper::Systemd { socket: "@/org/freedesktop/systemd1/notify".into(), ping_every: None };
    assert_eq!(select(&env, PID, None), want);
}

#[test]
fn the_notifier_sends_one_datagram_of_key_value_lines() {
    let l = Listener::new();
    let n = Notifier::new(l.path.clone());
    n.send(&[NotifyState::Ready, NotifyState::Status("serving on 127.0.0.1:8088")]).unwrap();
    assert_eq!(l.drain(Duration::from_millis(60)), ["READY=1\nSTATUS=serving on 127.0.0.1:8088\n"]);
}

#[test]
fn the_notifier_reaches_an_abstract_socket() {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("metrica-sdnotify-test-{}-{:?}", std::process::id(), Instant::now());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let sock = UnixDatagram::bind_addr(&addr).unwrap();
    Notifier::new(format!("@{name}")).send(&[NotifyState::Watchdog]).unwrap();
    let mut buf = [0u8; 64];
    let n = sock.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"WATCHDOG=1\n");
}

#[test]
fn a_missing_socket_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let n = Notifier::new(dir.path().join("nobody-listens"));
    assert!(n.send(&[NotifyState::Ready]).is_err());
}

#[test]
fn status_ready_and_stopping_reach_systemd_on_one_line() {
    let l = Listener::new();
    let alive = Alive::start(l.keeper(None), Duration::from_secs(60)).unwrap();
    assert!(alive.notifies() && !alive.feeds_device());
    alive.status("checking\nhealth").unwrap();
    alive.ready("serving").unwrap();
    alive.stopping("SIGTERM").unwrap();
    assert_eq!(
        l.drain(Duration::from_millis(60)),
        ["STATUS=checking health\n", "READY=1\nSTATUS=serving\n", "STOPPING=1\nSTATUS=SIGTERM\n"]
    );
}

#[test]
fn pings_at_the_interval_until_dropped() {
    let l = Listener::new();
    let alive =
        Alive::start(l.keeper(Some(Duration::from_millis(10))), Duration::from_secs(60)).unwrap();
    let got = l.drain(Duration::from_millis(150));
    drop(alive);
    assert!(got.len() >= 4, "{got:?}");
    assert!(got.iter().all(|m| m == "WATCHDOG=1\n"), "{got:?}");
    assert!(l.drain(Duration::from_millis(60)).is_empty(), "no ping after the drop");
}

#[test]
fn stops_pinging_after_the_limit_unless_touched() {
    let l = Listener::new();
    let stale = Alive::start(l.keeper(Some(Duration::from_millis(5))), Duration::ZERO).unwrap();
    // Only the first ping, at the start.
    assert_eq!(l.drain(Duration::from_millis(80)), ["WATCHDOG=1\n"]);
    drop(stale);

    let alive =
        Alive::start(l.keeper(Some(Duration::from_millis(5))), Duration::from_millis(40)).unwrap();
    let until = Instant::now() + Duration::from_millis(200);
    let mut pings = 0;
    while Instant::now() < until {
        alive.touch();
        pings += l.drain(Duration::from_millis(10)).len();
    }
    // Well past the 40 ms limit, still pinged because the command keeps touching.
    assert!(pings >= 10, "{pings} pings");
    // No touch any more: the pings stop within the limit.
    l.drain(Duration::from_millis(150));
    assert!(l.drain(Duration::from_millis(50)).is_empty(), "the limit stopped the pings");
}

#[test]
fn under_systemd_the_watchdog_device_is_never_opened() {
    let l = Listener::new();
    let dir = tempfile::tempdir().unwrap();
    let dev = dir.path().join("watchdog");
    std::fs::write(&dev, b"").unwrap();
    let env = env_of(&[("NOTIFY_SOCKET", l.path.to_str().unwrap()), ("WATCHDOG_USEC", "20000")]);
    let alive = Alive::start(select(&env, PID, Some(&dev)), Duration::from_secs(60)).unwrap();
    assert!(!alive.feeds_device());
    assert!(!l.drain(Duration::from_millis(60)).is_empty());
    drop(alive);
    assert_eq!(std::fs::read(&dev).unwrap(), b"", "the device was written");
}

#[test]
fn without_systemd_the_device_is_fed() {
    let dir = tempfile::tempdir().unwrap();
    let dev = dir.path().join("watchdog");
    std::fs::write(&dev, b"").unwrap();
    let env = env_of(&[]);
    let alive = Alive::start(select(&env, PID, Some(&dev)), Duration::from_secs(60)).unwrap();
    assert!(alive.feeds_device() && !alive.notifies());
    // Telling systemd is a no-op without it.
    alive.ready("serving").unwrap();
    drop(alive);
    assert!(!std::fs::read(&dev).unwrap().is_empty());
    let missing = dir.path().join("none");
    let alive = Alive::start(select(&env, PID, Some(&missing)), Duration::from_secs(1)).unwrap();
    assert!(!alive.feeds_device());
    assert!(!Alive::start(Keeper::Nobody, Duration::from_secs(1)).unwrap().feeds_device());
}
