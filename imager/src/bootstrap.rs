//! `[base] type = "mmdebstrap"`: a Debian root bootstrapped by mmdebstrap into a tarball, which
//! the build then unpacks like a `type = "tarball"` base.
//!
//! Bootstrapping takes minutes, so the tarball is cached in the recipe's `base.cache` folder as
//! `mmdebstrap-<sha256 of the inputs>.tar`, beside a `.inputs` file that lists those inputs.
//! Every input that changes the result is in the key (suite, architecture, components, variant,
//! packages, mirror, dpkg filters, `SOURCE_DATE_EPOCH`, the mmdebstrap version), so a hit is
//! used as it is, with no network. The tarball is written under a temporary name and renamed
//! only when mmdebstrap succeeded, so the cache never holds half a bootstrap.

use crate::cmd::CommandExt;
use crate::progress::Progress;
use crate::recipe::{Bootstrap, Recipe};
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::collections::VecDeque;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// How many of mmdebstrap's last stderr lines are kept for the error of a failed run.
const KEPT_LINES: usize = 400;

/// A bootstrap tarball and what it was made from, for the build manifest.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Bootstrapped {
    #[serde(skip)]
    pub tar: PathBuf,
    /// The tarball's file name in the cache, `mmdebstrap-<sha256 of the inputs>.tar`.
    pub tarball: String,
    /// The inputs, by name (the `.inputs` file beside the tarball).
    pub inputs: std::collections::BTreeMap<String, String>,
}

impl Bootstrapped {
    fn new(tar: PathBuf, inputs: &str) -> Bootstrapped {
        let tarball = tar.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let inputs = inputs
            .lines()
            .filter_map(|l| l.split_once(": "))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Bootstrapped { tar, tarball, inputs }
    }
}

/// The tarball of `spec`: from the cache, or bootstrapped into it (never when `offline`).
/// `epoch` is the build's `SOURCE_DATE_EPOCH` when it was given; `base.source_date_epoch`
/// takes its place when the recipe pins one.
pub fn tarball(
    recipe: &Recipe,
    spec: &Bootstrap,
    offline: bool,
    epoch: Option<u64>,
    progress: &Progress,
) -> Result<Bootstrapped> {
    let epoch = spec.source_date_epoch.or(epoch);
    let version = mmdebstrap_version(&crate::cmd::tool("mmdebstrap"))?;
    let inputs = inputs(spec, epoch, &version);
    let key = hex::encode(Sha256::digest(inputs.as_bytes()));
    let tar = spec.cache.join(format!("mmdebstrap-{key}.tar"));
    if tar.is_file() {
        log::info!("base: cached {}", tar.display());
        progress.line(&format!("base: cached {}", tar.display()));
        return Ok(Bootstrapped::new(tar, &inputs));
    }
    if offline {
        bail!(recipe.err(
            "base",
            format!(
                "no cached bootstrap for these inputs (suite {}, architecture {}, variant {}, {} packages) in {} and --offline was given",
                spec.suite,
                spec.architecture,
                spec.variant,
                spec.packages.len(),
                spec.cache.display()
            )
        ));
    }
    check_architecture(recipe, &spec.architecture)?;
    std::fs::create_dir_all(&spec.cache)
        .with_context(|| format!("creating the bootstrap cache {}", spec.cache.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".mmdebstrap-{key}."))
        .suffix(".tar")
        .tempfile_in(&spec.cache)
        .with_context(|| format!("creating a temporary file in {}", spec.cache.display()))?;
    run(recipe, spec, epoch, tmp.path(), progress)?;
    std::fs::write(spec.cache.join(format!("mmdebstrap-{key}.inputs")), &inputs)
        .with_context(|| format!("writing the inputs of {}", tar.display()))?;
    tmp.persist(&tar).with_context(|| format!("moving {} into place", tar.display()))?;
    Ok(Bootstrapped::new(tar, &inputs))
}

