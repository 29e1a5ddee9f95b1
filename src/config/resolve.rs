//! Validation: from the file's shapes to the model, every value checked, every default applied,
//! and every error placed in the file (FILE:LINE:COL) and named by its key and route.
//!
//! This module owns the rules between values (a listen address used twice, a route without an
//! allowlist, a keepalive the kernel would refuse). It must not read files or render anything.

use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use super::defaults::*;
use super::file::{FileConfig, FileHealth, FileNat, FileTunables, HumanDuration};
use super::{
    Config, ConfigError, HEALTH_SOCKET_NAME, Health, Keepalive, Nat, ProxyProtocol, ProxyV2, Route, Upstream,
};
use crate::allow::Allowlist;

/// Builds errors that point into one file's text.
pub(super) struct Locator<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Locator<'_> {
    pub(super) fn at(&self, span: Option<Range<usize>>, message: impl Into<String>) -> ConfigError {
        let position = span.map(|span| {
            let before = &self.text[..span.start.min(self.text.len())];
            let line = before.matches('\n').count() + 1;
            let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            (line, col)
        });
        ConfigError {
            path: self.path.to_path_buf(),
            position,
            message: message.into(),
        }
    }
}

/// Validates `text` as if it had been read from `path`.
pub(super) fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let loc = Locator { path, text };
    let mut file: FileConfig = toml::from_str(text).map_err(|e| loc.at(e.span(), e.message().trim_end()))?;
    let defaults = file.tunables();

    let workers = match file.workers {
        Some(w) if *w.get_ref() == 0 => return Err(loc.at(Some(w.span()), "workers must be at least 1")),
        Some(w) => w.into_inner(),
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let max_pipes = match file.max_pipes {
        Some(m) if *m.get_ref() == 0 => {
            return Err(loc.at(
                Some(m.span()),
                "max_pipes must be at least 1 (set splice = false to relay without pipes)",
            ));
        }
        Some(m) => m.into_inner(),
        None => DEFAULT_MAX_PIPES,
    };
    let probe_sources = Allowlist::new(
        file.probe_sources
            .take()
            .unwrap_or_else(|| vec![DEFAULT_PROBE_SOURCE]),
    );
    let drain_timeout = file.drain_timeout.map_or(DEFAULT_DRAIN_TIMEOUT, |d| d.0);
    let shutdown_grace = file.shutdown_grace.map_or(Duration::ZERO, |d| d.0);
    let control_socket = match file.control_socket {
        None => Some(PathBuf::from(DEFAULT_CONTROL_SOCKET)),
        Some(path) if path.get_ref().is_empty() => None,
        Some(path) if !path.get_ref().starts_with('/') => {
            return Err(loc.at(
                Some(path.span()),
                format!(
                    "control_socket {:?} must be an absolute path (or \"\" to turn the control socket off)",
                    path.get_ref()
                ),
            ));
        }
        Some(path) => Some(PathBuf::from(path.into_inner())),
    };
    let health = resolve_health(&loc, file.health, &probe_sources)?;
    let nat = resolve_nat(&loc, file.nat)?;
    let splice = file.splice.unwrap_or(true);
    let file_routes = file.route;

    if file_routes.is_empty() {
        return Err(loc.at(None, "no [[route]] is configured: ferryd would listen on nothing"));
    }

    let mut routes: Vec<(Route, Range<usize>)> = Vec::with_capacity(file_routes.len());
    for spanned in file_routes {
        let route_span = spanned.span();
        let mut raw = spanned.into_inner();
        let own = raw.tunables();
        let name_span = raw.name.span();
        let name = raw.name.into_inner();
        if name.trim().is_empty() {
            return Err(loc.at(
                Some(name_span),
                "route name is empty: give every route a short name such as \"ssh\" or \"winrm\"",
            ));
        }
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(loc.at(
                Some(name_span),
                format!("route name {name:?} may only use letters, digits, '-', '_' and '.' (it appears in logs and metrics)"),
            ));
        }
        if name == HEALTH_SOCKET_NAME {
            return Err(loc.at(
                Some(name_span),
                format!("route name {name:?} is reserved for the health endpoint's socket"),
            ));
        }
        if let Some((other, _)) = routes.iter().find(|(r, _)| r.name == name) {
            return Err(loc.at(
                Some(name_span),
                format!("route name {:?} is used twice", other.name),
            ));
        }
        let listen_span = raw.listen.span();
        let listen = raw.listen.into_inner().0;
        if let Some((other, other_span)) = routes.iter().find(|(r, _)| listens_overlap(r.listen, listen)) {
            let (line, _) = loc.at(Some(other_span.clone()), "").position.unwrap_or((0, 0));
            return Err(loc.at(
                Some(listen_span),
                format!(
                    "route {name:?}: listen address {listen} is already used by route {:?} (line {line}, listen {})",
                    other.name, other.listen
                ),
            ));
        }
        if listens_overlap(health.listen, listen) {
            return Err(loc.at(
                Some(listen_span),
                format!(
                    "route {name:?}: listen address {listen} collides with the health endpoint ({}); move one of them",
                    health.listen
                ),
            ));
        }
        let upstream = raw.upstream.clone();
        let route = resolve_route(&loc, name, listen, upstream, own, &defaults, route_span.clone())?;
        routes.push((route, route_span));
    }

    Ok(Config {
        path: path.to_path_buf(),
        probe_sources,
        drain_timeout,
        workers,
        splice,
        max_pipes,
        shutdown_grace,
        control_socket,
        health,
        nat,
        routes: routes.into_iter().map(|(r, _)| r).collect(),
    })
}

