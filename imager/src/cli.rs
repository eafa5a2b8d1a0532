//! The `imager` command line. `main.rs` only calls [`main`]; docs/cli.md is generated from
//! these definitions and a test keeps it in step.

use crate::build::{build, BuildOptions};
use crate::progress::Progress;
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

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
    },
    /// Show what an image or a bundle holds (partitions, autoboot.txt, slots; manifest and
    /// signature), or read one file from an image.
    Inspect {
        /// A disk image made by `imager build`, or an OS bundle (.mfb).
        path: PathBuf,
        /// Check a bundle's signature against this keyring folder (of *.pub.pem files).
        #[arg(long, value_name = "DIR")]
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
    Provision {
        /// The image (.img or .img.zst). Without TARGET or --output: the image file or card
        /// (block device) whose provision partition is rewritten in place.
        image: PathBuf,
        /// A card (block device) or file to flash with the image and provision; with --batch,
        /// card after card (asks for each).
        target: Option<PathBuf>,
        /// One device per row of this CSV (columns: docs/provisioning.md, "imager provision").
        #[arg(long, value_name = "FLEET.CSV")]
        batch: Option<PathBuf>,
        /// Write DIR/NAME-DEVICE_ID.img and .bmap per device instead of a TARGET.
        #[arg(long, short, value_name = "DIR")]
        output: Option<PathBuf>,
        /// The image's block map (for TARGET and --output); default: next to the image.
        #[arg(long, value_name = "FILE")]
        bmap: Option<PathBuf>,
        /// Do not ask before writing a card.
        #[arg(long, short)]
        yes: bool,
        /// Skip reading the image back from a TARGET.
        #[arg(long)]
        no_verify: bool,
        /// Only validate (every device, every file, the partition's room) and write nothing.
        #[arg(long)]
        check: bool,
        #[command(
            flatten,
            next_help_heading = "Device (flags; with --batch, defaults for every row)"
        )]
        device: crate::provision::DeviceArgs,
    },
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
    },
}

