//! Reload, drain and resource exhaustion through a real ferryd process.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpStream};
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

fn two_routes(port_a: u16, port_b: Option<u16>, upstream: std::net::SocketAddr, allow: &str) -> String {
    let mut text = format!(
        r#"allow = [{allow}]
probe_sources = ["127.0.0.3/32"]

[[route]]
name = "a"
listen = "127.0.0.1:{port_a}"
upstream = "{upstream}"
"#
    );
    if let Some(port_b) = port_b {
        text.push_str(&format!(
            "\n[[route]]\nname = \"b\"\nlisten = \"127.0.0.1:{port_b}\"\nupstream = \"{upstream}\"\n"
        ));
    }
    text
}

/// SIGHUP applies a new allowlist and new routes to new connections, never drops a live one,
/// and an invalid file is rejected with the running configuration kept.
#[test]
fn reload_applies_to_new_connections_and_keeps_live_ones() {
    let upstream = Upstream::echo();
    let (a, b) = (free_port(), free_port());
    let daemon = Daemon::start(&two_routes(a, Some(b), upstream.addr, r#""127.0.0.1/32""#));

    let mut live_a = TcpStream::connect(local(a)).unwrap();
    let mut live_b = TcpStream::connect(local(b)).unwrap();
    echo_roundtrip(&mut live_a, b"before").unwrap();
    echo_roundtrip(&mut live_b, b"before").unwrap();
    expect_reset(Ipv4Addr::new(127, 0, 0, 2), local(a));

    // Widen the allowlist, drop route b, add route c.
    let c = free_port();
    let new = two_routes(a, Some(c), upstream.addr, r#""127.0.0.1/32", "127.0.0.2/32""#)
        .replace("name = \"b\"", "name = \"c\"");
    daemon.rewrite_config(&new);
    daemon.signal(Signal::SIGHUP);
    daemon.expect_log("configuration reloaded", Duration::from_secs(5));

    let mut widened = connect_from(Ipv4Addr::new(127, 0, 0, 2), local(a)).unwrap();
    echo_roundtrip(&mut widened, b"now allowed").unwrap_or_else(|e| panic!("{e}; log:\n{}", daemon.log()));
    let mut on_c = TcpStream::connect(local(c)).unwrap();
    echo_roundtrip(&mut on_c, b"new route").unwrap();
    assert!(!daemon.listens_on(b), "removed route stops listening");
    echo_roundtrip(&mut live_a, b"after reload").unwrap();
    echo_roundtrip(&mut live_b, b"route removed, connection kept").unwrap();

    // An invalid file: rejected, everything keeps working as before.
    daemon.rewrite_config("allow = [\"not-a-cidr\"]\n");
    daemon.signal(Signal::SIGHUP);
    let rejected = daemon.expect_log("reload rejected", Duration::from_secs(5));
    assert!(rejected.contains("not-a-cidr"), "{rejected}");
    echo_roundtrip(&mut live_a, b"after bad reload").unwrap();
    let mut still = connect_from(Ipv4Addr::new(127, 0, 0, 2), local(a)).unwrap();
    echo_roundtrip(&mut still, b"old config still in force").unwrap();
    assert!(
        daemon
            .log_lines("connection closed")
            .iter()
            .all(|l| !l.contains("end=\"reset\""))
    );
}

/// SIGTERM closes the listeners at once but lets a transfer in flight finish byte-exact, then
/// exits 0.
#[test]
fn sigterm_drains_a_transfer_in_flight() {
    const TOTAL: u64 = 32 * 1024 * 1024;
    let upstream = Upstream::start(|mut stream| {
        let mut go = [0u8; 1];
        stream.read_exact(&mut go).unwrap();
        // Slow enough that the transfer is still running when SIGTERM arrives.
        let pattern = Pattern::new(9);
        let mut sent = 0;
        while sent < TOTAL {
            pattern.send_range(&mut stream, sent, TOTAL / 16).unwrap();
            sent += TOTAL / 16;
            std::thread::sleep(Duration::from_millis(60));
        }
    });
    let port = free_port();
    let mut daemon = Daemon::start(&config_one_route(port, upstream.addr, "", ""));
    let mut client = TcpStream::connect(local(port)).unwrap();
    client.write_all(b"g").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let reader = std::thread::spawn(move || Pattern::new(9).verify(&mut client));

    // Relaying (dialled and opened) before the stop, so the drain lets it finish.
    daemon.expect_log("connection opened", Duration::from_secs(5));
    daemon.signal(Signal::SIGTERM);
    daemon.expect_log("draining: listeners closed", Duration::from_secs(5));
    assert!(!daemon.listens_on(port), "no new connection during the drain");
    assert_eq!(reader.join().unwrap().expect("intact"), TOTAL);
    let status = daemon.wait_exit(Duration::from_secs(10)).expect("exited");
    assert!(status.success(), "{status:?}");
    let closed = daemon.log_lines("connection closed");
    assert_eq!(closed.len(), 1);
    assert_eq!(field(&closed[0], "end"), Some("eof"), "{}", closed[0]);
}

/// A connection still open when drain_timeout runs out is closed, logged as "drain", and the
/// daemon exits 0.
#[test]
fn drain_timeout_closes_the_rest_and_exits_zero() {
    let upstream = Upstream::echo();
    let port = free_port();
    let config = config_one_route(port, upstream.addr, "", "")
        .replace("drain_timeout = \"10s\"", "drain_timeout = \"300ms\"");
    let mut daemon = Daemon::start(&config);
    let mut client = TcpStream::connect(local(port)).unwrap();
    echo_roundtrip(&mut client, b"stay").unwrap();
    let started = Instant::now();
    assert!(daemon.stop().success());
    assert!(started.elapsed() < Duration::from_secs(5));
    let closed = daemon.expect_log("connection closed", Duration::from_secs(1));
    assert_eq!(field(&closed, "end"), Some("drain"), "{closed}");
    let mut buf = [0u8; 1];
    client.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    assert!(
        matches!(client.read(&mut buf), Ok(0) | Err(_)),
        "client connection ended"
    );
}

/// Under a low RLIMIT_NOFILE, accepts fail with EMFILE: the daemon pauses instead of spinning,
/// logs the condition once, and serves again as soon as descriptors are free.
///
/// Each relayed connection holds two descriptors, so whether the last free descriptor is taken
/// by an accept (the next client then waits in the backlog while accept fails with EMFILE: the
/// case that spins a naive accept loop) or by an upstream socket (the next client is reset)
/// depends on the parity of the free descriptors. Two limits one apart cover both.
#[test]
fn fd_exhaustion_backs_off_and_recovers() {
    let waited: Vec<bool> = [48u64, 49].into_iter().map(exhaust_descriptors).collect();
    assert!(
        waited.contains(&true),
        "no run left a client waiting in the backlog: {waited:?}"
    );
}

/// Runs one exhaustion scenario; returns whether a client was left waiting in the backlog.
fn exhaust_descriptors(fd_limit: u64) -> bool {
    let upstream = Upstream::echo();
    let port = free_port();
    let config = config_one_route(port, upstream.addr, "workers = 1", "");
    let daemon = Daemon::start_with(&config, |command| {
        // SAFETY: setrlimit is async-signal-safe and touches only the child.
        unsafe {
            command.pre_exec(move || {
                nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, fd_limit, fd_limit)
                    .map_err(std::io::Error::from)
            });
        }
    });

    // Fill the descriptor table with live relayed connections until one is not served.
    let mut held = Vec::new();
    let mut starved = None;
    for i in 0..fd_limit {
        let mut stream = TcpStream::connect(local(port)).unwrap();
        stream.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        match echo_roundtrip(&mut stream, format!("conn {i:02}").as_bytes()) {
            Ok(()) => held.push(stream),
            Err(e) => {
                starved = Some((stream, e.kind()));
                break;
            }
        }
    }
    let (mut starved, how) = starved.expect("the descriptor limit was never reached");
    assert!(
        held.len() > 5,
        "only {} connections before exhaustion",
        held.len()
    );
    let waiting = matches!(how, ErrorKind::WouldBlock | ErrorKind::TimedOut);
    assert!(
        waiting || how == ErrorKind::ConnectionReset,
        "unexpected failure {how:?}"
    );
    // If it never comes: exhaustion not logged.
    daemon.expect_log("accept failing", Duration::from_secs(2));

    // While out of descriptors, the daemon must not spin.
    let cpu_before = daemon.cpu_seconds();
    std::thread::sleep(Duration::from_secs(1));
    let cpu_used = daemon.cpu_seconds() - cpu_before;
    assert!(
        cpu_used < 0.2,
        "daemon used {cpu_used:.2} CPU seconds in 1 s while out of descriptors"
    );
    assert_eq!(
        daemon.log_lines("accept failing").len(),
        1,
        "logged once, not per failure; log:\n{}",
        daemon.log()
    );

    // Free descriptors: the waiting client is served, and so is a new one.
    drop(held);
    if waiting {
        starved.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut back = [0u8; 7];
        starved
            .read_exact(&mut back)
            .expect("the client that waited in the backlog is served");
        let recovered = daemon.expect_log("accepting again", Duration::from_secs(2));
        let failed: u64 = field(&recovered, "failed_accepts").unwrap().parse().unwrap();
        assert!(
            failed >= 2,
            "repeated failures were summed into one line: {recovered}"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut stream = TcpStream::connect(local(port)).unwrap();
        stream.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        if echo_roundtrip(&mut stream, b"back").is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "service did not resume; log:\n{}",
            daemon.log()
        );
    }
    // The failed accepts are in the metrics too.
    let metrics = daemon.health_request("GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("ferryd_accept_errors_total{route=\"test\"}"))
        .unwrap_or_else(|| panic!("no accept_errors metric:\n{metrics}"));
    let count: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(count >= 1.0, "{line}");
    waiting
}

/// A stream still flowing when the drain timeout cuts it did not end on its own: both sides get
/// a reset, never a clean end of stream that the upstream could take for a finished upload.
#[test]
fn drain_timeout_resets_streams_still_flowing_never_a_clean_fin() {
    const CLIENTS: usize = 8;
    for round in 0..3 {
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let tx = std::sync::Mutex::new(tx);
        let upstream = Upstream::start(move |mut stream| {
            let mut buf = [0u8; 4096];
            let end = loop {
                match stream.read(&mut buf) {
                    Ok(0) => break "eof".to_string(),
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::ConnectionReset => break "reset".to_string(),
                    Err(e) => break format!("error {e}"),
                }
            };
            let _ = tx.lock().unwrap().send(end);
        });
        let port = free_port();
        let config = config_one_route(port, upstream.addr, "", "")
            .replace("drain_timeout = \"10s\"", "drain_timeout = \"300ms\"");
        let mut daemon = Daemon::start(&config);
        let writers: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let mut client = TcpStream::connect(local(port)).unwrap();
                client.set_nodelay(true).unwrap();
                std::thread::spawn(move || {
                    let chunk = [b'u'; 100];
                    while client.write_all(&chunk).is_ok() {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(5);
        while upstream.accepted() < CLIENTS {
            assert!(Instant::now() < deadline, "the upstream did not see every client");
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(100));
        assert!(daemon.stop().success());
        let ends: Vec<String> = (0..CLIENTS)
            .map(|_| {
                rx.recv_timeout(Duration::from_secs(5))
                    .expect("the upstream saw an end")
            })
            .collect();
        assert!(
            ends.iter().all(|e| e == "reset"),
            "round {round}: the upstream saw {ends:?}; log:\n{}",
            daemon.log()
        );
        for writer in writers {
            writer.join().unwrap();
        }
    }
}

/// Signal handlers are in place from the first moment: a SIGHUP while a bind is still being
/// retried is applied as a reload once ready, instead of killing the daemon.
#[test]
fn sighup_during_start_up_is_a_reload_once_ready() {
    let upstream = Upstream::echo();
    let port = free_port();
    // Another socket holds the port, so start-up waits in the bind retry.
    let holder = std::net::TcpListener::bind(local(port)).unwrap();
    let daemon = Daemon::spawn_with(&config_one_route(port, upstream.addr, "", ""), |_| {});
    daemon.expect_log("cannot listen yet", Duration::from_secs(5));
    daemon.signal(Signal::SIGHUP);
    std::thread::sleep(Duration::from_millis(200));
    drop(holder);
    // If it never comes: a SIGHUP during start-up killed the daemon.
    daemon.expect_log(" ready config=", Duration::from_secs(5));
    // If it never comes: the SIGHUP was not applied once ready.
    daemon.expect_log("configuration reloaded", Duration::from_secs(5));
    let mut client = TcpStream::connect(local(port)).unwrap();
    echo_roundtrip(&mut client, b"served").unwrap();
}

/// SIGTERM during start-up stops cleanly and at once, without waiting out the bind retry.
#[test]
fn sigterm_during_start_up_stops_cleanly() {
    let upstream = Upstream::echo();
    let port = free_port();
    let _holder = std::net::TcpListener::bind(local(port)).unwrap();
    let mut daemon = Daemon::spawn_with(&config_one_route(port, upstream.addr, "", ""), |_| {});
    daemon.expect_log("cannot listen yet", Duration::from_secs(5));
    let started = Instant::now();
    daemon.signal(Signal::SIGTERM);
    let status = daemon
        .wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("still running after SIGTERM: {}", daemon.log()));
    assert!(status.success(), "{status:?}; {}", daemon.log());
    assert!(started.elapsed() < Duration::from_secs(3));
    daemon.expect_log("stop requested during start-up", Duration::from_secs(1));
}

/// A route keeps its identity by name: moved to another address by a reload, it keeps its live
/// connections in its count, so max_connections still holds, and its counters go on. A new
/// address that cannot be bound rejects the whole reload.
#[test]
fn a_route_moved_by_reload_keeps_its_count_and_limit() {
    let upstream = Upstream::echo();
    let (old_port, new_port) = (free_port(), free_port());
    let config = |port: u16, allow: &str| {
        config_one_route(port, upstream.addr, "", "max_connections = 1")
            .replace("allow = [\"127.0.0.1/32\"]", allow)
    };
    let daemon = Daemon::start(&config(old_port, "allow = [\"127.0.0.1/32\"]"));
    let mut live = TcpStream::connect(local(old_port)).unwrap();
    echo_roundtrip(&mut live, b"held across the move").unwrap();

    daemon.rewrite_config(&config(new_port, "allow = [\"127.0.0.1/32\"]"));
    daemon.signal(Signal::SIGHUP);
    daemon.expect_log("route moved", Duration::from_secs(5));
    daemon.expect_log("configuration reloaded", Duration::from_secs(5));
    assert!(!daemon.listens_on(old_port), "the old address is released");
    // The live connection still counts against max_connections = 1.
    expect_reset(Ipv4Addr::LOCALHOST, local(new_port));
    let status = daemon.health_request("GET /status HTTP/1.0\r\n\r\n").unwrap();
    let doc: serde_json::Value = serde_json::from_str(status.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let route = &doc["routes"][0];
    assert_eq!(route["listen"], format!("127.0.0.1:{new_port}"), "{doc}");
    assert_eq!(route["live"], 1, "{doc}");
    assert_eq!(route["relayed"], 1, "{doc}");
    assert_eq!(route["outcomes"]["limit"], 1, "{doc}");
    echo_roundtrip(&mut live, b"still relayed").unwrap();
    drop(live);
    // The one slot is free again once the old connection's end is noticed.
    let when_free = || {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let attempt = TcpStream::connect(local(new_port))
                .and_then(|mut s| echo_roundtrip(&mut s, b"x").map(|()| s));
            match attempt {
                Ok(s) => break s,
                Err(_) => {
                    assert!(Instant::now() < deadline, "the slot was not freed");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    };
    let mut next = when_free();
    echo_roundtrip(&mut next, b"after the old one ended").unwrap();

    // A reload whose new address is taken is rejected whole: the allowlist change with it is
    // not applied either.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    daemon.rewrite_config(&config(taken_port, "allow = [\"127.0.0.2/32\"]"));
    daemon.signal(Signal::SIGHUP);
    daemon.expect_log("reload rejected", Duration::from_secs(5));
    drop(next);
    let mut again = when_free();
    echo_roundtrip(&mut again, b"old configuration in force").unwrap();
}

/// A parent that leaves SIGHUP ignored (nohup does) must not make reloads silently impossible.
/// The daemon reads its signals from a signalfd with them blocked, and the kernel queues a blocked
/// signal even when its disposition is "ignore": this guards that design against a change that
/// would unblock them or go back to handlers.
#[test]
fn sighup_left_ignored_by_the_parent_still_reloads() {
    let upstream = Upstream::echo();
    let port = free_port();
    let daemon = Daemon::start_with(&config_one_route(port, upstream.addr, "", ""), |command| {
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            command.pre_exec(|| {
                libc::signal(libc::SIGHUP, libc::SIG_IGN);
                Ok(())
            });
        }
    });
    daemon.signal(Signal::SIGHUP);
    // If it never comes: an inherited SIG_IGN swallowed the SIGHUP.
    daemon.expect_log("configuration reloaded", Duration::from_secs(5));
}
