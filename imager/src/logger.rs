//! The imager's logger: plain lines on stderr (`imager: LEVEL: message`), at the level the
//! `IMAGER_LOG` environment variable names: `off`, `error`, `warn` (the default), `info`,
//! `debug` or `trace`. Every child process is logged at `debug` ([`crate::cmd`]), so
//! `IMAGER_LOG=debug imager build ...` shows each command line the build runs.

use log::{LevelFilter, Log, Metadata, Record};

/// The environment variable that sets the level.
pub const ENV: &str = "IMAGER_LOG";

/// The level when `IMAGER_LOG` is not set.
pub const DEFAULT: LevelFilter = LevelFilter::Warn;

/// The level an `IMAGER_LOG` value names (case-insensitive); an unknown one is an error that
/// lists the known ones.
pub fn parse_level(value: &str) -> Result<LevelFilter, String> {
    value.trim().parse().map_err(|_| {
        format!("{ENV}={value:?} is not a level; expected off, error, warn, info, debug or trace")
    })
}

/// The line written for a record.
pub fn line(record: &Record<'_>) -> String {
    format!("imager: {}: {}", record.level().as_str().to_ascii_lowercase(), record.args())
}

struct Stderr;

impl Log for Stderr {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if self.enabled(record.metadata()) {
            eprintln!("{}", line(record));
        }
    }

    fn flush(&self) {}
}

/// Installs the logger at the level of `IMAGER_LOG`; an unknown value is said once and the
/// default level used. A second call (tests) leaves the first logger in place.
pub fn install() {
    let level = match std::env::var(ENV) {
        Err(_) => DEFAULT,
        Ok(value) => parse_level(&value).unwrap_or_else(|e| {
            eprintln!("imager: warning: {e}; using {}", DEFAULT.as_str().to_ascii_lowercase());
            DEFAULT
        }),
    };
    if log::set_logger(&Stderr).is_ok() {
        log::set_max_level(level);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_lines() {
        assert_eq!(parse_level("debug"), Ok(LevelFilter::Debug));
        assert_eq!(parse_level("DEBUG"), Ok(LevelFilter::Debug));
        assert_eq!(parse_level("off"), Ok(LevelFilter::Off));
        let e = parse_level("loud").unwrap_err();
        assert!(e.contains("IMAGER_LOG=\"loud\"") && e.contains("trace"), "{e}");
        let said = line(
            &Record::builder()
                .level(log::Level::Debug)
                .args(format_args!("running mke2fs"))
                .build(),
        );
        assert_eq!(said, "imager: debug: running mke2fs");
    }
}
