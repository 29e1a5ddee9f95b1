//! One direction of a relayed connection: bytes from `src` to `dst` until `src` ends.
//!
//! This module owns the readiness discipline of the hot path. Every syscall runs inside tokio's
//! `try_io`, so a WouldBlock clears the cached readiness instead of spinning; data is spliced
//! into an empty pipe and the pipe drained completely before the next read, so EAGAIN always has
//! one meaning. A direction starts by copying through a pooled buffer, which is cheapest for the
//! small writes of an interactive session; the first read that brings [`STREAMING_READ`] bytes or
//! more marks it as a bulk stream, and from then on it splices. When no pipe is available, or the
//! kernel refuses splice, it copies, counted and logged. It must not close sockets or decide how
//! a connection ends: it reports end of stream or an error, and the connection decides.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::Interest;
use tokio::net::TcpStream;

use super::buffers::BufferPool;
use super::pipe::{Lease, PipePool};
use crate::logging::RateLimit;
use crate::stats::RelayStats;

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

/// What a pump needs besides its two sockets.
pub struct Flow<'a> {
    /// Where pipes come from; `None` relays by copying only.
    pub pipes: Option<&'a PipePool>,
    /// Where copy buffers come from.
    pub buffers: &'a BufferPool,
    /// Engine-wide counters.
    pub stats: &'a RelayStats,
    /// Bytes moved in this direction on this connection.
    pub bytes: &'a AtomicU64,
    /// Bytes moved in this direction on every connection of the route (kept current for metrics).
    pub total: &'a AtomicU64,
    /// Stamped at every burst, for the idle timeout.
    pub activity: &'a super::Activity,
}

enum Burst {
    /// `src` has nothing more for now; wait for readiness again.
    Drained,
    /// A copy burst read a bulk-sized chunk: switch to splicing (readiness is still set).
    Streaming,
    /// `src` sent its FIN and every byte before it was written to `dst`.
    Eof,
}

static NO_PIPE_LOG: RateLimit = RateLimit::new();

/// Relays `src` → `dst` until end of stream on `src`. Returns once every byte read has been
/// written; the caller then shuts down `dst`'s write side.
pub async fn pump(src: &TcpStream, dst: &TcpStream, flow: Flow<'_>) -> Result<(), PumpError> {
    let mut pipes = flow.pipes;
    let mut streaming = false;
    loop {
        src.readable().await.map_err(PumpError::Read)?;
        let lease = match (streaming, pipes) {
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
        let burst = match lease {
            Some(lease) => match splice_burst(src, dst, lease, &flow).await {
                Err(PumpError::Read(e)) if splice_refused(&e) => {
                    flow.stats.fallback_refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "kernel refused splice on this connection; copying through a buffer instead");
                    pipes = None;
                    copy_burst(src, dst, &flow).await?
                }
                other => other?,
            },
            None => copy_burst(src, dst, &flow).await?,
        };
        match burst {
            Burst::Eof => return Ok(()),
            Burst::Streaming => streaming = true,
            Burst::Drained => {}
        }
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

async fn splice_burst(
    src: &TcpStream,
    dst: &TcpStream,
    mut lease: Lease<'_>,
    flow: &Flow<'_>,
) -> Result<Burst, PumpError> {
    loop {
        let n = match src.try_io(Interest::READABLE, || lease.fill_from(src)) {
            Ok(0) => return Ok(Burst::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Burst::Drained),
            Err(e) => return Err(PumpError::Read(e)),
        };
        while lease.pending() > 0 {
            match dst.try_io(Interest::WRITABLE, || lease.drain_to(dst)) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    dst.writable().await.map_err(PumpError::Write)?
                }
                Err(e) => return Err(PumpError::Write(e)),
            }
        }
        flow.stats.spliced_bytes.fetch_add(n as u64, Ordering::Relaxed);
        flow.account(n);
    }
}

async fn copy_burst(src: &TcpStream, dst: &TcpStream, flow: &Flow<'_>) -> Result<Burst, PumpError> {
    let mut buf = flow.buffers.take();
    loop {
        let n = match src.try_read(&mut buf) {
            Ok(0) => return Ok(Burst::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Burst::Drained),
            Err(e) => return Err(PumpError::Read(e)),
        };
        let mut written = 0;
        while written < n {
            match dst.try_write(&buf[written..n]) {
                Ok(m) => written += m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    dst.writable().await.map_err(PumpError::Write)?
                }
                Err(e) => return Err(PumpError::Write(e)),
            }
        }
        flow.stats.copied_bytes.fetch_add(n as u64, Ordering::Relaxed);
        flow.account(n);
        if n >= STREAMING_READ && flow.pipes.is_some() {
            return Ok(Burst::Streaming);
        }
    }
}

impl Flow<'_> {
    fn account(&self, n: usize) {
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        self.total.fetch_add(n as u64, Ordering::Relaxed);
        self.activity.touch();
    }
}