/// Two listen addresses collide when they share a port and either is the same address or a
/// wildcard of the same family (binding both would fail with "address in use").
pub(super) fn listens_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() != b.port() {
        return false;
    }
    let (ia, ib) = (a.ip().to_canonical(), b.ip().to_canonical());
    ia == ib
        || (ia.is_unspecified() && ia.is_ipv4() == ib.is_ipv4())
        || (ib.is_unspecified() && ia.is_ipv4() == ib.is_ipv4())
        // [::]:port is dual-stack by default on Linux and takes the IPv4 port as well.
        || matches!(ia, IpAddr::V6(v6) if v6.is_unspecified())
        || matches!(ib, IpAddr::V6(v6) if v6.is_unspecified())
}

fn resolve_health(
    loc: &Locator<'_>,
    file: Option<Spanned<FileHealth>>,
    probe_sources: &Allowlist,
) -> Result<Health, ConfigError> {
    let loopback = || LOOPBACK.to_vec();
    let file = file.map(Spanned::into_inner).unwrap_or_default();
    let listen = file.listen.map_or(DEFAULT_HEALTH_LISTEN, |addr| addr.0);
    let path = match file.path {
        Some(p) if !p.get_ref().starts_with('/') || p.get_ref().contains(char::is_whitespace) => {
            return Err(loc.at(
                Some(p.span()),
                format!(
                    "health path {:?} must start with '/' and contain no spaces",
                    p.get_ref()
                ),
            ));
        }
        Some(p) if ["/metrics", "/status", "/connections"].contains(&p.get_ref().as_str()) => {
            return Err(loc.at(
                Some(p.span()),
                format!("health path {:?} is taken by the endpoint itself", p.get_ref()),
            ));
        }
        Some(p) => p.into_inner(),
        None => DEFAULT_HEALTH_PATH.to_string(),
    };
    let allow = match file.allow {
        Some(list) => Allowlist::new(list),
        None => Allowlist::new(probe_sources.blocks().iter().copied().chain(loopback()).collect()),
    };
    let metrics_allow = Allowlist::new(file.metrics_allow.unwrap_or_else(loopback));
    Ok(Health {
        listen,
        path,
        allow,
        metrics_allow,
        probe_sources: probe_sources.clone(),
        require_nat: file.require_nat.unwrap_or(false),
        proxy_protocol: file.proxy_protocol.unwrap_or(ProxyProtocol::Auto),
    })
}

fn resolve_nat(loc: &Locator<'_>, file: Option<Spanned<FileNat>>) -> Result<Nat, ConfigError> {
    let Some(file) = file else {
        return Ok(Nat {
            enabled: false,
            sources: Vec::new(),
            out_interface: None,
            allow_destinations: None,
            reconcile_interval: DEFAULT_RECONCILE_INTERVAL,
            report_file: PathBuf::from(DEFAULT_NAT_REPORT_FILE),
            check_target: DEFAULT_CHECK_TARGET.to_string(),
        });
    };
    let span = file.span();
    let file = file.into_inner();
    let enabled = file.enabled.unwrap_or(true);
    let sources = match file.sources {
        Some(list) => {
            if let Some(v6) = list.get_ref().iter().find(|c| !c.is_ipv4()) {
                return Err(loc.at(
                    Some(list.span()),
                    format!("[nat] sources: {v6} is IPv6; NAT is IPv4 only"),
                ));
            }
            if enabled && list.get_ref().is_empty() {
                return Err(loc.at(
                    Some(list.span()),
                    "[nat] sources is empty: name the build VM's address",
                ));
            }
            list.into_inner()
        }
        None if enabled => {
            return Err(loc.at(
                Some(span),
                "[nat] needs sources: the build VM's address or subnet, such as [\"10.0.1.4/32\"]",
            ));
        }
        None => Vec::new(),
    };
    let out_interface = match file.out_interface {
        Some(name) => {
            let ok = !name.get_ref().is_empty()
                && name.get_ref().len() < 16
                && name
                    .get_ref()
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
            if !ok {
                return Err(loc.at(
                    Some(name.span()),
                    format!(
                        "[nat] out_interface {:?} is not an interface name",
                        name.get_ref()
                    ),
                ));
            }
            Some(name.into_inner())
        }
        None => None,
    };
    let reconcile_interval = match file.reconcile_interval {
        Some(d) if d.get_ref().0 < Duration::from_secs(1) => {
            return Err(loc.at(Some(d.span()), "[nat] reconcile_interval must be at least 1s"));
        }
        Some(d) => d.into_inner().0,
        None => DEFAULT_RECONCILE_INTERVAL,
    };
    let report_file = match file.report_file {
        Some(path) if !path.get_ref().starts_with('/') => {
            return Err(loc.at(
                Some(path.span()),
                format!("[nat] report_file {:?} must be an absolute path", path.get_ref()),
            ));
        }
        Some(path) => PathBuf::from(path.into_inner()),
        None => PathBuf::from(DEFAULT_NAT_REPORT_FILE),
    };
    let check_target = match file.check_target {
        Some(target) => {
            let ok = target
                .get_ref()
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
            if !ok {
                return Err(loc.at(
                    Some(target.span()),
                    format!(
                        "[nat] check_target {:?} is not HOST:PORT (a name or an address, and a port)",
                        target.get_ref()
                    ),
                ));
            }
            target.into_inner()
        }
        None => DEFAULT_CHECK_TARGET.to_string(),
    };
    Ok(Nat {
        enabled,
        sources,
        out_interface,
        allow_destinations: file.allow_destinations,
        reconcile_interval,
        report_file,
        check_target,
    })
}

