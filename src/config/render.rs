//! The effective configuration as TOML: a typed view of the model, serialized. Every default is
//! written out, so an operator sees what is really in force, and the text parses back to the
//! same configuration (`ferryd check` prints it; a property test holds it to that).
//!
//! This module owns how values are spelled in the output. It must not validate.

use std::time::Duration;

use serde::Serialize;

use super::Config;
use crate::allow::Allowlist;

#[derive(Serialize)]
struct View {
    probe_sources: Vec<String>,
    drain_timeout: String,
    workers: usize,
    splice: bool,
    max_pipes: usize,
    shutdown_grace: String,
    /// "" means turned off.
    control_socket: String,
    health: HealthView,
    nat: NatView,
    route: Vec<RouteView>,
}

#[derive(Serialize)]
struct HealthView {
    listen: String,
    path: String,
    allow: Vec<String>,
    metrics_allow: Vec<String>,
    require_nat: bool,
    proxy_protocol: &'static str,
}

#[derive(Serialize)]
struct NatView {
    enabled: bool,
    sources: Vec<String>,
    /// Absent: the interface of the IPv4 default route, looked up at every reconcile.
    #[serde(skip_serializing_if = "Option::is_none")]
    out_interface: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    allow_destinations: Option<Vec<String>>,
    reconcile_interval: String,
    report_file: String,
    check_target: String,
}

#[derive(Serialize)]
struct RouteView {
    name: String,
    listen: String,
    upstream: String,
    allow: Vec<String>,
    connect_timeout: String,
    /// "0s" means never.
    idle_timeout: String,
    fin_timeout: String,
    max_connections: usize,
    keepalive_time: String,
    keepalive_interval: String,
    keepalive_probes: u32,
    proxy_protocol: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    header_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    allow_link_ids: Option<Vec<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    allow_clients: Option<Vec<String>>,
    upstream_proxy_protocol: &'static str,
}

fn duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn cidrs(list: &Allowlist) -> Vec<String> {
    list.blocks().iter().map(ToString::to_string).collect()
}

fn strings<T: ToString>(items: &[T]) -> Vec<String> {
    items.iter().map(ToString::to_string).collect()
}

/// `config` as TOML.
pub(super) fn render(config: &Config) -> String {
    let view = View {
        probe_sources: cidrs(&config.probe_sources),
        drain_timeout: duration(config.drain_timeout),
        workers: config.workers,
        splice: config.splice,
        max_pipes: config.max_pipes,
        shutdown_grace: duration(config.shutdown_grace),
        control_socket: config
            .control_socket
            .as_ref()
            .map_or_else(String::new, |p| p.display().to_string()),
        health: HealthView {
            listen: config.health.listen.to_string(),
            path: config.health.path.clone(),
            allow: cidrs(&config.health.allow),
            metrics_allow: cidrs(&config.health.metrics_allow),
            require_nat: config.health.require_nat,
            proxy_protocol: config.health.proxy_protocol.name(),
        },
        nat: NatView {
            enabled: config.nat.enabled,
            sources: strings(&config.nat.sources),
            out_interface: config.nat.out_interface.clone(),
            allow_destinations: config.nat.allow_destinations.as_deref().map(strings),
            reconcile_interval: duration(config.nat.reconcile_interval),
            report_file: config.nat.report_file.display().to_string(),
            check_target: config.nat.check_target.clone(),
        },
        route: config
            .routes
            .iter()
            .map(|route| RouteView {
                name: route.name.clone(),
                listen: route.listen.to_string(),
                upstream: route.upstream.to_string(),
                allow: cidrs(&route.allow),
                connect_timeout: duration(route.connect_timeout),
                idle_timeout: duration(route.idle_timeout.unwrap_or(Duration::ZERO)),
                fin_timeout: duration(route.fin_timeout),
                max_connections: route.max_connections,
                keepalive_time: duration(route.keepalive.time),
                keepalive_interval: duration(route.keepalive.interval),
                keepalive_probes: route.keepalive.probes,
                proxy_protocol: route.proxy_protocol().name(),
                header_timeout: route.proxy.as_ref().map(|p| duration(p.header_timeout)),
                allow_link_ids: route.proxy.as_ref().and_then(|p| p.allow_link_ids.clone()),
                allow_clients: route
                    .proxy
                    .as_ref()
                    .and_then(|p| p.allow_clients.as_ref().map(cidrs)),
                upstream_proxy_protocol: route.upstream_proxy_protocol.name(),
            })
            .collect(),
    };
    // Plain strings, numbers and booleans always serialize; the fallback is never reached.
    toml::to_string(&view).unwrap_or_else(|e| format!("# cannot render the configuration: {e}\n"))
}
