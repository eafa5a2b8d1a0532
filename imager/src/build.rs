//! `imager build`: a recipe becomes a disk image and everything that goes with it.
//!
//! Steps: fetch pinned packages; assemble the root tree from the layers; build the boot files
//! (kernel, DTBs, `config.txt`, initramfs); lay out the GPT; write the FAT partitions with
//! `fatfs` and the ext4 ones with e2fsprogs; then the `.img.zst`, `.bmap`, manifest and OS
//! bundle. Everything is written inside a temporary folder in the output folder and renamed
//! into place at the end, so a failed build leaves no half-written image behind.

use crate::ext4::{self, Ext4Params};
use crate::fat::{self, Region};
use crate::image::{write_gpt, Ids, Layout};
use crate::initramfs::Initramfs;
use crate::output;
use crate::packages::{self, Package};
use crate::progress::Progress;
use crate::recipe::{Base, Initramfs as InitramfsRecipe, Layer, Recipe, Source};
use crate::rootfs::{Kind, Node, Tree};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;
use updater::autoboot::Autoboot;
use updater::layout::Slot;
use updater::release::{Release, RELEASE_PATH};

/// Names of the boot files on each boot partition (the Pi 4/5 64-bit defaults).
pub const KERNEL_NAME: &str = "kernel8.img";
pub const INITRAMFS_NAME: &str = "initramfs8";

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub recipe: PathBuf,
    pub output: PathBuf,
    /// Overrides the recipe's version (tests build v1 and v2 from one recipe).
    pub version: Option<semver::Version>,
    /// `SOURCE_DATE_EPOCH`; the current time when not given.
    pub epoch: Option<u64>,
    /// zstd level of the `.img.zst`.
    pub zstd_level: i32,
    /// Skip the OS bundle even when the recipe names a signing key.
    pub no_bundle: bool,
}

/// What a build produced.
#[derive(Debug, Clone, Serialize)]
pub struct BuildReport {
    pub name: String,
    pub version: String,
    pub image: PathBuf,
    pub image_size: u64,
    pub mapped_bytes: u64,
    pub zst: PathBuf,
    pub zst_size: u64,
    pub bmap: PathBuf,
    pub manifest: PathBuf,
    pub bundle: Option<PathBuf>,
    pub seconds: f64,
}

/// The build manifest written beside the image.
#[derive(Debug, Serialize)]
struct Manifest<'a> {
    name: &'a str,
    version: String,
    compatible: &'a str,
    security_epoch: u64,
    source_date_epoch: u64,
    recipe_sha256: String,
    packages: &'a [Package],
    root_files: usize,
    root_content_bytes: u64,
    partitions: Vec<ManifestPartition>,
}

#[derive(Debug, Serialize)]
struct ManifestPartition {
    number: u32,
    label: &'static str,
    start: u64,
    size: u64,
    partuuid: String,
    sha256: String,
}

/// Reads files named by [`Source`]s: host files, the root tree, or unpacked packages.
struct Sources<'a> {
    recipe: &'a Recipe,
    root: &'a Tree,
    debs: BTreeMap<String, Tree>,
}

impl Sources<'_> {
    /// The bytes and mode of a source; `key` names it in errors.
    fn read(&self, key: &str, source: &Source) -> Result<(Vec<u8>, u32)> {
        match source {
            Source::Host(p) => {
                use std::os::unix::fs::PermissionsExt;
                let bytes = std::fs::read(p)
                    .map_err(|e| self.recipe.err(key, format!("reading {}: {e}", p.display())))?;
                let mode = std::fs::metadata(p)?.permissions().mode();
                Ok((bytes, if mode & 0o111 != 0 { 0o755 } else { 0o644 }))
            }
            Source::Root(path) => {
                let bytes = self.root.read(path).map_err(|e| self.recipe.err(key, e))?;
                let mode = self.root.get(Path::new(path)).map_or(0o644, |n| n.mode);
                Ok((bytes, mode))
            }
            Source::Deb { package, path } => {
                let tree = self.debs.get(package).expect("requested packages are unpacked");
                let bytes = tree.read(path).map_err(|_| {
                    self.recipe.err(key, format!("{path} is not in package {package}"))
                })?;
                let mode = tree.get(Path::new(path)).map_or(0o644, |n| n.mode);
                Ok((bytes, mode))
            }
        }
    }
}

