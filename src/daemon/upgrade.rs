//! Live upgrade, the daemon's side: SIGUSR2 checks the binary now at ferryd's path, and if it
//! can take over, stops accepting (the listening sockets stay open: connects wait in their
//! backlogs), parks every connection, and execs it with the same PID (see `crate::handover`).
//! The new image's [`Daemon::start`] takes everything back; [`Daemon::take_over`] resumes the
//! connections and [`Daemon::upgraded`] reports the result.
//!
//! It must not change anything before the check passed: a refused upgrade leaves the daemon as
//! it was, and says why in the log, `/status` and `ferryd upgrade`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use super::{CLOSE_GRACE, Daemon};
use crate::config::HEALTH_SOCKET_NAME;
use crate::handover::{self, Incoming, Outgoing};
use crate::logging::ids;
use crate::state::{EngineView, RouteStats, UpgradeReport};

/// Beyond the longest PROXY header wait, upstream dial and header write (which a connection
/// finishes before it parks), how long parking may take: every parked direction stops at its next
/// await point, so this is a bound for a stuck task, not a wait anyone should see.
const PARK_SLACK: Duration = Duration::from_secs(1);

/// Environment variables that belong to one program image and must not reach the next: the
/// hand-over's own, and socket activation's (the next image is not a fresh start by systemd).
const NOT_INHERITED: [&str; 4] = [handover::ENV, "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"];

impl Daemon {
    /// SIGUSR2. Returns the daemon unchanged when the binary at its path cannot take over;
    /// otherwise does not return (the process goes on as the new image), except with the error
    /// of an exec that failed twice.
    pub(super) async fn upgrade(self) -> anyhow::Result<Daemon> {
        let attempt = self.state.upgrade_attempts.fetch_add(1, Ordering::Relaxed) + 1;
        let exe = self.program.exe.clone();
        let config = self.config.path.clone();
        tracing::info!(exe = %exe.display(), attempt, "SIGUSR2: live upgrade requested; checking the binary");
        self.state.beat();
        let checked = tokio::task::spawn_blocking(move || handover::check_next(&exe, &config))
            .await
            .unwrap_or_else(|e| Err(format!("the check did not finish: {e}")));
        // The check is bounded (10 s) below the watchdog's ping period; prove progress again.
        self.state.beat();
        if let Err(reason) = checked {
            tracing::error!(
                reason,
                attempt,
                message_id = ids::UPGRADE_REFUSED,
                "live upgrade refused; nothing changed"
            );
            self.state.upgrade_ended(UpgradeReport {
                attempt,
                ok: false,
                detail: reason,
                at: SystemTime::now(),
                pause_ms: None,
                moved: None,
            });
            return Ok(self);
        }
        Err(self.hand_over().await)
    }

    /// Parks everything and execs the binary at the daemon's path. Returns only if that failed.
    async fn hand_over(mut self) -> anyhow::Error {
        let parked_at = handover::monotonic_ns();
        self.notifier.reloading();
        // Stop accepting; each route's second descriptor keeps its socket (and backlog) open.
        let mut listeners = Vec::new();
        for running in std::mem::take(&mut self.routes) {
            drop(running.settings);
            let _ = running.task.await;
            listeners.push((running.name, running.socket, running.stats));
        }
        // A connection finishes reading its PROXY header, dialling and sending the upstream its
        // own header before it parks; each step has its own bound.
        let park_limit = self
            .config
            .routes
            .iter()
            .map(|r| r.connect_timeout * 2 + r.proxy.as_ref().map_or(Duration::ZERO, |p| p.header_timeout))
            .max()
            .unwrap_or_default()
            + PARK_SLACK;
        self.state.beat();
        let drain = std::mem::take(&mut self.drain);
        if !drain.park(park_limit, CLOSE_GRACE).await {
            tracing::warn!(
                limit_ms = park_limit.as_millis() as u64,
                "some connections did not park in time; they were reset"
            );
        }
        self.state.beat();
        // From here on a connection that parks late finds the channel closed and resets itself.
        self.parking.1.close();
        let mut outgoing = Outgoing::new(parked_at, &self.program.exe);
        while let Ok(parked) = self.parking.1.try_recv() {
            outgoing.connection(parked);
        }
        if let Some(health) = self.health_socket.take() {
            outgoing.listener(HEALTH_SOCKET_NAME, health);
        }
        let mut routes = std::collections::BTreeMap::new();
        for (name, socket, stats) in listeners {
            routes.insert(name.clone(), stats.carry());
            outgoing.listener(&name, socket);
        }
        outgoing.counters(routes, self.engine.counters().carry(), self.state.carry());
        let moved = outgoing.connections();
        tracing::info!(
            exe = %self.program.exe.display(),
            connections = moved,
            carried_bytes = outgoing.carried_bytes(),
            parked_ms = (handover::monotonic_ns().saturating_sub(parked_at)) / 1_000_000,
            "handing over to the binary at ferryd's path"
        );
        // Lines are written by a thread the exec ends: let it finish first.
        crate::logging::flush(Duration::from_secs(1));
        // The watchdog's clock restarts here; the new image pings again as soon as it starts.
        self.notifier.watchdog();
        let env = self.exec_env();
        let e = outgoing.exec(&self.program.exe, &self.program.args, env);
        anyhow::anyhow!("live upgrade failed, and the connections are lost: {e}")
    }

