//! One admitted connection's life after admission: its PROXY header (per `proxy_protocol`),
//! the dial, the relay, and the one line it is logged with when it ends, or its park for a
//! live upgrade at any of those steps. It must not accept or admit.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;

use crate::config::ProxyProtocol;
use crate::proxy_header::{self, Command, First, Header, Partial, Refusal};
use crate::relay::{self, Ended, Progress, Timeouts};
use crate::shutdown::Request;
use crate::state::Outcome;

use super::*;

/// One admitted client, until its upstream is dialled (or the attempt has ended and been
/// logged, or a live upgrade parked it).
pub(super) struct Connection {
    /// Its id (see [`Who::id`](crate::connections::Who::id)).
    pub(super) id: u64,
    pub(super) live: LiveGuard,
    pub(super) client: TcpStream,
    pub(super) peer: SocketAddr,
    pub(super) settings: Arc<RouteSettings>,
    pub(super) wiring: Wiring,
    pub(super) quiet: Arc<Quiet>,
    /// When it was accepted (earlier than this image, for one moved by a live upgrade).
    pub(super) started: Instant,
    /// Its PROXY v2 header, as far as it has been read.
    pub(super) header: Partial,
    /// Whether its header (if the route expects one) has been read and admitted.
    pub(super) admitted: bool,
    /// Time spent dialling before a live upgrade cut the attempt short.
    pub(super) dialled: Duration,
}

impl Connection {
    /// Runs the connection in a task of its own, new or moved here by a live upgrade before it
    /// was relaying: opened, then relayed. Two phases in sequence, not one nested in the other:
    /// what opening needs (the PROXY header, the dial, the settings) is gone before relaying
    /// starts, so an idle connection's task holds only the relay's state.
    pub(super) fn spawn(self: Box<Self>) {
        tokio::spawn(async move {
            let Some((relayed, client, upstream)) = self.open().await else {
                return;
            };
            relayed.run(client, upstream, None).await;
        });
    }

    /// Reads the PROXY header if the route expects one, dials the upstream and sends it a
    /// PROXY header if the route says so. `None` when the connection ended here (it has been
    /// closed, counted and logged) or parked for a live upgrade (it has gone to the daemon).
    /// Each wait may be cut by a park: the connection then parks where it stands, at once.
    pub(super) async fn open(self: Box<Self>) -> Option<(Relayed, TcpStream, TcpStream)> {
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
                        this.live.0.record(Outcome::Reset);
                        crate::net::reset(this.client);
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
                            this.live.0.record(Outcome::Reset);
                            crate::net::reset(this.client);
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
                // Counted before the reset, so whoever sees the reset also sees it counted.
                stats.record(e.outcome);
                stats.upstream_failed(e.outcome, format!("{}: {}", e.outcome.name(), e.reason));
                crate::net::reset(this.client);
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
                stats.record(Outcome::Reset);
                crate::net::reset_both(this.client, upstream);
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
                who: crate::connections::Who {
                    id: this.id,
                    route: this.settings.name.clone(),
                    client: this.peer,
                    proxied_client,
                    link_id,
                    upstream: upstream_addr,
                },
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
                live.0.record(Outcome::Drain);
                crate::net::reset(client);
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

/// The relayed part of a connection's life: new, or moved here by a live upgrade.
pub(super) struct Relayed {
    pub(super) identity: Identity,
    pub(super) started: Instant,
    pub(super) live: LiveGuard,
    pub(super) wiring: Wiring,
}

impl Relayed {
    /// Relays until the connection ends (and logs it) or a live upgrade parks it (and sends it
    /// to the daemon): the relay's own future, with [`ended`] as what it does after. Neither an
    /// async fn nor a block awaiting the relay: either keeps a second copy of what it passes on
    /// (who the connection is, its sockets, the drain signal) for the connection's whole life.
    pub(super) fn run(
        self,
        client: TcpStream,
        upstream: TcpStream,
        from: Option<Box<Progress>>,
    ) -> impl Future<Output = ()> {
        let Relayed {
            identity,
            started,
            live,
            wiring:
                Wiring {
                    engine,
                    shutdown,
                    parking,
                },
        } = self;
        // The relay's future is the task's: nothing wraps it to wait for its end. A block
        // awaiting it would keep what it passes on (who the connection is, its sockets, the
        // drain signal) for the connection's life, or, made outside the block, the relay's
        // whole state twice. What follows the end is a plain function the relay calls.
        let Identity { who, timeouts } = identity;
        relay::relay(
            engine,
            who,
            client,
            upstream,
            timeouts,
            live.0.clone(),
            shutdown,
            from,
            move |over| ended(over, started, live, &parking),
        )
    }
}

/// After the relay: a connection that ended (the relay has counted it) is logged, its one line; a parked one
/// goes to the daemon, who it is beside it.
fn ended(over: relay::Over, started: Instant, live: LiveGuard, parking: &Parking) {
    let relay::Over { ended, who, timeouts } = over;
    let stats = &live.0;
    let transfer = match ended {
        Ended::Closed(transfer) => transfer,
        Ended::Parked(relay) => {
            let identity = Identity { who, timeouts };
            parking.park(Parked::Relaying(ParkedConnection { identity, relay }), stats);
            return;
        }
    };
    // The relay counted its end under the route before it closed the sockets.
    // No longer live before the line says so: whoever reads the line and then the gauge sees
    // the connection gone.
    drop(live);
    tracing::info!(
        conn = who.id,
        route = %who.route,
        client = %who.client,
        upstream = %who.upstream,
        bytes_up = transfer.up,
        bytes_down = transfer.down,
        duration_ms = started.elapsed().as_millis() as u64,
        end = transfer.outcome.name(),
        error = transfer.detail.as_deref(),
        proxied_client = who.proxied_client.map(|c| c.to_string()),
        link_id = who.link_id,
        "connection closed"
    );
}
