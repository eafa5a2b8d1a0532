//! Writes the seed corpora of the fuzz targets made by the product's own writers into
//! `DIR/TARGET/` (replacing the files it names): small, valid inputs of each shape a device
//! reads, framed the way each target splits its input (`metrica_fuzz::join2`,
//! `frame_files`). Seeds taken from repository files (role.toml, recipes, a bmap made by
//! bmaptool) are copied by fuzz/make-corpus.sh.

use metrica_fuzz::{frame_files, join2, seed_identity, seed_key};
use std::path::{Path, PathBuf};
use updater::autoboot::Autoboot;
use updater::bundle::testkit::{make_bundle, make_bundle_with, test_image, TestMeta};
use updater::bundle::{SlotClass, CHUNKING};
use updater::channel::Channel;
use updater::layout::Slot;
use updater::provision::{secrets, AUTHORIZED_KEYS, DEVICE_TOML, SECRETS_AGE, WIFI_TOML};
use updater::sign::SignatureFile;

type Seeds = Vec<(&'static str, Vec<u8>)>;

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).expect("usage: make-corpus DIR"));
    let targets: [(&str, Seeds); 7] = [
        ("bundle_reader", bundles()),
        ("channel", channels()),
        ("signature", signatures()),
        ("provision", provisioning()),
        ("boot_config", boot_configs()),
        ("http_response", http_responses()),
        ("role_bundle", role_bundles()),
    ];
    for (target, seeds) in targets {
        write(&dir.join(target), seeds)?;
    }
    Ok(())
}

fn write(dir: &Path, seeds: Seeds) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (name, bytes) in seeds {
        std::fs::write(dir.join(name), &bytes)?;
        println!("{}/{name}: {} bytes", dir.display(), bytes.len());
    }
    Ok(())
}

fn bundles() -> Seeds {
    let key = seed_key();
    let meta = TestMeta::default();
    let boot = test_image(20_000, 1);
    let root = test_image(90_000, 2);
    let zeros = vec![0u8; CHUNKING.max as usize];
    vec![
        (
            "boot-root.mfb",
            make_bundle(&meta, &[(SlotClass::Boot, &boot), (SlotClass::Root, &root)], Some(&key)),
        ),
        ("root-only.mfb", make_bundle(&meta, &[(SlotClass::Root, &boot)], Some(&key))),
        ("unsigned.mfb", make_bundle(&meta, &[(SlotClass::Root, &boot)], None)),
        // One 4 MiB chunk of zeros: the reader's zero-chunk path.
        (
            "zero-chunk.mfb",
            make_bundle_with(&meta, &[(SlotClass::Root, &zeros)], Some(&key), CHUNKING),
        ),
    ]
}

/// A channel document with every optional table (docs/channels.md), valid at
/// `metrica_fuzz::NOW`.
const CHANNEL: &str = r#"format = 1
name = "stable"
sequence = 42
published = 2026-11-24T08:00:00Z
expires = 2026-12-01T08:00:00Z
paused = false

[os]
compatible = "metrica-rpi4-arm64"
version = "2.0.0"
urls = ["../bundles/pi-2.0.0.mfb", "https://mirror.example.net/fleet/bundles/pi-2.0.0.mfb"]
size = 412345678
sha256 = "5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e"
security_epoch = 1

[os.rollout]
percent = 0
segments = ["canary", "early", "general"]
not_before = 2026-11-24T09:00:00Z
waves = [
  { at = 2026-11-24T09:00:00Z, percent = 1 },
  { at = 2026-11-25T09:00:00+01:00, percent = 100 },
]

[pin]
version = "1.9.3"
reason = "camera driver regression in 2.0.0"
expires = 2026-11-26T00:00:00Z
compatible = "metrica-rpi4-arm64"
urls = ["/fleet/bundles/pi-1.9.3.mfb"]
size = 401234567
sha256 = "a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5"
security_epoch = 1

[devices."pi-camera-042"]
version_lock = "1.9.3"
auto_update = false
channel = "beta"
reason = "demo at the trade fair"

[roles.camera-single]
version = "3.1.0"
urls = ["../roles/camera-single/3.1.0.mfr"]
size = 12345
sha256 = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
[roles.camera-single.rollout]
percent = 100
"#;

/// A channel document without the optional tables.
const CHANNEL_MIN: &str = r#"format = 1
name = "stable"
sequence = 6
published = 2026-11-24T08:00:00Z
expires = 2026-12-01T08:00:00Z

[os]
compatible = "metrica-qemu-arm64"
version = "1.2.0"
urls = ["../bundles/qemu-1.2.0.mfb"]
size = 1
sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
security_epoch = 0

[os.rollout]
percent = 10
"#;

fn signed(doc: &str) -> Vec<u8> {
    Channel::parse(doc.as_bytes()).expect("the seed channel document is valid");
    let sig = SignatureFile::sign(&seed_key(), doc.as_bytes()).to_bytes();
    join2(doc.as_bytes(), &sig)
}

