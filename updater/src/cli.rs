//! The `updater` command line. `main.rs` only calls [`main`].
//!
//! Every command runs on a host against a disk image exactly as on a device: `--disk` names
//! the whole disk (block device or image file), `--data-dir` the folder mounted at `/data`.
//! Console summaries go to stdout; log events are JSON lines on stderr (or `--log-file`).
//! Exit codes: 0 done, 1 refused or failed (with the reason), 2 usage.

use crate::bootinfo::BootInfo;
use crate::firstboot::FirstbootResult;
use crate::health::{self, Check};
use crate::layout::Slot;
use crate::log::Log;
use crate::reboot::{Reboot, RebootMode, RecordReboot, SystemReboot};
use crate::release::{Release, RELEASE_PATH};
use crate::slot::{self, Device, HealthPlan};
use crate::state::{policy, Action};
use crate::status::Status;
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// The clock check's floor when the running release is unknown (2024-01-01).
const CLOCK_FLOOR: u64 = 1_704_067_200;

#[derive(Debug, Parser)]
#[command(name = "updater", version, about = "Metrica Fleet OS device updater")]
pub struct Cli {
    /// Whole disk holding the slots: a block device or a disk image file. Default: the disk
    /// that has the partition labelled `config`.
    #[arg(long, global = true, value_name = "PATH")]
    pub disk: Option<PathBuf>,
    /// The data folder (the `data` partition's mount point).
    #[arg(long, global = true, value_name = "PATH", default_value = "/data")]
    pub data_dir: PathBuf,
    /// Folder of trusted public keys.
    #[arg(long, global = true, value_name = "DIR", default_value = "/etc/metrica/keyring")]
    pub keyring: PathBuf,
    /// Append JSON log lines to this file instead of stderr.
    #[arg(long, global = true, value_name = "PATH")]
    pub log_file: Option<PathBuf>,
    /// Never reboot; say what would be done. Implied when --disk is not a block device.
    #[arg(long, global = true)]
    pub no_reboot: bool,
    /// Print the result as one JSON object on stdout (docs/cli-json.md): `status` its full
    /// report, every other command {command, ok, messages, error}.
    #[arg(long, global = true)]
    pub json: bool,
    /// Root under which /proc (boot facts), /sys, /dev and /etc are read.
    #[arg(long, global = true, value_name = "DIR", default_value = "/", hide = true)]
    pub sysroot: PathBuf,
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
    /// Run at every start: reconcile the state with where the system booted, repair
    /// autoboot.txt, and in a trial boot run the health checks, then commit or reboot.
    Boot {
        /// Seconds a trial boot has to pass its checks before it reboots to the committed slot.
        #[arg(long, value_name = "SECONDS", default_value_t = health::DEFAULT_DEADLINE.as_secs())]
        health_deadline: u64,
        /// Folder of extra check executables (each passes by exiting 0).
        #[arg(long, value_name = "DIR", default_value = "/etc/metrica/health.d")]
        health_dir: PathBuf,
        /// Seconds one extra check may run.
        #[arg(long, value_name = "SECONDS", default_value_t = 30)]
        check_timeout: u64,
    },
    /// Install an OS bundle (file, `-` for stdin, or http(s) URL) into the inactive slot.
    Install {
        source: String,
        /// Reboot into the new slot for its trial once it is installed.
        #[arg(long)]
        reboot: bool,
        /// Install a version even though it failed before.
        #[arg(long)]
        allow_bad: bool,
        /// For an https:// SOURCE: trust only the CA certificates in this PEM file instead of
        /// the built-in roots (a private update server).
        #[arg(long, value_name = "PEM")]
        ca_bundle: Option<PathBuf>,
        /// How progress is shown on stderr; auto: a redrawn bar only on an interactive
        /// terminal, plain lines on a pipe, a file, the system console or a serial console.
        #[arg(long, value_enum, value_name = "STYLE", default_value = "auto")]
        progress: crate::install::ProgressStyle,
    },
    /// Reboot into the installed inactive slot for one trial boot (tryboot).
    Trial,
    /// Mark a slot good (default: the booted one). In its trial boot this commits it.
    MarkGood { slot: Option<Slot> },
    /// Mark a slot bad (default: the booted one): its version is not tried again automatically.
    MarkBad {
        slot: Option<Slot>,
        #[arg(long, default_value = "marked bad by an operator")]
        reason: String,
    },
    /// Run the daemon: poll the channel, install what the rollout says, reboot for the
    /// trial; serve /health, /metrics, /status and /check-now on --listen. Stops on SIGTERM.
    Run(RunArgs),
    /// Ask the running daemon to poll its channel now (POST /check-now on its --listen).
    CheckNow {
        /// The daemon's --listen address.
        #[arg(long, value_name = "ADDR", default_value = crate::daemon::DEFAULT_LISTEN)]
        listen: String,
    },
    /// Zero-touch first boot, run by init before anything else: validate the provision
    /// partition, grow `data` to the end of the card, create the /data layout, apply host
    /// name, SSH keys and Wi-Fi, set up the device identity, record provisioning done.
    /// Resumable after a power cut; a no-op once done. Missing or invalid provisioning:
    /// degraded (exit 1, reason in the log and `updater status`), /data is never wiped.
    Firstboot,
    /// Show slots, versions, committed and booted slot, trial, provisioning, channel,
    /// connectivity, last error and recent history (`--json`: the same JSON as the daemon's
    /// /status).
    Status {
        /// How many history entries to show.
        #[arg(long, default_value_t = 10)]
        history: usize,
    },
    /// Apply, show and recover the device's roles (app stacks in Docker Compose,
    /// docs/roles.md). Exit codes: 0 done, 1 failed, 2 usage, 3 refused, 4 rolled back,
    /// 5 busy, 6 no space.
    Role {
        #[command(flatten)]
        options: crate::role_cli::RoleOptions,
        #[command(subcommand)]
        command: crate::role_cli::RoleCommand,
    },
    /// Enter, leave or show safe mode: every role's stack stopped and the safe-mode stack
    /// running. Exit codes as for `role`.
    SafeMode {
        #[command(flatten)]
        options: crate::role_cli::RoleOptions,
        #[command(subcommand)]
        command: crate::role_cli::SafeModeCommand,
    },
}

