//! The daemon's shared state: what it knows about itself, in one place that the health endpoint,
//! `/status`, `/metrics`, the systemd glue and the NAT reconciler read and write: the phase
//! (starting, ready, draining), named problems, the heartbeat of the relay runtime, the running
//! routes with their counters, the engine's counters, NAT's state as the NAT keeper reports it,
//! and the daemon's own counters.
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

pub use counters::{ConnectTimes, Outcome, RelayStats, RouteCounters, RouteStats};

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
    /// Every connection being relayed.
    fn connections(&self) -> &crate::connections::Table;
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
/// A live upgrade carries it, so the next image does not report NAT pending (and fail a probe
/// with `require_nat`) until its first reconcile.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
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
    /// The daemon's own counters.
    pub counters: DaemonCounters,
    /// The latest health-path request from a probe source: when, and from where.
    last_health_probe: Mutex<Option<(SystemTime, std::net::IpAddr)>>,
    /// NAT drift repaired and reconciles failed, as the NAT keeper last reported them (its own
    /// counters: they start again when the keeper restarts).
    nat_counts: Mutex<(u64, u64)>,
    /// Upstream connect times by route, shared with the routes' counters.
    pub connect_times: ConnectTimes,
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

/// The daemon's own counters: the one declaration of what a live upgrade carries of them. Every
/// field crosses, by serde (see [`carry`]); a counter added here crosses with no other change.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct DaemonCounters {
    /// SIGHUP reloads applied.
    pub reloads_ok: AtomicU64,
    /// SIGHUP reloads rejected (invalid file, unbindable address).
    pub reloads_rejected: AtomicU64,
    /// Health-path requests from the probe sources: the balancer's probes arriving.
    pub health_probes: AtomicU64,
    /// Live upgrades completed since the process first started.
    pub upgrades: AtomicU64,
    /// Live upgrades asked for, completed or not.
    pub upgrade_attempts: AtomicU64,
}

/// What a live upgrade carries of the daemon besides its descriptors: its counters (`C`: the
/// state's own when written, [`DaemonCounters`] when read back) and what else must outlive a
/// program image. One serialisable struct: carrying writes it, restoring reads it, and nothing
/// is named a second time.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct CarriedDaemon<C = DaemonCounters> {
    /// The counters.
    #[serde(flatten)]
    pub counters: C,
    /// When the process first started, in milliseconds since the Unix epoch.
    pub started_at_ms: u64,
    /// How long ago, in milliseconds, when the document was written.
    pub uptime_ms: u64,
    /// Log lines dropped because the log's reader did not keep up.
    pub log_lines_dropped: u64,
    /// NAT's state, so the next image does not start from "pending".
    pub nat: Option<NatStatus>,
}

/// A set of counters as a live upgrade carries it: its serialised form. The struct that holds
/// the counters (with serde) is their one declaration.
pub fn carry<T: serde::Serialize>(counters: &T) -> serde_json::Value {
    serde_json::to_value(counters).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot carry a set of counters; they start again from zero");
        serde_json::Value::Null
    })
}

/// The counters [`carry`] wrote; anything it cannot read starts from zero (and says so), and a
/// counter the writer did not know starts from zero.
pub fn restore<T: serde::de::DeserializeOwned + Default>(carried: &serde_json::Value) -> T {
    if carried.is_null() {
        return T::default();
    }
    T::deserialize(carried).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot read carried counters; they start again from zero");
        T::default()
    })
}

impl State {
    /// State of a daemon that has just started: afresh, or from what a live upgrade carried.
    pub fn new(engine: Arc<dyn EngineView>, health: Health, carried: Option<CarriedDaemon>) -> Arc<State> {
        let carried = carried.unwrap_or_default();
        let now = Instant::now();
        let origin = if carried.started_at_ms == 0 {
            (SystemTime::now(), now)
        } else {
            (
                std::time::UNIX_EPOCH + Duration::from_millis(carried.started_at_ms),
                now.checked_sub(Duration::from_millis(carried.uptime_ms))
                    .unwrap_or(now),
            )
        };
        crate::logging::carry_on_dropped(carried.log_lines_dropped);
        Arc::new(State {
            origin: Mutex::new(origin),
            started: now,
            phase: AtomicU8::new(Phase::Starting as u8),
            heartbeat_ms: AtomicU64::new(0),
            problems: Mutex::new(BTreeMap::new()),
            routes: RwLock::new(Vec::new()),
            health: RwLock::new(Arc::new(health)),
            nat: Mutex::new(carried.nat.unwrap_or(NatStatus::Disabled)),
            engine,
            counters: carried.counters,
            last_health_probe: Mutex::new(None),
            nat_counts: Mutex::new((0, 0)),
            connect_times: ConnectTimes::default(),
            last_upgrade: Mutex::new(None),
        })
    }

