//! Role bundles for tests (this crate's and, with the `testkit` feature, other crates'): build a
//! signed `.mfr` from a role folder with a fixed test key.

use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;

use crate::sign::Keyring;

/// `created` of every test bundle (2023-11-14T22:13:20Z).
pub const TEST_CREATED: u64 = 1_700_000_000;

/// A fixed test key (never used outside tests).
pub fn test_key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

/// A keyring trusting exactly `key`.
pub fn keyring_of(key: &SigningKey) -> Keyring {
    Keyring::from_keys([key.verifying_key()])
}

/// Writes a small valid role folder: role.toml (`name`, `version`, one TCP health check) and
/// compose.yaml (one service, `image` a bundle-local tag with `pull_policy: never`).
pub fn write_role(dir: &Path, name: &str, version: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let role = format!(
        "[role]\nname = \"{name}\"\nversion = \"{version}\"\nos = \">=1.0.0\"\n\
         update_interval = \"1h\"\n\n[[health.tcp]]\naddress = \"127.0.0.1:8080\"\n"
    );
    std::fs::write(dir.join("role.toml"), role).unwrap();
    let compose = "services:\n  app:\n    image: metrica.invalid/app:1\n    pull_policy: never\n";
    std::fs::write(dir.join("compose.yaml"), compose).unwrap();
}

/// Builds `NAME-VERSION.mfr` of the role folder `role_dir` (with `images`, each becoming
/// `images/FILE_NAME`) in `out_dir`, signed with `key`; returns its path. Panics on error.
pub fn make_role_bundle(
    role_dir: &Path,
    images: &[PathBuf],
    key: &SigningKey,
    out_dir: &Path,
) -> PathBuf {
    let contents = super::collect(role_dir, images).unwrap();
    let role = &contents.spec.role;
    let path = out_dir.join(super::file_name(&role.name.0, &role.version));
    let file = std::fs::File::create(&path).unwrap();
    super::write(std::io::BufWriter::new(file), &contents, TEST_CREATED, key, &mut |_| {}).unwrap();
    path
}
