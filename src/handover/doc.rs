//! The handover document: what one program image tells the next about the descriptors it
//! leaves open across execve, as versioned JSON in a memfd.
//!
//! This module owns the format and its checks. A document names descriptors by number; it is
//! refused whole (never half-used) when its version is not one this binary accepts, when a
//! number is below 3 or appears twice, or when a count is out of range, so that taking ownership
//! of the numbers it names is sound. It must not touch a descriptor.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// The version this binary writes. Bump it for any change an older reader would misread.
/// Version 2 carries a copy buffer's unwritten rest as bytes (`held`), which a version 1 reader
/// would drop without a word.
pub const VERSION: u32 = 2;

/// The versions this binary can read, printed by `ferryd handover-check` for the running daemon
/// to compare with the version it writes. A version 1 document is a version 2 one without
/// `held`.
pub const ACCEPTED: &[u32] = &[1, VERSION];

/// The largest document read or written: far above any real one (a few hundred bytes per
/// connection, and twice the bytes a stuck copy buffer holds, at most 32 KiB a direction).
pub const MAX_LEN: usize = 256 * 1024 * 1024;

/// What a parked direction can hold: a copy buffer's rest (16 KiB) or a pipe's worth (the
/// biggest pipe is 1 MiB unless an administrator raised fs.pipe-max-size).
const MAX_CARRY: usize = 64 * 1024 * 1024;

/// Everything one image hands to the next.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Document {
    /// The format's version ([`VERSION`]).
    pub version: u32,
    /// The ferryd version that wrote it.
    pub written_by: String,
    /// CLOCK_MONOTONIC, in nanoseconds, when the first connection was asked to park: the new
    /// image measures the pause from here.
    pub parked_at_ns: u64,
    /// CLOCK_MONOTONIC, in nanoseconds, when the document was written: every connection's
    /// `age_ms` and `quiet_ms` are as of this moment, and the new image adds the time since.
    pub written_at_ns: u64,
    /// The binary's path as the first image was started with it: what the next upgrade execs
    /// (after a fallback to the running image, /proc/self/exe names a deleted file).
    pub exe: std::path::PathBuf,
    /// Listening sockets by name: a route's name, or the health endpoint's.
    pub listeners: Vec<ListenerEntry>,
    /// Relayed connections.
    pub connections: Vec<ConnectionEntry>,
    /// Admitted connections not relaying yet: reading their PROXY header or dialling (version 2).
    #[serde(default)]
    pub opening: Vec<OpeningEntry>,
    /// Each route's counters by its name, as [`crate::state::carry`] writes them.
    pub routes: BTreeMap<String, serde_json::Value>,
    /// The relay engine's counters, likewise.
    pub relay: serde_json::Value,
    /// The daemon's counters, start time, NAT state and log drops, likewise.
    pub daemon: serde_json::Value,
    /// Connections the park cost: reset instead of moved (version 2).
    #[serde(default)]
    pub not_moved: u64,
}

/// One listening socket.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ListenerEntry {
    /// The route (or the health endpoint) it belongs to.
    pub name: String,
    /// Its descriptor.
    pub fd: i32,
}

/// One relayed connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConnectionEntry {
    /// Its id (version 2; 0 from an older version: the next image numbers it).
    #[serde(default)]
    pub id: u64,
    /// The route it was accepted on.
    pub route: String,
    /// The TCP peer.
    pub peer: SocketAddr,
    /// The upstream it was dialled at.
    pub upstream: SocketAddr,
    /// The client its PROXY v2 header named.
    pub proxied_client: Option<SocketAddr>,
    /// The LinkID its PROXY v2 header named.
    pub link_id: Option<u32>,
    /// idle_timeout it was accepted with, in milliseconds; none means never.
    pub idle_timeout_ms: Option<u64>,
    /// fin_timeout it was accepted with, in milliseconds.
    pub fin_timeout_ms: u64,
    /// How long data may go unacknowledged before its peer counts as gone, in milliseconds
    /// (version 2; absent, the connection is not watched for a gone peer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gone_after_ms: Option<u64>,
    /// Window probes unanswered before its peer counts as gone (version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gone_probes: Option<u32>,
    /// The client socket.
    pub client_fd: i32,
    /// The upstream socket.
    pub upstream_fd: i32,
    /// Client → upstream.
    pub up: SideEntry,
    /// Upstream → client.
    pub down: SideEntry,
    /// Milliseconds since it was accepted, when the document was written.
    pub age_ms: u64,
    /// Milliseconds since a byte last moved, when the document was written.
    pub quiet_ms: u64,
    /// Bytes client → upstream so far.
    pub bytes_up: u64,
    /// Bytes upstream → client so far.
    pub bytes_down: u64,
}

