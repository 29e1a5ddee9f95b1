//! The NAT keeper's loop: apply at start, then compare with the live tables every
//! reconcile_interval and repair drift; with NAT off, remove what an earlier configuration left.
//! It reports into the keeper's [`Book`] (NAT's state, counters), which the keeper publishes for
//! the relay (see `report`), and to the log.
//!
//! It runs in the keeper's process, never the relay's: every iptables command it runs is bounded,
//! and its failures are reported as NAT's state, which fails the relay's health probe only when
//! `[health] require_nat` asks for that.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::Applied;
use super::report::Report;
use crate::config::Nat;
use crate::state::NatStatus;

/// What the keeper knows of NAT: its state and counts, written by the reconcile loop and read by
/// the loop that publishes the report.
#[derive(Debug)]
pub struct Book {
    state: Mutex<NatStatus>,
    repairs: AtomicU64,
    failures: AtomicU64,
}

impl Default for Book {
    fn default() -> Self {
        Book {
            state: Mutex::new(NatStatus::Pending),
            repairs: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }
}

impl Book {
    fn nat(&self) -> NatStatus {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_nat(&self, status: NatStatus) -> NatStatus {
        std::mem::replace(&mut *self.state.lock().unwrap_or_else(|p| p.into_inner()), status)
    }

    /// The report to publish, as of now.
    pub fn report(&self) -> Report {
        Report::now(
            self.nat(),
            self.repairs.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
        )
    }
}

/// Reconciles at once, then every `reconcile_interval` and whenever the configuration changes,
/// until the sender is dropped. With NAT off it cleans up once per configuration (start or
/// reload).
pub async fn run(mut config: watch::Receiver<Nat>, state: Arc<Book>) {
    loop {
        let nat = config.borrow_and_update().clone();
        let pause = if nat.enabled {
            enforce(&nat, &state).await;
            Some(nat.reconcile_interval)
        } else {
            clear(&state).await;
            None
        };
        tokio::select! {
            _ = sleep(pause) => {}
            changed = config.changed() => if changed.is_err() { return },
        }
    }
}

async fn sleep(pause: Option<Duration>) {
    match pause {
        Some(pause) => tokio::time::sleep(pause).await,
        None => std::future::pending().await,
    }
}

/// One reconcile on a blocking thread (it runs iptables), with its outcome reported. A failure is
/// logged when it is new or its reason changed, so a persistent one does not flood the journal;
/// the counter and the NAT state carry every occurrence.
async fn enforce(nat: &Nat, state: &Book) {
    if state.nat() == NatStatus::Disabled {
        state.set_nat(NatStatus::Pending);
    }
    let wanted = nat.clone();
    let result = tokio::task::spawn_blocking(move || super::reconcile(&wanted))
        .await
        .unwrap_or_else(|e| Err(super::NatError(format!("the reconcile task failed: {e}"))));
    match result {
        Ok(applied) => {
            let before = state.set_nat(NatStatus::Ok);
            match applied {
                Applied::InSync if matches!(before, NatStatus::Failed(_)) => {
                    tracing::info!("NAT is in place again")
                }
                Applied::InSync => {}
                Applied::Installed => tracing::info!(sources = ?sources(nat), "NAT rules installed"),
                Applied::Repaired(reason) => {
                    state.repairs.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(drift = %reason, "NAT state had drifted; repaired");
                }
            }
        }
        Err(e) => {
            state.failures.fetch_add(1, Ordering::Relaxed);
            let reason = first_line(&e.0);
            let before = state.set_nat(NatStatus::Failed(reason.clone()));
            if before != NatStatus::Failed(reason) {
                tracing::error!(
                    error = %e,
                    retry_in = %humantime::format_duration(nat.reconcile_interval),
                    message_id = crate::logging::ids::NAT_FAILED, "cannot put the NAT rules in place; the relay keeps working and NAT is retried"
                );
            } else {
                tracing::debug!(error = %e, "NAT still failing");
            }
        }
    }
}

/// With NAT off: removes ferryd's rules and restores ip_forward if an earlier configuration left
/// them.
async fn clear(state: &Book) {
    state.set_nat(NatStatus::Disabled);
    let result = tokio::task::spawn_blocking(super::clear)
        .await
        .unwrap_or_else(|e| Err(super::NatError(format!("the clean-up task failed: {e}"))));
    match result {
        Ok(true) => {
            tracing::info!(
                "NAT is off in the configuration: ferryd's rules and chains are removed and ip_forward restored"
            );
        }
        Ok(false) => {}
        Err(e) => {
            state.failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, "NAT is off in the configuration, but ferryd cannot check for or remove rules an earlier configuration left (`ferryd nat down` does it by hand)");
        }
    }
}

fn sources(nat: &Nat) -> Vec<String> {
    nat.sources.iter().map(|s| s.to_string()).collect()
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().to_string()
}
