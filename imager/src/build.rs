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
use crate::recipe::{Base, Initramfs as InitramfsRecipe, InitramfsSpec, Layer, Recipe, Source};
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
    /// Use only cached bootstraps and packages: no network.
    pub offline: bool,
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
    /// The recipe parts merged in by `include`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    recipe_includes: Vec<ManifestFile>,
    /// The bootstrapped base (`[base] type = "mmdebstrap"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    base_bootstrap: Option<&'a crate::bootstrap::Bootstrapped>,
}

#[derive(Debug, Serialize)]
struct ManifestFile {
    path: String,
    sha256: String,
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
                let path = self.root_path(key, path)?;
                let bytes = self.root.read(&path).map_err(|e| self.recipe.err(key, e))?;
                let real = self.root.resolve(&path).map_err(|e| self.recipe.err(key, e))?;
                let mode = self.root.get(&real).map_or(0o644, |n| n.mode);
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

impl Sources<'_> {
    /// The path a `root:` source names: itself, or the one path of the root tree its glob
    /// matches (zero or several matches are errors naming `key`).
    fn root_path(&self, key: &str, path: &str) -> Result<String> {
        if !crate::rootfs::is_glob(path) {
            return Ok(path.to_string());
        }
        let found = self.root.glob(path).map_err(|e| self.recipe.err(key, e))?;
        match found.as_slice() {
            [one] => Ok(one.to_string_lossy().into_owned()),
            [] => Err(self
                .recipe
                .err(key, format!("root:{path} matches nothing in the root filesystem"))),
            many => Err(self.recipe.err(
                key,
                format!(
                    "root:{path} matches {} paths, expected one: {}",
                    many.len(),
                    many.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
                ),
            )),
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
    let b = Build::start(opts, progress)?;
    let packages = packages::fetch(&b.recipe, opts.offline, progress)?;
    let (root, bootstrapped) = b.stage_root(&packages)?;
    let boot_files = b.boot_files(&packages, &root)?;
    let disk = b.create_disk()?;
    let boot_fat = b.write_fat_partitions(&disk, &boot_files)?;
    let root_img = b.write_ext4_partitions(&disk, &root)?;
    let partitions = b.hash_partitions(&disk)?;
    let disk_size = disk.layout.disk_size;
    let img_tmp = disk.close();
    let outputs = b.write_outputs(img_tmp, &packages, &root, partitions, bootstrapped.as_ref())?;
    let bundle = b.write_bundle(&boot_fat, &root_img)?;
    b.into_place(&outputs, bundle.as_ref(), disk_size, started)
}

/// One build in progress: the checked recipe, its timestamp, and the work folder inside the
/// output folder where every file is written before it is moved into place.
struct Build<'a> {
    opts: &'a BuildOptions,
    progress: &'a Progress,
    recipe: Recipe,
    /// `SOURCE_DATE_EPOCH`: the time of every file.
    epoch: u64,
    /// `<name>-<version>`, the stem of every output file.
    stem: String,
    work: tempfile::TempDir,
}

/// The disk image being written, with its layout and identifiers.
struct Disk {
    ids: Ids,
    layout: Layout,
    path: PathBuf,
    file: File,
}

impl Disk {
    /// Closes the image file; its path stays.
    fn close(self) -> PathBuf {
        self.path
    }

    fn region(&self, label: &str) -> Region<'_> {
        let p = self.layout.get(label);
        Region { file: &self.file, start: p.start, len: p.len }
    }
}

/// Which ext4 filesystem to make: its partition, label, and whether it has a journal.
#[derive(Debug, Clone, Copy)]
struct Ext4Fs {
    name: &'static str,
    label: &'static str,
    journal: bool,
}

/// The files written beside the image, still in the work folder.
struct Outputs {
    img: PathBuf,
    zst: PathBuf,
    bmap: PathBuf,
    manifest: PathBuf,
    mapped_bytes: u64,
}

