//! First boot on sparse image files "grown like a bigger card": the full run, a power cut at
//! every failpoint followed by a good boot, and missing or bad provisioning.

use super::*;
use crate::provision::tests::{DEVICE, KEY};
use crate::provision::{secrets, AUTHORIZED_KEYS, DEVICE_TOML, SECRETS_AGE, WIFI_TOML};
use std::cell::RefCell;
use std::io::Write;

const MIB: u64 = 1 << 20;
const CARD: u64 = 48 * MIB;
const OTP: [u8; 32] = [9; 32];

const WIFI: &str = "country = \"DE\"\n[[network]]\nssid = \"Shop\"\npsk_secret = \"wifi_shop\"\n";

/// The image-file platform (resize2fs), with a fake OTP key and a recorded host name.
struct Fake {
    otp: Option<[u8; 32]>,
    hostnames: RefCell<Vec<String>>,
}

impl Fake {
    fn new(otp: Option<[u8; 32]>) -> Self {
        Fake { otp, hostnames: RefCell::default() }
    }
}

impl Platform for Fake {
    fn resize_partition(&self, disk: &Path, part: &Partition) -> Result<()> {
        ImageFile.resize_partition(disk, part)
    }
    fn grow_fs(&self, disk: &Path, part: &Partition, data_dir: &Path) -> Result<()> {
        ImageFile.grow_fs(disk, part, data_dir)
    }
    fn set_hostname(&self, name: &str) -> Result<()> {
        self.hostnames.borrow_mut().push(name.to_string());
        Ok(())
    }
    fn otp_key(&self) -> Option<[u8; 32]> {
        self.otp
    }
}

/// A 16 MiB image (the layout, `data` a small ext4) with `files` on its provision partition,
/// then extended to 48 MiB like an image written to a bigger card.
fn card(path: &Path, files: &[(&str, Vec<u8>)]) {
    crate::testutil::disk_committed(path, crate::layout::Slot::A);
    let data = disk::find_label(path, "data").unwrap();
    let out = std::process::Command::new("mke2fs")
        .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin")
        .args(["-q", "-F", "-t", "ext4", "-E"])
        .arg(format!("offset={}", data.start))
        .arg(path)
        .arg(format!("{}K", data.len / 1024))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let prov = disk::find_label(path, "provision").unwrap();
    let file = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let slice = disk::partition_stream(file, &prov).unwrap();
    let fs = fatfs::FileSystem::new(slice, fatfs::FsOptions::new()).unwrap();
    for (name, bytes) in files {
        fs.root_dir().create_file(name).unwrap().write_all(bytes).unwrap();
    }
    fs.unmount().unwrap();
    std::fs::OpenOptions::new().write(true).open(path).unwrap().set_len(CARD).unwrap();
}

fn good_files() -> Vec<(&'static str, Vec<u8>)> {
    let recipient = identity::from_otp_key(&OTP).to_public();
    let sec =
        secrets::encrypt(b"wifi_shop = \"shop floor pass\"\napi_token = \"t0k\"\n", &[recipient])
            .unwrap();
    vec![
        (DEVICE_TOML, DEVICE.as_bytes().to_vec()),
        (WIFI_TOML, WIFI.as_bytes().to_vec()),
        (AUTHORIZED_KEYS, format!("{KEY}\n").into_bytes()),
        (SECRETS_AGE, sec),
    ]
}

fn run(disk: &Path, data: &Path, platform: &dyn Platform) -> Result<Outcome> {
    Firstboot { disk, data_dir: data, platform, now: 1_800_000_000 }.run()
}

