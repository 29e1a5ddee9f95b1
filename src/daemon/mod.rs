//! The daemon's life: start the health endpoint and every route, tell systemd, react to signals
//! (SIGHUP reloads, SIGTERM/SIGINT drain and exit), beat the heartbeat the watchdog and the health
//! endpoint read, and say what happened at the end.
//!
//! This module owns the set of running listeners and the order of a shutdown: report draining
//! (health 503, STOPPING=1), optionally keep accepting for `shutdown_grace`, close the listeners,
//! let live connections finish for up to `drain_timeout`, close the rest, exit 0. It must not
//! touch a connection's bytes, and a reload must never drop a live connection: connections keep
//! the settings they were accepted with, and only listeners come and go.
//!
//! A live upgrade (SIGUSR2) is the third way a daemon's life ends, in `upgrade.rs`: the process
//! goes on as the binary now at its path, with every listener and connection (see
//! `crate::handover`); [`Daemon::start`] is also where that new image takes them back.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{Config, HEALTH_SOCKET_NAME, Route};
use crate::logging::ids;

mod fd_store;
mod inherited;
pub mod privileges;
mod reload;
mod upgrade;
use crate::handover::Incoming;
use crate::relay::Engine;
use crate::route::{Parking, ParkingLot, RouteListener, RouteSettings, Wiring};
use crate::shutdown::Drain;
use crate::signals::{Sig, Signals};
use crate::state::{EngineView, NatStatus, Phase, RouteStats, RouteView, State, restore};
use crate::systemd::activation::Passed;
use crate::systemd::notify::{self, Notifier};
use fd_store::FdStore;
pub use inherited::Inherited;
use upgrade::Moved;

