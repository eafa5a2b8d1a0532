//! `/metrics`: the device's status in the Prometheus text format (version 0.0.4).
//!
//! Pure: [`render`] turns a [`Status`] (the same value `/status` and `updater status --json`
//! show) into text. Metric names follow DESIGN.md section 9; docs/daemon.md lists them all.

use crate::connectivity::Connectivity;
use crate::daemon_record::DecisionOutcome;
use crate::layout::Slot;
use crate::role_report::RoleSection;
use crate::status::Status;
use std::fmt::Write;

/// The content type of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

/// Escapes a label value (backslash, double quote, newline).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Renders the metrics. `agent_up`: whether the daemon is running (1 from the daemon itself).
pub fn render(st: &Status, agent_up: bool, now: u64) -> String {
    render_with_role(st, None, agent_up, now)
}

/// [`render`], with the daemon's role section (the `metrica_role_*` series).
pub fn render_with_role(
    st: &Status,
    role: Option<&RoleSection>,
    agent_up: bool,
    now: u64,
) -> String {
    let mut o = Out(String::new());
    o.one("metrica_agent_up", "gauge", "1 while the updater daemon runs.", u8::from(agent_up));
    let state = st.state.as_ref();
    let daemon = st.daemon.as_ref();
    o.one(
        "metrica_update_last_success_timestamp",
        "gauge",
        "Unix time of the last committed OS update (0: none recorded).",
        st.last_update_success.unwrap_or(0),
    );
    o.family(
        "metrica_update_total",
        "counter",
        "OS updates by result: success = committed after its trial; failure = install failed \
         or trial rolled back.",
    );
    let commits = state.map_or(0, |s| s.counters.commits);
    let rollbacks = state.map_or(0, |s| s.counters.rollbacks);
    let install_failures = daemon.map_or(0, |d| d.counters.installs_failed);
    o.sample("metrica_update_total", &[("result", "success")], commits);
    o.sample("metrica_update_total", &[("result", "failure")], install_failures + rollbacks);
    o.one(
        "metrica_rollback_total",
        "counter",
        "Trials that failed and returned to the committed slot.",
        rollbacks,
    );
    o.family(
        "metrica_slot_info",
        "gauge",
        "One series per slot: its version and state (good, installed, installing, bad, empty); \
         committed says whether it boots by default.",
    );
    if let Some(s) = state {
        for slot in Slot::ALL {
            let info = s.slot(slot);
            let version = info.version.as_ref().map(ToString::to_string).unwrap_or_default();
            let committed = if s.committed == slot { "true" } else { "false" };
            o.sample(
                "metrica_slot_info",
                &[
                    ("slot", &slot.to_string()),
                    ("version", &version),
                    ("state", info.state.name()),
                    ("committed", committed),
                ],
                1,
            );
        }
    }
    o.one(
        "metrica_safe_mode",
        "gauge",
        "1 while the device runs its safe-mode stack instead of its role.",
        u8::from(st.safe_mode),
    );
    roles(&mut o, role);
    if let Some(free) = st.disk_free_bytes {
        o.family("metrica_disk_free_bytes", "gauge", "Free bytes on the data partition.");
        o.sample("metrica_disk_free_bytes", &[("mount", &st.data_dir.display().to_string())], free);
    }
    o.one(
        "metrica_config_drift_detected",
        "gauge",
        "1 when the disk disagrees with the updater's state (autoboot.txt, booted slot).",
        u8::from(!st.drift.is_empty()),
    );
    o.one(
        "metrica_last_contact_timestamp",
        "gauge",
        "Unix time a mirror last answered with the channel (0: never).",
        daemon.and_then(|d| d.last_contact).unwrap_or(0),
    );
    o.family(
        "metrica_connectivity",
        "gauge",
        "1 for the current connectivity state: online, degraded (6 h without contact), \
         airgapped (24 h).",
    );
    let current = daemon.map(|d| d.connectivity_at(now));
    for c in Connectivity::ALL {
        o.sample("metrica_connectivity", &[("state", c.name())], u8::from(current == Some(c)));
    }
    let channel = daemon.map(|d| &d.channel);
    if let Some(seq) = channel.and_then(|c| c.sequence) {
        o.one(
            "metrica_channel_sequence",
            "gauge",
            "Sequence number of the last good channel document.",
            seq,
        );
    }
    if let Some(exp) = channel.and_then(|c| c.expires) {
        o.one(
            "metrica_channel_expires_timestamp",
            "gauge",
            "Unix time the last good channel document expires.",
            exp,
        );
    }
    if let Some(c) = channel.filter(|c| c.target_version.is_some()) {
        o.family(
            "metrica_channel_target_info",
            "gauge",
            "The channel followed and the OS version it targets.",
        );
        let target = c.target_version.clone().unwrap_or_default();
        o.sample("metrica_channel_target_info", &[("channel", &c.name), ("version", &target)], 1);
    }
    let pending = daemon
        .and_then(|d| d.decision.as_ref())
        .is_some_and(|d| d.outcome == DecisionOutcome::Install);
    o.one(
        "metrica_update_pending",
        "gauge",
        "1 when the rollout says this device should install a version it does not run yet.",
        u8::from(pending),
    );
    o.family(
        "metrica_channel_fetch_errors_total",
        "counter",
        "Channel fetches that failed, per mirror tried, by kind.",
    );
    for kind in crate::daemon_record::FETCH_ERROR_KINDS {
        let n = daemon.and_then(|d| d.counters.fetch_errors.get(kind).copied()).unwrap_or(0);
        o.sample("metrica_channel_fetch_errors_total", &[("kind", kind)], n);
    }
    if let Some(d) = daemon {
        o.family(
            "metrica_channel_errors_total",
            "counter",
            "Channel documents refused by the channel checks, by kind.",
        );
        for (kind, n) in &d.counters.channel_errors {
            o.sample("metrica_channel_errors_total", &[("kind", kind)], n);
        }
        o.family("metrica_channel_polls_total", "counter", "Channel polls by result.");
        let failed =
            d.counters.polls.saturating_sub(d.counters.not_modified + d.counters.new_documents);
        o.sample("metrica_channel_polls_total", &[("result", "new")], d.counters.new_documents);
        o.sample(
            "metrica_channel_polls_total",
            &[("result", "not_modified")],
            d.counters.not_modified,
        );
        o.sample("metrica_channel_polls_total", &[("result", "failed")], failed);
    }
    o.0
}

