//! Why a boot ended and what the firmware does next: console-line classification, the reset
//! reason, and the one-shot tryboot flag. Pure.
//!
//! From the Raspberry Pi documentation (TRYBOOT boot flow, autoboot.adoc): `reboot "0 tryboot"`
//! sets a one-shot flag; the firmware clears it before it starts the OS, so the next boot alone
//! is a trial and any later reset (plain reboot, watchdog, panic, power cut) boots the
//! committed partition again. `reboot "N"` asks for partition N once; 0 means the default.

use crate::firmware::BootRequest;
use std::fmt;

/// A console line that matters to the firmware model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleEvent {
    /// `reboot: Restarting system`, with the command given to reboot(2) if any.
    Restart(Option<String>),
    /// `reboot: Power down`.
    PowerDown,
    /// `reboot: System halted`: the machine stops and never resets.
    Halt,
    /// `Kernel panic - not syncing: ...`.
    Panic,
}

/// Classifies one console line (kernel timestamps and prefixes are ignored).
pub fn classify(line: &str) -> Option<ConsoleEvent> {
    const RESTART_WITH: &str = "reboot: Restarting system with command '";
    if let Some(at) = line.find(RESTART_WITH) {
        let rest = &line[at + RESTART_WITH.len()..];
        let command = rest.rfind('\'').map_or(rest, |end| &rest[..end]);
        return Some(ConsoleEvent::Restart(Some(command.to_string())));
    }
    if line.contains("reboot: Restarting system") {
        return Some(ConsoleEvent::Restart(None));
    }
    if line.contains("reboot: Power down") {
        return Some(ConsoleEvent::PowerDown);
    }
    if line.contains("reboot: System halted") {
        return Some(ConsoleEvent::Halt);
    }
    if line.contains("Kernel panic - not syncing") {
        return Some(ConsoleEvent::Panic);
    }
    None
}

/// Why a boot ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResetReason {
    /// The guest restarted, with the reboot command if one was printed.
    Restart(Option<String>),
    /// The i6300esb watchdog fired (QMP `WATCHDOG`).
    Watchdog,
    /// A kernel panic, followed by a reset (`panic=N`).
    Panic,
    /// A guest reset with no console line and no watchdog event.
    UnexplainedReset,
    /// The harness killed QEMU with SIGKILL on purpose.
    PowerCut,
    /// The guest powered off: the run ends.
    PowerOff,
    /// The guest halted: the run ends.
    Halt,
}

impl fmt::Display for ResetReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResetReason::Restart(Some(cmd)) => write!(f, "reboot '{cmd}'"),
            ResetReason::Restart(None) => f.write_str("reboot"),
            ResetReason::Watchdog => f.write_str("watchdog reset"),
            ResetReason::Panic => f.write_str("kernel panic"),
            ResetReason::UnexplainedReset => f.write_str("reset (no reason on the console)"),
            ResetReason::PowerCut => f.write_str("power cut"),
            ResetReason::PowerOff => f.write_str("power off"),
            ResetReason::Halt => f.write_str("halt"),
        }
    }
}

/// What QEMU and the console said about the end of a boot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndSignals {
    /// The last restart, power-down or halt line, and whether a panic line was seen.
    pub console: Option<ConsoleEvent>,
    pub panicked: bool,
    /// QMP `WATCHDOG` event seen.
    pub watchdog: bool,
    /// QMP `SHUTDOWN` reason (`guest-reset`, `guest-shutdown`, ...).
    pub shutdown: Option<String>,
    /// The harness killed QEMU to cut the power.
    pub power_cut: bool,
}

/// Decides the reset reason. `None` when nothing explains the end (a harness error).
pub fn reason(signals: &EndSignals) -> Option<ResetReason> {
    if signals.power_cut {
        return Some(ResetReason::PowerCut);
    }
    if signals.watchdog {
        return Some(ResetReason::Watchdog);
    }
    if signals.panicked {
        return Some(ResetReason::Panic);
    }
    match (&signals.console, signals.shutdown.as_deref()) {
        (Some(ConsoleEvent::Restart(cmd)), _) => Some(ResetReason::Restart(cmd.clone())),
        (Some(ConsoleEvent::PowerDown), _) | (_, Some("guest-shutdown")) => {
            Some(ResetReason::PowerOff)
        }
        (Some(ConsoleEvent::Halt), _) => Some(ResetReason::Halt),
        (_, Some("guest-reset")) => Some(ResetReason::UnexplainedReset),
        _ => None,
    }
}

