//! Live upgrades under production conditions that go wrong: stalled readers as an ordinary
//! user (the pipe budget), a hand-over that fails after the check, an exec that fails, a new
//! image that refuses the document.

use super::*;

/// Clients that read nothing while their upstreams send without pause, with the daemon under an
/// ordinary uid, where the kernel's per-user pipe budget applies: every byte read from an
/// upstream and not yet written to its client must cross the upgrade, whatever the budget left.
fn stalled_readers_cross(splice: bool) {
    const CLIENTS: usize = 100;
    let total: u64 = 8 << 20;
    let upstream = role_upstream();
    let port = free_port();
    let installed = Installed::new();
    let top = if splice { "" } else { "splice = false" };
    let daemon = installed.start(&config_one_route(port, upstream.addr, top, ""));
    let tally = Tally::default();
    let streams: Vec<TcpStream> = (0..CLIENTS)
        .map(|_| connect(local(port), &format!("BLAST {total}"), &tally))
        .collect();
    // Let every buffer on the way fill: the upstreams block, ferryd holds bytes for each client.
    std::thread::sleep(Duration::from_secs(2));
    installed.replace_with(Path::new(bin()));
    let out = upgrade(&daemon);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    let readers: Vec<_> = streams
        .into_iter()
        .map(|mut stream| std::thread::spawn(move || Pattern::new(4).verify(&mut stream)))
        .collect();
    let results: Vec<io::Result<u64>> = readers
        .into_iter()
        .map(|r| r.join().expect("reader thread"))
        .collect();
    let short: Vec<String> = results
        .iter()
        .enumerate()
        .filter(|(_, r)| !matches!(r, Ok(n) if *n == total))
        .map(|(i, r)| format!("#{i}: {r:?}"))
        .collect();
    assert!(
        short.is_empty(),
        "{} of {CLIENTS} connections lost bytes at the upgrade: {short:?}\nupgrade said: {stdout}{stderr}\nlog:\n{}",
        short.len(),
        daemon
            .log_lines("reset")
            .into_iter()
            .take(5)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(out.status.success(), "ferryd upgrade failed: {stderr}");
    assert!(
        stdout.contains(&format!("{CLIENTS} connection(s) moved, none reset")),
        "{stdout}"
    );
}

#[test]
fn stalled_readers_cross_an_upgrade_as_an_ordinary_user_with_splice() {
    stalled_readers_cross(true);
}

#[test]
fn stalled_readers_cross_an_upgrade_as_an_ordinary_user_copying() {
    stalled_readers_cross(false);
}

/// Sets the soft open-file limit of process `pid`, as its own user (which needs no capability,
/// where root without CAP_SYS_RESOURCE could not), with util-linux's prlimit.
fn set_nofile(pid: i32, limit: u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the daemon's status");
    let uid: u32 = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().next()?.parse().ok())
        .expect("the daemon's uid");
    let mut command = Command::new("prlimit");
    command
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={limit}:"));
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // The harness gives the daemon a group of the same number (see `common::unprivileged`).
        std::os::unix::process::CommandExt::uid(&mut command, uid);
        std::os::unix::process::CommandExt::gid(&mut command, uid);
    }
    let out = command.output().expect("run prlimit");
    assert!(
        out.status.success(),
        "prlimit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The hand-over fails after the check passed: the document cannot be created (the open-file
/// limit drops to the descriptors open). The daemon takes every listener and connection back
/// and goes on relaying; `ferryd upgrade` fails with the reason; the next upgrade works.
#[test]
fn a_hand_over_that_fails_after_the_check_keeps_every_connection() {
    let upstream = Upstream::echo();
    let port = free_port();
    let installed = Installed::new();
    let daemon = installed.start_with(&config_one_route(port, upstream.addr, "", ""), |command| {
        command.env("FERRYD_TEST_FAULTS", "handover-emfile");
    });
    let pid = daemon.pid();
    let mut sessions: Vec<TcpStream> = (0..5).map(|_| session(port)).collect();
    installed.replace_with(Path::new(bin()));
    let asking = Command::new(bin())
        .args(["upgrade", "--timeout", "20", "--config"])
        .arg(&daemon.config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run ferryd upgrade");
    // With no descriptor to spare, the health endpoint cannot take `ferryd upgrade`'s requests
    // either: free some once the daemon has taken everything back, as an operator would.
    daemon.expect_log("live upgrade failed after the check", Duration::from_secs(10));
    for (i, session) in sessions.iter_mut().enumerate() {
        common::echo_roundtrip(session, format!("while short of descriptors {i}").as_bytes()).unwrap_or_else(
            |e| {
                panic!(
                    "session {i} did not survive the failed hand-over: {e}\n{}",
                    daemon.log()
                )
            },
        );
    }
    set_nofile(pid, 4096);
    let out = asking.wait_with_output().expect("ferryd upgrade's outcome");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the upgrade was reported done: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr.contains("cannot write the hand-over document")
            && stderr.contains("Too many open files")
            && stderr.contains("5 connection(s) moved, none reset"),
        "{stderr}\n{}",
        daemon.log()
    );
    for (i, session) in sessions.iter_mut().enumerate() {
        common::echo_roundtrip(session, format!("after {i}").as_bytes()).unwrap_or_else(|e| {
            panic!(
                "session {i} did not survive the failed hand-over: {e}\n{}",
                daemon.log()
            )
        });
    }
    assert_eq!(daemon.pid(), pid);
    let status = status(&daemon);
    assert_eq!(status["upgrade"]["last"]["ok"], false, "{status}");
    assert_eq!(status["upgrade"]["completed"], 0, "{status}");
    // With descriptors to be had again, new connections are served and the next upgrade works.
    let mut fresh = session(port);
    let out = upgrade(&daemon);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        daemon.log()
    );
    common::echo_roundtrip(&mut fresh, b"after the second").expect("the fresh session goes on");
    for session in &mut sessions {
        common::echo_roundtrip(session, b"after the second").expect("a session goes on");
    }
}

