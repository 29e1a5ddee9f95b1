//! Counters the daemon keeps about itself: per route (connections by outcome, live connections,
//! bytes, upstream connect times) and for the relay engine as a whole (spliced and copied bytes,
//! fallbacks).
//!
//! This module owns the numbers and the one spelling of each connection outcome. It must not
//! format, export or log them; the exit summary, `/status` and `/metrics` read them from here.
//! Every counter is a relaxed atomic: they are statistics, never used to make a decision that
//! needs ordering, except `live`, which admission compares with max_connections and where being
//! off by a connection under a race is acceptable.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::SystemTime;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

/// How a connection ended, or why it never started. [`Outcome::name`] is the one spelling of it
/// everywhere: the `end=` field of the log line, the keys of `/status`, the metric labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Both sides closed in order; every byte was delivered.
    Eof,
    /// One side reset or failed; the reset was passed on to the other.
    Reset,
    /// No bytes either way for idle_timeout (or fin_timeout once half-closed).
    Idle,
    /// Closed because the drain timeout ran out during shutdown.
    Drain,
    /// Ended on purpose by a privileged local user (`ferryd connections --close`): both sides
    /// reset.
    ClosedByAdmin,
    /// The source is not on the route's allowlist: reset before anything was dialled.
    Denied,
    /// A load-balancer probe: accepted and closed with a FIN, never relayed.
    Probe,
    /// The route was at max_connections: reset.
    Limit,
    /// The upstream refused the connection.
    UpstreamRefused,
    /// The upstream did not answer within connect_timeout.
    UpstreamTimeout,
    /// The upstream could not be reached (no route, name did not resolve, ...).
    UpstreamUnreachable,
}

impl Outcome {
    /// Every outcome, in a fixed order, for counters and metrics.
    pub const ALL: [Outcome; 11] = [
        Outcome::Eof,
        Outcome::Reset,
        Outcome::Idle,
        Outcome::Drain,
        Outcome::ClosedByAdmin,
        Outcome::Denied,
        Outcome::Probe,
        Outcome::Limit,
        Outcome::UpstreamRefused,
        Outcome::UpstreamTimeout,
        Outcome::UpstreamUnreachable,
    ];

    /// The outcome's name in logs, `/status` and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Outcome::Eof => "eof",
            Outcome::Reset => "reset",
            Outcome::Idle => "idle",
            Outcome::Drain => "drain",
            Outcome::ClosedByAdmin => "closed-by-admin",
            Outcome::Denied => "denied",
            Outcome::Probe => "probe",
            Outcome::Limit => "limit",
            Outcome::UpstreamRefused => "upstream-refused",
            Outcome::UpstreamTimeout => "upstream-timeout",
            Outcome::UpstreamUnreachable => "upstream-unreachable",
        }
    }

    /// Whether this is how a relayed connection ended (eof, reset, idle, drain, closed-by-admin),
    /// as opposed to why a connection was never relayed (admission or dial).
    pub fn is_end(self) -> bool {
        matches!(
            self,
            Outcome::Eof | Outcome::Reset | Outcome::Idle | Outcome::Drain | Outcome::ClosedByAdmin
        )
    }

    fn index(self) -> usize {
        Outcome::ALL.iter().position(|o| *o == self).unwrap_or(0)
    }
}

