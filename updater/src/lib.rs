//! Metrica Fleet OS updater: the device side, and the on-device formats the imager writes.
//!
//! Modules are named after the concepts of docs/design.md.

pub mod acceptance;
pub mod autoboot;
pub mod bootinfo;
pub mod bundle;
pub mod channel;
pub mod cli;
pub mod cli_error;
pub mod cmdline;
pub mod connectivity;
pub mod daemon;
pub mod daemon_record;
pub mod disk;
pub mod durable;
// The power-cut failpoints: public only where they can be armed (docs/design.md, "Failpoints").
#[cfg(any(test, feature = "failpoints"))]
pub mod failpoint;
#[cfg(not(any(test, feature = "failpoints")))]
mod failpoint;
pub mod firstboot;
pub mod health;
pub mod history;
pub mod http;
pub mod install;
pub mod layout;
pub mod log;
pub mod metrics;
// Checks of overlays/pi, the systemd units that run the updater on the Pi root.
#[cfg(test)]
mod pi_overlay_tests;
pub mod provision;
pub mod reboot;
pub mod release;
pub mod role;
pub mod role_cli;
pub mod role_report;
pub mod rollout;
pub mod sdnotify;
pub mod serve;
pub mod sign;
pub mod slot;
pub mod state;
pub mod status;
#[cfg(any(test, feature = "testkit"))]
pub mod testserver;
#[cfg(test)]
pub(crate) mod testutil;
pub mod units;
pub mod watchdog;
