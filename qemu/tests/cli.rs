//! The `pi-qemu` binary's exit codes and messages for bad input (no QEMU run needed).

use std::process::{Command, Output};

fn pi_qemu(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pi-qemu"))
        .args(args)
        .env_remove("METRICA_QEMU")
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn missing_qemu_binary_is_named_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(1024 * 1024).unwrap();
    let o =
        pi_qemu(&["boot", disk.to_str().unwrap(), "--qemu", "/nonexistent/qemu-system-aarch64"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("error: qemu binary not found: /nonexistent/qemu-system-aarch64"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn missing_disk_is_named_with_exit_2() {
    let o = pi_qemu(&["boot", "/nonexistent/disk.img", "--qemu", "/bin/true"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("disk image not found: /nonexistent/disk.img"), "{}", stderr(&o));
}

#[test]
fn not_a_gpt_disk_fails_without_leaving_a_log_folder() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("zeros.img");
    std::fs::File::create(&disk).unwrap().set_len(1024 * 1024).unwrap();
    let o = pi_qemu(&["boot", disk.to_str().unwrap(), "--qemu", "/bin/true"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("reading the GPT of"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("log"), "{}", stderr(&o));
}

#[test]
fn scenario_list_and_unknown_names() {
    let o = pi_qemu(&["scenario", "--list"]);
    assert!(o.status.success());
    let list = String::from_utf8_lossy(&o.stdout);
    for name in ["first-boot", "update-commit", "hang", "power-cut-install", "power-cut-commit"] {
        assert!(list.contains(name), "{list}");
    }
    let o = pi_qemu(&["scenario", "nope", "--image-dir", "/tmp"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("unknown scenario \"nope\""), "{}", stderr(&o));
}

#[test]
fn scenarios_without_images_fail_loudly() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    let o = pi_qemu(&[
        "scenario",
        "hang",
        "--image-dir",
        dir.path().to_str().unwrap(),
        "--work-dir",
        work.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("FAIL hang"), "{err}");
    assert!(err.contains("no *.img in the image folder"), "{err}");
    assert!(err.contains("0 of 1 scenarios passed"), "{err}");
    assert!(err.contains("work folder kept"), "{err}");
}
