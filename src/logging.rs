//! Where log lines go, and how a flood of them is held back.
//!
//! This module owns choosing the sink (journald with structured fields when systemd started us,
//! stderr otherwise) and [`RateLimit`], which keeps a port scan or a misbehaving client from
//! filling the journal. It must not decide what is worth logging: callers do that.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::level_filters::LevelFilter;
use tracing_subscriber::prelude::*;

/// The environment variable that sets the log level (error, warn, info, debug, trace).
pub const LEVEL_ENV: &str = "FERRYD_LOG";

/// Journal fields are named FERRYD_ROUTE=, FERRYD_CLIENT=, FERRYD_END=, ... so that
/// `journalctl FERRYD_END=denied` finds what an operator is after without clashing with
/// journald's own fields.
pub const JOURNAL_FIELD_PREFIX: &str = "FERRYD";

/// Installs the global subscriber. Under systemd (JOURNAL_STREAM is set) lines go to journald
/// with their fields as journal fields (FERRYD_ROUTE=, ...); if the journal socket cannot be
/// opened, or outside systemd, they go to stderr.
pub fn init() {
    let level = std::env::var(LEVEL_ENV)
        .ok()
        .and_then(|v| v.parse::<LevelFilter>().ok())
        .unwrap_or(LevelFilter::INFO);
    let journald = if std::env::var_os("JOURNAL_STREAM").is_some() {
        tracing_journald::layer().ok().map(|layer| {
            layer
                .with_syslog_identifier("ferryd".to_string())
                .with_field_prefix(Some(JOURNAL_FIELD_PREFIX.to_string()))
        })
    } else {
        None
    };
    let stderr = match journald {
        Some(_) => None,
        None => Some(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false)
                .with_ansi(false),
        ),
    };
    let _ = tracing_subscriber::registry()
        .with(level)
        .with(journald)
        .with(stderr)
        .try_init();
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