/// One admitted connection that was not relaying yet.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OpeningEntry {
    /// Its id.
    #[serde(default)]
    pub id: u64,
    /// The route it was accepted on.
    pub route: String,
    /// The TCP peer.
    pub peer: SocketAddr,
    /// The accepted socket.
    pub client_fd: i32,
    /// The PROXY v2 header's bytes read so far, in hexadecimal.
    pub header: String,
    /// Whether the header (if the route expects one) was read and admitted.
    pub admitted: bool,
    /// Milliseconds since it was accepted, when the document was written.
    pub age_ms: u64,
    /// Milliseconds it had spent dialling.
    pub dialled_ms: u64,
}

/// One direction of a connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state")]
pub enum SideEntry {
    /// Its end of stream was passed on (`"done"` in the document).
    #[serde(rename = "done")]
    Ended,
    /// Still running (`"open"` in the document).
    #[serde(rename = "open")]
    Running {
        /// It had switched to splicing.
        splice: bool,
        /// Bytes on their way, in a pipe.
        pipe: Option<PipeEntry>,
        /// Bytes on their way that were in a copy buffer, in hexadecimal (version 2).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        held: Option<String>,
    },
}

/// `bytes` as lowercase hexadecimal, for [`SideEntry::Running::held`].
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

/// The bytes [`to_hex`] wrote; `None` for anything else.
pub fn from_hex(text: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let text = text.as_bytes();
    if !text.len().is_multiple_of(2) {
        return None;
    }
    text.chunks_exact(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

/// A pipe holding bytes on their way.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PipeEntry {
    /// Its read end.
    pub read_fd: i32,
    /// Its write end.
    pub write_fd: i32,
    /// How many bytes it holds.
    pub bytes: usize,
}

/// Why a document was refused.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "handover document refused: {}", self.0)
    }
}

impl std::error::Error for Refused {}

/// Just the version, read first so that a document of another version is refused by its number
/// rather than by whatever field it changed.
#[derive(Deserialize)]
struct Versioned {
    version: u32,
}

impl Document {
    /// The document as bytes.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain data to a Vec cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads and checks a document. Any input, however malformed, gives a document whose
    /// descriptor numbers are safe to take over, or an error; never a panic.
    pub fn decode(bytes: &[u8]) -> Result<Document, Refused> {
        if bytes.len() > MAX_LEN {
            return Err(Refused(format!(
                "{} bytes is over the {MAX_LEN}-byte limit",
                bytes.len()
            )));
        }
        let versioned: Versioned =
            serde_json::from_slice(bytes).map_err(|e| Refused(format!("not a handover document: {e}")))?;
        if !ACCEPTED.contains(&versioned.version) {
            return Err(Refused(format!(
                "version {} is not one this binary reads ({ACCEPTED:?})",
                versioned.version
            )));
        }
        let doc: Document = serde_json::from_slice(bytes)
            .map_err(|e| Refused(format!("malformed version {} document: {e}", versioned.version)))?;
        doc.check()?;
        Ok(doc)
    }

    /// Every descriptor the document names, in order.
    pub fn descriptors(&self) -> Vec<i32> {
        let mut fds: Vec<i32> = self.listeners.iter().map(|l| l.fd).collect();
        fds.extend(self.opening.iter().map(|o| o.client_fd));
        for c in &self.connections {
            fds.push(c.client_fd);
            fds.push(c.upstream_fd);
            for side in [&c.up, &c.down] {
                if let SideEntry::Running { pipe: Some(p), .. } = side {
                    fds.push(p.read_fd);
                    fds.push(p.write_fd);
                }
            }
        }
        fds
    }

