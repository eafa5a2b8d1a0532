//! Raspberry Pi firmware emulator and QEMU aarch64 harness for Metrica Fleet OS (issue 5).
//!
//! `pi-qemu` takes a disk image and behaves like the Raspberry Pi bootloader: it reads
//! `autoboot.txt` from partition 1, keeps the one-shot tryboot flag, walks partitions when
//! `autoboot.txt` is unusable, loads the kernel, initramfs and `cmdline.txt` from the chosen FAT
//! partition, and runs `qemu-system-aarch64` with `-no-reboot` so that every guest reset comes
//! back to it. See docs/qemu.md.
//!
//! The model of the firmware ([`autoboot`], [`firmware`], [`reset`]) is written from the
//! Raspberry Pi documentation and shares no code with the updater: a test oracle must not
//! reuse the code it checks. Those modules are pure; I/O lives in [`disk`] (GPT and FAT
//! reading), [`qmp`], and [`harness`] (processes, threads, timeouts).

pub mod autoboot;
pub mod cli;
pub mod cut;
pub mod disk;
pub mod driver;
pub mod firmware;
pub mod fixtures;
pub mod flows;
pub mod harness;
pub mod machine;
pub mod pi_image;
pub mod provisioning;
pub mod qmp;
pub mod reset;
pub mod scenario;
