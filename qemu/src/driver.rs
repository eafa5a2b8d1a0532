//! A [`Director`] that drives the guest through the test hook (`fixtures::HOOK`) and records
//! what each boot showed: the updater's summary, the healthy marker, `updater status --json`
//! printed by the guest, the commands it ran and their exit codes.
//!
//! A scenario gives a plan: for each boot (by its number in the run, from 1) whose hook should
//! run, the commands to type there ("session"). At each `metrica-test: ready N` the next
//! command of that boot's session is typed. A boot that reaches the hook without a session
//! fails the run (the plan expected it to end before, e.g. a faulty slot); an empty session
//! means "wait for the boot to end by itself" (a power cut, a reboot). When the last session is
//! done the run stops (success); the scenario then checks what was recorded. A command marked
//! `must_pass` that exits non-zero fails the run at once, naming the command.

use crate::harness::{Action, BootRecord, Director};
use std::collections::VecDeque;

/// The marker lines of the guest (root `/sbin/init`, the hook, the fault bundles).
pub const READY: &str = "metrica-test: ready ";
pub const END: &str = "metrica-test: end ";
pub const STATUS: &str = "metrica-test: status ";
pub const UNHEALTHY: &str = "metrica-updater: unhealthy";
pub const UPDATER: &str = "metrica: booted ";
pub const FAULT: &str = "metrica-fault: ";
pub const PANIC: &str = "Kernel panic - not syncing: ";

/// The command that prints `updater status --json` as one marked console line.
pub const STATUS_COMMAND: &str =
    "echo \"metrica-test: status $(updater status --json --history 5 | tr -d '\\n')\"";

/// One command typed at the hook's prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmd {
    pub text: String,
    pub must_pass: bool,
}

impl Cmd {
    /// A command that must exit 0.
    pub fn ok(text: impl Into<String>) -> Cmd {
        Cmd { text: text.into(), must_pass: true }
    }
    /// A command whose exit status is only recorded (it may reboot or be cut).
    pub fn any(text: impl Into<String>) -> Cmd {
        Cmd { text: text.into(), must_pass: false }
    }
    /// Prints the guest's `updater status --json` (recorded in [`Seen::statuses`]).
    pub fn status() -> Cmd {
        Cmd::any(STATUS_COMMAND)
    }
}

/// What one boot showed.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    pub index: usize,
    pub partition: u32,
    pub tryboot: bool,
    /// `metrica: booted ...` summaries of `updater boot`.
    pub updater: Vec<String>,
    /// `Some(true)` at the healthy marker, `Some(false)` at `metrica-updater: unhealthy`.
    pub healthy: Option<bool>,
    /// Milliseconds from QEMU's start to the healthy marker.
    pub healthy_ms: Option<u64>,
    pub statuses: Vec<serde_json::Value>,
    /// Commands typed in this boot, with their exit status once they ended.
    pub commands: Vec<(String, Option<i32>)>,
    /// `metrica-fault: ...` lines (printed by a fault bundle's init).
    pub faults: Vec<String>,
    /// The kernel's `Kernel panic - not syncing: ...` line, if it panicked.
    pub panic: Option<String>,
    /// The harness's reset reason, once the boot ended.
    pub reset: Option<String>,
}

impl Seen {
    pub fn last_status(&self) -> Option<&serde_json::Value> {
        self.statuses.last()
    }
}

/// Drives the hook with a plan of sessions, by boot number.
#[derive(Debug)]
pub struct Driver {
    healthy_pattern: String,
    plan: Vec<(usize, Vec<Cmd>)>,
    /// The boot whose session is running, and its commands left.
    current: Option<(usize, VecDeque<Cmd>)>,
    pending: Option<Cmd>,
    pub seen: Vec<Seen>,
    /// Sessions started so far.
    pub sessions: usize,
}

impl Driver {
    /// `plan`: (boot number, commands) pairs.
    pub fn new(healthy_pattern: &str, plan: Vec<(usize, Vec<Cmd>)>) -> Driver {
        Driver {
            healthy_pattern: healthy_pattern.to_string(),
            plan,
            current: None,
            pending: None,
            seen: Vec::new(),
            sessions: 0,
        }
    }

    fn boot(&mut self, b: &BootRecord) -> &mut Seen {
        if self.seen.last().is_none_or(|s| s.index != b.index) {
            self.seen.push(Seen {
                index: b.index,
                partition: b.partition,
                tryboot: b.tryboot,
                ..Seen::default()
            });
        }
        self.seen.last_mut().expect("pushed")
    }

