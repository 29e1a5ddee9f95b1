//! The live upgrade's hand-over between two program images of the same process: the check that
//! the binary now at ferryd's path can take over, the document that describes every descriptor
//! left open, the execve, and, in the new image, taking it all back.
//!
//! This module owns the crossing. The daemon decides when (SIGUSR2) and parks the connections
//! first (see `crate::shutdown` and `crate::relay`); this module turns what was parked into a
//! document in a memfd, clears close-on-exec on exactly the descriptors the document names, and
//! execs with the same PID and arguments. The new image finds the memfd in [`ENV`], reads the
//! document back ([`Incoming::from_env`]) and owns those descriptors again. It must not decide
//! anything about the connections themselves: their sockets and pipes go back to the route and
//! the relay as they were.

mod doc;
mod exec;

use std::ffi::OsString;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

pub use doc::{ACCEPTED, ConnectionEntry, Document, PipeEntry, Refused, SideEntry, VERSION};

use crate::relay::{Carry, Midway, Parked, Paused, Pipe, Side, Timeouts};
use crate::route::{Identity, ParkedConnection};

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
    let out = crate::command::run_bounded(&program, &[CHECK_COMMAND, "--config", &config], None, CHECK_LIMIT)
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

/// What the old image hands over, being assembled. Every descriptor it holds is kept open (and
/// owned here) until the execve.
pub struct Outgoing {
    doc: Document,
    keep: Vec<OwnedFd>,
}

impl Outgoing {
    /// An empty hand-over whose pause began at `parked_at_ns` (CLOCK_MONOTONIC), from the
    /// binary first started as `exe`.
    pub fn new(parked_at_ns: u64, exe: &Path) -> Outgoing {
        Outgoing {
            doc: Document {
                version: VERSION,
                written_by: env!("CARGO_PKG_VERSION").to_string(),
                parked_at_ns,
                written_at_ns: 0,
                exe: exe.to_path_buf(),
                exec_failed: None,
                listeners: Vec::new(),
                connections: Vec::new(),
                routes: Default::default(),
                relay: Default::default(),
                daemon: Default::default(),
            },
            keep: Vec::new(),
        }
    }

    /// The counters to carry.
    pub fn counters(
        &mut self,
        routes: std::collections::BTreeMap<String, crate::state::CarriedRoute>,
        relay: crate::state::CarriedRelay,
        daemon: crate::state::CarriedDaemon,
    ) {
        self.doc.routes = routes;
        self.doc.relay = relay;
        self.doc.daemon = daemon;
    }

    fn keep(&mut self, fd: impl Into<OwnedFd>) -> RawFd {
        let fd: OwnedFd = fd.into();
        let raw = fd.as_raw_fd();
        self.keep.push(fd);
        raw
    }

    /// A listening socket, by the name it is claimed under (a route's, or the health endpoint's).
    pub fn listener(&mut self, name: &str, socket: TcpListener) {
        let fd = self.keep(socket);
        self.doc.listeners.push(doc::ListenerEntry {
            name: name.to_string(),
            fd,
        });
    }

    /// A parked connection.
    pub fn connection(&mut self, parked: ParkedConnection) {
        let ParkedConnection { identity, relay } = parked;
        let Identity {
            route,
            peer,
            upstream,
            proxied_client,
            link_id,
            timeouts,
        } = identity;
        let Parked {
            client,
            upstream: upstream_socket,
            midway,
            parked_at,
        } = relay;
        // The clocks were read when the connection parked; the document is as of now.
        let since = parked_at.elapsed();
        let (age, quiet) = (midway.age + since, midway.quiet + since);
        let client_fd = self.keep(client);
        let upstream_fd = self.keep(upstream_socket);
        let up = self.side(midway.up);
        let down = self.side(midway.down);
        self.doc.connections.push(ConnectionEntry {
            route,
            peer,
            upstream,
            proxied_client,
            link_id,
            idle_timeout_ms: timeouts.idle.map(|d| d.as_millis() as u64),
            fin_timeout_ms: timeouts.fin.as_millis() as u64,
            client_fd,
            upstream_fd,
            up,
            down,
            age_ms: age.as_millis() as u64,
            quiet_ms: (quiet.as_millis() as u64).min(age.as_millis() as u64),
            bytes_up: midway.bytes_up,
            bytes_down: midway.bytes_down,
        });
    }

