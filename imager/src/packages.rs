//! Pinned Debian packages: fetched once with `apt-get download` into the recipe's cache
//! folder, then unpacked with their owners and modes from `dpkg-deb --fsys-tarfile`.
//!
//! A cached `.deb` is used as it is, so a build works offline once the cache is filled; its
//! name, version and architecture are checked with `dpkg-deb` and its sha256 goes into the
//! build manifest.

use crate::cmd::CommandExt;
use crate::progress::Progress;
use crate::recipe::Recipe;
use crate::rootfs::Tree;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A fetched package, as recorded in the build manifest.
#[derive(Debug, Clone, Serialize)]
pub struct Package {
    pub name: String,
    pub version: String,
    pub architecture: String,
    #[serde(skip)]
    pub path: PathBuf,
    pub sha256: String,
}

/// The `.deb` file name apt gives a package (`:` in the version becomes `%3a`).
pub fn deb_file_name(name: &str, version: &str, arch: &str) -> String {
    format!("{name}_{}_{arch}.deb", version.replace(':', "%3a"))
}

fn find_cached(cache: &Path, name: &str, version: &str, arch: &str) -> Option<PathBuf> {
    [arch, "all"].iter().map(|a| cache.join(deb_file_name(name, version, a))).find(|p| p.is_file())
}

/// Fetches every pinned package of the recipe into its cache (when not cached yet); with
/// `offline`, a package that is not cached is an error instead.
pub fn fetch(recipe: &Recipe, offline: bool, progress: &Progress) -> Result<Vec<Package>> {
    let Some(debian) = &recipe.debian else { return Ok(Vec::new()) };
    std::fs::create_dir_all(&debian.cache)
        .with_context(|| format!("creating the package cache {}", debian.cache.display()))?;
    let missing: Vec<(&String, &String)> = debian
        .packages
        .iter()
        .filter(|(n, v)| find_cached(&debian.cache, n, v, &debian.architecture).is_none())
        .collect();
    if let (true, Some((name, version))) = (offline, missing.first()) {
        bail!(recipe.err(
            &format!("debian.packages.{name}"),
            format!(
                "{} is not in the package cache {} and --offline was given",
                deb_file_name(name, version, &debian.architecture),
                debian.cache.display()
            )
        ));
    }
    if !missing.is_empty() {
        let step = progress.bar(missing.len() as u64, "downloading packages");
        for (name, version) in &missing {
            let spec = format!("{name}:{}={version}", debian.architecture);
            let out = Command::new("apt-get")
                .args(["download", "-q", &spec])
                .current_dir(&debian.cache)
                .stdin(Stdio::null())
                .logged()
                .output()
                .context("running apt-get download (is apt installed?)")?;
            if !out.status.success()
                || find_cached(&debian.cache, name, version, &debian.architecture).is_none()
            {
                let said = String::from_utf8_lossy(&out.stderr);
                let said =
                    said.lines().filter(|l| l.starts_with("E:")).collect::<Vec<_>>().join(" ");
                bail!(recipe.err(
                    &format!("debian.packages.{name}"),
                    format!(
                        "package {spec} cannot be found ({}); check the name and version with `apt-cache policy {name}:{}`, and that `dpkg --add-architecture {}` and `apt-get update` were run",
                        if said.is_empty() { "apt-get download failed".to_string() } else { said },
                        debian.architecture,
                        debian.architecture
                    )
                ));
            }
            step.inc(1);
        }
        step.finish();
    }
    let mut packages = Vec::new();
    for (name, version) in &debian.packages {
        let path =
            find_cached(&debian.cache, name, version, &debian.architecture).expect("fetched above");
        let out = Command::new("dpkg-deb")
            .args(["-f"])
            .arg(&path)
            .args(["Package", "Version", "Architecture"])
            .run_checked()
            .with_context(|| format!("reading {}", path.display()))?;
        let fields: BTreeMap<String, String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once(": ").map(|(k, v)| (k.to_string(), v.to_string())))
            .collect();
        let field = |k: &str| fields.get(k).cloned().unwrap_or_default();
        if field("Package") != *name || field("Version") != *version {
            bail!(recipe.err(
                &format!("debian.packages.{name}"),
                format!(
                    "cached file {} holds {} {}, expected {name} {version}",
                    path.display(),
                    field("Package"),
                    field("Version")
                )
            ));
        }
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        packages.push(Package {
            name: name.clone(),
            version: version.clone(),
            architecture: field("Architecture"),
            sha256: hex::encode(Sha256::digest(&bytes)),
            path,
        });
    }
    Ok(packages)
}

/// Unpacks the entries of a `.deb` that `keep` accepts into `tree`; returns how many.
pub fn unpack(deb: &Path, tree: &mut Tree, keep: &dyn Fn(&Path) -> bool) -> Result<usize> {
    let mut child = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(deb)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .logged()
        .spawn()
        .context("running dpkg-deb (is dpkg installed?)")?;
    let stdout = child.stdout.take().expect("piped");
    let result = tree.add_tar_filtered(stdout, keep);
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "dpkg-deb --fsys-tarfile {} failed: {}",
            deb.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    result.with_context(|| format!("unpacking {}", deb.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deb_names_escape_epochs() {
        assert_eq!(
            deb_file_name("busybox-static", "1:1.35.0-4+b3", "arm64"),
            "busybox-static_1%3a1.35.0-4+b3_arm64.deb"
        );
        assert_eq!(deb_file_name("k", "6.1.1-1", "arm64"), "k_6.1.1-1_arm64.deb");
    }

    /// Builds a real .deb with dpkg-deb and unpacks it as whoever runs the test.
    #[test]
    fn unpack_keeps_package_owners() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("pkg");
        std::fs::create_dir_all(root.join("DEBIAN")).unwrap();
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        std::fs::write(
            root.join("DEBIAN/control"),
            "Package: demo\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@t>\nDescription: d\n",
        )
        .unwrap();
        std::fs::write(root.join("usr/bin/demo"), "#!/bin/sh\n").unwrap();
        let deb = dir.path().join("demo.deb");
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-b"])
            .arg(&root)
            .arg(&deb)
            .run_checked()
            .unwrap();
        let mut tree = Tree::new(&dir.path().join("staging")).unwrap();
        let n = unpack(&deb, &mut tree, &|p| p.starts_with("/usr")).unwrap();
        assert!(n >= 2, "{n}");
        let node = tree.get(Path::new("/usr/bin/demo")).unwrap();
        assert_eq!((node.uid, node.gid), (0, 0));
        assert_eq!(tree.read("/usr/bin/demo").unwrap(), b"#!/bin/sh\n");
        assert!(unpack(&dir.path().join("missing.deb"), &mut tree, &|_| true).is_err());
    }
}
