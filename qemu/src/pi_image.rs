//! The Raspberry Pi root filesystem under QEMU (issue 14): `recipes/pi-qemu.toml` builds the
//! same trixie root as the Pi image, with systemd, Docker and the updater's units, read-only.
//! One run of a provisioned copy of v1:
//!
//! 1. boot 1 (slot A): the system reaches `running` with no failed unit, `/` is mounted
//!    read-only, dockerd and containerd are active with their data on /data, Compose v2
//!    answers, first boot applied the host name and made the SSH host keys on /data; the
//!    daemon started the provisioned role (`hello`) from the bundle baked into the image,
//!    with no network, and the baked safe-mode stack serves its page in safe mode; then
//!    `updater install v2 --reboot` (tryboot);
//! 2. boot 2 (slot B, tryboot): `updater boot` under systemd commits B once Docker is up;
//!    plain reboot;
//! 3. boot 3 (slot B): B is the committed default, and the role still runs.
//!
//! Each boot's QEMU-start-to-healthy time is reported (the `metrica-updater: healthy` line
//! that metrica-boot.service prints).

use crate::driver::{Cmd, Driver, Seen};
use crate::fixtures;
use crate::harness::{self, RunEnd};
use crate::scenario::{options, sparse_copy, Context};
use anyhow::{bail, ensure, Context as _, Result};
use std::path::{Path, PathBuf};

pub const DEVICE_ID: &str = "pi-qemu-0001";
/// The guest's virtual CPUs. Under TCG a systemd boot with two (multi-threaded TCG, on two
/// host cores) reached healthy after 52 s where one took 79 s: udev's coldplug, containerd and
/// dockerd run side by side. (The lean busybox images boot faster with one.)
pub const CPUS: u32 = 2;
pub const HOSTNAME: &str = "metrica-pi-qemu-0001";

/// What the run measured.
#[derive(Debug, Clone)]
pub struct PiReport {
    /// QEMU start to the healthy line, per boot (ms).
    pub healthy_ms: Vec<u64>,
    pub logs: Option<PathBuf>,
}

/// The checks of the first boot, each a command that must exit 0 (printed first, so that a
/// failure's console log shows the state).
fn live_checks() -> Vec<Cmd> {
    vec![
        Cmd::any("systemctl is-system-running --wait; systemctl --failed --no-legend --plain"),
        Cmd::ok("test \"$(systemctl is-system-running)\" = running"),
        Cmd::ok("test \"$(findmnt -no OPTIONS / | cut -d, -f1)\" = ro"),
        Cmd::ok("! touch /usr/metrica-write-test 2>/dev/null"),
        Cmd::ok(
            "systemctl is-active docker containerd metrica-boot metrica-updater systemd-journald",
        ),
        Cmd::ok("test \"$(docker info --format '{{.DockerRootDir}}')\" = /data/docker"),
        Cmd::ok("docker compose version | grep -q 'version 2'"),
        Cmd::ok(format!("test \"$(hostname)\" = {HOSTNAME}")),
        Cmd::ok(
            "test -s /data/etc/ssh/ssh_host_ed25519_key && test ! -e /etc/ssh/ssh_host_ed25519_key",
        ),
        Cmd::ok("test -s /data/etc/machine-id"),
        // The role the device is provisioned with, started by the daemon from the bundle
        // baked into the image: the machine has no network (-nic none).
        Cmd::ok(format!("updater role status | grep -x '{ROLE_UP}'")),
        Cmd::ok(http_get(8080, "/", HELLO_PAGE)),
        // The baked safe-mode stack, unpacked by the daemon, serves its page while the role
        // is stopped; leaving safe mode brings the role back.
        Cmd::ok("test -s /data/metrica/safe-mode-stack/role.toml"),
        Cmd::ok(format!(
            "updater safe-mode enter && {} && updater safe-mode exit",
            http_get(80, "/", "This device is in safe mode")
        )),
        Cmd::ok(http_get(8080, "/", HELLO_PAGE)),
        Cmd::status(),
    ]
}

/// The role the Pi image test provisions (qemu/roles/hello, baked by recipes/pi-qemu.toml).
pub const ROLE: &str = "hello";
/// `updater role status`'s line for it, running its first release.
const ROLE_UP: &str = "role hello: current 1.0.0, previous -, committed 1.0.0, healthy";
/// What its page says.
const HELLO_PAGE: &str = "hello from the hello role";

/// A guest command that exits 0 when `GET path` on 127.0.0.1:`port` answers with `words` (a
/// grep pattern) in it (bash's /dev/tcp: the root has no HTTP client).
fn http_get(port: u16, path: &str, words: &str) -> String {
    format!(
        "bash -c 'exec 3<>/dev/tcp/127.0.0.1/{port} && printf \"GET {path} HTTP/1.0\\r\\n\\r\\n\" >&3 && cat <&3' | grep -q '{words}'"
    )
}

