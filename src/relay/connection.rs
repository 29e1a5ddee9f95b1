//! One relayed connection's life, as a small state machine: each direction is running, done
//! (its end of stream passed on) or parked (by a live upgrade); the loop runs until both are
//! done (an orderly end), both are stopped with one parked (the connection parks), or something
//! ends the connection (an error, a timer, an administrator, the drain). Then [`park`] hands the
//! sockets on, or [`close`] closes them the way the end requires.
//!
//! It must not admit, dial or log connections (the route does), nor move bytes itself (the
//! pump does).

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::net::TcpStream;
use tokio::time::Instant;

use super::pump::{self, Flow, PumpError, SideEnd};
use super::{Ended, Engine, OpenSide, Over, Parked, Progress, Side, Timeouts, Totals, Transfer};
use crate::connections::{Activity, Direction, DirectionState, Live, Who};
use crate::shutdown::{ParkRequest, Request, Shutdown};
use crate::state::Outcome;

/// Where one direction stands in the relay loop.
#[derive(Debug)]
enum Run {
    /// Moving bytes (or waiting for them).
    Running,
    /// Its end of stream was passed on.
    Ended,
    /// A live upgrade stopped it; it resumes from here in the next program image.
    Parked(OpenSide),
}

impl Run {
    /// Where a direction starts: `Ended` if its end of stream had been passed on before an upgrade
    /// moved it here.
    fn from_side(side: &Side) -> Run {
        match side {
            Side::Ended => Run::Ended,
            Side::Running(_) => Run::Running,
        }
    }

    fn is_running(&self) -> bool {
        matches!(self, Run::Running)
    }

    fn is_ended(&self) -> bool {
        matches!(self, Run::Ended)
    }

    /// Takes in how the direction's pump returned, and shows it in the connection table.
    fn stopped(&mut self, end: SideEnd, shown: &Direction) {
        *self = match end {
            SideEnd::Ended => {
                shown.set_state(DirectionState::Ended);
                Run::Ended
            }
            SideEnd::Parked(open) => {
                shown.set_state(DirectionState::Parked);
                Run::Parked(open)
            }
        };
    }

    /// What a stopped direction carries to the next program image.
    fn into_side(self) -> Side {
        match self {
            Run::Parked(open) => Side::Running(open),
            Run::Ended | Run::Running => Side::Ended,
        }
    }
}

/// How the relay loop ended.
enum LoopEnd {
    /// The connection is over: how, and for a reset or a close by an administrator, why.
    Closed(Outcome, Option<String>),
    /// A live upgrade parked both directions (one may have been done already).
    Parked { up: Side, down: Side },
}

