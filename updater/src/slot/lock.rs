//! The updater's lock: one command that changes state at a time (`flock` on
//! `/data/metrica/lock`, released by the kernel if the process dies).

use super::Device;
use anyhow::{Context, Result};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

/// Another updater command holds the lock.
#[derive(Debug, thiserror::Error)]
#[error("another updater command holds {}", .0.display())]
pub struct LockBusy(pub PathBuf);

impl Device {
    /// Takes the updater's lock (one command that changes state at a time). Held until the
    /// returned value is dropped, released by the kernel if the process dies.
    pub fn lock(&self) -> Result<nix::fcntl::Flock<File>> {
        lock_data_dir(&self.data_dir)
    }
}

/// Takes the updater's lock of the data partition mounted at `data_dir` (the same lock as
/// [`Device::lock`], for commands that change roles and need no disk).
pub fn lock_data_dir(data_dir: &Path) -> Result<nix::fcntl::Flock<File>> {
    let dir = data_dir.join("metrica");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("lock");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        if e == nix::errno::Errno::EWOULDBLOCK {
            anyhow::Error::new(LockBusy(path.clone()))
        } else {
            anyhow::anyhow!("locking {}: {e}", path.display())
        }
    })
}
