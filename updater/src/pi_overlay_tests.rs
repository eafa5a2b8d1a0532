//! Checks of overlays/pi, the systemd files that run this updater on the Raspberry Pi root
//! (docs/pi-root.md). They live with the updater because the units call it: every
//! `ExecStart=/usr/bin/updater ...` must parse with the updater's own command line.
//!
//! The unit files are read as systemd reads them (ini-like: sections, `Key=Value`, comments),
//! and every unit, binary and path they name must exist in the overlay, under /data, or in
//! the lists below of what the Debian packages of the Pi recipe provide (docs/pi-root.md,
//! "Packages the overlay relies on"). `systemd-analyze verify` checks the syntax on a host
//! that has systemd; this check runs everywhere, with `cargo test`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Units the overlay orders against or enables that come from packages or systemd itself.
const EXTERNAL_UNITS: &[(&str, &str)] = &[
    ("basic.target", "systemd"),
    ("multi-user.target", "systemd"),
    ("sockets.target", "systemd"),
    ("network-pre.target", "systemd"),
    ("network-online.target", "systemd"),
    ("time-sync.target", "systemd"),
    ("systemd-networkd.service", "systemd"),
    ("systemd-networkd.socket", "systemd"),
    ("systemd-networkd-wait-online.service", "systemd"),
    ("systemd-update-done.service", "systemd"),
    ("ldconfig.service", "systemd"),
    ("sys-subsystem-net-devices-wlan0.device", "udev"),
    ("wpa_supplicant@.service", "wpasupplicant"),
    ("ssh.service", "openssh-server"),
    ("ssh.socket", "openssh-server"),
    ("docker.service", "docker.io"),
    ("containerd.service", "containerd (docker.io)"),
    ("apt-daily.timer", "apt"),
    ("apt-daily-upgrade.timer", "apt"),
    ("dpkg-db-backup.timer", "dpkg"),
];

/// Programs the overlay runs that come from packages.
const EXTERNAL_PROGRAMS: &[(&str, &str)] = &[
    ("/usr/bin/updater", "the recipe's updater layer"),
    ("/usr/bin/mkdir", "coreutils"),
    ("/usr/bin/ssh-keygen", "openssh-client (openssh-server)"),
    ("/bin/echo", "coreutils"),
    ("/bin/sh", "dash"),
    ("/usr/lib/systemd/systemd-networkd-wait-online", "systemd"),
];

/// Keys the overlay may use, per section (a typo systemd would only warn about fails here).
const KEYS: &[(&str, &[&str])] = &[
    (
        "Unit",
        &[
            "Description",
            "Documentation",
            "RequiresMountsFor",
            "Wants",
            "Requires",
            "After",
            "Before",
            "ConditionPathExists",
        ],
    ),
    (
        "Service",
        &[
            "Type",
            "NotifyAccess",
            "RemainAfterExit",
            "ExecStart",
            "ExecStartPost",
            "ExecStopPost",
            "TimeoutStartSec",
            "StandardOutput",
            "WatchdogSec",
            "Restart",
            "RestartSec",
        ],
    ),
    ("Install", &["WantedBy"]),
];

/// Keys whose values are unit names.
const UNIT_LISTS: &[&str] = &["Wants", "Requires", "After", "Before", "WantedBy"];

fn overlay() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../overlays/pi")
}

fn system() -> PathBuf {
    overlay().join("etc/systemd/system")
}

/// One unit file: (section, key, value) in order, continuation lines not supported (the
/// overlay uses none; systemd would take a trailing `\` as one).
fn parse_unit(path: &Path) -> Vec<(String, String, String)> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut section = String::new();
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        let at = format!("{}:{}", path.display(), n + 1);
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        assert!(!line.ends_with('\\'), "{at}: continuation lines are not used in the overlay");
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        let (key, value) = line.split_once('=').unwrap_or_else(|| panic!("{at}: not Key=Value"));
        assert!(!section.is_empty(), "{at}: a key before any section");
        out.push((section.clone(), key.trim().to_string(), value.trim().to_string()));
    }
    out
}