    fn check(&self) -> Result<(), Refused> {
        let mut seen = BTreeSet::new();
        for fd in self.descriptors() {
            if fd < 3 {
                return Err(Refused(format!(
                    "descriptor {fd} is one of stdin, stdout, stderr or not a descriptor"
                )));
            }
            if !seen.insert(fd) {
                return Err(Refused(format!("descriptor {fd} is named twice")));
            }
        }
        for o in &self.opening {
            if from_hex(&o.header).is_none_or(|h| h.len() > crate::proxy_header::MAX_HEADER_LEN) {
                return Err(Refused(format!(
                    "connection from {}: its PROXY header bytes are not hexadecimal or too long",
                    o.peer
                )));
            }
        }
        for c in &self.connections {
            for side in [&c.up, &c.down] {
                if let SideEntry::Running { pipe: Some(p), .. } = side
                    && p.bytes > MAX_CARRY
                {
                    return Err(Refused(format!("a pipe said to hold {} bytes", p.bytes)));
                }
                if let SideEntry::Running {
                    held: Some(held),
                    pipe,
                    ..
                } = side
                {
                    if pipe.is_some() {
                        return Err(Refused(format!(
                            "connection from {}: a direction carries both a pipe and held bytes",
                            c.peer
                        )));
                    }
                    if from_hex(held).is_none() {
                        return Err(Refused(format!(
                            "connection from {}: held bytes are not hexadecimal",
                            c.peer
                        )));
                    }
                }
            }
            if c.quiet_ms > c.age_ms {
                return Err(Refused(format!(
                    "connection from {}: quiet for {} ms but only {} ms old",
                    c.peer, c.quiet_ms, c.age_ms
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Document {
        Document {
            version: VERSION,
            written_by: "0.3.0".into(),
            parked_at_ns: 123,
            written_at_ns: 456,
            exe: "/usr/bin/ferryd".into(),
            listeners: vec![ListenerEntry {
                name: "ssh".into(),
                fd: 7,
            }],
            connections: vec![ConnectionEntry {
                id: 41,
                route: "ssh".into(),
                peer: "10.0.0.5:40000".parse().unwrap(),
                upstream: "10.0.1.4:22".parse().unwrap(),
                proxied_client: None,
                link_id: Some(7),
                idle_timeout_ms: Some(600_000),
                fin_timeout_ms: 30_000,
                gone_after_ms: Some(120_000),
                gone_probes: Some(6),
                client_fd: 8,
                upstream_fd: 9,
                up: SideEntry::Running {
                    splice: false,
                    pipe: None,
                    held: Some(to_hex(&[0, 1, 0x7f, 0x80, 0xff])),
                },
                down: SideEntry::Running {
                    splice: true,
                    pipe: Some(PipeEntry {
                        read_fd: 10,
                        write_fd: 11,
                        bytes: 4096,
                    }),
                    held: None,
                },
                age_ms: 5000,
                quiet_ms: 10,
                bytes_up: 1,
                bytes_down: 2,
            }],
            opening: vec![OpeningEntry {
                id: 42,
                route: "ssh".into(),
                peer: "10.0.0.5:40001".parse().unwrap(),
                client_fd: 12,
                header: to_hex(b"\r\n\r\n"),
                admitted: false,
                age_ms: 300,
                dialled_ms: 0,
            }],
            routes: BTreeMap::new(),
            relay: serde_json::json!({"spliced_bytes": 5}),
            daemon: serde_json::json!({"reloads_ok": 2}),
            not_moved: 3,
        }
    }

    #[test]
    fn round_trips() {
        let doc = sample();
        assert_eq!(Document::decode(&doc.encode()).unwrap(), doc);
        assert_eq!(doc.descriptors(), vec![7, 12, 8, 9, 10, 11]);
    }

    /// The names a direction's state is written with are the format's, whatever the code calls
    /// them: an image of another version reads them.
    #[test]
    fn direction_states_keep_their_names_in_the_document() {
        let running = serde_json::to_value(SideEntry::Running {
            splice: true,
            pipe: None,
            held: None,
        })
        .unwrap();
        assert_eq!(running["state"], "open", "{running}");
        let ended = serde_json::to_value(SideEntry::Ended).unwrap();
        assert_eq!(ended["state"], "done", "{ended}");
    }

    #[test]
    fn held_bytes_round_trip_and_damaged_ones_are_refused() {
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(from_hex(&to_hex(&all)), Some(all));
        assert_eq!(from_hex("0g"), None);
        assert_eq!(from_hex("abc"), None);
        let mut value: serde_json::Value = serde_json::from_slice(&sample().encode()).unwrap();
        value["connections"][0]["up"]["held"] = "zz".into();
        let refused = Document::decode(value.to_string().as_bytes()).unwrap_err();
        assert!(refused.0.contains("not hexadecimal"), "{refused}");
    }

    #[test]
    fn a_version_1_document_is_read() {
        let mut value: serde_json::Value = serde_json::from_slice(&sample().encode()).unwrap();
        value["version"] = 1.into();
        value["connections"][0]["up"] = serde_json::json!({"state": "done"});
        let doc = Document::decode(value.to_string().as_bytes()).unwrap();
        assert_eq!(doc.version, 1);
        assert!(matches!(doc.connections[0].up, SideEntry::Ended));
    }

    #[test]
    fn an_unknown_version_is_refused_by_its_number() {
        let mut value: serde_json::Value = serde_json::from_slice(&sample().encode()).unwrap();
        value["version"] = 99.into();
        // Whatever else a version 99 changed, the refusal names the version.
        value["connections"] = "something new".into();
        let e = Document::decode(&serde_json::to_vec(&value).unwrap()).unwrap_err();
        assert!(e.0.contains("version 99 is not one this binary reads"), "{e}");
    }

    #[test]
    fn unsafe_descriptor_numbers_are_refused() {
        let mut doc = sample();
        doc.connections[0].upstream_fd = 7;
        let e = Document::decode(&doc.encode()).unwrap_err();
        assert!(e.0.contains("descriptor 7 is named twice"), "{e}");
        let mut doc = sample();
        doc.listeners[0].fd = 1;
        assert!(
            Document::decode(&doc.encode())
                .unwrap_err()
                .0
                .contains("descriptor 1")
        );
    }
}
