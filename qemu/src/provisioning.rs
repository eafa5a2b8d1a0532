//! The provisioning scenario (issue 6): a 2 GiB image (recipes/qemu-big.toml) is written to a
//! 4 GiB virtual card with `imager flash`, provisioned with `imager provision`, and booted.
//! In the guest, first boot must have grown `/data` to fill the card, applied the host name
//! and the SSH keys, and `updater status --json` must report the device_id; a second boot
//! keeps all of it. On the host afterwards, the card's GPT and the data file system are read
//! with the harness's own GPT reader and e2fsprogs, not with the updater's code.

use crate::cut::Delay;
use crate::disk::GptPartition;
use crate::driver::{Cmd, Driver, Seen};
use crate::fixtures;
use crate::harness::{self, Director, RunEnd};
use crate::scenario::{cut_series, options, Context, CutSeries, Done};
use anyhow::{bail, ensure, Context as _, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The virtual card's size.
pub const CARD_BYTES: u64 = 4 << 30;
const MIB: u64 = 1 << 20;

pub const DEVICE_ID: &str = "qemu-0001";
pub const HOSTNAME: &str = "metrica-qemu-0001";
/// A well-formed ed25519 public key (its private half is not needed: the test only checks
/// that the key is installed).
pub const SSH_KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHJ0b3G9xq1P2W5Cxw3Y5CwG9ywJvn6dzQp2oOSs4mFr metrica-qemu-test";

fn device_toml(device_id: &str, hostname: &str, role: &str) -> String {
    format!(
        "device_id = \"{device_id}\"\nrole = \"{role}\"\nsegment = \"canary\"\n\
         hostname = \"{hostname}\"\ntimezone = \"Europe/Berlin\"\n\n[channel]\nname = \"stable\"\n\
         url = \"https://updates.example.com/fleet\"\n"
    )
}

/// The 2 GiB image: `METRICA_BIG_IMAGE`, else the `*.img` in the folder `qemu-big` beside the
/// scenario image folder (CI: out/qemu-big beside out/qemu).
pub fn big_image(ctx: &Context) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("METRICA_BIG_IMAGE") {
        return Ok(PathBuf::from(p));
    }
    let v1 = ctx.images.v1()?;
    let dir = v1
        .parent()
        .and_then(Path::parent)
        .map(|p| p.join("qemu-big"))
        .context("the image folder has no parent")?;
    let found = std::fs::read_dir(&dir).ok().and_then(|entries| {
        entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "img"))
    });
    found.with_context(|| {
        format!(
            "no 2 GiB image in {} (build it with `imager build recipes/qemu-big.toml --output {}`, \
             or set METRICA_BIG_IMAGE)",
            dir.display(),
            dir.display()
        )
    })
}

fn run_tool(what: &str, cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn sbin_path() -> String {
    format!("{}:/usr/sbin:/sbin", std::env::var("PATH").unwrap_or_default())
}

/// Provisions `card` (an image or a card) with `imager provision`: a device.toml for
/// `device_id`, `hostname` and `role`, and the test SSH key, written into `dir/provision` first.
pub fn provision(
    imager: &Path,
    card: &Path,
    dir: &Path,
    device_id: &str,
    hostname: &str,
    role: &str,
) -> Result<()> {
    let p = dir.join("provision");
    std::fs::create_dir_all(&p)?;
    std::fs::write(p.join("device.toml"), device_toml(device_id, hostname, role))?;
    std::fs::write(p.join("authorized_keys"), format!("{SSH_KEY}\n"))?;
    run_tool(
        "imager provision",
        Command::new(imager)
            .arg("provision")
            .arg(card)
            .arg("--device")
            .arg(p.join("device.toml"))
            .arg("--authorized-keys")
            .arg(p.join("authorized_keys"))
            .arg("--yes"),
    )?;
    Ok(())
}

/// The (block count × block size) of the ext4 file system at byte `offset` of `disk`, by
/// `dumpe2fs -h`.
fn ext4_bytes(disk: &Path, offset: u64) -> Result<u64> {
    let text = run_tool(
        "dumpe2fs",
        Command::new("dumpe2fs")
            .env("PATH", sbin_path())
            .arg("-h")
            .arg(format!("{}?offset={offset}", disk.display())),
    )?;
    let field = |name: &str| -> Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("dumpe2fs printed no {name:?}"))
    };
    Ok(field("Block count:")? * field("Block size:")?)
}

