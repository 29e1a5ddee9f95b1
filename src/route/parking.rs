//! Parking for a live upgrade: every connection stops where it stands and goes to the daemon
//! over the [`Parking`] channel, a relayed one as a [`ParkedConnection`] (the relay parks it),
//! one still reading its PROXY header or dialling as an [`OpeningConnection`]; and, in the next
//! program image, [`resume`] and [`resume_opening`] run them on, each timer counting on from
//! where it stood. It must not decide when to park (the daemon does) nor cross the exec (the
//! hand-over does).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::proxy_header::Partial;
use crate::relay::{self};
use crate::state::{Outcome, RouteStats};

use super::*;

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
    pub(super) fn park(&self, parked: Parked, stats: &RouteStats) {
        let Err(mpsc::error::SendError(lost)) = self.to.send(parked) else {
            return;
        };
        stats.record(Outcome::Reset);
        self.lost.fetch_add(1, Ordering::Relaxed);
        let (id, route, peer) = match lost {
            Parked::Relaying(lost) => {
                lost.relay.reset();
                (
                    lost.identity.who.id,
                    lost.identity.who.route,
                    lost.identity.who.client,
                )
            }
            Parked::Opening(lost) => {
                crate::net::reset(lost.client);
                (lost.id, lost.route.into(), lost.peer)
            }
        };
        tracing::warn!(conn = id, route = &*route, client = %peer, end = "reset", "parked for an upgrade that is no longer under way; reset");
    }

    /// Counts a connection that could not park (its socket could not leave the runtime).
    pub(super) fn lost(&self) {
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

/// A relayed connection parked by a live upgrade.
#[derive(Debug)]
pub struct ParkedConnection {
    /// Who it is.
    pub identity: Identity,
    /// Its sockets and where it stands.
    pub relay: relay::Parked,
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
    connection.spawn();
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
            let who = &relayed.identity.who;
            tracing::warn!(conn = who.id, route = %who.route, client = %who.client, upstream = %who.upstream, end = "reset", error = %e, "cannot take over a connection moved by the upgrade");
            false
        }
    }
}
