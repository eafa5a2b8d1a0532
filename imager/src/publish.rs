//! `imager publish` and `imager channel ...`: the static folder of DESIGN.md section 6.
//!
//! ```text
//! <folder>/channels/<channel>.toml       the signed channel document (updater::channel)
//! <folder>/channels/<channel>.toml.sig   its detached signature
//! <folder>/bundles/<name>-<version>.mfb  OS bundles, never overwritten once published
//! ```
//!
//! [`publish`] verifies a bundle (signature and every chunk), copies it into `bundles/`, and
//! writes the channel document offering it, with url, size and sha256 taken from the copy.
//! [`edit`] changes a channel (rollout, pause, pin) and re-signs it. Both bump `sequence`,
//! set `published` to now and `expires` to now plus the given validity, and replace the two
//! files atomically (the document first, then the signature: a client that reads in between
//! sees a bad signature, reports it and keeps what it has until its next poll).
//!
//! Bundle URLs in the document are relative (`../bundles/<file>`), so the folder can be
//! served from any web server, CDN or mirror unchanged.

use crate::progress::Progress;
use anyhow::{bail, Context, Result};
use ed25519_dalek::SigningKey;
use semver::Version;
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;
use updater::channel::{
    self as format, Channel, OsTarget, Pin, Rollout, Segment, Timestamp, Wave, CHANNEL_FORMAT,
};
use updater::sign::Keyring;

/// Default validity of a signed channel document: a device ignores it after this long, so
/// the publisher re-signs (any `imager channel` command) before then.
pub const DEFAULT_EXPIRES_IN: Duration = Duration::from_secs(7 * 86_400);

/// What every signing operation needs.
#[derive(Debug, Clone, Copy)]
pub struct Signer<'a> {
    pub key: &'a SigningKey,
    /// How long the new document is valid.
    pub expires_in: Duration,
    /// Unix seconds (the caller's clock).
    pub now: u64,
}

/// The result of [`publish`] or [`edit`].
#[derive(Debug, Clone)]
pub struct Published {
    pub channel: Channel,
    pub document: PathBuf,
    pub signature: PathBuf,
    /// The bundle copied into the folder (publish only).
    pub bundle: Option<PathBuf>,
}

/// A bundle verified and described for a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleFacts {
    pub compatible: String,
    pub version: Version,
    pub security_epoch: u64,
    pub size: u64,
    pub sha256: String,
}

/// Verifies a bundle completely against `keyring` and hashes the file.
pub fn bundle_facts(path: &Path, keyring: &Keyring, progress: &Progress) -> Result<BundleFacts> {
    let step = progress.bar(1, &format!("verifying {}", path.display()));
    let check = updater::bundle::verify_bundle(&mut updater::bundle::file_fetch(path), keyring)
        .with_context(|| format!("verifying the bundle {}", path.display()))?;
    step.finish();
    let (size, sha256) = hash_file(path, progress)?;
    let m = check.manifest.manifest;
    Ok(BundleFacts {
        compatible: m.compatible,
        version: m.version,
        security_epoch: m.security_epoch,
        size,
        sha256,
    })
}

fn hash_file(path: &Path, progress: &Progress) -> Result<(u64, String)> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = f.metadata().with_context(|| format!("reading {}", path.display()))?.len();
    let step = progress.bytes(len, &format!("hashing {}", file_name(path)));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        step.inc(n as u64);
        total += n as u64;
    }
    step.finish();
    Ok((total, hex::encode(h.finalize())))
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into())
}

/// The bundle name for `bundles/<name>-<version>.mfb`: `explicit` if given, else the source
/// file's stem without its `-<version>` suffix (`qemu-1.2.0.mfb` gives `qemu`), else the
/// manifest's `compatible`.
pub fn bundle_name(explicit: Option<&str>, source: &Path, facts: &BundleFacts) -> Result<String> {
    let name = match explicit {
        Some(n) => n.to_string(),
        None => {
            let stem =
                source.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            match stem.strip_suffix(&format!("-{}", facts.version)) {
                Some(n) if format::is_valid_name(n) => n.to_string(),
                _ => facts.compatible.clone(),
            }
        }
    };
    if !format::is_valid_name(&name) {
        bail!("bundle name {name:?} must be 1-64 of a-z, 0-9, '.', '_', '-' (use --name)");
    }
    Ok(name)
}