/// The provisioning scenarios' card: the 2 GiB image flashed with `imager flash` onto an
/// empty 4 GiB sparse file (`dir/card.img`), like an SD card, then provisioned; and its data
/// partition before first boot.
fn provisioned_card(ctx: &Context, dir: &Path) -> Result<(PathBuf, GptPartition)> {
    let imager = fixtures::find_imager(ctx.imager.as_deref())?;
    let image = big_image(ctx)?;
    let image_len = std::fs::metadata(&image)?.len();
    ensure!(
        image_len < CARD_BYTES,
        "{} is {} MiB; the card is {} MiB",
        image.display(),
        image_len / MIB,
        CARD_BYTES / MIB
    );
    let card = dir.join("card.img");
    std::fs::File::create(&card)?.set_len(CARD_BYTES)?;
    run_tool(
        "imager flash",
        Command::new(&imager).arg("flash").arg(&image).arg(&card).arg("--yes"),
    )?;
    ensure!(std::fs::metadata(&card)?.len() == CARD_BYTES, "imager flash changed the card's size");
    let before = crate::disk::partitions(&card)?;
    let data_before =
        before.into_iter().find(|p| p.label == "data").context("no data partition")?;
    ensure!(
        data_before.start + data_before.len <= image_len,
        "before first boot, data already reaches past the image"
    );
    provision(&imager, &card, dir, DEVICE_ID, HOSTNAME, "camera-single")?;
    Ok((card, data_before))
}

/// The guest's checks of a provisioned boot: the status, the host name, the SSH key, /data
/// grown past 3 GiB (only the 4 GiB card, not the 2 GiB image, has room for that), the
/// provisioning recorded, and no temporary file of an atomic write left on /data.
fn provisioned_checks() -> Vec<Cmd> {
    let data_min_kib = 3 * 1024 * 1024;
    vec![
        Cmd::status(),
        Cmd::any("df -k /data; hostname; cat /root/.ssh/authorized_keys"),
        Cmd::ok(format!("test \"$(hostname)\" = {HOSTNAME}")),
        Cmd::ok("grep -q 'metrica-qemu-test' /root/.ssh/authorized_keys"),
        Cmd::ok(format!(
            "test $(df -k /data | tail -n 1 | tr -s ' ' | cut -d ' ' -f 2) -gt {data_min_kib}"
        )),
        Cmd::ok("test -f /data/metrica/provisioned.json"),
        // Nothing half-written: an atomic write's temporary file (.NAME.tmp) that a cut
        // left is gone once first boot has finished.
        Cmd::ok("test -z \"$(find /data -name '.*.tmp')\""),
    ]
}

/// What a provisioned boot reported: healthy, and a status naming the device.
fn provisioned_status(s: &Seen, log: &str) -> Result<()> {
    let i = s.index;
    ensure!(s.healthy == Some(true), "boot {i} did not report healthy (log {log})");
    let st = s.last_status().with_context(|| format!("boot {i} printed no status"))?;
    let p = &st["provisioning"];
    ensure!(p["device_id"] == DEVICE_ID, "boot {i}: status reports {p} (log {log})");
    ensure!(p["result"] == "ok", "boot {i}: provisioning result {} (log {log})", p["result"]);
    ensure!(p["hostname"] == HOSTNAME, "boot {i}: status reports {p} (log {log})");
    Ok(())
}

/// The host's view of a card after first boot, with tools that know nothing of this project:
/// /data starts where it did and ends at the card's last 4 MiB boundary before the backup
/// GPT, its file system fills it (`dumpe2fs`), `sgdisk -v` finds no problem and `e2fsck -fn`
/// passes. Returns the data partition.
fn card_is_sound(card: &Path, data_before: &GptPartition) -> Result<GptPartition> {
    let after = crate::disk::partitions(card)?;
    let data = after.into_iter().find(|p| p.label == "data").context("no data partition")?;
    ensure!(data.start == data_before.start, "data moved");
    let end = data.start + data.len;
    ensure!(
        end == CARD_BYTES - 4 * MIB,
        "data ends at {} MiB; expected the card's last 4 MiB boundary before the backup GPT ({} MiB)",
        end / MIB,
        CARD_BYTES / MIB - 4
    );
    let fs = ext4_bytes(card, data.start)?;
    ensure!(fs == data.len, "the data file system is {fs} bytes, its partition {}", data.len);
    run_tool("sgdisk -v", Command::new("sgdisk").env("PATH", sbin_path()).arg("-v").arg(card))
        .and_then(|out| {
            ensure!(out.contains("No problems found"), "sgdisk -v: {out}");
            Ok(())
        })?;
    run_tool(
        "e2fsck -fn",
        Command::new("e2fsck").env("PATH", sbin_path()).arg("-fn").arg(format!(
            "{}?offset={}",
            card.display(),
            data.start
        )),
    )?;
    Ok(data)
}

