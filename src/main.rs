//! The `ferryd` binary: parses the command line and hands over to the library.

use std::process::ExitCode;

use clap::{CommandFactory, Parser};

use ferryd::cli::{Cli, Command, NatAction};

/// The static musl build (the package's) allocates through dlmalloc: musl's own allocator returns
/// a connection's memory to the kernel when it ends and maps it again for the next (an mmap, a
/// munmap and a TLB flush per connection, measured with strace). dlmalloc keeps freed memory for
/// reuse (up to its 2 MiB trim threshold). glibc builds keep glibc's allocator, which already
/// does.
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;
use ferryd::config::Config;

/// sysexits.h's EX_CONFIG: the configuration is invalid. The unit lists it in
/// RestartPreventExitStatus=, so a bad file stops the service with its message instead of
/// restarting it until the start limit.
const EX_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => {
            // Before any thread exists, so every thread inherits the mask (see signals.rs).
            if let Err(e) = ferryd::signals::block() {
                eprintln!("ferryd: cannot block the signals the daemon reads: {e}");
                return ExitCode::FAILURE;
            }
            // Also while this is the only thread: the environment it inherited from systemd
            // (or from the previous image of a live upgrade), and any capability it was handed
            // (the relay needs none).
            let inherited = ferryd::daemon::Inherited::take();
            let dropped = ferryd::daemon::privileges::drop_all();
            ferryd::logging::init();
            match dropped {
                Ok(true) => {
                    tracing::warn!("started with capabilities; dropped them all (the relay needs none)")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot drop the capabilities this process was started with")
                }
            }
            let code = match ferryd::daemon::run(&config, inherited) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    if e.downcast_ref::<ferryd::config::ConfigError>().is_some() {
                        ExitCode::from(EX_CONFIG)
                    } else {
                        ExitCode::FAILURE
                    }
                }
            };
            // Lines are written by a thread of their own: let it finish before the process ends.
            ferryd::logging::flush(std::time::Duration::from_secs(2));
            code
        }
        Command::Nat {
            action: NatAction::Run { config },
        } => {
            if let Err(e) = ferryd::signals::block() {
                eprintln!("ferryd: cannot block the signals the NAT keeper reads: {e}");
                return ExitCode::FAILURE;
            }
            let notify_socket = ferryd::daemon::Inherited::take().notify_socket();
            ferryd::logging::init();
            let code = match ferryd::nat::keeper::run(&config, notify_socket) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    if e.downcast_ref::<ferryd::config::ConfigError>().is_some() {
                        ExitCode::from(EX_CONFIG)
                    } else {
                        ExitCode::FAILURE
                    }
                }
            };
            ferryd::logging::flush(std::time::Duration::from_secs(2));
            code
        }
        Command::Nat { action } => nat(action),
        Command::Status { config, unit } => ferryd::status::run(&config, &unit),
        Command::Doctor { config, json } => ferryd::doctor::run(&config, json),
        Command::Connections {
            config,
            route,
            json,
            close,
        } => ferryd::connections::command::run(ferryd::connections::command::Request {
            config: &config,
            route: route.as_deref(),
            json,
            close,
        }),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "ferryd", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Upgrade { config, timeout } => {
            ferryd::upgrade::run(&config, std::time::Duration::from_secs(timeout))
        }
        Command::HandoverCheck { config } => match Config::load(&config) {
            Ok(_) => {
                println!("{}", ferryd::handover::versions_line());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ferryd: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Check { config, quiet } => match Config::load(&config) {
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
        },
    }
}

/// `ferryd nat status` exits 2 when it cannot check at all (as opposed to 1: checked, drifted).
const NAT_CANNOT_CHECK: u8 = 2;

fn nat(action: NatAction) -> ExitCode {
    let load = |path: &std::path::Path| Config::load(path).map_err(|e| e.to_string());
    let result = match action {
        NatAction::Up { config } => load(&config).and_then(|c| {
            if !c.nat.enabled {
                // Off in the configuration: undo what an earlier configuration left, as the
                // daemon does at start and reload.
                let undone = ferryd::nat::clear().map_err(|e| e.to_string())?;
                println!(
                    "{}: NAT is not enabled ([nat] enabled = true); {}",
                    config.display(),
                    if undone {
                        "removed ferryd's earlier rules and restored ip_forward"
                    } else {
                        "nothing to do"
                    }
                );
                return Ok(true);
            }
            ferryd::nat::reconcile(&c.nat)
                .map(|applied| {
                    println!("{applied}");
                    true
                })
                .map_err(|e| e.to_string())
        }),
        NatAction::Down { config: _ } => ferryd::nat::down()
            .map(|()| {
                println!("ferryd's NAT rules and chains are removed");
                true
            })
            .map_err(|e| e.to_string()),
        NatAction::Run { .. } => unreachable!("`ferryd nat run` is dispatched in main"),
        NatAction::Status { config } => {
            let checked = load(&config).and_then(|c| {
                ferryd::nat::status(&c.nat)
                    .map(|(report, in_sync)| {
                        print!("{report}");
                        in_sync
                    })
                    .map_err(|e| e.to_string())
            });
            return match checked {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("ferryd: cannot check NAT: {e}");
                    ExitCode::from(NAT_CANNOT_CHECK)
                }
            };
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("ferryd: {e}");
            ExitCode::FAILURE
        }
    }
}
