//! The daemon's shared state: what it knows about itself, in one place that the health endpoint,
//! `/status`, `/metrics`, the systemd glue and the NAT reconciler read and write: the phase
//! (starting, ready, draining), named problems, the heartbeat of the relay runtime, the running
//! routes with their counters, the engine's counters, NAT's state and the daemon's own counters.
//!
//! The daemon creates and owns it and hands an `Arc` to each part. It depends on no other part of
//! the daemon (the relay engine shows itself through [`EngineView`]), so every reader depends on
//! the state and never on another reader. It must not decide anything about connections.

pub mod counters;

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

pub use counters::{CarriedRelay, CarriedRoute, ConnectTimes, Outcome, RelayStats, RouteStats};

use crate::config::{Health, Route};

/// What the relay engine shows of itself: its counters and how many pipes and buffers it holds.
/// The engine implements it, so the state needs nothing from the relay.
pub trait EngineView: Send + Sync + Debug {
    /// Engine-wide counters (spliced and copied bytes, fallbacks).
    fn counters(&self) -> &RelayStats;
    /// Pipes `(alive, pooled, created since start)`, or `None` when splice is off.
    fn pipe_counts(&self) -> Option<(usize, usize, u64)>;
    /// Copy buffers lent now.
    fn buffers_lent(&self) -> usize;
    /// The most pipes that may exist (`max_pipes`), or `None` when splice is off.
    fn pipe_limit(&self) -> Option<usize>;
}

/// A relay runtime whose heartbeat is older than this is reported as stalled by the health
/// endpoint. The heartbeat ticks every second; ten missed ticks are not scheduling noise.
pub const STALL_LIMIT: Duration = Duration::from_secs(10);

/// Where the daemon is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Binding listeners.
    Starting = 0,
    /// Every listener is up.
    Ready = 1,
    /// SIGTERM received: listeners closing or closed, live connections finishing.
    Draining = 2,
}

/// NAT as the reconcile loop last found it. It is reported beside the relay's health, not in it:
/// by default a NAT failure never makes the probe fail (`[health] require_nat` changes that).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NatStatus {
    /// `[nat]` is off in the configuration.
    Disabled,
    /// Enabled, and the first reconcile has not finished yet.
    Pending,
    /// The rules and ip_forward are in place.
    Ok,
    /// The last reconcile failed; the reason, one line.
    Failed(String),
}

impl NatStatus {
    /// Every state's name, for the `ferryd_nat_state{state}` gauge.
    pub const NAMES: [&'static str; 4] = ["disabled", "pending", "ok", "failed"];

    /// The state's name in /status, metrics and STATUS=.
    pub fn name(&self) -> &'static str {
        match self {
            NatStatus::Disabled => "disabled",
            NatStatus::Pending => "pending",
            NatStatus::Ok => "ok",
            NatStatus::Failed(_) => "failed",
        }
    }

    /// Why NAT is not in place, when it should be.
    pub fn problem(&self) -> Option<String> {
        match self {
            NatStatus::Disabled | NatStatus::Ok => None,
            NatStatus::Pending => Some("not applied yet".into()),
            NatStatus::Failed(reason) => Some(reason.clone()),
        }
    }
}

/// A running route as the readers see it.
#[derive(Clone, Debug)]
pub struct RouteView {
    /// The route as new connections get it.
    pub route: Route,
    /// Its counters.
    pub stats: Arc<RouteStats>,
}

/// Shared, read-mostly state of the daemon.
#[derive(Debug)]
pub struct State {
    /// When the process first started (a live upgrade carries it over), and the matching instant.
    origin: Mutex<(SystemTime, Instant)>,
    /// When this program image started: the heartbeat's clock.
    started: Instant,
    phase: AtomicU8,
    heartbeat_ms: AtomicU64,
    problems: Mutex<BTreeMap<String, String>>,
    routes: RwLock<Vec<RouteView>>,
    health: RwLock<Arc<Health>>,
    nat: Mutex<NatStatus>,
    /// The relay engine's counters and gauges.
    pub engine: Arc<dyn EngineView>,
    /// SIGHUP reloads applied.
    pub reloads_ok: AtomicU64,
    /// SIGHUP reloads rejected (invalid file, unbindable address).
    pub reloads_rejected: AtomicU64,
    /// Health-path requests from the probe sources: the balancer's probes arriving.
    pub health_probes: AtomicU64,
    /// The latest of them: when, and from where.
    last_health_probe: Mutex<Option<(SystemTime, std::net::IpAddr)>>,
    /// NAT drift repaired by the reconcile loop.
    pub nat_repairs: AtomicU64,
    /// NAT reconciles that failed (iptables missing or refusing).
    pub nat_failures: AtomicU64,
    /// Upstream connect times by route, shared with the routes' counters.
    pub connect_times: ConnectTimes,
    /// Live upgrades completed since the process first started.
    pub upgrades: AtomicU64,
    /// Live upgrades asked for, completed or not.
    pub upgrade_attempts: AtomicU64,
    last_upgrade: Mutex<Option<UpgradeReport>>,
}