pub fn provision_grow(ctx: &Context, dir: &Path, logs: &mut Vec<PathBuf>) -> Result<Done> {
    let (card, data_before) = provisioned_card(ctx, dir)?;
    // Boot 1: first boot provisions; check in the guest, then reboot. Boot 2: still so.
    let mut boot1 = provisioned_checks();
    boot1.push(Cmd::any("sync; reboot -f"));
    let test = dir.join("test-disk.img");
    fixtures::test_disk(&test, &[])?;
    let mut o = options(ctx, &card, dir, "run");
    o.machine.extra_disks.push(test);
    let mut driver = Driver::new(&ctx.healthy_pattern, vec![(1, boot1), (2, provisioned_checks())]);
    let report = harness::run(&o, &mut driver)?;
    logs.extend(report.log_dir.clone());
    let log = report.console_log_hint();
    if let RunEnd::Failed(f) = &report.end {
        bail!("the run failed: {f} (log {log})");
    }
    ensure!(
        matches!(report.end, RunEnd::Stopped(_)) && report.boots.len() == 2,
        "expected two boots through their checks, saw {} ending {:?} (log {log})",
        report.boots.len(),
        report.end
    );
    for i in [1, 2] {
        let s = driver.seen.iter().find(|s| s.index == i);
        provisioned_status(s.with_context(|| format!("boot {i} printed nothing"))?, &log)?;
    }
    // First boot ran once; the second boot found it done.
    let console = std::fs::read_to_string(&report.console_log)
        .with_context(|| format!("reading {}", report.console_log.display()))?;
    let lines: Vec<&str> = console.lines().filter(|l| !l.starts_with('{')).collect();
    let done = lines.iter().filter(|l| l.contains("metrica: first boot done: ")).count();
    let again =
        lines.iter().filter(|l| l.contains(&format!("metrica: provisioned ({DEVICE_ID})"))).count();
    ensure!(
        (done, again) == (1, 1),
        "expected one first boot and one provisioned boot, saw {done} and {again} (log {log})"
    );
    let data = card_is_sound(&card, &data_before)?;
    Ok(Done {
        boots: report.boots,
        note: format!(
            "data grew from {} MiB to {} MiB on a {} MiB card",
            data_before.len / MIB,
            data.len / MIB,
            CARD_BYTES / MIB
        ),
    })
}

/// The console line init prints just before `updater firstboot` (overlays/qemu/sbin/init).
pub const FIRST_BOOT_MARK: &str = "metrica: running updater firstboot";

/// Power cuts across first boot (issue 17 item 2): the provisioned card of provision-grow is
/// cut (QEMU killed) a random 0-400 ms after init starts first boot, once per run,
/// `ctx.cuts` runs, each on a fresh copy: somewhere in the GPT grow, the resize, the /data
/// layout, the keys, the Wi-Fi files or the identity (first boot takes about 0.2 s under TCG
/// here; some cuts land after it, and the note counts both; none inside fails). The next boot must complete first boot (healthy, the device's host
/// name, key and grown /data, provisioning recorded), and on the host the card must be sound
/// (GPT, /data's size, `sgdisk -v`, `e2fsck -fn`).
pub fn provision_cuts(ctx: &Context, dir: &Path, _logs: &mut Vec<PathBuf>) -> Result<Done> {
    let (template, data_before) = provisioned_card(ctx, dir)?;
    let test = dir.join("test-disk.img");
    fixtures::test_disk(&test, &[])?;
    let series = CutSeries {
        runs: ctx.cuts,
        cut_on: FIRST_BOOT_MARK.into(),
        window: Delay { min_ms: 0, max_ms: 400 },
        boot: Some(1),
        extra_disks: vec![test],
    };
    let healthy = ctx.healthy_pattern.clone();
    // Boot 1 is cut (its hook, if first boot finished in time, only prints the status); boot 2
    // finishes first boot and is checked.
    let mut director = |_: usize| -> Box<dyn Director> {
        Box::new(Driver::new(&healthy, vec![(1, vec![Cmd::status()]), (2, provisioned_checks())]))
    };
    let mut inside = 0;
    let mut check = |i: usize, report: &harness::RunReport| -> Result<()> {
        let log = report.console_log_hint();
        ensure!(
            matches!(report.end, RunEnd::Stopped(_)) && report.boots.len() == 2,
            "expected the cut boot and one more through its checks, saw {} ending {:?} (log {log})",
            report.boots.len(),
            report.end
        );
        let card = dir.join(format!("cut-{:03}", i + 1)).join("disk.img");
        card_is_sound(&card, &data_before)?;
        // Where the cut fell: before or after first boot said it was done.
        let console = std::fs::read_to_string(&report.console_log)
            .with_context(|| format!("reading {}", report.console_log.display()))?;
        let before_cut = console.split("SIGKILL at").next().unwrap_or_default();
        if !before_cut.contains("metrica: first boot done: ") {
            inside += 1;
        }
        Ok(())
    };
    let boots = cut_series(ctx, dir, &template, &series, &mut director, &mut check)?;
    // A series whose cuts all came after first boot tested nothing of it.
    ensure!(
        inside > 0 || ctx.cuts == 0,
        "none of the {} cuts fell inside first boot (each came after \"first boot done\")",
        ctx.cuts
    );
    Ok(Done {
        boots,
        note: format!("{} cuts, {inside} of them inside first boot, the rest after it", ctx.cuts),
    })
}
