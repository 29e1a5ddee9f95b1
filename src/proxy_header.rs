//! PROXY protocol version 2: the header a Private Link Service set to "TCP proxy v2" puts in
//! front of every connection, with the consumer's address and, in an Azure TLV, the private
//! endpoint's LinkID.
//!
//! This module owns the wire format: parsing a header from bytes (never reading past it),
//! encoding one for an upstream, and reading exactly one header from a socket within a deadline.
//! It must not decide who is admitted; the route does that with what it returns.
//!
//! Layout (all lengths big-endian): the 12-byte signature; byte 13, version 2 in the high nibble
//! and the command in the low (0 LOCAL, 1 PROXY); byte 14, family and transport (0x11 TCP/IPv4,
//! 0x21 TCP/IPv6, 0x00 UNSPEC); bytes 15-16, the length of the rest; then the addresses (12 bytes
//! for IPv4, 36 for IPv6: source, destination, source port, destination port) and the TLVs (type,
//! 16-bit length, value). Azure's TLV is type 0xEE, value subtype 0x01 then the LinkID as a
//! little-endian u32.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt as _;

/// The 12 bytes every v2 header starts with.
pub const SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];
/// The fixed part: signature, version/command, family, length.
pub const FIXED_LEN: usize = 16;
/// The longest header accepted, fixed part included. Azure's is 16 + 36 (IPv6 addresses) + 8
/// (its TLV); 1 KiB leaves room for other TLVs a balancer may add, and bounds what a hostile
/// client can make ferryd read before anything is decided.
pub const MAX_HEADER_LEN: usize = 1024;
/// Azure's TLV type, and the subtype of the LinkID in it.
pub const AZURE_TLV: u8 = 0xEE;
const AZURE_LINK_ID: u8 = 0x01;

/// LOCAL (a health check by the proxy itself) or PROXY (a relayed connection).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// The balancer's own connection (its probes): no client behind it.
    Local,
    /// A client's connection, with its addresses.
    Proxy,
}

/// A parsed header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// LOCAL or PROXY.
    pub command: Command,
    /// The client's address and the address it connected to, for TCP over IPv4 or IPv6;
    /// `None` for UNSPEC (and usually for LOCAL).
    pub addresses: Option<(SocketAddr, SocketAddr)>,
    /// Every TLV, in order, as (type, value).
    pub tlvs: Vec<(u8, Vec<u8>)>,
    /// Azure's private endpoint LinkID, when its TLV is present and well formed.
    pub link_id: Option<u32>,
}

impl Header {
    /// The client's address, when the header carries one.
    pub fn client(&self) -> Option<SocketAddr> {
        self.addresses.map(|(source, _)| source)
    }
}

/// Why a header was refused; [`Refusal::reason`] is the label in logs and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The first bytes are not the v2 signature.
    Missing,
    /// A version 1 (text) header: `PROXY TCP4 ...`.
    Version1,
    /// Signature right, but the version, command or family is not one v2 defines.
    Malformed(String),
    /// The length announces more than [`MAX_HEADER_LEN`].
    Oversized(usize),
    /// The connection ended before the whole header arrived.
    Truncated,
    /// The whole header did not arrive within header_timeout.
    Timeout,
    /// A version 2 header on a route with `proxy_protocol = "off"`.
    Unexpected,
}

impl Refusal {
    /// A short, fixed label: `missing`, `v1`, `malformed`, `oversized`, `truncated`, `timeout`.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Missing => "missing",
            Refusal::Version1 => "v1",
            Refusal::Malformed(_) => "malformed",
            Refusal::Oversized(_) => "oversized",
            Refusal::Truncated => "truncated",
            Refusal::Timeout => "timeout",
            Refusal::Unexpected => "unexpected",
        }
    }

    /// Every label, for metrics.
    pub const REASONS: [&'static str; 7] = [
        "missing",
        "v1",
        "malformed",
        "oversized",
        "truncated",
        "timeout",
        "unexpected",
    ];
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Missing => f.write_str("no PROXY v2 header (the first bytes are not its signature)"),
            Refusal::Version1 => f.write_str("a PROXY version 1 (text) header; only version 2 is accepted"),
            Refusal::Malformed(why) => write!(f, "malformed PROXY v2 header: {why}"),
            Refusal::Oversized(len) => write!(
                f,
                "PROXY v2 header of {len} bytes, over the {MAX_HEADER_LEN}-byte bound"
            ),
            Refusal::Truncated => f.write_str("the connection ended inside the PROXY v2 header"),
            Refusal::Timeout => f.write_str("the PROXY v2 header did not arrive within header_timeout"),
            Refusal::Unexpected => f.write_str("a PROXY v2 header on a route that expects none"),
        }
    }
}

