//! Where log lines go, how they get there without ever holding up the relay, and how a flood of
//! them is held back.
//!
//! This module owns choosing the sink (journald's native protocol with structured fields when
//! systemd started us, stderr otherwise), the bounded queue and writer thread between the
//! threads that log and that sink ([`queue`]), and [`RateLimit`], which keeps a port scan or a
//! misbehaving client from filling the journal. It must not decide what is worth logging:
//! callers do that.

pub mod ids;
mod journal;
pub mod queue;

use std::io;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::level_filters::LevelFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::prelude::*;

pub use queue::{carry_on_dropped, dropped, flush};

/// The environment variable that sets the log level (error, warn, info, debug, trace).
pub const LEVEL_ENV: &str = "FERRYD_LOG";

/// Journal fields are named FERRYD_ROUTE=, FERRYD_CLIENT=, FERRYD_END=, ... so that
/// `journalctl FERRYD_END=denied` finds what an operator is after without clashing with
/// journald's own fields.
pub const JOURNAL_FIELD_PREFIX: &str = "FERRYD";

/// The field that reports, on the first line to get through, how many lines before it were
/// dropped because the sink did not keep up.
pub const DROPPED_FIELD: &str = "log_lines_dropped";

/// Installs the global subscriber and starts the writer thread. Under systemd (JOURNAL_STREAM is
/// set and the journal's socket exists) lines go to journald with their fields as journal fields
/// (FERRYD_ROUTE=, ...); otherwise to stderr, one text line each.
pub fn init() {
    let level = std::env::var(LEVEL_ENV)
        .ok()
        .and_then(|v| v.parse::<LevelFilter>().ok())
        .unwrap_or(LevelFilter::INFO);
    let journal = std::env::var_os("JOURNAL_STREAM")
        .is_some()
        .then(|| std::os::unix::net::UnixDatagram::unbound().ok())
        .flatten()
        .filter(|_| std::path::Path::new(queue::JOURNAL_SOCKET).exists());
    let (sink, journald, stderr) = match journal {
        Some(socket) => (
            queue::Sink::Journal(socket),
            Some(journal::JournalLayer::new("ferryd")),
            None,
        ),
        None => (
            queue::Sink::Stderr,
            None,
            Some(
                tracing_subscriber::fmt::layer()
                    .with_writer(QueuedLines)
                    .with_target(false)
                    .with_ansi(false),
            ),
        ),
    };
    if let Err(e) = queue::start(sink) {
        // Without the writer thread, lines are written directly (and may block): say so.
        eprintln!("ferryd: cannot start the log writer thread: {e}");
    }
    let _ = tracing_subscriber::registry()
        .with(level)
        .with(journald)
        .with(stderr)
        .try_init();
}

/// Gives the text formatter a buffer per line; the line is queued when the buffer is dropped.
struct QueuedLines;

impl<'a> MakeWriter<'a> for QueuedLines {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line(Vec::with_capacity(256))
    }
}

/// One formatted line on its way to the queue.
struct Line(Vec<u8>);

impl io::Write for Line {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        let mut line = std::mem::take(&mut self.0);
        if line.is_empty() {
            return;
        }
        queue::submit(|dropped| {
            if dropped > 0 {
                let end = line.len() - usize::from(line.ends_with(b"\n"));
                let note = format!(" {DROPPED_FIELD}={dropped}");
                line.splice(end..end, note.bytes());
            }
            line
        });
    }
}

/// Lines let through per window before the rest are counted instead of written.
const BURST: u32 = 10;
/// Length of a rate-limit window. Ten lines every ten seconds is enough to see what is happening
/// and to diagnose it; a scan of 60,000 ports then costs the journal about one line a second.
const WINDOW: Duration = Duration::from_secs(10);

/// Lets up to `burst` events per window through and counts the rest, so the next line that is
/// written can say how many were suppressed.
#[derive(Debug)]
pub struct RateLimit {
    burst: u32,
    window: Duration,
    state: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    started: Option<Instant>,
    written: u32,
    suppressed: u64,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

impl RateLimit {
    /// A limiter of [`BURST`] lines per [`WINDOW`], for events that come in floods (denied
    /// sources, accept errors). Its first window starts with the first event.
    pub const fn new() -> Self {
        Self::with(BURST, WINDOW)
    }

    /// A limiter of `burst` lines per `window`, for steady events such as health probes, where
    /// one line a minute shows they arrive without drowning everything else.
    pub const fn with(burst: u32, window: Duration) -> Self {
        RateLimit {
            burst,
            window,
            state: Mutex::new(Window {
                started: None,
                written: 0,
                suppressed: 0,
            }),
        }
    }

    /// `Some(n)` when this event should be logged, where `n` events were suppressed since the
    /// last one that was; `None` when it should be suppressed (and is counted).
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut w = match self.state.lock() {
            Ok(w) => w,
            Err(poisoned) => poisoned.into_inner(),
        };
        if w.started.is_none_or(|s| now.duration_since(s) >= self.window) {
            w.started = Some(now);
            w.written = 0;
        }
        if w.written < self.burst {
            w.written += 1;
            Some(std::mem::take(&mut w.suppressed))
        } else {
            w.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_suppress_then_report() {
        let limit = RateLimit::new();
        let t0 = Instant::now();
        for _ in 0..BURST {
            assert_eq!(limit.admit_at(t0), Some(0));
        }
        for _ in 0..500 {
            assert_eq!(limit.admit_at(t0 + Duration::from_secs(1)), None);
        }
        assert_eq!(limit.admit_at(t0 + WINDOW), Some(500));
        assert_eq!(limit.admit_at(t0 + WINDOW), Some(0));
    }
}
