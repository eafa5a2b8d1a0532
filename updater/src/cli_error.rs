//! The one error style of `imager` and `updater`: `PROGRAM: error: WHAT: WHY`, each cause once.
//!
//! How a command line uses it (new subcommands need nothing: returning an `anyhow::Error` from
//! the dispatch is enough):
//!
//! ```text
//! let cli = match Cli::try_parse() {
//!     Ok(cli) => cli,
//!     Err(e) => return cli_error::clap_exit("imager", &e), // clap's own errors, same style
//! };
//! if let Err(e) = run(cli) {
//!     eprintln!("{}", cli_error::render("imager", &e));
//! }
//! ```
//!
//! Contexts say WHAT was being done (`reading fleet.csv`), the innermost error WHY. A context
//! that already quotes its cause (`format!("... {e}")`) does not print that cause again.

use std::process::ExitCode;

/// The message of an error chain, outermost first, skipping every cause whose text an outer
/// message already contains (so `reading x: No such file (os error 2)` is not followed by the
/// same io error again).
pub fn message(err: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in err.chain() {
        let text = cause.to_string();
        let text = text.trim();
        if text.is_empty() || parts.iter().any(|p| p.contains(text)) {
            continue;
        }
        parts.push(text.to_string());
    }
    parts.join(": ")
}

/// `PROGRAM: error: MESSAGE` for an error a command returned.
pub fn render(program: &str, err: &anyhow::Error) -> String {
    format!("{program}: error: {}", message(err))
}

/// Prints a clap parse error in the same style and returns its exit code: 0 for `--help` and
/// `--version` (printed as clap prints them), 2 for a usage error and for a missing
/// subcommand (its help printed as is).
pub fn clap_exit(program: &str, err: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match err.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = err.print();
            ExitCode::SUCCESS
        }
        // No subcommand given: the help, as clap prints it (not an error line), exit 2.
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = err.print();
            ExitCode::from(2)
        }
        _ => {
            eprint!("{}", clap_text(program, err));
            ExitCode::from(2)
        }
    }
}

/// clap's text of a usage error with its `error: ` replaced by `PROGRAM: error: `.
pub fn clap_text(program: &str, err: &clap::Error) -> String {
    let text = err.render().to_string();
    let body = text.strip_prefix("error: ").unwrap_or(&text);
    format!("{program}: error: {body}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory");
        let e = Err::<(), _>(io)
            .with_context(|| "reading nonexist: No such file or directory")
            .unwrap_err();
        assert_eq!(
            render("imager", &e),
            "imager: error: reading nonexist: No such file or directory"
        );
        let inner = anyhow::anyhow!("version 1.0.0 is not newer than the committed 1.0.0");
        let e = inner.context("installing x.mfb");
        assert_eq!(
            message(&e),
            "installing x.mfb: version 1.0.0 is not newer than the committed 1.0.0"
        );
    }

    #[test]
    fn clap_errors_get_the_program_prefix() {
        use clap::Parser;
        #[derive(Debug, Parser)]
        #[command(name = "demo")]
        struct Demo {
            #[arg(long)]
            flag: bool,
        }
        let e = Demo::try_parse_from(["demo", "--nope"]).unwrap_err();
        let text = clap_text("demo", &e);
        assert!(text.starts_with("demo: error: unexpected argument '--nope'"), "{text}");
        assert_eq!(text.matches("error:").count(), 1, "{text}");
    }
}
