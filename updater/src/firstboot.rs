//! `updater firstboot`: zero-touch first boot (DESIGN.md section 7, docs/provisioning.md).
//!
//! Run by init before anything else, on every boot; once `/data/metrica/provisioned.json`
//! exists it does nothing. The steps, each idempotent and each ending at a named failpoint
//! ([`STEPS`]) where the power-cut tests stop it:
//!
//! 1. validate the `provision` partition (read with fatfs, unmounted);
//! 2. grow the `data` GPT entry to the end of the card (the backup GPT header moves to the
//!    new last sector first, in the same table write);
//! 3. tell the kernel the partition's new size and grow the mounted ext4 online
//!    (docs/design.md, "Growing data on first boot");
//! 4. create the `/data` layout;
//! 5. keep, derive (OTP) or generate the device identity;
//! 6. apply host name, time zone, SSH keys, Wi-Fi, secrets and the device.toml copy;
//! 7. record that provisioning is done.
//!
//! A missing or invalid provisioning never stops the boot and never removes anything from
//! `/data`: steps 2 to 5 still run (the device stays reachable and has its space), step 6 is
//! skipped, the outcome is `degraded` with the reason (in `firstboot.json`, the log and
//! `updater status`), and the next boot tries again.

use crate::disk::{self, Partition, SECTOR};
use crate::failpoint;
use crate::provision::{self, identity, Provisioning};
use crate::state::write_atomic;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The failpoints, in the order a first boot passes them.
pub const STEPS: [&str; 7] = [
    "firstboot.validate",
    "firstboot.grow-partition",
    "firstboot.grow-fs",
    "firstboot.layout",
    "firstboot.identity",
    "firstboot.apply",
    "firstboot.done",
];

/// Written when provisioning is complete; its presence makes later boots skip first boot.
pub const PROVISIONED: &str = "metrica/provisioned.json";
/// The last first boot's outcome (for `updater status`).
pub const OUTCOME: &str = "metrica/firstboot.json";

/// Partitions end on this boundary (the SD erase-block size the imager aligns to).
const ALIGN: u64 = 4 << 20;

/// Folders of the `/data` layout, with their modes.
pub const LAYOUT: [(&str, u32); 12] = [
    ("etc", 0o755),
    ("etc/wpa_supplicant", 0o755),
    ("root", 0o700),
    ("root/.ssh", 0o700),
    ("log", 0o755),
    // Bound on /var/lib/systemd by the Pi root's fstab (docs/pi-root.md).
    ("var/lib/systemd", 0o755),
    ("docker", 0o710),
    ("metrica", 0o755),
    ("metrica/identity", 0o700),
    ("metrica/secrets", 0o700),
    ("metrica/roles", 0o755),
    ("metrica/provision", 0o755),
];

/// What the kernel and the board do for first boot; faked for image files and tests.
pub trait Platform {
    /// Tells the running kernel that partition `part` of `disk` now has its new size.
    fn resize_partition(&self, disk: &Path, part: &Partition) -> Result<()>;
    /// Grows the ext4 filesystem of `part` (mounted at `data_dir`) to fill the partition.
    fn grow_fs(&self, disk: &Path, part: &Partition, data_dir: &Path) -> Result<()>;
    /// Sets the running system's host name.
    fn set_hostname(&self, name: &str) -> Result<()>;
    /// The board's OTP private key, when it has one programmed.
    fn otp_key(&self) -> Option<[u8; 32]>;
}

/// How a first boot ended; in `firstboot.json` and the status JSON, its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FirstbootResult {
    /// Provisioned: every step done.
    Ok,
    /// Provisioning missing or invalid, or a step failed: the reason says which.
    Degraded,
    /// A later boot: provisioning was already complete.
    AlreadyProvisioned,
}

impl FirstbootResult {
    /// The name in `firstboot.json` and `updater status` (as serialized).
    pub fn as_str(self) -> &'static str {
        match self {
            FirstbootResult::Ok => "ok",
            FirstbootResult::Degraded => "degraded",
            FirstbootResult::AlreadyProvisioned => "already-provisioned",
        }
    }
}

