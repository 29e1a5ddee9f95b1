//! The `/status` document: one typed description of the running daemon, built from the shared
//! state by the health endpoint and read back by `ferryd status`, so the two sides cannot
//! disagree on a key.
//!
//! Every field has a default when absent, so `ferryd status` can still read the document of a
//! daemon one version older or newer. It must not change the state it describes.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::state::{Outcome, State};

/// Everything `/status` says.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StatusDocument {
    /// ferryd's version.
    pub version: String,
    /// When the daemon started, in seconds since the Unix epoch.
    pub started_at: u64,
    /// How long it has run.
    pub uptime_seconds: u64,
    /// Whether the probe answers 200.
    pub ready: bool,
    /// Why not, when it does not.
    pub reason: Option<String>,
    /// The running routes, in configuration order.
    pub routes: Vec<RouteStatus>,
    /// The relay engine's counters.
    pub relay: RelayStatus,
    /// NAT's state.
    pub nat: NatReport,
    /// The latest request for the health path from a probe source.
    pub health_probe: Option<Seen>,
    /// SIGHUP reloads.
    pub reloads: Reloads,
    /// The daemon's process id: what `ferryd upgrade` signals.
    pub pid: u32,
    /// Live upgrades (SIGUSR2 or `ferryd upgrade`).
    pub upgrade: UpgradeStatus,
}

/// Live upgrades since the process first started.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UpgradeStatus {
    /// Completed: a new program image took over.
    pub completed: u64,
    /// Asked for, completed or not.
    pub attempts: u64,
    /// The latest attempt's outcome.
    pub last: Option<LastUpgrade>,
}

/// How the latest upgrade attempt ended.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LastUpgrade {
    /// Which attempt it was (compare with `attempts`).
    pub attempt: u64,
    /// Whether the new image took over.
    pub ok: bool,
    /// The versions, or why nothing changed.
    pub detail: String,
    /// How long ago it ended.
    pub seconds_ago: u64,
    /// From parking the first connection to the new image's READY=1.
    pub pause_ms: Option<u64>,
    /// Connections moved to the new image (or taken back, when it failed).
    pub moved: Option<usize>,
    /// Connections the upgrade cost: reset instead of moved.
    pub not_moved: Option<usize>,
}

/// One route.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RouteStatus {
    /// Its name.
    pub name: String,
    /// Where it listens.
    pub listen: String,
    /// Where it relays to.
    pub upstream: String,
    /// Connections relayed or dialling now.
    pub live: usize,
    /// Connections whose dial succeeded.
    pub relayed: u64,
    /// Connections by outcome, keyed by [`Outcome::name`].
    pub outcomes: BTreeMap<String, u64>,
    /// Bytes client → upstream.
    pub bytes_up: u64,
    /// Bytes upstream → client.
    pub bytes_down: u64,
    /// The most recent failed dial.
    pub last_upstream_error: Option<UpstreamError>,
    /// When the upstream answered since the daemon started, and how dials failed since.
    pub upstream_seen: UpstreamSeen,
    /// `off` or `v2`.
    pub proxy_protocol: String,
    /// Refused PROXY v2 headers by reason (missing, v1, malformed, oversized, truncated,
    /// timeout, unexpected).
    pub header_refusals: BTreeMap<String, u64>,
    /// Relayed connections by the LinkID in their header (decimal, as allow_link_ids takes it).
    pub link_ids: BTreeMap<String, u64>,
    /// Whether the latest connections (up to 16) carried a PROXY v2 header: "seen", "not seen"
    /// or "mixed"; absent before the first connection. What the Private Link Service is doing.
    pub proxy_headers: Option<String>,
    /// The latest connection admitted by its PROXY v2 header.
    pub last_proxied: Option<LastProxied>,
    /// The latest probe answered on this route.
    pub last_probe: Option<Seen>,
    /// The sources denied most often, most frequent first (at most 8).
    pub denied_sources: Vec<DeniedSeen>,
}

/// A source seen, and how long ago.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Seen {
    /// The source address.
    pub source: String,
    /// Seconds before the document was made.
    pub seconds_ago: u64,
}

/// A source denied by a route's allowlist.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeniedSeen {
    /// The source address.
    pub source: String,
    /// Connections denied from it.
    pub count: u64,
    /// Seconds since the first denial kept.
    pub first_seen_ago: u64,
    /// Seconds since the latest denial.
    pub last_seen_ago: u64,
}

