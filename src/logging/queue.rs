//! The bounded queue between the threads that log and the one thread that writes: a relay
//! thread never waits on the journal or on a stderr pipe. When the writer falls behind and the
//! queue is full, lines are dropped and counted; the next line that gets through carries the
//! count, and so does `ferryd_log_lines_dropped_total`.
//!
//! The bound is a count beside an unbounded channel rather than a channel created bounded: a
//! bounded channel allocates and initialises every slot up front (128 KiB for 4096 lines, a
//! twentieth of the daemon's idle RSS), where this one takes memory only while lines wait.

use std::io::Write as _;
use std::os::unix::net::UnixDatagram;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::Duration;

/// Lines that may wait for the writer. About 200 bytes each, so at most about 1 MiB of memory;
/// at a connection's one line, several thousand connections' worth of a journal hiccup.
pub const QUEUE_LINES: usize = 4096;

/// Where journald listens for native-protocol datagrams.
pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// Where the writer thread puts lines.
pub enum Sink {
    /// Standard error (a terminal, a file, or systemd's stream when the journal socket is absent).
    Stderr,
    /// journald's native protocol, one datagram per line, fields and all.
    Journal(UnixDatagram),
}

enum Item {
    /// A line, and how many dropped lines it reports: if it is lost too, they are reported by
    /// the next one.
    Line(Vec<u8>, u64),
    Flush(std::sync::mpsc::Sender<()>),
}

/// The queue and its counters.
pub struct Queue {
    tx: Sender<Item>,
    /// Lines queued and not yet taken by the writer: the bound.
    waiting: AtomicUsize,
    /// Dropped since the last line that got through, for that line to report.
    pending_drops: AtomicU64,
    /// Dropped since start, for metrics.
    dropped: AtomicU64,
}

static QUEUE: OnceLock<Queue> = OnceLock::new();

/// Starts the writer thread for `sink`; later calls keep the first queue.
pub fn start(sink: Sink) -> std::io::Result<()> {
    if QUEUE.get().is_some() {
        return Ok(());
    }
    let (tx, rx) = channel();
    std::thread::Builder::new()
        .name("ferryd-log".into())
        .spawn(move || write_all(rx, sink))?;
    let _ = QUEUE.set(Queue {
        tx,
        waiting: AtomicUsize::new(0),
        pending_drops: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
    });
    Ok(())
}

/// Queues one line built by `build`, which is told how many lines were dropped just before it.
/// Never blocks; without a started queue the line is written to stderr directly.
pub fn submit(build: impl FnOnce(u64) -> Vec<u8>) {
    let Some(queue) = QUEUE.get() else {
        let _ = std::io::stderr().write_all(&build(0));
        return;
    };
    let reserved = queue
        .waiting
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < QUEUE_LINES).then_some(n + 1)
        })
        .is_ok();
    if !reserved {
        queue.pending_drops.fetch_add(1, Ordering::Relaxed);
        queue.dropped.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let before = queue.pending_drops.swap(0, Ordering::Relaxed);
    if queue.tx.send(Item::Line(build(before), before)).is_err() {
        // The writer thread is gone: nothing will take this line or the ones after it.
        queue.waiting.fetch_sub(1, Ordering::AcqRel);
        queue.pending_drops.fetch_add(before + 1, Ordering::Relaxed);
        queue.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

/// Lines dropped since start because the sink did not keep up.
pub fn dropped() -> u64 {
    QUEUE.get().map_or(0, |q| q.dropped.load(Ordering::Relaxed))
}

/// Adds lines a previous program image dropped (a live upgrade carries the count), so
/// `ferryd_log_lines_dropped_total` goes on rather than restarting.
pub fn carry_on_dropped(n: u64) {
    if let Some(queue) = QUEUE.get() {
        queue.dropped.fetch_add(n, Ordering::Relaxed);
    }
}

/// Waits up to `timeout` for every queued line to be written (at exit, so the last lines are
/// not lost with the process).
pub fn flush(timeout: Duration) {
    let Some(queue) = QUEUE.get() else { return };
    let (done_tx, done_rx) = channel();
    if queue.tx.send(Item::Flush(done_tx)).is_ok() {
        let _ = done_rx.recv_timeout(timeout);
    }
}

fn write_all(rx: Receiver<Item>, sink: Sink) {
    let mut stderr = std::io::stderr();
    for item in rx {
        match item {
            Item::Line(bytes, reports) => {
                if let Some(queue) = QUEUE.get() {
                    queue.waiting.fetch_sub(1, Ordering::AcqRel);
                    let written = match &sink {
                        Sink::Stderr => stderr.write_all(&bytes).is_ok(),
                        Sink::Journal(socket) => socket.send_to(&bytes, JOURNAL_SOCKET).is_ok(),
                    };
                    if !written {
                        queue.lost(reports);
                    }
                }
            }
            Item::Flush(done) => {
                let _ = stderr.flush();
                let _ = done.send(());
            }
        }
    }
}

impl Queue {
    /// A queued line could not be written: it counts as dropped, and so do the dropped lines it
    /// was to report, which the next line that gets through reports instead.
    fn lost(&self, reports: u64) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
        self.pending_drops.fetch_add(1 + reports, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_line_hands_on_the_drops_it_reported() {
        let (tx, _rx) = channel();
        let queue = Queue {
            tx,
            waiting: AtomicUsize::new(0),
            pending_drops: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        };
        // A line that reported 5 dropped lines is lost itself: 6 are still to be reported.
        queue.lost(5);
        assert_eq!(queue.pending_drops.load(Ordering::Relaxed), 6);
        assert_eq!(queue.dropped.load(Ordering::Relaxed), 1);
    }
}