/// Reads the channel document of a published folder, if there is one (strictly parsed; the
/// signature is the operator's own and is not checked here).
pub fn read_channel(folder: &Path, name: &str) -> Result<Option<Channel>> {
    let path = folder.join(format::document_path(name));
    match std::fs::read(&path) {
        Ok(bytes) => {
            Channel::parse(&bytes).map(Some).with_context(|| format!("reading {}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Signs `channel` (after bumping its sequence and times) and writes both files.
fn sign_and_write(folder: &Path, mut channel: Channel, signer: &Signer<'_>) -> Result<Published> {
    channel.published = Timestamp(signer.now);
    channel.expires = Timestamp(signer.now + signer.expires_in.as_secs().max(1));
    channel.validate().context("the new channel document is not valid")?;
    let (doc, sig) = channel.sign(signer.key);
    let document = folder.join(format::document_path(&channel.name));
    let signature = folder.join(format::signature_path(&channel.name));
    updater::state::write_atomic(&document, &doc, "channel")?;
    updater::state::write_atomic(&signature, &sig, "channel-sig")?;
    Ok(Published { channel, document, signature, bundle: None })
}

fn check_name(channel: &str) -> Result<()> {
    if !format::is_valid_name(channel) {
        bail!("channel name {channel:?} must be 1-64 of a-z, 0-9, '.', '_', '-'");
    }
    Ok(())
}

/// What to publish.
#[derive(Debug, Clone)]
pub struct PublishRequest<'a> {
    pub folder: &'a Path,
    pub channel: &'a str,
    pub bundle: &'a Path,
    /// Bundle name in `bundles/` (see [`bundle_name`]).
    pub name: Option<&'a str>,
    /// Keys the bundle must verify against (the devices' keyring).
    pub keyring: &'a Keyring,
    pub rollout: Rollout,
    /// Use this sequence instead of the next one: after the folder was lost, a new document
    /// must be above the highest sequence the devices have seen, or they refuse it as a
    /// replay. Must be above the folder's current document, if there is one.
    pub sequence: Option<u64>,
}

/// Verifies the bundle, copies it into `bundles/` (never replacing a different file of the
/// same name), and writes the channel document offering it. The channel's pause, pin, roles
/// and devices table are kept; its sequence is bumped.
pub fn publish(
    req: &PublishRequest<'_>,
    signer: &Signer<'_>,
    progress: &Progress,
) -> Result<Published> {
    check_name(req.channel)?;
    let facts = bundle_facts(req.bundle, req.keyring, progress)?;
    let name = bundle_name(req.name, req.bundle, &facts)?;
    let old = read_channel(req.folder, req.channel)?;
    if let Some(old) = &old {
        if old.os.compatible != facts.compatible {
            bail!(
                "channel {} is for {:?}, the bundle is for {:?}",
                req.channel,
                old.os.compatible,
                facts.compatible
            );
        }
        if facts.version.cmp_precedence(&old.os.version) == std::cmp::Ordering::Less {
            bail!(
                "channel {} offers {}; {} is older: to send the devices back, pin it (it is copied into bundles/): imager channel pin --folder {} --channel {} --key KEY --bundle {} --reason WHY",
                req.channel,
                old.os.version,
                facts.version,
                req.folder.display(),
                req.channel,
                req.bundle.display()
            );
        }
    }
    let sequence = match (req.sequence, &old) {
        (Some(s), Some(o)) if s <= o.sequence => bail!(
            "--sequence {s} is not above the current document's {} (devices would refuse it)",
            o.sequence
        ),
        (Some(s), _) => s,
        (None, Some(o)) => o.sequence + 1,
        (None, None) => 1,
    };
    let rel = format::bundle_path(&name, &facts.version);
    let dest = req.folder.join(&rel);
    copy_bundle(req.bundle, &dest, facts.size, &facts.sha256, progress)?;
    let os = OsTarget {
        compatible: facts.compatible.clone(),
        version: facts.version.clone(),
        urls: vec![format!("../{rel}")],
        size: facts.size,
        sha256: facts.sha256.clone(),
        security_epoch: facts.security_epoch,
        rollout: req.rollout.clone(),
    };
    let channel = match old {
        Some(old) => Channel { sequence, os, ..old },
        None => Channel {
            format: CHANNEL_FORMAT,
            name: req.channel.to_string(),
            sequence,
            published: Timestamp(signer.now),
            expires: Timestamp(signer.now + 1),
            paused: false,
            os,
            pin: None,
            roles: Default::default(),
            devices: Default::default(),
        },
    };
    let mut published = sign_and_write(req.folder, channel, signer)?;
    published.bundle = Some(dest);
    Ok(published)
}

/// Copies a verified bundle (`size` bytes, `sha256`) to `dest` (temp file, mode 0644, fsync,
/// rename). An existing file with the same sha256 is kept; a different one is an error:
/// published files never change.
fn copy_bundle(
    src: &Path,
    dest: &Path,
    size: u64,
    sha256: &str,
    progress: &Progress,
) -> Result<()> {
    if dest.exists() {
        let (_, sha) = hash_file(dest, &Progress::quiet())?;
        if sha == sha256 {
            progress.line(&format!("{} is already published", dest.display()));
            return Ok(());
        }
        bail!(
            "{} exists with other content (sha256 {sha}); a published bundle is never replaced: \
             publish a new version",
            dest.display()
        );
    }
    let dir = dest.parent().context("bundle path has no folder")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    let mut from =
        std::fs::File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let step = progress.bytes(size, &format!("copying {}", file_name(dest)));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = from.read(&mut buf).with_context(|| format!("reading {}", src.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        tmp.write_all(&buf[..n]).with_context(|| format!("writing {}", dest.display()))?;
        step.inc(n as u64);
    }
    step.finish();
    if hex::encode(h.finalize()) != sha256 {
        bail!("{} changed while it was being published", src.display());
    }
    // Readable by a web server running as another user, like the channel files.
    use std::os::unix::fs::PermissionsExt;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))
        .with_context(|| format!("setting the mode of {}", dest.display()))?;
    tmp.as_file().sync_all().with_context(|| format!("syncing {}", dest.display()))?;
    tmp.persist(dest).with_context(|| format!("renaming into {}", dest.display()))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))?;
    Ok(())
}

/// A change to the rollout of `imager channel set` (fields left `None` are kept).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RolloutChange {
    pub percent: Option<u8>,
    pub segments: Option<BTreeSet<Segment>>,
    /// `Some(None)` removes `not_before`.
    pub not_before: Option<Option<Timestamp>>,
    /// `Some(vec![])` removes the waves.
    pub waves: Option<Vec<Wave>>,
}

