//! PROXY protocol v2 (Private Link's "TCP proxy v2") through a real ferryd on loopback: the
//! header is read exactly, never relayed, and decides admission; LOCAL probes are answered
//! here; a missing, v1 or slow header is refused without a dial; the upstream can be sent a
//! header of its own; and HAProxy (`send-proxy-v2`) in front of ferryd with a real sshd behind
//! runs ssh and scp end to end.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::pp::*;
use common::sshd::{Sshd, assert_copied};
use common::*;
use ferryd::proxy_header::{self, Command as PpCommand, Header};

#[test]
fn header_then_server_first_traffic_no_header_byte_reaches_the_upstream() {
    let (upstream, rx) = server_first();
    let (config, port) = proxy_route(upstream.addr, &format!("allow_link_ids = [{LINK_ID}]"));
    let daemon = Daemon::start(&config);

    // The header alone, then the server speaks first, then the client.
    let mut client = TcpStream::connect(local(port)).unwrap();
    client
        .write_all(&header("203.0.113.7:50123", Some(LINK_ID)))
        .unwrap();
    read_banner(&mut client);
    client.write_all(b"client speaks").unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), b"client speaks");

    // Split into single-byte writes.
    let mut client = TcpStream::connect(local(port)).unwrap();
    client.set_nodelay(true).unwrap();
    for byte in header("203.0.113.8:40000", Some(LINK_ID)) {
        client.write_all(&[byte]).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    read_banner(&mut client);
    client.write_all(b"after a slow header").unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(5)).unwrap(),
        b"after a slow header"
    );

    // Payload in the same write as the header, and enough of it to be spliced.
    let mut client = TcpStream::connect(local(port)).unwrap();
    let payload: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    let mut first = header("203.0.113.9:40001", Some(LINK_ID));
    first.extend_from_slice(&payload);
    client.write_all(&first).unwrap();
    read_banner(&mut client);
    client.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(
        rx.recv_timeout(Duration::from_secs(5)).unwrap() == payload,
        "payload altered"
    );

    // The log line names the real client and the LinkID beside the TCP peer.
    let line = daemon.expect_log("proxied_client=\"203.0.113.7:50123\"", Duration::from_secs(5));
    assert!(line.contains(&format!("link_id={LINK_ID}")), "{line}");
    assert!(line.contains("client=127.0.0.1:"), "{line}");
    let doc = status(&daemon);
    let route = &doc["routes"][0];
    assert_eq!(route["proxy_protocol"], "v2");
    assert_eq!(route["link_ids"][LINK_ID.to_string()], 3, "{doc}");
    assert_eq!(route["last_proxied"]["client"], "203.0.113.9:40001", "{doc}");
    let scrape = http_from(
        Ipv4Addr::LOCALHOST,
        daemon.health_port.unwrap(),
        "GET /metrics HTTP/1.0\r\n\r\n",
    )
    .unwrap();
    assert!(
        scrape.contains(&format!(
            "ferryd_proxied_connections_total{{route=\"test\",link_id=\"{LINK_ID}\"}} 3"
        )),
        "{scrape}"
    );
}

