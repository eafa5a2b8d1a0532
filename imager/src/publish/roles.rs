//! Publishing role bundles: `imager publish X.mfr` and `imager channel ... --role NAME`.
//!
//! A role bundle is laid out as `<folder>/roles/<name>/<version>.mfr` (mode 0644, never
//! replaced by different bytes) and offered by the channel's `[roles.<name>]` target, which
//! rolls out like `[os]` (percent, segments, waves, `paused`, `pin`) and has per-device
//! overrides (`[devices.<id>.roles.<name>]`). The channel must exist already (its `[os]`
//! target is mandatory): publish an OS bundle to it first.

use super::*;
use updater::channel::{RoleOverride, RolePin, RoleTarget};

/// A role bundle verified and described for a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleFacts {
    pub name: String,
    pub version: Version,
    pub size: u64,
    pub sha256: String,
}

/// Verifies a role bundle completely against `keyring` (signature, every member, role.toml)
/// and hashes the file.
pub fn role_facts(path: &Path, keyring: &Keyring, progress: &Progress) -> Result<RoleFacts> {
    let len = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?.len();
    let v = crate::role::verify(path, len, keyring, progress)
        .with_context(|| format!("verifying the role bundle {}", path.display()))?;
    let (size, sha256) = hash_file(path, progress)?;
    Ok(RoleFacts { name: v.manifest.name, version: v.manifest.version, size, sha256 })
}

/// What to publish.
#[derive(Debug, Clone)]
pub struct RolePublishRequest<'a> {
    pub folder: &'a Path,
    pub channel: &'a str,
    pub bundle: &'a Path,
    /// Keys the bundle must verify against (the devices' keyring).
    pub keyring: &'a Keyring,
    pub rollout: Rollout,
}

/// Verifies the role bundle, copies it to `roles/<name>/<version>.mfr`, and sets the channel's
/// `[roles.<name>]` target to it (keeping the target's `paused` and `pin`); bumps the sequence
/// and re-signs the channel.
pub fn publish_role(
    req: &RolePublishRequest<'_>,
    signer: &Signer<'_>,
    progress: &Progress,
) -> Result<Published> {
    check_name(req.channel)?;
    let facts = role_facts(req.bundle, req.keyring, progress)?;
    let mut ch = existing(req.folder, req.channel)?;
    let old = ch.roles.get(&facts.name);
    if let Some(old) = old {
        if facts.version.cmp_precedence(&old.version) == std::cmp::Ordering::Less {
            bail!(
                "channel {} offers role {} {}; {} is older (use `imager channel pin --role {}` to \
                 send devices back)",
                req.channel,
                facts.name,
                old.version,
                facts.version,
                facts.name
            );
        }
    }
    let rel = format::role_bundle_path(&facts.name, &facts.version);
    let dest = req.folder.join(&rel);
    copy_bundle(req.bundle, &dest, facts.size, &facts.sha256, progress)?;
    let mut target = RoleTarget::new(
        facts.version.clone(),
        vec![format!("../{rel}")],
        facts.size,
        facts.sha256.clone(),
        req.rollout.clone(),
    );
    if let Some(old) = old {
        target.paused = old.paused;
        target.pin = old.pin.clone();
    }
    ch.roles.insert(facts.name.clone(), target);
    ch.sequence += 1;
    let mut published = sign_and_write(req.folder, ch, signer)?;
    published.bundle = Some(dest);
    Ok(published)
}

fn existing(folder: &Path, channel: &str) -> Result<Channel> {
    read_channel(folder, channel)?.with_context(|| {
        format!(
            "{} does not exist: a channel starts with an OS bundle (imager publish X.mfb)",
            folder.join(format::document_path(channel)).display()
        )
    })
}

/// An edit of one role's target in a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoleEdit {
    /// Changes the role's rollout.
    Set(RolloutChange),
    Pause,
    Resume,
    /// Pins the role to `version`, whose bundle must be in `roles/<name>/`.
    Pin {
        version: Version,
        reason: String,
        expires: Option<Timestamp>,
    },
    Unpin,
    /// Sets (`Some`) or removes (`None`) `devices.<id>.roles.<name>`.
    Device {
        id: String,
        entry: Option<RoleOverride>,
    },
}

