//! The connection table seen from outside: `GET /connections`, `ferryd connections` (table,
//! JSON, a route's), `--close` through the control socket and who may use it, and the byte
//! accounting every test daemon is held to (see `common::Daemon`'s `Drop`), shown able to fail.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::skip::have;
use common::sshd::Sshd;
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

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A forwarder to `to` that passes the relay's close on to `to` at once but keeps its own side
/// toward the relay open until `release` is set: a build VM slow to close its end. It leaves a
/// connection whose client has closed half-closed for as long as the test needs to look at it
/// (sshd itself closes within a millisecond of reading the end).
fn slow_to_close(to: SocketAddr, release: Arc<AtomicBool>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for relay in listener.incoming() {
            let Ok(relay) = relay else { continue };
            let Ok(server) = TcpStream::connect(to) else {
                continue;
            };
            let (mut from_relay, mut to_server) = (relay.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from_relay, &mut to_server);
                let _ = to_server.shutdown(Shutdown::Write);
            });
            let release = release.clone();
            std::thread::spawn(move || {
                let (mut from_server, mut to_relay) = (server, relay);
                let _ = std::io::copy(&mut from_server, &mut to_relay);
                while !release.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = to_relay.shutdown(Shutdown::Write);
            });
        }
    });
    addr
}

