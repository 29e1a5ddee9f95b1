//! The connection table: every relayed connection while it lives, as the relay sees it.
//!
//! This module owns what a relayed connection shares with the rest of the daemon while it runs
//! ([`Live`]): who it is, each direction's byte counts (read from its source and written to its
//! destination, so the bytes a direction holds are their difference, and an orderly end proves
//! nothing was lost), each direction's state and mode, the connection's clocks, and the request
//! to end it on purpose. The relay writes these (each field has one writer, its direction's
//! pump or the connection's loop) and the health endpoint (`/connections`, `/status`) and the
//! control socket read them. It must not decide anything about a connection: the relay decides how it ends,
//! the route who it is, the control socket who may close it.
//!
//! A connection is in the [`Table`] from its first relayed byte (after admission, the PROXY
//! header and the dial) until its task ends, closed or parked for a live upgrade; one still
//! dialling is counted by its route's `live` gauge, not listed here.

pub mod view;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::time::Instant;

pub use view::ConnectionView;

/// Who a relayed connection is: what the listing and every log line about it say.
#[derive(Clone, Debug)]
pub struct Who {
    /// Its id: unique for the daemon's life, live upgrades included (`conn=` in the log).
    pub id: u64,
    /// The route it was accepted on.
    pub route: Arc<str>,
    /// The TCP peer (the balancer's address with Private Link).
    pub client: SocketAddr,
    /// The client its PROXY v2 header named, if any.
    pub proxied_client: Option<SocketAddr>,
    /// The LinkID its PROXY v2 header named, if any.
    pub link_id: Option<u32>,
    /// The upstream address it was dialled at.
    pub upstream: SocketAddr,
}

/// Where one direction of a connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum DirectionState {
    /// Relaying (or waiting for its source): shown as `open`.
    Running = 0,
    /// Its source's end of stream was passed on, nothing more flows this way: shown as
    /// `half-closed` (the connection is, that way).
    Ended = 1,
    /// Stopped where it stood for a live upgrade.
    Parked = 2,
}

impl DirectionState {
    /// Its name in `/connections` and `ferryd connections`.
    pub const fn name(self) -> &'static str {
        match self {
            DirectionState::Running => "open",
            DirectionState::Ended => "half-closed",
            DirectionState::Parked => "parked",
        }
    }

    fn from_u8(n: u8) -> Self {
        match n {
            1 => DirectionState::Ended,
            2 => DirectionState::Parked,
            _ => DirectionState::Running,
        }
    }
}

/// One direction of a relayed connection: its byte counts, state and mode.
///
/// Each counter has a single writer (the direction's pump), so it is advanced with a load and a
/// store rather than a locked add: readers may see a value one burst old, never a torn one.
#[derive(Debug, Default)]
pub struct Direction {
    read: AtomicU64,
    written: AtomicU64,
    state: AtomicU8,
    splicing: AtomicU8,
}

impl Direction {
    /// A direction that has read `read` bytes and written `written` (a new one: both zero; one
    /// moved by a live upgrade: what it had written, plus what it carries).
    pub fn new(read: u64, written: u64, state: DirectionState) -> Self {
        Direction {
            read: AtomicU64::new(read),
            written: AtomicU64::new(written),
            state: AtomicU8::new(state as u8),
            splicing: AtomicU8::new(0),
        }
    }

    /// `n` more bytes were read from the source (into a pipe or a buffer).
    pub fn read(&self, n: usize) {
        let now = self.read.load(Ordering::Relaxed);
        self.read.store(now + n as u64, Ordering::Relaxed);
    }

    /// `n` more bytes were written to the destination.
    pub fn wrote(&self, n: usize) {
        let now = self.written.load(Ordering::Relaxed);
        self.written.store(now + n as u64, Ordering::Relaxed);
    }

    /// Bytes read from the source so far.
    pub fn bytes_read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    /// Bytes written to the destination so far.
    pub fn bytes_written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Bytes read and not yet written: in the direction's pipe or buffer.
    pub fn held(&self) -> u64 {
        self.bytes_read().saturating_sub(self.bytes_written())
    }

