//! The daemon's log: one JSON object per line, on stderr or appended to a file.
//!
//! Every line has `time` (unix seconds), `level` (`debug`, `info`, `warning`, `error`),
//! `event` (a stable name: `decision`, `channel_fetch_failed`, `connectivity_changed`, ...),
//! `msg` (words), `device_id`, and the event's own fields. Promtail ships these lines to Loki
//! as they are (overlord/promtail.yaml). A log file is bounded: past [`MAX_LOG_BYTES`] it is
//! renamed to `<file>.1` (replacing the previous one) and a new file starts.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

/// Size at which the log file is rotated (one old file kept).
pub const MAX_LOG_BYTES: u64 = 8 << 20;

/// Where log lines go.
#[derive(Debug)]
pub struct Log {
    pub file: Option<PathBuf>,
    pub device_id: String,
    /// Debug lines are written only when set.
    pub debug: bool,
    /// Rotation size of the log file.
    pub max_bytes: u64,
    lock: Mutex<()>,
}

impl Log {
    pub fn new(file: Option<PathBuf>, device_id: &str) -> Log {
        Log {
            file,
            device_id: device_id.to_string(),
            debug: false,
            max_bytes: MAX_LOG_BYTES,
            lock: Mutex::new(()),
        }
    }

    /// Writes one line. `fields` (a JSON object) are merged into it.
    pub fn event(&self, level: &str, event: &str, msg: &str, fields: serde_json::Value) {
        if level == "debug" && !self.debug {
            return;
        }
        let mut line = serde_json::json!({
            "time": crate::slot::unix_now(),
            "level": level,
            "event": event,
            "msg": msg,
            "device_id": self.device_id,
        });
        if let (Some(obj), serde_json::Value::Object(extra)) = (line.as_object_mut(), fields) {
            for (k, v) in extra {
                obj.entry(k).or_insert(v);
            }
        }
        let text = format!("{line}\n");
        let _guard = self.lock.lock();
        let written = self.file.as_ref().is_some_and(|path| {
            let mut rotated = path.clone().into_os_string();
            rotated.push(".1");
            if std::fs::metadata(path).is_ok_and(|m| m.len() >= self.max_bytes) {
                let _ = std::fs::rename(path, &rotated);
            }
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut f| f.write_all(text.as_bytes()))
                .is_ok()
        });
        if !written {
            let _ = std::io::stderr().write_all(text.as_bytes());
        }
    }

    pub fn debug(&self, event: &str, msg: &str, fields: serde_json::Value) {
        self.event("debug", event, msg, fields);
    }
    pub fn info(&self, event: &str, msg: &str, fields: serde_json::Value) {
        self.event("info", event, msg, fields);
    }
    pub fn warn(&self, event: &str, msg: &str, fields: serde_json::Value) {
        self.event("warning", event, msg, fields);
    }
    pub fn error(&self, event: &str, msg: &str, fields: serde_json::Value) {
        self.event("error", event, msg, fields);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_json_with_the_common_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        let log = Log::new(Some(path.clone()), "dev-1");
        log.info("decision", "stay: paused", serde_json::json!({ "outcome": "stay", "msg": "x" }));
        log.debug("hidden", "not written", serde_json::json!({}));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 1);
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(v["event"], "decision");
        assert_eq!(v["msg"], "stay: paused", "fields never override the common ones");
        assert_eq!(v["outcome"], "stay");
        assert_eq!(v["device_id"], "dev-1");
        assert_eq!(v["level"], "info");
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
}
