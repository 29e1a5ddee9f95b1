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
    pub const ALL: [Outcome; 10] = [
        Outcome::Eof,
        Outcome::Reset,
        Outcome::Idle,
        Outcome::Drain,
        Outcome::Denied,
        Outcome::Probe,
        Outcome::Limit,
        Outcome::UpstreamRefused,
        Outcome::UpstreamTimeout,
        Outcome::UpstreamUnreachable,
    ];

    /// The outcome's name in logs, `/status` and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Eof => "eof",
            Outcome::Reset => "reset",
            Outcome::Idle => "idle",
            Outcome::Drain => "drain",
            Outcome::Denied => "denied",
            Outcome::Probe => "probe",
            Outcome::Limit => "limit",
            Outcome::UpstreamRefused => "upstream-refused",
            Outcome::UpstreamTimeout => "upstream-timeout",
            Outcome::UpstreamUnreachable => "upstream-unreachable",
        }
    }

    /// Whether this is how a relayed connection ended (eof, reset, idle, drain), as opposed to
    /// why a connection was never relayed (admission or dial).
    pub fn is_end(self) -> bool {
        matches!(
            self,
            Outcome::Eof | Outcome::Reset | Outcome::Idle | Outcome::Drain
        )
    }

    fn index(self) -> usize {
        Outcome::ALL.iter().position(|o| *o == self).unwrap_or(0)
    }
}

/// Counters of one route. They follow the route by name across reloads, a move to another
/// listen address included.
#[derive(Debug)]
pub struct RouteStats {
    /// Connections currently relayed or dialling; admission compares it with max_connections.
    pub live: AtomicUsize,
    /// Connections whose upstream dial succeeded.
    pub relayed: AtomicU64,
    /// Time to connect to the upstream, for successful dials (seconds).
    pub connect_seconds: Histogram,
    /// The most recent failed dial: when, and why.
    pub last_upstream_error: Mutex<Option<(SystemTime, String)>>,
    outcomes: [AtomicU64; Outcome::ALL.len()],
    /// Bytes from clients to the upstream.
    pub bytes_up: AtomicU64,
    /// Bytes from the upstream to clients.
    pub bytes_down: AtomicU64,
    /// Accepts that failed for lack of descriptors or memory (each one pauses the listener).
    pub accept_errors: AtomicU64,
    /// PROXY v2 headers refused, by [`crate::proxy_header::Refusal::REASONS`].
    header_refusals: [AtomicU64; 6],
    /// Relayed connections by the LinkID in their PROXY v2 header, for at most [`MAX_LINK_IDS`]
    /// distinct ones.
    link_ids: Mutex<BTreeMap<u32, u64>>,
    /// The latest connection admitted by its PROXY v2 header: when, the TCP peer, the client
    /// and the LinkID the header named.
    last_proxied: Mutex<Option<Proxied>>,
    /// The latest probe answered on this route: when, and from where.
    last_probe: Mutex<Option<(SystemTime, std::net::IpAddr)>>,
    /// The sources denied most often.
    denied: Mutex<DeniedSources>,
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

/// A route's counters as a live upgrade carries them to the next program image, so `/metrics`
/// counters continue rather than restart from zero. The connect-time histogram, the latest-seen
/// records and the denied-sources table start afresh.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct CarriedRoute {
    /// Connections whose dial succeeded.
    pub relayed: u64,
    /// Connections by outcome, keyed by [`Outcome::name`].
    pub outcomes: BTreeMap<String, u64>,
    /// Bytes client → upstream.
    pub bytes_up: u64,
    /// Bytes upstream → client.
    pub bytes_down: u64,
    /// Failed accepts.
    pub accept_errors: u64,
    /// Refused PROXY v2 headers by reason.
    pub header_refusals: BTreeMap<String, u64>,
}

/// The relay engine's counters as a live upgrade carries them.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct CarriedRelay {
    /// Bytes spliced.
    pub spliced_bytes: u64,
    /// Bytes copied.
    pub copied_bytes: u64,
    /// Bursts copied for want of a pipe.
    pub fallback_no_pipe: u64,
    /// Directions that copied because the kernel refused splice.
    pub fallback_refused: u64,
}

impl RelayStats {
    /// The counters to carry across a live upgrade.
    pub fn carry(&self) -> CarriedRelay {
        CarriedRelay {
            spliced_bytes: self.spliced_bytes.load(Ordering::Relaxed),
            copied_bytes: self.copied_bytes.load(Ordering::Relaxed),
            fallback_no_pipe: self.fallback_no_pipe.load(Ordering::Relaxed),
            fallback_refused: self.fallback_refused.load(Ordering::Relaxed),
        }
    }