    /// Notes whether the current burst splices or copies.
    pub fn set_splicing(&self, splicing: bool) {
        self.splicing.store(splicing as u8, Ordering::Relaxed);
    }

    /// Whether the latest burst spliced.
    pub fn splicing(&self) -> bool {
        self.splicing.load(Ordering::Relaxed) != 0
    }

    /// Notes where the direction stands.
    pub fn set_state(&self, state: DirectionState) {
        self.state.store(state as u8, Ordering::Relaxed);
    }

    /// Where the direction stands.
    pub fn state(&self) -> DirectionState {
        DirectionState::from_u8(self.state.load(Ordering::Relaxed))
    }
}

/// A connection's clocks: when it started and when a byte last moved, in milliseconds since it
/// started (one relaxed store per burst), and whether bytes are between a read and a write.
#[derive(Debug)]
pub struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    /// Bursts that have read bytes not yet written out. If a timer ends the connection while
    /// one is open, those bytes are lost, so the peers get a reset rather than a clean FIN.
    in_flight: AtomicU8,
    /// The silence that ends the connection now (idle_timeout, or fin_timeout once half-closed),
    /// in milliseconds; `u64::MAX` for none. Kept by the connection's loop for the listing.
    limit_ms: AtomicU64,
}

impl Activity {
    /// The clocks of a connection `age` old whose last byte moved `quiet` ago (both zero for a
    /// new one): a connection moved by a live upgrade keeps its deadlines.
    pub fn since(age: Duration, quiet: Duration) -> Self {
        let now = Instant::now();
        let start = now.checked_sub(age).unwrap_or(now);
        let last = age.saturating_sub(quiet);
        Activity {
            start,
            last_ms: AtomicU64::new(last.as_millis() as u64),
            in_flight: AtomicU8::new(0),
            limit_ms: AtomicU64::new(u64::MAX),
        }
    }

    /// A byte moved now.
    pub fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// When a byte last moved.
    pub fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// Time since the connection started.
    pub fn age(&self) -> Duration {
        self.start.elapsed()
    }

    /// A burst read bytes it has not written yet.
    pub fn carrying(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// The burst wrote everything it read.
    pub fn delivered(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Whether a burst is between its read and its last write.
    pub fn bytes_in_flight(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) > 0
    }

    /// Notes the silence that ends the connection now (`None`: none does).
    pub fn set_limit(&self, limit: Option<Duration>) {
        let ms = limit.map_or(u64::MAX, |l| u64::try_from(l.as_millis()).unwrap_or(u64::MAX));
        self.limit_ms.store(ms, Ordering::Relaxed);
    }

    /// Time until the silence limit ends the connection, if one will.
    pub fn until_deadline(&self) -> Option<Duration> {
        let ms = self.limit_ms.load(Ordering::Relaxed);
        if ms == u64::MAX {
            return None;
        }
        let deadline = self.last().checked_add(Duration::from_millis(ms))?;
        Some(deadline.saturating_duration_since(Instant::now()))
    }
}

/// A relayed connection while it runs: shared by its task (which writes it) and the table (which
/// lists it and carries requests to end it).
#[derive(Debug)]
pub struct Live {
    /// Who it is.
    pub who: Who,
    /// Client → upstream.
    pub up: Direction,
    /// Upstream → client.
    pub down: Direction,
    /// Its clocks.
    pub activity: Activity,
    /// The request to end it on purpose, and its loop's waker while none has come.
    close: Mutex<CloseRequest>,
}

/// Who asked to end a connection, once someone has, and the task to wake when they do.
///
/// Not a `tokio::sync::Notify` with a `OnceLock` for the name: those are 64 bytes of every
/// connection's record and a waiter of 64 more in its task, for a request most connections
/// never get. This is 40 bytes here and a pointer in the task ([`CloseRequested`]).
#[derive(Debug, Default)]
struct CloseRequest {
    /// Who asked, for the log line; set once.
    by: Option<Box<str>>,
    /// The connection's loop, while it waits.
    waker: Option<Waker>,
}

impl Live {
    /// A connection's shared state, from its directions and clocks as they stand.
    pub fn new(who: Who, up: Direction, down: Direction, activity: Activity) -> Self {
        Live {
            who,
            up,
            down,
            activity,
            close: Mutex::new(CloseRequest::default()),
        }
    }

