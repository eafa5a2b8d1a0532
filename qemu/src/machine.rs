//! The emulated machine: which QEMU binary, its command line (pure), and finding the binary.
//!
//! The options are the ones measured fastest on this kind of host (shared/PLATFORM.md): TCG,
//! `-M virt -cpu cortex-a53 -smp 1 -m 512`, no network card, the image as a raw virtio disk with
//! `cache=writeback` (the guest's fsynced writes reach the host file, so SIGKILL models a power
//! cut), an i6300esb watchdog that resets, and `-no-reboot` so that every guest reset ends the
//! QEMU process and hands control back to the harness. `-nographic` is spelled out as
//! `-display none -monitor none -serial stdio` so that console bytes are never taken for
//! monitor escapes. QEMU starts paused (`-S`) until the harness has connected to QMP.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Default QEMU binary; `--qemu` or `METRICA_QEMU` override it.
pub const DEFAULT_QEMU: &str = "qemu-system-aarch64";

/// How to run QEMU, the same for every boot of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineConfig {
    pub qemu: PathBuf,
    pub memory_mib: u32,
    pub cpu: String,
    /// Virtual CPUs (`-smp`). One for the lean images, where a second vCPU only adds the
    /// cost of multi-threaded TCG (PLATFORM.md); the systemd image boots faster with two.
    pub cpus: u32,
    /// The boot disk, seen by the guest as /dev/vda.
    pub disk: PathBuf,
    /// More raw disks: /dev/vdb, /dev/vdc, ... (bundles to install, for example).
    pub extra_disks: Vec<PathBuf>,
}

impl MachineConfig {
    pub fn new(disk: impl Into<PathBuf>) -> Self {
        MachineConfig {
            qemu: PathBuf::from(DEFAULT_QEMU),
            memory_mib: 512,
            cpu: "cortex-a53".into(),
            cpus: 1,
            disk: disk.into(),
            extra_disks: Vec::new(),
        }
    }
}

/// What the firmware loads for one boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootImage {
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub cmdline: String,
}

/// QEMU's -drive takes comma-separated options: a comma in a path is written twice.
fn drive_path(path: &Path) -> OsString {
    let s = path.as_os_str().to_string_lossy();
    OsString::from(s.replace(',', ",,"))
}

/// The full argument list (without the binary).
pub fn qemu_args(config: &MachineConfig, boot: &BootImage, qmp_socket: &Path) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(OsString::from));
    let (smp, memory) = (config.cpus.max(1).to_string(), config.memory_mib.to_string());
    push(&["-M", "virt", "-cpu", &config.cpu, "-smp", &smp, "-m", &memory]);
    push(&["-display", "none", "-monitor", "none", "-serial", "stdio"]);
    push(&["-no-reboot", "-nic", "none", "-S"]);
    push(&["-device", "i6300esb", "-action", "watchdog=reset"]);
    let mut qmp = OsString::from("unix:");
    qmp.push(drive_path(qmp_socket));
    qmp.push(",server=on,wait=off");
    args.push("-qmp".into());
    args.push(qmp);
    args.push("-kernel".into());
    args.push(boot.kernel.clone().into());
    if let Some(initrd) = &boot.initramfs {
        args.push("-initrd".into());
        args.push(initrd.clone().into());
    }
    args.push("-append".into());
    args.push(boot.cmdline.clone().into());
    for (i, disk) in std::iter::once(&config.disk).chain(&config.extra_disks).enumerate() {
        let mut drive =
            OsString::from(format!("if=none,id=disk{i},format=raw,cache=writeback,file="));
        drive.push(drive_path(disk));
        args.push("-drive".into());
        args.push(drive);
        args.push("-device".into());
        args.push(format!("virtio-blk-pci,drive=disk{i}").into());
    }
    args
}

/// Finds the QEMU binary: a path is checked as is, a bare name is looked up in PATH.
pub fn find_qemu(qemu: &Path) -> Option<PathBuf> {
    let executable = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if qemu.components().count() > 1 {
        return executable(qemu).then(|| qemu.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(qemu)).find(|p| executable(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[OsString]) -> Vec<String> {
        args.iter().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn command_line() {
        let mut config = MachineConfig::new("/imgs/disk.img");
        config.extra_disks.push("/imgs/bundle,v2.img".into());
        let boot = BootImage {
            kernel: "/w/kernel8.img".into(),
            initramfs: Some("/w/initramfs8".into()),
            cmdline: "console=ttyAMA0 metrica.boot_partition=2 metrica.tryboot=0".into(),
        };
        let args = strings(&qemu_args(&config, &boot, Path::new("/tmp/x/qmp.sock")));
        let joined = args.join(" ");
        for expected in [
            "-M virt -cpu cortex-a53 -smp 1 -m 512",
            "-no-reboot -nic none -S",
            "-device i6300esb -action watchdog=reset",
            "-qmp unix:/tmp/x/qmp.sock,server=on,wait=off",
            "-kernel /w/kernel8.img -initrd /w/initramfs8",
            "-drive if=none,id=disk0,format=raw,cache=writeback,file=/imgs/disk.img -device virtio-blk-pci,drive=disk0",
            "-drive if=none,id=disk1,format=raw,cache=writeback,file=/imgs/bundle,,v2.img -device virtio-blk-pci,drive=disk1",
        ] {
            assert!(joined.contains(expected), "{expected:?} not in {joined}");
        }
        config.cpus = 2;
        let two = strings(&qemu_args(&config, &boot, Path::new("/tmp/x/qmp.sock"))).join(" ");
        assert!(two.contains("-M virt -cpu cortex-a53 -smp 2 -m 512"), "{two}");
        // The command line is one argument.
        let append = args.iter().position(|a| a == "-append").unwrap();
        assert_eq!(args[append + 1], boot.cmdline);
        assert!(!joined.contains("-nographic"));
    }

    #[test]
    fn no_initramfs() {
        let boot = BootImage { kernel: "k".into(), initramfs: None, cmdline: String::new() };
        let args = strings(&qemu_args(&MachineConfig::new("d"), &boot, Path::new("s")));
        assert!(!args.contains(&"-initrd".to_string()));
    }

    #[test]
    fn finding_the_binary() {
        assert_eq!(find_qemu(Path::new("/nonexistent/qemu-system-aarch64")), None);
        assert_eq!(find_qemu(Path::new("no-such-qemu-binary-here")), None);
        assert_eq!(find_qemu(Path::new("/bin/sh")), Some(PathBuf::from("/bin/sh")));
        assert!(find_qemu(Path::new("sh")).is_some());
        // A file that is not executable is not a binary.
        let f = tempfile::NamedTempFile::new().unwrap();
        assert_eq!(find_qemu(f.path()), None);
    }
}
