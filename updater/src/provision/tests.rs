//! Tests of the provisioning files: a good set, and a table of bad inputs with the file,
//! field and kind each must name.

use super::*;

pub(crate) const DEVICE: &str = r#"
device_id = "pi-0042"
role = "camera-single"
segment = "canary"
hostname = "cam-0042"
timezone = "Europe/Berlin"

[channel]
name = "stable"
url = "https://updates.example.com/fleet"
mirrors = ["https://mirror.example.net/fleet"]

[update]
interval = "10m"
maintenance_window = "22:30-02:00"

[overrides]
version_lock = "1.4.2"
auto_update = false
channel = "beta"
"#;

pub(crate) const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHJ0b3G9xq1P2W5Cxw3Y5CwG9ywJvn6dzQp2oOSs4mFr ops@example";

const WIFI: &str = r#"
country = "DE"
[[network]]
ssid = "Shop floor"
psk_secret = "wifi_shop"
priority = 2
[[network]]
ssid = "Guest"
security = "open"
hidden = true
"#;

fn files(list: &[(&str, &[u8])]) -> Vec<(String, Vec<u8>)> {
    list.iter().map(|(n, b)| (n.to_string(), b.to_vec())).collect()
}

fn secrets_for(identity: &age::x25519::Identity, plain: &str) -> Vec<u8> {
    secrets::encrypt(plain.as_bytes(), &[identity.to_public()]).unwrap()
}

#[test]
fn a_full_set_validates_and_keeps_its_bytes() {
    let id = age::x25519::Identity::generate();
    let sec = secrets_for(&id, "wifi_shop = \"correct horse battery\"\n");
    let set = files(&[
        (DEVICE_TOML, DEVICE.as_bytes()),
        (WIFI_TOML, WIFI.as_bytes()),
        (AUTHORIZED_KEYS, format!("# ops\n{KEY}\n").as_bytes()),
        (SECRETS_AGE, &sec),
    ]);
    let p = validate_files(&set).unwrap();
    let d = &p.device;
    assert_eq!(d.device_id, "pi-0042");
    assert_eq!(d.segment, Segment::Canary);
    assert_eq!(
        d.channel.urls,
        ["https://updates.example.com/fleet", "https://mirror.example.net/fleet"]
    );
    assert_eq!(d.interval, Duration::from_secs(600));
    let w = d.maintenance_window.unwrap();
    assert_eq!(w.to_string(), "22:30-02:00");
    assert!(w.contains(23 * 60) && w.contains(60) && !w.contains(12 * 60));
    assert_eq!(d.overrides.version_lock, Some(semver::Version::new(1, 4, 2)));
    assert!(!d.overrides.auto_update);
    assert_eq!(d.effective_channel(), "beta");
    assert_eq!(p.authorized_keys.as_ref().unwrap().fingerprints.len(), 1);
    assert_eq!(p.required_secrets(), ["wifi_shop"]);
    let names: Vec<&str> = p.files().iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, FILE_NAMES);
    assert_eq!(p.files()[0].1, DEVICE.as_bytes());

    let s = p.secrets.as_ref().unwrap().decrypt(&id).unwrap();
    assert_eq!(s.get("wifi_shop"), Some("correct horse battery"));
    assert!(!format!("{s:?}").contains("horse"), "Debug must not print values");
    let conf = p.wifi.as_ref().unwrap().wpa_supplicant_conf(&s).unwrap();
    assert!(conf.contains("country=DE") && conf.contains("psk=\"correct horse battery\""));
    assert!(conf.contains("key_mgmt=NONE") && conf.contains("scan_ssid=1"));
}

#[test]
fn defaults_fill_the_optional_fields_and_round_trip() {
    let text = r#"
device_id = "d1"
role = "audio-player"
segment = "general"
hostname = "d1"
[channel]
name = "stable"
url = "http://10.0.0.1/fleet"
"#;
    let d = DeviceConfig::parse(text.as_bytes()).unwrap();
    assert_eq!(d.timezone, "UTC");
    assert_eq!(d.interval, Duration::from_secs(300));
    assert!(d.overrides.auto_update && d.maintenance_window.is_none());
    assert_eq!(d.effective_channel(), "stable");
    let again = DeviceConfig::parse(d.to_toml().as_bytes()).unwrap();
    assert_eq!(again, d);
}