// The flags of `updater run` (its help text is the variant's doc comment above).
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Base URL of a published folder (holding channels/ and bundles/); repeat the flag
    /// for mirrors, tried in order. Default: `channel.url` and `channel.mirrors` of the
    /// provisioned device.toml.
    #[arg(long = "mirror", value_name = "URL")]
    pub mirrors: Vec<String>,
    /// The channel to follow (channels/<CHANNEL>.toml). Default: the provisioned
    /// `channel.name`, else stable.
    #[arg(long)]
    pub channel: Option<String>,
    /// Seconds between polls; each wait is spread by ±20 %. Default: the provisioned
    /// `update.interval`, else 300.
    #[arg(long, value_name = "SECONDS")]
    pub interval: Option<u64>,
    /// Local address of the endpoints.
    #[arg(long, value_name = "ADDR", default_value = crate::daemon::DEFAULT_LISTEN)]
    pub listen: String,
    /// No install starts with less free space than this on the data partition (MiB).
    #[arg(long, value_name = "MIB", default_value_t = crate::daemon::DEFAULT_MIN_FREE >> 20)]
    pub min_free_mib: u64,
    /// Deadline of one channel request, whole response included (seconds).
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub request_timeout: u64,
    /// The device's id for the rollout. Default: the provisioned `device_id`, else
    /// /etc/machine-id.
    #[arg(long, value_name = "ID")]
    pub device_id: Option<String>,
    /// The device's rollout segment: canary, early or general. Default: the provisioned
    /// `segment`, else general.
    #[arg(long)]
    pub segment: Option<String>,
    /// How many history entries /status shows.
    #[arg(long, default_value_t = 10)]
    pub history: usize,
    /// Check HTTPS channel and bundle servers against the CA certificates of this PEM file
    /// only (a private update server). Default: the provisioned `channel.ca_bundle` (its copy
    /// under /data/metrica/provision), else the built-in roots.
    #[arg(long, value_name = "PEM")]
    pub ca_bundle: Option<PathBuf>,
}

/// Runs the command line; exit code 0 done, 1 refused or failed, 2 usage.
/// Errors, clap's included, print as `updater: error: WHAT: WHY` (crate::cli_error). With
/// `--json` a command's result is one JSON object on stdout ([`json_result`]); new
/// subcommands get it without code: what they write to `out` becomes its `messages`.
pub fn main() -> ExitCode {
    use clap::{CommandFactory, FromArgMatches};
    let parsed = Cli::command()
        .try_get_matches()
        .and_then(|m| Ok((Cli::from_arg_matches(&m)?, m.subcommand_name().map(str::to_string))));
    let (cli, name) = match parsed {
        Ok(p) => p,
        Err(e) => return crate::cli_error::clap_exit("updater", &e),
    };
    if let Some((options, which)) = role_command(&cli.command) {
        return crate::role_cli::main(&cli, options, which);
    }
    let log = Log::command_line(cli.log_file.clone());
    let wrap = cli.json && !matches!(cli.command, Command::Status { .. });
    let mut captured = Vec::new();
    let result = if wrap { run(&cli, &mut captured) } else { run(&cli, &mut std::io::stdout()) };
    if let Err(e) = &result {
        log.event("error", &crate::cli_error::message(e));
        eprintln!("{}", crate::cli_error::render("updater", e));
    }
    if wrap {
        let text = String::from_utf8_lossy(&captured);
        let mut v = json_result(name.as_deref().unwrap_or(""), &result, &text);
        if acts_on_slots(&cli.command) {
            v["state"] = state_after(&cli);
        }
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    }
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) | Err(_) => ExitCode::from(1),
    }
}

/// `--json` of every command but `status`: `{"command", "ok", "messages", "error"}`, the
/// messages being the lines the command says (without the `metrica: ` prefix); `main` adds
/// `state` for the commands that act on the slots ([`acts_on_slots`]).
pub fn json_result(command: &str, result: &Result<bool>, text: &str) -> serde_json::Value {
    let messages: Vec<&str> =
        text.lines().map(|l| l.strip_prefix("metrica: ").unwrap_or(l)).collect();
    serde_json::json!({
        "command": command,
        "ok": matches!(result, Ok(true)),
        "messages": messages,
        "error": result.as_ref().err().map(crate::cli_error::message),
    })
}

/// The commands that change or settle the slots: their `--json` carries the slot state after
/// them (`state`, as in `updater status --json`), so a script reads the outcome, not words.
fn acts_on_slots(c: &Command) -> bool {
    matches!(
        c,
        Command::Firstboot
            | Command::Boot { .. }
            | Command::Install { .. }
            | Command::Trial
            | Command::MarkGood { .. }
            | Command::MarkBad { .. }
    )
}

/// The device's slot state as `updater status --json` gives it (`null`: none yet, or the
/// disk could not be read).
fn state_after(cli: &Cli) -> serde_json::Value {
    let Ok(host) = HostFacts::new(cli) else { return serde_json::Value::Null };
    let status = host.device.status(host.booted.clone(), 0);
    serde_json::to_value(&status).map(|v| v["state"].clone()).unwrap_or_default()
}

/// Runs one command, writing what it reports to `out`. `Ok(false)`: it ran but failed.
pub fn run(cli: &Cli, out: &mut dyn Write) -> Result<bool> {
    match &cli.command {
        Command::Locate { partuuid, label, sys_block, dev } => {
            return locate(partuuid.as_ref(), label.as_deref(), sys_block, dev, out)
        }
        Command::CheckNow { listen } => return check_now(listen, out),
        _ => {}
    }
    if let Some((options, which)) = role_command(&cli.command) {
        let code = crate::role_cli::run(cli, options, which, out)?;
        return Ok(code == crate::role_cli::Exit::Done);
    }
    let host = HostFacts::new(cli)?;
    match &cli.command {
        Command::Locate { .. }
        | Command::CheckNow { .. }
        | Command::Role { .. }
        | Command::SafeMode { .. } => unreachable!("handled above"),
        Command::Run(args) => run_daemon(host, args),
        Command::Status { history } => status(&host, cli.json, *history, out),
        Command::Firstboot => firstboot(&host, out),
        Command::Boot { health_deadline, health_dir, check_timeout } => {
            let checks = HealthFlags {
                deadline: Duration::from_secs(*health_deadline),
                dir: health_dir,
                timeout: Duration::from_secs(*check_timeout),
            };
            boot(&host, &checks, out)
        }
        Command::Install { source, reboot, allow_bad, ca_bundle, progress } => {
            let flags = InstallFlags {
                reboot: *reboot,
                allow_bad: *allow_bad,
                ca_bundle,
                progress: *progress,
            };
            install(&host, source, &flags, out)
        }
        Command::Trial => trial(&host, out),
        Command::MarkGood { slot } => mark_good(&host, *slot, out),
        Command::MarkBad { slot, reason } => mark_bad(&host, *slot, reason, out),
    }
}

/// The role and safe-mode commands (role_cli.rs), which need no disk.
fn role_command(
    c: &Command,
) -> Option<(&crate::role_cli::RoleOptions, crate::role_cli::Which<'_>)> {
    match c {
        Command::Role { options, command } => {
            Some((options, crate::role_cli::Which::Role(command)))
        }
        Command::SafeMode { options, command } => {
            Some((options, crate::role_cli::Which::SafeMode(command)))
        }
        _ => None,
    }
}

/// What every command on the device works from, worked out once: the disk, where the
/// system booted, whether the disk is a block device, and so whether to reboot.
struct HostFacts<'a> {
    cli: &'a Cli,
    log: Log,
    disk: PathBuf,
    device: Device,
    booted: Result<BootInfo, String>,
    /// `--disk` is a block device (a card), not an image file.
    block_device: bool,
    /// The unix time when the command started.
    now: u64,
}

