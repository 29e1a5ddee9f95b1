//! What the pause of a live upgrade must not wait for: a hung dial, a connection reading its
//! PROXY header.

use super::*;

/// An upstream that drops every SYN, like a build VM behind a firewall that drops 22: a
/// listener with a one-connection accept queue, already full (the kernel drops SYNs to a full
/// queue). Keep the returned sockets alive while it is needed.
fn hung_upstream() -> (SocketAddr, socket2::Socket, TcpStream) {
    let listener = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    listener
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    listener.listen(0).unwrap();
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    let filler = TcpStream::connect(addr).expect("fill the accept queue");
    (addr, listener, filler)
}

/// Keystrokes every 10 ms until `stop`: the slowest round trip, or the first failure.
fn keystrokes(mut session: TcpStream, stop: Arc<AtomicBool>) -> JoinHandle<Result<Duration, String>> {
    std::thread::spawn(move || {
        let mut slowest = Duration::ZERO;
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let sent = Instant::now();
            common::echo_roundtrip(&mut session, format!("key {n}\n").as_bytes())
                .map_err(|e| format!("keystroke {n}: {e}"))?;
            slowest = slowest.max(sent.elapsed());
            n += 1;
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(slowest)
    })
}

/// `GET /healthz` every 20 ms until `stop`: every answer's status line (or error).
fn probes(daemon: &Daemon, stop: Arc<AtomicBool>) -> JoinHandle<Vec<String>> {
    let port = daemon.health_port.expect("a health port");
    std::thread::spawn(move || {
        let mut answers = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let answer = common::http_from(
                std::net::Ipv4Addr::LOCALHOST,
                port,
                "GET /healthz HTTP/1.0\r\n\r\n",
            );
            answers.push(match answer {
                Ok(response) => response.lines().next().unwrap_or_default().to_string(),
                Err(e) => format!("error: {e}"),
            });
            std::thread::sleep(Duration::from_millis(20));
        }
        answers
    })
}

/// One client dialling an upstream that drops SYNs (connect_timeout 12 s) must not hold the
/// pause: a keystroke on another route is answered within 100 ms throughout the upgrade, the
/// health endpoint says 200 throughout, and the dial goes on in the new image with the deadline
/// it had (it is not given a fresh 12 s).
#[test]
fn a_hung_dial_does_not_hold_the_pause() {
    let (hung, _listener, _filler) = hung_upstream();
    let echo = Upstream::echo();
    let (hung_port, echo_port) = (free_port(), free_port());
    let config = format!(
        r#"allow = ["127.0.0.1/32"]
probe_sources = ["127.0.0.3/32"]

[[route]]
name = "hung"
listen = "127.0.0.1:{hung_port}"
upstream = "{hung}"
connect_timeout = "12s"

[[route]]
name = "echo"
listen = "127.0.0.1:{echo_port}"
upstream = "{}"
"#,
        echo.addr
    );
    let installed = Installed::new();
    let daemon = installed.start(&config);
    let mut dialling = TcpStream::connect(local(hung_port)).expect("connect to the hung route");
    let dialling_since = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let keys = keystrokes(session(echo_port), stop.clone());
    let health = probes(&daemon, stop.clone());
    // Let the dial get under way (its first SYN has been dropped).
    std::thread::sleep(Duration::from_millis(1500));
    installed.replace_with(Path::new(bin()));
    let asked = Instant::now();
    let out = upgrade(&daemon);
    let took = asked.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        daemon.log()
    );
    assert!(stdout.contains("2 connection(s) moved, none reset"), "{stdout}");
    assert!(
        took < Duration::from_secs(3),
        "the upgrade took {took:?}: {stdout}"
    );
    let slowest = keys
        .join()
        .expect("keystroke thread")
        .expect("every keystroke answered");
    assert!(
        slowest < Duration::from_millis(100),
        "a keystroke waited {slowest:?} across the upgrade"
    );
    let answers = health.join().expect("probe thread");
    let not_ok: Vec<&String> = answers.iter().filter(|a| !a.contains(" 200 ")).collect();
    assert!(
        !answers.is_empty() && not_ok.is_empty(),
        "{} of {} probes were not 200: {not_ok:?}",
        not_ok.len(),
        answers.len()
    );
    // The dial still ends at its first deadline, 12 s after the client connected.
    dialling.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let end = dialling.read(&mut [0u8; 16]);
    let waited = dialling_since.elapsed();
    assert_eq!(end.map_err(|e| e.kind()), Err(io::ErrorKind::ConnectionReset));
    assert!(
        waited > Duration::from_millis(11_500) && waited < Duration::from_millis(13_500),
        "the moved dial ended after {waited:?}, not at its 12 s deadline"
    );
    daemon.expect_log("end=\"upstream-timeout\"", Duration::from_secs(2));
}

/// A client that has sent part of its PROXY v2 header when the upgrade comes: the bytes it sent
/// cross with it, the new image reads the rest and relays; and one that sends nothing is still
/// refused at its first header_timeout, not a fresh one.
#[test]
fn a_connection_reading_its_proxy_header_parks_and_goes_on() {
    let echo = Upstream::echo();
    let port = free_port();
    let installed = Installed::new();
    let daemon = installed.start(&config_one_route(
        port,
        echo.addr,
        "",
        "proxy_protocol = \"v2\"\nheader_timeout = \"4s\"",
    ));
    let header = ferryd::proxy_header::encode(&ferryd::proxy_header::Header {
        command: ferryd::proxy_header::Command::Proxy,
        addresses: Some(("203.0.113.7:50123".parse().unwrap(), local(port))),
        tlvs: vec![ferryd::proxy_header::azure_link_tlv(7)],
        link_id: Some(7),
    });
    let mut partial = TcpStream::connect(local(port)).expect("connect");
    partial.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    partial.write_all(&header[..7]).expect("half a signature");
    let mut silent = TcpStream::connect(local(port)).expect("connect");
    let silent_since = Instant::now();
    std::thread::sleep(Duration::from_millis(1000));
    installed.replace_with(Path::new(bin()));
    let out = upgrade(&daemon);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        daemon.log()
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("2 connection(s) moved, none reset"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    partial.write_all(&header[7..]).expect("the rest of the header");
    common::echo_roundtrip(&mut partial, b"hello after the upgrade")
        .unwrap_or_else(|e| panic!("the connection did not go on: {e}\n{}", daemon.log()));
    silent.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let end = silent.read(&mut [0u8; 16]);
    let waited = silent_since.elapsed();
    assert_eq!(end.map_err(|e| e.kind()), Err(io::ErrorKind::ConnectionReset));
    assert!(
        waited > Duration::from_millis(3_500) && waited < Duration::from_millis(5_500),
        "the silent client was refused after {waited:?}, not at its 4 s header_timeout"
    );
    let status = status(&daemon);
    assert_eq!(status["routes"][0]["link_ids"]["7"], 1, "{status}");
}
