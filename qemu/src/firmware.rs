//! Which partition the Raspberry Pi bootloader boots, as a pure function of what is on the
//! disk and of the request left by the previous reset. Written from the Raspberry Pi
//! documentation (autoboot.adoc, the EEPROM's `PARTITION` and `PARTITION_WALK` properties,
//! the TRYBOOT boot flow); it shares no code with the updater.
//!
//! The model, in order:
//! 1. A partition number given to `reboot` (`reboot "3"`, `reboot "3 tryboot"`) wins over
//!    `boot_partition` (autoboot.adoc: "unless the partition number was already specified as
//!    a parameter to the reboot command"). 0 means "the default".
//! 2. Else `autoboot.txt` on partition 1, with its `[tryboot]` section applied when the
//!    one-shot tryboot flag is set.
//! 3. Else, or with `boot_partition=0`, the default partition: the first bootable FAT partition.
//! 4. If `autoboot.txt` is unparseable, or the requested partition is not bootable, the
//!    partition walk of `PARTITION_WALK=1`: the next partitions in turn, up to 8, wrapping
//!    around; `autoboot.txt` files are not read during the walk. Logged as a warning.
//!
//! "Bootable" stands in for the firmware's test (`start4.elf` on a Pi 4, `config.txt` on a
//! Pi 5): a FAT partition that holds `config.txt` or `kernel8.img`. A bootable partition
//! without `kernel8.img` is an error, as it is on a Pi (the firmware stops; it does not walk).

use crate::autoboot::{Autoboot, AutobootError};
use std::fmt;

/// The kernel the harness loads, by the boot partition convention of the imager.
pub const KERNEL: &str = "kernel8.img";
/// The initramfs (gzip newc cpio).
pub const INITRAMFS: &str = "initramfs8";
pub const CMDLINE: &str = "cmdline.txt";
pub const CONFIG: &str = "config.txt";
pub const AUTOBOOT: &str = "autoboot.txt";
/// `autoboot.txt` is read from this partition.
pub const AUTOBOOT_PARTITION: u32 = 1;
/// The partition walk checks partitions up to this number.
pub const WALK_LIMIT: u32 = 8;

/// What the firmware sees of one partition.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PartitionSummary {
    /// GPT entry number, from 1.
    pub number: u32,
    pub label: String,
    /// Whether a FAT file system could be opened on it.
    pub fat: bool,
    pub has_config: bool,
    pub has_kernel: bool,
}

impl PartitionSummary {
    pub fn bootable(&self) -> bool {
        self.fat && (self.has_config || self.has_kernel)
    }
}

/// The contents of `autoboot.txt` on partition 1, or why there is none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AutobootFile {
    Present(Vec<u8>),
    Missing(String),
}

/// What the firmware sees of the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSummary {
    pub partitions: Vec<PartitionSummary>,
    pub autoboot: AutobootFile,
}

impl DiskSummary {
    fn partition(&self, number: u32) -> Option<&PartitionSummary> {
        self.partitions.iter().find(|p| p.number == number)
    }
}

/// What the previous reset left for this boot: a partition given to `reboot` (0: none) and
/// the one-shot tryboot flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BootRequest {
    pub partition: u32,
    pub tryboot: bool,
}

impl BootRequest {
    pub const POWER_ON: BootRequest = BootRequest { partition: 0, tryboot: false };
}

/// How the partition was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    RebootArgument,
    Autoboot,
    Default,
    Walk,
}

impl fmt::Display for Selection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Selection::RebootArgument => "reboot argument",
            Selection::Autoboot => "autoboot.txt",
            Selection::Default => "default partition",
            Selection::Walk => "partition walk",
        })
    }
}

/// The firmware's decision for one boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootChoice {
    pub partition: u32,
    pub label: String,
    /// The tryboot flag as the firmware reports it to the OS for this boot.
    pub tryboot: bool,
    pub selection: Selection,
    /// Things a test should see: the walk, an unparseable autoboot.txt, ignored lines.
    pub warnings: Vec<String>,
}

/// Disks the firmware cannot boot. Callers branch on these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FirmwareError {
    #[error("boot partition {partition} ({label}) has no {KERNEL}")]
    NoKernel { partition: u32, label: String },
    #[error("no bootable partition: no FAT partition holds {CONFIG} or {KERNEL} ({detail})")]
    NoBootablePartition { detail: String },
}

