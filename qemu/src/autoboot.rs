//! `autoboot.txt` as the Raspberry Pi bootloader reads it, written from the Raspberry Pi
//! documentation (config_txt/autoboot.adoc), not from the updater's code.
//!
//! Documented facts this model follows:
//! - the file is limited to 512 bytes;
//! - only the `[all]`, `[none]` and `[tryboot]` conditional filters are supported; `[tryboot]`
//!   passes only when the one-shot tryboot flag is set, `[none]` never passes, and lines before
//!   the first filter apply always (as `[all]`);
//! - `boot_partition=N` counts from 1; 0 means the default partition (the first bootable FAT
//!   partition);
//! - `tryboot_a_b=1` makes a tryboot switch partitions instead of loading `tryboot.txt`.
//!
//! Where the documentation is silent the model is strict, because it is a test oracle: a file
//! that is too long, holds bytes that are not ASCII text (a torn write leaves zeros), has a
//! line that is neither a filter, a comment nor `key=value`, or a value that is not a number
//! is *unparseable*, and the caller falls back to the partition walk (`PARTITION_WALK=1`).
//! Unknown keys and unsupported filters are accepted with a warning, as the firmware ignores
//! what it does not know.

use std::fmt;

/// The documented size limit of `autoboot.txt`.
pub const MAX_LEN: usize = 512;

/// Why an `autoboot.txt` cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AutobootError {
    #[error("autoboot.txt is {0} bytes, more than the 512 the firmware reads")]
    TooLong(usize),
    #[error("autoboot.txt has a byte that is not ASCII text (0x{byte:02x}) at offset {offset}")]
    NotText { offset: usize, byte: u8 },
    #[error("autoboot.txt line {line}: expected [filter], # comment or key=value, got {text:?}")]
    Malformed { line: usize, text: String },
    #[error("autoboot.txt line {line}: {key} must be {expected}, got {value:?}")]
    BadValue { line: usize, key: &'static str, expected: &'static str, value: String },
}

/// A conditional filter section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    All,
    None,
    Tryboot,
    /// A filter that `autoboot.txt` does not support; its settings never apply.
    Unsupported(String),
}

impl Filter {
    fn passes(&self, tryboot: bool) -> bool {
        match self {
            Filter::All => true,
            Filter::Tryboot => tryboot,
            Filter::None | Filter::Unsupported(_) => false,
        }
    }
}

/// A setting the model understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    BootPartition(u32),
    TrybootAB(bool),
}

/// One parsed `autoboot.txt`: its settings in file order with the filter each is under.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Autoboot {
    pub settings: Vec<(Filter, Setting)>,
    /// Things the firmware would ignore but a test should see (unknown keys, filters).
    pub warnings: Vec<String>,
}

/// What applies for one boot, after the filters are evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Resolved {
    /// `None` when no passing section sets it (the default partition is used).
    pub boot_partition: Option<u32>,
    pub tryboot_a_b: bool,
}

impl Autoboot {
    /// Parses the file's bytes.
    pub fn parse(bytes: &[u8]) -> Result<Autoboot, AutobootError> {
        if bytes.len() > MAX_LEN {
            return Err(AutobootError::TooLong(bytes.len()));
        }
        if let Some(offset) = bytes.iter().position(|b| !is_text(*b)) {
            return Err(AutobootError::NotText { offset, byte: bytes[offset] });
        }
        // Every byte is ASCII, so this cannot fail.
        let text = std::str::from_utf8(bytes).expect("ascii is utf-8");
        let mut out = Autoboot::default();
        let mut filter = Filter::All;
        for (index, raw) in text.split('\n').enumerate() {
            let line_no = index + 1;
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                filter = match name.trim() {
                    "all" => Filter::All,
                    "none" => Filter::None,
                    "tryboot" => Filter::Tryboot,
                    other => {
                        out.warnings.push(format!(
                            "line {line_no}: filter [{other}] is not supported in autoboot.txt; its settings are ignored"
                        ));
                        Filter::Unsupported(other.to_string())
                    }
                };
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(AutobootError::Malformed { line: line_no, text: line.to_string() });
            };
            let (key, value) = (key.trim(), value.trim());
            let setting = match key {
                "boot_partition" => {
                    Setting::BootPartition(parse_number(value).ok_or_else(|| {
                        AutobootError::BadValue {
                            line: line_no,
                            key: "boot_partition",
                            expected: "a partition number",
                            value: value.to_string(),
                        }
                    })?)
                }
                "tryboot_a_b" => match value {
                    "0" => Setting::TrybootAB(false),
                    "1" => Setting::TrybootAB(true),
                    _ => {
                        return Err(AutobootError::BadValue {
                            line: line_no,
                            key: "tryboot_a_b",
                            expected: "0 or 1",
                            value: value.to_string(),
                        })
                    }
                },
                "" => {
                    return Err(AutobootError::Malformed { line: line_no, text: line.to_string() })
                }
                other => {
                    out.warnings.push(format!("line {line_no}: unknown key {other:?} ignored"));
                    continue;
                }
            };
            out.settings.push((filter.clone(), setting));
        }
        Ok(out)
    }

    /// Evaluates the filters for a boot with or without the tryboot flag. Later lines win.
    pub fn resolve(&self, tryboot: bool) -> Resolved {
        let mut resolved = Resolved::default();
        for (filter, setting) in &self.settings {
            if !filter.passes(tryboot) {
                continue;
            }
            match *setting {
                Setting::BootPartition(n) => resolved.boot_partition = Some(n),
                Setting::TrybootAB(on) => resolved.tryboot_a_b = on,
            }
        }
        resolved
    }
}

