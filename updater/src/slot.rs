//! Slots on a disk: reading and committing `autoboot.txt`, and the updater's slot flows
//! (boot-time reconciliation, trial, commit, mark-good, mark-bad, install bookkeeping, status).
//!
//! **Commit method.** `autoboot.txt` is a fixed 512-byte file (see `autoboot.rs`). A commit
//! finds, through `fatfs` opened read-only on the `config` partition of the disk, where the
//! file's one data sector lies on the disk, and rewrites that sector in place with one aligned
//! 512-byte `pwrite`, then `fsync`. Nothing else on the partition changes: not the FAT, not
//! the directory entry, not the size. A cut at any byte leaves the sector old, new, or a
//! prefix of new over old; since the two texts differ only in the digits of
//! `boot_partition`, every mix is a valid file naming one of the two slots, and an
//! unreadable sector sends the firmware on its partition walk (docs/slots.md explains what
//! that boots). The rewrite through `fatfs` (truncate and write) is used only to repair a
//! file that is missing or not in the fixed shape, when the firmware already walks.
//!
//! The flows take the state through [`crate::state::transition`], save it, and append to the
//! history. Every write step has a failpoint (see `failpoint.rs`).

use crate::autoboot::{Autoboot, AUTOBOOT_SIZE};
use crate::bootinfo::BootInfo;
use crate::bundle::Manifest;
use crate::daemon::connectivity::Connectivity;
use crate::daemon::record::{record_path, DaemonRecord};
use crate::disk::{self, Partition};
use crate::failpoint;
use crate::health::{self, Check, Timer, Verdict};
use crate::history::{Entry, History, HistoryEvent};
use crate::install::{check_manifest, DeviceFacts, Policy, Refusal as InstallRefusal};
use crate::layout::{Slot, CONFIG};
use crate::reboot::RebootMode;
use crate::release::Release;
use crate::state::{self, BootCase, Event, LoadError, Recovery, State, TrialPhase};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

/// Name of the file on the `config` partition.
pub const AUTOBOOT_FILE: &str = "autoboot.txt";

/// Failpoints of the in-place commit write, in order.
pub const COMMIT_FAILPOINTS: [&str; 2] = ["autoboot.write", "autoboot.after-fsync"];

/// Plain reboots out of a slot that is not committed, in a row, before the updater stays put.
pub const MAX_WRONG_SLOT_REBOOTS: u64 = 2;

type ReadLog = Rc<RefCell<Option<Vec<(u64, usize)>>>>;

/// One partition of the disk file as a stream, optionally read-only, logging reads on demand.
struct PartIo {
    file: File,
    start: u64,
    len: u64,
    pos: u64,
    writable: bool,
    log: ReadLog,
}

impl Read for PartIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (buf.len() as u64).min(self.len.saturating_sub(self.pos)) as usize;
        let got = self.file.read_at(&mut buf[..n], self.start + self.pos)?;
        if let Some(log) = self.log.borrow_mut().as_mut() {
            log.push((self.pos, got));
        }
        self.pos += got as u64;
        Ok(got)
    }
}

impl Write for PartIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !self.writable {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, "opened read-only"));
        }
        let n = (buf.len() as u64).min(self.len.saturating_sub(self.pos)) as usize;
        if n == 0 && !buf.is_empty() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "end of partition"));
        }
        let put = self.file.write_at(&buf[..n], self.start + self.pos)?;
        self.pos += put as u64;
        Ok(put)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for PartIo {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let pos = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
        };
        match pos {
            Some(p) if p <= self.len => {
                self.pos = p;
                Ok(p)
            }
            _ => Err(io::Error::new(io::ErrorKind::InvalidInput, "seek outside the partition")),
        }
    }
}

/// The `config` partition of `disk` (it must be partition 1: the firmware reads that one).
pub fn config_partition(disk: &Path) -> Result<Partition> {
    let p = disk::find_label(disk, CONFIG.label)?;
    if p.number != CONFIG.number {
        bail!(
            "{}: partition {:?} is number {}, but the firmware reads autoboot.txt from {}",
            disk.display(),
            CONFIG.label,
            p.number,
            CONFIG.number
        );
    }
    Ok(p)
}

fn open_part(disk: &Path, p: &Partition, writable: bool) -> Result<(PartIo, ReadLog)> {
    let file = OpenOptions::new()
        .read(true)
        .write(writable)
        .open(disk)
        .with_context(|| format!("opening {}", disk.display()))?;
    let log: ReadLog = Rc::new(RefCell::new(None));
    Ok((PartIo { file, start: p.start, len: p.len, pos: 0, writable, log: log.clone() }, log))
}

/// What `autoboot.txt` on the disk is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnDisk {
    Valid(Autoboot),
    /// Present but unusable (torn, edited, or the file system is unreadable).
    Invalid(String),
    Missing,
}

impl OnDisk {
    fn describe(&self) -> String {
        match self {
            OnDisk::Valid(a) => {
                format!("committed slot {} (tryboot slot {})", a.committed, a.tryboot)
            }
            OnDisk::Invalid(e) => format!("unreadable ({e})"),
            OnDisk::Missing => "missing".into(),
        }
    }
}

/// Reads `autoboot.txt` from the `config` partition of `disk`, without writing anything.
pub fn read_autoboot(disk: &Path) -> Result<OnDisk> {
    let p = config_partition(disk)?;
    let (io, _) = open_part(disk, &p, false)?;
    let fs = match fatfs::FileSystem::new(io, fatfs::FsOptions::new()) {
        Ok(fs) => fs,
        Err(e) => return Ok(OnDisk::Invalid(format!("config file system: {e}"))),
    };
    let mut file = match fs.root_dir().open_file(AUTOBOOT_FILE) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(OnDisk::Missing),
        Err(e) => return Ok(OnDisk::Invalid(format!("opening {AUTOBOOT_FILE}: {e}"))),
    };
    let mut bytes = Vec::new();
    if let Err(e) = (&mut file).take(64 * 1024).read_to_end(&mut bytes) {
        return Ok(OnDisk::Invalid(format!("reading {AUTOBOOT_FILE}: {e}")));
    }
    Ok(match Autoboot::parse(&bytes) {
        Ok(a) => OnDisk::Valid(a),
        Err(e) => OnDisk::Invalid(e.to_string()),
    })
}

/// The byte offset on the disk of `autoboot.txt`'s data when the file has the fixed shape
/// (exactly [`AUTOBOOT_SIZE`] bytes in one sector-aligned run); `None` otherwise.
pub fn locate_autoboot(disk: &Path) -> Result<Option<u64>> {
    let p = config_partition(disk)?;
    let (io, log) = open_part(disk, &p, false)?;
    let Ok(fs) = fatfs::FileSystem::new(io, fatfs::FsOptions::new()) else { return Ok(None) };
    let Ok(mut file) = fs.root_dir().open_file(AUTOBOOT_FILE) else { return Ok(None) };
    let mut content = vec![0u8; AUTOBOOT_SIZE + 1];
    *log.borrow_mut() = Some(Vec::new());
    let n = read_full(&mut file, &mut content);
    let reads = log.borrow_mut().take().unwrap_or_default();
    if n != Some(AUTOBOOT_SIZE) {
        return Ok(None);
    }
    // The data reads must form one run of exactly one sector.
    let data: Vec<_> = reads.into_iter().filter(|&(_, len)| len > 0).collect();
    let Some(&(first, _)) = data.first() else { return Ok(None) };
    let mut next = first;
    for &(pos, len) in &data {
        if pos != next {
            return Ok(None);
        }
        next += len as u64;
    }
    if next - first != AUTOBOOT_SIZE as u64 || (p.start + first) % AUTOBOOT_SIZE as u64 != 0 {
        return Ok(None);
    }
    let offset = p.start + first;
    // Cross-check: the raw sector is the file's content.
    let mut raw = vec![0u8; AUTOBOOT_SIZE];
    File::open(disk)?.read_exact_at(&mut raw, offset)?;
    Ok((raw == content[..AUTOBOOT_SIZE]).then_some(offset))
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Option<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(_) => return None,
        }
    }
    Some(n)
}