impl RolloutChange {
    pub fn apply(&self, r: &mut Rollout) {
        if let Some(p) = self.percent {
            r.percent = p;
        }
        if let Some(s) = &self.segments {
            r.segments = s.clone();
        }
        if let Some(nb) = self.not_before {
            r.not_before = nb;
        }
        if let Some(w) = &self.waves {
            r.waves = w.clone();
        }
    }
}

/// An edit of a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit {
    /// Changes the OS rollout; with no change it only re-signs (a new `expires`).
    Set(RolloutChange),
    Pause,
    Resume,
    /// Pins the fleet to a version: its bundle is found in the folder's `bundles/` by
    /// `version`, or given as `bundle` (verified, then copied into `bundles/` as an archive
    /// entry; `version`, if given too, must match it).
    Pin {
        version: Option<Version>,
        bundle: Option<PathBuf>,
        reason: String,
        expires: Option<Timestamp>,
    },
    Unpin,
    /// Sets (`Some`) or removes (`None`) the `devices.<id>` entry of one device.
    Device {
        id: String,
        entry: Option<format::DeviceOverride>,
    },
}

/// Applies `edit` to the channel of a published folder, bumps its sequence and re-signs it.
/// `keyring` verifies the bundle a pin names.
pub fn edit(
    folder: &Path,
    channel: &str,
    edit: &Edit,
    keyring: &Keyring,
    signer: &Signer<'_>,
    progress: &Progress,
) -> Result<Published> {
    check_name(channel)?;
    let mut ch = read_channel(folder, channel)?.with_context(|| {
        format!(
            "{} does not exist: publish a bundle to the channel first (imager publish)",
            folder.join(format::document_path(channel)).display()
        )
    })?;
    match edit {
        Edit::Set(change) => change.apply(&mut ch.os.rollout),
        Edit::Pause => ch.paused = true,
        Edit::Resume => ch.paused = false,
        Edit::Unpin => {
            if ch.pin.take().is_none() {
                bail!("channel {channel} is not pinned");
            }
        }
        Edit::Device { id, entry: None } => {
            if ch.devices.remove(id).is_none() {
                bail!("channel {channel} has no entry for device {id:?}");
            }
        }
        Edit::Device { id, entry: Some(entry) } => {
            if *entry == format::DeviceOverride::default() {
                bail!("device {id:?}: give at least one override (or remove the entry)");
            }
            // The device's role overrides are edited with `--role` and kept here.
            let roles = ch.devices.get(id).map(|d| d.roles.clone()).unwrap_or_default();
            ch.devices.insert(id.clone(), format::DeviceOverride { roles, ..entry.clone() });
        }
        Edit::Pin { version, bundle, reason, expires } => {
            check_pin(reason, *expires, signer.now)?;
            let (path, facts) = match (bundle, version) {
                (Some(b), v) => archive_bundle(folder, b, v.as_ref(), keyring, progress)?,
                (None, Some(v)) => find_bundle(folder, v, keyring, progress)?,
                (None, None) => bail!("a pin needs --version VERSION or --bundle FILE"),
            };
            if facts.compatible != ch.os.compatible {
                bail!(
                    "{} is for {:?}, channel {channel} is for {:?}",
                    path.display(),
                    facts.compatible,
                    ch.os.compatible
                );
            }
            let rel = path.strip_prefix(folder).unwrap_or(&path).to_string_lossy().into_owned();
            ch.pin = Some(Pin {
                version: facts.version,
                reason: reason.clone(),
                expires: *expires,
                compatible: facts.compatible,
                urls: vec![format!("../{rel}")],
                size: facts.size,
                sha256: facts.sha256,
                security_epoch: facts.security_epoch,
            });
        }
    }
    ch.sequence += 1;
    sign_and_write(folder, ch, signer)
}

