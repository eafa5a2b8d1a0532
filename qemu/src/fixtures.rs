//! What the scenarios prepare on the host: the test disk the guest's init mounts at
//! `/run/test` (a FAT file system, made with `fatfs`, holding `hook.sh` and bundles), the fault
//! bundles (made by `scripts/make-faulty-bundles.sh`, embedded here, and cached beside the
//! images), the tools they need (`imager`, the signing key), and the host's view of a disk
//! after a run (`imager inspect`).

use anyhow::{bail, Context as _, Result};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The hook the guest's `/sbin/init` runs from the test disk after `updater boot`: it runs the
/// commands the harness types on the console, one per line, and frames each with markers.
pub const HOOK: &str = r#"# pi-qemu scenario hook (qemu/src/fixtures.rs): runs the commands the harness types on
# the console, one per line; "metrica-test: ready N" asks for command N.
stty -echo 2>/dev/null
n=0
while :; do
    n=$((n + 1))
    echo "metrica-test: ready $n"
    read -r command || exit 0
    echo "metrica-test: begin $n"
    sh -c "$command"
    echo "metrica-test: end $n exit $?"
done
"#;

/// The fault-bundle script, embedded so that `pi-qemu` works from any folder.
pub const FAULT_SCRIPT: &str = include_str!("../scripts/make-faulty-bundles.sh");

/// The bundles the fault script makes, by file stem.
pub const FAULT_BUNDLES: &[&str] = &["bad-kernel", "bad-init", "hang", "unhealthy", "v3"];

/// Makes `path`, a raw disk holding one FAT file system (no partition table: the guest mounts
/// `/dev/vdb` itself) with `hook.sh` and the given files, by name.
pub fn test_disk(path: &Path, files: &[(&str, &Path)]) -> Result<()> {
    let mut total: u64 = HOOK.len() as u64;
    for (_, p) in files {
        total += std::fs::metadata(p).with_context(|| format!("reading {}", p.display()))?.len();
    }
    // Room for the FAT, directory entries and cluster slack; whole MiB, at least 8 MiB.
    const MIB: u64 = 1 << 20;
    let size = ((total + total / 8 + 4 * MIB).div_ceil(MIB) * MIB).max(8 * MIB);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.set_len(size)?;
    let mut stream = fscommon::BufStream::new(file);
    fatfs::format_volume(
        &mut stream,
        fatfs::FormatVolumeOptions::new().volume_label(*b"METRICATEST"),
    )
    .with_context(|| format!("formatting {}", path.display()))?;
    let fs = fatfs::FileSystem::new(stream, fatfs::FsOptions::new())
        .with_context(|| format!("opening the FAT of {}", path.display()))?;
    {
        let root = fs.root_dir();
        let mut hook = root.create_file("hook.sh")?;
        hook.truncate()?;
        hook.write_all(HOOK.as_bytes())?;
        for (name, source) in files {
            let mut out = root.create_file(name)?;
            out.truncate()?;
            let mut input =
                File::open(source).with_context(|| format!("opening {}", source.display()))?;
            std::io::copy(&mut input, &mut out)
                .with_context(|| format!("copying {} into {}", source.display(), path.display()))?;
            out.flush()?;
        }
    }
    fs.unmount().with_context(|| format!("closing the FAT of {}", path.display()))?;
    File::open(path)?.sync_all()?;
    Ok(())
}

/// Finds the `imager` binary: `explicit` (from `--imager` or `METRICA_IMAGER`), else beside this
/// program (target/debug/imager next to target/debug/pi-qemu, or one folder up from a test
/// binary in target/debug/deps), else in PATH.
pub fn find_imager(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return crate::machine::find_qemu(p)
            .with_context(|| format!("imager not found: {}", p.display()));
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            let candidate = dir.join("imager");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    crate::machine::find_qemu(Path::new("imager")).context(
        "imager not found beside pi-qemu nor in PATH (build it with `cargo build -p imager`, or \
         pass --imager PATH / set METRICA_IMAGER)",
    )
}

/// Finds the signing key for the fault bundles: `explicit` (`--signing-key` or
/// `METRICA_SIGNING_KEY`), else `keys/dev.key` in the current folder or in the workspace this
/// crate was built from.
pub fn find_signing_key(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        if p.is_file() {
            return Ok(p.to_path_buf());
        }
        bail!("signing key not found: {}", p.display());
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../keys/dev.key");
    for candidate in [PathBuf::from("keys/dev.key"), workspace] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "signing key keys/dev.key not found (make it with `imager keygen --dir keys --name dev`, \
         or pass --signing-key PATH / set METRICA_SIGNING_KEY)"
    )
}

/// The fault bundles for one v2 image, made once and kept in `dir` with a stamp naming their
/// inputs; made again when the image, its bundle, the key or the script change.
#[derive(Debug, Clone)]
pub struct Faults {
    pub dir: PathBuf,
}

impl Faults {
    pub fn bundle(&self, stem: &str) -> PathBuf {
        self.dir.join(format!("{stem}.mfb"))
    }
}

fn stamp_of(paths: &[&Path]) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let mut s = String::new();
    for p in paths {
        let m = std::fs::metadata(p).with_context(|| format!("reading {}", p.display()))?;
        s.push_str(&format!("{} {} {}.{}\n", p.display(), m.len(), m.mtime(), m.mtime_nsec()));
    }
    // FNV-1a of the script: a changed fault is made again.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in FAULT_SCRIPT.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    s.push_str(&format!("script {h:016x}\n"));
    Ok(s)
}

