//! Power cuts: when to SIGKILL QEMU (a console line, a delay, a random delay in a window), and
//! a small seeded random generator so that a failing cut can be replayed with `--seed`. Pure.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A delay, fixed (`MIN == MAX`) or drawn uniformly in `[min, max]` milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delay {
    pub min_ms: u64,
    pub max_ms: u64,
}

impl Delay {
    pub const ZERO: Delay = Delay { min_ms: 0, max_ms: 0 };

    pub fn draw(&self, rng: &mut Rng) -> Duration {
        let span = self.max_ms - self.min_ms;
        let ms = if span == 0 { self.min_ms } else { self.min_ms + rng.next() % (span + 1) };
        Duration::from_millis(ms)
    }
}

impl FromStr for Delay {
    type Err = String;

    /// `1500` or `1000-8000` (milliseconds).
    fn from_str(s: &str) -> Result<Self, String> {
        let number = |t: &str| {
            t.trim()
                .parse::<u64>()
                .map_err(|_| format!("{s:?}: expected MS or MIN-MAX in milliseconds"))
        };
        let (min_ms, max_ms) = match s.split_once('-') {
            Some((a, b)) => (number(a)?, number(b)?),
            None => (number(s)?, number(s)?),
        };
        if min_ms > max_ms {
            return Err(format!("{s:?}: the minimum is above the maximum"));
        }
        Ok(Delay { min_ms, max_ms })
    }
}

impl fmt::Display for Delay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min_ms == self.max_ms {
            write!(f, "{} ms", self.min_ms)
        } else {
            write!(f, "{}-{} ms", self.min_ms, self.max_ms)
        }
    }
}

/// One power cut: fires at most once per run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CutPlan {
    /// Start the delay when a console line contains this text; `None`: when QEMU starts.
    pub on: Option<String>,
    /// Only in this boot (1 = the first); `None`: the first boot where `on` matches, or
    /// boot 1 when there is no pattern.
    pub boot: Option<usize>,
    pub delay: Delay,
}

impl CutPlan {
    /// Whether the delay starts at the beginning of boot `boot`.
    pub fn arms_at_start(&self, boot: usize) -> bool {
        self.on.is_none() && self.boot.unwrap_or(1) == boot
    }

    /// Whether `line` in boot `boot` starts the delay.
    pub fn arms_on_line(&self, boot: usize, line: &str) -> bool {
        self.on.as_deref().is_some_and(|p| line.contains(p)) && self.boot.is_none_or(|b| b == boot)
    }
}

impl fmt::Display for CutPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "power cut {} after ", self.delay)?;
        match &self.on {
            Some(p) => write!(f, "the line {p:?}")?,
            None => write!(f, "qemu starts")?,
        }
        if let Some(b) = self.boot {
            write!(f, " in boot {b}")?;
        }
        Ok(())
    }
}

/// splitmix64: small, seedable, good enough to spread cut times.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// A seed from the clock, for runs without `--seed`.
    pub fn clock_seed() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64 ^ u64::from(std::process::id()))
    }

    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_parse() {
        assert_eq!("1500".parse(), Ok(Delay { min_ms: 1500, max_ms: 1500 }));
        assert_eq!("1000-8000".parse(), Ok(Delay { min_ms: 1000, max_ms: 8000 }));
        assert_eq!(" 5 - 6 ".parse(), Ok(Delay { min_ms: 5, max_ms: 6 }));
        for bad in ["", "x", "1-", "-1", "9-1", "1.5"] {
            assert!(bad.parse::<Delay>().is_err(), "{bad}");
        }
    }

    #[test]
    fn draws_stay_in_the_window_and_replay() {
        let d = Delay { min_ms: 100, max_ms: 200 };
        let mut a = Rng::new(7);
        let draws: Vec<_> = (0..1000).map(|_| d.draw(&mut a)).collect();
        assert!(draws.iter().all(|x| (100..=200).contains(&(x.as_millis() as u64))));
        assert!(
            draws.iter().any(|x| x.as_millis() < 120) && draws.iter().any(|x| x.as_millis() > 180)
        );
        let mut b = Rng::new(7);
        assert_eq!(draws[0], d.draw(&mut b), "same seed, same cut");
        assert_eq!(Delay::ZERO.draw(&mut b), Duration::ZERO);
    }

    #[test]
    fn arming() {
        let at_start = CutPlan { on: None, boot: None, delay: Delay::ZERO };
        assert!(at_start.arms_at_start(1) && !at_start.arms_at_start(2));
        assert!(!at_start.arms_on_line(1, "anything"));
        let boot3 = CutPlan { on: None, boot: Some(3), delay: Delay::ZERO };
        assert!(!boot3.arms_at_start(1) && boot3.arms_at_start(3));
        let on = CutPlan { on: Some("installing".into()), boot: None, delay: Delay::ZERO };
        assert!(!on.arms_at_start(1));
        assert!(on.arms_on_line(4, "updater: installing slot b"));
        assert!(!on.arms_on_line(4, "updater: idle"));
        let on2 = CutPlan { boot: Some(2), ..on };
        assert!(!on2.arms_on_line(1, "installing") && on2.arms_on_line(2, "installing"));
        assert_eq!(on2.to_string(), "power cut 0 ms after the line \"installing\" in boot 2");
    }
}
