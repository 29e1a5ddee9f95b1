//! Live upgrade on loopback, without root: ferryd runs from a copy of its binary, the file is
//! replaced and `ferryd upgrade` asked for, while connections of every kind are in flight.

mod common;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{BIN, Daemon, Pattern, TempDir, Upstream, config_one_route, free_port, local};

const GIB: u64 = 1 << 30;
/// The bulk transfers are paced to last about this long, so that every upgrade happens while
/// they are under way.
const BULK_SECONDS: f64 = 6.0;
const IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// An upstream that serves a role named by the connection's first line: ECHO (echo until EOF),
/// SINK (read pattern bytes to EOF, check them, answer "ok n"), SOURCE n (send n pattern bytes,
/// paced, then close), BLAST n (send n pattern bytes as fast as the reader takes them), HALF n
/// (read to EOF, then send n pattern bytes over about 3 s, then close).
fn role_upstream() -> Upstream {
    Upstream::start(|stream| {
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut line = String::new();
        if reader.read_line(&mut line).is_err() {
            return;
        }
        let mut words = line.split_whitespace();
        let role = words.next().unwrap_or_default().to_string();
        let n: u64 = words.next().and_then(|n| n.parse().ok()).unwrap_or(0);
        let mut stream = stream;
        match role.as_str() {
            "ECHO" => {
                let mut buf = [0u8; 16 * 1024];
                loop {
                    match reader.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(m) => {
                            if stream.write_all(&buf[..m]).is_err() {
                                return;
                            }
                        }
                    }
                }
            }
            "SINK" => {
                let got = Pattern::new(1).verify(&mut reader);
                let answer = match got {
                    Ok(got) => format!("ok {got}\n"),
                    Err(e) => format!("bad {e}\n"),
                };
                let _ = stream.write_all(answer.as_bytes());
            }
            "SOURCE" => {
                let _ = paced_send(&Pattern::new(2), &mut stream, n, BULK_SECONDS);
            }
            "BLAST" => {
                let _ = Pattern::new(4).send(&mut stream, n);
            }
            "HALF" => {
                let mut sink = Vec::new();
                if reader.read_to_end(&mut sink).is_err() {
                    return;
                }
                let _ = paced_send(&Pattern::new(3), &mut stream, n, 3.0);
            }
            _ => {}
        }
    })
}

