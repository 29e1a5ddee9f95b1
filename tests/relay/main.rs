//! The relay's behaviour through a real ferryd process on loopback: bytes, half-close, resets,
//! admission, limits and timeouts.

#[path = "../common/mod.rs"]
mod common;
mod urgent;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1024 * 1024;

fn read_error_kind(stream: &mut TcpStream) -> Result<usize, ErrorKind> {
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(0),
            Ok(_) => continue,
            Err(e) => return Err(e.kind()),
        }
    }
}

/// 256 MiB each way at the same time, checked byte for byte, and the exit summary shows the
/// bytes went through splice: only the first read of each direction is copied.
#[test]
fn bulk_both_directions_byte_exact_and_spliced() {
    const TOTAL: u64 = 256 * MIB;
    let upstream = Upstream::start(|stream| {
        let mut reader = stream.try_clone().unwrap();
        let checker = std::thread::spawn(move || Pattern::new(1).verify(&mut reader));
        let mut writer = stream;
        Pattern::new(2).send(&mut writer, TOTAL).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
        let got = checker
            .join()
            .unwrap()
            .expect("upstream received a corrupted stream");
        assert_eq!(got, TOTAL, "upstream received a short stream");
    });
    let port = free_port();
    let mut daemon = Daemon::start(&config_one_route(port, upstream.addr, "", ""));

    let client = TcpStream::connect(local(port)).unwrap();
    let mut reader = client.try_clone().unwrap();
    let checker = std::thread::spawn(move || Pattern::new(2).verify(&mut reader));
    let mut writer = client;
    Pattern::new(1).send(&mut writer, TOTAL).unwrap();
    writer.shutdown(Shutdown::Write).unwrap();
    let got = checker
        .join()
        .unwrap()
        .expect("client received a corrupted stream");
    assert_eq!(got, TOTAL);

    let closed = daemon.expect_log("connection closed", Duration::from_secs(10));
    assert_eq!(field(&closed, "end"), Some("eof"), "{closed}");
    assert_eq!(field(&closed, "bytes_up"), Some(TOTAL.to_string().as_str()));
    assert_eq!(field(&closed, "bytes_down"), Some(TOTAL.to_string().as_str()));

    assert!(daemon.stop().success());
    let summary = daemon.expect_log(" stopped relayed=", Duration::from_secs(1));
    let spliced: u64 = field(&summary, "spliced_bytes").unwrap().parse().unwrap();
    let copied: u64 = field(&summary, "copied_bytes").unwrap().parse().unwrap();
    assert_eq!(spliced + copied, 2 * TOTAL, "{summary}");
    // Each direction copies until its first bulk-sized read, then splices; a burst that finds
    // less than 16 KiB waiting is copied again (the mode follows the traffic), which on a busy
    // loopback happens now and then. Nearly every byte is spliced.
    assert!(copied < 2 * TOTAL / 100, "more than 1% copied: {summary}");
    assert_eq!(field(&summary, "fallback_no_pipe"), Some("0"), "{summary}");
    let pipes: u64 = field(&summary, "pipes_created").unwrap().parse().unwrap();
    assert!(
        (1..=2).contains(&pipes),
        "pipes are pooled, not made per burst: {summary}"
    );
}

/// With splice turned off, or with the pipe pool exhausted, the same transfer is copied
/// through a buffer, and the counters say so.
#[test]
fn copy_path_and_pool_exhaustion_are_counted() {
    for (extra, expect_fallbacks) in [("splice = false", false), ("max_pipes = 1", true)] {
        let upstream = Upstream::echo();
        let port = free_port();
        let mut daemon = Daemon::start(&config_one_route(port, upstream.addr, extra, ""));
        // Two connections echoing at once: with one pipe, one direction must copy.
        let mut clients: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(local(port)).unwrap()).collect();
        for c in &clients {
            // A stalled or spinning relay fails the test instead of hanging it.
            c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        }
        let pattern = Pattern::new(7);
        let threads: Vec<_> = clients
            .iter_mut()
            .map(|c| {
                let mut reader = c.try_clone().unwrap();
                std::thread::spawn(move || Pattern::new(7).verify(&mut reader))
            })
            .collect();
        for c in &mut clients {
            pattern.send(c, 8 * MIB).unwrap();
            c.shutdown(Shutdown::Write).unwrap();
        }
        for t in threads {
            assert_eq!(t.join().unwrap().unwrap(), 8 * MIB);
        }
        assert!(daemon.stop().success());
        let summary = daemon.expect_log(" stopped relayed=", Duration::from_secs(1));
        let copied: u64 = field(&summary, "copied_bytes").unwrap().parse().unwrap();
        let fallbacks: u64 = field(&summary, "fallback_no_pipe").unwrap().parse().unwrap();
        assert!(copied > 0, "{extra}: {summary}");
        if expect_fallbacks {
            assert!(fallbacks > 0, "{extra}: {summary}");
            assert!(
                !daemon.log_lines("every pipe is in use").is_empty(),
                "pool exhaustion must be logged"
            );
        } else {
            assert_eq!(field(&summary, "spliced_bytes"), Some("0"), "{summary}");
        }
    }
}

