//! sd_notify(3) over $NOTIFY_SOCKET, and the watchdog thread that pings only while the relay
//! runtime is making progress.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::time::Duration;

use crate::state::State;

/// A connection to the service manager's notification socket, or nothing outside systemd.
#[derive(Debug)]
pub struct Notifier {
    /// NOTIFY_SOCKET as it was given, for the next program image of a live upgrade.
    name: Option<std::ffi::OsString>,
    target: Option<(UnixDatagram, SocketAddr)>,
    /// The same address for sendmsg(2), which passes descriptors to the fd store.
    fd_target: Option<nix::sys::socket::UnixAddr>,
}

impl Notifier {
    /// A notifier for NOTIFY_SOCKET as the daemon took it out of the
    /// environment (so no child process inherits it): a path, or an abstract socket written with
    /// a leading '@'.
    pub fn from_var(name: Option<std::ffi::OsString>) -> Notifier {
        let Some(name) = name else {
            return Notifier {
                name: None,
                target: None,
                fd_target: None,
            };
        };
        let given = name.clone();
        let name = name.to_string_lossy().into_owned();
        let addr = match name.strip_prefix('@') {
            Some(abstract_name) => SocketAddr::from_abstract_name(abstract_name.as_bytes()),
            None => SocketAddr::from_pathname(&name),
        };
        let target = match (addr, UnixDatagram::unbound()) {
            (Ok(addr), Ok(socket)) => Some((socket, addr)),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(socket = %name, error = %e, "NOTIFY_SOCKET is unusable; systemd will not hear from ferryd");
                None
            }
        };
        let fd_target = match name.strip_prefix('@') {
            Some(abstract_name) => nix::sys::socket::UnixAddr::new_abstract(abstract_name.as_bytes()).ok(),
            None => nix::sys::socket::UnixAddr::new(name.as_str()).ok(),
        };
        Notifier {
            name: Some(given),
            target,
            fd_target,
        }
    }

    /// NOTIFY_SOCKET as this process was given it: a live upgrade puts it back into the next
    /// image's environment, which reads (and removes) it again.
    pub fn socket_name(&self) -> Option<&std::ffi::OsStr> {
        self.name.as_deref()
    }

    /// Hands a listening socket to systemd's fd store under `name` (FDSTORE=1 with FDNAME=,
    /// systemd 233+; the unit sets FileDescriptorStoreMax=). The socket then outlives this
    /// process: across a restart, a crash or a watchdog kill, connections wait in its backlog
    /// and the next process takes it back (it arrives as a passed socket), so none is refused.
    /// Storing the same socket again is harmless: systemd keeps one copy.
    pub fn store_fd(&self, name: &str, fd: std::os::fd::BorrowedFd<'_>) {
        use std::os::fd::AsRawFd;
        let (Some((socket, _)), Some(addr)) = (&self.target, &self.fd_target) else {
            return;
        };
        let message = format!("FDSTORE=1\nFDNAME={name}");
        let fds = [fd.as_raw_fd()];
        let sent = nix::sys::socket::sendmsg(
            socket.as_raw_fd(),
            &[io::IoSlice::new(message.as_bytes())],
            &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
            nix::sys::socket::MsgFlags::empty(),
            Some(addr),
        );
        if let Err(e) = sent {
            tracing::warn!(name, error = %e, "cannot hand the listening socket to systemd's fd store; a restart will refuse connections while it lasts");
        }
    }

    /// Removes the socket stored under `name` (FDSTOREREMOVE=1, systemd 236+), so a route taken
    /// out by a reload really releases its port.
    pub fn remove_fd(&self, name: &str) {
        self.send(&format!("FDSTOREREMOVE=1\nFDNAME={name}"));
    }

    /// Sends one notification (newline-separated assignments). Failures are logged, never fatal.
    pub fn send(&self, message: &str) {
        if let Some((socket, addr)) = &self.target
            && let Err(e) = socket.send_to_addr(message.as_bytes(), addr)
        {
            tracing::warn!(error = %e, message, "cannot notify systemd");
        }
    }

    /// Every listener is bound.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    /// A one-line summary for `systemctl status`.
    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={status}"));
    }

    /// A reload begins. systemd 253+ wants the monotonic time with it; older versions ignore it.
    pub fn reloading(&self) {
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
    }

    /// The drain begins.
    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=draining");
    }

    /// Keep-alive for WatchdogSec=.
    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }
}

fn monotonic_usec() -> u128 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => Duration::from(ts).as_micros(),
        Err(_) => 0,
    }
}

/// The watchdog interval systemd asked for (WATCHDOG_USEC, when WATCHDOG_PID is absent or ours).
pub fn watchdog_interval() -> Option<Duration> {
    if std::env::var("WATCHDOG_PID").is_ok_and(|pid| pid.trim() != std::process::id().to_string()) {
        return None;
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Pings WATCHDOG=1 every half interval, but only while the relay runtime's heartbeat is fresh.
/// It runs on a plain thread, outside the runtime it watches: a stalled runtime or an accept
/// loop that died stops the heartbeat, the pings stop, and systemd restarts the daemon.
pub fn spawn_watchdog(notifier: Arc<Notifier>, state: Arc<State>, interval: Duration) -> io::Result<()> {
    let every = interval / 2;
    std::thread::Builder::new().name("ferryd-watchdog".into()).spawn(move || {
        let mut withholding = false;
        // The first ping goes at once: after a live upgrade, the previous image's last one may
        // be most of an interval old.
        let mut first = true;
        loop {
            if !first {
                std::thread::sleep(every);
            }
            first = false;
            let age = state.heartbeat_age();
            if age < every {
                if withholding {
                    tracing::info!("relay runtime is making progress again; watchdog pings resume");
                    withholding = false;
                }
                notifier.watchdog();
            } else if !withholding {
                tracing::error!(
                    heartbeat_age_ms = age.as_millis() as u64,
                    "relay runtime made no progress; withholding watchdog pings so systemd restarts ferryd"
                );
                withholding = true;
            }
        }
    })?;
    Ok(())
}
