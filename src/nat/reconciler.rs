//! The daemon's NAT loop: apply at start, then compare with the live tables every
//! reconcile_interval and repair drift; with NAT off, remove what an earlier configuration left.
//! It reports through the daemon's state (NAT status, counters) and the log.
//!
//! It runs beside the relay and never in its way: READY=1 does not wait for it, every iptables
//! command it runs is bounded, and its failures are reported as NAT's state, which fails the
//! health probe only when `[health] require_nat` asks for that.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;

use super::Applied;
use crate::config::Nat;
use crate::state::{NatStatus, State};

/// Reconciles at once, then every `reconcile_interval` and whenever the configuration changes,
/// until the sender is dropped. With NAT off it cleans up once per configuration (start or
/// reload).
pub async fn run(mut config: watch::Receiver<Nat>, state: Arc<State>) {
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
async fn enforce(nat: &Nat, state: &State) {
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
                    state.counters.nat_repairs.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(drift = %reason, "NAT state had drifted; repaired");
                }
            }
        }
        Err(e) => {
            state.counters.nat_failures.fetch_add(1, Ordering::Relaxed);
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
async fn clear(state: &State) {
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
            state.counters.nat_failures.fetch_add(1, Ordering::Relaxed);
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
