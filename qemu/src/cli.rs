//! The `pi-qemu` command line: `boot`, `plan` and `scenario`.

use crate::cut::{CutPlan, Delay};
use crate::firmware::{self, BootRequest};
use crate::harness::{self, Echo, HarnessError, Options, RunEnd, Timeouts};
use crate::machine::{MachineConfig, DEFAULT_QEMU};
use crate::reset::parse_reboot_command;
use crate::scenario::{self, Context, ImageSet, DEFAULT_HEALTHY_PATTERN, SCENARIOS};
use anyhow::{bail, Context as _, Result};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Boots Raspberry Pi disk images in QEMU (aarch64, TCG) the way the Pi firmware would.
#[derive(Debug, Parser)]
#[command(name = "pi-qemu", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot DISK like a Pi and stream its console, across resets, until it powers off.
    Boot(BootArgs),
    /// Show which partition the firmware would boot, without starting QEMU.
    Plan(PlanArgs),
    /// Run named A/B scenarios (or `all`) against images built into --image-dir.
    Scenario(ScenarioArgs),
}

/// Options shared by every command that starts QEMU.
#[derive(Debug, Args)]
pub struct MachineArgs {
    /// QEMU binary (a name looked up in PATH, or a path).
    #[arg(long, env = "METRICA_QEMU", default_value = DEFAULT_QEMU)]
    pub qemu: PathBuf,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    pub memory: u32,
    /// Virtual CPUs (`boot` only; the scenarios boot the lean images with one).
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// Limit for one boot, QEMU start to exit, in seconds.
    #[arg(long, default_value_t = 300)]
    pub boot_timeout: u64,
    /// Limit for a boot without any console line, in seconds.
    #[arg(long, default_value_t = 120)]
    pub silence_timeout: u64,
    /// Limit for a whole run (all boots), in seconds.
    #[arg(long, default_value_t = 1800)]
    pub run_timeout: u64,
    /// Keep console.log and run.json even when the run passes.
    #[arg(long)]
    pub keep_logs: bool,
}

impl MachineArgs {
    fn timeouts(&self) -> Timeouts {
        Timeouts {
            boot: Duration::from_secs(self.boot_timeout),
            silence: Duration::from_secs(self.silence_timeout),
            run: Duration::from_secs(self.run_timeout),
            ..Timeouts::default()
        }
    }
}

#[derive(Debug, Args)]
pub struct BootArgs {
    /// The disk image (raw, GPT). The guest writes to it.
    pub disk: PathBuf,
    #[command(flatten)]
    pub machine: MachineArgs,
    /// Attach another raw disk (/dev/vdb, /dev/vdc, ... in order); repeatable.
    #[arg(long = "extra-disk", value_name = "PATH")]
    pub extra_disks: Vec<PathBuf>,
    /// Words appended to the kernel command line of every boot.
    #[arg(long, value_name = "WORDS", allow_hyphen_values = true)]
    pub append: Vec<String>,
    /// Stop after this many boots (a boot loop is a failure).
    #[arg(long, default_value_t = 20)]
    pub max_boots: usize,
    /// Record the time of the first console line containing TEXT in each boot.
    #[arg(long, value_name = "TEXT")]
    pub ready: Option<String>,
    /// End the run (success) at the first console line containing TEXT, e.g. the line an idle
    /// device prints when it is up; QEMU is killed there.
    #[arg(long, value_name = "TEXT")]
    pub until: Option<String>,
    /// Power cut: SIGKILL QEMU after a console line containing TEXT (plus --cut-delay).
    #[arg(long, value_name = "TEXT")]
    pub cut_on: Option<String>,
    /// Power cut delay in ms, fixed (`1500`) or random in a window (`1000-8000`); counted from
    /// the --cut-on line, or from QEMU's start without --cut-on.
    #[arg(long, value_name = "MS|MIN-MAX")]
    pub cut_delay: Option<Delay>,
    /// Only cut in this boot (1 = the first).
    #[arg(long, value_name = "N")]
    pub cut_boot: Option<usize>,
    /// Seed of the random cut delays (printed by every run, to replay one).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Start with the tryboot flag set, as if the previous boot ran `reboot "0 tryboot"`.
    #[arg(long)]
    pub tryboot: bool,
    /// Folder for console.log and run.json (kept). Default: a temporary folder, kept only
    /// when the run fails.
    #[arg(long, value_name = "DIR")]
    pub log_dir: Option<PathBuf>,
    /// Do not copy the console to stdout (harness notes still go to stderr).
    #[arg(long)]
    pub quiet: bool,
    /// Print the run report (boots, end, timings) as JSON on stdout at the end (the console
    /// then goes only to the log, as with --quiet).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// The disk image (raw, GPT); only read.
    pub disk: PathBuf,
    /// As if the tryboot flag were set.
    #[arg(long)]
    pub tryboot: bool,
    /// As if the previous boot ended with this reboot command, e.g. "0 tryboot" or "3".
    #[arg(long, value_name = "COMMAND", conflicts_with = "tryboot")]
    pub reboot_command: Option<String>,
}