/// Counters of one route. They follow the route by name across reloads, a move to another
/// listen address included, and across live upgrades (its [`RouteCounters`]).
#[derive(Debug)]
pub struct RouteStats {
    /// Connections currently relayed or dialling; admission compares it with max_connections.
    pub live: AtomicUsize,
    /// The counters a live upgrade carries.
    pub counters: RouteCounters,
    /// Time to connect to the upstream, for successful dials (seconds). Not carried by a live
    /// upgrade: a histogram's buckets cannot be set, only observed into, so the series starts
    /// again (Prometheus's rate() takes that as a counter reset).
    pub connect_seconds: Histogram,
    /// The most recent failed dial: when, and why.
    pub last_upstream_error: Mutex<Option<(SystemTime, String)>>,
    /// The latest connection admitted by its PROXY v2 header: when, the TCP peer, the client
    /// and the LinkID the header named.
    last_proxied: Mutex<Option<Proxied>>,
    /// The latest probe answered on this route: when, and from where.
    last_probe: Mutex<Option<(SystemTime, std::net::IpAddr)>>,
    /// The sources denied most often.
    denied: Mutex<DeniedSources>,
    /// Whether the latest connections carried a PROXY v2 header: one bit each, the newest
    /// lowest, and how many bits are in use (at most 16).
    recent_headers: Mutex<(u16, u8)>,
    /// When the upstream answered, and how dials failed since it last did.
    upstream: Mutex<UpstreamHistory>,
}

/// A route's upstream as the dials found it since the daemon started: what tells a build VM
/// that is not there yet (still booting, or an NSG drops the port) from one that stopped
/// answering (sshd or WinRM stopped, a firewall turned on mid-build).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UpstreamHistory {
    /// The first successful dial since start.
    pub first_answer: Option<SystemTime>,
    /// The latest successful dial.
    pub last_answer: Option<SystemTime>,
    /// Failed dials since the latest success (or since start), by outcome name.
    pub failures: BTreeMap<&'static str, u64>,
}

/// A route's counters: the one declaration of what a live upgrade carries for a route. Every
/// field crosses, by serde (see [`super::carry`]); a counter added here crosses with no other
/// change, and one that must not cross belongs in [`RouteStats`] instead.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct RouteCounters {
    /// Connections whose dial succeeded.
    pub relayed: AtomicU64,
    /// Connections by outcome, by [`Outcome::name`] (a name another version does not know is
    /// skipped).
    #[serde(with = "by_name::outcomes")]
    outcomes: [AtomicU64; Outcome::ALL.len()],
    /// Bytes from clients to the upstream.
    pub bytes_up: AtomicU64,
    /// Bytes from the upstream to clients.
    pub bytes_down: AtomicU64,
    /// Accepts that failed for lack of descriptors or memory (each one pauses the listener).
    pub accept_errors: AtomicU64,
    /// PROXY v2 headers refused, by [`crate::proxy_header::Refusal::REASONS`].
    #[serde(with = "by_name::refusals")]
    header_refusals: [AtomicU64; crate::proxy_header::Refusal::REASONS.len()],
    /// Relayed connections by the LinkID in their PROXY v2 header, for at most [`MAX_LINK_IDS`]
    /// distinct ones.
    link_ids: Mutex<BTreeMap<u32, u64>>,
}

