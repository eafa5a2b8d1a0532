//! Signing keys: ed25519 key pairs as PEM files that `openssl pkey` reads.
//!
//! `generate(dir, name)` writes `<dir>/<name>.key` (PKCS#8 `PRIVATE KEY`, mode 0600, never
//! committed: `keys/*.key` is gitignored) and `<dir>/<name>.pub.pem` (SPKI `PUBLIC KEY`).
//! A folder of `*.pub.pem` files is a keyring (`updater::sign::Keyring`); the key id is the
//! first 16 hex characters of sha256 of the SPKI DER. Keys made by
//! `openssl genpkey -algorithm ed25519` load as well. See keys/README.md.

use anyhow::{bail, Context, Result};
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{SigningKey, VerifyingKey};
use std::io::Write;
use std::path::{Path, PathBuf};
use updater::sign::{public_key_from_pem, public_key_to_pem, KeyId, PUBLIC_KEY_SUFFIX};

/// Suffix of a private key file.
pub const PRIVATE_KEY_SUFFIX: &str = ".key";

/// The files of a generated key pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPair {
    pub private: PathBuf,
    pub public: PathBuf,
    pub key_id: KeyId,
}

/// Generates a key pair `<dir>/<name>.key` + `<dir>/<name>.pub.pem` from the OS's random
/// source. Refuses to overwrite either file. `name` is a plain file name such as
/// `metrica-dev-2026`.
pub fn generate(dir: &Path, name: &str) -> Result<KeyPair> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        bail!("key name {name:?} must be a plain file name");
    }
    let private = dir.join(format!("{name}{PRIVATE_KEY_SUFFIX}"));
    let public = dir.join(format!("{name}{PUBLIC_KEY_SUFFIX}"));
    for p in [&private, &public] {
        if p.exists() {
            bail!("{} already exists; not overwriting a key", p.display());
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let key = SigningKey::generate(&mut rand_core::OsRng);
    // PKCS#8 v1 (no embedded public key): OpenSSL 3.0 does not read ed25519 v2 documents.
    let v1 = ed25519_dalek::pkcs8::KeypairBytes { secret_key: key.to_bytes(), public_key: None };
    let pem = v1
        .to_pkcs8_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
        .context("encoding the private key")?;
    write_new(&private, pem.as_bytes(), 0o600)?;
    write_new(&public, public_key_to_pem(&key.verifying_key()).as_bytes(), 0o644)?;
    Ok(KeyPair { private, public, key_id: KeyId::of(&key.verifying_key()) })
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes).with_context(|| format!("writing {}", path.display()))?;
    f.sync_all().with_context(|| format!("syncing {}", path.display()))
}

/// Loads a private key (PKCS#8 PEM `PRIVATE KEY`, ed25519).
pub fn load_signing_key(path: &Path) -> Result<SigningKey> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    SigningKey::from_pkcs8_pem(text.trim_start()).map_err(|e| {
        anyhow::anyhow!("{}: not an ed25519 PKCS#8 PEM private key: {e}", path.display())
    })
}

/// Loads a public key (SPKI PEM `PUBLIC KEY`, ed25519).
pub fn load_public_key(path: &Path) -> Result<VerifyingKey> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(public_key_from_pem(&text, &path.display().to_string())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use updater::sign::{Keyring, SignatureFile};

    fn openssl(args: &[&str]) -> std::process::Output {
        let out = Command::new("openssl").args(args).output().expect("openssl is installed");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out
    }

    #[test]
    fn generated_keys_are_read_by_openssl_and_ids_match() {
        let dir = tempfile::tempdir().unwrap();
        let pair = generate(dir.path(), "dev").unwrap();
        assert_eq!(pair.private, dir.path().join("dev.key"));
        let mode = std::fs::metadata(&pair.private).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
        let priv_path = pair.private.to_str().unwrap();
        let pub_path = pair.public.to_str().unwrap();
        // openssl derives the same public key from our private key.
        let derived = openssl(&["pkey", "-in", priv_path, "-pubout"]);
        assert_eq!(derived.stdout, std::fs::read(&pair.public).unwrap());
        let text = openssl(&["pkey", "-in", priv_path, "-noout", "-text"]);
        assert!(String::from_utf8_lossy(&text.stdout).contains("ED25519"));
        // The key id is sha256 of the SPKI DER that openssl writes.
        let der = openssl(&["pkey", "-pubin", "-in", pub_path, "-outform", "DER"]);
        use sha2::Digest;
        let want = hex::encode(sha2::Sha256::digest(&der.stdout));
        assert_eq!(pair.key_id.as_str(), &want[..16]);
        assert!(generate(dir.path(), "dev").is_err(), "never overwrites");
        assert!(generate(dir.path(), "../x").is_err());
    }

    #[test]
    fn openssl_keys_sign_and_openssl_verifies_our_signatures() {
        let dir = tempfile::tempdir().unwrap();
        let key_path = dir.path().join("ossl.key");
        let pub_path = dir.path().join("ossl.pub.pem");
        openssl(&["genpkey", "-algorithm", "ed25519", "-out", key_path.to_str().unwrap()]);
        openssl(&[
            "pkey",
            "-in",
            key_path.to_str().unwrap(),
            "-pubout",
            "-out",
            pub_path.to_str().unwrap(),
        ]);
        let key = load_signing_key(&key_path).unwrap();
        assert_eq!(load_public_key(&pub_path).unwrap(), key.verifying_key());
        let ring = Keyring::load(dir.path()).unwrap();
        let msg = b"format = 1\n";
        let sig = SignatureFile::sign(&key, msg);
        assert!(ring.verify(msg, &sig).is_ok());
        // openssl verifies the raw signature over the same bytes.
        let (msg_path, sig_path) = (dir.path().join("m"), dir.path().join("s"));
        std::fs::write(&msg_path, msg).unwrap();
        std::fs::write(&sig_path, sig.signature.to_bytes()).unwrap();
        let out = openssl(&[
            "pkeyutl",
            "-verify",
            "-pubin",
            "-inkey",
            pub_path.to_str().unwrap(),
            "-rawin",
            "-in",
            msg_path.to_str().unwrap(),
            "-sigfile",
            sig_path.to_str().unwrap(),
        ]);
        assert!(String::from_utf8_lossy(&out.stdout).contains("Signature Verified Successfully"));
    }

    #[test]
    fn malformed_keys_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.key");
        std::fs::write(&p, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
            .unwrap();
        let err = load_signing_key(&p).unwrap_err().to_string();
        assert!(err.contains("bad.key"), "{err}");
        let err = load_public_key(&p).unwrap_err().to_string();
        assert!(err.contains("bad.key"), "{err}");
        assert!(load_signing_key(&dir.path().join("missing.key")).is_err());
    }
}