/// The latest connection admitted by its PROXY v2 header.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LastProxied {
    /// The TCP peer (a Private Link NAT address).
    pub peer: String,
    /// The client the header named.
    pub client: Option<String>,
    /// The private endpoint's LinkID.
    pub link_id: Option<u32>,
    /// How long ago, when the document was made.
    pub seconds_ago: u64,
}

impl RouteStatus {
    /// How many connections ended with `outcome`.
    pub fn count(&self, outcome: Outcome) -> u64 {
        self.outcomes.get(outcome.name()).copied().unwrap_or(0)
    }
}

/// A failed dial.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UpstreamError {
    /// When, in seconds since the Unix epoch.
    pub at: u64,
    /// How long ago, when the document was made.
    pub seconds_ago: u64,
    /// The outcome and the error.
    pub reason: String,
}

/// A route's upstream as the dials found it since the daemon started.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UpstreamSeen {
    /// The first successful dial since start, in seconds since the Unix epoch.
    pub first_answered_at: Option<u64>,
    /// The latest successful dial, in seconds since the Unix epoch.
    pub last_answered_at: Option<u64>,
    /// Failed dials since the latest success (or since start), by outcome.
    pub failed_since: BTreeMap<String, u64>,
}

/// The relay engine.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RelayStatus {
    /// Bytes moved with splice.
    pub spliced_bytes: u64,
    /// Bytes moved through a buffer.
    pub copied_bytes: u64,
    /// Bursts copied because no pipe was free.
    pub fallback_no_pipe: u64,
    /// Directions switched to copying because the kernel refused splice.
    pub fallback_refused: u64,
    /// Directions that ended in order holding bytes they neither wrote nor carried: zero unless
    /// a byte was lost.
    pub accounting_mismatches: u64,
    /// Connections being relayed now (listed by /connections).
    pub connections: usize,
    /// Pipes lent to connections now.
    pub pipes_in_use: usize,
    /// Empty pipes waiting in the pool.
    pub pipes_pooled: usize,
    /// Copy buffers lent now.
    pub buffers_in_use: usize,
}

/// NAT as the reconcile loop last found it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NatReport {
    /// `disabled`, `pending`, `ok` or `failed`.
    pub state: String,
    /// Why it is not in place, when it should be.
    pub reason: Option<String>,
    /// Drift repaired since start.
    pub repairs: u64,
    /// Reconciles that failed since start.
    pub failures: u64,
}

/// SIGHUP reloads by result.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Reloads {
    /// Applied.
    pub ok: u64,
    /// Rejected (invalid file, unbindable address).
    pub rejected: u64,
}