/// How [`write_autoboot`] wrote the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMethod {
    /// One aligned sector rewritten in place: the power-safe commit.
    InPlace,
    /// Through the file system (file missing or not in the fixed shape): a repair.
    Rewrite,
}

/// Makes `autoboot.txt` on `disk` say `ab`, power-safely when the file has its fixed shape.
/// Reads the file back and checks it before returning.
pub fn write_autoboot(disk: &Path, ab: &Autoboot) -> Result<WriteMethod> {
    let bytes = ab.render();
    let method = match locate_autoboot(disk)? {
        Some(offset) => {
            let f = OpenOptions::new()
                .write(true)
                .open(disk)
                .with_context(|| format!("opening {} for the commit", disk.display()))?;
            if let Some(k) = failpoint::torn("autoboot.write", bytes.len()) {
                f.write_all_at(&bytes[..k], offset)?;
                f.sync_all()?;
                return Err(failpoint::PowerCut("autoboot.write".into()).into());
            }
            f.write_all_at(&bytes, offset)
                .with_context(|| format!("writing autoboot.txt at byte {offset}"))?;
            f.sync_all().with_context(|| format!("syncing {}", disk.display()))?;
            failpoint::hit("autoboot.after-fsync")?;
            WriteMethod::InPlace
        }
        None => {
            failpoint::hit("autoboot.before-rewrite")?;
            let p = config_partition(disk)?;
            let (io, _) = open_part(disk, &p, true)?;
            let fs = fatfs::FileSystem::new(io, fatfs::FsOptions::new())
                .context("opening the config file system")?;
            {
                let mut f =
                    fs.root_dir().create_file(AUTOBOOT_FILE).context("creating autoboot.txt")?;
                f.truncate().context("truncating autoboot.txt")?;
                f.write_all(&bytes).context("writing autoboot.txt")?;
                f.flush().context("flushing autoboot.txt")?;
            }
            fs.unmount().context("closing the config file system")?;
            File::open(disk)?.sync_all().with_context(|| format!("syncing {}", disk.display()))?;
            failpoint::hit("autoboot.after-rewrite")?;
            WriteMethod::Rewrite
        }
    };
    match read_autoboot(disk)? {
        OnDisk::Valid(found) if found == *ab => Ok(method),
        other => bail!("autoboot.txt reads back as {} after the write", other.describe()),
    }
}

/// The current unix time.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Another updater command holds the lock.
#[derive(Debug, thiserror::Error)]
#[error("another updater command holds {}", .0.display())]
pub struct LockBusy(pub PathBuf);

/// A disk and a data folder: everything the slot flows read and write.
#[derive(Debug, Clone)]
pub struct Device {
    pub disk: PathBuf,
    pub data_dir: PathBuf,
}

/// What to run in a trial boot, and how long to wait.
pub struct HealthPlan<'a> {
    pub checks: Vec<&'a dyn Check>,
    pub deadline: Duration,
    pub timer: &'a dyn Timer,
}

/// What `boot` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootReport {
    /// One line for the console, e.g. `metrica: booted slot b (trial): checks passed; committed`.
    pub summary: String,
    pub reboot: Option<RebootMode>,
    /// False when something failed (exit code 1).
    pub ok: bool,
}

impl Device {
    pub fn new(disk: impl Into<PathBuf>, data_dir: impl Into<PathBuf>) -> Device {
        Device { disk: disk.into(), data_dir: data_dir.into() }
    }

    pub fn state_path(&self) -> PathBuf {
        state::state_path(&self.data_dir)
    }

    pub fn history(&self) -> History {
        History::new(&self.data_dir)
    }

    fn record(&self, entry: &Entry) -> Result<()> {
        self.history().append(entry).context("appending to the history")
    }

