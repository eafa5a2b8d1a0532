//! Sizes and speeds for people: IEC units (KiB, MiB, GiB: powers of 1024) everywhere on a
//! terminal, one decimal. Machine output (`--json`) carries exact bytes, never these strings.
//!
//! Every command of `imager` and `updater` formats sizes through [`size`] and speeds through
//! [`speed`], so no two commands disagree on a unit.

/// `bytes` in the largest IEC unit that keeps the number at or above 1: `512 B`, `1.5 KiB`,
/// `552.0 MiB`, `1.0 GiB`.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A speed of `bytes` in `seconds`, in MiB/s.
pub fn speed(bytes: u64, seconds: f64) -> String {
    format!("{:.1} MiB/s", mib_per_sec(bytes, seconds))
}

/// The number behind [`speed`] (for JSON reports that carry the rate).
pub fn mib_per_sec(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64 / seconds.max(1e-9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_use_iec_units() {
        assert_eq!(size(0), "0 B");
        assert_eq!(size(1023), "1023 B");
        assert_eq!(size(1536), "1.5 KiB");
        assert_eq!(size(552 << 20), "552.0 MiB");
        assert_eq!(size(1 << 30), "1.0 GiB", "a 1 GiB file is 1.0 GiB, not 1.1 GB");
        assert_eq!(size(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn speeds_are_mib_per_second() {
        assert_eq!(speed(100 << 20, 2.0), "50.0 MiB/s");
        assert!(mib_per_sec(1, 0.0).is_finite());
    }
}
