//! Whether an OS version may go onto this device: the hardware line (`compatible`), the
//! anti-rollback security epoch, a pin, and the version's direction against the committed
//! slot. Written once here (DESIGN.md section 4); the two places that ask apply these rules,
//! each in its own documented order:
//!
//! - the install, on a verified bundle's manifest: [`check_manifest`] (compatible, epoch,
//!   pin, newer), through the `install::Policy` trait;
//! - the rollout, on a channel's offer: [`crate::rollout::decide`], which also tells "already
//!   there" from "older", and lets a pin or a version lock go down.
//!
//! Versions compare by semver precedence: build metadata is ignored (`1.2.3+build.7` is
//! `1.2.3`), pre-releases come before their release.

use crate::bundle::Manifest;
use semver::Version;
use std::cmp::Ordering;
use thiserror::Error;

/// What the device is and runs, as these rules read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceFacts {
    /// The device's `compatible` (from its committed slot's release file).
    pub compatible: String,
    /// Version of the committed slot, if known (`None`: any version is newer).
    pub committed_version: Option<Version>,
    /// The device's recorded security epoch.
    pub security_epoch: u64,
    /// A version pinned for this install by a signed channel (or an operator). When set, only
    /// that version is accepted, and it is accepted even when it is not newer (the epoch still
    /// applies). The rollout reads its pin from the channel document and leaves this `None`.
    pub pinned_version: Option<Version>,
}

/// An OS version on offer: a bundle's manifest, or a channel's target or pin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offer<'a> {
    pub compatible: &'a str,
    pub version: &'a Version,
    pub security_epoch: u64,
}

impl<'a> Offer<'a> {
    /// What a bundle's manifest offers.
    pub fn of_manifest(m: &'a Manifest) -> Offer<'a> {
        Offer { compatible: &m.compatible, version: &m.version, security_epoch: m.security_epoch }
    }
}

/// Why a verified bundle is refused on this device. Nothing was written.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Refusal {
    #[error("bundle is for {bundle:?}, this device is {device:?}")]
    Incompatible { bundle: String, device: String },
    #[error("security epoch {bundle} is below the device's {device}")]
    EpochTooLow { bundle: u64, device: u64 },
    #[error("version {bundle} is not newer than the committed {committed}")]
    NotNewer { bundle: Version, committed: Version },
    #[error("version {bundle} is not the pinned {pinned}")]
    NotPinned { bundle: Version, pinned: Version },
    /// A refusal decided by a caller's own policy (e.g. "this version failed before").
    #[error("{0}")]
    Policy(String),
}

/// The hardware rule: the offer is for this device's `compatible`.
pub fn is_compatible(offer: &Offer<'_>, device: &DeviceFacts) -> bool {
    offer.compatible == device.compatible
}

/// The anti-rollback rule: the offer's security epoch is not below the device's, whatever
/// pins or locks say.
pub fn epoch_allowed(offer: &Offer<'_>, device: &DeviceFacts) -> bool {
    offer.security_epoch >= device.security_epoch
}

/// The offered version against the committed one (semver precedence); `None` when the
/// committed version is unknown.
pub fn against_committed(version: &Version, device: &DeviceFacts) -> Option<Ordering> {
    device.committed_version.as_ref().map(|c| version.cmp_precedence(c))
}

/// Whether two versions are the same release (semver precedence: build metadata ignored).
pub fn same_version(a: &Version, b: &Version) -> bool {
    a.cmp_precedence(b) == Ordering::Equal
}