/// The role families: always declared, with a series per role the daemon knows of.
fn roles(o: &mut Out, section: Option<&RoleSection>) {
    let listed = section.and_then(|r| r.roles.as_ref()).map_or(&[][..], |r| &r.roles[..]);
    o.family(
        "metrica_role_info",
        "gauge",
        "1 for the release each role runs (its current version).",
    );
    for r in listed {
        if let Some(v) = &r.current {
            o.sample("metrica_role_info", &[("role", &r.name), ("version", v)], 1);
        }
    }
    o.family(
        "metrica_role_healthy",
        "gauge",
        "1 while every container of the role is up (and healthy where it has a check); 0 when          not, or when the engine cannot be asked.",
    );
    for r in listed {
        o.sample("metrica_role_healthy", &[("role", &r.name)], u8::from(r.healthy == Some(true)));
    }
    o.family(
        "metrica_role_restarts_total",
        "counter",
        "Restarts of the containers of the role's running stack (resets when they are replaced).",
    );
    for (role, n) in section.map(|r| &r.restarts).into_iter().flatten() {
        o.sample("metrica_role_restarts_total", &[("role", role)], n);
    }
    o.family(
        "metrica_role_rollbacks_total",
        "counter",
        "Role releases rolled back: failed applies, and crash loops that went back to the          previous release.",
    );
    let mut rollbacks: std::collections::BTreeMap<&str, u64> = Default::default();
    for r in listed {
        *rollbacks.entry(&r.name).or_default() += r.rollbacks_total;
    }
    for (role, n) in section.map(|r| &r.daemon.crash_rollbacks).into_iter().flatten() {
        *rollbacks.entry(role).or_default() += n;
    }
    for (role, n) in rollbacks {
        o.sample("metrica_role_rollbacks_total", &[("role", role)], n);
    }
    o.family(
        "metrica_container_engine_up",
        "gauge",
        "1 when the container engine answers, 0 when it does not (then the updater serves the          status page alone).",
    );
    if let Some(up) = section.and_then(|r| r.engine_up) {
        o.sample("metrica_container_engine_up", &[], u8::from(up));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::daemon_record::DaemonRecord;
    use crate::state::State;

    pub(crate) fn status() -> Status {
        let mut s = State::new(Slot::A, Some("1.0.0".parse().unwrap()));
        s.counters.commits = 2;
        s.counters.rollbacks = 1;
        let mut d = DaemonRecord::new(1000);
        d.last_contact = Some(2000);
        d.channel.name = "stable".into();
        d.channel.sequence = Some(7);
        d.channel.expires = Some(9_000);
        d.channel.target_version = Some("2.0.0".into());
        d.counters.installs_failed = 3;
        d.counters.fetch_errors.insert("timeout".into(), 4);
        Status {
            disk: "/dev/mmcblk0".into(),
            data_dir: "/data".into(),
            booted: None,
            booted_error: None,
            autoboot: None,
            autoboot_error: None,
            state: Some(s),
            state_error: None,
            history: vec![],
            daemon: Some(d),
            daemon_error: None,
            connectivity: None,
            disk_free_bytes: Some(123),
            safe_mode: false,
            drift: vec!["x".into()],
            last_update_success: Some(1500),
        }
    }

    #[test]
    fn renders_the_design_metrics() {
        let text = render(&status(), true, 2000 + 7 * 3600);
        for line in [
            "metrica_agent_up 1",
            "metrica_update_last_success_timestamp 1500",
            "metrica_update_total{result=\"success\"} 2",
            "metrica_update_total{result=\"failure\"} 4",
            "metrica_rollback_total 1",
            "metrica_slot_info{slot=\"a\",version=\"1.0.0\",state=\"good\",committed=\"true\"} 1",
            "metrica_slot_info{slot=\"b\",version=\"\",state=\"empty\",committed=\"false\"} 1",
            "metrica_safe_mode 0",
            "metrica_disk_free_bytes{mount=\"/data\"} 123",
            "metrica_config_drift_detected 1",
            "metrica_last_contact_timestamp 2000",
            "metrica_connectivity{state=\"degraded\"} 1",
            "metrica_connectivity{state=\"online\"} 0",
            "metrica_channel_sequence 7",
            "metrica_channel_target_info{channel=\"stable\",version=\"2.0.0\"} 1",
            "metrica_channel_fetch_errors_total{kind=\"timeout\"} 4",
            "metrica_channel_fetch_errors_total{kind=\"not_toml\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }

    /// A role section: 1.2.0 running, unhealthy, restarted 7 times; 2 rollbacks by the
    /// service and 1 after a crash loop; the engine answers; not in safe mode.
    pub(crate) fn role_section() -> RoleSection {
        use crate::role::service::{RoleStatus, RolesStatus};
        let role = RoleStatus {
            name: "camera-single".into(),
            current: Some("1.2.0".into()),
            previous: Some("1.1.0".into()),
            committed: Some("1.2.0".into()),
            pending: None,
            failed: vec![],
            consecutive_failures: 0,
            rollbacks_total: 2,
            last_error: None,
            containers: Some(vec![]),
            healthy: Some(false),
            checks: None,
        };
        let mut daemon = crate::daemon::role::RoleRecord::default();
        daemon.crash_rollbacks.insert("camera-single".into(), 1);
        RoleSection {
            roles: Some(RolesStatus { roles: vec![role], safe_mode: None, engine_up: true }),
            error: None,
            restarts: [("camera-single".to_string(), 7)].into_iter().collect(),
            daemon,
            engine_up: Some(true),
            safe_mode: None,
        }
    }

    #[test]
    fn renders_the_role_metrics() {
        let text = render_with_role(&status(), Some(&role_section()), true, 5000);
        for line in [
            "metrica_role_info{role=\"camera-single\",version=\"1.2.0\"} 1",
            "metrica_role_healthy{role=\"camera-single\"} 0",
            "metrica_role_restarts_total{role=\"camera-single\"} 7",
            "metrica_role_rollbacks_total{role=\"camera-single\"} 3",
            "metrica_container_engine_up 1",
            "metrica_safe_mode 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        // Without the daemon's role section the families are declared with no series.
        let bare = render(&status(), true, 5000);
        assert!(bare.contains("# TYPE metrica_role_info gauge"));
        assert!(!bare.lines().any(|l| l.starts_with("metrica_role_")), "{bare}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    /// The path of an external checker; the checker tests are the checkers tier
    /// (docs/testing.md), `#[ignore]`d by default, and a tool missing when they run fails them.
    fn tool(name: &str) -> std::path::PathBuf {
        let found = std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths).map(|d| d.join(name)).find(|p| p.is_file())
        });
        found.unwrap_or_else(|| {
            panic!(
                "{name} is missing: .ci/setup installs it (Debian packages prometheus, \
                 prometheus-alertmanager, python3-yaml)"
            )
        })
    }

    /// The real `promtool check metrics` (Debian package `prometheus`).
    #[test]
    #[ignore = "checker test, needs promtool: run with --ignored (see docs/testing.md)"]
    fn promtool_accepts_the_output() {
        let promtool = tool("promtool");
        let mut bare = status();
        bare.daemon = None;
        bare.state = None;
        bare.disk_free_bytes = None;
        let section = role_section();
        for (what, st, role) in [("full", status(), Some(&section)), ("bare", bare, None)] {
            let text = render_with_role(&st, role, true, 5000);
            let mut child = std::process::Command::new(&promtool)
                .args(["check", "metrics"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            use std::io::Write as _;
            child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "promtool check metrics ({what}): {}{}\n{text}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    fn overlord() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../overlord")
    }

    fn check(tool: &std::path::Path, args: &[&str]) {
        let out =
            std::process::Command::new(tool).args(args).current_dir(overlord()).output().unwrap();
        assert!(
            out.status.success(),
            "{} {}: {}{}",
            tool.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// overlord/: `promtool check config`, `promtool check rules`, `promtool test rules` (the
    /// rule unit tests), `amtool check-config`; the Loki and Promtail files parse as YAML.
    #[test]
    #[ignore = "checker test, needs promtool, amtool, python3-yaml: run with --ignored (see docs/testing.md)"]
    fn overlord_configs_pass_their_checkers() {
        let promtool = tool("promtool");
        check(&promtool, &["check", "config", "prometheus.yml"]);
        check(&promtool, &["check", "rules", "rules/metrica.rules.yml"]);
        check(&promtool, &["test", "rules", "tests/metrica.rules.test.yml"]);
        check(&tool("amtool"), &["check-config", "alertmanager.yml"]);
        let python = tool("python3");
        for f in ["loki.yaml", "promtail.yaml", "grafana/provisioning/datasources/metrica.yaml"] {
            check(&python, &["-c", "import sys, yaml; yaml.safe_load(open(sys.argv[1]))", f]);
        }
    }

    /// Every `metrica_*` name used by the alert rules and the dashboard is one the device
    /// exports: a renamed metric cannot silently break an alert.
    #[test]
    fn rules_and_dashboard_use_only_exported_metrics() {
        let text = render(&status(), true, 5000);
        let exported: std::collections::BTreeSet<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        let dashboard =
            std::fs::read_to_string(overlord().join("grafana/dashboards/metrica-fleet.json"))
                .unwrap();
        let dash: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
        assert!(dash["panels"].as_array().is_some_and(|p| p.len() >= 10));
        for file in ["rules/metrica.rules.yml", "grafana/dashboards/metrica-fleet.json"] {
            let body = std::fs::read_to_string(overlord().join(file)).unwrap();
            let mut used = 0;
            for (i, _) in body.match_indices("metrica_") {
                let name: String = body[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if name == "metrica_" {
                    continue;
                }
                used += 1;
                assert!(
                    exported.contains(name.as_str()),
                    "{file} uses {name}, which is not exported"
                );
            }
            assert!(used > 10, "{file}: {used}");
        }
    }
}
