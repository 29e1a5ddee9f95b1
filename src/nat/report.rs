//! The NAT keeper's report: how the process that keeps the rules (`ferryd nat run`) tells the
//! relay what NAT's state is, through a small JSON file that it replaces atomically (written
//! beside, then renamed over) every second and after every reconcile.
//!
//! This module owns the file's format and how old a report may be. The keeper writes
//! ([`publish`]); the relay reads ([`watch()`]) and turns what it finds into the `NatStatus` that
//! `/status`, `/metrics`, STATUS=, `ferryd status`, doctor and `[health] require_nat` show. A
//! file, rather than the unit's state over D-Bus: it works the same outside systemd (both
//! processes run by hand), needs no bus access in the relay's sandbox, and carries the reason a
//! reconcile failed, which the unit's state cannot. It must not run iptables: the relay reads
//! nothing else of NAT's.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::config::Nat;
use crate::state::{NatStatus, State};

/// How often the keeper rewrites its report, and the relay reads it.
pub const EVERY: Duration = Duration::from_secs(1);

/// A report older than this comes from a keeper that has stopped making progress (every wait of
/// its own is bounded, and a reconcile runs beside the loop that writes the report).
pub const STALE_AFTER: Duration = Duration::from_secs(5);

/// How long after the relay starts a report never seen yet means "not yet" (pending) rather than
/// "no keeper" (failed): at boot both units start together, and the keeper's first report follows
/// its first `nat up`. A report seen once and gone since is a keeper that stopped (systemd
/// removes its runtime directory), at once.
const FIRST_REPORT_GRACE: Duration = Duration::from_secs(10);

/// What the keeper says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The keeper's process id: a report whose process is gone is a dead keeper's.
    pub pid: u32,
    /// When it was written, in milliseconds since the Unix epoch.
    pub written_at_ms: u64,
    /// NAT's state.
    pub state: NatStatus,
    /// Drift repaired since the keeper started.
    pub repairs: u64,
    /// Reconciles that failed since the keeper started.
    pub failures: u64,
}

impl Report {
    /// A report of `state` and the counts, by this process, as of now.
    pub fn now(state: NatStatus, repairs: u64, failures: u64) -> Report {
        Report {
            pid: std::process::id(),
            written_at_ms: millis(SystemTime::now()),
            state,
            repairs,
            failures,
        }
    }
}

fn millis(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Writes `report` to `path` atomically: a reader sees the old report or the new one, never half
/// of one. The directory must exist (systemd's RuntimeDirectory= makes it).
pub fn publish(path: &Path, report: &Report) -> std::io::Result<()> {
    let mut next = path.as_os_str().to_owned();
    next.push(".next");
    let next = PathBuf::from(next);
    let text = serde_json::to_vec(report).map_err(std::io::Error::other)?;
    std::fs::write(&next, text)?;
    std::fs::rename(&next, path)
}

/// What the relay makes of the file at `path`, `now`: NAT's state, with the reason when the
/// keeper cannot be believed; and the keeper's counts, when it reported.
pub fn judge(path: &Path, now: SystemTime) -> (NatStatus, Option<(u64, u64)>) {
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return (
                NatStatus::Failed(format!(
                    "the NAT keeper is not running: no report at {} (start ferryd-nat.service, or `ferryd nat run`)",
                    path.display()
                )),
                None,
            );
        }
        Err(e) => {
            return (
                NatStatus::Failed(format!(
                    "cannot read the NAT keeper's report {}: {e}",
                    path.display()
                )),
                None,
            );
        }
    };
    let report: Report = match serde_json::from_slice(&text) {
        Ok(report) => report,
        Err(e) => {
            return (
                NatStatus::Failed(format!(
                    "the NAT keeper's report {} is unreadable: {e}",
                    path.display()
                )),
                None,
            );
        }
    };
    let counts = Some((report.repairs, report.failures));
    if !process_alive(report.pid) {
        return (
            NatStatus::Failed(format!(
                "the NAT keeper (pid {}) is not running; its last report said {}",
                report.pid,
                report.state.name()
            )),
            counts,
        );
    }
    let age = Duration::from_millis(millis(now).saturating_sub(report.written_at_ms));
    if age > STALE_AFTER {
        return (
            NatStatus::Failed(format!(
                "the NAT keeper (pid {}) has not reported for {} s: it is stuck",
                report.pid,
                age.as_secs()
            )),
            counts,
        );
    }
    (report.state, counts)
}

