//! One direction of a relayed connection: bytes from `src` to `dst` until `src` ends.
//!
//! This module owns the readiness discipline of the hot path. Every syscall runs inside tokio's
//! `try_io`, so a WouldBlock clears the cached readiness instead of spinning; data is spliced
//! into an empty pipe and the pipe drained completely before the next read, so EAGAIN always has
//! one meaning. A direction starts by copying through a pooled buffer, which is cheapest for the
//! small writes of an interactive session; a read that brings [`STREAMING_READ`] bytes or more
//! marks it as a bulk stream, and it splices; a splice burst that moves less than that (the
//! stream has slowed to a trickle, like keystrokes after an upload) puts it back to copying. The
//! mode follows the traffic, burst by burst. When no pipe is available, or the
//! kernel refuses splice, it copies, counted and logged. It must not close sockets or decide how
//! a connection ends: it reports end of stream or an error, and the connection decides.
//!
//! A live upgrade parks a direction ([`SideEnd::Parked`]) waiting for `src`, between two bursts, or
//! waiting for `dst`, with the unwritten bytes in a [`Carry`]: the splice burst's pipe, or a copy
//! buffer's rest as bytes for the hand-over document. The next program image resumes the
//! direction from that state ([`OpenSide`]), writing the carry out first.

use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::Poll;

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::tcp::{ReadHalf, WriteHalf};

pub use super::flow::Flow;
use super::flow::{InFlight, Path};
use super::pipe::{Lease, Pipe, PipePool};
use crate::logging::RateLimit;
use crate::net::at_urgent_mark;
use crate::shutdown::ParkRequest;

/// A single read this large means bulk data (an scp upload, a file copy over WinRM): splicing
/// it saves a copy per byte. Smaller reads (keystrokes, command output, requests) cost fewer
/// cycles through recv/send than through a pipe, the way HAProxy's `splice-auto` decides.
pub const STREAMING_READ: usize = 16 * 1024;

/// Which side an error came from, so the log can say who broke the connection.
#[derive(Debug)]
pub enum PumpError {
    /// Reading `src` failed (typically: it reset).
    Read(io::Error),
    /// Writing `dst` failed (typically: it reset, or went away).
    Write(io::Error),
}

/// Where an open direction stands when it parks: everything the next program image needs to
/// resume it (the default for a new connection).
#[derive(Debug, Default)]
pub struct OpenSide {
    /// The direction had switched to splicing (bulk data).
    pub splice: bool,
    /// Bytes read from `src` and not yet written to `dst`, held in a pipe. Boxed: only a
    /// parked direction has one, and every direction's task would otherwise carry its room.
    pub carry: Option<Box<Carry>>,
}

/// Bytes a parked direction read from `src` and has not written to `dst` yet: they cross the
/// upgrade with the connection and are written out first by the next program image.
#[derive(Debug)]
pub enum Carry {
    /// In the pipe a splice burst was draining: the pipe itself crosses, and goes back to the
    /// next image's pool once it is empty.
    Pipe {
        /// The pipe that holds them.
        pipe: Pipe,
        /// How many.
        bytes: usize,
    },
    /// The unwritten rest of a copy buffer (at most one buffer), carried as bytes in the hand-over
    /// document. Not in a new pipe: a pipe made at the upgrade counts against the user's pipe
    /// budget, and past it the kernel gives a page or two, too small for the rest, so the
    /// connection would have to be reset.
    Bytes(Vec<u8>),
}

