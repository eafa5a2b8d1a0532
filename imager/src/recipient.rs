//! `imager recipient`: the age recipient (`age1...`) that `--recipient` wants, from what an
//! engineer has at hand: a board's OTP private key (as `rpi-otp-private-key -b` prints it, or
//! in hex), an age identity file (a device's `age.key` or an operator's key), or a device's
//! `updater status --json`.

use anyhow::{bail, Context, Result};
use std::path::Path;
use updater::provision::identity;

/// Where a recipient was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum From {
    OtpKey,
    Identity,
    Status,
}

/// The recipient of a board's OTP key file: 32 raw bytes or 64 hex digits.
pub fn from_otp_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let key: [u8; 32] = match bytes.len() {
        32 => bytes.as_slice().try_into().expect("32 bytes"),
        _ => {
            let text = String::from_utf8_lossy(&bytes);
            let hex_text: String = text.split_whitespace().collect();
            let decoded = hex::decode(&hex_text).ok().filter(|d| d.len() == 32);
            let Some(d) = decoded else {
                bail!(
                    "{}: {} bytes; expected an OTP private key: 32 bytes (rpi-otp-private-key -b) or 64 hex digits",
                    path.display(),
                    bytes.len()
                );
            };
            d.try_into().expect("32 bytes")
        }
    };
    if key.iter().all(|&b| b == 0) {
        bail!("{}: the OTP key is all zeros (never programmed)", path.display());
    }
    Ok(identity::recipient_from_otp_key(&key))
}

/// The recipient of an age identity file (`AGE-SECRET-KEY-1...`).
pub fn from_identity_file(path: &Path) -> Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let id =
        identity::parse_identity(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(id.to_public().to_string())
}

/// The recipient a device reports in `updater status --json` (`provisioning.recipient`).
pub fn from_status_file(path: &Path) -> Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| {
        format!("{}: not JSON; expected the output of `updater status --json`", path.display())
    })?;
    match v["provisioning"]["recipient"].as_str() {
        Some(r) if r.starts_with("age1") => Ok(r.to_string()),
        _ => bail!(
            "{}: no provisioning.recipient; the device has not set up its identity yet (its first boot reports it)",
            path.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn otp_identity_and_status_agree() {
        let dir = tempfile::tempdir().unwrap();
        let otp = [7u8; 32];
        let want = identity::recipient_from_otp_key(&otp);
        let raw = dir.path().join("otp.bin");
        std::fs::write(&raw, otp).unwrap();
        assert_eq!(from_otp_file(&raw).unwrap(), want);
        let hexed = dir.path().join("otp.hex");
        std::fs::write(&hexed, format!("{}\n", hex::encode(otp))).unwrap();
        assert_eq!(from_otp_file(&hexed).unwrap(), want);
        let id = dir.path().join("age.key");
        let text =
            identity::identity_file_text(&identity::from_otp_key(&otp), identity::Source::Otp);
        std::fs::write(&id, text).unwrap();
        assert_eq!(from_identity_file(&id).unwrap(), want);
        let status = dir.path().join("status.json");
        std::fs::write(&status, format!("{{\"provisioning\":{{\"recipient\":\"{want}\"}}}}"))
            .unwrap();
        assert_eq!(from_status_file(&status).unwrap(), want);
    }

    #[test]
    fn bad_inputs_say_what_was_expected() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        std::fs::write(&p, "hello").unwrap();
        let e = from_otp_file(&p).unwrap_err().to_string();
        assert!(e.contains("5 bytes; expected an OTP private key"), "{e}");
        std::fs::write(&p, [0u8; 32]).unwrap();
        assert!(from_otp_file(&p).unwrap_err().to_string().contains("all zeros"));
        std::fs::write(&p, "# nothing\n").unwrap();
        assert!(from_identity_file(&p)
            .unwrap_err()
            .to_string()
            .contains("expected an AGE-SECRET-KEY"));
        std::fs::write(&p, "{\"provisioning\":{\"result\":\"not-run\"}}").unwrap();
        assert!(from_status_file(&p)
            .unwrap_err()
            .to_string()
            .contains("no provisioning.recipient"));
        std::fs::write(&p, "device_id,hostname\n").unwrap();
        assert!(from_status_file(&p).unwrap_err().to_string().contains("not JSON"));
    }
}
