//! `/metrics`: the daemon's counters in the Prometheus/OpenMetrics text format, names prefixed
//! `ferryd_`.
//!
//! This module owns the metric names, labels and help texts. The numbers themselves live in the
//! shared state ([`crate::state`]) as plain atomics, so the hot path never touches a registry; a
//! scrape builds a fresh registry from them. The one exception is the upstream connect-time
//! histogram, whose family the state keeps ([`crate::state::ConnectTimes`]). It must not change
//! any counter.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::state::{NatStatus, Outcome, State};

mod process;

/// A route label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    route: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndLabels {
    route: String,
    end: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    route: String,
    direction: String,
}

/// A single label whose name varies by metric (path, reason, state, result).
type OneLabel = Vec<(&'static str, String)>;

fn one(key: &'static str, value: &str) -> OneLabel {
    vec![(key, value.to_string())]
}

/// A counter family with one label, filled from the daemon's atomics at scrape time.
fn counters(label: &'static str, values: &[(&str, &AtomicU64)]) -> Family<OneLabel, Counter> {
    let family = Family::<OneLabel, Counter>::default();
    for (value, counter) in values {
        family
            .get_or_create(&one(label, value))
            .inc_by(counter.load(Ordering::Relaxed));
    }
    family
}

/// Renders every metric as OpenMetrics text.
pub fn render(state: &State) -> String {
    let mut root = Registry::default();
    process::register(&mut root, state);
    let registry = root.sub_registry_with_prefix("ferryd");

    let connections = Family::<OutcomeLabels, Counter>::default();
    let ends = Family::<EndLabels, Counter>::default();
    let live = Family::<RouteLabel, Gauge>::default();
    let limit = Family::<RouteLabel, Gauge>::default();
    let bytes = Family::<DirectionLabels, Counter>::default();
    let accept_errors = Family::<RouteLabel, Counter>::default();
    let refusals = Family::<Vec<(&'static str, String)>, Counter>::default();
    let link_ids = Family::<Vec<(&'static str, String)>, Counter>::default();
    for view in state.routes() {
        let route = view.route.name.clone();
        let stats = &view.stats;
        let outcome = |name: &str, value: u64| {
            connections
                .get_or_create(&OutcomeLabels {
                    route: route.clone(),
                    outcome: name.to_string(),
                })
                .inc_by(value);
        };
        outcome("relayed", stats.counters.relayed.load(Ordering::Relaxed));
        for o in Outcome::ALL {
            if o.is_end() {
                ends.get_or_create(&EndLabels {
                    route: route.clone(),
                    end: o.name().to_string(),
                })
                .inc_by(stats.count(o));
            } else {
                outcome(o.name(), stats.count(o));
            }
        }
        live.get_or_create(&RouteLabel { route: route.clone() })
            .set(stats.live.load(Ordering::Relaxed) as i64);
        limit
            .get_or_create(&RouteLabel { route: route.clone() })
            .set(view.route.max_connections as i64);
        for (direction, counter) in [
            ("up", &stats.counters.bytes_up),
            ("down", &stats.counters.bytes_down),
        ] {
            bytes
                .get_or_create(&DirectionLabels {
                    route: route.clone(),
                    direction: direction.to_string(),
                })
                .inc_by(counter.load(Ordering::Relaxed));
        }
        accept_errors
            .get_or_create(&RouteLabel { route: route.clone() })
            .inc_by(stats.counters.accept_errors.load(Ordering::Relaxed));
        for (reason, n) in stats.header_refusals() {
            refusals
                .get_or_create(&vec![("route", route.clone()), ("reason", reason.to_string())])
                .inc_by(n);
        }
        for (id, n) in stats.link_ids() {
            link_ids
                .get_or_create(&vec![("route", route.clone()), ("link_id", id.to_string())])
                .inc_by(n);
        }
    }
    registry.register(
        "connections",
        "Connections accepted, by route and what became of them (relayed, or why not)",
        connections,
    );
    registry.register(
        "connection_ends",
        "Relayed connections that ended, by route and how (eof, reset, idle, drain, closed-by-admin)",
        ends,
    );
    registry.register(
        "connections_live",
        "Connections relayed or dialling now, by route",
        live,
    );
    registry.register(
        "route_max_connections",
        "The route's max_connections, for alerting on ferryd_connections_live near it",
        limit,
    );
    registry.register(
        "relayed_bytes",
        "Bytes relayed, by route and direction (up: client to build VM, down: back)",
        bytes,
    );
    registry.register(
        "upstream_connect_seconds",
        "Time to connect to the upstream, successful dials only",
        state.connect_times.family().clone(),
    );
    registry.register(
        "proxy_header_refusals",
        "PROXY v2 headers refused, by route and reason (missing, v1, malformed, oversized, truncated, timeout)",
        refusals,
    );
    registry.register(
        "proxied_connections",
        "Connections admitted by their PROXY v2 header, by route and private endpoint LinkID",
        link_ids,
    );
    registry.register(
        "accept_errors",
        "Accepts that failed for lack of descriptors or memory, by route",
        accept_errors,
    );

    let relay = state.engine.counters();
    registry.register(
        "relay_bytes",
        "Bytes relayed, by path: splice (zero-copy) or copy (through a buffer)",
        counters(
            "path",
            &[("splice", &relay.spliced_bytes), ("copy", &relay.copied_bytes)],
        ),
    );
    registry.register(
        "splice_fallbacks",
        "Times the relay copied instead of splicing: no_pipe (every pipe busy) or refused (kernel said no)",
        counters(
            "reason",
            &[
                ("no_pipe", &relay.fallback_no_pipe),
                ("refused", &relay.fallback_refused),
            ],
        ),
    );
    let pipes = Family::<OneLabel, Gauge>::default();
    if let Some((alive, pooled, _)) = state.engine.pipe_counts() {
        pipes.get_or_create(&one("state", "pooled")).set(pooled as i64);
        pipes
            .get_or_create(&one("state", "in_use"))
            .set(alive.saturating_sub(pooled) as i64);
    }
    registry.register(
        "pipes",
        "Pipes in the pool (pooled) and lent to connections (in_use)",
        pipes,
    );
    if let Some(max) = state.engine.pipe_limit() {
        let gauge = Gauge::<i64>::default();
        gauge.set(max as i64);
        registry.register(
            "max_pipes",
            "The max_pipes setting: past it, bursts are copied instead of spliced",
            gauge,
        );
    }
    let mismatches = Counter::<u64>::default();
    mismatches.inc_by(relay.accounting_mismatches.load(Ordering::Relaxed));
    registry.register(
        "accounting_mismatches",
        "Connection directions that ended in order (or parked for a live upgrade) having read bytes they neither wrote nor carried: a lost byte; always zero unless ferryd has a bug",
        mismatches,
    );
    let probes = Counter::<u64>::default();
    probes.inc_by(state.counters.health_probes.load(Ordering::Relaxed));
    registry.register(
        "health_probes",
        "Requests for the health path from the probe sources: the load balancer's probes arriving",
        probes,
    );

    let buffers = Gauge::<i64>::default();
    buffers.set(state.engine.buffers_lent() as i64);
    registry.register(
        "copy_buffers_in_use",
        "Pooled copy buffers lent now; at most 1024 (16 KiB each), past which a burst uses a 4 KiB buffer of its own",
        buffers,
    );

    registry.register(
        "reloads",
        "SIGHUP reloads, by result",
        counters(
            "result",
            &[
                ("ok", &state.counters.reloads_ok),
                ("rejected", &state.counters.reloads_rejected),
            ],
        ),
    );
    let (repairs, failures) = state.nat_counts();
    let reconciles = Family::<OneLabel, Counter>::default();
    reconciles
        .get_or_create(&one("event", "repaired"))
        .inc_by(repairs);
    reconciles.get_or_create(&one("event", "failed")).inc_by(failures);
    registry.register(
        "nat_reconciles",
        "NAT reconciles that found drift and repaired it, or failed, as the NAT keeper counts them (they start again when it restarts)",
        reconciles,
    );

    let nat_state = Family::<OneLabel, Gauge>::default();
    let nat = state.nat().name();
    for name in NatStatus::NAMES {
        nat_state
            .get_or_create(&one("state", name))
            .set(i64::from(name == nat));
    }
    registry.register(
        "nat_state",
        "NAT as the reconcile loop last found it: 1 for the current state (disabled, pending, ok, failed), 0 for the others",
        nat_state,
    );

    let dropped = Counter::<u64>::default();
    dropped.inc_by(crate::logging::dropped());
    registry.register(
        "log_lines_dropped",
        "Log lines dropped because the journal or stderr did not keep up (the relay never waits for logging)",
        dropped,
    );

    let healthy = Gauge::<i64>::default();
    healthy.set(i64::from(state.verdict().is_ok()));
    registry.register(
        "healthy",
        "1 when the health endpoint answers 200, else 0",
        healthy,
    );
    registry.register(
        "build",
        "ferryd's version",
        Info::new(vec![(
            "version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        )]),
    );

    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &root);
    out
}