/// Every `deb:` source of the boot files, by package.
fn deb_requests(recipe: &Recipe) -> BTreeMap<String, BTreeSet<PathBuf>> {
    let mut wanted: BTreeMap<String, BTreeSet<PathBuf>> = BTreeMap::new();
    let b = &recipe.boot;
    let mut sources: Vec<&Source> = vec![&b.kernel, &b.config_txt];
    sources.extend(&b.dtbs);
    sources.extend(b.files.values());
    match &b.initramfs {
        Some(InitramfsRecipe::Prebuilt(s)) => sources.push(s),
        Some(InitramfsRecipe::Build(spec)) => {
            sources.push(&spec.init);
            sources.extend(spec.files.values());
            if let Some(p) = &spec.modules_package {
                wanted.entry(p.clone()).or_default();
            }
        }
        None => {}
    }
    for s in sources {
        if let Source::Deb { package, path } = s {
            wanted.entry(package.clone()).or_default().insert(PathBuf::from(path));
        }
    }
    wanted
}

/// Builds the image, its compressed copy, block map, manifest and bundle.
pub fn build(opts: &BuildOptions, progress: &Progress) -> Result<BuildReport> {
    let started = Instant::now();
    let mut recipe = Recipe::load(&opts.recipe)?;
    if let Some(v) = &opts.version {
        recipe.version = v.clone();
    }
    let epoch = match opts.epoch {
        Some(e) => e,
        None => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs(),
    };
    let stem = recipe.stem();
    std::fs::create_dir_all(&opts.output)
        .with_context(|| format!("creating {}", opts.output.display()))?;
    let work = tempfile::Builder::new()
        .prefix(".imager-build-")
        .tempdir_in(&opts.output)
        .with_context(|| format!("creating a work folder in {}", opts.output.display()))?;
    progress.line(&format!(
        "building {stem} from {} (SOURCE_DATE_EPOCH={epoch})",
        recipe.file.display()
    ));

    // 1. Packages.
    let packages = packages::fetch(&recipe, progress)?;
    let deb_path = |name: &str| {
        packages.iter().find(|p| p.name == name).map(|p| p.path.clone()).expect("pinned")
    };

    // 2. The root tree.
    let step = progress.bar(recipe.layers.len() as u64 + 1, "assembling root");
    let mut root = Tree::new(&work.path().join("staging/root"))?;
    if let Base::Tarball(path) = &recipe.base {
        add_tarball(&mut root, path).map_err(|e| recipe.err("base.path", format!("{e:#}")))?;
    }
    step.inc(1);
    for (i, layer) in recipe.layers.iter().enumerate() {
        let key = |field: &str| format!("layers[{i}].{field}");
        match layer {
            Layer::Deb { package, paths } => {
                let only: Vec<PathBuf> =
                    paths.iter().map(|p| crate::rootfs::image_path(p)).collect::<Result<_>>()?;
                let n = packages::unpack(&deb_path(package), &mut root, &|p| {
                    only.is_empty() || only.iter().any(|o| p.starts_with(o) || o.starts_with(p))
                })?;
                if n == 0 {
                    bail!(recipe
                        .err(&key("paths"), format!("none of {paths:?} is in package {package}")));
                }
            }
            Layer::Tarball { path } => add_tarball(&mut root, path)
                .map_err(|e| recipe.err(&key("path"), format!("{e:#}")))?,
            Layer::Overlay { path, .. } => {
                root.add_overlay(path).map_err(|e| recipe.err(&key("name"), format!("{e:#}")))?;
            }
            Layer::File { source, path, mode, uid, gid } => match source {
                Source::Host(host) => root.add_host_file(path, host, *mode, *uid, *gid)?,
                other => {
                    // The recipe refuses deb: sources here, so this reads root:/path.
                    let sources = Sources { recipe: &recipe, root: &root, debs: BTreeMap::new() };
                    let (bytes, _) = sources.read(&key("source"), other)?;
                    root.add_bytes(path, &bytes, *mode, *uid, *gid)?;
                }
            },
            Layer::Symlink { path, target } => {
                root.insert(crate::rootfs::image_path(path)?, Node::symlink(target))?;
            }
            Layer::Symlinks { dir, target, names } => {
                for name in names {
                    root.insert(
                        crate::rootfs::image_path(&format!("{dir}/{name}"))?,
                        Node::symlink(target),
                    )?;
                }
            }
            Layer::Dir { path, mode, uid, gid } => {
                root.insert(crate::rootfs::image_path(path)?, Node::dir(*mode, *uid, *gid))?;
            }
        }
        step.inc(1);
    }
    let release = Release {
        name: recipe.name.clone(),
        version: recipe.version.clone(),
        compatible: recipe.compatible.clone(),
        build_epoch: epoch,
        security_epoch: recipe.security_epoch,
    };
    root.add_bytes(RELEASE_PATH, release.to_toml().as_bytes(), 0o644, 0, 0)?;
    root.add_bytes("/etc/os-release", os_release(&release).as_bytes(), 0o644, 0, 0)?;
    step.finish();

    // 3. Boot files.
    let mut debs = BTreeMap::new();
    for (package, paths) in deb_requests(&recipe) {
        let mut tree = Tree::new(&work.path().join("staging").join(&package))?;
        let modules: BTreeSet<String> = match &recipe.boot.initramfs {
            Some(InitramfsRecipe::Build(s)) if s.modules_package.as_deref() == Some(&package) => {
                s.modules.iter().map(|m| format!("{m}.ko")).collect()
            }
            _ => BTreeSet::new(),
        };
        packages::unpack(&deb_path(&package), &mut tree, &|p| {
            paths.iter().any(|w| w == p || w.starts_with(p))
                || (p.starts_with("/lib/modules") || p.starts_with("/usr/lib/modules"))
                    && p.file_name().is_some_and(|n| modules.contains(&*n.to_string_lossy()))
        })?;
        debs.insert(package, tree);
    }
    let sources = Sources { recipe: &recipe, root: &root, debs };
    let mut boot_files: Vec<(String, Vec<u8>)> = Vec::new();
    boot_files.push((KERNEL_NAME.into(), sources.read("boot.kernel", &recipe.boot.kernel)?.0));
    boot_files
        .push(("config.txt".into(), sources.read("boot.config_txt", &recipe.boot.config_txt)?.0));
    for (i, dtb) in recipe.boot.dtbs.iter().enumerate() {
        let name = match dtb {
            Source::Host(p) => p.file_name().map(|n| n.to_string_lossy().into_owned()),
            Source::Deb { path, .. } | Source::Root(path) => {
                path.rsplit('/').next().map(str::to_string)
            }
        }
        .unwrap_or_default();
        boot_files.push((name, sources.read(&format!("boot.dtbs[{i}]"), dtb)?.0));
    }
    for (name, src) in &recipe.boot.files {
        boot_files.push((name.clone(), sources.read(&format!("boot.files.{name}"), src)?.0));
    }
    match &recipe.boot.initramfs {
        None => {}
        Some(InitramfsRecipe::Prebuilt(src)) => {
            boot_files.push((INITRAMFS_NAME.into(), sources.read("boot.initramfs", src)?.0));
        }
        Some(InitramfsRecipe::Build(spec)) => {
            let mut ir = Initramfs::new();
            ir.add_file("/init", 0o755, sources.read("boot.initramfs.init", &spec.init)?.0)?;
            for (path, src) in &spec.files {
                let (bytes, mode) =
                    sources.read(&format!("boot.initramfs.files.\"{path}\""), src)?;
                ir.add_file(path, mode, bytes)?;
            }
            if let Some(pkg) = &spec.modules_package {
                let tree = &sources.debs[pkg];
                let mut modules = Vec::new();
                for m in &spec.modules {
                    let want = format!("{m}.ko");
                    let path = tree
                        .iter()
                        .find(|(p, n)| {
                            matches!(n.kind, Kind::File { .. })
                                && p.file_name().is_some_and(|f| f.to_string_lossy() == want)
                        })
                        .map(|(p, _)| p.to_string_lossy().into_owned())
                        .ok_or_else(|| {
                            recipe.err(
                                "boot.initramfs.modules",
                                format!("module {m} is not in package {pkg}"),
                            )
                        })?;
                    modules.push((m.clone(), tree.read(&path)?));
                }
                ir.add_modules(&modules)?;
            }
            let mut bytes = Vec::new();
            ir.write(&mut bytes, epoch)?;
            boot_files.push((INITRAMFS_NAME.into(), bytes));
        }
    }

    // 4. The disk.
    let ids = Ids::new(&recipe.name, &recipe.version);
    let layout = Layout::new(&recipe.partitions);
    let img_tmp = work.path().join(format!("{stem}.img"));
    let img = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&img_tmp)
        .with_context(|| format!("creating {}", img_tmp.display()))?;
    img.set_len(layout.disk_size)?;
    write_gpt(&img, &layout, &ids)?;

    let step = progress.bar(4, "writing FAT partitions");
    let region = |label: &str| {
        let p = layout.get(label);
        Region { file: &img, start: p.start, len: p.len }
    };
    fat::format(region("config"), "config", ids.volume_id("config"))
        .and_then(|()| {
            fat::write_files(
                region("config"),
                "config",
                &[("autoboot.txt".into(), Autoboot::committed(Slot::A).render())],
            )
        })
        .map_err(|e| recipe.err("partitions.config", format!("{e:#}")))?;
    step.inc(1);
    // The boot filesystem is slot-independent (bundles carry one boot image for either slot):
    // it is written once, copied into both boot partitions, and only cmdline.txt then differs.
    let boot_fat = work.path().join("boot.fat");
    {
        let f =
            std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&boot_fat)?;
        let len = layout.get("boot_a").len;
        f.set_len(len)?;
        let whole = Region { file: &f, start: 0, len };
        let mut files = boot_files.clone();
        files.push((
            "cmdline.txt".into(),
            updater::cmdline::with_root(&recipe.boot.cmdline, &ids.partuuid("root_a")).into_bytes(),
        ));
        fat::format(whole, "boot", ids.volume_id("boot_a"))
            .and_then(|()| fat::write_files(whole, "boot_a", &files))
            .map_err(|e| recipe.err("partitions.boot_a", format!("{e:#}")))?;
    }
    let boot_file = File::open(&boot_fat)?;
    for slot in Slot::ALL {
        let label = slot.boot().label;
        output::copy_sparse(&boot_file, &img, layout.get(label).start)?;
        let cmdline =
            updater::cmdline::with_root(&recipe.boot.cmdline, &ids.partuuid(slot.root().label));
        fat::write_files(region(label), label, &[("cmdline.txt".into(), cmdline.into_bytes())])
            .map_err(|e| recipe.err(&format!("partitions.{label}"), format!("{e:#}")))?;
        step.inc(1);
    }
    fat::format(region("provision"), "provision", ids.volume_id("provision"))
        .map_err(|e| recipe.err("partitions.provision", format!("{e:#}")))?;
    step.inc(1);
    step.finish();

    let root_img = work.path().join("root.ext4");
    let root_len = layout.get("root_a").len;
    ext4::build(
        &root,
        &root_img,
        &Ext4Params {
            name: "root_a",
            label: "root",
            size: root_len,
            uuid: ids.fs_uuid("root_a"),
            hash_seed: ids.hash_seed("root_a"),
            epoch,
            journal: false,
        },
        progress,
    )
    .map_err(|e| recipe.err("partitions.root_a", format!("{e:#}")))?;
    let data_img = work.path().join("data.ext4");
    let empty = Tree::new(&work.path().join("staging/data"))?;
    let data = layout.get("data");
    ext4::build(
        &empty,
        &data_img,
        &Ext4Params {
            name: "data",
            label: "data",
            size: data.len,
            uuid: ids.fs_uuid("data"),
            hash_seed: ids.hash_seed("data"),
            epoch,
            journal: true,
        },
        progress,
    )
    .map_err(|e| recipe.err("partitions.data", format!("{e:#}")))?;
    let step = progress.bar(3, "copying filesystems");
    let root_file = File::open(&root_img)?;
    for label in ["root_a", "root_b"] {
        output::copy_sparse(&root_file, &img, layout.get(label).start)?;
        step.inc(1);
    }
    output::copy_sparse(&File::open(&data_img)?, &img, data.start)?;
    step.inc(1);
    step.finish();
    img.sync_all()?;

    // 5. Outputs.
    let step = progress.bar(layout.parts.len() as u64, "hashing partitions");
    let hashes: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = layout
            .parts
            .iter()
            // root_b is a copy of root_a's filesystem image, byte for byte: hash it once.
            .filter(|p| p.role.label != "root_b")
            .map(|p| {
                let (img, step) = (&img, &step);
                scope.spawn(move || {
                    let h = output::sha256_range(img, p.start, p.len);
                    step.inc(1);
                    h
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("hashing thread")).collect::<Result<_>>()
    })?;
    let mut parts = Vec::new();
    let mut next = hashes.into_iter();
    let mut root_a_hash = String::new();
    for p in &layout.parts {
        let sha256 = if p.role.label == "root_b" {
            root_a_hash.clone()
        } else {
            next.next().expect("one hash per partition")
        };
        if p.role.label == "root_a" {
            root_a_hash = sha256.clone();
        }
        parts.push(ManifestPartition {
            number: p.role.number,
            label: p.role.label,
            start: p.start,
            size: p.len,
            partuuid: ids.partuuid(p.role.label).hyphenated().to_string(),
            sha256,
        });
    }
    step.finish();
    drop(img);

    let zst_tmp = work.path().join(format!("{stem}.img.zst"));
    output::compress_zstd(&img_tmp, &zst_tmp, opts.zstd_level, progress)?;
    let bmap_tmp = work.path().join(format!("{stem}.bmap"));
    let mapped_bytes = output::write_bmap(&img_tmp, &bmap_tmp)?;
    let manifest_tmp = work.path().join(format!("{stem}.manifest.json"));
    let manifest = Manifest {
        name: &recipe.name,
        version: recipe.version.to_string(),
        compatible: &recipe.compatible,
        security_epoch: recipe.security_epoch,
        source_date_epoch: epoch,
        recipe_sha256: output::sha256_file(&recipe.file)?,
        packages: &packages,
        root_files: root.len(),
        root_content_bytes: root.content_bytes(),
        partitions: parts,
    };
    std::fs::write(&manifest_tmp, serde_json::to_string_pretty(&manifest)? + "\n")?;

    // The OS bundle: the slot-independent boot filesystem and the root filesystem image.
    let bundle_tmp = work.path().join(format!("{stem}.mfb"));
    let bundle = match &recipe.signing_key {
        _ if opts.no_bundle => None,
        None => {
            progress.line("no signing_key in the recipe: no bundle written");
            None
        }
        Some(key_path) => {
            if !key_path.exists() {
                bail!(recipe.err(
                    "signing_key",
                    format!(
                        "{} does not exist; make a key with `imager keygen --dir DIR --name NAME`",
                        key_path.display()
                    )
                ));
            }
            let key = crate::keys::load_signing_key(key_path)
                .map_err(|e| recipe.err("signing_key", format!("{e:#}")))?;
            let meta = crate::bundle::BundleMeta {
                compatible: recipe.compatible.clone(),
                version: recipe.version.clone(),
                security_epoch: recipe.security_epoch,
                created: epoch,
                zstd_level: updater::bundle::DEFAULT_ZSTD_LEVEL,
            };
            let images = [
                crate::bundle::ImageSource::file(updater::bundle::SlotClass::Boot, &boot_fat)?,
                crate::bundle::ImageSource::file(updater::bundle::SlotClass::Root, &root_img)?,
            ];
            crate::bundle::write_bundle(&bundle_tmp, &meta, &images, &key, progress)?;
            Some(bundle_tmp)
        }
    };

    // 6. Into place.
    let mut moved = Vec::new();
    for tmp in [&img_tmp, &zst_tmp, &bmap_tmp, &manifest_tmp].into_iter().chain(bundle.as_ref()) {
        let dst = opts.output.join(tmp.file_name().expect("named"));
        std::fs::rename(tmp, &dst)
            .with_context(|| format!("moving {} into place", dst.display()))?;
        moved.push(dst);
    }
    let image = moved[0].clone();
    Ok(BuildReport {
        name: recipe.name.clone(),
        version: recipe.version.to_string(),
        image_size: layout.disk_size,
        mapped_bytes,
        zst_size: std::fs::metadata(&moved[1])?.len(),
        zst: moved[1].clone(),
        bmap: moved[2].clone(),
        manifest: moved[3].clone(),
        image,
        bundle: moved.get(4).cloned(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// `/etc/os-release` for a release.
fn os_release(r: &Release) -> String {
    format!(
        "NAME=\"Metrica Fleet OS\"\nID=metrica\nVERSION_ID={v}\nVERSION=\"{v}\"\nPRETTY_NAME=\"Metrica Fleet OS {v} ({name})\"\nVARIANT_ID={name}\n",
        v = r.version,
        name = r.name
    )
}

/// Unpacks a tarball (`.tar`, `.tar.gz`/`.tgz`, `.tar.zst`) into the tree.
fn add_tarball(tree: &mut Tree, path: &Path) -> Result<()> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let name = path.to_string_lossy();
    if name.ends_with(".tar.gz") || name.ends_with(".tgz") {
        tree.add_tar(flate2::read::GzDecoder::new(f), &[])?;
    } else if name.ends_with(".tar.zst") {
        tree.add_tar(zstd::stream::Decoder::new(f)?, &[])?;
    } else if name.ends_with(".tar") {
        tree.add_tar(f, &[])?;
    } else {
        bail!("{}: expected a .tar, .tar.gz, .tgz or .tar.zst file", path.display());
    }
    Ok(())
}
