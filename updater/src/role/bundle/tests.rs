use std::io::Read;

use ed25519_dalek::SigningKey;

use super::testkit::{keyring_of, make_role_bundle, test_key, write_role};
use super::*;

/// A test role with one image archive, built into a bundle; returns (tempdir, bundle path).
fn built() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let role = tmp.path().join("app");
    write_role(&role, "app", "1.2.0");
    std::fs::create_dir(role.join("conf")).unwrap();
    std::fs::write(role.join("conf/app.conf"), "port=8080\n").unwrap();
    let image = tmp.path().join("app-image.tar");
    std::fs::write(&image, vec![7u8; 3000]).unwrap();
    let bundle = make_role_bundle(&role, &[image], &test_key(1), tmp.path());
    (tmp, bundle)
}

/// The members of a bundle, in order (test-side reading with the `tar` crate).
fn members(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut a = tar::Archive::new(bytes);
    a.entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let name = String::from_utf8(e.path_bytes().into_owned()).unwrap();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            (name, data)
        })
        .collect()
}

/// A ustar archive of `members`, names written raw (no checks), regular files.
fn raw(members: &[(String, Vec<u8>)]) -> Vec<u8> {
    raw_typed(members, tar::EntryType::Regular)
}

fn raw_typed(members: &[(String, Vec<u8>)], last_type: tar::EntryType) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (i, (name, data)) in members.iter().enumerate() {
        let mut h = tar::Header::new_ustar();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        let last = i + 1 == members.len();
        h.set_entry_type(if last { last_type } else { tar::EntryType::Regular });
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, &data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

/// Replaces the manifest by `edit(manifest)` and signs it again with `key`.
fn resigned(
    bytes: &[u8],
    key: &SigningKey,
    edit: impl FnOnce(&mut Manifest),
) -> Vec<(String, Vec<u8>)> {
    let mut ms = members(bytes);
    let mut m = Manifest::parse(&ms[0].1).unwrap();
    edit(&mut m);
    let text = toml::to_string(&m).unwrap().into_bytes();
    ms[1].1 = SignatureFile::sign(key, &text).to_bytes();
    ms[0].1 = text;
    ms
}

fn ring() -> Keyring {
    keyring_of(&test_key(1))
}

#[test]
fn a_bundle_verifies_unpacks_and_is_reproducible() {
    let (tmp, path) = built();
    assert_eq!(path.file_name().unwrap(), "app-1.2.0.mfr");
    let bytes = std::fs::read(&path).unwrap();
    let v = verify_bytes(&bytes, &ring()).unwrap();
    assert_eq!(v.signer, KeyId::of(&test_key(1).verifying_key()));
    let paths: Vec<_> = v.manifest.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, ["compose.yaml", "conf/app.conf", "images/app-image.tar", "role.toml"]);
    assert_eq!(v.manifest.total_size(), v.manifest.files.iter().map(|f| f.size).sum::<u64>());
    assert_eq!(v.spec.role.name.0, "app");

    let dest = tmp.path().join("release");
    let u = unpack(&path, &ring(), &dest).unwrap();
    assert_eq!((u.name.as_str(), u.version.to_string().as_str()), ("app", "1.2.0"));
    assert_eq!(std::fs::read(dest.join("conf/app.conf")).unwrap(), b"port=8080\n");
    assert_eq!(std::fs::read(dest.join("images/app-image.tar")).unwrap(), vec![7u8; 3000]);
    assert_eq!(
        std::fs::read(dest.join("role.toml")).unwrap(),
        std::fs::read(tmp.path().join("app/role.toml")).unwrap()
    );

    // Same inputs, same bytes.
    let again = tempfile::tempdir().unwrap();
    let image = tmp.path().join("app-image.tar");
    let second = make_role_bundle(&tmp.path().join("app"), &[image], &test_key(1), again.path());
    assert_eq!(std::fs::read(second).unwrap(), bytes);
    // And `tar` lists it.
    assert_eq!(members(&bytes)[0].0, MANIFEST_NAME);
}