impl<'a> HostFacts<'a> {
    fn new(cli: &'a Cli) -> Result<HostFacts<'a>> {
        let booted = BootInfo::read(&cli.sysroot).map_err(|e| e.to_string());
        let disk = match &cli.disk {
            Some(d) => d.clone(),
            None => default_disk(&cli.sysroot)?,
        };
        Ok(HostFacts {
            cli,
            log: Log::command_line(cli.log_file.clone()),
            device: Device::new(&disk, &cli.data_dir),
            block_device: is_block_device(&disk),
            disk,
            booted,
            now: slot::unix_now(),
        })
    }

    /// The reboot policy: never with `--no-reboot`, nor on an image file.
    fn never_reboot(&self) -> bool {
        self.cli.no_reboot || !self.block_device
    }

    /// Where the system booted, when that is known.
    fn booted(&self) -> Option<&BootInfo> {
        self.booted.as_ref().ok()
    }

    /// What reboots for the daemon: the system, or a record of what would have been done.
    fn rebooter(&self) -> Box<dyn Reboot> {
        if self.never_reboot() {
            Box::new(RecordReboot::default())
        } else {
            Box::new(SystemReboot)
        }
    }

    /// Reboots in `mode`, or says that it did not and why.
    fn reboot(&self, mode: RebootMode, out: &mut dyn Write) -> Result<()> {
        if self.never_reboot() {
            writeln!(
                out,
                "metrica: reboot ({}) not done: --disk is not a block device or --no-reboot",
                mode.describe()
            )?;
            self.log.event("info", &format!("reboot ({}) skipped", mode.describe()));
            return Ok(());
        }
        self.log.event("info", &format!("rebooting ({})", mode.describe()));
        SystemReboot.reboot(mode)
    }

    /// Keeps the command supervised for up to `longest` without progress (sdnotify.rs): under
    /// systemd (`NOTIFY_SOCKET`) it sends `WATCHDOG=1` and status lines and never opens
    /// /dev/watchdog (systemd owns it); otherwise it feeds the hardware watchdog the initramfs
    /// armed when `feed_device`. Trouble is logged and the command goes on unsupervised.
    fn keep_alive(&self, longest: Duration, feed_device: bool) -> crate::sdnotify::Alive {
        let device = self.cli.sysroot.join(crate::watchdog::DEVICE.trim_start_matches('/'));
        let keeper = crate::sdnotify::select(
            &crate::sdnotify::process_env,
            std::process::id(),
            feed_device.then_some(device.as_path()),
        );
        crate::sdnotify::Alive::start(keeper, longest).unwrap_or_else(|e| {
            self.log.event("warning", &format!("watchdog: {e}; not feeding it"));
            crate::sdnotify::Alive::none()
        })
    }

    /// Tells systemd `STATUS=msg` when it supervises; a failure is logged, never fatal.
    fn tell(&self, alive: &crate::sdnotify::Alive, msg: &str) {
        if let Err(e) = alive.status(msg) {
            self.log.event("warning", &format!("sd_notify: {e}"));
        }
    }

    /// Writes a command's one-line result and logs it.
    fn report(&self, out: &mut dyn Write, level: &str, msg: &str) -> Result<()> {
        writeln!(out, "metrica: {msg}")?;
        self.log.event(level, msg);
        Ok(())
    }
}

/// `updater locate`: the device node of a partition.
fn locate(
    partuuid: Option<&uuid::Uuid>,
    label: Option<&str>,
    sys_block: &Path,
    dev: &Path,
    out: &mut dyn Write,
) -> Result<bool> {
    let (disk, part) = match (partuuid, label) {
        (Some(u), _) => crate::disk::locate_partuuid(sys_block, dev, u)?,
        (None, Some(l)) => crate::disk::locate_label(sys_block, dev, l)?,
        (None, None) => unreachable!("clap requires one"),
    };
    writeln!(out, "{}", crate::disk::partition_node(&disk, part.number).display())?;
    Ok(true)
}

/// `updater check-now`.
fn check_now(listen: &str, out: &mut dyn Write) -> Result<bool> {
    crate::serve::check_now(listen)?;
    writeln!(out, "metrica: the daemon at {listen} polls its channel now")?;
    Ok(true)
}

/// The daemon's settings: flags win; then the provisioned device.toml (zero-touch: init runs
/// `updater run` with no flags); then the defaults. Also the provisioned rollout overrides.
fn daemon_settings(
    host: &HostFacts,
    args: &RunArgs,
) -> Result<(crate::daemon::Config, crate::rollout::Overrides)> {
    let provisioned = provisioned_device(&host.disk);
    let prov = provisioned.as_ref().ok();
    // No mirror and no valid provisioning: a device in the field that nobody provisioned
    // right. The daemon then follows no channel, but serves its endpoints and runs the
    // safe-mode stack, which say why (docs/daemon.md, "Without valid provisioning").
    let (mirrors, unprovisioned) = match (args.mirrors.is_empty(), &provisioned) {
        (false, _) => (args.mirrors.clone(), None),
        (true, Ok(p)) => (p.channel.urls.clone(), None),
        (true, Err(e)) => (vec![], Some(format!("no --mirror and no valid provisioning: {e:#}"))),
    };
    let device_id = match (&args.device_id, prov) {
        (Some(id), _) => id.clone(),
        (None, Some(p)) => p.device_id.clone(),
        (None, None) => machine_id(&host.cli.sysroot)?,
    };
    let config = crate::daemon::Config {
        mirrors,
        channel: args
            .channel
            .clone()
            .or_else(|| prov.map(|p| p.channel.name.clone()))
            .unwrap_or_else(|| "stable".into()),
        interval: args
            .interval
            .map(Duration::from_secs)
            .or_else(|| prov.map(|p| p.interval))
            .unwrap_or(crate::daemon::DEFAULT_INTERVAL),
        listen: args.listen.clone(),
        min_free_bytes: args.min_free_mib << 20,
        request_deadline: Duration::from_secs(args.request_timeout),
        no_reboot: host.never_reboot(),
        device_id,
        segment: args
            .segment
            .clone()
            .or_else(|| prov.map(|p| p.segment.to_string()))
            .unwrap_or_else(|| "general".into()),
        unprovisioned,
    };
    Ok((config, prov.map(rollout_overrides).unwrap_or_default()))
}

/// Whom the daemon's HTTPS requests trust: `--ca-bundle`, else the provisioned
/// `channel.ca_bundle` (copied to /data at first boot), else the built-in roots. A CA bundle
/// that is named but unusable stops the daemon: it never falls back to the public roots.
fn daemon_trust(host: &HostFacts, args: &RunArgs) -> Result<crate::http::Trust> {
    let (path, from) = match &args.ca_bundle {
        Some(p) => (p.clone(), "--ca-bundle"),
        None => match provisioned_device(&host.disk)
            .ok()
            .and_then(|d| d.channel.ca_bundle_path(&host.cli.data_dir))
        {
            Some(p) => (p, "device.toml channel.ca_bundle"),
            None => return Ok(None),
        },
    };
    let tls = crate::http::tls_config(&path).context(from)?;
    Ok(Some(tls))
}

/// `updater run`: the daemon, until SIGTERM.
fn run_daemon(host: HostFacts, args: &RunArgs) -> Result<bool> {
    let (config, overrides) = daemon_settings(&host, args)?;
    config.validate()?;
    // Under systemd (Type=notify, WatchdogSec=) the pings stop when no poll has started for
    // two intervals and an hour (a stuck install): systemd then restarts the daemon.
    let stall = config.interval.saturating_mul(2).saturating_add(Duration::from_secs(3600));
    let alive = host.keep_alive(stall, false);
    let trust = daemon_trust(&host, args)?;
    let cli = host.cli;
    let keyring = load_keyring(cli)?;
    let booted = host.booted().copied();
    let running = read_release(&cli.sysroot);
    let roles = crate::daemon::role::runner_for(
        &host.disk,
        &cli.data_dir,
        &cli.sysroot,
        &config,
        &overrides,
        running.as_ref().map(|r| r.version.clone()),
        keyring.clone(),
    )
    .map(|r| r.with_trust(trust.clone()));
    let daemon = crate::daemon::Daemon {
        fetcher: crate::daemon::fetch::ChannelFetcher::new(
            config.mirrors.clone(),
            &config.channel,
            config.request_deadline,
        )
        .with_trust(trust.clone()),
        record: crate::daemon::Daemon::open_record(&host.device, &config, host.now),
        roles,
        cache: crate::daemon::Cache::new(&cli.data_dir),
        log: Log::new(cli.log_file.clone(), &config.device_id),
        planner: Box::new(crate::daemon::ChannelPlanner { keyring: keyring.clone(), overrides }),
        installer: Box::new(crate::daemon::BundleInstaller {
            keyring,
            running: running.clone(),
            booted,
            log_file: cli.log_file.clone(),
            trust,
        }),
        rebooter: host.rebooter(),
        booted,
        running,
        device: host.device,
        config,
    };
    crate::daemon::run(daemon, args.history, &alive)?;
    Ok(true)
}

fn load_keyring(cli: &Cli) -> Result<crate::sign::Keyring> {
    crate::sign::Keyring::load(&cli.keyring)
        .with_context(|| format!("loading the keyring {}", cli.keyring.display()))
}

/// `updater status`.
fn status(host: &HostFacts, json: bool, history: usize, out: &mut dyn Write) -> Result<bool> {
    let status = host.device.status(host.booted.clone(), history);
    let prov = crate::firstboot::read_outcome(&host.cli.data_dir);
    if json {
        let mut j = serde_json::to_value(&status)?;
        j["provisioning"] = provisioning_json(prov.as_ref());
        writeln!(out, "{}", serde_json::to_string_pretty(&j)?)?;
    } else {
        write!(out, "{}", render_status(&status))?;
        write!(out, "{}", render_provisioning(prov.as_ref()))?;
    }
    Ok(status.state_error.is_none())
}

/// `updater firstboot`.
fn firstboot(host: &HostFacts, out: &mut dyn Write) -> Result<bool> {
    // Growing a large card can take a while: keep the watchdog fed (or systemd told).
    let alive = host.keep_alive(Duration::from_secs(600), true);
    host.tell(&alive, "first boot: checking the provisioning");
    let platform: Box<dyn crate::firstboot::Platform> = if host.block_device {
        Box::new(crate::firstboot::Linux)
    } else {
        Box::new(crate::firstboot::ImageFile)
    };
    let fb = crate::firstboot::Firstboot {
        disk: &host.disk,
        data_dir: &host.cli.data_dir,
        platform: platform.as_ref(),
        now: host.now,
    };
    let o = fb.run().context("first boot")?;
    let who = o.device_id.as_deref().unwrap_or("unknown device");
    let summary = match (o.result, &o.reason) {
        (FirstbootResult::AlreadyProvisioned, _) => format!("metrica: provisioned ({who})"),
        (FirstbootResult::Ok, _) => format!(
            "metrica: first boot done: {who}, host {}, data {}",
            o.hostname.as_deref().unwrap_or("?"),
            crate::units::size(o.data_bytes)
        ),
        (_, reason) => format!(
            "metrica: first boot degraded: {}",
            reason.as_deref().unwrap_or("unknown reason")
        ),
    };
    writeln!(out, "{summary}")?;
    host.log.event(if o.is_ok() { "info" } else { "error" }, &summary);
    host.tell(&alive, summary.trim_start_matches("metrica: "));
    Ok(o.is_ok())
}

/// The health flags of `updater boot`.
struct HealthFlags<'a> {
    deadline: Duration,
    dir: &'a Path,
    timeout: Duration,
}

