//! Reloads: SIGHUP re-reads the file and applies it whole or not at all. Everything that can
//! fail (a listener for every new or moved route) is prepared before anything changes; routes
//! keep their identity by name; systemd's fd store is kept to exactly the sockets in use. It
//! must not drop a live connection: only listeners come and go.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use anyhow::Context as _;

use super::fd_store::FdStore;
use super::{Daemon, Prepared, Running};
use crate::config::{Config, ConfigError, Route};
use crate::logging::ids;

/// Why a reload was not applied: the running configuration then stays in force, whole.
#[derive(Debug)]
pub(super) enum Rejected {
    /// The file does not load (its reason names the file, line and key).
    File(ConfigError),
    /// A route's new listen address cannot be bound.
    Listen {
        /// The route's name.
        route: String,
        /// The address.
        listen: SocketAddr,
        /// Why.
        error: anyhow::Error,
    },
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejected::File(e) => write!(f, "{e}"),
            Rejected::Listen { route, listen, error } => write!(
                f,
                "route {route:?}: cannot listen on {listen}: {error:#} (if a route being removed holds an overlapping address, restart ferryd instead)"
            ),
        }
    }
}

/// The settings a reload cannot change, listed once: each shapes something made once at start
/// (the runtime's threads, the relay engine, the health endpoint's and the control socket's
/// sockets). A changed one keeps its running value in `new` and is named in the result.
fn keep_restart_only(running: &Config, new: &mut Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    macro_rules! keep {
        ($key:literal, $($field:ident).+) => {
            if new.$($field).+ != running.$($field).+ {
                changed.push($key);
                new.$($field).+ = running.$($field).+.clone();
            }
        };
    }
    keep!("workers", workers);
    keep!("splice", splice);
    keep!("max_pipes", max_pipes);
    keep!("[health] listen", health.listen);
    keep!("control_socket", control_socket);
    changed
}

impl Daemon {
    /// Re-reads the file and applies it to new connections. Every new listen address is bound
    /// before anything changes, so a reload either applies whole or not at all.
    pub(super) async fn reload(&mut self) {
        self.notifier.reloading();
        match self.apply_reload().await {
            Ok(()) => {
                self.state.counters.reloads_ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(rejected) => {
                self.state
                    .counters
                    .reloads_rejected
                    .fetch_add(1, Ordering::Relaxed);
                let (route, listen) = match &rejected {
                    Rejected::Listen { route, listen, .. } => (Some(route.as_str()), Some(*listen)),
                    Rejected::File(_) => (None, None),
                };
                tracing::error!(
                    route,
                    listen = listen.map(|l| l.to_string()),
                    error = %rejected,
                    message_id = ids::RELOAD_REJECTED,
                    "reload rejected; the running configuration stays in force"
                );
            }
        }
        let status = self.status_line();
        self.notifier.ready(&status);
        self.last_status = status;
    }

    async fn apply_reload(&mut self) -> Result<(), Rejected> {
        let path = self.config.path.clone();
        let mut new = Config::load(&path).map_err(Rejected::File)?;
        // Settings that need a restart keep their running values, so the effective
        // configuration stays the one really in force.
        for key in keep_restart_only(&self.config, &mut new) {
            tracing::warn!(
                key,
                "this setting changed in the file; it takes effect at the next restart"
            );
        }

        // Everything that can fail comes first, so a reload applies whole or not at all: a
        // listener for every route that is new or moves. An address another route holds now is
        // handed over as the same socket; any other is bound.
        let mut fresh = Vec::new();
        for route in &new.routes {
            if self
                .routes
                .iter()
                .any(|r| r.name == route.name && r.listen == route.listen)
            {
                continue;
            }
            let prepared = self.prepare(route).map_err(|error| Rejected::Listen {
                route: route.name.clone(),
                listen: route.listen,
                error,
            })?;
            fresh.push(prepared);
        }
        self.config = new;
        self.state.set_health(self.config.health.clone());
        self.nat.send_if_modified(|current| {
            let changed = *current != self.config.nat;
            if changed {
                *current = self.config.nat.clone();
            }
            changed
        });

        // Routes keep their identity by name: counters and live connections (and so the
        // max_connections accounting) follow a route to its new address.
        let mut carried = Vec::new();
        let mut store = FdStore::default();
        for running in std::mem::take(&mut self.routes) {
            match self.config.routes.iter().find(|r| r.name == running.name) {
                Some(route) if route.listen == running.listen => {
                    let settings = self.settings_for(route);
                    running.settings.send_if_modified(|current| {
                        let changed = **current != *settings;
                        if changed {
                            *current = settings;
                        }
                        changed
                    });
                    self.routes.push(running);
                }
                moved_or_gone => {
                    let Running {
                        name,
                        listen,
                        socket,
                        settings,
                        stats,
                        task,
                    } = running;
                    drop(settings);
                    // Every descriptor of the socket is closed before the line below says so:
                    // the accept loop's (it returns it when it stops) and this one. A socket
                    // left to the end of this arm kept the port open after "route removed".
                    drop(task.await);
                    drop(socket);
                    match moved_or_gone {
                        Some(route) => {
                            tracing::info!(route = %name, from = %listen, to = %route.listen, "route moved; its live connections continue and keep counting");
                            carried.push((name, stats));
                        }
                        None => {
                            store.forget(name.clone());
                            self.state.set_problem(&format!("route {name}"), None);
                            tracing::info!(route = %name, %listen, "route removed; its live connections continue");
                        }
                    }
                }
            }
        }
        // The names now stand for these sockets in systemd's fd store.
        for prepared in &fresh {
            store.replace(&prepared.route.name, &prepared.socket);
        }
        store.sync(&self.notifier);
        for prepared in fresh {
            let stats = match carried.iter().position(|(name, _)| *name == prepared.route.name) {
                Some(i) => carried.swap_remove(i).1,
                None => self.new_stats(&prepared.route.name),
            };
            self.spawn(prepared, stats);
        }
        let order = |name: &str| self.config.routes.iter().position(|r| r.name == name);
        let mut routes = std::mem::take(&mut self.routes);
        routes.sort_by_key(|r| order(&r.name));
        self.routes = routes;
        self.publish_routes();
        tracing::info!(config = %path.display(), routes = self.routes.len(), message_id = ids::RELOADED, "configuration reloaded");
        Ok(())
    }

    /// A listener for `route`: the socket a running route holds on that address, or a new one.
    fn prepare(&self, route: &Route) -> anyhow::Result<Prepared> {
        let socket = match self.routes.iter().find(|r| r.listen == route.listen) {
            Some(holder) => holder
                .socket
                .try_clone()
                .context("cannot duplicate the listening socket")?,
            None => crate::net::listen(route.listen)?,
        };
        let listener = tokio::net::TcpListener::from_std(
            socket
                .try_clone()
                .context("cannot duplicate the listening socket")?,
        )
        .context("cannot register the listener")?;
        Ok(Prepared {
            route: route.clone(),
            socket,
            listener,
        })
    }
}
