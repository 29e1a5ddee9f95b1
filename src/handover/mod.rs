//! The live upgrade's hand-over between two program images of the same process: the check that
//! the binary now at ferryd's path can take over, the document that describes every descriptor
//! left open, the execve, and, in the new image, taking it all back.
//!
//! This module owns the crossing. The daemon decides when (SIGUSR2) and parks the connections
//! first (see `crate::shutdown` and `crate::relay`); this module turns what was parked into a
//! document in a memfd, clears close-on-exec on exactly the descriptors the document names, and
//! execs with the same PID and arguments. The new image finds the memfd in [`ENV`], reads the
//! document back ([`Incoming::from_var`]) and owns those descriptors again. It must not decide
//! anything about the connections themselves: their sockets and pipes go back to the route and
//! the relay as they were.

mod convert;
mod doc;
mod exec;

use std::ffi::OsString;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

pub use doc::{ACCEPTED, ConnectionEntry, Document, OpeningEntry, PipeEntry, Refused, SideEntry, VERSION};

use crate::relay::{OpenSide, Side};
use crate::route::{OpeningConnection, Parked as ParkedTask, ParkedConnection};

/// The environment variable that carries the document's descriptor number to the new image.
pub const ENV: &str = "FERRYD_HANDOVER_FD";

/// The hidden subcommand the running daemon runs on the binary at its path before handing over.
pub const CHECK_COMMAND: &str = "handover-check";

/// How long that check may take: it reads the configuration and prints a line.
const CHECK_LIMIT: Duration = Duration::from_secs(10);

/// Asks the binary at `exe` whether it can take over: it must check `config` and accept the
/// document version this binary writes. The reason, when it cannot, is the one the operator
/// reads (in the log, `/status` and `ferryd upgrade`).
pub fn check_next(exe: &Path, config: &Path) -> Result<(), String> {
    let program = exe.to_string_lossy();
    let config = config.to_string_lossy();
    let out =
        crate::subprocess::run_bounded(&program, &[CHECK_COMMAND, "--config", &config], None, CHECK_LIMIT)
            .map_err(|e| format!("the binary at {program} cannot take over: {e}"))?;
    let accepted = parse_versions(&out).ok_or_else(|| {
        format!(
            "the binary at {program} did not list the handover versions it reads (it printed {:?}); it predates live upgrade or is not ferryd",
            out.trim()
        )
    })?;
    if !accepted.contains(&VERSION) {
        return Err(format!(
            "the binary at {program} reads handover versions {accepted:?}, and this daemon writes version {VERSION}"
        ));
    }
    Ok(())
}

/// The line `ferryd handover-check` prints: "handover versions: 1 2".
pub fn versions_line() -> String {
    let versions: Vec<String> = ACCEPTED.iter().map(u32::to_string).collect();
    format!("handover versions: {}", versions.join(" "))
}

fn parse_versions(out: &str) -> Option<Vec<u32>> {
    let line = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("handover versions:"))?;
    line.split_whitespace().map(|v| v.parse().ok()).collect()
}

/// What the old image hands over, being assembled: the listeners, the parked connections and
/// the counters, each still owned here. The document that names their descriptors is written
/// only at the exec; if anything fails before the new image runs, [`Outgoing::exec`] gives all
/// of it back as an [`Incoming`], for this image to go on with.
pub struct Outgoing {
    parked_at_ns: u64,
    exe: std::path::PathBuf,
    listeners: Vec<(String, TcpListener)>,
    connections: Vec<ParkedConnection>,
    opening: Vec<OpeningConnection>,
    routes: std::collections::BTreeMap<String, serde_json::Value>,
    relay: serde_json::Value,
    daemon: serde_json::Value,
    not_moved: u64,
}

impl Outgoing {
    /// An empty hand-over whose pause began at `parked_at_ns` (CLOCK_MONOTONIC), from the
    /// binary first started as `exe`.
    pub fn new(parked_at_ns: u64, exe: &Path) -> Outgoing {
        Outgoing {
            parked_at_ns,
            exe: exe.to_path_buf(),
            listeners: Vec::new(),
            connections: Vec::new(),
            opening: Vec::new(),
            routes: Default::default(),
            relay: Default::default(),
            daemon: Default::default(),
            not_moved: 0,
        }
    }

    /// The counters to carry.
    pub fn counters(
        &mut self,
        routes: std::collections::BTreeMap<String, serde_json::Value>,
        relay: serde_json::Value,
        daemon: serde_json::Value,
    ) {
        self.routes = routes;
        self.relay = relay;
        self.daemon = daemon;
    }