    fn side(&mut self, side: Side) -> SideEntry {
        match side {
            Side::Done => SideEntry::Done,
            Side::Open(paused) => SideEntry::Open {
                splice: paused.streaming,
                pipe: paused.carry.map(|carry| {
                    let (read, write) = carry.pipe.into_fds();
                    PipeEntry {
                        read_fd: self.keep(read),
                        write_fd: self.keep(write),
                        bytes: carry.bytes,
                    }
                }),
            },
        }
    }

    /// Connections in the document.
    pub fn connections(&self) -> usize {
        self.doc.connections.len()
    }

    /// Bytes on their way in pipes (read from one peer, not yet written to the other).
    pub fn carried_bytes(&self) -> usize {
        self.doc
            .connections
            .iter()
            .flat_map(|c| [&c.up, &c.down])
            .map(|side| match side {
                SideEntry::Open { pipe: Some(p), .. } => p.bytes,
                _ => 0,
            })
            .sum()
    }

    /// Writes the document, lets exactly its descriptors cross, and execs `exe` with `args` and
    /// `env` (plus [`ENV`]). Should `exe` fail to start, the image this process runs now is
    /// exec'd instead (/proc/self/exe works even when the file was replaced or deleted), so the
    /// connections are taken back either way. Returns only if both fail.
    pub fn exec(mut self, exe: &Path, args: &[OsString], env: Vec<(OsString, OsString)>) -> std::io::Error {
        let first = match self.exec_once(exe, args, &env) {
            Ok(never) => match never {},
            Err(e) => e,
        };
        tracing::error!(exe = %exe.display(), error = %first, "cannot exec the new binary; taking the connections back into the running one");
        crate::logging::flush(Duration::from_secs(1));
        self.doc.exec_failed = Some(format!("cannot exec {}: {first}", exe.display()));
        let second = match self.exec_once(Path::new("/proc/self/exe"), args, &env) {
            Ok(never) => match never {},
            Err(e) => e,
        };
        std::io::Error::other(format!(
            "{first}; and the running binary could not be exec'd again: {second}"
        ))
    }

    fn exec_once(
        &mut self,
        exe: &Path,
        args: &[OsString],
        env: &[(OsString, OsString)],
    ) -> Result<std::convert::Infallible, std::io::Error> {
        self.doc.written_at_ns = monotonic_ns();
        let memfd = exec::memfd_with(&self.doc.encode())?;
        for fd in self
            .keep
            .iter()
            .map(AsRawFd::as_raw_fd)
            .chain([memfd.as_raw_fd()])
        {
            exec::inherit(fd)?;
        }
        let mut env = env.to_vec();
        env.push((ENV.into(), memfd.as_raw_fd().to_string().into()));
        Err(exec::execve(exe, args, &env))
    }
}

/// What the new image takes back from the previous one.
#[derive(Debug)]
pub struct Incoming {
    /// Listening sockets by name.
    pub listeners: Vec<(String, TcpListener)>,
    /// Parked connections, their sockets and pipes owned again.
    pub connections: Vec<ParkedConnection>,
    /// Counters by route name.
    pub routes: std::collections::BTreeMap<String, crate::state::CarriedRoute>,
    /// The relay engine's counters.
    pub relay: crate::state::CarriedRelay,
    /// The daemon's counters.
    pub daemon: crate::state::CarriedDaemon,
    /// The ferryd version that handed over.
    pub written_by: String,
    /// CLOCK_MONOTONIC when the pause began.
    pub parked_at_ns: u64,
    /// The binary's path as first started: what the next upgrade execs.
    pub exe: std::path::PathBuf,
    /// Why the new binary could not be exec'd, when this image is the old one again.
    pub exec_failed: Option<String>,
}

impl Drop for Incoming {
    /// Connections not taken over (the daemon stopped during start-up, or failed to start) are
    /// reset: a FIN could pass for an orderly end with bytes still in a carried pipe.
    fn drop(&mut self) {
        for parked in self.connections.drain(..) {
            crate::net::reset(parked.relay.client);
            crate::net::reset(parked.relay.upstream);
        }
    }
}

impl Incoming {
    /// Takes the hand-over named by [`ENV`] (as the daemon took it out of the
    /// environment, so no child inherits it), if any. `None`: a normal start. An error: there was
    /// a document and it was refused; everything the previous image left open has then been
    /// closed (connected sockets reset), and the daemon starts afresh.
    pub fn from_var(value: Option<OsString>) -> Option<Result<Incoming, String>> {
        let value = value?;
        let taken = take(&value);
        if taken.is_err() {
            let closed = exec::close_inherited();
            tracing::warn!(
                closed,
                "closed the descriptors the previous program image left open"
            );
        }
        Some(taken)
    }