#[derive(Debug, Args)]
pub struct ScenarioArgs {
    /// Scenario name, or `all`. Without it, the list is printed.
    pub name: Option<String>,
    /// Folder with the images (v1, v2: *.img, oldest version first) and bundles (*.mfb).
    #[arg(long, value_name = "DIR", required_unless_present = "list")]
    pub image_dir: Option<PathBuf>,
    /// Number of power cuts in each power-cut scenario.
    #[arg(long, default_value_t = 10)]
    pub cuts: usize,
    /// List the scenarios and exit.
    #[arg(long)]
    pub list: bool,
    /// Folder for disk copies and logs (default: a temporary folder, removed when all pass).
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
    /// The console line that means "the updater is healthy".
    #[arg(long, value_name = "TEXT", default_value = DEFAULT_HEALTHY_PATTERN)]
    pub healthy_pattern: String,
    /// Copy every console to stdout.
    #[arg(long)]
    pub verbose: bool,
    /// Seed of the random power cuts.
    #[arg(long)]
    pub seed: Option<u64>,
    /// The imager binary (makes the fault bundles, reads disks after a run). Default: beside
    /// pi-qemu, else in PATH.
    #[arg(long, env = "METRICA_IMAGER", value_name = "PATH")]
    pub imager: Option<PathBuf>,
    /// The key that signs the fault bundles (the images' keyring must trust it).
    /// Default: keys/dev.key.
    #[arg(long, env = "METRICA_SIGNING_KEY", value_name = "PATH")]
    pub signing_key: Option<PathBuf>,
    #[command(flatten)]
    pub machine: MachineArgs,
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pi-qemu: error: {e:#}");
            if e.downcast_ref::<HarnessError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

fn dispatch(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Boot(args) => boot(&args),
        Command::Plan(args) => plan(&args),
        Command::Scenario(args) => scenarios(&args),
    }
}

fn boot(args: &BootArgs) -> Result<ExitCode> {
    let mut machine = MachineConfig::new(&args.disk);
    machine.qemu = args.machine.qemu.clone();
    machine.memory_mib = args.machine.memory;
    machine.cpus = args.machine.cpus;
    machine.extra_disks = args.extra_disks.clone();
    let mut options = Options::new(machine);
    options.timeouts = args.machine.timeouts();
    options.max_boots = args.max_boots;
    options.extra_cmdline =
        args.append.iter().flat_map(|a| a.split_whitespace().map(str::to_string)).collect();
    options.ready_pattern = args.ready.clone();
    options.seed = args.seed;
    options.log_dir = args.log_dir.clone();
    options.keep_logs = args.machine.keep_logs;
    options.echo = if args.quiet || args.json { Echo::Notes } else { Echo::Console };
    if args.tryboot {
        options.first_request = BootRequest { partition: 0, tryboot: true };
    }
    if args.cut_on.is_some() || args.cut_delay.is_some() || args.cut_boot.is_some() {
        options.cuts.push(CutPlan {
            on: args.cut_on.clone(),
            boot: args.cut_boot,
            delay: args.cut_delay.unwrap_or(Delay::ZERO),
        });
    }
    let report = match &args.until {
        Some(text) => harness::run(&options, &mut Until(text))?,
        None => harness::run(&options, &mut harness::Passive)?,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).context("encoding the report")?);
    }
    Ok(match report.end {
        RunEnd::Failed(_) => ExitCode::from(1),
        _ => ExitCode::SUCCESS,
    })
}

/// Stops the run at the first line containing a text.
struct Until<'a>(&'a str);

impl harness::Director for Until<'_> {
    fn on_line(&mut self, boot: &harness::BootRecord, line: &str) -> harness::Action {
        if line.contains(self.0) {
            harness::Action::Stop(format!("saw {:?} in boot {}", self.0, boot.index))
        } else {
            harness::Action::Continue
        }
    }
}

