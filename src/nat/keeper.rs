//! `ferryd nat run`: the NAT keeper, the one process that holds CAP_NET_ADMIN and CAP_NET_RAW.
//! It keeps the rules (the reconcile loop, see `reconciler`) and publishes NAT's state for the
//! relay (see `report`); SIGHUP reloads the configuration, SIGTERM stops it with the rules left
//! in place (the build VM keeps its way out while the keeper restarts; `ferryd nat down` or the
//! package's removal take them away).
//!
//! It reads nothing from the network: no listening socket, no connection, no parser of anything
//! a remote peer sends. The relay, which does all of that, holds no privilege at all; the two
//! share only the configuration file and the report.

use std::ffi::OsString;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::watch;

use super::reconciler::{self, Book};
use super::report;
use crate::config::Config;
use crate::signals::{Sig, Signals};
use crate::systemd::notify::{self, Notifier};

/// Runs the keeper on the configuration at `path` until SIGTERM or SIGINT. `notify_socket` is
/// systemd's NOTIFY_SOCKET, taken out of the environment before any thread started.
pub fn run(path: &Path, notify_socket: Option<OsString>) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(keep(path, config, Notifier::from_var(notify_socket)))
}

async fn keep(path: &Path, config: Config, notifier: Notifier) -> anyhow::Result<()> {
    let mut signals = Signals::open().context("cannot read signals (signalfd)")?;
    let book = Arc::new(Book::default());
    let (nat, nat_rx) = watch::channel(config.nat.clone());
    tokio::spawn(reconciler::run(nat_rx, book.clone()));
    let mut report_file = config.nat.report_file.clone();
    let mut publishing_failed = false;
    let mut publish = |file: &Path, book: &Book| match report::publish(file, &book.report()) {
        Ok(()) => {
            if publishing_failed {
                tracing::info!(report = %file.display(), "NAT report written again");
                publishing_failed = false;
            }
        }
        Err(e) => {
            if !publishing_failed {
                tracing::error!(report = %file.display(), error = %e, "cannot write the NAT report: the relay will show NAT as failed");
                publishing_failed = true;
            }
        }
    };
    publish(&report_file, &book);
    let watchdog = notify::watchdog_interval().is_some();
    notifier.ready("keeping NAT");
    tracing::info!(
        config = %path.display(),
        report = %report_file.display(),
        enabled = config.nat.enabled,
        "NAT keeper ready"
    );
    let mut tick = tokio::time::interval(report::EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_status = String::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                publish(&report_file, &book);
                let report = book.report();
                let status = match &report.state {
                    crate::state::NatStatus::Failed(reason) => format!("NAT FAILED: {reason}"),
                    other => format!("NAT {}", other.name()),
                };
                if status != last_status {
                    notifier.status(&status);
                    last_status = status;
                }
                if watchdog {
                    notifier.watchdog();
                }
            }
            sig = signals.next() => match sig {
                Ok(Sig::Hangup) => {
                    notifier.reloading();
                    match Config::load(path) {
                        Ok(new) => {
                            report_file = new.nat.report_file.clone();
                            let _ = nat.send(new.nat);
                            tracing::info!(config = %path.display(), message_id = crate::logging::ids::RELOADED, "NAT keeper: configuration reloaded");
                        }
                        Err(e) => tracing::error!(error = %e, message_id = crate::logging::ids::RELOAD_REJECTED, "NAT keeper: reload rejected; the running configuration stays in force"),
                    }
                    notifier.ready("keeping NAT");
                }
                Ok(sig @ (Sig::Terminate | Sig::Interrupt)) => {
                    tracing::info!("{} received; the NAT rules stay in place", sig.name());
                    break;
                }
                Ok(other) => tracing::info!("{} received; ignored", other.name()),
                Err(e) => {
                    tracing::error!(error = %e, "cannot read signals; stopping");
                    break;
                }
            }
        }
    }
    notifier.stopping();
    // No report is better than a stale one: the relay says at once that the keeper is not running.
    let _ = std::fs::remove_file(&report_file);
    tracing::info!(message_id = crate::logging::ids::STOPPED, "NAT keeper stopped");
    Ok(())
}
