//! A route at run time: its listening socket, the admission of each accepted connection
//! (probe, allowlist, limit), and the task that dials the upstream, relays and logs the result.
//!
//! This module owns the decision about every accepted socket and the one log line each
//! connection gets. Admission happens right after accept and before anything is dialled. It must
//! not parse configuration or handle signals: new settings arrive over a watch channel from the
//! daemon, and the listener stops when that channel's sender is dropped (route removed, or
//! drain begun). Connections already running keep the settings they were accepted with.
//!
//! For a live upgrade, every connection parks where it stands and goes to the daemon over the
//! [`Parking`] channel: a relayed one as a [`ParkedConnection`] (the relay parks it), one still
//! reading its PROXY header or dialling as an [`OpeningConnection`], so that no connection waiting
//! on a slow peer or a hung dial holds the others' pause. [`resume`] and [`resume_opening`] run
//! them in the next program image, each timer counting on from where it stood.
//!
//! By file: `listener` is the accept loop and admission, `connection` an admitted connection's
//! header, dial, relay and log line, `parking` the live upgrade's side of it, `proxied` the
//! PROXY header's checks; this file holds what they share (settings, identity, wiring).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::allow::Allowlist;
use crate::config::Route;
use crate::logging::RateLimit;
use crate::relay::{Engine, Timeouts};
use crate::shutdown::Shutdown;
use crate::state::RouteStats;

mod connection;
mod listener;
mod parking;
mod proxied;

use connection::{Connection, Relayed};
pub use listener::RouteListener;
pub use parking::{
    OpeningConnection, Parked, ParkedConnection, Parking, ParkingLot, parking, resume, resume_opening,
};

/// With `proxy_protocol = "auto"` (or "off", to catch a header it should not get), how long a
/// connection may stay silent before it is taken to carry no header and the upstream is dialled.
/// A Private Link Service puts its header in the connection's first segment, and SSH and TLS
/// clients speak first, so neither ever waits this long; only a client that waits for the
/// server (or says nothing at all) does, once, before it gets the upstream's banner.
pub const SILENT_CLIENT_WAIT: Duration = Duration::from_millis(200);

/// Health probes arrive every few seconds for as long as the VM lives; one line a minute shows
/// they are arriving, with a count of the rest.
const PROBE_LOG_WINDOW: Duration = Duration::from_secs(60);

/// What a route's connections are admitted and relayed with; replaced as a whole on reload.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteSettings {
    /// The route as configured.
    pub route: Route,
    /// Its name, shared by every connection's identity and table entry (one allocation per
    /// route, not two per connection).
    pub name: Arc<str>,
    /// Load-balancer probe sources (a top-level setting, copied into each route's settings).
    pub probe_sources: Allowlist,
}

/// Rate limits for the lines a flood can cause, one set per route so a scan of one port does
/// not hide what happens on another.
#[derive(Debug)]
struct Quiet {
    denied: RateLimit,
    limit: RateLimit,
    probe: RateLimit,
    upstream: RateLimit,
    header: RateLimit,
    tune: RateLimit,
}

impl Quiet {
    fn new() -> Quiet {
        Quiet {
            denied: RateLimit::new(),
            limit: RateLimit::new(),
            probe: RateLimit::with(1, PROBE_LOG_WINDOW),
            upstream: RateLimit::new(),
            header: RateLimit::new(),
            tune: RateLimit::new(),
        }
    }
}

/// Who a relayed connection is and the timers it was accepted with: what its log line says,
/// and what a live upgrade carries across with its sockets. Who it is is the connection table's
/// [`Who`](crate::connections::Who) itself: the relay keeps it in the table's record while the
/// connection runs and gives it back when it ends.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Its id, route, peer, upstream and what its PROXY header named.
    pub who: crate::connections::Who,
    /// The timers it was accepted with.
    pub timeouts: Timeouts,
}

/// What every connection task of the daemon shares, new or moved by an upgrade.
#[derive(Clone)]
pub struct Wiring {
    /// The relay engine.
    pub engine: Arc<Engine>,
    /// The drain and park signal.
    pub shutdown: Shutdown,
    /// Where a parked connection goes.
    pub parking: Parking,
}

/// What keepalive would take to declare an idle peer dead, applied by the relay to a peer with
/// data outstanding, where Linux sends no keepalive probe.
fn gone_after(keepalive: &crate::config::Keepalive) -> crate::relay::GoneAfter {
    crate::relay::GoneAfter {
        silence: keepalive.time + keepalive.interval * keepalive.probes,
        probes: keepalive.probes,
    }
}

/// Counts a connection as live from admission until its task ends, whatever way it ends.
struct LiveGuard(Arc<RouteStats>);

impl LiveGuard {
    fn new(stats: Arc<RouteStats>) -> Self {
        stats.live.fetch_add(1, Ordering::Relaxed);
        LiveGuard(stats)
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::Relaxed);
    }
}
