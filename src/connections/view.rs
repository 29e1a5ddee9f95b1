//! The connection listing as the world reads it: `GET /connections` on the health endpoint, and
//! `ferryd connections`, which reads it back. One declaration for both, so the command cannot
//! misread what the daemon wrote.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::{Direction, Live};

/// One relayed connection in `/connections`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConnectionView {
    /// Its id (`conn=` in the log).
    pub id: u64,
    /// The route it was accepted on.
    pub route: String,
    /// The TCP peer (the balancer's address with Private Link).
    pub client: SocketAddr,
    /// The client its PROXY v2 header named, if any.
    pub proxied_client: Option<SocketAddr>,
    /// The LinkID its PROXY v2 header named, if any.
    pub link_id: Option<u32>,
    /// The build VM's address it was dialled at.
    pub upstream: SocketAddr,
    /// Seconds since it was accepted.
    pub age_s: f64,
    /// Seconds since a byte last moved either way.
    pub idle_s: f64,
    /// Bytes written to the upstream so far.
    pub bytes_up: u64,
    /// Bytes written to the client so far.
    pub bytes_down: u64,
    /// Client → upstream.
    pub up: DirectionView,
    /// Upstream → client.
    pub down: DirectionView,
    /// Seconds until idle_timeout (fin_timeout once half-closed) ends it if nothing moves;
    /// `null` when no timer would.
    pub deadline_s: Option<f64>,
}

/// One direction of a connection in `/connections`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectionView {
    /// `open`, `half-closed` or `parked`.
    pub state: String,
    /// `splice` or `copy`: how its latest burst moved.
    pub mode: String,
    /// Bytes read from its source and not yet written to its destination (in its pipe or
    /// buffer).
    pub held_bytes: u64,
}

impl DirectionView {
    fn of(direction: &Direction) -> Self {
        DirectionView {
            state: direction.state().name().to_string(),
            mode: if direction.splicing() { "splice" } else { "copy" }.to_string(),
            held_bytes: direction.held(),
        }
    }
}

/// Seconds with millisecond precision: what a person reads and a script compares.
fn seconds(d: std::time::Duration) -> f64 {
    (d.as_millis() as f64) / 1000.0
}

impl ConnectionView {
    /// How `live` stands now.
    pub fn of(live: &Live) -> Self {
        let who = &live.who;
        ConnectionView {
            id: who.id,
            route: who.route.to_string(),
            client: who.client,
            proxied_client: who.proxied_client,
            link_id: who.link_id,
            upstream: who.upstream,
            age_s: seconds(live.activity.age()),
            idle_s: seconds(live.activity.last().elapsed()),
            bytes_up: live.up.bytes_written(),
            bytes_down: live.down.bytes_written(),
            up: DirectionView::of(&live.up),
            down: DirectionView::of(&live.down),
            deadline_s: live.activity.until_deadline().map(seconds),
        }
    }
}
