//! The updater's log: one JSON object per line, on stderr or appended to a file. The command
//! line and the daemon write the same file (`--log-file`) through this one logger.
//!
//! Every line has `time` (unix seconds), `level` (`debug`, `info`, `warning`, `error`) and
//! `msg` (words). The daemon's lines also have `event` (a stable name: `decision`,
//! `channel_fetch_failed`, `connectivity_changed`, ...), `device_id`, and the event's own
//! fields; install progress lines are the [`crate::install::ProgressEvent`] objects. Promtail
//! ships these lines to Loki as they are (overlord/promtail.yaml). A log file is bounded: past
//! [`MAX_LOG_BYTES`] it is renamed to `<file>.1` (replacing the previous one) and a new file
//! starts. When the file cannot be written, the line goes to stderr.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Size at which the log file is rotated (one old file kept).
pub const MAX_LOG_BYTES: u64 = 8 << 20;

/// One append (with its rotation) at a time in this process.
static APPEND: Mutex<()> = Mutex::new(());

/// Where log lines go.
#[derive(Debug, Clone)]
pub struct Log {
    pub file: Option<PathBuf>,
    /// Named in every line when set (the daemon's lines).
    pub device_id: Option<String>,
    /// Debug lines are written only when set.
    pub debug: bool,
    /// Rotation size of the log file.
    pub max_bytes: u64,
}

impl Log {
    /// The daemon's log: every line names the device.
    pub fn new(file: Option<PathBuf>, device_id: &str) -> Log {
        Log { device_id: Some(device_id.to_string()), ..Log::command_line(file) }
    }

    /// The command line's log: `time`, `level` and `msg` only.
    pub fn command_line(file: Option<PathBuf>) -> Log {
        Log { file, device_id: None, debug: false, max_bytes: MAX_LOG_BYTES }
    }

    /// Writes one command-line line: `time`, `level`, `msg`.
    pub fn event(&self, level: &str, msg: &str) {
        self.write(level, None, msg, serde_json::Value::Null);
    }

    /// Writes one named event. `fields` (a JSON object) are merged into the line; they never
    /// replace the common fields.
    pub fn line(&self, level: &str, event: &str, msg: &str, fields: serde_json::Value) {
        self.write(level, Some(event), msg, fields);
    }

    fn write(&self, level: &str, event: Option<&str>, msg: &str, fields: serde_json::Value) {
        if level == "debug" && !self.debug {
            return;
        }
        let mut line = serde_json::Map::new();
        line.insert("time".into(), crate::slot::unix_now().into());
        line.insert("level".into(), level.into());
        if let Some(event) = event {
            line.insert("event".into(), event.into());
        }
        line.insert("msg".into(), msg.into());
        if let Some(id) = &self.device_id {
            line.insert("device_id".into(), id.as_str().into());
        }
        if let serde_json::Value::Object(extra) = fields {
            for (k, v) in extra {
                line.entry(k).or_insert(v);
            }
        }
        self.append(format!("{}\n", serde_json::Value::Object(line)).as_bytes());
    }

    /// Appends whole lines to the file (rotating it first when it is full), or to stderr.
    fn append(&self, text: &[u8]) {
        let _guard = APPEND.lock();
        let written = self.file.as_deref().is_some_and(|path| {
            rotate_if_full(path, self.max_bytes);
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut f| f.write_all(text))
                .is_ok()
        });
        if !written {
            let _ = std::io::stderr().write_all(text);
        }
    }

    /// A writer of JSON lines (such as install progress) into this log: each complete line
    /// is appended as it is written, an unended rest as a line when the writer is dropped.
    pub fn writer(&self) -> LineWriter {
        LineWriter { log: self.clone(), pending: Vec::new() }
    }

    pub fn debug(&self, event: &str, msg: &str, fields: serde_json::Value) {
        self.line("debug", event, msg, fields);
    }
    pub fn info(&self, event: &str, msg: &str, fields: serde_json::Value) {
        self.line("info", event, msg, fields);
    }
    pub fn warn(&self, event: &str, msg: &str, fields: serde_json::Value) {
        self.line("warning", event, msg, fields);
    }
    pub fn error(&self, event: &str, msg: &str, fields: serde_json::Value) {
        self.line("error", event, msg, fields);
    }
}

