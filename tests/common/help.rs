//! The `--help` check shared by the imager's and the updater's end-to-end tests: every
//! subcommand's help, found recursively from the top, names only flags that exist.

use std::path::Path;
use std::process::{Command, Stdio};

fn help(bin: &Path, path: &[String]) -> String {
    let out = Command::new(bin).args(path).arg("--help").stdin(Stdio::null()).output().unwrap();
    assert!(out.status.success(), "{path:?} --help");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The subcommands a help page lists.
fn subcommands(text: &str) -> Vec<String> {
    let Some(start) = text.find("Commands:\n") else { return Vec::new() };
    text[start + 10..]
        .lines()
        .take_while(|l| l.starts_with("  "))
        .filter(|l| !l.starts_with("   ")) // a wrapped description, not a command
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

fn is_flag_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-'
}

/// Every `--flag` a help text names, in its options and in prose.
fn named(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in text.match_indices("--") {
        if text[..i].chars().last().is_some_and(is_flag_char) {
            continue;
        }
        let rest: String = text[i + 2..].chars().take_while(|&c| is_flag_char(c)).collect();
        let rest = rest.trim_end_matches('-');
        if !rest.is_empty() {
            out.push(format!("--{rest}"));
        }
    }
    out
}

/// The flags a help page declares (its option lines).
fn declared(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with('-'))
        .flat_map(|l| l.split([',', ' ']).filter(|w| w.starts_with("--")).map(str::to_string))
        .collect()
}

/// Runs `BIN [SUB...] --help` for every (nested) subcommand and checks that each flag a page
/// names is declared by that command or, when it refers to another command's flag, by some
/// command of the tool. `min_commands` and `min_flags` guard the scan itself.
pub fn every_flag_named_in_help_exists(bin: &Path, min_commands: usize, min_flags: usize) {
    let mut queue = vec![Vec::<String>::new()];
    let mut pages = Vec::new();
    while let Some(path) = queue.pop() {
        let text = help(bin, &path);
        for sub in subcommands(&text) {
            let mut p = path.clone();
            p.push(sub);
            queue.push(p);
        }
        pages.push((path, text));
    }
    assert!(pages.len() >= min_commands, "found only {} commands", pages.len());
    let everywhere: Vec<String> = pages.iter().flat_map(|(_, t)| declared(t)).collect();
    let checked: usize = pages.iter().map(|(_, t)| named(t).len()).sum();
    assert!(checked >= min_flags, "only {checked} flags named: the scan is broken");
    for (path, text) in &pages {
        let own = declared(text);
        for flag in named(text) {
            assert!(
                own.contains(&flag) || everywhere.contains(&flag),
                "`{} {} --help` names {flag}, which no command has",
                bin.display(),
                path.join(" ")
            );
        }
    }
}
