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
/// checked with the device's strict schema first; the file (mode 0644) is replaced atomically.
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
    use std::os::unix::fs::PermissionsExt;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))
        .with_context(|| format!("setting the mode of {}", out.display()))?;
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

/// The keyring folder of an image: the updater's default `--keyring`.
pub const IMAGE_KEYRING_DIR: &str = "/etc/metrica/keyring";

/// The keyring of a root tree: every `*.pub.pem` file in [`IMAGE_KEYRING_DIR`] (the keys the
/// device will trust).
pub fn tree_keyring(root: &crate::rootfs::Tree) -> Result<Keyring> {
    let dir = Path::new(IMAGE_KEYRING_DIR);
    let mut ring = Keyring::default();
    let keys: Vec<PathBuf> = root
        .iter()
        .map(|(p, _)| p.clone())
        .filter(|p| p.parent() == Some(dir))
        .filter(|p| p.to_string_lossy().ends_with(updater::sign::PUBLIC_KEY_SUFFIX))
        .collect();
    for p in keys {
        let what = p.display().to_string();
        let pem =
            String::from_utf8(root.read(&what)?).with_context(|| format!("{what}: not UTF-8"))?;
        ring.add(updater::sign::public_key_from_pem(&pem, &what)?);
    }
    Ok(ring)
}