fn is_text(b: u8) -> bool {
    matches!(b, b'\n' | b'\r' | b'\t' | 0x20..=0x7e)
}

/// Decimal, or hexadecimal with `0x`, as config.txt numbers are written.
fn parse_number(value: &str) -> Option<u32> {
    if let Some(hex) = value.strip_prefix("0x").or_else(|| value.strip_prefix("0X")) {
        u32::from_str_radix(hex, 16).ok()
    } else if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        value.parse().ok()
    } else {
        None
    }
}

impl fmt::Display for Resolved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.boot_partition {
            Some(n) => write!(f, "boot_partition={n}")?,
            None => write!(f, "boot_partition unset")?,
        }
        write!(f, " tryboot_a_b={}", u8::from(self.tryboot_a_b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMMITTED_A: &str =
        "[all]\ntryboot_a_b=1\nboot_partition=2\n[tryboot]\nboot_partition=3\n";

    fn padded(text: &str) -> Vec<u8> {
        let mut bytes = text.as_bytes().to_vec();
        bytes.resize(MAX_LEN, b'\n');
        bytes
    }

    #[test]
    fn committed_a_normal_and_tryboot() {
        let a = Autoboot::parse(COMMITTED_A.as_bytes()).unwrap();
        assert_eq!(a.resolve(false), Resolved { boot_partition: Some(2), tryboot_a_b: true });
        assert_eq!(a.resolve(true), Resolved { boot_partition: Some(3), tryboot_a_b: true });
        assert!(a.warnings.is_empty());
    }

    #[test]
    fn committed_b_swaps() {
        let a = Autoboot::parse(
            b"[all]\ntryboot_a_b=1\nboot_partition=3\n[tryboot]\nboot_partition=2\n",
        )
        .unwrap();
        assert_eq!(a.resolve(false).boot_partition, Some(3));
        assert_eq!(a.resolve(true).boot_partition, Some(2));
    }

    #[test]
    fn padded_to_512_with_newlines_is_fine() {
        let a = Autoboot::parse(&padded(COMMITTED_A)).unwrap();
        assert_eq!(a.resolve(true).boot_partition, Some(3));
    }

    #[test]
    fn crlf_comments_and_spaces() {
        let text = "# slot A\r\n[all]\r\n tryboot_a_b = 1 \r\nboot_partition=2\r\n[ tryboot ]\r\nboot_partition=3\r\n";
        let a = Autoboot::parse(text.as_bytes()).unwrap();
        assert_eq!(a.resolve(false), Resolved { boot_partition: Some(2), tryboot_a_b: true });
        assert_eq!(a.resolve(true).boot_partition, Some(3));
    }

    #[test]
    fn lines_before_any_filter_apply_always() {
        let a = Autoboot::parse(b"boot_partition=2\n[tryboot]\nboot_partition=3\n").unwrap();
        assert_eq!(a.resolve(false).boot_partition, Some(2));
        assert_eq!(a.resolve(true).boot_partition, Some(3));
        assert!(!a.resolve(true).tryboot_a_b);
    }

    #[test]
    fn none_filter_never_applies() {
        let a = Autoboot::parse(b"[all]\nboot_partition=2\n[none]\nboot_partition=5\n").unwrap();
        assert_eq!(a.resolve(false).boot_partition, Some(2));
        assert_eq!(a.resolve(true).boot_partition, Some(2));
    }

    #[test]
    fn all_after_tryboot_applies_again() {
        let a = Autoboot::parse(b"[tryboot]\nboot_partition=3\n[all]\nboot_partition=2\n").unwrap();
        // The later [all] line wins even in a trial boot.
        assert_eq!(a.resolve(true).boot_partition, Some(2));
    }

    #[test]
    fn later_lines_win() {
        let a = Autoboot::parse(b"boot_partition=2\nboot_partition=3\n").unwrap();
        assert_eq!(a.resolve(false).boot_partition, Some(3));
    }

    #[test]
    fn unsupported_filter_is_ignored_with_a_warning() {
        let a = Autoboot::parse(b"[all]\nboot_partition=2\n[pi4]\nboot_partition=7\n").unwrap();
        assert_eq!(a.resolve(false).boot_partition, Some(2));
        assert_eq!(a.resolve(true).boot_partition, Some(2));
        assert_eq!(a.warnings.len(), 1);
        assert!(a.warnings[0].contains("[pi4]"), "{:?}", a.warnings);
    }

    #[test]
    fn unknown_key_is_ignored_with_a_warning() {
        let a = Autoboot::parse(b"boot_partition=2\nboot_delay=1\n").unwrap();
        assert_eq!(a.resolve(false).boot_partition, Some(2));
        assert!(a.warnings[0].contains("boot_delay"));
    }

    #[test]
    fn empty_and_blank_files_have_no_partition() {
        for text in ["", "\n\n\n", "# nothing\n"] {
            let a = Autoboot::parse(text.as_bytes()).unwrap();
            assert_eq!(a.resolve(false), Resolved::default(), "{text:?}");
        }
        let a = Autoboot::parse(&padded("")).unwrap();
        assert_eq!(a.resolve(true).boot_partition, None);
    }

    #[test]
    fn hex_partition_numbers() {
        let a = Autoboot::parse(b"boot_partition=0x3\n").unwrap();
        assert_eq!(a.resolve(false).boot_partition, Some(3));
    }

    #[test]
    fn partition_zero_is_kept_as_zero() {
        let a = Autoboot::parse(b"boot_partition=0\n").unwrap();
        assert_eq!(a.resolve(false).boot_partition, Some(0));
    }

    #[test]
    fn bad_inputs_and_the_error_each_gives() {
        let long = "#".repeat(513);
        let cases: &[(&[u8], AutobootError)] = &[
            (long.as_bytes(), AutobootError::TooLong(513)),
            (b"[all]\nboot_partition=2\0\0\0", AutobootError::NotText { offset: 22, byte: 0 }),
            (b"boot_partition=\xff", AutobootError::NotText { offset: 15, byte: 0xff }),
            (b"[all]\nboot_parti", AutobootError::Malformed { line: 2, text: "boot_parti".into() }),
            (b"=3\n", AutobootError::Malformed { line: 1, text: "=3".into() }),
            (
                b"boot_partition=two\n",
                AutobootError::BadValue {
                    line: 1,
                    key: "boot_partition",
                    expected: "a partition number",
                    value: "two".into(),
                },
            ),
            (
                b"boot_partition=\n",
                AutobootError::BadValue {
                    line: 1,
                    key: "boot_partition",
                    expected: "a partition number",
                    value: "".into(),
                },
            ),
            (
                b"boot_partition=-1\n",
                AutobootError::BadValue {
                    line: 1,
                    key: "boot_partition",
                    expected: "a partition number",
                    value: "-1".into(),
                },
            ),
            (
                b"tryboot_a_b=yes\n",
                AutobootError::BadValue {
                    line: 1,
                    key: "tryboot_a_b",
                    expected: "0 or 1",
                    value: "yes".into(),
                },
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(
                Autoboot::parse(input).unwrap_err(),
                *expected,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn every_truncation_of_the_committed_file_parses_or_fails_cleanly() {
        // A torn write can leave any prefix; each must give a result, never a panic.
        let full = padded(COMMITTED_A);
        for len in 0..=full.len() {
            let _ = Autoboot::parse(&full[..len]).map(|a| a.resolve(true));
        }
        // Prefixes that end inside "boot_partition=2" are malformed, not a wrong partition,
        // except where the prefix is itself a valid number ("boot_partition=" is not).
        let cut = COMMITTED_A.find("boot_partition=2").unwrap() + "boot_parti".len();
        assert!(Autoboot::parse(&full[..cut]).is_err());
    }

    #[test]
    fn display_of_resolved() {
        let r = Resolved { boot_partition: Some(3), tryboot_a_b: true };
        assert_eq!(r.to_string(), "boot_partition=3 tryboot_a_b=1");
        assert_eq!(Resolved::default().to_string(), "boot_partition unset tryboot_a_b=0");
    }
}