/// The client sends a request and its FIN; the upstream answers only after seeing EOF; the
/// client receives all of the answer.
#[test]
fn half_close_from_client_keeps_the_answer_flowing() {
    let upstream = Upstream::start(|mut stream| {
        let mut request = Vec::new();
        stream.read_to_end(&mut request).unwrap();
        assert_eq!(request, b"request then FIN");
        std::thread::sleep(Duration::from_millis(200));
        Pattern::new(3).send(&mut stream, 4 * MIB).unwrap();
    });
    let port = free_port();
    let _daemon = Daemon::start(&config_one_route(port, upstream.addr, "", ""));
    let mut client = TcpStream::connect(local(port)).unwrap();
    client.write_all(b"request then FIN").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    assert_eq!(Pattern::new(3).verify(&mut client).unwrap(), 4 * MIB);
}

/// The mirror case: the upstream speaks first and sends its FIN; the client answers after
/// EOF and the upstream receives all of it.
#[test]
fn half_close_from_upstream_keeps_the_answer_flowing() {
    let (tx, rx) = std::sync::mpsc::channel();
    let upstream = Upstream::start(move |mut stream| {
        stream.write_all(b"SSH-2.0-banner\r\n").unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        tx.send(Pattern::new(4).verify(&mut stream).map_err(|e| e.to_string()))
            .unwrap();
    });
    let port = free_port();
    let _daemon = Daemon::start(&config_one_route(port, upstream.addr, "", ""));
    let mut client = TcpStream::connect(local(port)).unwrap();
    let mut banner = Vec::new();
    client.read_to_end(&mut banner).unwrap();
    assert_eq!(banner, b"SSH-2.0-banner\r\n");
    Pattern::new(4).send(&mut client, 4 * MIB).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let got = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("upstream finished")
        .unwrap();
    assert_eq!(got, 4 * MIB);
}

fn abort(stream: TcpStream) {
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(stream);
}

/// A client reset reaches the upstream as a reset, not as an orderly end.
#[test]
fn client_reset_is_passed_on_as_reset() {
    let (tx, rx) = std::sync::mpsc::channel();
    let upstream = Upstream::start(move |mut stream| {
        tx.send(read_error_kind(&mut stream)).unwrap();
    });
    let port = free_port();
    let daemon = Daemon::start(&config_one_route(port, upstream.addr, "", ""));
    let mut client = TcpStream::connect(local(port)).unwrap();
    client.write_all(b"some bytes").unwrap();
    // Relaying (the upstream dialled) before the reset.
    daemon.expect_log("connection opened", Duration::from_secs(5));
    abort(client);
    let seen = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("upstream saw the end");
    assert_eq!(seen, Err(ErrorKind::ConnectionReset));
    let closed = daemon.expect_log("connection closed", Duration::from_secs(5));
    assert_eq!(field(&closed, "end"), Some("reset"), "{closed}");
}

/// An upstream reset reaches the client as a reset.
#[test]
fn upstream_reset_is_passed_on_as_reset() {
    let upstream = Upstream::start(|mut stream| {
        let mut buf = [0u8; 5];
        stream.read_exact(&mut buf).unwrap();
        abort(stream);
    });
    let port = free_port();
    let _daemon = Daemon::start(&config_one_route(port, upstream.addr, "", ""));
    let mut client = TcpStream::connect(local(port)).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    client.write_all(b"hello").unwrap();
    assert_eq!(read_error_kind(&mut client), Err(ErrorKind::ConnectionReset));
}