    /// The last status the guest printed, in any boot.
    pub fn last_status(&self) -> Option<&serde_json::Value> {
        self.seen.iter().rev().find_map(Seen::last_status)
    }

    /// Boot-to-healthy times (ms) of every boot that reached the marker.
    pub fn healthy_times(&self) -> Vec<u64> {
        self.seen.iter().filter_map(|s| s.healthy_ms).collect()
    }
}

impl Director for Driver {
    fn on_line(&mut self, b: &BootRecord, line: &str) -> Action {
        let pattern = self.healthy_pattern.clone();
        let seen = self.boot(b);
        if line.contains(UNHEALTHY) {
            seen.healthy = Some(false);
            return Action::Continue;
        }
        if line.contains(&pattern) {
            seen.healthy = Some(true);
            // The harness records the time of the ready pattern, which scenarios set to the
            // healthy marker.
            seen.healthy_ms = b.ready_ms;
            return Action::Continue;
        }
        // The updater's JSON log lines repeat its summaries: only the plain ones count.
        if line.starts_with('{') {
            return Action::Continue;
        }
        if let Some(at) = line.find(UPDATER) {
            seen.updater.push(line[at..].to_string());
            return Action::Continue;
        }
        if let Some(at) = line.find(PANIC) {
            seen.panic = Some(line[at + PANIC.len()..].to_string());
            return Action::Continue;
        }
        if let Some(at) = line.find(FAULT) {
            seen.faults.push(line[at + FAULT.len()..].to_string());
            return Action::Continue;
        }
        if let Some(at) = line.find(STATUS) {
            let json = &line[at + STATUS.len()..];
            match serde_json::from_str(json) {
                Ok(v) => seen.statuses.push(v),
                Err(e) => {
                    return Action::Fail(format!(
                        "`updater status --json` printed something that is not JSON ({e}): {json}"
                    ))
                }
            }
            return Action::Continue;
        }
        if let Some(at) = line.find(END) {
            let rc = line[at..].rsplit(' ').next().and_then(|n| n.parse::<i32>().ok());
            if let Some(last) = seen.commands.last_mut() {
                last.1 = rc;
            }
            if let Some(cmd) = self.pending.take() {
                if cmd.must_pass && rc != Some(0) {
                    return Action::Fail(format!(
                        "`{}` exited with {} in boot {} (partition {}, tryboot={})",
                        cmd.text,
                        rc.map_or("?".into(), |r| r.to_string()),
                        b.index,
                        b.partition,
                        u8::from(b.tryboot)
                    ));
                }
            }
            return Action::Continue;
        }
        if line.contains(READY) {
            if self.current.as_ref().is_none_or(|(boot, _)| *boot != b.index) {
                self.pending = None;
                let Some(i) = self.plan.iter().position(|(boot, _)| *boot == b.index) else {
                    return Action::Fail(format!(
                        "boot {} (partition {}, tryboot={}) reached the test hook, but the plan \
                         expected it to end before that",
                        b.index,
                        b.partition,
                        u8::from(b.tryboot)
                    ));
                };
                let (boot, cmds) = self.plan.remove(i);
                self.current = Some((boot, cmds.into()));
                self.sessions += 1;
            }
            let next = self.current.as_mut().and_then(|(_, cmds)| cmds.pop_front());
            return match next {
                Some(cmd) => {
                    let seen = self.boot(b);
                    seen.commands.push((cmd.text.clone(), None));
                    let text = cmd.text.clone();
                    self.pending = Some(cmd);
                    Action::Send(text)
                }
                None if self.plan.iter().all(|(boot, _)| *boot < b.index) => {
                    Action::Stop(format!("every command ran (boot {})", b.index))
                }
                // This session is done; the boot must end by itself (a reboot the last command
                // asked for, a power cut, the watchdog) before the next session starts.
                None => Action::Continue,
            };
        }
        Action::Continue
    }