/// A reboot command as the Pi firmware takes it: `[PARTITION] [tryboot]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RebootCommand {
    pub partition: u32,
    pub tryboot: bool,
}

/// Parses a reboot command. The partition (0-63) must come first, as the documentation says
/// ("it must be specified if extra arguments are added"); `tryboot` is the only extra word.
pub fn parse_reboot_command(command: &str) -> Result<RebootCommand, String> {
    let words: Vec<&str> = command.split_whitespace().collect();
    let partition = match words.first() {
        None => return Ok(RebootCommand { partition: 0, tryboot: false }),
        Some(w) => w.parse::<u32>().ok().filter(|n| *n <= 63).ok_or_else(|| {
            format!("reboot command {command:?} does not start with a partition number (0-63)")
        })?,
    };
    match &words[1..] {
        [] => Ok(RebootCommand { partition, tryboot: false }),
        ["tryboot"] => Ok(RebootCommand { partition, tryboot: true }),
        _ => Err(format!("reboot command {command:?}: only \"tryboot\" may follow the partition")),
    }
}

/// What comes after a boot ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Boot again with this request; `warning` when a reboot command was not understood.
    Boot { request: BootRequest, warning: Option<String> },
    /// The run is over (power off, halt).
    Stop,
}

/// The one-shot flag: only a restart that asks for it makes the next boot a trial; every other
/// end of a boot clears it.
pub fn next_boot(reason: &ResetReason) -> Next {
    let plain = Next::Boot { request: BootRequest::POWER_ON, warning: None };
    match reason {
        ResetReason::PowerOff | ResetReason::Halt => Next::Stop,
        ResetReason::Restart(Some(command)) => match parse_reboot_command(command) {
            Ok(cmd) => Next::Boot {
                request: BootRequest { partition: cmd.partition, tryboot: cmd.tryboot },
                warning: None,
            },
            Err(e) => Next::Boot {
                request: BootRequest::POWER_ON,
                warning: Some(format!("{e}; treated as a plain reboot")),
            },
        },
        ResetReason::Restart(None)
        | ResetReason::Watchdog
        | ResetReason::Panic
        | ResetReason::UnexplainedReset
        | ResetReason::PowerCut => plain,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_kernel_lines() {
        let cases = [
            (
                "[    1.439464] reboot: Restarting system with command '0 tryboot'",
                Some(ConsoleEvent::Restart(Some("0 tryboot".into()))),
            ),
            (
                "reboot: Restarting system with command ''",
                Some(ConsoleEvent::Restart(Some("".into()))),
            ),
            ("[   12.1] reboot: Restarting system", Some(ConsoleEvent::Restart(None))),
            ("reboot: Power down", Some(ConsoleEvent::PowerDown)),
            ("[    3.2] reboot: System halted", Some(ConsoleEvent::Halt)),
            (
                "[    2.0] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100",
                Some(ConsoleEvent::Panic),
            ),
            ("fixture: userspace up partition=2 tryboot=0", None),
            ("echo reboot", None),
            ("", None),
        ];
        for (line, expected) in cases {
            assert_eq!(classify(line), expected, "{line}");
        }
    }

    #[test]
    fn restart_command_keeps_inner_quotes() {
        assert_eq!(
            classify("reboot: Restarting system with command 'it's'"),
            Some(ConsoleEvent::Restart(Some("it's".into())))
        );
        // A line cut short (no closing quote) still gives the command seen.
        assert_eq!(
            classify("reboot: Restarting system with command '0 tryb"),
            Some(ConsoleEvent::Restart(Some("0 tryb".into())))
        );
    }

    fn signals() -> EndSignals {
        EndSignals::default()
    }

    #[test]
    fn reason_precedence() {
        let tryboot = Some(ConsoleEvent::Restart(Some("0 tryboot".into())));
        let reset = Some("guest-reset".to_string());
        let cases = [
            (
                EndSignals { console: tryboot.clone(), shutdown: reset.clone(), ..signals() },
                Some(ResetReason::Restart(Some("0 tryboot".into()))),
            ),
            (
                EndSignals {
                    console: Some(ConsoleEvent::Restart(None)),
                    shutdown: reset.clone(),
                    ..signals()
                },
                Some(ResetReason::Restart(None)),
            ),
            (
                EndSignals { watchdog: true, shutdown: reset.clone(), ..signals() },
                Some(ResetReason::Watchdog),
            ),
            // A watchdog reset that happens after a reboot line was printed is still a watchdog reset.
            (
                EndSignals { watchdog: true, console: tryboot, ..signals() },
                Some(ResetReason::Watchdog),
            ),
            (
                EndSignals { panicked: true, shutdown: reset.clone(), ..signals() },
                Some(ResetReason::Panic),
            ),
            (
                EndSignals { power_cut: true, watchdog: true, ..signals() },
                Some(ResetReason::PowerCut),
            ),
            (
                EndSignals { console: Some(ConsoleEvent::PowerDown), ..signals() },
                Some(ResetReason::PowerOff),
            ),
            (
                EndSignals { shutdown: Some("guest-shutdown".into()), ..signals() },
                Some(ResetReason::PowerOff),
            ),
            (
                EndSignals { console: Some(ConsoleEvent::Halt), ..signals() },
                Some(ResetReason::Halt),
            ),
            (EndSignals { shutdown: reset, ..signals() }, Some(ResetReason::UnexplainedReset)),
            (signals(), None),
            (EndSignals { shutdown: Some("host-signal".into()), ..signals() }, None),
        ];
        for (input, expected) in cases {
            assert_eq!(reason(&input), expected, "{input:?}");
        }
    }

    #[test]
    fn reboot_commands() {
        let ok = |p, t| Ok(RebootCommand { partition: p, tryboot: t });
        assert_eq!(parse_reboot_command("0 tryboot"), ok(0, true));
        assert_eq!(parse_reboot_command("3 tryboot"), ok(3, true));
        assert_eq!(parse_reboot_command("3"), ok(3, false));
        assert_eq!(parse_reboot_command(""), ok(0, false));
        assert_eq!(parse_reboot_command("  2  "), ok(2, false));
        for bad in ["tryboot", "64", "-1", "0 tryboot now", "two", "0 TRYBOOT"] {
            assert!(parse_reboot_command(bad).is_err(), "{bad}");
        }
    }

    fn boot(partition: u32, tryboot: bool) -> Next {
        Next::Boot { request: BootRequest { partition, tryboot }, warning: None }
    }

    #[test]
    fn only_a_tryboot_restart_sets_the_flag() {
        assert_eq!(next_boot(&ResetReason::Restart(Some("0 tryboot".into()))), boot(0, true));
        assert_eq!(next_boot(&ResetReason::Restart(Some("3".into()))), boot(3, false));
        for cleared in [
            ResetReason::Restart(None),
            ResetReason::Restart(Some("".into())),
            ResetReason::Watchdog,
            ResetReason::Panic,
            ResetReason::UnexplainedReset,
            ResetReason::PowerCut,
        ] {
            assert_eq!(next_boot(&cleared), boot(0, false), "{cleared}");
        }
        assert_eq!(next_boot(&ResetReason::PowerOff), Next::Stop);
        assert_eq!(next_boot(&ResetReason::Halt), Next::Stop);
    }

    #[test]
    fn a_bad_reboot_command_is_a_plain_reboot_with_a_warning() {
        match next_boot(&ResetReason::Restart(Some("tryboot".into()))) {
            Next::Boot { request, warning: Some(w) } => {
                assert_eq!(request, BootRequest::POWER_ON);
                assert!(w.contains("treated as a plain reboot"), "{w}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_flag_lasts_one_boot() {
        // Walk a sequence of resets: tryboot, then any reset clears it, then tryboot again.
        let resets = [
            (ResetReason::Restart(Some("0 tryboot".into())), true),
            (ResetReason::Watchdog, false),
            (ResetReason::Restart(Some("0 tryboot".into())), true),
            (ResetReason::Panic, false),
            (ResetReason::Restart(Some("0 tryboot".into())), true),
            (ResetReason::PowerCut, false),
        ];
        for (reason, trial) in resets {
            match next_boot(&reason) {
                Next::Boot { request, .. } => assert_eq!(request.tryboot, trial, "{reason}"),
                Next::Stop => panic!("stopped"),
            }
        }
    }

    #[test]
    fn display() {
        assert_eq!(
            ResetReason::Restart(Some("0 tryboot".into())).to_string(),
            "reboot '0 tryboot'"
        );
        assert_eq!(ResetReason::Watchdog.to_string(), "watchdog reset");
    }
}