    /// Adds counters carried from the previous program image.
    pub fn carry_on(&self, carried: &CarriedRelay) {
        self.spliced_bytes
            .fetch_add(carried.spliced_bytes, Ordering::Relaxed);
        self.copied_bytes
            .fetch_add(carried.copied_bytes, Ordering::Relaxed);
        self.fallback_no_pipe
            .fetch_add(carried.fallback_no_pipe, Ordering::Relaxed);
        self.fallback_refused
            .fetch_add(carried.fallback_refused, Ordering::Relaxed);
    }
}

impl RouteStats {
    /// The counters to carry across a live upgrade.
    pub fn carry(&self) -> CarriedRoute {
        CarriedRoute {
            relayed: self.relayed.load(Ordering::Relaxed),
            outcomes: Outcome::ALL
                .iter()
                .map(|o| (o.name().to_string(), self.count(*o)))
                .filter(|(_, n)| *n > 0)
                .collect(),
            bytes_up: self.bytes_up.load(Ordering::Relaxed),
            bytes_down: self.bytes_down.load(Ordering::Relaxed),
            accept_errors: self.accept_errors.load(Ordering::Relaxed),
            header_refusals: self
                .header_refusals()
                .into_iter()
                .filter(|(_, n)| *n > 0)
                .map(|(reason, n)| (reason.to_string(), n))
                .collect(),
        }
    }

    /// Adds counters carried from the previous program image. Names this version does not know
    /// are skipped.
    pub fn carry_on(&self, carried: &CarriedRoute) {
        self.relayed.fetch_add(carried.relayed, Ordering::Relaxed);
        for (name, n) in &carried.outcomes {
            if let Some(outcome) = Outcome::ALL.iter().find(|o| o.name() == name) {
                self.outcomes[outcome.index()].fetch_add(*n, Ordering::Relaxed);
            }
        }
        self.bytes_up.fetch_add(carried.bytes_up, Ordering::Relaxed);
        self.bytes_down.fetch_add(carried.bytes_down, Ordering::Relaxed);
        self.accept_errors
            .fetch_add(carried.accept_errors, Ordering::Relaxed);
        for (reason, n) in &carried.header_refusals {
            self.header_refused_by(reason, *n);
        }
    }

    /// Fresh counters; `connect_seconds` is the route's series of the shared histogram family.
    pub fn new(connect_seconds: Histogram) -> Self {
        RouteStats {
            live: AtomicUsize::new(0),
            relayed: AtomicU64::new(0),
            connect_seconds,
            last_upstream_error: Mutex::new(None),
            outcomes: Default::default(),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            accept_errors: AtomicU64::new(0),
            header_refusals: Default::default(),
            link_ids: Mutex::new(BTreeMap::new()),
            last_proxied: Mutex::new(None),
            last_probe: Mutex::new(None),
            denied: Mutex::new(DeniedSources::default()),
        }
    }

    /// Remembers a failed dial for /status.
    pub fn upstream_failed(&self, reason: String) {
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
        self.header_refused_by(reason, 1);
    }

    fn header_refused_by(&self, reason: &str, n: u64) {
        let reasons = crate::proxy_header::Refusal::REASONS;
        if let Some(i) = reasons.iter().position(|r| *r == reason) {
            self.header_refusals[i].fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Refused PROXY v2 headers by reason.
    pub fn header_refusals(&self) -> Vec<(&'static str, u64)> {
        crate::proxy_header::Refusal::REASONS
            .iter()
            .zip(&self.header_refusals)
            .map(|(r, n)| (*r, n.load(Ordering::Relaxed)))
            .collect()
    }

    /// Notes a connection admitted by its PROXY v2 header.
    pub fn proxied(&self, peer: std::net::SocketAddr, header: &crate::proxy_header::Header) {
        if let Some(id) = header.link_id {
            let mut ids = self.link_ids.lock().unwrap_or_else(|p| p.into_inner());
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
        let ids = self.link_ids.lock().unwrap_or_else(|p| p.into_inner());
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
        self.outcomes[outcome.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// How many connections ended with `outcome`.
    pub fn count(&self, outcome: Outcome) -> u64 {
        self.outcomes[outcome.index()].load(Ordering::Relaxed)
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

/// Counters of the relay engine, shared by every route.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Bytes moved socket → pipe → socket.
    pub spliced_bytes: AtomicU64,
    /// Bytes moved through a user-space buffer.
    pub copied_bytes: AtomicU64,
    /// Bursts copied because no pipe was free (max_pipes reached, or pipe creation failed).
    pub fallback_no_pipe: AtomicU64,
    /// Connection directions switched to copying because the kernel refused splice.
    pub fallback_refused: AtomicU64,
}