impl<'a> Build<'a> {
    /// Loads the recipe (with the version override), settles the timestamp and makes the
    /// work folder.
    fn start(opts: &'a BuildOptions, progress: &'a Progress) -> Result<Build<'a>> {
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
        Ok(Build { opts, progress, recipe, epoch, stem, work })
    }

    fn work(&self, name: &str) -> PathBuf {
        self.work.path().join(name)
    }

    /// The root tree: the base, every layer in order, then the release files; and the
    /// bootstrap the base came from, if it was one.
    fn stage_root(
        &self,
        packages: &[Package],
    ) -> Result<(Tree, Option<crate::bootstrap::Bootstrapped>)> {
        let recipe = &self.recipe;
        let step = self.progress.bar(recipe.layers.len() as u64 + 1, "assembling root");
        let mut root = Tree::new(&self.work("staging/root"))?;
        let mut bootstrapped = None;
        match &recipe.base {
            Base::Empty => {}
            Base::Tarball(path) => {
                add_tarball(&mut root, path)
                    .map_err(|e| recipe.err("base.path", format!("{e:#}")))?;
            }
            Base::Mmdebstrap(spec) => {
                let made = crate::bootstrap::tarball(
                    recipe,
                    spec,
                    self.opts.offline,
                    self.opts.epoch,
                    self.progress,
                )?;
                add_tarball(&mut root, &made.tar)
                    .map_err(|e| recipe.err("base", format!("{e:#}")))?;
                bootstrapped = Some(made);
            }
        }
        step.inc(1);
        for (i, layer) in recipe.layers.iter().enumerate() {
            self.add_layer(&mut root, i, layer, packages)?;
            step.inc(1);
        }
        crate::role::bake(recipe, &mut root, self.progress)?;
        let release = Release {
            name: recipe.name.clone(),
            version: recipe.version.clone(),
            compatible: recipe.compatible.clone(),
            build_epoch: self.epoch,
            security_epoch: recipe.security_epoch,
        };
        root.add_bytes(RELEASE_PATH, release.to_toml().as_bytes(), 0o644, 0, 0)?;
        root.add_bytes("/etc/os-release", os_release(&release).as_bytes(), 0o644, 0, 0)?;
        step.finish();
        Ok((root, bootstrapped))
    }

    /// Adds layer `i` of the recipe to the root tree.
    fn add_layer(
        &self,
        root: &mut Tree,
        i: usize,
        layer: &Layer,
        packages: &[Package],
    ) -> Result<()> {
        let recipe = &self.recipe;
        let key = |field: &str| format!("layers[{i}].{field}");
        match layer {
            Layer::Deb { package, paths } => {
                let only: Vec<PathBuf> =
                    paths.iter().map(|p| crate::rootfs::image_path(p)).collect::<Result<_>>()?;
                let n = packages::unpack(&deb_path(packages, package), root, &|p| {
                    only.is_empty() || only.iter().any(|o| p.starts_with(o) || o.starts_with(p))
                })?;
                if n == 0 {
                    bail!(recipe
                        .err(&key("paths"), format!("none of {paths:?} is in package {package}")));
                }
            }
            Layer::Tarball { path } => {
                add_tarball(root, path).map_err(|e| recipe.err(&key("path"), format!("{e:#}")))?;
            }
            Layer::Overlay { path, .. } => {
                root.add_overlay(path).map_err(|e| recipe.err(&key("name"), format!("{e:#}")))?;
            }
            Layer::File { source, path, mode, uid, gid } => match source {
                Source::Host(host) => root.add_host_file(path, host, *mode, *uid, *gid)?,
                other => {
                    // The recipe refuses deb: sources here, so this reads root:/path.
                    let sources = Sources { recipe, root, debs: BTreeMap::new() };
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
            Layer::Remove { paths } => {
                for pattern in paths {
                    if root.remove_glob(pattern)? == 0 {
                        bail!(recipe.err(
                            &key("paths"),
                            format!("{pattern} matches nothing in the layers before it")
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// The files of the boot partition (but `cmdline.txt`): kernel, `config.txt`, DTBs, further
    /// files and the initramfs, by name.
    fn boot_files(&self, packages: &[Package], root: &Tree) -> Result<Vec<(String, Vec<u8>)>> {
        let boot = &self.recipe.boot;
        let sources =
            Sources { recipe: &self.recipe, root, debs: self.unpack_boot_debs(packages)? };
        let mut files: Vec<(String, Vec<u8>)> = Vec::new();
        files.push((KERNEL_NAME.into(), sources.read("boot.kernel", &boot.kernel)?.0));
        files.push(("config.txt".into(), sources.read("boot.config_txt", &boot.config_txt)?.0));
        for (i, dtb) in boot.dtbs.iter().enumerate() {
            let key = format!("boot.dtbs[{i}]");
            let name = match dtb {
                Source::Host(p) => p.file_name().map(|n| n.to_string_lossy().into_owned()),
                Source::Deb { path, .. } => path.rsplit('/').next().map(str::to_string),
                Source::Root(path) => {
                    sources.root_path(&key, path)?.rsplit('/').next().map(str::to_string)
                }
            }
            .unwrap_or_default();
            files.push((name, sources.read(&key, dtb)?.0));
        }
        for (name, src) in &boot.files {
            files.push((name.clone(), sources.read(&format!("boot.files.{name}"), src)?.0));
        }
        match &boot.initramfs {
            None => {}
            Some(InitramfsRecipe::Prebuilt(src)) => {
                files.push((INITRAMFS_NAME.into(), sources.read("boot.initramfs", src)?.0));
            }
            Some(InitramfsRecipe::Build(spec)) => {
                files.push((INITRAMFS_NAME.into(), self.build_initramfs(&sources, spec)?));
            }
        }
        Ok(files)
    }

    /// Unpacks the files the boot partition takes from packages (and the initramfs modules),
    /// one tree per package.
    fn unpack_boot_debs(&self, packages: &[Package]) -> Result<BTreeMap<String, Tree>> {
        let mut debs = BTreeMap::new();
        for (package, paths) in deb_requests(&self.recipe) {
            let mut tree = Tree::new(&self.work.path().join("staging").join(&package))?;
            let modules: BTreeSet<String> = match &self.recipe.boot.initramfs {
                Some(InitramfsRecipe::Build(s))
                    if s.modules_package.as_deref() == Some(&package) =>
                {
                    s.modules
                        .iter()
                        .flat_map(|m| MODULE_SUFFIXES.map(|x| format!("{m}{x}").replace('-', "_")))
                        .collect()
                }
                _ => BTreeSet::new(),
            };
            packages::unpack(&deb_path(packages, &package), &mut tree, &|p| {
                paths.iter().any(|w| w == p || w.starts_with(p))
                    || (p.starts_with("/lib/modules") || p.starts_with("/usr/lib/modules"))
                        && p.file_name().is_some_and(|n| {
                            modules.contains(&n.to_string_lossy().replace('-', "_"))
                        })
            })?;
            debs.insert(package, tree);
        }
        Ok(debs)
    }

    /// The initramfs the recipe describes: `/init`, its files and the kernel modules.
    fn build_initramfs(&self, sources: &Sources<'_>, spec: &InitramfsSpec) -> Result<Vec<u8>> {
        let mut ir = Initramfs::new();
        ir.add_file("/init", 0o755, sources.read("boot.initramfs.init", &spec.init)?.0)?;
        for (path, src) in &spec.files {
            let (bytes, mode) = sources.read(&format!("boot.initramfs.files.\"{path}\""), src)?;
            ir.add_file(path, mode, bytes)?;
        }
        if !spec.modules.is_empty() {
            let (tree, from) = match &spec.modules_package {
                Some(pkg) => (&sources.debs[pkg], format!("package {pkg}")),
                None => (sources.root, "the root filesystem".to_string()),
            };
            let mut modules = Vec::new();
            for m in &spec.modules {
                let path = find_module(tree, m).ok_or_else(|| {
                    self.recipe
                        .err("boot.initramfs.modules", format!("module {m} is not in {from}"))
                })?;
                let bytes = module_bytes(&path, tree.read(&path)?).map_err(|e| {
                    self.recipe.err("boot.initramfs.modules", format!("{path}: {e:#}"))
                })?;
                modules.push((m.clone(), bytes));
            }
            ir.add_modules(&modules)?;
        }
        let mut bytes = Vec::new();
        ir.write(&mut bytes, self.epoch)?;
        Ok(bytes)
    }

    /// The image file, at its full size, with its GPT.
    fn create_disk(&self) -> Result<Disk> {
        let ids = Ids::new(&self.recipe.name, &self.recipe.version);
        let layout = Layout::new(&self.recipe.partitions);
        let path = self.work(&format!("{}.img", self.stem));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        file.set_len(layout.disk_size)?;
        write_gpt(&file, &layout, &ids)?;
        Ok(Disk { ids, layout, path, file })
    }

    /// The FAT partitions: config (autoboot.txt), both boot partitions, and an empty
    /// provision partition. Returns the boot filesystem image (for the bundle).
    fn write_fat_partitions(
        &self,
        disk: &Disk,
        boot_files: &[(String, Vec<u8>)],
    ) -> Result<PathBuf> {
        let recipe = &self.recipe;
        let ids = &disk.ids;
        let step = self.progress.bar(4, "writing FAT partitions");
        fat::format(disk.region("config"), "config", ids.volume_id("config"))
            .and_then(|()| {
                fat::write_files(
                    disk.region("config"),
                    "config",
                    &[("autoboot.txt".into(), Autoboot::committed(Slot::A).render())],
                )
            })
            .map_err(|e| recipe.err("partitions.config", format!("{e:#}")))?;
        step.inc(1);
        let boot_fat = self.write_boot_fat(disk, boot_files)?;
        let boot_file = File::open(&boot_fat)?;
        for slot in Slot::ALL {
            let label = slot.boot().label;
            output::copy_sparse(&boot_file, &disk.file, disk.layout.get(label).start)?;
            let cmdline =
                updater::cmdline::with_root(&recipe.boot.cmdline, &ids.partuuid(slot.root().label));
            fat::write_files(
                disk.region(label),
                label,
                &[("cmdline.txt".into(), cmdline.into_bytes())],
            )
            .map_err(|e| recipe.err(&format!("partitions.{label}"), format!("{e:#}")))?;
            step.inc(1);
        }
        fat::format(disk.region("provision"), "provision", ids.volume_id("provision"))
            .map_err(|e| recipe.err("partitions.provision", format!("{e:#}")))?;
        step.inc(1);
        step.finish();
        Ok(boot_fat)
    }

    /// The boot filesystem is slot-independent (bundles carry one boot image for either slot):
    /// it is written once, copied into both boot partitions, and only cmdline.txt then differs.
    fn write_boot_fat(&self, disk: &Disk, boot_files: &[(String, Vec<u8>)]) -> Result<PathBuf> {
        let boot_fat = self.work("boot.fat");
        let f =
            std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&boot_fat)?;
        let len = disk.layout.get("boot_a").len;
        f.set_len(len)?;
        let whole = Region { file: &f, start: 0, len };
        let mut files = boot_files.to_vec();
        let root_a = disk.ids.partuuid("root_a");
        files.push((
            "cmdline.txt".into(),
            updater::cmdline::with_root(&self.recipe.boot.cmdline, &root_a).into_bytes(),
        ));
        fat::format(whole, "boot", disk.ids.volume_id("boot_a"))
            .and_then(|()| fat::write_files(whole, "boot_a", &files))
            .map_err(|e| self.recipe.err("partitions.boot_a", format!("{e:#}")))?;
        Ok(boot_fat)
    }

    /// The ext4 partitions: the root filesystem into both root slots, an empty data
    /// filesystem. Returns the root filesystem image (for the bundle).
    fn write_ext4_partitions(&self, disk: &Disk, root: &Tree) -> Result<PathBuf> {
        let root_img = self.work("root.ext4");
        let fs = Ext4Fs { name: "root_a", label: "root", journal: false };
        self.make_ext4(disk, root, &root_img, fs)?;
        let data_img = self.work("data.ext4");
        let empty = Tree::new(&self.work("staging/data"))?;
        let fs = Ext4Fs { name: "data", label: "data", journal: true };
        self.make_ext4(disk, &empty, &data_img, fs)?;
        let step = self.progress.bar(3, "copying filesystems");
        let root_file = File::open(&root_img)?;
        for label in ["root_a", "root_b"] {
            output::copy_sparse(&root_file, &disk.file, disk.layout.get(label).start)?;
            step.inc(1);
        }
        output::copy_sparse(&File::open(&data_img)?, &disk.file, disk.layout.get("data").start)?;
        step.inc(1);
        step.finish();
        disk.file.sync_all()?;
        Ok(root_img)
    }

    /// One ext4 filesystem image of `tree`, the size of partition `name`.
    fn make_ext4(&self, disk: &Disk, tree: &Tree, out: &Path, fs: Ext4Fs) -> Result<()> {
        let params = Ext4Params {
            name: fs.name,
            label: fs.label,
            size: disk.layout.get(fs.name).len,
            uuid: disk.ids.fs_uuid(fs.name),
            hash_seed: disk.ids.hash_seed(fs.name),
            epoch: self.epoch,
            journal: fs.journal,
        };
        ext4::build(tree, out, &params, self.progress)
            .map_err(|e| self.recipe.err(&format!("partitions.{}", fs.name), format!("{e:#}")))
    }

    /// The manifest's partitions, each with the sha256 of its bytes (hashed in parallel).
    fn hash_partitions(&self, disk: &Disk) -> Result<Vec<ManifestPartition>> {
        let layout = &disk.layout;
        let step = self.progress.bar(layout.parts.len() as u64, "hashing partitions");
        let hashes: Vec<String> = std::thread::scope(|scope| {
            let handles: Vec<_> = layout
                .parts
                .iter()
                // root_b is a copy of root_a's filesystem image, byte for byte: hash it once.
                .filter(|p| p.role.label != "root_b")
                .map(|p| {
                    let (img, step) = (&disk.file, &step);
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
                partuuid: disk.ids.partuuid(p.role.label).hyphenated().to_string(),
                sha256,
            });
        }
        step.finish();
        Ok(parts)
    }

    /// The `.img.zst`, `.bmap` and manifest beside the image.
    fn write_outputs(
        &self,
        img: PathBuf,
        packages: &[Package],
        root: &Tree,
        partitions: Vec<ManifestPartition>,
        bootstrapped: Option<&crate::bootstrap::Bootstrapped>,
    ) -> Result<Outputs> {
        let recipe = &self.recipe;
        let zst = self.work(&format!("{}.img.zst", self.stem));
        output::compress_zstd(&img, &zst, self.opts.zstd_level, self.progress)?;
        let bmap = self.work(&format!("{}.bmap", self.stem));
        let mapped_bytes = output::write_bmap(&img, &bmap)?;
        let manifest_path = self.work(&format!("{}.manifest.json", self.stem));
        let manifest = Manifest {
            name: &recipe.name,
            version: recipe.version.to_string(),
            compatible: &recipe.compatible,
            security_epoch: recipe.security_epoch,
            source_date_epoch: self.epoch,
            recipe_sha256: output::sha256_file(&recipe.file)?,
            packages,
            root_files: root.len(),
            root_content_bytes: root.content_bytes(),
            partitions,
            recipe_includes: recipe
                .includes
                .iter()
                .map(|p| {
                    let sha256 = output::sha256_file(p)?;
                    // Relative to the recipe, as the recipe names it: the same in any folder.
                    let path = p.strip_prefix(&recipe.dir).unwrap_or(p).display().to_string();
                    Ok(ManifestFile { path, sha256 })
                })
                .collect::<Result<_>>()?,
            base_bootstrap: bootstrapped,
        };
        std::fs::write(&manifest_path, serde_json::to_string_pretty(&manifest)? + "\n")?;
        Ok(Outputs { img, zst, bmap, manifest: manifest_path, mapped_bytes })
    }

    /// The OS bundle: the slot-independent boot filesystem and the root filesystem image.
    /// None with --no-bundle or without a signing key in the recipe.
    fn write_bundle(&self, boot_fat: &Path, root_img: &Path) -> Result<Option<PathBuf>> {
        let recipe = &self.recipe;
        let key_path = match &recipe.signing_key {
            _ if self.opts.no_bundle => return Ok(None),
            None => {
                self.progress.line("no signing_key in the recipe: no bundle written");
                return Ok(None);
            }
            Some(key_path) => key_path,
        };
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
            created: self.epoch,
            zstd_level: updater::bundle::DEFAULT_ZSTD_LEVEL,
        };
        let images = [
            crate::bundle::ImageSource::file(updater::bundle::SlotClass::Boot, boot_fat)?,
            crate::bundle::ImageSource::file(updater::bundle::SlotClass::Root, root_img)?,
        ];
        let bundle = self.work(&format!("{}.mfb", self.stem));
        crate::bundle::write_bundle(&bundle, &meta, &images, &key, self.progress)?;
        Ok(Some(bundle))
    }

    /// Moves every output from the work folder into the output folder; the report.
    fn into_place(
        self,
        outputs: &Outputs,
        bundle: Option<&PathBuf>,
        image_size: u64,
        started: Instant,
    ) -> Result<BuildReport> {
        let into_place = |tmp: &PathBuf| -> Result<PathBuf> {
            let dst = self.opts.output.join(tmp.file_name().expect("named"));
            std::fs::rename(tmp, &dst)
                .with_context(|| format!("moving {} into place", dst.display()))?;
            Ok(dst)
        };
        let image = into_place(&outputs.img)?;
        let zst = into_place(&outputs.zst)?;
        let bmap = into_place(&outputs.bmap)?;
        let manifest = into_place(&outputs.manifest)?;
        let bundle = bundle.map(into_place).transpose()?;
        Ok(BuildReport {
            name: self.recipe.name.clone(),
            version: self.recipe.version.to_string(),
            image_size,
            mapped_bytes: outputs.mapped_bytes,
            zst_size: std::fs::metadata(&zst)?.len(),
            zst,
            bmap,
            manifest,
            image,
            bundle,
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}

/// The `.deb` file of a pinned package.
fn deb_path(packages: &[Package], name: &str) -> PathBuf {
    packages.iter().find(|p| p.name == name).map(|p| p.path.clone()).expect("pinned")
}

/// The file suffixes of a kernel module: plain, or compressed as Debian's kernels since 6.x
/// ship them (`.ko.xz`), or with zstd.
const MODULE_SUFFIXES: [&str; 3] = [".ko", ".ko.xz", ".ko.zst"];

/// The path of kernel module `name` (`name.ko`, `name.ko.xz` or `name.ko.zst`) under a
/// `modules` folder of a tree (an unpacked package, or the root filesystem). `-` and `_` are
/// the same in module names, as for modprobe.
fn find_module(tree: &Tree, name: &str) -> Option<String> {
    let norm = |s: &str| s.replace('-', "_");
    let want: Vec<String> = MODULE_SUFFIXES.iter().map(|x| norm(&format!("{name}{x}"))).collect();
    tree.iter()
        .find(|(p, n)| {
            matches!(n.kind, Kind::File { .. })
                && p.components().any(|c| c.as_os_str() == "modules")
                && p.file_name().is_some_and(|f| want.contains(&norm(&f.to_string_lossy())))
        })
        .map(|(p, _)| p.to_string_lossy().into_owned())
}

/// A module's bytes as busybox `insmod` in the initramfs loads them: decompressed.
fn module_bytes(path: &str, bytes: Vec<u8>) -> Result<Vec<u8>> {
    if path.ends_with(".ko.xz") {
        let mut out = Vec::new();
        lzma_rs::xz_decompress(&mut &bytes[..], &mut out)
            .map_err(|e| anyhow::anyhow!("not a valid xz stream: {e}"))?;
        Ok(out)
    } else if path.ends_with(".ko.zst") {
        zstd::stream::decode_all(&bytes[..]).context("not a valid zstd stream")
    } else {
        Ok(bytes)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn tree_with(dir: &Path, files: &[(&str, &[u8])]) -> Tree {
        let mut tree = Tree::new(dir).unwrap();
        for (path, bytes) in files {
            tree.add_bytes(path, bytes, 0o644, 0, 0).unwrap();
        }
        tree
    }

    #[test]
    fn modules_are_found_compressed_or_not_with_dashes_or_underscores() {
        let dir = tempfile::tempdir().unwrap();
        let tree = tree_with(
            dir.path(),
            &[
                ("/usr/lib/modules/6.12.1-arm64/kernel/drivers/mmc/host/sdhci-iproc.ko.xz", b"x"),
                ("/usr/lib/modules/6.12.1-arm64/kernel/fs/ext4/ext4.ko", b"e"),
                ("/usr/share/doc/vfat.ko", b"not a module folder"),
            ],
        );
        assert_eq!(
            find_module(&tree, "sdhci_iproc").as_deref(),
            Some("/usr/lib/modules/6.12.1-arm64/kernel/drivers/mmc/host/sdhci-iproc.ko.xz")
        );
        assert_eq!(
            find_module(&tree, "ext4").as_deref(),
            Some("/usr/lib/modules/6.12.1-arm64/kernel/fs/ext4/ext4.ko")
        );
        assert_eq!(find_module(&tree, "vfat"), None);
    }

    #[test]
    fn compressed_modules_are_decompressed_and_bad_streams_named() {
        let module = b"\x7fELF a kernel module".repeat(100);
        let mut xz = Vec::new();
        lzma_rs::xz_compress(&mut &module[..], &mut xz).unwrap();
        assert_eq!(module_bytes("/m/a.ko.xz", xz.clone()).unwrap(), module);
        let zst = zstd::stream::encode_all(&module[..], 3).unwrap();
        assert_eq!(module_bytes("/m/a.ko.zst", zst).unwrap(), module);
        assert_eq!(module_bytes("/m/a.ko", module.clone()).unwrap(), module);
        let e = module_bytes("/m/a.ko.xz", xz[..xz.len() / 2].to_vec()).unwrap_err();
        assert!(format!("{e:#}").contains("not a valid xz stream"), "{e:#}");
    }
}
