//! The boot selection backend (RAUC calls it that): what makes the firmware boot one slot by
//! default, behind a small trait so the slot flows do not care where it lives.
//!
//! [`BootSelector`] reads and writes the selection as an [`Autoboot`]. The device's one is
//! [`super::config_partition::ConfigPartition`] (`autoboot.txt` on the `config` partition,
//! committed by one in-place sector write); [`FileSelector`] keeps the same file in a plain
//! file, for tests of the flows that need no disk image.

use crate::autoboot::Autoboot;
use anyhow::Result;
use std::fmt;

/// Reads and writes which slot the firmware boots by default.
pub trait BootSelector: fmt::Debug + Send + Sync {
    /// What the selection says now. Never writes.
    fn read(&self) -> Result<OnDisk>;
    /// Makes the selection say `ab`, power-safely where the medium allows; reads it back and
    /// checks it before returning.
    fn write(&self, ab: &Autoboot) -> Result<WriteMethod>;
}

/// What `autoboot.txt` is, as read by a [`BootSelector`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnDisk {
    Valid(Autoboot),
    /// Present but unusable (torn, edited, or the file system is unreadable).
    Invalid(String),
    Missing,
}

impl OnDisk {
    pub fn describe(&self) -> String {
        match self {
            OnDisk::Valid(a) => {
                format!("committed slot {} (tryboot slot {})", a.committed, a.tryboot)
            }
            OnDisk::Invalid(e) => format!("unreadable ({e})"),
            OnDisk::Missing => "missing".into(),
        }
    }
}

/// How [`BootSelector::write`] wrote the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMethod {
    /// One aligned sector rewritten in place: the power-safe commit.
    InPlace,
    /// Through the file system (file missing or not in the fixed shape): a repair.
    Rewrite,
}

/// A selection kept in a plain file holding `autoboot.txt`'s text: the fake of the tests.
#[cfg(test)]
#[derive(Debug, Clone)]
pub struct FileSelector {
    pub path: std::path::PathBuf,
}

#[cfg(test)]
impl BootSelector for FileSelector {
    fn read(&self) -> Result<OnDisk> {
        match std::fs::read(&self.path) {
            Ok(bytes) => Ok(match Autoboot::parse(&bytes) {
                Ok(a) => OnDisk::Valid(a),
                Err(e) => OnDisk::Invalid(e.to_string()),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(OnDisk::Missing),
            Err(e) => {
                Err(anyhow::Error::new(e).context(format!("reading {}", self.path.display())))
            }
        }
    }

    fn write(&self, ab: &Autoboot) -> Result<WriteMethod> {
        let method = match self.read()? {
            OnDisk::Valid(_) => WriteMethod::InPlace,
            OnDisk::Invalid(_) | OnDisk::Missing => WriteMethod::Rewrite,
        };
        std::fs::write(&self.path, ab.render())?;
        match self.read()? {
            OnDisk::Valid(found) if found == *ab => Ok(method),
            other => anyhow::bail!("{} reads back as {}", self.path.display(), other.describe()),
        }
    }
}
