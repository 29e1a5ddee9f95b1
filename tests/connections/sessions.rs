//! The scenario with the real tools (sshd, ssh, scp): two sessions listed, followed and
//! one ended on purpose, and who may do it.

use super::*;

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
    assert!(opened.contains(" INFO "), "{opened}");
    assert_eq!(field(&opened, "route"), Some("test"), "{opened}");
    assert_eq!(field(&opened, "client"), session["client"].as_str(), "{opened}");
    assert_eq!(
        field(&opened, "upstream"),
        Some(local(sshd.port).to_string().as_str()),
        "{opened}"
    );
    assert!(
        field(&opened, "dial_ms").is_some_and(|ms| ms.parse::<u64>().is_ok()),
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
    // A later listing, once the scp's count has moved on (scp is limited to 1 MB/s).
    let all = wait_listing(&daemon, "the scp's bytes growing", |all| {
        let now = find(all, scp_id)?["bytes_up"].as_u64()?;
        (now > before).then(|| all.to_vec())
    });
    // Oldest first.
    assert_eq!(all[0]["id"], ssh_id, "{all:#?}");
    let moving = find(&all, scp_id).expect("the scp is still listed");
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
    fails_saying(&unknown, &["no route is named \"nope\""]);

    let scp = scp.wait_with_output().unwrap();
    assert_copied(&scp, &target, &data);
    // scp has exited and its socket is closed; the build VM's end is still open: the upward
    // direction is half-closed, the fin timer counting, the downward one open.
    let half = wait_listing(&daemon, "the scp's upward direction half-closed", |all| {
        let c = find(all, scp_id)?;
        (c["up"]["state"] == "half-closed").then(|| c.clone())
    });
    assert_eq!(half["down"]["state"], "open", "{half}");
    assert!(half["bytes_up"].as_u64().unwrap() > data.len() as u64, "{half}");
    release.store(true, Ordering::SeqCst);
    let scp_closed = until(
        || {
            daemon
                .log_lines("connection closed")
                .into_iter()
                .find(|l| field(l, "conn") == Some(scp_id.to_string().as_str()))
        },
        Duration::from_secs(5),
    )
    .unwrap_or_else(|| panic!("no closed line for {scp_id}: {}", daemon.log()));
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
    fails_saying(&refused, &["permission denied", "group"]);
    assert_eq!(echo("still-here").expect("the session lives on"), "still-here\n");
    // The daemon checks who is asking too (SO_PEERCRED), should the socket's mode ever let an
    // outsider reach it.
    let socket = daemon.control_socket.clone().expect("a control socket");
    set_mode(&socket, 0o666);
    let reached = connections(&daemon, &nobody, &["--close", &ssh_id.to_string()]);
    set_mode(&socket, 0o660);
    fails_saying(&reached, &["only root, uid", "may use the control socket"]);
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
    let status =
        until(|| ssh.try_wait().unwrap(), Duration::from_secs(10)).expect("ssh still runs after --close");
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
    until(
        || sshd.log_text().contains("reset").then_some(()),
        Duration::from_secs(5),
    )
    .unwrap_or_else(|| panic!("sshd did not see a reset: {:?}", sshd.log_text()));
    let metrics = daemon.health_request("GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    assert!(
        metrics.contains("ferryd_connection_ends_total{route=\"test\",end=\"closed-by-admin\"} 1"),
        "{metrics}"
    );
    assert!(listing(&daemon).is_empty());
    // An id that is gone is named as such.
    let again = connections(&daemon, &[], &["--close", &ssh_id.to_string()]);
    fails_saying(&again, &[&format!("no relayed connection has id {ssh_id}")]);
}
