//! Role bundles (`.mfr`): a signed release of one role, the format and its verified reader.
//!
//! INTERFACE ONLY (lead, stop 21): the format and reader are being written on the `rolebundle`
//! branch; this file fixes the contract the device side (`updater role apply`, the daemon)
//! codes against. [`unpack`] refuses every bundle until that branch lands.

use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::sign::{KeyId, Keyring};

/// File extension of a role bundle.
pub const EXTENSION: &str = "mfr";

/// A verified role bundle unpacked into a folder that [`super::apply::apply`] takes as its
/// `source`: `role.toml`, the compose file and its files, `images/*.tar`.
#[derive(Debug)]
pub struct Unpacked {
    pub name: String,
    pub version: semver::Version,
    /// The folder the bundle was unpacked into (the `dest` given to [`unpack`]).
    pub dir: PathBuf,
    /// The key that signed it.
    pub signer: KeyId,
}

/// Why a role bundle was refused. Nothing outside `dest` is touched by a refusal.
#[derive(Debug, Error)]
pub enum RoleBundleError {
    #[error("{path}: role bundles cannot be read yet (the reader is not written)")]
    Unsupported { path: PathBuf },
}

/// Verifies the role bundle at `path` against `keyring` and unpacks it into `dest`, a folder
/// that must not exist yet (its parent must). On error `dest` is removed again.
pub fn unpack(path: &Path, keyring: &Keyring, dest: &Path) -> Result<Unpacked, RoleBundleError> {
    let _ = (keyring, dest);
    Err(RoleBundleError::Unsupported { path: path.to_path_buf() })
}
