//! Test helpers: small sparse GPT disk images with the fixed layout, and the firmware model
//! of the `qemu` crate (issue 5) that decides which slot such a disk boots.

use crate::autoboot::Autoboot;
use crate::layout::{Slot, PARTITIONS};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

const MIB: u64 = 1024 * 1024;

/// Bytes of root partition `slot` in a test image: a pattern that tests compare byte for byte.
pub fn root_pattern(slot: Slot, len: usize) -> Vec<u8> {
    let seed = match slot {
        Slot::A => 0x5a,
        Slot::B => 0xa5,
    };
    (0..len).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
}

/// Builds a disk image with the seven partitions of the layout (FAT ones formatted; boot_a and
/// boot_b holding a kernel, `config.txt` and `cmdline.txt`; roots filled with
/// [`root_pattern`]) and `autoboot.txt` bytes `autoboot` on `config` (none when `None`).
pub fn build_disk(path: &Path, autoboot: Option<&[u8]>) {
    build_disk_with_roots(path, autoboot, &[None, None]);
}

/// Like [`build_disk`], with root images (e.g. from [`ext4_root`]) for root_a and root_b
/// instead of the patterns.
pub fn build_disk_with_roots(path: &Path, autoboot: Option<&[u8]>, roots: &[Option<Vec<u8>>; 2]) {
    let file =
        OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path).unwrap();
    file.set_len(16 * MIB).unwrap();
    let mut disk = gpt::GptConfig::new().writable(true).create_from_device(file, None).unwrap();
    let mut spans = Vec::new();
    for p in PARTITIONS {
        let (size, kind) = match p.fs {
            crate::layout::FsKind::Fat => (2 * MIB, gpt::partition_types::BASIC),
            crate::layout::FsKind::Ext4 => (MIB, gpt::partition_types::LINUX_FS),
        };
        let id = disk.add_partition(p.label, size, kind, 0, Some(2048)).unwrap();
        assert_eq!(id, p.number);
        let part = disk.partitions()[&id].clone();
        spans.push((p, part.first_lba * 512, (part.last_lba + 1 - part.first_lba) * 512));
    }
    disk.write().unwrap();
    for (p, start, len) in spans {
        let file = OpenOptions::new().read(true).write(true).open(path).unwrap();
        let files: Vec<(&str, Vec<u8>)> = match p.label {
            "config" => autoboot.map(|a| vec![("autoboot.txt", a.to_vec())]).unwrap_or_default(),
            "boot_a" | "boot_b" => vec![
                ("kernel8.img", format!("kernel of {}", p.label).into_bytes()),
                ("config.txt", b"arm_64bit=1\n".to_vec()),
                ("cmdline.txt", b"console=ttyAMA0 root=PARTUUID=x\n".to_vec()),
            ],
            "root_a" | "root_b" => {
                let slot = if p.label == "root_a" { Slot::A } else { Slot::B };
                use std::os::unix::fs::FileExt;
                let bytes = match &roots[slot as usize] {
                    Some(image) => image.clone(),
                    None => root_pattern(slot, len as usize),
                };
                file.write_all_at(&bytes, start).unwrap();
                continue;
            }
            "provision" => vec![],
            _ => continue,
        };
        let mut slice = fscommon::StreamSlice::new(file, start, start + len).unwrap();
        fatfs::format_volume(&mut slice, fatfs::FormatVolumeOptions::new()).unwrap();
        let fs = fatfs::FileSystem::new(slice, fatfs::FsOptions::new()).unwrap();
        for (name, data) in files {
            fs.root_dir().create_file(name).unwrap().write_all(&data).unwrap();
        }
        fs.unmount().unwrap();
    }
}

/// A disk whose `autoboot.txt` commits `slot`, as the imager writes it.
pub fn disk_committed(path: &Path, slot: Slot) {
    build_disk(path, Some(&Autoboot::committed(slot).render()));
}

/// Which slot the Pi firmware boots from this disk, with or without the tryboot flag, by the
/// firmware model of the `qemu` crate (shares no code with the updater). Returns the slot and
/// how the firmware chose it (`autoboot.txt`, `partition walk`, ...).
pub fn firmware_boots(disk: &Path, tryboot: bool) -> (Slot, String) {
    let summary = qemu::disk::summarize(disk).unwrap();
    let choice =
        qemu::firmware::choose(&summary, qemu::firmware::BootRequest { partition: 0, tryboot })
            .unwrap();
    let slot = Slot::from_boot_partition(choice.partition)
        .unwrap_or_else(|| panic!("firmware chose partition {}", choice.partition));
    (slot, choice.selection.to_string())
}