/// The outcome of the latest live upgrade attempt, for /status and `ferryd upgrade`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpgradeReport {
    /// Which attempt (the value of `upgrade_attempts` it counted as).
    pub attempt: u64,
    /// Whether the new program image took over.
    pub ok: bool,
    /// What happened: the versions, or why nothing changed.
    pub detail: String,
    /// When it ended.
    pub at: SystemTime,
    /// From parking the first connection to READY=1 in the new image.
    pub pause_ms: Option<u64>,
    /// Connections moved.
    pub moved: Option<usize>,
    /// Connections the park cost: reset instead of moved.
    pub not_moved: Option<usize>,
}

/// Daemon-wide counters a live upgrade carries to the next program image.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct CarriedDaemon {
    /// When the process first started, in milliseconds since the Unix epoch.
    pub started_at_ms: u64,
    /// How long ago, in milliseconds, when the document was written.
    pub uptime_ms: u64,
    /// Reloads applied.
    pub reloads_ok: u64,
    /// Reloads rejected.
    pub reloads_rejected: u64,
    /// Health probes.
    pub health_probes: u64,
    /// NAT repairs.
    pub nat_repairs: u64,
    /// NAT failures.
    pub nat_failures: u64,
    /// Upgrades completed before this one.
    pub upgrades: u64,
    /// Upgrade attempts, this one included.
    pub upgrade_attempts: u64,
}

impl State {
    /// State of a daemon that has just started.
    pub fn new(engine: Arc<dyn EngineView>, health: Health) -> Arc<State> {
        Arc::new(State {
            origin: Mutex::new((SystemTime::now(), Instant::now())),
            started: Instant::now(),
            phase: AtomicU8::new(Phase::Starting as u8),
            heartbeat_ms: AtomicU64::new(0),
            problems: Mutex::new(BTreeMap::new()),
            routes: RwLock::new(Vec::new()),
            health: RwLock::new(Arc::new(health)),
            nat: Mutex::new(NatStatus::Disabled),
            engine,
            reloads_ok: AtomicU64::new(0),
            reloads_rejected: AtomicU64::new(0),
            health_probes: AtomicU64::new(0),
            last_health_probe: Mutex::new(None),
            nat_repairs: AtomicU64::new(0),
            nat_failures: AtomicU64::new(0),
            connect_times: ConnectTimes::default(),
            upgrades: AtomicU64::new(0),
            upgrade_attempts: AtomicU64::new(0),
            last_upgrade: Mutex::new(None),
        })
    }

    /// The counters to carry across a live upgrade.
    pub fn carry(&self) -> CarriedDaemon {
        let (started_at, _) = *self.origin.lock().unwrap_or_else(|p| p.into_inner());
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CarriedDaemon {
            started_at_ms: started_at
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            uptime_ms: self.uptime().as_millis() as u64,
            reloads_ok: load(&self.reloads_ok),
            reloads_rejected: load(&self.reloads_rejected),
            health_probes: load(&self.health_probes),
            nat_repairs: load(&self.nat_repairs),
            nat_failures: load(&self.nat_failures),
            upgrades: load(&self.upgrades),
            upgrade_attempts: load(&self.upgrade_attempts),
        }
    }

    /// Takes over counters carried from the previous program image.
    pub fn carry_on(&self, carried: &CarriedDaemon) {
        let add = |c: &AtomicU64, n: u64| c.fetch_add(n, Ordering::Relaxed);
        add(&self.reloads_ok, carried.reloads_ok);
        add(&self.reloads_rejected, carried.reloads_rejected);
        add(&self.health_probes, carried.health_probes);
        add(&self.nat_repairs, carried.nat_repairs);
        add(&self.nat_failures, carried.nat_failures);
        add(&self.upgrades, carried.upgrades);
        add(&self.upgrade_attempts, carried.upgrade_attempts);
        let started_at = std::time::UNIX_EPOCH + Duration::from_millis(carried.started_at_ms);
        let now = Instant::now();
        let started = now
            .checked_sub(Duration::from_millis(carried.uptime_ms))
            .unwrap_or(now);
        *self.origin.lock().unwrap_or_else(|p| p.into_inner()) = (started_at, started);
    }