/// Arrays of counters carried as maps by name, so that a version with more or fewer names, or
/// another order, reads them right.
mod by_name {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicU64, Ordering};

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    fn serialize<S: Serializer>(names: &[&str], counters: &[AtomicU64], s: S) -> Result<S::Ok, S::Error> {
        let map: BTreeMap<&str, u64> = names
            .iter()
            .zip(counters)
            .map(|(name, n)| (*name, n.load(Ordering::Relaxed)))
            .collect();
        map.serialize(s)
    }

    fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        names: &[&str],
        d: D,
    ) -> Result<[AtomicU64; N], D::Error> {
        let map = BTreeMap::<String, u64>::deserialize(d)?;
        let counters: [AtomicU64; N] = std::array::from_fn(|_| AtomicU64::new(0));
        for (name, n) in map {
            if let Some(i) = names.iter().position(|known| *known == name)
                && let Some(counter) = counters.get(i)
            {
                counter.store(n, Ordering::Relaxed);
            }
        }
        Ok(counters)
    }

    /// [`super::Outcome`]s by name.
    pub mod outcomes {
        use super::*;
        use crate::state::counters::Outcome;

        const NAMES: [&str; Outcome::ALL.len()] = {
            let mut names = [""; Outcome::ALL.len()];
            let mut i = 0;
            while i < names.len() {
                names[i] = Outcome::ALL[i].name();
                i += 1;
            }
            names
        };

        pub fn serialize<S: Serializer>(
            c: &[AtomicU64; Outcome::ALL.len()],
            s: S,
        ) -> Result<S::Ok, S::Error> {
            super::serialize(&NAMES, c, s)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<[AtomicU64; Outcome::ALL.len()], D::Error> {
            super::deserialize(&NAMES, d)
        }
    }

    /// PROXY header refusals by reason.
    pub mod refusals {
        use super::*;
        use crate::proxy_header::Refusal;

        pub fn serialize<S: Serializer>(
            c: &[AtomicU64; crate::proxy_header::Refusal::REASONS.len()],
            s: S,
        ) -> Result<S::Ok, S::Error> {
            super::serialize(&Refusal::REASONS, c, s)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<[AtomicU64; crate::proxy_header::Refusal::REASONS.len()], D::Error> {
            super::deserialize(&Refusal::REASONS, d)
        }
    }
}

/// "seen", "not seen" or "mixed" for the `count` latest bits of `bits`.
fn summary((bits, count): (u16, u8)) -> Option<&'static str> {
    if count == 0 {
        return None;
    }
    let mask = if count >= 16 {
        u16::MAX
    } else {
        (1u16 << count) - 1
    };
    Some(match bits & mask {
        0 => "not seen",
        b if b == mask => "seen",
        _ => "mixed",
    })
}

/// Sources denied on a route, the most frequent few: enough for `ferryd doctor` to show which
/// address the balancer really uses when the allowlist does not match it. A bounded table: when
/// full, a new source replaces the least frequent one (the space-saving idea), so a scan of many
/// addresses costs no more memory than a handful.
#[derive(Debug, Default)]
pub struct DeniedSources {
    entries: Vec<DeniedSource>,
}

/// One denied source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeniedSource {
    /// The address.
    pub ip: std::net::IpAddr,
    /// Connections denied from it (an upper bound once it replaced another entry).
    pub count: u64,
    /// First and latest denial.
    pub first: SystemTime,
    /// See `first`.
    pub last: SystemTime,
}

/// Sources a route remembers; the top [`DENIED_SHOWN`] are shown.
const DENIED_KEPT: usize = 16;
/// Sources `/status` shows per route.
pub const DENIED_SHOWN: usize = 8;

impl DeniedSources {
    fn note(&mut self, ip: std::net::IpAddr, now: SystemTime) {
        if let Some(e) = self.entries.iter_mut().find(|e| e.ip == ip) {
            e.count += 1;
            e.last = now;
        } else if self.entries.len() < DENIED_KEPT {
            self.entries.push(DeniedSource {
                ip,
                count: 1,
                first: now,
                last: now,
            });
        } else if let Some(least) = self.entries.iter_mut().min_by_key(|e| e.count) {
            *least = DeniedSource {
                ip,
                count: least.count + 1,
                first: now,
                last: now,
            };
        }
    }

    fn top(&self) -> Vec<DeniedSource> {
        let mut top = self.entries.clone();
        top.sort_by(|a, b| b.count.cmp(&a.count).then(b.last.cmp(&a.last)));
        top.truncate(DENIED_SHOWN);
        top
    }
}

/// A connection admitted by its PROXY v2 header, as `/status` shows the latest one.
#[derive(Clone, Debug)]
pub struct Proxied {
    /// When it was admitted.
    pub at: SystemTime,
    /// The TCP peer (a Private Link NAT address).
    pub peer: std::net::SocketAddr,
    /// The client the header named.
    pub client: Option<std::net::SocketAddr>,
    /// The private endpoint's LinkID.
    pub link_id: Option<u32>,
}