impl Carry {
    /// How many bytes it holds.
    pub fn len(&self) -> usize {
        match self {
            Carry::Pipe { bytes, .. } => *bytes,
            Carry::Bytes(bytes) => bytes.len(),
        }
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a pump returned without an error.
#[derive(Debug)]
pub enum SideEnd {
    /// `src` sent its FIN and every byte before it was written to `dst`.
    Ended,
    /// A live upgrade parked the direction.
    Parked(OpenSide),
}

enum Burst {
    /// `src` has nothing more for now; wait for readiness again.
    Drained,
    /// A splice burst drained `src` having moved less than [`STREAMING_READ`]: copy the next.
    Trickle,
    /// A copy burst read a bulk-sized chunk: switch to splicing (readiness is still set).
    Bulk,
    /// `src` sent its FIN and every byte before it was written to `dst`.
    Eof,
    /// A park was asked for; whatever was not yet written is in the carry.
    Parked(Option<Box<Carry>>),
}

impl Burst {
    /// How a splice burst that emptied `src` after moving `moved` bytes ends: a stream that
    /// has slowed to a trickle goes back to copying.
    fn splice_drained(moved: usize) -> Burst {
        if moved < STREAMING_READ {
            Burst::Trickle
        } else {
            Burst::Drained
        }
    }
}

static NO_PIPE_LOG: RateLimit = RateLimit::new();
static REFUSED_LOG: RateLimit = RateLimit::new();

/// Relays `src` → `dst` until end of stream on `src`, or until a live upgrade parks it. Returns
/// once every byte read has been written (or, parked, is in the returned carry); the caller then
/// shuts down `dst`'s write side. `from` is where a direction parked by the previous program
/// image stood (the default for a new connection).
///
/// An async block, not an async fn: an async fn keeps its arguments twice in the connection's
/// task (as arguments, and as the locals they are moved into), for the direction's whole life.
pub fn pump<'a>(
    src: &'a mut ReadHalf<'_>,
    dst: &'a mut WriteHalf<'_>,
    flow: Flow<'a>,
    park: &'a ParkRequest,
    from: OpenSide,
) -> impl Future<Output = Result<SideEnd, PumpError>> {
    let mut pipes = flow.pipes;
    let mut splice = from.splice;
    let carried = from.carry;
    async move {
        if let Some(carry) = carried
        // Boxed: only a direction moved by an upgrade runs it, and every connection's task would
        // otherwise carry its state.
        && let Some(carry) = Box::pin(drain_carry(carry, dst, &flow, park)).await?
        {
            return Ok(SideEnd::Parked(OpenSide {
                splice,
                carry: Some(carry),
            }));
        }
        loop {
            if park.is_requested() {
                return Ok(SideEnd::Parked(OpenSide { splice, carry: None }));
            }
            // Every burst spends a unit of tokio's cooperative budget, so one busy connection yields
            // to the others on its worker. It also matters for correctness: a read refused for lack
            // of budget looks like "drained" to `copy_burst`, and without this yield the loop would
            // find the socket still readable and spin.
            tokio::task::consume_budget().await;
            match ready_or_park(src.as_ref(), park, Interest::READABLE).await {
                Some(ready) => ready.map_err(PumpError::Read)?,
                None => {
                    return Ok(SideEnd::Parked(OpenSide { splice, carry: None }));
                }
            }
            let lease = match (splice, pipes) {
                (true, Some(pool)) => match pool.take() {
                    Ok(Some(lease)) => Some(lease),
                    Ok(None) => {
                        no_pipe(&flow, pool, None);
                        None
                    }
                    Err(e) => {
                        no_pipe(&flow, pool, Some(e));
                        None
                    }
                },
                _ => None,
            };
            flow.direction.set_splicing(lease.is_some());
            let burst = match lease {
                Some(lease) => match splice_burst(src, dst, lease, &flow, park).await {
                    Err(PumpError::Read(e)) if splice_refused(&e) => {
                        flow.stats.fallback_refused.fetch_add(1, Ordering::Relaxed);
                        if let Some(suppressed) = REFUSED_LOG.admit() {
                            tracing::warn!(error = %e, suppressed, "kernel refused splice on this connection; copying through a buffer instead");
                        }
                        pipes = None;
                        flow.direction.set_splicing(false);
                        copy_burst(src, dst, &flow, park).await?
                    }
                    other => other?,
                },
                None => copy_burst(src, dst, &flow, park).await?,
            };
            match burst {
                Burst::Eof => {
                    // The FIN is activity: fin_timeout counts from here, not from the last byte.
                    flow.activity.touch();
                    return Ok(SideEnd::Ended);
                }
                Burst::Bulk => splice = true,
                Burst::Trickle => splice = false,
                Burst::Drained => {}
                Burst::Parked(carry) => return Ok(SideEnd::Parked(OpenSide { splice, carry })),
            }
        }
    }
}

/// Writes out what a parked direction carried across the upgrade. Returns the rest when parked
/// again before it is all out. A carried pipe is counted in the pool while it drains and goes
/// back to it once empty, so the pipes in use never exceed `max_pipes` (and the user's pipe
/// budget) however many crossed.
async fn drain_carry(
    carry: Box<Carry>,
    dst: &mut WriteHalf<'_>,
    flow: &Flow<'_>,
    park: &ParkRequest,
) -> Result<Option<Box<Carry>>, PumpError> {
    let (pipe, bytes) = match *carry {
        Carry::Bytes(bytes) => return write_all(dst, &bytes, flow.carried(), flow, park).await,
        Carry::Pipe { pipe, bytes } => (pipe, bytes),
    };
    // With splice off there is no pool; a pool of its own then closes the pipe once empty.
    let own;
    let pool = match flow.pipes {
        Some(pool) => pool,
        None => {
            own = PipePool::new(0);
            &own
        }
    };
    let mut lease = pool.adopt(pipe, bytes);
    let in_flight = flow.carried();
    if write_pipe(&mut lease, dst.as_ref(), flow, park).await? {
        return Ok(carry_pipe(lease));
    }
    in_flight.delivered();
    Ok(None)
}

/// What a parked burst's pipe carries: the pipe itself, when it holds anything.
fn carry_pipe(lease: Lease<'_>) -> Option<Box<Carry>> {
    lease
        .detach()
        .map(|(pipe, bytes)| Box::new(Carry::Pipe { pipe, bytes }))
}

/// Writes out everything `lease`'s pipe holds, counting it as it goes out (a slow reader is not
/// an idle connection, and what the pipe still holds is what the direction holds). Returns
/// whether a park was asked for while `dst` was full: the rest is still in the pipe, for the
/// caller to carry. (An async block, not an async fn, for the reason [`pump`] gives.)
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would keep its arguments twice"
)]
fn write_pipe<'a>(
    lease: &'a mut Lease<'_>,
    dst: &'a tokio::net::TcpStream,
    flow: &'a Flow<'_>,
    park: &'a ParkRequest,
) -> impl Future<Output = Result<bool, PumpError>> {
    async move {
        while lease.pending() > 0 {
            match dst.try_io(Interest::WRITABLE, || lease.drain_to(dst)) {
                Ok(n) => flow.moved(n, Path::Splice),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    match ready_or_park(dst, park, Interest::WRITABLE).await {
                        Some(ready) => ready.map_err(PumpError::Write)?,
                        None => return Ok(true),
                    }
                }
                Err(e) => return Err(PumpError::Write(e)),
            }
        }
        Ok(false)
    }
}

