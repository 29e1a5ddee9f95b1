//! The one client of the daemon's health endpoint that `ferryd status`, `upgrade`, `doctor` and
//! `connections` share: where to ask (a wildcard listen address is reached on loopback), what to
//! write first (a LOCAL PROXY v2 header when the endpoint expects one), one bounded GET, and a
//! JSON answer read back with the reason when it is not one.
//!
//! It must not change anything: it only asks.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::config::Health;
use crate::status::StatusDocument;

/// How long each step of a question may take (connect, and each read).
const ASK_TIMEOUT: Duration = Duration::from_secs(3);

/// The daemon's health endpoint as the configuration names it.
#[derive(Clone, Debug)]
pub struct Client {
    /// Where to ask.
    pub target: SocketAddr,
    preamble: Vec<u8>,
}

impl Client {
    /// The endpoint `[health]` describes.
    pub fn new(health: &Health) -> Client {
        Client {
            target: local_target(health.listen),
            preamble: health_preamble(health),
        }
    }

    /// One HTTP/1.0 GET of `path`; the whole answer, head and body. Every step is bounded by
    /// [`ASK_TIMEOUT`].
    pub fn get(&self, path: &str) -> std::io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&self.target, ASK_TIMEOUT)?;
        stream.set_read_timeout(Some(ASK_TIMEOUT))?;
        let mut request = self.preamble.clone();
        request.extend_from_slice(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes());
        stream.write_all(&request)?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response)?;
        Ok(String::from_utf8_lossy(&response).into_owned())
    }

    /// The JSON document at `path`, or why there is none: not answering, an answer other than
    /// 200 (with the likely reason), or a body that does not read as one.
    pub fn json<T: DeserializeOwned>(&self, path: &str) -> Result<T, String> {
        let target = self.target;
        let text = self
            .get(path)
            .map_err(|e| format!("not answering on http://{target}{path}: {e}"))?;
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("http://{target}{path}: malformed HTTP response"))?;
        let status_line = head.lines().next().unwrap_or_default();
        if !status_line.contains(" 200 ") {
            return Err(format!(
                "http://{target}{path} answered {status_line:?} (is this source in [health] metrics_allow?)"
            ));
        }
        serde_json::from_str(body).map_err(|e| format!("unreadable {path} document: {e}"))
    }

    /// The daemon's `/status`.
    pub fn status(&self) -> Result<StatusDocument, String> {
        self.json("/status")
    }
}

/// The address to ask: a wildcard listen address is reached on loopback.
fn local_target(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// What a local client writes first on the health port: a LOCAL PROXY v2 header when the
/// listener expects one (`[health] proxy_protocol = "v2"`), else nothing.
fn health_preamble(health: &Health) -> Vec<u8> {
    if health.proxy_protocol == crate::config::ProxyProtocol::V2 {
        crate::proxy_header::encode(&crate::proxy_header::Header {
            command: crate::proxy_header::Command::Local,
            addresses: None,
            tlvs: Vec::new(),
            link_id: None,
        })
    } else {
        Vec::new()
    }
}