/// Relays between `client` and `upstream` from `from` (a new connection passes `None`: it starts
/// from [`Progress::default`]) until the connection ends, then closes both sockets the way the
/// ending requires (FIN for an orderly end, reset for a broken one); or until a live upgrade
/// parks it.
///
/// What can be worked out before the first await is worked out outside the returned async
/// block: an async fn would keep its arguments twice in the connection's task (as arguments,
/// and as the locals they are moved into), for the connection's whole life. For the same
/// reason it takes what it needs by value, and what follows the end is `then`, a plain
/// function given who the connection was and how it ended ([`Over`]): a caller's block
/// awaiting this future would keep a second copy of what it passed on, for as long.
#[allow(
    clippy::too_many_arguments,
    reason = "each is a different thing the relay needs"
)]
pub fn relay<T>(
    engine: Arc<Engine>,
    who: Who,
    mut client: TcpStream,
    mut upstream: TcpStream,
    timeouts: Timeouts,
    totals: Totals,
    shutdown: Shutdown,
    from: Option<Box<Progress>>,
    then: impl FnOnce(Over) -> T,
) -> impl Future<Output = T> {
    let Progress {
        up: up_side,
        down: down_side,
        age,
        quiet,
        bytes_up,
        bytes_down,
    } = from.map_or_else(Progress::default, |from| *from);
    let mut runs = [Run::from_side(&up_side), Run::from_side(&down_side)];
    // What a direction moved by an upgrade carries was read by the previous image and is not
    // written yet: it counts as read, so the accounting holds across the upgrade.
    let shown = |written: u64, side: &Side| {
        let (state, open) = match side {
            Side::Ended => (DirectionState::Ended, None),
            Side::Running(open) => (DirectionState::Running, Some(open)),
        };
        let carried = open.and_then(|o| o.carry.as_ref()).map_or(0, |c| c.len() as u64);
        let direction = Direction::new(written + carried, written, state);
        direction.set_splicing(open.is_some_and(|o| o.splice) && engine.pipes().is_some());
        direction
    };
    let live = Arc::new(Live::new(
        who,
        shown(bytes_up, &up_side),
        shown(bytes_down, &down_side),
        Activity::since(age, quiet),
    ));
    let open = |side: Side| match side {
        Side::Running(open) => open,
        Side::Ended => OpenSide::default(),
    };
    let mut starts = [open(up_side), open(down_side)];
    let park_request = shutdown.park_request();

    async move {
        let listed = engine.table.enter(live.clone());
        let how = run(
            &engine,
            &live,
            [&mut client, &mut upstream],
            &timeouts,
            &totals,
            &shutdown,
            &park_request,
            &mut runs,
            &mut starts,
        )
        .await;
        let ended = match how {
            LoopEnd::Parked { up, down } => park(&engine, &live, &totals, client, upstream, up, down),
            LoopEnd::Closed(outcome, detail) => {
                close(&engine, &live, &totals, client, upstream, outcome, detail)
            }
        };
        // Out of the table before the caller logs its end.
        drop(listed);
        then(Over {
            ended,
            who: live.who.clone(),
            timeouts,
        })
    }
}

/// The relay loop: runs both directions and every timer until the connection ends or parks.
/// (An async block, not an async fn, for the reason [`relay`] gives; and it borrows what the
/// relay's block already holds rather than taking a second copy of it.)
#[allow(
    clippy::too_many_arguments,
    reason = "each is a different thing the loop needs"
)]
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would keep its arguments twice"
)]
fn run<'a>(
    engine: &'a Engine,
    live: &'a Live,
    [client, upstream]: [&'a mut TcpStream; 2],
    timeouts: &'a Timeouts,
    totals: &'a Totals,
    shutdown: &'a Shutdown,
    park_request: &'a ParkRequest,
    [up, down]: &'a mut [Run; 2],
    [up_from, down_from]: &'a mut [OpenSide; 2],
) -> impl Future<Output = LoopEnd> + 'a {
    async move {
        let activity = &live.activity;
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
        // SAFETY: both sockets outlive this loop (the caller closes or parks them after it).
        let (client_fd, upstream_fd) = unsafe {
            (
                BorrowedFd::borrow_raw(client.as_raw_fd()),
                BorrowedFd::borrow_raw(upstream.as_raw_fd()),
            )
        };
        let (mut client_r, mut client_w) = client.split();
        let (mut upstream_r, mut upstream_w) = upstream.split();
        // The starting points are taken, not copied: this loop runs once per connection (the
        // relay's block awaits it once), and a second run would start both directions afresh.
        let upward = pump::pump(
            &mut client_r,
            &mut upstream_w,
            flow(&live.up, &totals.counters.bytes_up),
            park_request,
            std::mem::take(up_from),
        );
        let downward = pump::pump(
            &mut upstream_r,
            &mut client_w,
            flow(&live.down, &totals.counters.bytes_down),
            park_request,
            std::mem::take(down_from),
        );
        tokio::pin!(upward, downward);
        let mut next_look = timeouts.gone.map(|gone| Instant::now() + gone.every());
        // Whether the last look found a peer that looked gone: believed on the second look.
        let mut looked_gone = false;
        loop {
            let quiet_limit = if up.is_ended() || down.is_ended() {
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
            tokio::select! {
                result = &mut upward, if up.is_running() => {
                    match pass_on(result, down.is_ended(), upstream_fd, ["client", "upstream"]) {
                        Ok(end) => up.stopped(end, &live.up),
                        Err(detail) => return LoopEnd::Closed(Outcome::Reset, Some(detail)),
                    }
                },
                result = &mut downward, if down.is_running() => {
                    match pass_on(result, up.is_ended(), client_fd, ["upstream", "client"]) {
                        Ok(end) => down.stopped(end, &live.down),
                        Err(detail) => return LoopEnd::Closed(Outcome::Reset, Some(detail)),
                    }
                },
                by = live.close_requested() => {
                    return LoopEnd::Closed(Outcome::ClosedByAdmin, Some(format!("closed by {by}")));
                },
                // The timer itself, disabled when there is no deadline (a disabled branch's
                // future is made but never polled, so it registers nothing): an async fn
                // around it cost every idle connection 24 bytes.
                () = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    if quiet_limit.is_some_and(|limit| activity.last().elapsed() >= limit) {
                        return LoopEnd::Closed(Outcome::Idle, None);
                    }
                    if let (Some(gone), Some(look)) = (timeouts.gone, next_look)
                        && Instant::now() >= look
                    {
                        next_look = Some(Instant::now() + gone.every());
                        let ask = |fd, name| crate::net::peer_looks_gone(fd, gone.silence, gone.probes).map(|why| format!("{name}: {why}"));
                        match ask(upstream_fd, "upstream").or_else(|| ask(client_fd, "client")) {
                            Some(why) if looked_gone => return LoopEnd::Closed(Outcome::Reset, Some(why)),
                            gone => looked_gone = gone.is_some(),
                        }
                    }
                },
                request = shutdown.closing_or_parking(park_seen) => match request {
                    Request::Close => return LoopEnd::Closed(Outcome::Drain, None),
                    Request::Park => park_seen = true,
                },
            }
            match (&*up, &*down) {
                (Run::Ended, Run::Ended) => return LoopEnd::Closed(Outcome::Eof, None),
                (Run::Running, _) | (_, Run::Running) => {}
                // Both stopped, at least one parked.
                _ => {
                    return LoopEnd::Parked {
                        up: std::mem::replace(up, Run::Running).into_side(),
                        down: std::mem::replace(down, Run::Running).into_side(),
                    };
                }
            }
        }
    }
}

