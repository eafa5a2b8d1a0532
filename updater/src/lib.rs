//! Metrica Fleet OS updater: the device side, and the on-device formats the imager writes.
//!
//! Modules are named after the concepts of docs/design.md.

pub mod autoboot;
pub mod cli;
pub mod cmdline;
pub mod disk;
pub mod layout;
pub mod release;
