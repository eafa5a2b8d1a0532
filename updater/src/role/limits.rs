//! The role's `[resources]` as a compose override file, so the engine enforces them.
//!
//! The updater writes [`LIMITS_FILE`] into the release folder and passes it after the role's
//! compose file: every service gets `mem_limit`, `cpus` and `pids_limit` from `[resources]`,
//! with `[resources.service.NAME]` replacing the values it names. The file is JSON, which is
//! YAML, so compose reads it as it is. Pure: [`document`] builds it.

use std::collections::BTreeSet;

use serde_json::{json, Map, Value};

use super::spec::{Limits, Resources};

/// The generated override file's name, in the release folder.
pub const LIMITS_FILE: &str = "limits.compose.json";

/// The override document for these services, or `None` when no limit applies.
/// A `[resources.service.NAME]` naming no service of the stack is an error.
pub fn document(res: &Resources, services: &BTreeSet<String>) -> Result<Option<Value>, String> {
    if let Some(unknown) = res.service.keys().find(|s| !services.contains(*s)) {
        return Err(format!("[resources.service.{unknown}] names no service of the compose file"));
    }
    let mut out = Map::new();
    for name in services {
        let own = res.service.get(name).cloned().unwrap_or_default();
        let merged = Limits {
            memory: own.memory.or_else(|| res.memory.clone()),
            cpus: own.cpus.or(res.cpus),
            pids: own.pids.or(res.pids),
        };
        let mut svc = Map::new();
        if let Some(m) = merged.memory {
            svc.insert("mem_limit".into(), json!(m.0));
        }
        if let Some(c) = merged.cpus {
            svc.insert("cpus".into(), json!(c.0));
        }
        if let Some(p) = merged.pids {
            svc.insert("pids_limit".into(), json!(p));
        }
        if !svc.is_empty() {
            out.insert(name.clone(), Value::Object(svc));
        }
    }
    Ok((!out.is_empty()).then(|| json!({ "services": out })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::role::spec::{ByteSize, Cpus};

    fn services(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn role_wide_limits_apply_to_every_service_and_a_service_table_overrides_them() {
        let mut res = Resources {
            memory: Some(ByteSize(256 << 20)),
            cpus: Some(Cpus(1.0)),
            pids: None,
            ..Default::default()
        };
        res.service.insert(
            "frigate".into(),
            Limits { memory: Some(ByteSize(1 << 30)), cpus: None, pids: Some(512) },
        );
        let doc = document(&res, &services(&["frigate", "mqtt"])).unwrap().unwrap();
        assert_eq!(
            doc,
            json!({"services": {
                "frigate": {"mem_limit": 1u64 << 30, "cpus": 1.0, "pids_limit": 512},
                "mqtt": {"mem_limit": 256u64 << 20, "cpus": 1.0},
            }})
        );
    }

    #[test]
    fn no_limits_give_no_file_and_an_unknown_service_is_an_error() {
        assert_eq!(document(&Resources::default(), &services(&["a"])), Ok(None));
        let mut res = Resources::default();
        res.service.insert("ghost".into(), Limits::default());
        let e = document(&res, &services(&["a"])).unwrap_err();
        assert!(e.contains("resources.service.ghost"), "{e}");
    }
}
