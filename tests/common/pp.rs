//! PROXY protocol helpers shared by the PROXY tests: an upstream that speaks first, headers as
//! the Private Link Service sends them, and how a connection ended.
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

use super::{Daemon, Upstream, config_one_route, free_port};
use ferryd::proxy_header::{self, Command as PpCommand, Header};

pub const LINK_ID: u32 = 587_202_560;
pub const BANNER: &[u8] = b"SSH-2.0-upstream-speaks-first\r\n";

/// An upstream that speaks first (like sshd) and reports everything it then receives.
pub fn server_first() -> (Upstream, mpsc::Receiver<Vec<u8>>) {
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let upstream = Upstream::start(move |mut stream| {
        let tx = tx.lock().unwrap().clone();
        let _ = stream.write_all(BANNER);
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        let _ = tx.send(got);
    });
    (upstream, rx)
}

pub fn header(client: &str, link_id: Option<u32>) -> Vec<u8> {
    let mut tlvs = vec![(0x04, vec![])];
    if let Some(id) = link_id {
        tlvs.push(proxy_header::azure_link_tlv(id));
    }
    tlvs.push((0x30, b"other".to_vec()));
    proxy_header::encode(&Header {
        command: PpCommand::Proxy,
        addresses: Some((client.parse().unwrap(), "10.0.0.5:60001".parse().unwrap())),
        tlvs,
        link_id,
    })
}

pub fn local_header() -> Vec<u8> {
    proxy_header::encode(&Header {
        command: PpCommand::Local,
        addresses: None,
        tlvs: vec![],
        link_id: None,
    })
}

pub fn proxy_route(upstream: SocketAddr, extra: &str) -> (String, u16) {
    let port = free_port();
    (
        config_one_route(port, upstream, "", &format!("proxy_protocol = \"v2\"\n{extra}")),
        port,
    )
}

pub fn read_banner(stream: &mut TcpStream) {
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut banner = vec![0u8; BANNER.len()];
    stream.read_exact(&mut banner).unwrap();
    assert_eq!(banner, BANNER);
}

/// How a connection ended from the client's side: "eof", "reset", or "open" (still open after
/// `wait`).
pub fn end_of(stream: &mut TcpStream, wait: Duration) -> &'static str {
    stream.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Ok(0) => "eof",
        Ok(_) => "data",
        Err(e) if e.kind() == ErrorKind::ConnectionReset => "reset",
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => "open",
        Err(_) => "error",
    }
}

pub fn status(daemon: &Daemon) -> serde_json::Value {
    let answer = daemon.health_request("GET /status HTTP/1.0\r\n\r\n").unwrap();
    serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap()
}