fn no_pipe(flow: &Flow<'_>, pool: &PipePool, error: Option<io::Error>) {
    flow.stats.fallback_no_pipe.fetch_add(1, Ordering::Relaxed);
    if let Some(suppressed) = NO_PIPE_LOG.admit() {
        match error {
            Some(e) => {
                tracing::warn!(error = %e, suppressed, "cannot create a pipe; copying this burst through a buffer")
            }
            None => tracing::warn!(
                pipes = pool.alive(),
                suppressed,
                "every pipe is in use (max_pipes); copying this burst through a buffer"
            ),
        }
    }
}

/// EINVAL or ENOSYS from splicing a socket into a pipe means this kernel or socket cannot
/// splice at all; nothing was moved, so copying can take over without losing a byte.
fn splice_refused(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS))
}

/// One splice burst: socket → pipe → socket until `src` is drained. (An async block, not an
/// async fn, for the reason [`pump`] gives.)
fn splice_burst<'a>(
    src: &'a mut ReadHalf<'_>,
    dst: &'a mut WriteHalf<'_>,
    mut lease: Lease<'a>,
    flow: &'a Flow<'_>,
    park: &'a ParkRequest,
) -> impl Future<Output = Result<Burst, PumpError>> {
    let src: &'a tokio::net::TcpStream = (*src).as_ref();
    let mut moved = 0;
    async move {
        loop {
            let n = match src.try_io(Interest::READABLE, || lease.fill_from(src)) {
                // splice stops at TCP's urgent mark, answering EAGAIN there (or 0 when a FIN
                // follows) with bytes still queued: read past the mark by copying.
                // Boxed: urgent data is rare, and its state would otherwise weigh on every task.
                Ok(0) | Err(_) if at_urgent_mark(src) => {
                    return Box::pin(copy_past_mark(src, dst, flow, park)).await;
                }
                Ok(0) => return Ok(Burst::Eof),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Ok(Burst::splice_drained(moved));
                }
                Err(e) => return Err(PumpError::Read(e)),
            };
            moved += n;
            let in_flight = flow.took(n);
            if write_pipe(&mut lease, dst.as_ref(), flow, park).await? {
                // The rest travels in the pipe.
                return Ok(Burst::Parked(carry_pipe(lease)));
            }
            in_flight.delivered();
            if park.is_requested() {
                return Ok(Burst::Parked(None));
            }
            // A splice that moved less than the pipe holds has usually emptied the socket:
            // asking costs one ioctl, where splicing again costs a splice that answers EAGAIN
            // and the urgent-mark check after it. A socket with bytes left (the pipe ran out
            // of slots, or the splice stopped at the urgent mark) is spliced again.
            if n < lease.capacity() && drained(src) {
                return Ok(Burst::splice_drained(moved));
            }
            tokio::task::consume_budget().await;
        }
    }
}

