//! A peer that vanishes while data is on its way to it is found in about keepalive's time
//! (Linux sends no keepalive probe while data is unacknowledged, and would otherwise hold the
//! session for about 15 minutes); a peer that is there but reads nothing is not taken for a
//! vanished one, however long it reads nothing.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::netns::*;
use common::*;

/// Keepalive that declares a peer dead after 2 s + 3 × 1 s.
const QUICK_KEEPALIVE: &str = "keepalive_time = \"2s\"\nkeepalive_interval = \"1s\"\nkeepalive_probes = 3";

/// An upstream that reads nothing for 12 s (its receive window closes: zero-window probes are
/// answered), then everything: the connection lives on, far past the 5 s bound, and every byte
/// arrives.
#[test]
fn a_peer_that_reads_nothing_is_not_taken_for_gone() {
    const TOTAL: usize = 32 << 20;
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = std::sync::Mutex::new(Some(tx));
    let upstream = Upstream::start(move |mut stream| {
        let Some(tx) = tx.lock().unwrap().take() else {
            return;
        };
        std::thread::sleep(Duration::from_secs(12));
        let mut got = 0usize;
        let mut buf = vec![0u8; 1 << 20];
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 {
                break;
            }
            got += n;
        }
        let _ = tx.send(got);
    });
    let port = free_port();
    let daemon = Daemon::start(&config_one_route(port, upstream.addr, "", QUICK_KEEPALIVE));
    let mut client = TcpStream::connect(local(port)).unwrap();
    let sender = std::thread::spawn(move || {
        let block = vec![7u8; 1 << 20];
        for _ in 0..TOTAL / block.len() {
            client.write_all(&block)?;
        }
        client.shutdown(std::net::Shutdown::Write)
    });
    let got = rx
        .recv_timeout(Duration::from_secs(40))
        .expect("the upstream's count");
    sender.join().unwrap().expect("the client sent every byte");
    assert_eq!(got, TOTAL, "log:\n{}", daemon.log());
    assert!(
        daemon.log_lines("the peer is gone").is_empty(),
        "a reader that was there was taken for gone:\n{}",
        daemon.log()
    );
}

/// The build VM vanishes (every packet to it dropped) while the client keeps typing: ferryd
/// finds it within the keepalive bound and a half, and resets the client, instead of holding
/// the session for tcp_retries2 (about 15 minutes).
#[test]
fn a_vanished_build_vm_is_found_in_keepalive_time() {
    if !can_run() {
        return;
    }
    let mut topo = Topology::new();
    topo.spawn("buildvm", &["python3", "-c", ECHO]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !topo.sh("buildvm", "ss -ltnH").contains(":22 ") {
        assert!(Instant::now() < deadline, "port 22 did not open in the build VM");
        std::thread::sleep(Duration::from_millis(50));
    }
    let config = format!(
        r#"allow = ["10.0.0.0/24"]
probe_sources = ["10.0.0.99/32"]

[[route]]
name = "ssh"
listen = "0.0.0.0:60001"
upstream = "10.0.1.4:22"
{QUICK_KEEPALIVE}

[health]
listen = "127.0.0.1:60080"
"#
    );
    let daemon = topo.daemon(&config, None);
    daemon.expect_log(" ready config=", Duration::from_secs(10));
    // The client types a line every 100 ms, from the balancer's side, and reports how its
    // connection ended and when (seconds after the build VM vanished, which it is told by a file).
    let client = r#"
import os, socket, sys, time
s = socket.create_connection(("10.0.0.5", 60001), timeout=60)
s.recv(64)
open(sys.argv[2], "w").close()
s.setblocking(False)
gone = None
while True:
    if gone is None and os.path.exists(sys.argv[1]):
        gone = time.monotonic()
    try:
        s.send(b"keystroke\n")
        while True:
            if not s.recv(65536):
                print("eof", time.monotonic() - (gone or time.monotonic())); sys.exit(0)
    except BlockingIOError:
        pass
    except ConnectionResetError:
        print("reset", time.monotonic() - (gone or time.monotonic())); sys.exit(0)
    if gone is not None and time.monotonic() - gone > 60:
        print("alive after 60 s"); sys.exit(0)
    time.sleep(0.1)
"#;
    let flag = TempDir::new("vanished");
    let flag_path = flag.path().join("gone");
    let greeted = flag.path().join("greeted");
    let mut typing = Command::new("ip")
        .args(["netns", "exec", &topo.ns("lb"), "python3", "-c", client])
        .arg(&flag_path)
        .arg(&greeted)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Relaying, the build VM's first bytes through, before it goes.
    until(|| greeted.exists().then_some(()), Duration::from_secs(10))
        .expect("the client got the build VM's first bytes");
    // The build VM vanishes: nothing it would send or receive gets through any more.
    topo.sh(
        "buildvm",
        "iptables -A INPUT -j DROP && iptables -A OUTPUT -j DROP",
    );
    std::fs::write(&flag_path, "").unwrap();
    let mut said = String::new();
    typing.stdout.take().unwrap().read_to_string(&mut said).unwrap();
    let _ = typing.wait();
    let mut words = said.split_whitespace();
    let (how, after) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    assert_eq!(how, "reset", "the client's connection: {said}\n{}", daemon.log());
    let after: f64 = after.parse().unwrap_or(f64::MAX);
    // 5 s of silence, believed on the second of two looks 1.25 s apart, and the client's own
    // 100 ms.
    assert!(after < 9.0, "found after {after:.1} s\n{}", daemon.log());
    let line = daemon.expect_log("the peer is gone", Duration::from_secs(2));
    assert!(
        line.contains("upstream:") && line.contains("end=\"reset\""),
        "{line}"
    );
    println!("a vanished build VM was found after {after:.1} s: {line}");
}
