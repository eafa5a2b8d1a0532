//! Connectivity states from the time of the last contact with a mirror (pure logic).
//!
//! `online` while a mirror answered within the last 6 hours, `degraded` after 6 hours without
//! contact, `airgapped` after 24 hours. A device that never had contact counts from the time
//! the daemon first started on it. A clock that went backwards (now before the last contact)
//! counts as no time passed: a skewed clock never makes a device look offline.

use serde::Serialize;

/// No contact for this long: degraded.
pub const DEGRADED_AFTER: u64 = 6 * 3600;
/// No contact for this long: air-gapped.
pub const AIRGAPPED_AFTER: u64 = 24 * 3600;

/// How well the device reaches its channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Connectivity {
    Online,
    Degraded,
    Airgapped,
}

impl Connectivity {
    pub const ALL: [Connectivity; 3] =
        [Connectivity::Online, Connectivity::Degraded, Connectivity::Airgapped];

    pub fn name(self) -> &'static str {
        match self {
            Connectivity::Online => "online",
            Connectivity::Degraded => "degraded",
            Connectivity::Airgapped => "airgapped",
        }
    }
}

impl std::fmt::Display for Connectivity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The state at `now`, given the last contact (if any) and when the daemon first started.
pub fn classify(last_contact: Option<u64>, first_start: u64, now: u64) -> Connectivity {
    let since = last_contact.unwrap_or(first_start);
    let quiet = now.saturating_sub(since);
    if quiet >= AIRGAPPED_AFTER {
        Connectivity::Airgapped
    } else if quiet >= DEGRADED_AFTER {
        Connectivity::Degraded
    } else {
        Connectivity::Online
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: u64 = 1_800_000_000;

    #[test]
    fn thresholds_are_six_and_twenty_four_hours() {
        let cases = [
            (0, Connectivity::Online),
            (DEGRADED_AFTER - 1, Connectivity::Online),
            (DEGRADED_AFTER, Connectivity::Degraded),
            (AIRGAPPED_AFTER - 1, Connectivity::Degraded),
            (AIRGAPPED_AFTER, Connectivity::Airgapped),
            (7 * 24 * 3600, Connectivity::Airgapped),
        ];
        for (quiet, want) in cases {
            assert_eq!(classify(Some(T), 0, T + quiet), want, "quiet {quiet} s");
        }
    }

    #[test]
    fn never_contacted_counts_from_the_first_start() {
        assert_eq!(classify(None, T, T), Connectivity::Online);
        assert_eq!(classify(None, T, T + DEGRADED_AFTER), Connectivity::Degraded);
        assert_eq!(classify(None, T, T + AIRGAPPED_AFTER), Connectivity::Airgapped);
    }

    #[test]
    fn a_clock_that_went_back_is_not_offline() {
        assert_eq!(classify(Some(T), 0, T - 100_000), Connectivity::Online);
        assert_eq!(classify(None, T, 0), Connectivity::Online);
    }

    #[test]
    fn contact_brings_it_back_online() {
        let first = T;
        let later = T + 3 * 24 * 3600;
        assert_eq!(classify(Some(first), first, later), Connectivity::Airgapped);
        assert_eq!(classify(Some(later), first, later + 1), Connectivity::Online);
    }
}
