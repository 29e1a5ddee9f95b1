//! Shutdown as a value: the signal that tells live connections to stop, and the tracker that
//! tells the daemon when they have.
//!
//! This module owns the two halves of an orderly stop. [`Shutdown`] is handed to every
//! connection task, which selects on [`Shutdown::closing_or_parking`] beside its own work;
//! [`Drain`] is kept by the daemon, which waits on it for the connections to finish and fires it
//! when the drain timeout runs out. It must not decide *when* to stop (signals are the daemon's
//! business) nor close listeners (dropping a route's settings sender does that).
//!
//! A live upgrade uses the same signal with a second meaning: [`Drain::park`] asks each
//! connection to stop where it stands, whatever phase it is in, and hand itself to the daemon,
//! which passes it on to the next program image (the live upgrade).

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};

/// How many wait lists the handles' waiters are spread over. A waiting task takes its list's
/// lock each time it is woken (tokio's `Notify` checks its waiter under it), and every relayed
/// connection waits on this signal for its whole life: with one list, every burst on every
/// worker thread would contend for one lock. Tokio's own watch channel spreads its waiters over
/// 8 too (at random per wait; here each handle keeps the list it was given, in turn).
const WAIT_LISTS: usize = 8;

/// The signal every handle watches: what is asked, and where its waiters wait.
///
/// Not a `tokio::sync::watch` channel: a waiter on one (`changed()`) is 120 bytes, and an idle
/// connection's task holds one for its life; a waiter on a `Notify` is 64, and the value
/// itself is one atomic byte, read between bursts without a lock.
#[derive(Debug)]
struct Shared {
    /// The current [`Signal`], as its `u8`.
    signal: AtomicU8,
    /// Woken, all of them, at every change.
    lists: [Notify; WAIT_LISTS],
    /// Which list the next handle waits on.
    next_list: AtomicUsize,
}

impl Shared {
    fn signal(&self) -> Signal {
        match self.signal.load(Ordering::SeqCst) {
            0 => Signal::Run,
            1 => Signal::Park,
            _ => Signal::Close,
        }
    }
}

/// The daemon's end of the signal. Dropping it tells every handle to close, as a closed
/// channel would: a handle must never wait on a signal nobody can send any more.
#[derive(Debug)]
struct Sender(Arc<Shared>);

impl Sender {
    fn new() -> Self {
        Sender(Arc::new(Shared {
            signal: AtomicU8::new(Signal::Run as u8),
            lists: Default::default(),
            next_list: AtomicUsize::new(0),
        }))
    }

    /// Sets the signal, then wakes every waiter. None is lost: a waiter counts the wake-ups of
    /// its list when it is made, before it reads the signal, and completes at its first poll if
    /// that count has moved; `notify_waiters` moves it after the store (a release that the
    /// waiter's count read acquires), so a waiter that missed the wake-up reads the new signal.
    fn send(&self, signal: Signal) {
        self.0.signal.store(signal as u8, Ordering::SeqCst);
        for list in &self.0.lists {
            list.notify_waiters();
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        // The daemon let go of the signal: the process is going away.
        if self.0.signal() != Signal::Close {
            self.send(Signal::Close);
        }
    }
}

/// Handed to each connection task: resolves [`Shutdown::closing_or_parking`] when the daemon
/// gives up waiting and live connections must close now, or must park. Holding one also keeps
/// the daemon's [`Drain::finish`] from returning early, so the task's lifetime is the
/// connection's.
#[derive(Debug, Clone)]
pub struct Shutdown {
    shared: Arc<Shared>,
    /// The wait list this handle's waiters use.
    list: u8,
    _alive: mpsc::Sender<()>,
}

/// What the daemon asks of its connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Signal {
    /// Carry on.
    Run = 0,
    /// Stop at a clean point and hand yourself over (live upgrade).
    Park = 1,
    /// Close now (the drain timeout ran out).
    Close = 2,
}

impl Shutdown {
    /// Completes when live connections must close (`Close`), or, unless `park_seen`, when they
    /// must park (`Park`): one waiter for both, so a connection's task carries one. The future
    /// itself, not an async fn around it: every idle connection's task holds it.
    pub fn closing_or_parking(&self, park_seen: bool) -> impl Future<Output = Request> + '_ {
        let shared = &*self.shared;
        let list = &shared.lists[usize::from(self.list)];
        async move {
            loop {
                // Made before the signal is read, so a change after the read wakes it.
                let changed = list.notified();
                match shared.signal() {
                    Signal::Close => return Request::Close,
                    Signal::Park if !park_seen => return Request::Park,
                    Signal::Park | Signal::Run => {}
                }
                changed.await;
            }
        }
    }

    /// A receiver for a relayed connection's two directions, which check it between bursts
    /// and at every poll of their socket waits (see [`ParkRequest::is_requested`]).
    pub fn park_request(&self) -> ParkRequest {
        ParkRequest(self.shared.clone())
    }
}

/// What [`Shutdown::closing_or_parking`] saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Close now.
    Close,
    /// Park for a live upgrade.
    Park,
}

/// The park request as one direction of a connection sees it.
#[derive(Debug)]
pub struct ParkRequest(Arc<Shared>);