/// (what, file, contents, expected kind, expected field, words the message must contain)
#[test]
fn bad_device_toml_names_the_field() {
    let edit = |from: &str, to: &str| DEVICE.replacen(from, to, 1);
    let cases: Vec<(String, ErrorKind, &str, &str)> = vec![
        (
            edit("segment = \"canary\"", "segment = \"beta\""),
            ErrorKind::InvalidValue,
            "segment",
            "canary, early, general",
        ),
        (edit("cam-0042", "cam_0042"), ErrorKind::InvalidValue, "hostname", "RFC 1123"),
        (edit("cam-0042", "-cam"), ErrorKind::InvalidValue, "hostname", "RFC 1123"),
        (edit("cam-0042", &"a".repeat(64)), ErrorKind::InvalidValue, "hostname", "1 to 63"),
        (edit("device_id = \"pi-0042\"\n", ""), ErrorKind::MissingField, "device_id", "missing"),
        (
            edit("device_id = \"pi-0042\"", "device_id = \"Pi 42\""),
            ErrorKind::InvalidValue,
            "device_id",
            "lowercase",
        ),
        (
            edit("role = \"camera-single\"", "role = \"Camera\""),
            ErrorKind::InvalidValue,
            "role",
            "role name",
        ),
        (edit("Europe/Berlin", "Berlin time"), ErrorKind::InvalidValue, "timezone", "IANA"),
        (
            edit("https://updates.example.com/fleet", "ftp://x"),
            ErrorKind::InvalidValue,
            "channel.url",
            "https://",
        ),
        (
            edit("https://mirror.example.net/fleet", "mirror"),
            ErrorKind::InvalidValue,
            "channel.mirrors[0]",
            "URL",
        ),
        (edit("\"10m\"", "\"soon\""), ErrorKind::InvalidValue, "update.interval", "duration"),
        (edit("\"10m\"", "\"10s\""), ErrorKind::InvalidValue, "update.interval", "1m to 24h"),
        (
            edit("22:30-02:00", "25:00-02:00"),
            ErrorKind::InvalidValue,
            "update.maintenance_window",
            "HH:MM-HH:MM",
        ),
        (edit("\"1.4.2\"", "\"1.4\""), ErrorKind::InvalidValue, "overrides.version_lock", "semver"),
        (
            edit("channel = \"beta\"", "channel = \"Beta!\""),
            ErrorKind::InvalidValue,
            "overrides.channel",
            "channel name",
        ),
        (
            edit("auto_update = false", "auto_update = false\nauto_reboot = true"),
            ErrorKind::UnknownField,
            "auto_reboot",
            "unknown field",
        ),
        (edit("auto_update = false", "auto_update = \"no\""), ErrorKind::Syntax, "line 19", "bool"),
        (edit("[channel]", "[channel"), ErrorKind::Syntax, "line 8", "table header"),
    ];
    for (text, kind, field, words) in cases {
        let e = DeviceConfig::parse(text.as_bytes()).unwrap_err();
        assert_eq!(e.file, "device.toml");
        assert_eq!((e.kind, e.field.as_deref()), (kind, Some(field)), "{e}");
        assert!(e.to_string().contains(words), "{e} should say {words:?}");
        assert!(e.to_string().starts_with(&format!("device.toml: {field}: ")), "{e}");
    }
    let e = DeviceConfig::parse(b"\xff\xfe").unwrap_err();
    assert_eq!(e.kind, ErrorKind::Syntax);
    assert!(e.to_string().contains("UTF-8"));
}