/// A pin (of the OS or of a role) needs a reason and an expiry, if any, in the future.
fn check_pin(reason: &str, expires: Option<Timestamp>, now: u64) -> Result<()> {
    if reason.trim().is_empty() {
        bail!("a pin needs a reason (--reason)");
    }
    if let Some(e) = expires.filter(|e| e.0 <= now) {
        bail!("the pin's expiry {e} is in the past");
    }
    Ok(())
}

/// Verifies a bundle given for a pin and copies it into `<folder>/bundles/` (kept there like
/// any published bundle) without offering it: the archive entry the pin points at.
fn archive_bundle(
    folder: &Path,
    bundle: &Path,
    version: Option<&Version>,
    keyring: &Keyring,
    progress: &Progress,
) -> Result<(PathBuf, BundleFacts)> {
    let facts = bundle_facts(bundle, keyring, progress)?;
    if let Some(v) = version.filter(|v| **v != facts.version) {
        bail!("{} holds version {}, not {v} (--version)", bundle.display(), facts.version);
    }
    let name = bundle_name(None, bundle, &facts)?;
    let dest = folder.join(format::bundle_path(&name, &facts.version));
    copy_bundle(bundle, &dest, facts.size, &facts.sha256, progress)?;
    Ok((dest, facts))
}