#[test]
fn the_repositorys_safe_mode_role_builds_into_a_bundle() {
    let role = Path::new(env!("CARGO_MANIFEST_DIR")).join("../roles/safe-mode");
    let tmp = tempfile::tempdir().unwrap();
    let path = make_role_bundle(&role, &[], &test_key(1), tmp.path());
    assert_eq!(path.file_name().unwrap(), "safe-mode-1.0.0.mfr");
    let u = unpack(&path, &ring(), &tmp.path().join("r")).unwrap();
    assert_eq!(u.name, "safe-mode");
    for f in ["role.toml", "compose.yaml", "httpd.conf", "html/index.html", "html/cgi-bin/api.sh"] {
        assert_eq!(
            std::fs::read(u.dir.join(f)).unwrap(),
            std::fs::read(role.join(f)).unwrap(),
            "{f}"
        );
    }
    // The unpacked folder is a role folder again: it passes the spec.
    spec::load(&u.dir.join(ROLE_FILE)).unwrap();
}

#[test]
fn a_bad_signature_or_an_unknown_key_is_refused_before_the_manifest_is_read() {
    let (_tmp, path) = built();
    let bytes = std::fs::read(&path).unwrap();
    let mut ms = members(&bytes);
    ms[0].1 = String::from_utf8(ms[0].1.clone()).unwrap().replace("1.2.0", "1.2.1").into_bytes();
    let err = verify_bytes(&raw(&ms), &ring()).unwrap_err();
    assert!(
        matches!(&err, RoleBundleError::Signature { source: SignError::BadSignature(_), .. }),
        "{err}"
    );

    let other = keyring_of(&test_key(2));
    let err = verify_bytes(&bytes, &other).unwrap_err();
    assert!(matches!(&err, RoleBundleError::Signature { source: SignError::UnknownKey(_), .. }));
    assert!(err.to_string().contains("not in the keyring"), "{err}");

    let err = unpack(&path, &other, &path.with_extension("d")).unwrap_err();
    assert!(err.to_string().starts_with(&path.display().to_string()), "{err}");
    assert!(!path.with_extension("d").exists(), "dest is removed on error");
}

#[test]
fn a_tampered_member_is_refused_naming_it_and_dest_is_removed() {
    let (tmp, path) = built();
    let mut ms = members(&std::fs::read(&path).unwrap());
    let compose = ms.iter_mut().find(|(n, _)| n == "compose.yaml").unwrap();
    compose.1[0] ^= 1;
    let bad = tmp.path().join("bad.mfr");
    std::fs::write(&bad, raw(&ms)).unwrap();
    let dest = tmp.path().join("dest");
    let err = unpack(&bad, &ring(), &dest).unwrap_err();
    assert!(
        matches!(&err, RoleBundleError::Tampered { member, path } if member == "compose.yaml" && path == &bad),
        "{err}"
    );
    assert!(!dest.exists());
    assert!(err.to_string().contains("bad.mfr: member compose.yaml"), "{err}");
}

#[test]
fn an_extra_a_missing_or_a_reordered_member_is_refused() {
    let (_tmp, path) = built();
    let ms = members(&std::fs::read(&path).unwrap());

    let mut extra = ms.clone();
    extra.push(("evil.sh".into(), b"rm -rf /".to_vec()));
    let err = verify_bytes(&raw(&extra), &ring()).unwrap_err();
    assert!(matches!(&err, RoleBundleError::Member { member, .. } if member == "evil.sh"), "{err}");
    assert!(err.to_string().contains("not listed in the signed manifest"), "{err}");

    let mut missing = ms.clone();
    missing.pop();
    let err = verify_bytes(&raw(&missing), &ring()).unwrap_err();
    assert!(
        matches!(&err, RoleBundleError::Member { member, .. } if member == "role.toml"),
        "{err}"
    );

    let mut swapped = ms.clone();
    swapped.swap(2, 3);
    let err = verify_bytes(&raw(&swapped), &ring()).unwrap_err();
    assert!(err.to_string().contains("where \"compose.yaml\" was expected"), "{err}");

    let mut unsigned = ms;
    unsigned.remove(1);
    let err = verify_bytes(&raw(&unsigned), &ring()).unwrap_err();
    assert!(err.to_string().contains(SIGNATURE_NAME), "{err}");
}

