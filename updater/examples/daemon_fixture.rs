//! Lays out what bench/daemon.sh runs `updater run` against, in the folder given:
//!
//! - `www/channels/stable.toml` and `.sig`: a signed channel offering the version the device
//!   already runs (so every poll decides "stay: up to date", the idle case);
//! - `keyring/bench.pub.pem`: the key that signed it;
//! - `root/etc/metrica/release.toml` and `root/etc/machine-id`: the running system;
//! - `data/metrica/state.json`: the updater state (slot a committed, 1.0.0);
//! - `disk.img`: a sparse 64 MiB file standing in for the disk (no partition table: the
//!   status shows an autoboot error, nothing the idle loop needs).
//!
//! Usage: `cargo run --release -p updater --example daemon_fixture -- DIR`

use std::collections::BTreeMap;
use updater::channel::{Channel, OsTarget, Rollout, Timestamp, CHANNEL_FORMAT};
use updater::layout::Slot;
use updater::release::Release;
use updater::state::State;

fn main() -> anyhow::Result<()> {
    let dir = std::path::PathBuf::from(
        std::env::args().nth(1).ok_or_else(|| anyhow::anyhow!("usage: daemon_fixture DIR"))?,
    );
    let now = updater::slot::unix_now();
    let key = ed25519_dalek::SigningKey::from_bytes(&[42u8; 32]);
    let version: semver::Version = "1.0.0".parse()?;
    let channel = Channel {
        format: CHANNEL_FORMAT,
        name: "stable".into(),
        sequence: 1,
        published: Timestamp(now - 60),
        expires: Timestamp(now + 30 * 86_400),
        paused: false,
        os: OsTarget {
            compatible: "metrica-bench".into(),
            version: version.clone(),
            urls: vec!["../bundles/metrica-bench-1.0.0.mfb".into()],
            size: 100 << 20,
            sha256: "ab".repeat(32),
            security_epoch: 0,
            rollout: Rollout::everyone(),
        },
        pin: None,
        roles: BTreeMap::new(),
        devices: BTreeMap::new(),
    };
    let (doc, sig) = channel.sign(&key);
    let www = dir.join("www/channels");
    std::fs::create_dir_all(&www)?;
    std::fs::write(www.join("stable.toml"), doc)?;
    std::fs::write(www.join("stable.toml.sig"), sig)?;
    std::fs::create_dir_all(dir.join("keyring"))?;
    std::fs::write(
        dir.join("keyring/bench.pub.pem"),
        updater::sign::public_key_to_pem(&key.verifying_key()),
    )?;
    let etc = dir.join("root/etc/metrica");
    std::fs::create_dir_all(&etc)?;
    let release = Release {
        name: "metrica-bench".into(),
        version: version.clone(),
        compatible: "metrica-bench".into(),
        build_epoch: now - 86_400,
        security_epoch: 0,
    };
    std::fs::write(etc.join("release.toml"), toml::to_string(&release)?)?;
    std::fs::write(dir.join("root/etc/machine-id"), "bench-device\n")?;
    std::fs::create_dir_all(dir.join("root/proc"))?;
    std::fs::write(dir.join("root/proc/cmdline"), "metrica.boot_partition=2 metrica.tryboot=0\n")?;
    let data = dir.join("data/metrica");
    std::fs::create_dir_all(&data)?;
    updater::state::save(
        &updater::state::state_path(&dir.join("data")),
        &State::new(Slot::A, Some(version)),
    )?;
    std::fs::File::create(dir.join("disk.img"))?.set_len(64 << 20)?;
    println!("{}", dir.display());
    Ok(())
}