fn resolve_route(
    loc: &Locator<'_>,
    name: String,
    listen: SocketAddr,
    upstream: Upstream,
    own: FileTunables,
    defaults: &FileTunables,
    route_span: Range<usize>,
) -> Result<Route, ConfigError> {
    let allow = match own.allow.as_ref().or(defaults.allow.as_ref()) {
        None => {
            return Err(loc.at(
                Some(route_span),
                format!(
                    "route {name:?} has no allow list: set allow on the route or at the top level (nothing is open to everyone unless \"0.0.0.0/0\" or \"::/0\" is written)"
                ),
            ));
        }
        Some(list) if list.get_ref().is_empty() => {
            return Err(loc.at(
                Some(list.span()),
                format!("route {name:?}: allow is empty, so the route would refuse every client"),
            ));
        }
        Some(list) => Allowlist::new(list.get_ref().clone()),
    };

    let pick = |own: &Option<Spanned<HumanDuration>>, def: &Option<Spanned<HumanDuration>>| {
        own.as_ref().or(def.as_ref()).map(|d| (d.get_ref().0, d.span()))
    };

    let connect_timeout = match pick(&own.connect_timeout, &defaults.connect_timeout) {
        Some((d, span)) if d.is_zero() => {
            return Err(loc.at(
                Some(span),
                format!("route {name:?}: connect_timeout must be longer than 0"),
            ));
        }
        Some((d, _)) => d,
        None => DEFAULT_CONNECT_TIMEOUT,
    };
    let idle_timeout = match own.idle_timeout.or(defaults.idle_timeout) {
        Some(d) if d.0.is_zero() => None,
        Some(d) => Some(d.0),
        None => Some(DEFAULT_IDLE_TIMEOUT),
    };
    let fin_timeout = match pick(&own.fin_timeout, &defaults.fin_timeout) {
        Some((d, span)) if d.is_zero() => {
            return Err(loc.at(
                Some(span),
                format!("route {name:?}: fin_timeout must be longer than 0"),
            ));
        }
        Some((d, _)) => d,
        None => DEFAULT_FIN_TIMEOUT,
    };
    let max_connections = match own.max_connections.as_ref().or(defaults.max_connections.as_ref()) {
        Some(m) if *m.get_ref() == 0 => {
            return Err(loc.at(
                Some(m.span()),
                format!("route {name:?}: max_connections must be at least 1"),
            ));
        }
        Some(m) => *m.get_ref(),
        None => DEFAULT_MAX_CONNECTIONS,
    };

    let keepalive_secs = |key: &str, value: Option<(Duration, Range<usize>)>, default: Duration| {
        match value {
            None => Ok(default),
            Some((d, span)) if d < Duration::from_secs(1) || d.as_secs() > MAX_KEEPALIVE_SECS => Err(loc.at(
                Some(span),
                format!("route {name:?}: {key} must be between 1s and {MAX_KEEPALIVE_SECS}s (the kernel counts it in whole seconds)"),
            )),
            Some((d, _)) => Ok(d),
        }
    };
    let time = keepalive_secs(
        "keepalive_time",
        pick(&own.keepalive_time, &defaults.keepalive_time),
        DEFAULT_KEEPALIVE_TIME,
    )?;
    let interval = keepalive_secs(
        "keepalive_interval",
        pick(&own.keepalive_interval, &defaults.keepalive_interval),
        DEFAULT_KEEPALIVE_INTERVAL,
    )?;
    let probes = match own
        .keepalive_probes
        .as_ref()
        .or(defaults.keepalive_probes.as_ref())
    {
        Some(p) if *p.get_ref() == 0 || *p.get_ref() > MAX_KEEPALIVE_PROBES => {
            return Err(loc.at(
                Some(p.span()),
                format!("route {name:?}: keepalive_probes must be between 1 and {MAX_KEEPALIVE_PROBES}"),
            ));
        }
        Some(p) => *p.get_ref(),
        None => DEFAULT_KEEPALIVE_PROBES,
    };

    let proxy = resolve_proxy(loc, &name, &own, defaults, route_span.clone())?;
    let upstream_proxy_protocol = match own.upstream_proxy_protocol.or(defaults.upstream_proxy_protocol) {
        Some(ProxyProtocol::Auto) => {
            return Err(loc.at(
                Some(route_span),
                format!(
                    "route {name:?}: upstream_proxy_protocol = \"auto\" means nothing: ferryd sends the upstream a header (\"v2\") or not (\"off\")"
                ),
            ));
        }
        Some(p) => p,
        None => ProxyProtocol::Off,
    };

    Ok(Route {
        name,
        listen,
        upstream,
        allow,
        connect_timeout,
        idle_timeout,
        fin_timeout,
        max_connections,
        keepalive: Keepalive {
            time,
            interval,
            probes,
        },
        proxy,
        upstream_proxy_protocol,
    })
}