/// Everything a fully provisioned device has.
fn assert_provisioned(disk: &Path, data: &Path) {
    let read =
        |p: &str| std::fs::read_to_string(data.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    let mode = |p: &str| std::fs::metadata(data.join(p)).unwrap().permissions().mode() & 0o777;
    let o: Outcome = serde_json::from_str(&read(PROVISIONED)).unwrap();
    assert_eq!(o.result, FirstbootResult::Ok);
    assert_eq!(o.device_id.as_deref(), Some("pi-0042"));
    assert_eq!(o.identity_source, Some(identity::Source::Otp));
    assert_eq!(o.recipient, Some(identity::recipient_from_otp_key(&OTP)));
    assert_eq!(read("etc/hostname"), "cam-0042\n");
    assert_eq!(read("etc/timezone"), "Europe/Berlin\n");
    assert_eq!(read("root/.ssh/authorized_keys"), format!("{KEY}\n"));
    assert_eq!(mode("root/.ssh/authorized_keys"), 0o600);
    assert_eq!(mode("root/.ssh"), 0o700);
    assert_eq!(read("metrica/device.toml"), DEVICE);
    assert_eq!(read("metrica/secrets/wifi_shop"), "shop floor pass");
    assert_eq!(mode("metrica/secrets/api_token"), 0o600);
    assert_eq!(mode(identity::IDENTITY_FILE), 0o600);
    let wpa = read("etc/wpa_supplicant/wpa_supplicant.conf");
    assert!(wpa.contains("psk=\"shop floor pass\"") && wpa.contains("country=DE"), "{wpa}");
    for (dir, m) in LAYOUT {
        assert_eq!(mode(dir), m, "{dir}");
    }
    // No temp file is left behind.
    let leftovers: Vec<_> =
        walk(data).into_iter().filter(|p| p.to_string_lossy().ends_with(".tmp")).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert_grown(disk);
}

/// data reaches the last 4 MiB boundary of the 48 MiB card, its ext4 fills it and is clean,
/// and both GPT headers are valid with the backup at the last sector.
fn assert_grown(disk: &Path) {
    let part = disk::find_label(disk, "data").unwrap();
    assert_eq!(part.start + part.len, 44 * MIB, "data ends on the last 4 MiB boundary");
    assert_eq!(ext4_size_on_disk(disk, &part).unwrap(), part.len);
    let g = gpt::GptConfig::new().only_valid_headers(true).open(disk).unwrap();
    assert_eq!(g.backup_header().unwrap().backup_lba, 1);
    assert_eq!(g.primary_header().unwrap().backup_lba, CARD / SECTOR - 1);
    let out = std::process::Command::new("e2fsck")
        .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin")
        .arg("-fn")
        .arg(format!("{}?offset={}", disk.display(), part.start))
        .output()
        .unwrap();
    assert!(out.status.success(), "e2fsck: {}", String::from_utf8_lossy(&out.stdout));
    let out = std::process::Command::new("sgdisk")
        .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin")
        .arg("-v")
        .arg(disk)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("No problems found") && !said.contains("corrupt"), "sgdisk -v: {said}");
    // The Pi firmware model still finds the slots.
    assert_eq!(crate::testutil::firmware_boots(disk, false).0, crate::layout::Slot::A);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

#[test]
fn a_first_boot_provisions_everything_and_a_second_does_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("card.img");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    card(&disk, &good_files());
    let before = disk::find_label(&disk, "data").unwrap();
    assert!(before.start + before.len < 16 * MIB);
    let fake = Fake::new(Some(OTP));
    let o = run(&disk, &data, &fake).unwrap();
    assert_eq!((o.result, o.reason.as_deref()), (FirstbootResult::Ok, None));
    assert_eq!(*fake.hostnames.borrow(), ["cam-0042"]);
    assert_provisioned(&disk, &data);
    let again = run(&disk, &data, &fake).unwrap();
    assert_eq!(again.result, FirstbootResult::AlreadyProvisioned);
    assert_eq!(
        *fake.hostnames.borrow(),
        ["cam-0042", "cam-0042"],
        "only the host name is set again"
    );
}

#[test]
fn a_power_cut_at_every_failpoint_then_a_good_boot_provisions_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("template.img");
    card(&template, &good_files());

    // A clean run lists the failpoints, in order.
    let disk = dir.path().join("card.img");
    let data = dir.path().join("data0");
    std::fs::create_dir(&data).unwrap();
    std::fs::copy(&template, &disk).unwrap();
    failpoint::record();
    run(&disk, &data, &Fake::new(Some(OTP))).unwrap();
    let names = failpoint::recorded();
    for step in STEPS {
        assert!(names.iter().any(|n| n == step), "{step} not hit: {names:?}");
    }
    eprintln!("first boot passes {} failpoints; cutting the power at each", names.len());

    for (i, name) in names.iter().enumerate() {
        let skip = names[..i].iter().filter(|n| *n == name).count();
        let disk = dir.path().join(format!("card{i}.img"));
        let data = dir.path().join(format!("data{}", i + 1));
        std::fs::create_dir(&data).unwrap();
        std::fs::copy(&template, &disk).unwrap();
        failpoint::arm_after(name, skip, Some(5));
        let err = run(&disk, &data, &Fake::new(Some(OTP))).unwrap_err();
        failpoint::disarm();
        let cut = err.downcast_ref::<failpoint::PowerCut>();
        assert_eq!(cut.map(|c| c.0.as_str()), Some(name.as_str()), "{name} #{skip}: {err:#}");
        assert!(
            !data.join(PROVISIONED).exists() || i + 1 >= names.len() - 3,
            "{name}: done too early"
        );

        let o = run(&disk, &data, &Fake::new(Some(OTP))).unwrap();
        assert!(o.is_ok(), "after a cut at {name} #{skip}: {o:?}");
        assert_provisioned(&disk, &data);
    }
}