/// The install's check of a verified manifest, in this order: compatible, security epoch,
/// pin (only the pinned version, newer or not), version newer than the committed one.
pub fn check_manifest(m: &Manifest, device: &DeviceFacts) -> Result<(), Refusal> {
    let offer = Offer::of_manifest(m);
    if !is_compatible(&offer, device) {
        return Err(Refusal::Incompatible {
            bundle: m.compatible.clone(),
            device: device.compatible.clone(),
        });
    }
    if !epoch_allowed(&offer, device) {
        return Err(Refusal::EpochTooLow {
            bundle: m.security_epoch,
            device: device.security_epoch,
        });
    }
    if let Some(pinned) = &device.pinned_version {
        if !same_version(&m.version, pinned) {
            return Err(Refusal::NotPinned { bundle: m.version.clone(), pinned: pinned.clone() });
        }
        return Ok(());
    }
    if let Some(committed) = &device.committed_version {
        if against_committed(&m.version, device) != Some(Ordering::Greater) {
            return Err(Refusal::NotNewer {
                bundle: m.version.clone(),
                committed: committed.clone(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::tests::manifest;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap()
    }

    #[test]
    fn check_manifest_covers_every_rule() {
        let facts =
            |compat: &str, committed: Option<&str>, epoch: u64, pin: Option<&str>| DeviceFacts {
                compatible: compat.into(),
                committed_version: committed.map(v),
                security_epoch: epoch,
                pinned_version: pin.map(v),
            };
        let m = manifest(); // metrica-test 1.2.3 epoch 2
        let cases: Vec<(DeviceFacts, Result<(), Refusal>)> = vec![
            (facts("metrica-test", Some("1.2.2"), 2, None), Ok(())),
            (facts("metrica-test", None, 0, None), Ok(())),
            (facts("metrica-test", Some("1.2.3-rc.1"), 1, None), Ok(())),
            (
                facts("other", Some("1.0.0"), 0, None),
                Err(Refusal::Incompatible {
                    bundle: "metrica-test".into(),
                    device: "other".into(),
                }),
            ),
            (
                facts("metrica-test", Some("1.2.3"), 2, None),
                Err(Refusal::NotNewer { bundle: v("1.2.3"), committed: v("1.2.3") }),
            ),
            (
                facts("metrica-test", Some("1.2.3+build.7"), 2, None),
                Err(Refusal::NotNewer { bundle: v("1.2.3"), committed: v("1.2.3+build.7") }),
            ),
            (
                facts("metrica-test", Some("2.0.0"), 2, None),
                Err(Refusal::NotNewer { bundle: v("1.2.3"), committed: v("2.0.0") }),
            ),
            (
                facts("metrica-test", Some("1.0.0"), 3, None),
                Err(Refusal::EpochTooLow { bundle: 2, device: 3 }),
            ),
            // A pin allows an older version, but not a lower epoch, and only the pinned one.
            (facts("metrica-test", Some("2.0.0"), 2, Some("1.2.3")), Ok(())),
            (
                facts("metrica-test", Some("2.0.0"), 3, Some("1.2.3")),
                Err(Refusal::EpochTooLow { bundle: 2, device: 3 }),
            ),
            (
                facts("metrica-test", Some("1.0.0"), 2, Some("1.2.4")),
                Err(Refusal::NotPinned { bundle: v("1.2.3"), pinned: v("1.2.4") }),
            ),
            // Compatibility is checked first.
            (
                facts("other", Some("9.0.0"), 9, Some("0.1.0")),
                Err(Refusal::Incompatible {
                    bundle: "metrica-test".into(),
                    device: "other".into(),
                }),
            ),
        ];
        for (device, want) in cases {
            assert_eq!(check_manifest(&m, &device), want, "{device:?}");
        }
    }

    #[test]
    fn refusal_texts_are_the_ones_logs_and_status_show() {
        let cases = [
            (
                Refusal::Incompatible { bundle: "a".into(), device: "b".into() },
                "bundle is for \"a\", this device is \"b\"",
            ),
            (
                Refusal::EpochTooLow { bundle: 1, device: 2 },
                "security epoch 1 is below the device's 2",
            ),
            (
                Refusal::NotNewer { bundle: v("1.0.0"), committed: v("1.1.0") },
                "version 1.0.0 is not newer than the committed 1.1.0",
            ),
            (
                Refusal::NotPinned { bundle: v("1.0.0"), pinned: v("0.9.0") },
                "version 1.0.0 is not the pinned 0.9.0",
            ),
        ];
        for (refusal, text) in cases {
            assert_eq!(refusal.to_string(), text);
        }
    }

    #[test]
    fn versions_compare_by_precedence() {
        let device = |committed: Option<&str>| DeviceFacts {
            compatible: "x".into(),
            committed_version: committed.map(v),
            security_epoch: 0,
            pinned_version: None,
        };
        assert!(same_version(&v("1.2.3"), &v("1.2.3+build.7")));
        assert!(!same_version(&v("1.2.3"), &v("1.2.3-rc.1")));
        assert_eq!(against_committed(&v("1.2.3"), &device(None)), None);
        assert_eq!(
            against_committed(&v("1.2.3"), &device(Some("1.2.3-rc.1"))),
            Some(Ordering::Greater)
        );
        assert_eq!(against_committed(&v("1.2.3+b"), &device(Some("1.2.3"))), Some(Ordering::Equal));
        assert_eq!(against_committed(&v("1.2.3"), &device(Some("1.10.0"))), Some(Ordering::Less));
    }
}