/// `updater boot`.
fn boot(host: &HostFacts, flags: &HealthFlags, out: &mut dyn Write) -> Result<bool> {
    // Keep the watchdog fed (or systemd told) while the checks run; never stop the hardware
    // watchdog (see watchdog.rs).
    let alive = host.keep_alive(flags.deadline.saturating_add(Duration::from_secs(120)), true);
    let info = host.booted.clone().map_err(anyhow::Error::msg)?;
    host.tell(&alive, &format!("booted {info}: reconciling, health checks"));
    if info.tryboot && !host.never_reboot() {
        // A trial is never left pending: even a bug that panics reboots plainly, so the
        // firmware goes back to the committed slot.
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |p| {
            default_hook(p);
            eprintln!("metrica: updater panicked in a trial boot; rebooting to the committed slot");
            let _ = SystemReboot.reboot(RebootMode::Plain);
        }));
    }
    let _lock = match host.device.lock() {
        Ok(l) => l,
        Err(e) if info.tryboot && e.downcast_ref::<slot::LockBusy>().is_none() => {
            let summary =
                format!("metrica: booted {info}: error: {e:#}; rebooting to the committed slot");
            writeln!(out, "{summary}")?;
            host.log.event("error", &summary);
            host.reboot(RebootMode::Plain, out)?;
            return Ok(false);
        }
        Err(e) => return Err(e),
    };
    let data_dir = &host.cli.data_dir;
    let running = read_release(&host.cli.sysroot);
    let extra = health::extra_checks(flags.dir, flags.timeout);
    let up = health::UpdaterUp { state_dir: data_dir.join("metrica") };
    let data = health::DataWritable { data_dir: data_dir.clone() };
    let clock = health::ClockSane {
        not_before: running.as_ref().map_or(CLOCK_FLOOR, |r| r.build_epoch),
        now: Box::new(slot::unix_now),
    };
    let mut checks: Vec<&dyn Check> = vec![&up, &data, &clock];
    checks.extend(extra.iter().map(|c| c as &dyn Check));
    let timer = health::SystemTimer(Instant::now());
    let plan = HealthPlan { checks, deadline: flags.deadline, timer: &timer };
    let report = host.device.boot(&info, running.as_ref(), &plan, &slot::unix_now);
    writeln!(out, "{}", report.summary)?;
    host.log.event(if report.ok { "info" } else { "error" }, &report.summary);
    host.tell(&alive, report.summary.trim_start_matches("metrica: "));
    if let Some(mode) = report.reboot {
        out.flush()?;
        host.reboot(mode, out)?;
    }
    Ok(report.ok)
}

/// The flags of `updater install` besides its source.
struct InstallFlags<'a> {
    reboot: bool,
    allow_bad: bool,
    ca_bundle: &'a Option<PathBuf>,
    progress: crate::install::ProgressStyle,
}