impl std::fmt::Display for FirstbootResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of one first boot, as stored in [`OUTCOME`] and shown by `updater status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub result: FirstbootResult,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_source: Option<identity::Source>,
    /// Size of the data partition after growing, bytes.
    #[serde(default)]
    pub data_bytes: u64,
    pub time: u64,
}

impl Outcome {
    pub fn is_ok(&self) -> bool {
        self.result != FirstbootResult::Degraded
    }
}

/// One first boot.
pub struct Firstboot<'a> {
    pub disk: &'a Path,
    pub data_dir: &'a Path,
    pub platform: &'a dyn Platform,
    pub now: u64,
}

impl Firstboot<'_> {
    fn data(&self, rel: &str) -> PathBuf {
        self.data_dir.join(rel)
    }

    /// Runs first boot. `Err` only for a power cut ([`failpoint::PowerCut`]) or when `/data`
    /// itself cannot be written; every provisioning problem gives a `degraded` outcome.
    pub fn run(&self) -> Result<Outcome> {
        if let Ok(bytes) = std::fs::read(self.data(PROVISIONED)) {
            let mut o: Outcome = serde_json::from_slice(&bytes)
                .with_context(|| format!("parsing {}", self.data(PROVISIONED).display()))?;
            o.result = FirstbootResult::AlreadyProvisioned;
            // The running kernel forgets the host name at every boot.
            if let Ok(name) = std::fs::read_to_string(self.data("etc/hostname")) {
                if provision::check_hostname(name.trim()).is_ok() {
                    self.platform.set_hostname(name.trim())?;
                }
            }
            return Ok(o);
        }
        let mut problems: Vec<String> = Vec::new();

        // 1. validate
        let prov = match provision::read_partition(self.disk) {
            Ok(files) => match provision::validate_files(&files) {
                Ok(p) => Some(p),
                Err(e) => {
                    problems.push(format!(
                        "invalid provisioning: {}",
                        e.to_string().replace('\n', "; ")
                    ));
                    None
                }
            },
            Err(e) => {
                problems.push(format!("no provisioning: {e:#}"));
                None
            }
        };
        failpoint::hit(STEPS[0])?;

        // 2. grow the partition entry (and move the backup header)
        let part = grow_partition(self.disk).context("growing the data partition")?;
        failpoint::hit(STEPS[1])?;

        // 3. the kernel's view and the filesystem
        if let Err(e) = self
            .platform
            .resize_partition(self.disk, &part)
            .and_then(|()| self.platform.grow_fs(self.disk, &part, self.data_dir))
        {
            problems.push(format!("data not grown: {e:#}"));
        }
        failpoint::hit(STEPS[2])?;

        // 4. layout
        for (dir, mode) in LAYOUT {
            let path = self.data(dir);
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(mode)
                .create(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                .with_context(|| format!("setting the mode of {}", path.display()))?;
        }
        sync_dir(self.data_dir)?;
        failpoint::hit(STEPS[3])?;

        // 5. identity
        let (id, source) = self.identity()?;
        failpoint::hit(STEPS[4])?;

        // 6. apply
        if let Some(p) = &prov {
            if let Err(e) = self.apply(p, &id) {
                if e.downcast_ref::<failpoint::PowerCut>().is_some() {
                    return Err(e);
                }
                problems.push(format!("{e:#}"));
            }
        }
        failpoint::hit(STEPS[5])?;

        // 7. record
        let outcome = Outcome {
            result: if problems.is_empty() {
                FirstbootResult::Ok
            } else {
                FirstbootResult::Degraded
            },
            reason: (!problems.is_empty()).then(|| problems.join("; ")),
            device_id: prov.as_ref().map(|p| p.device.device_id.clone()),
            hostname: prov.as_ref().map(|p| p.device.hostname.clone()),
            recipient: Some(id.to_public().to_string()),
            identity_source: Some(source),
            data_bytes: part.len,
            time: self.now,
        };
        let mut json = serde_json::to_vec_pretty(&outcome)?;
        json.push(b'\n');
        write_atomic(&self.data(OUTCOME), &json, "firstboot.outcome")?;
        if outcome.result == FirstbootResult::Ok {
            write_atomic(&self.data(PROVISIONED), &json, "firstboot.provisioned")?;
        }
        failpoint::hit(STEPS[6])?;
        Ok(outcome)
    }

    /// The identity in /data, else the OTP-derived one, else a new one; written to /data.
    fn identity(&self) -> Result<(age::x25519::Identity, identity::Source)> {
        let key_path = self.data(identity::IDENTITY_FILE);
        if let Ok(text) = std::fs::read_to_string(&key_path) {
            match identity::parse_identity(&text) {
                Ok(id) => {
                    let source = if text.contains("(source: otp)") {
                        identity::Source::Otp
                    } else {
                        identity::Source::Generated
                    };
                    self.write_recipient(&id)?;
                    return Ok((id, source));
                }
                Err(e) => {
                    // Kept for a person to look at; a torn write of our own is the likely cause.
                    let aside = key_path.with_extension("key.corrupt");
                    std::fs::rename(&key_path, &aside)
                        .with_context(|| format!("{}: {e}; moving it aside", key_path.display()))?;
                }
            }
        }
        let (id, source) = match self.platform.otp_key() {
            Some(otp) => (identity::from_otp_key(&otp), identity::Source::Otp),
            None => (age::x25519::Identity::generate(), identity::Source::Generated),
        };
        write_private(
            &key_path,
            identity::identity_file_text(&id, source).as_bytes(),
            "firstboot.identity",
        )?;
        self.write_recipient(&id)?;
        Ok((id, source))
    }

    fn write_recipient(&self, id: &age::x25519::Identity) -> Result<()> {
        let path = self.data(identity::RECIPIENT_FILE);
        let text = format!("{}\n", id.to_public());
        if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            write_atomic(&path, text.as_bytes(), "firstboot.recipient")?;
        }
        Ok(())
    }

    /// Step 6. Applies what it can; the first problem is returned (after the rest was tried).
    fn apply(&self, p: &Provisioning, id: &age::x25519::Identity) -> Result<()> {
        let d = &p.device;
        let mut problems = Vec::new();
        write_if_changed(
            &self.data("etc/hostname"),
            format!("{}\n", d.hostname).as_bytes(),
            0o644,
        )?;
        if let Err(e) = self.platform.set_hostname(&d.hostname) {
            problems.push(format!("setting the host name: {e:#}"));
        }
        write_if_changed(
            &self.data("etc/timezone"),
            format!("{}\n", d.timezone).as_bytes(),
            0o644,
        )?;
        write_if_changed(&self.data("metrica/device.toml"), &p.files()[0].1, 0o644)?;
        for (name, bytes) in p.files() {
            // The validated set as it was on the card (secrets stay encrypted here).
            write_if_changed(&self.data(&format!("metrica/provision/{name}")), bytes, 0o600)?;
        }
        if let Some(keys) = &p.authorized_keys {
            write_if_changed(&self.data("root/.ssh/authorized_keys"), keys.text.as_bytes(), 0o600)?;
        }
        let secrets = match &p.secrets {
            Some(enc) => match enc.decrypt(id) {
                Ok(s) => {
                    for (name, value) in s.iter() {
                        write_if_changed(
                            &self.data(&format!("metrica/secrets/{name}")),
                            value.as_bytes(),
                            0o600,
                        )?;
                    }
                    Some(s)
                }
                Err(e) => {
                    problems.push(e.to_string());
                    None
                }
            },
            None => None,
        };
        if let Some(w) = &p.wifi {
            match secrets.as_ref().map(|s| w.wpa_supplicant_conf(s)) {
                Some(Ok(conf)) => write_if_changed(
                    &self.data("etc/wpa_supplicant/wpa_supplicant.conf"),
                    conf.as_bytes(),
                    0o600,
                )?,
                Some(Err(e)) => problems.push(e.to_string()),
                None if w.secret_names().is_empty() => {
                    let conf = w.wpa_supplicant_conf(&provision::Secrets::default())?;
                    write_if_changed(
                        &self.data("etc/wpa_supplicant/wpa_supplicant.conf"),
                        conf.as_bytes(),
                        0o600,
                    )?;
                }
                None => problems.push("wifi.toml: not applied: its passphrases are in secrets.age, which this device cannot read".into()),
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            bail!("{}", problems.join("; "))
        }
    }
}

/// Reads the last first-boot outcome from a data folder (for `updater status`).
pub fn read_outcome(data_dir: &Path) -> Option<Result<Outcome, String>> {
    let path = data_dir.join(OUTCOME);
    let bytes = std::fs::read(&path).ok()?;
    Some(serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display())))
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

/// Writes a file atomically with `mode`, unless it already holds `bytes`.
fn write_if_changed(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    if std::fs::read(path).ok().as_deref() == Some(bytes) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        return Ok(());
    }
    write_private(path, bytes, "firstboot.file")?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

/// Atomic write whose temp file is created 0600, so a secret is never readable by others.
fn write_private(path: &Path, bytes: &[u8], prefix: &str) -> Result<()> {
    let dir = path.parent().context("path has no folder")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path.file_name().context("path has no file name")?.to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
    }
    write_atomic(path, bytes, prefix)
}

// ---------------------------------------------------------------------------------------------
// Growing the data partition

/// Where the `data` partition should end (last LBA, inclusive) on a disk whose last usable
/// LBA is `last_usable`: the last 4 MiB boundary that fits, never before `current_last`.
pub fn grown_last_lba(current_last: u64, last_usable: u64) -> u64 {
    let per = ALIGN / SECTOR;
    let aligned_end = (last_usable + 1) / per * per; // exclusive
    aligned_end.saturating_sub(1).max(current_last)
}

/// Grows the `data` GPT entry to the end of the disk and moves the backup GPT header to the
/// disk's last sector. Does nothing when both are already there. Returns the partition as
/// it is afterwards.
pub fn grow_partition(disk_path: &Path) -> Result<Partition> {
    let data_label = crate::layout::DATA.label;
    let mut gdisk = gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(gpt::disk::LogicalBlockSize::Lb512)
        .open(disk_path)
        .with_context(|| format!("reading the GPT of {}", disk_path.display()))?;
    let disk_sectors = disk_len(disk_path)? / SECTOR;
    let header = gdisk.primary_header().map_err(|e| anyhow::anyhow!("primary GPT header: {e}"))?;
    let backup_at_end = header.backup_lba == disk_sectors - 1;
    let (&id, part) =
        gdisk.partitions().iter().find(|(_, p)| p.is_used() && p.name == data_label).with_context(
            || format!("{} has no partition labelled {data_label:?}", disk_path.display()),
        )?;
    if let Some((_, next)) =
        gdisk.partitions().iter().find(|(_, p)| p.is_used() && p.first_lba > part.last_lba)
    {
        bail!("data is not the last partition ({} follows it); not growing it", next.name);
    }
    let mut part = part.clone();
    if !backup_at_end {
        // Rebuilds both headers for the disk's real size: the backup header and its table
        // move to the end, and the last usable LBA grows with them.
        let parts = gdisk.partitions().clone();
        gdisk.update_partitions(parts).context("moving the backup GPT header")?;
    }
    let last_usable = gdisk.primary_header().map_err(|e| anyhow::anyhow!("{e}"))?.last_usable;
    let target = grown_last_lba(part.last_lba, last_usable);
    if backup_at_end && target == part.last_lba {
        return found(disk_path, data_label);
    }
    part.last_lba = target;
    let mut parts = gdisk.partitions().clone();
    parts.insert(id, part);
    gdisk.update_partitions(parts).context("growing the data partition entry")?;
    let mut file = gdisk.write().context("writing the GPT")?;
    // The protective MBR's partition covers the whole disk (or all it can express).
    let mbr_size = u32::try_from(disk_sectors - 1).unwrap_or(u32::MAX);
    gpt::mbr::ProtectiveMBR::with_lb_size(mbr_size)
        .update_conservative(&mut file)
        .context("updating the protective MBR")?;
    std::io::Write::flush(&mut file)?;
    file.sync_all().context("syncing the GPT")?;
    found(disk_path, data_label)
}

fn found(disk_path: &Path, label: &str) -> Result<Partition> {
    disk::find_label(disk_path, label)
}

fn disk_len(path: &Path) -> Result<u64> {
    use std::io::Seek;
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    Ok(f.seek(std::io::SeekFrom::End(0))?)
}

/// The size in bytes of the ext4 filesystem whose superblock (1024 bytes read at byte 1024
/// of the partition) is `sb`.
pub fn ext4_size(sb: &[u8]) -> Result<u64> {
    if sb.len() < 0x160 || u16::from_le_bytes([sb[0x38], sb[0x39]]) != 0xEF53 {
        bail!("not an ext4 superblock");
    }
    let u32_at = |o: usize| u32::from_le_bytes(sb[o..o + 4].try_into().expect("4 bytes")) as u64;
    let incompat = u32_at(0x60);
    let mut blocks = u32_at(0x4);
    if incompat & 0x80 != 0 {
        blocks |= u32_at(0x150) << 32;
    }
    let block = 1024u64 << u32_at(0x18);
    Ok(blocks * block)
}

/// Reads the size of the ext4 filesystem in `part` of `disk` from its superblock.
pub fn ext4_size_on_disk(disk: &Path, part: &Partition) -> Result<u64> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(disk).with_context(|| format!("opening {}", disk.display()))?;
    let mut sb = vec![0u8; 1024];
    f.read_exact_at(&mut sb, part.start + 1024)?;
    ext4_size(&sb).with_context(|| format!("{}: data", disk.display()))
}

// ---------------------------------------------------------------------------------------------
// Platforms

/// A disk image file on a host: no kernel holds it, so the filesystem is grown offline with
/// `resize2fs` (on the partition's byte range); the host name and OTP are left alone.
#[derive(Debug, Default)]
pub struct ImageFile;

impl Platform for ImageFile {
    fn resize_partition(&self, _disk: &Path, _part: &Partition) -> Result<()> {
        Ok(())
    }

    fn grow_fs(&self, disk: &Path, part: &Partition, _data_dir: &Path) -> Result<()> {
        if ext4_size_on_disk(disk, part)? >= part.len / 4096 * 4096 {
            return Ok(());
        }
        // resize2fs sets a regular file's length to the end of the filesystem, which would
        // cut off the backup GPT: keep what follows the partition and put it back.
        use std::os::unix::fs::FileExt;
        let len = disk_len(disk)?;
        let end = part.start + part.len;
        let mut tail = vec![0u8; len.saturating_sub(end) as usize];
        std::fs::File::open(disk)?.read_exact_at(&mut tail, end)?;
        let target = format!("{}?offset={}", disk.display(), part.start);
        let path = std::env::var("PATH").unwrap_or_default();
        let out = std::process::Command::new("resize2fs")
            .env("PATH", format!("{path}:/usr/sbin:/sbin"))
            .arg(&target)
            .arg(format!("{}K", part.len / 1024))
            .output()
            .context("running resize2fs (e2fsprogs) on the image")?;
        if !out.status.success() {
            bail!("resize2fs {target}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let f = std::fs::OpenOptions::new().write(true).open(disk)?;
        f.set_len(len)?;
        f.write_all_at(&tail, end)?;
        f.sync_all()?;
        Ok(())
    }

    fn set_hostname(&self, _name: &str) -> Result<()> {
        Ok(())
    }

    fn otp_key(&self) -> Option<[u8; 32]> {
        None
    }
}

/// The running device: `disk` is a block device whose `data` partition is mounted at
/// `data_dir`.
#[derive(Debug, Default)]
pub struct Linux;

mod ioctl {
    //! The two ioctls that grow a mounted data partition without resize2fs.
    #![allow(unsafe_code)]

    /// `struct blkpg_partition` (linux/blkpg.h).
    #[repr(C)]
    pub struct BlkpgPartition {
        pub start: libc::c_longlong,
        pub length: libc::c_longlong,
        pub pno: libc::c_int,
        pub devname: [libc::c_char; 64],
        pub volname: [libc::c_char; 64],
    }

    /// `struct blkpg_ioctl_arg`.
    #[repr(C)]
    pub struct BlkpgIoctlArg {
        pub op: libc::c_int,
        pub flags: libc::c_int,
        pub datalen: libc::c_int,
        pub data: *mut libc::c_void,
    }

    pub const BLKPG_RESIZE_PARTITION: libc::c_int = 3;

    nix::ioctl_write_ptr_bad!(blkpg, nix::request_code_none!(0x12, 105), BlkpgIoctlArg);
    nix::ioctl_write_ptr!(ext4_resize_fs, b'f', 16, u64);

    /// BLKPG_RESIZE_PARTITION: the kernel's partition `pno` of the disk open as `fd` becomes
    /// `length` bytes from `start` (which must not change).
    pub fn resize_partition(
        fd: std::os::fd::BorrowedFd<'_>,
        pno: i32,
        start: u64,
        length: u64,
    ) -> nix::Result<()> {
        use std::os::fd::AsRawFd;
        let mut part = BlkpgPartition {
            start: start as i64,
            length: length as i64,
            pno,
            devname: [0; 64],
            volname: [0; 64],
        };
        let arg = BlkpgIoctlArg {
            op: BLKPG_RESIZE_PARTITION,
            flags: 0,
            datalen: std::mem::size_of::<BlkpgPartition>() as libc::c_int,
            data: (&mut part as *mut BlkpgPartition).cast(),
        };
        // SAFETY: `arg` points at a live, correctly laid out blkpg_partition for the call.
        unsafe { blkpg(fd.as_raw_fd(), &arg) }.map(|_| ())
    }

    /// EXT4_IOC_RESIZE_FS: grows the ext4 filesystem that `fd` (any file on it) belongs to,
    /// to `blocks` filesystem blocks. Equal to the current count: nothing to do.
    pub fn resize_fs(fd: std::os::fd::BorrowedFd<'_>, blocks: u64) -> nix::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: the kernel reads one u64 from the pointer.
        unsafe { ext4_resize_fs(fd.as_raw_fd(), &blocks) }.map(|_| ())
    }
}

impl Platform for Linux {
    fn resize_partition(&self, disk: &Path, part: &Partition) -> Result<()> {
        use std::os::fd::AsFd;
        let f = std::fs::File::open(disk).with_context(|| format!("opening {}", disk.display()))?;
        ioctl::resize_partition(f.as_fd(), part.number as i32, part.start, part.len).with_context(
            || format!("BLKPG_RESIZE_PARTITION of {} partition {}", disk.display(), part.number),
        )
    }

    fn grow_fs(&self, disk: &Path, part: &Partition, data_dir: &Path) -> Result<()> {
        use std::os::fd::AsFd;
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        // Resize only the file system of this very partition: if /data is not mounted, the
        // folder belongs to the root file system, which must never be touched.
        let node = disk::partition_node(disk, part.number);
        let dev =
            std::fs::metadata(&node).with_context(|| format!("reading {}", node.display()))?;
        let mounted = std::fs::metadata(data_dir)
            .with_context(|| format!("reading {}", data_dir.display()))?;
        if !dev.file_type().is_block_device() || dev.rdev() != mounted.dev() {
            bail!("{} is not mounted at {}", node.display(), data_dir.display());
        }
        let st = nix::sys::statvfs::statvfs(data_dir)
            .with_context(|| format!("statvfs {}", data_dir.display()))?;
        let block = st.fragment_size();
        let blocks = part.len / block;
        let dir = std::fs::File::open(data_dir)
            .with_context(|| format!("opening {}", data_dir.display()))?;
        ioctl::resize_fs(dir.as_fd(), blocks).with_context(|| {
            format!("EXT4_IOC_RESIZE_FS of {} to {blocks} blocks", data_dir.display())
        })
    }

    fn set_hostname(&self, name: &str) -> Result<()> {
        nix::unistd::sethostname(name).context("sethostname")
    }

    fn otp_key(&self) -> Option<[u8; 32]> {
        identity::read_otp_key(Path::new("rpi-otp-private-key"))
    }
}

#[cfg(test)]
mod tests;
