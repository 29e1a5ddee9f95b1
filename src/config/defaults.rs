//! Every default of the configuration, with the reason for its value, and the bounds the
//! validation enforces. Typed constants: nothing here is parsed at run time.
//!
//! This module owns numbers and their reasons only; it must not validate or read anything.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use crate::allow::Cidr;

/// Where `ferryd run` and `ferryd check` look when `--config` is not given; the Debian package
/// installs its conffile here.
pub const DEFAULT_PATH: &str = "/etc/ferryd/ferryd.toml";

/// Azure's health prober and platform address. Probes always come from here, even through
/// Private Link, so a configuration that forgets `probe_sources` still answers them locally.
pub const DEFAULT_PROBE_SOURCE: Cidr = Cidr::v4(Ipv4Addr::new(168, 63, 129, 16), 32);

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

/// Each pipe holds up to 256 pages (1 MiB) of kernel memory and two fds. 48 pipes use three
/// quarters of the default per-user pipe budget (fs.pipe-user-pages-soft, 16384 pages), past
/// which the kernel refuses to enlarge pipes and hands out small ones. Only connection
/// directions with bytes in flight hold a pipe, so this bounds busy transfers (24 bulk copies
/// both ways at once, far more than a builder runs), not open connections; beyond it data is
/// copied through a buffer instead.
pub const DEFAULT_MAX_PIPES: usize = 48;

/// The health endpoint's port when `[health]` is absent: next to the relay ports. Like them it
/// lies in Linux's default ephemeral range (32768-60999); the package reserves all three with
/// net.ipv4.ip_local_reserved_ports, and a busy bind is retried at start.
pub const DEFAULT_HEALTH_LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 60080));

/// The path the load balancer's HTTP probe asks for.
pub const DEFAULT_HEALTH_PATH: &str = "/healthz";

/// Loopback, which may always read the health endpoint, /metrics and /status unless the file says
/// otherwise, so an operator on the VM can look without editing anything.
pub const LOOPBACK: [Cidr; 2] = [
    Cidr::v4(Ipv4Addr::new(127, 0, 0, 0), 8),
    Cidr::v6(Ipv6Addr::LOCALHOST, 128),
];

/// How often the NAT rules are compared with the live tables. Other tools (ufw reloads, a
/// hand-typed flush) change them rarely; 30 s repairs drift well before a build notices failed
/// downloads, at the cost of two iptables-save runs.
pub const DEFAULT_RECONCILE_INTERVAL: Duration = Duration::from_secs(30);

/// Where the relay listens for local commands (`ferryd connections --close`): the runtime
/// directory systemd makes for ferryd.service (RuntimeDirectory=ferryd, mode 0750, owned by the
/// ferryd user and group). The socket is mode 0660, so only root, the ferryd user and members
/// of the ferryd group can connect.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/ferryd/control.sock";

/// Where the NAT keeper publishes NAT's state: the runtime directory systemd makes for
/// ferryd-nat.service (RuntimeDirectory=ferryd-nat), owned by the ferryd user, readable by the
/// relay; tmpfs, so a stale file never outlives a reboot.
pub const DEFAULT_NAT_REPORT_FILE: &str = "/run/ferryd-nat/state.json";

/// What `ferryd doctor` reaches for to tell whether the proxy VM has a way out: a name (so the
/// resolver is tried too) that is up, on the port every egress allows.
pub const DEFAULT_CHECK_TARGET: &str = "www.microsoft.com:443";

/// Linux caps TCP_KEEPIDLE and TCP_KEEPINTVL at 32767 s: a longer value would be refused by the
/// kernel at run time instead of by `ferryd check`.
pub const MAX_KEEPALIVE_SECS: u64 = 32767;
/// Linux caps TCP_KEEPCNT at 127.
pub const MAX_KEEPALIVE_PROBES: u32 = 127;

/// How long the whole PROXY v2 header may take to arrive. The balancer sends it in the first
/// segment; 3 s covers a retransmission or two, and bounds a client that connects and says
/// nothing (SSH's client waits for the server, so it would otherwise hang until idle_timeout).
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(3);

/// The longest duration accepted anywhere: far beyond any useful timeout, and far inside what a
/// monotonic clock can add without overflowing.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
