//! The `ferryd` binary: parses the command line and dispatches to the command (see
//! `ferryd::commands`).

use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser};

use ferryd::cli::{Cli, Command};
use ferryd::commands;

/// The static musl build (the package's) allocates through dlmalloc: musl's own allocator returns
/// a connection's memory to the kernel when it ends and maps it again for the next (an mmap, a
/// munmap and a TLB flush per connection, measured with strace). dlmalloc keeps freed memory for
/// reuse (up to its 2 MiB trim threshold). glibc builds keep glibc's allocator, which already
/// does.
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Run { config } => commands::run::daemon(&config),
        Command::Nat { action } => commands::nat::run(action),
        Command::Check { config, quiet } => commands::check::run(&config, quiet),
        Command::HandoverCheck { config } => commands::check::handover(&config),
        Command::Status { config, unit } => commands::status::run(&config, &unit),
        Command::Doctor { config, json } => commands::doctor::run(&config, json),
        Command::Connections {
            config,
            route,
            json,
            close,
        } => commands::connections::run(commands::connections::Request {
            config: &config,
            route: route.as_deref(),
            json,
            close,
        }),
        Command::Upgrade { config, timeout } => commands::upgrade::run(&config, Duration::from_secs(timeout)),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "ferryd", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
    }
}
