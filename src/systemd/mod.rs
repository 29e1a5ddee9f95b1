//! The systemd glue: the notify protocol (readiness, status, reload, stop, watchdog), socket
//! activation, and reading a unit's state over D-Bus for `ferryd status`.
//!
//! This module owns speaking systemd's protocols correctly and degrading to nothing when systemd
//! is not there (no NOTIFY_SOCKET, no LISTEN_FDS, no bus). It must not decide when the daemon is
//! ready or healthy: the daemon tells it.

pub mod activation;
pub mod notify;
pub mod unit;
