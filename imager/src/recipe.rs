//! Recipes: the strict TOML files in `recipes/` that say what goes into an image.
//!
//! Parsing is strict (unknown keys are errors) and every error names the recipe file, the key
//! and what was expected. Relative paths in a recipe are relative to the recipe's folder.
//! The format is documented in docs/recipes.md.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

mod include;

/// A parsed and checked recipe.
#[derive(Debug, Clone)]
pub struct Recipe {
    /// The recipe file, for error messages.
    pub file: PathBuf,
    /// The folder relative paths are resolved against.
    pub dir: PathBuf,
    pub name: String,
    pub version: semver::Version,
    pub compatible: String,
    pub security_epoch: u64,
    pub signing_key: Option<PathBuf>,
    pub partitions: Partitions,
    pub base: Base,
    pub debian: Option<Debian>,
    pub layers: Vec<Layer>,
    pub boot: Boot,
    /// `[roles] bundles`: signed role bundles (.mfr) baked into the root filesystem.
    pub role_bundles: Vec<PathBuf>,
    /// The recipe parts merged in by `include`, in order.
    pub includes: Vec<PathBuf>,
}

/// Partition sizes in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partitions {
    pub config: u64,
    pub boot: u64,
    pub root: u64,
    pub provision: u64,
    pub data: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Base {
    /// Start from an empty tree.
    Empty,
    /// Start from a root filesystem tarball (owners and modes from the tarball).
    Tarball(PathBuf),
    /// Start from a Debian root that mmdebstrap bootstraps (cached by its inputs).
    Mmdebstrap(Box<Bootstrap>),
}

/// `[base] type = "mmdebstrap"`: what to bootstrap. Every field changes the result, so every
/// field is in the cache key (see [`crate::bootstrap`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bootstrap {
    pub suite: String,
    pub architecture: String,
    pub components: Vec<String>,
    pub variant: String,
    /// Sorted and without duplicates.
    pub packages: Vec<String>,
    /// None: mmdebstrap's own default mirror.
    pub mirror: Option<String>,
    /// The folder of cached bootstrap tarballs.
    pub cache: PathBuf,
    /// dpkg `path-exclude` globs (files dpkg does not unpack).
    pub dpkg_exclude: Vec<String>,
    /// dpkg `path-include` globs: exceptions to the excludes.
    pub dpkg_include: Vec<String>,
    /// `SOURCE_DATE_EPOCH` of the bootstrap, fixed by the recipe so that builds with other
    /// epochs share one cached bootstrap; None: the build's epoch when it was given.
    pub source_date_epoch: Option<u64>,
}

