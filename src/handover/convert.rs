//! The hand-over's two conversions side by side: what an image holds ([`Outgoing`]: listeners,
//! parked connections with their carried pipes and bytes, counters) into the [`Document`] that
//! names it, and a document back into what the next image holds ([`Incoming`]). A field added
//! to one direction is written next to the other, and the round-trip test below crosses a real
//! socket pair and a pipe with bytes in it.
//!
//! It must not read or write the memfd, nor decide whether a document is trusted: `super` does.

use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use super::doc::{self, ConnectionEntry, Document, OpeningEntry, PipeEntry, SideEntry, VERSION};
use super::{Incoming, Outgoing, monotonic_ns, set_cloexec};
use crate::connections::Who;
use crate::relay::{Carry, GoneAfter, OpenSide, Parked, Pipe, Progress, Side, Timeouts};
use crate::route::{Identity, OpeningConnection, ParkedConnection};

impl Outgoing {
    /// The document as of now, naming the descriptors this hand-over owns.
    pub(super) fn document(&self) -> Document {
        let connections = self
            .connections
            .iter()
            .map(|parked| {
                let Identity {
                    who:
                        Who {
                            id,
                            route,
                            client: peer,
                            upstream,
                            proxied_client,
                            link_id,
                        },
                    timeouts,
                } = &parked.identity;
                let Parked {
                    client,
                    upstream: upstream_socket,
                    progress,
                    parked_at,
                } = &parked.relay;
                // The clocks were read when the connection parked; the document is as of now.
                let since = parked_at.elapsed();
                let (age, quiet) = (progress.age + since, progress.quiet + since);
                ConnectionEntry {
                    id: *id,
                    route: route.to_string(),
                    peer: *peer,
                    upstream: *upstream,
                    proxied_client: *proxied_client,
                    link_id: *link_id,
                    idle_timeout_ms: timeouts.idle.map(|d| d.as_millis() as u64),
                    fin_timeout_ms: timeouts.fin.as_millis() as u64,
                    gone_after_ms: timeouts.gone.map(|g| g.silence.as_millis() as u64),
                    gone_probes: timeouts.gone.map(|g| g.probes),
                    client_fd: client.as_raw_fd(),
                    upstream_fd: upstream_socket.as_raw_fd(),
                    up: side_entry(&progress.up),
                    down: side_entry(&progress.down),
                    age_ms: age.as_millis() as u64,
                    quiet_ms: (quiet.as_millis() as u64).min(age.as_millis() as u64),
                    bytes_up: progress.bytes_up,
                    bytes_down: progress.bytes_down,
                }
            })
            .collect();
        Document {
            version: VERSION,
            written_by: env!("CARGO_PKG_VERSION").to_string(),
            parked_at_ns: self.parked_at_ns,
            written_at_ns: monotonic_ns(),
            exe: self.exe.clone(),
            listeners: self
                .listeners
                .iter()
                .map(|(name, socket)| doc::ListenerEntry {
                    name: name.clone(),
                    fd: socket.as_raw_fd(),
                })
                .collect(),
            connections,
            opening: self
                .opening
                .iter()
                .map(|o| OpeningEntry {
                    id: o.id,
                    route: o.route.clone(),
                    peer: o.peer,
                    client_fd: o.client.as_raw_fd(),
                    header: doc::to_hex(&o.header),
                    admitted: o.admitted,
                    age_ms: (o.age + o.parked_at.elapsed()).as_millis() as u64,
                    dialled_ms: o.dialled.as_millis() as u64,
                })
                .collect(),
            routes: self.routes.clone(),
            relay: self.relay.clone(),
            daemon: self.daemon.clone(),
            not_moved: self.not_moved,
        }
    }
}