/// The published bundle of `version` in `<folder>/bundles/` (`*-<version>.mfb`), verified.
fn find_bundle(
    folder: &Path,
    version: &Version,
    keyring: &Keyring,
    progress: &Progress,
) -> Result<(PathBuf, BundleFacts)> {
    let dir = folder.join(format::BUNDLES_DIR);
    let suffix = format!("-{version}.mfb");
    let mut found = Vec::new();
    let mut others = Vec::new();
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries.collect::<Vec<_>>(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    for e in entries {
        let p = e.with_context(|| format!("reading {}", dir.display()))?.path();
        let n = file_name(&p);
        if n.ends_with(&suffix) {
            found.push(p);
        } else if n.ends_with(".mfb") {
            others.push(n);
        }
    }
    found.sort();
    let Some(path) = found.first().cloned() else {
        others.sort();
        bail!(
            "no bundle of version {version} in {} (it holds: {}); give the bundle itself with --bundle FILE (it is verified and copied there)",
            dir.display(),
            if others.is_empty() { "nothing".to_string() } else { others.join(", ") }
        );
    };
    if found.len() > 1 {
        bail!("several bundles of version {version} in {}: {found:?}", dir.display());
    }
    let facts = bundle_facts(&path, keyring, progress)?;
    if facts.version != *version {
        bail!("{} holds version {}, not {version}", path.display(), facts.version);
    }
    Ok((path, facts))
}

/// Parses a wave schedule: `PERCENT@WHEN` items separated by commas, where WHEN is an RFC
/// 3339 time or `+DURATION` after `start` (`1@+0s,5@+1h,25@+4h,100@+24h`).
pub fn parse_waves(spec: &str, start: u64) -> Result<Vec<Wave>> {
    let mut waves = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (p, when) = item
            .split_once('@')
            .with_context(|| format!("wave {item:?}: expected PERCENT@WHEN (e.g. 5@+1h)"))?;
        let percent: u8 = p
            .trim()
            .trim_end_matches('%')
            .parse()
            .ok()
            .filter(|p| *p <= 100)
            .with_context(|| format!("wave {item:?}: percent {p:?} is not 0 to 100"))?;
        let at = parse_when(when.trim(), start).with_context(|| format!("wave {item:?}"))?;
        waves.push(Wave { at, percent });
    }
    if waves.is_empty() {
        bail!("empty wave schedule {spec:?}");
    }
    Ok(waves)
}

/// `now`, an RFC 3339 time, or `+DURATION` after `start`.
pub fn parse_when(s: &str, start: u64) -> Result<Timestamp> {
    if s == "now" {
        return Ok(Timestamp(start));
    }
    if let Some(rel) = s.strip_prefix('+') {
        let d = humantime::parse_duration(rel)
            .with_context(|| format!("{rel:?} is not a duration (e.g. 90m, 4h, 1d)"))?;
        return Ok(Timestamp(start + d.as_secs()));
    }
    s.parse::<Timestamp>().map_err(anyhow::Error::msg)
}

/// Parses `canary,early,general` (any non-empty subset).
pub fn parse_segments(s: &str) -> Result<BTreeSet<Segment>> {
    let set = s
        .split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| x.parse::<Segment>().map_err(anyhow::Error::msg))
        .collect::<Result<BTreeSet<_>>>()?;
    if set.is_empty() {
        bail!("no segment given (canary, early, general)");
    }
    Ok(set)
}

/// A one-screen summary of a channel for the operator.
pub fn describe(ch: &Channel, now: u64) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let r = &ch.os.rollout;
    let _ = writeln!(s, "channel   {} (sequence {})", ch.name, ch.sequence);
    let _ = writeln!(s, "published {}  expires {}", ch.published, ch.expires);
    let _ = writeln!(
        s,
        "os        {} {} ({} bytes, epoch {})",
        ch.os.compatible, ch.os.version, ch.os.size, ch.os.security_epoch
    );
    let segs: Vec<&str> = r.segments.iter().map(|x| x.as_str()).collect();
    let _ = writeln!(s, "rollout   {}% now, segments {}", r.percent_at(now), segs.join(","));
    if let Some(nb) = r.not_before {
        let _ = writeln!(s, "          not before {nb}");
    }
    for w in &r.waves {
        let _ = writeln!(s, "          wave {}% at {}", w.percent, w.at);
    }
    if ch.paused {
        let _ = writeln!(s, "PAUSED    no device starts an update");
    }
    if let Some(p) = &ch.pin {
        let until = p.expires.map_or("unpinned".to_string(), |e| e.to_string());
        let _ = writeln!(s, "PINNED    {} until {until}: {}", p.version, p.reason);
    }
    for (name, r) in &ch.roles {
        let paused = if r.paused { ", PAUSED" } else { "" };
        let pin = r.pin.as_ref().map_or(String::new(), |p| format!(", PINNED {}", p.version));
        let pct = r.rollout.percent_at(now);
        let _ = writeln!(
            s,
            "role      {name} {} ({} bytes, {pct}% now{paused}{pin})",
            r.version, r.size
        );
    }
    for (id, o) in &ch.devices {
        let _ = writeln!(s, "device    {id}: {o:?}");
    }
    s
}

pub mod roles;
#[cfg(test)]
mod tests;
