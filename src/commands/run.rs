//! `ferryd run` and `ferryd nat run`: the two long-running processes, from the moment the
//! command line is parsed to the exit code systemd reads.
//!
//! This module owns what must happen while the process still has one thread (blocking the
//! signals every thread inherits, taking what systemd or the previous image left in the
//! environment, dropping capabilities) and the mapping of an error to an exit code. The daemons
//! themselves are `crate::daemon` and `crate::nat::keeper`.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use super::EX_CONFIG;

/// How long the log writer thread may take to write its last lines at exit.
const LOG_FLUSH: Duration = Duration::from_secs(2);

/// The relay daemon, in the foreground.
pub fn daemon(config: &Path) -> ExitCode {
    // Before any thread exists, so every thread inherits the mask (see signals.rs).
    if let Err(e) = crate::signals::block() {
        eprintln!("ferryd: cannot block the signals the daemon reads: {e}");
        return ExitCode::FAILURE;
    }
    // Also while this is the only thread: the environment it inherited from systemd (or from
    // the previous image of a live upgrade), and any capability it was handed (the relay needs
    // none).
    let inherited = crate::daemon::Inherited::take();
    let dropped = crate::daemon::privileges::drop_all();
    crate::logging::init();
    match dropped {
        Ok(true) => {
            tracing::warn!("started with capabilities; dropped them all (the relay needs none)")
        }
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(error = %e, "cannot drop the capabilities this process was started with")
        }
    }
    finish(crate::daemon::run(config, inherited))
}

/// The NAT keeper, in the foreground (ferryd-nat.service).
pub fn nat_keeper(config: &Path) -> ExitCode {
    if let Err(e) = crate::signals::block() {
        eprintln!("ferryd: cannot block the signals the NAT keeper reads: {e}");
        return ExitCode::FAILURE;
    }
    let notify_socket = crate::daemon::Inherited::take().notify_socket();
    crate::logging::init();
    finish(crate::nat::keeper::run(config, notify_socket))
}

/// Logs how the process ends and gives the exit code: EX_CONFIG for a configuration error, so
/// systemd does not restart it in a loop. Lines are written by a thread of their own: it is
/// given time to finish before the process ends.
fn finish(result: anyhow::Result<()>) -> ExitCode {
    let code = match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            if e.downcast_ref::<crate::config::ConfigError>().is_some() {
                ExitCode::from(EX_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    };
    crate::logging::flush(LOG_FLUSH);
    code
}
