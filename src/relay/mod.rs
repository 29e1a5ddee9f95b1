//! The relay: one accepted client and one connected upstream, joined until both directions end.
//!
//! This module owns how a relayed connection ends. An end of stream on one side is passed on as
//! a shutdown of the other side's write half once every byte has gone through, while the other
//! direction keeps flowing; an error on either side is passed on as a reset of both; silence
//! beyond idle_timeout (fin_timeout once half-closed) closes both; and the daemon's drain
//! deadline closes what is left. It must not admit, dial or log connections: the route does
//! that around it.
//!
//! A live upgrade parks a connection instead of ending it ([`Ended::Parked`]): both sockets, each
//! direction's state (done, or where it paused and the bytes it carries in a pipe) and the
//! connection's clocks and counters, for the next program image to [`relay`] on from.

mod buffers;
mod pipe;
mod pump;

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

pub use pipe::{Pipe, PipePool};
pub use pump::{Carry, Paused};
use pump::{Flow, PumpError, Stop};

use crate::connections::{Activity, Direction, DirectionState, Live, Table, Who};
use crate::shutdown::Shutdown;
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

/// One direction of a relayed connection as it stands when the connection parks.
#[derive(Debug)]
pub enum Side {
    /// Its end of stream was passed on (the connection is half-closed that way).
    Done,
    /// Still open; where it paused.
    Open(Paused),
}