/// Unit files and drop-ins of the overlay (not symlinks), by path.
fn unit_files() -> BTreeMap<PathBuf, Vec<(String, String, String)>> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![system()];
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.is_dir() {
                dirs.push(p);
            } else if meta.is_file() {
                out.insert(p.clone(), parse_unit(&p));
            }
        }
    }
    out
}

/// Whether `name` is a unit of the overlay or a listed external one (a template instance
/// counts when its template is).
fn unit_known(name: &str) -> bool {
    let template = match name.split_once('@') {
        Some((prefix, rest)) => rest.rsplit_once('.').map(|(_, ext)| format!("{prefix}@.{ext}")),
        None => None,
    };
    let listed = |n: &str| EXTERNAL_UNITS.iter().any(|(u, _)| *u == n);
    let in_overlay = |n: &str| std::fs::symlink_metadata(system().join(n)).is_ok();
    listed(name) || in_overlay(name) || template.is_some_and(|t| listed(&t) || in_overlay(&t))
}

/// The program of an Exec line: its first word without systemd's prefixes (`-`, `@`, ...).
fn exec_words(value: &str) -> Vec<String> {
    let mut words: Vec<String> = value.split_whitespace().map(str::to_string).collect();
    if let Some(first) = words.first_mut() {
        *first = first.trim_start_matches(['-', '@', ':', '+', '!']).to_string();
    }
    words
}

#[test]
fn unit_files_use_known_sections_and_keys_and_name_what_exists() {
    let files = unit_files();
    assert!(files.len() >= 6, "{files:?}");
    for (path, entries) in &files {
        for (section, key, value) in entries {
            let at = format!("{}: [{section}] {key}={value}", path.display());
            let keys = KEYS.iter().find(|(s, _)| s == section).unwrap_or_else(|| panic!("{at}"));
            assert!(keys.1.contains(&key.as_str()), "{at}: key not in the checked list");
            if UNIT_LISTS.contains(&key.as_str()) {
                for unit in value.split_whitespace() {
                    assert!(unit_known(unit), "{at}: unknown unit {unit}");
                }
            }
            if key.starts_with("Exec") && !value.is_empty() {
                let program = &exec_words(value)[0];
                assert!(
                    EXTERNAL_PROGRAMS.iter().any(|(p, _)| p == program),
                    "{at}: {program} is not a listed program"
                );
            }
            if key == "RequiresMountsFor" || key == "ConditionPathExists" {
                let p = value.trim_start_matches('!');
                let in_overlay = std::fs::symlink_metadata(overlay().join(&p[1..])).is_ok();
                assert!(p.starts_with("/data/") || p == "/data" || in_overlay, "{at}: {p}");
            }
        }
    }
}

#[test]
fn every_updater_command_line_parses_with_the_updater_cli() {
    use clap::Parser;
    let mut seen = 0;
    for (path, entries) in unit_files() {
        for (_, key, value) in entries.iter().filter(|(_, k, _)| k.starts_with("Exec")) {
            let words = exec_words(value);
            // An empty `ExecStart=` resets the list in a drop-in.
            if words.first().is_none_or(|w| w != "/usr/bin/updater") {
                continue;
            }
            seen += 1;
            if let Err(e) = crate::cli::Cli::try_parse_from(&words) {
                panic!("{}: {key}={value}: {e}", path.display());
            }
        }
    }
    assert_eq!(seen, 3, "firstboot, boot and run");
}

