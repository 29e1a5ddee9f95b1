//! PROXY protocol v2 whether or not the Private Link Service sends it: with `proxy_protocol =
//! "auto"` (the default) the same route takes connections with a header and without one, the
//! latter relayed unchanged from their first byte; "off" and "v2" stay strict and say what is
//! wrong; `/status` and the log say what the service is doing.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::pp::*;
use common::*;

/// A route with the default settings (no `proxy_protocol` key) to `upstream`.
fn default_route(upstream: std::net::SocketAddr) -> (String, u16) {
    let port = free_port();
    (config_one_route(port, upstream, "", ""), port)
}

#[test]
fn auto_takes_connections_with_and_without_a_header_on_the_same_route() {
    let (upstream, rx) = server_first();
    let (config, port) = default_route(upstream.addr);
    let daemon = Daemon::start(&config);

    // Without a header, speaking first (as an SSH or TLS client does): every byte reaches the
    // upstream unchanged, from the first.
    let mut plain = TcpStream::connect(local(port)).unwrap();
    plain.write_all(b"SSH-2.0-OpenSSH_9.6\r\n").unwrap();
    read_banner(&mut plain);
    plain.write_all(b"more").unwrap();
    plain.shutdown(std::net::Shutdown::Write).unwrap();
    let got = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(got, b"SSH-2.0-OpenSSH_9.6\r\nmore");

    // With a header (the Private Link Service's): read, never relayed, recorded.
    let mut proxied = TcpStream::connect(local(port)).unwrap();
    proxied
        .write_all(&header("203.0.113.9:40000", Some(LINK_ID)))
        .unwrap();
    proxied.write_all(b"after the header").unwrap();
    read_banner(&mut proxied);
    proxied.shutdown(std::net::Shutdown::Write).unwrap();
    let got = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(got, b"after the header");

    // A LOCAL header (the balancer's probe through Private Link): answered here, not dialled.
    let dialled = upstream.accepted();
    let mut probe = TcpStream::connect(local(port)).unwrap();
    probe.write_all(&local_header()).unwrap();
    assert_eq!(end_of(&mut probe, Duration::from_secs(5)), "eof");
    assert_eq!(upstream.accepted(), dialled, "a LOCAL probe was dialled");

    // A v1 header is refused, without a dial.
    let mut v1 = TcpStream::connect(local(port)).unwrap();
    v1.write_all(b"PROXY TCP4 203.0.113.9 10.0.0.5 40000 60001\r\n")
        .unwrap();
    assert_eq!(end_of(&mut v1, Duration::from_secs(5)), "reset");
    assert_eq!(upstream.accepted(), dialled, "a v1 header was dialled");

    let status = status(&daemon);
    let route = &status["routes"][0];
    assert_eq!(route["proxy_protocol"], "auto", "{route}");
    assert_eq!(route["link_ids"][LINK_ID.to_string()], 1, "{route}");
    assert_eq!(route["header_refusals"]["v1"], 1, "{route}");
    assert_eq!(route["proxy_headers"], "mixed", "{route}");
    daemon.expect_log("some connections carry a PROXY v2 header", Duration::from_secs(2));
}

/// A client that sends nothing (it waits for the server) still gets the upstream's banner,
/// after at most the short wait `SILENT_CLIENT_WAIT` (200 ms) and some slack.
#[test]
fn a_silent_client_gets_the_banner_within_the_bound() {
    let (upstream, _rx) = server_first();
    let (config, port) = default_route(upstream.addr);
    let _daemon = Daemon::start(&config);
    let mut silent = TcpStream::connect(local(port)).unwrap();
    let started = Instant::now();
    read_banner(&mut silent);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(150) && took < Duration::from_millis(700),
        "the banner came after {took:?}"
    );
}

/// A header split into single bytes, and one whose first segment holds only part of the
/// signature followed by a pause: both read as headers, nothing of them relayed.
#[test]
fn a_split_or_paused_header_is_still_a_header() {
    let (upstream, rx) = server_first();
    let (config, port) = default_route(upstream.addr);
    let _daemon = Daemon::start(&config);
    let bytes = header("203.0.113.9:40001", None);

    let mut split = TcpStream::connect(local(port)).unwrap();
    split.set_nodelay(true).unwrap();
    for byte in &bytes {
        split.write_all(&[*byte]).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    split.write_all(b"split").unwrap();
    read_banner(&mut split);
    split.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), b"split");

    let mut paused = TcpStream::connect(local(port)).unwrap();
    paused.set_nodelay(true).unwrap();
    paused.write_all(&bytes[..5]).unwrap();
    // Longer than the silent-client wait: a begun signature is waited for (header_timeout).
    std::thread::sleep(Duration::from_millis(600));
    paused.write_all(&bytes[5..]).unwrap();
    paused.write_all(b"paused").unwrap();
    read_banner(&mut paused);
    paused.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), b"paused");
}