/// Where a relayed connection stands: what a parked connection carries to the next program
/// image, and what a new one starts from ([`Midway::default`]).
#[derive(Debug)]
pub struct Midway {
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

impl Default for Midway {
    fn default() -> Self {
        Midway {
            up: Side::Open(Paused::default()),
            down: Side::Open(Paused::default()),
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
    pub midway: Midway,
    /// When it parked: `midway`'s clocks are as of this moment.
    pub parked_at: std::time::Instant,
}

/// How [`relay`] returned.
#[derive(Debug)]
pub enum Ended {
    /// The connection is over and its sockets are closed.
    Closed(Transfer),
    /// A live upgrade parked it; nothing was closed.
    Parked(Parked),
}

/// Relays between `client` and `upstream` from `from` (a new connection passes `None`: it starts
/// from [`Midway::default`]) until the connection ends, then closes both sockets the way the
/// ending requires (FIN for an orderly end, reset for a broken one); or until a live upgrade
/// parks it.
///
/// What can be worked out before the first await is worked out outside the returned async
/// block: an async fn would keep its arguments twice in the connection's task (as arguments,
/// and as the locals they are moved into), for the connection's whole life.
#[allow(
    clippy::too_many_arguments,
    reason = "each is a different thing the relay needs"
)]
pub fn relay(
    engine: &Engine,
    who: Who,
    mut client: TcpStream,
    mut upstream: TcpStream,
    timeouts: Timeouts,
    totals: Totals<'_>,
    shutdown: &mut Shutdown,
    from: Option<Box<Midway>>,
) -> impl Future<Output = Ended> {
    let Midway {
        up: up_side,
        down: down_side,
        age,
        quiet,
        bytes_up,
        bytes_down,
    } = from.map_or_else(Midway::default, |from| *from);
    let mut up_done = matches!(up_side, Side::Done);
    let mut down_done = matches!(down_side, Side::Done);
    let start = |side: Side| match side {
        Side::Open(paused) => paused,
        Side::Done => Paused::default(),
    };
    let (up_from, down_from) = (start(up_side), start(down_side));
    // What a direction moved by an upgrade carries was read by the previous image and is not
    // written yet: it counts as read, so the accounting holds across the upgrade.
    let direction = |written: u64, from: &Paused, done: bool| {
        let carried = from.carry.as_ref().map_or(0, |c| c.len() as u64);
        let state = if done {
            DirectionState::HalfClosed
        } else {
            DirectionState::Open
        };
        let direction = Direction::new(written + carried, written, state);
        direction.set_splicing(from.streaming && engine.pipes().is_some());
        direction
    };
    let live = Arc::new(Live::new(
        who,
        direction(bytes_up, &up_from, up_done),
        direction(bytes_down, &down_from, down_done),
        Activity::since(age, quiet),
    ));
    let pause = shutdown.pause();

    async move {
        let _listed = engine.table.enter(live.clone());
        let activity = &live.activity;
        let ended = {
            let flow = |direction, total| Flow {
                pipes: engine.pipes(),
                buffers: &engine.buffers,
                stats: &engine.stats,
                direction,
                total,
                activity,
            };
            // A park wakes the task through the loop's one waiter, and each direction sees the
            // request at its next poll.
            let mut park_seen = false;
            // For passing an end of stream on while the pumps borrow the sockets.
            // SAFETY: both sockets belong to this block and stay open until after the loop,
            // the only place these are used.
            let (client_fd, upstream_fd) = unsafe {
                (
                    BorrowedFd::borrow_raw(client.as_raw_fd()),
                    BorrowedFd::borrow_raw(upstream.as_raw_fd()),
                )
            };
            let (mut client_r, mut client_w) = client.split();
            let (mut upstream_r, mut upstream_w) = upstream.split();
            let upward = pump::pump(
                &mut client_r,
                &mut upstream_w,
                flow(&live.up, totals.up),
                &pause,
                up_from,
            );
            let downward = pump::pump(
                &mut upstream_r,
                &mut client_w,
                flow(&live.down, totals.down),
                &pause,
                down_from,
            );
            tokio::pin!(upward, downward);
            // A direction that parked: it has stopped, and comes back as `Side::Open`.
            let (mut up_parked, mut down_parked) = (None, None);
            let mut next_look = timeouts.gone.map(|gone| Instant::now() + gone.every());
            // Whether the last look found a peer that looked gone: believed on the second look.
            let mut looked_gone = false;
            loop {
                let quiet_limit = if up_done || down_done {
                    Some(timeouts.idle.map_or(timeouts.fin, |idle| idle.min(timeouts.fin)))
                } else {
                    timeouts.idle
                };
                activity.set_limit(quiet_limit);
                // A limit too far away to represent is no limit.
                let deadline = match (
                    quiet_limit.and_then(|limit| activity.last().checked_add(limit)),
                    next_look,
                ) {
                    (Some(quiet), Some(look)) => Some(quiet.min(look)),
                    (quiet, look) => quiet.or(look),
                };
                let up_running = !up_done && up_parked.is_none();
                let down_running = !down_done && down_parked.is_none();
                tokio::select! {
                    result = &mut upward, if up_running => match pass_on(result, down_done, upstream_fd, ["client", "upstream"]) {
                        Ok(Stop::Eof) => {
                            up_done = true;
                            live.up.set_state(DirectionState::HalfClosed);
                        }
                        Ok(Stop::Paused(paused)) => {
                            up_parked = Some(paused);
                            live.up.set_state(DirectionState::Parked);
                        }
                        Err(detail) => break Err((Outcome::Reset, Some(detail))),
                    },
                    result = &mut downward, if down_running => match pass_on(result, up_done, client_fd, ["upstream", "client"]) {
                        Ok(Stop::Eof) => {
                            down_done = true;
                            live.down.set_state(DirectionState::HalfClosed);
                        }
                        Ok(Stop::Paused(paused)) => {
                            down_parked = Some(paused);
                            live.down.set_state(DirectionState::Parked);
                        }
                        Err(detail) => break Err((Outcome::Reset, Some(detail))),
                    },
                    () = live.close_requested() => {
                        let by = live.closed_by().unwrap_or("an administrator");
                        break Err((Outcome::ClosedByAdmin, Some(format!("closed by {by}"))));
                    },
                    _ = sleep_until(deadline) => {
                        if quiet_limit.is_some_and(|limit| activity.last().elapsed() >= limit) {
                            break Err((Outcome::Idle, None));
                        }
                        if let (Some(gone), Some(look)) = (timeouts.gone, next_look)
                            && Instant::now() >= look
                        {
                            next_look = Some(Instant::now() + gone.every());
                            let ask = |fd, name| crate::net::peer_looks_gone(fd, gone).map(|why| format!("{name}: {why}"));
                            match ask(upstream_fd, "upstream").or_else(|| ask(client_fd, "client")) {
                                Some(why) if looked_gone => break Err((Outcome::Reset, Some(why))),
                                gone => looked_gone = gone.is_some(),
                            }
                        }
                    },
                    stop = shutdown.closing_or_parking(park_seen) => match stop {
                        crate::shutdown::Stop::Close => break Err((Outcome::Drain, None)),
                        crate::shutdown::Stop::Park => park_seen = true,
                    },
                }
                if up_done && down_done {
                    break Err((Outcome::Eof, None));
                }
                let up_stopped = up_done || up_parked.is_some();
                let down_stopped = down_done || down_parked.is_some();
                if up_stopped && down_stopped {
                    let side = |parked: Option<Paused>| parked.map_or(Side::Done, Side::Open);
                    break Ok((side(up_parked.take()), side(down_parked.take())));
                }
            }
        };

        let (outcome, detail) = match ended {
            Ok((up_side, down_side)) => {
                // What a parked direction holds must be exactly what it carries.
                let carried = |side: &Side| match side {
                    Side::Open(Paused {
                        carry: Some(carry), ..
                    }) => carry.len() as u64,
                    _ => 0,
                };
                audit(engine, &live, "parked", [carried(&up_side), carried(&down_side)]);
                let midway = Midway {
                    up: up_side,
                    down: down_side,
                    age: activity.age(),
                    quiet: activity.last().elapsed(),
                    bytes_up: live.up.bytes_written(),
                    bytes_down: live.down.bytes_written(),
                };
                return match (client.into_std(), upstream.into_std()) {
                    (Ok(client), Ok(upstream)) => Ended::Parked(Parked {
                        client,
                        upstream,
                        midway,
                        parked_at: std::time::Instant::now(),
                    }),
                    // Taking a socket out of the runtime cannot fail for a registered socket; if it
                    // did, both are gone with the error, and the connection is reported reset.
                    (client, upstream) => Ended::Closed(Transfer {
                        outcome: Outcome::Reset,
                        detail: Some(format!(
                            "cannot park for the upgrade: {}",
                            [client.err(), upstream.err()]
                                .into_iter()
                                .flatten()
                                .map(|e| e.to_string())
                                .collect::<Vec<_>>()
                                .join("; ")
                        )),
                        up: midway.bytes_up,
                        down: midway.bytes_down,
                    }),
                };
            }
            Err(ended) => ended,
        };

        // A connection that did not end on its own, or that a timer ends with bytes still on their
        // way (in a burst, or unread in a receive queue), is reset on both sides: neither peer may
        // mistake a truncated stream for an orderly end. The drain always cuts a stream short.
        let cut_short = match outcome {
            Outcome::Reset | Outcome::Drain | Outcome::ClosedByAdmin => true,
            // Both peers' FINs were read and everything before them written: nothing can
            // follow a FIN, so nothing is unread, and no system call needs to say so.
            Outcome::Eof => false,
            _ => {
                // A socket that cannot say counts as holding nothing: it is closed either way.
                let unread = |socket: &TcpStream| crate::net::unread_bytes(socket).unwrap_or(0);
                activity.bytes_in_flight() || unread(&client) > 0 || unread(&upstream) > 0
            }
        };
        if cut_short {
            crate::net::reset(client);
            crate::net::reset(upstream);
        } else {
            // An orderly end: every byte read from each side was written to the other.
            audit(engine, &live, outcome.name(), [0, 0]);
        }
        Ended::Closed(Transfer {
            outcome,
            detail,
            up: live.up.bytes_written(),
            down: live.down.bytes_written(),
        })
    }
}

/// Checks that each direction of `live` holds what it should (`expected`: up, down) now that it
/// ends or parks (`how`): bytes read from a source and neither written nor carried are bytes
/// lost. Each mismatch is counted and logged with both counts; the connection is not changed.
fn audit(engine: &Engine, live: &Live, how: &str, expected: [u64; 2]) {
    for (name, direction, expected) in [("up", &live.up, expected[0]), ("down", &live.down, expected[1])] {
        let (read, written) = (direction.bytes_read(), direction.bytes_written());
        if read != written + expected {
            engine.stats.accounting_mismatches.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                conn = live.who.id,
                route = %live.who.route,
                direction = name,
                bytes_read = read,
                bytes_written = written,
                bytes_carried = expected,
                end = how,
                "byte accounting mismatch: the bytes read from one side are not the bytes written to the other"
            );
        }
    }
}

/// What the end of one direction means for the connection. An end of stream is passed on as a
/// shutdown of the write side of `dst` (the socket the direction writes to), unless the other
/// direction is done too: both sockets are closed right after, and close sends the FIN. An
/// error is named after the side it came from: `names` is [source, destination].
fn pass_on(
    result: Result<Stop, PumpError>,
    other_done: bool,
    dst: BorrowedFd<'_>,
    names: [&str; 2],
) -> Result<Stop, String> {
    let [src_name, dst_name] = names;
    match result {
        Ok(Stop::Eof) if !other_done => crate::net::shutdown_write(dst)
            .map(|()| Stop::Eof)
            .map_err(|e| format!("{dst_name}: shutdown after {src_name}'s FIN failed: {e}")),
        Ok(stop) => Ok(stop),
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