/// The scenario with the real tools: an ssh session and an scp through the relay are
/// listed with their route, client, upstream and direction states, the bytes of both grow while
/// they run, the scp's upward direction shows half-closed once its client has closed (its
/// route's upstream is slow to close), a user who is neither root nor in the daemon's group may
/// list but not close (refused by the socket's mode, and by the daemon itself when the mode
/// would let them in), and root's `--close` ends the ssh session with a reset on both sides,
/// logged and counted as closed-by-admin.
#[test]
fn an_ssh_session_and_an_scp_are_listed_and_an_admin_closes_the_session() {
    let Some(sshd) = Sshd::start(&["setpriv"]) else {
        return;
    };
    let port = free_port();
    let files_port = free_port();
    let release = Arc::new(AtomicBool::new(false));
    let slow = slow_to_close(local(sshd.port), release.clone());
    let daemon = Daemon::start(&format!(
        "{}\n[[route]]\nname = \"files\"\nlisten = \"127.0.0.1:{files_port}\"\nupstream = \"{slow}\"\n",
        config_one_route(port, local(sshd.port), "", "")
    ));

    // An interactive session: `cat` echoes each line back.
    let mut ssh = sshd
        .client("ssh")
        .args(["-p", &port.to_string(), "root@127.0.0.1", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ssh");
    let mut to_ssh = ssh.stdin.take().expect("stdin");
    let mut from_ssh = BufReader::new(ssh.stdout.take().expect("stdout"));
    let mut echo = |line: &str| -> std::io::Result<String> {
        to_ssh.write_all(format!("{line}\n").as_bytes())?;
        to_ssh.flush()?;
        let mut back = String::new();
        from_ssh.read_line(&mut back)?;
        Ok(back)
    };
    assert_eq!(echo("hello").expect("the session echoes"), "hello\n");

    let first = listing(&daemon);
    assert_eq!(first.len(), 1, "{first:#?}");
    let session = &first[0];
    let ssh_id = session["id"].as_u64().expect("an id");
    assert_eq!(session["route"], "test");
    assert!(
        session["client"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{session}"
    );
    assert_eq!(session["upstream"], local(sshd.port).to_string());
    assert_eq!(session["proxied_client"], Value::Null);
    let (up_then, down_then) = (
        session["bytes_up"].as_u64().unwrap(),
        session["bytes_down"].as_u64().unwrap(),
    );
    assert!(up_then > 0 && down_then > 0, "{session}");
    for direction in ["up", "down"] {
        assert_eq!(session[direction]["state"], "open", "{session}");
        let mode = session[direction]["mode"].as_str().unwrap();
        assert!(mode == "copy" || mode == "splice", "{session}");
        assert!(session[direction]["held_bytes"].is_u64(), "{session}");
    }
    // The default idle_timeout (2 h) is counting down from the last byte.
    let deadline = session["deadline_s"].as_f64().expect("a deadline");
    assert!(deadline > 7000.0 && deadline <= 7200.0, "{session}");
    assert!(session["age_s"].as_f64().unwrap() >= session["idle_s"].as_f64().unwrap());
    let opened = daemon.expect_log("connection opened", Duration::from_secs(5));
    assert_eq!(
        field(&opened, "conn"),
        Some(ssh_id.to_string().as_str()),
        "{opened}"
    );

    // The session's counts grow with what it sends and gets back.
    assert_eq!(echo("more").expect("the session echoes"), "more\n");
    let grown = wait_listing(&daemon, "the session's counts growing", |all| {
        let c = find(all, ssh_id)?;
        (c["bytes_up"].as_u64()? > up_then && c["bytes_down"].as_u64()? > down_then).then(|| c.clone())
    });
    assert_eq!(grown["up"]["state"], "open", "{grown}");

    // An upload of 4 MiB at 1 MB/s (scp's own limit): long enough to be seen moving.
    let data: Vec<u8> = (0..4 * 1024 * 1024)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let source = sshd.dir.path().join("upload.bin");
    let target = sshd.dir.path().join("arrived.bin");
    std::fs::write(&source, &data).unwrap();
    let scp = sshd
        .client("scp")
        .args(["-q", "-l", "8000", "-P", &files_port.to_string()])
        .arg(&source)
        .arg(format!("root@127.0.0.1:{}", target.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn scp");
    let (scp_id, before) = wait_listing(&daemon, "the scp moving bytes", |all| {
        let scp = all.iter().find(|c| c["id"] != ssh_id)?;
        let up = scp["bytes_up"].as_u64()?;
        (up > 64 * 1024).then(|| (scp["id"].as_u64().unwrap(), up))
    });
    assert!(scp_id > ssh_id, "ids grow with admission");
    std::thread::sleep(Duration::from_millis(700));
    let all = listing(&daemon);
    // Oldest first.
    assert_eq!(all[0]["id"], ssh_id, "{all:#?}");
    let moving = find(&all, scp_id).expect("the scp is still listed");
    let now = moving["bytes_up"].as_u64().unwrap();
    assert!(now > before, "the scp's bytes grow: {before} then {now}");
    assert_eq!(moving["route"], "files", "{moving}");
    assert!(
        moving["client"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{moving}"
    );
    assert_eq!(moving["upstream"], slow.to_string(), "{moving}");
    for direction in ["up", "down"] {
        assert_eq!(moving[direction]["state"], "open", "{moving}");
    }
    let files_only = connections(&daemon, &[], &["--route", "files", "--json"]);
    let files_only: Vec<Value> = serde_json::from_slice(&files_only.stdout).expect("JSON");
    assert_eq!(files_only.len(), 1, "{files_only:#?}");
    assert_eq!(files_only[0]["id"], scp_id);

    // The table a person reads, and a route's view.
    let table = connections(&daemon, &[], &[]);
    let shown = String::from_utf8_lossy(&table.stdout).to_string();
    assert!(table.status.success(), "{}", text(&table));
    assert!(shown.starts_with("ID  ROUTE"), "{shown}");
    assert!(shown.contains("2 connections"), "{shown}");
    let ids: Vec<&str> = shown
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(&ids[..2], [ssh_id.to_string(), scp_id.to_string()], "{shown}");
    assert!(shown.contains(&local(sshd.port).to_string()), "{shown}");
    assert!(shown.contains("files"), "{shown}");
    let unknown = connections(&daemon, &[], &["--route", "nope"]);
    assert!(!unknown.status.success());
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("no route is named \"nope\""),
        "{}",
        text(&unknown)
    );

    let scp = scp.wait_with_output().unwrap();
    assert!(
        scp.status.success(),
        "scp: {}",
        String::from_utf8_lossy(&scp.stderr)
    );
    assert!(
        std::fs::read(&target).unwrap() == data,
        "the file changed on the way"
    );
    // scp has exited and its socket is closed; the build VM's end is still open: the upward
    // direction is half-closed, the fin timer counting, the downward one open.
    let half = wait_listing(&daemon, "the scp's upward direction half-closed", |all| {
        let c = find(all, scp_id)?;
        (c["up"]["state"] == "half-closed").then(|| c.clone())
    });
    assert_eq!(half["down"]["state"], "open", "{half}");
    assert!(half["bytes_up"].as_u64().unwrap() > data.len() as u64, "{half}");
    release.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(5);
    let scp_closed = loop {
        let closed = daemon
            .log_lines("connection closed")
            .into_iter()
            .find(|l| field(l, "conn") == Some(scp_id.to_string().as_str()));
        if let Some(line) = closed {
            break line;
        }
        assert!(
            Instant::now() < deadline,
            "no closed line for {scp_id}: {}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(field(&scp_closed, "end"), Some("eof"), "{scp_closed}");

    // Someone who is neither root nor in the daemon's group may look, not close.
    let nobody = ["--reuid=65534", "--regid=65534", "--clear-groups"];
    let look = connections(&daemon, &nobody, &["--json"]);
    assert!(
        look.status.success(),
        "listing needs no privilege: {}",
        text(&look)
    );
    let refused = connections(&daemon, &nobody, &["--close", &ssh_id.to_string()]);
    assert!(!refused.status.success(), "{}", text(&refused));
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        why.contains("permission denied") && why.contains("group"),
        "{why}"
    );
    assert_eq!(echo("still-here").expect("the session lives on"), "still-here\n");
    // The daemon checks who is asking too (SO_PEERCRED), should the socket's mode ever let an
    // outsider reach it.
    let socket = daemon.control_socket.clone().expect("a control socket");
    set_mode(&socket, 0o666);
    let reached = connections(&daemon, &nobody, &["--close", &ssh_id.to_string()]);
    set_mode(&socket, 0o660);
    assert!(!reached.status.success(), "{}", text(&reached));
    let why = String::from_utf8_lossy(&reached.stderr);
    assert!(
        why.contains("only root, uid") && why.contains("may use the control socket"),
        "{why}"
    );
    daemon.expect_log("control socket: refused a client", Duration::from_secs(5));
    assert_eq!(echo("still-here").expect("the session lives on"), "still-here\n");
    // HTTP on the health port cannot close anything: only GET and HEAD, no such path.
    let post = daemon
        .health_request(&format!("POST /connections/{ssh_id}/close HTTP/1.0\r\n\r\n"))
        .unwrap();
    assert!(post.starts_with("HTTP/1.0 404"), "{post}");

    // Root closes it: both sides reset, logged and counted.
    let close = connections(&daemon, &[], &["--close", &ssh_id.to_string()]);
    assert!(close.status.success(), "{}", text(&close));
    assert!(
        String::from_utf8_lossy(&close.stdout).contains("both sides reset"),
        "{}",
        text(&close)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = ssh.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "ssh still runs after --close");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut ssh_err = String::new();
    ssh.stderr.take().unwrap().read_to_string(&mut ssh_err).unwrap();
    assert!(!status.success(), "ssh ended in error: {status:?}");
    // ssh reports the reset as the read (ECONNRESET) or the write (EPIPE: a socket that only got
    // a FIN still takes writes) that met it.
    assert!(
        ssh_err.contains("reset") || ssh_err.contains("Broken pipe"),
        "ssh saw a reset: {ssh_err}"
    );
    let line = daemon.expect_log("end=\"closed-by-admin\"", Duration::from_secs(5));
    assert_eq!(field(&line, "conn"), Some(ssh_id.to_string().as_str()), "{line}");
    assert!(line.contains("closed by uid 0"), "{line}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !sshd.log_text().contains("reset") {
        assert!(
            Instant::now() < deadline,
            "sshd did not see a reset: {:?}",
            sshd.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let metrics = daemon.health_request("GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    assert!(
        metrics.contains("ferryd_connection_ends_total{route=\"test\",end=\"closed-by-admin\"} 1"),
        "{metrics}"
    );
    assert!(listing(&daemon).is_empty());
    // An id that is gone is named as such.
    let again = connections(&daemon, &[], &["--close", &ssh_id.to_string()]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains(&format!("no relayed connection has id {ssh_id}")),
        "{}",
        text(&again)
    );
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
        let packaged = dir.path().join("ferryd.toml");
        std::fs::copy(&daemon.config, &packaged).unwrap();
        std::os::unix::fs::chown(&packaged, Some(0), Some(gid)).unwrap();
        set_mode(&packaged, 0o640);
        let outsider = ["--reuid=65534", "--regid=65534", "--clear-groups"];
        let refused = connections_with(&packaged, &outsider, &["--close", &half_id.to_string()]);
        assert!(!refused.status.success(), "{}", text(&refused));
        let why = String::from_utf8_lossy(&refused.stderr);
        assert!(
            why.contains("Permission denied")
                && why.contains(&format!("only root and members of group {gid}")),
            "{why}"
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
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("cannot reach the daemon's control socket"),
        "{}",
        text(&refused)
    );
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