#[test]
fn missing_provisioning_degrades_grows_data_and_keeps_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("card.img");
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("metrica")).unwrap();
    std::fs::write(data.join("metrica/state.json"), "{\"kept\":1}").unwrap();
    std::fs::write(data.join("user-file"), "mine").unwrap();
    card(&disk, &[]);
    let o = run(&disk, &data, &Fake::new(None)).unwrap();
    assert_eq!(o.result, FirstbootResult::Degraded);
    let reason = o.reason.clone().unwrap();
    assert!(reason.contains("device.toml: missing"), "{reason}");
    assert_eq!(o.identity_source, Some(identity::Source::Generated));
    assert_eq!(std::fs::read_to_string(data.join("user-file")).unwrap(), "mine");
    assert_eq!(std::fs::read_to_string(data.join("metrica/state.json")).unwrap(), "{\"kept\":1}");
    assert!(!data.join(PROVISIONED).exists());
    assert_eq!(read_outcome(&data).unwrap().unwrap(), o);
    assert_grown(&disk);
    // The identity survives a retry: the recipient the device reported stays valid.
    let again = run(&disk, &data, &Fake::new(None)).unwrap();
    assert_eq!((again.result, &again.recipient), (FirstbootResult::Degraded, &o.recipient));
}

#[test]
fn no_provision_partition_at_all_is_degraded_too() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("card.img");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    card(&disk, &[]);
    // Wipe the FAT boot sector of provision: not a file system any more.
    let prov = disk::find_label(&disk, "provision").unwrap();
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .unwrap()
        .write_all_at(&[0; 512], prov.start)
        .unwrap();
    let o = run(&disk, &data, &Fake::new(None)).unwrap();
    assert_eq!(o.result, FirstbootResult::Degraded);
    assert!(o.reason.unwrap().contains("no provisioning"));
}

#[test]
fn invalid_provisioning_names_the_file_and_field_and_applies_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("card.img");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let mut files = good_files();
    files[0].1 = DEVICE.replace("cam-0042", "cam_0042").into_bytes();
    card(&disk, &files);
    let fake = Fake::new(Some(OTP));
    let o = run(&disk, &data, &fake).unwrap();
    assert_eq!(o.result, FirstbootResult::Degraded);
    assert!(o.reason.as_deref().unwrap().contains("device.toml: hostname: \"cam_0042\""), "{o:?}");
    assert!(fake.hostnames.borrow().is_empty());
    assert!(!data.join("etc/hostname").exists());
    assert!(!data.join("root/.ssh/authorized_keys").exists());
}

#[test]
fn secrets_for_another_device_leave_the_rest_applied_and_report_the_recipient() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("card.img");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    card(&disk, &good_files());
    let o = run(&disk, &data, &Fake::new(None)).unwrap();
    assert_eq!(o.result, FirstbootResult::Degraded);
    let reason = o.reason.unwrap();
    let mine = o.recipient.unwrap();
    assert!(
        reason.contains("secrets.age: cannot be decrypted") && reason.contains(&mine),
        "{reason}"
    );
    assert!(reason.contains("wifi.toml: not applied"), "{reason}");
    assert_eq!(std::fs::read_to_string(data.join("etc/hostname")).unwrap(), "cam-0042\n");
    assert!(data.join("root/.ssh/authorized_keys").exists());
    assert!(!data.join("etc/wpa_supplicant/wpa_supplicant.conf").exists());
    assert!(std::fs::read_dir(data.join("metrica/secrets")).unwrap().next().is_none());
}

#[test]
fn the_data_partition_grows_to_the_last_boundary_only() {
    let per = ALIGN / SECTOR;
    assert_eq!(grown_last_lba(100, 3 * per + 10), 3 * per - 1);
    assert_eq!(grown_last_lba(100, 3 * per - 1), 3 * per - 1);
    assert_eq!(grown_last_lba(3 * per + 5, 3 * per + 10), 3 * per + 5, "never shrinks");
}

#[test]
fn an_ext4_superblock_gives_the_size() {
    let mut sb = vec![0u8; 1024];
    sb[0x38..0x3a].copy_from_slice(&0xEF53u16.to_le_bytes());
    sb[0x4..0x8].copy_from_slice(&1000u32.to_le_bytes());
    sb[0x18..0x1c].copy_from_slice(&2u32.to_le_bytes());
    assert_eq!(ext4_size(&sb).unwrap(), 4096 * 1000);
    sb[0x60] = 0x80;
    sb[0x150..0x154].copy_from_slice(&1u32.to_le_bytes());
    assert_eq!(ext4_size(&sb).unwrap(), 4096 * ((1u64 << 32) + 1000));
    assert!(ext4_size(&[0; 1024]).is_err());
}

/// The results in `firstboot.json` and `updater status --json` are the documented names
/// (docs/provisioning.md), and read back as themselves.
#[test]
fn results_are_written_as_their_documented_names() {
    use FirstbootResult::*;
    for (result, name) in
        [(Ok, "ok"), (Degraded, "degraded"), (AlreadyProvisioned, "already-provisioned")]
    {
        let json = serde_json::to_string(&result).unwrap();
        assert_eq!(json, format!("\"{name}\""));
        assert_eq!((result.as_str(), result.to_string()), (name, name.to_string()));
        assert_eq!(serde_json::from_str::<FirstbootResult>(&json).unwrap(), result);
    }
    assert!(serde_json::from_str::<FirstbootResult>("\"fine\"").is_err());
}