/// Takes a parked connection's sockets out of the runtime with where it stands, for the next
/// program image.
fn park(
    engine: &Engine,
    live: &Live,
    totals: &Totals,
    client: TcpStream,
    upstream: TcpStream,
    up: Side,
    down: Side,
) -> Ended {
    // What a parked direction holds must be exactly what it carries.
    let carried = |side: &Side| match side {
        Side::Running(OpenSide {
            carry: Some(carry), ..
        }) => carry.len() as u64,
        _ => 0,
    };
    audit(engine, live, "parked", [carried(&up), carried(&down)]);
    let progress = Progress {
        up,
        down,
        age: live.activity.age(),
        quiet: live.activity.last().elapsed(),
        bytes_up: live.up.bytes_written(),
        bytes_down: live.down.bytes_written(),
    };
    match (client.into_std(), upstream.into_std()) {
        (Ok(client), Ok(upstream)) => Ended::Parked(Parked {
            client,
            upstream,
            progress,
            parked_at: std::time::Instant::now(),
        }),
        // Taking a socket out of the runtime cannot fail for a registered socket; if it did,
        // both are gone with the error, and the connection is reported reset.
        (client, upstream) => {
            totals.record(Outcome::Reset);
            Ended::Closed(Transfer {
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
                up: progress.bytes_up,
                down: progress.bytes_down,
            })
        }
    }
}

