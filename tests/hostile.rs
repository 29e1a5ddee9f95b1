//! Hostile and broken conditions: a scan flood from a source that is not allowed, an upstream
//! that drops SYNs, and a daemon killed with SIGKILL mid-transfer and started again.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

/// Tens of thousands of connects from a source that is not allowed: nothing is dialled, the log
/// stays bounded (rate-limited, with a count of what was suppressed), and an allowed client
/// relaying at the same time is unaffected.
#[test]
fn scan_flood_is_refused_quietly_and_legitimate_clients_continue() {
    const FLOOD: usize = 20_000;
    let upstream = Upstream::echo();
    let port = free_port();
    let daemon = Daemon::start_with(&config_one_route(port, upstream.addr, "", ""), |c| {
        c.env("FERRYD_LOG", "info");
    });

    let stop = Arc::new(AtomicBool::new(false));
    let legit_ok = Arc::new(AtomicUsize::new(0));
    let legit = {
        let (stop, ok) = (stop.clone(), legit_ok.clone());
        std::thread::spawn(move || -> Result<Duration, String> {
            let mut client = TcpStream::connect(local(port)).map_err(|e| e.to_string())?;
            client
                .set_read_timeout(Some(Duration::from_secs(5)))
                .map_err(|e| e.to_string())?;
            let mut worst = Duration::ZERO;
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                echo_roundtrip(&mut client, b"still here")
                    .map_err(|e| format!("legitimate client failed: {e}"))?;
                worst = worst.max(started.elapsed());
                ok.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(worst)
        })
    };

    let started = Instant::now();
    let scanners: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                let mut refused = 0;
                for _ in 0..FLOOD / 4 {
                    // The reset may arrive during connect or after it; either way nothing is relayed.
                    match connect_from(Ipv4Addr::new(127, 0, 0, 2), local(port)) {
                        Ok(s) => drop(s),
                        Err(_) => refused += 1,
                    }
                }
                refused
            })
        })
        .collect();
    for s in scanners {
        s.join().unwrap();
    }
    let flood_took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let worst = legit.join().unwrap().expect("the legitimate client kept working");

    assert_eq!(upstream.accepted(), 1, "only the legitimate client was dialled");
    assert!(legit_ok.load(Ordering::Relaxed) > 0);
    let denied_lines = daemon.log_lines("end=\"denied\"").len();
    // 10 lines per 10 s window: the flood lasted `flood_took`.
    let windows = flood_took.as_secs() / 10 + 2;
    assert!(
        denied_lines as u64 <= 10 * windows,
        "{denied_lines} denial lines for a {flood_took:?} flood: the log is not rate-limited"
    );
    eprintln!(
        "flood of {FLOOD} took {flood_took:?}; {denied_lines} denial lines; legitimate worst round trip {worst:?}"
    );

    // The next window's first denial says how many were suppressed.
    std::thread::sleep(Duration::from_secs(10));
    expect_reset(Ipv4Addr::new(127, 0, 0, 2), local(port));
    let summary = daemon
        .wait_for_nth_log("end=\"denied\"", denied_lines + 1, Duration::from_secs(2))
        .expect("a denial line after the window");
    assert!(
        field(&summary, "suppressed").unwrap().parse::<usize>().unwrap() > 0,
        "{summary}"
    );
    // Every denial is accounted for: written, or counted in a later line's `suppressed`.
    let lines = daemon.log_lines("end=\"denied\"");
    let accounted: usize = lines.len()
        + lines
            .iter()
            .map(|l| {
                field(l, "suppressed")
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(0)
            })
            .sum::<usize>();
    let status = daemon.health_request("GET /status HTTP/1.0\r\n\r\n").unwrap();
    assert!(
        status.contains(&format!("\"denied\":{accounted}")),
        "{accounted} accounted for: {status}"
    );
    assert!(
        accounted > FLOOD * 9 / 10,
        "most of the flood reached ferryd: {accounted}"
    );
}

/// An upstream that drops SYNs (its accept queue is full): every dial times out at
/// connect_timeout, each client is reset, and nothing accumulates.
#[test]
fn black_hole_upstream_times_out_and_releases_clients() {
    // A listener with backlog 0 holds one connection in its queue and never accepts; after that
    // the kernel drops every SYN to it.
    let hole = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    hole.bind(&local(0).into()).unwrap();
    hole.listen(0).unwrap();
    let hole_addr = hole.local_addr().unwrap().as_socket().unwrap();
    let _filler = TcpStream::connect(hole_addr).unwrap();

    let port = free_port();
    let config = config_one_route(port, hole_addr, "", "connect_timeout = \"300ms\"");
    let daemon = Daemon::start(&config);
    std::thread::sleep(Duration::from_millis(200));
    let fds_before = daemon.fd_count();

    let clients: Vec<_> = (0..50)
        .map(|_| {
            std::thread::spawn(move || {
                let started = Instant::now();
                let mut s = TcpStream::connect(local(port)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let result = s.read(&mut [0u8; 1]).map_err(|e| e.kind());
                (result, started.elapsed())
            })
        })
        .collect();
    for c in clients {
        let (result, took) = c.join().unwrap();
        assert_eq!(
            result,
            Err(std::io::ErrorKind::ConnectionReset),
            "client not reset"
        );
        assert!(took < Duration::from_secs(3), "client held for {took:?}");
    }
    let line = daemon
        .wait_for_log("upstream-timeout", Duration::from_secs(2))
        .unwrap();
    assert!(line.contains("connect_timeout (300ms)"), "{line}");
    std::thread::sleep(Duration::from_millis(300));
    let status = daemon.health_request("GET /status HTTP/1.0\r\n\r\n").unwrap();
    assert!(status.contains("\"upstream-timeout\":50"), "{status}");
    assert!(status.contains("\"live\":0"), "{status}");
    assert!(
        daemon.fd_count() <= fds_before + 2,
        "descriptors accumulate: {} -> {}",
        fds_before,
        daemon.fd_count()
    );
}

/// SIGKILL in the middle of a transfer, then a new daemon on the same configuration: it listens
/// and relays within a second (SO_REUSEADDR; the killed connections leave sockets behind).
#[test]
fn restart_after_sigkill_relays_within_a_second() {
    let upstream = Upstream::echo();
    let port = free_port();
    let health = free_port();
    let config = with_health(&config_one_route(port, upstream.addr, "", ""), health);
    let mut first = Daemon::start(&config);
    let mut busy = TcpStream::connect(local(port)).unwrap();
    let mut reader = busy.try_clone().unwrap();
    let drain = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        while matches!(reader.read(&mut buf), Ok(n) if n > 0) {}
    });
    let writer = std::thread::spawn(move || {
        let block = vec![7u8; 1 << 16];
        while busy.write_all(&block).is_ok() {}
        let _ = busy.shutdown(Shutdown::Both);
    });
    std::thread::sleep(Duration::from_millis(300));
    first.signal(Signal::SIGKILL);
    first.wait_exit(Duration::from_secs(5)).expect("killed");

    let started = Instant::now();
    let second = Daemon::start(&config);
    let mut client = TcpStream::connect(local(port)).unwrap();
    echo_roundtrip(&mut client, b"back").unwrap();
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "relaying again after {took:?}; log:\n{}",
        second.log()
    );
    assert!(
        second.log_lines("cannot listen yet").is_empty(),
        "bind had to wait"
    );
    writer.join().unwrap();
    drain.join().unwrap();
}
