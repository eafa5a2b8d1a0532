//! The device root the updater's process tests run against (`--sysroot`): a keyring with
//! one test key, /proc/cmdline of a plain boot from slot A, a machine id, release.toml, a
//! state with slot A committed at 1.0.0, and a small disk image.

use std::path::Path;

pub fn fixture(dir: &Path) {
    let key = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]);
    std::fs::create_dir_all(dir.join("keyring")).unwrap();
    std::fs::write(
        dir.join("keyring/test.pub.pem"),
        updater::sign::public_key_to_pem(&key.verifying_key()),
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("root/etc/metrica")).unwrap();
    std::fs::create_dir_all(dir.join("root/proc")).unwrap();
    std::fs::write(dir.join("root/proc/cmdline"), "metrica.boot_partition=2 metrica.tryboot=0\n")
        .unwrap();
    std::fs::write(dir.join("root/etc/machine-id"), "proc-test\n").unwrap();
    std::fs::write(
        dir.join("root/etc/metrica/release.toml"),
        "name = \"m\"\nversion = \"1.0.0\"\ncompatible = \"c\"\nbuild_epoch = 1\n",
    )
    .unwrap();
    let state =
        updater::state::State::new(updater::layout::Slot::A, Some("1.0.0".parse().unwrap()));
    updater::state::save(&updater::state::state_path(&dir.join("data")), &state).unwrap();
    std::fs::File::create(dir.join("disk.img")).unwrap().set_len(1 << 20).unwrap();
}
