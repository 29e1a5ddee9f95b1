//! Live upgrade, the daemon's side: SIGUSR2 checks the binary now at ferryd's path, and if it
//! can take over, stops accepting (the listening sockets stay open: connects wait in their
//! backlogs), parks every connection, and execs it with the same PID (see `crate::handover`).
//! The new image's [`Daemon::start`] takes everything back; [`Daemon::take_over`] resumes the
//! connections and [`Daemon::upgraded`] reports the result.
//!
//! It must not change anything before the check passed: a refused upgrade leaves the daemon as
//! it was, and says why in the log, `/status` and `ferryd upgrade`.

use std::ffi::OsString;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use super::Daemon;
use crate::config::HEALTH_SOCKET_NAME;
use crate::handover::{self, Incoming, Outgoing};
use crate::logging::ids;
use crate::state::{EngineView, UpgradeReport};

/// Beyond the longest PROXY header wait and upstream dial (which a connection finishes before
/// it parks), how long parking may take: every parked direction stops at its next await point,
/// so this is a bound for a stuck task, not a wait anyone should see.
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
        let checked = tokio::task::spawn_blocking(move || handover::check_next(&exe, &config))
            .await
            .unwrap_or_else(|e| Err(format!("the check did not finish: {e}")));
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
        let park_limit = self
            .config
            .routes
            .iter()
            .map(|r| r.connect_timeout + r.proxy.as_ref().map_or(Duration::ZERO, |p| p.header_timeout))
            .max()
            .unwrap_or_default()
            + PARK_SLACK;
        let drain = std::mem::take(&mut self.drain);
        if !drain.park(park_limit).await {
            tracing::warn!(
                limit_ms = park_limit.as_millis() as u64,
                "some connections did not park in time; they are reset"
            );
        }
        let mut outgoing = Outgoing::new(parked_at);
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

    /// In the new image: resumes every connection the previous one parked, on its route (by
    /// name); one whose route is gone from the configuration is reset. Returns how many were
    /// moved, the version that handed over, and the pause so far.
    pub(super) fn take_over(&mut self, incoming: Incoming) -> (usize, String, u64) {
        let mut moved = 0;
        let wiring = self.wiring();
        let pause_ms = incoming.pause_ms();
        for parked in incoming.connections {
            match self.routes.iter().find(|r| r.name == parked.route) {
                Some(running) => {
                    crate::route::resume(parked, running.stats.clone(), wiring.clone());
                    moved += 1;
                }
                None => {
                    tracing::warn!(route = %parked.route, client = %parked.peer, end = "reset", "the route of a connection moved by the upgrade is no longer configured; both sides reset");
                    crate::net::reset(parked.relay.client);
                    crate::net::reset(parked.relay.upstream);
                }
            }
        }
        (moved, incoming.written_by, pause_ms)
    }

    /// In the new image, once READY=1 is sent: counts and reports the completed upgrade.
    pub(super) fn upgraded(&self, moved: usize, from: String, pause_ms: u64) {
        let completed = self.state.upgrades.fetch_add(1, Ordering::Relaxed) + 1;
        let attempt = self.state.upgrade_attempts.load(Ordering::Relaxed);
        let to = env!("CARGO_PKG_VERSION");
        tracing::info!(
            from_version = %from,
            to_version = to,
            moved,
            pause_ms,
            upgrades = completed,
            message_id = ids::UPGRADED,
            "live upgrade complete: every listener and {moved} connection(s) taken over"
        );
        self.state.upgrade_ended(UpgradeReport {
            attempt,
            ok: true,
            detail: format!("from {from} to {to}"),
            at: SystemTime::now(),
            pause_ms: Some(pause_ms),
            moved: Some(moved),
        });
    }
}
