//! The `ferryd` binary: parses the command line and hands over to the library.

use std::process::ExitCode;

use clap::Parser;

use ferryd::cli::{Cli, Command};
use ferryd::config::Config;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => {
            ferryd::logging::init();
            match ferryd::daemon::run(&config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Status { config, unit } => ferryd::status::run(&config, &unit),
        Command::Check { config } => match Config::load(&config) {
            Ok(effective) => {
                print!("{}", effective.to_toml());
                eprintln!("{}: valid, {} route(s)", config.display(), effective.routes.len());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ferryd: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