/// Whether process `pid` exists. One of another user (a keeper run by hand as root) answers
/// EPERM, and exists.
fn process_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    !matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
        Err(nix::errno::Errno::ESRCH)
    )
}

/// The relay's side: reads the keeper's report every [`EVERY`] and keeps the state's NAT view
/// current, until the configuration's sender is dropped. With NAT off in the configuration NAT
/// is reported disabled, whatever the file says. A state change is logged once.
pub async fn watch(mut config: watch::Receiver<Nat>, state: Arc<State>) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = std::time::Instant::now();
    let mut seen = false;
    loop {
        let nat = config.borrow_and_update().clone();
        let (status, counts) = if nat.enabled {
            let path = nat.report_file.clone();
            let waiting = !seen && started.elapsed() < FIRST_REPORT_GRACE;
            let (status, counts, exists) = tokio::task::spawn_blocking(move || {
                if waiting && !path.exists() {
                    return (NatStatus::Pending, None, false);
                }
                let (status, counts) = judge(&path, SystemTime::now());
                (status, counts, true)
            })
            .await
            .unwrap_or_else(|e| {
                let status = NatStatus::Failed(format!("cannot read the NAT keeper's report: {e}"));
                (status, None, false)
            });
            seen |= exists;
            (status, counts)
        } else {
            (NatStatus::Disabled, None)
        };
        if let Some((repairs, failures)) = counts {
            state.set_nat_counts(repairs, failures);
        }
        let before = state.set_nat(status.clone());
        if before != status {
            match &status {
                NatStatus::Failed(reason) => tracing::error!(
                    reason,
                    message_id = crate::logging::ids::NAT_FAILED,
                    "NAT is not in place; the relay keeps working"
                ),
                other => tracing::info!(nat = other.name(), "NAT state"),
            }
        }
        tokio::select! {
            _ = tick.tick() => {}
            changed = config.changed() => if changed.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ferryd-report-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        dir
    }

    #[test]
    fn a_fresh_report_of_a_live_keeper_is_believed() {
        let path = dir().join("fresh.json");
        publish(&path, &Report::now(NatStatus::Ok, 2, 3)).unwrap();
        assert_eq!(judge(&path, SystemTime::now()), (NatStatus::Ok, Some((2, 3))));
    }

    #[test]
    fn a_missing_stale_dead_or_broken_report_is_a_failure_with_its_reason() {
        let path = dir().join("cases.json");
        let _ = std::fs::remove_file(&path);
        let failed = |p: &Path, now| match judge(p, now).0 {
            NatStatus::Failed(reason) => reason,
            other => panic!("{other:?}"),
        };
        assert!(failed(&path, SystemTime::now()).contains("not running: no report"));
        publish(&path, &Report::now(NatStatus::Ok, 0, 0)).unwrap();
        let later = SystemTime::now() + STALE_AFTER + Duration::from_secs(2);
        assert!(failed(&path, later).contains("has not reported for"));
        let mut dead = Report::now(NatStatus::Ok, 0, 0);
        dead.pid = i32::MAX as u32;
        publish(&path, &dead).unwrap();
        assert!(failed(&path, SystemTime::now()).contains("is not running; its last report said ok"));
        std::fs::write(&path, b"{").unwrap();
        assert!(failed(&path, SystemTime::now()).contains("unreadable"));
    }
}
