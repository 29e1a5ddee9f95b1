//! Live upgrade on loopback, without root: ferryd runs from a copy of its binary, the file is
//! replaced and `ferryd upgrade` asked for, while connections of every kind are in flight.

mod carried;
#[path = "../common/mod.rs"]
mod common;
mod failures;
mod load;
mod pause;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{Daemon, Pattern, TempDir, Upstream, bin, config_one_route, free_port, local};

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
        installed.replace_with(Path::new(bin()));
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
        // If it never comes: ferryd did not become ready.
        daemon.expect_log(" ready config=", Duration::from_secs(10));
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
        // If it never comes: ferryd did not become ready.
        daemon.expect_log(" ready config=", Duration::from_secs(10));
        daemon
    }
}

fn upgrade(daemon: &Daemon) -> std::process::Output {
    Command::new(bin())
        .args(["upgrade", "--timeout", "20", "--config"])
        .arg(&daemon.config)
        .output()
        .expect("run ferryd upgrade")
}

/// What `ferryd status` prints (its exit status is about systemd, absent here).
fn summary(daemon: &Daemon) -> String {
    let out = Command::new(bin())
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

/// A session, its echo checked, that must live through whatever an upgrade attempt does.
fn session(port: u16) -> TcpStream {
    let mut session = TcpStream::connect(local(port)).expect("connect");
    session.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    common::echo_roundtrip(&mut session, b"before").expect("exchange before");
    session
}