#[test]
fn local_probes_are_answered_and_strangers_refused_without_a_dial() {
    let (upstream, _rx) = server_first();
    let (config, port) = proxy_route(
        upstream.addr,
        &format!(
            "allow_link_ids = [{LINK_ID}]\nallow_clients = [\"203.0.113.0/24\"]\nheader_timeout = \"300ms\""
        ),
    );
    let daemon = Daemon::start(&config);

    // LOCAL: answered here with a FIN.
    let mut probe = TcpStream::connect(local(port)).unwrap();
    probe.write_all(&local_header()).unwrap();
    assert_eq!(end_of(&mut probe, Duration::from_secs(2)), "eof");

    // A LinkID not allowed; a client not allowed.
    let mut wrong = TcpStream::connect(local(port)).unwrap();
    wrong
        .write_all(&header("203.0.113.7:1", Some(LINK_ID + 1)))
        .unwrap();
    assert_eq!(end_of(&mut wrong, Duration::from_secs(2)), "reset");
    let mut stranger = TcpStream::connect(local(port)).unwrap();
    stranger
        .write_all(&header("198.51.100.1:1", Some(LINK_ID)))
        .unwrap();
    assert_eq!(end_of(&mut stranger, Duration::from_secs(2)), "reset");

    // No header at all: reset once header_timeout has passed.
    let started = Instant::now();
    let mut silent = TcpStream::connect(local(port)).unwrap();
    assert_eq!(end_of(&mut silent, Duration::from_secs(3)), "reset");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(2),
        "{waited:?}"
    );

    // A version 1 header, and garbage: refused at their first bytes.
    let mut v1 = TcpStream::connect(local(port)).unwrap();
    v1.write_all(b"PROXY TCP4 203.0.113.7 10.0.0.5 50123 60001\r\n")
        .unwrap();
    assert_eq!(end_of(&mut v1, Duration::from_secs(2)), "reset");
    let mut garbage = TcpStream::connect(local(port)).unwrap();
    garbage.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").unwrap();
    assert_eq!(end_of(&mut garbage, Duration::from_secs(2)), "reset");

    // Oversized: refused from the length alone.
    let mut big = proxy_header::SIGNATURE.to_vec();
    big.extend_from_slice(&[0x21, 0x11, 0xFF, 0xFF]);
    let mut oversized = TcpStream::connect(local(port)).unwrap();
    oversized.write_all(&big).unwrap();
    assert_eq!(end_of(&mut oversized, Duration::from_secs(2)), "reset");

    assert_eq!(upstream.accepted(), 0, "nothing may be dialled: {}", daemon.log());
    let doc = status(&daemon);
    let route = &doc["routes"][0];
    assert_eq!(route["outcomes"]["probe"], 1, "{doc}");
    assert_eq!(route["outcomes"]["denied"], 6, "{doc}");
    let refusals = &route["header_refusals"];
    assert_eq!(refusals["timeout"], 1, "{doc}");
    assert_eq!(refusals["v1"], 1, "{doc}");
    assert_eq!(refusals["missing"], 1, "{doc}");
    assert_eq!(refusals["oversized"], 1, "{doc}");
    // Lines reach stderr through the log's writer thread: wait for it rather than race it.
    daemon.expect_log("reason=\"timeout\"", Duration::from_secs(5));
}

/// Keys that only mean something with a header are refused without one ("off"); the filters are
/// refused with "auto" too (the default): a connection without a header would bypass them.
#[test]
fn check_rejects_header_keys_without_proxy_protocol() {
    for (key, mode) in [
        ("allow_link_ids = [1]", "off"),
        ("allow_clients = [\"10.0.0.0/8\"]", "off"),
        ("header_timeout = \"1s\"", "off"),
        ("allow_link_ids = [1]", "auto"),
        ("allow_clients = [\"10.0.0.0/8\"]", "auto"),
    ] {
        let text = config_one_route(
            free_port(),
            "127.0.0.1:22".parse().unwrap(),
            "",
            &format!("proxy_protocol = \"{mode}\"\n{key}"),
        );
        let dir = TempDir::new("pp-check");
        let path = dir.path().join("ferryd.toml");
        std::fs::write(&path, text).unwrap();
        let out = Command::new(bin())
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let name = key.split(' ').next().unwrap();
        assert!(
            !out.status.success(),
            "{key} accepted with proxy_protocol = {mode:?}"
        );
        assert!(
            stderr.contains(name) && stderr.contains("proxy_protocol = \"v2\""),
            "{stderr}"
        );
    }
}

#[test]
fn header_timeout_is_accepted_with_auto() {
    let text = config_one_route(
        free_port(),
        "127.0.0.1:22".parse().unwrap(),
        "",
        "header_timeout = \"1s\"",
    );
    let dir = TempDir::new("pp-check-auto");
    let path = dir.path().join("ferryd.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(bin())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("proxy_protocol = \"auto\""),
        "auto is the default"
    );
}