/// Decides which partition boots. Pure: see the module documentation for the model.
pub fn choose(disk: &DiskSummary, request: BootRequest) -> Result<BootChoice, FirmwareError> {
    let mut warnings = Vec::new();
    let autoboot: Option<Result<Autoboot, AutobootError>> = match &disk.autoboot {
        AutobootFile::Present(bytes) => Some(Autoboot::parse(bytes)),
        AutobootFile::Missing(_) => None,
    };

    let (requested, selection) = if request.partition != 0 {
        (request.partition, Selection::RebootArgument)
    } else {
        match &autoboot {
            Some(Ok(parsed)) => {
                warnings.extend(parsed.warnings.iter().map(|w| format!("autoboot.txt: {w}")));
                let resolved = parsed.resolve(request.tryboot);
                if request.tryboot && !resolved.tryboot_a_b {
                    warnings.push(
                        "tryboot flag set but tryboot_a_b is not 1: a Pi would load tryboot.txt from the same partition; not modelled, booting the partition autoboot.txt names"
                            .to_string(),
                    );
                }
                match resolved.boot_partition {
                    Some(n) if n != 0 => (n, Selection::Autoboot),
                    _ => (0, Selection::Default),
                }
            }
            Some(Err(e)) => {
                warnings.push(format!("{e}: partition walk"));
                return walk(disk, 0, request, warnings);
            }
            None => (0, Selection::Default),
        }
    };

    if requested == 0 {
        return match disk.partitions.iter().find(|p| p.bootable()) {
            Some(p) => finish(p, request, Selection::Default, warnings),
            None => Err(no_bootable(disk)),
        };
    }
    match disk.partition(requested) {
        Some(p) if p.bootable() => finish(p, request, selection, warnings),
        other => {
            let why = match other {
                None => format!("partition {requested} does not exist"),
                Some(p) if !p.fat => format!("partition {requested} ({}) is not FAT", p.label),
                Some(p) => {
                    format!(
                        "partition {requested} ({}) holds neither {CONFIG} nor {KERNEL}",
                        p.label
                    )
                }
            };
            warnings.push(format!("{why} (the {selection} asked for it): partition walk"));
            walk(disk, requested, request, warnings)
        }
    }
}

/// `PARTITION_WALK=1`: the partitions after `from` up to [`WALK_LIMIT`], then from 1.
fn walk(
    disk: &DiskSummary,
    from: u32,
    request: BootRequest,
    mut warnings: Vec<String>,
) -> Result<BootChoice, FirmwareError> {
    let order = (from + 1..=WALK_LIMIT).chain(1..=from.min(WALK_LIMIT));
    for number in order {
        if let Some(p) = disk.partition(number).filter(|p| p.bootable()) {
            warnings.push(format!("partition walk chose partition {number} ({})", p.label));
            return finish(p, request, Selection::Walk, warnings);
        }
    }
    Err(no_bootable(disk))
}

fn finish(
    p: &PartitionSummary,
    request: BootRequest,
    selection: Selection,
    warnings: Vec<String>,
) -> Result<BootChoice, FirmwareError> {
    if !p.has_kernel {
        return Err(FirmwareError::NoKernel { partition: p.number, label: p.label.clone() });
    }
    Ok(BootChoice {
        partition: p.number,
        label: p.label.clone(),
        tryboot: request.tryboot,
        selection,
        warnings,
    })
}

