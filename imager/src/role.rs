//! `imager role build` and `imager inspect X.mfr`: signed role bundles (docs/bundle.md, "Role
//! bundles"; docs/roles.md, "Role bundles"). The format, its writer and its reader live in
//! `updater::role::bundle`; this module adds files, progress and reports.

use std::fmt::Write as _;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use ed25519_dalek::SigningKey;
use serde::Serialize;
use updater::role::bundle::{self as format, Manifest};
use updater::sign::Keyring;

use crate::progress::Progress;

/// What `imager role build` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct Built {
    pub path: PathBuf,
    pub name: String,
    pub version: String,
    pub size: u64,
    pub files: usize,
    pub images: usize,
    pub key_id: String,
}

/// Builds `output/NAME-VERSION.mfr` from the role folder `dir` and the image archives
/// `images` (docker save), signed with `key`, every entry dated `created`. role.toml is
/// checked with the device's strict schema first; the file is replaced atomically.
pub fn build(
    dir: &Path,
    images: &[PathBuf],
    key: &SigningKey,
    output: &Path,
    created: u64,
    progress: &Progress,
) -> Result<Built> {
    let contents = format::collect(dir, images)
        .with_context(|| format!("reading the role folder {}", dir.display()))?;
    let role = &contents.spec.role;
    let file_name = format::file_name(&role.name.0, &role.version);
    std::fs::create_dir_all(output).with_context(|| format!("creating {}", output.display()))?;
    let out = output.join(&file_name);
    let tmp = tempfile::NamedTempFile::new_in(output)
        .with_context(|| format!("creating a temporary file in {}", output.display()))?;
    // Each file is read twice: hashed for the manifest, then copied (and hashed again).
    let step = progress.bytes(2 * contents.total_size(), &format!("building {file_name}"));
    let manifest =
        format::write(BufWriter::new(tmp.as_file()), &contents, created, key, &mut |n| step.inc(n))
            .with_context(|| format!("writing {}", out.display()))?;
    step.finish();
    tmp.as_file().sync_all().with_context(|| format!("syncing {}", out.display()))?;
    let size = tmp.as_file().metadata()?.len();
    tmp.persist(&out).with_context(|| format!("renaming the bundle to {}", out.display()))?;
    Ok(Built {
        path: out,
        name: manifest.name.clone(),
        version: manifest.version.to_string(),
        size,
        files: manifest.files.len(),
        images: manifest.files.iter().filter(|f| f.is_image()).count(),
        key_id: updater::sign::KeyId::of(&key.verifying_key()).to_string(),
    })
}

/// Whether `path` is a role bundle: the `.mfr` extension, or a readable role manifest.
pub fn is_role_bundle(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == format::EXTENSION)
        || format::read_manifest(path, None).is_ok()
}

/// The signature as `imager inspect` reports it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum SignatureStatus {
    /// The signature and every member verify against the keyring.
    Valid { key_id: String },
    /// No keyring was given.
    NotChecked { key_id: String },
    /// The bundle did not verify (bad or unknown signature, a tampered member, ...).
    Invalid { key_id: String, reason: String },
}

/// One file of a role bundle.
#[derive(Debug, Clone, Serialize)]
pub struct FileInfo {
    pub path: String,
    pub size: u64,
    pub sha256: String,
    pub image: bool,
}

/// What `imager inspect X.mfr` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    pub path: PathBuf,
    pub name: String,
    pub version: String,
    pub os: String,
    pub created: String,
    pub size: u64,
    pub files: Vec<FileInfo>,
    pub signature: SignatureStatus,
}

/// Reads a role bundle's manifest; with a keyring, verifies the whole bundle (signature, then
/// every member's hash and role.toml) and reports the result in `signature`.
pub fn inspect(path: &Path, keyring: Option<&Keyring>) -> Result<Inspection> {
    let peek = format::read_manifest(path, None)
        .with_context(|| format!("reading the role bundle {}", path.display()))?;
    let key_id = peek.key_id.to_string();
    let signature = match keyring {
        None => SignatureStatus::NotChecked { key_id },
        Some(ring) => match format::verify_file(path, ring) {
            Ok(v) => SignatureStatus::Valid { key_id: v.signer.to_string() },
            Err(e) => SignatureStatus::Invalid { key_id, reason: e.to_string() },
        },
    };
    let size =
        std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?.len();
    Ok(describe(path, &peek.manifest, size, signature))
}

fn describe(path: &Path, m: &Manifest, size: u64, signature: SignatureStatus) -> Inspection {
    Inspection {
        path: path.to_path_buf(),
        name: m.name.clone(),
        version: m.version.to_string(),
        os: m.os.to_string(),
        created: m.created.to_string(),
        size,
        files: m
            .files
            .iter()
            .map(|f| FileInfo {
                path: f.path.clone(),
                size: f.size,
                sha256: f.sha256.clone(),
                image: f.is_image(),
            })
            .collect(),
        signature,
    }
}

