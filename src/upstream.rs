//! Dialling the build VM: name resolution at each attempt, the connect timeout, and a verdict
//! that says why a dial failed.
//!
//! This module owns turning an [`Upstream`] into a connected, tuned socket. It must not retry
//! behind the client's back: a failed dial is reported at once so the client is reset at once,
//! and the next client's connection simply dials again (the build VM reboots during builds).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::SockRef;
use tokio::net::{TcpSocket, TcpStream};

use crate::config::{Keepalive, Upstream};
use crate::state::Outcome;

/// Why a dial failed, in the words the log and the counters use.
#[derive(Debug)]
pub struct DialError {
    /// UpstreamRefused, UpstreamTimeout or UpstreamUnreachable.
    pub outcome: Outcome,
    /// The address that was tried last, when resolution got that far.
    pub addr: Option<SocketAddr>,
    /// What the system said.
    pub reason: String,
}

/// Connects to `upstream` within what is left of `timeout` once `spent` has gone by (an attempt
/// a live upgrade cut short goes on with the rest), resolution included, trying each resolved
/// address in turn, with keepalive and TCP_NODELAY set before the SYN goes out.
pub async fn dial(
    upstream: &Upstream,
    timeout: Duration,
    spent: Duration,
    keepalive: &Keepalive,
) -> Result<(TcpStream, SocketAddr), DialError> {
    let left = timeout.saturating_sub(spent);
    match tokio::time::timeout(left, dial_inner(upstream, keepalive)).await {
        Ok(result) => result,
        Err(_) => Err(DialError {
            outcome: Outcome::UpstreamTimeout,
            addr: match upstream {
                Upstream::Addr(addr) => Some(*addr),
                Upstream::Host { .. } => None,
            },
            reason: format!(
                "no answer within connect_timeout ({})",
                humantime::format_duration(timeout)
            ),
        }),
    }
}

async fn dial_inner(
    upstream: &Upstream,
    keepalive: &Keepalive,
) -> Result<(TcpStream, SocketAddr), DialError> {
    let addrs = match upstream {
        // The common case, allocation-free: it runs once per relayed connection.
        Upstream::Addr(addr) => {
            return match connect(*addr, keepalive).await {
                Ok(stream) => Ok((stream, *addr)),
                Err(e) => Err(failed(*addr, e)),
            };
        }
        Upstream::Host { host, port } => match tokio::net::lookup_host((host.as_str(), *port)).await {
            Ok(addrs) => addrs,
            Err(e) => {
                return Err(DialError {
                    outcome: Outcome::UpstreamUnreachable,
                    addr: None,
                    reason: format!("cannot resolve {host}: {e}"),
                });
            }
        },
    };
    let mut last = None;
    for addr in addrs {
        match connect(addr, keepalive).await {
            Ok(stream) => return Ok((stream, addr)),
            Err(e) => last = Some(failed(addr, e)),
        }
    }
    Err(last.unwrap_or_else(|| DialError {
        outcome: Outcome::UpstreamUnreachable,
        addr: None,
        reason: format!("{upstream} resolved to no address"),
    }))
}

fn failed(addr: SocketAddr, e: io::Error) -> DialError {
    let outcome = if e.kind() == io::ErrorKind::ConnectionRefused {
        Outcome::UpstreamRefused
    } else {
        Outcome::UpstreamUnreachable
    };
    DialError {
        outcome,
        addr: Some(addr),
        reason: e.to_string(),
    }
}

async fn connect(addr: SocketAddr, keepalive: &Keepalive) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    crate::net::tune_socket(SockRef::from(&socket), keepalive)?;
    socket.connect(addr).await
}