fn ago(now: SystemTime, then: SystemTime) -> u64 {
    now.duration_since(then).map_or(0, |d| d.as_secs())
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl StatusDocument {
    /// The document for `state` now.
    pub fn of(state: &State) -> StatusDocument {
        let verdict = state.verdict();
        let now = SystemTime::now();
        let routes = state
            .routes()
            .iter()
            .map(|view| {
                let stats = &view.stats;
                RouteStatus {
                    name: view.route.name.clone(),
                    listen: view.route.listen.to_string(),
                    upstream: view.route.upstream.to_string(),
                    live: stats.live.load(Ordering::Relaxed),
                    relayed: stats.counters.relayed.load(Ordering::Relaxed),
                    outcomes: Outcome::ALL
                        .iter()
                        .map(|o| (o.name().to_string(), stats.count(*o)))
                        .collect(),
                    bytes_up: stats.counters.bytes_up.load(Ordering::Relaxed),
                    bytes_down: stats.counters.bytes_down.load(Ordering::Relaxed),
                    last_upstream_error: stats.last_upstream_error().map(|(at, reason)| UpstreamError {
                        at: unix_seconds(at),
                        seconds_ago: now.duration_since(at).map_or(0, |d| d.as_secs()),
                        reason,
                    }),
                    upstream_seen: {
                        let history = stats.upstream_history();
                        UpstreamSeen {
                            first_answered_at: history.first_answer.map(epoch),
                            last_answered_at: history.last_answer.map(epoch),
                            failed_since: history
                                .failures
                                .into_iter()
                                .map(|(k, n)| (k.to_string(), n))
                                .collect(),
                        }
                    },
                    proxy_protocol: view.route.proxy_protocol().name().into(),
                    // Every route can refuse one: "off" refuses an unexpected header.
                    header_refusals: stats
                        .header_refusals()
                        .into_iter()
                        .map(|(r, n)| (r.to_string(), n))
                        .collect(),
                    link_ids: stats
                        .link_ids()
                        .into_iter()
                        .map(|(id, n)| (id.to_string(), n))
                        .collect(),
                    proxy_headers: stats.proxy_headers().map(str::to_string),
                    last_probe: stats.last_probe().map(|(at, source)| Seen {
                        source: source.to_string(),
                        seconds_ago: ago(now, at),
                    }),
                    denied_sources: stats
                        .denied_sources()
                        .into_iter()
                        .map(|d| DeniedSeen {
                            source: d.ip.to_string(),
                            count: d.count,
                            first_seen_ago: ago(now, d.first),
                            last_seen_ago: ago(now, d.last),
                        })
                        .collect(),
                    last_proxied: stats.last_proxied().map(|p| LastProxied {
                        peer: p.peer.to_string(),
                        client: p.client.map(|c| c.to_string()),
                        link_id: p.link_id,
                        seconds_ago: now.duration_since(p.at).map_or(0, |d| d.as_secs()),
                    }),
                }
            })
            .collect();
        let counters = state.engine.counters();
        let (alive, pooled, _) = state.engine.pipe_counts().unwrap_or_default();
        let nat = state.nat();
        StatusDocument {
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at: unix_seconds(state.started_at()),
            uptime_seconds: state.uptime().as_secs(),
            ready: verdict.is_ok(),
            reason: verdict.err(),
            routes,
            relay: RelayStatus {
                spliced_bytes: counters.spliced_bytes.load(Ordering::Relaxed),
                copied_bytes: counters.copied_bytes.load(Ordering::Relaxed),
                fallback_no_pipe: counters.fallback_no_pipe.load(Ordering::Relaxed),
                fallback_refused: counters.fallback_refused.load(Ordering::Relaxed),
                accounting_mismatches: counters.accounting_mismatches.load(Ordering::Relaxed),
                connections: state.engine.connections().len(),
                pipes_in_use: alive.saturating_sub(pooled),
                pipes_pooled: pooled,
                buffers_in_use: state.engine.buffers_lent(),
            },
            nat: NatReport {
                state: nat.name().to_string(),
                reason: nat.problem(),
                repairs: state.nat_counts().0,
                failures: state.nat_counts().1,
            },
            health_probe: state.last_health_probe().map(|(at, source)| Seen {
                source: source.to_string(),
                seconds_ago: ago(now, at),
            }),
            reloads: Reloads {
                ok: state.counters.reloads_ok.load(Ordering::Relaxed),
                rejected: state.counters.reloads_rejected.load(Ordering::Relaxed),
            },
            pid: std::process::id(),
            upgrade: UpgradeStatus {
                completed: state.counters.upgrades.load(Ordering::Relaxed),
                attempts: state.counters.upgrade_attempts.load(Ordering::Relaxed),
                last: state.last_upgrade().map(|u| LastUpgrade {
                    attempt: u.attempt,
                    ok: u.ok,
                    detail: u.detail,
                    seconds_ago: ago(now, u.at),
                    pause_ms: u.pause_ms,
                    moved: u.moved,
                    not_moved: u.not_moved,
                }),
            },
        }
    }
}

/// Seconds since the Unix epoch.
fn epoch(at: std::time::SystemTime) -> u64 {
    at.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_tolerates_missing_keys() {
        let doc = StatusDocument {
            version: "1.2.3".into(),
            ready: true,
            routes: vec![RouteStatus {
                name: "ssh".into(),
                outcomes: [("upstream-refused".to_string(), 2)].into_iter().collect(),
                ..RouteStatus::default()
            }],
            ..StatusDocument::default()
        };
        let text = serde_json::to_string(&doc).unwrap();
        assert_eq!(serde_json::from_str::<StatusDocument>(&text).unwrap(), doc);
        assert_eq!(doc.routes[0].count(Outcome::UpstreamRefused), 2);
        let older: StatusDocument = serde_json::from_str(r#"{"version":"0.1.0","ready":false}"#).unwrap();
        assert_eq!(older.version, "0.1.0");
        assert!(older.routes.is_empty());
    }
}