/// Makes (or reuses) the fault bundles of `v2_image` in `dir`.
pub fn faults(v2_image: &Path, key: &Path, imager: &Path, dir: &Path) -> Result<Faults> {
    let v2_bundle = v2_image.with_extension("mfb");
    if !v2_bundle.is_file() {
        bail!(
            "no bundle {} beside the v2 image (the recipe must name a signing key)",
            v2_bundle.display()
        );
    }
    let stamp = stamp_of(&[v2_image, &v2_bundle, key])?;
    let stamp_path = dir.join("stamp");
    let faults = Faults { dir: dir.to_path_buf() };
    let fresh = std::fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp)
        && FAULT_BUNDLES.iter().all(|b| faults.bundle(b).is_file());
    if fresh {
        return Ok(faults);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let _ = std::fs::remove_file(&stamp_path);
    let script = dir.join("make-faulty-bundles.sh");
    std::fs::write(&script, FAULT_SCRIPT)
        .with_context(|| format!("writing {}", script.display()))?;
    eprintln!("pi-qemu: making the fault bundles in {} (once per v2 image)", dir.display());
    let out = Command::new("bash")
        .arg(&script)
        .arg(v2_image)
        .arg(key)
        .arg(dir)
        .arg(imager)
        .output()
        .context("running bash")?;
    if !out.status.success() {
        bail!(
            "making the fault bundles failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::write(&stamp_path, stamp)?;
    Ok(faults)
}

/// What `imager inspect --json` says about a disk, and the state file it reads from the data
/// partition (`imager inspect --cat data:/metrica/state.json`).
#[derive(Debug, Clone)]
pub struct HostView {
    pub inspect: serde_json::Value,
    pub state: Option<serde_json::Value>,
    /// `imager inspect DISK` as text, for the demo and the logs.
    pub text: String,
}

impl HostView {
    pub fn committed(&self) -> Option<&str> {
        self.inspect["committed_slot"].as_str()
    }

    pub fn version(&self, slot: &str) -> Option<&str> {
        self.inspect["slots"]
            .as_array()?
            .iter()
            .find(|s| s["slot"] == slot)
            .and_then(|s| s["release"]["version"].as_str())
    }
}

/// Reads a disk (QEMU not running) with `imager inspect`.
pub fn host_view(imager: &Path, disk: &Path) -> Result<HostView> {
    let run = |args: &[&str]| -> Result<Vec<u8>> {
        let out = Command::new(imager)
            .arg("inspect")
            .arg(disk)
            .args(args)
            .output()
            .with_context(|| format!("running {}", imager.display()))?;
        if !out.status.success() {
            bail!(
                "imager inspect {} {}: {}",
                disk.display(),
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out.stdout)
    };
    let inspect =
        serde_json::from_slice(&run(&["--json"])?).context("parsing imager inspect --json")?;
    let text = String::from_utf8_lossy(&run(&[])?).into_owned();
    let state = match run(&["--cat", "data:/metrica/state.json"]) {
        Ok(bytes) => Some(serde_json::from_slice(&bytes).context("parsing the state file")?),
        Err(_) => None,
    };
    Ok(HostView { inspect, state, text })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn test_disk_holds_the_hook_and_files_by_long_name() {
        let dir = tempfile::tempdir().unwrap();
        let payload = dir.path().join("payload");
        std::fs::write(&payload, vec![7u8; 300_000]).unwrap();
        let disk = dir.path().join("test.img");
        test_disk(&disk, &[("metrica-qemu-2.0.0.mfb", &payload)]).unwrap();
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&disk).unwrap();
        let fs = fatfs::FileSystem::new(fscommon::BufStream::new(file), fatfs::FsOptions::new())
            .unwrap();
        let mut names: Vec<String> = fs.root_dir().iter().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, ["hook.sh", "metrica-qemu-2.0.0.mfb"]);
        let mut hook = String::new();
        fs.root_dir().open_file("hook.sh").unwrap().read_to_string(&mut hook).unwrap();
        assert_eq!(hook, HOOK);
        let mut data = Vec::new();
        fs.root_dir().open_file("metrica-qemu-2.0.0.mfb").unwrap().read_to_end(&mut data).unwrap();
        assert_eq!(data.len(), 300_000);
        assert!(std::fs::metadata(&disk).unwrap().len() >= 8 << 20);
    }

    #[test]
    fn missing_tools_are_named() {
        let e = find_signing_key(Some(Path::new("/nonexistent/dev.key"))).unwrap_err();
        assert_eq!(e.to_string(), "signing key not found: /nonexistent/dev.key");
        let e = find_imager(Some(Path::new("/nonexistent/imager"))).unwrap_err();
        assert!(e.to_string().contains("imager not found: /nonexistent/imager"), "{e}");
    }

    #[test]
    fn faults_need_the_v2_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("metrica-qemu-2.0.0.img");
        std::fs::write(&img, b"").unwrap();
        let e = faults(&img, &img, Path::new("imager"), &dir.path().join("faults")).unwrap_err();
        assert!(e.to_string().contains("no bundle"), "{e}");
    }
}