    /// Records how the latest upgrade attempt ended.
    pub fn upgrade_ended(&self, report: UpgradeReport) {
        *self.last_upgrade.lock().unwrap_or_else(|p| p.into_inner()) = Some(report);
    }

    /// How the latest upgrade attempt ended.
    pub fn last_upgrade(&self) -> Option<UpgradeReport> {
        self.last_upgrade
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Starting,
            1 => Phase::Ready,
            _ => Phase::Draining,
        }
    }

    /// Moves to `phase`.
    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Release);
    }

    /// Records that the relay runtime is making progress.
    pub fn beat(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.heartbeat_ms.store(ms.max(1), Ordering::Release);
    }

    /// How long since the last heartbeat (zero before the first one).
    pub fn heartbeat_age(&self) -> Duration {
        let last = self.heartbeat_ms.load(Ordering::Acquire);
        if last == 0 {
            return Duration::ZERO;
        }
        self.started.elapsed().saturating_sub(Duration::from_millis(last))
    }

    /// Sets or clears a named problem ("route ssh", ...). A problem makes the health endpoint
    /// answer 503 with its reason, so only the relay's own problems belong here.
    pub fn set_problem(&self, key: &str, problem: Option<String>) {
        let mut problems = self.problems.lock().unwrap_or_else(|p| p.into_inner());
        match problem {
            Some(reason) => {
                problems.insert(key.to_string(), reason);
            }
            None => {
                problems.remove(key);
            }
        }
    }

    /// `Ok` when the proxy VM should receive traffic; otherwise the one-line reason why not.
    pub fn verdict(&self) -> Result<(), String> {
        match self.phase() {
            Phase::Starting => return Err("starting: listeners are not all bound yet".into()),
            Phase::Draining => return Err("draining: ferryd is shutting down".into()),
            Phase::Ready => {}
        }
        let age = self.heartbeat_age();
        if age > STALL_LIMIT {
            return Err(format!(
                "relay runtime stalled: no progress for {}s",
                age.as_secs()
            ));
        }
        let problems = self.problems.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((key, reason)) = problems.iter().next() {
            return Err(format!("{key}: {reason}"));
        }
        if self.health().require_nat
            && let Some(reason) = self.nat().problem()
        {
            return Err(format!("nat: {reason}"));
        }
        Ok(())
    }

    /// Notes a health probe from `source` (a probe source).
    pub fn health_probed(&self, source: std::net::IpAddr) {
        self.health_probes.fetch_add(1, Ordering::Relaxed);
        *self.last_health_probe.lock().unwrap_or_else(|p| p.into_inner()) = Some((SystemTime::now(), source));
    }

    /// The latest health probe, if any.
    pub fn last_health_probe(&self) -> Option<(SystemTime, std::net::IpAddr)> {
        *self.last_health_probe.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// NAT's state, as the reconcile loop last set it.
    pub fn nat(&self) -> NatStatus {
        self.nat.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records NAT's state; returns the one it replaces.
    pub fn set_nat(&self, status: NatStatus) -> NatStatus {
        std::mem::replace(&mut *self.nat.lock().unwrap_or_else(|p| p.into_inner()), status)
    }

    /// Replaces the list of running routes.
    pub fn set_routes(&self, routes: Vec<RouteView>) {
        *self.routes.write().unwrap_or_else(|p| p.into_inner()) = routes;
    }

    /// The running routes.
    pub fn routes(&self) -> Vec<RouteView> {
        self.routes.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The health endpoint's current settings.
    pub fn health(&self) -> Arc<Health> {
        self.health.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Applies reloaded health settings (all but the listen address, which needs a restart).
    pub fn set_health(&self, health: Health) {
        *self.health.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(health);
    }

    /// When the daemon started, for /status.
    pub fn started_at(&self) -> SystemTime {
        self.origin.lock().unwrap_or_else(|p| p.into_inner()).0
    }

    /// How long the daemon has run.
    pub fn uptime(&self) -> Duration {
        self.origin.lock().unwrap_or_else(|p| p.into_inner()).1.elapsed()
    }
}