impl std::fmt::Display for Inspection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = String::new();
        let _ = writeln!(s, "role bundle {}", self.path.display());
        let _ = writeln!(s, "  role     {} {}", self.name, self.version);
        let _ = writeln!(s, "  os       {}", self.os);
        let _ = writeln!(s, "  created  {}", self.created);
        let _ = writeln!(s, "  size     {} bytes", self.size);
        let (images, files): (Vec<_>, Vec<_>) = self.files.iter().partition(|f| f.image);
        for (title, list) in [("files", files), ("images", images)] {
            let _ = writeln!(s, "  {title} ({})", list.len());
            for file in list {
                let _ =
                    writeln!(s, "    {:<40} {:>12}  {}", file.path, file.size, &file.sha256[..16]);
            }
        }
        let sig = match &self.signature {
            SignatureStatus::Valid { key_id } => format!("valid, by key {key_id}"),
            SignatureStatus::NotChecked { key_id } => {
                format!("by key {key_id}, not checked (no --keyring)")
            }
            SignatureStatus::Invalid { key_id, reason } => {
                format!("INVALID (key {key_id}): {reason}")
            }
        };
        let _ = writeln!(s, "  signature {sig}");
        f.write_str(&s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use updater::role::bundle::testkit::{keyring_of, test_key, write_role};

    fn role_with_image(tmp: &Path) -> (PathBuf, PathBuf) {
        let role = tmp.join("app");
        write_role(&role, "app", "2.0.0");
        let image = tmp.join("app.tar");
        std::fs::write(&image, vec![1u8; 100_000]).unwrap();
        (role, image)
    }

    #[test]
    fn build_writes_a_reproducible_verified_bundle_and_inspect_reports_it() {
        let tmp = tempfile::tempdir().unwrap();
        let (role, image) = role_with_image(tmp.path());
        let key = test_key(4);
        let out = tmp.path().join("out");
        let q = Progress::quiet();
        let built =
            build(&role, std::slice::from_ref(&image), &key, &out, 1_700_000_000, &q).unwrap();
        assert_eq!(built.path, out.join("app-2.0.0.mfr"));
        assert_eq!((built.files, built.images), (3, 1));
        let first = std::fs::read(&built.path).unwrap();
        build(&role, &[image], &key, &out, 1_700_000_000, &q).unwrap();
        assert_eq!(std::fs::read(&built.path).unwrap(), first, "same inputs, same bytes");
        assert!(is_role_bundle(&built.path));

        let ring = keyring_of(&key);
        let i = inspect(&built.path, Some(&ring)).unwrap();
        assert_eq!(
            (i.name.as_str(), i.version.as_str(), i.os.as_str()),
            ("app", "2.0.0", ">=1.0.0")
        );
        assert_eq!(i.signature, SignatureStatus::Valid { key_id: built.key_id.clone() });
        assert_eq!(i.files.iter().filter(|f| f.image).count(), 1);
        assert_eq!(i.size, first.len() as u64);
        let text = i.to_string();
        assert!(text.contains("images (1)") && text.contains("images/app.tar"), "{text}");
        let json = serde_json::to_value(&i).unwrap();
        assert_eq!(json["signature"]["status"], "valid");

        let other = keyring_of(&test_key(5));
        let i = inspect(&built.path, Some(&other)).unwrap();
        assert!(
            matches!(&i.signature, SignatureStatus::Invalid { reason, .. } if reason.contains("not in the keyring"))
        );
        let i = inspect(&built.path, None).unwrap();
        assert!(matches!(i.signature, SignatureStatus::NotChecked { .. }));
    }

    #[test]
    fn build_refuses_an_invalid_role_toml_naming_file_and_key() {
        let tmp = tempfile::tempdir().unwrap();
        let (role, _) = role_with_image(tmp.path());
        let text = std::fs::read_to_string(role.join("role.toml")).unwrap();
        std::fs::write(role.join("role.toml"), text.replace("[role]\n", "[role]\nhelth = 1\n"))
            .unwrap();
        let q = Progress::quiet();
        let err = build(&role, &[], &test_key(4), tmp.path(), 0, &q).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("role.toml:2") && msg.contains("helth"), "{msg}");
        let err =
            build(&tmp.path().join("none"), &[], &test_key(4), tmp.path(), 0, &q).unwrap_err();
        assert!(format!("{err:#}").contains("none/role.toml"), "{err:#}");
        assert!(!is_role_bundle(&role.join("role.toml")));
    }
}