/// Runs the command line; exit code 0 done, 1 failed, 2 usage (from clap).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("imager: error: {e:#}");
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
        } => {
            let progress = Progress::detect();
            let report = build(
                &BuildOptions {
                    recipe,
                    output,
                    version,
                    epoch: source_date_epoch,
                    zstd_level,
                    no_bundle,
                },
                &progress,
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            }
            let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64);
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
        Command::Inspect { path, keyring, cat, json } => {
            if is_bundle(&path)? {
                let inspection = crate::bundle::inspect(&path, keyring.as_deref())?;
                print!("{inspection}");
                if keyring.is_some() && !inspection.signature.is_valid() {
                    anyhow::bail!("{}: the signature is not valid for keyring", path.display());
                }
                return Ok(());
            }
            if let Some(spec) = cat {
                let bytes = crate::inspect::cat(&path, &spec)?;
                std::io::stdout().write_all(&bytes).context("writing to stdout")?;
                return Ok(());
            }
            let info = crate::inspect::inspect_image(&path)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print!("{}", crate::inspect::render(&info));
            }
            Ok(())
        }
        Command::Flash { image, target, bmap, yes, no_verify, json, device } => {
            let progress = Progress::detect();
            let overlay = if device.any() {
                let d = crate::provision::single(&device)?;
                Some(crate::provision::overlay(&image, &d)?)
            } else {
                None
            };
            let opts = crate::flash::FlashOptions { image, bmap, target, verify: !no_verify };
            let report = crate::flash::flash(
                &opts,
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
        Command::Provision {
            image,
            target,
            batch,
            output,
            bmap,
            yes,
            no_verify,
            check,
            device,
        } => {
            use crate::provision as p;
            let progress = Progress::detect();
            if target.is_some() && output.is_some() {
                anyhow::bail!("give either a TARGET or --output DIR, not both");
            }
            let devices = match &batch {
                Some(csv) => p::batch(csv, &device)?,
                None if device.any() => vec![p::single(&device)?],
                None => anyhow::bail!(
                    "nothing to provision: give --device FILE and/or device flags, or --batch FLEET.CSV"
                ),
            };
            // The partition's room, for every device, before anything is written.
            let part = p::find_partition(&image)?;
            for d in &devices {
                p::build_partition(&image, part.len, d)?;
            }
            if check {
                for d in &devices {
                    println!("{}	{}	{}", d.id, d.hostname, d.label);
                }
                eprintln!("{} device(s) valid; nothing written (--check)", devices.len());
                return Ok(());
            }
            match (output, target) {
                (Some(out), _) => {
                    let written = p::to_folder(&image, bmap.as_deref(), &devices, &out, &progress)?;
                    eprintln!("wrote {} provisioned image(s) into {}", written.len(), out.display());
                }
                (None, Some(target)) if batch.is_some() => {
                    use std::io::IsTerminal;
                    if !std::io::stdin().is_terminal() {
                        anyhow::bail!("writing card after card needs a terminal to ask for the next card; standard input is not one (use --output DIR for per-device images instead)");
                    }
                    let done = p::cards(
                        &image,
                        bmap.as_deref(),
                        &devices,
                        &target,
                        !no_verify,
                        &mut p::TerminalCards,
                        &progress,
                    )?;
                    eprintln!("wrote {} of {} card(s): {}", done.len(), devices.len(), done.join(", "));
                }
                (None, Some(target)) => {
                    let overlay = p::overlay(&image, &devices[0])?;
                    let opts = crate::flash::FlashOptions { image, bmap, target, verify: !no_verify };
                    let report = crate::flash::flash(
                        &opts,
                        Some(&overlay),
                        &mut *crate::flash::confirmation(yes),
                        &progress,
                    )?;
                    eprintln!("{}", report.summary());
                }
                (None, None) if batch.is_some() => anyhow::bail!(
                    "a batch writes per-device images (--output DIR) or cards (TARGET); give one of them"
                ),
                (None, None) => {
                    p::in_place(&image, &devices[0], &mut *crate::flash::confirmation(yes), &progress)?;
                }
            }
            Ok(())
        }
        Command::Keygen { dir, name } => {
            let pair = crate::keys::generate(&dir, &name)?;
            println!("key id {}", pair.key_id);
            println!("private {} (keep it secret; never commit it)", pair.private.display());
            println!("public  {} (copy it into the keyring of the images)", pair.public.display());
            Ok(())
        }
        Command::Bundle { image, key, output, security_epoch, source_date_epoch } => {
            let progress = Progress::detect();
            let release = crate::inspect::inspect_image(&image)?
                .slots
                .into_iter()
                .find(|s| s.slot == updater::layout::Slot::A)
                .and_then(|s| s.release)
                .with_context(|| {
                    format!("{}: root_a has no readable /etc/metrica/release.toml", image.display())
                })?;
            let created = match source_date_epoch {
                Some(e) => e,
                None => {
                    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs()
                }
            };
            let meta = crate::bundle::BundleMeta {
                compatible: release.compatible,
                version: release.version,
                security_epoch: security_epoch.unwrap_or(release.security_epoch),
                created,
                zstd_level: updater::bundle::DEFAULT_ZSTD_LEVEL,
            };
            let images = [
                crate::bundle::ImageSource::partition(
                    updater::bundle::SlotClass::Boot,
                    &image,
                    "boot_a",
                )?,
                crate::bundle::ImageSource::partition(
                    updater::bundle::SlotClass::Root,
                    &image,
                    "root_a",
                )?,
            ];
            let signing = crate::keys::load_signing_key(&key)?;
            let summary =
                crate::bundle::write_bundle(&output, &meta, &images, &signing, &progress)?;
            eprintln!(
                "wrote {} ({} bytes, signed by {})",
                summary.path.display(),
                summary.size,
                summary.key_id
            );
            Ok(())
        }
    }
}

/// A bundle is a tar stream whose first entry is `manifest.toml`; an image starts with an MBR.
fn is_bundle(path: &std::path::Path) -> Result<bool> {
    use std::io::Read;
    let mut head = [0u8; 13];
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let n = f.read(&mut head)?;
    Ok(path.extension().is_some_and(|e| e == "mfb")
        || &head[..n] == updater::bundle::MANIFEST_NAME.as_bytes())
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

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
