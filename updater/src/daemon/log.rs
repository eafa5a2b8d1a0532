//! The daemon's log: one JSON object per line, on stderr or appended to a file.
//!
//! Every line has `time` (unix seconds), `level` (`debug`, `info`, `warning`, `error`),
//! `event` (a stable name: `decision`, `channel_fetch_failed`, `connectivity_changed`, ...),
//! `msg` (words), `device_id`, and the event's own fields. Promtail ships these lines to Loki
//! as they are (overlord/promtail.yaml).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

/// Where log lines go.
#[derive(Debug)]
pub struct Log {
    pub file: Option<PathBuf>,
    pub device_id: String,
    /// Debug lines are written only when set.
    pub debug: bool,
    lock: Mutex<()>,
}

impl Log {
    pub fn new(file: Option<PathBuf>, device_id: &str) -> Log {
        Log { file, device_id: device_id.to_string(), debug: false, lock: Mutex::new(()) }
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
}