#[test]
fn traversal_absolute_paths_and_links_are_refused() {
    let (_tmp, path) = built();
    let bytes = std::fs::read(&path).unwrap();
    let key = test_key(1);
    for evil in ["../evil", "/etc/passwd", "conf/../../x", "a//b", "./x", "images/x/y.tar", "a\\b"]
    {
        let mut ms = resigned(&bytes, &key, |m| m.files[0].path = evil.to_string());
        ms[2].0 = evil.to_string();
        let err = verify_bytes(&raw(&ms), &ring()).unwrap_err();
        assert!(matches!(&err, RoleBundleError::Manifest { .. }), "{evil}: {err}");
        assert!(err.to_string().contains(&format!("{evil:?}")), "{evil}: {err}");
    }
    // A member name that is not the signed one (here a traversal) is refused by name.
    let mut ms = members(&bytes);
    ms[2].0 = "../compose.yaml".into();
    let err = verify_bytes(&raw(&ms), &ring()).unwrap_err();
    assert!(matches!(&err, RoleBundleError::Member { member, .. } if member == "../compose.yaml"));
    // A link (or anything not a regular file) in the archive.
    let ms = members(&bytes);
    let err = verify_bytes(&raw_typed(&ms, tar::EntryType::Symlink), &ring()).unwrap_err();
    assert!(err.to_string().contains("is not a regular file"), "{err}");
}

#[test]
fn a_link_in_the_role_folder_is_refused_by_the_writer() {
    let tmp = tempfile::tempdir().unwrap();
    let role = tmp.path().join("app");
    write_role(&role, "app", "1.0.0");
    std::os::unix::fs::symlink("/etc/passwd", role.join("passwd")).unwrap();
    let err = collect(&role, &[]).unwrap_err();
    assert!(format!("{err:#}").contains("passwd: not a regular file"), "{err:#}");
    let bad_image = tmp.path().join("image.tgz");
    std::fs::write(&bad_image, b"x").unwrap();
    std::fs::remove_file(role.join("passwd")).unwrap();
    let err = collect(&role, &[bad_image]).unwrap_err();
    assert!(format!("{err:#}").contains("images/NAME.tar"), "{err:#}");
}

#[test]
fn every_truncation_is_refused() {
    let (_tmp, path) = built();
    let bytes = std::fs::read(&path).unwrap();
    for cut in (0..bytes.len()).step_by(97).chain([bytes.len() - 1, bytes.len() - 512]) {
        let err = verify_bytes(&bytes[..cut], &ring()).unwrap_err();
        let ok = matches!(err, RoleBundleError::Truncated { .. } | RoleBundleError::Member { .. });
        assert!(ok, "cut at {cut}: {err}");
    }
    let mut padded = bytes.clone();
    let end_of_manifest = 512 + members(&bytes)[0].1.len();
    padded[end_of_manifest] = b'x';
    let err = verify_bytes(&padded, &ring()).unwrap_err();
    assert!(err.to_string().contains("padding"), "{err}");
    let mut trailing = bytes;
    trailing.extend_from_slice(&[0u8; 512]);
    let err = verify_bytes(&trailing, &ring()).unwrap_err();
    assert!(err.to_string().contains("data after the end"), "{err}");
    let err = verify_bytes(b"hello", &ring()).unwrap_err();
    assert!(matches!(err, RoleBundleError::Truncated { .. }), "{err}");
    let err = verify_bytes(&[1u8; 1024], &ring()).unwrap_err();
    assert!(matches!(err, RoleBundleError::NotABundle { .. }), "{err}");
}

#[test]
fn a_manifest_that_disagrees_with_role_toml_is_refused() {
    let (_tmp, path) = built();
    let bytes = std::fs::read(&path).unwrap();
    let key = test_key(1);
    type Edit = Box<dyn FnOnce(&mut Manifest)>;
    let cases: [(&str, Edit); 3] = [
        ("version", Box::new(|m| m.version = semver::Version::new(9, 0, 0))),
        ("name", Box::new(|m| m.name = "other".into())),
        ("os", Box::new(|m| m.os = semver::VersionReq::parse(">=2.0.0").unwrap())),
    ];
    for (want, edit) in cases {
        let err = verify_bytes(&raw(&resigned(&bytes, &key, edit)), &ring()).unwrap_err();
        assert!(matches!(&err, RoleBundleError::Mismatch { field, .. } if *field == want), "{err}");
    }
    let err = verify_bytes(&raw(&resigned(&bytes, &key, |m| m.format = 2)), &ring()).unwrap_err();
    assert!(err.to_string().contains("format 2, expected 1"), "{err}");
}

