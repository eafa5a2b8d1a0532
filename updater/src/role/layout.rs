//! A role on the device: its folder, its releases, the `current` and `previous` links, and
//! its small state file.
//!
//! ```text
//! /data/metrica/roles/NAME/
//!   releases/VERSION/      one unpacked release (role.toml, compose.yaml, images/*.tar, ...)
//!   current -> releases/VERSION
//!   previous -> releases/VERSION
//!   state.json             committed / pending version, failed versions, counters
//! ```
//!
//! A link is switched atomically: a new link under a temporary name, renamed over the old
//! one, then the folder is fsynced. A power cut leaves the old link or the new one, never
//! none. The state file is written with [`crate::state::write_atomic`].

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::failpoint;

/// Where the roles live under the data partition's `metrica` folder.
pub const ROLES_DIR: &str = "roles";

/// The folders and links of one role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleLayout {
    pub name: String,
    /// `/data/metrica/roles/NAME`.
    pub root: PathBuf,
}

/// Which link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    Current,
    Previous,
}

impl Link {
    fn file_name(self) -> &'static str {
        match self {
            Link::Current => "current",
            Link::Previous => "previous",
        }
    }
}

impl RoleLayout {
    /// The layout of role `name` under `metrica_dir` (`/data/metrica` on a device).
    pub fn new(metrica_dir: &Path, name: &str) -> RoleLayout {
        RoleLayout { name: name.to_string(), root: metrica_dir.join(ROLES_DIR).join(name) }
    }

    pub fn releases(&self) -> PathBuf {
        self.root.join("releases")
    }

    pub fn release(&self, version: &semver::Version) -> PathBuf {
        self.releases().join(version.to_string())
    }

    pub fn state_file(&self) -> PathBuf {
        self.root.join("state.json")
    }

    fn link_path(&self, link: Link) -> PathBuf {
        self.root.join(link.file_name())
    }

    /// The version a link points at, `None` when it does not exist.
    pub fn read_link(&self, link: Link) -> Result<Option<semver::Version>> {
        let path = self.link_path(link);
        let target = match std::fs::read_link(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let v = name.parse().with_context(|| {
            format!("{} points at {}, not a release", path.display(), target.display())
        })?;
        Ok(Some(v))
    }

    /// Points `link` at `releases/VERSION` (a relative link), atomically.
    pub fn set_link(&self, link: Link, version: &semver::Version) -> Result<()> {
        let path = self.link_path(link);
        let tmp = self.root.join(format!(".{}.tmp", link.file_name()));
        let _ = std::fs::remove_file(&tmp);
        let target = Path::new("releases").join(version.to_string());
        std::os::unix::fs::symlink(&target, &tmp)
            .with_context(|| format!("linking {}", tmp.display()))?;
        failpoint::hit(&format!("role-link-{}.before-rename", link.file_name()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("renaming {}", tmp.display()))?;
        sync_dir(&self.root)
    }

    /// The role's state; the default when there is none yet.
    pub fn read_state(&self) -> Result<RoleState> {
        let path = self.state_file();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("reading {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RoleState::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    pub fn write_state(&self, state: &RoleState) -> Result<()> {
        let mut bytes = serde_json::to_vec_pretty(state).context("serializing the role state")?;
        bytes.push(b'\n');
        crate::state::write_atomic(&self.state_file(), &bytes, "role-state")
    }

    /// Releases on disk other than these, oldest version first (for clean-up).
    pub fn other_releases(&self, keep: &[&semver::Version]) -> Result<Vec<semver::Version>> {
        let dir = self.releases();
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
        };
        for entry in entries {
            let name = entry?.file_name();
            if let Ok(v) = name.to_string_lossy().parse::<semver::Version>() {
                if !keep.contains(&&v) {
                    out.push(v);
                }
            }
        }
        out.sort();
        Ok(out)
    }
}

/// Fsyncs a folder, so that a rename in it is durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

/// What the updater remembers about a role between runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleState {
    pub format: u32,
    /// The release last committed (healthy through its probation).
    pub committed: Option<semver::Version>,
    /// A release being applied: set before `current` is switched to it, cleared by its
    /// commit or its rollback. Found set at start: the apply was cut short.
    pub pending: Option<semver::Version>,
    /// Versions that failed: not applied again unless forced.
    pub failed: Vec<semver::Version>,
    /// Failed applies since the last good one (safe mode after 3).
    pub consecutive_failures: u32,
    pub rollbacks_total: u64,
    /// Why the last apply failed, for `role status`.
    pub last_error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> semver::Version {
        s.parse().unwrap()
    }

    #[test]
    fn links_switch_and_read_back_relative() {
        let dir = tempfile::tempdir().unwrap();
        let l = RoleLayout::new(dir.path(), "zigbee-hub");
        std::fs::create_dir_all(l.release(&v("1.0.0"))).unwrap();
        assert_eq!(l.read_link(Link::Current).unwrap(), None);
        l.set_link(Link::Current, &v("1.0.0")).unwrap();
        l.set_link(Link::Current, &v("1.1.0")).unwrap();
        l.set_link(Link::Previous, &v("1.0.0")).unwrap();
        assert_eq!(l.read_link(Link::Current).unwrap(), Some(v("1.1.0")));
        assert_eq!(l.read_link(Link::Previous).unwrap(), Some(v("1.0.0")));
        let raw = std::fs::read_link(l.root.join("current")).unwrap();
        assert_eq!(raw, Path::new("releases/1.1.0"));
        assert!(l.root.join("previous").join(".").exists());
    }

    #[test]
    fn a_cut_before_the_rename_keeps_the_old_link() {
        let dir = tempfile::tempdir().unwrap();
        let l = RoleLayout::new(dir.path(), "r");
        std::fs::create_dir_all(&l.root).unwrap();
        l.set_link(Link::Current, &v("1.0.0")).unwrap();
        failpoint::arm("role-link-current.before-rename", None);
        let e = l.set_link(Link::Current, &v("2.0.0")).unwrap_err();
        assert!(e.downcast_ref::<failpoint::PowerCut>().is_some());
        assert_eq!(l.read_link(Link::Current).unwrap(), Some(v("1.0.0")));
        // The leftover temporary link does not stop the next switch.
        l.set_link(Link::Current, &v("2.0.0")).unwrap();
        assert_eq!(l.read_link(Link::Current).unwrap(), Some(v("2.0.0")));
    }

    #[test]
    fn state_round_trips_and_a_missing_file_is_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let l = RoleLayout::new(dir.path(), "r");
        assert_eq!(l.read_state().unwrap(), RoleState::default());
        let s = RoleState {
            committed: Some(v("1.0.0")),
            failed: vec![v("1.1.0")],
            consecutive_failures: 1,
            ..Default::default()
        };
        l.write_state(&s).unwrap();
        assert_eq!(l.read_state().unwrap(), s);
        std::fs::write(l.state_file(), "{\"format\":0,\"surprise\":1}").unwrap();
        assert!(l.read_state().is_err());
    }

    #[test]
    fn other_releases_lists_what_may_be_removed() {
        let dir = tempfile::tempdir().unwrap();
        let l = RoleLayout::new(dir.path(), "r");
        for r in ["1.0.0", "1.2.0", "1.10.0", "junk"] {
            std::fs::create_dir_all(l.releases().join(r)).unwrap();
        }
        assert_eq!(l.other_releases(&[&v("1.2.0")]).unwrap(), [v("1.0.0"), v("1.10.0")]);
    }
}
