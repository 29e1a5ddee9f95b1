//! What a live upgrade carries besides connections: counters, probe answers, pipes within
//! max_pipes, no iptables in the relay, connection ids.

use super::*;

/// Every counter sample of a `/metrics` scrape (`name{labels}` → value), histograms left out (a
/// histogram cannot be carried: its buckets can only be observed into).
fn counters(port: u16) -> std::collections::BTreeMap<String, f64> {
    let scrape = common::http_from(
        std::net::Ipv4Addr::LOCALHOST,
        port,
        "GET /metrics HTTP/1.0\r\n\r\n",
    )
    .expect("GET /metrics");
    let body = scrape.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    let mut samples = std::collections::BTreeMap::new();
    let mut counters = std::collections::BTreeSet::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split_whitespace();
            if let (Some(name), Some("counter")) = (words.next(), words.next()) {
                counters.insert(name.to_string());
            }
            continue;
        }
        let Some((key, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let name = key.split('{').next().unwrap_or(key);
        let family = name.strip_suffix("_total").unwrap_or(name);
        if counters.contains(family) && !name.starts_with("process_") {
            samples.insert(key.to_string(), value.parse().unwrap_or(f64::NAN));
        }
    }
    samples
}

/// Every counter continues across an upgrade, whichever set it belongs to: per-LinkID counts,
/// log lines dropped (here every line: ferryd's stderr is a pipe with no reader), outcomes,
/// bytes, reloads, probes. A counter left out of what the upgrade carries would start again
/// from zero, and this test names it.
#[test]
fn every_counter_continues_across_an_upgrade() {
    let echo = Upstream::echo();
    let port = free_port();
    let health_port = free_port();
    let installed = Installed::new();
    let dir = TempDir::new("counters");
    let config = dir.path().join("ferryd.toml");
    std::fs::write(
        &config,
        common::with_health(
            &config_one_route(
                port,
                echo.addr,
                "",
                "proxy_protocol = \"v2\"\nheader_timeout = \"2s\"",
            ),
            health_port,
        ),
    )
    .unwrap();
    // Every line fails to be written: a pipe whose reader is gone.
    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    drop(read_end);
    let mut command = common::run_command(&installed.path(), &config);
    command
        .env("FERRYD_LOG", "debug")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::from(write_end));
    common::unprivileged(&mut command);
    let mut child = common::spawn(&mut command).expect("spawn ferryd");
    let deadline = Instant::now() + Duration::from_secs(10);
    while common::http_from(
        std::net::Ipv4Addr::LOCALHOST,
        health_port,
        "GET /healthz HTTP/1.0\r\n\r\n",
    )
    .map_or(true, |r| !r.contains(" 200 "))
    {
        assert!(Instant::now() < deadline, "ferryd did not become ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Traffic of several kinds: relayed through two LinkIDs, and refused headers.
    for (i, link_id) in [7u32, 7, 9, 7, 9, 11].into_iter().enumerate() {
        let header = ferryd::proxy_header::encode(&ferryd::proxy_header::Header {
            command: ferryd::proxy_header::Command::Proxy,
            addresses: Some(("203.0.113.7:50123".parse().unwrap(), local(port))),
            tlvs: vec![ferryd::proxy_header::azure_link_tlv(link_id)],
            link_id: Some(link_id),
        });
        let mut client = TcpStream::connect(local(port)).expect("connect");
        client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        client.write_all(&header).unwrap();
        common::echo_roundtrip(&mut client, format!("hello {i}").as_bytes()).expect("relayed");
    }
    let mut refused = TcpStream::connect(local(port)).expect("connect");
    refused.write_all(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n").unwrap();
    let _ = refused.read(&mut [0u8; 8]);
    std::thread::sleep(Duration::from_millis(300));
    let before = counters(health_port);
    assert!(
        before.keys().any(|k| k.contains("link_id=\"9\"")),
        "no per-LinkID counter before the upgrade: {before:?}"
    );
    assert!(
        before
            .get("ferryd_log_lines_dropped_total")
            .is_some_and(|n| *n > 0.0),
        "no dropped lines before the upgrade: {before:?}"
    );
    installed.replace_with(Path::new(bin()));
    let out = Command::new(bin())
        .args(["upgrade", "--timeout", "20", "--config"])
        .arg(&config)
        .output()
        .expect("run ferryd upgrade");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let after = counters(health_port);
    let mismatches = common::daemon::settled_mismatches(std::net::SocketAddr::from((
        std::net::Ipv4Addr::LOCALHOST,
        health_port,
    )));
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(mismatches, Some(0), "byte accounting: ferryd's counter");
    let restarted: Vec<String> = before
        .iter()
        .filter(|(key, value)| after.get(*key).is_none_or(|now| now < *value))
        .map(|(key, value)| format!("{key}: {value} before, {:?} after", after.get(key)))
        .collect();
    assert!(
        restarted.is_empty(),
        "counters that did not continue: {restarted:#?}"
    );
}

/// The balancer's probe never sees the upgrade: probes sent back to back from four threads
/// through ten upgrades are each answered 200 (none cut at the exec, none refused, none 503).
#[test]
fn probes_are_answered_200_throughout_upgrades() {
    let echo = Upstream::echo();
    let port = free_port();
    let installed = Installed::new();
    let daemon = installed.start(&config_one_route(port, echo.addr, "", ""));
    let health = daemon.health_port.expect("a health port");
    let stop = Arc::new(AtomicBool::new(false));
    let probers: Vec<_> = (0..4)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut answered, mut bad) = (0u64, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    match common::http_from(
                        std::net::Ipv4Addr::LOCALHOST,
                        health,
                        "GET /healthz HTTP/1.0\r\n\r\n",
                    ) {
                        Ok(r) if r.starts_with("HTTP/1.0 200") || r.starts_with("HTTP/1.1 200") => {
                            answered += 1
                        }
                        Ok(r) => bad.push(r.lines().next().unwrap_or("(empty answer)").to_string()),
                        Err(e) => bad.push(e.to_string()),
                    }
                }
                (answered, bad)
            })
        })
        .collect();
    for _ in 0..10 {
        installed.replace_with(Path::new(bin()));
        let out = upgrade(&daemon);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    stop.store(true, Ordering::Relaxed);
    let (mut answered, mut bad) = (0, Vec::new());
    for prober in probers {
        let (a, b) = prober.join().expect("prober");
        answered += a;
        bad.extend(b);
    }
    assert!(answered > 100, "only {answered} probes answered");
    assert!(
        bad.is_empty(),
        "{} of {} probes failed: {bad:?}",
        bad.len(),
        answered + bad.len() as u64
    );
}