    fn on_boot_end(&mut self, b: &BootRecord) -> Action {
        let seen = self.boot(b);
        seen.reset.clone_from(&b.reset);
        Action::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(index: usize, partition: u32, tryboot: bool) -> BootRecord {
        BootRecord {
            index,
            partition,
            label: String::new(),
            tryboot,
            selection: "autoboot.txt".into(),
            warnings: Vec::new(),
            cmdline: String::new(),
            first_line_ms: Some(100),
            ready_ms: Some(2000),
            duration_ms: 0,
            reset: None,
        }
    }

    #[test]
    fn types_each_session_at_the_prompts_and_stops_when_done() {
        let mut d = Driver::new(
            "metrica-updater: healthy",
            vec![(1, vec![Cmd::status(), Cmd::any("install")]), (2, vec![Cmd::ok("true")])],
        );
        let b1 = record(1, 2, false);
        assert_eq!(d.on_line(&b1, "metrica: booted slot a: slot a (1.0.0) ok"), Action::Continue);
        assert_eq!(d.on_line(&b1, "metrica-updater: healthy"), Action::Continue);
        assert_eq!(d.on_line(&b1, "metrica-test: ready 1"), Action::Send(STATUS_COMMAND.into()));
        assert_eq!(d.on_line(&b1, "metrica-test: begin 1"), Action::Continue);
        assert_eq!(
            d.on_line(&b1, r#"metrica-test: status {"state": {"committed": "a"}}"#),
            Action::Continue
        );
        assert_eq!(d.on_line(&b1, "metrica-test: end 1 exit 0"), Action::Continue);
        assert_eq!(d.on_line(&b1, "metrica-test: ready 2"), Action::Send("install".into()));
        assert_eq!(d.on_line(&b1, "metrica-test: end 2 exit 1"), Action::Continue);
        // Session 1 is done but session 2 is left: wait for the boot to end.
        assert_eq!(d.on_line(&b1, "metrica-test: ready 3"), Action::Continue);
        let mut end = b1.clone();
        end.reset = Some("reboot '0 tryboot'".into());
        assert_eq!(d.on_boot_end(&end), Action::Continue);

        let b2 = record(2, 3, true);
        assert_eq!(d.on_line(&b2, "metrica-test: ready 1"), Action::Send("true".into()));
        assert_eq!(d.on_line(&b2, "metrica-test: end 1 exit 0"), Action::Continue);
        assert!(matches!(d.on_line(&b2, "metrica-test: ready 2"), Action::Stop(_)));

        assert_eq!(d.seen.len(), 2);
        assert_eq!(d.seen[0].healthy, Some(true));
        assert_eq!(d.seen[0].healthy_ms, Some(2000));
        assert_eq!(d.seen[0].updater, ["metrica: booted slot a: slot a (1.0.0) ok"]);
        assert_eq!(d.seen[0].commands[1], ("install".to_string(), Some(1)));
        assert_eq!(d.seen[0].reset.as_deref(), Some("reboot '0 tryboot'"));
        assert_eq!(d.last_status().unwrap()["state"]["committed"], "a");
        assert_eq!(d.sessions, 2);
    }

    #[test]
    fn a_failing_must_pass_command_fails_the_run() {
        let mut d = Driver::new("healthy", vec![(1, vec![Cmd::ok("updater install x")])]);
        let b = record(1, 2, false);
        d.on_line(&b, "metrica-test: ready 1");
        let Action::Fail(why) = d.on_line(&b, "metrica-test: end 1 exit 1") else { panic!() };
        assert!(why.contains("`updater install x` exited with 1 in boot 1"), "{why}");
    }

    #[test]
    fn bad_status_json_fails_and_markers_are_found_after_kernel_noise() {
        let mut d = Driver::new("healthy", vec![]);
        let b = record(1, 3, true);
        assert!(matches!(d.on_line(&b, "metrica-test: status {nope"), Action::Fail(_)));
        d.on_line(&b, "[    3.1] metrica-fault: this init hangs before updater boot");
        d.on_line(&b, "metrica-updater: unhealthy (exit 1)");
        d.on_line(&b, "[    2.1] Kernel panic - not syncing: Attempted to kill init!");
        assert_eq!(d.seen[0].faults, ["this init hangs before updater boot"]);
        assert_eq!(d.seen[0].panic.as_deref(), Some("Attempted to kill init!"));
        assert_eq!(d.seen[0].healthy, Some(false));
        // No session for this boot: reaching the hook fails the run.
        let Action::Fail(why) = d.on_line(&b, "metrica-test: ready 1") else { panic!() };
        assert!(why.contains("boot 1 (partition 3, tryboot=1) reached the test hook"), "{why}");
    }

    #[test]
    fn an_empty_session_waits_for_the_boot_to_end() {
        let mut d = Driver::new("healthy", vec![(1, vec![]), (3, vec![Cmd::status()])]);
        assert_eq!(d.on_line(&record(1, 3, true), "metrica-test: ready 1"), Action::Continue);
        // Boot 2 was planned to end before its hook (say, a power cut in boot 1 moved it on):
        // boot 3 gets its own session, whatever came before.
        let b3 = record(3, 2, false);
        assert_eq!(d.on_line(&b3, "metrica-test: ready 1"), Action::Send(STATUS_COMMAND.into()));
        assert!(matches!(d.on_line(&b3, "metrica-test: ready 2"), Action::Stop(_)));
    }
}