/// The variants mmdebstrap knows.
pub const VARIANTS: &[&str] = &[
    "extract",
    "custom",
    "essential",
    "apt",
    "required",
    "minbase",
    "buildd",
    "important",
    "debootstrap",
    "standard",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Debian {
    pub architecture: String,
    /// Where downloaded `.deb` files are kept, so builds work offline once cached.
    pub cache: PathBuf,
    /// Pinned packages by name.
    pub packages: BTreeMap<String, String>,
}

/// Where a file comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A file on the build host.
    Host(PathBuf),
    /// A file inside a pinned Debian package: `deb:PACKAGE:/path`.
    Deb { package: String, path: String },
    /// A file of the assembled root filesystem: `root:/path`.
    Root(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layer {
    /// Unpack a pinned Debian package, optionally only some of its paths.
    Deb { package: String, paths: Vec<String> },
    /// Unpack a tarball with its owners and modes.
    Tarball { path: PathBuf },
    /// Copy `overlays/<name>`: files owned by root, mode 0755 if executable else 0644.
    Overlay { name: String, path: PathBuf },
    /// One file with an explicit mode and owner.
    File { source: Source, path: String, mode: u32, uid: u32, gid: u32 },
    /// A symbolic link.
    Symlink { path: String, target: String },
    /// Many symbolic links in one folder to one target (e.g. busybox applets).
    Symlinks { dir: String, target: String, names: Vec<String> },
    /// An empty directory.
    Dir { path: String, mode: u32, uid: u32, gid: u32 },
    /// Removes what earlier layers put in (globs with `*` and `?`), with everything under a
    /// removed folder: e.g. the SSH host keys a package made at build time, which must be per
    /// device. Each pattern must match something, so a stale one is an error.
    Remove { paths: Vec<String> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Boot {
    pub kernel: Source,
    pub config_txt: Source,
    /// `cmdline.txt` without `root=`; the imager adds each slot's `root=PARTUUID=`.
    pub cmdline: String,
    pub dtbs: Vec<Source>,
    /// Further files copied to each boot partition: name -> source.
    pub files: BTreeMap<String, Source>,
    pub initramfs: Option<Initramfs>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Initramfs {
    /// A prebuilt initramfs file.
    Prebuilt(Source),
    /// An initramfs the imager assembles.
    Build(InitramfsSpec),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitramfsSpec {
    /// The `/init` script.
    pub init: Source,
    /// Files copied in: path in the initramfs -> source. Executable when `mode` says so.
    pub files: BTreeMap<String, Source>,
    /// Package that holds the kernel modules (`lib/modules/<version>/...`); without one, the
    /// modules come from the root filesystem (`/usr/lib/modules/<version>/...`).
    pub modules_package: Option<String>,
    /// Module names, in load order.
    pub modules: Vec<String>,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Host(p) => write!(f, "{}", p.display()),
            Source::Deb { package, path } => write!(f, "deb:{package}:{path}"),
            Source::Root(p) => write!(f, "root:{p}"),
        }
    }
}

// ----- the TOML shapes -----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecipe {
    name: String,
    version: String,
    compatible: String,
    #[serde(default)]
    security_epoch: u64,
    signing_key: Option<String>,
    partitions: RawPartitions,
    #[serde(default)]
    base: Option<RawBase>,
    debian: Option<RawDebian>,
    #[serde(default)]
    layers: Vec<RawLayer>,
    boot: RawBoot,
    #[serde(default)]
    roles: Option<RawRoles>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoles {
    #[serde(default)]
    bundles: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPartitions {
    config: String,
    boot_a: String,
    boot_b: String,
    root_a: String,
    root_b: String,
    provision: String,
    data: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, tag = "type", rename_all = "lowercase")]
enum RawBase {
    /// A struct variant, so that unknown keys beside it are refused too.
    Empty {},
    Tarball {
        path: String,
    },
    Mmdebstrap(Box<RawBootstrap>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBootstrap {
    suite: String,
    architecture: Option<String>,
    components: Option<Vec<String>>,
    variant: Option<String>,
    #[serde(default)]
    packages: Vec<String>,
    mirror: Option<String>,
    cache: Option<String>,
    #[serde(default)]
    dpkg_exclude: Vec<String>,
    #[serde(default)]
    dpkg_include: Vec<String>,
    source_date_epoch: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDebian {
    architecture: String,
    cache: String,
    packages: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, tag = "type", rename_all = "lowercase")]
enum RawLayer {
    Deb {
        package: String,
        #[serde(default)]
        paths: Vec<String>,
    },
    Tarball {
        path: String,
    },
    Overlay {
        name: String,
    },
    File {
        source: String,
        path: String,
        mode: String,
        #[serde(default)]
        owner: Option<String>,
    },
    Symlink {
        path: String,
        target: String,
    },
    Symlinks {
        dir: String,
        target: String,
        names: Vec<String>,
    },
    Dir {
        path: String,
        #[serde(default)]
        mode: Option<String>,
        #[serde(default)]
        owner: Option<String>,
    },
    Remove {
        paths: Vec<String>,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBoot {
    kernel: String,
    config_txt: String,
    cmdline: String,
    #[serde(default)]
    dtbs: Vec<String>,
    #[serde(default)]
    files: BTreeMap<String, String>,
    initramfs: Option<RawInitramfs>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawInitramfs {
    Prebuilt(String),
    Build(RawInitramfsSpec),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInitramfsSpec {
    init: String,
    #[serde(default)]
    files: BTreeMap<String, String>,
    modules_package: Option<String>,
    #[serde(default)]
    modules: Vec<String>,
}

/// Context for checks: names the file in every error.
struct Checker<'a> {
    file: &'a Path,
    dir: &'a Path,
}

impl Checker<'_> {
    fn err(&self, key: &str, what: impl fmt::Display) -> anyhow::Error {
        anyhow::anyhow!("{}: {key}: {what}", self.file.display())
    }

    fn size(&self, key: &str, value: &str) -> Result<u64> {
        parse_size(value).map_err(|e| self.err(key, e))
    }

    fn host_path(&self, key: &str, value: &str) -> Result<PathBuf> {
        if value.is_empty() {
            return Err(self.err(key, "expected a path, found an empty string"));
        }
        Ok(self.dir.join(value))
    }

    fn existing(&self, key: &str, value: &str) -> Result<PathBuf> {
        let p = self.host_path(key, value)?;
        if !p.exists() {
            return Err(self.err(key, format!("{} does not exist", p.display())));
        }
        Ok(p)
    }

    fn image_path(&self, key: &str, value: &str) -> Result<String> {
        if !value.starts_with('/') {
            return Err(
                self.err(key, format!("expected an absolute path in the image, found {value:?}"))
            );
        }
        if value.split('/').any(|c| c == "..") {
            return Err(self.err(key, format!("{value:?} must not contain \"..\"")));
        }
        if value.chars().any(|c| c.is_control() || c == '"' || c == '\\') {
            return Err(
                self.err(key, format!("{value:?} contains a control character, '\"' or '\\'"))
            );
        }
        Ok(value.to_string())
    }

    fn source(&self, key: &str, value: &str, debian: Option<&Debian>) -> Result<Source> {
        if let Some(rest) = value.strip_prefix("deb:") {
            let (package, path) = rest.split_once(':').ok_or_else(|| {
                self.err(key, format!("expected deb:PACKAGE:/path, found {value:?}"))
            })?;
            self.pinned(key, package, debian)?;
            let path = self.image_path(key, path)?;
            Ok(Source::Deb { package: package.to_string(), path })
        } else if let Some(path) = value.strip_prefix("root:") {
            Ok(Source::Root(self.image_path(key, path)?))
        } else {
            Ok(Source::Host(self.existing(key, value)?))
        }
    }

    fn pinned(&self, key: &str, package: &str, debian: Option<&Debian>) -> Result<()> {
        match debian {
            None => Err(self.err(
                key,
                format!("package {package:?} used but the recipe has no [debian] table"),
            )),
            Some(d) if !d.packages.contains_key(package) => Err(self.err(
                key,
                format!(
                    "package {package:?} is not pinned in [debian.packages] (pinned: {})",
                    join_keys(&d.packages)
                ),
            )),
            Some(_) => Ok(()),
        }
    }

    fn mode(&self, key: &str, value: &str) -> Result<u32> {
        parse_mode(value).map_err(|e| self.err(key, e))
    }

    fn owner(&self, key: &str, value: Option<&str>) -> Result<(u32, u32)> {
        match value {
            None => Ok((0, 0)),
            Some(v) => parse_owner(v).map_err(|e| self.err(key, e)),
        }
    }
}

fn join_keys(map: &BTreeMap<String, String>) -> String {
    map.keys().cloned().collect::<Vec<_>>().join(", ")
}

/// Parses a size such as `16MiB`, `16M`, `2GiB`, `512KiB` or a number of bytes.
pub fn parse_size(value: &str) -> Result<u64, String> {
    let v = value.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: u64 =
        num.parse().map_err(|_| format!("expected a size like \"256MiB\", found {value:?}"))?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {value:?}: expected B, KiB, MiB or GiB"
            ))
        }
    };
    let bytes = n.checked_mul(mult).ok_or_else(|| format!("size {value:?} is too large"))?;
    if bytes == 0 || bytes % (1 << 20) != 0 {
        return Err(format!("expected a non-zero whole number of MiB, found {value:?}"));
    }
    Ok(bytes)
}

/// Parses an octal mode string such as `0755` or `4755`.
pub fn parse_mode(value: &str) -> Result<u32, String> {
    let expected = || format!("expected an octal mode like \"0755\", found {value:?}");
    if value.is_empty() || value.len() > 5 || !value.chars().all(|c| ('0'..='7').contains(&c)) {
        return Err(expected());
    }
    u32::from_str_radix(value, 8).map_err(|_| expected())
}

/// Parses `uid:gid` or `root` / `root:root` style owners (names limited to `root`).
pub fn parse_owner(value: &str) -> Result<(u32, u32), String> {
    let id = |s: &str| -> Result<u32, String> {
        match s {
            "root" => Ok(0),
            n => n.parse().map_err(|_| {
                format!(
                    "expected an owner like \"root\", \"0:0\" or \"1000:1000\", found {value:?}"
                )
            }),
        }
    };
    match value.split_once(':') {
        Some((u, g)) => Ok((id(u)?, id(g)?)),
        None => {
            let u = id(value)?;
            Ok((u, u))
        }
    }
}

impl Recipe {
    /// Reads and checks a recipe file.
    pub fn load(file: &Path) -> Result<Recipe> {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("reading recipe {}", file.display()))?;
        Recipe::parse(file, &text)
    }

    /// Parses and checks recipe text; `file` names it in errors and anchors relative paths.
    /// Sections are checked in file order, so the first error is the first bad key.
    pub fn parse(file: &Path, text: &str) -> Result<Recipe> {
        let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
        let dir = if dir.as_os_str().is_empty() { PathBuf::from(".") } else { dir };
        let (raw, includes) = include::raw(file, &dir, text)?;
        let c = Checker { file, dir: &dir };
        let version = c.identity(&raw.name, &raw.version, &raw.compatible)?;
        let partitions = c.partitions(&raw.partitions)?;
        let base = c.base(raw.base, raw.debian.as_ref().map(|d| d.architecture.as_str()))?;
        let debian = raw.debian.map(|d| c.debian(d)).transpose()?;
        let layers = raw
            .layers
            .into_iter()
            .enumerate()
            .map(|(i, layer)| c.layer(i, layer, debian.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        let boot = c.boot(raw.boot, debian.as_ref())?;
        let signing_key = raw.signing_key.map(|k| c.host_path("signing_key", &k)).transpose()?;
        let role_bundles = raw
            .roles
            .map_or_else(Vec::new, |r| r.bundles)
            .iter()
            .enumerate()
            .map(|(i, b)| c.existing(&format!("roles.bundles[{i}]"), b))
            .collect::<Result<Vec<_>>>()?;
        Ok(Recipe {
            file: file.to_path_buf(),
            dir: dir.clone(),
            name: raw.name,
            version,
            compatible: raw.compatible,
            security_epoch: raw.security_epoch,
            signing_key,
            partitions,
            base,
            debian,
            layers,
            boot,
            role_bundles,
            includes,
        })
    }

    /// Names an error about `key` of this recipe.
    pub fn err(&self, key: &str, what: impl fmt::Display) -> anyhow::Error {
        anyhow::anyhow!("{}: {key}: {what}", self.file.display())
    }

    /// `<name>-<version>`, the stem of every output file.
    pub fn stem(&self) -> String {
        format!("{}-{}", self.name, self.version)
    }
}

/// The checks of each recipe section: raw TOML shapes to checked values.
impl Checker<'_> {
    /// `name`, `version` and `compatible`; the parsed version.
    fn identity(&self, name: &str, version: &str, compatible: &str) -> Result<semver::Version> {
        if name.is_empty()
            || !name.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
        {
            bail!(self.err("name", format!("expected letters, digits, '-' or '_', found {name:?}")));
        }
        let version = semver::Version::parse(version).map_err(|e| {
            self.err("version", format!("expected a semantic version like \"1.2.3\": {e}"))
        })?;
        if compatible.is_empty() {
            bail!(self
                .err("compatible", "expected a non-empty string such as \"metrica-rpi4-arm64\""));
        }
        Ok(version)
    }

    /// `[partitions]`: sizes, the A and B slots of the same size.
    fn partitions(&self, p: &RawPartitions) -> Result<Partitions> {
        let (boot_a, boot_b) = (
            self.size("partitions.boot_a", &p.boot_a)?,
            self.size("partitions.boot_b", &p.boot_b)?,
        );
        let (root_a, root_b) = (
            self.size("partitions.root_a", &p.root_a)?,
            self.size("partitions.root_b", &p.root_b)?,
        );
        for (b_key, a_key, a, b) in [
            ("partitions.boot_b", "partitions.boot_a", boot_a, boot_b),
            ("partitions.root_b", "partitions.root_a", root_a, root_b),
        ] {
            if a != b {
                bail!(self.err(
                    b_key,
                    format!("expected the same size as {a_key} ({}), found {}", mib(a), mib(b))
                ));
            }
        }
        Ok(Partitions {
            config: self.size("partitions.config", &p.config)?,
            boot: boot_a,
            root: root_a,
            provision: self.size("partitions.provision", &p.provision)?,
            data: self.size("partitions.data", &p.data)?,
        })
    }

    /// `[base]`: empty unless a tarball or a bootstrap is named. `debian_arch` is the
    /// `[debian] architecture`, the default of a bootstrap's.
    fn base(&self, raw: Option<RawBase>, debian_arch: Option<&str>) -> Result<Base> {
        Ok(match raw {
            None | Some(RawBase::Empty {}) => Base::Empty,
            Some(RawBase::Tarball { path }) => Base::Tarball(self.existing("base.path", &path)?),
            Some(RawBase::Mmdebstrap(raw)) => {
                Base::Mmdebstrap(Box::new(self.bootstrap(*raw, debian_arch)?))
            }
        })
    }

    /// `[base] type = "mmdebstrap"`, with its defaults.
    fn bootstrap(&self, raw: RawBootstrap, debian_arch: Option<&str>) -> Result<Bootstrap> {
        let word = |key: &str, v: &str, what: &str| -> Result<String> {
            if v.is_empty() || !v.chars().all(|c| c.is_ascii_alphanumeric() || "+-.~_".contains(c))
            {
                bail!(self.err(key, format!("expected {what}, found {v:?}")));
            }
            Ok(v.to_string())
        };
        let suite = word("base.suite", &raw.suite, "a Debian suite such as \"trixie\"")?;
        let architecture = raw.architecture.as_deref().or(debian_arch).unwrap_or("arm64");
        let architecture =
            word("base.architecture", architecture, "a Debian architecture such as \"arm64\"")?;
        let components = raw.components.unwrap_or_else(|| vec!["main".into()]);
        if components.is_empty() {
            bail!(self.err("base.components", "expected at least one, such as [\"main\"]"));
        }
        for c in &components {
            word("base.components", c, "a component such as \"main\"")?;
        }
        let variant = raw.variant.unwrap_or_else(|| "apt".into());
        if !VARIANTS.contains(&variant.as_str()) {
            bail!(self.err(
                "base.variant",
                format!("expected one of {}, found {variant:?}", VARIANTS.join(", "))
            ));
        }
        let packages = self.bootstrap_packages(raw.packages)?;
        if let Some(m) = &raw.mirror {
            self.mirror(m)?;
        }
        let cache =
            self.host_path("base.cache", raw.cache.as_deref().unwrap_or("../cache/base"))?;
        for (key, globs) in
            [("base.dpkg_exclude", &raw.dpkg_exclude), ("base.dpkg_include", &raw.dpkg_include)]
        {
            if let Some(g) = globs.iter().find(|g| {
                !g.starts_with('/') || g.chars().any(|c| c.is_whitespace() || c.is_control())
            }) {
                bail!(self.err(
                    key,
                    format!(
                        "expected an absolute path glob such as \"/usr/share/man/*\", found {g:?}"
                    )
                ));
            }
        }
        Ok(Bootstrap {
            suite,
            architecture,
            components,
            variant,
            packages,
            mirror: raw.mirror,
            cache,
            dpkg_exclude: raw.dpkg_exclude,
            dpkg_include: raw.dpkg_include,
            source_date_epoch: raw.source_date_epoch,
        })
    }

    /// `base.packages`: Debian package names (optionally `NAME=VERSION` or `NAME:ARCH`),
    /// sorted and without duplicates.
    fn bootstrap_packages(&self, packages: Vec<String>) -> Result<Vec<String>> {
        for p in &packages {
            let ok = p.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
                && p.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.:=~".contains(c));
            if !ok {
                bail!(self.err(
                    "base.packages",
                    format!("expected a Debian package name such as \"systemd\", found {p:?}")
                ));
            }
        }
        let set: std::collections::BTreeSet<String> = packages.into_iter().collect();
        Ok(set.into_iter().collect())
    }

    /// `base.mirror`: an http, https or file URL.
    fn mirror(&self, m: &str) -> Result<()> {
        let scheme_ok = ["http://", "https://", "file://"].iter().any(|s| m.starts_with(s));
        if !scheme_ok || m.chars().any(|c| c.is_whitespace() || c.is_control()) {
            bail!(self.err(
                "base.mirror",
                format!("expected an http://, https:// or file:// URL, found {m:?}")
            ));
        }
        Ok(())
    }

    /// `[debian]`: an architecture, and every package pinned to a version.
    fn debian(&self, d: RawDebian) -> Result<Debian> {
        if d.architecture.is_empty() {
            bail!(
                self.err("debian.architecture", "expected a Debian architecture such as \"arm64\"")
            );
        }
        for (name, version) in &d.packages {
            if version.is_empty() || version == "*" {
                bail!(self.err(
                    &format!("debian.packages.{name}"),
                    "expected a pinned version such as \"1:1.35.0-4\", found none"
                ));
            }
        }
        Ok(Debian {
            architecture: d.architecture,
            cache: self.host_path("debian.cache", &d.cache)?,
            packages: d.packages,
        })
    }

    /// `[[layers]]` number `i`.
    fn layer(&self, i: usize, layer: RawLayer, debian: Option<&Debian>) -> Result<Layer> {
        let key = |field: &str| format!("layers[{i}].{field}");
        Ok(match layer {
            RawLayer::Deb { package, paths } => {
                self.pinned(&key("package"), &package, debian)?;
                for path in &paths {
                    self.image_path(&key("paths"), path)?;
                }
                Layer::Deb { package, paths }
            }
            RawLayer::Tarball { path } => {
                Layer::Tarball { path: self.existing(&key("path"), &path)? }
            }
            RawLayer::Overlay { name } => {
                let path = self.overlay(&key("name"), &name)?;
                Layer::Overlay { name, path }
            }
            RawLayer::File { source, path, mode, owner } => {
                let source = self.source(&key("source"), &source, debian)?;
                if matches!(source, Source::Deb { .. }) {
                    bail!(self.err(&key("source"), "expected a host path or root:/path; for a file of a package use a deb layer with paths"));
                }
                let path = self.image_path(&key("path"), &path)?;
                let mode = self.mode(&key("mode"), &mode)?;
                let (uid, gid) = self.owner(&key("owner"), owner.as_deref())?;
                Layer::File { source, path, mode, uid, gid }
            }
            RawLayer::Symlink { path, target } => {
                self.link_target(&key("target"), &target)?;
                Layer::Symlink { path: self.image_path(&key("path"), &path)?, target }
            }
            RawLayer::Symlinks { dir, target, names } => {
                let dir = self.image_path(&key("dir"), &dir)?;
                self.link_target(&key("target"), &target)?;
                if let Some(bad) =
                    names.iter().find(|n| n.is_empty() || n.contains('/') || *n == "..")
                {
                    bail!(self
                        .err(&key("names"), format!("expected plain file names, found {bad:?}")));
                }
                Layer::Symlinks { dir, target, names }
            }
            RawLayer::Dir { path, mode, owner } => {
                let mode = match mode {
                    Some(m) => self.mode(&key("mode"), &m)?,
                    None => 0o755,
                };
                let (uid, gid) = self.owner(&key("owner"), owner.as_deref())?;
                Layer::Dir { path: self.image_path(&key("path"), &path)?, mode, uid, gid }
            }
            RawLayer::Remove { paths } => {
                if paths.is_empty() {
                    bail!(self.err(&key("paths"), "expected at least one path"));
                }
                for p in &paths {
                    let path = self.image_path(&key("paths"), p)?;
                    if path == "/" {
                        bail!(self.err(&key("paths"), "cannot remove /"));
                    }
                }
                Layer::Remove { paths }
            }
        })
    }

    /// The folder of an overlay layer: a plain name of a folder in `overlays/`.
    fn overlay(&self, key: &str, name: &str) -> Result<PathBuf> {
        if name.is_empty() || name.contains('/') || name.contains("..") {
            bail!(self
                .err(key, format!("expected the name of a folder in overlays/, found {name:?}")));
        }
        let path = overlays_dir(self.dir).join(name);
        if !path.is_dir() {
            bail!(self.err(key, format!("overlay folder {} does not exist", path.display())));
        }
        Ok(path)
    }

    fn link_target(&self, key: &str, target: &str) -> Result<()> {
        if target.is_empty() {
            bail!(self.err(key, "expected a link target, found an empty string"));
        }
        Ok(())
    }

    /// `[boot]`: its sources, a `cmdline` without `root=`, FAT names for further files.
    fn boot(&self, b: RawBoot, debian: Option<&Debian>) -> Result<Boot> {
        let kernel = self.source("boot.kernel", &b.kernel, debian)?;
        let config_txt = self.source("boot.config_txt", &b.config_txt, debian)?;
        if b.cmdline.contains('\n') || b.cmdline.split_whitespace().any(|a| a.starts_with("root="))
        {
            bail!(self.err(
                "boot.cmdline",
                "expected one line without root= (the imager adds root=PARTUUID= per slot)"
            ));
        }
        let mut dtbs = Vec::new();
        for (i, d) in b.dtbs.iter().enumerate() {
            dtbs.push(self.source(&format!("boot.dtbs[{i}]"), d, debian)?);
        }
        let mut files = BTreeMap::new();
        for (name, src) in &b.files {
            check_fat_name(self, &format!("boot.files.{name}"), name)?;
            files.insert(name.clone(), self.source(&format!("boot.files.{name}"), src, debian)?);
        }
        let initramfs = self.initramfs(b.initramfs, debian)?;
        Ok(Boot { kernel, config_txt, cmdline: b.cmdline, dtbs, files, initramfs })
    }

    /// `boot.initramfs`: a prebuilt file, or what to build one from.
    fn initramfs(
        &self,
        raw: Option<RawInitramfs>,
        debian: Option<&Debian>,
    ) -> Result<Option<Initramfs>> {
        let spec = match raw {
            None => return Ok(None),
            Some(RawInitramfs::Prebuilt(s)) => {
                return Ok(Some(Initramfs::Prebuilt(self.source("boot.initramfs", &s, debian)?)))
            }
            Some(RawInitramfs::Build(spec)) => spec,
        };
        let init = self.source("boot.initramfs.init", &spec.init, debian)?;
        let mut files = BTreeMap::new();
        for (path, src) in &spec.files {
            let key = format!("boot.initramfs.files.\"{path}\"");
            let path = self.image_path(&key, path)?;
            files.insert(path, self.source(&key, src, debian)?);
        }
        // Without a package, the modules come from the assembled root filesystem.
        if let Some(pkg) = &spec.modules_package {
            self.pinned("boot.initramfs.modules_package", pkg, debian)?;
        }
        Ok(Some(Initramfs::Build(InitramfsSpec {
            init,
            files,
            modules_package: spec.modules_package,
            modules: spec.modules,
        })))
    }
}

fn check_fat_name(c: &Checker<'_>, key: &str, name: &str) -> Result<()> {
    if name.is_empty() || name.contains(['/', '\\', ':', '"', '*', '?', '<', '>', '|']) {
        bail!(c.err(
            key,
            format!("expected a plain file name for the FAT boot partition, found {name:?}")
        ));
    }
    Ok(())
}

/// `overlays/` of the repository: the recipe folder's sibling.
fn overlays_dir(recipe_dir: &Path) -> PathBuf {
    recipe_dir.join("..").join("overlays")
}

/// Formats bytes as MiB for messages.
pub fn mib(bytes: u64) -> String {
    if bytes % (1 << 20) == 0 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A recipe folder with the files a minimal recipe references.
    fn fixture() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("recipes")).unwrap();
        std::fs::create_dir_all(dir.path().join("overlays/base/etc")).unwrap();
        std::fs::write(dir.path().join("recipes/config.txt"), "arm_64bit=1\n").unwrap();
        std::fs::write(dir.path().join("recipes/kernel"), "kernel").unwrap();
        dir
    }

    const GOOD: &str = r#"
name = "test"
version = "1.0.0"
compatible = "metrica-test"
[partitions]
config = "16MiB"
boot_a = "32MiB"
boot_b = "32MiB"
root_a = "64MiB"
root_b = "64MiB"
provision = "16MiB"
data = "32MiB"
[debian]
architecture = "arm64"
cache = "../cache"
packages = { busybox-static = "1:1.35.0-4" }
[[layers]]
type = "deb"
package = "busybox-static"
[[layers]]
type = "overlay"
name = "base"
[[layers]]
type = "file"
source = "config.txt"
path = "/etc/x.txt"
mode = "0640"
owner = "0:4"
[boot]
kernel = "kernel"
config_txt = "config.txt"
cmdline = "console=ttyAMA0 quiet"
"#;

    fn parse(dir: &tempfile::TempDir, text: &str) -> Result<Recipe> {
        Recipe::parse(&dir.path().join("recipes/test.toml"), text)
    }

    fn err(dir: &tempfile::TempDir, text: &str) -> String {
        format!("{:#}", parse(dir, text).unwrap_err())
    }

    #[test]
    fn good_recipe_parses() {
        let dir = fixture();
        let r = parse(&dir, GOOD).unwrap();
        assert_eq!(r.version.to_string(), "1.0.0");
        assert_eq!(r.partitions.root, 64 << 20);
        assert_eq!(r.layers.len(), 3);
        assert!(matches!(&r.layers[2], Layer::File { mode: 0o640, uid: 0, gid: 4, .. }));
        assert_eq!(r.stem(), "test-1.0.0");
    }

    #[test]
    fn a_remove_layer_takes_paths_and_refuses_none_or_the_root() {
        let dir = fixture();
        let with = |paths: &str| {
            GOOD.replace(
                "[boot]",
                &format!("[[layers]]\ntype = \"remove\"\npaths = {paths}\n[boot]"),
            )
        };
        let r = parse(&dir, &with(r#"["/etc/ssh/ssh_host_*"]"#)).unwrap();
        assert_eq!(r.layers[3], Layer::Remove { paths: vec!["/etc/ssh/ssh_host_*".into()] });
        let e = err(&dir, &with("[]"));
        assert!(e.contains("layers[3].paths") && e.contains("at least one path"), "{e}");
        let e = err(&dir, &with(r#"["/"]"#));
        assert!(e.contains("layers[3].paths") && e.contains("cannot remove /"), "{e}");
    }

    #[test]
    fn bad_recipes_name_file_key_and_expectation() {
        let dir = fixture();
        let cases: &[(&str, &str, &[&str])] = &[
            ("unknown key", "[partitions]", &["unknown field `colour`"]),
            ("missing file", "kernel = \"kernel\"", &["boot.kernel", "does not exist"]),
            ("wrong mode", "mode = \"0640\"", &["layers[2].mode", "expected an octal mode"]),
            ("unknown layer", "type = \"overlay\"", &["unknown variant `blob`"]),
            (
                "root sizes",
                "root_b = \"64MiB\"",
                &["partitions.root_b", "same size as partitions.root_a (64 MiB)", "128 MiB"],
            ),
            ("bad size", "data = \"32MiB\"", &["partitions.data", "unknown size unit"]),
            ("bad version", "version = \"1.0.0\"", &["version", "semantic version"]),
            ("unpinned", "package = \"busybox-static\"", &["layers[0].package", "not pinned"]),
            (
                "root in cmdline",
                "cmdline = \"console=ttyAMA0 quiet\"",
                &["boot.cmdline", "without root="],
            ),
            ("missing overlay", "name = \"base\"", &["layers[1].name", "does not exist"]),
            ("relative image path", "path = \"/etc/x.txt\"", &["layers[2].path", "absolute path"]),
            (
                "deb file source",
                "source = \"config.txt\"",
                &["layers[2].source", "use a deb layer"],
            ),
        ];
        let replacements = [
            ("[partitions]", "colour = \"red\"\n[partitions]"),
            ("kernel = \"kernel\"", "kernel = \"vmlinuz-missing\""),
            ("mode = \"0640\"", "mode = \"rwxr-x---\""),
            ("type = \"overlay\"", "type = \"blob\""),
            ("root_b = \"64MiB\"", "root_b = \"128MiB\""),
            ("data = \"32MiB\"", "data = \"32 parsecs\""),
            ("version = \"1.0.0\"", "version = \"one\""),
            ("package = \"busybox-static\"", "package = \"nginx\""),
            ("cmdline = \"console=ttyAMA0 quiet\"", "cmdline = \"console=ttyAMA0 root=/dev/sda2\""),
            ("name = \"base\"", "name = \"nope\""),
            ("path = \"/etc/x.txt\"", "path = \"etc/x.txt\""),
            ("source = \"config.txt\"", "source = \"deb:busybox-static:/bin/busybox\""),
        ];
        for ((what, anchor, expected), (from, to)) in cases.iter().zip(replacements) {
            assert_eq!(*anchor, from, "{what}: table out of step");
            let text = GOOD.replacen(from, to, 1);
            assert_ne!(text, GOOD, "{what}: replacement did not apply");
            let e = err(&dir, &text);
            assert!(e.contains("recipes/test.toml"), "{what}: no file in {e}");
            for part in *expected {
                assert!(e.contains(part), "{what}: {part:?} not in {e}");
            }
        }
    }

    #[test]
    fn an_mmdebstrap_base_has_defaults_and_strict_keys() {
        let dir = fixture();
        let text = GOOD.replace(
            "[debian]",
            "[base]\ntype = \"mmdebstrap\"\nsuite = \"trixie\"\npackages = [\"systemd\", \"kmod\"]\n[debian]",
        );
        let r = parse(&dir, &text).unwrap();
        let Base::Mmdebstrap(b) = &r.base else { panic!("{:?}", r.base) };
        assert_eq!(b.architecture, "arm64", "from [debian]");
        assert_eq!((b.components.clone(), b.variant.as_str()), (vec!["main".to_string()], "apt"));
        assert_eq!(b.packages, ["kmod", "systemd"]);
        assert_eq!(b.mirror, None);
        assert!(b.cache.ends_with("recipes/../cache/base"), "{}", b.cache.display());
        let cases = [
            ("colour = \"red\"", &["recipes/test.toml", "unknown field `colour`"][..]),
            ("variant = \"tiny\"", &["base.variant", "expected one of extract"]),
            ("packages = [\"Bad Name\"]", &["base.packages", "\"Bad Name\""]),
            ("mirror = \"mirror.invalid\"", &["base.mirror", "http://"]),
            ("components = []", &["base.components", "at least one"]),
            ("dpkg_exclude = [\"usr/share/man\"]", &["base.dpkg_exclude", "absolute"]),
        ];
        for (line, expected) in cases {
            let text = GOOD.replace(
                "[debian]",
                &format!("[base]\ntype = \"mmdebstrap\"\nsuite = \"trixie\"\n{line}\n[debian]"),
            );
            let e = err(&dir, &text);
            assert!(e.contains("recipes/test.toml"), "{line}: {e}");
            for part in expected {
                assert!(e.contains(part), "{line}: {part:?} not in {e}");
            }
        }
        let e = err(&dir, &GOOD.replace("[debian]", "[base]\ntype = \"mmdebstrap\"\n[debian]"));
        assert!(e.contains("missing field `suite`"), "{e}");
    }

    /// A part with the Debian table, a layer and the boot files; the recipe adds the rest.
    const PART: &str = r#"
[debian]
architecture = "arm64"
cache = "../cache"
packages = { busybox-static = "1:1.35.0-4" }
[[layers]]
type = "deb"
package = "busybox-static"
[boot]
kernel = "kernel"
config_txt = "config.txt"
"#;

    const INCLUDING: &str = r#"
include = ["pi/common.toml"]
name = "test"
version = "1.0.0"
compatible = "metrica-test"
[partitions]
config = "16MiB"
boot_a = "32MiB"
boot_b = "32MiB"
root_a = "64MiB"
root_b = "64MiB"
provision = "16MiB"
data = "32MiB"
[[layers]]
type = "overlay"
name = "base"
[boot]
cmdline = "console=ttyAMA0 quiet"
"#;

    fn with_part(dir: &tempfile::TempDir, part: &str) {
        std::fs::create_dir_all(dir.path().join("recipes/pi")).unwrap();
        std::fs::write(dir.path().join("recipes/pi/common.toml"), part).unwrap();
    }

    #[test]
    fn an_included_part_is_merged_first() {
        let dir = fixture();
        with_part(&dir, PART);
        let r = parse(&dir, INCLUDING).unwrap();
        assert!(matches!(&r.layers[0], Layer::Deb { package, .. } if package == "busybox-static"));
        assert!(matches!(&r.layers[1], Layer::Overlay { name, .. } if name == "base"));
        assert_eq!(r.boot.kernel, Source::Host(dir.path().join("recipes/kernel")));
        assert_eq!(r.boot.cmdline, "console=ttyAMA0 quiet");
        assert_eq!(r.debian.unwrap().architecture, "arm64");
    }

    #[test]
    fn included_parts_are_strict_and_never_silently_overridden() {
        let dir = fixture();
        let cases: &[(&str, &str, &[&str])] = &[
            (
                PART,
                "[boot]\ncmdline",
                &["recipes/test.toml: ", "[debian]: also set by pi/common.toml"],
            ),
            (PART, "", &["recipes/test.toml: boot.kernel: also set by pi/common.toml"]),
            (
                "[base]\ntype = \"empty\"\ncolour = 1\n",
                "",
                &["recipes/pi/common.toml (included by ", "line 1", "unknown field `colour`"],
            ),
            ("name = \"x\"\n", "", &["recipes/pi/common.toml", "unknown field `name`"]),
            ("[boot]\nkernal = \"k\"\n", "", &["recipes/pi/common.toml", "unknown field `kernal`"]),
        ];
        let extras = [
            "[debian]\narchitecture = \"arm64\"\ncache = \"c\"\npackages = {}\n[boot]\ncmdline",
            "[boot]\nkernel = \"kernel\"\ncmdline",
        ];
        for (i, (part, _, expected)) in cases.iter().enumerate() {
            with_part(&dir, part);
            let text = match extras.get(i) {
                Some(extra) => INCLUDING.replace("[boot]\ncmdline", extra),
                None => INCLUDING.to_string(),
            };
            let e = err(&dir, &text);
            for part in *expected {
                assert!(e.contains(part), "case {i}: {part:?} not in {e}");
            }
        }
        with_part(&dir, PART);
        for (from, to) in
            [("[partitions]", "colour = 1\n[partitions]"), ("cmdline =", "kernal = 1\ncmdline =")]
        {
            let e = err(&dir, &INCLUDING.replace(from, to));
            assert!(e.contains("recipes/test.toml: TOML parse error at line"), "{e}");
            assert!(e.contains("unknown field"), "{e}");
        }
        let e = err(&dir, &INCLUDING.replace("[\"pi/common.toml\"]", "\"pi/common.toml\""));
        assert!(e.contains("include: expected a list of paths"), "{e}");
        let e = err(&dir, &INCLUDING.replace("pi/common.toml", "pi/nope.toml"));
        assert!(e.contains("recipes/test.toml: include: cannot read"), "{e}");
    }

    #[test]
    fn sizes_modes_and_owners() {
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert!(parse_size("1000").is_err(), "not whole MiB");
        assert!(parse_size("0M").is_err());
        assert!(parse_size("-1M").is_err());
        assert_eq!(parse_mode("0755"), Ok(0o755));
        assert_eq!(parse_mode("4755"), Ok(0o4755));
        assert!(parse_mode("0855").is_err());
        assert!(parse_mode("").is_err());
        assert!(parse_mode("077777").is_err());
        assert_eq!(parse_owner("root"), Ok((0, 0)));
        assert_eq!(parse_owner("1000:100"), Ok((1000, 100)));
        assert!(parse_owner("pi").is_err());
    }
}