/// Distinct LinkIDs counted per route; a balancer has a handful of private endpoints, and the
/// bound keeps a forged-header flood from growing the map (later ones are not counted by id).
pub const MAX_LINK_IDS: usize = 64;

impl RouteStats {
    /// A route's stats starting from `counters` (fresh, or carried by a live upgrade);
    /// `connect_seconds` is the route's series of the shared histogram family.
    pub fn new(connect_seconds: Histogram, counters: RouteCounters) -> Self {
        RouteStats {
            live: AtomicUsize::new(0),
            counters,
            connect_seconds,
            last_upstream_error: Mutex::new(None),
            last_proxied: Mutex::new(None),
            last_probe: Mutex::new(None),
            denied: Mutex::new(DeniedSources::default()),
            recent_headers: Mutex::new((0, 0)),
            upstream: Mutex::new(UpstreamHistory::default()),
        }
    }

    /// Notes a successful dial.
    pub fn upstream_answered(&self) {
        let now = SystemTime::now();
        let mut history = self.upstream.lock().unwrap_or_else(|p| p.into_inner());
        history.first_answer.get_or_insert(now);
        history.last_answer = Some(now);
        history.failures.clear();
    }

    /// The upstream's history since start.
    pub fn upstream_history(&self) -> UpstreamHistory {
        self.upstream.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Notes whether a connection carried a PROXY v2 header. Returns the route's summary when
    /// this changed it (see [`RouteStats::proxy_headers`]).
    pub fn saw_header(&self, carried: bool) -> Option<&'static str> {
        let mut recent = self.recent_headers.lock().unwrap_or_else(|p| p.into_inner());
        let before = summary(*recent);
        *recent = (
            (recent.0 << 1) | u16::from(carried),
            recent.1.saturating_add(1).min(16),
        );
        let now = summary(*recent);
        (now != before).then_some(now).flatten()
    }