/// The PROXY v2 settings of a route; the keys that only mean something with a header are
/// refused without one, naming the key.
fn resolve_proxy(
    loc: &Locator<'_>,
    name: &str,
    own: &FileTunables,
    defaults: &FileTunables,
    route_span: Range<usize>,
) -> Result<Option<ProxyV2>, ConfigError> {
    let mode = own
        .proxy_protocol
        .as_ref()
        .or(defaults.proxy_protocol.as_ref())
        .map_or(ProxyProtocol::Auto, |p| *p.get_ref());
    let link_ids = own.allow_link_ids.as_ref().or(defaults.allow_link_ids.as_ref());
    let clients = own.allow_clients.as_ref().or(defaults.allow_clients.as_ref());
    let timeout = own.header_timeout.as_ref().or(defaults.header_timeout.as_ref());
    if mode == ProxyProtocol::Auto {
        // A filter on what the header says is bypassed by a connection that sends none.
        let filters = [
            ("allow_link_ids", link_ids.map(|s| s.span())),
            ("allow_clients", clients.map(|s| s.span())),
        ];
        if let Some((key, span)) = filters.into_iter().find(|(_, span)| span.is_some()) {
            return Err(loc.at(
                span.or(Some(route_span)),
                format!("route {name:?}: {key} needs proxy_protocol = \"v2\" on the route: with \"auto\" (the default), a connection without a header would not be checked at all"),
            ));
        }
    }
    if mode == ProxyProtocol::Off {
        let stray = [
            ("allow_link_ids", link_ids.map(|s| s.span())),
            ("allow_clients", clients.map(|s| s.span())),
            ("header_timeout", timeout.map(|s| s.span())),
        ];
        if let Some((key, span)) = stray.into_iter().find(|(_, span)| span.is_some()) {
            return Err(loc.at(
                span.or(Some(route_span)),
                format!("route {name:?}: {key} needs proxy_protocol = \"v2\" (or \"auto\", for header_timeout) on the route (without a header there is nothing to check it against)"),
            ));
        }
        return Ok(None);
    }
    let header_timeout = match timeout {
        Some(t) if t.get_ref().0.is_zero() => {
            return Err(loc.at(
                Some(t.span()),
                format!("route {name:?}: header_timeout must be longer than 0"),
            ));
        }
        Some(t) => t.get_ref().0,
        None => DEFAULT_HEADER_TIMEOUT,
    };
    if let Some(list) = link_ids.filter(|l| l.get_ref().is_empty()) {
        return Err(loc.at(
            Some(list.span()),
            format!("route {name:?}: allow_link_ids is empty, so the route would refuse every client"),
        ));
    }
    if let Some(list) = clients.filter(|l| l.get_ref().is_empty()) {
        return Err(loc.at(
            Some(list.span()),
            format!("route {name:?}: allow_clients is empty, so the route would refuse every client"),
        ));
    }
    Ok(Some(ProxyV2 {
        required: mode == ProxyProtocol::V2,
        header_timeout,
        allow_link_ids: link_ids.map(|l| l.get_ref().clone()),
        allow_clients: clients.map(|l| Allowlist::new(l.get_ref().clone())),
    }))
}