    /// A listening socket, by the name it is claimed under (a route's, or the health endpoint's).
    pub fn listener(&mut self, name: &str, socket: TcpListener) {
        self.listeners.push((name.to_string(), socket));
    }

    /// A parked connection, in whichever phase it parked.
    pub fn connection(&mut self, parked: ParkedTask) {
        match parked {
            ParkedTask::Relaying(relaying) => self.connections.push(relaying),
            ParkedTask::Opening(opening) => self.opening.push(opening),
        }
    }

    /// Connections the park cost (reset instead of moved), for the new image's report.
    pub fn not_moved(&mut self, n: u64) {
        self.not_moved += n;
    }

    /// Connections to move, relaying or not yet.
    pub fn connections(&self) -> usize {
        self.connections.len() + self.opening.len()
    }

    /// Bytes on their way (read from one peer, not yet written to the other), in pipes or held.
    pub fn carried_bytes(&self) -> usize {
        self.connections
            .iter()
            .flat_map(|c| [&c.relay.progress.up, &c.relay.progress.down])
            .map(|side| match side {
                Side::Running(OpenSide {
                    carry: Some(carry), ..
                }) => carry.len(),
                _ => 0,
            })
            .sum()
    }

    /// Writes the document, lets exactly its descriptors cross, and execs `exe` with `args` and
    /// `env` (plus [`ENV`]). Returns only if the new image could not be started: with why, and
    /// with everything this hand-over held, close-on-exec again, for this image to take back.
    pub fn exec(
        self,
        exe: &Path,
        args: &[OsString],
        env: Vec<(OsString, OsString)>,
    ) -> (std::io::Error, Incoming) {
        let error = match self.exec_once(exe, args, &env) {
            Ok(never) => match never {},
            Err(e) => e,
        };
        (error, self.into_incoming())
    }

    fn exec_once(
        &self,
        exe: &Path,
        args: &[OsString],
        env: &[(OsString, OsString)],
    ) -> Result<std::convert::Infallible, std::io::Error> {
        #[cfg(feature = "test-faults")]
        crate::faults::before_handover();
        let doc = self.document();
        let bytes = doc.encode();
        // What the new image would refuse is never sent: this image goes on instead.
        Document::decode(&bytes).map_err(|e| std::io::Error::other(format!("this image's own {e}")))?;
        let memfd = exec::memfd_with(&bytes).map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot write the hand-over document: {e}"))
        })?;
        let crossing: Vec<RawFd> = doc.descriptors().into_iter().chain([memfd.as_raw_fd()]).collect();
        // No child may be forked while these are inheritable: it would hold every connection
        // open for as long as it runs (an iptables run of the NAT loop, for one).
        let _no_forks = crate::subprocess::forbid_forks();
        let made_inheritable = crossing
            .iter()
            .try_for_each(|fd| exec::inherit(*fd))
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot let a descriptor cross: {e}")));
        #[cfg(feature = "test-faults")]
        crate::faults::in_exec_window();
        let error = match made_inheritable {
            Ok(()) => {
                let mut env = env.to_vec();
                env.push((ENV.into(), memfd.as_raw_fd().to_string().into()));
                let e = exec::execve(exe, args, &env);
                std::io::Error::new(e.kind(), format!("cannot exec {}: {e}", exe.display()))
            }
            Err(e) => e,
        };
        for fd in &crossing {
            exec::keep_private(*fd);
        }
        Err(error)
    }

    /// Everything held, as the new image would have taken it: for this image to go on with.
    fn into_incoming(self) -> Incoming {
        Incoming {
            listeners: self.listeners,
            connections: self.connections,
            opening: self.opening,
            routes: self.routes,
            relay: self.relay,
            daemon: self.daemon,
            written_by: env!("CARGO_PKG_VERSION").to_string(),
            parked_at_ns: self.parked_at_ns,
            exe: self.exe,
            not_moved: self.not_moved,
        }
    }
}

/// What the new image takes back from the previous one.
#[derive(Debug)]
pub struct Incoming {
    /// Listening sockets by name.
    pub listeners: Vec<(String, TcpListener)>,
    /// Parked connections, their sockets and pipes owned again.
    pub connections: Vec<ParkedConnection>,
    /// Admitted connections that were not relaying yet.
    pub opening: Vec<OpeningConnection>,
    /// Counters by route name.
    pub routes: std::collections::BTreeMap<String, serde_json::Value>,
    /// The relay engine's counters.
    pub relay: serde_json::Value,
    /// The daemon's counters.
    pub daemon: serde_json::Value,
    /// The ferryd version that handed over.
    pub written_by: String,
    /// CLOCK_MONOTONIC when the pause began.
    pub parked_at_ns: u64,
    /// The binary's path as first started: what the next upgrade execs.
    pub exe: std::path::PathBuf,
    /// Connections the park cost (reset instead of moved), counted by the previous image, and by
    /// this one as it takes over.
    pub not_moved: u64,
}

