//! The configuration file: parsing, validation, defaults, and the effective configuration that
//! `ferryd check` prints.
//!
//! This module owns turning a TOML file into a [`Config`] whose every value is already valid, and
//! explaining a bad file in terms of the file: its path, the line and column, the key, and what is
//! wrong. It must not open sockets or touch the running daemon: the daemon asks for a `Config`
//! and either gets a complete one or an error to print, so a bad reload can never leave half a
//! configuration in force.
//!
//! Every per-route setting may also be written at the top level, where it becomes the default for
//! every route that does not set it (the way HAProxy's `defaults` section works).
//!
//! By role: [`defaults`] (every default with its reason), this file (the validated model),
//! `file` (the serde shapes of the TOML, with the one list of per-route keys), `resolve`
//! (validation, with FILE:LINE:COL), `render` (the effective configuration as TOML).

pub mod defaults;
mod file;
mod render;
mod resolve;
#[cfg(test)]
mod tests;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use crate::allow::{Allowlist, Cidr};

pub use defaults::*;
pub use file::ROUTE_TUNABLE_KEYS;

/// The name a socket-activated health listener is passed under; no route may take it.
pub const HEALTH_SOCKET_NAME: &str = "health";

/// A configuration in which every value is present and valid.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The file it came from, for messages and for reloads.
    pub path: PathBuf,
    /// Load-balancer prober addresses: their connections are answered here and never relayed.
    pub probe_sources: Allowlist,
    /// How long live connections may finish after SIGTERM.
    pub drain_timeout: Duration,
    /// Tokio worker threads.
    pub workers: usize,
    /// Whether to relay with splice(2); false forces the copy path (for comparison, or for a
    /// kernel where splice misbehaves).
    pub splice: bool,
    /// Upper bound on pipes alive at once (busy and pooled).
    pub max_pipes: usize,
    /// After SIGTERM, how long the relay listeners stay open while the health endpoint already
    /// answers 503, so a balancer with several proxy VMs moves new flows elsewhere first.
    pub shutdown_grace: Duration,
    /// The local socket through which a privileged user ends a connection
    /// (`ferryd connections --close`); `None` when turned off (`control_socket = ""`).
    pub control_socket: Option<PathBuf>,
    /// The health, metrics and status endpoint.
    pub health: Health,
    /// Egress NAT for the build VM.
    pub nat: Nat,
    /// The routes, in file order.
    pub routes: Vec<Route>,
}

/// The HTTP endpoint that answers the load balancer's health probe and serves /metrics and
/// /status to people.
#[derive(Clone, Debug, PartialEq)]
pub struct Health {
    /// Where it listens.
    pub listen: SocketAddr,
    /// The path of the health probe.
    pub path: String,
    /// Sources that may ask for the health path; everyone else is reset.
    pub allow: Allowlist,
    /// Sources that may read /metrics and /status.
    pub metrics_allow: Allowlist,
    /// The top-level `probe_sources`, copied here: their requests get connection slots of their
    /// own, so a flood from elsewhere can never crowd out the load balancer's probe.
    pub probe_sources: Allowlist,
    /// Whether the health listener expects a PROXY v2 header first (the balancer's probes carry a
    /// LOCAL one when the Private Link Service has "TCP proxy v2" on).
    pub proxy_protocol: ProxyProtocol,
    /// Whether a NAT failure makes the probe fail too. Off by default: with one proxy VM behind
    /// the balancer, a failing probe stops every new SSH/WinRM flow, which costs more than a
    /// build VM without egress (that fails at once, with an error the builder shows).
    pub require_nat: bool,
}

