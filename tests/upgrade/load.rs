//! Live upgrades under load: ten in a row with every kind of connection in flight, a binary
//! that cannot take over, a copy buffer stuck on a slow reader, a SIGUSR2 during an upgrade.

use super::*;

#[test]
fn ten_upgrades_under_load_move_every_connection_and_refuse_none() {
    let upstream = role_upstream();
    let port = free_port();
    let listen = local(port);
    let installed = Installed::new();
    let config = config_one_route(
        port,
        upstream.addr,
        "",
        &format!(
            "idle_timeout = \"{}s\"\nfin_timeout = \"30s\"",
            IDLE_TIMEOUT.as_secs()
        ),
    );
    let daemon = installed.start(&config);
    let pid = daemon.pid();

    let tally = Arc::new(Tally::default());
    // 1 GiB up: the upstream checks every byte and answers with the count.
    let up = {
        let tally = tally.clone();
        std::thread::spawn(move || {
            let mut stream = connect(listen, "SINK", &tally);
            paced_send(&Pattern::new(1), &mut stream, GIB, BULK_SECONDS).expect("send 1 GiB up");
            stream.shutdown(Shutdown::Write).expect("FIN");
            let mut answer = String::new();
            stream.read_to_string(&mut answer).expect("the upstream's answer");
            tally.add(GIB as usize, answer.len());
            answer
        })
    };
    // 1 GiB down, checked here.
    let down = {
        let tally = tally.clone();
        std::thread::spawn(move || {
            let mut stream = connect(listen, &format!("SOURCE {GIB}"), &tally);
            let got = Pattern::new(2).verify(&mut stream);
            tally.add(0, *got.as_ref().unwrap_or(&0) as usize);
            got
        })
    };
    // A reader that all but stops: the upstream fills every buffer on the way, so each upgrade
    // finds bytes read from the upstream and not yet written to the client, which must cross in
    // a pipe. It reads everything once the upgrades are over. Until then it takes 1 MiB every
    // half second: a reader that stops altogether is silent, and the 4 s idle timeout rightly
    // cuts it when ten upgrades take longer than the 2 s left (they do on a busy machine).
    let stalled_total: u64 = 48 << 20;
    let release = Arc::new(AtomicBool::new(false));
    let stalled = {
        let mut reader = Trickle {
            inner: connect(listen, &format!("BLAST {stalled_total}"), &tally),
            go: release.clone(),
        };
        std::thread::spawn(move || Pattern::new(4).verify(&mut reader))
    };
    // A half-closed connection: the client is done, the upstream goes on sending for a while.
    let half = {
        let tally = tally.clone();
        std::thread::spawn(move || {
            let mut stream = connect(listen, &format!("HALF {}", 64 << 20), &tally);
            stream.write_all(&[7u8; 1 << 20]).expect("send");
            stream.shutdown(Shutdown::Write).expect("FIN");
            let got = Pattern::new(3).verify(&mut stream);
            tally.add(1 << 20, *got.as_ref().unwrap_or(&0) as usize);
            got
        })
    };
    // Interactive: an exchange every 10 ms until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let interactive = {
        let (stop, tally) = (stop.clone(), tally.clone());
        std::thread::spawn(move || -> Result<u64, String> {
            let mut stream = connect(listen, "ECHO", &tally);
            stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut exchanges = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let message = format!("keystroke {exchanges}\n");
                common::echo_roundtrip(&mut stream, message.as_bytes())
                    .map_err(|e| format!("exchange {exchanges}: {e}"))?;
                tally.add(message.len(), message.len());
                exchanges += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(exchanges)
        })
    };
    // Connects in a loop, 50 a second, each exchanging a message.
    let failures = Arc::new(AtomicU64::new(0));
    let connects = Arc::new(AtomicU64::new(0));
    let looper: JoinHandle<Vec<String>> = {
        let (stop, failures, connects, tally) =
            (stop.clone(), failures.clone(), connects.clone(), tally.clone());
        std::thread::spawn(move || {
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let n = connects.fetch_add(1, Ordering::Relaxed);
                let message = format!("connect {n}");
                let attempt = (|| -> io::Result<()> {
                    let mut stream = TcpStream::connect(listen)?;
                    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
                    stream.write_all(b"ECHO\n")?;
                    common::echo_roundtrip(&mut stream, message.as_bytes())?;
                    stream.shutdown(Shutdown::Write)?;
                    let mut rest = Vec::new();
                    stream.read_to_end(&mut rest)?;
                    Ok(())
                })();
                match attempt {
                    Ok(()) => tally.add(5 + message.len(), message.len()),
                    Err(e) => {
                        failures.fetch_add(1, Ordering::Relaxed);
                        errors.push(format!("connect {n}: {e}"));
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            errors
        })
    };
    // Idle: one exchange, then silence. It is due to close IDLE_TIMEOUT after that exchange.
    let mut idle = connect(listen, "ECHO", &tally);
    common::echo_roundtrip(&mut idle, b"once").expect("idle connection's exchange");
    tally.add(4, 4);
    let idle_since = Instant::now();
    let idle_watch = std::thread::spawn(move || {
        idle.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = [0u8; 16];
        let end = idle.read(&mut buf);
        (idle_since.elapsed(), end.map_err(|e| e.to_string()))
    });

    // Half the idle timeout later, ten upgrades, 200 ms apart, each to a fresh copy of the file.
    std::thread::sleep(IDLE_TIMEOUT / 2);
    let mut reports = Vec::new();
    for _ in 0..10 {
        installed.replace_with(Path::new(bin()));
        let out = upgrade(&daemon);
        assert!(
            out.status.success(),
            "ferryd upgrade failed: {}\nlog:\n{}",
            String::from_utf8_lossy(&out.stderr),
            daemon.log()
        );
        reports.push(String::from_utf8_lossy(&out.stdout).trim().to_string());
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("{}", reports.join("\n"));

    // The stalled reader reads now: every byte, in order.
    release.store(true, Ordering::Relaxed);
    let got = stalled
        .join()
        .expect("stalled reader thread")
        .unwrap_or_else(|e| panic!("the stalled connection's bytes, in order: {e}\n{}", daemon.log()));
    assert_eq!(got, stalled_total);
    tally.add(0, got as usize);
    let carried = carried(&daemon);
    assert!(
        carried.iter().any(|bytes| *bytes > 0),
        "no hand-over carried bytes in a pipe: {carried:?}"
    );

    let answer = up.join().expect("up thread");
    assert_eq!(answer.trim(), format!("ok {GIB}"), "log:\n{}", daemon.log());
    let got = down.join().expect("down thread").expect("1 GiB down, in order");
    assert_eq!(got, GIB);
    let got = half
        .join()
        .expect("half thread")
        .expect("the half-closed connection completes");
    assert_eq!(got, 64 << 20);
    let (idle_for, idle_end) = idle_watch.join().expect("idle thread");
    assert_eq!(idle_end, Ok(0), "the idle connection ends with a FIN");
    // Upgrades ran from IDLE_TIMEOUT/2 for several seconds: a deadline renewed by any of them
    // would land well past the original one.
    assert!(
        idle_for >= IDLE_TIMEOUT - Duration::from_millis(100)
            && idle_for < IDLE_TIMEOUT + Duration::from_millis(1500),
        "the idle connection closed after {idle_for:?}, not at its original deadline ({IDLE_TIMEOUT:?})"
    );
    stop.store(true, Ordering::Relaxed);
    let exchanges = interactive
        .join()
        .expect("interactive thread")
        .expect("every keystroke echoed");
    let errors = looper.join().expect("connect loop");
    assert!(
        errors.is_empty(),
        "{} of {} connects failed: {errors:?}",
        failures.load(Ordering::Relaxed),
        connects.load(Ordering::Relaxed)
    );

    assert_eq!(daemon.pid(), pid);
    let exe = std::fs::metadata(format!("/proc/{pid}/exe")).expect("the daemon's exe");
    let file = std::fs::metadata(installed.path()).expect("the binary");
    assert_eq!(exe.ino(), file.ino(), "/proc/PID/exe is the file now at the path");
    let status = status(&daemon);
    assert_eq!(status["pid"], pid);
    assert_eq!(status["upgrade"]["completed"], 10, "{status}");
    let route = &status["routes"][0];
    let bytes_up = route["bytes_up"].as_u64().unwrap_or(0);
    let bytes_down = route["bytes_down"].as_u64().unwrap_or(0);
    assert!(
        bytes_up >= GIB && bytes_down >= GIB + (64 << 20),
        "counters restarted: {route}"
    );
    let relayed = route["relayed"].as_u64().unwrap_or(0);
    assert!(
        relayed >= connects.load(Ordering::Relaxed),
        "relayed {relayed}: {route}"
    );
    println!(
        "{exchanges} interactive exchanges, {} connects, {relayed} relayed",
        connects.load(Ordering::Relaxed)
    );
}

#[test]
fn a_binary_that_cannot_take_over_changes_nothing() {
    let upstream = Upstream::echo();
    let port = free_port();
    let installed = Installed::new();
    let daemon = installed.start(&config_one_route(port, upstream.addr, "", ""));
    let pid = daemon.pid();
    let mut session = TcpStream::connect(local(port)).expect("connect");
    session.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    common::echo_roundtrip(&mut session, b"before").expect("exchange before");

    let cases = [
        (
            "#!/bin/sh\necho 'handover versions: 99'\n",
            "reads handover versions [99]",
        ),
        (
            "#!/bin/sh\necho 'ferryd: the file is broken' >&2\nexit 1\n",
            "the file is broken",
        ),
        (
            "#!/bin/sh\necho 'ferryd 0.1.0'\n",
            "did not list the handover versions",
        ),
    ];
    for (attempt, (script, reason)) in cases.iter().enumerate() {
        let stand_in = installed.dir.path().join("stand-in");
        std::fs::write(&stand_in, script).unwrap();
        std::fs::set_permissions(&stand_in, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        installed.replace_with(&stand_in);
        let out = upgrade(&daemon);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "upgrade to a stand-in succeeded: {stderr}");
        assert!(stderr.contains(reason), "expected {reason:?} in: {stderr}");
        common::echo_roundtrip(&mut session, format!("after {attempt}").as_bytes())
            .expect("the session goes on in the old daemon");
        assert_eq!(daemon.pid(), pid);
        let status = status(&daemon);
        assert_eq!(status["upgrade"]["completed"], 0);
        assert_eq!(status["upgrade"]["attempts"], attempt as u64 + 1);
        assert_eq!(status["upgrade"]["last"]["ok"], false);
    }
    daemon.expect_nth_log("live upgrade refused; nothing changed", 3, Duration::from_secs(5));
    // `ferryd status` says so too.
    let summary = summary(&daemon);
    assert!(
        summary.contains("upgrade:  0 live upgrade(s) of 3 asked for")
            && summary.contains("FAILED (the binary at"),
        "{summary}"
    );
    // A new connection is still served by the old daemon.
    let mut fresh = TcpStream::connect(local(port)).expect("connect after the refusals");
    common::echo_roundtrip(&mut fresh, b"still here").expect("a new connection is relayed");
}

/// With splice off, a direction stuck writing to a reader that does not read holds the rest of a
/// copy buffer in ferryd's memory; an upgrade carries it in the hand-over document, and the new
/// image writes it out before anything newer.
#[test]
fn a_copy_buffer_stuck_on_a_slow_reader_crosses_the_upgrade() {
    let upstream = role_upstream();
    let port = free_port();
    let listen = local(port);
    let installed = Installed::new();
    let daemon = installed.start(&config_one_route(port, upstream.addr, "splice = false", ""));
    let tally = Tally::default();
    let total: u64 = 32 << 20;
    let mut stalled = connect(listen, &format!("BLAST {total}"), &tally);
    // Let every buffer on the way fill.
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..3 {
        installed.replace_with(Path::new(bin()));
        let out = upgrade(&daemon);
        assert!(
            out.status.success(),
            "ferryd upgrade failed: {}\nlog:\n{}",
            String::from_utf8_lossy(&out.stderr),
            daemon.log()
        );
    }
    let got = Pattern::new(4)
        .verify(&mut stalled)
        .expect("every byte, in order");
    assert_eq!(got, total);
    let carried = carried(&daemon);
    assert!(
        carried.iter().all(|bytes| *bytes > 0),
        "each hand-over found a copy buffer's rest to carry: {carried:?}\n{}",
        daemon.log()
    );
}

/// A second SIGUSR2 that arrives while an upgrade is under way is never fatal: it waits, blocked,
/// across the exec, and the new image applies it as the next upgrade.
#[test]
fn a_sigusr2_during_an_upgrade_is_applied_after_it() {
    let upstream = Upstream::echo();
    let port = free_port();
    let installed = Installed::new();
    let daemon = installed.start(&config_one_route(port, upstream.addr, "", ""));
    let mut session = TcpStream::connect(local(port)).expect("connect");
    session.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    common::echo_roundtrip(&mut session, b"before").expect("exchange before");
    // Two in a row: the second lands while the first is checking, parking or crossing.
    daemon.signal(nix::sys::signal::Signal::SIGUSR2);
    std::thread::sleep(Duration::from_millis(5));
    daemon.signal(nix::sys::signal::Signal::SIGUSR2);
    // If it never comes: the second SIGUSR2 was lost or fatal.
    daemon.expect_nth_log("live upgrade complete", 2, Duration::from_secs(20));
    common::echo_roundtrip(&mut session, b"after").expect("the session goes on");
    let status = status(&daemon);
    assert_eq!(status["pid"], daemon.pid());
    assert_eq!(status["upgrade"]["completed"], 2, "{status}");
    let summary = summary(&daemon);
    assert!(
        summary.contains("upgrade:  2 live upgrade(s) of 2 asked for")
            && summary.contains("connection(s) moved, none reset, pause"),
        "{summary}"
    );
}