/// Whether `src` has nothing queued to read (FIONREAD). If so, its readiness is cleared as an
/// EAGAIN would clear it, so the direction waits for the next bytes. An end of stream still
/// shows: a FIN is not counted as a queued byte, but tokio never clears a socket's read-closed
/// readiness, so the next wait returns at once and the next splice reads the end. An urgent
/// byte counts as queued only with SO_OOBINLINE, which both legs have (the route refuses a
/// socket that cannot take it), so a burst stopped at the urgent mark splices again and finds
/// it. When the question cannot be answered, the socket is taken to have bytes left.
fn drained(src: &tokio::net::TcpStream) -> bool {
    src.try_io(Interest::READABLE, || match crate::net::unread_bytes(src) {
        Ok(0) => Err(io::ErrorKind::WouldBlock.into()),
        _ => Ok(()),
    })
    .is_err()
}

/// Copies through a pooled buffer while `src` has data. Reads go through tokio's `AsyncRead`,
/// which takes a short read as proof that the socket is drained (edge-triggered epoll), so an
/// interactive burst costs one read and one write, without a read that only returns EAGAIN.
/// The one short read that proves nothing is one that stopped at TCP's urgent mark; then
/// [`copy_past_mark`] reads on past it.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would keep its arguments twice"
)]
fn copy_burst<'a>(
    src: &'a mut ReadHalf<'_>,
    dst: &'a mut WriteHalf<'_>,
    flow: &'a Flow<'_>,
    park: &'a ParkRequest,
) -> impl Future<Output = Result<Burst, PumpError>> {
    // An async block, not an async fn, for the reason [`pump`] gives.
    async move {
        let mut buf = flow.buffers.take();
        loop {
            // One attempt, never a wait: waiting happens in `pump`, without a buffer held.
            let attempt = std::future::poll_fn(|cx| {
                let mut read = ReadBuf::new(&mut buf);
                match Pin::new(&mut *src).poll_read(cx, &mut read) {
                    Poll::Ready(Ok(())) => Poll::Ready(Some(Ok(read.filled().len()))),
                    Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
                    Poll::Pending => Poll::Ready(None),
                }
            })
            .await;
            let n = match attempt {
                None => return Ok(Burst::Drained),
                Some(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Burst::Drained),
                Some(Ok(0)) => return Ok(Burst::Eof),
                Some(Ok(n)) => n,
                Some(Err(e)) => return Err(PumpError::Read(e)),
            };
            let in_flight = flow.took(n);
            if let Some(carry) = write_all(dst, &buf[..fault_drop_byte(n)], in_flight, flow, park).await? {
                return Ok(Burst::Parked(Some(carry)));
            }
            if park.is_requested() {
                return Ok(Burst::Parked(None));
            }
            if n >= STREAMING_READ && flow.pipes.is_some() {
                return Ok(Burst::Bulk);
            }
            if n < buf.len() {
                if !at_urgent_mark(src.as_ref()) {
                    // A short read drained the socket (tokio cleared its readiness).
                    return Ok(Burst::Drained);
                }
                drop(buf);
                // Boxed: urgent data is rare, and its state would otherwise weigh on every task.
                return Box::pin(copy_past_mark(src.as_ref(), dst, flow, park)).await;
            }
        }
    }
}

