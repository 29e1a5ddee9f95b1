//! Socket activation (sd_listen_fds(3)): listening sockets passed by systemd in fds 3.., named by
//! LISTEN_FDNAMES, taken for the routes and the health endpoint instead of binding, so a restart
//! never refuses a connection.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use socket2::Socket;

/// The first passed descriptor, by the protocol.
const FIRST_FD: RawFd = 3;

/// Sockets systemd passed and nobody has claimed yet.
#[derive(Debug, Default)]
pub struct Passed {
    sockets: Vec<(String, TcpListener)>,
    /// Sockets handed over by the previous program image of a live upgrade are claimed the same
    /// way; the log says which.
    handed_over: bool,
}

impl Passed {
    /// Takes the passed sockets named by LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES, as
    /// the daemon took them out of the environment (so no child process inherits
    /// them). Nothing is passed when LISTEN_PID is not this process.
    pub fn from_vars(pid: Option<String>, fds: Option<String>, names: Option<String>) -> Passed {
        let mine = pid.map(|p| p.trim() == std::process::id().to_string());
        let count: Option<RawFd> = fds.and_then(|n| n.trim().parse().ok());
        let names = names.unwrap_or_default();
        let (Some(true), Some(count)) = (mine, count) else {
            return Passed::default();
        };
        let names: Vec<&str> = names.split(':').collect();
        let mut sockets = Vec::new();
        for i in 0..count.max(0) {
            let fd = FIRST_FD + i;
            // SAFETY: systemd passes fds 3..3+LISTEN_FDS to this process and nothing else owns them.
            let socket = Socket::from(unsafe { OwnedFd::from_raw_fd(fd) });
            let name = names.get(i as usize).copied().unwrap_or("").to_string();
            let usable = socket.set_cloexec(true).is_ok()
                && socket.set_nonblocking(true).is_ok()
                && socket.is_listener().unwrap_or(false);
            if !usable {
                tracing::warn!(
                    fd,
                    name,
                    "passed descriptor is not a listening socket; ignoring it"
                );
                continue;
            }
            sockets.push((name, TcpListener::from(socket)));
        }
        Passed {
            sockets,
            handed_over: false,
        }
    }

    /// Adds listening sockets handed over by the previous program image of a live upgrade, under
    /// the names it used; they are claimed like the ones systemd passes.
    pub fn adopt(&mut self, sockets: Vec<(String, TcpListener)>) {
        for (name, listener) in sockets {
            if let Err(e) = listener.set_nonblocking(true) {
                tracing::warn!(name, error = %e, "a handed-over listening socket is unusable; closing it");
                continue;
            }
            self.sockets.push((name, listener));
        }
        self.handed_over = true;
    }

    /// Takes the socket bound to `addr`: the one passed under `name` when its address is still
    /// `addr`, or failing that any passed socket bound to `addr` (returned with the name it was
    /// passed under). A socket passed under `name` but bound elsewhere (the address changed in
    /// the file before a restart) is not used: it stays unclaimed and is closed.
    pub fn claim(&mut self, name: &str, addr: SocketAddr) -> Option<(TcpListener, String)> {
        let bound_to = |l: &TcpListener| l.local_addr().is_ok_and(|local| local == addr);
        let index = self
            .sockets
            .iter()
            .position(|(n, l)| n == name && bound_to(l))
            .or_else(|| self.sockets.iter().position(|(_, l)| bound_to(l)))?;
        let (passed_name, listener) = self.sockets.remove(index);
        if self.handed_over {
            tracing::info!(name, passed_name, listen = %addr, "using the socket handed over by the previous program image");
        } else {
            tracing::info!(name, passed_name, listen = %addr, "using the socket passed by systemd");
        }
        Some((listener, passed_name))
    }

    /// Closes the sockets nobody claimed, saying so; returns the names they were passed under,
    /// for the caller to remove them from systemd's fd store too (or their ports stay open there).
    pub fn close_unclaimed(&mut self) -> Vec<String> {
        self.sockets
            .drain(..)
            .map(|(name, listener)| {
                tracing::warn!(name, local = ?listener.local_addr().ok(), "a passed socket matches no route (or its address changed); closing it");
                name
            })
            .collect()
    }
}
