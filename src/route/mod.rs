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

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use crate::allow::Allowlist;
use crate::config::{ProxyProtocol, Route};
use crate::logging::RateLimit;
use crate::net::{AcceptLoop, Next};
use crate::proxy_header::{self, Command, First, Header, Partial, Refusal};
use crate::relay::{self, Ended, Engine, Progress, Timeouts, Totals};
use crate::shutdown::{Request, Shutdown};
use crate::state::{Outcome, RouteStats};

mod proxied;

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

/// A connection a live upgrade parked, in the phase it was in.
#[derive(Debug)]
pub enum Parked {
    /// Relaying.
    Relaying(ParkedConnection),
    /// Admitted, and not relaying yet: reading its PROXY header or dialling.
    Opening(OpeningConnection),
}

/// Where parked connections go: the daemon, which hands them to the next program image. Each
/// connection task holds one.
#[derive(Clone, Debug)]
pub struct Parking {
    to: mpsc::UnboundedSender<Parked>,
    lost: Arc<AtomicU64>,
}

/// The daemon's end of [`Parking`]: the parked connections, and the count of those a park cost.
#[derive(Debug)]
pub struct ParkingLot {
    from: mpsc::UnboundedReceiver<Parked>,
    lost: Arc<AtomicU64>,
}

/// An admitted connection parked before its first byte was relayed: its client socket, the
/// PROXY header bytes it had read, and its clocks. The next image reads the rest of the header
/// (within what is left of header_timeout) and dials afresh (within what is left of
/// connect_timeout): a dial in progress is not carried, because the socket of a connect() in
/// flight cannot be told from a connected one by the next image, and a SYN sent again costs
/// nothing a waiting client notices.
#[derive(Debug)]
pub struct OpeningConnection {
    /// Its id.
    pub id: u64,
    /// The route it was accepted on.
    pub route: String,
    /// The TCP peer.
    pub peer: SocketAddr,
    /// The accepted socket.
    pub client: std::net::TcpStream,
    /// The PROXY v2 header's bytes read so far (all of them once admitted).
    pub header: Vec<u8>,
    /// Whether the header (if the route expects one) was read and admitted.
    pub admitted: bool,
    /// Time since it was accepted, when it parked.
    pub age: Duration,
    /// Time spent dialling, when it parked.
    pub dialled: Duration,
    /// When it parked: the clocks above are as of this moment.
    pub parked_at: Instant,
}

/// A new, empty [`Parking`] and its [`ParkingLot`].
pub fn parking() -> (Parking, ParkingLot) {
    let (to, from) = mpsc::unbounded_channel();
    let lost = Arc::new(AtomicU64::new(0));
    (
        Parking {
            to,
            lost: lost.clone(),
        },
        ParkingLot { from, lost },
    )
}

impl Parking {
    /// Hands a parked connection to the daemon. One that arrives after the daemon stopped
    /// waiting is reset (never a FIN: the peers must not take a cut stream for a whole one), and
    /// counted as not moved.
    fn park(&self, parked: Parked, stats: &RouteStats) {
        let Err(mpsc::error::SendError(lost)) = self.to.send(parked) else {
            return;
        };
        stats.record(Outcome::Reset);
        self.lost.fetch_add(1, Ordering::Relaxed);
        let (id, route, peer) = match lost {
            Parked::Relaying(lost) => {
                lost.relay.reset();
                (lost.identity.id, lost.identity.route, lost.identity.peer)
            }
            Parked::Opening(lost) => {
                crate::net::reset(lost.client);
                (lost.id, lost.route, lost.peer)
            }
        };
        tracing::warn!(conn = id, route, client = %peer, end = "reset", "parked for an upgrade that is no longer under way; reset");
    }

    /// Counts a connection that could not park (its socket could not leave the runtime).
    fn lost(&self) {
        self.lost.fetch_add(1, Ordering::Relaxed);
    }
}

