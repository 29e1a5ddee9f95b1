//! The command line: subcommands and their options, kept apart from `main` so the man page and
//! tests can be generated from the same definition.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::DEFAULT_PATH;

/// ferryd relays the load balancer's SSH and WinRM connections to the build VM.
#[derive(Debug, Parser)]
#[command(name = "ferryd", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay daemon in the foreground (as systemd starts it).
    ///
    /// Logs go to journald when started by systemd, to stderr otherwise; FERRYD_LOG sets the
    /// level (error, warn, info, debug, trace). SIGHUP reloads the file; SIGTERM drains. Exits 78
    /// (EX_CONFIG) when the configuration is invalid, so systemd does not restart it in a loop.
    Run {
        /// The configuration file.
        #[arg(short, long, value_name = "PATH", default_value = DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Validate the configuration and print the effective routes, every default filled in.
    ///
    /// Exits 0 when the file is valid (the effective configuration goes to stdout, as TOML that
    /// ferryd accepts), 1 when it is not (the reason, with file, line and key, goes to stderr).
    Check {
        /// The configuration file.
        #[arg(short, long, value_name = "PATH", default_value = DEFAULT_PATH)]
        config: PathBuf,
        /// Only validate: print nothing when the file is valid (for ExecReload=).
        #[arg(short, long)]
        quiet: bool,
    },
    /// Manage the build VM's egress NAT (needs CAP_NET_ADMIN and CAP_NET_RAW).
    Nat {
        /// What to do.
        #[command(subcommand)]
        action: NatAction,
    },
    /// Summarize the running daemon (from its /status) and its systemd unit (over D-Bus).
    ///
    /// Exits 0 when both answered, 1 when the daemon did not, 2 when only systemd could not be
    /// asked (no system bus, or the unit is unknown).
    Status {
        /// The configuration file (to find the health endpoint).
        #[arg(short, long, value_name = "PATH", default_value = DEFAULT_PATH)]
        config: PathBuf,
        /// The systemd unit to ask about.
        #[arg(long, default_value = "ferryd.service")]
        unit: String,
    },
    /// List the relayed connections (from the daemon's /connections), oldest first, or end one.
    ///
    /// One line per connection: id (conn= in the log), route, client (the PROXY header's client
    /// when there is one), upstream, age, time since the last byte, bytes each way, each
    /// direction's state (open, half-closed, parked), mode (splice, copy) and the bytes it holds,
    /// and when the idle or fin timer would end it. Exits 0 when the daemon answered, 1 when it
    /// did not or refused.
    Connections {
        /// The configuration file (to find the health endpoint and the control socket).
        #[arg(short, long, value_name = "PATH", default_value = DEFAULT_PATH)]
        config: PathBuf,
        /// Only this route's connections.
        #[arg(long, value_name = "NAME")]
        route: Option<String>,
        /// Print the JSON array the daemon serves instead of the table.
        #[arg(long)]
        json: bool,
        /// End connection ID now, both sides reset (logged with end="closed-by-admin"). Needs
        /// root or membership of the daemon's group: it goes through the control socket.
        #[arg(long, value_name = "ID", conflicts_with_all = ["route", "json"])]
        close: Option<u64>,
    },
    /// Check everything around the proxy VM that the relay depends on, and say what to fix.
    ///
    /// One line per check: ok, warn or FAIL, the check, what was seen, and the fix. Exits 0 when
    /// nothing failed, 1 otherwise. Works without the daemon and without root (those checks
    /// then say what they could not look at).
    Doctor {
        /// The configuration file.
        #[arg(short, long, value_name = "PATH", default_value = DEFAULT_PATH)]
        config: PathBuf,
        /// Print a JSON array of {check, status, detail, fix} instead.
        #[arg(long)]
        json: bool,
    },
    /// Hand the running daemon over to the binary now at its path, without dropping a connection.
    ///
    /// Finds the daemon through the health endpoint named in the configuration, sends it SIGUSR2
    /// and waits for the outcome: the new binary first checks the configuration and the hand-over
    /// format, and if it cannot take over nothing changes. Every listener and live connection
    /// moves to the new binary in the same process (same PID). Exits 0 when the upgrade
    /// completed, 1 with the reason when it did not.
    Upgrade {
        /// The configuration file (to find the health endpoint).
        #[arg(short, long, value_name = "PATH", default_value = DEFAULT_PATH)]
        config: PathBuf,
        /// How long to wait for the outcome, in seconds.
        #[arg(long, value_name = "SECONDS", default_value_t = 60)]
        timeout: u64,
    },
    /// Print the hand-over format versions this binary reads, once the configuration checks: what
    /// a running daemon asks the binary at its path before a live upgrade.
    #[command(hide = true, name = "handover-check")]
    HandoverCheck {
        /// The configuration file.
        #[arg(short, long, value_name = "PATH", default_value = DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Print a shell completion script (the package installs them for bash and zsh).
    #[command(hide = true)]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// `ferryd nat` actions.
#[derive(Debug, Subcommand)]
pub enum NatAction {
    /// Run the NAT keeper in the foreground (as ferryd-nat.service starts it): keep the rules in
    /// place, repair drift every reconcile_interval, and publish NAT's state for the relay at
    /// \[nat\] report_file. Needs CAP_NET_ADMIN and CAP_NET_RAW; opens no socket to the network.
    Run {
        /// The configuration file.
        #[arg(short, long, value_name = "PATH", default_value = DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Turn on IP forwarding and install ferryd's NAT chains as configured; a second run changes
    /// nothing.
    Up {
        /// The configuration file.
        #[arg(short, long, value_name = "PATH", default_value = DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Remove every ferryd rule and chain, and restore ip_forward if ferryd changed it.
    Down {
        /// Accepted like the other commands' and not needed: everything ferryd owns is removed,
        /// whatever the file says (so package removal can call it with a broken file).
        #[arg(short, long, value_name = "PATH", default_value = DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Show the rules with their counters, ip_forward, the uplink, and whether the live state
    /// matches the configuration: exit 0 when it does, 1 when it has drifted (or NAT is off in
    /// the file), 2 when it cannot be checked (iptables missing, not privileged, a bad file).
    Status {
        /// The configuration file.
        #[arg(short, long, value_name = "PATH", default_value = DEFAULT_PATH)]
        config: PathBuf,
    },
}