/// Pipes (both ends counted once) the process `pid` holds, its stderr pipe left out.
fn pipes_held(pid: i32) -> usize {
    let ends = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.flatten()
                .filter(|fd| {
                    std::fs::read_link(fd.path())
                        .is_ok_and(|target| target.to_string_lossy().starts_with("pipe:"))
                })
                .count()
        })
        .unwrap_or(0);
    // The test harness reads the daemon's stderr through a pipe: one end in the daemon.
    ends.saturating_sub(1) / 2
}

/// Pipes that cross an upgrade (a stalled reader's bytes in them) count against `max_pipes` in
/// the new image: new bulk transfers copy instead of creating pipes past the bound, which past
/// the user's pipe budget would be a page or two each, and stay in the pool for good.
#[test]
fn carried_pipes_count_against_max_pipes() {
    const MAX_PIPES: usize = 4;
    let upstream = role_upstream();
    let port = free_port();
    let installed = Installed::new();
    let daemon = installed.start(&config_one_route(
        port,
        upstream.addr,
        &format!("max_pipes = {MAX_PIPES}"),
        "",
    ));
    let tally = Tally::default();
    let stalled: Vec<TcpStream> = (0..MAX_PIPES)
        .map(|_| connect(local(port), &format!("BLAST {}", 64 << 20), &tally))
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    installed.replace_with(Path::new(bin()));
    let out = upgrade(&daemon);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let carried = carried(&daemon);
    assert!(
        carried.last().is_some_and(|b| *b > 0),
        "nothing carried: {carried:?}"
    );
    // Bulk transfers that would each take a pipe.
    let bulk: Vec<_> = (0..MAX_PIPES)
        .map(|_| {
            let mut stream = connect(local(port), &format!("SOURCE {}", 256 << 20), &tally);
            std::thread::spawn(move || Pattern::new(2).verify(&mut stream))
        })
        .collect();
    let mut most = 0;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        most = most.max(pipes_held(daemon.pid()));
        std::thread::sleep(Duration::from_millis(20));
    }
    for transfer in bulk {
        assert_eq!(
            transfer.join().expect("bulk thread").expect("bulk bytes"),
            256 << 20
        );
    }
    for mut reader in stalled {
        assert_eq!(
            Pattern::new(4).verify(&mut reader).expect("stalled bytes"),
            64 << 20
        );
    }
    assert!(
        most <= MAX_PIPES,
        "the daemon held {most} pipes with max_pipes = {MAX_PIPES}"
    );
}

