//! Hostile and broken conditions: a scan flood from a source that is not allowed, an upstream
//! that drops SYNs, and a daemon killed with SIGKILL mid-transfer and started again.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
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
    let summary = daemon.expect_nth_log("end=\"denied\"", denied_lines + 1, Duration::from_secs(2));
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
    let line = daemon.expect_log("upstream-timeout", Duration::from_secs(2));
    assert!(line.contains("connect_timeout (300ms)"), "{line}");
    let status = || daemon.health_request("GET /status HTTP/1.0\r\n\r\n").ok();
    let status = until(
        || status().filter(|s| s.contains("\"upstream-timeout\":50") && s.contains("\"live\":0")),
        Duration::from_secs(5),
    )
    .or_else(status)
    .unwrap_or_default();
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

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A guard on memory under slow readers: 1,000 connections whose upstream sends 1 MiB each while
/// the clients read nothing grow ferryd's RSS by at most 32 MiB, and once the clients read,
/// every byte arrives, byte-exact.
#[test]
fn slow_readers_keep_memory_bounded_and_lose_nothing() {
    const CONNECTIONS: usize = 1000;
    const EACH: u64 = 1024 * 1024;
    let pattern = Arc::new(Pattern::new(7));
    let sender = pattern.clone();
    let upstream = Upstream::start(move |mut stream| {
        let _ = sender.send(&mut stream, EACH);
    });
    let port = free_port();
    let daemon = Daemon::start(&config_one_route(
        port,
        upstream.addr,
        "",
        "max_connections = 2000",
    ));
    let before = rss_kib(daemon.pid());
    let clients: Vec<TcpStream> = (0..CONNECTIONS)
        .map(|_| TcpStream::connect(local(port)).unwrap())
        .collect();
    // Wait until the upstream has pushed what it can and ferryd's memory has settled.
    let deadline = Instant::now() + Duration::from_secs(60);
    while upstream.accepted() < CONNECTIONS {
        assert!(
            Instant::now() < deadline,
            "the upstream accepted {} of {CONNECTIONS}; status: {}\nlog:\n{}",
            upstream.accepted(),
            daemon
                .health_request("GET /status HTTP/1.0\r\n\r\n")
                .unwrap_or_default(),
            daemon
                .log()
                .lines()
                .filter(|l| !l.contains("connection closed"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut peak = 0;
    let mut last = 0;
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = rss_kib(daemon.pid());
        peak = peak.max(now);
        if now == last || Instant::now() > deadline {
            break;
        }
        last = now;
    }
    let grown_mib = peak.saturating_sub(before) as f64 / 1024.0;
    assert!(
        grown_mib <= 32.0,
        "RSS grew by {grown_mib:.1} MiB ({before} KiB before, {peak} KiB at the peak)"
    );
    for (i, mut client) in clients.into_iter().enumerate() {
        client.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let got = pattern
            .verify(&mut client)
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert_eq!(got, EACH, "connection {i}");
    }
    eprintln!("slow readers: RSS grew by {grown_mib:.1} MiB");
}

/// Logging never blocks the relay: with ferryd's stderr a pipe that nobody reads, 10,000
/// connections are relayed and each completes; the lines that did not fit are dropped and
/// counted, in metrics and in the next line that gets through.
#[test]
fn a_stalled_log_sink_never_blocks_the_relay() {
    const CONNECTIONS: usize = 10_000;
    let upstream = Upstream::echo();
    let port = free_port();
    let health_port = free_port();
    let dir = TempDir::new("stalled-log");
    let config = dir.path().join("ferryd.toml");
    std::fs::write(
        &config,
        with_health(&config_one_route(port, upstream.addr, "", ""), health_port),
    )
    .unwrap();
    // Close-on-exec, so daemons other tests start at the same time do not inherit it.
    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let mut command = std::process::Command::new(bin());
    unprivileged(&mut command);
    let mut child = command
        .args(["run", "--config"])
        .arg(&config)
        .env("FERRYD_LOG", "debug")
        .env_remove("JOURNAL_STREAM")
        .env_remove("NOTIFY_SOCKET")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::from(write_end))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while http_from(Ipv4Addr::LOCALHOST, health_port, "GET /healthz HTTP/1.0\r\n\r\n")
        .map_or(true, |r| !r.contains(" 200 "))
    {
        assert!(Instant::now() < deadline, "ferryd did not become ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    for i in 0..CONNECTIONS {
        let mut client = TcpStream::connect(local(port)).unwrap();
        client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        echo_roundtrip(&mut client, b"ping").unwrap_or_else(|e| {
            let _ = child.kill();
            panic!("connection {i} stalled: {e}")
        });
    }
    let scrape = http_from(Ipv4Addr::LOCALHOST, health_port, "GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let dropped: f64 = scrape
        .lines()
        .find_map(|l| l.strip_prefix("ferryd_log_lines_dropped_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no drop counter in {scrape}"));
    assert!(dropped > 0.0, "nothing was dropped, so the pipe never filled");

    // Now read the pipe: once a line gets through again it carries the count.
    let reader = std::fs::File::from(read_end);
    let lines = Arc::new(std::sync::Mutex::new(String::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        let mut reader = std::io::BufReader::new(reader);
        let mut line = String::new();
        while std::io::BufRead::read_line(&mut reader, &mut line).unwrap_or(0) > 0 {
            sink.lock().unwrap().push_str(&line);
            line.clear();
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let report = loop {
        let mut client = TcpStream::connect(local(port)).unwrap();
        let _ = echo_roundtrip(&mut client, b"after");
        drop(client);
        std::thread::sleep(Duration::from_millis(100));
        if let Some(line) = lines
            .lock()
            .unwrap()
            .lines()
            .find(|l| l.contains("log_lines_dropped="))
        {
            break line.to_string();
        }
        assert!(Instant::now() < deadline, "no line reported the dropped lines");
    };
    let reported: u64 = field(&report, "log_lines_dropped").unwrap().parse().unwrap();
    assert!(reported > 0, "{report}");
    let mismatches = common::daemon::settled_mismatches(SocketAddr::from((Ipv4Addr::LOCALHOST, health_port)));
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(mismatches, Some(0), "byte accounting: ferryd's counter");
}
