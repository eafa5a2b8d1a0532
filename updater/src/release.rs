//! `/etc/metrica/release.toml` in every root filesystem: what the slot holds.

use serde::{Deserialize, Serialize};

/// Path of the release file inside a root filesystem.
pub const RELEASE_PATH: &str = "/etc/metrica/release.toml";

/// Identity of an OS build, written by the imager into the root filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Release {
    /// Recipe name, e.g. `metrica-qemu`.
    pub name: String,
    pub version: semver::Version,
    /// What hardware the build is for; bundles for another `compatible` are refused.
    pub compatible: String,
    /// `SOURCE_DATE_EPOCH` of the build.
    pub build_epoch: u64,
    /// Anti-rollback epoch of the build (the recipe's `security_epoch`): a device whose
    /// committed slot holds this release refuses bundles below it.
    #[serde(default)]
    pub security_epoch: u64,
}

impl Release {
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("release serializes")
    }

    pub fn from_toml(text: &str) -> Result<Release, toml::de::Error> {
        toml::from_str(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let r = Release {
            name: "metrica-qemu".into(),
            version: "1.2.3".parse().unwrap(),
            compatible: "metrica-qemu-arm64".into(),
            build_epoch: 1_700_000_000,
            security_epoch: 2,
        };
        assert_eq!(Release::from_toml(&r.to_toml()).unwrap(), r);
        assert!(Release::from_toml("name = 1").is_err());
        // Release files written before security_epoch existed read as epoch 0.
        let old = "name = \"x\"\nversion = \"1.0.0\"\ncompatible = \"c\"\nbuild_epoch = 1\n";
        assert_eq!(Release::from_toml(old).unwrap().security_epoch, 0);
    }
}