/// The new binary passes the check, but the exec fails (ETXTBSY: the file is held open for
/// writing, as a package manager still writing it would). Twice in a row: each time the daemon
/// takes everything back; then a good binary takes over.
#[test]
fn an_exec_that_fails_twice_costs_nothing() {
    let upstream = Upstream::echo();
    let port = free_port();
    let installed = Installed::new();
    let daemon = installed.start(&config_one_route(port, upstream.addr, "", ""));
    let pid = daemon.pid();
    let mut session = session(port);
    // A stand-in that answers the check, leaving behind (outside the check's process group, so it
    // outlives the check) a process that holds the file open for writing for a few seconds.
    let stand_in = installed.dir.path().join("stand-in");
    std::fs::write(
        &stand_in,
        // It answers once the holder has the file open (its descriptor 3 is the file), for at
        // most 5 s: a fixed pause lost that race on a loaded machine.
        "#!/bin/sh\nsetsid sh -c 'exec 3>>\"$0\"; sleep 3' \"$0\" </dev/null >/dev/null 2>&1 &\nself=$(readlink -f \"$0\"); i=0\nwhile [ \"$(readlink /proc/$!/fd/3 2>/dev/null)\" != \"$self\" ] && [ $i -lt 250 ]; do sleep 0.02; i=$((i+1)); done\necho 'handover versions: 1 2'\n",
    )
    .unwrap();
    std::fs::set_permissions(&stand_in, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    for attempt in 0..2 {
        installed.replace_with(&stand_in);
        // Writable by the daemon's user, for the process the check leaves behind to hold open.
        std::fs::set_permissions(
            installed.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .unwrap();
        let out = upgrade(&daemon);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "attempt {attempt}: reported done");
        assert!(
            stderr.contains("cannot exec")
                && stderr.contains("Text file busy")
                && stderr.contains("1 connection(s) moved, none reset"),
            "attempt {attempt}: {stderr}\n{}",
            daemon.log()
        );
        common::echo_roundtrip(&mut session, format!("after {attempt}").as_bytes()).unwrap_or_else(|e| {
            panic!(
                "attempt {attempt}: the session did not survive: {e}\n{}",
                daemon.log()
            )
        });
        let mut fresh = TcpStream::connect(local(port)).expect("connect after a failed exec");
        common::echo_roundtrip(&mut fresh, b"new").expect("a new connection is relayed");
    }
    // Let the holders go before the real binary is put in place.
    std::thread::sleep(Duration::from_secs(3));
    installed.replace_with(Path::new(bin()));
    let out = upgrade(&daemon);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    common::echo_roundtrip(&mut session, b"after the good one").expect("the session goes on");
    assert_eq!(daemon.pid(), pid);
    let status = status(&daemon);
    assert_eq!(status["upgrade"]["completed"], 1, "{status}");
    assert_eq!(status["upgrade"]["attempts"], 3, "{status}");
}

/// The new image passes the check but refuses the document it is handed (here: it is pointed at
/// a descriptor that is not the document). It starts afresh: each moved connection is reset,
/// never ended with a FIN a peer could take for a complete stream; the listening sockets are kept
/// and claimed by their address (under systemd, whose fd store holds a copy, binding the port
/// again would fail for 30 s, then the start), so new connections are served at once; and
/// `ferryd upgrade` fails with the reason.
#[test]
fn a_new_image_that_refuses_the_document_resets_and_serves_on() {
    let upstream = Upstream::echo();
    let installed = Installed::new();
    let passed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = passed.local_addr().unwrap().port();
    let daemon = installed.start_passed(&config_one_route(port, upstream.addr, "", ""), &passed, "test");
    let mut session = session(port);
    let real = installed.dir.path().join("ferryd.real");
    std::fs::copy(bin(), &real).expect("copy the binary");
    let stand_in = installed.dir.path().join("stand-in");
    std::fs::write(
        &stand_in,
        format!(
            "#!/bin/sh\ncase \"$1\" in handover-check) echo 'handover versions: 1 2';; *) FERRYD_HANDOVER_FD=999 exec {} \"$@\";; esac\n",
            real.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&stand_in, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    installed.replace_with(&stand_in);
    let out = upgrade(&daemon);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "reported done: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr.contains("refused the hand-over"),
        "{stderr}\n{}",
        daemon.log()
    );
    let mut buf = [0u8; 16];
    let end = session.read(&mut buf);
    assert_eq!(
        end.map_err(|e| e.kind()),
        Err(io::ErrorKind::ConnectionReset),
        "the moved session must be reset, not closed in order"
    );
    let mut fresh = TcpStream::connect(local(port)).expect("connect after the refusal");
    fresh.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    common::echo_roundtrip(&mut fresh, b"new").expect("a new connection is relayed");
    assert!(
        daemon.log_lines("cannot listen yet").is_empty()
            && !daemon.log_lines("using the socket handed over").is_empty(),
        "{}",
        daemon.log()
    );
}
