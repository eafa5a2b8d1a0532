//! `autoboot.txt` on the `config` partition: which slot the Raspberry Pi firmware boots.
//!
//! The file is always exactly [`AUTOBOOT_SIZE`] bytes (the text, padded with newlines), so a
//! commit rewrites one sector in place and never changes the file's size, its FAT chain or its
//! directory entry. See docs/design.md, "Commit".

use crate::layout::Slot;
use thiserror::Error;

/// Size of `autoboot.txt` on disk: one 512-byte sector.
pub const AUTOBOOT_SIZE: usize = 512;

/// What `autoboot.txt` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Autoboot {
    /// The slot of `[all] boot_partition`: the committed slot, booted by default.
    pub committed: Slot,
    /// The slot of `[tryboot] boot_partition`: booted once after `reboot "0 tryboot"`.
    pub tryboot: Slot,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum AutobootError {
    #[error("autoboot.txt line {line}: {what}")]
    Invalid { line: usize, what: String },
    #[error("autoboot.txt: missing {0}")]
    Missing(&'static str),
}

impl Autoboot {
    /// The file for "`committed` boots by default, the other slot on a trial boot".
    pub fn committed(slot: Slot) -> Autoboot {
        Autoboot { committed: slot, tryboot: slot.other() }
    }

    /// Renders the file, padded with newlines to exactly [`AUTOBOOT_SIZE`] bytes.
    pub fn render(&self) -> Vec<u8> {
        let text = format!(
            "[all]\ntryboot_a_b=1\nboot_partition={}\n[tryboot]\nboot_partition={}\n",
            self.committed.boot().number,
            self.tryboot.boot().number
        );
        let mut bytes = text.into_bytes();
        assert!(bytes.len() <= AUTOBOOT_SIZE);
        bytes.resize(AUTOBOOT_SIZE, b'\n');
        bytes
    }

    /// Parses the file as the updater expects it: `[all]` with `tryboot_a_b=1` and a
    /// `boot_partition` naming a boot slot, and `[tryboot]` with the other one.
    pub fn parse(bytes: &[u8]) -> Result<Autoboot, AutobootError> {
        let text = std::str::from_utf8(bytes)
            .map_err(|_| AutobootError::Invalid { line: 0, what: "not UTF-8 text".into() })?;
        let mut section = "all";
        let (mut all, mut tryboot, mut ab) = (None, None, false);
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            let line_no = i + 1;
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = match name {
                    "all" => "all",
                    "tryboot" => "tryboot",
                    other => {
                        return Err(AutobootError::Invalid {
                            line: line_no,
                            what: format!("unexpected section [{other}]"),
                        })
                    }
                };
                continue;
            }
            let (key, value) = line.split_once('=').ok_or_else(|| AutobootError::Invalid {
                line: line_no,
                what: format!("expected key=value, found {line:?}"),
            })?;
            match (section, key.trim()) {
                ("all", "tryboot_a_b") => ab = value.trim() == "1",
                (sec, "boot_partition") => {
                    let n: u32 = value.trim().parse().map_err(|_| AutobootError::Invalid {
                        line: line_no,
                        what: format!("boot_partition {value:?} is not a number"),
                    })?;
                    let slot =
                        Slot::from_boot_partition(n).ok_or_else(|| AutobootError::Invalid {
                            line: line_no,
                            what: format!("boot_partition={n} is not a boot slot"),
                        })?;
                    if sec == "all" {
                        all = Some(slot);
                    } else {
                        tryboot = Some(slot);
                    }
                }
                (_, other) => {
                    return Err(AutobootError::Invalid {
                        line: line_no,
                        what: format!("unexpected key {other:?}"),
                    })
                }
            }
        }
        if !ab {
            return Err(AutobootError::Missing("[all] tryboot_a_b=1"));
        }
        let committed = all.ok_or(AutobootError::Missing("[all] boot_partition"))?;
        let tryboot = tryboot.ok_or(AutobootError::Missing("[tryboot] boot_partition"))?;
        Ok(Autoboot { committed, tryboot })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_is_one_sector_and_parses_back() {
        for slot in Slot::ALL {
            let a = Autoboot::committed(slot);
            let bytes = a.render();
            assert_eq!(bytes.len(), AUTOBOOT_SIZE);
            assert_eq!(Autoboot::parse(&bytes), Ok(a));
        }
        let text = String::from_utf8(Autoboot::committed(Slot::A).render()).unwrap();
        assert!(text
            .starts_with("[all]\ntryboot_a_b=1\nboot_partition=2\n[tryboot]\nboot_partition=3\n"));
    }

    #[test]
    fn rejects_torn_or_foreign_files() {
        let good = Autoboot::committed(Slot::B).render();
        assert!(Autoboot::parse(&good[..20]).is_err());
        assert!(Autoboot::parse(b"").is_err());
        assert!(Autoboot::parse(&[0xff; 512]).is_err());
        assert!(Autoboot::parse(
            b"[all]\ntryboot_a_b=1\nboot_partition=5\n[tryboot]\nboot_partition=2\n"
        )
        .is_err());
        assert!(Autoboot::parse(b"[pi4]\nboot_partition=2\n").is_err());
    }
}
