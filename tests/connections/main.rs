//! The connection table seen from outside: `GET /connections`, `ferryd connections` (table,
//! JSON, a route's), `--close` through the control socket and who may use it, and the byte
//! accounting every test daemon is held to (see `common::Daemon`'s `Drop`), shown able to fail.

#[path = "../common/mod.rs"]
mod common;
mod sessions;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::skip::have;
use common::sshd::{Sshd, assert_copied};
use common::*;
use serde_json::Value;

/// `ferryd connections --config <daemon's> args...`, run by `user` when given (`setpriv` args).
fn connections(daemon: &Daemon, user: &[&str], args: &[&str]) -> Output {
    connections_with(&daemon.config, user, args)
}

/// `ferryd connections --config <config> args...`, run by `user` when given.
fn connections_with(config: &std::path::Path, user: &[&str], args: &[&str]) -> Output {
    let mut command = if user.is_empty() {
        Command::new(bin())
    } else {
        let mut c = Command::new("setpriv");
        c.args(user).arg("--").arg(bin());
        c
    };
    command
        .arg("connections")
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("run ferryd connections")
}

/// The daemon's connections as `ferryd connections --json` prints them.
fn listing(daemon: &Daemon) -> Vec<Value> {
    let out = connections(daemon, &[], &["--json"]);
    assert!(
        out.status.success(),
        "ferryd connections --json: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn find(all: &[Value], id: u64) -> Option<&Value> {
    all.iter().find(|c| c["id"] == id)
}

/// Polls the listing until `check` finds what it wants (returning it), for up to 10 s.
fn wait_listing<T>(daemon: &Daemon, what: &str, check: impl Fn(&[Value]) -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let all = listing(daemon);
        if let Some(found) = check(&all) {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "{what} never showed; last listing: {all:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn set_mode(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Asserts that `ferryd connections` failed and that its message says each of `needles`.
#[track_caller]
fn fails_saying(out: &Output, needles: &[&str]) {
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && needles.iter().all(|n| why.contains(n)),
        "expected a failure saying {needles:?}; {}",
        text(out)
    );
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Each direction's state as it happens: a client that uploads and half-closes while the
/// upstream still answers shows its upward direction half-closed and the fin timer counting;
/// an upstream that stops reading leaves bytes held in the upward direction; a member of the
/// daemon's group (not root) may close a connection.
#[test]
fn directions_show_half_closed_and_held_bytes_and_a_group_member_may_close() {
    // An upstream that reads until the client's FIN, then answers and stays open.
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in upstream.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut first = [0u8; 1];
                if stream.read_exact(&mut first).is_err() {
                    return;
                }
                if first[0] == b'U' {
                    let mut rest = Vec::new();
                    let _ = stream.read_to_end(&mut rest);
                    let _ = stream.write_all(format!("got {}\n", rest.len() + 1).as_bytes());
                }
                // 'S': read nothing more. Either way, hold the connection open.
                std::thread::sleep(Duration::from_secs(30));
            });
        }
    });
    let port = free_port();
    let daemon = Daemon::start(&config_one_route(
        port,
        upstream_addr,
        "",
        "idle_timeout = \"10m\"\nfin_timeout = \"45s\"",
    ));

    let mut upload = TcpStream::connect(local(port)).unwrap();
    upload.write_all(&[b'U'; 100_000]).unwrap();
    upload.shutdown(Shutdown::Write).unwrap();
    let mut answer = String::new();
    BufReader::new(&upload).read_line(&mut answer).unwrap();
    assert_eq!(answer, "got 100000\n");
    let half = wait_listing(&daemon, "a half-closed upward direction", |all| {
        let c = all.first()?;
        (c["up"]["state"] == "half-closed").then(|| c.clone())
    });
    assert_eq!(half["down"]["state"], "open", "{half}");
    assert_eq!(half["bytes_up"], 100_000, "{half}");
    assert_eq!(half["bytes_down"], 11, "{half}");
    assert_eq!(half["up"]["held_bytes"], 0, "{half}");
    let deadline = half["deadline_s"].as_f64().unwrap();
    assert!(
        deadline <= 45.0 && deadline > 30.0,
        "the fin timer counts now: {half}"
    );
    let half_id = half["id"].as_u64().unwrap();
    // The listing was built by a thread in the idle scheduling class, which the relay preempts
    // as soon as it has work (see src/health/listing.rs).
    let classes = Command::new("ps")
        .args(["-L", "-o", "cls=,comm=", "-p", &daemon.pid().to_string()])
        .output()
        .unwrap();
    let classes = String::from_utf8_lossy(&classes.stdout);
    assert!(
        classes
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["IDL", "ferryd-listing"]),
        "{classes}"
    );

    // An upstream that stops reading: what the relay has read and cannot write is held.
    let mut stuck = TcpStream::connect(local(port)).unwrap();
    stuck.write_all(b"S").unwrap();
    stuck.set_write_timeout(Some(Duration::from_millis(200))).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    let started = Instant::now();
    // Until the client's own send buffer is full: everything between is full too.
    while stuck.write(&chunk).is_ok() && started.elapsed() < Duration::from_secs(20) {}
    let held = wait_listing(&daemon, "bytes held in the upward direction", |all| {
        let c = all.iter().find(|c| c["id"] != half_id)?;
        (c["up"]["held_bytes"].as_u64()? > 0).then(|| c.clone())
    });
    assert_eq!(held["up"]["state"], "open", "{held}");
    let held_id = held["id"].as_u64().unwrap();

    // A member of the daemon's group who is not root may close: the daemon runs with a group of
    // its own number in this suite (see common::unprivileged).
    let socket = daemon.control_socket.clone().unwrap();
    let gid = std::os::unix::fs::MetadataExt::gid(&std::fs::metadata(&socket).unwrap());
    if common::skip::root() && have("setpriv") {
        let groups = format!("--groups={gid}");
        let member = ["--reuid=65534", "--regid=65534", groups.as_str()];
        let close = connections(&daemon, &member, &["--close", &held_id.to_string()]);
        assert!(close.status.success(), "{}", text(&close));
        let line = daemon.expect_log("closed-by-admin", Duration::from_secs(5));
        assert!(line.contains("closed by uid 65534"), "{line}");
        // The client sees the reset.
        stuck.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut byte = [0u8; 1];
        let seen = stuck.read(&mut byte);
        assert!(
            matches!(&seen, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "{seen:?}"
        );
        // As the package installs the configuration (0640, root and the daemon's group),
        // reading it is the first gate: an outsider is told who may, a member goes on.
        let dir = TempDir::new("packaged-config");
        // Reachable by the outsider whatever the umask: the file's own mode is the gate here.
        set_mode(dir.path(), 0o755);
        let packaged = dir.path().join("ferryd.toml");
        std::fs::copy(&daemon.config, &packaged).unwrap();
        std::os::unix::fs::chown(&packaged, Some(0), Some(gid)).unwrap();
        set_mode(&packaged, 0o640);
        let outsider = ["--reuid=65534", "--regid=65534", "--clear-groups"];
        let refused = connections_with(&packaged, &outsider, &["--close", &half_id.to_string()]);
        fails_saying(
            &refused,
            &[
                "Permission denied",
                &format!("only root and members of group {gid}"),
            ],
        );
        let member_list = connections_with(&packaged, &member, &["--json"]);
        assert!(member_list.status.success(), "{}", text(&member_list));
    } else {
        common::skip::skipped("(part) a group member's --close needs root and setpriv");
    }
    // The half-closed one was not touched.
    assert!(find(&listing(&daemon), half_id).is_some());
}