/// `updater install`.
fn install(
    host: &HostFacts,
    source: &str,
    flags: &InstallFlags,
    out: &mut dyn Write,
) -> Result<bool> {
    let (cli, device) = (host.cli, &host.device);
    let _lock = device.lock()?;
    let keyring = load_keyring(cli)?;
    let b = host.booted();
    let running = read_release(&cli.sysroot);
    let s = device.open_state(b.and_then(BootInfo::slot), running.as_ref(), host.now)?;
    // Refused before anything is fetched; the state checks it again when the install starts.
    policy::from_committed(&s, b, Action::Install)?;
    let target = s.committed.other();
    let policy = slot::InstallPolicy {
        device,
        facts: device.device_facts(&s, running.as_ref())?,
        target,
        allow_bad: flags.allow_bad,
        booted: b,
        now: host.now,
    };
    let mut req = crate::install::InstallRequest::new(&host.disk, target, &keyring, &policy);
    req.resume_file = Some(crate::install::progress_path(&cli.data_dir));
    req.ca_bundle = flags.ca_bundle.clone();
    let images = install_with_progress(host, source, &req, flags.progress)
        .with_context(|| format!("installing {source} into slot {target}"))?;
    device.finish_install(target, &images.version, slot::unix_now())?;
    host.report(out, "info", &format!("installed {} into slot {target}", images.version))?;
    if flags.reboot {
        device.start_trial(b, slot::unix_now())?;
        writeln!(
            out,
            "metrica: trial of slot {target} ({}): rebooting with tryboot",
            images.version
        )?;
        out.flush()?;
        host.reboot(RebootMode::Tryboot, out)?;
    }
    Ok(true)
}

/// Installs `source` as `req` says, showing progress in `style` (docs/daemon.md, "Console
/// logs"): with `--log-file` and `auto`, JSON lines in the log.
fn install_with_progress(
    host: &HostFacts,
    source: &str,
    req: &crate::install::InstallRequest<'_>,
    style: crate::install::ProgressStyle,
) -> Result<crate::install::InstalledImages, crate::install::InstallError> {
    use crate::install::{install_bundle, JsonLines, PlainLines, ProgressStyle, TerminalBar};
    let source = crate::install::Source::parse(source);
    let style = match style {
        ProgressStyle::Auto if host.cli.log_file.is_some() => ProgressStyle::Json,
        other => other.for_stderr(),
    };
    match style {
        ProgressStyle::Bar => install_bundle(source, req, &mut TerminalBar::new(std::io::stderr())),
        ProgressStyle::Json => install_bundle(source, req, &mut JsonLines::new(host.log.writer())),
        _ => install_bundle(source, req, &mut PlainLines::new(std::io::stderr())),
    }
}

/// `updater trial`.
fn trial(host: &HostFacts, out: &mut dyn Write) -> Result<bool> {
    let _lock = host.device.lock()?;
    let (s, slot) = host.device.start_trial(host.booted(), host.now)?;
    let v = s.slot(slot).version.as_ref().map(|v| format!(" ({v})")).unwrap_or_default();
    writeln!(out, "metrica: trial of slot {slot}{v}: rebooting with tryboot")?;
    host.log.event("info", &format!("trial of slot {slot}{v} requested"));
    out.flush()?;
    host.reboot(RebootMode::Tryboot, out)?;
    Ok(true)
}

/// `updater mark-good`.
fn mark_good(host: &HostFacts, slot: Option<Slot>, out: &mut dyn Write) -> Result<bool> {
    let _lock = host.device.lock()?;
    let slot = slot_or_booted(slot, &host.booted)?;
    let (_, msg) = host.device.mark_good(slot, host.booted(), host.now)?;
    host.report(out, "info", &msg)?;
    Ok(true)
}

/// `updater mark-bad`.
fn mark_bad(
    host: &HostFacts,
    slot: Option<Slot>,
    reason: &str,
    out: &mut dyn Write,
) -> Result<bool> {
    let _lock = host.device.lock()?;
    let slot = slot_or_booted(slot, &host.booted)?;
    let s = host.device.mark_bad(slot, reason, host.booted(), host.now)?;
    let mut msg = format!("slot {slot} marked bad: {reason}");
    if host.booted().and_then(BootInfo::slot) == Some(slot) {
        msg.push_str(&format!("; reboot to return to committed slot {}", s.committed));
    }
    host.report(out, "info", &msg)?;
    Ok(true)
}

fn slot_or_booted(slot: Option<Slot>, booted: &Result<BootInfo, String>) -> Result<Slot> {
    match (slot, booted) {
        (Some(s), _) => Ok(s),
        (None, Ok(b)) => b.slot().with_context(|| format!("booted {b}, which is not a slot")),
        (None, Err(e)) => bail!("name the slot (a or b): {e}"),
    }
}

fn is_block_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

fn default_disk(sysroot: &Path) -> Result<PathBuf> {
    let (disk, _) = crate::disk::locate_label(
        &sysroot.join("sys/class/block"),
        &sysroot.join("dev"),
        crate::layout::CONFIG.label,
    )
    .context("finding the disk (pass --disk)")?;
    Ok(disk)
}

/// The device id: `/etc/machine-id` under the sysroot.
/// The device.toml on the disk's provision partition, validated.
fn provisioned_device(disk: &Path) -> Result<crate::provision::DeviceConfig> {
    let files = crate::provision::read_partition(disk)?;
    let p = crate::provision::Provisioning::from_files(&files)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("provision partition")?;
    Ok(p.device)
}

/// The rollout's per-device overrides from the provisioning. The maintenance window is in
/// the device's local time; the offset is that of its time zone, and the image carries no
/// zone database, so only UTC (and `Etc/UTC`) are known: any other zone is applied as UTC
/// (docs/daemon.md says so).
fn rollout_overrides(d: &crate::provision::DeviceConfig) -> crate::rollout::Overrides {
    crate::rollout::Overrides {
        version_lock: d.overrides.version_lock.clone(),
        auto_update: (!d.overrides.auto_update).then_some(false),
        channel: d.overrides.channel.clone(),
        maintenance_window: d.maintenance_window.as_ref().map(|w| {
            crate::rollout::MaintenanceWindow {
                days: Default::default(),
                start: crate::rollout::TimeOfDay(w.start),
                end: crate::rollout::TimeOfDay(w.end),
                utc_offset_minutes: 0,
            }
        }),
    }
}

fn machine_id(sysroot: &Path) -> Result<String> {
    let path = sysroot.join("etc/machine-id");
    let id = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {} (or pass --device-id)", path.display()))?;
    let id = id.trim();
    if id.is_empty() {
        bail!("{} is empty (pass --device-id)", path.display());
    }
    Ok(id.to_string())
}

pub(crate) fn read_release(sysroot: &Path) -> Option<Release> {
    let path = sysroot.join(RELEASE_PATH.trim_start_matches('/'));
    Release::from_toml(&std::fs::read_to_string(path).ok()?).ok()
}

/// A unix time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc(t: u64) -> String {
    crate::bundle::datetime_from_unix(t).to_string()
}

/// The `provisioning` object of `updater status --json`: the last first boot's outcome.
fn provisioning_json(o: Option<&Result<crate::firstboot::Outcome, String>>) -> serde_json::Value {
    match o {
        None => serde_json::json!({ "result": "not-run" }),
        Some(Ok(o)) => serde_json::to_value(o).unwrap_or_default(),
        Some(Err(e)) => serde_json::json!({ "result": "unknown", "reason": e }),
    }
}