/// After the drain timeout tells the last connections to close, how long they get to do so and
/// write their log line before the process exits anyway.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// How often the daemon task proves it is alive (heartbeat for the watchdog and the health
/// endpoint) and refreshes systemd's STATUS line; more often when the watchdog interval is short.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// Runs the daemon on the configuration at `path` until SIGTERM or SIGINT, with what it
/// `inherited` from its environment.
pub fn run(path: &Path, inherited: Inherited) -> anyhow::Result<()> {
    let args: Vec<OsString> = std::env::args_os().collect();
    // The hand-over comes first: a refused one closes what it left open before anything is bound.
    let (incoming, refused) = match Incoming::from_var(inherited.handover) {
        None => (None, None),
        Some(Ok(incoming)) => (Some(incoming), None),
        Some(Err(refusal)) => {
            tracing::error!(
                reason = refusal.reason,
                message_id = ids::UPGRADE_REFUSED,
                "the previous program image's hand-over was refused; starting afresh, its connections were reset"
            );
            (None, Some(refusal))
        }
    };
    // What a live upgrade re-executes: the binary at the path the first image was started from
    // (after a package upgrade, the new file there), with the same arguments.
    let exe = match incoming
        .as_ref()
        .map(|i| i.exe.clone())
        .filter(|e| !e.as_os_str().is_empty())
    {
        Some(exe) => exe,
        None => std::env::current_exe().context("cannot tell which binary this is (/proc/self/exe)")?,
    };
    let config = Config::load(path)?;
    let notifier = Arc::new(Notifier::from_var(inherited.notify_socket));
    let (pid, fds, names) = inherited.listen;
    let passed = Passed::from_vars(pid, fds, names);
    // One worker (the 1-vCPU proxy VM): a current-thread runtime, without the work-stealing
    // scheduler's cross-thread bookkeeping, which measurably costs connection setup rate.
    let mut builder = if config.workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(config.workers);
        builder
    };
    let runtime = builder
        .thread_name("ferryd-worker")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    // The daemon runs as a spawned task, on the worker threads: if they all stall, so does the
    // heartbeat, and the watchdog notices.
    let result = runtime.block_on(async move {
        tokio::spawn(async move {
            // Signal handlers come first: start-up can last (a bind is retried for up to 30 s),
            // and a SIGHUP's default action would kill the daemon. A SIGHUP now is applied as a
            // reload once ready; a SIGTERM stops start-up cleanly.
            let mut signals = Signals::open().context("cannot read signals (signalfd)")?;
            let stopper = notifier.clone();
            let program = Program { exe, args, refused };
            let daemon = tokio::select! {
                started = Daemon::start(config, notifier, passed, incoming, program) => started?,
                name = signals.stop_requested() => {
                    stopper.stopping();
                    tracing::info!(signal = name, "stop requested during start-up; exiting");
                    return Ok(());
                }
            };
            daemon.serve(signals).await
        })
        .await
        .context("the daemon task failed")?
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

/// The program a live upgrade re-executes.
struct Program {
    /// The binary's path as it was at start (after an upgrade, the file there is the new one).
    exe: PathBuf,
    /// The arguments it was started with.
    args: Vec<OsString>,
    /// The hand-over this image refused, if it was started by one: reported once ready.
    refused: Option<crate::handover::Refusal>,
}

/// A listening route as the daemon tracks it, by name: a reload that moves a route to another
/// address keeps its counters and live connections. Dropping `settings` stops its accept loop.
struct Running {
    name: String,
    listen: SocketAddr,
    /// A second descriptor of the listening socket. A reload that gives this address to another
    /// route (renamed, or moved here) hands that route the same socket, so the port is never
    /// closed and never needs binding twice.
    socket: std::net::TcpListener,
    settings: watch::Sender<Arc<RouteSettings>>,
    stats: Arc<RouteStats>,
    /// The accept loop; it returns its descriptor of the socket when it stops.
    task: JoinHandle<Option<std::net::TcpListener>>,
}

/// A listener made ready for a route during a reload, before anything changes.
struct Prepared {
    route: Route,
    socket: std::net::TcpListener,
    listener: tokio::net::TcpListener,
}

/// The relay engine and the shared state, their counters starting from what a live upgrade
/// carried (or what a refused hand-over's document still told).
fn restore_state(
    config: &Config,
    incoming: Option<&Incoming>,
    refused: Option<&crate::handover::Refusal>,
) -> (Arc<Engine>, Arc<State>) {
    let relay = incoming.map_or_else(Default::default, |i| restore(&i.relay));
    let engine = Engine::new(config.splice, config.max_pipes, relay);
    let carried = match (incoming, refused) {
        (Some(incoming), _) => Some(restore(&incoming.daemon)),
        (None, Some(refusal)) => refusal.daemon.as_ref().map(restore),
        (None, None) => None,
    };
    let state = State::new(engine.clone(), config.health.clone(), carried);
    (engine, state)
}

struct Daemon {
    config: Config,
    engine: Arc<Engine>,
    drain: Drain,
    program: Program,
    /// A second descriptor of the health endpoint's socket, for a live upgrade to hand over.
    health_socket: Option<std::net::TcpListener>,
    /// Holds the health endpoint still while a live upgrade execs.
    health_gate: crate::health::Gate,
    /// Connections parked by a live upgrade arrive here.
    parking: (Parking, ParkingLot),
    routes: Vec<Running>,
    state: Arc<State>,
    notifier: Arc<Notifier>,
    last_status: String,
    heartbeat_every: Duration,
    nat: watch::Sender<crate::config::Nat>,
}

impl Daemon {
    /// Starts the daemon in its steps: the counters and state (from a live upgrade's document
    /// when there is one), the health endpoint, the control socket and NAT's report, the
    /// connections a live upgrade moved here, every route's listener, systemd's fd store, and
    /// READY=1.
    async fn start(
        config: Config,
        notifier: Arc<Notifier>,
        mut passed: Passed,
        mut incoming: Option<Incoming>,
        mut program: Program,
    ) -> anyhow::Result<Daemon> {
        let (engine, state) = restore_state(&config, incoming.as_ref(), program.refused.as_ref());
        if let Some(refusal) = &mut program.refused {
            // Nameless: each is claimed by the address it is bound to.
            passed.adopt(refusal.listeners.drain(..).map(|l| (String::new(), l)).collect());
        }
        if let Some(incoming) = &mut incoming {
            passed.adopt(std::mem::take(&mut incoming.listeners));
            // The listeners are the previous image's, bound and queueing: nothing here can keep
            // them from being served, so the probe must not see the new image as starting.
            state.set_phase(Phase::Ready);
        }
        let mut store = FdStore::default();
        let (health_socket, health_gate) = start_health(&config, &state, &mut passed, &mut store).await?;
        start_control(&config, &engine);
        let nat = start_nat_report(&config, &state);

        let mut daemon = Daemon {
            nat,
            engine,
            drain: Drain::new(),
            program,
            health_socket,
            health_gate,
            parking: crate::route::parking(),
            routes: Vec::new(),
            state,
            notifier,
            last_status: String::new(),
            heartbeat_every: HEARTBEAT_EVERY,
            config,
        };
        let moved = daemon.open_routes(&mut passed, incoming, &mut store).await?;
        for name in passed.close_unclaimed() {
            store.forget(name);
        }
        store.sync(&daemon.notifier);
        daemon.ready(moved)?;
        Ok(daemon)
    }

    /// Resumes the connections a live upgrade moved here, then listens on every route (a socket
    /// passed in, or bound now). Every route's counters come first, so that moved connections
    /// resume at once, on their routes' counters, before a route that must bind can make them
    /// wait.
    async fn open_routes(
        &mut self,
        passed: &mut Passed,
        mut incoming: Option<Incoming>,
        store: &mut FdStore,
    ) -> anyhow::Result<Option<Moved>> {
        let routes = self.config.routes.clone();
        let mut stats: std::collections::BTreeMap<String, Arc<RouteStats>> = routes
            .iter()
            .map(|r| {
                let counters = incoming
                    .as_ref()
                    .and_then(|i| i.routes.get(&r.name))
                    .map_or_else(Default::default, restore);
                (r.name.clone(), self.stats_from(&r.name, counters))
            })
            .collect();
        let moved = incoming.as_mut().map(|incoming| self.take_over(incoming, &stats));
        drop(incoming);
        for route in &routes {
            let (listener, passed_name) = match passed.claim(&route.name, route.listen) {
                Some(claimed) => claimed,
                None => (crate::net::listen_with_retry(route.listen, crate::net::BIND_RETRY_WINDOW)
                    .await
                    .with_context(|| {
                        format!(
                            "route {:?}: cannot listen on {} (another process, or an outgoing connection using it as its ephemeral port, holds it; reserve the port with net.ipv4.ip_local_reserved_ports)",
                            route.name, route.listen
                        )
                    })?, String::new()),
            };
            store.keep(&route.name, &passed_name, &listener);
            let socket = listener
                .try_clone()
                .with_context(|| format!("route {:?}: cannot duplicate the listening socket", route.name))?;
            let listener = tokio::net::TcpListener::from_std(listener)
                .with_context(|| format!("route {:?}: cannot register the listener", route.name))?;
            let stats = stats
                .remove(&route.name)
                .unwrap_or_else(|| self.new_stats(&route.name));
            self.spawn(
                Prepared {
                    route: route.clone(),
                    socket,
                    listener,
                },
                stats,
            );
        }
        Ok(moved)
    }

    /// Tells systemd and the probe the daemon is ready, reports the live upgrade that started
    /// it (done, or refused), and starts the watchdog.
    fn ready(&mut self, moved: Option<Moved>) -> anyhow::Result<()> {
        self.publish_routes();
        self.state.beat();
        self.state.set_phase(Phase::Ready);
        let status = self.status_line();
        self.notifier.ready(&status);
        self.last_status = status;
        if let Some(moved) = moved {
            self.upgraded(moved, None);
        }
        if let Some(refusal) = self.program.refused.take() {
            self.refused_hand_over(refusal);
        }
        if let Some(interval) = notify::watchdog_interval() {
            // Beat several times per ping period so one late tick never costs a ping.
            self.heartbeat_every = (interval / 4).min(HEARTBEAT_EVERY);
            notify::spawn_watchdog(self.notifier.clone(), self.state.clone(), interval)
                .context("cannot start the watchdog thread")?;
            tracing::info!(
                interval_ms = interval.as_millis() as u64,
                "systemd watchdog enabled"
            );
        }
        tracing::info!(
            config = %self.config.path.display(),
            routes = self.routes.len(),
            workers = self.config.workers,
            splice = self.config.splice,
            message_id = ids::READY, "ready"
        );
        Ok(())
    }

    fn settings_for(&self, route: &Route) -> Arc<RouteSettings> {
        Arc::new(RouteSettings {
            route: route.clone(),
            name: Arc::from(route.name.as_str()),
            probe_sources: self.config.probe_sources.clone(),
        })
    }

    fn new_stats(&self, name: &str) -> Arc<RouteStats> {
        self.stats_from(name, Default::default())
    }

    /// Stats of the route `name` starting from `counters` (carried by a live upgrade).
    fn stats_from(&self, name: &str, counters: crate::state::RouteCounters) -> Arc<RouteStats> {
        Arc::new(RouteStats::new(self.state.connect_times.of(name), counters))
    }

    /// Starts the accept loop of `prepared` with `stats` (fresh, or carried over from the route
    /// of the same name).
    fn spawn(&mut self, prepared: Prepared, stats: Arc<RouteStats>) {
        let Prepared {
            route,
            socket,
            listener,
        } = prepared;
        tracing::info!(route = %route.name, listen = %route.listen, upstream = %route.upstream, "listening");
        let (tx, rx) = watch::channel(self.settings_for(&route));
        let task = RouteListener::new(listener, rx, stats.clone(), self.wiring());
        self.routes.push(Running {
            name: route.name.clone(),
            listen: route.listen,
            socket,
            settings: tx,
            stats,
            task: tokio::spawn(task.run()),
        });
    }

    /// What a connection task needs from the daemon.
    fn wiring(&self) -> Wiring {
        Wiring {
            engine: self.engine.clone(),
            shutdown: self.drain.handle(),
            parking: self.parking.0.clone(),
        }
    }

    fn publish_routes(&self) {
        let views = self
            .routes
            .iter()
            .map(|r| RouteView {
                route: r.settings.borrow().route.clone(),
                stats: r.stats.clone(),
            })
            .collect();
        self.state.set_routes(views);
    }

    fn status_line(&self) -> String {
        let live: usize = self
            .routes
            .iter()
            .map(|r| r.stats.live.load(Ordering::Relaxed))
            .sum();
        let nat = match self.state.nat() {
            NatStatus::Disabled => String::new(),
            NatStatus::Pending => "; NAT not applied yet".into(),
            NatStatus::Ok => "; NAT in place".into(),
            NatStatus::Failed(reason) => format!("; NAT FAILED: {reason}"),
        };
        format!("{} routes, {live} live connections{nat}", self.routes.len())
    }

    async fn serve(mut self, mut signals: Signals) -> anyhow::Result<()> {
        let mut heartbeat = tokio::time::interval(self.heartbeat_every);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let sig = tokio::select! {
                sig = signals.next() => sig,
                _ = heartbeat.tick() => { self.beat(); continue; }
            };
            match sig {
                Ok(Sig::Hangup) => self.reload().await,
                Ok(sig @ (Sig::Terminate | Sig::Interrupt)) => {
                    tracing::info!("{} received", sig.name());
                    break;
                }
                Ok(Sig::User1) => self.user1(),
                // Returns when the upgrade was refused or failed; a completed one goes on in a
                // new image.
                Ok(Sig::User2) => self = self.upgrade().await,
                Err(e) => {
                    // Without signals the daemon cannot be stopped cleanly: stop now, cleanly.
                    tracing::error!(error = %e, "cannot read signals; stopping");
                    break;
                }
            }
        }
        self.stop().await;
        Ok(())
    }

    /// SIGUSR1: triggers the armed test fault in a test build; ignored otherwise.
    #[cfg(feature = "test-faults")]
    fn user1(&self) {
        match crate::faults::armed() {
            Some(crate::faults::Fault::KillAccept) => {
                if let Some(first) = self.routes.first() {
                    tracing::warn!("test fault: aborting the first route's accept loop");
                    first.task.abort();
                }
            }
            Some(crate::faults::Fault::Stall) => {
                tracing::warn!("test fault: stalling every worker thread");
                for _ in 0..self.config.workers + 1 {
                    tokio::spawn(async { std::thread::sleep(Duration::from_secs(3600)) });
                }
            }
            None => tracing::info!("SIGUSR1 received; ignored"),
        }
    }

    /// SIGUSR1 means nothing to ferryd; it is caught so that a stray one cannot kill the relay.
    #[cfg(not(feature = "test-faults"))]
    fn user1(&self) {
        tracing::info!("SIGUSR1 received; ignored");
    }

    /// Proves progress, unless an accept loop has died: then the heartbeat stops, the health
    /// endpoint reports the route, and the watchdog lets systemd restart the daemon.
    fn beat(&mut self) {
        let mut all_alive = true;
        for running in &self.routes {
            if running.task.is_finished() {
                all_alive = false;
                self.state.set_problem(
                    &format!("route {}", running.name),
                    Some(format!("accept loop on {} ended unexpectedly", running.listen)),
                );
            }
        }
        if all_alive {
            self.state.beat();
        }
        let status = self.status_line();
        if status != self.last_status {
            self.notifier.status(&status);
            self.last_status = status;
        }
    }

    async fn stop(self) {
        let Daemon {
            config,
            engine,
            drain,
            routes,
            state,
            notifier,
            ..
        } = self;
        state.set_phase(Phase::Draining);
        notifier.stopping();
        if !config.shutdown_grace.is_zero() {
            tracing::info!(
                shutdown_grace = %humantime::format_duration(config.shutdown_grace),
                "health endpoint reports draining; listeners stay open for the grace period"
            );
            tokio::time::sleep(config.shutdown_grace).await;
        }
        let mut stats = Vec::new();
        for running in routes {
            drop(running.settings);
            let _ = running.task.await;
            stats.push(running.stats);
        }
        let live: usize = stats.iter().map(|s| s.live.load(Ordering::Relaxed)).sum();
        tracing::info!(
            live,
            drain_timeout = %humantime::format_duration(config.drain_timeout),
            "draining: listeners closed, waiting for live connections to finish"
        );
        let finished = drain.finish(config.drain_timeout, CLOSE_GRACE).await;
        if !finished {
            tracing::warn!("drain timeout reached; remaining connections were closed");
        }
        let relayed: u64 = stats
            .iter()
            .map(|s| s.counters.relayed.load(Ordering::Relaxed))
            .sum();
        let relay = engine.counters();
        tracing::info!(
            relayed,
            spliced_bytes = relay.spliced_bytes.load(Ordering::Relaxed),
            copied_bytes = relay.copied_bytes.load(Ordering::Relaxed),
            fallback_no_pipe = relay.fallback_no_pipe.load(Ordering::Relaxed),
            fallback_refused = relay.fallback_refused.load(Ordering::Relaxed),
            accounting_mismatches = relay.accounting_mismatches.load(Ordering::Relaxed),
            pipes_created = engine.pipe_counts().map_or(0, |(_, _, created)| created),
            message_id = ids::STOPPED,
            "stopped"
        );
    }
}

/// The health endpoint: the socket passed in (by systemd, or by the previous image of a live
/// upgrade) or bound now, kept in the fd store, served on a thread of its own. Returns a second
/// descriptor of its socket (for the next live upgrade) and the gate that holds it still then.
async fn start_health(
    config: &Config,
    state: &Arc<State>,
    passed: &mut Passed,
    store: &mut FdStore,
) -> anyhow::Result<(Option<std::net::TcpListener>, crate::health::Gate)> {
    let health = &config.health;
    let (listener, passed_name) = match passed.claim(HEALTH_SOCKET_NAME, health.listen) {
        Some(claimed) => claimed,
        None => (
            crate::net::listen_with_retry(health.listen, crate::net::BIND_RETRY_WINDOW)
                .await
                .with_context(|| format!("health endpoint: cannot listen on {}", health.listen))?,
            String::new(),
        ),
    };
    store.keep(HEALTH_SOCKET_NAME, &passed_name, &listener);
    let health_socket = listener.try_clone().ok();
    let health_gate =
        crate::health::spawn(listener, state.clone()).context("cannot start the health endpoint")?;
    tracing::info!(listen = %health.listen, path = %health.path, "health endpoint listening");
    Ok((health_socket, health_gate))
}

/// The control socket, when configured. A relay without it still relays: only `ferryd
/// connections --close` is lost, and the log says why.
fn start_control(config: &Config, engine: &Arc<Engine>) {
    if let Some(path) = &config.control_socket
        && let Err(e) = crate::control::spawn(path, engine.clone())
    {
        tracing::warn!(error = %e, "control socket unavailable: `ferryd connections --close` cannot reach this daemon");
    }
}

/// NAT is kept by its own process (`ferryd nat run`); the relay reads its report on a task of
/// its own, and READY=1 never waits for it. Returns where a reload sends the new `[nat]`.
fn start_nat_report(config: &Config, state: &Arc<State>) -> watch::Sender<crate::config::Nat> {
    let (nat, nat_rx) = watch::channel(config.nat.clone());
    tokio::spawn(crate::nat::report::watch(nat_rx, state.clone()));
    nat
}