/// One direction as the document describes it.
fn side_entry(side: &Side) -> SideEntry {
    match side {
        Side::Ended => SideEntry::Ended,
        Side::Running(open) => {
            let (pipe, held) = match open.carry.as_deref() {
                None => (None, None),
                Some(Carry::Pipe { pipe, bytes }) => {
                    let (read_fd, write_fd) = pipe.raw_fds();
                    let entry = PipeEntry {
                        read_fd,
                        write_fd,
                        bytes: *bytes,
                    };
                    (Some(entry), None)
                }
                Some(Carry::Bytes(bytes)) => (None, Some(doc::to_hex(bytes))),
            };
            SideEntry::Running {
                splice: open.splice,
                pipe,
                held,
            }
        }
    }
}

/// What `doc` describes, owned by this image: every descriptor it names becomes a socket or a
/// pipe again (close-on-exec, as everything this image opens), every timer is moved on by the
/// time the crossing took. A connection whose pipe is unusable is reset and counted as not moved.
///
/// # Safety
///
/// Every descriptor `doc` names must be open, named once, and owned by nothing else in this
/// process: ownership of each passes to the result.
pub(super) unsafe fn from_document(doc: Document) -> Incoming {
    // Correct every timer by the time the crossing took: a connection's deadlines stay where
    // they were.
    let crossing = Duration::from_nanos(monotonic_ns().saturating_sub(doc.written_at_ns));
    // SAFETY (for every `own` below): the caller's promise.
    let own = |fd: RawFd| unsafe { OwnedFd::from_raw_fd(fd) };
    let mut listeners = Vec::new();
    for entry in &doc.listeners {
        let socket = own(entry.fd);
        let _ = set_cloexec(&socket);
        listeners.push((entry.name.clone(), TcpListener::from(socket)));
    }
    let mut connections = Vec::new();
    let mut lost = 0;
    for c in &doc.connections {
        let client = own(c.client_fd);
        let upstream = own(c.upstream_fd);
        let _ = set_cloexec(&client);
        let _ = set_cloexec(&upstream);
        let side = |entry: &SideEntry| -> Result<Side, String> {
            Ok(match entry {
                SideEntry::Ended => Side::Ended,
                SideEntry::Running { splice, pipe, held } => Side::Running(OpenSide {
                    splice: *splice,
                    carry: match (pipe, held) {
                        (Some(p), _) => Some(Box::new(Carry::Pipe {
                            pipe: Pipe::from_fds(own(p.read_fd), own(p.write_fd)).map_err(|e| {
                                format!("connection from {}: its pipe is unusable: {e}", c.peer)
                            })?,
                            bytes: p.bytes,
                        })),
                        // `decode` checked it is hexadecimal.
                        (None, Some(held)) => doc::from_hex(held).map(|bytes| Box::new(Carry::Bytes(bytes))),
                        (None, None) => None,
                    },
                }),
            })
        };
        let (up, down) = (side(&c.up), side(&c.down));
        let (up, down) = match (up, down) {
            (Ok(up), Ok(down)) => (up, down),
            (Err(e), _) | (_, Err(e)) => {
                // Never a FIN: the stream was cut where it parked.
                crate::net::reset_both(client, upstream);
                lost += 1;
                tracing::warn!(route = %c.route, client = %c.peer, end = "reset", error = %e, "cannot take over a connection moved by the upgrade");
                continue;
            }
        };
        connections.push(ParkedConnection {
            identity: Identity {
                who: Who {
                    id: c.id,
                    route: c.route.as_str().into(),
                    client: c.peer,
                    upstream: c.upstream,
                    proxied_client: c.proxied_client,
                    link_id: c.link_id,
                },
                timeouts: Timeouts {
                    idle: c.idle_timeout_ms.map(Duration::from_millis),
                    fin: Duration::from_millis(c.fin_timeout_ms),
                    gone: c.gone_after_ms.zip(c.gone_probes).map(|(ms, probes)| GoneAfter {
                        silence: Duration::from_millis(ms),
                        probes,
                    }),
                },
            },
            relay: Parked {
                client: std::net::TcpStream::from(client),
                upstream: std::net::TcpStream::from(upstream),
                progress: Progress {
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
    let opening = doc
        .opening
        .iter()
        .map(|o| {
            let client = own(o.client_fd);
            let _ = set_cloexec(&client);
            OpeningConnection {
                id: o.id,
                route: o.route.clone(),
                peer: o.peer,
                client: std::net::TcpStream::from(client),
                // `decode` checked it is hexadecimal.
                header: doc::from_hex(&o.header).unwrap_or_default(),
                admitted: o.admitted,
                age: Duration::from_millis(o.age_ms) + crossing,
                dialled: Duration::from_millis(o.dialled_ms),
                parked_at: std::time::Instant::now(),
            }
        })
        .collect();
    Incoming {
        listeners,
        connections,
        opening,
        routes: doc.routes,
        relay: doc.relay,
        daemon: doc.daemon,
        written_by: doc.written_by,
        parked_at_ns: doc.parked_at_ns,
        exe: doc.exe,
        not_moved: doc.not_moved + lost,
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Instant;

    use super::*;
    use crate::relay::PipePool;

    /// A connected pair on loopback: (the far end, the near end the hand-over carries).
    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let far = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (near, _) = listener.accept().unwrap();
        (far, near)
    }

    /// Reads exactly `n` bytes from `socket`.
    fn read_n(socket: &mut TcpStream, n: usize) -> Vec<u8> {
        socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = vec![0; n];
        socket.read_exact(&mut got).unwrap();
        got
    }

    /// Everything an image holds crosses to the document and back: a listener that still
    /// accepts, a relaying connection whose sockets still carry bytes both ways with a pipe
    /// holding bytes one way and held bytes the other, and a connection still reading its PROXY
    /// header, with every field as it was.
    #[test]
    fn what_is_held_crosses_the_document_and_back() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let listening_at = listener.local_addr().unwrap();

        // A relaying connection: the pipe holds bytes read from the client, not yet written.
        let (mut client_far, client) = pair();
        let (mut upstream_far, upstream) = pair();
        client_far.write_all(b"in the pipe").unwrap();
        let pool = PipePool::new(1);
        let mut lease = pool.take().unwrap().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut filled = 0;
        while filled < 11 && Instant::now() < deadline {
            filled += lease.fill_from(&client).unwrap_or(0);
        }
        assert_eq!(filled, 11);
        let (pipe, bytes) = lease.detach().unwrap();
        let identity = Identity {
            who: Who {
                id: 42,
                route: "ssh".into(),
                client: client.peer_addr().unwrap(),
                upstream: upstream.peer_addr().unwrap(),
                proxied_client: Some("10.0.0.9:5000".parse().unwrap()),
                link_id: Some(7),
            },
            timeouts: Timeouts {
                idle: Some(Duration::from_secs(300)),
                fin: Duration::from_secs(30),
                gone: Some(GoneAfter {
                    silence: Duration::from_secs(120),
                    probes: 9,
                }),
            },
        };
        let relaying = ParkedConnection {
            identity: identity.clone(),
            relay: Parked {
                client,
                upstream,
                progress: Progress {
                    up: Side::Running(OpenSide {
                        splice: true,
                        carry: Some(Box::new(Carry::Pipe { pipe, bytes })),
                    }),
                    down: Side::Running(OpenSide {
                        splice: false,
                        carry: Some(Box::new(Carry::Bytes(b"held".to_vec()))),
                    }),
                    age: Duration::from_secs(60),
                    quiet: Duration::from_secs(2),
                    bytes_up: 1_000,
                    bytes_down: 2_000,
                },
                parked_at: Instant::now(),
            },
        };
        // A connection still reading its PROXY header.
        let (mut opening_far, opening_client) = pair();
        let opening = OpeningConnection {
            id: 43,
            route: "winrm".into(),
            peer: opening_client.peer_addr().unwrap(),
            client: opening_client,
            header: vec![0x0d, 0x0a, 0x0d],
            admitted: false,
            age: Duration::from_millis(150),
            dialled: Duration::ZERO,
            parked_at: Instant::now(),
        };

        let mut outgoing = Outgoing::new(monotonic_ns(), std::path::Path::new("/usr/bin/ferryd"));
        outgoing.listener("ssh", listener);
        outgoing.connection(crate::route::Parked::Relaying(relaying));
        outgoing.connection(crate::route::Parked::Opening(opening));
        outgoing.not_moved(1);
        let document = outgoing.document();
        let decoded = Document::decode(&document.encode()).unwrap();
        assert_eq!(decoded.descriptors(), document.descriptors());
        // The descriptors now belong to the document's reader, as across execve.
        std::mem::forget(outgoing);
        // SAFETY: every descriptor the document names is open and, with `outgoing` forgotten,
        // owned by nothing else.
        let mut incoming = unsafe { from_document(decoded) };

        assert_eq!(incoming.not_moved, 1);
        assert_eq!(incoming.exe, std::path::Path::new("/usr/bin/ferryd"));
        let (name, listener) = incoming.listeners.pop().unwrap();
        assert_eq!(name, "ssh");
        assert_eq!(listener.local_addr().unwrap(), listening_at);
        TcpStream::connect(listening_at).unwrap();
        assert!(listener.accept().is_ok(), "the listener no longer accepts");

        let moved = incoming.connections.pop().unwrap();
        let (who, was) = (&moved.identity.who, &identity.who);
        assert_eq!(
            (who.id, &who.route, who.client, who.upstream),
            (was.id, &was.route, was.client, was.upstream)
        );
        assert_eq!(
            (who.proxied_client, who.link_id),
            (was.proxied_client, was.link_id)
        );
        let timeouts = &moved.identity.timeouts;
        assert_eq!(timeouts.idle, identity.timeouts.idle);
        assert_eq!(timeouts.fin, identity.timeouts.fin);
        assert_eq!(timeouts.gone, identity.timeouts.gone);
        let Parked {
            mut client,
            mut upstream,
            progress,
            ..
        } = moved.relay;
        assert_eq!((progress.bytes_up, progress.bytes_down), (1_000, 2_000));
        // The clocks went on by the time the crossing took, and no more.
        assert!(progress.age >= Duration::from_secs(60) && progress.age < Duration::from_secs(61));
        assert!(progress.quiet >= Duration::from_secs(2) && progress.quiet < Duration::from_secs(3));
        let Side::Running(OpenSide {
            splice: true,
            carry: Some(up),
        }) = progress.up
        else {
            panic!("up: {:?}", progress.up);
        };
        let Carry::Pipe { pipe, bytes: 11 } = *up else {
            panic!("up's carry: {up:?}");
        };
        let Side::Running(OpenSide {
            splice: false,
            carry: Some(down),
        }) = progress.down
        else {
            panic!("down: {:?}", progress.down);
        };
        assert!(matches!(*down, Carry::Bytes(ref held) if held == b"held"));
        // The pipe still holds the client's bytes, and they reach the upstream.
        let mut written = 0;
        while written < 11 {
            written += pipe.drain_to(&upstream, 11 - written).unwrap();
        }
        assert_eq!(read_n(&mut upstream_far, 11), b"in the pipe");
        // Both sockets still carry bytes both ways.
        upstream_far.write_all(b"answer").unwrap();
        assert_eq!(read_n(&mut upstream, 6), b"answer");
        client.write_all(b"to the client").unwrap();
        assert_eq!(read_n(&mut client_far, 13), b"to the client");

        let opening = incoming.opening.pop().unwrap();
        assert_eq!((opening.id, opening.route.as_str()), (43, "winrm"));
        assert_eq!(opening.header, vec![0x0d, 0x0a, 0x0d]);
        assert!(!opening.admitted);
        assert!(opening.age >= Duration::from_millis(150));
        opening_far.write_all(b"rest").unwrap();
        let mut opened = opening.client;
        assert_eq!(read_n(&mut opened, 4), b"rest");
    }
}