/// Boots a provisioned copy of v1 through the checks and the A/B update to v2.
pub fn run(ctx: &Context, dir: &Path) -> Result<PiReport> {
    let imager = fixtures::find_imager(ctx.imager.as_deref())?;
    let v1 = ctx.images.v1()?;
    let v2 = ctx.images.v2_bundle()?;
    let v2_name = v2.file_name().context("bundle name")?.to_string_lossy().into_owned();
    let disk = dir.join("disk.img");
    sparse_copy(v1, &disk)?;
    crate::provisioning::provision(&imager, &disk, dir, DEVICE_ID, HOSTNAME, ROLE)?;
    let test = dir.join("test-disk.img");
    fixtures::test_disk(&test, &[(&v2_name, &v2)])?;

    let mut boot1 = live_checks();
    boot1.push(Cmd::any(format!("updater install /run/test/{v2_name} --reboot")));
    let plan = vec![
        (1, boot1),
        (2, vec![Cmd::status(), Cmd::any("sync; systemctl reboot")]),
        (
            3,
            vec![
                Cmd::status(),
                Cmd::ok("test \"$(systemctl is-system-running --wait)\" = running"),
                Cmd::ok(format!("updater role status | grep -x '{ROLE_UP}'")),
            ],
        ),
    ];
    let (driver, report, log) = drive(ctx, &disk, &test, dir, "run", plan)?;
    let seen = |i: usize| -> Result<&Seen> {
        driver.seen.iter().find(|s| s.index == i).with_context(|| format!("no boot {i} ({log})"))
    };
    let trail: Vec<(u32, bool)> = report.boots.iter().map(|b| (b.partition, b.tryboot)).collect();
    ensure!(
        trail == [(2, false), (3, true), (3, false)],
        "expected boots A, B (tryboot), B; saw {trail:?} (log {log})"
    );
    for i in 1..=3 {
        ensure!(seen(i)?.healthy == Some(true), "boot {i} did not report healthy (log {log})");
    }
    let v2_version = seen(2)?
        .last_status()
        .and_then(|s| s["state"]["slots"]["b"]["version"].as_str().map(str::to_string))
        .context("boot 2 printed no status with slot b's version")?;
    ensure!(
        seen(2)?.updater.iter().any(|l| l.contains(&format!("committed slot b ({v2_version})"))),
        "the trial boot did not commit slot b: {:?} (log {log})",
        seen(2)?.updater
    );
    let st = seen(3)?.last_status().context("boot 3 printed no status")?;
    ensure!(st["state"]["committed"] == "b", "after the commit: {} (log {log})", st["state"]);
    ensure!(st["booted"]["tryboot"] == false, "boot 3 is a trial: {} (log {log})", st["booted"]);
    let healthy_ms = driver.healthy_times();
    Ok(PiReport { healthy_ms, logs: report.log_dir })
}

/// The checks of an unprovisioned card's first boot (flashed, never provisioned): first boot
/// fails for the missing device.toml, yet the daemon runs, follows no channel and enters safe
/// mode, and the baked safe-mode stack serves its page and the daemon's status on port 80.
fn unprovisioned_checks() -> Vec<Cmd> {
    vec![
        Cmd::any("systemctl is-system-running --wait; systemctl --failed --no-legend --plain"),
        Cmd::ok("systemctl is-failed metrica-firstboot"),
        Cmd::ok("systemctl is-active docker metrica-updater"),
        Cmd::ok("updater safe-mode status | grep -q '^safe mode: ON (invalid provisioning: '"),
        Cmd::ok(http_get(80, "/", "This device is in safe mode")),
        Cmd::ok(http_get(80, "/cgi-bin/api.sh/status", "\"code\": *\"unprovisioned\"")),
        Cmd::status(),
    ]
}

/// Boots an unprovisioned copy of v1 once through [`unprovisioned_checks`]; the QEMU start to
/// healthy time.
pub fn run_unprovisioned(ctx: &Context, dir: &Path) -> Result<PiReport> {
    let disk = dir.join("disk.img");
    sparse_copy(ctx.images.v1()?, &disk)?;
    // The test disk carries only the hook (the test hook unit needs it).
    let test = dir.join("test-disk.img");
    fixtures::test_disk(&test, &[])?;
    let plan = vec![(1, unprovisioned_checks())];
    let (driver, report, log) = drive(ctx, &disk, &test, dir, "unprovisioned", plan)?;
    let seen =
        driver.seen.iter().find(|s| s.index == 1).with_context(|| format!("no boot ({log})"))?;
    ensure!(seen.healthy == Some(true), "the boot did not report healthy (log {log})");
    Ok(PiReport { healthy_ms: driver.healthy_times(), logs: report.log_dir })
}

/// One run of the Pi image: `disk` with the test disk `test`, [`CPUS`] vCPUs, driven through
/// `plan`; the driver, the report and the console log's hint. A failed run is the error.
fn drive(
    ctx: &Context,
    disk: &Path,
    test: &Path,
    dir: &Path,
    name: &str,
    plan: Vec<(usize, Vec<Cmd>)>,
) -> Result<(Driver, harness::RunReport, String)> {
    let mut o = options(ctx, disk, dir, name);
    o.machine.cpus = CPUS;
    o.machine.extra_disks.push(test.to_path_buf());
    let mut driver = Driver::new(&ctx.healthy_pattern, plan);
    let report = harness::run(&o, &mut driver)?;
    let log = report.console_log_hint();
    if let RunEnd::Failed(f) = &report.end {
        bail!("the run failed: {f} (log {log})");
    }
    Ok((driver, report, log))
}
