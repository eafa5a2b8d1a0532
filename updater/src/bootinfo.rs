//! Where the system booted from and whether this is a trial boot: the one reader of that fact.
//!
//! On a Raspberry Pi the firmware tells the kernel through the device tree:
//! `/proc/device-tree/chosen/bootloader/partition` and `.../tryboot`, each a big-endian u32.
//! In QEMU, which has no Pi firmware, the harness puts the same facts on the kernel command
//! line: `metrica.boot_partition=N metrica.tryboot=0|1`. The device tree wins when it has the
//! facts; nothing else in the updater knows which of the two it runs on.

use crate::layout::Slot;
use std::fmt;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Device-tree node the Pi firmware fills in, relative to the root.
pub const DT_BOOTLOADER: &str = "proc/device-tree/chosen/bootloader";
/// Kernel command line, relative to the root.
pub const CMDLINE: &str = "proc/cmdline";

/// Which source the facts came from (for status output only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootInfoSource {
    DeviceTree,
    KernelCmdline,
}

/// Where the system booted from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BootInfo {
    /// The partition number the firmware booted (counted from 1, like `boot_partition`).
    pub partition: u32,
    /// True when the firmware used the `[tryboot]` section of `autoboot.txt`: a trial boot.
    pub tryboot: bool,
    pub source: BootInfoSource,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BootInfoError {
    #[error(
        "cannot tell where the system booted: neither {dt}/partition nor \
         metrica.boot_partition= in {cmdline}"
    )]
    Unknown { dt: PathBuf, cmdline: PathBuf },
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
}

impl BootInfo {
    /// Reads the boot facts under `root` (`/` on a device; a fake tree in tests).
    pub fn read(root: &Path) -> Result<BootInfo, BootInfoError> {
        let dt = root.join(DT_BOOTLOADER);
        let part_path = dt.join("partition");
        if let Ok(bytes) = std::fs::read(&part_path) {
            let partition = be_u32(&bytes)
                .ok_or_else(|| BootInfoError::Invalid { path: part_path, what: bad_u32(&bytes) })?;
            let try_path = dt.join("tryboot");
            // Firmware without tryboot support has no such property: not a trial boot.
            let tryboot = match std::fs::read(&try_path) {
                Ok(bytes) => {
                    be_u32(&bytes).ok_or_else(|| BootInfoError::Invalid {
                        path: try_path,
                        what: bad_u32(&bytes),
                    })? != 0
                }
                Err(_) => false,
            };
            return Ok(BootInfo { partition, tryboot, source: BootInfoSource::DeviceTree });
        }
        let cmdline_path = root.join(CMDLINE);
        let text = std::fs::read_to_string(&cmdline_path).unwrap_or_default();
        match parse_cmdline(&text) {
            Ok(Some(info)) => Ok(info),
            Ok(None) => Err(BootInfoError::Unknown { dt, cmdline: cmdline_path }),
            Err(what) => Err(BootInfoError::Invalid { path: cmdline_path, what }),
        }
    }

    /// The A/B slot whose boot partition was booted, if it is one.
    pub fn slot(&self) -> Option<Slot> {
        Slot::from_boot_partition(self.partition)
    }
}

impl fmt::Display for BootInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.slot() {
            Some(slot) => write!(f, "slot {slot}")?,
            None => write!(f, "partition {}", self.partition)?,
        }
        if self.tryboot {
            f.write_str(" (trial)")?;
        }
        Ok(())
    }
}

