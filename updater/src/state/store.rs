//! The state file on disk: parse, load, and the atomic save (temp file, fsync, rename, fsync
//! of the folder), and keeping a corrupt file aside. Every write step has a failpoint.

use super::{State, STATE_FORMAT};
use crate::failpoint;
use std::io::Write;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Why a state file could not be used.
#[derive(Debug, Error)]
pub enum LoadError {
    #[error(
        "{path}: state format {found} is newer than this updater's {supported}; refusing to \
         read or overwrite it (a newer updater wrote it)"
    )]
    Newer { path: PathBuf, found: u64, supported: u32 },
    #[error("{path}: corrupt state file: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error("reading {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// Parses a state file's bytes.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<State, LoadError> {
    let corrupt = |what: String| LoadError::Corrupt { path: path.to_path_buf(), what };
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    let format = value
        .get("format")
        .and_then(|f| f.as_u64())
        .ok_or_else(|| corrupt("no numeric \"format\"".into()))?;
    if format > u64::from(STATE_FORMAT) {
        return Err(LoadError::Newer {
            path: path.to_path_buf(),
            found: format,
            supported: STATE_FORMAT,
        });
    }
    if format < 1 {
        return Err(corrupt(format!("unknown format {format}")));
    }
    let state: State = serde_json::from_value(value).map_err(|e| corrupt(e.to_string()))?;
    state.validate().map_err(corrupt)?;
    Ok(state)
}

/// Reads the state file; `Ok(None)` when there is none yet.
pub fn load(path: &Path) -> Result<Option<State>, LoadError> {
    match std::fs::read(path) {
        Ok(bytes) => parse(path, &bytes).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(LoadError::Io { path: path.to_path_buf(), source: e }),
    }
}

/// Failpoints of a state write, in order.
pub const SAVE_FAILPOINTS: [&str; 4] =
    ["state.write-temp", "state.before-rename", "state.after-rename", "state.after-dir-fsync"];

/// Writes the state atomically: temp file, fsync, rename over `path`, fsync of the folder.
/// Refuses to replace a file of a newer format.
pub fn save(path: &Path, state: &State) -> anyhow::Result<()> {
    use anyhow::Context;
    if let Ok(bytes) = std::fs::read(path) {
        if let Err(e @ LoadError::Newer { .. }) = parse(path, &bytes) {
            return Err(e.into());
        }
    }
    let mut bytes = serde_json::to_vec_pretty(state).context("serializing the state")?;
    bytes.push(b'\n');
    write_atomic(path, &bytes, "state")
}

/// Atomic replace of `path` with `bytes`: temp file, fsync, rename, fsync of the folder.
/// Failpoints are named `<prefix>.write-temp` (a torn write), `.before-rename`,
/// `.after-rename` and `.after-dir-fsync`.
pub fn write_atomic(path: &Path, bytes: &[u8], prefix: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    let dir = path.parent().context("state path has no folder")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path.file_name().context("path has no file name")?.to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    if let Some(k) = failpoint::torn(&format!("{prefix}.write-temp"), bytes.len()) {
        f.write_all(&bytes[..k])?;
        f.sync_all()?;
        return Err(failpoint::PowerCut(format!("{prefix}.write-temp")).into());
    }
    f.write_all(bytes).with_context(|| format!("writing {}", tmp.display()))?;
    f.sync_all().with_context(|| format!("syncing {}", tmp.display()))?;
    drop(f);
    failpoint::hit(&format!("{prefix}.before-rename"))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    failpoint::hit(&format!("{prefix}.after-rename"))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))?;
    failpoint::hit(&format!("{prefix}.after-dir-fsync"))?;
    Ok(())
}

/// Moves a corrupt state file aside as `state.json.corrupt-<n>` (the first free `n`) and
/// returns the new path. The file is kept for a person to look at; it is never deleted.
pub fn keep_corrupt(path: &Path) -> std::io::Result<PathBuf> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    for n in 1.. {
        let backup = path.with_file_name(format!("{name}.corrupt-{n}"));
        if !backup.exists() {
            std::fs::rename(path, &backup)?;
            if let Some(dir) = path.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            return Ok(backup);
        }
    }
    unreachable!("some backup name is free")
}