    /// Takes the updater's lock (one command that changes state at a time). Held until the
    /// returned value is dropped, released by the kernel if the process dies.
    pub fn lock(&self) -> Result<nix::fcntl::Flock<File>> {
        let dir = self.data_dir.join("metrica");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
            if e == nix::errno::Errno::EWOULDBLOCK {
                anyhow::Error::new(LockBusy(path.clone()))
            } else {
                anyhow::anyhow!("locking {}: {e}", path.display())
            }
        })
    }

    /// Loads the state for a command that may change it. With no state file yet, creates one
    /// from the disk. A corrupt file is kept as `state.json.corrupt-<n>` and the state rebuilt
    /// from the disk (committed slot from `autoboot.txt`, or the booted slot), flagged in
    /// `recovered` and in the history. A newer format is an error; the file stays untouched.
    pub fn open_state(
        &self,
        booted: Option<Slot>,
        running: Option<&Release>,
        now: u64,
    ) -> Result<State> {
        let path = self.state_path();
        match state::load(&path) {
            Ok(Some(s)) => Ok(s),
            Ok(None) => {
                let (s, from) = self.rebuild(booted, running)?;
                state::save(&path, &s)?;
                self.record(
                    &Entry::new(now, HistoryEvent::Init)
                        .slot(s.committed)
                        .version(s.slot(s.committed).version.as_ref())
                        .reason(format!("state created; committed slot from {from}")),
                )?;
                Ok(s)
            }
            Err(LoadError::Corrupt { what, .. }) => {
                let backup = state::keep_corrupt(&path)
                    .with_context(|| format!("keeping the corrupt {} aside", path.display()))?;
                let (mut s, from) = self.rebuild(booted, running)?;
                let reason = format!(
                    "state.json was corrupt ({what}); kept as {}; rebuilt with the committed \
                     slot from {from}",
                    backup.display()
                );
                s.recovered = Some(Recovery { at: now, backup, reason: reason.clone() });
                s.last_error = Some(reason.clone());
                state::save(&path, &s)?;
                self.record(
                    &Entry::new(now, HistoryEvent::Repair).slot(s.committed).reason(reason),
                )?;
                Ok(s)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn rebuild(&self, booted: Option<Slot>, running: Option<&Release>) -> Result<(State, String)> {
        let (committed, from) = match read_autoboot(&self.disk)? {
            OnDisk::Valid(a) => (a.committed, "autoboot.txt".to_string()),
            other => match booted {
                Some(b) => (b, format!("the booted slot (autoboot.txt {})", other.describe())),
                None => {
                    (Slot::A, format!("the firmware's default (autoboot.txt {})", other.describe()))
                }
            },
        };
        let release = self
            .slot_release(committed)
            .or_else(|| running.filter(|_| booted == Some(committed)).cloned());
        let mut s = State::new(committed, release.as_ref().map(|r| r.version.clone()));
        if let Some(r) = &release {
            // The committed build's epoch is the floor from the first boot on.
            s.security_epoch = r.security_epoch;
            s.slots.get_mut(committed).security_epoch = Some(r.security_epoch);
        }
        if let Some(r) = self.slot_release(committed.other()) {
            *s.slots.get_mut(committed.other()) = state::SlotInfo {
                state: state::SlotState::Installed,
                version: Some(r.version),
                security_epoch: Some(r.security_epoch),
            };
        }
        Ok((s, from))
    }

    /// The release file in `slot`'s root filesystem, read from the disk; `None` when the
    /// root holds no readable one.
    pub fn slot_release(&self, slot: Slot) -> Option<Release> {
        let p = disk::find_label(&self.disk, slot.root().label).ok()?;
        disk::read_release(&self.disk, &p).ok()
    }

    /// What the install policy checks bundles against: the committed slot's release
    /// (`compatible`, version) and the recorded security epoch.
    pub fn device_facts(&self, s: &State, running: Option<&Release>) -> Result<DeviceFacts> {
        let release =
            self.slot_release(s.committed).or_else(|| running.cloned()).with_context(|| {
                format!(
                    "cannot tell this device's compatible: no {} in {}",
                    crate::release::RELEASE_PATH,
                    s.committed.root().label
                )
            })?;
        Ok(DeviceFacts {
            compatible: release.compatible,
            committed_version: s.slot(s.committed).version.clone().or(Some(release.version)),
            security_epoch: s.security_epoch,
            pinned_version: None,
        })
    }

    /// Applies one event: refused events are errors naming the refusal; a changed state is
    /// saved atomically.
    pub fn apply(&self, s: &State, event: &Event) -> Result<State> {
        let next = state::transition(s, event)?;
        if next != *s {
            state::save(&self.state_path(), &next)?;
        }
        Ok(next)
    }

    /// Makes `autoboot.txt` agree with the state's committed slot. Returns the repair done,
    /// if one was needed.
    pub fn ensure_autoboot(&self, s: &State, now: u64) -> Result<(State, Option<String>)> {
        let want = Autoboot::committed(s.committed);
        let found = read_autoboot(&self.disk)?;
        if found == OnDisk::Valid(want) {
            return Ok((s.clone(), None));
        }
        let what = format!(
            "autoboot.txt was {}; rewritten for committed slot {}",
            found.describe(),
            s.committed
        );
        write_autoboot(&self.disk, &want).context("repairing autoboot.txt")?;
        let s = self.apply(s, &Event::AutobootRepaired)?;
        self.record(&Entry::new(now, HistoryEvent::Repair).slot(s.committed).reason(what.clone()))?;
        Ok((s, Some(what)))
    }

    /// Finishes a trial whose checks passed (phase `committing`): rewrites `autoboot.txt`,
    /// then records the commit.
    pub fn commit_trial(&self, s: &State, now: u64) -> Result<State> {
        let t = match &s.trial {
            Some(t) if t.phase == TrialPhase::Committing => t.clone(),
            _ => bail!("no trial is ready to commit"),
        };
        write_autoboot(&self.disk, &Autoboot::committed(t.slot))
            .with_context(|| format!("committing slot {}", t.slot))?;
        let s = self.apply(s, &Event::Committed { slot: t.slot })?;
        self.record(
            &Entry::new(now, HistoryEvent::Commit).slot(t.slot).version(t.version.as_ref()),
        )?;
        Ok(s)
    }

    /// What init runs at every start: reconcile the state with where the system booted,
    /// repair `autoboot.txt`, and in a trial boot run the checks, then commit or reboot.
    pub fn boot(
        &self,
        info: &BootInfo,
        running: Option<&Release>,
        plan: &HealthPlan,
        now: &dyn Fn() -> u64,
    ) -> BootReport {
        match self.boot_inner(info, running, plan, now) {
            Ok(r) => r,
            Err(e) => {
                let mut summary = format!("metrica: booted {info}: error: {e:#}");
                let reboot = if info.tryboot {
                    summary.push_str("; rebooting to the committed slot");
                    Some(RebootMode::Plain)
                } else {
                    None
                };
                BootReport { summary, reboot, ok: false }
            }
        }
    }

    fn boot_inner(
        &self,
        info: &BootInfo,
        running: Option<&Release>,
        plan: &HealthPlan,
        now: &dyn Fn() -> u64,
    ) -> Result<BootReport> {
        let Some(slot) = info.slot() else {
            bail!("booted partition {} is not a boot slot", info.partition)
        };
        let head = format!("metrica: booted {info}");
        let t0 = now();
        let s = self.open_state(Some(slot), running, t0)?;
        let case = state::classify_boot(&s, slot, info.tryboot);
        if let BootCase::UnexpectedTryboot { slot } = case {
            let (_, repair) = self.ensure_autoboot(&s, now())?;
            self.record(
                &Entry::new(now(), HistoryEvent::UnexpectedTryboot)
                    .slot(slot)
                    .reason("trial boot without a pending trial; rebooting to the committed slot"),
            )?;
            let mut summary =
                format!("{head}: no trial is pending; rebooting to committed slot {}", s.committed);
            if repair.is_some() {
                summary.push_str(" (autoboot.txt repaired)");
            }
            return Ok(BootReport { summary, reboot: Some(RebootMode::Plain), ok: true });
        }
        let s = self.apply(&s, &Event::Booted { slot, tryboot: info.tryboot })?;
        let mut notes = Vec::new();
        match &case {
            BootCase::TrialFailed { slot, reason } => {
                let v = s.slot(*slot).version.clone();
                self.record(
                    &Entry::new(now(), HistoryEvent::Rollback)
                        .slot(*slot)
                        .version(v.as_ref())
                        .reason(reason),
                )?;
                notes.push(format!("rolled back: {reason}"));
            }
            BootCase::CommitInterrupted { slot } => {
                self.record(
                    &Entry::new(now(), HistoryEvent::CommitInterrupted)
                        .slot(*slot)
                        .reason("autoboot.txt still named the old slot; the slot stays installed"),
                )?;
                notes.push(format!(
                    "the commit of slot {slot} did not land; slot {slot} stays installed"
                ));
            }
            BootCase::CommitLanded { slot } => {
                let v = s.slot(*slot).version.clone();
                self.record(
                    &Entry::new(now(), HistoryEvent::Commit)
                        .slot(*slot)
                        .version(v.as_ref())
                        .reason("finished at boot: autoboot.txt already named the slot"),
                )?;
                notes.push(format!("commit of slot {slot} finished"));
            }
            BootCase::NotCommitted { committed, .. } => {
                self.record(&Entry::new(now(), HistoryEvent::WrongSlot).slot(slot).reason(
                    format!("plain boot of slot {slot} while slot {committed} is committed"),
                ))?;
            }
            BootCase::Normal | BootCase::TrialBoot { .. } | BootCase::UnexpectedTryboot { .. } => {}
        }
        if s.recovered.as_ref().is_some_and(|r| r.at == t0) {
            notes.push("state.json was corrupt: kept aside and rebuilt (see status)".into());
        }
        let (s, repair) = self.ensure_autoboot(&s, now())?;
        if repair.is_some() {
            notes.push("autoboot.txt repaired".into());
        }
        let join = |notes: &[String], last: &str| {
            let mut all: Vec<&str> = notes.iter().map(String::as_str).collect();
            all.push(last);
            format!("{head}: {}", all.join("; "))
        };
        match case {
            BootCase::TrialBoot { slot } => self.run_trial(&s, slot, plan, now, &head, &notes),
            BootCase::NotCommitted { committed, .. } => {
                if repair.is_some() && s.counters.wrong_slot_boots <= MAX_WRONG_SLOT_REBOOTS {
                    let summary = join(&notes, &format!("rebooting to committed slot {committed}"));
                    Ok(BootReport { summary, reboot: Some(RebootMode::Plain), ok: true })
                } else {
                    let summary = join(
                        &notes,
                        &format!("running slot {slot} while slot {committed} is committed"),
                    );
                    Ok(BootReport { summary, reboot: None, ok: true })
                }
            }
            _ => {
                let v = s
                    .slot(s.committed)
                    .version
                    .as_ref()
                    .map(|v| format!(" ({v})"))
                    .unwrap_or_default();
                Ok(BootReport {
                    summary: join(&notes, &format!("slot {}{v} ok", s.committed)),
                    reboot: None,
                    ok: true,
                })
            }
        }
    }

    fn run_trial(
        &self,
        s: &State,
        slot: Slot,
        plan: &HealthPlan,
        now: &dyn Fn() -> u64,
        head: &str,
        notes: &[String],
    ) -> Result<BootReport> {
        let prefix = if notes.is_empty() {
            head.to_string()
        } else {
            format!("{head}: {}", notes.join("; "))
        };
        let version = s.slot(slot).version.clone();
        let mut s = s.clone();
        let mut passed = String::from("checks passed earlier");
        if s.trial.as_ref().is_some_and(|t| t.phase == TrialPhase::Booted) {
            match health::wait_healthy(&plan.checks, plan.deadline, plan.timer) {
                Verdict::Passed { after } => {
                    passed = format!("checks passed in {} s", after.as_secs());
                    s = self.apply(&s, &Event::HealthPassed)?;
                }
                Verdict::Failed { check } => {
                    let s = self.apply(&s, &Event::HealthFailed { check: check.clone() })?;
                    self.rollback_entry(&s, slot, now())?;
                    return Ok(BootReport {
                        summary: format!(
                            "{prefix}: check failed: {check}; rebooting to slot {}",
                            s.committed
                        ),
                        reboot: Some(RebootMode::Plain),
                        ok: false,
                    });
                }
                Verdict::DeadlinePassed { failing } => {
                    let s = self.apply(&s, &Event::Deadline { failing: failing.clone() })?;
                    self.rollback_entry(&s, slot, now())?;
                    return Ok(BootReport {
                        summary: format!(
                            "{prefix}: health deadline of {} s passed (failing: {failing}); rebooting to slot {}",
                            plan.deadline.as_secs(),
                            s.committed
                        ),
                        reboot: Some(RebootMode::Plain),
                        ok: false,
                    });
                }
            }
        }
        let s = self.commit_trial(&s, now())?;
        let v = version.map(|v| format!(" ({v})")).unwrap_or_default();
        Ok(BootReport {
            summary: format!("{prefix}: {passed}; committed slot {}{v}", s.committed),
            reboot: None,
            ok: true,
        })
    }

    fn rollback_entry(&self, s: &State, slot: Slot, now: u64) -> Result<()> {
        let info = s.slot(slot);
        let reason = match &info.state {
            state::SlotState::Bad { reason } => reason.clone(),
            other => other.name().to_string(),
        };
        self.record(
            &Entry::new(now, HistoryEvent::Rollback)
                .slot(slot)
                .version(info.version.as_ref())
                .reason(reason),
        )
    }

    /// Prepares a trial of the non-committed slot; the caller then reboots with tryboot.
    /// Refused from a trial boot, or when the system did not boot its committed slot.
    pub fn start_trial(&self, booted: Option<&BootInfo>, now: u64) -> Result<(State, Slot)> {
        let s = self.open_state(booted.and_then(|b| b.slot()), None, now)?;
        if let Some(b) = booted {
            if b.tryboot || b.slot() != Some(s.committed) {
                bail!(
                    "booted {b}, not committed slot {}: a trial starts from the committed slot",
                    s.committed
                );
            }
        }
        let target = s.committed.other();
        let (s, _) = self.ensure_autoboot(&s, now)?;
        let s = self.apply(&s, &Event::TrialStarted { slot: target, at: now })?;
        let v = s.slot(target).version.clone();
        self.record(
            &Entry::new(now, HistoryEvent::Trial)
                .slot(target)
                .version(v.as_ref())
                .reason("tryboot reboot requested"),
        )?;
        Ok((s, target))
    }

    /// Marks `slot` good. In its trial boot this commits it, as passing checks would.
    pub fn mark_good(
        &self,
        slot: Slot,
        booted: Option<&BootInfo>,
        now: u64,
    ) -> Result<(State, String)> {
        let s = self.open_state(booted.and_then(|b| b.slot()), None, now)?;
        let before_trial = s.trial.clone();
        let s = self.apply(&s, &Event::MarkGood { slot })?;
        let v = s.slot(slot).version.clone();
        self.record(&Entry::new(now, HistoryEvent::MarkGood).slot(slot).version(v.as_ref()))?;
        if before_trial.is_some_and(|t| t.slot == slot) {
            if booted.is_some_and(|b| b.slot() == Some(slot) && b.tryboot) {
                let s = self.commit_trial(&s, now)?;
                return Ok((s, format!("slot {slot} marked good and committed")));
            }
            return Ok((s, format!("slot {slot} marked good; it is committed when its trial boot runs `updater boot`")));
        }
        Ok((s, format!("slot {slot} marked good")))
    }

    /// Marks `slot` bad: its version is not tried again automatically.
    pub fn mark_bad(
        &self,
        slot: Slot,
        reason: &str,
        booted: Option<&BootInfo>,
        now: u64,
    ) -> Result<State> {
        let s = self.open_state(booted.and_then(|b| b.slot()), None, now)?;
        let s = self.apply(&s, &Event::MarkBad { slot, reason: reason.to_string() })?;
        let v = s.slot(slot).version.clone();
        self.record(
            &Entry::new(now, HistoryEvent::MarkBad).slot(slot).version(v.as_ref()).reason(reason),
        )?;
        Ok(s)
    }

    /// Records that an install of `version` into the non-committed slot starts; returns the
    /// slot to write. Refused when the system did not boot its committed slot.
    pub fn begin_install(
        &self,
        version: &semver::Version,
        security_epoch: u64,
        allow_bad: bool,
        booted: Option<&BootInfo>,
        now: u64,
    ) -> Result<(State, Slot)> {
        let s = self.open_state(booted.and_then(|b| b.slot()), None, now)?;
        if let Some(b) = booted {
            if b.tryboot || b.slot() != Some(s.committed) {
                bail!(
                    "booted {b}, not committed slot {}: installs run from the committed slot",
                    s.committed
                );
            }
        }
        let target = s.committed.other();
        let s = self.apply(
            &s,
            &Event::InstallStarted {
                slot: target,
                version: version.clone(),
                security_epoch,
                allow_bad,
            },
        )?;
        self.record(
            &Entry::new(now, HistoryEvent::InstallStarted).slot(target).version(Some(version)),
        )?;
        Ok((s, target))
    }

    /// Records that the install into `slot` finished and verified.
    pub fn finish_install(&self, slot: Slot, version: &semver::Version, now: u64) -> Result<State> {
        let s = self.open_state(None, None, now)?;
        let s = self.apply(&s, &Event::Installed { slot, version: version.clone() })?;
        self.record(&Entry::new(now, HistoryEvent::Install).slot(slot).version(Some(version)))?;
        Ok(s)
    }

    /// Everything `updater status` shows. Reads only; never repairs.
    pub fn status(&self, booted: Result<BootInfo, String>, history_len: usize) -> Status {
        let (autoboot, autoboot_error) = match read_autoboot(&self.disk) {
            Ok(OnDisk::Valid(a)) => {
                (Some(AutobootStatus { committed: a.committed, tryboot: a.tryboot }), None)
            }
            Ok(other) => (None, Some(other.describe())),
            Err(e) => (None, Some(format!("{e:#}"))),
        };
        let (state, state_error) = match state::load(&self.state_path()) {
            Ok(s) => (s, None),
            Err(e) => (None, Some(e.to_string())),
        };
        let (booted, booted_error) = match booted {
            Ok(b) => (Some(b), None),
            Err(e) => (None, Some(e)),
        };
        let (daemon, daemon_error) = match DaemonRecord::load(&record_path(&self.data_dir)) {
            Ok(d) => (d, None),
            Err(e) => (None, Some(format!("{e:#}"))),
        };
        let now = unix_now();
        let drift = drift(state.as_ref(), autoboot.as_ref(), booted.as_ref());
        let history = self.history();
        let last_update_success = history
            .tail(history.max_entries)
            .unwrap_or_default()
            .iter()
            .rev()
            .find(|e| e.event == HistoryEvent::Commit)
            .map(|e| e.time);
        Status {
            disk: self.disk.clone(),
            data_dir: self.data_dir.clone(),
            booted,
            booted_error,
            autoboot,
            autoboot_error,
            state,
            state_error,
            history: history.tail(history_len).unwrap_or_default(),
            connectivity: daemon.as_ref().map(|d| d.connectivity_at(now)),
            daemon,
            daemon_error,
            disk_free_bytes: disk_free_bytes(&self.data_dir),
            safe_mode: self.data_dir.join("metrica").join(SAFE_MODE_MARKER).exists(),
            drift,
            last_update_success,
        }
    }
}

/// The file whose presence means the device runs its safe-mode stack (written by whatever
/// starts safe mode; DESIGN.md section 8).
pub const SAFE_MODE_MARKER: &str = "safe-mode";

/// Free bytes for unprivileged writers on the filesystem holding `dir`.
pub fn disk_free_bytes(dir: &Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(dir).ok()?;
    Some((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
}

/// Where the disk disagrees with the state: `autoboot.txt` names another committed slot, or
/// the system runs a slot other than the committed one with no trial pending.
pub fn drift(
    state: Option<&State>,
    autoboot: Option<&AutobootStatus>,
    booted: Option<&BootInfo>,
) -> Vec<String> {
    let mut found = Vec::new();
    let Some(s) = state else { return found };
    if let Some(a) = autoboot {
        if a.committed != s.committed {
            found.push(format!(
                "autoboot.txt commits slot {}, the state slot {}",
                a.committed, s.committed
            ));
        }
    }
    if let Some(slot) = booted.and_then(BootInfo::slot) {
        let in_trial = s.trial.as_ref().is_some_and(|t| t.slot == slot);
        if slot != s.committed && !in_trial {
            found.push(format!(
                "running slot {slot}, but slot {} is committed and no trial is pending",
                s.committed
            ));
        }
    }
    found
}

/// The install policy of the `install` command: the pure manifest check against the device's
/// facts, then, before the first byte is written, the install recorded in the state
/// (`installing`), which refuses a version that failed before unless `allow_bad`.
pub struct InstallPolicy<'a> {
    pub device: &'a Device,
    pub facts: DeviceFacts,
    pub target: Slot,
    pub allow_bad: bool,
    pub booted: Option<&'a BootInfo>,
    pub now: u64,
}

impl Policy for InstallPolicy<'_> {
    fn check(&self, m: &Manifest) -> Result<(), InstallRefusal> {
        check_manifest(m, &self.facts)?;
        let (_, slot) = self
            .device
            .begin_install(&m.version, m.security_epoch, self.allow_bad, self.booted, self.now)
            .map_err(|e| InstallRefusal::Policy(format!("{e:#}")))?;
        if slot != self.target {
            return Err(InstallRefusal::Policy(format!(
                "the state names slot {slot} as inactive, not slot {}",
                self.target
            )));
        }
        Ok(())
    }
}

/// What `autoboot.txt` says.
#[derive(Debug, Clone, Serialize)]
pub struct AutobootStatus {
    pub committed: Slot,
    pub tryboot: Slot,
}

/// The status of a device, as `updater status --json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub disk: PathBuf,
    pub data_dir: PathBuf,
    pub booted: Option<BootInfo>,
    pub booted_error: Option<String>,
    pub autoboot: Option<AutobootStatus>,
    pub autoboot_error: Option<String>,
    pub state: Option<State>,
    pub state_error: Option<String>,
    pub history: Vec<Entry>,
    /// The daemon's record (channel, decision, last contact, last error, counters); `None`
    /// until `updater run` has polled once.
    pub daemon: Option<DaemonRecord>,
    pub daemon_error: Option<String>,
    /// Connectivity now, from the daemon's last contact (`None` without a record).
    pub connectivity: Option<Connectivity>,
    /// Free bytes on the data partition (`None` when it cannot be read).
    pub disk_free_bytes: Option<u64>,
    /// The safe-mode marker `/data/metrica/safe-mode` exists.
    pub safe_mode: bool,
    /// Where the disk disagrees with the state (empty: no drift).
    pub drift: Vec<String>,
    /// Unix time of the last commit in the history.
    pub last_update_success: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bootinfo::BootInfoSource;
    use crate::health::CheckError;
    use crate::state::SlotState;
    use crate::testutil::{self, disk_committed, firmware_boots, FakeTimer, FixedCheck};

    fn v(s: &str) -> semver::Version {
        s.parse().unwrap()
    }

    fn booted(slot: Slot, tryboot: bool) -> BootInfo {
        BootInfo { partition: slot.boot().number, tryboot, source: BootInfoSource::KernelCmdline }
    }

    fn release(version: &str) -> Release {
        Release {
            name: "metrica-test".into(),
            version: v(version),
            compatible: "metrica-test".into(),
            build_epoch: 1,
            security_epoch: 0,
        }
    }

    /// A device whose disk commits `slot` and whose data folder is empty.
    fn device(slot: Slot) -> (tempfile::TempDir, Device) {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.img");
        disk_committed(&disk, slot);
        let data = dir.path().join("data");
        std::fs::create_dir_all(data.join("metrica")).unwrap();
        (dir, Device::new(disk, data))
    }

    fn pass() -> FixedCheck {
        FixedCheck("ok", Ok(()))
    }

    fn boot_with(dev: &Device, slot: Slot, tryboot: bool, check: &FixedCheck) -> BootReport {
        let timer = FakeTimer::default();
        let plan =
            HealthPlan { checks: vec![check], deadline: Duration::from_secs(20), timer: &timer };
        dev.boot(&booted(slot, tryboot), Some(&release("1.0.0")), &plan, &|| 1000)
    }

    /// First boot on A, then B installed with 1.1.0 and its trial requested.
    fn trial_requested() -> (tempfile::TempDir, Device) {
        let (dir, dev) = device(Slot::A);
        assert!(boot_with(&dev, Slot::A, false, &pass()).ok);
        let (_, target) =
            dev.begin_install(&v("1.1.0"), 2, false, Some(&booted(Slot::A, false)), 10).unwrap();
        assert_eq!(target, Slot::B);
        dev.finish_install(Slot::B, &v("1.1.0"), 11).unwrap();
        dev.start_trial(Some(&booted(Slot::A, false)), 12).unwrap();
        (dir, dev)
    }

    fn state(dev: &Device) -> State {
        state::load(&dev.state_path()).unwrap().unwrap()
    }

    fn events(dev: &Device) -> Vec<String> {
        dev.history().tail(100).unwrap().into_iter().map(|e| e.event.to_string()).collect()
    }

    #[test]
    fn reads_and_locates_the_imagers_autoboot() {
        let (_d, dev) = device(Slot::A);
        assert_eq!(read_autoboot(&dev.disk).unwrap(), OnDisk::Valid(Autoboot::committed(Slot::A)));
        let offset = locate_autoboot(&dev.disk).unwrap().unwrap();
        assert_eq!(offset % 512, 0);
        let p = config_partition(&dev.disk).unwrap();
        assert!(offset > p.start && offset < p.start + p.len);
        assert_eq!(firmware_boots(&dev.disk, false), (Slot::A, "autoboot.txt".into()));
        assert_eq!(firmware_boots(&dev.disk, true).0, Slot::B);
    }

    #[test]
    fn a_commit_rewrites_exactly_one_sector() {
        let (_d, dev) = device(Slot::A);
        let before = std::fs::read(&dev.disk).unwrap();
        let offset = locate_autoboot(&dev.disk).unwrap().unwrap() as usize;
        assert_eq!(
            write_autoboot(&dev.disk, &Autoboot::committed(Slot::B)).unwrap(),
            WriteMethod::InPlace
        );
        let after = std::fs::read(&dev.disk).unwrap();
        let changed: Vec<usize> = (0..before.len()).filter(|&i| before[i] != after[i]).collect();
        assert!(!changed.is_empty());
        assert!(changed.iter().all(|&i| i >= offset && i < offset + 512), "{changed:?}");
        assert_eq!(firmware_boots(&dev.disk, false).0, Slot::B);
        assert_eq!(firmware_boots(&dev.disk, true).0, Slot::A);
    }

    #[test]
    fn a_missing_or_misshapen_file_is_rewritten_through_the_file_system() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.img");
        testutil::build_disk(&disk, None);
        assert_eq!(read_autoboot(&disk).unwrap(), OnDisk::Missing);
        assert_eq!(firmware_boots(&disk, false), (Slot::A, "default partition".into()));
        assert_eq!(
            write_autoboot(&disk, &Autoboot::committed(Slot::B)).unwrap(),
            WriteMethod::Rewrite
        );
        assert_eq!(firmware_boots(&disk, false).0, Slot::B);
        // Now in the fixed shape: the next write is in place.
        assert_eq!(
            write_autoboot(&disk, &Autoboot::committed(Slot::A)).unwrap(),
            WriteMethod::InPlace
        );
        // A short, unpadded file parses but is not in the fixed shape.
        testutil::build_disk(
            &disk,
            Some(b"[all]\ntryboot_a_b=1\nboot_partition=3\n[tryboot]\nboot_partition=2\n"),
        );
        assert_eq!(read_autoboot(&disk).unwrap(), OnDisk::Valid(Autoboot::committed(Slot::B)));
        assert_eq!(locate_autoboot(&disk).unwrap(), None);
        assert_eq!(
            write_autoboot(&disk, &Autoboot::committed(Slot::A)).unwrap(),
            WriteMethod::Rewrite
        );
        assert!(locate_autoboot(&disk).unwrap().is_some());
    }

    #[test]
    fn a_config_partition_in_the_wrong_place_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = read_autoboot(&dir.path().join("nope.img")).unwrap_err();
        assert!(format!("{e:#}").contains("nope.img"), "{e:#}");
    }

    #[test]
    fn first_boot_creates_the_state_from_the_disk() {
        let (_d, dev) = device(Slot::A);
        let r = boot_with(&dev, Slot::A, false, &pass());
        assert_eq!(
            r,
            BootReport {
                summary: "metrica: booted slot a: slot a (1.0.0) ok".into(),
                reboot: None,
                ok: true
            }
        );
        let s = state(&dev);
        assert_eq!((s.committed, s.slot(Slot::A).version.clone()), (Slot::A, Some(v("1.0.0"))));
        assert_eq!(s.slot(Slot::B).state, SlotState::Empty);
        assert_eq!(events(&dev), ["init"]);
        // Again: nothing new.
        assert!(boot_with(&dev, Slot::A, false, &pass()).ok);
        assert_eq!(events(&dev), ["init"]);
    }

    #[test]
    fn a_healthy_trial_is_committed() {
        let (_d, dev) = trial_requested();
        assert_eq!(firmware_boots(&dev.disk, true).0, Slot::B);
        let r = boot_with(&dev, Slot::B, true, &pass());
        assert_eq!(
            r.summary,
            "metrica: booted slot b (trial): checks passed in 0 s; committed slot b (1.1.0)"
        );
        assert_eq!((r.reboot, r.ok), (None, true));
        let s = state(&dev);
        assert_eq!((s.committed, s.trial.clone(), s.security_epoch), (Slot::B, None, 2));
        assert_eq!(firmware_boots(&dev.disk, false).0, Slot::B);
        assert_eq!(events(&dev), ["init", "install-started", "install", "trial", "commit"]);
        // The next plain boot on B is normal.
        let r = boot_with(&dev, Slot::B, false, &pass());
        assert_eq!(r.summary, "metrica: booted slot b: slot b (1.1.0) ok");
    }

    #[test]
    fn a_failing_check_reboots_to_the_committed_slot_and_marks_bad() {
        let (_d, dev) = trial_requested();
        let bad = FixedCheck("data-writable", Err(CheckError::Fatal("read-only".into())));
        let r = boot_with(&dev, Slot::B, true, &bad);
        assert_eq!((r.reboot, r.ok), (Some(RebootMode::Plain), false));
        assert!(
            r.summary.contains("check failed: data-writable: read-only; rebooting to slot a"),
            "{}",
            r.summary
        );
        let s = state(&dev);
        assert!(
            matches!(&s.slot(Slot::B).state, SlotState::Bad { reason } if reason.contains("data-writable"))
        );
        assert!(s.bad_versions.contains(&v("1.1.0")));
        assert_eq!(firmware_boots(&dev.disk, false).0, Slot::A);
        assert_eq!(events(&dev).last().unwrap(), "rollback");
        assert!(boot_with(&dev, Slot::A, false, &pass()).summary.ends_with("slot a (1.0.0) ok"));
    }

    #[test]
    fn a_deadline_reboots_to_the_committed_slot() {
        let (_d, dev) = trial_requested();
        let slow = FixedCheck("clock-sane", Err(CheckError::NotYet("1970".into())));
        let r = boot_with(&dev, Slot::B, true, &slow);
        assert_eq!(r.reboot, Some(RebootMode::Plain));
        assert!(
            r.summary.contains("health deadline of 20 s passed (failing: clock-sane: 1970)"),
            "{}",
            r.summary
        );
        assert_eq!(state(&dev).counters.rollbacks, 1);
    }

    #[test]
    fn a_trial_that_never_reached_the_updater_is_a_rollback() {
        let (_d, dev) = trial_requested();
        // Kernel panic in B: the firmware boots A plainly.
        let r = boot_with(&dev, Slot::A, false, &pass());
        assert!(
            r.summary
                .contains("rolled back: trial boot of slot b (1.1.0) never reached the updater"),
            "{}",
            r.summary
        );
        assert!(r.ok && r.reboot.is_none());
        let s = state(&dev);
        assert_eq!(s.counters.rollbacks, 1);
        assert!(matches!(s.slot(Slot::B).state, SlotState::Bad { .. }));
        let h = dev.history().tail(1).unwrap();
        assert_eq!((h[0].event.as_str(), h[0].slot.as_deref()), ("rollback", Some("b")));
        // Never retried automatically; an operator can.
        let e = dev.begin_install(&v("1.1.0"), 2, false, None, 20).unwrap_err();
        assert!(e.to_string().contains("failed before"), "{e}");
        dev.begin_install(&v("1.1.0"), 2, true, None, 20).unwrap();
    }

    #[test]
    fn a_tryboot_without_a_trial_reboots_plainly() {
        let (_d, dev) = device(Slot::A);
        let r = boot_with(&dev, Slot::B, true, &pass());
        assert_eq!(r.reboot, Some(RebootMode::Plain));
        assert!(r.summary.contains("no trial is pending"), "{}", r.summary);
        assert_eq!(state(&dev).committed, Slot::A);
    }

    #[test]
    fn a_torn_autoboot_with_b_committed_walks_to_a_and_is_repaired() {
        let (_d, dev) = trial_requested();
        assert!(boot_with(&dev, Slot::B, true, &pass()).ok);
        // The sector reads back as zeros (a torn write on a card that erases first).
        let offset = locate_autoboot(&dev.disk).unwrap().unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&dev.disk)
            .unwrap()
            .write_all_at(&[0; 512], offset)
            .unwrap();
        let (walked, how) = firmware_boots(&dev.disk, false);
        assert_eq!((walked, how.as_str()), (Slot::A, "partition walk"));
        let r = boot_with(&dev, walked, false, &pass());
        assert_eq!(r.reboot, Some(RebootMode::Plain), "{}", r.summary);
        assert!(
            r.summary.contains("autoboot.txt repaired; rebooting to committed slot b"),
            "{}",
            r.summary
        );
        assert_eq!(firmware_boots(&dev.disk, false).0, Slot::B);
        assert!(boot_with(&dev, Slot::B, false, &pass()).ok);
        assert_eq!(state(&dev).counters.wrong_slot_boots, 0);
        assert_eq!(state(&dev).counters.repairs, 1);
    }

    #[test]
    fn repeated_wrong_slot_boots_stop_rebooting() {
        let (_d, dev) = trial_requested();
        assert!(boot_with(&dev, Slot::B, true, &pass()).ok);
        let offset = locate_autoboot(&dev.disk).unwrap().unwrap();
        let tear = || {
            let f = std::fs::OpenOptions::new().write(true).open(&dev.disk).unwrap();
            f.write_all_at(&[0xff; 512], offset).unwrap();
        };
        let mut reboots = Vec::new();
        for _ in 0..4 {
            tear();
            assert_eq!(firmware_boots(&dev.disk, false).0, Slot::A);
            reboots.push(boot_with(&dev, Slot::A, false, &pass()).reboot);
        }
        let plain = Some(RebootMode::Plain);
        assert_eq!(reboots, [plain, plain, None, None]);
        // Each boot still repaired the file: the next plain reboot lands on B.
        assert_eq!(firmware_boots(&dev.disk, false).0, Slot::B);
        assert!(boot_with(&dev, Slot::B, false, &pass()).ok);
        assert_eq!(state(&dev).counters.wrong_slot_boots, 0);
    }

    #[test]
    fn a_plain_boot_of_the_other_slot_with_a_good_autoboot_stays_put() {
        let (_d, dev) = device(Slot::A);
        assert!(boot_with(&dev, Slot::A, false, &pass()).ok);
        // e.g. an operator's `reboot 3`: autoboot.txt is fine, so no reboot loop.
        let r = boot_with(&dev, Slot::B, false, &pass());
        assert_eq!(r.reboot, None);
        assert!(r.summary.contains("running slot b while slot a is committed"), "{}", r.summary);
    }

    #[test]
    fn a_corrupt_state_is_kept_aside_and_rebuilt() {
        let (_d, dev) = device(Slot::B);
        std::fs::write(dev.state_path(), b"{\"format\": 1, \"comm").unwrap();
        let r = boot_with(&dev, Slot::B, false, &pass());
        assert!(
            r.summary.contains("state.json was corrupt: kept aside and rebuilt"),
            "{}",
            r.summary
        );
        let backup = dev.data_dir.join("metrica/state.json.corrupt-1");
        assert_eq!(std::fs::read(&backup).unwrap(), b"{\"format\": 1, \"comm");
        let s = state(&dev);
        assert_eq!(s.committed, Slot::B);
        assert!(s
            .recovered
            .as_ref()
            .unwrap()
            .reason
            .contains("rebuilt with the committed slot from autoboot.txt"));
        assert_eq!(events(&dev), ["repair"]);
        let st = dev.status(Ok(booted(Slot::B, false)), 5);
        assert!(crate::cli::render_status(&st).contains("recovered:"));
    }

    #[test]
    fn a_rebuilt_state_takes_versions_from_the_root_file_systems() {
        let (_d, dev) = device(Slot::B);
        testutil::build_disk_with_roots(
            &dev.disk,
            Some(&Autoboot::committed(Slot::B).render()),
            &[
                Some(testutil::ext4_root(&release("1.0.0"))),
                Some(testutil::ext4_root(&release("1.1.0"))),
            ],
        );
        assert_eq!(dev.slot_release(Slot::A).unwrap().version, v("1.0.0"));
        std::fs::write(dev.state_path(), b"garbage").unwrap();
        let s = dev.open_state(None, None, 5).unwrap();
        assert_eq!(s.committed, Slot::B);
        assert_eq!(s.slot(Slot::B).version, Some(v("1.1.0")));
        assert_eq!(s.slot(Slot::B).state, SlotState::Good);
        assert_eq!(s.slot(Slot::A).state, SlotState::Installed);
        let facts = dev.device_facts(&s, None).unwrap();
        assert_eq!(
            (facts.compatible.as_str(), facts.committed_version),
            ("metrica-test", Some(v("1.1.0")))
        );
        // Pattern roots hold no file system: no facts, said clearly.
        let (_d, plain) = device(Slot::A);
        let s = plain.open_state(Some(Slot::A), None, 5).unwrap();
        let e = plain.device_facts(&s, None).unwrap_err();
        assert!(e.to_string().contains("cannot tell this device's compatible"), "{e}");
    }

    #[test]
    fn one_command_at_a_time() {
        let (_d, dev) = device(Slot::A);
        let held = dev.lock().unwrap();
        let e = dev.lock().unwrap_err();
        assert!(e.downcast_ref::<LockBusy>().is_some(), "{e:#}");
        drop(held);
        dev.lock().unwrap();
    }

    #[test]
    fn a_newer_state_is_never_touched() {
        let (_d, dev) = device(Slot::A);
        let newer = b"{\"format\": 7}";
        std::fs::write(dev.state_path(), newer).unwrap();
        let r = boot_with(&dev, Slot::A, false, &pass());
        assert!(!r.ok && r.reboot.is_none());
        assert!(r.summary.contains("newer than this updater"), "{}", r.summary);
        let r = boot_with(&dev, Slot::B, true, &pass());
        assert_eq!(r.reboot, Some(RebootMode::Plain));
        assert_eq!(std::fs::read(dev.state_path()).unwrap(), newer);
    }

    #[test]
    fn mark_good_in_a_trial_boot_commits() {
        let (_d, dev) = trial_requested();
        // The updater started in the trial boot but the operator decides.
        let s = state(&dev);
        let s = dev.apply(&s, &Event::Booted { slot: Slot::B, tryboot: true }).unwrap();
        assert_eq!(s.trial.unwrap().phase, TrialPhase::Booted);
        let (s, msg) = dev.mark_good(Slot::B, Some(&booted(Slot::B, true)), 30).unwrap();
        assert_eq!(msg, "slot b marked good and committed");
        assert_eq!(s.committed, Slot::B);
        assert_eq!(firmware_boots(&dev.disk, false).0, Slot::B);
        let e = dev.mark_bad(Slot::B, "x", None, 31).unwrap_err();
        assert!(e.to_string().contains("slot b is the committed slot"), "{e}");
        dev.mark_bad(Slot::A, "old", None, 32).unwrap();
        assert!(matches!(state(&dev).slot(Slot::A).state, SlotState::Bad { .. }));
    }

    #[test]
    fn trials_and_installs_start_only_from_the_committed_slot() {
        let (_d, dev) = trial_requested();
        let e = dev.start_trial(Some(&booted(Slot::B, true)), 40).unwrap_err();
        assert!(e.to_string().contains("a trial starts from the committed slot"), "{e}");
        let e = dev
            .begin_install(&v("2.0.0"), 0, false, Some(&booted(Slot::A, false)), 40)
            .unwrap_err();
        assert!(e.to_string().contains("a trial of slot b is pending"), "{e}");
    }

    /// Failpoints hit by a trial boot that commits, in order.
    fn trial_boot_failpoints() -> Vec<String> {
        let (_d, dev) = trial_requested();
        failpoint::record();
        assert!(boot_with(&dev, Slot::B, true, &pass()).ok);
        failpoint::recorded()
    }

    fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push((p.clone(), std::fs::read(&p).unwrap()));
                }
            }
        }
        out
    }

    fn restore(dir: &Path, snap: &[(PathBuf, Vec<u8>)]) {
        std::fs::remove_dir_all(dir.join("data")).unwrap();
        for (p, bytes) in snap {
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, bytes).unwrap();
        }
    }

    /// Cuts the power at every failpoint of a committing trial boot (and at many byte offsets
    /// of the autoboot.txt write), boots what the firmware model picks, and checks that the
    /// device ends on its committed slot with its roots intact and a readable state.
    #[test]
    fn power_cuts_during_a_commit_never_lose_the_committed_slot() {
        let names = trial_boot_failpoints();
        for expected in [
            "autoboot.write",
            "autoboot.after-fsync",
            "state.before-rename",
            "state.after-dir-fsync",
        ] {
            assert!(names.iter().any(|n| n == expected), "{expected} not in {names:?}");
        }
        let (dir, dev) = trial_requested();
        let snap = snapshot(dir.path());
        let labels = ["boot_a", "boot_b", "root_a", "root_b"];
        let parts: Vec<Vec<u8>> =
            labels.iter().map(|l| testutil::partition_bytes(&dev.disk, l)).collect();
        let mut cases: Vec<(usize, Option<usize>)> = (0..names.len()).map(|i| (i, None)).collect();
        let write_index = names.iter().position(|n| n == "autoboot.write").unwrap();
        // Torn writes: every byte count around the two digits that differ, and a spread.
        let mut torn: Vec<usize> = (0..80).collect();
        torn.extend((80..=512).step_by(37));
        torn.push(512);
        cases.extend(torn.into_iter().map(|k| (write_index, Some(k))));
        let mut outcomes = std::collections::BTreeSet::new();
        for (index, torn) in cases {
            restore(dir.path(), &snap);
            // Hit the index-th occurrence: arm by name after skipping earlier hits of it.
            let name = &names[index];
            let skip = names[..index].iter().filter(|n| *n == name).count();
            arm_nth(name, skip, torn);
            let r = boot_with(&dev, Slot::B, true, &pass());
            failpoint::disarm();
            assert!(!r.ok && r.summary.contains("power cut"), "{name}#{skip}: {}", r.summary);
            // Power comes back: the tryboot flag is gone.
            let (slot, how) = firmware_boots(&dev.disk, false);
            assert_eq!(how, "autoboot.txt", "{name}#{skip} {torn:?}");
            assert!(state::load(&dev.state_path()).is_ok(), "{name}: state unreadable");
            let r = boot_with(&dev, slot, false, &pass());
            assert!(r.ok, "{name}#{skip} {torn:?}: {}", r.summary);
            let s = state(&dev);
            assert_eq!(s.committed, slot, "{name}#{skip} {torn:?}: {}", r.summary);
            assert_eq!(read_autoboot(&dev.disk).unwrap(), OnDisk::Valid(Autoboot::committed(slot)));
            assert_eq!(firmware_boots(&dev.disk, false).0, slot);
            for (label, bytes) in labels.iter().zip(&parts) {
                assert!(testutil::partition_bytes(&dev.disk, label) == *bytes, "{label} changed");
            }
            // A new install into the other slot is accepted.
            dev.begin_install(&v("3.0.0"), 3, false, Some(&booted(slot, false)), 50).unwrap();
            outcomes.insert((slot, s.slot(Slot::B).state.name()));
        }
        // Every end is reached: a cut before the checks passed fails the trial, a cut before
        // autoboot.txt changed keeps B installed, a cut after it commits B.
        for want in [(Slot::A, "bad"), (Slot::A, "installed"), (Slot::B, "good")] {
            assert!(outcomes.contains(&want), "{want:?} not in {outcomes:?}");
        }
    }

    /// Cuts the power at every failpoint of `updater trial` (before the reboot happened).
    #[test]
    fn power_cuts_while_requesting_a_trial_keep_slot_a() {
        let (dir, dev) = device(Slot::A);
        assert!(boot_with(&dev, Slot::A, false, &pass()).ok);
        dev.begin_install(&v("1.1.0"), 2, false, None, 10).unwrap();
        dev.finish_install(Slot::B, &v("1.1.0"), 11).unwrap();
        let snap = snapshot(dir.path());
        failpoint::record();
        dev.start_trial(Some(&booted(Slot::A, false)), 12).unwrap();
        let names = failpoint::recorded();
        assert!(!names.is_empty());
        for (i, name) in names.iter().enumerate() {
            restore(dir.path(), &snap);
            arm_nth(name, names[..i].iter().filter(|n| *n == name).count(), None);
            let e = dev.start_trial(Some(&booted(Slot::A, false)), 12).unwrap_err();
            failpoint::disarm();
            assert!(e.downcast_ref::<failpoint::PowerCut>().is_some(), "{e:#}");
            assert_eq!(firmware_boots(&dev.disk, false).0, Slot::A);
            let r = boot_with(&dev, Slot::A, false, &pass());
            assert!(r.ok, "{name}: {}", r.summary);
            assert_eq!(state(&dev).committed, Slot::A);
        }
    }

    /// Arms `name` so that its `skip`+1-th hit cuts the power.
    fn arm_nth(name: &str, skip: usize, torn: Option<usize>) {
        if skip == 0 {
            failpoint::arm(name, torn);
        } else {
            failpoint::arm_after(name, skip, torn);
        }
    }
}