/// Checks the fixed part; returns the whole header's length.
pub fn header_len(fixed: &[u8; FIXED_LEN]) -> Result<usize, Refusal> {
    if fixed[..12] != SIGNATURE {
        return Err(if fixed.starts_with(b"PROXY ") {
            Refusal::Version1
        } else {
            Refusal::Missing
        });
    }
    let len = FIXED_LEN + usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    if len > MAX_HEADER_LEN {
        return Err(Refusal::Oversized(len));
    }
    Ok(len)
}

/// Whether `prefix` (the first bytes received) can still be the start of a v2 header, so a
/// stranger is refused at its first bytes rather than after a timeout.
pub fn could_be_header(prefix: &[u8]) -> Result<(), Refusal> {
    let n = prefix.len().min(SIGNATURE.len());
    if prefix[..n] == SIGNATURE[..n] {
        Ok(())
    } else if b"PROXY ".starts_with(&prefix[..prefix.len().min(6)]) {
        // Could still become "PROXY ": wait for more, unless it already is.
        if prefix.len() >= 6 {
            Err(Refusal::Version1)
        } else {
            Ok(())
        }
    } else {
        Err(Refusal::Missing)
    }
}

/// Parses a complete header (`bytes` is exactly its length, as [`header_len`] gave).
pub fn parse(bytes: &[u8]) -> Result<Header, Refusal> {
    let fixed: &[u8; FIXED_LEN] = bytes
        .get(..FIXED_LEN)
        .and_then(|b| b.try_into().ok())
        .ok_or(Refusal::Truncated)?;
    let len = header_len(fixed)?;
    if bytes.len() != len {
        return Err(Refusal::Truncated);
    }
    let version = fixed[12] >> 4;
    if version != 2 {
        return Err(Refusal::Malformed(format!("version {version}, not 2")));
    }
    let command = match fixed[12] & 0x0F {
        0 => Command::Local,
        1 => Command::Proxy,
        other => return Err(Refusal::Malformed(format!("command {other}"))),
    };
    let body = &bytes[FIXED_LEN..];
    let (addresses, rest) = match fixed[13] {
        0x00 => (None, body),
        0x11 => {
            let a = body
                .get(..12)
                .ok_or_else(|| Refusal::Malformed("IPv4 addresses cut short".into()))?;
            let ip = |at: usize| IpAddr::V4(Ipv4Addr::new(a[at], a[at + 1], a[at + 2], a[at + 3]));
            let port = |at: usize| u16::from_be_bytes([a[at], a[at + 1]]);
            (
                Some((SocketAddr::new(ip(0), port(8)), SocketAddr::new(ip(4), port(10)))),
                &body[12..],
            )
        }
        0x21 => {
            let a = body
                .get(..36)
                .ok_or_else(|| Refusal::Malformed("IPv6 addresses cut short".into()))?;
            let ip = |at: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&a[at..at + 16]);
                IpAddr::V6(Ipv6Addr::from(octets))
            };
            let port = |at: usize| u16::from_be_bytes([a[at], a[at + 1]]);
            (
                Some((
                    SocketAddr::new(ip(0), port(32)),
                    SocketAddr::new(ip(16), port(34)),
                )),
                &body[36..],
            )
        }
        other => {
            return Err(Refusal::Malformed(format!(
                "family/transport 0x{other:02x} (TCP over IPv4 or IPv6, or UNSPEC, expected)"
            )));
        }
    };
    let mut tlvs = Vec::new();
    let mut link_id = None;
    let mut at = 0;
    while at < rest.len() {
        let head = rest
            .get(at..at + 3)
            .ok_or_else(|| Refusal::Malformed("a TLV header cut short".into()))?;
        let kind = head[0];
        let value_len = usize::from(u16::from_be_bytes([head[1], head[2]]));
        let value = rest
            .get(at + 3..at + 3 + value_len)
            .ok_or_else(|| Refusal::Malformed(format!("TLV 0x{kind:02x} runs past the header")))?;
        // Azure's LinkID: subtype 0x01 and four bytes; another shape is kept but not trusted.
        if kind == AZURE_TLV && value.len() == 5 && value[0] == AZURE_LINK_ID {
            link_id = Some(u32::from_le_bytes([value[1], value[2], value[3], value[4]]));
        }
        tlvs.push((kind, value.to_vec()));
        at += 3 + value_len;
    }
    Ok(Header {
        command,
        addresses,
        tlvs,
        link_id,
    })
}