/// The control socket refuses what it does not understand, and a socket file that is not a
/// socket keeps the relay from taking it over (it warns and relays on).
#[test]
fn the_control_socket_refuses_garbage_and_never_takes_the_relay_down() {
    let upstream = Upstream::start(|mut s| {
        let mut buf = [0u8; 1024];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 || s.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    let port = free_port();
    let daemon = Daemon::start(&config_one_route(port, upstream.addr, "", ""));
    let path = daemon.control_socket.clone().unwrap();
    let ask = |request: &[u8]| {
        let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(request).unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer
    };
    assert!(ask(b"close\n").starts_with("error: unknown request"));
    assert!(ask(b"close 1 2\n").starts_with("error: unknown request"));
    assert!(ask(b"close x\n").starts_with("error: \"x\" is not a connection id"));
    assert!(ask(b"shutdown everything\n").starts_with("error: unknown request"));
    assert!(ask(&[b'a'; 4096]).starts_with("error: request longer than 256 bytes"));
    assert!(ask(b"close 99999\n").starts_with("error: no relayed connection has id 99999"));
    // A client that sends nothing is let go, and the relay relays meanwhile.
    let _silent = std::os::unix::net::UnixStream::connect(&path).unwrap();
    let mut c = TcpStream::connect(local(port)).unwrap();
    c.write_all(b"ping").unwrap();
    let mut back = [0u8; 4];
    c.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"ping");
    drop(c);

    // A file in the way: the daemon says so and relays without the socket.
    let dir = TempDir::new("control-in-the-way");
    let in_the_way = dir.path().join("control.sock");
    std::fs::write(&in_the_way, "not a socket").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let port = free_port();
    let blocked = Daemon::start(&format!(
        "control_socket = {:?}\n{}",
        in_the_way.display().to_string(),
        config_one_route(port, upstream.addr, "", "")
    ));
    let warning = blocked.expect_log("control socket unavailable", Duration::from_secs(5));
    assert!(warning.contains("exists and is not a socket"), "{warning}");
    let mut c = TcpStream::connect(local(port)).unwrap();
    c.write_all(b"pong").unwrap();
    c.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"pong");
    let refused = connections(&blocked, &[], &["--close", "1"]);
    fails_saying(&refused, &["cannot reach the daemon's control socket"]);
}

