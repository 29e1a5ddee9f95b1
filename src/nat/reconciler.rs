//! The daemon's NAT loop: apply at start, then compare with the live tables every
//! reconcile_interval and repair drift, reporting through the daemon's state (health reason,
//! counters) and the log.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::watch;

use super::Applied;
use crate::config::Nat;
use crate::health::state::State;

/// The key of NAT's entry in the health endpoint's problems.
pub const PROBLEM: &str = "nat";

/// One reconcile on a blocking thread (it runs iptables), with its outcome reported.
pub async fn reconcile_once(nat: &Nat, state: &State) {
    if !nat.enabled {
        state.set_problem(PROBLEM, None);
        return;
    }
    let wanted = nat.clone();
    let result = tokio::task::spawn_blocking(move || super::reconcile(&wanted)).await;
    match result {
        Ok(Ok(applied)) => {
            match applied {
                Applied::InSync => {}
                Applied::Installed => tracing::info!(sources = ?sources(nat), "NAT rules installed"),
                Applied::Repaired(reason) => {
                    state.nat_repairs.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(drift = %reason, "NAT state had drifted; repaired");
                }
            }
            state.set_problem(PROBLEM, None);
        }
        Ok(Err(e)) => {
            state.nat_failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, "cannot put the NAT rules in place; the relay keeps working");
            state.set_problem(PROBLEM, Some(first_line(&e.0)));
        }
        Err(e) => {
            state.nat_failures.fetch_add(1, Ordering::Relaxed);
            state.set_problem(PROBLEM, Some(format!("reconcile task failed: {e}")));
        }
    }
}

/// Reconciles every `reconcile_interval`, and at once when the configuration changes, until the
/// sender is dropped.
pub async fn run(mut config: watch::Receiver<Nat>, state: Arc<State>) {
    loop {
        let nat = config.borrow_and_update().clone();
        tokio::select! {
            _ = tokio::time::sleep(nat.reconcile_interval) => {}
            changed = config.changed() => if changed.is_err() { return },
        }
        let nat = config.borrow().clone();
        reconcile_once(&nat, &state).await;
    }
}

fn sources(nat: &Nat) -> Vec<String> {
    nat.sources.iter().map(|s| s.to_string()).collect()
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().to_string()
}