/// Role bundles signed by the seed key: the repository's safe-mode role, and a small role
/// carrying an image archive.
fn role_bundles() -> Seeds {
    use updater::role::bundle::testkit::{make_role_bundle, write_role};
    let tmp = std::env::temp_dir().join(format!("metrica-fuzz-seeds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).expect("creating a temporary folder");
    let safe_mode = Path::new(env!("CARGO_MANIFEST_DIR")).join("../roles/safe-mode");
    let safe = make_role_bundle(&safe_mode, &[], &seed_key(), &tmp);
    let small = tmp.join("small");
    write_role(&small, "small", "1.0.0");
    let image = tmp.join("app.tar");
    std::fs::write(&image, b"metrica.invalid/app:1\n").expect("writing the image archive");
    let with_image = make_role_bundle(&small, &[image], &seed_key(), &tmp);
    let read = |p: &Path| std::fs::read(p).expect("reading a seed bundle");
    let seeds = vec![("safe-mode.mfr", read(&safe)), ("small-with-image.mfr", read(&with_image))];
    let _ = std::fs::remove_dir_all(&tmp);
    seeds
}

fn channels() -> Seeds {
    vec![
        ("full.bin", signed(CHANNEL)),
        ("minimal.bin", signed(CHANNEL_MIN)),
        ("unsigned.bin", join2(CHANNEL_MIN.as_bytes(), b"")),
    ]
}

fn signatures() -> Seeds {
    let key = seed_key();
    vec![
        ("good.sig", SignatureFile::sign(&key, b"metrica fuzz message\n").to_bytes()),
        ("other-message.sig", SignatureFile::sign(&key, b"another message").to_bytes()),
    ]
}

const DEVICE: &str = r#"device_id = "pi-0042"
role = "camera-single"
segment = "canary"
hostname = "cam-0042"
timezone = "Europe/Berlin"

[channel]
name = "stable"
url = "https://updates.example.com/fleet"
mirrors = ["https://mirror.example.net/fleet"]
ca_bundle = "ca.pem"

[update]
interval = "10m"
maintenance_window = "22:30-02:00"

[overrides]
version_lock = "1.4.2"
auto_update = false
channel = "beta"
"#;

const WIFI: &str = r#"country = "DE"
[[network]]
ssid = "Shop floor"
psk_secret = "wifi_shop"
priority = 2
[[network]]
ssid = "Guest"
security = "open"
hidden = true
"#;

const KEYS: &str = "# ops\nssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHJ0b3G9xq1P2W5Cxw3Y5CwG9ywJvn6dzQp2oOSs4mFr ops@example\n";

const SECRETS: &str = "wifi_shop = \"correct horse battery\"\n";

/// The first byte selects the parser (`metrica_fuzz::provisioning`).
fn kind(k: u8, bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![k];
    out.extend_from_slice(bytes);
    out
}

fn provisioning() -> Seeds {
    // age encryption is randomized: this seed differs at each run of the script.
    let sec = secrets::encrypt(SECRETS.as_bytes(), &[seed_identity().to_public()])
        .expect("the seed secrets encrypt");
    let set = frame_files(&[
        (DEVICE_TOML, DEVICE.as_bytes()),
        (WIFI_TOML, WIFI.as_bytes()),
        (AUTHORIZED_KEYS, KEYS.as_bytes()),
        (SECRETS_AGE, &sec),
    ]);
    vec![
        ("device.toml", kind(0, DEVICE.as_bytes())),
        ("wifi.toml", kind(1, WIFI.as_bytes())),
        ("authorized_keys", kind(2, KEYS.as_bytes())),
        ("secrets.age", kind(3, &sec)),
        ("secrets.plain", kind(4, SECRETS.as_bytes())),
        ("set.bin", kind(5, &set)),
    ]
}

fn boot_configs() -> Seeds {
    let cmdline = b"console=serial0,115200 console=tty1 root=PARTUUID=5e5e5e5e-0000-4000-8000-000000000002 rootfstype=ext4 fsck.repair=yes rootwait quiet\n";
    vec![
        ("committed-a.bin", join2(&Autoboot::committed(Slot::A).render(), cmdline)),
        (
            "committed-b.bin",
            join2(&Autoboot::committed(Slot::B).render(), b"console=ttyAMA0 quiet"),
        ),
    ]
}

/// Four bytes of the offset asked for, then the response as the server sends it.
fn response(offset: u32, text: &str) -> Vec<u8> {
    let mut out = offset.to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out
}

fn http_responses() -> Seeds {
    vec![
        (
            "206.http",
            response(
                4,
                "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 4-9/10\r\nContent-Length: 6\r\n\r\n456789",
            ),
        ),
        (
            "200.http",
            response(
                0,
                "HTTP/1.1 200 OK\r\nContent-Type: application/toml\r\nETag: \"5e\"\r\nLast-Modified: Tue, 24 Nov 2026 08:00:00 GMT\r\nContent-Length: 13\r\n\r\nsequence = 1\n",
            ),
        ),
        (
            "chunked.http",
            response(
                0,
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n5\r\na = 1\r\n0\r\n\r\n",
            ),
        ),
        (
            "portal.http",
            response(0, "HTTP/1.0 200 OK\r\nContent-Type: text/html\r\n\r\n<html>login</html>"),
        ),
        (
            "416.http",
            response(10, "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */10\r\n\r\n"),
        ),
        ("304.http", response(0, "HTTP/1.1 304 Not Modified\r\nETag: \"5e\"\r\n\r\n")),
    ]
}