/// Nothing listens upstream: a client that speaks first, as SSH and TLS clients do, is reset at
/// once (well within 100 ms on loopback), and the log names the route and the reason.
#[test]
fn upstream_refused_resets_the_client_at_once() {
    let dead = local(free_port());
    let port = free_port();
    let daemon = Daemon::start(&config_one_route(port, dead, "", ""));
    let mut client = TcpStream::connect(local(port)).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    client.write_all(b"SSH-2.0-OpenSSH_9.6\r\n").unwrap();
    let result = read_error_kind(&mut client);
    let took = started.elapsed();
    assert_eq!(result, Err(ErrorKind::ConnectionReset));
    assert!(
        took < Duration::from_millis(100),
        "client released after {took:?}"
    );
    let line = daemon.expect_log("upstream connect failed", Duration::from_secs(2));
    assert_eq!(field(&line, "end"), Some("upstream-refused"), "{line}");
    assert_eq!(field(&line, "route"), Some("test"), "{line}");
}

/// Allowed source relayed; other source reset without a dial; probe source answered with a
/// FIN without a dial.
#[test]
fn allowlist_and_probe_sources() {
    let upstream = Upstream::echo();
    let port = free_port();
    let daemon = Daemon::start(&config_one_route(port, upstream.addr, "", ""));

    let mut allowed = connect_from(Ipv4Addr::new(127, 0, 0, 1), local(port)).unwrap();
    echo_roundtrip(&mut allowed, b"through").unwrap();
    assert_eq!(upstream.accepted(), 1);

    expect_reset(Ipv4Addr::new(127, 0, 0, 2), local(port));

    let mut probe = connect_from(Ipv4Addr::new(127, 0, 0, 3), local(port)).unwrap();
    probe.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(read_error_kind(&mut probe), Ok(0), "a probe gets an orderly FIN");

    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        upstream.accepted(),
        1,
        "neither the denied source nor the probe reached the upstream"
    );
    let line = daemon.expect_log("end=\"denied\"", Duration::from_secs(2));
    assert_eq!(
        field(&line, "client").map(|c| c.starts_with("127.0.0.2:")),
        Some(true),
        "{line}"
    );
    daemon.expect_log("end=\"probe\"", Duration::from_secs(2));
}

/// At max_connections the next client is reset; once one closes, a new one is admitted.
#[test]
fn max_connections_resets_the_excess() {
    let upstream = Upstream::echo();
    let port = free_port();
    let daemon = Daemon::start(&config_one_route(port, upstream.addr, "", "max_connections = 2"));
    let mut first = TcpStream::connect(local(port)).unwrap();
    let mut second = TcpStream::connect(local(port)).unwrap();
    echo_roundtrip(&mut first, b"1").unwrap();
    echo_roundtrip(&mut second, b"2").unwrap();

    expect_reset(Ipv4Addr::new(127, 0, 0, 1), local(port));
    daemon.expect_log("end=\"limit\"", Duration::from_secs(2));

    drop(first);
    daemon.expect_log("connection closed", Duration::from_secs(5));
    let mut fourth = TcpStream::connect(local(port)).unwrap();
    echo_roundtrip(&mut fourth, b"4").unwrap();
    echo_roundtrip(&mut second, b"still here").unwrap();
}

/// A connection with no bytes either way for idle_timeout is closed on both sides.
#[test]
fn idle_timeout_closes_both_sides() {
    let (tx, rx) = std::sync::mpsc::channel();
    let upstream = Upstream::start(move |mut stream| {
        let mut buf = [0u8; 3];
        stream.read_exact(&mut buf).unwrap();
        stream.write_all(&buf).unwrap();
        tx.send(read_error_kind(&mut stream)).unwrap();
    });
    let port = free_port();
    let daemon = Daemon::start(&config_one_route(
        port,
        upstream.addr,
        "",
        "idle_timeout = \"400ms\"",
    ));
    let mut client = TcpStream::connect(local(port)).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    echo_roundtrip(&mut client, b"abc").unwrap();
    let started = Instant::now();
    assert_eq!(read_error_kind(&mut client), Ok(0), "client sees the close");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "closed before the idle timeout"
    );
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(5)).unwrap(),
        Ok(0),
        "upstream sees the close"
    );
    let line = daemon.expect_log("connection closed", Duration::from_secs(2));
    assert_eq!(field(&line, "end"), Some("idle"), "{line}");
}

