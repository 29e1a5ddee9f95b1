//! A route's accept loop: accepts until the route is removed or the daemon drains, and decides
//! about every accepted socket right away, before anything is dialled (probe, allowlist,
//! `max_connections`), handing each admitted one to its own task. It must not dial or relay.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::net::{AcceptLoop, Next};
use crate::proxy_header::Partial;
use crate::state::{Outcome, RouteStats};

use super::*;

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
            // Accept + FIN: a TCP probe succeeds, and sshd/WinRM never see it. Counted before
            // the FIN, so whoever sees the FIN also sees it counted.
            self.stats.record(Outcome::Probe);
            self.stats.probed(source);
            drop(stream);
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
        connection.spawn();
    }
}
