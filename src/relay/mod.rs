//! The relay: one accepted client and one connected upstream, joined until both directions end.
//!
//! This module owns how a relayed connection ends. An end of stream on one side is passed on as
//! a shutdown of the other side's write half once every byte has gone through, while the other
//! direction keeps flowing; an error on either side is passed on as a reset of both; silence
//! beyond idle_timeout (fin_timeout once half-closed) closes both; and the daemon's drain
//! deadline closes what is left. It must not admit, dial or log connections: the route does
//! that around it.
//!
//! One word per idea: a live upgrade **parks** a connection ([`Ended::Parked`]) instead of
//! ending it: both sockets and its [`Progress`] (each direction's [`Side`]: done, or open with
//! its [`OpenSide`], the mode it was in and the bytes it **carries** ([`Carry`]) in a pipe or a
//! buffer; the connection's clocks and counters), for the next program image to [`relay`] on
//! from. [`connection`] is the connection's life (the loop, the park, the close); `pump` is one
//! direction.

mod buffers;
mod connection;
mod flow;
mod pipe;
mod pump;

use std::sync::Arc;
use std::time::Duration;

pub use connection::relay;
pub use pipe::{Pipe, PipePool};
pub use pump::{Carry, OpenSide};

use crate::connections::Table;
use crate::state::{EngineView, Outcome, RelayStats};

/// What every relayed connection shares: the pipe pool (absent when splice is turned off), the
/// copy buffers, the engine counters and the connection table.
#[derive(Debug)]
pub struct Engine {
    pipes: Option<PipePool>,
    buffers: buffers::BufferPool,
    /// Engine-wide counters, read for the exit summary and metrics.
    pub stats: RelayStats,
    /// Every connection being relayed.
    pub table: Table,
}

impl Engine {
    /// An engine that splices through at most `max_pipes` pipes, or only copies when `splice`
    /// is false, counting from `stats` (fresh, or carried by a live upgrade).
    pub fn new(splice: bool, max_pipes: usize, stats: RelayStats) -> Arc<Engine> {
        Arc::new(Engine {
            pipes: splice.then(|| PipePool::new(max_pipes)),
            buffers: buffers::BufferPool::default(),
            stats,
            table: Table::default(),
        })
    }

    /// The pool, when splicing.
    pub fn pipes(&self) -> Option<&PipePool> {
        self.pipes.as_ref()
    }
}

impl EngineView for Engine {
    fn counters(&self) -> &RelayStats {
        &self.stats
    }

    fn pipe_counts(&self) -> Option<(usize, usize, u64)> {
        self.pipes.as_ref().map(|p| (p.alive(), p.idle(), p.created()))
    }

    fn buffers_lent(&self) -> usize {
        self.buffers.lent()
    }

    fn pipe_limit(&self) -> Option<usize> {
        self.pipes.as_ref().map(PipePool::limit)
    }

    fn connections(&self) -> &Table {
        &self.table
    }
}

/// The timers that bound a relayed connection.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// Silence that closes a connection; `None` never does.
    pub idle: Option<Duration>,
    /// Silence that closes a half-closed connection.
    pub fin: Duration,
    /// How a peer that vanished with data outstanding is found (see [`GoneAfter`]); `None` for a
    /// connection moved by an upgrade from a version that did not carry it.
    pub gone: Option<GoneAfter>,
}

/// When a peer counts as gone while data is outstanding towards it: keepalive's own bound,
/// which Linux does not apply then (it sends no keepalive probe while data is unacknowledged, so
/// a build VM that vanishes mid-transfer would otherwise hold its session until tcp_retries2,
/// about 15 minutes). TCP_USER_TIMEOUT would bound it too, but on 4.15 and on current kernels it
/// also ends a live peer that only advertises a zero window (a reader that stops reading), which
/// only `idle_timeout` may end; so the relay asks TCP_INFO instead (see
/// [`crate::net::peer_looks_gone`]), and believes it when two looks a quarter of the bound apart
/// agree: a gone peer is found between 1¼ and 1½ bounds after its last answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GoneAfter {
    /// Data unacknowledged for this long: keepalive_time + keepalive_interval × keepalive_probes.
    pub silence: Duration,
    /// Window probes unanswered in a row: keepalive_probes.
    pub probes: u32,
}