#[test]
fn health_endpoint_reads_a_local_header_then_answers() {
    let upstream = Upstream::echo();
    let health = free_port();
    let config = format!(
        "{}\n[health]\nlisten = \"127.0.0.1:{health}\"\nproxy_protocol = \"v2\"\n",
        config_one_route(free_port(), upstream.addr, "", "")
    );
    let _daemon = Daemon::start(&config);
    let mut probe = TcpStream::connect(local(health)).unwrap();
    let mut request = local_header();
    request.extend_from_slice(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    probe.write_all(&request).unwrap();
    let mut answer = String::new();
    probe.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Without the header: refused.
    let mut bare = TcpStream::connect(local(health)).unwrap();
    bare.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(end_of(&mut bare, Duration::from_secs(2)), "reset");
}

/// The upstream is told who is really connecting: ferryd sends its own v2 header.
#[test]
fn upstream_receives_a_header_with_the_real_client() {
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let upstream = Upstream::start(move |mut stream| {
        let tx = tx.lock().unwrap().clone();
        let mut fixed = [0u8; 16];
        stream.read_exact(&mut fixed).unwrap();
        let len = proxy_header::header_len(&fixed).unwrap();
        let mut bytes = fixed.to_vec();
        bytes.resize(len, 0);
        stream.read_exact(&mut bytes[16..]).unwrap();
        let _ = tx.send(proxy_header::parse(&bytes).unwrap());
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
        let _ = tx.send(Header {
            command: PpCommand::Local,
            addresses: None,
            tlvs: vec![(0, rest)],
            link_id: None,
        });
    });
    let (config, port) = proxy_route(upstream.addr, "upstream_proxy_protocol = \"v2\"");
    let _daemon = Daemon::start(&config);
    let mut client = TcpStream::connect(local(port)).unwrap();
    let mut first = header("203.0.113.7:50123", Some(LINK_ID));
    first.extend_from_slice(b"payload");
    client.write_all(&first).unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    let sent = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(sent.command, PpCommand::Proxy);
    assert_eq!(sent.client(), Some("203.0.113.7:50123".parse().unwrap()));
    assert_eq!(sent.link_id, Some(LINK_ID));
    let rest = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(rest.tlvs[0].1, b"payload");
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(local(port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The real thing: HAProxy with `send-proxy-v2` in front of ferryd (as Private Link would be),
/// a real sshd behind; ssh runs a command and scp moves a file byte-exact, and ferryd's log
/// names the client HAProxy saw, not HAProxy itself. With `upstream_proxy_protocol`, an
/// upstream HAProxy with `accept-proxy` sees the original client too.
#[test]
fn haproxy_send_proxy_v2_in_front_of_ferryd_with_sshd_behind() {
    let Some(sshd) = Sshd::start(&["haproxy"]) else {
        return;
    };
    let sshd_port = sshd.port;
    let dir = &sshd.dir;

    // ferryd admits only HAProxy's source address, reads its header, relays to sshd.
    let ferryd_port = free_port();
    let config = config_one_route(
        ferryd_port,
        local(sshd_port),
        "",
        "proxy_protocol = \"v2\"\nallow_clients = [\"127.0.0.5/32\"]",
    )
    .replace("allow = [\"127.0.0.1/32\"]", "allow = [\"127.0.0.6/32\"]");
    let daemon = Daemon::start(&config);
    // A second ferryd with the default settings ("auto"): the same sshd through HAProxy (with a
    // header) and straight from ssh (without).
    let auto_port = free_port();
    let auto = Daemon::start(&config_one_route(auto_port, local(sshd_port), "", "").replace(
        "allow = [\"127.0.0.1/32\"]",
        "allow = [\"127.0.0.5/32\", \"127.0.0.6/32\"]",
    ));

    let front = free_port();
    let front_auto = free_port();
    let haproxy_cfg = dir.path().join("haproxy.cfg");
    std::fs::write(
        &haproxy_cfg,
        format!(
            "global\n  maxconn 100\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
             frontend front\n  bind 127.0.0.1:{front}\n  default_backend relay\n\
             backend relay\n  server ferryd 127.0.0.1:{ferryd_port} send-proxy-v2 source 127.0.0.6\n\
             frontend front_auto\n  bind 127.0.0.1:{front_auto}\n  default_backend relay_auto\n\
             backend relay_auto\n  server ferryd 127.0.0.1:{auto_port} send-proxy-v2 source 127.0.0.6\n"
        ),
    )
    .unwrap();
    let _haproxy = Child(
        Command::new("haproxy")
            .arg("-f")
            .arg(&haproxy_cfg)
            .arg("-db")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_listening(front);
    wait_listening(front_auto);

    // ssh and scp from the client address HAProxy must report.
    let client = |program: &str| {
        let mut command = sshd.client(program);
        command.args(["-o", "BindAddress=127.0.0.5"]);
        command
    };
    let mut ssh = client("ssh");
    let out = ssh
        .args([
            "-p",
            &front.to_string(),
            "root@127.0.0.1",
            "echo relayed-through-ferryd",
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("relayed-through-ferryd"),
        "ssh: {}\nferryd: {}",
        String::from_utf8_lossy(&out.stderr),
        daemon.log()
    );

    let source = dir.path().join("upload.bin");
    let data: Vec<u8> = (0..3 * 1024 * 1024)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&source, &data).unwrap();
    let target = dir.path().join("arrived.bin");
    let mut scp = client("scp");
    let out = scp
        .args(["-q", "-P", &front.to_string()])
        .arg(&source)
        .arg(format!("root@127.0.0.1:{}", target.display()))
        .output()
        .unwrap();
    assert_copied(&out, &target, &data);

    let line = daemon.expect_log("proxied_client=\"127.0.0.5:", Duration::from_secs(5));
    assert!(
        line.contains("client=127.0.0.6:"),
        "the TCP peer is HAProxy: {line}"
    );

    // "auto": ssh through HAProxy's header and ssh straight, on the same route.
    for (port, how) in [(front_auto, "through HAProxy"), (auto_port, "straight")] {
        let mut ssh = client("ssh");
        let out = ssh
            .args(["-p", &port.to_string(), "root@127.0.0.1", "echo auto-ok"])
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("auto-ok"),
            "ssh {how}: {}\nferryd: {}",
            String::from_utf8_lossy(&out.stderr),
            auto.log()
        );
    }
    assert_eq!(status(&auto)["routes"][0]["proxy_headers"], "mixed");

    // upstream_proxy_protocol: an HAProxy with accept-proxy behind ferryd answers with the
    // source address it was told.
    let back = free_port();
    let back_cfg = dir.path().join("back.cfg");
    std::fs::write(
        &back_cfg,
        format!(
            "defaults\n  mode http\n  timeout connect 5s\n  timeout client 10s\n  timeout server 10s\n\
             frontend back\n  bind 127.0.0.1:{back} accept-proxy\n  http-request return status 200 content-type text/plain lf-string \"%[src]\\n\"\n"
        ),
    )
    .unwrap();
    let _back = Child(
        Command::new("haproxy")
            .arg("-f")
            .arg(&back_cfg)
            .arg("-db")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_listening(back);
    let relay = free_port();
    let _forwarding = Daemon::start(
        &config_one_route(relay, local(back), "", "upstream_proxy_protocol = \"v2\"")
            .replace("allow = [\"127.0.0.1/32\"]", "allow = [\"127.0.0.9/32\"]"),
    );
    // ferryd dials from 127.0.0.1; only the header can tell HAProxy about 127.0.0.9.
    let mut client = connect_from(Ipv4Addr::new(127, 0, 0, 9), local(relay)).unwrap();
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    client.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.trim_end().ends_with("127.0.0.9"), "{answer}");
}
