//! Metrica Fleet OS imager: recipes to reproducible A/B disk images, bundles and keys.
//!
//! Pure logic (recipe checks, layout math, bmap ranges) sits beside the I/O that uses it;
//! external tools are only e2fsprogs (`mke2fs`, `debugfs`), `dpkg-deb` and, for a bootstrapped
//! base, `mmdebstrap`.

pub mod bmap;
pub mod bootstrap;
pub mod build;
pub mod bundle;
pub mod cli;
pub mod cmd;
pub mod ext4;
pub mod fat;
pub mod flash;
pub mod image;
pub mod initramfs;
pub mod inspect;
pub mod keys;
pub mod logger;
pub mod output;
pub mod packages;
pub mod progress;
pub mod provision;
pub mod publish;
pub mod recipe;
pub mod recipient;
pub mod role;
pub mod rootfs;
pub mod target;