impl ParkRequest {
    /// Whether a park has been asked for, without waiting: checked between bursts, so a stream
    /// that never waits still parks. False again once the daemon asks for a close, or lets go
    /// of the signal.
    pub fn is_requested(&self) -> bool {
        self.0.signal() == Signal::Park
    }
}

/// Kept by the daemon: hands out [`Shutdown`] values and waits for all of them to be dropped.
#[derive(Debug)]
pub struct Drain {
    signal: Sender,
    alive_tx: mpsc::Sender<()>,
    alive_rx: mpsc::Receiver<()>,
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl Drain {
    /// A drain with no connections yet.
    pub fn new() -> Self {
        let (alive_tx, alive_rx) = mpsc::channel(1);
        Drain {
            signal: Sender::new(),
            alive_tx,
            alive_rx,
        }
    }

    /// A handle for one new connection task.
    pub fn handle(&self) -> Shutdown {
        let shared = &self.signal.0;
        let list = shared.next_list.fetch_add(1, Ordering::Relaxed) % WAIT_LISTS;
        Shutdown {
            shared: shared.clone(),
            list: list as u8,
            _alive: self.alive_tx.clone(),
        }
    }

    /// Waits up to `timeout` for every handle to be dropped; on timeout tells the remaining
    /// connections to close and waits up to `grace` more for them to log and go. Returns whether
    /// everything finished on its own.
    pub async fn finish(mut self, timeout: Duration, grace: Duration) -> bool {
        // Only handles held by tasks may keep the channel open.
        drop(self.alive_tx);
        if tokio::time::timeout(timeout, self.alive_rx.recv()).await.is_ok() {
            return true;
        }
        self.signal.send(Signal::Close);
        let _ = tokio::time::timeout(grace, self.alive_rx.recv()).await;
        false
    }

    /// Asks every connection to park and waits up to `timeout` for every handle to be dropped
    /// (each parked connection drops its own). `Err` with the ones still running then: the
    /// daemon counts them and has them closed ([`Stragglers::close`]).
    pub async fn park(mut self, timeout: Duration) -> Result<(), Stragglers> {
        drop(self.alive_tx);
        self.signal.send(Signal::Park);
        if tokio::time::timeout(timeout, self.alive_rx.recv()).await.is_ok() {
            return Ok(());
        }
        Err(Stragglers {
            signal: self.signal,
            alive_rx: self.alive_rx,
        })
    }
}

/// Connections that did not park in time.
#[derive(Debug)]
pub struct Stragglers {
    signal: Sender,
    alive_rx: mpsc::Receiver<()>,
}

impl Stragglers {
    /// Tells them to close (they reset both sides) and waits up to `grace` for them to go.
    pub async fn close(mut self, grace: Duration) {
        self.signal.send(Signal::Close);
        let _ = tokio::time::timeout(grace, self.alive_rx.recv()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn finish_waits_for_handles_then_forces_the_rest() {
        let drain = Drain::new();
        let quick = drain.handle();
        let stubborn = drain.handle();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(quick);
        });
        let forced = tokio::spawn(async move {
            stubborn.closing_or_parking(true).await;
        });
        let all_on_their_own = drain
            .finish(Duration::from_millis(100), Duration::from_secs(1))
            .await;
        assert!(!all_on_their_own);
        forced.await.unwrap();
    }

    /// Every waiting handle, whichever wait list it is on, sees a park; one that has seen it
    /// waits on for the close, and sees that too.
    #[tokio::test]
    async fn every_waiter_sees_a_park_then_a_close() {
        let drain = Drain::new();
        let handles: Vec<Shutdown> = (0..3 * WAIT_LISTS).map(|_| drain.handle()).collect();
        let park = handles[0].park_request();
        assert!(!park.is_requested());
        let waiting: Vec<_> = handles
            .into_iter()
            .map(|handle| {
                tokio::spawn(async move {
                    let first = handle.closing_or_parking(false).await;
                    let second = handle.closing_or_parking(true).await;
                    (first, second)
                })
            })
            .collect();
        // Let every task register its waiter before the signal changes (on this one-thread test
        // runtime the yield runs each spawned task to its wait), so the park below takes the
        // wake-up path, not the "asked already" one.
        tokio::task::yield_now().await;
        assert!(waiting.iter().all(|task| !task.is_finished()));
        let parking = tokio::spawn(drain.park(Duration::from_millis(200)));
        let stragglers = parking.await.unwrap().expect_err("the handles are still held");
        assert!(park.is_requested());
        stragglers.close(Duration::from_secs(5)).await;
        assert!(!park.is_requested());
        for task in waiting {
            let seen = tokio::time::timeout(Duration::from_secs(5), task).await;
            assert_eq!(seen.unwrap().unwrap(), (Request::Park, Request::Close));
        }
    }

    /// A handle whose daemon let go of the signal closes rather than waiting forever.
    #[tokio::test]
    async fn a_dropped_drain_closes_its_handles() {
        let drain = Drain::new();
        let handle = drain.handle();
        let waiting = tokio::spawn(async move { handle.closing_or_parking(false).await });
        tokio::task::yield_now().await;
        drop(drain);
        let seen = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert_eq!(seen.unwrap().unwrap(), Request::Close);
    }

    #[tokio::test]
    async fn finish_returns_early_when_idle() {
        let drain = Drain::new();
        let handle = drain.handle();
        drop(handle);
        assert!(drain.finish(Duration::from_secs(10), Duration::ZERO).await);
    }
}