#[test]
fn every_problem_of_a_set_is_reported() {
    let bad = DEVICE.replacen("canary", "none", 1).replacen("cam-0042", "cam 42", 1);
    let set = files(&[
        (DEVICE_TOML, bad.as_bytes()),
        ("notes.txt", b"hi"),
        (AUTHORIZED_KEYS, b"ssh-rsa nope\n"),
    ]);
    let e = validate_files(&set).unwrap_err();
    let got: Vec<(String, Option<String>, ErrorKind)> =
        e.0.iter().map(|e| (e.file.clone(), e.field.clone(), e.kind)).collect();
    assert_eq!(
        got,
        [
            ("notes.txt".into(), None, ErrorKind::UnexpectedFile),
            ("device.toml".into(), Some("segment".into()), ErrorKind::InvalidValue),
            ("device.toml".into(), Some("hostname".into()), ErrorKind::InvalidValue),
            ("authorized_keys".into(), Some("line 1".into()), ErrorKind::InvalidValue),
        ]
    );
    assert_eq!(e.to_string().lines().count(), 4);
}

#[test]
fn bad_sets_of_files() {
    let missing = validate_files(&files(&[(AUTHORIZED_KEYS, KEY.as_bytes())])).unwrap_err();
    assert_eq!(missing.0[0].kind, ErrorKind::MissingFile);
    assert_eq!(missing.0[0].file, "device.toml");

    let twice = validate_files(&files(&[
        (DEVICE_TOML, DEVICE.as_bytes()),
        (DEVICE_TOML, DEVICE.as_bytes()),
    ]))
    .unwrap_err();
    assert_eq!(twice.0[0].kind, ErrorKind::UnexpectedFile);

    let no_secrets =
        validate_files(&files(&[(DEVICE_TOML, DEVICE.as_bytes()), (WIFI_TOML, WIFI.as_bytes())]))
            .unwrap_err();
    assert_eq!(
        (no_secrets.0[0].file.as_str(), no_secrets.0[0].kind),
        ("wifi.toml", ErrorKind::MissingFile)
    );
    assert!(no_secrets.to_string().contains("wifi_shop"));

    let big = vec![b'#'; MAX_FILE_LEN + 1];
    let e = validate_files(&files(&[(DEVICE_TOML, &big)])).unwrap_err();
    assert_eq!(e.0[0].kind, ErrorKind::Syntax);
}

#[test]
fn bad_wifi_toml() {
    let cases: &[(&str, ErrorKind, &str)] = &[
        ("country = \"DE\"\n[[network]]\nssid = \"x\"\npsk = \"hunter22\"\n", ErrorKind::PlainTextSecret, "network[0].psk"),
        ("country = \"de\"\n[[network]]\nssid = \"x\"\nsecurity = \"open\"\n", ErrorKind::InvalidValue, "country"),
        ("country = \"DE\"\n", ErrorKind::MissingField, "network"),
        ("country = \"DE\"\n[[network]]\nssid = \"x\"\n", ErrorKind::MissingField, "network[0].psk_secret"),
        ("country = \"DE\"\n[[network]]\nssid = \"\"\nsecurity = \"open\"\n", ErrorKind::InvalidValue, "network[0].ssid"),
        ("country = \"DE\"\n[[network]]\nssid = \"x\"\nsecurity = \"wep\"\n", ErrorKind::InvalidValue, "network[0].security"),
        ("country = \"DE\"\n[[network]]\nssid = \"x\"\npsk_secret = \"Bad Name\"\n", ErrorKind::InvalidValue, "network[0].psk_secret"),
        (
            "country = \"DE\"\n[[network]]\nssid = \"x\"\nsecurity = \"open\"\n[[network]]\nssid = \"x\"\nsecurity = \"open\"\n",
            ErrorKind::InvalidValue,
            "network[1].ssid",
        ),
    ];
    for (text, kind, field) in cases {
        let e = WifiConfig::parse(text.as_bytes()).unwrap_err();
        assert_eq!(
            (e.file.as_str(), e.kind, e.field.as_deref()),
            ("wifi.toml", *kind, Some(*field)),
            "{e}"
        );
    }
}

