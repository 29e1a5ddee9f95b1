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

use std::time::Duration;

use tokio::sync::{mpsc, watch};

/// Handed to each connection task: resolves [`Shutdown::closing_or_parking`] when the daemon
/// gives up waiting and live connections must close now, or must park. Holding one also keeps
/// the daemon's [`Drain::finish`] from returning early, so the task's lifetime is the
/// connection's.
#[derive(Debug, Clone)]
pub struct Shutdown {
    signal: watch::Receiver<Signal>,
    _alive: mpsc::Sender<()>,
}

/// What the daemon asks of its connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Signal {
    /// Carry on.
    Run,
    /// Stop at a clean point and hand yourself over (live upgrade).
    Park,
    /// Close now (the drain timeout ran out).
    Close,
}

impl Shutdown {
    /// Completes when live connections must close (`Close`), or, unless `park_seen`, when they
    /// must park (`Park`): one waiter for both, so a connection's task carries one. Written on
    /// `changed()` rather than `wait_for()`, whose future is 48 bytes larger: every idle
    /// connection's task holds this one.
    pub async fn closing_or_parking(&mut self, park_seen: bool) -> Request {
        loop {
            match *self.signal.borrow_and_update() {
                Signal::Close => return Request::Close,
                Signal::Park if !park_seen => return Request::Park,
                Signal::Park | Signal::Run => {}
            }
            if self.signal.changed().await.is_err() {
                // The daemon dropped the sender: the process is going away.
                return Request::Close;
            }
        }
    }

    /// A receiver for a relayed connection's two directions, which check it between bursts
    /// and at every poll of their socket waits (see [`ParkRequest::is_requested`]).
    pub fn park_request(&self) -> ParkRequest {
        ParkRequest(self.signal.clone())
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
pub struct ParkRequest(watch::Receiver<Signal>);

impl ParkRequest {
    /// Whether a park has been asked for, without waiting: checked between bursts, so a stream
    /// that never waits still parks.
    pub fn is_requested(&self) -> bool {
        *self.0.borrow() == Signal::Park
    }
}

/// Kept by the daemon: hands out [`Shutdown`] values and waits for all of them to be dropped.
#[derive(Debug)]
pub struct Drain {
    signal: watch::Sender<Signal>,
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
        let (signal, _) = watch::channel(Signal::Run);
        let (alive_tx, alive_rx) = mpsc::channel(1);
        Drain {
            signal,
            alive_tx,
            alive_rx,
        }
    }

    /// A handle for one new connection task.
    pub fn handle(&self) -> Shutdown {
        Shutdown {
            signal: self.signal.subscribe(),
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
        let _ = self.signal.send(Signal::Close);
        let _ = tokio::time::timeout(grace, self.alive_rx.recv()).await;
        false
    }

    /// Asks every connection to park and waits up to `timeout` for every handle to be dropped
    /// (each parked connection drops its own). `Err` with the ones still running then: the
    /// daemon counts them and has them closed ([`Stragglers::close`]).
    pub async fn park(mut self, timeout: Duration) -> Result<(), Stragglers> {
        drop(self.alive_tx);
        let _ = self.signal.send(Signal::Park);
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
    signal: watch::Sender<Signal>,
    alive_rx: mpsc::Receiver<()>,
}

impl Stragglers {
    /// Tells them to close (they reset both sides) and waits up to `grace` for them to go.
    pub async fn close(mut self, grace: Duration) {
        let _ = self.signal.send(Signal::Close);
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
        let mut stubborn = drain.handle();
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

    #[tokio::test]
    async fn finish_returns_early_when_idle() {
        let drain = Drain::new();
        let handle = drain.handle();
        drop(handle);
        assert!(drain.finish(Duration::from_secs(10), Duration::ZERO).await);
    }
}
