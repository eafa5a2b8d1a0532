//! The `updater` command line. `main.rs` only calls [`main`].

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(name = "updater", version, about = "Metrica Fleet OS device updater")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the device node of a partition found by PARTUUID or label (used by the initramfs).
    Locate {
        /// PARTUUID to look for, e.g. from `root=PARTUUID=` on the kernel command line.
        #[arg(long, conflicts_with = "label", required_unless_present = "label")]
        partuuid: Option<uuid::Uuid>,
        /// GPT partition label to look for, e.g. `data`.
        #[arg(long)]
        label: Option<String>,
        /// Where the kernel lists block devices.
        #[arg(long, default_value = "/sys/class/block", hide = true)]
        sys_block: PathBuf,
        /// Where device nodes live.
        #[arg(long, default_value = "/dev", hide = true)]
        dev: PathBuf,
    },
}

/// Runs the command line; exit code 0 done, 1 refused or failed, 2 usage.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("updater: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Locate { partuuid, label, sys_block, dev } => {
            let (disk, part) = match (partuuid, label) {
                (Some(u), _) => crate::disk::locate_partuuid(&sys_block, &dev, &u)?,
                (None, Some(l)) => crate::disk::locate_label(&sys_block, &dev, &l)?,
                (None, None) => unreachable!("clap requires one"),
            };
            println!("{}", crate::disk::partition_node(&disk, part.number).display());
            Ok(())
        }
    }
}