    /// Whether the latest connections (up to 16) carried PROXY v2 headers: "seen" (all),
    /// "not seen" (none) or "mixed"; `None` before the first connection.
    pub fn proxy_headers(&self) -> Option<&'static str> {
        summary(*self.recent_headers.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Remembers a failed dial (`outcome`, and why) for /status.
    pub fn upstream_failed(&self, outcome: Outcome, reason: String) {
        *self
            .upstream
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .failures
            .entry(outcome.name())
            .or_default() += 1;
        let mut last = self.last_upstream_error.lock().unwrap_or_else(|p| p.into_inner());
        *last = Some((SystemTime::now(), reason));
    }

    /// The most recent failed dial, if any.
    pub fn last_upstream_error(&self) -> Option<(SystemTime, String)> {
        self.last_upstream_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Notes a probe answered on this route.
    pub fn probed(&self, source: std::net::IpAddr) {
        *self.last_probe.lock().unwrap_or_else(|p| p.into_inner()) = Some((SystemTime::now(), source));
    }

    /// The latest probe, if any.
    pub fn last_probe(&self) -> Option<(SystemTime, std::net::IpAddr)> {
        *self.last_probe.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes a source denied by the allowlist.
    pub fn denied(&self, source: std::net::IpAddr) {
        self.denied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .note(source, SystemTime::now());
    }

    /// The sources denied most often, most frequent first.
    pub fn denied_sources(&self) -> Vec<DeniedSource> {
        self.denied.lock().unwrap_or_else(|p| p.into_inner()).top()
    }

    /// Counts a refused PROXY v2 header by its reason.
    pub fn header_refused(&self, reason: &str) {
        let reasons = crate::proxy_header::Refusal::REASONS;
        if let Some(i) = reasons.iter().position(|r| *r == reason) {
            self.counters.header_refusals[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Refused PROXY v2 headers by reason.
    pub fn header_refusals(&self) -> Vec<(&'static str, u64)> {
        crate::proxy_header::Refusal::REASONS
            .iter()
            .zip(&self.counters.header_refusals)
            .map(|(r, n)| (*r, n.load(Ordering::Relaxed)))
            .collect()
    }

    /// Notes a connection admitted by its PROXY v2 header.
    pub fn proxied(&self, peer: std::net::SocketAddr, header: &crate::proxy_header::Header) {
        if let Some(id) = header.link_id {
            let mut ids = self.counters.link_ids.lock().unwrap_or_else(|p| p.into_inner());
            if ids.len() < MAX_LINK_IDS || ids.contains_key(&id) {
                *ids.entry(id).or_default() += 1;
            }
        }
        *self.last_proxied.lock().unwrap_or_else(|p| p.into_inner()) = Some(Proxied {
            at: SystemTime::now(),
            peer,
            client: header.client(),
            link_id: header.link_id,
        });
    }

    /// Connections by LinkID.
    pub fn link_ids(&self) -> Vec<(u32, u64)> {
        let ids = self.counters.link_ids.lock().unwrap_or_else(|p| p.into_inner());
        ids.iter().map(|(id, n)| (*id, *n)).collect()
    }

    /// The latest connection admitted by its header.
    pub fn last_proxied(&self) -> Option<Proxied> {
        self.last_proxied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Counts one connection that ended with `outcome`.
    pub fn record(&self, outcome: Outcome) {
        self.counters.outcomes[outcome.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// How many connections ended with `outcome`.
    pub fn count(&self, outcome: Outcome) -> u64 {
        self.counters.outcomes[outcome.index()].load(Ordering::Relaxed)
    }
}

/// Upstream connect times from 0.5 ms (same host) doubling to about 4 s (connect_timeout's
/// neighbourhood); a dial on the same VNET lands in the first few buckets.
fn connect_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 14))
}

/// Histograms by a `route` label, made with [`connect_buckets`].
pub type ConnectFamily = Family<Vec<(&'static str, String)>, Histogram, fn() -> Histogram>;

/// The histogram family of upstream connect times by route. It outlives scrapes (a histogram
/// cannot be rebuilt from atomics at scrape time) and routes (a route re-created by name gets its
/// series back).
#[derive(Debug, Clone)]
pub struct ConnectTimes {
    family: ConnectFamily,
}

impl Default for ConnectTimes {
    fn default() -> Self {
        ConnectTimes {
            family: Family::new_with_constructor(connect_buckets as fn() -> Histogram),
        }
    }
}

impl ConnectTimes {
    /// The series of `route`, for its counters to observe into.
    pub fn of(&self, route: &str) -> Histogram {
        self.family
            .get_or_create(&vec![("route", route.to_string())])
            .clone()
    }

    /// The whole family, for `/metrics`.
    pub fn family(&self) -> &ConnectFamily {
        &self.family
    }
}

/// Counters of the relay engine, shared by every route: the one declaration of what a live
/// upgrade carries of them (every field crosses, by serde; see [`super::carry`]).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct RelayStats {
    /// Bytes moved socket → pipe → socket.
    pub spliced_bytes: AtomicU64,
    /// Bytes moved through a user-space buffer.
    pub copied_bytes: AtomicU64,
    /// Bursts copied because no pipe was free (max_pipes reached, or pipe creation failed).
    pub fallback_no_pipe: AtomicU64,
    /// Connection directions switched to copying because the kernel refused splice.
    pub fallback_refused: AtomicU64,
    /// Connections numbered so far: the next one gets this plus one. Carried across live
    /// upgrades, so an id is never given twice in the daemon's life.
    pub connections_numbered: AtomicU64,
    /// Directions that ended in order (or parked) holding other than what they should: bytes
    /// read from one side and not written to the other, nor carried. Zero unless a byte was
    /// lost.
    pub accounting_mismatches: AtomicU64,
}

impl RelayStats {
    /// The id of a new connection: unique for the daemon's life, live upgrades included.
    pub fn next_connection_id(&self) -> u64 {
        self.connections_numbered.fetch_add(1, Ordering::Relaxed) + 1
    }
}