/// The relay runs no iptables at all, even with `[nat]` configured and through a live upgrade
/// whose exec window is held open 1.5 s (a test fault): NAT is the NAT keeper's (`ferryd nat
/// run`), so no child of the relay can inherit the hand-over's descriptors. (While NAT still ran
/// in the relay, a stand-in iptables forked in that window was born holding the sockets; the
/// fork lock that fixed it stays, for any child the relay may run later.) Each stand-in run
/// would record the descriptors it was born with.
#[test]
fn the_relay_runs_no_iptables_even_with_nat_configured() {
    let echo = Upstream::echo();
    let port = free_port();
    let installed = Installed::new();
    let tools = TempDir::new("recording-iptables");
    let records = tools.path().join("records");
    std::fs::create_dir(&records).unwrap();
    std::fs::set_permissions(&records, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    for tool in [
        "iptables",
        "iptables-save",
        "iptables-restore",
        "iptables-legacy",
        "iptables-nft",
    ] {
        let path = tools.path().join(tool);
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\nls -l /proc/$$/fd > {}/{tool}.$$ 2>&1\n[ \"$1\" = --version ] && echo 'iptables v1.8.9 (legacy)'\nexit 1\n",
                records.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let config = config_one_route(port, echo.addr, "", "").replace(
        "[[route]]",
        "[nat]\nsources = [\"10.9.9.9/32\"]\nout_interface = \"lo\"\nreconcile_interval = \"1s\"\n\n[[route]]",
    );
    let path = format!(
        "{}:{}",
        tools.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let daemon = installed.start_with(&config, |command| {
        command.env("FERRYD_TEST_FAULTS", "slow-exec").env("PATH", &path);
    });
    let mut session = session(port);
    // Long enough for a reconcile loop at 1 s to have run iptables several times.
    std::thread::sleep(Duration::from_secs(3));
    installed.replace_with(Path::new(bin()));
    let out = upgrade(&daemon);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    common::echo_roundtrip(&mut session, b"after").expect("the session goes on");
    // And after the exec.
    std::thread::sleep(Duration::from_millis(1500));
    let runs: Vec<String> = std::fs::read_dir(&records)
        .unwrap()
        .flatten()
        .map(|record| std::fs::read_to_string(record.path()).unwrap_or_default())
        .collect();
    assert!(
        runs.is_empty(),
        "the relay ran iptables {} time(s): {runs:?}",
        runs.len()
    );
    // It reads NAT's state from the keeper's report instead (no keeper here: pending).
    let status = status(&daemon);
    assert_eq!(status["nat"]["state"], "pending", "{status}");
}

/// Every relayed connection has an id, in its "connection opened" line and its "connection
/// closed" line, the same after a live upgrade, and never given twice in the daemon's life.
#[test]
fn a_connection_keeps_its_id_across_an_upgrade() {
    let echo = Upstream::echo();
    let port = free_port();
    let installed = Installed::new();
    let daemon = installed.start(&config_one_route(port, echo.addr, "", ""));
    let mut before = session(port);
    let opened = daemon.expect_log("connection opened", Duration::from_secs(2));
    let id: u64 = common::field(&opened, "conn")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no conn= in {opened}"));
    assert!(
        common::field(&opened, "dial_ms").is_some() && opened.contains("route=test"),
        "{opened}"
    );
    installed.replace_with(Path::new(bin()));
    let out = upgrade(&daemon);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    common::echo_roundtrip(&mut before, b"after").expect("the session goes on");
    drop(before);
    let closed = daemon.expect_log("connection closed", Duration::from_secs(5));
    assert_eq!(
        common::field(&closed, "conn"),
        Some(id.to_string().as_str()),
        "{closed}"
    );
    let _after = session(port);
    let next = daemon.expect_nth_log("connection opened", 2, Duration::from_secs(2));
    let next: u64 = common::field(&next, "conn")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(next > id, "id {next} after {id}: numbering restarted");
}

/// A route a reload removed still has a relaying connection, and a live upgrade comes: the
/// connection goes on in the new image (what docs/design.md says), on counters of its own, and
/// the removed route's port stays closed.
#[test]
fn a_connection_of_a_removed_route_crosses_an_upgrade() {
    let echo = Upstream::echo();
    let (kept_port, removed_port) = (free_port(), free_port());
    let two_routes = format!(
        "{}\n[[route]]\nname = \"removed\"\nlisten = \"127.0.0.1:{removed_port}\"\nupstream = \"{}\"\n",
        config_one_route(kept_port, echo.addr, "", ""),
        echo.addr
    );
    let installed = Installed::new();
    let daemon = installed.start(&two_routes);
    let mut orphan = session(removed_port);
    assert!(daemon.listens_on(removed_port) && daemon.listens_on(kept_port));
    daemon.rewrite_config(&config_one_route(kept_port, echo.addr, "", ""));
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    // The whole message: the route is named "removed", so "route removed" alone also matches the
    // PROXY detection's report about it ("PROXY headers on route removed: ..."), which can come
    // first and made this check run before the reload (CI failed so).
    daemon.expect_log(
        "route removed; its live connections continue",
        Duration::from_secs(5),
    );
    common::echo_roundtrip(&mut orphan, b"after the reload").expect("a reload drops nothing");
    assert!(
        !daemon.listens_on(removed_port),
        "the removed route still listens"
    );

    installed.replace_with(Path::new(bin()));
    let out = upgrade(&daemon);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    daemon.expect_log(
        "moved a connection of a route no longer configured",
        Duration::from_secs(5),
    );
    common::echo_roundtrip(&mut orphan, b"after the upgrade").expect("the session goes on");
    assert!(
        !daemon.listens_on(removed_port),
        "the removed route listens again after the upgrade"
    );
    assert!(daemon.listens_on(kept_port), "the kept route listens");
    let mut kept = session(kept_port);
    common::echo_roundtrip(&mut kept, b"kept").expect("the kept route relays");
    drop(orphan);
    // It ends in order and is logged under the route it was accepted on.
    let deadline = Instant::now() + Duration::from_secs(5);
    let closed = loop {
        let closed = daemon.log_lines("connection closed");
        if let Some(line) = closed.iter().find(|l| l.contains("route=removed")) {
            break line.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no closed line for it:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        closed.contains("end=\"eof\"") || closed.contains("end=eof"),
        "{closed}"
    );
}
