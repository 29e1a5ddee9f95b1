//! ferryd: the forwarding daemon of an image builder's proxy VM.
//!
//! It listens where the internal load balancer sends the builder's SSH and WinRM connections,
//! admits only the balancer's sources, answers health probes itself, and relays everything else
//! to the build VM with splice(2). The modules, by role:
//!
//! - [`config`]: the file, its validation and defaults;
//! - [`allow`]: CIDR allowlists;
//! - [`route`]: a listener, admission, and each connection's life and log line;
//! - [`upstream`]: dialling the build VM;
//! - [`proxy_header`]: the PROXY protocol v2 header Private Link can put in front of a connection;
//! - [`relay`]: moving bytes both ways and ending a connection correctly;
//! - [`daemon`]: start-up, signals, reload and drain;
//! - [`shutdown`]: the drain signal passed to each connection;
//! - [`state`]: the daemon's shared state and counters, which every part below reads;
//! - [`health`], [`metrics`], [`status`]: the probe endpoint, /metrics, and the /status document
//!   with `ferryd status`;
//! - [`nat`]: the build VM's egress through IP forwarding and MASQUERADE;
//! - [`systemd`]: notify, watchdog, socket activation, unit state over D-Bus;
//! - [`net`], [`logging`]: socket options and the accept loop, log sinks and rate limits.

pub mod allow;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod doctor;
#[cfg(feature = "test-faults")]
mod faults;
mod health;
pub mod logging;
mod metrics;
pub mod nat;
mod net;
pub mod proxy_header;
mod relay;
mod route;
mod shutdown;
mod state;
pub mod status;
mod systemd;
mod upstream;