/// `mmdebstrap --version`, e.g. `mmdebstrap 1.3.5`, of the program at `path`.
fn mmdebstrap_version(path: &Path) -> Result<String> {
    let out = match Command::new(path).arg("--version").output() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "base: mmdebstrap is not installed; install the mmdebstrap package (apt-get install mmdebstrap)"
        ),
        other => other.context("running mmdebstrap --version")?,
    };
    if !out.status.success() {
        bail!("mmdebstrap --version failed ({}): {}", out.status, lossy(&out.stderr).trim());
    }
    Ok(lossy(&out.stdout).trim().to_string())
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The inputs of a bootstrap, one per line: hashed for the cache key and kept beside the
/// tarball so a reader sees what a cached file holds.
pub fn inputs(spec: &Bootstrap, epoch: Option<u64>, version: &str) -> String {
    let epoch = epoch.map_or_else(|| "-".to_string(), |e| e.to_string());
    format!(
        "imager bootstrap cache 1\nmmdebstrap: {version}\nsuite: {}\narchitecture: {}\ncomponents: {}\nvariant: {}\npackages: {}\nmirror: {}\ndpkg_exclude: {}\ndpkg_include: {}\nsource_date_epoch: {epoch}\n",
        spec.suite,
        spec.architecture,
        spec.components.join(" "),
        spec.variant,
        spec.packages.join(" "),
        spec.mirror.as_deref().unwrap_or("-"),
        spec.dpkg_exclude.join(" "),
        spec.dpkg_include.join(" "),
    )
}

/// The mmdebstrap command line that writes the bootstrap of `spec` to `out`.
pub fn command(spec: &Bootstrap, epoch: Option<u64>, out: &Path) -> Command {
    let mut c = Command::new(crate::cmd::tool("mmdebstrap"));
    c.args([
        "--mode=unshare",
        "--format=tar",
        "--skip=output/dev",
        &format!("--variant={}", spec.variant),
        &format!("--architectures={}", spec.architecture),
        &format!("--components={}", spec.components.join(",")),
    ]);
    if !spec.packages.is_empty() {
        c.arg(format!("--include={}", spec.packages.join(",")));
    }
    for g in &spec.dpkg_exclude {
        c.arg(format!("--dpkgopt=path-exclude={g}"));
    }
    for g in &spec.dpkg_include {
        c.arg(format!("--dpkgopt=path-include={g}"));
    }
    c.arg(&spec.suite).arg(out);
    if let Some(m) = &spec.mirror {
        c.arg(m);
    }
    if let Some(e) = epoch {
        c.env("SOURCE_DATE_EPOCH", e.to_string());
    }
    c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

/// Runs mmdebstrap into `out`, its stderr into the debug log and the spinner's message.
fn run(
    recipe: &Recipe,
    spec: &Bootstrap,
    epoch: Option<u64>,
    out: &Path,
    progress: &Progress,
) -> Result<()> {
    let step = progress.spinner(&format!(
        "bootstrapping {} {} (this takes minutes)",
        spec.suite, spec.architecture
    ));
    let mut child = command(spec, epoch, out)
        .logged()
        .spawn()
        .context("running mmdebstrap (is the mmdebstrap package installed?)")?;
    let stderr = child.stderr.take().expect("piped");
    let mut last: VecDeque<String> = VecDeque::new();
    for line in std::io::BufReader::new(stderr).lines() {
        let line = line.context("reading mmdebstrap's output")?;
        log::debug!("mmdebstrap: {line}");
        step.message(line.trim());
        if last.len() == KEPT_LINES {
            last.pop_front();
        }
        last.push_back(line);
    }
    let status = child.wait().context("waiting for mmdebstrap")?;
    if !status.success() {
        let lines: Vec<String> = last.into_iter().collect();
        return Err(failure(recipe, spec, &lines, &status.to_string()));
    }
    step.finish();
    Ok(())
}

/// The error of a failed mmdebstrap run, named after the recipe key that caused it when its
/// output says (a missing package, an unreachable mirror, an unknown suite).
pub fn failure(recipe: &Recipe, spec: &Bootstrap, lines: &[String], status: &str) -> anyhow::Error {
    let find = |pats: &[&str]| lines.iter().find(|l| pats.iter().any(|p| l.contains(p)));
    if let Some(name) = lines.iter().find_map(|l| missing_package(l)) {
        return recipe.err(
            "base.packages",
            format!("no package {name:?} in {} ({})", spec.suite, spec.components.join(", ")),
        );
    }
    let mirror = spec.mirror.as_deref().unwrap_or("mmdebstrap's default mirror");
    if let Some(l) = find(&[
        "Could not resolve",
        "Temporary failure resolving",
        "Could not connect",
        "Unable to connect",
        "Connection refused",
        "Connection timed out",
        "Network is unreachable",
        "No route to host",
    ]) {
        return recipe.err(
            "base.mirror",
            format!("cannot reach {mirror}: {}", l.trim_start_matches("E: ").trim()),
        );
    }
    if let Some(l) = find(&["does not have a Release file", "404  Not Found", "404 Not Found"]) {
        return recipe.err(
            "base.suite",
            format!(
                "no suite {:?} at {mirror}: {}",
                spec.suite,
                l.trim_start_matches("E: ").trim()
            ),
        );
    }
    let tail: Vec<&str> = lines.iter().rev().take(15).rev().map(String::as_str).collect();
    recipe.err("base", format!("mmdebstrap failed ({status}):\n{}", tail.join("\n")))
}

/// The package an apt error line says does not exist, if it says so.
fn missing_package(line: &str) -> Option<String> {
    if let Some(rest) = line.split("Unable to locate package ").nth(1) {
        return rest.split_whitespace().next().map(str::to_string);
    }
    let rest = line.split("Package ").nth(1)?;
    if !line.contains("has no installation candidate") {
        return None;
    }
    let name = rest.split_whitespace().next()?;
    Some(name.trim_matches(['\'', '"']).to_string())
}

/// The Debian architecture of the machine running the build.
fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "i386",
        "arm" => "armhf",
        "riscv64" => "riscv64",
        "powerpc64" => "ppc64el",
        "s390x" => "s390x",
        other => other,
    }
}