/// Encodes `header` (for the upstream, or a test). Address families that differ are sent as
/// UNSPEC, and TLVs that would not fit are left out.
pub fn encode(header: &Header) -> Vec<u8> {
    let mut body = Vec::new();
    let family = match header.addresses {
        Some((SocketAddr::V4(s), SocketAddr::V4(d))) => {
            body.extend_from_slice(&s.ip().octets());
            body.extend_from_slice(&d.ip().octets());
            body.extend_from_slice(&s.port().to_be_bytes());
            body.extend_from_slice(&d.port().to_be_bytes());
            0x11
        }
        Some((SocketAddr::V6(s), SocketAddr::V6(d))) => {
            body.extend_from_slice(&s.ip().octets());
            body.extend_from_slice(&d.ip().octets());
            body.extend_from_slice(&s.port().to_be_bytes());
            body.extend_from_slice(&d.port().to_be_bytes());
            0x21
        }
        _ => 0x00,
    };
    for (kind, value) in &header.tlvs {
        if FIXED_LEN + body.len() + 3 + value.len() > MAX_HEADER_LEN {
            break;
        }
        body.push(*kind);
        body.extend_from_slice(&(value.len() as u16).to_be_bytes());
        body.extend_from_slice(value);
    }
    let mut out = Vec::with_capacity(FIXED_LEN + body.len());
    out.extend_from_slice(&SIGNATURE);
    out.push(
        0x20 | match header.command {
            Command::Local => 0,
            Command::Proxy => 1,
        },
    );
    out.push(family);
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Azure's LinkID TLV value for `link_id`.
pub fn azure_link_tlv(link_id: u32) -> (u8, Vec<u8>) {
    let mut value = vec![AZURE_LINK_ID];
    value.extend_from_slice(&link_id.to_le_bytes());
    (AZURE_TLV, value)
}

/// What a connection's first bytes say, on a route that may or may not get a header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum First {
    /// They are (or begin) the v2 signature: a header to read.
    Header,
    /// They are a version 1 (text) header.
    Version1,
    /// Anything else: the client's own protocol (SSH, TLS, HTTP), to relay unchanged.
    Other,
    /// Nothing came within the wait: a client that waits for the server.
    Silent,
    /// The client closed without a byte.
    Closed,
}

/// What `prefix` (the first bytes received) says, or `None` while it could still become either
/// a header or something else.
pub fn classify(prefix: &[u8]) -> Option<First> {
    const V1: &[u8] = b"PROXY ";
    let n = prefix.len();
    if n >= SIGNATURE.len() {
        return Some(if prefix[..SIGNATURE.len()] == SIGNATURE {
            First::Header
        } else if prefix.starts_with(V1) {
            First::Version1
        } else {
            First::Other
        });
    }
    if n == 0 || prefix == &SIGNATURE[..n] {
        return None;
    }
    if n >= V1.len() {
        return Some(if prefix.starts_with(V1) {
            First::Version1
        } else {
            First::Other
        });
    }
    if prefix == &V1[..n] {
        None
    } else {
        Some(First::Other)
    }
}

