//! Signatures: ed25519 public keys as PEM, key ids, keyrings and `manifest.toml.sig`.
//!
//! - A public key is a PEM `PUBLIC KEY` (SPKI), as `openssl pkey -pubout` writes it.
//! - Its **key id** is the first 16 hex characters of the sha256 of its SPKI DER encoding, so
//!   `openssl pkey -pubin -in k.pub.pem -outform DER | sha256sum | cut -c1-16` prints it.
//! - A **keyring** is a folder; every `*.pub.pem` file in it is a trusted key, other files are
//!   ignored. Rotation = both keys present for a while (see keys/README.md).
//! - A signature file names its key id and holds an ed25519 signature over exact bytes.
//!
//! Private keys are generated and stored by the imager (`imager::keys`); the device only
//! verifies. [`SignatureFile::sign`] lives here next to the format so both sides share it.

use ed25519_dalek::pkcs8::{DecodePublicKey, EncodePublicKey};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// File name suffix of a trusted public key in a keyring folder.
pub const PUBLIC_KEY_SUFFIX: &str = ".pub.pem";
/// Length of a key id in hex characters.
pub const KEY_ID_LEN: usize = 16;
/// Largest signature file accepted (it is about 200 bytes).
pub const MAX_SIGNATURE_FILE: u64 = 4096;

/// Why a key or signature was not accepted. Callers branch on these (unknown key vs forgery).
#[derive(Debug, Error)]
pub enum SignError {
    #[error("{what}: not an ed25519 PEM key: {reason}")]
    MalformedPem { what: String, reason: String },
    #[error("signed by key {0}, which is not in the keyring")]
    UnknownKey(KeyId),
    #[error("bad signature: the data does not match its signature by key {0}")]
    BadSignature(KeyId),
    #[error("malformed signature file: {0}")]
    MalformedSignature(String),
    #[error("keyring {} holds no *{PUBLIC_KEY_SUFFIX} key", .0.display())]
    EmptyKeyring(PathBuf),
    #[error("reading {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
}

/// Identifies a public key: the first 16 hex characters of sha256(SPKI DER).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KeyId(String);

impl KeyId {
    /// The key id of a public key.
    pub fn of(key: &VerifyingKey) -> KeyId {
        let der = key.to_public_key_der().expect("an ed25519 key always encodes");
        let digest = Sha256::digest(der.as_bytes());
        KeyId(hex::encode(&digest[..KEY_ID_LEN / 2]))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for KeyId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        if s.len() == KEY_ID_LEN
            && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            Ok(KeyId(s))
        } else {
            Err(format!("key id {s:?} is not {KEY_ID_LEN} lowercase hex characters"))
        }
    }
}

impl From<KeyId> for String {
    fn from(k: KeyId) -> String {
        k.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Parses a PEM `PUBLIC KEY` (SPKI) holding an ed25519 key. `what` names it in errors.
pub fn public_key_from_pem(pem: &str, what: &str) -> Result<VerifyingKey, SignError> {
    VerifyingKey::from_public_key_pem(pem.trim_start())
        .map_err(|e| SignError::MalformedPem { what: what.to_string(), reason: e.to_string() })
}

/// Encodes a public key as PEM `PUBLIC KEY` (SPKI), LF line endings.
pub fn public_key_to_pem(key: &VerifyingKey) -> String {
    key.to_public_key_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
        .expect("an ed25519 key always encodes")
}

/// The set of trusted public keys, by key id.
#[derive(Debug, Clone, Default)]
pub struct Keyring {
    keys: BTreeMap<KeyId, VerifyingKey>,
}

impl Keyring {
    /// Loads every `*.pub.pem` file of `dir`. A malformed key file is an error (naming the
    /// file), and so is a folder without any key: a device must never trust nothing silently.
    pub fn load(dir: &Path) -> Result<Keyring, SignError> {
        let io = |source| SignError::Io { path: dir.to_path_buf(), source };
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name().is_some_and(|n| n.to_string_lossy().ends_with(PUBLIC_KEY_SUFFIX))
            })
            .collect();
        paths.sort();
        let mut ring = Keyring::default();
        for path in paths {
            let text = std::fs::read_to_string(&path)
                .map_err(|source| SignError::Io { path: path.clone(), source })?;
            ring.add(public_key_from_pem(&text, &path.display().to_string())?);
        }
        if ring.is_empty() {
            return Err(SignError::EmptyKeyring(dir.to_path_buf()));
        }
        Ok(ring)
    }

    /// A keyring of these keys.
    pub fn from_keys(keys: impl IntoIterator<Item = VerifyingKey>) -> Keyring {
        let mut ring = Keyring::default();
        for k in keys {
            ring.add(k);
        }
        ring
    }

    /// Trusts one more key; returns its id.
    pub fn add(&mut self, key: VerifyingKey) -> KeyId {
        let id = KeyId::of(&key);
        self.keys.insert(id.clone(), key);
        id
    }

    pub fn get(&self, id: &KeyId) -> Option<&VerifyingKey> {
        self.keys.get(id)
    }

