//! Rebooting, plainly or into a trial (`reboot "0 tryboot"`), behind a small trait so that
//! tests use a fake.
//!
//! With systemd as PID 1 the updater asks it (`systemctl reboot --reboot-argument="0 tryboot"`),
//! so services stop cleanly. Otherwise (the QEMU initramfs, busybox init) it syncs and calls the reboot syscall
//! itself: `LINUX_REBOOT_CMD_RESTART2` with the argument `0 tryboot`, which the Pi firmware
//! driver turns into the one-shot tryboot flag and the QEMU harness reads on the console.

use anyhow::{bail, Context, Result};
use std::cell::RefCell;
use std::path::Path;

/// How to reboot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebootMode {
    /// The firmware boots the committed slot.
    Plain,
    /// The firmware boots the `[tryboot]` slot once.
    Tryboot,
}

impl RebootMode {
    pub fn describe(self) -> &'static str {
        match self {
            RebootMode::Plain => "plain",
            RebootMode::Tryboot => "tryboot",
        }
    }
}

/// Something that reboots the machine. It returns only when the reboot could not start.
pub trait Reboot {
    fn reboot(&self, mode: RebootMode) -> Result<()>;
}

/// The real thing: systemd when it runs, the syscall otherwise.
#[derive(Debug, Default)]
pub struct SystemReboot;

/// The argument the firmware driver understands as "tryboot next".
pub const TRYBOOT_ARG: &str = "0 tryboot";

impl Reboot for SystemReboot {
    fn reboot(&self, mode: RebootMode) -> Result<()> {
        nix::unistd::sync();
        if Path::new("/run/systemd/system").exists() {
            let out = std::process::Command::new("systemctl")
                .args(systemctl_args(mode))
                .output()
                .context("running systemctl reboot")?;
            if !out.status.success() {
                bail!(
                    "systemctl reboot failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            return Ok(());
        }
        match mode {
            RebootMode::Plain => {
                nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT)
                    .context("reboot syscall")?;
                Ok(())
            }
            RebootMode::Tryboot => restart2(TRYBOOT_ARG),
        }
    }
}

/// The `systemctl` arguments of a reboot. The argument for the firmware goes in
/// `--reboot-argument=` (systemd 246 and later): trixie's systemd 257 refuses the older
/// positional form (`systemctl reboot "0 tryboot"`: "Too many arguments", seen under QEMU).
fn systemctl_args(mode: RebootMode) -> Vec<String> {
    let mut args = vec!["reboot".to_string()];
    if mode == RebootMode::Tryboot {
        args.push(format!("--reboot-argument={TRYBOOT_ARG}"));
    }
    args
}

/// `reboot(LINUX_REBOOT_CMD_RESTART2, arg)`: nix has no safe wrapper for the argument form.
fn restart2(arg: &str) -> Result<()> {
    let arg = std::ffi::CString::new(arg).context("reboot argument")?;
    // SAFETY: the reboot syscall with the two magic numbers and RESTART2 reads one
    // NUL-terminated string from the pointer; `arg` is a valid CString that outlives the call.
    // It either does not return (the machine restarts) or returns -1 with errno set.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::syscall(
            libc::SYS_reboot,
            libc::LINUX_REBOOT_MAGIC1,
            libc::LINUX_REBOOT_MAGIC2,
            libc::LINUX_REBOOT_CMD_RESTART2,
            arg.as_ptr(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("reboot syscall (RESTART2)");
    }
    Ok(())
}

/// A reboot that only records what was asked: for tests, and for `--disk` image files on a
/// host, where rebooting the host would be wrong.
#[derive(Debug, Default)]
pub struct RecordReboot {
    pub requested: RefCell<Vec<RebootMode>>,
}

impl Reboot for RecordReboot {
    fn reboot(&self, mode: RebootMode) -> Result<()> {
        self.requested.borrow_mut().push(mode);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fake_records_requests() {
        let r = RecordReboot::default();
        r.reboot(RebootMode::Tryboot).unwrap();
        r.reboot(RebootMode::Plain).unwrap();
        assert_eq!(*r.requested.borrow(), [RebootMode::Tryboot, RebootMode::Plain]);
        assert_eq!(RebootMode::Tryboot.describe(), "tryboot");
        assert_eq!(TRYBOOT_ARG, "0 tryboot");
        assert_eq!(systemctl_args(RebootMode::Plain), ["reboot"]);
        assert_eq!(
            systemctl_args(RebootMode::Tryboot),
            ["reboot", "--reboot-argument=0 tryboot"],
            "one argument: systemd 257 refuses a positional one"
        );
    }
}