#[test]
fn oversized_members_are_refused_before_they_are_read() {
    let (_tmp, path) = built();
    let bytes = std::fs::read(&path).unwrap();
    // A manifest entry whose header claims more than MAX_MANIFEST.
    let mut ms = members(&bytes);
    ms[0].1 = vec![b'#'; MAX_MANIFEST as usize + 1];
    let err = verify_bytes(&raw(&ms), &ring()).unwrap_err();
    assert!(
        matches!(&err, RoleBundleError::TooLarge { member, limit, .. } if member == MANIFEST_NAME && *limit == MAX_MANIFEST),
        "{err}"
    );
    // A signed manifest listing a file above its limit.
    let ms = resigned(&bytes, &test_key(1), |m| m.files[1].size = MAX_FILE + 1);
    let err = verify_bytes(&raw(&ms), &ring()).unwrap_err();
    assert!(err.to_string().contains("conf/app.conf"), "{err}");
    // A member header larger than the limit of its kind, even if the manifest were smaller.
    let mut h = tar::Header::new_ustar();
    h.set_path("compose.yaml").unwrap();
    h.set_size(MAX_FILE + 1);
    h.set_cksum();
    let ms = members(&bytes);
    let mut head = raw(&ms[..2]);
    head.truncate(head.len() - 1024);
    head.extend_from_slice(h.as_bytes());
    let err = verify_bytes(&head, &ring()).unwrap_err();
    assert!(
        matches!(&err, RoleBundleError::TooLarge { member, .. } if member == "compose.yaml"),
        "{err}"
    );
}

#[test]
fn manifest_rules() {
    let (_tmp, path) = built();
    let m = Manifest::parse(&members(&std::fs::read(&path).unwrap())[0].1).unwrap();
    let check = |edit: &dyn Fn(&mut Manifest)| {
        let mut m = m.clone();
        edit(&mut m);
        m.check().unwrap_err()
    };
    assert!(check(&|m| m.files.swap(0, 1)).contains("ascending"));
    assert!(check(&|m| m.files[1].path = m.files[0].path.clone()).contains("ascending"));
    assert!(check(&|m| m.files[0].sha256 = "zz".into()).contains("sha256"));
    assert!(check(&|m| m.files.retain(|f| f.path != ROLE_FILE)).contains("no role.toml"));
    assert!(check(&|m| m.files.clear()).contains("0 files"));
    assert!(check(&|m| m.name = "Bad Name".into()).contains("invalid role name"));
    assert!(check(&|m| {
        m.files[0].path = "conf".into();
    })
    .contains("is a file, not a folder"));
    // Not only the path just before: `conf-x` sorts between `conf` and `conf/app.conf`.
    let err = check(&|m| {
        let mut extra = m.files[0].clone();
        extra.path = "conf-x".into();
        m.files.insert(1, extra);
        m.files[0].path = "conf".into();
    });
    assert!(err.contains("\"conf\" is a file, not a folder"), "{err}");
    assert!(Manifest::parse(b"format = 1\nextra = 2\n").unwrap_err().contains("extra"));
    assert_eq!(baked_path("zigbee-hub"), Path::new("/usr/share/metrica/roles/zigbee-hub.mfr"));
}

#[test]
fn unpack_refuses_an_existing_destination_and_leaves_it_alone() {
    let (tmp, path) = built();
    let dest = tmp.path().join("exists");
    std::fs::create_dir(&dest).unwrap();
    std::fs::write(dest.join("keep"), b"x").unwrap();
    let err = unpack(&path, &ring(), &dest).unwrap_err();
    assert!(matches!(err, RoleBundleError::Dest { .. }), "{err}");
    // The refusal is before anything is created; `dest` was not ours to remove.
    assert!(dest.join("keep").exists());
    let err = verify_file(&tmp.path().join("none.mfr"), &ring()).unwrap_err();
    assert!(matches!(err, RoleBundleError::Io { .. }), "{err}");
}

/// Random damage to a valid bundle never panics, and whatever still verifies is a bundle whose
/// manifest passes every rule (the in-process cousin of a fuzz target on `verify_bytes`).
#[test]
fn random_damage_is_refused_or_harmless() {
    let (_tmp, path) = built();
    let bytes = std::fs::read(&path).unwrap();
    let ring = ring();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut refused = 0;
    for _ in 0..3000 {
        let mut d = bytes.clone();
        for _ in 0..(next() % 4 + 1) {
            let i = (next() % d.len() as u64) as usize;
            d[i] = next() as u8;
        }
        match verify_bytes(&d, &ring) {
            Ok(v) => v.manifest.check().unwrap(),
            Err(_) => refused += 1,
        }
    }
    assert!(refused > 2000, "only {refused} of 3000 damaged bundles were refused");
}
