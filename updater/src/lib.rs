//! Metrica Fleet OS updater: the device side, and the on-device formats the imager writes.
//!
//! Modules are named after the concepts of docs/design.md.

pub mod autoboot;
pub mod bootinfo;
pub mod bundle;
pub mod channel;
pub mod cli;
pub mod cmdline;
pub mod daemon;
pub mod disk;
pub mod durable;
pub mod failpoint;
pub mod firstboot;
pub mod health;
pub mod history;
pub mod http;
pub mod install;
pub mod layout;
pub mod metrics;
pub mod provision;
pub mod reboot;
pub mod release;
pub mod rollout;
pub mod serve;
pub mod sign;
pub mod slot;
pub mod state;
#[cfg(test)]
pub(crate) mod testutil;
pub mod watchdog;
