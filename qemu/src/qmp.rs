//! A minimal QMP client over a unix socket: the handshake, `cont`, and a reader thread that
//! forwards events. QEMU is started paused (`-S`) so that no event can happen before the
//! harness listens; `cont` starts the guest once the client is ready.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// One QMP event: its name and its data object.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub name: String,
    pub data: Value,
}

/// Parses one line from the socket. `Ok(None)` for a line that is not an event.
pub fn parse_event(line: &str) -> Result<Option<Event>> {
    let value: Value = serde_json::from_str(line).context("parsing a qmp message")?;
    Ok(value.get("event").and_then(Value::as_str).map(|name| Event {
        name: name.to_string(),
        data: value.get("data").cloned().unwrap_or(Value::Null),
    }))
}

/// A connected, negotiated QMP session.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events that arrived while waiting for a command's answer.
    pub early_events: Vec<Event>,
}

impl Qmp {
    /// Connects to `socket`, retrying until `timeout` while `alive()` says QEMU still runs.
    pub fn connect(
        socket: &Path,
        timeout: Duration,
        mut alive: impl FnMut() -> bool,
    ) -> Result<Qmp> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) => {
                    if !alive() {
                        bail!("qemu exited before its qmp socket was ready");
                    }
                    if Instant::now() >= deadline {
                        return Err(e).with_context(|| {
                            format!(
                                "connecting to the qmp socket {} for {timeout:?}",
                                socket.display()
                            )
                        });
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
        stream.set_read_timeout(Some(left)).context("setting the qmp read timeout")?;
        let writer = stream.try_clone().context("cloning the qmp socket")?;
        let mut qmp = Qmp { reader: BufReader::new(stream), writer, early_events: Vec::new() };
        let greeting = qmp.read_message().context("reading the qmp greeting")?;
        if greeting.get("QMP").is_none() {
            bail!("unexpected qmp greeting: {greeting}");
        }
        qmp.execute("qmp_capabilities")?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).context("reading from the qmp socket")? == 0 {
            bail!("the qmp socket closed");
        }
        serde_json::from_str(&line).with_context(|| format!("parsing qmp message {line:?}"))
    }

    /// Runs a command without arguments and waits for its answer.
    pub fn execute(&mut self, command: &str) -> Result<Value> {
        let request = serde_json::json!({ "execute": command });
        writeln!(self.writer, "{request}").with_context(|| format!("sending qmp {command}"))?;
        loop {
            let message =
                self.read_message().with_context(|| format!("waiting for qmp {command}"))?;
            if let Some(ret) = message.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = message.get("error") {
                bail!("qmp {command} failed: {err}");
            }
            if let Some(event) = parse_event(&message.to_string())? {
                self.early_events.push(event);
            }
        }
    }

    /// Hands the socket to a thread that calls `on_event` for every event until QEMU closes
    /// the socket, then `on_close`.
    pub fn forward_events(
        self,
        mut on_event: impl FnMut(Event) + Send + 'static,
        on_close: impl FnOnce() + Send + 'static,
    ) -> Result<std::thread::JoinHandle<()>> {
        let Qmp { reader, early_events, .. } = self;
        reader.get_ref().set_read_timeout(None).context("clearing the qmp read timeout")?;
        std::thread::Builder::new()
            .name("qmp".into())
            .spawn(move || {
                for event in early_events {
                    on_event(event);
                }
                for line in reader.lines() {
                    let Ok(line) = line else { break };
                    if let Ok(Some(event)) = parse_event(&line) {
                        on_event(event);
                    }
                }
                on_close();
            })
            .context("starting the qmp thread")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn parses_events_and_ignores_answers() {
        let e = parse_event(r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "WATCHDOG", "data": {"action": "reset"}}"#)
            .unwrap()
            .unwrap();
        assert_eq!(e.name, "WATCHDOG");
        assert_eq!(e.data["action"], "reset");
        assert_eq!(parse_event(r#"{"return": {}}"#).unwrap(), None);
        assert!(parse_event("not json").is_err());
    }

    #[test]
    fn handshake_cont_and_events_against_a_fake_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut w = stream.try_clone().unwrap();
            let mut r = BufReader::new(stream);
            writeln!(w, r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#).unwrap();
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert!(line.contains("qmp_capabilities"), "{line}");
            writeln!(w, r#"{{"return": {{}}}}"#).unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            assert!(line.contains("\"cont\""), "{line}");
            writeln!(w, r#"{{"event": "RESUME", "data": {{}}}}"#).unwrap();
            writeln!(w, r#"{{"return": {{}}}}"#).unwrap();
            writeln!(w, r#"{{"event": "WATCHDOG", "data": {{"action": "reset"}}}}"#).unwrap();
            writeln!(
                w,
                r#"{{"event": "SHUTDOWN", "data": {{"guest": true, "reason": "guest-reset"}}}}"#
            )
            .unwrap();
        });
        let mut qmp = Qmp::connect(&sock, Duration::from_secs(5), || true).unwrap();
        qmp.execute("cont").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let tx2 = tx.clone();
        qmp.forward_events(
            move |e| tx.send(Some(e.name)).unwrap(),
            move || tx2.send(None).unwrap(),
        )
        .unwrap();
        server.join().unwrap();
        let got: Vec<_> = rx.iter().take(4).collect();
        assert_eq!(
            got,
            [Some("RESUME".to_string()), Some("WATCHDOG".into()), Some("SHUTDOWN".into()), None]
        );
    }

    #[test]
    fn connect_gives_up_when_qemu_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let err = Qmp::connect(&dir.path().join("none.sock"), Duration::from_secs(5), || false)
            .unwrap_err();
        assert!(err.to_string().contains("qemu exited before"), "{err}");
        let err = Qmp::connect(&dir.path().join("none.sock"), Duration::from_millis(100), || true)
            .unwrap_err();
        assert!(format!("{err:#}").contains("connecting to the qmp socket"), "{err:#}");
    }
}
