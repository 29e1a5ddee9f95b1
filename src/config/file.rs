//! The file as written: the serde shapes of the TOML, before any validation beyond the type of
//! each value. Unknown keys are rejected here, with their place in the file.
//!
//! The per-route settings are declared once, in `route_tunables!`: that one list makes the
//! fields of a `[[route]]`, the same fields at the top level (where they are defaults for every
//! route), the gathering of both, and [`ROUTE_TUNABLE_KEYS`]. This module must not decide
//! defaults or check values against each other; [`super::resolve`] does.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::defaults::MAX_DURATION;
use super::{Destination, ProxyProtocol, Upstream};
use crate::allow::Cidr;

/// A duration written for people: "500ms", "30s", "2h", "1h 30m".
#[derive(Clone, Copy, Debug)]
pub(super) struct HumanDuration(pub(super) Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let duration = humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {text:?} ({e}): write a number and a unit, such as \"500ms\", \"30s\" or \"2h\""
            ))
        })?;
        if duration > MAX_DURATION {
            return Err(serde::de::Error::custom(format!(
                "duration {text:?} is longer than ten years (for idle_timeout, \"0s\" means never)"
            )));
        }
        Ok(HumanDuration(duration))
    }
}

/// A listen address: an IP literal and a non-zero port.
#[derive(Clone, Copy, Debug)]
pub(super) struct ListenAddr(pub(super) SocketAddr);

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let addr: SocketAddr = text.parse().map_err(|_| {
            serde::de::Error::custom(format!(
                "invalid listen address {text:?}: expected IP:port such as 0.0.0.0:60001 or [::]:60001"
            ))
        })?;
        if addr.port() == 0 {
            return Err(serde::de::Error::custom(format!(
                "listen address {text:?} has port 0: name the port the load balancer sends to (60001 for SSH, 60000 for WinRM)"
            )));
        }
        Ok(ListenAddr(addr))
    }
}

impl<'de> Deserialize<'de> for Upstream {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl<'de> Deserialize<'de> for Destination {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl<'de> Deserialize<'de> for ProxyProtocol {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match String::deserialize(deserializer)?.as_str() {
            "off" => Ok(ProxyProtocol::Off),
            "auto" => Ok(ProxyProtocol::Auto),
            "v2" => Ok(ProxyProtocol::V2),
            other => Err(serde::de::Error::custom(format!(
                "proxy protocol {other:?}: \"auto\", \"off\" or \"v2\" (version 1 is not supported)"
            ))),
        }
    }
}

/// The settings a route may set for itself or inherit from the top level: the one list of them.
/// Adding a per-route key starts here (then its value in [`super::Route`], its check in
/// `resolve`, its line in `render`).
macro_rules! route_tunables {
    ($then:ident) => {
        $then! {
            allow: Option<Spanned<Vec<Cidr>>>,
            connect_timeout: Option<Spanned<HumanDuration>>,
            idle_timeout: Option<HumanDuration>,
            fin_timeout: Option<Spanned<HumanDuration>>,
            max_connections: Option<Spanned<usize>>,
            keepalive_time: Option<Spanned<HumanDuration>>,
            keepalive_interval: Option<Spanned<HumanDuration>>,
            keepalive_probes: Option<Spanned<u32>>,
            proxy_protocol: Option<Spanned<ProxyProtocol>>,
            allow_link_ids: Option<Spanned<Vec<u32>>>,
            allow_clients: Option<Spanned<Vec<Cidr>>>,
            header_timeout: Option<Spanned<HumanDuration>>,
            upstream_proxy_protocol: Option<ProxyProtocol>,
        }
    };
}

/// Makes the file shapes from the list in `route_tunables!`. serde's `flatten` cannot be
/// combined with `deny_unknown_fields`, so the fields are written into each shape.
macro_rules! file_shapes {
    ($($key:ident: $type:ty,)*) => {
        /// Every key a route may set, for tests and tools that enumerate them.
        pub const ROUTE_TUNABLE_KEYS: &[&str] = &[$(stringify!($key)),*];

        /// The per-route settings found in one place (a route, or the top level).
        pub(super) struct FileTunables {
            $(pub(super) $key: $type,)*
        }

        /// The whole file.
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        pub(super) struct FileConfig {
            pub(super) nat: Option<Spanned<FileNat>>,
            pub(super) probe_sources: Option<Vec<Cidr>>,
            pub(super) drain_timeout: Option<HumanDuration>,
            pub(super) shutdown_grace: Option<HumanDuration>,
            pub(super) health: Option<Spanned<FileHealth>>,
            pub(super) workers: Option<Spanned<usize>>,
            pub(super) splice: Option<bool>,
            pub(super) max_pipes: Option<Spanned<usize>>,
            pub(super) control_socket: Option<Spanned<String>>,
            #[serde(default)]
            pub(super) route: Vec<Spanned<FileRoute>>,
            $(pub(super) $key: $type,)*
        }

        /// One `[[route]]`.
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        pub(super) struct FileRoute {
            pub(super) name: Spanned<String>,
            pub(super) listen: Spanned<ListenAddr>,
            pub(super) upstream: Upstream,
            $(pub(super) $key: $type,)*
        }

        impl FileConfig {
            /// The top-level defaults for every route.
            pub(super) fn tunables(&mut self) -> FileTunables {
                FileTunables { $($key: self.$key.take(),)* }
            }
        }

        impl FileRoute {
            /// The route's own settings.
            pub(super) fn tunables(&mut self) -> FileTunables {
                FileTunables { $($key: self.$key.take(),)* }
            }
        }
    };
}

route_tunables!(file_shapes);

/// `[health]`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileHealth {
    pub(super) listen: Option<ListenAddr>,
    pub(super) path: Option<Spanned<String>>,
    pub(super) allow: Option<Vec<Cidr>>,
    pub(super) metrics_allow: Option<Vec<Cidr>>,
    pub(super) require_nat: Option<bool>,
    pub(super) proxy_protocol: Option<ProxyProtocol>,
}

/// `[nat]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileNat {
    pub(super) enabled: Option<bool>,
    pub(super) sources: Option<Spanned<Vec<Cidr>>>,
    pub(super) out_interface: Option<Spanned<String>>,
    pub(super) allow_destinations: Option<Vec<Destination>>,
    pub(super) reconcile_interval: Option<Spanned<HumanDuration>>,
    pub(super) report_file: Option<Spanned<String>>,
    pub(super) check_target: Option<Spanned<String>>,
}
