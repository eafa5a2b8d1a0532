//! What a bundle is checked against before the first byte is written: the device's facts
//! (compatible, committed version, security epoch) and the state's install preconditions.

use super::Device;
use crate::bootinfo::BootInfo;
use crate::bundle::Manifest;
use crate::install::{check_manifest, DeviceFacts, Policy, Refusal as InstallRefusal};
use crate::layout::Slot;
use crate::release::Release;
use crate::state::State;
use anyhow::{Context, Result};

impl Device {
    /// What the install policy checks bundles against: the committed slot's release
    /// (`compatible`, version) and the recorded security epoch.
    pub fn device_facts(&self, s: &State, running: Option<&Release>) -> Result<DeviceFacts> {
        let release =
            self.slot_release(s.committed).or_else(|| running.cloned()).with_context(|| {
                format!(
                    "cannot tell this device's compatible: no {} in {}",
                    crate::release::RELEASE_PATH,
                    s.committed.root().label
                )
            })?;
        Ok(DeviceFacts {
            compatible: release.compatible,
            committed_version: s.slot(s.committed).version.clone().or(Some(release.version)),
            security_epoch: s.security_epoch,
            pinned_version: None,
        })
    }
}

/// The install policy of the `install` command: the pure manifest check against the device's
/// facts, then, before the first byte is written, the install recorded in the state
/// (`installing`), which refuses a version that failed before unless `allow_bad`.
pub struct InstallPolicy<'a> {
    pub device: &'a Device,
    pub facts: DeviceFacts,
    pub target: Slot,
    pub allow_bad: bool,
    pub booted: Option<&'a BootInfo>,
    pub now: u64,
}

impl Policy for InstallPolicy<'_> {
    fn check(&self, m: &Manifest) -> Result<(), InstallRefusal> {
        check_manifest(m, &self.facts)?;
        let (_, slot) = self
            .device
            .begin_install(&m.version, m.security_epoch, self.allow_bad, self.booted, self.now)
            .map_err(|e| InstallRefusal::Policy(format!("{e:#}")))?;
        if slot != self.target {
            return Err(InstallRefusal::Policy(format!(
                "the state names slot {slot} as inactive, not slot {}",
                self.target
            )));
        }
        Ok(())
    }
}