impl GoneAfter {
    /// How often a connection asks: four times per bound, so a gone peer is found within a
    /// quarter of the bound after it.
    fn every(self) -> Duration {
        (self.silence / 4).max(Duration::from_secs(1))
    }
}

/// The route a connection belongs to, whose byte totals (`bytes_up`, `bytes_down`) every burst
/// adds to, and under which the connection's end is counted before its sockets close. Owned rather than borrowed, so that a connection's whole future can be made before
/// its task runs: whatever an async block captures to pass on stays in the task, for the
/// connection's life.
pub type Totals = Arc<crate::state::RouteStats>;

/// What [`relay`] gives back with how the connection ended: who it was and the timers it ran
/// under. The relay kept them while it ran (who it is in its connection table record), so the
/// caller need not keep a copy of its own in the connection's task.
#[derive(Debug)]
pub struct Over {
    /// How it ended.
    pub ended: Ended,
    /// Who it was.
    pub who: crate::connections::Who,
    /// The timers it ran under.
    pub timeouts: Timeouts,
}

/// How a relayed connection ended and what it carried.
#[derive(Debug)]
pub struct Transfer {
    /// How it ended: Eof, Reset, Idle or Drain.
    pub outcome: Outcome,
    /// For a reset, which side failed and how.
    pub detail: Option<String>,
    /// Bytes client → upstream.
    pub up: u64,
    /// Bytes upstream → client.
    pub down: u64,
}

/// One direction of a relayed connection as it stands when the connection parks.
#[derive(Debug)]
pub enum Side {
    /// Its end of stream was passed on (the connection is half-closed that way).
    Ended,
    /// Still running; where it resumes.
    Running(OpenSide),
}

/// How far a relayed connection has got: what a parked connection carries to the next program
/// image, and what a new one starts from ([`Progress::default`]).
#[derive(Debug)]
pub struct Progress {
    /// Client → upstream.
    pub up: Side,
    /// Upstream → client.
    pub down: Side,
    /// Time since the connection was accepted.
    pub age: Duration,
    /// Time since a byte last moved (the idle and fin timers count from there).
    pub quiet: Duration,
    /// Bytes client → upstream so far.
    pub bytes_up: u64,
    /// Bytes upstream → client so far.
    pub bytes_down: u64,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            up: Side::Running(OpenSide::default()),
            down: Side::Running(OpenSide::default()),
            age: Duration::ZERO,
            quiet: Duration::ZERO,
            bytes_up: 0,
            bytes_down: 0,
        }
    }
}

/// A connection a live upgrade parked: its two sockets (taken out of this runtime) and where it
/// stands.
#[derive(Debug)]
pub struct Parked {
    /// The accepted client.
    pub client: std::net::TcpStream,
    /// The dialled upstream.
    pub upstream: std::net::TcpStream,
    /// Its directions, clocks and byte counts.
    pub progress: Progress,
    /// When it parked: `progress`'s clocks are as of this moment.
    pub parked_at: std::time::Instant,
}

impl Parked {
    /// Resets both sockets: a parked connection that cannot go on is cut where it stood, and
    /// must never end with a FIN a peer could take for a complete stream (its carry may hold
    /// bytes on their way).
    pub fn reset(self) {
        crate::net::reset_both(self.client, self.upstream);
    }
}

/// How [`relay`] returned.
#[derive(Debug)]
pub enum Ended {
    /// The connection is over and its sockets are closed.
    Closed(Transfer),
    /// A live upgrade parked it; nothing was closed.
    Parked(Parked),
}