fn no_bootable(disk: &DiskSummary) -> FirmwareError {
    let detail = if disk.partitions.is_empty() {
        "the partition table is empty".to_string()
    } else {
        disk.partitions
            .iter()
            .map(|p| {
                let what = if !p.fat { "not FAT" } else { "FAT, empty of boot files" };
                format!("{} {}: {what}", p.number, p.label)
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    FirmwareError::NoBootablePartition { detail }
}

/// The kernel command line the harness passes: `cmdline.txt`'s first line, with
/// `console=serial0` mapped to the PL011 as the Pi firmware maps its serial aliases, then the
/// facts a Pi's device tree would carry (`/chosen/bootloader/partition` and `.../tryboot`).
pub fn kernel_cmdline(cmdline_txt: &str, choice: &BootChoice, extra: &[String]) -> String {
    let first = cmdline_txt.lines().next().unwrap_or("");
    let mut words: Vec<String> = first
        .split_whitespace()
        .map(|w| match w.strip_prefix("console=serial0") {
            Some(rest) => format!("console=ttyAMA0{rest}"),
            None => w.to_string(),
        })
        .collect();
    words.extend(extra.iter().cloned());
    words.push(format!("metrica.boot_partition={}", choice.partition));
    words.push(format!("metrica.tryboot={}", u8::from(choice.tryboot)));
    words.join(" ")
}

/// Warnings about a command line that would hide what the harness must see on the console.
pub fn cmdline_warnings(cmdline: &str) -> Vec<String> {
    let mut out = Vec::new();
    let words: Vec<&str> = cmdline.split_whitespace().collect();
    if !words.iter().any(|w| w.starts_with("console=ttyAMA0")) {
        out.push(
            "the kernel command line has no console=ttyAMA0: the harness cannot see reboot commands or panics"
                .to_string(),
        );
    }
    if words.contains(&"loglevel=0") {
        out.push(
            "loglevel=0 hides the kernel's reboot line: a tryboot reboot would look like a plain reset"
                .to_string(),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMMITTED_A: &[u8] =
        b"[all]\ntryboot_a_b=1\nboot_partition=2\n[tryboot]\nboot_partition=3\n";

    fn fat(number: u32, label: &str, config: bool, kernel: bool) -> PartitionSummary {
        PartitionSummary {
            number,
            label: label.into(),
            fat: true,
            has_config: config,
            has_kernel: kernel,
        }
    }

    fn ext4(number: u32, label: &str) -> PartitionSummary {
        PartitionSummary { number, label: label.into(), ..Default::default() }
    }

    /// The product layout: config, boot_a, boot_b, root_a, root_b, provision, data.
    fn product(autoboot: AutobootFile) -> DiskSummary {
        DiskSummary {
            partitions: vec![
                fat(1, "config", false, false),
                fat(2, "boot_a", true, true),
                fat(3, "boot_b", true, true),
                ext4(4, "root_a"),
                ext4(5, "root_b"),
                fat(6, "provision", false, false),
                ext4(7, "data"),
            ],
            autoboot,
        }
    }

    fn boot(disk: &DiskSummary, partition: u32, tryboot: bool) -> BootChoice {
        choose(disk, BootRequest { partition, tryboot }).unwrap()
    }

    #[test]
    fn normal_boot_follows_all_section() {
        let c = boot(&product(AutobootFile::Present(COMMITTED_A.to_vec())), 0, false);
        assert_eq!((c.partition, c.label.as_str(), c.tryboot), (2, "boot_a", false));
        assert_eq!(c.selection, Selection::Autoboot);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    }

    #[test]
    fn trial_boot_follows_tryboot_section() {
        let c = boot(&product(AutobootFile::Present(COMMITTED_A.to_vec())), 0, true);
        assert_eq!((c.partition, c.tryboot, c.selection), (3, true, Selection::Autoboot));
    }

    #[test]
    fn reboot_argument_wins_over_autoboot() {
        let disk = product(AutobootFile::Present(COMMITTED_A.to_vec()));
        let c = boot(&disk, 3, false);
        assert_eq!((c.partition, c.selection), (3, Selection::RebootArgument));
        let c = boot(&disk, 2, true);
        assert_eq!((c.partition, c.tryboot), (2, true));
    }

    #[test]
    fn missing_autoboot_boots_the_first_bootable_partition() {
        let c = boot(&product(AutobootFile::Missing("no autoboot.txt".into())), 0, false);
        assert_eq!((c.partition, c.selection), (2, Selection::Default));
        // The flag is still reported: the firmware sets it whatever the partition.
        let c = boot(&product(AutobootFile::Missing("no autoboot.txt".into())), 0, true);
        assert_eq!((c.partition, c.tryboot), (2, true));
    }

    #[test]
    fn unparseable_autoboot_walks_with_a_warning() {
        let c = boot(&product(AutobootFile::Present(b"[all]\nboot_part\0\0".to_vec())), 0, true);
        assert_eq!((c.partition, c.selection), (2, Selection::Walk));
        assert!(c.warnings.iter().any(|w| w.contains("not ASCII text")), "{:?}", c.warnings);
    }

    #[test]
    fn partition_zero_means_default() {
        let c = boot(&product(AutobootFile::Present(b"boot_partition=0\n".to_vec())), 0, false);
        assert_eq!((c.partition, c.selection), (2, Selection::Default));
    }

    #[test]
    fn requested_partition_not_bootable_walks_on() {
        // boot_partition=4 is ext4: the walk tries 5 (ext4), 6 (FAT, empty), 7, 8, then 1, 2.
        let c = boot(&product(AutobootFile::Present(b"boot_partition=4\n".to_vec())), 0, false);
        assert_eq!((c.partition, c.selection), (2, Selection::Walk));
        assert!(c.warnings[0].contains("partition 4 (root_a) is not FAT"), "{:?}", c.warnings);
        // A requested FAT partition without boot files is not bootable either.
        let mut disk = product(AutobootFile::Present(b"boot_partition=1\n".to_vec()));
        disk.partitions[0].has_config = false;
        let c = boot(&disk, 0, false);
        assert_eq!(c.partition, 2);
        assert!(c.warnings[0].contains("holds neither"), "{:?}", c.warnings);
    }

    #[test]
    fn walk_wraps_around() {
        let mut disk = product(AutobootFile::Present(b"boot_partition=3\n".to_vec()));
        disk.partitions[2] = fat(3, "boot_b", false, false);
        let c = boot(&disk, 0, false);
        assert_eq!((c.partition, c.selection), (2, Selection::Walk));
    }

    #[test]
    fn nonexistent_partition_walks() {
        let c = boot(&product(AutobootFile::Present(b"boot_partition=12\n".to_vec())), 0, false);
        assert_eq!(c.partition, 2);
        assert_eq!(
            c.warnings[0],
            "partition 12 does not exist (the autoboot.txt asked for it): partition walk"
        );
    }

    #[test]
    fn bootable_partition_without_kernel_is_an_error_not_a_walk() {
        let mut disk = product(AutobootFile::Present(COMMITTED_A.to_vec()));
        disk.partitions[2] = fat(3, "boot_b", true, false);
        assert_eq!(boot(&disk, 0, false).partition, 2);
        let err = choose(&disk, BootRequest { partition: 0, tryboot: true }).unwrap_err();
        assert_eq!(err, FirmwareError::NoKernel { partition: 3, label: "boot_b".into() });
        assert_eq!(err.to_string(), "boot partition 3 (boot_b) has no kernel8.img");
    }

    #[test]
    fn no_bootable_partition_is_an_error() {
        let disk = DiskSummary {
            partitions: vec![fat(1, "config", false, false), ext4(2, "root")],
            autoboot: AutobootFile::Present(COMMITTED_A.to_vec()),
        };
        let err = choose(&disk, BootRequest::POWER_ON).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, FirmwareError::NoBootablePartition { .. }));
        assert!(text.contains("1 config: FAT, empty of boot files; 2 root: not FAT"), "{text}");
        let empty = DiskSummary { partitions: vec![], autoboot: AutobootFile::Missing("x".into()) };
        assert!(choose(&empty, BootRequest::POWER_ON)
            .unwrap_err()
            .to_string()
            .contains("the partition table is empty"));
    }

    #[test]
    fn kernel_only_partition_is_bootable() {
        let disk = DiskSummary {
            partitions: vec![fat(1, "boot", false, true)],
            autoboot: AutobootFile::Missing("x".into()),
        };
        assert_eq!(boot(&disk, 0, false).partition, 1);
    }

    #[test]
    fn tryboot_without_tryboot_a_b_warns() {
        let disk = product(AutobootFile::Present(
            b"boot_partition=2\n[tryboot]\nboot_partition=3\n".to_vec(),
        ));
        let c = boot(&disk, 0, true);
        assert_eq!(c.partition, 3);
        assert!(c.warnings.iter().any(|w| w.contains("tryboot_a_b is not 1")));
    }

    #[test]
    fn cmdline_gets_boot_facts_and_serial_alias() {
        let choice = BootChoice {
            partition: 3,
            label: "boot_b".into(),
            tryboot: true,
            selection: Selection::Autoboot,
            warnings: vec![],
        };
        let line = kernel_cmdline(
            "console=serial0,115200 root=PARTUUID=abc-03 rootwait\nsecond line ignored\n",
            &choice,
            &["x=1".to_string()],
        );
        assert_eq!(
            line,
            "console=ttyAMA0,115200 root=PARTUUID=abc-03 rootwait x=1 metrica.boot_partition=3 metrica.tryboot=1"
        );
        assert_eq!(kernel_cmdline("", &choice, &[]), "metrica.boot_partition=3 metrica.tryboot=1");
    }

    #[test]
    fn cmdline_warnings_name_the_problem() {
        assert!(cmdline_warnings("console=ttyAMA0 quiet").is_empty());
        assert_eq!(cmdline_warnings("quiet").len(), 1);
        assert!(cmdline_warnings("console=ttyAMA0 loglevel=0")[0].contains("loglevel=0"));
    }
}
