//! The disk layout shared by the imager and the device: partition numbers, labels, slots.
//!
//! See docs/design.md, "Disk layout". The imager writes this layout and the updater
//! addresses partitions by these labels, so both take them from here.

use std::fmt;
use std::str::FromStr;

/// GPT type GUID of a FAT partition (Microsoft basic data).
pub const TYPE_FAT: &str = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7";
/// GPT type GUID of an ext4 partition (Linux filesystem data).
pub const TYPE_LINUX: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";

/// The filesystem a partition holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    Fat,
    Ext4,
}

/// One partition of the fixed layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionRole {
    /// GPT partition number, counted from 1 as the firmware counts `boot_partition`.
    pub number: u32,
    /// GPT partition name, which is also the filesystem label.
    pub label: &'static str,
    pub fs: FsKind,
}

pub const CONFIG: PartitionRole = PartitionRole { number: 1, label: "config", fs: FsKind::Fat };
pub const BOOT_A: PartitionRole = PartitionRole { number: 2, label: "boot_a", fs: FsKind::Fat };
pub const BOOT_B: PartitionRole = PartitionRole { number: 3, label: "boot_b", fs: FsKind::Fat };
pub const ROOT_A: PartitionRole = PartitionRole { number: 4, label: "root_a", fs: FsKind::Ext4 };
pub const ROOT_B: PartitionRole = PartitionRole { number: 5, label: "root_b", fs: FsKind::Ext4 };
pub const PROVISION: PartitionRole =
    PartitionRole { number: 6, label: "provision", fs: FsKind::Fat };
pub const DATA: PartitionRole = PartitionRole { number: 7, label: "data", fs: FsKind::Ext4 };

/// All partitions in disk order.
pub const PARTITIONS: [PartitionRole; 7] =
    [CONFIG, BOOT_A, BOOT_B, ROOT_A, ROOT_B, PROVISION, DATA];

impl PartitionRole {
    /// The GPT partition type GUID for this partition.
    pub fn type_guid(&self) -> &'static str {
        match self.fs {
            FsKind::Fat => TYPE_FAT,
            FsKind::Ext4 => TYPE_LINUX,
        }
    }

    /// Looks a partition up by its label.
    pub fn by_label(label: &str) -> Option<PartitionRole> {
        PARTITIONS.iter().copied().find(|p| p.label == label)
    }
}

/// An A/B slot: the pair (boot_x, root_x).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub const ALL: [Slot; 2] = [Slot::A, Slot::B];

    /// The other slot.
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    pub fn boot(self) -> PartitionRole {
        match self {
            Slot::A => BOOT_A,
            Slot::B => BOOT_B,
        }
    }

    pub fn root(self) -> PartitionRole {
        match self {
            Slot::A => ROOT_A,
            Slot::B => ROOT_B,
        }
    }

    /// The slot whose boot partition has this number (the firmware's `boot_partition`).
    pub fn from_boot_partition(number: u32) -> Option<Slot> {
        match number {
            n if n == BOOT_A.number => Some(Slot::A),
            n if n == BOOT_B.number => Some(Slot::B),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Slot {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "a" => Ok(Slot::A),
            "b" => Ok(Slot::B),
            other => Err(format!("unknown slot {other:?}: expected \"a\" or \"b\"")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_numbered_in_order_with_fat_first() {
        for (i, p) in PARTITIONS.iter().enumerate() {
            assert_eq!(p.number as usize, i + 1, "{}", p.label);
        }
        // The firmware wants the FAT partitions first and back to back.
        assert!(PARTITIONS[..3].iter().all(|p| p.fs == FsKind::Fat));
    }

    #[test]
    fn slots_map_to_their_partitions() {
        assert_eq!(Slot::A.other(), Slot::B);
        assert_eq!(Slot::B.boot().label, "boot_b");
        assert_eq!(Slot::A.root().label, "root_a");
        assert_eq!(Slot::from_boot_partition(2), Some(Slot::A));
        assert_eq!(Slot::from_boot_partition(3), Some(Slot::B));
        assert_eq!(Slot::from_boot_partition(1), None);
        assert_eq!("B".parse::<Slot>().unwrap(), Slot::B);
        assert!("c".parse::<Slot>().is_err());
        assert_eq!(PartitionRole::by_label("data"), Some(DATA));
        assert_eq!(PartitionRole::by_label("nope"), None);
    }
}
