//! Roles: the app stack a device runs in Docker Compose, updated like the OS (DESIGN.md
//! section 8, docs/roles.md).
//!
//! - [`spec`]: `role.toml`, a strict schema;
//! - [`engine`]: the boundary to the container engine; [`docker`] is the real one (the
//!   `docker` CLI with Compose v2) and [`fake`] a model for tests;
//! - [`layout`]: `/data/metrica/roles/NAME/releases/VERSION`, `current`, `previous`, state;
//! - [`limits`]: `[resources]` as a compose override file;
//! - [`health`]: health checks, probation, crash-loop detection;
//! - [`apply`]: one release applied as a chain of steps, with rollback, and recovery at start;
//! - [`safe_mode`]: when to enter and leave safe mode, and the switch of stacks;
//! - [`download`]: a role bundle fetched onto /data, resumable and verified;
//! - [`service`]: the entry point of the CLI and the daemon (lock, bundle, history, safe mode).

pub mod apply;
pub mod bundle;
pub mod docker;
pub mod download;
pub mod engine;
#[cfg(any(test, feature = "testkit"))]
pub mod fake;
pub mod health;
pub mod layout;
pub mod limits;
pub mod safe_mode;
pub mod service;
pub mod spec;
