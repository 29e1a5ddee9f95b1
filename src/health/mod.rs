//! The health endpoint: the load balancer's HTTP probe (`GET /healthz` → 200 or 503 with a
//! reason), `/metrics` and `/status` for people, on its own port.
//!
//! This module owns the listener, who may ask what, and the bounds that keep a hostile or broken
//! client from hurting a probe: per-source access lists, a cap on concurrent connections with
//! slots reserved for the probe sources, a header size limit and a deadline to receive a request
//! (slowloris). It runs on its own thread with its own single-threaded runtime, so relay load can
//! never delay a probe answer. It must not change the daemon's state, only read it.

mod http;
mod listing;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::config::ProxyProtocol;
use crate::logging::RateLimit;
use crate::net::{AcceptLoop, Next};
use crate::state::State;

/// Concurrent connections from the probe sources. Azure probes one at a time every few seconds;
/// 16 covers several balancer instances and retries.
const PROBE_SLOTS: usize = 16;
/// Concurrent connections from everyone else allowed (loopback, monitoring). A client past this is
/// reset; the probe sources' slots are untouched.
const OTHER_SLOTS: usize = 64;

/// The daemon's hold on the endpoint, for a live upgrade: the exec ends this thread with the
/// rest of the program image, and a request it was answering then would be cut. Held, the
/// endpoint accepts nothing more (requests wait in the listening socket's backlog, which the
/// next image serves) and reports once the requests under way are answered.
#[derive(Debug)]
pub struct Gate {
    hold: watch::Sender<bool>,
    settled: watch::Receiver<bool>,
}

impl Gate {
    /// Stops accepting and waits up to `bound` for the requests under way to be answered.
    /// Returns whether they all were (a client that sends its request slowly may still be
    /// reading when the bound passes).
    pub async fn hold(&mut self, bound: Duration) -> bool {
        let _ = self.hold.send(true);
        tokio::time::timeout(bound, self.settled.wait_for(|settled| *settled))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Accepts again (the upgrade failed and this image goes on).
    pub fn release(&self) {
        let _ = self.hold.send(false);
    }
}

/// Starts the endpoint on its own thread. The thread lives as long as the process: during a
/// drain it keeps answering, with 503.
pub fn spawn(listener: std::net::TcpListener, state: Arc<State>) -> std::io::Result<Gate> {
    let (hold, hold_rx) = watch::channel(false);
    let (settled_tx, settled) = watch::channel(false);
    std::thread::Builder::new()
        .name("ferryd-health".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the health endpoint's runtime");
                    state.set_problem("health endpoint", Some(format!("cannot start: {e}")));
                    return;
                }
            };
            runtime.block_on(serve(listener, state, hold_rx, settled_tx));
        })?;
    Ok(Gate { hold, settled })
}

async fn serve(
    listener: std::net::TcpListener,
    state: Arc<State>,
    mut hold: watch::Receiver<bool>,
    settled: watch::Sender<bool>,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(error = %e, "cannot register the health listener");
            state.set_problem("health endpoint", Some(format!("cannot listen: {e}")));
            return;
        }
    };
    let probe_slots = Arc::new(Semaphore::new(PROBE_SLOTS));
    let other_slots = Arc::new(Semaphore::new(OTHER_SLOTS));
    let refused_log = RateLimit::new();
    let busy_log = RateLimit::new();
    let header_log = Arc::new(RateLimit::new());
    let mut accept = AcceptLoop::new(listener, "health");
    loop {
        // Only a hold interrupts this loop: it lives as long as the process.
        let held = async { hold.wait_for(|held| *held).await.is_ok() };
        let (stream, peer) = match accept.next(held).await {
            Next::Connection(stream, peer) => (stream, peer),
            // The daemon is gone: the process is ending.
            Next::Control(false) => std::future::pending().await,
            Next::Control(true) => {
                // Every slot back means every request under way was answered.
                let all = tokio::join!(
                    probe_slots.acquire_many(PROBE_SLOTS as u32),
                    other_slots.acquire_many(OTHER_SLOTS as u32)
                );
                let _ = settled.send(true);
                let _ = hold.wait_for(|held| !*held).await;
                drop(all);
                let _ = settled.send(false);
                continue;
            }
        };
        let health = state.health();
        let source = peer.ip().to_canonical();
        let access = http::Access {
            probe: health.allow.contains(source),
            metrics: health.metrics_allow.contains(source),
            prober: health.probe_sources.contains(source),
        };
        if !access.probe && !access.metrics {
            crate::net::reset(stream);
            if let Some(suppressed) = refused_log.admit() {
                tracing::warn!(client = %peer, suppressed, "health endpoint: source not allowed; connection reset");
            }
            continue;
        }
        let slots = if health.probe_sources.contains(source) {
            &probe_slots
        } else {
            &other_slots
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            crate::net::reset(stream);
            if let Some(suppressed) = busy_log.admit() {
                tracing::warn!(client = %peer, suppressed, "health endpoint: too many connections from this kind of source; reset");
            }
            continue;
        };
        let state = state.clone();
        let mode = health.proxy_protocol;
        let header_log = header_log.clone();
        tokio::spawn(async move {
            let mut stream = stream;
            // With "TCP proxy v2" on, the balancer's probes start with a LOCAL header: read it
            // (exactly it), then serve HTTP as usual. "auto" reads one when the first bytes are
            // its signature (an HTTP request never starts so).
            let expect_header = match mode {
                ProxyProtocol::V2 => true,
                ProxyProtocol::Off => false,
                ProxyProtocol::Auto => matches!(
                    crate::proxy_header::first_bytes(&stream, http::REQUEST_TIMEOUT, http::REQUEST_TIMEOUT)
                        .await,
                    Ok(crate::proxy_header::First::Header)
                ),
            };
            if expect_header
                && let Err(refusal) = crate::proxy_header::read(&mut stream, http::REQUEST_TIMEOUT).await
            {
                crate::net::reset(stream);
                if let Some(suppressed) = header_log.admit() {
                    tracing::warn!(client = %peer, reason = refusal.reason(), error = %refusal, suppressed, "health endpoint: PROXY v2 header refused; connection reset");
                }
                return;
            }
            http::serve_connection(stream, peer, access, state).await;
            drop(permit);
        });
    }
}