/// The provisioning lines of `updater status`.
pub fn render_provisioning(o: Option<&Result<crate::firstboot::Outcome, String>>) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    match o {
        None => {
            let _ = writeln!(s, "provisioning: not run yet (`updater firstboot`)");
        }
        Some(Err(e)) => {
            let _ = writeln!(s, "provisioning: unknown ({e})");
        }
        Some(Ok(o)) => {
            match &o.reason {
                Some(r) => {
                    let _ = writeln!(s, "provisioning: {}: {r}", o.result);
                }
                None => {
                    let _ = writeln!(s, "provisioning: {} at {}", o.result, utc(o.time));
                }
            }
            if let Some(d) = &o.device_id {
                let _ = writeln!(s, "device id:   {d}");
            }
            if let Some(h) = &o.hostname {
                let _ = writeln!(s, "hostname:    {h}");
            }
            if let Some(r) = &o.recipient {
                let src = match o.identity_source {
                    Some(crate::provision::identity::Source::Otp) => " (from the OTP key)",
                    Some(crate::provision::identity::Source::Generated) => " (generated)",
                    None => "",
                };
                let _ = writeln!(s, "identity:    {r}{src}");
            }
            let _ = writeln!(s, "data:        {}", crate::units::size(o.data_bytes));
        }
    }
    s
}

/// `updater status` for a person.
pub fn render_status(st: &Status) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(o, "disk:        {}", st.disk.display());
    render_boot_lines(st, &mut o);
    render_state_lines(st, &mut o);
    render_daemon_lines(st, &mut o);
    if let Some(free) = st.disk_free_bytes {
        let _ = writeln!(o, "data free:   {}", crate::units::size(free));
    }
    for d in &st.drift {
        let _ = writeln!(o, "drift:       {d}");
    }
    if st.safe_mode {
        let _ = writeln!(o, "safe mode:   on");
    }
    if !st.history.is_empty() {
        let _ = writeln!(o, "history:");
        for h in &st.history {
            let mut line = format!("  {} {}", utc(h.time), h.event);
            if let Some(s) = &h.slot {
                line.push_str(&format!(" slot {s}"));
            }
            if let Some(v) = &h.version {
                line.push_str(&format!(" {v}"));
            }
            if let Some(r) = &h.reason {
                line.push_str(&format!(": {r}"));
            }
            let _ = writeln!(o, "{line}");
        }
    }
    o
}

/// The booted and autoboot lines of `updater status`.
fn render_boot_lines(st: &Status, o: &mut String) {
    use std::fmt::Write as _;
    match (&st.booted, &st.booted_error) {
        (Some(b), _) => {
            let _ = writeln!(o, "booted:      {b}");
        }
        (None, Some(e)) => {
            let _ = writeln!(o, "booted:      unknown ({e})");
        }
        _ => {}
    }
    match (&st.autoboot, &st.autoboot_error) {
        (Some(a), _) => {
            let _ = writeln!(
                o,
                "autoboot:    committed slot {}, tryboot slot {}",
                a.committed, a.tryboot
            );
        }
        (None, Some(e)) => {
            let _ = writeln!(o, "autoboot:    {e}");
        }
        _ => {}
    }
}

/// The state's lines of `updater status`.
fn render_state_lines(st: &Status, o: &mut String) {
    use std::fmt::Write as _;
    match (&st.state, &st.state_error) {
        (Some(s), _) => {
            let _ = writeln!(o, "committed:   slot {}", s.committed);
            for slot in Slot::ALL {
                let _ = writeln!(o, "slot {slot}:      {}", s.slot(slot));
            }
            match &s.trial {
                Some(t) => {
                    let v = t.version.as_ref().map(|v| format!(" ({v})")).unwrap_or_default();
                    let _ = writeln!(
                        o,
                        "trial:       slot {}{v}, {:?} since {}",
                        t.slot,
                        t.phase,
                        utc(t.started)
                    );
                }
                None => {
                    let _ = writeln!(o, "trial:       none");
                }
            }
            let _ = writeln!(o, "epoch:       {}", s.security_epoch);
            let c = &s.counters;
            let _ = writeln!(
                o,
                "counters:    installs {}, commits {}, rollbacks {}, health failures {}, repairs {}",
                c.installs, c.commits, c.rollbacks, c.health_failures, c.repairs
            );
            if !s.bad_versions.is_empty() {
                let bad: Vec<String> = s.bad_versions.iter().map(|v| v.to_string()).collect();
                let _ = writeln!(o, "bad:         {}", bad.join(", "));
            }
            if let Some(e) = &s.last_error {
                let _ = writeln!(o, "last error:  {e}");
            }
            if let Some(r) = &s.recovered {
                let _ = writeln!(o, "recovered:   {} at {}", r.reason, utc(r.at));
            }
        }
        (None, Some(e)) => {
            let _ = writeln!(o, "state:       error: {e}");
        }
        (None, None) => {
            let _ = writeln!(o, "state:       none yet (created by `updater boot`)");
        }
    }
}

/// The daemon's lines of `updater status`.
fn render_daemon_lines(st: &Status, o: &mut String) {
    use std::fmt::Write as _;
    match (&st.daemon, &st.daemon_error) {
        (Some(d), _) => {
            let c = &d.channel;
            let seq = c.sequence.map(|s| format!(", sequence {s}")).unwrap_or_default();
            let target =
                c.target_version.as_ref().map(|v| format!(", target {v}")).unwrap_or_default();
            let _ = writeln!(o, "channel:     {}{seq}{target}", c.name);
            let contact = d.last_contact.map_or("never".to_string(), utc);
            let conn = st.connectivity.map(|c| c.to_string()).unwrap_or_default();
            let _ = writeln!(o, "network:     {conn} (last contact {contact})");
            if let Some(dec) = &d.decision {
                let v = dec.version.as_ref().map(|v| format!(" {v}")).unwrap_or_default();
                let _ = writeln!(
                    o,
                    "decision:    {}{v}: {} (at {})",
                    dec.outcome,
                    dec.reason,
                    utc(dec.time)
                );
            }
            if let Some(e) = &d.last_error {
                let _ = writeln!(o, "daemon error: {}: {} (at {})", e.kind, e.message, utc(e.time));
            }
        }
        (None, Some(e)) => {
            let _ = writeln!(o, "daemon:      error: {e}");
        }
        (None, None) => {
            let _ = writeln!(o, "daemon:      has not run yet (`updater run`)");
        }
    }
}

#[cfg(test)]
mod tests {

    /// docs/cli-updater.md is generated from the clap definitions; run with UPDATE_DOCS=1 to refresh it.
    #[test]
    fn cli_docs_are_current() {
        let generated = clap_markdown::help_markdown::<Cli>();
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/cli-updater.md");
        if std::env::var_os("UPDATE_DOCS").is_some() {
            std::fs::write(&path, &generated).unwrap();
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "docs/cli-updater.md is stale: run UPDATE_DOCS=1 cargo test -p updater cli_docs"
        );
    }

    use super::*;
    use crate::testutil::disk_committed;

