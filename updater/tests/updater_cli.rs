//! The `updater` command line as an operator meets it (issue 18): clap's errors and the
//! commands' errors in one style, `--json` on every command (docs/cli-json.md).

#[path = "../../tests/common/help.rs"]
mod help;

use std::path::Path;
use std::process::{Command, Output, Stdio};

fn updater(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_updater")).args(args).stdin(Stdio::null()).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A device's data folder (state committing A at 1.0.0) and a root saying it booted A.
fn fixture(dir: &Path) -> Vec<String> {
    std::fs::create_dir_all(dir.join("root/proc")).unwrap();
    std::fs::write(dir.join("root/proc/cmdline"), "metrica.boot_partition=2 metrica.tryboot=0\n")
        .unwrap();
    let state =
        updater::state::State::new(updater::layout::Slot::A, Some("1.0.0".parse().unwrap()));
    updater::state::save(&updater::state::state_path(&dir.join("data")), &state).unwrap();
    std::fs::File::create(dir.join("disk.img")).unwrap().set_len(1 << 20).unwrap();
    let arg = |p: &str| dir.join(p).display().to_string();
    vec![
        "--disk".into(),
        arg("disk.img"),
        "--data-dir".into(),
        arg("data"),
        "--sysroot".into(),
        arg("root"),
        "--log-file".into(),
        arg("log.jsonl"),
    ]
}

#[test]
fn clap_errors_and_command_errors_share_one_style() {
    let out = updater(&["--nope"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.starts_with("updater: error: unexpected argument '--nope'"), "{err}");
    assert_eq!(err.matches("error:").count(), 1, "{err}");
    assert!(updater(&["--help"]).status.success());

    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().display().to_string();
    let out = updater(&["locate", "--label", "data", "--sys-block", &empty, "--dev", &empty]);
    assert_eq!(out.status.code(), Some(1));
    // Without --log-file the log's JSON line comes first; the error is said once, in style.
    let err = stderr(&out);
    let said: Vec<&str> = err.lines().filter(|l| l.starts_with("updater: error: ")).collect();
    assert_eq!(
        said,
        ["updater: error: no disk has a partition labelled \"data\": not found"],
        "{err}"
    );
}

#[test]
fn json_on_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let base = fixture(dir.path());
    let with = |extra: &[&str]| {
        let mut a: Vec<&str> = base.iter().map(String::as_str).collect();
        a.extend_from_slice(extra);
        updater(&a)
    };
    // A failing command: the JSON object on stdout, the error on stderr, exit 1.
    let empty = dir.path().join("root").display().to_string();
    let out =
        with(&["--json", "locate", "--label", "data", "--sys-block", &empty, "--dev", &empty]);
    assert_eq!(out.status.code(), Some(1));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["command"], "locate");
    assert_eq!(j["ok"], false);
    assert!(j["error"].as_str().unwrap().contains("no disk has a partition labelled"), "{j}");
    assert!(j["messages"].as_array().unwrap().is_empty());

    // status --json keeps the daemon's /status shape.
    let out = with(&["status", "--json"]);
    let j: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", stderr(&out)));
    assert!(j.get("provisioning").is_some() && j["state"]["committed"] == "a", "{j}");

    // A command that succeeds: its lines become messages.
    let out = with(&["--json", "mark-good", "a"]);
    let j: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", stderr(&out)));
    assert_eq!(j["command"], "mark-good", "{j}");
    assert_eq!(j["ok"], true, "{j} {}", stderr(&out));
    assert!(j["messages"][0].as_str().unwrap().contains("slot a"), "{j}");
    assert!(j["error"].is_null());
    // A command on the slots also gives the state after it, as `status --json` does.
    assert_eq!(j["state"]["committed"], "a", "{j}");
    assert_eq!(j["state"]["slots"]["a"]["version"], "1.0.0", "{j}");
    // A refused one too: the state it left unchanged.
    let out = with(&["--json", "mark-bad", "b", "--reason", "test"]);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((j["command"].as_str(), j["ok"].as_bool()), (Some("mark-bad"), Some(false)), "{j}");
    assert_eq!(j["error"], "slot b holds no installed system", "{j}");
    assert_eq!(j["state"]["slots"]["b"]["state"], "empty", "{j}");
    // Others do not.
    let out = with(&["--json", "check-now", "--listen", "127.0.0.1:1"]);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((j["command"].as_str(), j.get("state")), (Some("check-now"), None), "{j}");
}

/// Every subcommand's --help, recursively: each `--flag` it names exists.
#[test]
fn every_flag_named_in_help_exists() {
    help::every_flag_named_in_help_exists(Path::new(env!("CARGO_BIN_EXE_updater")), 10, 60);
}