impl Drop for Incoming {
    /// Connections not taken over (the daemon stopped during start-up, or failed to start) are
    /// reset: a FIN could pass for an orderly end with bytes still in a carried pipe.
    fn drop(&mut self) {
        for parked in self.connections.drain(..) {
            parked.relay.reset();
        }
        for opening in self.opening.drain(..) {
            crate::net::reset(opening.client);
        }
    }
}

impl Incoming {
    /// Takes the hand-over named by [`ENV`] (as the daemon took it out of the
    /// environment, so no child inherits it), if any. `None`: a normal start. An error: there was
    /// a document and it was refused; everything the previous image left open has then been
    /// closed (connected sockets reset, never closed with a FIN) but its listening sockets, and
    /// the daemon starts afresh on those.
    pub fn from_var(value: Option<OsString>) -> Option<Result<Incoming, Refusal>> {
        let value = value?;
        let mut daemon = None;
        let taken = take(&value, &mut daemon).map_err(|reason| {
            let (closed, listeners) = exec::close_inherited();
            tracing::warn!(
                closed,
                listeners = listeners.len(),
                "closed the connections the previous program image left open (reset) and kept its listening sockets"
            );
            Refusal {
                reason,
                daemon,
                listeners,
            }
        });
        Some(taken)
    }

    /// Milliseconds from the start of the pause to now.
    pub fn pause_ms(&self) -> u64 {
        monotonic_ns().saturating_sub(self.parked_at_ns) / 1_000_000
    }
}

/// A hand-over this image refused: why, and the daemon's counters if the document had them in a
/// form this image reads (so the upgrade's report and the counters go on).
#[derive(Debug)]
pub struct Refusal {
    /// Why.
    pub reason: String,
    /// The previous image's daemon counters (as [`crate::state::carry`] wrote them), when the
    /// document could be read that far.
    pub daemon: Option<serde_json::Value>,
    /// The listening sockets the previous image left open, to be claimed by their address.
    pub listeners: Vec<TcpListener>,
}

/// Reads and takes the document. When it is refused, `salvaged` gets the daemon's counters if
/// the document has them in a form this image reads.
fn take(value: &std::ffi::OsStr, salvaged: &mut Option<serde_json::Value>) -> Result<Incoming, String> {
    let fd: RawFd = value
        .to_str()
        .and_then(|v| v.trim().parse().ok())
        .filter(|fd| *fd > 2 && exec::inherited(*fd))
        .ok_or_else(|| format!("{ENV}={value:?} names no open descriptor"))?;
    // SAFETY: the previous image created this memfd for us and nothing else in this image owns it.
    let memfd = unsafe { OwnedFd::from_raw_fd(fd) };
    let bytes =
        exec::read_all(memfd, doc::MAX_LEN).map_err(|e| format!("cannot read the handover document: {e}"))?;
    let doc = Document::decode(&bytes).map_err(|e| {
        *salvaged = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|mut value| Some(value.get_mut("daemon")?.take()));
        e.to_string()
    })?;
    // Only descriptors the previous image let cross: open, and not close-on-exec (everything this
    // image opened itself is), so a stale or stray document cannot take one of this image's own.
    if let Some(fd) = doc.descriptors().into_iter().find(|fd| !exec::inherited(*fd)) {
        *salvaged = Some(doc.daemon.clone());
        return Err(format!(
            "the handover document names descriptor {fd}, which is not one the previous image left open"
        ));
    }
    // SAFETY: `decode` checked that each number is above 2 and named once, and each was just
    // found open and inheritable: the previous image left it open for this one, which owns
    // nothing else under these numbers (everything it opens itself is close-on-exec).
    Ok(unsafe { convert::from_document(doc) })
}

fn set_cloexec(fd: &OwnedFd) -> nix::Result<nix::libc::c_int> {
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))
}

/// CLOCK_MONOTONIC in nanoseconds: the same clock in both images (it counts from boot).
pub fn monotonic_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => Duration::from(ts).as_nanos() as u64,
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_lines_parse() {
        assert_eq!(parse_versions(&versions_line()), Some(ACCEPTED.to_vec()));
        assert_eq!(parse_versions("handover versions: 1 7\n"), Some(vec![1, 7]));
        assert_eq!(parse_versions("ferryd 0.2.0\n"), None);
        assert_eq!(parse_versions("handover versions: one\n"), None);
    }
}