#[test]
fn a_short_wifi_passphrase_or_a_missing_secret_is_refused_when_applied() {
    let w = WifiConfig::parse(WIFI.as_bytes()).unwrap();
    let short = Secrets::parse(b"wifi_shop = \"short\"").unwrap();
    let e = w.wpa_supplicant_conf(&short).unwrap_err();
    assert_eq!((e.file.as_str(), e.field.as_deref()), ("secrets.age", Some("wifi_shop")));
    let other = Secrets::parse(b"other = \"long enough pass\"").unwrap();
    let e = w.wpa_supplicant_conf(&other).unwrap_err();
    assert_eq!((e.file.as_str(), e.field.as_deref()), ("wifi.toml", Some("network[0].psk_secret")));
}

#[test]
fn bad_authorized_keys() {
    let cases: &[(&str, ErrorKind, Option<&str>)] = &[
        ("ssh-ed25519 AAAAnotbase64!! x\n", ErrorKind::InvalidValue, Some("line 1")),
        ("# only a comment\n\n", ErrorKind::MissingField, None),
        ("-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n", ErrorKind::PlainTextSecret, Some("line 1")),
        ("hello world\n", ErrorKind::InvalidValue, Some("line 1")),
    ];
    for (text, kind, field) in cases {
        let e = AuthorizedKeys::parse(text.as_bytes()).unwrap_err();
        assert_eq!((e.kind, e.field.as_deref()), (*kind, *field), "{e}");
    }
    let second = format!("{KEY}\n\nnot a key\n");
    let e = AuthorizedKeys::parse(second.as_bytes()).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("line 3"));
    let with_options = format!("from=\"10.0.0.0/8\",no-pty {KEY}\n");
    assert!(AuthorizedKeys::parse(with_options.as_bytes()).is_ok());
}

/// RSA and ECDSA keys are accepted beside Ed25519 ones (ssh-key parses RSA public keys
/// without its `rsa` feature); the fingerprints are the ones `ssh-keygen -l` printed.
#[test]
fn rsa_ecdsa_and_ed25519_keys_with_their_fingerprints() {
    let rsa = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQCtI+jOqej1VHvk/r+Xc0Sk7zMSbHG8R2mNxoOiB65lgZ/If3jZbHcIAAzfmfDWbmffTGEu8Y8JYvj3Nq0MVtXNOR55sC3Qwnh9UmgPbNEe+XCt5EGAp1plFRPDsm3mQsE/Q+Y1gK4alQgC2cPY4T5wZaKOURuuiN2VmFSqtw3bLCEodF9J0A6cMf4fLSRbcBWbrsXy2Prr0ogGUnteA+U+V6WudKju00kwVAzifQFvqGMAohowYKXI4hH9mdJ2SbfVTDlg8UzVKfrnJ+poM2zS5F62gG6e4cSztrgVe4BwYRZV8O5aQbRTdD/u1LGd4e47L/6Ydn5SwecCdtzLc8aT ops-rsa@example";
    let ecdsa = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBMWPaFGuD3wrccZrKBn3gOsohMh9iSXX3/EhHNvmXAw9jR6469dNMh5aMrYjArpV3Q2/5dNnezGql/pPMeBCSFg= ops-ec@example";
    let text = format!("{rsa}\n{ecdsa}\n{KEY}\n");
    let keys = AuthorizedKeys::parse(text.as_bytes()).unwrap();
    assert_eq!(keys.text, text);
    assert_eq!(
        keys.fingerprints[..2],
        [
            "SHA256:T0YuJX/vETcxESKI0lZHnpaYPiaY+mZrUsU4lpibu8w",
            "SHA256:KIM/2RXTfWMhuM9QmBWzWXS3LxgBGgJxGGOhwlv+Ovk",
        ]
    );
    // A damaged blob is still refused, RSA or not.
    let broken = rsa.replace("AAAAB3NzaC1yc2EAAAADAQABAAABAQ", "AAAAB3NzaC1yc2EAAAADAQABAAAB");
    let e = AuthorizedKeys::parse(broken.as_bytes()).unwrap_err();
    assert_eq!((e.kind, e.field.as_deref()), (ErrorKind::InvalidValue, Some("line 1")), "{e}");
}