    /// Key ids in order.
    pub fn ids(&self) -> impl Iterator<Item = &KeyId> {
        self.keys.keys()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Checks `sig` over exactly `message`; returns the signer's key id.
    pub fn verify(&self, message: &[u8], sig: &SignatureFile) -> Result<KeyId, SignError> {
        let key = self.get(&sig.key_id).ok_or_else(|| SignError::UnknownKey(sig.key_id.clone()))?;
        key.verify_strict(message, &sig.signature)
            .map_err(|_| SignError::BadSignature(sig.key_id.clone()))?;
        Ok(sig.key_id.clone())
    }
}

/// Signature algorithm named in signature files.
pub const ALGORITHM: &str = "ed25519";

/// A detached signature (`manifest.toml.sig`): TOML with `algorithm`, `key_id`, `signature`
/// (128 hex characters). Unknown keys are errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureFile {
    pub key_id: KeyId,
    pub signature: ed25519_dalek::Signature,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignatureToml {
    algorithm: String,
    key_id: KeyId,
    signature: String,
}

impl SignatureFile {
    /// Signs exactly `message`.
    pub fn sign(key: &SigningKey, message: &[u8]) -> SignatureFile {
        SignatureFile { key_id: KeyId::of(&key.verifying_key()), signature: key.sign(message) }
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let t = SignatureToml {
            algorithm: ALGORITHM.to_string(),
            key_id: self.key_id.clone(),
            signature: hex::encode(self.signature.to_bytes()),
        };
        toml::to_string(&t).expect("signature serializes").into_bytes()
    }

    /// Parses a signature file.
    pub fn parse(bytes: &[u8]) -> Result<SignatureFile, SignError> {
        let bad = |m: String| SignError::MalformedSignature(m);
        let text = std::str::from_utf8(bytes).map_err(|_| bad("not UTF-8".into()))?;
        let t: SignatureToml = toml::from_str(text).map_err(|e| bad(e.message().to_string()))?;
        if t.algorithm != ALGORITHM {
            return Err(bad(format!("algorithm {:?}, expected {ALGORITHM:?}", t.algorithm)));
        }
        let raw = hex::decode(&t.signature).map_err(|e| bad(format!("signature: {e}")))?;
        let raw: [u8; 64] =
            raw.try_into().map_err(|_| bad("signature: not 64 bytes".to_string()))?;
        Ok(SignatureFile {
            key_id: t.key_id,
            signature: ed25519_dalek::Signature::from_bytes(&raw),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fixed test key (never used outside tests).
    pub(crate) fn test_key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    #[test]
    fn sign_and_verify_round_trip_through_the_file_format() {
        let key = test_key(1);
        let ring = Keyring::from_keys([key.verifying_key(), test_key(2).verifying_key()]);
        let sig = SignatureFile::sign(&key, b"manifest");
        let parsed = SignatureFile::parse(&sig.to_bytes()).unwrap();
        assert_eq!(parsed, sig);
        assert_eq!(ring.verify(b"manifest", &parsed).unwrap(), KeyId::of(&key.verifying_key()));
    }

    #[test]
    fn verification_errors_are_typed() {
        let key = test_key(1);
        let sig = SignatureFile::sign(&key, b"manifest");
        let ring = Keyring::from_keys([key.verifying_key()]);
        assert!(matches!(ring.verify(b"manifesT", &sig), Err(SignError::BadSignature(_))));
        let other = Keyring::from_keys([test_key(3).verifying_key()]);
        assert!(
            matches!(other.verify(b"manifest", &sig), Err(SignError::UnknownKey(id)) if id == sig.key_id)
        );
    }

    #[test]
    fn malformed_signature_files_are_rejected() {
        let good = String::from_utf8(SignatureFile::sign(&test_key(1), b"x").to_bytes()).unwrap();
        let cases = [
            "".to_string(),
            "\u{0}\u{1}".to_string(),
            good.replace("ed25519", "rsa"),
            good.replace("signature = \"", "signature = \"zz"),
            good.replace("signature = \"", "signature = \"00"),
            good.clone() + "extra = 1\n",
            good.replace("key_id = \"", "key_id = \"X"),
        ];
        for c in cases {
            assert!(
                matches!(SignatureFile::parse(c.as_bytes()), Err(SignError::MalformedSignature(_))),
                "{c:?}"
            );
        }
    }

    #[test]
    fn keyring_loads_pub_pem_files_and_ignores_others() {
        let dir = tempfile::tempdir().unwrap();
        let (k1, k2) = (test_key(1).verifying_key(), test_key(2).verifying_key());
        std::fs::write(dir.path().join("old.pub.pem"), public_key_to_pem(&k1)).unwrap();
        std::fs::write(dir.path().join("new.pub.pem"), public_key_to_pem(&k2)).unwrap();
        std::fs::write(dir.path().join("README.md"), "not a key").unwrap();
        let ring = Keyring::load(dir.path()).unwrap();
        let ids: Vec<_> = ring.ids().cloned().collect();
        let mut want = vec![KeyId::of(&k1), KeyId::of(&k2)];
        want.sort();
        assert_eq!(ids, want);

        std::fs::write(dir.path().join("bad.pub.pem"), "-----BEGIN PUBLIC KEY-----\nAAAA\n")
            .unwrap();
        let err = Keyring::load(dir.path()).unwrap_err();
        assert!(
            matches!(&err, SignError::MalformedPem { what, .. } if what.ends_with("bad.pub.pem")),
            "{err}"
        );

        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(Keyring::load(empty.path()), Err(SignError::EmptyKeyring(_))));
        assert!(matches!(Keyring::load(&empty.path().join("nope")), Err(SignError::Io { .. })));
    }

    #[test]
    fn key_id_is_sha256_of_spki_der_and_validated() {
        let k = test_key(7).verifying_key();
        let der = k.to_public_key_der().unwrap();
        let want = hex::encode(Sha256::digest(der.as_bytes()))[..16].to_string();
        assert_eq!(KeyId::of(&k).as_str(), want);
        assert!(KeyId::try_from("ABCDEF0123456789".to_string()).is_err());
        assert!(KeyId::try_from("abc".to_string()).is_err());
        let pem = public_key_to_pem(&k);
        assert_eq!(public_key_from_pem(&pem, "k").unwrap(), k);
        assert!(matches!(public_key_from_pem("junk", "k"), Err(SignError::MalformedPem { .. })));
    }
}