/// The bytes of root partition `slot` on the disk.
pub fn root_bytes(disk: &Path, slot: Slot) -> Vec<u8> {
    partition_bytes(disk, slot.root().label)
}

/// The bytes of the partition labelled `label`.
pub fn partition_bytes(disk: &Path, label: &str) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let p = crate::disk::find_label(disk, label).unwrap();
    let mut buf = vec![0; p.len as usize];
    std::fs::File::open(disk).unwrap().read_exact_at(&mut buf, p.start).unwrap();
    buf
}

/// A monotonic clock that moves only when slept on.
#[derive(Debug, Default)]
pub struct FakeTimer(pub std::cell::Cell<std::time::Duration>);

impl crate::health::Timer for FakeTimer {
    fn elapsed(&self) -> std::time::Duration {
        self.0.get()
    }
    fn sleep(&self, d: std::time::Duration) {
        self.0.set(self.0.get() + d);
    }
}

/// A health check with a fixed answer.
#[derive(Debug)]
pub struct FixedCheck(pub &'static str, pub Result<(), crate::health::CheckError>);

impl crate::health::Check for FixedCheck {
    fn name(&self) -> String {
        self.0.into()
    }
    fn run(&self) -> Result<(), crate::health::CheckError> {
        self.1.clone()
    }
}

/// A 1 MiB ext4 image holding `/etc/metrica/release.toml` for `release` (made with
/// `mkfs.ext4 -d`, which the imager needs anyway).
pub fn ext4_root(release: &crate::release::Release) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree/etc/metrica");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("release.toml"), release.to_toml()).unwrap();
    let img = dir.path().join("root.img");
    std::fs::File::create(&img).unwrap().set_len(MIB).unwrap();
    let st = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "1024", "-O", "^has_journal", "-d"])
        .arg(dir.path().join("tree"))
        .arg(&img)
        .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin")
        .status()
        .expect("mkfs.ext4 (e2fsprogs) is needed by this test");
    assert!(st.success());
    std::fs::read(img).unwrap()
}

/// A 1 MiB FAT boot image with a kernel, `config.txt` and `cmdline.txt`, as a bundle carries.
pub fn fat_boot_image() -> Vec<u8> {
    let mut cur = std::io::Cursor::new(vec![0u8; MIB as usize]);
    fatfs::format_volume(&mut cur, fatfs::FormatVolumeOptions::new()).unwrap();
    {
        let fs = fatfs::FileSystem::new(&mut cur, fatfs::FsOptions::new()).unwrap();
        for (name, data) in [
            ("kernel8.img", &b"kernel v2"[..]),
            ("config.txt", b"arm_64bit=1\n"),
            (
                "cmdline.txt",
                b"console=ttyAMA0 root=PARTUUID=00000000-0000-0000-0000-000000000000\n",
            ),
        ] {
            fs.root_dir().create_file(name).unwrap().write_all(data).unwrap();
        }
        fs.unmount().unwrap();
    }
    cur.into_inner()
}

/// A release for tests.
pub fn release(version: &str) -> crate::release::Release {
    crate::release::Release {
        name: "metrica-test".into(),
        version: version.parse().unwrap(),
        compatible: "metrica-test".into(),
        build_epoch: 1,
        security_epoch: 0,
    }
}

/// A test CA and a server configuration with a certificate for `127.0.0.1` signed by it:
/// the CA's certificate (PEM, for a CA bundle) and the server's TLS configuration.
pub(crate) fn test_tls() -> (String, std::sync::Arc<rustls::ServerConfig>) {
    test_tls_for("127.0.0.1", false)
}

/// Like [`test_tls`], with a server certificate for `name` (an IP address or a DNS name),
/// expired since 2020 when `expired`.
pub(crate) fn test_tls_for(
    name: &str,
    expired: bool,
) -> (String, std::sync::Arc<rustls::ServerConfig>) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "metrica test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
    if expired {
        params.not_before = rcgen::date_time_ymd(2019, 1, 1);
        params.not_after = rcgen::date_time_ymd(2020, 1, 1);
    }
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let der = rustls_pki_types::PrivatePkcs8KeyDer::from(key.serialize_der());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], der.into())
        .unwrap();
    (ca.pem(), std::sync::Arc::new(config))
}
