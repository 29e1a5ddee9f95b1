//! The health endpoint, /metrics, /status and `ferryd status`, against a real ferryd.

mod common;

use std::io::{ErrorKind, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

const PROBE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

fn status_code(response: &str) -> Option<u16> {
    response.split_whitespace().nth(1)?.parse().ok()
}

fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    let head = response.split("\r\n\r\n").next()?;
    head.lines().skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim().eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

/// How long the keeper's NAT report may take to reach the relay: the keeper writes it and the
/// relay reads it once a second each, with room for a loaded machine.
const NAT_REPORTED: Duration = Duration::from_secs(10);

fn body(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

#[test]
fn probe_answers_and_http_edge_cases() {
    let upstream = Upstream::echo();
    let daemon = Daemon::start(&config_one_route(free_port(), upstream.addr, "", ""));
    let port = daemon.health_port.unwrap();

    let http10 = http_from(PROBE, port, "GET /healthz HTTP/1.0\r\n\r\n").unwrap();
    assert_eq!(status_code(&http10), Some(200), "{http10}");
    assert_eq!(body(&http10), "ok\n");
    assert_eq!(header(&http10, "content-length"), Some("3"), "{http10}");

    let http11 = http_from(
        PROBE,
        port,
        "GET /healthz HTTP/1.1\r\nHost: 10.0.0.5:60080\r\n\r\n",
    )
    .unwrap();
    assert_eq!(status_code(&http11), Some(200), "{http11}");
    assert_eq!(header(&http11, "connection"), Some("close"), "{http11}");

    let head = http_from(PROBE, port, "HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!(status_code(&head), Some(200), "{head}");
    assert_eq!(body(&head), "", "HEAD has no body");

    let missing = http_from(PROBE, port, "GET /nope HTTP/1.0\r\n\r\n").unwrap();
    assert_eq!(status_code(&missing), Some(404), "{missing}");

    let post = http_from(PROBE, port, "POST /healthz HTTP/1.0\r\nContent-Length: 0\r\n\r\n").unwrap();
    assert_eq!(status_code(&post), Some(405), "{post}");

    for garbage in [
        "\x16\x03\x01\x02\x00\x01\x00\x01\x7c\x03\x03\r\n\r\n",
        "HELLO THERE\r\n\r\n",
    ] {
        let answer = http_from(PROBE, port, garbage).unwrap();
        assert_eq!(status_code(&answer), Some(400), "{garbage:?} -> {answer}");
    }

    let huge = format!("GET /healthz HTTP/1.1\r\nX-Junk: {}\r\n\r\n", "a".repeat(20_000));
    let answer = http_from(PROBE, port, &huge).unwrap_or_default();
    assert!(
        matches!(status_code(&answer), Some(431) | Some(400) | None),
        "{answer}"
    );

    // The relay is untouched by all this.
    let mut client = TcpStream::connect(local(upstream_port_of(&daemon))).unwrap();
    echo_roundtrip(&mut client, b"still relaying").unwrap();
}

/// The relay port of a daemon started with `config_one_route`.
fn upstream_port_of(daemon: &Daemon) -> u16 {
    let text = std::fs::read_to_string(&daemon.config).unwrap();
    let listen = text
        .lines()
        .find(|l| l.starts_with("listen = \"127.0.0.1:"))
        .unwrap();
    listen
        .trim_end_matches('"')
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn draining_answers_503_while_a_connection_is_live() {
    let upstream = Upstream::echo();
    let relay_port = free_port();
    let mut daemon = Daemon::start(&config_one_route(relay_port, upstream.addr, "", ""));
    let port = daemon.health_port.unwrap();
    let mut live = TcpStream::connect(local(relay_port)).unwrap();
    echo_roundtrip(&mut live, b"hold").unwrap();

    daemon.signal(Signal::SIGTERM);
    daemon.expect_log("draining", Duration::from_secs(5));
    let answer = http_from(PROBE, port, "GET /healthz HTTP/1.0\r\n\r\n").unwrap();
    assert_eq!(status_code(&answer), Some(503), "{answer}");
    assert!(body(&answer).contains("draining"), "{answer}");
    echo_roundtrip(&mut live, b"still flowing during the drain").unwrap();

    drop(live);
    assert!(
        daemon
            .wait_exit(Duration::from_secs(5))
            .expect("exits once the connection ends")
            .success()
    );
}

#[test]
fn slowloris_does_not_delay_a_probe() {
    let upstream = Upstream::echo();
    let daemon = Daemon::start(&config_one_route(free_port(), upstream.addr, "", ""));
    let port = daemon.health_port.unwrap();
    let mut held = Vec::new();
    for _ in 0..100 {
        let Ok(mut stream) = TcpStream::connect(local(port)) else {
            continue;
        };
        // Half a request, never finished.
        let _ = stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ");
        held.push(stream);
    }
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..5 {
        let started = Instant::now();
        let answer = http_from(PROBE, port, "GET /healthz HTTP/1.0\r\n\r\n").unwrap();
        assert_eq!(status_code(&answer), Some(200), "{answer}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "probe took {:?}",
            started.elapsed()
        );
    }
    drop(held);
}

#[test]
fn sources_outside_the_lists_are_reset() {
    let upstream = Upstream::echo();
    let health_port = free_port();
    let config = format!(
        "{}\n[health]\nlisten = \"127.0.0.1:{health_port}\"\nallow = [\"127.0.0.3/32\"]\nmetrics_allow = [\"127.0.0.1/32\"]\n",
        config_one_route(free_port(), upstream.addr, "", "")
    );
    let _daemon = Daemon::start(&config);
    let refused = http_from(
        Ipv4Addr::new(127, 0, 0, 2),
        health_port,
        "GET /healthz HTTP/1.0\r\n\r\n",
    );
    assert_eq!(
        refused.map_err(|e| e.kind()).err(),
        Some(ErrorKind::ConnectionReset)
    );
    // The metrics reader may not ask for the probe path, and the prober may not read metrics.
    let answer = http_from(Ipv4Addr::LOCALHOST, health_port, "GET /healthz HTTP/1.0\r\n\r\n").unwrap();
    assert_eq!(status_code(&answer), Some(403), "{answer}");
    let answer = http_from(PROBE, health_port, "GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    assert_eq!(status_code(&answer), Some(403), "{answer}");
}

fn metric(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape.samples.iter().find_map(|s| {
        let matches = s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v));
        if !matches {
            return None;
        }
        match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => Some(v),
            _ => None,
        }
    })
}

fn scrape(port: u16) -> prometheus_parse::Scrape {
    let answer = http_from(Ipv4Addr::LOCALHOST, port, "GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    assert_eq!(status_code(&answer), Some(200), "{answer}");
    let text = body(&answer);
    assert!(
        text.trim_end().ends_with("# EOF"),
        "OpenMetrics text ends with # EOF"
    );
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("malformed line {line:?}"));
        // ferryd's own metrics are prefixed; the standard process metrics are not.
        assert!(
            series.starts_with("ferryd_") || series.starts_with("process_"),
            "{line}"
        );
        assert!(value.parse::<f64>().is_ok(), "{line}");
    }
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("parses as Prometheus text")
}

#[test]
fn metrics_count_relayed_denied_and_probe_connections() {
    let upstream = Upstream::echo();
    let relay_port = free_port();
    let daemon = Daemon::start(&config_one_route(relay_port, upstream.addr, "", ""));
    let port = daemon.health_port.unwrap();
    let route = [("route", "test")];

    let before = scrape(port);
    assert_eq!(
        metric(
            &before,
            "ferryd_connections_total",
            &[route[0], ("outcome", "relayed")]
        ),
        Some(0.0)
    );
    assert_eq!(metric(&before, "ferryd_healthy", &[]), Some(1.0));
    assert!(before.samples.iter().any(|s| s.metric == "ferryd_build_info"));

    let mut client = TcpStream::connect(local(relay_port)).unwrap();
    echo_roundtrip(&mut client, b"12345").unwrap();
    drop(client);
    expect_reset(Ipv4Addr::new(127, 0, 0, 2), local(relay_port));
    let mut probe = connect_from(PROBE, local(relay_port)).unwrap();
    let _ = std::io::Read::read(&mut probe, &mut [0u8; 1]);
    daemon.expect_log("connection closed", Duration::from_secs(5));

    let after = scrape(port);
    for (outcome, want) in [("relayed", 1.0), ("denied", 1.0), ("probe", 1.0), ("limit", 0.0)] {
        assert_eq!(
            metric(
                &after,
                "ferryd_connections_total",
                &[route[0], ("outcome", outcome)]
            ),
            Some(want),
            "{outcome}"
        );
    }
    assert_eq!(
        metric(
            &after,
            "ferryd_connection_ends_total",
            &[route[0], ("end", "eof")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &after,
            "ferryd_relayed_bytes_total",
            &[route[0], ("direction", "up")]
        ),
        Some(5.0)
    );
    assert_eq!(
        metric(
            &after,
            "ferryd_relayed_bytes_total",
            &[route[0], ("direction", "down")]
        ),
        Some(5.0)
    );
    assert_eq!(metric(&after, "ferryd_connections_live", &route), Some(0.0));
    // Small messages go through the copy path; splice is for bulk reads.
    assert_eq!(
        metric(&after, "ferryd_relay_bytes_total", &[("path", "copy")]),
        Some(10.0)
    );
    assert_eq!(
        metric(&after, "ferryd_relay_bytes_total", &[("path", "splice")]),
        Some(0.0)
    );
    assert!(
        after.samples.iter().any(|s| s.metric == "ferryd_upstream_connect_seconds"
            && matches!(&s.value, prometheus_parse::Value::Histogram(h) if h.iter().any(|b| b.count >= 1.0))),
        "connect histogram observed the dial"
    );
}

#[test]
fn status_document_and_status_command() {
    let dead = local(free_port());
    let relay_port = free_port();
    let daemon = Daemon::start(&config_one_route(relay_port, dead, "", ""));
    let port = daemon.health_port.unwrap();
    let mut client = TcpStream::connect(local(relay_port)).unwrap();
    let _ = std::io::Read::read(&mut client, &mut [0u8; 1]);
    daemon.expect_log("upstream connect failed", Duration::from_secs(5));

    let answer = http_from(Ipv4Addr::LOCALHOST, port, "GET /status HTTP/1.0\r\n\r\n").unwrap();
    assert_eq!(status_code(&answer), Some(200), "{answer}");
    let doc: serde_json::Value = serde_json::from_str(body(&answer)).unwrap();
    assert_eq!(doc["ready"], true);
    assert_eq!(doc["version"], env!("CARGO_PKG_VERSION"));
    let route = &doc["routes"][0];
    assert_eq!(route["name"], "test");
    assert_eq!(route["upstream"], dead.to_string());
    assert_eq!(route["outcomes"]["upstream-refused"], 1);
    let reason = route["last_upstream_error"]["reason"].as_str().unwrap();
    assert!(reason.contains("upstream-refused"), "{reason}");

    let out = Command::new(bin())
        .arg("status")
        .arg("--config")
        .arg(&daemon.config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("ready"), "{stdout}");
    assert!(stdout.contains("route:    test 127.0.0.1:"), "{stdout}");
    assert!(stdout.contains("last upstream error"), "{stdout}");
    // No system bus here (or no such unit): said plainly, and a non-zero exit.
    if !stdout.contains("systemd:  ferryd.service active") {
        assert!(
            stdout.contains("systemd:  cannot read the state of ferryd.service"),
            "{stdout}"
        );
        assert_eq!(out.status.code(), Some(2));
    }
}

#[test]
fn status_command_without_a_daemon_says_so() {
    let dir = TempDir::new("status");
    let path = dir.path().join("ferryd.toml");
    let config = with_health(
        &config_one_route(free_port(), local(free_port()), "", ""),
        free_port(),
    );
    std::fs::write(&path, config).unwrap();
    let out = Command::new(bin())
        .arg("status")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("daemon:   not answering"), "{stdout}");
}

/// NAT that cannot be put in place (here: iptables is not on the NAT keeper's PATH) is loud and
/// contained: the keeper's log, the relay's /status, STATUS= material and metrics name it, the
/// probe stays 200 (the relay is what the balancer needs), and the relay keeps working. READY
/// does not wait for NAT.
#[test]
fn nat_failure_is_reported_beside_health_and_the_relay_keeps_working() {
    let upstream = Upstream::echo();
    let relay_port = free_port();
    let reports = report_dir();
    let config = format!(
        "{}\n[nat]\nsources = [\"10.0.1.4/32\"]\nout_interface = \"eth0\"\nreport_file = \"{}/nat.json\"\n",
        config_one_route(relay_port, upstream.addr, "", ""),
        reports.path().display()
    );
    let keeper = Daemon::keeper(&config, |c| {
        c.env("PATH", "/nonexistent");
    });
    let daemon = Daemon::start(&config);
    let logged = keeper.expect_log("cannot put the NAT rules in place", Duration::from_secs(5));
    assert!(logged.contains("iptables is not installed"), "{logged}");
    // The keeper writes its report and the relay reads it, each once a second.
    let reported = || {
        let status = daemon.health_request("GET /status HTTP/1.0\r\n\r\n").ok()?;
        let doc: serde_json::Value = serde_json::from_str(body(&status)).ok()?;
        (doc["nat"]["state"] == "failed").then_some(())
    };
    until(reported, NAT_REPORTED).expect("the relay reads NAT's failure from the keeper's report");
    let answer = daemon.health_request("GET /healthz HTTP/1.0\r\n\r\n").unwrap();
    assert_eq!(
        status_code(&answer),
        Some(200),
        "NAT must not fail the probe: {answer}"
    );
    let status = daemon.health_request("GET /status HTTP/1.0\r\n\r\n").unwrap();
    let doc: serde_json::Value = serde_json::from_str(body(&status)).unwrap();
    assert_eq!(doc["ready"], true, "{doc}");
    assert_eq!(doc["nat"]["state"], "failed", "{doc}");
    assert!(
        doc["nat"]["reason"]
            .as_str()
            .unwrap()
            .contains("iptables is not installed"),
        "{doc}"
    );
    let mut client = TcpStream::connect(local(relay_port)).unwrap();
    echo_roundtrip(&mut client, b"relay unaffected").unwrap();
    let scrape = scrape(daemon.health_port.unwrap());
    assert!(metric(&scrape, "ferryd_nat_reconciles_total", &[("event", "failed")]).unwrap() >= 1.0);
    assert_eq!(
        metric(&scrape, "ferryd_nat_state", &[("state", "failed")]),
        Some(1.0)
    );
    assert_eq!(metric(&scrape, "ferryd_nat_state", &[("state", "ok")]), Some(0.0));
    assert_eq!(metric(&scrape, "ferryd_healthy", &[]), Some(1.0));
}

/// `[health] require_nat = true` (pools of several proxy VMs): a NAT failure takes this VM out
/// of the pool, with NAT's reason as the probe's body.
#[test]
fn require_nat_makes_a_nat_failure_fail_the_probe() {
    let upstream = Upstream::echo();
    let relay_port = free_port();
    let health_port = free_port();
    let reports = report_dir();
    let config = format!(
        "{}\n[health]\nlisten = \"127.0.0.1:{health_port}\"\nrequire_nat = true\n\n[nat]\nsources = [\"10.0.1.4/32\"]\nout_interface = \"eth0\"\nreport_file = \"{}/nat.json\"\n",
        config_one_route(relay_port, upstream.addr, "", ""),
        reports.path().display()
    );
    let keeper = Daemon::keeper(&config, |c| {
        c.env("PATH", "/nonexistent");
    });
    let _daemon = Daemon::start(&config);
    keeper.expect_log("cannot put the NAT rules in place", Duration::from_secs(5));
    let probe = || {
        http_from(
            std::net::Ipv4Addr::LOCALHOST,
            health_port,
            "GET /healthz HTTP/1.0\r\n\r\n",
        )
        .ok()
    };
    // 503 from the start ("nat: not applied yet"); then with the keeper's reason.
    let answer = until(
        || probe().filter(|answer| body(answer).starts_with("nat: `iptables --version`")),
        NAT_REPORTED,
    )
    .or_else(probe)
    .expect("the probe answers");
    assert_eq!(status_code(&answer), Some(503), "{answer}");
    assert!(body(&answer).starts_with("nat: `iptables --version`"), "{answer}");
    let mut client = TcpStream::connect(local(relay_port)).unwrap();
    echo_roundtrip(&mut client, b"relay unaffected").unwrap();
}

/// With shutdown_grace, SIGTERM turns the probe to 503 at once while the relay keeps accepting
/// for the grace period, then closes its listeners and drains.
#[test]
fn shutdown_grace_keeps_listeners_open_while_the_probe_fails() {
    let upstream = Upstream::echo();
    let relay_port = free_port();
    let config = config_one_route(relay_port, upstream.addr, "shutdown_grace = \"1500ms\"", "");
    let mut daemon = Daemon::start(&config);
    daemon.signal(Signal::SIGTERM);
    daemon.expect_log("listeners stay open for the grace period", Duration::from_secs(2));
    let answer = daemon.health_request("GET /healthz HTTP/1.0\r\n\r\n").unwrap();
    assert_eq!(status_code(&answer), Some(503), "{answer}");
    let mut during_grace = TcpStream::connect(local(relay_port)).unwrap();
    echo_roundtrip(&mut during_grace, b"accepted during the grace period").unwrap();
    drop(during_grace);
    assert!(
        daemon
            .wait_exit(Duration::from_secs(10))
            .expect("exits after the grace and drain")
            .success()
    );
    assert!(
        daemon.log().find("grace period").unwrap() < daemon.log().find("draining: listeners closed").unwrap()
    );
}