    /// Milliseconds from the start of the pause to now.
    pub fn pause_ms(&self) -> u64 {
        monotonic_ns().saturating_sub(self.parked_at_ns) / 1_000_000
    }
}

fn take(value: &std::ffi::OsStr) -> Result<Incoming, String> {
    let fd: RawFd = value
        .to_str()
        .and_then(|v| v.trim().parse().ok())
        .filter(|fd| *fd > 2 && exec::inherited(*fd))
        .ok_or_else(|| format!("{ENV}={value:?} names no open descriptor"))?;
    // SAFETY: the previous image created this memfd for us and nothing else in this image owns it.
    let memfd = unsafe { OwnedFd::from_raw_fd(fd) };
    let bytes =
        exec::read_all(memfd, doc::MAX_LEN).map_err(|e| format!("cannot read the handover document: {e}"))?;
    let doc = Document::decode(&bytes).map_err(|e| e.to_string())?;
    // Only descriptors the previous image let cross: open, and not close-on-exec (everything this
    // image opened itself is), so a stale or stray document cannot take one of this image's own.
    if let Some(fd) = doc.descriptors().into_iter().find(|fd| !exec::inherited(*fd)) {
        return Err(format!(
            "the handover document names descriptor {fd}, which is not one the previous image left open"
        ));
    }
    // Correct every timer by the time the crossing took: a connection's deadlines stay where
    // they were.
    let crossing = Duration::from_nanos(monotonic_ns().saturating_sub(doc.written_at_ns));
    // SAFETY (for every `own` below): `decode` checked that each number is above 2 and named
    // once, and each is open: the previous image left it open for this one, which owns nothing
    // else under these numbers (everything it opens itself is close-on-exec and newer).
    let own = |fd: RawFd| unsafe { OwnedFd::from_raw_fd(fd) };
    let mut listeners = Vec::new();
    for entry in &doc.listeners {
        let socket = own(entry.fd);
        let _ = set_cloexec(&socket);
        listeners.push((entry.name.clone(), TcpListener::from(socket)));
    }
    let mut connections = Vec::new();
    for c in &doc.connections {
        let client = own(c.client_fd);
        let upstream = own(c.upstream_fd);
        let _ = set_cloexec(&client);
        let _ = set_cloexec(&upstream);
        let side = |entry: &SideEntry| -> Result<Side, String> {
            Ok(match entry {
                SideEntry::Done => Side::Done,
                SideEntry::Open { splice, pipe } => Side::Open(Paused {
                    streaming: *splice,
                    carry: match pipe {
                        None => None,
                        Some(p) => Some(Box::new(Carry {
                            pipe: Pipe::from_fds(own(p.read_fd), own(p.write_fd)).map_err(|e| {
                                format!("connection from {}: its pipe is unusable: {e}", c.peer)
                            })?,
                            bytes: p.bytes,
                        })),
                    },
                }),
            })
        };
        let (up, down) = (side(&c.up), side(&c.down));
        let (up, down) = match (up, down) {
            (Ok(up), Ok(down)) => (up, down),
            (Err(e), _) | (_, Err(e)) => {
                crate::net::reset(client);
                crate::net::reset(upstream);
                tracing::warn!(route = %c.route, client = %c.peer, end = "reset", error = %e, "cannot take over a connection moved by the upgrade");
                continue;
            }
        };
        connections.push(ParkedConnection {
            identity: Identity {
                route: c.route.clone(),
                peer: c.peer,
                upstream: c.upstream,
                proxied_client: c.proxied_client,
                link_id: c.link_id,
                timeouts: Timeouts {
                    idle: c.idle_timeout_ms.map(Duration::from_millis),
                    fin: Duration::from_millis(c.fin_timeout_ms),
                },
            },
            relay: Parked {
                client: std::net::TcpStream::from(client),
                upstream: std::net::TcpStream::from(upstream),
                midway: Midway {
                    up,
                    down,
                    age: Duration::from_millis(c.age_ms) + crossing,
                    quiet: Duration::from_millis(c.quiet_ms) + crossing,
                    bytes_up: c.bytes_up,
                    bytes_down: c.bytes_down,
                },
                parked_at: std::time::Instant::now(),
            },
        });
    }
    Ok(Incoming {
        listeners,
        connections,
        routes: doc.routes,
        relay: doc.relay,
        daemon: doc.daemon,
        written_by: doc.written_by,
        parked_at_ns: doc.parked_at_ns,
        exe: doc.exe,
        exec_failed: doc.exec_failed,
    })
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
