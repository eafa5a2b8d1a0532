//! The `imager` command line. `main.rs` only calls [`main`]; docs/cli.md is generated from
//! these definitions and a test keeps it in step.

use crate::build::{build, BuildOptions};
use crate::progress::Progress;
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use updater::sign::Keyring;

#[derive(Debug, Parser)]
#[command(name = "imager", version, about = "Builds, inspects and signs Metrica Fleet OS images")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build a disk image (.img, .img.zst, .bmap, manifest) from a recipe.
    Build {
        /// The recipe, e.g. recipes/qemu.toml.
        recipe: PathBuf,
        /// Output folder (created); files are named <name>-<version>.*
        #[arg(long, short)]
        output: PathBuf,
        /// Build this version instead of the recipe's (e.g. 2.0.0 for an update).
        #[arg(long)]
        version: Option<semver::Version>,
        /// Timestamp of every file (seconds since 1970); the same value gives the same bytes.
        #[arg(long, env = "SOURCE_DATE_EPOCH")]
        source_date_epoch: Option<u64>,
        /// zstd level of the .img.zst.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
        zstd_level: i32,
        /// Print the build report as JSON on stdout.
        #[arg(long)]
        json: bool,
        /// Do not write the OS bundle (.mfb), even when the recipe names a signing key.
        #[arg(long)]
        no_bundle: bool,
        /// Use only cached bootstraps and packages; fail instead of downloading.
        #[arg(long)]
        offline: bool,
    },
    /// Show what an image or a bundle holds (partitions, autoboot.txt, slots; manifest and
    /// signature), or read one file from an image.
    Inspect {
        /// A disk image made by `imager build`, an OS bundle (.mfb) or a role bundle (.mfr).
        path: PathBuf,
        /// Check a bundle's signature against this keyring: a folder of *.pub.pem files, or one
        /// key file (public, or a private key's public half).
        #[arg(long, value_name = "DIR|FILE")]
        keyring: Option<PathBuf>,
        /// Print one file, as PARTITION:/path (e.g. root_a:/etc/os-release or boot_a:/cmdline.txt).
        #[arg(long, value_name = "PARTITION:/PATH")]
        cat: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Generate an ed25519 signing key: DIR/NAME.key (private, mode 0600) and DIR/NAME.pub.pem.
    Keygen {
        /// Folder for the key files (created).
        #[arg(long, default_value = "keys")]
        dir: PathBuf,
        /// File name stem, e.g. metrica-dev or fleet-2026.
        #[arg(long)]
        name: String,
        /// Print the key id and files as JSON on stdout (docs/cli-json.md).
        #[arg(long)]
        json: bool,
    },
    /// Write an image to an SD card (block device) or a file through its block map, then read
    /// it back against the map's checksums. Refuses a mounted target, the disk this machine
    /// runs from, a target smaller than the image, and an image that does not match its map.
    Flash {
        /// The image: `.img`, or `.img.zst` (decompressed as it streams, no temporary copy).
        image: PathBuf,
        /// A block device (e.g. /dev/sdX, /dev/mmcblkN) or a file: a missing or empty file is
        /// created sparse with the image's size; a larger file is written like a card.
        target: PathBuf,
        /// The block map; default: NAME.bmap or NAME.img.bmap next to NAME.img[.zst].
        #[arg(long, value_name = "FILE")]
        bmap: Option<PathBuf>,
        /// Without a block map: write every byte of the image (slower; a file target is not
        /// sparse), still read back and checked against the image's own checksums.
        #[arg(long, conflicts_with = "bmap")]
        nobmap: bool,
        /// Do not ask before writing (without it, flash asks on a terminal and refuses
        /// without one).
        #[arg(long, short)]
        yes: bool,
        /// Skip reading the written ranges back.
        #[arg(long)]
        no_verify: bool,
        /// Print the report as JSON on stdout.
        #[arg(long)]
        json: bool,
        /// Provision in the same pass: any of these writes the provision partition for one
        /// device after the image (see `imager provision`).
        #[command(flatten, next_help_heading = "Provisioning (one device)")]
        device: crate::provision::DeviceArgs,
    },
    /// Write the provision partition: of an image file or card in place, of per-device copies
    /// of an image (--output), or onto cards flashed one after the other (TARGET). Every device
    /// and file is validated before anything is written.
    Provision(ProvisionArgs),
    /// Make a signed OS bundle (.mfb) from an image built by `imager build`.
    Bundle {
        /// The disk image; its boot_a and root_a partitions go into the bundle.
        image: PathBuf,
        /// The private key that signs the bundle.
        #[arg(long)]
        key: PathBuf,
        /// The bundle file to write.
        #[arg(long, short)]
        output: PathBuf,
        /// The security epoch carried by the bundle (anti-rollback); default: the one the
        /// image's release file records.
        #[arg(long)]
        security_epoch: Option<u64>,
        /// `created` time of the manifest (seconds since 1970).
        #[arg(long, env = "SOURCE_DATE_EPOCH")]
        source_date_epoch: Option<u64>,
        /// Print what was written as JSON on stdout (docs/cli-json.md).
        #[arg(long)]
        json: bool,
    },
    /// Publish an OS bundle to a channel: verify it, copy it to FOLDER/bundles/, and write the
    /// signed FOLDER/channels/CHANNEL.toml (and .sig) offering it, with the next sequence.
    /// Any static web server can serve FOLDER (docs/channels.md). A role bundle (.mfr) goes to
    /// FOLDER/roles/NAME/VERSION.mfr and sets the channel's [roles.NAME] target instead.
    Publish {
        /// The OS bundle (.mfb), e.g. made by `imager build` or `imager bundle`, or a role
        /// bundle (.mfr) made by `imager role build`.
        bundle: PathBuf,
        #[command(flatten)]
        target: ChannelArgs,
        /// The bundle must verify against this keyring (a folder of the devices' *.pub.pem
        /// keys, or one key file); default: the public half of --key.
        #[arg(long, value_name = "DIR|FILE")]
        keyring: Option<PathBuf>,
        /// Name of the bundle file in FOLDER/bundles/ (NAME-VERSION.mfb); default: the
        /// bundle's file name without its version, or its `compatible`.
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        rollout: RolloutArgs,
        /// Use this sequence instead of the next one, e.g. after the folder was lost: above
        /// the highest the devices have seen (their status shows it), or they refuse it.
        #[arg(long)]
        sequence: Option<u64>,
    },
    /// Edit a published channel (rollout, pause, pin) and re-sign it with the next sequence.
    Channel {
        #[command(subcommand)]
        command: ChannelCommand,
    },
    /// Print the age recipient (age1...) for `--recipient`: of a board's OTP key, of an age
    /// identity file, or the one a device reports in `updater status --json`.
    Recipient {
        /// The board's OTP private key: 32 bytes (`rpi-otp-private-key -b`) or 64 hex digits.
        #[arg(long, value_name = "FILE", group = "source")]
        otp_key: Option<PathBuf>,
        /// An age identity file (AGE-SECRET-KEY-1...), e.g. a device's age.key.
        #[arg(long, value_name = "FILE", group = "source")]
        identity: Option<PathBuf>,
        /// A device's `updater status --json` output.
        #[arg(long, value_name = "FILE", group = "source")]
        status: Option<PathBuf>,
        /// Print {"recipient", "from"} as JSON on stdout (docs/cli-json.md).
        #[arg(long)]
        json: bool,
    },
    /// Role bundles (.mfr): build a signed release of a role (docs/roles.md).
    Role {
        #[command(subcommand)]
        command: RoleCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum RoleCommand {
    /// Build DIR/NAME-VERSION.mfr, a signed role bundle, from a role folder (role.toml is
    /// checked with the device's strict schema first). The same inputs give the same bytes.
    Build {
        /// The role folder, e.g. roles/zigbee-hub: role.toml, the compose file and its files.
        role: PathBuf,
        /// The private key that signs the bundle.
        #[arg(long)]
        key: PathBuf,
        /// Output folder (created).
        #[arg(long, short)]
        output: PathBuf,
        /// Image archives (`docker save`) to carry as images/FILE.tar, for offline devices.
        #[arg(long, value_name = "FILE.tar", num_args = 1..)]
        images: Vec<PathBuf>,
        /// `created` time of the manifest and every entry (seconds since 1970).
        #[arg(long, env = "SOURCE_DATE_EPOCH")]
        source_date_epoch: Option<u64>,
        /// Print the result as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
}

/// The arguments of `imager provision`.
#[derive(Debug, clap::Args)]
pub struct ProvisionArgs {
    /// The image (.img or .img.zst). Without TARGET or --output: the image file or card
    /// (block device) whose provision partition is rewritten in place.
    pub image: PathBuf,
    /// A card (block device) or file to flash with the image and provision; with --batch,
    /// card after card (asks for each).
    pub target: Option<PathBuf>,
    /// One device per row of this CSV (columns: docs/provisioning.md, "imager provision").
    #[arg(long, value_name = "FLEET.CSV")]
    pub batch: Option<PathBuf>,
    /// Write DIR/NAME-DEVICE_ID.img and .bmap per device instead of a TARGET.
    #[arg(long, short, value_name = "DIR")]
    pub output: Option<PathBuf>,
    /// With --output: replace per-device images that exist already (without it, they are
    /// refused before anything is written).
    #[arg(long, requires = "output")]
    pub force: bool,
    /// With --output: write NAME-DEVICE_ID.img.zst (at this zstd level) instead of .img.
    #[arg(long, requires = "output", value_name = "LEVEL", num_args = 0..=1, default_missing_value = "3", value_parser = clap::value_parser!(i32).range(1..=19))]
    pub zstd: Option<i32>,
    /// The image's block map (for TARGET and --output); default: next to the image.
    #[arg(long, value_name = "FILE")]
    pub bmap: Option<PathBuf>,
    /// Do not ask before writing a card.
    #[arg(long, short)]
    pub yes: bool,
    /// Skip reading the image back from a TARGET.
    #[arg(long)]
    pub no_verify: bool,
    /// Only validate (every device, every file, the partition's room) and write nothing.
    #[arg(long)]
    pub check: bool,
    /// Print the devices and what was written as JSON on stdout (docs/cli-json.md).
    #[arg(long)]
    pub json: bool,
    #[command(flatten, next_help_heading = "Device (flags; with --batch, defaults for every row)")]
    pub device: crate::provision::DeviceArgs,
}

/// The channel a command signs.
#[derive(Debug, clap::Args)]
pub struct ChannelArgs {
    /// The published folder (holds channels/ and bundles/; created).
    #[arg(long)]
    pub folder: PathBuf,
    /// The channel's name, e.g. stable.
    #[arg(long)]
    pub channel: String,
    /// The private key that signs the channel document.
    #[arg(long)]
    pub key: PathBuf,
    /// How long the signed document stays valid; devices stop acting on it after that, so
    /// re-sign (`imager channel set` with no option) before.
    #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
    pub expires_in: std::time::Duration,
    /// Print the signed channel and the files written as JSON on stdout (docs/cli-json.md).
    #[arg(long)]
    pub json: bool,
}

/// Rollout options of `publish` and `channel set`.
#[derive(Debug, clap::Args)]
pub struct RolloutArgs {
    /// Share of the devices (0-100) that update; with --waves, the share before the first wave.
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub percent: Option<u8>,
    /// Segments allowed, comma-separated: canary, early, general (default: all).
    #[arg(long)]
    pub segments: Option<String>,
    /// No device starts before this time: RFC 3339, `now`, `+DURATION`, or `none` to clear.
    #[arg(long, value_name = "WHEN")]
    pub not_before: Option<String>,
    /// Time schedule PERCENT@WHEN,... with WHEN an RFC 3339 time or +DURATION after --start,
    /// e.g. 1@+0s,5@+1h,25@+4h,100@+24h; `none` to clear.
    #[arg(long, value_name = "SCHEDULE")]
    pub waves: Option<String>,
    /// Start of a relative --waves schedule or --not-before: RFC 3339 or `now` (default).
    #[arg(long, value_name = "WHEN", default_value = "now")]
    pub start: String,
}

impl RolloutArgs {
    fn change(&self, now: u64) -> Result<crate::publish::RolloutChange> {
        use crate::publish::{parse_segments, parse_waves, parse_when};
        let start = parse_when(&self.start, now).context("--start")?.0;
        Ok(crate::publish::RolloutChange {
            percent: self.percent,
            segments: self
                .segments
                .as_deref()
                .map(parse_segments)
                .transpose()
                .context("--segments")?,
            not_before: match self.not_before.as_deref() {
                None => None,
                Some("none") => Some(None),
                Some(w) => Some(Some(parse_when(w, start).context("--not-before")?)),
            },
            waves: match self.waves.as_deref() {
                None => None,
                Some("none") => Some(Vec::new()),
                Some(w) => Some(parse_waves(w, start).context("--waves")?),
            },
        })
    }
}

/// `--role NAME` of the channel commands.
#[derive(Debug, clap::Args)]
pub struct RoleArg {
    /// Edit the channel's [roles.NAME] target (or the device's overrides of that role)
    /// instead of the OS one.
    #[arg(long, value_name = "NAME")]
    pub role: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum ChannelCommand {
    /// Change the OS rollout (percent, segments, not_before, waves), or a role's with --role;
    /// with no option, only re-sign with a new expiry.
    Set {
        #[command(flatten)]
        target: ChannelArgs,
        #[command(flatten)]
        role: RoleArg,
        #[command(flatten)]
        rollout: RolloutArgs,
    },
    /// Emergency stop: no device starts an update from this channel (a pin still applies);
    /// with --role, of that role only.
    Pause {
        #[command(flatten)]
        target: ChannelArgs,
        #[command(flatten)]
        role: RoleArg,
    },
    /// Undo `pause`.
    Resume {
        #[command(flatten)]
        target: ChannelArgs,
        #[command(flatten)]
        role: RoleArg,
    },
    /// Force every device of the channel to one version (also down, within the security
    /// epoch): the rollback. Its bundle is found among the published ones by --version, or
    /// given with --bundle (verified and copied into FOLDER/bundles/). With --role: the
    /// role's bundle FOLDER/roles/NAME/VERSION.mfr.
    Pin {
        #[command(flatten)]
        target: ChannelArgs,
        #[command(flatten)]
        role: RoleArg,
        /// The version, e.g. 1.4.2: its bundle FOLDER/bundles/*-VERSION.mfb.
        #[arg(long, required_unless_present = "bundle")]
        version: Option<semver::Version>,
        /// The OS bundle to pin (e.g. an older release never published to this folder).
        #[arg(long, value_name = "FILE", conflicts_with = "role")]
        bundle: Option<PathBuf>,
        /// Why (shown in device logs and status).
        #[arg(long)]
        reason: String,
        /// The pin ends at this time (RFC 3339 or +DURATION); default: until unpinned.
        #[arg(long, value_name = "WHEN")]
        expires: Option<String>,
        /// The pinned bundle must verify against this keyring (folder or key file); default:
        /// --key's public half.
        #[arg(long, value_name = "DIR|FILE")]
        keyring: Option<PathBuf>,
    },
    /// Remove the pin: the rollout applies again.
    Unpin {
        #[command(flatten)]
        target: ChannelArgs,
        #[command(flatten)]
        role: RoleArg,
    },
    /// Set or remove the per-device overrides of one device in the channel's devices table
    /// (they win over the same fields of the device's provisioning).
    Device {
        #[command(flatten)]
        target: ChannelArgs,
        #[command(flatten)]
        role: RoleArg,
        /// The device id (as in its provisioning).
        #[arg(long)]
        id: String,
        /// Hold the device on (or bring it to) exactly this version.
        #[arg(long)]
        version_lock: Option<semver::Version>,
        /// false: the device never updates automatically; true: it does (even if its
        /// provisioning says false).
        #[arg(long)]
        auto_update: Option<bool>,
        /// The device follows this channel instead.
        #[arg(long, value_name = "CHANNEL")]
        follow: Option<String>,
        /// Why (shown in the device's logs and status).
        #[arg(long)]
        reason: Option<String>,
        /// Remove the device's entry instead.
        #[arg(long, conflicts_with_all = ["version_lock", "auto_update", "follow", "reason"])]
        remove: bool,
    },
    /// Print a channel, checking its signature and freshness when --keyring is given.
    Show {
        /// The published folder.
        #[arg(long)]
        folder: PathBuf,
        /// The channel's name.
        #[arg(long)]
        channel: String,
        /// Check the signature against this keyring (folder of *.pub.pem, or one key file).
        #[arg(long, value_name = "DIR|FILE")]
        keyring: Option<PathBuf>,
        /// Print the channel and the signature check as JSON on stdout (docs/cli-json.md).
        #[arg(long)]
        json: bool,
    },
}

fn unix_now() -> Result<u64> {
    Ok(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs())
}

/// A `--keyring` argument as a folder [`Keyring::load`] reads: the folder itself (of
/// `*.pub.pem` files, as on a device), or for one key file (a public key, or a private key's
/// public half, as rauc and mender-artifact take) a temporary folder holding it.
#[derive(Debug)]
struct KeyringDir {
    dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

fn keyring_dir(path: &std::path::Path) -> Result<KeyringDir> {
    if path.is_dir() {
        return Ok(KeyringDir { dir: path.to_path_buf(), _temp: None });
    }
    let key = crate::keys::load_public_key(path)
        .or_else(|_| crate::keys::load_signing_key(path).map(|k| k.verifying_key()))
        .map_err(|_| {
            anyhow::anyhow!(
                "--keyring {}: expected a keyring folder (of *.pub.pem files), a public key (.pub.pem) or a private key file",
                path.display()
            )
        })?;
    let temp = tempfile::tempdir().context("creating a temporary keyring folder")?;
    let file = temp.path().join(format!("key{}", updater::sign::PUBLIC_KEY_SUFFIX));
    std::fs::write(&file, updater::sign::public_key_to_pem(&key))?;
    Ok(KeyringDir { dir: temp.path().to_path_buf(), _temp: Some(temp) })
}

fn load_keyring(path: &std::path::Path) -> Result<Keyring> {
    let k = keyring_dir(path)?;
    Keyring::load(&k.dir).with_context(|| format!("loading the keyring {}", path.display()))
}

fn keyring_or_key(
    keyring: Option<&std::path::Path>,
    key: &ed25519_dalek::SigningKey,
) -> Result<Keyring> {
    match keyring {
        Some(path) => load_keyring(path),
        None => Ok(Keyring::from_keys([key.verifying_key()])),
    }
}

/// What `publish` and `channel` edits say: lines on stderr, and with --json the signed
/// channel and files on stdout (shape: docs/cli-json.md).
fn report(p: &crate::publish::Published, json: bool) -> Result<()> {
    if json {
        let v = serde_json::json!({
            "channel": p.channel,
            "document": p.document.display().to_string(),
            "signature": p.signature.display().to_string(),
            "bundle": p.bundle.as_ref().map(|b| b.display().to_string()),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    eprintln!(
        "signed {} (sequence {}, expires {})\n  {}\n  {}",
        p.channel.name,
        p.channel.sequence,
        p.channel.expires,
        p.document.display(),
        p.signature.display()
    );
    if let Some(b) = &p.bundle {
        eprintln!("  {}", b.display());
    }
    Ok(())
}

fn run_channel(command: ChannelCommand) -> Result<()> {
    use crate::publish::{edit, Edit, Signer};
    let progress = Progress::detect();
    let now = unix_now()?;
    if let Some((target, role, change, keyring)) = role_edit(&command, now)? {
        let key = crate::keys::load_signing_key(&target.key)?;
        let ring = keyring_or_key(keyring, &key)?;
        let signer = Signer { key: &key, expires_in: target.expires_in, now };
        let (folder, channel) = (&target.folder, &target.channel);
        let p = crate::publish::roles::edit_role(
            folder, channel, role, &change, &ring, &signer, &progress,
        )?;
        return report(&p, target.json);
    }
    let (target, change, keyring) = match command {
        ChannelCommand::Show { folder, channel, keyring, json } => {
            return show_channel(&folder, &channel, keyring.as_deref(), now, json);
        }
        ChannelCommand::Set { target, rollout, .. } => {
            let change = rollout.change(now)?;
            (target, Edit::Set(change), None)
        }
        ChannelCommand::Pause { target, .. } => (target, Edit::Pause, None),
        ChannelCommand::Resume { target, .. } => (target, Edit::Resume, None),
        ChannelCommand::Unpin { target, .. } => (target, Edit::Unpin, None),
        ChannelCommand::Device {
            target,
            id,
            version_lock,
            auto_update,
            follow,
            reason,
            remove,
            ..
        } => {
            let entry = (!remove).then_some(updater::channel::DeviceOverride {
                version_lock,
                auto_update,
                channel: follow,
                reason,
                ..Default::default()
            });
            (target, Edit::Device { id, entry }, None)
        }
        ChannelCommand::Pin { target, version, bundle, reason, expires, keyring, .. } => {
            if let Some(b) = &bundle {
                crate::inspect::expect_bundle(b, "--bundle takes an OS bundle (.mfb)")?;
            }
            let expires = expires
                .map(|e| crate::publish::parse_when(&e, now))
                .transpose()
                .context("--expires")?;
            (target, Edit::Pin { version, bundle, reason, expires }, keyring)
        }
    };
    let key = crate::keys::load_signing_key(&target.key)?;
    let ring = keyring_or_key(keyring.as_deref(), &key)?;
    let signer = Signer { key: &key, expires_in: target.expires_in, now };
    let p = edit(&target.folder, &target.channel, &change, &ring, &signer, &progress)?;
    report(&p, target.json)
}

/// The role edit of a channel command given `--role NAME`: (target, role, edit, keyring).
type RoleEditArgs<'a> =
    (&'a ChannelArgs, &'a str, crate::publish::roles::RoleEdit, Option<&'a std::path::Path>);

fn role_edit(command: &ChannelCommand, now: u64) -> Result<Option<RoleEditArgs<'_>>> {
    use crate::publish::roles::RoleEdit;
    let (target, role, edit, keyring) = match command {
        ChannelCommand::Set { target, role, rollout } => {
            (target, role, RoleEdit::Set(rollout.change(now)?), None)
        }
        ChannelCommand::Pause { target, role } => (target, role, RoleEdit::Pause, None),
        ChannelCommand::Resume { target, role } => (target, role, RoleEdit::Resume, None),
        ChannelCommand::Unpin { target, role } => (target, role, RoleEdit::Unpin, None),
        ChannelCommand::Pin { target, role, version, bundle, reason, expires, keyring } => {
            if role.role.is_none() {
                return Ok(None);
            }
            if bundle.is_some() {
                anyhow::bail!(
                    "--bundle pins an OS bundle; a role pin takes --role NAME --version V"
                );
            }
            let Some(version) = version else {
                anyhow::bail!(
                    "a role pin needs --version VERSION (its bundle roles/NAME/VERSION.mfr)"
                );
            };
            let expires = expires
                .as_deref()
                .map(|e| crate::publish::parse_when(e, now))
                .transpose()
                .context("--expires")?;
            let edit = RoleEdit::Pin { version: version.clone(), reason: reason.clone(), expires };
            (target, role, edit, keyring.as_deref())
        }
        ChannelCommand::Device {
            target,
            role,
            id,
            version_lock,
            auto_update,
            follow,
            reason,
            remove,
        } => {
            if role.role.is_some() && follow.is_some() {
                anyhow::bail!(
                    "--follow is a device's channel, not a role's: drop --role or --follow"
                );
            }
            let entry = (!remove).then(|| updater::channel::RoleOverride {
                version_lock: version_lock.clone(),
                auto_update: *auto_update,
                reason: reason.clone(),
            });
            (target, role, RoleEdit::Device { id: id.clone(), entry }, None)
        }
        ChannelCommand::Show { .. } => return Ok(None),
    };
    Ok(role.role.as_deref().map(|r| (target, r, edit, keyring)))
}

/// `imager channel show`: with a keyring, checked as a device does: signature first, then the
/// contents.
fn show_channel(
    folder: &std::path::Path,
    channel: &str,
    keyring: Option<&std::path::Path>,
    now: u64,
    json: bool,
) -> Result<()> {
    let path = folder.join(updater::channel::document_path(channel));
    let doc = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let (ch, signer) = match keyring {
        Some(dir) => {
            let ring = load_keyring(dir)?;
            let sig_path = folder.join(updater::channel::signature_path(channel));
            let sig = std::fs::read(&sig_path).ok();
            let expect = updater::channel::Expect {
                keyring: &ring,
                name: channel,
                last_sequence: None,
                now,
            };
            let v = updater::channel::verify(&doc, sig.as_deref(), &expect)
                .with_context(|| format!("checking {}", path.display()))?;
            (v.channel, Some(v.key_id))
        }
        None => (
            updater::channel::Channel::parse(&doc)
                .with_context(|| format!("reading {}", path.display()))?,
            None,
        ),
    };
    if json {
        let v = serde_json::json!({
            "channel": ch,
            "signature": match &signer {
                Some(id) => serde_json::json!({ "checked": true, "valid": true, "key_id": id }),
                None => serde_json::json!({ "checked": false, "valid": null, "key_id": null }),
            },
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    print!("{}", crate::publish::describe(&ch, now));
    match signer {
        Some(id) => println!("signature valid, by key {id}; fresh"),
        None => println!("signature not checked (no --keyring)"),
    }
    Ok(())
}

/// Runs the command line; exit code 0 done, 1 failed, 2 usage (from clap).
/// Errors, clap's included, print as `imager: error: WHAT: WHY` (updater::cli_error).
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return updater::cli_error::clap_exit("imager", &e),
    };
    crate::logger::install();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", updater::cli_error::render("imager", &e));
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Build {
            recipe,
            output,
            version,
            source_date_epoch,
            zstd_level,
            json,
            no_bundle,
            offline,
        } => {
            let epoch = source_date_epoch;
            let opts =
                BuildOptions { recipe, output, version, epoch, zstd_level, no_bundle, offline };
            run_build(&opts, json)
        }
        Command::Inspect { path, keyring, cat, json } => {
            run_inspect(&path, keyring.as_deref(), cat.as_deref(), json)
        }
        Command::Flash { image, target, bmap, nobmap, yes, no_verify, json, device } => {
            let (verify, whole) = (!no_verify, nobmap);
            let opts = crate::flash::FlashOptions { image, bmap, target, verify, whole };
            run_flash(&opts, &device, yes, json)
        }
        Command::Provision(args) => run_provision(&args),
        Command::Keygen { dir, name, json } => run_keygen(&dir, &name, json),
        Command::Bundle { image, key, output, security_epoch, source_date_epoch, json } => {
            let summary = run_bundle(&image, &key, &output, security_epoch, source_date_epoch)?;
            if json {
                let v = serde_json::json!({
                    "path": summary.path.display().to_string(),
                    "size": summary.size,
                    "key_id": summary.key_id,
                    "manifest": summary.manifest,
                    "chunks": summary.chunks,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
            Ok(())
        }
        Command::Publish { bundle, target, keyring, name, rollout, sequence } => {
            run_publish(&bundle, &target, keyring.as_deref(), name.as_deref(), &rollout, sequence)
        }
        Command::Channel { command } => run_channel(command),
        Command::Role {
            command: RoleCommand::Build { role, key, output, images, source_date_epoch, json },
        } => {
            let key = crate::keys::load_signing_key(&key)?;
            let created = source_date_epoch.map_or_else(unix_now, Ok)?;
            let built =
                crate::role::build(&role, &images, &key, &output, created, &Progress::detect())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&built)?);
            }
            eprintln!(
                "built role bundle {} ({} {}, {} files, {} images, {}, key {})",
                built.path.display(),
                built.name,
                built.version,
                built.files,
                built.images,
                updater::units::size(built.size),
                built.key_id
            );
            Ok(())
        }
        Command::Recipient { otp_key, identity, status, json } => {
            run_recipient(otp_key.as_deref(), identity.as_deref(), status.as_deref(), json)
        }
    }
}

fn run_recipient(
    otp_key: Option<&std::path::Path>,
    identity: Option<&std::path::Path>,
    status: Option<&std::path::Path>,
    json: bool,
) -> Result<()> {
    use crate::recipient::{self as r, From};
    let (recipient, from) = match (otp_key, identity, status) {
        (Some(p), _, _) => (r::from_otp_file(p)?, From::OtpKey),
        (_, Some(p), _) => (r::from_identity_file(p)?, From::Identity),
        (_, _, Some(p)) => (r::from_status_file(p)?, From::Status),
        _ => anyhow::bail!("give one of --otp-key FILE, --identity FILE or --status FILE"),
    };
    if json {
        let v = serde_json::json!({ "recipient": recipient, "from": from });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{recipient}");
    }
    Ok(())
}

fn run_build(opts: &BuildOptions, json: bool) -> Result<()> {
    let toml = |k| k == crate::inspect::Input::Toml;
    crate::inspect::expect(
        &opts.recipe,
        toml,
        "build reads a recipe (.toml), e.g. recipes/qemu.toml",
    )?;
    let report = build(opts, &Progress::detect())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    let mib = updater::units::size;
    if let Some(b) = &report.bundle {
        eprintln!("  bundle   {}", b.display());
    }
    eprintln!(
        "built {}-{} in {:.1} s\n  image    {} ({}, {} mapped)\n  zstd     {} ({})\n  bmap     {}\n  manifest {}",
        report.name,
        report.version,
        report.seconds,
        report.image.display(),
        mib(report.image_size),
        mib(report.mapped_bytes),
        report.zst.display(),
        mib(report.zst_size),
        report.bmap.display(),
        report.manifest.display()
    );
    Ok(())
}

fn run_inspect(
    path: &std::path::Path,
    keyring: Option<&std::path::Path>,
    cat: Option<&str>,
    json: bool,
) -> Result<()> {
    use crate::inspect::{self as i, Input};
    let kind = i::identify(path)?;
    if matches!(kind, Input::Folder | Input::Empty | Input::Csv | Input::Toml | Input::Unknown) {
        return Err(kind.refuse(path, i::EXPECTED));
    }
    let print = |value: serde_json::Value, text: String| -> Result<()> {
        if json {
            println!("{}", serde_json::to_string_pretty(&value)?);
        } else {
            print!("{text}");
        }
        Ok(())
    };
    let not_an_image = |what: &str| {
        anyhow::anyhow!(
            "--cat {}: {} is {what}, not a disk image",
            cat.unwrap_or(""),
            path.display()
        )
    };
    match kind {
        Input::Bundle if cat.is_some() => return Err(not_an_image("an OS bundle")),
        Input::RoleBundle if cat.is_some() => return Err(not_an_image("a role bundle")),
        Input::Bmap if cat.is_some() => return Err(not_an_image("a block map")),
        Input::BuildManifest if cat.is_some() => return Err(not_an_image("a build manifest")),
        Input::Bundle => {
            let ring = keyring.map(keyring_dir).transpose()?;
            let inspection = crate::bundle::inspect(path, ring.as_ref().map(|k| k.dir.as_path()))?;
            print(i::bundle_json(&inspection), i::render_bundle(&inspection))?;
            if keyring.is_some() && !inspection.signature.is_valid() {
                anyhow::bail!("{}: the signature is not valid for the keyring", path.display());
            }
            return Ok(());
        }
        Input::RoleBundle => {
            let ring = keyring.map(keyring_dir).transpose()?;
            let ring =
                ring.map(|k| Keyring::load(&k.dir)).transpose().context("loading the keyring")?;
            let inspection = crate::role::inspect(path, ring.as_ref(), &Progress::detect())?;
            let mut v = serde_json::to_value(&inspection)?;
            v["kind"] = "role-bundle".into();
            print(v, inspection.to_string())?;
            if matches!(inspection.signature, crate::role::SignatureStatus::Invalid { .. }) {
                anyhow::bail!(
                    "{}: the role bundle does not verify against the keyring",
                    path.display()
                );
            }
            return Ok(());
        }
        Input::Bmap => {
            let b = i::inspect_bmap(path)?;
            let mut v = serde_json::to_value(&b)?;
            v["kind"] = "bmap".into();
            return print(v, i::render_bmap(&b));
        }
        Input::BuildManifest => {
            let m = i::read_build_manifest(path)?;
            let v = serde_json::json!({ "kind": "build-manifest", "path": path.display().to_string(), "manifest": m });
            return print(v, i::render_build_manifest(path, &m));
        }
        _ => {}
    }
    inspect_disk(path, kind, cat, json)
}

/// `imager inspect` of a disk image (raw, `.img.zst` through a temporary file, or a card).
fn inspect_disk(
    path: &std::path::Path,
    kind: crate::inspect::Input,
    cat: Option<&str>,
    json: bool,
) -> Result<()> {
    use crate::inspect::{self as i, Input};
    let temp = match kind {
        Input::ZstImage => Some(i::decompress_to_temp(path, &Progress::detect())?),
        _ => None,
    };
    let image = temp.as_ref().map_or(path, |t| t.path());
    if let Some(spec) = cat {
        let bytes = i::cat(image, spec)?;
        std::io::stdout().write_all(&bytes).context("writing to stdout")?;
        return Ok(());
    }
    let mut info = i::inspect_image(image)?;
    info.path = path.display().to_string();
    if json {
        let mut v = serde_json::to_value(&info)?;
        v["kind"] = match kind {
            Input::ZstImage => {
                v["compressed_size"] = std::fs::metadata(path)?.len().into();
                "zst-image"
            }
            Input::Card => "card",
            _ => "image",
        }
        .into();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    // Say what was given when it is not a plain image file.
    if matches!(kind, Input::ZstImage | Input::Card) {
        println!("{}: {}", path.display(), kind.what());
    }
    print!("{}", i::render(&info));
    Ok(())
}

fn run_flash(
    opts: &crate::flash::FlashOptions,
    device: &crate::provision::DeviceArgs,
    yes: bool,
    json: bool,
) -> Result<()> {
    let progress = Progress::detect();
    let overlay = if device.any() {
        let d = crate::provision::single(device)?;
        Some(crate::provision::overlay(&opts.image, &d)?)
    } else {
        None
    };
    let report = crate::flash::flash(
        opts,
        overlay.as_ref(),
        &mut *crate::flash::confirmation(yes),
        &progress,
    )?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    eprintln!("{}", report.summary());
    Ok(())
}

/// Where `imager provision` writes, worked out once from TARGET, --output and --batch.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Destination {
    /// Per-device images in this folder (--output).
    Folder(PathBuf),
    /// A batch, card after card, each into TARGET.
    Cards(PathBuf),
    /// One device flashed onto TARGET.
    Card(PathBuf),
    /// The image (file or card) itself, its provision partition rewritten.
    InPlace,
}

impl Destination {
    fn of(target: Option<PathBuf>, output: Option<PathBuf>, batch: bool) -> Result<Destination> {
        Ok(match (output, target) {
            (Some(_), Some(_)) => anyhow::bail!("give either a TARGET or --output DIR, not both"),
            (Some(out), None) => Destination::Folder(out),
            (None, Some(target)) if batch => Destination::Cards(target),
            (None, Some(target)) => Destination::Card(target),
            (None, None) => Destination::InPlace,
        })
    }
}

fn run_provision(args: &ProvisionArgs) -> Result<()> {
    use crate::provision as p;
    let destination =
        Destination::of(args.target.clone(), args.output.clone(), args.batch.is_some())?;
    let expected =
        "provision reads a disk image (.img or .img.zst) built by `imager build`, or a card";
    crate::inspect::expect_image(&args.image, expected)?;
    let devices = match &args.batch {
        Some(csv) => p::batch(csv, &args.device)?,
        None if args.device.any() => vec![p::single(&args.device)?],
        None => anyhow::bail!(
            "nothing to provision: give --device FILE and/or device flags, or --batch FLEET.CSV"
        ),
    };
    // The partition's room, for every device, before anything is written.
    let part = p::find_partition(&args.image)?;
    for d in &devices {
        p::build_partition(&args.image, part.len, d)?;
    }
    let listed: Vec<serde_json::Value> = devices
        .iter()
        .map(|d| serde_json::json!({ "device_id": d.id, "hostname": d.hostname, "from": d.label }))
        .collect();
    let written = if args.check {
        if !args.json {
            println!("device_id\thostname\tfrom");
            for d in &devices {
                println!("{}\t{}\t{}", d.id, d.hostname, d.label);
            }
        }
        eprintln!("{} device(s) valid; nothing written (--check)", devices.len());
        Vec::new()
    } else {
        write_provisioned(args, destination, &devices)?
    };
    if args.json {
        let v = serde_json::json!({ "checked": args.check, "devices": listed, "written": written });
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    Ok(())
}

/// Writes the validated devices where `destination` says; returns `--json`'s `written`.
fn write_provisioned(
    args: &ProvisionArgs,
    destination: Destination,
    devices: &[crate::provision::Device],
) -> Result<Vec<serde_json::Value>> {
    use crate::provision as p;
    let progress = Progress::detect();
    let (image, bmap, yes) = (&args.image, args.bmap.as_deref(), args.yes);
    let one = |path: &std::path::Path| {
        vec![serde_json::json!({ "device_id": devices[0].id, "image": path.display().to_string() })]
    };
    Ok(match destination {
        Destination::Folder(out) => {
            let opts = p::FolderOptions { force: args.force, zstd_level: args.zstd };
            let written = p::to_folder(image, bmap, devices, &out, opts, &progress)?;
            eprintln!("wrote {} provisioned image(s) into {}", written.len(), out.display());
            written.iter().map(serde_json::to_value).collect::<Result<_, _>>()?
        }
        Destination::Cards(target) => {
            use std::io::IsTerminal;
            if !std::io::stdin().is_terminal() {
                anyhow::bail!("writing card after card needs a terminal to ask for the next card; standard input is not one (use --output DIR for per-device images instead)");
            }
            let verify = !args.no_verify;
            let mut prompt = p::TerminalCards;
            let done = p::cards(image, bmap, devices, &target, verify, &mut prompt, &progress)?;
            eprintln!("wrote {} of {} card(s): {}", done.len(), devices.len(), done.join(", "));
            let path = target.display().to_string();
            done.iter().map(|id| serde_json::json!({ "device_id": id, "image": path })).collect()
        }
        Destination::Card(target) => {
            let overlay = p::overlay(image, &devices[0])?;
            let written = one(&target);
            let opts = crate::flash::FlashOptions {
                image: image.clone(),
                bmap: args.bmap.clone(),
                target,
                verify: !args.no_verify,
                whole: false,
            };
            let mut confirm = crate::flash::confirmation(yes);
            let report = crate::flash::flash(&opts, Some(&overlay), &mut *confirm, &progress)?;
            eprintln!("{}", report.summary());
            written
        }
        Destination::InPlace if args.batch.is_some() => anyhow::bail!(
            "a batch writes per-device images (--output DIR) or cards (TARGET); give one of them"
        ),
        Destination::InPlace => {
            p::in_place(image, &devices[0], &mut *crate::flash::confirmation(yes), &progress)?;
            one(image)
        }
    })
}

fn run_keygen(dir: &std::path::Path, name: &str, json: bool) -> Result<()> {
    let pair = crate::keys::generate(dir, name)?;
    if json {
        let v = serde_json::json!({
            "key_id": pair.key_id,
            "private": pair.private.display().to_string(),
            "public": pair.public.display().to_string(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("key id {}", pair.key_id);
    println!("private {} (keep it secret; never commit it)", pair.private.display());
    println!("public  {} (copy it into the keyring of the images)", pair.public.display());
    Ok(())
}

fn run_bundle(
    image: &std::path::Path,
    key: &std::path::Path,
    output: &std::path::Path,
    security_epoch: Option<u64>,
    source_date_epoch: Option<u64>,
) -> Result<crate::bundle::BundleSummary> {
    use updater::bundle::SlotClass;
    crate::inspect::expect_image(
        image,
        "bundle reads a disk image (.img) built by `imager build`",
    )?;
    let progress = Progress::detect();
    let release = crate::inspect::inspect_image(image)?
        .slots
        .into_iter()
        .find(|s| s.slot == updater::layout::Slot::A)
        .and_then(|s| s.release)
        .with_context(|| {
            format!("{}: root_a has no readable /etc/metrica/release.toml", image.display())
        })?;
    let meta = crate::bundle::BundleMeta {
        compatible: release.compatible,
        version: release.version,
        security_epoch: security_epoch.unwrap_or(release.security_epoch),
        created: source_date_epoch.map_or_else(unix_now, Ok)?,
        zstd_level: updater::bundle::DEFAULT_ZSTD_LEVEL,
    };
    let images = [
        crate::bundle::ImageSource::partition(SlotClass::Boot, image, "boot_a")?,
        crate::bundle::ImageSource::partition(SlotClass::Root, image, "root_a")?,
    ];
    let signing = crate::keys::load_signing_key(key)?;
    let summary = crate::bundle::write_bundle(output, &meta, &images, &signing, &progress)?;
    eprintln!(
        "wrote {} ({}, signed by {})",
        summary.path.display(),
        updater::units::size(summary.size),
        summary.key_id
    );
    Ok(summary)
}

fn run_publish(
    bundle: &std::path::Path,
    target: &ChannelArgs,
    keyring: Option<&std::path::Path>,
    name: Option<&str>,
    rollout: &RolloutArgs,
    sequence: Option<u64>,
) -> Result<()> {
    use crate::publish::{publish, PublishRequest, Signer};
    crate::inspect::expect(
        bundle,
        |k| matches!(k, crate::inspect::Input::Bundle | crate::inspect::Input::RoleBundle),
        "publish reads an OS bundle (.mfb) made by `imager build` or `imager bundle`, or a role bundle (.mfr) made by `imager role build`",
    )?;
    let progress = Progress::detect();
    let now = unix_now()?;
    let change = rollout.change(now)?;
    if change.percent.is_none() && change.waves.as_ref().is_none_or(Vec::is_empty) {
        anyhow::bail!("say how far to roll out: --percent P and/or --waves SCHEDULE");
    }
    let mut r = updater::channel::Rollout::everyone();
    r.percent = 0;
    change.apply(&mut r);
    let key = crate::keys::load_signing_key(&target.key)?;
    let ring = keyring_or_key(keyring, &key)?;
    if crate::role::is_role_bundle(bundle) {
        if name.is_some() || sequence.is_some() {
            anyhow::bail!("--name and --sequence are for OS bundles, not role bundles");
        }
        let req = crate::publish::roles::RolePublishRequest {
            folder: &target.folder,
            channel: &target.channel,
            bundle,
            keyring: &ring,
            rollout: r,
        };
        let signer = Signer { key: &key, expires_in: target.expires_in, now };
        return report(
            &crate::publish::roles::publish_role(&req, &signer, &progress)?,
            target.json,
        );
    }
    let req = PublishRequest {
        folder: &target.folder,
        channel: &target.channel,
        bundle,
        name,
        keyring: &ring,
        rollout: r,
        sequence,
    };
    let p = publish(&req, &Signer { key: &key, expires_in: target.expires_in, now }, &progress)?;
    report(&p, target.json)?;
    if p.channel.paused {
        eprintln!("note: channel {} is paused; `imager channel resume` to start", p.channel.name);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/cli.md is generated from the clap definitions; run with UPDATE_DOCS=1 to refresh it.
    #[test]
    fn cli_docs_are_current() {
        let generated = clap_markdown::help_markdown::<Cli>();
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/cli-imager.md");
        if std::env::var_os("UPDATE_DOCS").is_some() {
            std::fs::write(&path, &generated).unwrap();
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "docs/cli-imager.md is stale: run UPDATE_DOCS=1 cargo test -p imager cli_docs"
        );
    }

    /// The operator's commands end to end through the command line parser.
    #[test]
    fn publish_and_channel_commands() {
        use updater::bundle::testkit::{make_bundle, test_image, TestMeta};
        let dir = tempfile::tempdir().unwrap();
        let d = |p: &str| dir.path().join(p).to_string_lossy().into_owned();
        let call = |args: &[&str]| {
            let mut argv = vec!["imager"];
            argv.extend_from_slice(args);
            run(Cli::try_parse_from(argv).unwrap())
        };
        call(&["keygen", "--dir", &d("keys"), "--name", "fleet"]).unwrap();
        let key = crate::keys::load_signing_key(&dir.path().join("keys/fleet.key")).unwrap();
        for v in ["1.0.0", "1.1.0"] {
            let meta = TestMeta {
                compatible: "metrica-test".into(),
                version: v.parse().unwrap(),
                security_epoch: 0,
            };
            let img = test_image(20_000, 5);
            let b = make_bundle(&meta, &[(updater::bundle::SlotClass::Root, &img[..])], Some(&key));
            std::fs::write(dir.path().join(format!("os-{v}.mfb")), b).unwrap();
        }
        let target = ["--folder", &d("www"), "--channel", "stable", "--key", &d("keys/fleet.key")];
        let with = |cmd: &[&str], extra: &[&str]| {
            let mut a = cmd.to_vec();
            a.extend_from_slice(&target);
            a.extend_from_slice(extra);
            call(&a)
        };
        let err = with(&["publish", &d("os-1.0.0.mfb")], &[]).unwrap_err();
        assert!(err.to_string().contains("--percent"), "{err}");
        with(&["publish", &d("os-1.0.0.mfb")], &["--percent", "100"]).unwrap();
        with(
            &["publish", &d("os-1.1.0.mfb")],
            &["--waves", "1@+0s,5@+1h,100@+1d", "--segments", "canary,early"],
        )
        .unwrap();
        with(&["channel", "set"], &["--percent", "0", "--not-before", "+1h"]).unwrap();
        with(&["channel", "pause"], &[]).unwrap();
        with(&["channel", "pin"], &["--version", "1.0.0", "--reason", "test", "--expires", "+2h"])
            .unwrap();
        with(&["channel", "unpin"], &[]).unwrap();
        with(
            &["channel", "device"],
            &["--id", "pi-7", "--auto-update", "false", "--reason", "demo"],
        )
        .unwrap();
        with(&["channel", "device"], &["--id", "pi-8", "--follow", "beta"]).unwrap();
        with(&["channel", "device"], &["--id", "pi-8", "--remove"]).unwrap();
        assert!(with(&["channel", "device"], &["--id", "pi-9"]).is_err(), "no override given");
        assert!(with(&["channel", "device"], &["--id", "pi-9", "--remove"]).is_err(), "no entry");
        with(&["channel", "resume"], &["--expires-in", "1d"]).unwrap();
        let show = ["channel", "show", "--folder", &d("www"), "--channel", "stable"];
        call(&[&show[..], &["--keyring", &d("keys")]].concat()).unwrap();
        let ch = crate::publish::read_channel(&dir.path().join("www"), "stable").unwrap().unwrap();
        assert_eq!(ch.sequence, 10);
        assert_eq!(ch.devices.len(), 1);
        assert_eq!(ch.devices["pi-7"].auto_update, Some(false));
        assert_eq!(ch.os.rollout.waves.len(), 3);
        assert!(ch.os.rollout.not_before.is_some() && !ch.paused && ch.pin.is_none());
        assert_eq!(ch.expires.0 - ch.published.0, 86_400);
        assert!(dir.path().join("www/bundles/os-1.1.0.mfb").exists());
        // A tampered document fails `show --keyring`, naming the problem.
        let doc = dir.path().join("www/channels/stable.toml");
        let text = std::fs::read_to_string(&doc).unwrap().replace("percent = 0", "percent = 100");
        std::fs::write(&doc, text).unwrap();
        let err = call(&[&show[..], &["--keyring", &d("keys")]].concat()).unwrap_err();
        assert!(format!("{err:#}").contains("bad signature"), "{err:#}");
    }

    /// `imager provision`'s destination from TARGET, --output and --batch.
    #[test]
    fn provision_destinations() {
        let p = |s: &str| Some(PathBuf::from(s));
        let of = |t, o, batch| Destination::of(t, o, batch);
        assert_eq!(of(None, p("out"), true).unwrap(), Destination::Folder("out".into()));
        assert_eq!(of(None, p("out"), false).unwrap(), Destination::Folder("out".into()));
        assert_eq!(of(p("/dev/sdx"), None, true).unwrap(), Destination::Cards("/dev/sdx".into()));
        assert_eq!(of(p("/dev/sdx"), None, false).unwrap(), Destination::Card("/dev/sdx".into()));
        assert_eq!(of(None, None, false).unwrap(), Destination::InPlace);
        let e = of(p("/dev/sdx"), p("out"), false).unwrap_err();
        assert!(e.to_string().contains("not both"), "{e}");
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