#[test]
fn the_updaters_units_run_the_right_commands_with_the_right_types() {
    let get = |unit: &str, key: &str| -> Vec<String> {
        parse_unit(&system().join(unit))
            .into_iter()
            .filter(|(_, k, _)| k == key)
            .map(|(_, _, v)| v)
            .collect()
    };
    assert_eq!(get("metrica-firstboot.service", "ExecStart"), ["/usr/bin/updater firstboot"]);
    assert_eq!(get("metrica-boot.service", "ExecStart"), ["/usr/bin/updater boot"]);
    assert_eq!(get("metrica-updater.service", "ExecStart"), ["/usr/bin/updater run"]);
    assert_eq!(get("metrica-updater.service", "Type"), ["notify"], "READY=1 after serving");
    assert_eq!(get("metrica-updater.service", "Restart"), ["always"]);
    assert_eq!(get("metrica-updater.service", "WatchdogSec").len(), 1);
    // A oneshot's service watchdog never starts while it runs: a timeout bounds it.
    for unit in ["metrica-firstboot.service", "metrica-boot.service"] {
        assert_eq!(get(unit, "Type"), ["oneshot"], "{unit}");
        // Or systemd sets no NOTIFY_SOCKET for it, and the updater opens /dev/watchdog
        // (busy: systemd holds it) instead of talking to systemd (seen under QEMU).
        assert_eq!(get(unit, "NotifyAccess"), ["main"], "{unit}");
        assert!(get(unit, "WatchdogSec").is_empty(), "{unit}");
        assert_eq!(get(unit, "TimeoutStartSec").len(), 1, "{unit}");
    }
    // The boot step's deadline (300 s) and reboot fit in its timeout.
    let boot_timeout =
        humantime::parse_duration(&get("metrica-boot.service", "TimeoutStartSec")[0]);
    assert!(
        boot_timeout.unwrap()
            > crate::health::DEFAULT_DEADLINE + std::time::Duration::from_secs(60)
    );
    // First boot comes before what reads its files.
    let before = get("metrica-firstboot.service", "Before").join(" ");
    for unit in ["network-pre.target", "systemd-networkd.service", "ssh.service", "docker.service"]
    {
        assert!(before.split_whitespace().any(|u| u == unit), "firstboot before {unit}");
    }
    let after = get("metrica-boot.service", "After").join(" ");
    assert!(after.split_whitespace().any(|u| u == "docker.service"));
    assert!(after.split_whitespace().any(|u| u == "metrica-firstboot.service"));
    let after = get("metrica-updater.service", "After").join(" ");
    assert!(after.split_whitespace().any(|u| u == "metrica-boot.service"));
}

#[test]
fn enablement_symlinks_point_at_units_that_exist_and_masks_at_dev_null() {
    let mut wants = 0;
    for e in std::fs::read_dir(system()).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        let meta = std::fs::symlink_metadata(&p).unwrap();
        if meta.is_symlink() {
            // A mask of a known unit, or an alias (e.g. dbus-org.freedesktop.network1.service)
            // of a known unit.
            let target = std::fs::read_link(&p).unwrap();
            let ok = if target == Path::new("/dev/null") {
                unit_known(&name)
            } else {
                target.file_name().is_some_and(|t| unit_known(t.to_str().unwrap()))
            };
            assert!(ok, "{name} -> {}", target.display());
            continue;
        }
        if !(meta.is_dir() && name.ends_with(".wants")) {
            continue;
        }
        let owner = name.trim_end_matches(".wants");
        assert!(unit_known(owner), "{owner}");
        for link in std::fs::read_dir(&p).unwrap() {
            let link = link.unwrap().path();
            let unit = link.file_name().unwrap().to_str().unwrap().to_string();
            let target = std::fs::read_link(&link).unwrap_or_else(|_| panic!("{unit}: a symlink"));
            let t = target.file_name().unwrap().to_str().unwrap();
            // The link is the unit's own name, or an instance of the template it points at.
            let instance_of = unit.split_once('@').map(|(pre, rest)| {
                format!("{pre}@.{}", rest.rsplit_once('.').map_or("", |(_, ext)| ext))
            });
            assert!(t == unit || instance_of.as_deref() == Some(t), "{unit} -> {t}");
            if target.is_relative() {
                assert!(p.join(&target).is_file(), "{} -> {}", link.display(), target.display());
            } else {
                assert!(unit_known(t), "{t} is not a listed unit");
            }
            wants += 1;
        }
    }
    assert!(wants >= 7, "{wants} enablement links");
}

/// The fstab lines: (what, where, type, options).
fn fstab() -> Vec<[String; 4]> {
    let text = std::fs::read_to_string(overlay().join("etc/fstab")).unwrap();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(f.len(), 6, "fstab: {line}");
        assert!(f[4] == "0" && f[5] == "0", "fstab: no dump, no fsck at boot: {line}");
        out.push([f[0], f[1], f[2], f[3]].map(str::to_string));
    }
    out
}