#[test]
fn bad_secrets() {
    let e = EncryptedSecrets::parse(b"wifi_shop = \"plain\"\n").unwrap_err();
    assert_eq!(e.kind, ErrorKind::PlainTextSecret);
    assert!(e.to_string().starts_with("secrets.age: not an age file"));

    let pass = {
        let enc = age::Encryptor::with_user_passphrase("pw".to_string().into());
        let mut out = Vec::new();
        let mut w = enc.wrap_output(&mut out).unwrap();
        std::io::Write::write_all(&mut w, b"a = \"b\"").unwrap();
        w.finish().unwrap();
        out
    };
    let e = EncryptedSecrets::parse(&pass).unwrap_err();
    assert!(e.to_string().contains("passphrase"), "{e}");

    let e = EncryptedSecrets::parse(b"-----BEGIN AGE ENCRYPTED FILE-----\nx\n").unwrap_err();
    assert!(e.to_string().contains("armored"));
    let e = EncryptedSecrets::parse(b"age-encryption.org/v1\n-> X25519 broken\n").unwrap_err();
    assert_eq!(e.kind, ErrorKind::Syntax);

    // Encrypted to someone else: parses on the host, fails on the device with its recipient.
    let me = age::x25519::Identity::generate();
    let other = age::x25519::Identity::generate();
    let enc = EncryptedSecrets::parse(&secrets_for(&other, "a = \"b\"")).unwrap();
    let e = enc.decrypt(&me).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotDecryptable);
    assert!(e.to_string().contains(&me.to_public().to_string()));

    // Bad plaintext is refused before encryption, and names the secret.
    let e = secrets::encrypt(b"Bad = \"x\"", &[me.to_public()]).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("Bad"));
    let e = secrets::encrypt(b"a = 3", &[me.to_public()]).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("a"));
    let e = secrets::encrypt(b"a = \"x", &[me.to_public()]).unwrap_err();
    assert!(!e.to_string().contains("\"x"), "must not echo the plaintext: {e}");
    assert!(secrets::encrypt(b"a = \"x\"", &[]).is_err());
}

#[test]
fn the_otp_identity_is_stable_and_device_specific() {
    let a = identity::from_otp_key(&[7; 32]);
    let b = identity::from_otp_key(&[7; 32]);
    let c = identity::from_otp_key(&[8; 32]);
    assert_eq!(a.to_public(), b.to_public());
    assert_ne!(a.to_public(), c.to_public());
    assert_eq!(identity::recipient_from_otp_key(&[7; 32]), a.to_public().to_string());
    // Secrets encrypted on the bench to the recipient decrypt on the board.
    let enc = EncryptedSecrets::parse(&secrets_for(&a, "k = \"v\"")).unwrap();
    assert_eq!(enc.decrypt(&b).unwrap().get("k"), Some("v"));

    assert_eq!(identity::otp_key_from_output(&[0; 32]), None, "unprogrammed OTP");
    assert_eq!(identity::otp_key_from_output(&[1; 31]), None);
    assert_eq!(identity::otp_key_from_output(&[1; 33]), None);
    assert_eq!(identity::otp_key_from_output(&[1; 32]), Some([1; 32]));

    let text = identity::identity_file_text(&a, identity::Source::Otp);
    assert_eq!(identity::parse_identity(&text).unwrap().to_public(), a.to_public());
    assert!(identity::parse_identity("# nothing\n").is_err());
    assert!(identity::parse_identity("AGE-SECRET-KEY-1XYZ").is_err());
}

