//! The device's identity: the age X25519 key that decrypts `secrets.age`.
//!
//! The identity never sits on the card next to the secrets. Where it comes from, in order
//! (docs/provisioning.md, "Secrets and the device identity"):
//!
//! 1. `/data/metrica/identity/age.key`, when a previous boot already set it up;
//! 2. derived from the Raspberry Pi's OTP customer private key (256 bits in one-time
//!    programmable memory, readable only by root on that board through the firmware mailbox,
//!    `rpi-otp-private-key -b`): [`from_otp_key`], so the bench that programs the key can
//!    compute the recipient ([`recipient_from_otp_key`]) and `imager provision` can encrypt to
//!    it before the board ever boots: zero-touch secrets;
//! 3. otherwise generated at first boot. Secrets then cannot have been encrypted to it: they
//!    wait (the status says so and shows the recipient) until the card is re-provisioned with
//!    secrets encrypted to the recipient the device reports.

use age::secrecy::ExposeSecret;
use bech32::ToBase32;
use std::io::Read;
use std::path::Path;

/// Where the identity lives, relative to the data partition's root.
pub const IDENTITY_FILE: &str = "metrica/identity/age.key";
/// The matching public recipient (`age1...`), readable by anyone.
pub const RECIPIENT_FILE: &str = "metrica/identity/recipient.txt";

/// HKDF-SHA256 `info` for the OTP derivation; changing it changes every device's recipient.
const OTP_INFO: &[u8] = b"metrica-fleet-os provision age identity v1";

/// Where the device's identity came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// Derived from the board's OTP private key.
    Otp,
    /// Generated on the device at first boot.
    Generated,
}

/// The age identity derived from a 32-byte OTP private key (HKDF-SHA256, no salt).
pub fn from_otp_key(otp: &[u8; 32]) -> age::x25519::Identity {
    let hk = hkdf::Hkdf::<sha2::Sha256>::new(None, otp);
    let mut okm = [0u8; 32];
    hk.expand(OTP_INFO, &mut okm).expect("32 bytes is a valid HKDF-SHA256 length");
    let text = bech32::encode("age-secret-key-", okm.to_base32(), bech32::Variant::Bech32)
        .expect("valid HRP")
        .to_uppercase();
    okm.fill(0);
    text.parse().expect("a 32-byte secret is a valid identity")
}

/// The recipient (`age1...`) of the board whose OTP key is `otp` (for the bench and the imager).
pub fn recipient_from_otp_key(otp: &[u8; 32]) -> String {
    from_otp_key(otp).to_public().to_string()
}

/// Parses an identity file: comment lines (`#`) and one `AGE-SECRET-KEY-1...` line.
pub fn parse_identity(text: &str) -> Result<age::x25519::Identity, String> {
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .ok_or("no key; expected an AGE-SECRET-KEY-1... line")?;
    line.parse().map_err(|e| format!("not an age identity ({e}); expected AGE-SECRET-KEY-1..."))
}

/// The identity file's text.
pub fn identity_file_text(identity: &age::x25519::Identity, source: Source) -> String {
    let src = match source {
        Source::Otp => "otp",
        Source::Generated => "generated",
    };
    format!(
        "# metrica device identity (source: {src})\n# public key: {}\n{}\n",
        identity.to_public(),
        identity.to_string().expose_secret()
    )
}

/// Reads the OTP private key with `rpi-otp-private-key -b` (Raspberry Pi 4/5). `None` when
/// the tool is missing (not a Pi, or QEMU), fails, or the key was never programmed (all
/// zeros).
pub fn read_otp_key(tool: &Path) -> Option<[u8; 32]> {
    let out = std::process::Command::new(tool).arg("-b").output().ok()?;
    if !out.status.success() {
        return None;
    }
    otp_key_from_output(&out.stdout)
}

/// The key in `rpi-otp-private-key -b`'s output: exactly 32 bytes, not all zero.
pub fn otp_key_from_output(mut out: &[u8]) -> Option<[u8; 32]> {
    let mut key = [0u8; 32];
    out.read_exact(&mut key).ok()?;
    if !out.is_empty() || key.iter().all(|&b| b == 0) {
        return None;
    }
    Some(key)
}
