//! The daemon's life: start every route, react to signals (SIGHUP reloads, SIGTERM/SIGINT drain
//! and exit), and say what happened at the end.
//!
//! This module owns the set of running listeners and the order of a shutdown: close the
//! listeners, let live connections finish for up to drain_timeout, close the rest, exit 0. It
//! must not touch a connection's bytes, and a reload must never drop a live connection:
//! connections keep the settings they were accepted with, and only listeners come and go.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::relay::Engine;
use crate::route::{RouteListener, RouteSettings};
use crate::shutdown::Drain;
use crate::stats::{Outcome, RouteStats};

/// After the drain timeout tells the last connections to close, how long they get to do so and
/// write their log line before the process exits anyway.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Runs the daemon on the configuration at `path` until SIGTERM or SIGINT.
pub fn run(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.workers)
        .thread_name("ferryd-worker")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(async {
        let daemon = Daemon::start(config).await?;
        daemon.serve().await
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

/// A listening route as the daemon tracks it. Dropping `settings` stops its listener.
struct Running {
    listen: SocketAddr,
    settings: watch::Sender<Arc<RouteSettings>>,
    stats: Arc<RouteStats>,
    task: JoinHandle<()>,
}

struct Daemon {
    config: Config,
    engine: Arc<Engine>,
    drain: Drain,
    routes: Vec<Running>,
}

impl Daemon {
    async fn start(config: Config) -> anyhow::Result<Daemon> {
        let engine = Engine::new(config.splice, config.max_pipes);
        let mut daemon = Daemon {
            engine,
            drain: Drain::new(),
            routes: Vec::new(),
            config,
        };
        let routes = daemon.config.routes.clone();
        for route in &routes {
            let listener = crate::net::listen_with_retry(route.listen, crate::net::BIND_RETRY_WINDOW)
                .await
                .with_context(|| {
                    format!(
                        "route {:?}: cannot listen on {} (another process, or an outgoing connection using it as its ephemeral port, holds it; reserve the port with net.ipv4.ip_local_reserved_ports)",
                        route.name, route.listen
                    )
                })?;
            daemon.spawn(route.listen, listener, daemon.settings_for(route));
        }
        tracing::info!(
            config = %daemon.config.path.display(),
            routes = daemon.routes.len(),
            workers = daemon.config.workers,
            splice = daemon.config.splice,
            "ready"
        );
        Ok(daemon)
    }

    fn settings_for(&self, route: &crate::config::Route) -> Arc<RouteSettings> {
        Arc::new(RouteSettings {
            route: route.clone(),
            probe_sources: self.config.probe_sources.clone(),
        })
    }

    fn spawn(&mut self, listen: SocketAddr, listener: tokio::net::TcpListener, settings: Arc<RouteSettings>) {
        let route = &settings.route;
        tracing::info!(route = %route.name, listen = %listen, upstream = %route.upstream, "listening");
        let (tx, rx) = watch::channel(settings);
        let stats = Arc::new(RouteStats::default());
        let task = RouteListener::new(
            listener,
            rx,
            stats.clone(),
            self.engine.clone(),
            self.drain.handle(),
        );
        self.routes.push(Running {
            listen,
            settings: tx,
            stats,
            task: tokio::spawn(task.run()),
        });
    }

    async fn serve(mut self) -> anyhow::Result<()> {
        let mut hangup = signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?;
        let mut terminate = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
        let mut interrupt = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
        loop {
            tokio::select! {
                _ = hangup.recv() => self.reload().await,
                _ = terminate.recv() => { tracing::info!("SIGTERM received"); break; }
                _ = interrupt.recv() => { tracing::info!("SIGINT received"); break; }
            }
        }
        self.stop().await;
        Ok(())
    }

    /// Re-reads the file and applies it to new connections. Every new listen address is bound
    /// before anything changes, so a reload either applies whole or not at all.
    async fn reload(&mut self) {
        let path = self.config.path.clone();
        let new = match Config::load(&path) {
            Ok(new) => new,
            Err(e) => {
                tracing::error!(error = %e, "reload rejected; the running configuration stays in force");
                return;
            }
        };
        for (key, changed) in [
            ("workers", new.workers != self.config.workers),
            ("splice", new.splice != self.config.splice),
            ("max_pipes", new.max_pipes != self.config.max_pipes),
        ] {
            if changed {
                tracing::warn!(
                    key,
                    "this setting changed in the file; it takes effect at the next restart"
                );
            }
        }

        let mut fresh = Vec::new();
        for route in &new.routes {
            if self.routes.iter().any(|r| r.listen == route.listen) {
                continue;
            }
            match crate::net::listen(route.listen) {
                Ok(listener) => fresh.push((route.clone(), listener)),
                Err(e) => {
                    tracing::error!(
                        route = %route.name,
                        listen = %route.listen,
                        error = %e,
                        "reload rejected: cannot listen on the new address (if a route being removed holds an overlapping address, restart ferryd instead); the running configuration stays in force"
                    );
                    return;
                }
            }
        }

        let (kept, removed): (Vec<Running>, Vec<Running>) = std::mem::take(&mut self.routes)
            .into_iter()
            .partition(|r| new.routes.iter().any(|route| route.listen == r.listen));
        for gone in removed {
            let name = gone.settings.borrow().route.name.clone();
            drop(gone.settings);
            let _ = gone.task.await;
            tracing::info!(route = %name, listen = %gone.listen, "route removed; its live connections continue");
        }
        self.config = Config {
            workers: self.config.workers,
            splice: self.config.splice,
            max_pipes: self.config.max_pipes,
            ..new
        };
        self.routes = kept;
        for running in &self.routes {
            if let Some(route) = self
                .config
                .routes
                .iter()
                .find(|route| route.listen == running.listen)
            {
                let settings = self.settings_for(route);
                running.settings.send_if_modified(|current| {
                    let changed = **current != *settings;
                    if changed {
                        *current = settings;
                    }
                    changed
                });
            }
        }
        for (route, listener) in fresh {
            let settings = self.settings_for(&route);
            self.spawn(route.listen, listener, settings);
        }
        tracing::info!(config = %path.display(), routes = self.routes.len(), "configuration reloaded");
    }

    async fn stop(self) {
        let Daemon {
            config,
            engine,
            drain,
            routes,
        } = self;
        let mut stats = Vec::new();
        for running in routes {
            drop(running.settings);
            let _ = running.task.await;
            stats.push(running.stats);
        }
        let live: usize = stats.iter().map(|s| s.live.load(Ordering::Relaxed)).sum();
        tracing::info!(
            live,
            drain_timeout = %humantime::format_duration(config.drain_timeout),
            "draining: listeners closed, waiting for live connections to finish"
        );
        let finished = drain.finish(config.drain_timeout, CLOSE_GRACE).await;
        if !finished {
            tracing::warn!("drain timeout reached; remaining connections were closed");
        }
        let relayed: u64 = stats
            .iter()
            .map(|s| {
                s.count(Outcome::Eof)
                    + s.count(Outcome::Reset)
                    + s.count(Outcome::Idle)
                    + s.count(Outcome::Drain)
            })
            .sum();
        let relay = &engine.stats;
        tracing::info!(
            relayed,
            spliced_bytes = relay.spliced_bytes.load(Ordering::Relaxed),
            copied_bytes = relay.copied_bytes.load(Ordering::Relaxed),
            fallback_no_pipe = relay.fallback_no_pipe.load(Ordering::Relaxed),
            fallback_refused = relay.fallback_refused.load(Ordering::Relaxed),
            pipes_created = engine.pipes().map_or(0, |p| p.created()),
            "stopped"
        );
    }
}