/// The build VM's way out: forwarding and masquerading on the proxy VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nat {
    /// Whether ferryd manages NAT at all.
    pub enabled: bool,
    /// The build VM's addresses (IPv4).
    pub sources: Vec<Cidr>,
    /// The uplink; `None` means the interface of the IPv4 default route, found at apply time.
    pub out_interface: Option<String>,
    /// Where the sources may go; `None` means anywhere.
    pub allow_destinations: Option<Vec<Destination>>,
    /// How often live rules are compared with the wanted ones.
    pub reconcile_interval: Duration,
    /// Where the NAT keeper (`ferryd nat run`) publishes NAT's state for the relay to read.
    pub report_file: PathBuf,
    /// What `ferryd doctor` resolves and connects to, to tell whether the proxy VM itself has a
    /// way out: `host:port` or `ip:port`.
    pub check_target: String,
}

/// An egress destination: a block, optionally limited to a port or port range (TCP and UDP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Destination {
    /// The IPv4 block.
    pub net: Cidr,
    /// Inclusive port range; `None` is every port and protocol.
    pub ports: Option<(u16, u16)>,
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ports {
            None => write!(f, "{}", self.net),
            Some((lo, hi)) if lo == hi => write!(f, "{}:{lo}", self.net),
            Some((lo, hi)) => write!(f, "{}:{lo}-{hi}", self.net),
        }
    }
}

impl FromStr for Destination {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (net, ports) = match text.split_once(':') {
            None => (text, None),
            Some((net, ports)) => (net, Some(ports)),
        };
        let net: Cidr = net.parse()?;
        if !net.is_ipv4() {
            return Err(format!("destination {text:?}: NAT is IPv4 only"));
        }
        let port = |p: &str| -> Result<u16, String> {
            match p.parse::<u16>() {
                Ok(0) | Err(_) => Err(format!(
                    "destination {text:?}: {p:?} is not a port from 1 to 65535"
                )),
                Ok(n) => Ok(n),
            }
        };
        let ports = match ports {
            None => None,
            Some(range) => match range.split_once('-') {
                Some((lo, hi)) => {
                    let (lo, hi) = (port(lo)?, port(hi)?);
                    if lo > hi {
                        return Err(format!("destination {text:?}: port range {lo}-{hi} is backwards"));
                    }
                    Some((lo, hi))
                }
                None => {
                    let p = port(range)?;
                    Some((p, p))
                }
            },
        };
        Ok(Destination { net, ports })
    }
}

/// One listening address and where its connections go.
#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    /// A short name used in logs and metrics, unique in the file.
    pub name: String,
    /// The address ferryd listens on.
    pub listen: SocketAddr,
    /// Where accepted connections are relayed.
    pub upstream: Upstream,
    /// Sources admitted on this route.
    pub allow: Allowlist,
    /// How long dialling the upstream may take before the client is reset.
    pub connect_timeout: Duration,
    /// No byte either way for this long closes both sides; `None` never does.
    pub idle_timeout: Option<Duration>,
    /// How long a half-closed connection may stay quiet before it is closed.
    pub fin_timeout: Duration,
    /// Live connections allowed on this route; the next one is reset.
    pub max_connections: usize,
    /// TCP keepalive for both legs.
    pub keepalive: Keepalive,
    /// PROXY protocol v2 on this route's connections, when the Private Link Service is set to
    /// "TCP proxy v2" (`required`), or may be (`"auto"`); `None` when off.
    pub proxy: Option<ProxyV2>,
    /// Whether to send a PROXY v2 header (the real client, the same TLVs) to the upstream.
    pub upstream_proxy_protocol: ProxyProtocol,
}

impl Route {
    /// How the route takes PROXY headers, as the file says it.
    pub fn proxy_protocol(&self) -> ProxyProtocol {
        match &self.proxy {
            None => ProxyProtocol::Off,
            Some(proxy) if proxy.required => ProxyProtocol::V2,
            Some(_) => ProxyProtocol::Auto,
        }
    }
}

/// Whether a PROXY protocol header is expected (or sent).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyProtocol {
    /// No header: a connection that starts with one is refused.
    Off,
    /// A version 2 header when the connection's first bytes are its signature, none otherwise:
    /// works whether or not the Private Link Service sends one (routes and the health endpoint
    /// only; the default there).
    Auto,
    /// A version 2 header on every connection.
    V2,
}

