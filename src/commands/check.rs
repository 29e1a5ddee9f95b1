//! `ferryd check` and `ferryd handover-check`: whether a configuration file is valid, for a
//! person (the effective configuration, every default filled in) and for `ExecReload=`; and the
//! question a live upgrade asks of the next binary before it executes it (can you read this
//! file, which hand-over formats do you speak).
//!
//! It must not touch the running daemon.

use std::path::Path;
use std::process::ExitCode;

use crate::config::Config;

/// Prints the effective configuration (unless `quiet`); exit 0 when valid, 1 with the reason.
pub fn run(config: &Path, quiet: bool) -> ExitCode {
    match Config::load(config) {
        Ok(effective) => {
            if !quiet {
                print!("{}", effective.to_toml());
                eprintln!("{}: valid, {} route(s)", config.display(), effective.routes.len());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ferryd: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Prints the hand-over formats this binary reads and writes when it accepts `config`.
pub fn handover(config: &Path) -> ExitCode {
    match Config::load(config) {
        Ok(_) => {
            println!("{}", crate::handover::versions_line());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ferryd: {e}");
            ExitCode::FAILURE
        }
    }
}
