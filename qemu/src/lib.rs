//! Raspberry Pi firmware emulator and QEMU aarch64 harness (see issue 5).
//!
//! The model of the firmware is written from the Raspberry Pi documentation and shares no
//! code with the updater: a test oracle must not reuse the code it checks.