fn plan(args: &PlanArgs) -> Result<ExitCode> {
    let request = match &args.reboot_command {
        Some(cmd) => {
            let c = parse_reboot_command(cmd).map_err(anyhow::Error::msg)?;
            BootRequest { partition: c.partition, tryboot: c.tryboot }
        }
        None => BootRequest { partition: 0, tryboot: args.tryboot },
    };
    let summary = crate::disk::summarize(&args.disk)?;
    for p in &summary.partitions {
        println!(
            "partition {} {:<12} {}{}",
            p.number,
            p.label,
            if p.fat { "FAT" } else { "not FAT" },
            match (p.has_config, p.has_kernel) {
                (true, true) => ", config.txt, kernel8.img",
                (true, false) => ", config.txt, NO kernel8.img",
                (false, true) => ", kernel8.img",
                (false, false) => "",
            }
        );
    }
    match &summary.autoboot {
        firmware::AutobootFile::Present(bytes) => {
            println!("autoboot.txt: {} bytes", bytes.len());
            for line in String::from_utf8_lossy(bytes).lines().filter(|l| !l.trim().is_empty()) {
                println!("  {line}");
            }
        }
        firmware::AutobootFile::Missing(why) => println!("autoboot.txt: missing ({why})"),
    }
    let choice = firmware::choose(&summary, request)?;
    for w in &choice.warnings {
        println!("warning: {w}");
    }
    println!(
        "boots: partition {} ({}) tryboot={} via {}",
        choice.partition,
        choice.label,
        u8::from(choice.tryboot),
        choice.selection
    );
    Ok(ExitCode::SUCCESS)
}

fn scenarios(args: &ScenarioArgs) -> Result<ExitCode> {
    if args.list || args.name.is_none() {
        for s in SCENARIOS {
            let state = if s.body.is_some() { "" } else { " (not implemented yet)" };
            println!("{:<18} {}{state}", s.name, s.summary);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let name = args.name.clone().unwrap_or_default();
    let selected: Vec<_> = if name == "all" {
        SCENARIOS.iter().collect()
    } else {
        match scenario::find(&name) {
            Some(s) => vec![s],
            None => bail!(
                "unknown scenario {name:?}; known: all, {}",
                SCENARIOS.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
            ),
        }
    };
    let image_dir = args.image_dir.clone().context("--image-dir is required")?;
    let images = ImageSet::find(&image_dir)?;
    let (work_dir, temporary) = match &args.work_dir {
        Some(d) => (d.clone(), false),
        None => (
            tempfile::Builder::new()
                .prefix("pi-qemu-scenarios-")
                .tempdir()
                .context("creating a work folder")?
                .keep(),
            true,
        ),
    };
    let ctx = Context {
        images,
        work_dir: work_dir.clone(),
        cuts: args.cuts,
        qemu: args.machine.qemu.clone(),
        memory_mib: args.machine.memory,
        timeouts: args.machine.timeouts(),
        echo: if args.verbose { Echo::Console } else { Echo::Notes },
        keep_logs: args.machine.keep_logs,
        healthy_pattern: args.healthy_pattern.clone(),
        seed: args.seed,
        imager: args.imager.clone(),
        signing_key: args.signing_key.clone(),
    };
    let started = Instant::now();
    let mut reports = Vec::new();
    for s in selected {
        eprintln!("pi-qemu: scenario {}: {}", s.name, s.summary);
        reports.push(scenario::run(s, &ctx));
    }
    let all_passed = scenario::summarize(&reports, started.elapsed());
    if all_passed && temporary && !args.machine.keep_logs {
        std::fs::remove_dir_all(&work_dir)
            .with_context(|| format!("removing {}", work_dir.display()))?;
    } else {
        eprintln!("pi-qemu: work folder kept: {}", work_dir.display());
    }
    Ok(if all_passed { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_boot_with_cuts_and_extra_disks() {
        let cli = Cli::try_parse_from([
            "pi-qemu",
            "boot",
            "d.img",
            "--extra-disk",
            "b.img",
            "--extra-disk",
            "c.img",
            "--cut-on",
            "installing",
            "--cut-delay",
            "100-900",
            "--cut-boot",
            "2",
            "--append",
            "x=1 y=2",
        ])
        .unwrap();
        let Command::Boot(b) = cli.command else { panic!() };
        assert_eq!(b.extra_disks, [PathBuf::from("b.img"), PathBuf::from("c.img")]);
        assert_eq!(b.cut_delay, Some(Delay { min_ms: 100, max_ms: 900 }));
        assert_eq!(b.cut_boot, Some(2));
        assert!(Cli::try_parse_from(["pi-qemu", "boot", "d.img", "--cut-delay", "9-1"]).is_err());
    }

    #[test]
    fn scenario_needs_an_image_dir_unless_listing() {
        assert!(Cli::try_parse_from(["pi-qemu", "scenario", "all"]).is_err());
        assert!(Cli::try_parse_from(["pi-qemu", "scenario", "--list"]).is_ok());
        let cli = Cli::try_parse_from([
            "pi-qemu",
            "scenario",
            "all",
            "--image-dir",
            "out",
            "--cuts",
            "30",
        ])
        .unwrap();
        let Command::Scenario(s) = cli.command else { panic!() };
        assert_eq!((s.cuts, s.name.as_deref()), (30, Some("all")));
    }
}