/// Counts the connection's end under its route, closes both sockets the way `outcome` requires
/// and says what the connection carried.
fn close(
    engine: &Engine,
    live: &Live,
    totals: &Totals,
    client: TcpStream,
    upstream: TcpStream,
    outcome: Outcome,
    detail: Option<String>,
) -> Ended {
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
            live.activity.bytes_in_flight() || unread(&client) > 0 || unread(&upstream) > 0
        }
    };
    // Counted before either socket closes, as every refusal before the relay is: whoever sees
    // the reset or the FIN also sees it counted.
    totals.record(outcome);
    if cut_short {
        crate::net::reset_both(client, upstream);
    } else {
        // An orderly end: every byte read from each side was written to the other.
        audit(engine, live, outcome.name(), [0, 0]);
    }
    Ended::Closed(Transfer {
        outcome,
        detail,
        up: live.up.bytes_written(),
        down: live.down.bytes_written(),
    })
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
    result: Result<SideEnd, PumpError>,
    other_ended: bool,
    dst: BorrowedFd<'_>,
    names: [&str; 2],
) -> Result<SideEnd, String> {
    let [src_name, dst_name] = names;
    match result {
        Ok(SideEnd::Ended) if !other_ended => crate::net::shutdown_write(dst)
            .map(|()| SideEnd::Ended)
            .map_err(|e| format!("{dst_name}: shutdown after {src_name}'s FIN failed: {e}")),
        Ok(end) => Ok(end),
        Err(PumpError::Read(e)) => Err(format!("{src_name}: {e}")),
        Err(PumpError::Write(e)) => Err(format!("{dst_name}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::relay::GoneAfter;
    use crate::shutdown::Drain;
    use crate::state::{ConnectTimes, RelayStats, RouteCounters, RouteStats};

    /// The most a relayed connection's future may take, its `then` included (the route's holds
    /// 40 bytes; so does the test's). Once it relays, a connection's task is this future (after
    /// its opening phase, 16 bytes more) in tokio's task cell, which is rounded up to 128 bytes:
    /// 1,528 bytes in a release build today, 1,544 with the opening phase, so a task cell of
    /// 1,664 with 16 to spare; 16 more and every idle connection's task is 1,792. With two I/O
    /// registrations (2 × 256) and its connection table record (272 with its `Arc`) that is what
    /// an idle connection costs. The relay takes what it needs by value, its loop borrows it (no
    /// copy kept to pass on), and the loop's waiters are small: tokio's own futures rather than
    /// async fns around them, a `Notify` waiter for the daemon's signal rather than a watch
    /// channel's, a pointer for the close request. Every comment about "an async block, not an
    /// async fn" in the relay is about this number; raise it only with a measurement that says
    /// why (`heaptrack` shows the task cell's size directly; `-Zprint-type-sizes` the parts).
    const LIMIT: usize = 1_544;

    #[test]
    fn a_relayed_connection_s_future_stays_small() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(addr).unwrap();
        let (upstream, _) = listener.accept().unwrap();
        client.set_nonblocking(true).unwrap();
        upstream.set_nonblocking(true).unwrap();
        let engine = Engine::new(true, 4, RelayStats::default());
        let who = Who {
            id: 1,
            route: "ssh".into(),
            client: addr,
            proxied_client: None,
            link_id: None,
            upstream: addr,
        };
        let timeouts = Timeouts {
            idle: Some(Duration::from_secs(60)),
            fin: Duration::from_secs(60),
            gone: Some(GoneAfter {
                silence: Duration::from_secs(120),
                probes: 9,
            }),
        };
        let totals = Arc::new(RouteStats::new(
            ConnectTimes::default().of("ssh"),
            RouteCounters::default(),
        ));
        let drain = Drain::new();
        let shutdown = drain.handle();
        // What the route's `then` holds: when the connection started, its route's gauge, the
        // way to the daemon for a parked connection.
        let (started, gauge, parking) = (
            std::time::Instant::now(),
            Arc::new(0_u8),
            tokio::sync::mpsc::unbounded_channel::<()>().0,
        );
        let lost = Arc::new(0_u8);
        let then = move |_: Over| drop((started, gauge, parking, lost));
        let future = relay(
            engine,
            who,
            TcpStream::from_std(client).unwrap(),
            TcpStream::from_std(upstream).unwrap(),
            timeouts,
            totals,
            shutdown,
            None,
            then,
        );
        let size = std::mem::size_of_val(&future);
        assert!(
            size <= LIMIT,
            "a relayed connection's future grew to {size} bytes (limit {LIMIT}): every idle connection pays for it"
        );
    }
}
