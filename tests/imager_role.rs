//! End to end: `imager role build` on the repository's safe-mode role, `imager inspect` of the
//! `.mfr` (text and JSON, with and without a keyring), `imager publish` of it to a channel and
//! `imager channel ... --role`.

use std::path::Path;
use std::process::{Command, Output};

use updater::bundle::testkit::{make_bundle, test_image, TestMeta};
use updater::bundle::SlotClass;

fn imager(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_imager"))
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .args(args)
        .output()
        .unwrap();
    eprintln!("imager {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn ok(args: &[&str]) -> String {
    let out = imager(args);
    assert!(out.status.success(), "imager {args:?} failed");
    String::from_utf8(out.stdout).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn build_inspect_publish_and_edit_a_role_bundle() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = tmp.path().join("keys");
    ok(&["keygen", "--dir", s(&keys), "--name", "fleet"]);
    let key = keys.join("fleet.key");
    let role = Path::new(env!("CARGO_MANIFEST_DIR")).join("../roles/safe-mode");
    let image = tmp.path().join("status.tar");
    std::fs::write(&image, vec![3u8; 200_000]).unwrap();
    let out = tmp.path().join("out");
    let build = |dir: &Path| {
        ok(&["role", "build", s(&role), "--key", s(&key), "-o", s(dir), "--images", s(&image)])
    };
    build(&out);
    build(&tmp.path().join("again"));
    let mfr = out.join("safe-mode-1.0.0.mfr");
    assert_eq!(
        std::fs::read(&mfr).unwrap(),
        std::fs::read(tmp.path().join("again/safe-mode-1.0.0.mfr")).unwrap(),
        "reproducible with SOURCE_DATE_EPOCH"
    );

    let text = ok(&["inspect", s(&mfr), "--keyring", s(&keys)]);
    assert!(
        text.contains("role     safe-mode 1.0.0") && text.contains("signature valid"),
        "{text}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["inspect", s(&mfr), "--json"])).unwrap();
    assert_eq!(json["name"], "safe-mode");
    assert_eq!(json["signature"]["status"], "not_checked");
    assert!(json["files"].as_array().unwrap().iter().any(|f| f["path"] == "images/status.tar"));
    // Another keyring: reported invalid, exit status 1.
    let other = tmp.path().join("other");
    ok(&["keygen", "--dir", s(&other), "--name", "x"]);
    let bad = imager(&["inspect", s(&mfr), "--keyring", s(&other)]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stdout).contains("INVALID"));

    // A channel needs an OS bundle first.
    let www = tmp.path().join("www");
    let chan = ["--folder", s(&www), "--channel", "stable", "--key", s(&key)];
    let publish_role = [&["publish", s(&mfr)][..], &chan, &["--percent", "20"]].concat();
    assert!(!imager(&publish_role).status.success());
    let signing = imager::keys::load_signing_key(&key).unwrap();
    let meta = TestMeta {
        compatible: "metrica-test".into(),
        version: "1.0.0".parse().unwrap(),
        security_epoch: 0,
    };
    let boot = test_image(20_000, 1);
    let mfb = tmp.path().join("os-1.0.0.mfb");
    std::fs::write(&mfb, make_bundle(&meta, &[(SlotClass::Boot, &boot[..])], Some(&signing)))
        .unwrap();
    ok(&[&["publish", s(&mfb)][..], &chan, &["--percent", "100"]].concat());
    ok(&publish_role);
    assert!(www.join("roles/safe-mode/1.0.0.mfr").is_file());
    ok(&[&["channel", "pause"][..], &chan, &["--role", "safe-mode"]].concat());
    ok(&[&["channel", "set"][..], &chan, &["--role", "safe-mode", "--percent", "60"]].concat());
    let device = ["--role", "safe-mode", "--id", "pi-1", "--version-lock", "1.0.0"];
    ok(&[&["channel", "device"][..], &chan, &device].concat());
    let pin = ["--role", "safe-mode", "--version", "1.0.0", "--reason", "hold"];
    ok(&[&["channel", "pin"][..], &chan, &pin].concat());
    let shown = ok(&["channel", "show", "--folder", s(&www), "--channel", "stable"]);
    assert!(shown.contains("role      safe-mode 1.0.0"), "{shown}");
    assert!(shown.contains("60% now, PAUSED, PINNED 1.0.0"), "{shown}");
    let doc = std::fs::read_to_string(www.join("channels/stable.toml")).unwrap();
    assert!(doc.contains("[devices.pi-1.roles.safe-mode]"), "{doc}");
    // --follow is a device's channel, not a role's.
    let follow = ["--role", "safe-mode", "--id", "pi-1", "--follow", "beta"];
    assert!(!imager(&[&["channel", "device"][..], &chan, &follow].concat()).status.success());
}