/// Renames a log file of `max_bytes` or more to `<file>.1`.
fn rotate_if_full(path: &Path, max_bytes: u64) {
    if std::fs::metadata(path).is_ok_and(|m| m.len() >= max_bytes) {
        let mut rotated = path.as_os_str().to_owned();
        rotated.push(".1");
        let _ = std::fs::rename(path, rotated);
    }
}

/// See [`Log::writer`].
#[derive(Debug)]
pub struct LineWriter {
    log: Log,
    /// Bytes of a line not yet ended.
    pending: Vec<u8>,
}

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.pending.extend_from_slice(buf);
        if let Some(end) = self.pending.iter().rposition(|&b| b == b'\n') {
            let rest = self.pending.split_off(end + 1);
            self.log.append(&std::mem::replace(&mut self.pending, rest));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if !self.pending.is_empty() {
            self.pending.push(b'\n');
            self.log.append(&self.pending);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(path: &Path) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(path).unwrap();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    #[test]
    fn lines_are_json_with_the_common_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        let log = Log::new(Some(path.clone()), "dev-1");
        log.info("decision", "stay: paused", serde_json::json!({ "outcome": "stay", "msg": "x" }));
        log.debug("hidden", "not written", serde_json::json!({}));
        let v = lines(&path);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0]["event"], "decision");
        assert_eq!(v[0]["msg"], "stay: paused", "fields never override the common ones");
        assert_eq!(v[0]["outcome"], "stay");
        assert_eq!(v[0]["device_id"], "dev-1");
        assert_eq!(v[0]["level"], "info");
    }

    #[test]
    fn command_line_lines_have_time_level_and_msg_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        Log::command_line(Some(path.clone())).event("error", "no disk");
        let v = lines(&path);
        let keys: Vec<&str> = v[0].as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys.len(), 3, "{keys:?}");
        assert_eq!((&v[0]["level"], &v[0]["msg"]), (&"error".into(), &"no disk".into()));
        assert!(v[0]["time"].as_u64().is_some());
    }

    #[test]
    fn the_file_is_rotated_at_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        let mut log = Log::new(Some(path.clone()), "dev-1");
        log.max_bytes = 1000;
        for i in 0..30 {
            log.info("n", &format!("line {i}"), serde_json::json!({}));
        }
        let now = std::fs::metadata(&path).unwrap().len();
        let old = std::fs::metadata(dir.path().join("log.jsonl.1")).unwrap().len();
        assert!(now < 1000 + 200 && old < 1000 + 200, "{now} {old}");
        let last = std::fs::read_to_string(&path).unwrap();
        assert!(last.trim_end().ends_with("\"line 29\"}") || last.contains("line 29"), "{last}");
    }

    #[test]
    fn the_writer_appends_whole_lines_and_rotates_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        let mut log = Log::command_line(Some(path.clone()));
        log.max_bytes = 100;
        let mut w = log.writer();
        for i in 0..10 {
            // A line in pieces, as `write!` may hand it over.
            write!(w, "{{\"event\":").unwrap();
            writeln!(w, "\"written\",\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(20)).unwrap();
        }
        write!(w, "{{\"n\":10}}").unwrap();
        drop(w);
        let (now, old) = (lines(&path), lines(&dir.path().join("log.jsonl.1")));
        // Rotated at 100 bytes: the old file ends where the new one starts, whole lines each.
        let n = |v: &serde_json::Value| v["n"].as_u64().unwrap();
        assert!(now.len() < 11 && !old.is_empty(), "{now:?}");
        assert_eq!(n(old.last().unwrap()) + 1, n(&now[0]));
        assert_eq!(n(now.last().unwrap()), 10, "the unended rest is a line on drop");
        assert!(std::fs::read_to_string(&path).unwrap().ends_with("}\n"));
    }
}