    struct Host {
        _dir: tempfile::TempDir,
        args: Vec<String>,
        sysroot: PathBuf,
    }

    /// A disk image committing A, an empty data folder, and a fake root whose kernel command
    /// line says where the system booted.
    fn host(cmdline: &str) -> Host {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("card.img");
        disk_committed(&disk, Slot::A);
        let sysroot = dir.path().join("root");
        std::fs::create_dir_all(sysroot.join("proc")).unwrap();
        std::fs::write(sysroot.join("proc/cmdline"), cmdline).unwrap();
        let args = vec![
            "updater".to_string(),
            "--disk".into(),
            disk.display().to_string(),
            "--data-dir".into(),
            dir.path().join("data").display().to_string(),
            "--sysroot".into(),
            sysroot.display().to_string(),
            "--log-file".into(),
            dir.path().join("log.jsonl").display().to_string(),
        ];
        Host { _dir: dir, args, sysroot }
    }

    fn cmd(h: &Host, extra: &[&str]) -> (Result<bool>, String) {
        let mut args = h.args.clone();
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut out = Vec::new();
        let r = run(&Cli::try_parse_from(args).unwrap(), &mut out);
        (r, String::from_utf8(out).unwrap())
    }

    /// Writes the provision tests' device.toml onto the disk's provision partition.
    fn provision_device_toml(disk: &Path) {
        let prov = crate::disk::find_label(disk, "provision").unwrap();
        let file = std::fs::OpenOptions::new().read(true).write(true).open(disk).unwrap();
        let fs = fatfs::FileSystem::new(
            crate::disk::partition_stream(file, &prov).unwrap(),
            fatfs::FsOptions::new(),
        )
        .unwrap();
        fs.root_dir()
            .create_file("device.toml")
            .unwrap()
            .write_all(crate::provision::tests::DEVICE.as_bytes())
            .unwrap();
        fs.unmount().unwrap();
    }

    /// A CA bundle that is named but cannot be used stops the daemon before it fetches
    /// anything, naming the flag and the file (it never falls back to the built-in roots).
    #[test]
    fn run_refuses_an_unusable_ca_bundle() {
        let h = host("metrica.boot_partition=2");
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("ca.pem");
        std::fs::write(&not_pem, "not a certificate\n").unwrap();
        let missing = dir.path().join("missing.pem");
        for (path, why) in [(&missing, "No such file"), (&not_pem, "no PEM certificate")] {
            let ca = path.to_str().unwrap();
            let mirror = "https://updates.example.com/fleet";
            let args = ["run", "--mirror", mirror, "--device-id", "d1", "--ca-bundle", ca];
            let e = format!("{:#}", cmd(&h, &args).0.unwrap_err());
            assert!(e.starts_with(&format!("--ca-bundle: CA bundle {ca}: ")), "{e}");
            assert!(e.contains(why), "{why}: {e}");
        }
    }

    /// `updater run` with no flags takes its settings from the provision partition; with
    /// neither flags nor provisioning it follows no channel, saying why (and still starts:
    /// its endpoints and the safe-mode stack tell whoever comes to the device).
    #[test]
    fn run_takes_its_settings_from_the_provisioning() {
        let h = host("metrica.boot_partition=2");
        let mut argv = h.args.clone();
        argv.extend(["run", "--device-id", "d1"].map(String::from));
        let cli = Cli::try_parse_from(argv).unwrap();
        let Command::Run(args) = &cli.command else { panic!("not run") };
        let (config, _) = daemon_settings(&HostFacts::new(&cli).unwrap(), args).unwrap();
        config.validate().unwrap();
        assert!(config.mirrors.is_empty());
        let why = config.unprovisioned.unwrap();
        assert!(why.starts_with("no --mirror and no valid provisioning: provision partition: "));
        assert!(why.contains("device.toml"), "{why}");

        let disk = Path::new(&h.args[2]);
        provision_device_toml(disk);
        let d = provisioned_device(disk).unwrap();
        assert_eq!(d.device_id, "pi-0042");
        assert_eq!(d.segment, crate::channel::Segment::Canary);
        assert_eq!(
            d.channel.urls,
            ["https://updates.example.com/fleet", "https://mirror.example.net/fleet"]
        );
        assert_eq!(d.interval, Duration::from_secs(600));
        let o = rollout_overrides(&d);
        assert_eq!(o.version_lock, Some("1.4.2".parse().unwrap()));
        assert_eq!(o.auto_update, Some(false));
        assert_eq!(o.channel.as_deref(), Some("beta"));
        let w = o.maintenance_window.unwrap();
        assert_eq!((w.start.0, w.end.0, w.utc_offset_minutes), (22 * 60 + 30, 120, 0));
    }

    #[test]
    fn status_of_a_fresh_image_on_a_host() {
        let h = host("quiet");
        let (r, out) = cmd(&h, &["status"]);
        assert!(r.unwrap());
        assert!(out.contains("booted:      unknown (cannot tell where the system booted"), "{out}");
        assert!(out.contains("autoboot:    committed slot a, tryboot slot b"), "{out}");
        assert!(out.contains("state:       none yet"), "{out}");
    }

    #[test]
    fn boot_then_status_json() {
        let h = host("console=ttyAMA0 metrica.boot_partition=2 metrica.tryboot=0");
        std::fs::create_dir_all(h.sysroot.join("etc/metrica")).unwrap();
        std::fs::write(
            h.sysroot.join("etc/metrica/release.toml"),
            "name = \"m\"\nversion = \"1.0.0\"\ncompatible = \"c\"\nbuild_epoch = 1\n",
        )
        .unwrap();
        let (r, out) = cmd(&h, &["boot"]);
        assert!(r.unwrap());
        assert_eq!(out, "metrica: booted slot a: slot a (1.0.0) ok\n");
        let (r, out) = cmd(&h, &["status", "--json"]);
        assert!(r.unwrap());
        let j: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(j["state"]["committed"], "a");
        assert_eq!(j["state"]["slots"]["a"]["state"], "good");
        assert_eq!(j["state"]["slots"]["a"]["version"], "1.0.0");
        assert_eq!(j["booted"]["partition"], 2);
        assert_eq!(j["history"][0]["event"], "init");
        let (_, text) = cmd(&h, &["status"]);
        assert!(text.contains("slot a:      good 1.0.0"), "{text}");
        assert!(text.contains(" init slot a 1.0.0: state created"), "{text}");
    }

    #[test]
    fn refusals_are_errors_with_the_reason() {
        let h = host("metrica.boot_partition=2");
        let (r, _) = cmd(&h, &["trial"]);
        assert!(r.unwrap_err().to_string().contains("slot b holds no installed system"));
        let (r, _) = cmd(&h, &["mark-bad", "a"]);
        assert!(r.unwrap_err().to_string().contains("slot a is the committed slot"));
        let (r, _) = cmd(&h, &["install", "v2.mfb"]);
        assert!(r.unwrap_err().to_string().contains("loading the keyring"));
        let (r, out) = cmd(&h, &["mark-good"]);
        assert!(r.unwrap());
        assert_eq!(out, "metrica: slot a marked good\n");
    }