/// Bakes the recipe's `[roles] bundles` into the root tree: each verified against the image's
/// own keyring ([`tree_keyring`]), at most one per role, at
/// `updater::role::bundle::baked_path(NAME)` (mode 0644, owner root). Errors name the recipe
/// and the key.
pub fn bake(
    recipe: &crate::recipe::Recipe,
    root: &mut crate::rootfs::Tree,
    progress: &Progress,
) -> Result<()> {
    if recipe.role_bundles.is_empty() {
        return Ok(());
    }
    let ring = tree_keyring(root)?;
    if ring.is_empty() {
        return Err(recipe.err(
            "roles.bundles",
            format!("the image has no keyring ({IMAGE_KEYRING_DIR}/*.pub.pem) to verify the role bundles against"),
        ));
    }
    let mut seen: std::collections::BTreeMap<String, usize> = Default::default();
    for (i, path) in recipe.role_bundles.iter().enumerate() {
        let key = format!("roles.bundles[{i}]");
        let size = std::fs::metadata(path).map_err(|e| recipe.err(&key, e))?.len();
        let v = verify(path, size, &ring, progress).map_err(|e| recipe.err(&key, e))?;
        let name = v.manifest.name;
        if let Some(first) = seen.insert(name.clone(), i) {
            return Err(recipe.err(
                &key,
                format!("a second bundle of role {name} (roles.bundles[{first}] is one): bake one per role"),
            ));
        }
        let dest = format::baked_path(&name);
        root.add_host_file(&dest.to_string_lossy(), path, 0o644, 0, 0)
            .map_err(|e| recipe.err(&key, format!("{e:#}")))?;
    }
    Ok(())
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
pub fn inspect(path: &Path, keyring: Option<&Keyring>, progress: &Progress) -> Result<Inspection> {
    let peek = format::read_manifest(path, None)
        .with_context(|| format!("reading the role bundle {}", path.display()))?;
    let key_id = peek.key_id.to_string();
    let size =
        std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?.len();
    let signature = match keyring {
        None => SignatureStatus::NotChecked { key_id },
        Some(ring) => match verify(path, size, ring, progress) {
            Ok(v) => SignatureStatus::Valid { key_id: v.signer.to_string() },
            Err(e) => SignatureStatus::Invalid { key_id, reason: e.to_string() },
        },
    };
    Ok(describe(path, &peek.manifest, size, signature))
}

/// Verifies the whole bundle at `path` (`size` bytes) with a progress bar.
pub fn verify(
    path: &Path,
    size: u64,
    keyring: &Keyring,
    progress: &Progress,
) -> Result<format::Verified, format::RoleBundleError> {
    let step = progress.bytes(size, &format!("verifying {}", path.display()));
    let v = format::verify_file_with(path, keyring, &mut |n| step.inc(n));
    step.finish();
    v
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
        let i = inspect(&built.path, Some(&ring), &q).unwrap();
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
        let i = inspect(&built.path, Some(&other), &q).unwrap();
        assert!(
            matches!(&i.signature, SignatureStatus::Invalid { reason, .. } if reason.contains("not in the keyring"))
        );
        let i = inspect(&built.path, None, &q).unwrap();
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

    /// A recipe folder with a kernel, a config.txt and the role bundles `bundles` (names of
    /// files in the folder), and the recipe text baking them.
    fn recipe(dir: &Path, bundles: &[&str]) -> anyhow::Result<crate::recipe::Recipe> {
        std::fs::write(dir.join("kernel"), "kernel").unwrap();
        std::fs::write(dir.join("config.txt"), "arm_64bit=1\n").unwrap();
        let list: Vec<String> = bundles.iter().map(|b| format!("{b:?}")).collect();
        let text = format!(
            "name = \"t\"\nversion = \"1.0.0\"\ncompatible = \"metrica-test\"\n\
             [partitions]\nconfig = \"16MiB\"\nboot_a = \"32MiB\"\nboot_b = \"32MiB\"\n\
             root_a = \"64MiB\"\nroot_b = \"64MiB\"\nprovision = \"16MiB\"\ndata = \"32MiB\"\n\
             [boot]\nkernel = \"kernel\"\nconfig_txt = \"config.txt\"\ncmdline = \"quiet\"\n\
             [roles]\nbundles = [{}]\n",
            list.join(", ")
        );
        let file = dir.join("r.toml");
        std::fs::write(&file, &text).unwrap();
        crate::recipe::Recipe::load(&file)
    }

    /// A root tree whose keyring trusts `key`.
    fn tree(dir: &Path, key: &SigningKey) -> crate::rootfs::Tree {
        let mut t = crate::rootfs::Tree::new(&dir.join("staging")).unwrap();
        let pem = updater::sign::public_key_to_pem(&key.verifying_key());
        t.add_bytes("/etc/metrica/keyring/fleet.pub.pem", pem.as_bytes(), 0o644, 0, 0).unwrap();
        t
    }

    fn bundle(dir: &Path, name: &str, version: &str, key: &SigningKey, file: &str) {
        let role = dir.join(format!("src-{file}"));
        write_role(&role, name, version);
        let out = dir.join(format!("out-{file}"));
        std::fs::create_dir_all(&out).unwrap();
        let built = updater::role::bundle::testkit::make_role_bundle(&role, &[], key, &out);
        std::fs::rename(built, dir.join(file)).unwrap();
    }

    #[test]
    fn a_recipe_bakes_verified_role_bundles_into_the_root() {
        let tmp = tempfile::tempdir().unwrap();
        let key = test_key(4);
        bundle(tmp.path(), "cam", "1.0.0", &key, "cam.mfr");
        bundle(tmp.path(), "safe-mode", "1.0.0", &key, "safe.mfr");
        let r = recipe(tmp.path(), &["cam.mfr", "safe.mfr"]).unwrap();
        assert_eq!(r.role_bundles, vec![tmp.path().join("cam.mfr"), tmp.path().join("safe.mfr")]);
        let mut t = tree(tmp.path(), &key);
        bake(&r, &mut t, &Progress::quiet()).unwrap();
        for (name, file) in [("cam", "cam.mfr"), ("safe-mode", "safe.mfr")] {
            let path = format::baked_path(name);
            assert_eq!(
                t.read(&path.to_string_lossy()).unwrap(),
                std::fs::read(tmp.path().join(file)).unwrap()
            );
            let node = t.get(&path).unwrap();
            assert_eq!((node.mode, node.uid, node.gid), (0o644, 0, 0));
        }
        // The repository's QEMU recipe bakes nothing (the image stays small).
        let qemu = Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes/qemu.toml");
        assert!(!std::fs::read_to_string(qemu).unwrap().contains("[roles]"));
    }

    #[test]
    fn bad_baked_bundles_name_the_recipe_and_key() {
        let tmp = tempfile::tempdir().unwrap();
        let key = test_key(4);
        let recipe_file = tmp.path().join("r.toml").display().to_string();
        let err = format!("{:#}", recipe(tmp.path(), &["missing.mfr"]).unwrap_err());
        assert!(
            err.contains(&recipe_file)
                && err.contains("roles.bundles[0]")
                && err.contains("does not exist"),
            "{err}"
        );

        bundle(tmp.path(), "cam", "1.0.0", &key, "cam.mfr");
        bundle(tmp.path(), "cam", "1.1.0", &key, "cam2.mfr");
        bundle(tmp.path(), "zig", "1.0.0", &test_key(6), "stranger.mfr");
        let cases = [
            (vec!["cam.mfr", "cam2.mfr"], "roles.bundles[1]: a second bundle of role cam"),
            (vec!["cam.mfr", "stranger.mfr"], "roles.bundles[1]"),
        ];
        for (files, want) in cases {
            let r = recipe(tmp.path(), &files).unwrap();
            let err = bake(&r, &mut tree(tmp.path(), &key), &Progress::quiet()).unwrap_err();
            let msg = format!("{err:#}");
            assert!(msg.starts_with(&recipe_file) && msg.contains(want), "{want}: {msg}");
        }
        let r = recipe(tmp.path(), &["stranger.mfr"]).unwrap();
        let msg =
            format!("{:#}", bake(&r, &mut tree(tmp.path(), &key), &Progress::quiet()).unwrap_err());
        assert!(msg.contains("not in the keyring"), "{msg}");
        // A tampered bundle.
        let mut bytes = std::fs::read(tmp.path().join("cam.mfr")).unwrap();
        let at = bytes.windows(9).position(|w| w == b"services:").unwrap();
        bytes[at] ^= 1;
        std::fs::write(tmp.path().join("bad.mfr"), bytes).unwrap();
        let r = recipe(tmp.path(), &["bad.mfr"]).unwrap();
        let msg =
            format!("{:#}", bake(&r, &mut tree(tmp.path(), &key), &Progress::quiet()).unwrap_err());
        assert!(msg.contains("roles.bundles[0]") && msg.contains("sha256 does not match"), "{msg}");
        // No keyring in the image.
        let r = recipe(tmp.path(), &["cam.mfr"]).unwrap();
        let mut empty = crate::rootfs::Tree::new(&tmp.path().join("s2")).unwrap();
        let msg = format!("{:#}", bake(&r, &mut empty, &Progress::quiet()).unwrap_err());
        assert!(msg.contains("roles.bundles: the image has no keyring"), "{msg}");
        // An unknown key in [roles].
        let text = std::fs::read_to_string(tmp.path().join("r.toml")).unwrap();
        let text = text.replace("[roles]\n", "[roles]\nbundle = 1\n");
        let msg = format!(
            "{:#}",
            crate::recipe::Recipe::parse(&tmp.path().join("r.toml"), &text).unwrap_err()
        );
        assert!(msg.contains("unknown field `bundle`"), "{msg}");
    }
}