    /// The environment of the next image: this one's, without what belongs to this image only,
    /// and with NOTIFY_SOCKET back (it was removed at start so no child inherits it).
    fn exec_env(&self) -> Vec<(OsString, OsString)> {
        let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
            .filter(|(key, _)| !NOT_INHERITED.iter().any(|k| key == k) && key != "NOTIFY_SOCKET")
            .collect();
        if let Some(name) = self.notifier.socket_name() {
            env.push(("NOTIFY_SOCKET".into(), name.to_os_string()));
        }
        env
    }

    /// In the new image, before any route binds: resumes every connection the previous image
    /// parked, on its route's counters (by name). A connection whose route a reload removed
    /// before the upgrade goes on like it did in the old image, with the timers it was accepted
    /// with, on counters of its own.
    pub(super) fn take_over(
        &mut self,
        incoming: &mut Incoming,
        stats: &BTreeMap<String, Arc<RouteStats>>,
    ) -> Moved {
        let wiring = self.wiring();
        let connections = std::mem::take(&mut incoming.connections);
        let moved = connections.len();
        for parked in connections {
            let who = &parked.identity;
            let route_stats = match stats.get(&who.route) {
                Some(route_stats) => route_stats.clone(),
                None => {
                    tracing::info!(route = %who.route, client = %who.peer, "moved a connection of a route no longer configured; it goes on until it ends");
                    self.new_stats(&who.route)
                }
            };
            crate::route::resume(parked, route_stats, wiring.clone());
        }
        Moved {
            connections: moved,
            from: incoming.written_by.clone(),
            pause_ms: incoming.pause_ms(),
            exec_failed: incoming.exec_failed.take(),
        }
    }

    /// In the new image, once READY=1 is sent: counts and reports the upgrade. When the new
    /// binary could not be exec'd and this is the old image again, the upgrade failed, and says
    /// why; the connections were taken back all the same.
    pub(super) fn upgraded(&self, moved: Moved) {
        let attempt = self.state.upgrade_attempts.load(Ordering::Relaxed);
        let to = env!("CARGO_PKG_VERSION");
        let Moved {
            connections,
            from,
            pause_ms,
            exec_failed,
        } = moved;
        let (ok, detail) = match exec_failed {
            None => {
                let completed = self.state.upgrades.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::info!(
                    from_version = %from,
                    to_version = to,
                    moved = connections,
                    pause_ms,
                    upgrades = completed,
                    message_id = ids::UPGRADED,
                    "live upgrade complete: every listener and {connections} connection(s) taken over"
                );
                (true, format!("from {from} to {to}"))
            }
            Some(reason) => {
                tracing::error!(
                    reason,
                    moved = connections,
                    pause_ms,
                    message_id = ids::UPGRADE_REFUSED,
                    "live upgrade failed: the new binary could not start, so the running one took every listener and connection back"
                );
                (
                    false,
                    format!("{reason}; the running version {to} took every connection back"),
                )
            }
        };
        self.state.upgrade_ended(UpgradeReport {
            attempt,
            ok,
            detail,
            at: SystemTime::now(),
            pause_ms: Some(pause_ms),
            moved: Some(connections),
        });
    }
}

/// What a new image took over, for its report.
pub(super) struct Moved {
    connections: usize,
    from: String,
    pause_ms: u64,
    exec_failed: Option<String>,
}