/// Applies `edit` to the `[roles.<role>]` target of the channel, bumps its sequence and
/// re-signs it. `keyring` verifies the bundle a pin names.
pub fn edit_role(
    folder: &Path,
    channel: &str,
    role: &str,
    edit: &RoleEdit,
    keyring: &Keyring,
    signer: &Signer<'_>,
    progress: &Progress,
) -> Result<Published> {
    check_name(channel)?;
    let mut ch = existing(folder, channel)?;
    if let RoleEdit::Device { id, entry } = edit {
        edit_device(&mut ch, role, id, entry.as_ref())?;
    } else {
        let target = ch.roles.get_mut(role).with_context(|| {
            format!("channel {channel} has no role {role:?}: publish its bundle first (imager publish X.mfr)")
        })?;
        match edit {
            RoleEdit::Set(change) => change.apply(&mut target.rollout),
            RoleEdit::Pause => target.paused = true,
            RoleEdit::Resume => target.paused = false,
            RoleEdit::Unpin => {
                if target.pin.take().is_none() {
                    bail!("role {role} of channel {channel} is not pinned");
                }
            }
            RoleEdit::Pin { version, reason, expires } => {
                target.pin = Some(role_pin(
                    folder, role, version, reason, *expires, keyring, signer, progress,
                )?);
            }
            RoleEdit::Device { .. } => unreachable!("handled above"),
        }
    }
    ch.sequence += 1;
    sign_and_write(folder, ch, signer)
}

