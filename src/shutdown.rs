//! Shutdown as a value: the signal that tells live connections to stop, and the tracker that
//! tells the daemon when they have.
//!
//! This module owns the two halves of an orderly stop. [`Shutdown`] is handed to every
//! connection task, which selects on [`Shutdown::closing`] beside its own work; [`Drain`] is kept
//! by the daemon, which waits on it for the connections to finish and fires it when the drain
//! timeout runs out. It must not decide *when* to stop (signals are the daemon's business) nor
//! close listeners (dropping a route's settings sender does that).

use std::time::Duration;

use tokio::sync::{mpsc, watch};

/// Handed to each connection task: resolves [`Shutdown::closing`] when the daemon gives up
/// waiting and live connections must close now. Holding one also keeps the daemon's
/// [`Drain::finish`] from returning early, so the task's lifetime is the connection's.
#[derive(Debug, Clone)]
pub struct Shutdown {
    closing: watch::Receiver<bool>,
    _alive: mpsc::Sender<()>,
}

impl Shutdown {
    /// Completes when live connections must be closed. Never completes while the daemon runs.
    pub async fn closing(&mut self) {
        // An error means the daemon dropped the sender: the process is going away, so close too.
        let _ = self.closing.wait_for(|closing| *closing).await;
    }
}

/// Kept by the daemon: hands out [`Shutdown`] values and waits for all of them to be dropped.
#[derive(Debug)]
pub struct Drain {
    closing: watch::Sender<bool>,
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
        let (closing, _) = watch::channel(false);
        let (alive_tx, alive_rx) = mpsc::channel(1);
        Drain {
            closing,
            alive_tx,
            alive_rx,
        }
    }

    /// A handle for one new connection task.
    pub fn handle(&self) -> Shutdown {
        Shutdown {
            closing: self.closing.subscribe(),
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
        let _ = self.closing.send(true);
        let _ = tokio::time::timeout(grace, self.alive_rx.recv()).await;
        false
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
            stubborn.closing().await;
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
