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

/// How long parking may take. Every connection parks at its next await point, whatever phase
/// it is in (reading its PROXY header, dialling, relaying), so this bounds a stuck task, not a
/// wait anyone should see.
const PARK_LIMIT: Duration = Duration::from_secs(1);

/// How long the health endpoint may take to answer the requests under way before the exec: an
/// answer takes microseconds; only a client still sending its request takes longer, and the
/// probe's own timeout is seconds.
const HEALTH_SETTLE: Duration = Duration::from_millis(200);

/// Environment variables that belong to one program image and must not reach the next: the
/// hand-over's own, and socket activation's (the next image is not a fresh start by systemd).
const NOT_INHERITED: [&str; 4] = [handover::ENV, "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"];

impl Daemon {
    /// SIGUSR2. Returns the daemon unchanged when the binary at its path cannot take over, and
    /// the daemon with every listener and connection taken back when the hand-over failed after
    /// the check (the failure is reported); otherwise does not return: the process goes on as the
    /// new image.
    pub(super) async fn upgrade(self) -> Daemon {
        let attempt = self
            .state
            .counters
            .upgrade_attempts
            .fetch_add(1, Ordering::Relaxed)
            + 1;
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
                not_moved: None,
            });
            return self;
        }
        self.hand_over().await
    }

    /// Parks everything and execs the binary at the daemon's path. Returns only if the new image
    /// could not be started: then this image has taken everything back.
    async fn hand_over(mut self) -> Daemon {
        let parked_at = handover::monotonic_ns();
        self.notifier.reloading();
        // Stop accepting; each route's second descriptor keeps its socket (and backlog) open.
        let mut listeners = Vec::new();
        let mut stats = BTreeMap::new();
        // The accept loops' own descriptors of the sockets, kept (close-on-exec) so that taking a
        // failed hand-over back needs no new descriptor: it may fail for want of one.
        let mut kept = BTreeMap::new();
        for running in std::mem::take(&mut self.routes) {
            drop(running.settings);
            if let Ok(Some(own)) = running.task.await {
                kept.insert(running.name.clone(), own);
            }
            stats.insert(running.name.clone(), running.stats);
            listeners.push((running.name, running.socket));
        }
        self.state.beat();
        let mut not_moved = 0;
        let drain = std::mem::take(&mut self.drain);
        if let Err(stragglers) = drain.park(PARK_LIMIT).await {
            // Each one still running holds its route's live count.
            let late: usize = stats.values().map(|s| s.live.load(Ordering::Relaxed)).sum();
            not_moved += late as u64;
            tracing::warn!(
                late,
                limit_ms = PARK_LIMIT.as_millis() as u64,
                "some connections did not park in time; they are reset"
            );
            stragglers.close(CLOSE_GRACE).await;
        }
        self.state.beat();
        // From here on a connection that parks late finds the lot closed and resets itself.
        let (parked, lost) = self.parking.1.close();
        not_moved += lost;
        let mut outgoing = Outgoing::new(parked_at, &self.program.exe);
        for connection in parked {
            outgoing.connection(connection);
        }
        outgoing.not_moved(not_moved);
        if let Some(health) = self.health_socket.take() {
            outgoing.listener(HEALTH_SOCKET_NAME, health);
        }
        for (name, socket) in listeners {
            outgoing.listener(&name, socket);
        }
        let routes = stats
            .iter()
            .map(|(name, s)| (name.clone(), crate::state::carry(&s.counters)))
            .collect();
        outgoing.counters(
            routes,
            crate::state::carry(self.engine.counters()),
            self.state.carry(),
        );
        tracing::info!(
            exe = %self.program.exe.display(),
            connections = outgoing.connections(),
            not_moved,
            carried_bytes = outgoing.carried_bytes(),
            parked_ms = (handover::monotonic_ns().saturating_sub(parked_at)) / 1_000_000,
            "handing over to the binary at ferryd's path"
        );
        // The health endpoint's thread ends with the exec too: no request may be cut there.
        if !self.health_gate.hold(HEALTH_SETTLE).await {
            tracing::warn!("a health endpoint request was still being read at the hand-over; it is cut");
        }
        // Lines are written by a thread the exec ends: let it finish first.
        crate::logging::flush(Duration::from_secs(1));
        // The watchdog's clock restarts here; the new image pings again as soon as it starts.
        self.notifier.watchdog();
        let env = self.exec_env();
        let (error, incoming) = outgoing.exec(&self.program.exe, &self.program.args, env);
        self.take_back(incoming, &stats, kept, error.to_string())
    }

    /// After a hand-over that failed before the new image ran: goes on with everything it held,
    /// the way a new image would have (the same resume of every connection), and reports the
    /// upgrade failed with `reason`.
    fn take_back(
        mut self,
        mut incoming: Incoming,
        stats: &BTreeMap<String, Arc<RouteStats>>,
        mut kept: BTreeMap<String, std::net::TcpListener>,
        reason: String,
    ) -> Daemon {
        self.health_gate.release();
        self.drain = crate::shutdown::Drain::new();
        self.parking = crate::route::parking();
        let moved = self.take_over(&mut incoming, stats);
        let mut sockets: BTreeMap<String, std::net::TcpListener> =
            std::mem::take(&mut incoming.listeners).into_iter().collect();
        self.health_socket = sockets.remove(HEALTH_SOCKET_NAME);
        for route in self.config.routes.clone() {
            let Some(socket) = sockets.remove(&route.name) else {
                tracing::error!(route = %route.name, "no listening socket to take back; the route is not served until a restart");
                continue;
            };
            let own = match kept.remove(&route.name) {
                Some(own) => Ok(own),
                None => socket.try_clone(),
            };
            let prepared = own.and_then(|own| {
                Ok(super::Prepared {
                    route: route.clone(),
                    socket,
                    listener: tokio::net::TcpListener::from_std(own)?,
                })
            });
            let route_stats = stats
                .get(&route.name)
                .cloned()
                .unwrap_or_else(|| self.new_stats(&route.name));
            match prepared {
                Ok(prepared) => self.spawn(prepared, route_stats),
                Err(e) => {
                    tracing::error!(route = %route.name, error = %e, "cannot take the listening socket back; the route is not served until a restart")
                }
            }
        }
        self.publish_routes();
        self.state.beat();
        let status = self.status_line();
        self.notifier.ready(&status);
        self.last_status = status;
        self.upgraded(moved, Some(reason));
        self
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

    /// Resumes every connection a hand-over parked, on its route's counters (by name): in a new
    /// image before any route binds, or in this one taking a failed hand-over back. A connection
    /// whose route a reload removed before the upgrade goes on like it did before, with the
    /// timers it was accepted with, on counters of its own.
    pub(super) fn take_over(
        &mut self,
        incoming: &mut Incoming,
        stats: &BTreeMap<String, Arc<RouteStats>>,
    ) -> Moved {
        let wiring = self.wiring();
        let connections = std::mem::take(&mut incoming.connections);
        let mut moved = 0;
        let mut not_moved = incoming.not_moved;
        // An older version numbered nothing: its connections are numbered here.
        let number = |id: u64| {
            if id == 0 {
                self.engine.stats.next_connection_id()
            } else {
                id
            }
        };
        for mut opening in std::mem::take(&mut incoming.opening) {
            opening.id = number(opening.id);
            let route = self.config.routes.iter().find(|r| r.name == opening.route);
            let (Some(route), Some(route_stats)) = (route, stats.get(&opening.route)) else {
                // Not admitted on any route now: nothing tells where it should go.
                tracing::warn!(route = %opening.route, client = %opening.peer, end = "reset", "moved a connection not relaying yet whose route is no longer configured; reset");
                crate::net::reset(opening.client);
                not_moved += 1;
                continue;
            };
            let settings = self.settings_for(route);
            if crate::route::resume_opening(opening, settings, route_stats.clone(), wiring.clone()) {
                moved += 1;
            } else {
                not_moved += 1;
            }
        }
        for mut parked in connections {
            parked.identity.who.id = number(parked.identity.who.id);
            let who = &parked.identity.who;
            let route_stats = match stats.get(&*who.route) {
                Some(route_stats) => route_stats.clone(),
                None => {
                    tracing::info!(route = %who.route, client = %who.client, "moved a connection of a route no longer configured; it goes on until it ends");
                    self.new_stats(&who.route)
                }
            };
            if crate::route::resume(parked, route_stats, wiring.clone()) {
                moved += 1;
            } else {
                not_moved += 1;
            }
        }
        Moved {
            connections: moved,
            not_moved: not_moved as usize,
            from: incoming.written_by.clone(),
            pause_ms: incoming.pause_ms(),
        }
    }

    /// Once READY=1 is sent: counts and reports the upgrade. `failed` is why the hand-over did
    /// not happen, when this image took it back.
    pub(super) fn upgraded(&self, moved: Moved, failed: Option<String>) {
        let attempt = self.state.counters.upgrade_attempts.load(Ordering::Relaxed);
        let to = env!("CARGO_PKG_VERSION");
        let Moved {
            connections,
            not_moved,
            from,
            pause_ms,
        } = moved;
        let (ok, detail) = match failed {
            None => {
                let completed = self.state.counters.upgrades.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::info!(
                    from_version = %from,
                    to_version = to,
                    moved = connections,
                    not_moved,
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
                    not_moved,
                    pause_ms,
                    message_id = ids::UPGRADE_REFUSED,
                    "live upgrade failed after the check: the running version took every listener and connection back"
                );
                (
                    false,
                    format!("{reason}; the running version {to} took every listener and connection back"),
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
            not_moved: Some(not_moved),
        });
    }
}

impl Daemon {
    /// In a new image that refused the previous image's hand-over (its connections were reset,
    /// its listeners closed and bound again): reports the upgrade failed.
    pub(super) fn refused_hand_over(&self, refusal: handover::Refusal) {
        // Without the previous counters this is the first attempt as far as anyone can tell.
        let attempt = self
            .state
            .counters
            .upgrade_attempts
            .load(Ordering::Relaxed)
            .max(1);
        self.state
            .counters
            .upgrade_attempts
            .store(attempt, Ordering::Relaxed);
        self.state.upgrade_ended(UpgradeReport {
            attempt,
            ok: false,
            detail: format!(
                "the new image refused the hand-over ({}); it started afresh and the connections were reset",
                refusal.reason
            ),
            at: SystemTime::now(),
            pause_ms: None,
            moved: Some(0),
            not_moved: None,
        });
    }
}

/// What a hand-over moved, for its report.
pub(super) struct Moved {
    connections: usize,
    not_moved: usize,
    from: String,
    pause_ms: u64,
}