/// Sends `total` bytes of `pattern` spread over about `seconds`.
fn paced_send(pattern: &Pattern, stream: &mut impl Write, total: u64, seconds: f64) -> io::Result<()> {
    const STEP: u64 = 4 << 20;
    let started = Instant::now();
    let mut sent = 0;
    while sent < total {
        let n = STEP.min(total - sent);
        pattern.send_range(stream, sent, n)?;
        sent += n;
        let due = Duration::from_secs_f64(seconds * sent as f64 / total as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    Ok(())
}

/// Bytes each way through the relay, counted by the clients, to compare with ferryd's counters.
#[derive(Default)]
struct Tally {
    up: AtomicU64,
    down: AtomicU64,
}

impl Tally {
    fn add(&self, up: usize, down: usize) {
        self.up.fetch_add(up as u64, Ordering::Relaxed);
        self.down.fetch_add(down as u64, Ordering::Relaxed);
    }
}

fn connect(listen: SocketAddr, role: &str, tally: &Tally) -> TcpStream {
    let mut stream = TcpStream::connect(listen).expect("connect to ferryd");
    let line = format!("{role}\n");
    stream.write_all(line.as_bytes()).expect("role line");
    tally.add(line.len(), 0);
    stream
}

/// The bytes ferryd carried in pipes at each hand-over, from its log.
fn carried(daemon: &Daemon) -> Vec<u64> {
    daemon
        .log_lines("handing over to the binary")
        .iter()
        .filter_map(|line| common::field(line, "carried_bytes")?.parse().ok())
        .collect()
}

/// ferryd started from a copy of its binary at a temporary path.
struct Installed {
    dir: TempDir,
}

impl Installed {
    fn new() -> Installed {
        let installed = Installed {
            dir: TempDir::new("upgrade-bin"),
        };
        installed.replace_with(Path::new(BIN));
        installed
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("ferryd")
    }

    /// Puts `source` at the path the way a package manager does: a new file renamed over the
    /// old one, so the running process keeps the old (now deleted) file.
    fn replace_with(&self, source: &Path) {
        let next = self.dir.path().join("ferryd.next");
        std::fs::copy(source, &next).expect("copy the binary");
        std::fs::rename(&next, self.path()).expect("rename over the binary");
    }

    fn start(&self, config: &str) -> Daemon {
        self.start_with(config, |_| {})
    }

    /// Starts the installed binary as the shipped unit runs it: an unprivileged uid with no
    /// capabilities (see [`common::unprivileged`]), after `adjust` (environment, limits).
    fn start_with(&self, config: &str, adjust: impl FnOnce(&mut Command)) -> Daemon {
        let exe = self.path();
        let daemon = Daemon::spawn_command(config, |config| {
            let mut command = common::run_command(&exe, config);
            common::unprivileged(&mut command);
            adjust(&mut command);
            command
        });
        assert!(
            daemon
                .wait_for_log(" ready config=", Duration::from_secs(10))
                .is_some(),
            "ferryd did not become ready; its log:\n{}",
            daemon.log()
        );
        let held: Vec<_> = common::capabilities(daemon.pid())
            .into_iter()
            .filter(|(name, value)| *value != 0 && name != "CapBnd")
            .collect();
        assert!(held.is_empty(), "the daemon holds capabilities: {held:?}");
        daemon
    }
}

impl Installed {
    /// Starts the installed binary as systemd would with socket activation: `socket` passed as
    /// descriptor 3 under `name`, while this process keeps its own copy, as systemd's fd store
    /// does (so the port stays bound whatever ferryd closes).
    fn start_passed(&self, config: &str, socket: &std::net::TcpListener, name: &str) -> Daemon {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let exe = self.path();
        let fd = socket.as_raw_fd();
        let name = name.to_string();
        let daemon = Daemon::spawn_command(config, |path| {
            let mut command = Command::new("sh");
            command
                .arg("-c")
                .arg(format!(
                    "LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES={name} exec \"$0\" run --config \"$1\""
                ))
                .arg(&exe)
                .arg(path);
            for var in ["JOURNAL_STREAM", "NOTIFY_SOCKET", "WATCHDOG_USEC"] {
                command.env_remove(var);
            }
            common::unprivileged(&mut command);
            // SAFETY: dup2 is async-signal-safe; the new descriptor 3 is not close-on-exec.
            unsafe {
                command.pre_exec(move || {
                    if libc::dup2(fd, 3) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            command
        });
        assert!(
            daemon
                .wait_for_log(" ready config=", Duration::from_secs(10))
                .is_some(),
            "ferryd did not become ready; its log:\n{}",
            daemon.log()
        );
        daemon
    }
}

fn upgrade(daemon: &Daemon) -> std::process::Output {
    Command::new(BIN)
        .args(["upgrade", "--timeout", "20", "--config"])
        .arg(&daemon.config)
        .output()
        .expect("run ferryd upgrade")
}

/// What `ferryd status` prints (its exit status is about systemd, absent here).
fn summary(daemon: &Daemon) -> String {
    let out = Command::new(BIN)
        .args(["status", "--config"])
        .arg(&daemon.config)
        .output()
        .expect("ferryd status");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn status(daemon: &Daemon) -> serde_json::Value {
    let response = daemon
        .health_request("GET /status HTTP/1.0\r\n\r\n")
        .expect("GET /status");
    let body = response.split_once("\r\n\r\n").expect("a body").1;
    serde_json::from_str(body).expect("a JSON status")
}

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
        installed.replace_with(Path::new(BIN));
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
    assert!(
        daemon
            .wait_for_nth_log("live upgrade refused; nothing changed", 3, Duration::from_secs(5))
            .is_some(),
        "{}",
        daemon.log()
    );
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
        installed.replace_with(Path::new(BIN));
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
    assert!(
        daemon
            .wait_for_nth_log("live upgrade complete", 2, Duration::from_secs(20))
            .is_some(),
        "the second SIGUSR2 was lost or fatal: {}",
        daemon.log()
    );
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

/// A reader that takes at most [`Trickle::CHUNK`] bytes every [`Trickle::PAUSE`] until `go` is
/// set, then reads at full speed: to the sender, a stalled reader; to the relay's idle timer,
/// a live connection.
struct Trickle {
    inner: TcpStream,
    go: Arc<AtomicBool>,
}

impl Trickle {
    /// The most taken at once (the verifier asks for 256 KiB at a time): enough for the
    /// receiver to open its zero window again, which Linux does only once a good part of the
    /// receive buffer is free.
    const CHUNK: usize = 1 << 20;
    /// Well inside the idle timeout.
    const PAUSE: Duration = Duration::from_millis(500);
}

impl Read for Trickle {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.go.load(Ordering::Relaxed) {
            return self.inner.read(buf);
        }
        std::thread::sleep(Self::PAUSE);
        let n = buf.len().min(Self::CHUNK);
        let mut got = 0;
        while got < n {
            match self.inner.read(&mut buf[got..n])? {
                0 => break,
                m => got += m,
            }
        }
        Ok(got)
    }
}

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
    installed.replace_with(Path::new(BIN));
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

/// A session, its echo checked, that must live through whatever an upgrade attempt does.
fn session(port: u16) -> TcpStream {
    let mut session = TcpStream::connect(local(port)).expect("connect");
    session.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    common::echo_roundtrip(&mut session, b"before").expect("exchange before");
    session
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
    installed.replace_with(Path::new(BIN));
    let asking = Command::new(BIN)
        .args(["upgrade", "--timeout", "20", "--config"])
        .arg(&daemon.config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run ferryd upgrade");
    // With no descriptor to spare, the health endpoint cannot take `ferryd upgrade`'s requests
    // either: free some once the daemon has taken everything back, as an operator would.
    assert!(
        daemon
            .wait_for_log("live upgrade failed after the check", Duration::from_secs(10))
            .is_some(),
        "{}",
        daemon.log()
    );
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
        "#!/bin/sh\nsetsid sh -c 'exec 3>>\"$0\"; sleep 3' \"$0\" </dev/null >/dev/null 2>&1 &\nsleep 0.2\necho 'handover versions: 1 2'\n",
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
    installed.replace_with(Path::new(BIN));
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
    std::fs::copy(BIN, &real).expect("copy the binary");
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
    installed.replace_with(Path::new(BIN));
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
    assert!(
        daemon
            .wait_for_log("end=\"upstream-timeout\"", Duration::from_secs(2))
            .is_some(),
        "{}",
        daemon.log()
    );
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
    installed.replace_with(Path::new(BIN));
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
    let mut child = command.spawn().expect("spawn ferryd");
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
    installed.replace_with(Path::new(BIN));
    let out = Command::new(BIN)
        .args(["upgrade", "--timeout", "20", "--config"])
        .arg(&config)
        .output()
        .expect("run ferryd upgrade");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let after = counters(health_port);
    let _ = child.kill();
    let _ = child.wait();
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
        installed.replace_with(Path::new(BIN));
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
    installed.replace_with(Path::new(BIN));
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
    installed.replace_with(Path::new(BIN));
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
    let opened = daemon
        .wait_for_log("connection opened", Duration::from_secs(2))
        .expect("an opened line");
    let id: u64 = common::field(&opened, "conn")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no conn= in {opened}"));
    assert!(
        common::field(&opened, "dial_ms").is_some() && opened.contains("route=test"),
        "{opened}"
    );
    installed.replace_with(Path::new(BIN));
    let out = upgrade(&daemon);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    common::echo_roundtrip(&mut before, b"after").expect("the session goes on");
    drop(before);
    let closed = daemon
        .wait_for_log("connection closed", Duration::from_secs(5))
        .expect("a closed line");
    assert_eq!(
        common::field(&closed, "conn"),
        Some(id.to_string().as_str()),
        "{closed}"
    );
    let _after = session(port);
    let next = daemon
        .wait_for_nth_log("connection opened", 2, Duration::from_secs(2))
        .expect("a second opened line");
    let next: u64 = common::field(&next, "conn")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(next > id, "id {next} after {id}: numbering restarted");
}
