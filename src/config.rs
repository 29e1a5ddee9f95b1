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

use std::fmt::{self, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::allow::{Allowlist, Cidr};

/// Where `ferryd run` and `ferryd check` look when `--config` is not given; the Debian package
/// installs its conffile here.
pub const DEFAULT_PATH: &str = "/etc/ferryd/ferryd.toml";

/// Azure's health prober and platform address. Probes always come from here, even through
/// Private Link, so a configuration that forgets `probe_sources` still answers them locally.
pub const DEFAULT_PROBE_SOURCE: &str = "168.63.129.16/32";

/// The build VM sits on the same virtual network and answers a SYN in milliseconds; 5 s still
/// covers two SYN retransmissions (at 1 s and 3 s) before the client is told the upstream is down.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Provisioners can run for a long time without a byte on the SSH or WinRM connection; keepalive
/// (below) holds the flow open, and two hours bounds a connection whose peers have both vanished.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(2 * 60 * 60);

/// Once one side has sent its FIN, the other usually answers and closes within moments; a
/// half-closed connection quiet for this long is closed so it cannot linger for ever.
pub const DEFAULT_FIN_TIMEOUT: Duration = Duration::from_secs(60);

/// One builder uses a handful of connections; 1024 leaves room for retries and parallel uploads
/// while keeping a runaway client well inside the open-file limit.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// Azure drops idle flows after about 4 minutes (Private Link: 240-300 s). A first keepalive
/// probe after 60 s of silence, then every 10 s, keeps quiet SSH sessions alive with a wide
/// margin, and 6 lost probes (one minute) declare a dead peer.
pub const DEFAULT_KEEPALIVE_TIME: Duration = Duration::from_secs(60);
/// See [`DEFAULT_KEEPALIVE_TIME`].
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// See [`DEFAULT_KEEPALIVE_TIME`].
pub const DEFAULT_KEEPALIVE_PROBES: u32 = 6;

/// Long enough for an scp upload in flight to finish, short enough that a package upgrade or a
/// VM shutdown is not held up; the systemd unit's TimeoutStopSec is set above it.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Each pipe holds up to 64 pages (256 KiB) of kernel memory and two fds. 192 pipes use three
/// quarters of the default per-user pipe budget (fs.pipe-user-pages-soft, 16384 pages), past
/// which the kernel refuses to enlarge pipes and hands out small ones. Only connection
/// directions with bytes in flight hold a pipe, so this bounds busy transfers, not open
/// connections; beyond it data is copied through a buffer instead.
pub const DEFAULT_MAX_PIPES: usize = 192;

/// The health endpoint's port when `[health]` is absent: next to the relay ports. Like them it
/// lies in Linux's default ephemeral range (32768-60999); the package reserves all three with
/// net.ipv4.ip_local_reserved_ports, and a busy bind is retried at start.
pub const DEFAULT_HEALTH_LISTEN: &str = "0.0.0.0:60080";

/// The path the load balancer's HTTP probe asks for.
pub const DEFAULT_HEALTH_PATH: &str = "/healthz";

/// Loopback, which may always read the health endpoint, /metrics and /status unless the file says
/// otherwise, so an operator on the VM can look without editing anything.
const LOOPBACK: [&str; 2] = ["127.0.0.0/8", "::1/128"];

/// The name a socket-activated health listener is passed under; no route may take it.
pub const HEALTH_SOCKET_NAME: &str = "health";

/// How often the NAT rules are compared with the live tables. Other tools (ufw reloads, a
/// hand-typed flush) change them rarely; 30 s repairs drift well before a build notices failed
/// downloads, at the cost of two iptables-save runs.
pub const DEFAULT_RECONCILE_INTERVAL: Duration = Duration::from_secs(30);

/// Linux caps TCP_KEEPIDLE and TCP_KEEPINTVL at 32767 s and TCP_KEEPCNT at 127.
const MAX_KEEPALIVE_SECS: u64 = 32767;
const MAX_KEEPALIVE_PROBES: u32 = 127;

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

impl<'de> Deserialize<'de> for Destination {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
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

/// The longest duration accepted anywhere: far beyond any useful timeout, and far inside what a
/// monotonic clock can add without overflowing.
const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

/// A duration written for people: "500ms", "30s", "2h", "1h 30m".
#[derive(Clone, Copy, Debug)]
struct HumanDuration(Duration);

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
struct ListenAddr(SocketAddr);

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

/// The settings a route may override, gathered from a route or from the top level.
struct FileTunables {
    allow: Option<Spanned<Vec<Cidr>>>,
    connect_timeout: Option<Spanned<HumanDuration>>,
    idle_timeout: Option<HumanDuration>,
    fin_timeout: Option<Spanned<HumanDuration>>,
    max_connections: Option<Spanned<usize>>,
    keepalive_time: Option<Spanned<HumanDuration>>,
    keepalive_interval: Option<Spanned<HumanDuration>>,
    keepalive_probes: Option<Spanned<u32>>,
}

/// The file as written. serde's `flatten` cannot be combined with `deny_unknown_fields`, so the
/// tunables are listed here and in [`FileRoute`] and gathered by `tunables()`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileHealth {
    listen: Option<ListenAddr>,
    path: Option<Spanned<String>>,
    allow: Option<Vec<Cidr>>,
    metrics_allow: Option<Vec<Cidr>>,
    require_nat: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileNat {
    enabled: Option<bool>,
    sources: Option<Spanned<Vec<Cidr>>>,
    out_interface: Option<Spanned<String>>,
    allow_destinations: Option<Vec<Destination>>,
    reconcile_interval: Option<Spanned<HumanDuration>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    nat: Option<Spanned<FileNat>>,
    probe_sources: Option<Vec<Cidr>>,
    drain_timeout: Option<HumanDuration>,
    shutdown_grace: Option<HumanDuration>,
    health: Option<Spanned<FileHealth>>,
    workers: Option<Spanned<usize>>,
    splice: Option<bool>,
    max_pipes: Option<Spanned<usize>>,
    #[serde(default)]
    route: Vec<Spanned<FileRoute>>,

    allow: Option<Spanned<Vec<Cidr>>>,
    connect_timeout: Option<Spanned<HumanDuration>>,
    idle_timeout: Option<HumanDuration>,
    fin_timeout: Option<Spanned<HumanDuration>>,
    max_connections: Option<Spanned<usize>>,
    keepalive_time: Option<Spanned<HumanDuration>>,
    keepalive_interval: Option<Spanned<HumanDuration>>,
    keepalive_probes: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRoute {
    name: Spanned<String>,
    listen: Spanned<ListenAddr>,
    upstream: Upstream,

    allow: Option<Spanned<Vec<Cidr>>>,
    connect_timeout: Option<Spanned<HumanDuration>>,
    idle_timeout: Option<HumanDuration>,
    fin_timeout: Option<Spanned<HumanDuration>>,
    max_connections: Option<Spanned<usize>>,
    keepalive_time: Option<Spanned<HumanDuration>>,
    keepalive_interval: Option<Spanned<HumanDuration>>,
    keepalive_probes: Option<Spanned<u32>>,
}

macro_rules! gather_tunables {
    ($src:expr) => {
        FileTunables {
            allow: $src.allow,
            connect_timeout: $src.connect_timeout,
            idle_timeout: $src.idle_timeout,
            fin_timeout: $src.fin_timeout,
            max_connections: $src.max_connections,
            keepalive_time: $src.keepalive_time,
            keepalive_interval: $src.keepalive_interval,
            keepalive_probes: $src.keepalive_probes,
        }
    };
}

/// Builds errors that point into one file's text.
struct Locator<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Locator<'_> {
    fn at(&self, span: Option<Range<usize>>, message: impl Into<String>) -> ConfigError {
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
        let loc = Locator { path, text };
        let file: FileConfig = toml::from_str(text).map_err(|e| loc.at(e.span(), e.message().trim_end()))?;

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
        let probe_sources = match file.probe_sources {
            Some(list) => Allowlist::new(list),
            None => Allowlist::new(vec![
                DEFAULT_PROBE_SOURCE
                    .parse()
                    .map_err(|e: String| loc.at(None, e))?,
            ]),
        };
        let drain_timeout = file.drain_timeout.map_or(DEFAULT_DRAIN_TIMEOUT, |d| d.0);
        let shutdown_grace = file.shutdown_grace.map_or(Duration::ZERO, |d| d.0);
        let health = resolve_health(&loc, file.health, &probe_sources)?;
        let nat = resolve_nat(&loc, file.nat)?;
        let splice = file.splice.unwrap_or(true);
        let file_routes = file.route;
        let defaults = gather_tunables!(file);

        if file_routes.is_empty() {
            return Err(loc.at(None, "no [[route]] is configured: ferryd would listen on nothing"));
        }

        let mut routes: Vec<(Route, Range<usize>)> = Vec::with_capacity(file_routes.len());
        for spanned in file_routes {
            let route_span = spanned.span();
            let raw = spanned.into_inner();
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
            if let Some((other, other_span)) = routes.iter().find(|(r, _)| listens_overlap(r.listen, listen))
            {
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
            let own = gather_tunables!(raw);
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
            health,
            nat,
            routes: routes.into_iter().map(|(r, _)| r).collect(),
        })
    }

    /// The effective configuration as TOML, every default written out. Feeding this text back to
    /// [`Config::parse`] gives the same configuration, which is what `ferryd check` prints.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "probe_sources = {}", cidr_list(&self.probe_sources));
        let _ = writeln!(out, "drain_timeout = {}", duration(self.drain_timeout));
        let _ = writeln!(out, "workers = {}", self.workers);
        let _ = writeln!(out, "splice = {}", self.splice);
        let _ = writeln!(out, "max_pipes = {}", self.max_pipes);
        let _ = writeln!(out, "shutdown_grace = {}", duration(self.shutdown_grace));
        let _ = writeln!(out, "\n[health]");
        let _ = writeln!(out, "listen = {}", quoted(&self.health.listen.to_string()));
        let _ = writeln!(out, "path = {}", quoted(&self.health.path));
        let _ = writeln!(out, "allow = {}", cidr_list(&self.health.allow));
        let _ = writeln!(out, "metrics_allow = {}", cidr_list(&self.health.metrics_allow));
        let _ = writeln!(out, "require_nat = {}", self.health.require_nat);
        let nat = &self.nat;
        let _ = writeln!(out, "\n[nat]");
        let _ = writeln!(out, "enabled = {}", nat.enabled);
        let sources: Vec<String> = nat.sources.iter().map(|c| quoted(&c.to_string())).collect();
        let _ = writeln!(out, "sources = [{}]", sources.join(", "));
        match &nat.out_interface {
            Some(name) => {
                let _ = writeln!(out, "out_interface = {}", quoted(name));
            }
            None => {
                let _ = writeln!(out, "# out_interface: the interface of the IPv4 default route");
            }
        }
        if let Some(list) = &nat.allow_destinations {
            let items: Vec<String> = list.iter().map(|d| quoted(&d.to_string())).collect();
            let _ = writeln!(out, "allow_destinations = [{}]", items.join(", "));
        }
        let _ = writeln!(out, "reconcile_interval = {}", duration(nat.reconcile_interval));
        for route in &self.routes {
            let _ = writeln!(out, "\n[[route]]");
            let _ = writeln!(out, "name = {}", quoted(&route.name));
            let _ = writeln!(out, "listen = {}", quoted(&route.listen.to_string()));
            let _ = writeln!(out, "upstream = {}", quoted(&route.upstream.to_string()));
            let _ = writeln!(out, "allow = {}", cidr_list(&route.allow));
            let _ = writeln!(out, "connect_timeout = {}", duration(route.connect_timeout));
            let _ = writeln!(
                out,
                "idle_timeout = {}",
                duration(route.idle_timeout.unwrap_or(Duration::ZERO))
            );
            let _ = writeln!(out, "fin_timeout = {}", duration(route.fin_timeout));
            let _ = writeln!(out, "max_connections = {}", route.max_connections);
            let _ = writeln!(out, "keepalive_time = {}", duration(route.keepalive.time));
            let _ = writeln!(out, "keepalive_interval = {}", duration(route.keepalive.interval));
            let _ = writeln!(out, "keepalive_probes = {}", route.keepalive.probes);
        }
        out
    }
}

/// Two listen addresses collide when they share a port and either is the same address or a
/// wildcard of the same family (binding both would fail with "address in use").
fn listens_overlap(a: SocketAddr, b: SocketAddr) -> bool {
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
    let loopback = || -> Vec<Cidr> { LOOPBACK.iter().filter_map(|c| c.parse().ok()).collect() };
    let (span, file) = match file {
        Some(f) => {
            let span = f.span();
            (Some(span), f.into_inner())
        }
        None => (
            None,
            FileHealth {
                listen: None,
                path: None,
                allow: None,
                metrics_allow: None,
                require_nat: None,
            },
        ),
    };
    let listen = match file.listen {
        Some(addr) => addr.0,
        None => DEFAULT_HEALTH_LISTEN
            .parse()
            .map_err(|_| loc.at(span.clone(), "internal error: bad default health address"))?,
    };
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
        Some(p) if ["/metrics", "/status"].contains(&p.get_ref().as_str()) => {
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
    Ok(Nat {
        enabled,
        sources,
        out_interface,
        allow_destinations: file.allow_destinations,
        reconcile_interval,
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
    })
}

fn quoted(text: &str) -> String {
    toml::Value::String(text.to_string()).to_string()
}

fn duration(d: Duration) -> String {
    quoted(&humantime::format_duration(d).to_string())
}

fn cidr_list(list: &Allowlist) -> String {
    let items: Vec<String> = list.blocks().iter().map(|b| quoted(&b.to_string())).collect();
    format!("[{}]", items.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    const MINIMAL: &str = r#"
allow = ["10.0.0.0/24"]

[[route]]
name = "ssh"
listen = "0.0.0.0:60001"
upstream = "10.0.1.4:22"
"#;

    #[test]
    fn minimal_file_gets_documented_defaults() {
        let config = parse(MINIMAL).unwrap();
        let route = &config.routes[0];
        assert_eq!(route.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(route.idle_timeout, Some(DEFAULT_IDLE_TIMEOUT));
        assert_eq!(route.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(route.keepalive.time, Duration::from_secs(60));
        assert!(route.allow.contains("10.0.0.9".parse().unwrap()));
        assert!(config.probe_sources.contains("168.63.129.16".parse().unwrap()));
        assert_eq!(config.drain_timeout, DEFAULT_DRAIN_TIMEOUT);
    }

    #[test]
    fn route_settings_override_top_level_defaults() {
        let config = parse(
            r#"
allow = ["10.0.0.0/24"]
idle_timeout = "10m"
[[route]]
name = "a"
listen = "0.0.0.0:1"
upstream = "10.0.1.4:22"
allow = ["192.0.2.0/24"]
idle_timeout = "0s"
[[route]]
name = "b"
listen = "0.0.0.0:2"
upstream = "buildvm.internal:5986"
"#,
        )
        .unwrap();
        assert!(!config.routes[0].allow.contains("10.0.0.9".parse().unwrap()));
        assert_eq!(config.routes[0].idle_timeout, None);
        assert_eq!(config.routes[1].idle_timeout, Some(Duration::from_secs(600)));
        assert_eq!(
            config.routes[1].upstream,
            Upstream::Host {
                host: "buildvm.internal".into(),
                port: 5986
            }
        );
    }

    #[test]
    fn effective_configuration_round_trips() {
        let config = parse(MINIMAL).unwrap();
        let again = parse(&config.to_toml()).unwrap();
        assert_eq!(config, again);
    }

    fn error_of(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_place_and_the_problem() {
        let bad_cidr = error_of(&MINIMAL.replace("10.0.0.0/24", "10.0.0.0/33"));
        assert!(bad_cidr.starts_with("test.toml:2:"), "{bad_cidr}");
        assert!(bad_cidr.contains("invalid CIDR \"10.0.0.0/33\""), "{bad_cidr}");

        let unknown = error_of(&format!("{MINIMAL}colour = \"blue\"\n"));
        assert!(unknown.contains("unknown field `colour`"), "{unknown}");
        assert!(unknown.starts_with("test.toml:8:"), "{unknown}");

        let duplicate = error_of(&format!(
            "{MINIMAL}[[route]]\nname = \"two\"\nlisten = \"0.0.0.0:60001\"\nupstream = \"10.0.1.4:5986\"\n"
        ));
        assert!(duplicate.contains("already used by route \"ssh\""), "{duplicate}");
        assert!(duplicate.starts_with("test.toml:10:"), "{duplicate}");

        let no_allow = error_of(&MINIMAL.replace("allow = [\"10.0.0.0/24\"]", ""));
        assert!(no_allow.contains("has no allow list"), "{no_allow}");

        let huge = error_of(&format!("{MINIMAL}idle_timeout = \"300000000000y\"\n"));
        assert!(huge.contains("longer than ten years"), "{huge}");

        let bad_duration = error_of(&format!("{MINIMAL}connect_timeout = \"5 parsecs\"\n"));
        assert!(
            bad_duration.contains("invalid duration \"5 parsecs\""),
            "{bad_duration}"
        );

        let port_zero = error_of(&MINIMAL.replace("10.0.1.4:22", "10.0.1.4:0"));
        assert!(port_zero.contains("port 0"), "{port_zero}");

        let empty_name = error_of(&MINIMAL.replace("\"ssh\"", "\"\""));
        assert!(empty_name.contains("route name is empty"), "{empty_name}");
    }

    #[test]
    fn health_defaults_to_probe_sources_and_loopback() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.health.listen, DEFAULT_HEALTH_LISTEN.parse().unwrap());
        assert_eq!(config.health.path, "/healthz");
        assert!(config.health.allow.contains("168.63.129.16".parse().unwrap()));
        assert!(config.health.allow.contains("127.0.0.1".parse().unwrap()));
        assert!(!config.health.allow.contains("10.0.0.9".parse().unwrap()));
        assert!(config.health.metrics_allow.contains("::1".parse().unwrap()));
        assert!(
            !config
                .health
                .metrics_allow
                .contains("168.63.129.16".parse().unwrap())
        );
        let clash = error_of(&MINIMAL.replace("0.0.0.0:60001", "127.0.0.1:60080"));
        assert!(clash.contains("collides with the health endpoint"), "{clash}");
    }

    #[test]
    fn nat_table_is_validated() {
        let nat = |body: &str| parse(&format!("{MINIMAL}\n[nat]\n{body}\n"));
        let config = nat("sources = [\"10.0.1.4/32\"]\nallow_destinations = [\"0.0.0.0/0:443\", \"192.0.2.0/24:8000-8100\", \"198.51.100.7\"]").unwrap();
        assert!(config.nat.enabled);
        let dests = config.nat.allow_destinations.clone().unwrap();
        assert_eq!(dests[0].ports, Some((443, 443)));
        assert_eq!(dests[1].ports, Some((8000, 8100)));
        assert_eq!(dests[2].ports, None);
        assert_eq!(parse(&config.to_toml()).unwrap(), config);
        assert!(!parse(MINIMAL).unwrap().nat.enabled);
        for (body, want) in [
            ("enabled = true", "needs sources"),
            ("sources = [\"2001:db8::1\"]", "IPv4 only"),
            (
                "sources = [\"10.0.1.4\"]\nallow_destinations = [\"0.0.0.0/0:0\"]",
                "not a port",
            ),
            (
                "sources = [\"10.0.1.4\"]\nallow_destinations = [\"0.0.0.0/0:90-80\"]",
                "backwards",
            ),
            (
                "sources = [\"10.0.1.4\"]\nout_interface = \"eth0; rm -rf\"",
                "not an interface name",
            ),
        ] {
            let e = nat(body).unwrap_err().to_string();
            assert!(e.contains(want), "{body}: {e}");
        }
    }

    #[test]
    fn wildcard_listen_collides_with_specific_address() {
        assert!(listens_overlap(
            "0.0.0.0:1".parse().unwrap(),
            "10.0.0.1:1".parse().unwrap()
        ));
        assert!(listens_overlap(
            "[::]:1".parse().unwrap(),
            "10.0.0.1:1".parse().unwrap()
        ));
        assert!(!listens_overlap(
            "10.0.0.2:1".parse().unwrap(),
            "10.0.0.1:1".parse().unwrap()
        ));
        assert!(!listens_overlap(
            "0.0.0.0:1".parse().unwrap(),
            "0.0.0.0:2".parse().unwrap()
        ));
    }
}