/// Parses `metrica.boot_partition=N metrica.tryboot=0|1` out of a kernel command line.
/// `Ok(None)` when the command line does not name a boot partition.
pub fn parse_cmdline(cmdline: &str) -> Result<Option<BootInfo>, String> {
    let (mut partition, mut tryboot) = (None, false);
    for arg in cmdline.split_whitespace() {
        if let Some(v) = arg.strip_prefix("metrica.boot_partition=") {
            partition = Some(
                v.parse::<u32>()
                    .map_err(|_| format!("metrica.boot_partition={v:?} is not a number"))?,
            );
        } else if let Some(v) = arg.strip_prefix("metrica.tryboot=") {
            tryboot = match v {
                "0" => false,
                "1" => true,
                other => return Err(format!("metrica.tryboot={other:?}: expected 0 or 1")),
            };
        }
    }
    Ok(partition.map(|partition| BootInfo {
        partition,
        tryboot,
        source: BootInfoSource::KernelCmdline,
    }))
}

fn be_u32(bytes: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(bytes.try_into().ok()?))
}

fn bad_u32(bytes: &[u8]) -> String {
    format!("expected a 4-byte big-endian number, found {} bytes", bytes.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, &[u8])]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (path, bytes) in files {
            let p = dir.path().join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, bytes).unwrap();
        }
        dir
    }

    #[test]
    fn reads_the_device_tree_of_a_pi() {
        let t = tree(&[
            ("proc/device-tree/chosen/bootloader/partition", &[0, 0, 0, 3]),
            ("proc/device-tree/chosen/bootloader/tryboot", &[0, 0, 0, 1]),
            ("proc/cmdline", b"metrica.boot_partition=2 metrica.tryboot=0\n"),
        ]);
        let info = BootInfo::read(t.path()).unwrap();
        assert_eq!(
            info,
            BootInfo { partition: 3, tryboot: true, source: BootInfoSource::DeviceTree }
        );
        assert_eq!(info.slot(), Some(Slot::B));
        assert_eq!(info.to_string(), "slot b (trial)");
    }

    #[test]
    fn missing_tryboot_property_means_a_normal_boot() {
        let t = tree(&[("proc/device-tree/chosen/bootloader/partition", &[0, 0, 0, 2])]);
        let info = BootInfo::read(t.path()).unwrap();
        assert_eq!((info.partition, info.tryboot), (2, false));
        assert_eq!(info.to_string(), "slot a");
    }

    #[test]
    fn reads_the_kernel_command_line_in_qemu() {
        let t = tree(&[(
            "proc/cmdline",
            b"console=ttyAMA0 metrica.boot_partition=3 metrica.tryboot=1 quiet\n",
        )]);
        let info = BootInfo::read(t.path()).unwrap();
        assert_eq!(
            info,
            BootInfo { partition: 3, tryboot: true, source: BootInfoSource::KernelCmdline }
        );
        let t = tree(&[("proc/cmdline", b"metrica.boot_partition=2")]);
        assert!(!BootInfo::read(t.path()).unwrap().tryboot);
    }

    #[test]
    fn unknown_or_malformed_facts_are_errors() {
        let t = tree(&[("proc/cmdline", b"console=ttyAMA0 quiet")]);
        let e = BootInfo::read(t.path()).unwrap_err();
        assert!(matches!(e, BootInfoError::Unknown { .. }), "{e}");
        assert!(e.to_string().contains("cannot tell where the system booted"));
        let t = tree(&[]);
        assert!(matches!(BootInfo::read(t.path()), Err(BootInfoError::Unknown { .. })));
        let t = tree(&[("proc/device-tree/chosen/bootloader/partition", &[2])]);
        assert!(matches!(BootInfo::read(t.path()), Err(BootInfoError::Invalid { .. })));
        let t = tree(&[("proc/cmdline", b"metrica.boot_partition=3 metrica.tryboot=yes")]);
        assert!(BootInfo::read(t.path()).unwrap_err().to_string().contains("expected 0 or 1"));
        assert!(parse_cmdline("metrica.boot_partition=x").is_err());
    }

    #[test]
    fn a_partition_outside_the_slots_has_no_slot() {
        let info = parse_cmdline("metrica.boot_partition=6").unwrap().unwrap();
        assert_eq!(info.slot(), None);
        assert_eq!(info.to_string(), "partition 6");
    }
}