/// The accounting can fail: with the `drop-byte` test fault, the first copy burst writes one
/// byte fewer than it read; the connection still ends in order, and the daemon counts one
/// mismatch, logs both counts at ERROR, and reports it in /metrics and /status.
#[test]
fn a_lost_byte_is_counted_and_logged() {
    let upstream = Upstream::start(|mut s| {
        let mut all = Vec::new();
        let _ = s.read_to_end(&mut all);
        let _ = s.write_all(format!("{}", all.len()).as_bytes());
    });
    let port = free_port();
    let mut daemon = Daemon::start_with(&config_one_route(port, upstream.addr, "", ""), |c| {
        c.env("FERRYD_TEST_FAULTS", "drop-byte");
    });
    let mut c = TcpStream::connect(local(port)).unwrap();
    c.write_all(b"twelve bytes").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut answer = String::new();
    c.read_to_string(&mut answer).unwrap();
    assert_eq!(answer, "11", "the fault dropped a byte on the way up");
    let line = daemon.expect_log("byte accounting mismatch", Duration::from_secs(5));
    assert!(line.contains("ERROR"), "{line}");
    assert_eq!(field(&line, "bytes_read"), Some("12"), "{line}");
    assert_eq!(field(&line, "bytes_written"), Some("11"), "{line}");
    assert_eq!(field(&line, "direction"), Some("up"), "{line}");
    assert!(field(&line, "conn").is_some(), "{line}");
    assert_eq!(daemon.accounting_mismatches(), 1);
    let status = daemon.health_request("GET /status HTTP/1.0\r\n\r\n").unwrap();
    assert!(status.contains("\"accounting_mismatches\":1"), "{status}");
    // Without the fault the same exchange counts nothing: the harness checks every other
    // daemon of the suite for zero when it ends.
    daemon.expect_accounting_mismatches(1);
}

/// A connection the balancer's Private Link Service sent with a PROXY v2 header is listed with
/// the client the header names and its LinkID, and its opened line says both.
#[test]
fn a_proxied_connection_is_listed_with_its_client_and_link_id() {
    let upstream = Upstream::echo();
    let (config, port) = common::pp::proxy_route(upstream.addr, "");
    let daemon = Daemon::start(&config);
    let header = common::pp::header("203.0.113.7:50123", Some(7));
    let mut client = TcpStream::connect(local(port)).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    client.write_all(&header).unwrap();
    echo_roundtrip(&mut client, b"hello").unwrap();
    let listed = wait_listing(&daemon, "the proxied connection", |all| all.first().cloned());
    assert_eq!(listed["proxied_client"], "203.0.113.7:50123", "{listed}");
    assert_eq!(listed["link_id"], 7, "{listed}");
    assert!(
        listed["client"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{listed}"
    );
    let opened = daemon.expect_log("connection opened", Duration::from_secs(5));
    assert_eq!(field(&opened, "link_id"), Some("7"), "{opened}");
    assert!(opened.contains("203.0.113.7:50123"), "{opened}");
}
