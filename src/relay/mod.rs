//! The relay: one accepted client and one connected upstream, joined until both directions end.
//!
//! This module owns how a relayed connection ends. An end of stream on one side is passed on as
//! a shutdown of the other side's write half once every byte has gone through, while the other
//! direction keeps flowing; an error on either side is passed on as a reset of both; silence
//! beyond idle_timeout (fin_timeout once half-closed) closes both; and the daemon's drain
//! deadline closes what is left. It must not admit, dial or log connections: the route does
//! that around it.

mod buffers;
mod pipe;
mod pump;

use std::net::Shutdown as Direction;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use socket2::SockRef;
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::time::Instant;

pub use pipe::PipePool;
use pump::{Flow, PumpError};

use crate::shutdown::Shutdown;
use crate::state::{EngineView, Outcome, RelayStats};

/// What every relayed connection shares: the pipe pool (absent when splice is turned off), the
/// copy buffers, and the engine counters.
#[derive(Debug)]
pub struct Engine {
    pipes: Option<PipePool>,
    buffers: buffers::BufferPool,
    /// Engine-wide counters, read for the exit summary and metrics.
    pub stats: RelayStats,
}

impl Engine {
    /// An engine that splices through at most `max_pipes` pipes, or only copies when `splice`
    /// is false.
    pub fn new(splice: bool, max_pipes: usize) -> Arc<Engine> {
        Arc::new(Engine {
            pipes: splice.then(|| PipePool::new(max_pipes)),
            buffers: buffers::BufferPool::default(),
            stats: RelayStats::default(),
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
}

/// The timers that bound a relayed connection.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// Silence that closes a connection; `None` never does.
    pub idle: Option<Duration>,
    /// Silence that closes a half-closed connection.
    pub fin: Duration,
}

/// Running byte totals the caller keeps across connections (a route's), updated at every burst.
#[derive(Clone, Copy, Debug)]
pub struct Totals<'a> {
    /// Client → upstream.
    pub up: &'a AtomicU64,
    /// Upstream → client.
    pub down: &'a AtomicU64,
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

/// When the connection last moved a byte, in milliseconds since it started: one relaxed store per
/// burst, read only when an idle timer fires.
#[derive(Debug)]
pub struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    /// Bursts that have read bytes not yet written out. If a timer ends the connection while
    /// one is open, those bytes are lost, so the peers get a reset rather than a clean FIN.
    in_flight: AtomicU8,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicU8::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// A burst read bytes it has not written yet.
    fn carrying(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// The burst wrote everything it read.
    fn delivered(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    fn bytes_in_flight(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) > 0
    }
}

/// Relays between `client` and `upstream` until the connection ends, then closes both sockets
/// the way the ending requires (FIN for an orderly end, reset for a broken one).
pub async fn relay(
    engine: &Engine,
    mut client: TcpStream,
    mut upstream: TcpStream,
    timeouts: Timeouts,
    totals: Totals<'_>,
    shutdown: &mut Shutdown,
) -> Transfer {
    let activity = Activity::new();
    let up = AtomicU64::new(0);
    let down = AtomicU64::new(0);

    let (outcome, detail) = {
        let flow = |bytes, total| Flow {
            pipes: engine.pipes(),
            buffers: &engine.buffers,
            stats: &engine.stats,
            bytes,
            total,
            activity: &activity,
        };
        let finished = AtomicU8::new(0);
        let (mut client_r, mut client_w) = client.split();
        let (mut upstream_r, mut upstream_w) = upstream.split();
        let upward = half(
            &mut client_r,
            &mut upstream_w,
            flow(&up, totals.up),
            &finished,
            "client",
            "upstream",
        );
        let downward = half(
            &mut upstream_r,
            &mut client_w,
            flow(&down, totals.down),
            &finished,
            "upstream",
            "client",
        );
        tokio::pin!(upward, downward);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            let quiet_limit = if up_done || down_done {
                Some(timeouts.idle.map_or(timeouts.fin, |idle| idle.min(timeouts.fin)))
            } else {
                timeouts.idle
            };
            // A limit too far away to represent is no limit.
            let deadline = quiet_limit.and_then(|limit| activity.last().checked_add(limit));
            tokio::select! {
                result = &mut upward, if !up_done => match result {
                    Ok(()) => up_done = true,
                    Err(detail) => break (Outcome::Reset, Some(detail)),
                },
                result = &mut downward, if !down_done => match result {
                    Ok(()) => down_done = true,
                    Err(detail) => break (Outcome::Reset, Some(detail)),
                },
                _ = sleep_until(deadline) => {
                    if quiet_limit.is_some_and(|limit| activity.last().elapsed() >= limit) {
                        break (Outcome::Idle, None);
                    }
                },
                _ = shutdown.closing() => break (Outcome::Drain, None),
            }
            if up_done && down_done {
                break (Outcome::Eof, None);
            }
        }
    };

    // A connection that did not end on its own, or that a timer ends with bytes still on their
    // way (in a burst, or unread in a receive queue), is reset on both sides: neither peer may
    // mistake a truncated stream for an orderly end. The drain always cuts a stream short.
    let cut_short = match outcome {
        Outcome::Reset | Outcome::Drain => true,
        _ => {
            activity.bytes_in_flight()
                || crate::net::unread_bytes(&client) > 0
                || crate::net::unread_bytes(&upstream) > 0
        }
    };
    if cut_short {
        crate::net::reset(client);
        crate::net::reset(upstream);
    }
    Transfer {
        outcome,
        detail,
        up: up.into_inner(),
        down: down.into_inner(),
    }
}

/// One direction, then the half-close that passes its end of stream on. The direction that
/// finishes second skips the shutdown: both sockets are closed right after, and close sends the
/// FIN anyway.
async fn half(
    src: &mut ReadHalf<'_>,
    dst: &mut WriteHalf<'_>,
    flow: Flow<'_>,
    finished: &AtomicU8,
    src_name: &str,
    dst_name: &str,
) -> Result<(), String> {
    match pump::pump(src, dst, flow).await {
        Ok(()) if finished.fetch_add(1, Ordering::Relaxed) == 0 => SockRef::from(dst.as_ref())
            .shutdown(Direction::Write)
            .map_err(|e| format!("{dst_name}: shutdown after {src_name}'s FIN failed: {e}")),
        Ok(()) => Ok(()),
        Err(PumpError::Read(e)) => Err(format!("{src_name}: {e}")),
        Err(PumpError::Write(e)) => Err(format!("{dst_name}: {e}")),
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