/// With "off", a connection that starts with the v2 signature is reset before any dial,
/// counted as `unexpected`, and the log says what to set.
#[test]
fn off_refuses_a_header_and_names_the_fix() {
    let (upstream, _rx) = server_first();
    let port = free_port();
    let daemon = Daemon::start(&config_one_route(
        port,
        upstream.addr,
        "",
        "proxy_protocol = \"off\"",
    ));
    let mut client = TcpStream::connect(local(port)).unwrap();
    client.write_all(&header("203.0.113.9:40002", None)).unwrap();
    assert_eq!(end_of(&mut client, Duration::from_secs(5)), "reset");
    assert_eq!(upstream.accepted(), 0, "dialled for a refused header");
    let line = daemon.expect_log(
        "the Private Link Service sends PROXY protocol v2",
        Duration::from_secs(2),
    );
    assert!(
        line.contains("set proxy_protocol = \\\"auto\\\" or \\\"v2\\\" on route test")
            || line.contains("set proxy_protocol = \"auto\" or \"v2\" on route test"),
        "{line}"
    );
    let scrape = daemon.health_request("GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    assert!(
        scrape.contains("ferryd_proxy_header_refusals_total{route=\"test\",reason=\"unexpected\"} 1"),
        "{scrape}"
    );
    // doctor names it, with the fix.
    let finding = doctor_finding(&daemon, "route test: proxy protocol");
    assert_eq!(finding["status"], "fail", "{finding}");
    assert!(
        finding["fix"]
            .as_str()
            .unwrap_or("")
            .contains("set proxy_protocol = \"auto\""),
        "{finding}"
    );
    // A client without a header is relayed as before.
    let mut plain = TcpStream::connect(local(port)).unwrap();
    plain.write_all(b"SSH-2.0-client\r\n").unwrap();
    read_banner(&mut plain);
    assert_eq!(status(&daemon)["routes"][0]["proxy_headers"], "mixed");
}

/// `ferryd doctor --json`'s finding named `check`.
fn doctor_finding(daemon: &Daemon, check: &str) -> serde_json::Value {
    let out = std::process::Command::new(bin())
        .args(["doctor", "--json", "--config"])
        .arg(&daemon.config)
        .output()
        .expect("run ferryd doctor");
    let findings: serde_json::Value = serde_json::from_slice(&out.stdout).expect("doctor's JSON");
    findings
        .as_array()
        .and_then(|all| all.iter().find(|f| f["check"] == check))
        .cloned()
        .unwrap_or_else(|| panic!("no {check:?} in {findings}"))
}

/// With "v2", a connection without a header is refused as before, and the log says the
/// service may have TCP proxy v2 off.
#[test]
fn v2_refusing_a_missing_header_hints_at_the_service() {
    let (upstream, _rx) = server_first();
    let (config, port) = proxy_route(upstream.addr, "");
    let daemon = Daemon::start(&config);
    let mut client = TcpStream::connect(local(port)).unwrap();
    client.write_all(b"SSH-2.0-client\r\n").unwrap();
    assert_eq!(end_of(&mut client, Duration::from_secs(5)), "reset");
    let line = daemon.expect_log("may have TCP proxy v2 off", Duration::from_secs(2));
    assert!(line.contains("reason=\"missing\""), "{line}");
    assert_eq!(status(&daemon)["routes"][0]["proxy_headers"], "not seen");
    let finding = doctor_finding(&daemon, "route test: proxy protocol");
    assert_eq!(finding["status"], "fail", "{finding}");
    assert!(
        finding["detail"]
            .as_str()
            .unwrap_or("")
            .contains("TCP proxy v2 off"),
        "{finding}"
    );
}

/// The health endpoint with its default settings answers a plain GET and one behind a LOCAL
/// header (the balancer's HTTP probe through a Private Link Service with TCP proxy v2 on).
#[test]
fn the_health_endpoint_answers_with_and_without_a_header_by_default() {
    let (upstream, _rx) = server_first();
    let (config, _port) = default_route(upstream.addr);
    let daemon = Daemon::start(&config);
    let plain = daemon.health_request("GET /healthz HTTP/1.0\r\n\r\n").unwrap();
    assert!(plain.starts_with("HTTP/1.0 200"), "{plain}");
    let port = daemon.health_port.unwrap();
    let mut behind = TcpStream::connect(local(port)).unwrap();
    behind.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    behind.write_all(&local_header()).unwrap();
    behind
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    let _ = behind.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}
