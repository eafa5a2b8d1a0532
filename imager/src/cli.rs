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
    },
    /// Show what an image holds (partitions, autoboot.txt, slots), or read one file from it.
    Inspect {
        /// A disk image made by `imager build`.
        path: PathBuf,
        /// Print one file, as PARTITION:/path (e.g. root_a:/etc/os-release or boot_a:/cmdline.txt).
        #[arg(long, value_name = "PARTITION:/PATH")]
        cat: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
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
        Command::Build { recipe, output, version, source_date_epoch, zstd_level, json } => {
            let progress = Progress::detect();
            let report = build(
                &BuildOptions { recipe, output, version, epoch: source_date_epoch, zstd_level },
                &progress,
            )?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            }
            let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64);
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
        Command::Inspect { path, cat, json } => {
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
    }
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
