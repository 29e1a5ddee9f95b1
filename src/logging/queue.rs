//! The bounded queue between the threads that log and the one thread that writes: a relay
//! thread never waits on the journal or on a stderr pipe. When the writer falls behind and the
//! queue is full, lines are dropped and counted; the next line that gets through carries the
//! count, and so does `ferryd_log_lines_dropped_total`.

use std::io::Write as _;
use std::os::unix::net::UnixDatagram;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

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
    Line(Vec<u8>),
    Flush(std::sync::mpsc::Sender<()>),
}

/// The queue and its counters.
pub struct Queue {
    tx: SyncSender<Item>,
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
    let (tx, rx) = sync_channel(QUEUE_LINES);
    std::thread::Builder::new()
        .name("ferryd-log".into())
        .spawn(move || write_all(rx, sink))?;
    let _ = QUEUE.set(Queue {
        tx,
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
    let before = queue.pending_drops.swap(0, Ordering::Relaxed);
    match queue.tx.try_send(Item::Line(build(before))) {
        Ok(()) => {}
        Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
            queue.pending_drops.fetch_add(before + 1, Ordering::Relaxed);
            queue.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Lines dropped since start because the sink did not keep up.
pub fn dropped() -> u64 {
    QUEUE.get().map_or(0, |q| q.dropped.load(Ordering::Relaxed))
}

/// Waits up to `timeout` for every queued line to be written (at exit, so the last lines are
/// not lost with the process).
pub fn flush(timeout: Duration) {
    let Some(queue) = QUEUE.get() else { return };
    let deadline = Instant::now() + timeout;
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let mut item = Item::Flush(done_tx);
    loop {
        match queue.tx.try_send(item) {
            Ok(()) => break,
            Err(TrySendError::Full(back)) if Instant::now() < deadline => {
                item = back;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return,
        }
    }
    let _ = done_rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
}

fn write_all(rx: Receiver<Item>, sink: Sink) {
    let mut stderr = std::io::stderr();
    for item in rx {
        match item {
            Item::Line(bytes) => {
                let written = match &sink {
                    Sink::Stderr => stderr.write_all(&bytes).is_ok(),
                    Sink::Journal(socket) => socket.send_to(&bytes, JOURNAL_SOCKET).is_ok(),
                };
                if !written && let Some(queue) = QUEUE.get() {
                    queue.dropped.fetch_add(1, Ordering::Relaxed);
                    queue.pending_drops.fetch_add(1, Ordering::Relaxed);
                }
            }
            Item::Flush(done) => {
                let _ = stderr.flush();
                let _ = done.send(());
            }
        }
    }
}