#[test]
fn a_provision_folder_is_read_and_a_subfolder_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(DEVICE_TOML), DEVICE).unwrap();
    std::fs::write(dir.path().join(AUTHORIZED_KEYS), KEY).unwrap();
    let p = Provisioning::from_dir(dir.path()).unwrap();
    assert_eq!(p.files().len(), 2);
    std::fs::write(dir.path().join("extra.cfg"), "x").unwrap();
    let e = Provisioning::from_dir(dir.path()).unwrap_err();
    assert!(format!("{e:#}").contains("extra.cfg: unexpected file"), "{e:#}");
    std::fs::remove_file(dir.path().join("extra.cfg")).unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    assert!(format!("{:#}", Provisioning::from_dir(dir.path()).unwrap_err())
        .contains("not a regular file"));
}

#[test]
fn hostname_rules() {
    for ok in ["a", "cam-1", "A1", &"x".repeat(63)] {
        assert!(check_hostname(ok).is_ok(), "{ok}");
    }
    for bad in ["", "-a", "a-", "a.b", "a_b", "ä", &"x".repeat(64)] {
        assert!(check_hostname(bad).is_err(), "{bad}");
    }
}

#[test]
fn a_ca_bundle_named_by_device_toml_is_checked_and_kept() {
    let (ca_pem, _) = crate::testutil::test_tls();
    let device = DEVICE.replace(
        "mirrors = [\"https://mirror.example.net/fleet\"]",
        "mirrors = [\"https://mirror.example.net/fleet\"]\nca_bundle = \"fleet-ca.pem\"",
    );
    let set = files(&[(DEVICE_TOML, device.as_bytes()), ("fleet-ca.pem", ca_pem.as_bytes())]);
    let p = validate_files(&set).unwrap();
    assert_eq!(p.device.channel.ca_bundle.as_deref(), Some("fleet-ca.pem"));
    let names: Vec<&str> = p.files().iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, [DEVICE_TOML, "fleet-ca.pem"], "written last, to /data like the others");
    assert_eq!(
        p.device.channel.ca_bundle_path(Path::new("/data")).unwrap(),
        Path::new("/data/metrica/provision/fleet-ca.pem")
    );
    // (files, file named, field named, kind, words of the message)
    type Case<'a> = (Vec<(String, Vec<u8>)>, &'a str, Option<&'a str>, ErrorKind, &'a str);
    let cases: [Case; 4] = [
        (
            files(&[(DEVICE_TOML, device.as_bytes())]),
            DEVICE_TOML,
            Some("channel.ca_bundle"),
            ErrorKind::MissingFile,
            "names \"fleet-ca.pem\", which is not on the provision partition",
        ),
        (
            files(&[(DEVICE_TOML, device.as_bytes()), ("fleet-ca.pem", b"not a certificate")]),
            "fleet-ca.pem",
            None,
            ErrorKind::Syntax,
            "no PEM certificate (-----BEGIN CERTIFICATE-----) in it; expected PEM CA certificates",
        ),
        (
            files(&[
                (DEVICE_TOML, device.replace("fleet-ca.pem", "../ca.pem").as_bytes()),
                ("fleet-ca.pem", ca_pem.as_bytes()),
            ]),
            DEVICE_TOML,
            Some("channel.ca_bundle"),
            ErrorKind::InvalidValue,
            "\"../ca.pem\" is not a CA bundle file name",
        ),
        (
            files(&[(DEVICE_TOML, DEVICE.as_bytes()), ("fleet-ca.pem", ca_pem.as_bytes())]),
            "fleet-ca.pem",
            None,
            ErrorKind::UnexpectedFile,
            "and the CA bundle named by device.toml channel.ca_bundle",
        ),
    ];
    for (set, file, field, kind, words) in cases {
        let errs = validate_files(&set).unwrap_err().0;
        let e = errs.iter().find(|e| e.file == file).unwrap_or_else(|| panic!("{errs:?}"));
        assert_eq!((e.field.as_deref(), e.kind), (field, kind), "{e}");
        assert!(e.to_string().contains(words), "{words}: {e}");
    }
}