    #[test]
    fn a_trial_on_an_image_file_does_not_reboot_the_host() {
        let h = host("metrica.boot_partition=2");
        let dev = Device::new(&h.args[2], &h.args[4]);
        dev.begin_install(&"2.0.0".parse().unwrap(), 0, false, None, 1).unwrap();
        dev.finish_install(Slot::B, &"2.0.0".parse().unwrap(), 2).unwrap();
        let (r, out) = cmd(&h, &["trial"]);
        assert!(r.unwrap());
        assert!(
            out.starts_with("metrica: trial of slot b (2.0.0): rebooting with tryboot\n"),
            "{out}"
        );
        assert!(out.contains("reboot (tryboot) not done"), "{out}");
        let log = std::fs::read_to_string(&h.args[8]).unwrap();
        assert!(log.lines().all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()));
        assert!(log.contains("reboot (tryboot) skipped"), "{log}");
    }

    /// The whole cycle on an image file, as on a device: install a signed bundle into B with
    /// `--reboot`, boot B with the tryboot flag, commit; the firmware model then boots B.
    #[test]
    fn install_trial_and_commit_on_an_image_file() {
        use crate::bundle::{testkit, SlotClass};
        use crate::testutil::{
            build_disk_with_roots, ext4_root, fat_boot_image, firmware_boots, release,
        };
        let h = host("metrica.boot_partition=2 metrica.tryboot=0");
        let disk = PathBuf::from(&h.args[2]);
        let root_a = ext4_root(&release("1.0.0"));
        build_disk_with_roots(
            &disk,
            Some(&crate::autoboot::Autoboot::committed(Slot::A).render()),
            &[Some(root_a.clone()), None],
        );
        let key = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
        let keyring = h.sysroot.join("keyring");
        std::fs::create_dir_all(&keyring).unwrap();
        std::fs::write(
            keyring.join("test.pub.pem"),
            crate::sign::public_key_to_pem(&key.verifying_key()),
        )
        .unwrap();
        let meta = testkit::TestMeta {
            compatible: "metrica-test".into(),
            version: "2.0.0".parse().unwrap(),
            security_epoch: 1,
        };
        let (boot, root) = (fat_boot_image(), ext4_root(&release("2.0.0")));
        let bundle = testkit::make_bundle(
            &meta,
            &[(SlotClass::Boot, &boot), (SlotClass::Root, &root)],
            Some(&key),
        );
        let bundle_path = h.sysroot.join("v2.mfb");
        std::fs::write(&bundle_path, bundle).unwrap();
        let k = keyring.display().to_string();
        let b = bundle_path.display().to_string();

        let (r, out) = cmd(&h, &["--keyring", &k, "install", &b, "--reboot"]);
        assert!(r.unwrap(), "{out}");
        assert!(out.contains("metrica: installed 2.0.0 into slot b\n"), "{out}");
        assert!(out.contains("reboot (tryboot) not done"), "{out}");
        assert_eq!(firmware_boots(&disk, true).0, Slot::B);
        assert_eq!(crate::testutil::root_bytes(&disk, Slot::A)[..root_a.len()], root_a[..]);

        // The same version again is refused: not newer, and a trial is pending.
        let (r, _) = cmd(&h, &["--keyring", &k, "install", &b]);
        assert!(r.is_err());

        // The trial boot: the firmware booted B with the tryboot flag.
        std::fs::write(
            h.sysroot.join("proc/cmdline"),
            "metrica.boot_partition=3 metrica.tryboot=1",
        )
        .unwrap();
        let none = h.sysroot.join("no-checks").display().to_string();
        let (r, out) = cmd(&h, &["boot", "--health-dir", &none]);
        assert!(r.unwrap(), "{out}");
        assert_eq!(
            out.lines().next().unwrap(),
            "metrica: booted slot b (trial): checks passed in 0 s; committed slot b (2.0.0)"
        );
        assert_eq!(firmware_boots(&disk, false).0, Slot::B);
        std::fs::write(h.sysroot.join("proc/cmdline"), "metrica.boot_partition=3").unwrap();
        let (_, out) = cmd(&h, &["status"]);
        assert!(out.contains("slot b:      good 2.0.0"), "{out}");
        assert!(out.contains("epoch:       1"), "{out}");
        let (r, _) = cmd(&h, &["--keyring", &k, "install", &b]);
        assert!(format!("{:#}", r.unwrap_err()).contains("not newer"));
    }

    #[test]
    fn firstboot_without_provisioning_is_degraded_and_status_says_why() {
        let h = host("metrica.boot_partition=2");
        let (_, out) = cmd(&h, &["status"]);
        assert!(out.contains("provisioning: not run yet"), "{out}");
        let (r, out) = cmd(&h, &["firstboot"]);
        assert!(!r.unwrap(), "degraded is a failure exit");
        assert!(
            out.starts_with(
                "metrica: first boot degraded: invalid provisioning: device.toml: missing"
            ),
            "{out}"
        );
        let log = std::fs::read_to_string(&h.args[8]).unwrap();
        assert!(
            log.contains("first boot degraded") && log.contains("\"level\":\"error\""),
            "{log}"
        );
        let (r, out) = cmd(&h, &["status"]);
        assert!(r.unwrap());
        assert!(
            out.contains("provisioning: degraded: invalid provisioning: device.toml: missing"),
            "{out}"
        );
        assert!(out.contains("identity:    age1") && out.contains("(generated)"), "{out}");
        let (_, out) = cmd(&h, &["status", "--json"]);
        let j: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(j["provisioning"]["result"], "degraded");
        assert!(j["provisioning"]["reason"].as_str().unwrap().contains("device.toml: missing"));
    }

    #[test]
    fn firstboot_of_a_provisioned_image_and_status_shows_the_device_id() {
        let h = host("metrica.boot_partition=2");
        let disk = PathBuf::from(&h.args[2]);
        provision_device_toml(&disk);
        // The test disk's data partition has no ext4: growing the file system is reported.
        let (r, out) = cmd(&h, &["firstboot"]);
        assert!(!r.unwrap());
        assert!(out.contains("data not grown"), "{out}");
        let (_, out) = cmd(&h, &["status", "--json"]);
        let j: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(j["provisioning"]["device_id"], "pi-0042");
        assert_eq!(j["provisioning"]["hostname"], "cam-0042");
        let (_, out) = cmd(&h, &["status"]);
        assert!(out.contains("device id:   pi-0042"), "{out}");
    }

    #[test]
    fn usage_errors_exit_2_and_locate_still_parses() {
        let e = Cli::try_parse_from(["updater", "frobnicate"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let e = Cli::try_parse_from(["updater", "mark-bad", "c"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let c = Cli::try_parse_from(["updater", "locate", "--label", "data"]).unwrap();
        assert!(matches!(c.command, Command::Locate { label: Some(_), .. }));
        let u = "0fc63daf-8483-4772-8e79-3d69d8477de4";
        assert!(Cli::try_parse_from(["updater", "locate", "--partuuid", u]).is_ok());
    }

    #[test]
    fn utc_formats_unix_times() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(1_704_067_200), "2024-01-01T00:00:00Z");
        assert_eq!(utc(1_795_000_061), "2026-11-18T11:07:41Z");
    }
}
