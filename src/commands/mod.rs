//! The operator's commands, one file each: what `ferryd <command>` does after the command line
//! is parsed (`crate::cli` defines it; `main` only dispatches here).
//!
//! - [`run`]: the relay daemon and the NAT keeper as processes (what must happen while the
//!   process has one thread, the exit code systemd reads);
//! - [`check`]: the configuration and the handover check a live upgrade asks of a new binary;
//! - [`nat`]: `ferryd nat up|down|status` by hand;
//! - [`status`], [`upgrade`], [`doctor`], [`connections`]: questions to the running daemon, all
//!   through one [`client`] of its health endpoint (`connections --close` through the control
//!   socket).
//!
//! "Upgrade" lives in three places, by role: [`upgrade`] asks, `crate::daemon` decides and
//! parks, `crate::handover` crosses. Commands ask and print; they must not reach into the
//! daemon's state other than through its endpoints.

pub mod check;
pub mod client;
pub mod connections;
pub mod doctor;
pub mod nat;
pub mod run;
pub mod status;
pub mod upgrade;

/// sysexits.h's EX_CONFIG: the configuration is invalid. The unit lists it in
/// RestartPreventExitStatus=, so a bad file stops the service with its message instead of
/// restarting it until the start limit.
pub const EX_CONFIG: u8 = 78;