    /// Asks the connection to end now, both sides reset, on behalf of `by` (who asked, for the
    /// log). A second request changes nothing.
    pub fn close(&self, by: String) {
        let waker = {
            let mut request = self.close.lock().unwrap_or_else(PoisonError::into_inner);
            if request.by.is_some() {
                return;
            }
            request.by = Some(by.into_boxed_str());
            request.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Completes, with who asked, once someone asked to end the connection (at once if they
    /// already have). The relay loop holds it for the connection's life.
    pub fn close_requested(&self) -> CloseRequested<'_> {
        CloseRequested(self)
    }
}

/// The relay loop's wait for a request to end its connection ([`Live::close_requested`]).
#[derive(Debug)]
pub struct CloseRequested<'a>(&'a Live);

impl Future for CloseRequested<'_> {
    type Output = Box<str>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Box<str>> {
        let mut request = self.0.close.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(by) = &request.by {
            return Poll::Ready(by.clone());
        }
        match &mut request.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            slot => *slot = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

/// Every relayed connection of the daemon, by id.
#[derive(Debug, Default)]
pub struct Table {
    live: Mutex<HashMap<u64, Arc<Live>>>,
}

/// A connection's place in the [`Table`]: it leaves the table when this is dropped, however its
/// task ends.
#[derive(Debug)]
pub struct Entry<'a> {
    table: &'a Table,
    id: u64,
}

impl Drop for Entry<'_> {
    fn drop(&mut self) {
        if let Ok(mut live) = self.table.live.lock() {
            live.remove(&self.id);
        }
    }
}

impl Table {
    /// Lists `live` until the returned entry is dropped.
    pub fn enter(&self, live: Arc<Live>) -> Entry<'_> {
        let id = live.who.id;
        if let Ok(mut table) = self.live.lock() {
            table.insert(id, live);
        }
        Entry { table: self, id }
    }

    /// Every listed connection, oldest first. The lock is held only to copy the pointers out:
    /// reading each connection's state happens after, so a listing never holds up a connection
    /// that starts or ends.
    pub fn snapshot(&self) -> Vec<Arc<Live>> {
        let mut all: Vec<Arc<Live>> = match self.live.lock() {
            Ok(table) => table.values().cloned().collect(),
            Err(_) => Vec::new(),
        };
        all.sort_by_key(|live| (live.activity.start, live.who.id));
        all
    }

    /// The connection with id `id`, if it is listed.
    pub fn get(&self, id: u64) -> Option<Arc<Live>> {
        self.live.lock().ok()?.get(&id).cloned()
    }

    /// How many connections are listed.
    pub fn len(&self) -> usize {
        self.live.lock().map_or(0, |t| t.len())
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};
    use std::time::Duration;

    use super::*;

    fn live() -> Arc<Live> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 22));
        let who = Who {
            id: 7,
            route: "ssh".into(),
            client: addr,
            proxied_client: None,
            link_id: None,
            upstream: addr,
        };
        let open = || Direction::new(0, 0, DirectionState::Running);
        Arc::new(Live::new(
            who,
            open(),
            open(),
            Activity::since(Duration::ZERO, Duration::ZERO),
        ))
    }

    /// The relay loop's waiter is woken by a request that comes while it waits, gets the first
    /// asker's name, and a request made before it waits is not missed.
    #[tokio::test]
    async fn a_close_request_wakes_the_waiting_loop_once_with_the_first_asker() {
        let live = live();
        let waiting = tokio::spawn({
            let live = live.clone();
            async move { live.close_requested().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        // It waits with its waker stored: the request below is the wake-up path, not the
        // "asked already" one.
        assert!(live.close.lock().unwrap().waker.is_some());
        live.close("root (uid 0)".to_owned());
        live.close("someone else".to_owned());
        let by = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert_eq!(&*by.unwrap().unwrap(), "root (uid 0)");
        // Asked already: the next wait completes at once.
        assert_eq!(&*live.close_requested().await, "root (uid 0)");
    }
}