/// Looks at the first bytes `stream` has sent without taking any, so that a connection with no
/// header is relayed from its first byte (zero-copy, as any other). Waits up to `silence` for a
/// first byte, and up to `more` (from now) for the rest of a prefix that could still be a header
/// either way; what it cannot tell by then counts as no header (nothing consumed, nothing lost),
/// except a signature begun, which is a header (a slow one: it is read next, and refused if it
/// does not come whole). Each wait is woken by a new segment only (the peek runs inside tokio's
/// readiness check, so "not enough yet" waits for the next edge instead of spinning).
pub async fn first_bytes(
    stream: &tokio::net::TcpStream,
    silence: Duration,
    more: Duration,
) -> std::io::Result<First> {
    let started = tokio::time::Instant::now();
    let mut buf = [0u8; SIGNATURE.len()];
    let mut seen = 0;
    loop {
        let limit = if seen == 0 { silence } else { more };
        let waited = tokio::time::timeout_at(started + limit, stream.readable()).await;
        if waited.is_err() {
            return Ok(match seen {
                0 => First::Silent,
                n if buf[..n] == SIGNATURE[..n] => First::Header,
                _ => First::Other,
            });
        }
        waited.unwrap_or(Ok(()))?;
        let peeked = stream.try_io(tokio::io::Interest::READABLE, || {
            // SAFETY: `buf` is valid for writes of its length; the socket is non-blocking.
            let n = unsafe {
                libc::recv(
                    std::os::fd::AsRawFd::as_raw_fd(stream),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_PEEK,
                )
            };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let n = n as usize;
            match classify(&buf[..n]) {
                // Not enough yet: clears the readiness, so the next wait is for a new segment.
                None if n > 0 => {
                    seen = n;
                    Err(std::io::ErrorKind::WouldBlock.into())
                }
                None => Ok(First::Closed),
                Some(first) => Ok(first),
            }
        });
        match peeked {
            Ok(first) => return Ok(first),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// The bytes of a header read so far. It belongs to the caller, so that reading can stop at
/// any await (a live upgrade parks the connection) and go on later, in this program image or the
/// next, from where it stopped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Partial {
    bytes: Vec<u8>,
}

impl Partial {
    /// What was read before (carried across a live upgrade).
    pub fn from_bytes(bytes: Vec<u8>) -> Partial {
        Partial { bytes }
    }

    /// The bytes read so far.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// How many bytes the header has in all, as far as the bytes so far tell; `Ok(None)` while
    /// its fixed part is incomplete.
    fn wanted(&self) -> Result<Option<usize>, Refusal> {
        match self.bytes.get(..FIXED_LEN) {
            Some(fixed) => {
                let fixed: &[u8; FIXED_LEN] = fixed.try_into().map_err(|_| Refusal::Truncated)?;
                header_len(fixed).map(Some)
            }
            None => Ok(None),
        }
    }
}

/// Reads exactly one header from `stream` within `timeout` (see [`read_into`]).
pub async fn read(stream: &mut tokio::net::TcpStream, timeout: Duration) -> Result<Header, Refusal> {
    let mut partial = Partial::default();
    tokio::time::timeout(timeout, read_into(stream, &mut partial))
        .await
        .unwrap_or(Err(Refusal::Timeout))
}

/// Reads exactly one header from `stream` into `partial`, and not one byte more: what follows
/// stays in the socket, so the relay (splice included) starts right after it. A stream whose
/// first bytes cannot start a v2 header is refused at once. Cancel-safe: dropped at any await,
/// every byte read so far is in `partial`. The caller bounds the wait (header_timeout).
pub async fn read_into(stream: &mut tokio::net::TcpStream, partial: &mut Partial) -> Result<Header, Refusal> {
    loop {
        let got = partial.bytes.len();
        if got > 0 {
            could_be_header(&partial.bytes[..got.min(FIXED_LEN)])?;
        }
        let wanted = partial.wanted()?.unwrap_or(FIXED_LEN);
        if got >= wanted {
            return parse(&partial.bytes[..wanted]);
        }
        // A read into a chunk of its own, appended once it returned: a read that never returns
        // (the wait was dropped) appended nothing.
        let mut chunk = [0u8; 64];
        let n = stream
            .read(&mut chunk[..(wanted - got).min(64)])
            .await
            .map_err(|_| Refusal::Truncated)?;
        if n == 0 {
            return Err(if got == 0 {
                Refusal::Missing
            } else {
                Refusal::Truncated
            });
        }
        partial.bytes.extend_from_slice(&chunk[..n]);
    }
}

#[cfg(test)]
mod first_tests;
#[cfg(test)]
mod tests;