fn edit_device(ch: &mut Channel, role: &str, id: &str, entry: Option<&RoleOverride>) -> Result<()> {
    if !format::is_valid_name(role) {
        bail!("role name {role:?} must be 1-64 of a-z, 0-9, '.', '_', '-'");
    }
    match entry {
        None => {
            let d = ch.devices.get_mut(id);
            if d.and_then(|d| d.roles.remove(role)).is_none() {
                bail!("channel {} has no entry for role {role} of device {id:?}", ch.name);
            }
            if ch.devices.get(id).is_some_and(|d| *d == format::DeviceOverride::default()) {
                ch.devices.remove(id);
            }
        }
        Some(e) if *e == RoleOverride::default() => {
            bail!("device {id:?}, role {role}: give at least one override (or remove the entry)")
        }
        Some(e) => {
            ch.devices.entry(id.to_string()).or_default().roles.insert(role.to_string(), e.clone());
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn role_pin(
    folder: &Path,
    role: &str,
    version: &Version,
    reason: &str,
    expires: Option<Timestamp>,
    keyring: &Keyring,
    signer: &Signer<'_>,
    progress: &Progress,
) -> Result<RolePin> {
    check_pin(reason, expires, signer.now)?;
    let rel = format::role_bundle_path(role, version);
    let path = folder.join(&rel);
    if !path.is_file() {
        bail!("no bundle of role {role} version {version}: {} does not exist", path.display());
    }
    let facts = role_facts(&path, keyring, progress)?;
    if facts.name != role || facts.version != *version {
        bail!(
            "{} holds role {} {}, not {role} {version}",
            path.display(),
            facts.name,
            facts.version
        );
    }
    Ok(RolePin {
        version: facts.version,
        reason: reason.to_string(),
        expires,
        urls: vec![format!("../{rel}")],
        size: facts.size,
        sha256: facts.sha256,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::tests::{setup, Setup, T0};
    use updater::role::bundle::testkit::{make_role_bundle, write_role};

    impl Setup {
        /// Publishes an OS bundle so that the channel exists.
        fn channel(&self) {
            self.publish(&self.bundle("1.0.0", 1), 100, T0).unwrap();
        }

        fn role(&self, version: &str, key: &SigningKey) -> PathBuf {
            let role = self.dir.path().join(format!("cam-{version}"));
            write_role(&role, "cam", version);
            let out = self.dir.path().join(format!("out-{version}"));
            std::fs::create_dir_all(&out).unwrap();
            make_role_bundle(&role, &[], key, &out)
        }

        fn publish_role(&self, bundle: &Path, percent: u8) -> Result<Published> {
            let req = RolePublishRequest {
                folder: &self.folder,
                channel: "stable",
                bundle,
                keyring: &self.ring,
                rollout: Rollout { percent, ..Rollout::everyone() },
            };
            publish_role(&req, &self.signer(T0), &Progress::quiet())
        }

        fn edit_role(&self, e: &RoleEdit) -> Result<Published> {
            let q = Progress::quiet();
            edit_role(&self.folder, "stable", "cam", e, &self.ring, &self.signer(T0), &q)
        }
    }

    #[test]
    fn publish_lays_out_the_role_bundle_and_sets_the_role_target() {
        use std::os::unix::fs::PermissionsExt;
        let s = setup();
        s.channel();
        let b = s.role("1.0.0", &s.key);
        let p = s.publish_role(&b, 30).unwrap();
        let dest = s.folder.join("roles/cam/1.0.0.mfr");
        assert_eq!(p.bundle.as_deref(), Some(dest.as_path()));
        assert_eq!(std::fs::read(&dest).unwrap(), std::fs::read(&b).unwrap());
        assert_eq!(std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777, 0o644);
        let t = &p.channel.roles["cam"];
        assert_eq!(t.urls, vec!["../roles/cam/1.0.0.mfr".to_string()]);
        assert_eq!(t.size, std::fs::metadata(&b).unwrap().len());
        assert_eq!(t.sha256, hex::encode(Sha256::digest(std::fs::read(&b).unwrap())));
        assert_eq!((t.version.to_string(), t.rollout.percent), ("1.0.0".into(), 30));
        assert_eq!(p.channel.sequence, 2);
        assert_eq!(p.channel.os.version.to_string(), "1.0.0", "the OS target is kept");
        // The document on disk verifies as a device reads it.
        let doc = std::fs::read(&p.document).unwrap();
        let sig = std::fs::read(&p.signature).unwrap();
        let e = format::Expect { keyring: &s.ring, name: "stable", last_sequence: None, now: T0 };
        assert_eq!(format::verify(&doc, Some(&sig), &e).unwrap().channel.roles["cam"], *t);
        assert!(describe(&p.channel, T0).contains("role      cam 1.0.0"));
    }

    #[test]
    fn role_edits_pause_pin_rollout_and_devices() {
        let s = setup();
        s.channel();
        s.publish_role(&s.role("1.0.0", &s.key), 100).unwrap();
        s.publish_role(&s.role("1.1.0", &s.key), 5).unwrap();
        let waves = vec![Wave { at: Timestamp(T0 + 3600), percent: 50 }];
        let change =
            RolloutChange { percent: Some(10), waves: Some(waves.clone()), ..Default::default() };
        let ch = s.edit_role(&RoleEdit::Set(change)).unwrap().channel;
        assert_eq!((ch.roles["cam"].rollout.percent, &ch.roles["cam"].rollout.waves), (10, &waves));
        assert!(s.edit_role(&RoleEdit::Pause).unwrap().channel.roles["cam"].paused);
        // A new release keeps the pause.
        let ch = s.publish_role(&s.role("1.2.0", &s.key), 5).unwrap().channel;
        assert!(ch.roles["cam"].paused);
        assert!(!s.edit_role(&RoleEdit::Resume).unwrap().channel.roles["cam"].paused);

        let pin = RoleEdit::Pin {
            version: "1.0.0".parse().unwrap(),
            reason: "regression".into(),
            expires: None,
        };
        let ch = s.edit_role(&pin).unwrap().channel;
        let p = ch.roles["cam"].pin.as_ref().unwrap();
        assert_eq!(
            (p.version.to_string(), p.urls[0].as_str()),
            ("1.0.0".into(), "../roles/cam/1.0.0.mfr")
        );
        assert!(s.edit_role(&RoleEdit::Unpin).unwrap().channel.roles["cam"].pin.is_none());
        assert!(s.edit_role(&RoleEdit::Unpin).is_err());

        let o = RoleOverride { version_lock: Some("1.0.0".parse().unwrap()), ..Default::default() };
        let dev = RoleEdit::Device { id: "pi-1".into(), entry: Some(o.clone()) };
        let ch = s.edit_role(&dev).unwrap().channel;
        assert_eq!(ch.devices["pi-1"].roles["cam"], o);
        // An OS-level edit of the same device keeps its role overrides.
        let os = format::DeviceOverride { auto_update: Some(false), ..Default::default() };
        let q = Progress::quiet();
        let e = Edit::Device { id: "pi-1".into(), entry: Some(os) };
        let ch = edit(&s.folder, "stable", &e, &s.ring, &s.signer(T0), &q).unwrap().channel;
        assert_eq!(
            (ch.devices["pi-1"].auto_update, &ch.devices["pi-1"].roles["cam"]),
            (Some(false), &o)
        );
        let ch = s.edit_role(&RoleEdit::Device { id: "pi-1".into(), entry: None }).unwrap().channel;
        assert!(ch.devices["pi-1"].roles.is_empty());
    }

    #[test]
    fn bad_role_publishes_and_edits_are_refused() {
        let s = setup();
        let b = s.role("1.0.0", &s.key);
        let err = s.publish_role(&b, 10).unwrap_err();
        assert!(format!("{err:#}").contains("a channel starts with an OS bundle"), "{err:#}");
        s.channel();
        // Signed by a key the devices do not trust.
        let stranger = updater::role::bundle::testkit::test_key(9);
        let err = s.publish_role(&s.role("1.0.1", &stranger), 10).unwrap_err();
        assert!(format!("{err:#}").contains("not in the keyring"), "{err:#}");
        // Tampered: one byte of the file changed.
        let mut bytes = std::fs::read(&b).unwrap();
        let at = bytes.windows(9).position(|w| w == b"services:").unwrap();
        bytes[at] ^= 1;
        let bad = s.dir.path().join("bad.mfr");
        std::fs::write(&bad, bytes).unwrap();
        assert!(s.publish_role(&bad, 10).is_err());
        assert!(!s.folder.join("roles").exists(), "nothing is copied before it verifies");
        // Older than what the channel offers; an edit of a role the channel lacks.
        let err = s.edit_role(&RoleEdit::Pause).unwrap_err();
        assert!(format!("{err:#}").contains("has no role \"cam\""), "{err:#}");
        s.publish_role(&s.role("2.0.0", &s.key), 10).unwrap();
        let err = s.publish_role(&b, 10).unwrap_err();
        assert!(format!("{err:#}").contains("1.0.0 is older"), "{err:#}");
        // A pin without reason, of a version not published, in the past.
        let pin = |v: &str, r: &str, exp: Option<u64>| RoleEdit::Pin {
            version: v.parse().unwrap(),
            reason: r.into(),
            expires: exp.map(Timestamp),
        };
        for (e, want) in [
            (pin("2.0.0", " ", None), "needs a reason"),
            (pin("3.0.0", "x", None), "no bundle of role cam version 3.0.0"),
            (pin("2.0.0", "x", Some(T0 - 1)), "in the past"),
        ] {
            let err = s.edit_role(&e).unwrap_err();
            assert!(format!("{err:#}").contains(want), "{want}: {err:#}");
        }
        let empty = RoleEdit::Device { id: "pi-1".into(), entry: Some(RoleOverride::default()) };
        assert!(format!("{:#}", s.edit_role(&empty).unwrap_err()).contains("at least one override"));
        let none = RoleEdit::Device { id: "pi-1".into(), entry: None };
        assert!(format!("{:#}", s.edit_role(&none).unwrap_err()).contains("no entry for role cam"));
    }
}
