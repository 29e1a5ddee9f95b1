//! `ferryd upgrade`: asks the running daemon to hand over to the binary now at its path (a live
//! upgrade, see `crate::handover`) and reports how it went.
//!
//! The daemon is found through the health endpoint the configuration names: its `/status`
//! document carries the PID to signal and the upgrade counters to watch. This module owns asking
//! and waiting; it must not touch the daemon's sockets or decide anything the daemon decides.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use super::client::Client;
use crate::config::Config;
use crate::status::StatusDocument;

/// How often the outcome is looked for.
const POLL_EVERY: Duration = Duration::from_millis(100);

/// Signals the daemon and waits up to `timeout` for the outcome. Exit 0 when a new image took
/// over every connection, 1 with the reason otherwise (refused, failed, or any connection reset
/// instead of moved).
pub fn run(config_path: &Path, timeout: Duration) -> ExitCode {
    match upgrade(config_path, timeout) {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(reason) => {
            eprintln!("ferryd upgrade: {reason}");
            ExitCode::FAILURE
        }
    }
}

fn upgrade(config_path: &Path, timeout: Duration) -> Result<String, String> {
    let config = Config::load(config_path).map_err(|e| e.to_string())?;
    let client = Client::new(&config.health);
    let target = client.target;
    let before = client.status()?;
    if before.pid == 0 {
        return Err(format!(
            "the running daemon (version {}) predates live upgrade; restart it instead",
            before.version
        ));
    }
    let pid = nix::unistd::Pid::from_raw(before.pid as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGUSR2)
        .map_err(|e| format!("cannot signal the daemon (pid {pid}): {e}"))?;
    let deadline = Instant::now() + timeout;
    let mut last_error = String::new();
    while Instant::now() < deadline {
        std::thread::sleep(POLL_EVERY);
        // While the new image starts, the endpoint may not answer for a moment.
        let now = match client.status() {
            Ok(now) => now,
            Err(e) => {
                last_error = e;
                continue;
            }
        };
        if now.pid != before.pid {
            return Err(format!(
                "the daemon at {target} is now pid {} (was {}): it was restarted, not upgraded",
                now.pid, before.pid
            ));
        }
        if let Some(outcome) = outcome(&before, &now) {
            return outcome;
        }
    }
    Err(format!(
        "no outcome within {} (last: {})",
        humantime::format_duration(timeout),
        if last_error.is_empty() {
            "the daemon answered, still upgrading"
        } else {
            &last_error
        }
    ))
}

/// The outcome of the attempt that `before` → `now` shows, if it has ended.
fn outcome(before: &StatusDocument, now: &StatusDocument) -> Option<Result<String, String>> {
    let last = now.upgrade.last.as_ref()?;
    // A new image that refused the hand-over started its counters afresh: they went back.
    if now.upgrade.attempts < before.upgrade.attempts {
        return Some(Err(format!("failed: {}", last.detail)));
    }
    if now.upgrade.attempts <= before.upgrade.attempts || last.attempt <= before.upgrade.attempts {
        return None;
    }
    let moved = super::status::moved_phrase(last.moved.unwrap_or(0), last.not_moved.unwrap_or(0));
    let pause = last.pause_ms.unwrap_or(0);
    Some(match (last.ok, last.moved, last.not_moved.unwrap_or(0)) {
        (true, _, 0) => Ok(format!(
            "ferryd upgraded in place (pid {}): {}; {moved}, pause {pause} ms",
            now.pid, last.detail
        )),
        (true, _, _) => Err(format!(
            "upgraded in place (pid {}), but not every connection: {}; {moved}, pause {pause} ms (the log says which and why)",
            now.pid, last.detail
        )),
        (false, None, _) => Err(format!("refused, nothing changed: {}", last.detail)),
        (false, Some(_), _) => Err(format!("failed: {}; {moved}, pause {pause} ms", last.detail)),
    })
}
