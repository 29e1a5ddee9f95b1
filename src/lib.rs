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
//! - [`connections`]: the table of relayed connections (`/connections`, `ferryd connections`)
//!   and [`control`], the local socket through which a privileged user ends one;
//! - [`daemon`]: start-up, reload, drain and the live upgrade's steps;
//! - [`signals`]: the signals the daemon acts on, taken from a signalfd;
//! - [`handover`]: the live upgrade's document, its check and the exec into the next binary;
//! - [`shutdown`]: the drain and park signal passed to each connection;
//! - [`state`]: the daemon's shared state and counters, which every part below reads;
//! - [`health`], [`metrics`], [`status`]: the probe endpoint, /metrics, and the /status
//!   document's format;
//! - [`nat`]: the build VM's egress through IP forwarding and MASQUERADE;
//! - [`systemd`]: notify, watchdog, socket activation, unit state over D-Bus;
//! - [`net`], [`logging`]: socket options and the accept loop, log sinks and rate limits;
//! - [`subprocess`]: external commands with a bound on their life;
//! - [`cli`] and [`commands`]: the command line, and what each operator command does (`check`,
//!   `nat`, `status`, `upgrade`, `doctor`, `connections`, and `run`, the daemon's process).

// The library exists for the binary, its tests and its benchmark: its documentation is read with
// --document-private-items (CI builds it so, with -D warnings), where links to private modules
// resolve.
#![allow(rustdoc::private_intra_doc_links)]

pub mod allow;
pub mod cli;
pub mod commands;
pub mod config;
pub mod connections;
mod control;
pub mod daemon;
#[cfg(feature = "test-faults")]
mod faults;
pub mod handover;
mod health;
pub mod logging;
mod metrics;
pub mod nat;
mod net;
pub mod proxy_header;
mod relay;
mod route;
mod shutdown;
pub mod signals;
mod state;
pub mod status;
mod subprocess;
mod systemd;
mod upstream;
