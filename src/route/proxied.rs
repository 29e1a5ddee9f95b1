//! Admission by the PROXY v2 header, on a route with `proxy_protocol = "v2"`: once the connection
//! has read its one header (or failed to, within header_timeout), answer LOCAL (the balancer's
//! own probes) here, and admit a PROXY connection only if its LinkID and client address are
//! allowed.
//!
//! It runs in the connection's task, after the TCP peer has passed the route's allowlist, the
//! probe check and max_connections, so a client that sends nothing costs one connection slot
//! for at most header_timeout. It must not dial: nothing reaches the upstream before this says so.

use std::net::SocketAddr;

use super::Quiet;
use crate::config::ProxyV2;
use crate::proxy_header::{Command, Header, Refusal};
use crate::state::{Outcome, RouteStats};

/// How a connection that is not relayed is closed.
pub(super) enum Close {
    /// An orderly FIN: a LOCAL probe was answered.
    Fin,
    /// A reset: refused.
    Reset,
}

/// Judges what reading the header gave. `Ok(header)`: relay. `Err(close)`: the connection was
/// answered or refused here, counted and logged; the caller closes it as `close` says.
pub(super) fn admit(
    read: Result<Header, Refusal>,
    peer: SocketAddr,
    route: &str,
    proxy: &ProxyV2,
    stats: &RouteStats,
    quiet: &Quiet,
) -> Result<Header, Close> {
    let header = match read {
        Ok(header) => header,
        Err(refusal) => {
            stats.header_refused(refusal.reason());
            stats.record(Outcome::Denied);
            if let Some(suppressed) = quiet.header.admit() {
                if refusal == Refusal::Missing {
                    tracing::warn!(route, client = %peer, end = "denied", reason = refusal.reason(), error = %refusal, suppressed, "PROXY v2 header refused; connection reset: the Private Link Service may have TCP proxy v2 off (proxy_protocol = \"auto\" on route {route} accepts connections with and without one)");
                } else {
                    tracing::warn!(route, client = %peer, end = "denied", reason = refusal.reason(), error = %refusal, suppressed, "PROXY v2 header refused; connection reset");
                }
            }
            return Err(Close::Reset);
        }
    };
    if header.command == Command::Local {
        // The balancer's health check through Private Link: answered here, like a probe.
        stats.record(Outcome::Probe);
        stats.probed(peer.ip().to_canonical());
        if let Some(suppressed) = quiet.probe.admit() {
            tracing::info!(route, client = %peer, end = "probe", suppressed, "PROXY v2 LOCAL (a probe) answered locally");
        }
        return Err(Close::Fin);
    }
    let link_ok = proxy
        .allow_link_ids
        .as_ref()
        .is_none_or(|ids| header.link_id.is_some_and(|id| ids.contains(&id)));
    let client_ok = proxy
        .allow_clients
        .as_ref()
        .is_none_or(|allowed| header.client().is_some_and(|c| allowed.contains(c.ip())));
    if !link_ok || !client_ok {
        stats.record(Outcome::Denied);
        if let Some(suppressed) = quiet.denied.admit() {
            tracing::warn!(
                route,
                client = %peer,
                proxied_client = header.client().map(|c| c.to_string()),
                link_id = header.link_id,
                end = "denied",
                suppressed,
                "{}",
                if link_ok { "client in the PROXY header not in allow_clients; connection reset" } else { "LinkID not in allow_link_ids; connection reset" }
            );
        }
        return Err(Close::Reset);
    }
    stats.proxied(peer, &header);
    Ok(header)
}