/// A foreign architecture needs qemu-user registered with binfmt_misc: checked with
/// `arch-test ARCH` when it is installed, else by the binfmt_misc entry.
fn check_architecture(recipe: &Recipe, arch: &str) -> Result<()> {
    if arch == host_architecture() {
        return Ok(());
    }
    let fix = format!(
        "install qemu-user-static and binfmt-support (or register the qemu-{} interpreter in /proc/sys/fs/binfmt_misc), then check with `arch-test {arch}` (package arch-test)",
        qemu_name(arch)
    );
    let said = match Command::new(crate::cmd::tool("arch-test")).arg(arch).logged().output() {
        Ok(out) if out.status.success() => return Ok(()),
        Ok(out) => format!("arch-test {arch}: {}", lossy(&out.stdout).trim()),
        Err(_) => {
            let entry =
                Path::new("/proc/sys/fs/binfmt_misc").join(format!("qemu-{}", qemu_name(arch)));
            match std::fs::read_to_string(&entry) {
                Ok(s) if s.starts_with("enabled") => return Ok(()),
                _ => format!("{} is not registered", entry.display()),
            }
        }
    };
    bail!(recipe.err(
        "base.architecture",
        format!("this machine cannot run {arch} programs ({said}); {fix}")
    ))
}

/// qemu's name of a Debian architecture.
fn qemu_name(arch: &str) -> &str {
    match arch {
        "arm64" => "aarch64",
        "armhf" | "armel" => "arm",
        "amd64" => "x86_64",
        "ppc64el" => "ppc64le",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// PATH is one per process: the tests that put fakes first on it run one at a time.
    static PATH_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// A folder with fake `mmdebstrap` (and `arch-test`) scripts, first on PATH while alive.
    struct Fakes {
        dir: tempfile::TempDir,
        old_path: std::ffi::OsString,
        _lock: std::sync::MutexGuard<'static, ()>,
    }

    impl Fakes {
        /// `body` is the shell script run for a bootstrap (not for `--version`).
        fn new(body: &str) -> Fakes {
            let lock = PATH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            let dir = tempfile::tempdir().unwrap();
            let fakes = Fakes { old_path: std::env::var_os("PATH").unwrap(), dir, _lock: lock };
            let script = format!(
                "#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'mmdebstrap 9.9-fake'; exit 0; fi\necho \"$@\" >> \"$(dirname \"$0\")/calls\"\n{body}\n"
            );
            fakes.script("mmdebstrap", &script);
            let path = std::env::join_paths(
                std::iter::once(fakes.dir.path().to_path_buf())
                    .chain(std::env::split_paths(&fakes.old_path)),
            )
            .unwrap();
            std::env::set_var("PATH", path);
            fakes
        }

        fn script(&self, name: &str, text: &str) {
            let p = self.dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }

        /// The argument lines of every bootstrap the fake ran.
        fn calls(&self) -> Vec<String> {
            std::fs::read_to_string(self.dir.path().join("calls"))
                .unwrap_or_default()
                .lines()
                .map(str::to_string)
                .collect()
        }
    }

    impl Drop for Fakes {
        fn drop(&mut self) {
            std::env::set_var("PATH", &self.old_path);
        }
    }

    /// A fake that writes a one-file tar to its output argument (the 8th).
    const WRITES_TAR: &str = "out=\"\"; for a in \"$@\"; do case \"$a\" in --*) ;; *) [ -z \"$suite\" ] && suite=$a || { [ -z \"$out\" ] && out=$a; } ;; esac; done\nd=$(mktemp -d); mkdir -p \"$d/etc\"; echo \"$suite\" > \"$d/etc/debian_version\"; tar -C \"$d\" -cf \"$out\" ./etc; echo 'I: done' >&2";

    fn recipe(dir: &Path, base: &str) -> Recipe {
        let recipes = dir.join("recipes");
        std::fs::create_dir_all(&recipes).unwrap();
        std::fs::write(recipes.join("kernel"), "k").unwrap();
        let text = format!(
            "name = \"t\"\nversion = \"1.0.0\"\ncompatible = \"c\"\n[partitions]\nconfig = \"16MiB\"\nboot_a = \"32MiB\"\nboot_b = \"32MiB\"\nroot_a = \"64MiB\"\nroot_b = \"64MiB\"\nprovision = \"16MiB\"\ndata = \"32MiB\"\n[base]\ntype = \"mmdebstrap\"\n{base}\n[boot]\nkernel = \"kernel\"\nconfig_txt = \"kernel\"\ncmdline = \"quiet\"\n"
        );
        Recipe::parse(&recipes.join("t.toml"), &text).unwrap()
    }

    fn spec(r: &Recipe) -> &Bootstrap {
        match &r.base {
            crate::recipe::Base::Mmdebstrap(b) => b,
            other => panic!("{other:?}"),
        }
    }

    fn host_base(extra: &str) -> String {
        format!("suite = \"trixie\"\narchitecture = \"{}\"\n{extra}", host_architecture())
    }

    #[test]
    fn a_bootstrap_is_cached_by_its_inputs_and_reused_offline() {
        let fakes = Fakes::new(WRITES_TAR);
        let dir = tempfile::tempdir().unwrap();
        let r = recipe(dir.path(), &host_base("packages = [\"kmod\", \"systemd\", \"kmod\"]"));
        let q = Progress::quiet();
        let made = tarball(&r, spec(&r), false, Some(7), &q).unwrap();
        assert_eq!(made.inputs["packages"], "kmod systemd");
        let tar = made.tar;
        assert!(tar.starts_with(dir.path().join("recipes/../cache/base")), "{}", tar.display());
        let name = tar.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("mmdebstrap-") && name.ends_with(".tar"), "{name}");
        let sidecar = std::fs::read_to_string(tar.with_extension("inputs")).unwrap();
        assert!(sidecar.contains("packages: kmod systemd\n"), "{sidecar}");
        assert!(sidecar.contains("mmdebstrap: mmdebstrap 9.9-fake\n"), "{sidecar}");
        let calls = fakes.calls();
        assert_eq!(calls.len(), 1, "{calls:?}");
        for arg in ["--mode=unshare", "--format=tar", "--skip=output/dev", "--variant=apt"] {
            assert!(calls[0].contains(arg), "{arg} not in {}", calls[0]);
        }
        assert!(calls[0].contains("--include=kmod,systemd trixie "), "{}", calls[0]);
        // No temporary files are left in the cache.
        let left: Vec<_> = std::fs::read_dir(tar.parent().unwrap()).unwrap().collect();
        assert_eq!(left.len(), 2, "{left:?}");
        // The same inputs: a hit, offline, no second run.
        assert_eq!(tarball(&r, spec(&r), true, Some(7), &q).unwrap().tar, tar);
        assert_eq!(fakes.calls().len(), 1);
        // Another epoch is another key: offline, that is an error naming the recipe.
        let e = format!("{:#}", tarball(&r, spec(&r), true, Some(8), &q).unwrap_err());
        assert!(
            e.contains("recipes/t.toml: base: no cached bootstrap for these inputs (suite trixie"),
            "{e}"
        );
        assert!(e.contains("--offline was given"), "{e}");
    }

    #[test]
    fn a_pinned_bootstrap_epoch_is_shared_by_builds_of_other_epochs() {
        let fakes = Fakes::new(WRITES_TAR);
        let dir = tempfile::tempdir().unwrap();
        let r = recipe(dir.path(), &host_base("source_date_epoch = 1700000000"));
        let q = Progress::quiet();
        let a = tarball(&r, spec(&r), false, Some(1), &q).unwrap();
        let b = tarball(&r, spec(&r), false, Some(2), &q).unwrap();
        assert_eq!(a.tar, b.tar);
        assert_eq!(a.inputs["source_date_epoch"], "1700000000");
        assert_eq!(fakes.calls().len(), 1);
    }

    #[test]
    fn the_cache_key_covers_every_input() {
        let dir = tempfile::tempdir().unwrap();
        let r = recipe(dir.path(), &host_base(""));
        let base = spec(&r).clone();
        let key = |s: &Bootstrap, e: Option<u64>, v: &str| inputs(s, e, v);
        let k0 = key(&base, None, "1");
        let mut variants = vec![key(&base, Some(1), "1"), key(&base, None, "2")];
        let edits: Vec<fn(&mut Bootstrap)> = vec![
            |s| s.suite = "bookworm".into(),
            |s| s.architecture = "armhf".into(),
            |s| s.components.push("contrib".into()),
            |s| s.variant = "essential".into(),
            |s| s.packages.push("kmod".into()),
            |s| s.mirror = Some("http://mirror.invalid/debian".into()),
            |s| s.dpkg_exclude.push("/usr/share/man/*".into()),
            |s| s.dpkg_include.push("/usr/share/doc/*/copyright".into()),
        ];
        for edit in edits {
            let mut s = base.clone();
            edit(&mut s);
            variants.push(key(&s, None, "1"));
        }
        for v in &variants {
            assert_ne!(*v, k0);
        }
        let mut s = base;
        s.cache = PathBuf::from("/elsewhere");
        assert_eq!(key(&s, None, "1"), k0, "the cache folder is not an input");
    }

    #[test]
    fn mmdebstrap_errors_name_the_recipe_key() {
        let dir = tempfile::tempdir().unwrap();
        let q = Progress::quiet();
        let cases = [
            (
                "echo 'E: Unable to locate package nosuchpkg' >&2; exit 1",
                "packages = [\"nosuchpkg\"]",
                "base.packages: no package \"nosuchpkg\" in trixie (main)",
            ),
            (
                "echo \"E: Package 'virtual' has no installation candidate\" >&2; exit 1",
                "packages = [\"virtual\"]",
                "base.packages: no package \"virtual\" in trixie (main)",
            ),
            (
                "echo \"W: Failed to fetch http://mirror.invalid/debian/dists/trixie/InRelease  Could not resolve 'mirror.invalid'\" >&2; exit 1",
                "mirror = \"http://mirror.invalid/debian\"",
                "base.mirror: cannot reach http://mirror.invalid/debian: W: Failed to fetch",
            ),
            (
                "echo \"E: The repository 'http://mirror.invalid/debian trixie Release' does not have a Release file.\" >&2; exit 1",
                "",
                "base.suite: no suite \"trixie\" at mmdebstrap's default mirror",
            ),
            ("echo 'E: something else broke' >&2; exit 3", "", "base: mmdebstrap failed (exit status: 3):\nE: something else broke"),
        ];
        for (body, extra, want) in cases {
            let _fakes = Fakes::new(body);
            let r = recipe(dir.path(), &host_base(extra));
            let e = format!("{:#}", tarball(&r, spec(&r), false, None, &q).unwrap_err());
            assert!(e.contains("recipes/t.toml: ") && e.contains(want), "{want:?} not in {e}");
            let cached: Vec<_> = std::fs::read_dir(&spec(&r).cache).unwrap().collect();
            assert!(cached.is_empty(), "a failed run leaves nothing in the cache: {cached:?}");
        }
    }

    #[test]
    fn a_foreign_architecture_without_binfmt_and_a_missing_mmdebstrap_are_clear() {
        let fakes = Fakes::new(WRITES_TAR);
        fakes.script(
            "arch-test",
            "#!/bin/sh\necho \"$1: not supported on this machine/kernel\"\nexit 1\n",
        );
        let dir = tempfile::tempdir().unwrap();
        let foreign = if host_architecture() == "riscv64" { "arm64" } else { "riscv64" };
        let r = recipe(dir.path(), &format!("suite = \"trixie\"\narchitecture = \"{foreign}\""));
        let q = Progress::quiet();
        let e = format!("{:#}", tarball(&r, spec(&r), false, None, &q).unwrap_err());
        assert!(e.contains("base.architecture: this machine cannot run"), "{e}");
        assert!(e.contains("install qemu-user-static and binfmt-support"), "{e}");
        assert!(fakes.calls().is_empty());
        let e = format!("{:#}", mmdebstrap_version(&dir.path().join("mmdebstrap")).unwrap_err());
        assert!(e.contains("install the mmdebstrap package"), "{e}");
    }

    #[test]
    fn the_command_line_carries_every_input() {
        let dir = tempfile::tempdir().unwrap();
        let r = recipe(
            dir.path(),
            "suite = \"trixie\"\nvariant = \"essential\"\ncomponents = [\"main\", \"non-free-firmware\"]\npackages = [\"udev\", \"kmod\"]\nmirror = \"http://mirror.invalid/debian\"\ndpkg_exclude = [\"/usr/share/man/*\"]\ndpkg_include = [\"/usr/share/doc/*/copyright\"]",
        );
        let c = command(spec(&r), Some(1700000000), Path::new("/out.tar"));
        let args: Vec<String> = c.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(
            args,
            [
                "--mode=unshare",
                "--format=tar",
                "--skip=output/dev",
                "--variant=essential",
                "--architectures=arm64",
                "--components=main,non-free-firmware",
                "--include=kmod,udev",
                "--dpkgopt=path-exclude=/usr/share/man/*",
                "--dpkgopt=path-include=/usr/share/doc/*/copyright",
                "trixie",
                "/out.tar",
                "http://mirror.invalid/debian",
            ]
        );
        let env: Vec<_> = c.get_envs().collect();
        assert_eq!(
            env,
            [(std::ffi::OsStr::new("SOURCE_DATE_EPOCH"), Some(std::ffi::OsStr::new("1700000000")))]
        );
    }

    #[test]
    fn missing_packages_are_found_in_apt_lines() {
        assert_eq!(missing_package("E: Unable to locate package foo"), Some("foo".into()));
        assert_eq!(
            missing_package("E: Package 'bar' has no installation candidate"),
            Some("bar".into())
        );
        assert_eq!(missing_package("I: Package lists read"), None);
    }
}