impl ParkingLot {
    /// Takes every connection parked so far and closes the lot: a connection that parks later
    /// is reset by its own task. Returns them, with the count of those lost since the last call.
    pub fn close(&mut self) -> (Vec<Parked>, u64) {
        self.from.close();
        let mut parked = Vec::new();
        while let Ok(connection) = self.from.try_recv() {
            parked.push(connection);
        }
        (parked, self.lost.swap(0, Ordering::Relaxed))
    }
}

/// Who a relayed connection is and the timers it was accepted with: what its log line says,
/// and what a live upgrade carries across with its sockets.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Its id: unique for the daemon's life (live upgrades included), `conn=` in every log line
    /// about it.
    pub id: u64,
    /// The route it was accepted on.
    pub route: String,
    /// The TCP peer (the balancer's address with Private Link).
    pub peer: SocketAddr,
    /// The upstream address it was dialled at.
    pub upstream: SocketAddr,
    /// The client its PROXY v2 header named, if any.
    pub proxied_client: Option<SocketAddr>,
    /// The LinkID its PROXY v2 header named, if any.
    pub link_id: Option<u32>,
    /// The timers it was accepted with.
    pub timeouts: Timeouts,
}

impl Identity {
    /// What the connection table lists about it.
    fn who(&self) -> crate::connections::Who {
        crate::connections::Who {
            id: self.id,
            route: self.route.clone(),
            client: self.peer,
            proxied_client: self.proxied_client,
            link_id: self.link_id,
            upstream: self.upstream,
        }
    }
}

/// A relayed connection parked by a live upgrade.
#[derive(Debug)]
pub struct ParkedConnection {
    /// Who it is.
    pub identity: Identity,
    /// Its sockets and where it stands.
    pub relay: relay::Parked,
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

/// A bound listening socket and everything its accept loop needs.
pub struct RouteListener {
    accept: AcceptLoop,
    settings: watch::Receiver<Arc<RouteSettings>>,
    stats: Arc<RouteStats>,
    wiring: Wiring,
    quiet: Arc<Quiet>,
    /// Accepted sockets that do not have TCP_NODELAY, SO_OOBINLINE and keepalive from the
    /// listening socket: each is set up on its own.
    untuned: crate::net::Untuned,
}

impl RouteListener {
    /// Prepares the accept loop of one route. The listener stops when every sender of
    /// `settings` is gone. Accepted sockets inherit TCP_NODELAY, SO_OOBINLINE and the keepalive
    /// settings from the listening socket, so they are set here once instead of on every
    /// accepted socket; those the kernel queued before (see [`crate::net::tune_listener`]) are
    /// set up one by one.
    pub fn new(
        listener: TcpListener,
        settings: watch::Receiver<Arc<RouteSettings>>,
        stats: Arc<RouteStats>,
        wiring: Wiring,
    ) -> Self {
        let untuned = crate::net::tune_listener(&listener, &settings.borrow().route.keepalive);
        let name = settings.borrow().route.name.clone();
        RouteListener {
            accept: AcceptLoop::new(listener, &name),
            settings,
            stats,
            wiring,
            quiet: Arc::new(Quiet::new()),
            untuned,
        }
    }

    /// Accepts until the route is removed or the daemon drains; then returns its descriptor of
    /// the listening socket (the daemon closes it, or keeps it while a live upgrade is under
    /// way). Running connections go on.
    pub async fn run(mut self) -> Option<std::net::TcpListener> {
        loop {
            match self.accept.next(self.settings.changed()).await {
                Next::Connection(stream, peer) => self.admit(stream, peer),
                Next::Control(Ok(())) => {
                    self.untuned = crate::net::tune_listener(
                        self.accept.listener(),
                        &self.settings.borrow().route.keepalive,
                    )
                }
                Next::Control(Err(_)) => break,
            }
            let failures = self.accept.take_failures();
            if failures > 0 {
                self.stats
                    .counters
                    .accept_errors
                    .fetch_add(failures, Ordering::Relaxed);
            }
        }
        match self.accept.listener().local_addr() {
            Ok(listen) => tracing::info!(route = %self.name(), %listen, "stopped listening"),
            Err(_) => tracing::info!(route = %self.name(), "stopped listening"),
        }
        self.accept.into_listener()
    }