#[test]
fn fstab_keeps_root_read_only_and_docs_list_every_mount_point_and_bind_source() {
    let lines = fstab();
    let docs = std::fs::read_to_string(overlay().join("../../docs/pi-root.md")).unwrap();
    let root = lines.iter().find(|l| l[1] == "/").expect("a line for /");
    assert!(root[3].split(',').any(|o| o == "ro"), "{root:?}");
    for [what, mount, kind, options] in &lines {
        assert!(docs.contains(&format!("`{mount}`")), "docs/pi-root.md does not list `{mount}`");
        if options.split(',').any(|o| o == "bind") {
            assert!(what.starts_with("/data/"), "{what}: binds come from /data");
            assert!(options.contains("nofail"), "{mount}: a missing source must not stop the boot");
            assert!(docs.contains(&format!("`{what}`")), "docs/pi-root.md does not list `{what}`");
        }
        if kind == "tmpfs" {
            assert!(options.contains("size="), "{mount}: a bounded tmpfs");
        }
    }
}

#[test]
fn data_links_and_config_files_point_where_the_updater_writes() {
    let link = |p: &str| std::fs::read_link(overlay().join(p)).unwrap();
    assert_eq!(link("etc/machine-id"), Path::new("/data/etc/machine-id"));
    // First boot writes the Wi-Fi configuration here (firstboot.rs).
    assert_eq!(
        link("etc/wpa_supplicant/wpa_supplicant-wlan0.conf"),
        Path::new("/data/etc/wpa_supplicant/wpa_supplicant.conf")
    );
    assert!(crate::firstboot::LAYOUT.iter().any(|(d, _)| *d == "etc/wpa_supplicant"));
    assert!(crate::firstboot::LAYOUT.iter().any(|(d, _)| *d == "docker"));
    // First boot makes the sources of the fstab binds.
    for [what, _, _, options] in fstab() {
        if options.split(',').any(|o| o == "bind") {
            let rel = what.trim_start_matches("/data/");
            assert!(crate::firstboot::LAYOUT.iter().any(|(d, _)| *d == rel), "{what}");
        }
    }
    let daemon: serde_json::Value =
        serde_json::from_slice(&std::fs::read(overlay().join("etc/docker/daemon.json")).unwrap())
            .unwrap();
    assert_eq!(daemon["data-root"], "/data/docker");
    assert!(daemon["log-opts"]["max-size"].is_string(), "bounded container logs");
    let sshd =
        std::fs::read_to_string(overlay().join("etc/ssh/sshd_config.d/10-metrica.conf")).unwrap();
    let keygen = parse_unit(&system().join("metrica-ssh-hostkeys.service"));
    assert!(keygen
        .iter()
        .any(|(_, k, v)| k == "ExecStart" && v == "/usr/bin/ssh-keygen -A -f /data"));
    for kind in ["ed25519", "ecdsa", "rsa"] {
        // ssh-keygen -A -f /data writes /data/etc/ssh/ssh_host_<kind>_key.
        assert!(sshd.contains(&format!("HostKey /data/etc/ssh/ssh_host_{kind}_key\n")), "{kind}");
    }
    let modules =
        std::fs::read_to_string(overlay().join("etc/modules-load.d/metrica.conf")).unwrap();
    for m in ["overlay", "br_netfilter", "bridge", "nf_tables", "veth"] {
        assert!(modules.lines().any(|l| l.trim() == m), "modules-load.d lacks {m}");
    }
}

#[test]
fn health_checks_are_executable_scripts() {
    use std::os::unix::fs::PermissionsExt;
    let dir = overlay().join("etc/metrica/health.d");
    let checks = crate::health::extra_checks(&dir, std::time::Duration::from_secs(1));
    assert!(!checks.is_empty(), "the updater finds the overlay's checks");
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert!(mode & 0o111 != 0, "{} is not executable", p.display());
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.starts_with("#!/bin/sh\n"), "{}", p.display());
    }
    // The role check runs a command this updater has.
    let role = std::fs::read_to_string(dir.join("20-role")).unwrap();
    let line = role.lines().find_map(|l| l.strip_prefix("exec /usr/bin/")).expect("an exec line");
    let argv: Vec<&str> = line.split(" >").next().unwrap().split_whitespace().collect();
    assert_eq!(argv, ["updater", "role", "status", "--check"]);
    <crate::cli::Cli as clap::Parser>::try_parse_from(argv).unwrap();
}
