//! `secrets.age`: the device's secrets, encrypted with age (X25519) to the device's recipient.
//!
//! The plaintext is a TOML table of names to strings (`wifi_home = "passphrase"`). It only
//! ever exists in memory and, on the device, under `/data/metrica/secrets/` (mode 0600); the
//! card carries only the age file. A passphrase-encrypted (scrypt) or ASCII-armored file is
//! refused: the device has no one to type a passphrase, and armor only makes the file larger.

use super::{ErrorKind, ProvisionError, SECRETS_AGE};
use age::secrecy::ExposeSecret;
use std::collections::BTreeMap;
use std::io::{Read, Write};

/// A secret's name: 1 to 64 lowercase letters, digits and `_`, starting with a letter (it is
/// also a file name under /data/metrica/secrets/).
pub fn check_secret_name(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.as_bytes()[0].is_ascii_lowercase()
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a secret name; expected 1 to 64 lowercase letters, digits and '_', \
             starting with a letter"
        ))
    }
}

fn err(kind: ErrorKind, field: Option<&str>, m: impl Into<String>) -> ProvisionError {
    ProvisionError::new(SECRETS_AGE, field, kind, m)
}

/// A `secrets.age` whose header has been checked (age v1, X25519 recipients); its payload
/// can only be checked by the device that holds the identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptedSecrets {
    pub bytes: Vec<u8>,
}

impl EncryptedSecrets {
    pub fn parse(bytes: &[u8]) -> Result<Self, ProvisionError> {
        if bytes.starts_with(b"-----BEGIN AGE ENCRYPTED FILE-----") {
            return Err(err(
                ErrorKind::Syntax,
                None,
                "ASCII-armored age file; expected the binary format (age without --armor)",
            ));
        }
        if !bytes.starts_with(b"age-encryption.org/v1\n") {
            return Err(err(
                ErrorKind::PlainTextSecret,
                None,
                "not an age file; secrets must be encrypted to the device's recipient (age X25519), \
                 never written in plain text",
            ));
        }
        let d = age::Decryptor::new_buffered(bytes)
            .map_err(|e| err(ErrorKind::Syntax, None, format!("not a valid age file: {e}")))?;
        if d.is_scrypt() {
            return Err(err(
                ErrorKind::InvalidValue,
                None,
                "encrypted with a passphrase; expected it encrypted to the device's age recipient \
                 (age1...)",
            ));
        }
        let header = String::from_utf8_lossy(&bytes[..bytes.len().min(64 * 1024)]);
        let stanzas: Vec<&str> = header
            .lines()
            .take_while(|l| !l.starts_with("---"))
            .filter_map(|l| l.strip_prefix("-> "))
            .collect();
        // age adds random "grease" stanzas; what matters is that a device key can open it.
        if !stanzas.iter().any(|s| s.starts_with("X25519 ")) {
            return Err(err(
                ErrorKind::InvalidValue,
                None,
                "has no X25519 recipient; expected it encrypted to the device's age recipient (age1...)",
            ));
        }
        Ok(EncryptedSecrets { bytes: bytes.to_vec() })
    }

    /// Decrypts with the device's identity.
    pub fn decrypt(&self, identity: &age::x25519::Identity) -> Result<Secrets, ProvisionError> {
        let d = age::Decryptor::new_buffered(&self.bytes[..])
            .map_err(|e| err(ErrorKind::Syntax, None, format!("not a valid age file: {e}")))?;
        let mut reader =
            d.decrypt(std::iter::once(identity as &dyn age::Identity)).map_err(|e| {
                err(
                    ErrorKind::NotDecryptable,
                    None,
                    format!(
                        "cannot be decrypted with this device's identity ({e}); encrypt it to {}",
                        identity.to_public()
                    ),
                )
            })?;
        let mut plain = Vec::new();
        reader
            .read_to_end(&mut plain)
            .map_err(|e| err(ErrorKind::NotDecryptable, None, format!("corrupt payload: {e}")))?;
        Secrets::parse(&plain)
    }
}

/// Decrypted secrets, by name. `Debug` shows the names only.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secrets(BTreeMap<String, String>);

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl Secrets {
    /// Parses the plaintext: a TOML table of names to non-empty strings.
    pub fn parse(plain: &[u8]) -> Result<Self, ProvisionError> {
        let text = std::str::from_utf8(plain).map_err(|e| {
            err(ErrorKind::Syntax, None, format!("decrypted content is not UTF-8 text: {e}"))
        })?;
        let table: toml::Table = toml::from_str(text).map_err(|e| {
            // The message may quote the plaintext; give the line only.
            let line = e.span().map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            err(
                ErrorKind::Syntax,
                line.map(|l| format!("line {l}")).as_deref(),
                "decrypted content is not TOML; expected lines of name = \"value\"",
            )
        })?;
        let mut out = BTreeMap::new();
        for (name, value) in table {
            check_secret_name(&name).map_err(|m| err(ErrorKind::InvalidValue, Some(&name), m))?;
            match value {
                toml::Value::String(s) if !s.is_empty() => {
                    out.insert(name, s);
                }
                _ => {
                    return Err(err(
                        ErrorKind::InvalidValue,
                        Some(&name),
                        "expected a non-empty string",
                    ))
                }
            }
        }
        Ok(Secrets(out))
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

/// Parses an age recipient (`age1...`), naming `what` (a file and field) in the error.
pub fn parse_recipient(what: &str, s: &str) -> Result<age::x25519::Recipient, String> {
    s.trim()
        .parse()
        .map_err(|e| format!("{what}: {s:?} is not an age recipient ({e}); expected age1..."))
}

/// Encrypts a secrets plaintext (checked first) to the given recipients: what `imager
/// provision` writes as `secrets.age`.
pub fn encrypt(
    plain: &[u8],
    recipients: &[age::x25519::Recipient],
) -> Result<Vec<u8>, ProvisionError> {
    Secrets::parse(plain)?;
    let enc = age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
        .map_err(|e| err(ErrorKind::InvalidValue, None, format!("cannot encrypt: {e}")))?;
    let mut out = Vec::new();
    let io = |e: std::io::Error| err(ErrorKind::Syntax, None, format!("cannot encrypt: {e}"));
    let mut w = enc.wrap_output(&mut out).map_err(io)?;
    w.write_all(plain).map_err(io)?;
    w.finish().map_err(io)?;
    Ok(out)
}

/// The identity's secret text (`AGE-SECRET-KEY-1...`), for the identity file.
pub fn identity_text(identity: &age::x25519::Identity) -> String {
    identity.to_string().expose_secret().to_string()
}