    /// What a live upgrade carries of the daemon, as of now.
    pub fn carry(&self) -> serde_json::Value {
        let (started_at, _) = *self.origin.lock().unwrap_or_else(|p| p.into_inner());
        carry(&CarriedDaemon {
            counters: &self.counters,
            started_at_ms: started_at
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            uptime_ms: self.uptime().as_millis() as u64,
            log_lines_dropped: crate::logging::dropped(),
            nat: Some(self.nat()),
        })
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
        self.counters.health_probes.fetch_add(1, Ordering::Relaxed);
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

    /// Records the NAT keeper's counts: drift repaired, reconciles failed.
    pub fn set_nat_counts(&self, repairs: u64, failures: u64) {
        *self.nat_counts.lock().unwrap_or_else(|p| p.into_inner()) = (repairs, failures);
    }

    /// The NAT keeper's counts as last reported: drift repaired, reconciles failed.
    pub fn nat_counts(&self) -> (u64, u64) {
        *self.nat_counts.lock().unwrap_or_else(|p| p.into_inner())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every number in `value` replaced by a distinct one, counting from `next`.
    fn distinct(value: &mut serde_json::Value, next: &mut u64) {
        match value {
            serde_json::Value::Number(_) => {
                *value = (*next).into();
                *next += 1;
            }
            serde_json::Value::Object(map) => map.values_mut().for_each(|v| distinct(v, next)),
            serde_json::Value::Array(items) => items.iter_mut().for_each(|v| distinct(v, next)),
            _ => {}
        }
    }

    /// A set of counters `T` with every counter at a distinct value (`more` adds entries to its
    /// maps first) crosses through what a live upgrade writes and reads, every value intact; and
    /// the values are really distinct, so a field read into the wrong counter shows.
    fn crosses_whole<T>(more: impl FnOnce(&mut serde_json::Value)) -> usize
    where
        T: serde::Serialize + serde::de::DeserializeOwned + Default,
    {
        let mut carried = carry(&T::default());
        more(&mut carried);
        let mut next = 1;
        distinct(&mut carried, &mut next);
        let restored: T = restore(&carried);
        assert_eq!(carry(&restored), carried);
        (next - 1) as usize
    }

    #[test]
    fn every_counter_crosses_a_live_upgrade() {
        // Spliced and copied bytes, two fallbacks, connections numbered, accounting mismatches.
        assert_eq!(crosses_whole::<RelayStats>(|_| {}), 6);
        // Relayed, bytes up and down, accept errors, every outcome, six refusal reasons, and the
        // two LinkIDs added here.
        let route = crosses_whole::<RouteCounters>(|v| {
            v["link_ids"]["7"] = 0.into();
            v["link_ids"]["4000000000"] = 0.into();
        });
        assert_eq!(
            route,
            4 + Outcome::ALL.len() + crate::proxy_header::Refusal::REASONS.len() + 2
        );
        // Five counters, the start time and uptime, log drops; NAT's state is not a number.
        let daemon = crosses_whole::<CarriedDaemon>(|v| {
            v["nat"] = serde_json::to_value(NatStatus::Failed("iptables: gone".into())).unwrap();
        });
        assert_eq!(daemon, 5 + 3);
    }

    #[test]
    fn nat_state_crosses_as_it_was() {
        for nat in [
            NatStatus::Disabled,
            NatStatus::Pending,
            NatStatus::Ok,
            NatStatus::Failed("why".into()),
        ] {
            let carried = carry(&CarriedDaemon::<DaemonCounters> {
                nat: Some(nat.clone()),
                ..Default::default()
            });
            assert_eq!(restore::<CarriedDaemon>(&carried).nat, Some(nat));
        }
    }

    #[test]
    fn counters_a_version_does_not_know_or_lacks_are_skipped_or_zero() {
        let carried = serde_json::json!({"relayed": 5, "bytes_up": 6, "outcomes": {"eof": 3, "future": 9}, "new_counter": 1});
        let restored: RouteCounters = restore(&carried);
        let back = carry(&restored);
        assert_eq!(back["relayed"], 5);
        assert_eq!(back["bytes_up"], 6);
        assert_eq!(back["bytes_down"], 0);
        assert_eq!(back["outcomes"]["eof"], 3);
        assert!(back["outcomes"].get("future").is_none());
        // Not counters at all: everything starts from zero rather than failing.
        let restored: RouteCounters = restore(&serde_json::json!("nonsense"));
        assert_eq!(carry(&restored)["relayed"], 0);
    }
}