impl ProxyProtocol {
    /// As written in the file.
    pub fn name(self) -> &'static str {
        match self {
            ProxyProtocol::Off => "off",
            ProxyProtocol::Auto => "auto",
            ProxyProtocol::V2 => "v2",
        }
    }
}

/// What a route with `proxy_protocol = "v2"` or `"auto"` checks in the header.
#[derive(Clone, Debug, PartialEq)]
pub struct ProxyV2 {
    /// Whether every connection must carry a header (`"v2"`); otherwise (`"auto"`) one that does
    /// not start with its signature is relayed unchanged.
    pub required: bool,
    /// The whole header must arrive within this, or the connection is reset.
    pub header_timeout: Duration,
    /// When set, only these private endpoint LinkIDs are relayed.
    pub allow_link_ids: Option<Vec<u32>>,
    /// When set, the client address in the header must be in it too.
    pub allow_clients: Option<Allowlist>,
}

/// TCP keepalive timers applied to both legs of a relayed connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    /// Silence before the first probe.
    pub time: Duration,
    /// Time between probes.
    pub interval: Duration,
    /// Unanswered probes before the peer is declared dead.
    pub probes: u32,
}

/// The upstream of a route: a literal address, or a name resolved again at every connect so that
/// a build VM that comes back with a new address is found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Upstream {
    /// A literal IP and port.
    Addr(SocketAddr),
    /// A host name and port, resolved at each connect.
    Host {
        /// The DNS name.
        host: String,
        /// The TCP port.
        port: u16,
    },
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Upstream::Addr(addr) => addr.fmt(f),
            Upstream::Host { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl FromStr for Upstream {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if let Ok(addr) = text.parse::<SocketAddr>() {
            if addr.port() == 0 {
                return Err(format!(
                    "upstream {text:?} has port 0: name the port the build VM serves on (22 for SSH, 5986 for WinRM)"
                ));
            }
            return Ok(Upstream::Addr(addr));
        }
        let Some((host, port)) = text.rsplit_once(':') else {
            return Err(format!(
                "invalid upstream {text:?}: expected IP:port or host:port, such as 10.0.1.4:22"
            ));
        };
        if host.contains(':') {
            return Err(format!(
                "invalid upstream {text:?}: write an IPv6 address in brackets, such as [2001:db8::4]:22"
            ));
        }
        let host_ok = !host.is_empty()
            && host.len() <= 253
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_');
        if !host_ok {
            return Err(format!(
                "invalid upstream {text:?}: {host:?} is neither an IP address nor a host name"
            ));
        }
        let port: u16 = port.parse().map_err(|_| {
            format!("invalid upstream {text:?}: port {port:?} is not a number from 1 to 65535")
        })?;
        if port == 0 {
            return Err(format!(
                "upstream {text:?} has port 0: name the port the build VM serves on (22 for SSH, 5986 for WinRM)"
            ));
        }
        Ok(Upstream::Host {
            host: host.to_string(),
            port,
        })
    }
}

/// A configuration file that cannot be used, explained in terms of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file.
    pub path: PathBuf,
    /// 1-based line and column, when the problem has a place in the file.
    pub position: Option<(usize, usize)>,
    /// What is wrong, naming the key or route.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some((line, col)) => write!(f, "{}:{line}:{col}: {}", self.path.display(), self.message),
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: path.to_path_buf(),
            position: None,
            message: format!("cannot read the configuration file: {e}"),
        })?;
        Config::parse(&text, path)
    }

    /// Validates `text` as if it had been read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        resolve::parse(text, path)
    }

    /// The effective configuration as TOML, every default written out. Feeding this text back to
    /// [`Config::parse`] gives the same configuration, which is what `ferryd check` prints.
    pub fn to_toml(&self) -> String {
        render::render(self)
    }
}