/// Once one side has sent its FIN, a connection that stays quiet for fin_timeout is closed,
/// even though idle_timeout is far away.
#[test]
fn half_closed_connection_is_bounded_by_fin_timeout() {
    let upstream = Upstream::start(|mut stream| {
        let mut request = Vec::new();
        let _ = stream.read_to_end(&mut request);
        // Never answer, never close: only ferryd can end this.
        std::thread::sleep(Duration::from_secs(30));
    });
    let port = free_port();
    let daemon = Daemon::start(&config_one_route(
        port,
        upstream.addr,
        "",
        "fin_timeout = \"300ms\"",
    ));
    let mut client = TcpStream::connect(local(port)).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    client.write_all(b"bye").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_error_kind(&mut client), Ok(0));
    let line = daemon.expect_log("connection closed", Duration::from_secs(2));
    assert_eq!(field(&line, "end"), Some("idle"), "{line}");
}

/// Both legs carry the configured TCP keepalive (so Azure's 4-minute idle cut never hits a quiet
/// SSH session), visible as a keepalive timer in `ss`.
#[test]
fn both_legs_have_keepalive() {
    skip_unless!(common::skip::have("ss"), "`ss` (iproute2) is not installed");
    let upstream = Upstream::echo();
    let port = free_port();
    let _daemon = Daemon::start(&config_one_route(
        port,
        upstream.addr,
        "",
        "keepalive_time = \"45s\"",
    ));
    let mut client = TcpStream::connect(local(port)).unwrap();
    echo_roundtrip(&mut client, b"keepalive?").unwrap();
    let client_port = client.local_addr().unwrap().port();

    let out = Command::new("ss")
        .args(["-tnoH", "state", "established"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    let sockets: Vec<(&str, &str, &str)> = table
        .lines()
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            (cols.len() >= 4).then(|| (cols[2], cols[3], line))
        })
        .collect();
    let client_leg = sockets
        .iter()
        .find(|(local_addr, peer, _)| {
            local_addr.ends_with(&format!(":{port}")) && peer.ends_with(&format!(":{client_port}"))
        })
        .expect("ferryd's client-side socket");
    let upstream_port = upstream.addr.port();
    let upstream_leg = sockets
        .iter()
        .find(|(local_addr, peer, _)| {
            peer.ends_with(&format!(":{upstream_port}")) && !local_addr.ends_with(&format!(":{client_port}"))
        })
        .expect("ferryd's upstream-side socket");
    for (leg, (_, _, line)) in [("client", client_leg), ("upstream", upstream_leg)] {
        assert!(
            line.contains("timer:(keepalive,4"),
            "{leg} leg has no 45 s keepalive timer: {line}"
        );
    }
}

/// On a dual-stack listener an IPv4 client appears as ::ffff:a.b.c.d and still matches the
/// IPv4 allowlist entry.
#[test]
fn ipv4_mapped_source_matches_ipv4_allowlist() {
    let upstream = Upstream::echo();
    let port = free_port();
    let config = config_one_route(port, upstream.addr, "", "").replace(
        &format!("listen = \"127.0.0.1:{port}\""),
        &format!("listen = \"[::]:{port}\""),
    );
    let _daemon = Daemon::start(&config);
    let mut client = TcpStream::connect(local(port)).unwrap();
    echo_roundtrip(&mut client, b"mapped").unwrap();
    expect_reset(Ipv4Addr::new(127, 0, 0, 2), local(port));
}

/// The FIN itself is activity: after a long quiet spell, a client that half-closes still gets
/// an answer that comes within fin_timeout of its FIN.
#[test]
fn fin_timeout_counts_from_the_fin_not_from_the_last_byte() {
    let upstream = Upstream::start(|mut stream| {
        let mut request = Vec::new();
        stream.read_to_end(&mut request).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        stream.write_all(b"answer after a pause").unwrap();
    });
    let port = free_port();
    let _daemon = Daemon::start(&config_one_route(
        port,
        upstream.addr,
        "",
        "fin_timeout = \"600ms\"",
    ));
    let mut client = TcpStream::connect(local(port)).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    client.write_all(b"question").unwrap();
    // Quiet for longer than fin_timeout (idle_timeout is hours away).
    std::thread::sleep(Duration::from_millis(1000));
    client.shutdown(Shutdown::Write).unwrap();
    let mut answer = Vec::new();
    client.read_to_end(&mut answer).unwrap();
    assert_eq!(answer, b"answer after a pause");
}
