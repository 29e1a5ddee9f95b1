//! What a daemon inherits through its environment: systemd's NOTIFY_SOCKET and LISTEN_* (socket
//! activation and the fd store), and a live upgrade's hand-over. All of them are read and removed
//! in one place, first thing, while the process has one thread: removing an environment variable
//! is only sound then, and no child process (iptables) may inherit them.

use std::ffi::OsString;

use crate::handover;

/// The environment variables the daemon takes, as they were.
#[derive(Debug, Default)]
pub struct Inherited {
    /// NOTIFY_SOCKET.
    pub(super) notify_socket: Option<OsString>,
    /// LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES.
    pub(super) listen: (Option<String>, Option<String>, Option<String>),
    /// The hand-over's memfd ([`handover::ENV`]).
    pub(super) handover: Option<OsString>,
}

impl Inherited {
    /// systemd's NOTIFY_SOCKET, for a process that takes nothing else (the NAT keeper).
    pub fn notify_socket(self) -> Option<OsString> {
        self.notify_socket
    }

    /// Reads and removes the variables. Call it before any other thread exists (`ferryd run`
    /// does, before logging starts its writer thread).
    pub fn take() -> Inherited {
        let text = |key: &str| std::env::var(key).ok();
        let taken = Inherited {
            notify_socket: std::env::var_os("NOTIFY_SOCKET"),
            listen: (text("LISTEN_PID"), text("LISTEN_FDS"), text("LISTEN_FDNAMES")),
            handover: std::env::var_os(handover::ENV),
        };
        for key in [
            "NOTIFY_SOCKET",
            "LISTEN_PID",
            "LISTEN_FDS",
            "LISTEN_FDNAMES",
            handover::ENV,
        ] {
            // SAFETY: called while the process has a single thread (see above).
            unsafe { std::env::remove_var(key) };
        }
        taken
    }
}
