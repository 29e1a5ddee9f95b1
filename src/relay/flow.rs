//! The bookkeeping of one direction, in one place: what a pump needs besides its sockets
//! ([`Flow`]), and the one call per event that keeps every count (the direction's, for the
//! listing and the byte accounting; the route's, for metrics; the engine's, by path; the idle
//! clock) and the bytes-in-flight mark consistent. It must not move bytes.

use std::sync::atomic::{AtomicU64, Ordering};

use super::buffers::BufferPool;
use super::pipe::PipePool;
use crate::connections::{Activity, Direction};
use crate::state::RelayStats;

/// What a pump needs besides its two sockets.
pub struct Flow<'a> {
    /// Where pipes come from; `None` relays by copying only.
    pub pipes: Option<&'a PipePool>,
    /// Where copy buffers come from.
    pub buffers: &'a BufferPool,
    /// Engine-wide counters.
    pub stats: &'a RelayStats,
    /// This direction of this connection: bytes read and written, state and mode.
    pub direction: &'a Direction,
    /// Bytes moved in this direction on every connection of the route (kept current for metrics).
    pub total: &'a AtomicU64,
    /// Stamped at every burst, for the idle timeout.
    pub activity: &'a Activity,
}

/// How a burst moved bytes: which engine counter they go to.
#[derive(Clone, Copy, Debug)]
pub enum Path {
    /// Through a pipe, with splice.
    Splice,
    /// Through a pooled buffer, with recv and send.
    Copy,
}

impl Flow<'_> {
    /// `n` bytes were read from `src`: they are in flight until written.
    pub fn took(&self, n: usize) -> InFlight<'_> {
        self.direction.read(n);
        self.carried()
    }

    /// Bytes a previous program image read are in flight here until written.
    pub fn carried(&self) -> InFlight<'_> {
        self.activity.carrying();
        InFlight(self.activity)
    }

    /// `n` bytes were written to `dst` by `path`: counted once for the direction (listing and
    /// accounting), the route (metrics), the engine (splice or copy) and the idle clock.
    pub fn moved(&self, n: usize, path: Path) {
        let engine = match path {
            Path::Splice => &self.stats.spliced_bytes,
            Path::Copy => &self.stats.copied_bytes,
        };
        engine.fetch_add(n as u64, Ordering::Relaxed);
        self.direction.wrote(n);
        self.total.fetch_add(n as u64, Ordering::Relaxed);
        self.activity.touch();
    }
}

/// Bytes read and not yet all written, from [`Flow::took`] (or [`Flow::carried`]) until
/// [`InFlight::delivered`]: a timer that ends the connection meanwhile resets it rather than
/// passing on a FIN a peer could take for a complete stream. Deliberately not undone on drop: a
/// burst dropped half-way (the connection ends while `dst` is full), failed or parked still had
/// bytes in flight, and the connection's close must see them.
#[must_use = "bytes stay in flight until delivered() is called"]
pub struct InFlight<'a>(&'a Activity);

impl InFlight<'_> {
    /// Every byte it stood for was written.
    pub fn delivered(self) {
        self.0.delivered();
    }
}