    fn name(&self) -> String {
        self.settings.borrow().route.name.clone()
    }

    fn admit(&mut self, stream: TcpStream, peer: SocketAddr) {
        // Counted for every accepted socket, relayed or not: the queue is first in, first out.
        let untuned = self.untuned.take_one();
        let settings = self.settings.borrow().clone();
        let route = &settings.route;
        let source = peer.ip().to_canonical();

        if settings.probe_sources.contains(source) {
            // Accept + FIN: a TCP probe succeeds, and sshd/WinRM never see it.
            drop(stream);
            self.stats.record(Outcome::Probe);
            self.stats.probed(source);
            if let Some(suppressed) = self.quiet.probe.admit() {
                tracing::info!(route = %route.name, client = %peer, end = "probe", suppressed, "probe answered locally");
            }
            return;
        }
        // Counted before the reset, so whoever sees the reset also sees it counted.
        if !route.allow.contains(source) {
            self.stats.record(Outcome::Denied);
            self.stats.denied(source);
            crate::net::reset(stream);
            if let Some(suppressed) = self.quiet.denied.admit() {
                tracing::warn!(route = %route.name, client = %peer, end = "denied", suppressed, "source not in allow list; connection reset");
            }
            return;
        }
        let live = self.stats.live.load(Ordering::Relaxed);
        if live >= route.max_connections {
            self.stats.record(Outcome::Limit);
            crate::net::reset(stream);
            if let Some(suppressed) = self.quiet.limit.admit() {
                tracing::warn!(route = %route.name, client = %peer, end = "limit", live, max_connections = route.max_connections, suppressed, "route at max_connections; connection reset");
            }
            return;
        }
        // The relay needs SO_OOBINLINE on both legs (urgent data would otherwise stall a
        // direction); a socket that cannot have it is refused rather than relayed without.
        if untuned && let Err(e) = crate::net::tune_socket(socket2::SockRef::from(&stream), &route.keepalive)
        {
            self.stats.record(Outcome::Reset);
            crate::net::reset(stream);
            if let Some(suppressed) = self.quiet.tune.admit() {
                tracing::warn!(route = %route.name, client = %peer, end = "reset", error = %e, suppressed, "cannot set TCP_NODELAY, SO_OOBINLINE and keepalive on the accepted socket; connection reset");
            }
            return;
        }
        // Boxed: what the task captures keeps its room for the task's whole life, and the box
        // is freed once the connection is open.
        let connection = Box::new(Connection {
            id: self.wiring.engine.stats.next_connection_id(),
            live: LiveGuard::new(self.stats.clone()),
            client: stream,
            peer,
            settings,
            wiring: self.wiring.clone(),
            quiet: self.quiet.clone(),
            started: Instant::now(),
            header: Partial::default(),
            admitted: false,
            dialled: Duration::ZERO,
        });
        // Two phases in sequence, not one nested in the other: what opening the connection
        // needs (the PROXY header, the dial, the settings) is gone before relaying starts, so
        // an idle connection's task holds only the relay's state.
        tokio::spawn(async move {
            let Some((relayed, client, upstream)) = connection.open().await else {
                return;
            };
            relayed.run(client, upstream, None).await;
        });
    }
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

/// One admitted client, until its upstream is dialled (or the attempt has ended and been
/// logged, or a live upgrade parked it).
struct Connection {
    /// Its id (see [`Identity::id`]).
    id: u64,
    live: LiveGuard,
    client: TcpStream,
    peer: SocketAddr,
    settings: Arc<RouteSettings>,
    wiring: Wiring,
    quiet: Arc<Quiet>,
    /// When it was accepted (earlier than this image, for one moved by a live upgrade).
    started: Instant,
    /// Its PROXY v2 header, as far as it has been read.
    header: Partial,
    /// Whether its header (if the route expects one) has been read and admitted.
    admitted: bool,
    /// Time spent dialling before a live upgrade cut the attempt short.
    dialled: Duration,
}

impl Connection {
    /// Reads the PROXY header if the route expects one, dials the upstream and sends it a
    /// PROXY header if the route says so. `None` when the connection ended here (it has been
    /// closed, counted and logged) or parked for a live upgrade (it has gone to the daemon).
    /// Each wait may be cut by a park: the connection then parks where it stands, at once.
    async fn open(self: Box<Self>) -> Option<(Relayed, TcpStream, TcpStream)> {
        let mut this = *self;
        let settings = this.settings.clone();
        let route = &settings.route;

        let proxied = if this.admitted {
            // Admitted before a live upgrade moved it here: with the header it was admitted by,
            // if it had one.
            if this.header.bytes().is_empty() {
                None
            } else {
                match proxy_header::parse(this.header.bytes()) {
                    Ok(header) => Some(header),
                    Err(e) => {
                        crate::net::reset(this.client);
                        this.live.0.record(Outcome::Reset);
                        tracing::warn!(conn = this.id, route = %route.name, client = %this.peer, end = "reset", error = %e, "the PROXY header carried by the upgrade does not parse; connection reset");
                        return None;
                    }
                }
            }
        } else {
            // Whether to read a header: always ("v2"), or when the first bytes are its signature
            // ("auto"); and with "off", whether the client sends one it should not.
            let header_timeout = route
                .proxy
                .as_ref()
                .map_or(crate::config::DEFAULT_HEADER_TIMEOUT, |p| p.header_timeout);
            let first = match &route.proxy {
                Some(proxy) if proxy.required => First::Header,
                _ => {
                    let more = (this.started + header_timeout).saturating_duration_since(Instant::now());
                    let first = tokio::select! {
                        first = proxy_header::first_bytes(&this.client, SILENT_CLIENT_WAIT, more) => first,
                        stop = this.wiring.shutdown.closing_or_parking(false) => {
                            this.stop(stop, "waiting for its first bytes");
                            return None;
                        }
                    };
                    match first {
                        Ok(first) => first,
                        Err(e) => {
                            crate::net::reset(this.client);
                            this.live.0.record(Outcome::Reset);
                            tracing::debug!(conn = this.id, route = %route.name, client = %this.peer, end = "reset", error = %e, "client failed before its first byte");
                            return None;
                        }
                    }
                }
            };
            match (&route.proxy, first) {
                (_, First::Closed) => {
                    // Connected and closed without a byte (a scanner, a health check of some
                    // other kind): nothing to relay, nobody dialled.
                    drop(this.client);
                    return None;
                }
                (None, First::Header) => {
                    // "off", and the Private Link Service sends headers: sshd would get 28
                    // bytes of garbage. Refused with the fix in the log.
                    this.saw_header(true);
                    this.live.0.header_refused(Refusal::Unexpected.reason());
                    this.live.0.record(Outcome::Denied);
                    if let Some(suppressed) = this.quiet.header.admit() {
                        tracing::warn!(conn = this.id, route = %route.name, client = %this.peer, end = "denied", reason = Refusal::Unexpected.reason(), suppressed, "the Private Link Service sends PROXY protocol v2; set proxy_protocol = \"auto\" or \"v2\" on route {}; connection reset", route.name);
                    }
                    crate::net::reset(this.client);
                    return None;
                }
                (Some(proxy), First::Header | First::Version1) => {
                    let deadline = tokio::time::Instant::from_std(this.started + proxy.header_timeout);
                    let read = tokio::select! {
                        read = tokio::time::timeout_at(deadline, proxy_header::read_into(&mut this.client, &mut this.header)) => {
                            read.unwrap_or(Err(Refusal::Timeout))
                        }
                        stop = this.wiring.shutdown.closing_or_parking(false) => {
                            this.stop(stop, "reading its PROXY header");
                            return None;
                        }
                    };
                    this.saw_header(!matches!(read, Err(Refusal::Missing)));
                    let admitted =
                        proxied::admit(read, this.peer, &route.name, proxy, &this.live.0, &this.quiet);
                    match admitted {
                        Ok(header) => Some(header),
                        Err(proxied::Close::Fin) => {
                            drop(this.client);
                            return None;
                        }
                        Err(proxied::Close::Reset) => {
                            crate::net::reset(this.client);
                            return None;
                        }
                    }
                }
                (_, First::Other | First::Silent | First::Version1) => {
                    this.saw_header(false);
                    None
                }
            }
        };
        this.admitted = true;

        let dial_started = Instant::now();
        let dialled = tokio::select! {
            dialled = crate::upstream::dial(&route.upstream, route.connect_timeout, this.dialled, &route.keepalive) => dialled,
            stop = this.wiring.shutdown.closing_or_parking(false) => {
                this.dialled += dial_started.elapsed();
                this.stop(stop, "dialling");
                return None;
            }
        };
        let stats = &this.live.0;
        let (mut upstream, upstream_addr) = match dialled {
            Ok(ok) => {
                stats.counters.relayed.fetch_add(1, Ordering::Relaxed);
                stats.upstream_answered();
                stats
                    .connect_seconds
                    .observe((this.dialled + dial_started.elapsed()).as_secs_f64());
                ok
            }
            Err(e) => {
                crate::net::reset(this.client);
                stats.record(e.outcome);
                stats.upstream_failed(e.outcome, format!("{}: {}", e.outcome.name(), e.reason));
                if let Some(suppressed) = this.quiet.upstream.admit() {
                    let upstream = e
                        .addr
                        .map_or_else(|| route.upstream.to_string(), |a| a.to_string());
                    tracing::warn!(
                        conn = this.id,
                        route = %route.name,
                        client = %this.peer,
                        upstream,
                        end = e.outcome.name(),
                        error = %e.reason,
                        duration_ms = this.started.elapsed().as_millis() as u64,
                        suppressed,
                        "upstream connect failed; client reset"
                    );
                }
                return None;
            }
        };

        if route.upstream_proxy_protocol == ProxyProtocol::V2 {
            // The upstream learns who is really connecting: the client from the header we
            // read (its TLVs too), or else the TCP peer. A few dozen bytes into a socket that
            // has just connected: its send buffer is empty, so this never waits in practice.
            let header = Header {
                command: Command::Proxy,
                addresses: proxied
                    .as_ref()
                    .and_then(|h| h.addresses)
                    .or_else(|| this.client.local_addr().ok().map(|local| (this.peer, local))),
                tlvs: proxied.as_ref().map(|h| h.tlvs.clone()).unwrap_or_default(),
                link_id: proxied.as_ref().and_then(|h| h.link_id),
            };
            let sent = tokio::time::timeout(
                route.connect_timeout,
                upstream.write_all(&crate::proxy_header::encode(&header)),
            )
            .await;
            if !matches!(sent, Ok(Ok(()))) {
                crate::net::reset(this.client);
                crate::net::reset(upstream);
                stats.record(Outcome::Reset);
                tracing::warn!(conn = this.id, route = %route.name, client = %this.peer, upstream = %upstream_addr, end = "reset", "cannot send the PROXY v2 header to the upstream; both sides reset");
                return None;
            }
        }

        let proxied_client = proxied.as_ref().and_then(Header::client);
        let link_id = proxied.as_ref().and_then(|h| h.link_id);
        tracing::info!(
            conn = this.id,
            route = %route.name,
            client = %this.peer,
            upstream = %upstream_addr,
            dial_ms = (this.dialled + dial_started.elapsed()).as_millis() as u64,
            proxied_client = proxied_client.map(|c| c.to_string()),
            link_id,
            "connection opened"
        );
        let relayed = Relayed {
            identity: Identity {
                id: this.id,
                route: route.name.clone(),
                peer: this.peer,
                upstream: upstream_addr,
                proxied_client,
                link_id,
                timeouts: Timeouts {
                    idle: route.idle_timeout,
                    fin: route.fin_timeout,
                    gone: Some(gone_after(&route.keepalive)),
                },
            },
            started: this.started,
            live: this.live,
            wiring: this.wiring,
        };
        Some((relayed, this.client, upstream))
    }