/// Reads past TCP's urgent mark, where splice stops and where a read comes back short with
/// bytes still queued: with SO_OOBINLINE a read there returns the urgent byte in line and what
/// follows. tokio's readiness was cleared by the short read or the splice that stopped, so this
/// reads directly, outside it, until the socket is really drained (nothing may be left behind);
/// then the direction goes back to waiting.
async fn copy_past_mark(
    src: &tokio::net::TcpStream,
    dst: &mut WriteHalf<'_>,
    flow: &Flow<'_>,
    park: &ParkRequest,
) -> Result<Burst, PumpError> {
    let mut buf = flow.buffers.take();
    loop {
        let n = match recv_now(src, &mut buf) {
            Ok(0) => return Ok(Burst::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Burst::Drained),
            Err(e) => return Err(PumpError::Read(e)),
        };
        let in_flight = flow.took(n);
        if let Some(carry) = write_all(dst, &buf[..n], in_flight, flow, park).await? {
            return Ok(Burst::Parked(Some(carry)));
        }
        if park.is_requested() {
            return Ok(Burst::Parked(None));
        }
        if n < buf.len() && !at_urgent_mark(src) {
            return Ok(Burst::Drained);
        }
    }
}

/// Writes all of `bytes` (in flight since `in_flight` was taken) to `dst`, and counts them.
/// A park asked for while `dst` is full returns the unwritten rest as a [`Carry::Bytes`] (the
/// written part is counted): nothing to allocate from the kernel, so nothing can refuse it.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would keep its arguments twice"
)]
fn write_all<'a>(
    dst: &'a mut WriteHalf<'_>,
    bytes: &'a [u8],
    in_flight: InFlight<'a>,
    flow: &'a Flow<'_>,
    park: &'a ParkRequest,
) -> impl Future<Output = Result<Option<Box<Carry>>, PumpError>> {
    // An async block, not an async fn, for the reason [`pump`] gives.
    async move {
        let mut written = 0;
        while written < bytes.len() {
            // Partial progress counts: a slow reader is not an idle connection.
            let rest = &bytes[written..];
            let wrote = std::future::poll_fn(|cx| {
                if park.is_requested() {
                    return Poll::Ready(None);
                }
                Pin::new(&mut *dst).poll_write(cx, rest).map(Some)
            })
            .await;
            let Some(wrote) = wrote else {
                return Ok(Some(Box::new(Carry::Bytes(rest.to_vec()))));
            };
            match wrote {
                Ok(0) => return Err(PumpError::Write(io::ErrorKind::WriteZero.into())),
                Ok(m) => {
                    written += m;
                    flow.moved(m, Path::Copy);
                }
                Err(e) => return Err(PumpError::Write(e)),
            }
        }
        in_flight.delivered();
        Ok(None)
    }
}

/// Waits until `socket` is ready for `interest`, or a park is asked for (`None`). The park is
/// checked at every poll without registering a waiter: the connection's task is woken for it
/// once, by the relay loop, so a direction's wait costs no more than tokio's own.
async fn ready_or_park(
    socket: &tokio::net::TcpStream,
    park: &ParkRequest,
    interest: Interest,
) -> Option<io::Result<()>> {
    std::future::poll_fn(|cx| {
        if park.is_requested() {
            return Poll::Ready(None);
        }
        let ready = if interest == Interest::WRITABLE {
            socket.poll_write_ready(cx)
        } else {
            socket.poll_read_ready(cx)
        };
        ready.map(Some)
    })
    .await
}

/// How many of the `n` bytes a copy burst read it writes: all of them, except once when the
/// test suite arms the `drop-byte` fault (see `crate::faults::drop_byte`, built with the test-faults feature), which proves the
/// byte accounting notices a lost byte.
#[inline]
fn fault_drop_byte(n: usize) -> usize {
    #[cfg(feature = "test-faults")]
    if crate::faults::drop_byte() {
        return n.saturating_sub(1);
    }
    n
}

/// One non-blocking read on `src` outside tokio's readiness tracking.
fn recv_now(src: &tokio::net::TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes; the socket is non-blocking.
    let n = unsafe { libc::recv(src.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests;