    /// Notes whether this connection carried a PROXY v2 header; says so when the route's recent
    /// connections change from all, to none, to some.
    fn saw_header(&self, carried: bool) {
        if let Some(now) = self.live.0.saw_header(carried) {
            let route = &self.settings.route.name;
            let what = match now {
                "seen" => "the Private Link Service sends PROXY v2 headers (TCP proxy v2 is on)",
                "not seen" => "no PROXY v2 headers arrive (TCP proxy v2 is off at the Private Link Service)",
                _ => "some connections carry a PROXY v2 header and some do not",
            };
            tracing::info!(
                route,
                proxy_headers = now,
                "PROXY headers on route {route}: {what}"
            );
        }
    }

    /// Parks the connection for a live upgrade, or closes it for the drain, while it was `doing`
    /// what the log line says.
    fn stop(self, request: Request, doing: &str) {
        let Connection {
            id,
            live,
            client,
            peer,
            settings,
            wiring,
            started,
            header,
            admitted,
            dialled,
            ..
        } = self;
        let route = &settings.route.name;
        match request {
            Request::Close => {
                crate::net::reset(client);
                live.0.record(Outcome::Drain);
                tracing::info!(conn = id, route, client = %peer, upstream = %settings.route.upstream, end = "drain", "closed while {doing} at shutdown");
            }
            Request::Park => match client.into_std() {
                Ok(client) => {
                    let opening = OpeningConnection {
                        id,
                        route: route.clone(),
                        peer,
                        client,
                        header: header.bytes().to_vec(),
                        admitted,
                        age: started.elapsed(),
                        dialled,
                        parked_at: Instant::now(),
                    };
                    wiring.parking.park(Parked::Opening(opening), &live.0);
                }
                Err(e) => {
                    // The socket went with the error: closed, not moved.
                    live.0.record(Outcome::Reset);
                    wiring.parking.lost();
                    tracing::warn!(conn = id, route, client = %peer, end = "reset", error = %e, "cannot park a connection {doing} for the upgrade");
                }
            },
        }
    }
}

/// Goes on with an admitted connection that a live upgrade parked before its first byte was
/// relayed (see [`OpeningConnection`]), on `settings` (its route's now) and `stats`. Returns
/// false when its socket cannot join the runtime (it was closed).
pub fn resume_opening(
    opening: OpeningConnection,
    settings: Arc<RouteSettings>,
    stats: Arc<RouteStats>,
    wiring: Wiring,
) -> bool {
    let OpeningConnection {
        id,
        route: _,
        peer,
        client,
        header,
        admitted,
        age,
        dialled,
        parked_at,
    } = opening;
    let age = age + parked_at.elapsed();
    let client = match client
        .set_nonblocking(true)
        .and_then(|()| TcpStream::from_std(client))
    {
        Ok(client) => client,
        Err(e) => {
            stats.record(Outcome::Reset);
            tracing::warn!(conn = id, route = %settings.route.name, client = %peer, end = "reset", error = %e, "cannot take over a connection moved by the upgrade");
            return false;
        }
    };
    let connection = Box::new(Connection {
        id,
        live: LiveGuard::new(stats),
        client,
        peer,
        settings,
        wiring,
        quiet: Arc::new(Quiet::new()),
        started: Instant::now().checked_sub(age).unwrap_or_else(Instant::now),
        header: Partial::from_bytes(header),
        admitted,
        dialled,
    });
    tokio::spawn(async move {
        let Some((relayed, client, upstream)) = connection.open().await else {
            return;
        };
        relayed.run(client, upstream, None).await;
    });
    true
}

/// Runs a connection the previous program image parked (or this one, taking back a hand-over
/// that failed), on `stats`' route, from where it stopped. Its sockets come in as handed over
/// (blocking or not); a socket the runtime cannot take is reset with its peer, and the
/// connection is logged as reset: then it returns false.
pub fn resume(parked: ParkedConnection, stats: Arc<RouteStats>, wiring: Wiring) -> bool {
    let ParkedConnection {
        identity,
        relay:
            relay::Parked {
                client,
                upstream: upstream_socket,
                mut progress,
                parked_at,
            },
    } = parked;
    // Its clocks stood still while it was parked: the deadlines stay where they were.
    let since = parked_at.elapsed();
    progress.age += since;
    progress.quiet += since;
    let started = Instant::now()
        .checked_sub(progress.age)
        .unwrap_or_else(Instant::now);
    let relayed = Relayed {
        identity,
        started,
        live: LiveGuard::new(stats),
        wiring,
    };
    let sockets = client
        .set_nonblocking(true)
        .and_then(|()| upstream_socket.set_nonblocking(true))
        .and_then(|()| {
            Ok((
                TcpStream::from_std(client)?,
                TcpStream::from_std(upstream_socket)?,
            ))
        });
    match sockets {
        Ok((client, upstream)) => {
            tokio::spawn(relayed.run(client, upstream, Some(Box::new(progress))));
            true
        }
        Err(e) => {
            // The sockets were closed with the failed conversion.
            relayed.live.0.record(Outcome::Reset);
            let who = &relayed.identity;
            tracing::warn!(conn = who.id, route = %who.route, client = %who.peer, upstream = %who.upstream, end = "reset", error = %e, "cannot take over a connection moved by the upgrade");
            false
        }
    }
}

/// The relayed part of a connection's life: new, or moved here by a live upgrade.
struct Relayed {
    identity: Identity,
    started: Instant,
    live: LiveGuard,
    wiring: Wiring,
}

impl Relayed {
    /// Relays until the connection ends (and logs it) or a live upgrade parks it (and sends it
    /// to the daemon). An async block rather than an async fn: an async fn keeps a second copy
    /// of its arguments in the task for as long as it runs (they are moved into locals), and
    /// this one runs for the connection's whole life.
    fn run(
        self,
        client: TcpStream,
        upstream: TcpStream,
        from: Option<Box<Progress>>,
    ) -> impl Future<Output = ()> {
        let Relayed {
            identity,
            started,
            live,
            mut wiring,
        } = self;
        async move {
            let stats = &live.0;
            let totals = Totals {
                up: &stats.counters.bytes_up,
                down: &stats.counters.bytes_down,
            };
            let ended = relay::relay(
                &wiring.engine,
                identity.who(),
                client,
                upstream,
                identity.timeouts,
                totals,
                &mut wiring.shutdown,
                from,
            )
            .await;
            let transfer = match ended {
                Ended::Closed(transfer) => transfer,
                Ended::Parked(relay) => {
                    wiring
                        .parking
                        .park(Parked::Relaying(ParkedConnection { identity, relay }), stats);
                    return;
                }
            };
            stats.record(transfer.outcome);
            // No longer live before the line says so: whoever reads the line and then the
            // gauge sees the connection gone.
            drop(live);
            tracing::info!(
                conn = identity.id,
                route = %identity.route,
                client = %identity.peer,
                upstream = %identity.upstream,
                bytes_up = transfer.up,
                bytes_down = transfer.down,
                duration_ms = started.elapsed().as_millis() as u64,
                end = transfer.outcome.name(),
                error = transfer.detail.as_deref(),
                proxied_client = identity.proxied_client.map(|c| c.to_string()),
                link_id = identity.link_id,
                "connection closed"
            );
        }
    }
}
