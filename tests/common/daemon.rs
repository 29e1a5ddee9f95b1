//! The daemon under test: a real `ferryd` process on a temporary configuration, run as the
//! shipped unit runs it (an ordinary uid, no capabilities), its log collected line by line and
//! its byte accounting checked when it goes.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::*;

/// `exe run --config config`, without the systemd variables of the test's own environment
/// (a test may set them on purpose afterwards).
pub fn run_command(exe: &Path, config: &Path) -> Command {
    let mut command = Command::new(exe);
    command.args(["run", "--config"]).arg(config);
    for var in [
        "JOURNAL_STREAM",
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "LISTEN_FDS",
        "LISTEN_PID",
    ] {
        command.env_remove(var);
    }
    command
}

/// Spawns `command`, again while the kernel answers "Text file busy", for up to 2 s. A test
/// that has just copied a binary (an upgrade test installs one, then replaces it) held it open
/// for writing, and a child that another test thread forked in that moment keeps the descriptor
/// until it execs: the copy's first exec can fail with ETXTBSY for a few milliseconds, the race
/// every multi-threaded program that writes a binary and runs it has. Anything else fails at
/// once.
pub fn spawn(command: &mut Command) -> io::Result<Child> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match command.spawn() {
            Err(e) if e.kind() == io::ErrorKind::ExecutableFileBusy && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            spawned => return spawned,
        }
    }
}

/// Runs the child as the shipped unit runs ferryd: an ordinary uid with no capabilities and
/// `no_new_privs`, where the kernel's per-user limits apply (the pipe budget above all; root is
/// exempt from it, so a suite run as root would never see it). When the suite runs as root, each
/// call picks a uid of its own, so that daemons running side by side do not share one budget;
/// otherwise the child keeps the suite's own (already unprivileged) uid.
pub fn unprivileged(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let uid = unprivileged_uid();
        // std drops the supplementary groups when it leaves root; setuid from root clears the
        // permitted, effective and ambient capability sets.
        command.uid(uid).gid(uid);
    }
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec here.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A uid no other daemon of this suite has (and a group of the same number): far above any a
/// distribution hands out, so no passwd entry is needed.
pub fn unprivileged_uid() -> u32 {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    3_000_000 + (std::process::id() % 10_000) * 100 + NEXT.fetch_add(1, Ordering::Relaxed) as u32 % 100
}

/// The capability sets of process `pid` as `/proc/PID/status` shows them, by name (CapEff, ...).
pub fn capabilities(pid: i32) -> Vec<(String, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .filter_map(|line| {
            let (name, value) = line.split_once(':')?;
            let name = name.strip_prefix("Cap")?;
            Some((format!("Cap{name}"), u64::from_str_radix(value.trim(), 16).ok()?))
        })
        .collect()
}

/// A directory for the NAT keeper's report that every test uid may write (the keeper and the
/// relay each run under one of their own).
pub fn report_dir() -> TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("nat-report");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    dir
}

/// A running ferryd with its stderr collected line by line.
pub struct Daemon {
    child: Child,
    pub config: PathBuf,
    /// The health endpoint's port (added on loopback when the configuration has no `[health]`).
    pub health_port: Option<u16>,
    /// Where its health endpoint listens, as far as the configuration says.
    health_addr: Option<SocketAddr>,
    /// Its control socket (in the daemon's temporary directory unless the configuration names
    /// one).
    pub control_socket: Option<PathBuf>,
    /// Byte accounting mismatches the test expects of it (see the `Drop` impl).
    expected_mismatches: u64,
    lines: Arc<Mutex<Vec<String>>>,
    /// Set by the reader thread when the daemon's stderr has ended (every line is in `lines`).
    stderr_ended: Arc<AtomicBool>,
    _dir: TempDir,
}

impl Daemon {
    /// Starts `ferryd run` on `config` and waits for its "ready" line.
    pub fn start(config: &str) -> Daemon {
        Self::start_with(config, |_| {})
    }

    /// Like [`Daemon::start`], letting the caller adjust the command (environment, limits).
    pub fn start_with(config: &str, adjust: impl FnOnce(&mut Command)) -> Daemon {
        let daemon = Self::spawn_with(config, adjust);
        if daemon
            .wait_for_log(" ready config=", Duration::from_secs(10))
            .is_none()
        {
            panic!("ferryd did not become ready; its log:\n{}", daemon.log());
        }
        daemon
    }

    /// Starts the NAT keeper (`ferryd nat run`) on `config` under a uid of its own, after `adjust`,
    /// and waits until it is ready.
    pub fn keeper(config: &str, adjust: impl FnOnce(&mut Command)) -> Daemon {
        let keeper = Self::spawn_command(config, |path| {
            let mut command = Command::new(bin());
            command.args(["nat", "run", "--config"]).arg(path);
            for var in ["JOURNAL_STREAM", "NOTIFY_SOCKET", "WATCHDOG_USEC"] {
                command.env_remove(var);
            }
            unprivileged(&mut command);
            adjust(&mut command);
            command
        });
        if keeper
            .wait_for_log("NAT keeper ready", Duration::from_secs(10))
            .is_none()
        {
            panic!("the NAT keeper did not become ready; its log:\n{}", keeper.log());
        }
        keeper
    }

    /// Starts `ferryd run` without waiting for anything, as the shipped unit runs it: an
    /// ordinary uid with no capabilities (see [`unprivileged`]).
    pub fn spawn_with(config: &str, adjust: impl FnOnce(&mut Command)) -> Daemon {
        Self::spawn_command(config, |path| {
            let mut command = run_command(Path::new(bin()), path);
            unprivileged(&mut command);
            adjust(&mut command);
            command
        })
    }

    /// Starts whatever `make` builds from the configuration path (for example a shell that
    /// sets up socket activation and then execs ferryd), collecting its stderr.
    pub fn spawn_command(config: &str, make: impl FnOnce(&Path) -> Command) -> Daemon {
        let dir = TempDir::new("daemon");
        let path = dir.path().join("ferryd.toml");
        // Tests run in parallel: give each daemon its own health port instead of the default.
        let (config, health_port) = if config.contains("[health]") {
            (config.to_string(), None)
        } else {
            let port = free_port();
            (with_health(config, port), Some(port))
        };
        // And a control socket of its own, in a directory its uid may write (a top-level key:
        // before every table).
        let (config, control_socket) = if config.contains("control_socket") {
            let named = config
                .lines()
                .find_map(|l| l.trim().strip_prefix("control_socket"))
                .and_then(|rest| rest.split('"').nth(1))
                .filter(|p| !p.is_empty())
                .map(PathBuf::from);
            (config, named)
        } else {
            use std::os::unix::fs::PermissionsExt;
            let run = dir.path().join("run");
            std::fs::create_dir(&run).expect("create the control socket's directory");
            std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o777)).expect("chmod");
            let socket = run.join("control.sock");
            (
                format!("control_socket = {:?}\n{config}", socket.display().to_string()),
                Some(socket),
            )
        };
        let health_addr = health_listen(&config);
        std::fs::write(&path, &config).expect("write config");
        let mut command = make(&path);
        command
            .env("FERRYD_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = spawn(&mut command).expect("spawn ferryd");
        let stderr = child.stderr.take().expect("stderr piped");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let stderr_ended = Arc::new(AtomicBool::new(false));
        let ended = stderr_ended.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
            ended.store(true, Ordering::Release);
        });
        Daemon {
            child,
            config: path,
            health_port,
            health_addr,
            control_socket,
            expected_mismatches: 0,
            lines,
            stderr_ended,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid()), signal).expect("signal ferryd");
    }

    /// Replaces the configuration file (for a reload), keeping the health port.
    pub fn rewrite_config(&self, config: &str) {
        let config = match self.health_port {
            Some(port) if !config.contains("[health]") => with_health(config, port),
            _ => config.to_string(),
        };
        std::fs::write(&self.config, config).expect("rewrite config");
    }

    /// Sends an HTTP/1.0 GET (or any raw request) to the health endpoint; returns the response.
    pub fn health_request(&self, request: &str) -> io::Result<String> {
        let port = self.health_port.expect("health port");
        let mut stream = TcpStream::connect(local(port))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(request.as_bytes())?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response)?;
        Ok(String::from_utf8_lossy(&response).into_owned())
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Lines containing `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }

    /// Waits up to `timeout` for a line containing `needle` and returns it; fails the test with
    /// the whole log when none comes.
    #[track_caller]
    pub fn expect_log(&self, needle: &str, timeout: Duration) -> String {
        self.expect_nth_log(needle, 1, timeout)
    }

    /// Waits up to `timeout` for the `n`-th line containing `needle` and returns it; fails the
    /// test with the whole log when it does not come.
    #[track_caller]
    pub fn expect_nth_log(&self, needle: &str, n: usize, timeout: Duration) -> String {
        match self.wait_for_nth_log(needle, n, timeout) {
            Some(line) => line,
            None => panic!(
                "no log line #{n} containing {needle:?} within {timeout:?}; the log:\n{}",
                self.log()
            ),
        }
    }

    /// Waits until a line containing `needle` appears.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Option<String> {
        self.wait_for_nth_log(needle, 1, timeout)
    }

    /// Waits until `n` lines containing `needle` have appeared; returns the n-th.
    pub fn wait_for_nth_log(&self, needle: &str, n: usize, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self.log_lines(needle);
            if found.len() >= n {
                return Some(found[n - 1].clone());
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // Every line it wrote is read once its stderr ends. Bounded all the same, in case
                // a descendant inherited the stream: then the lines read so far.
                let read_by = Instant::now() + STDERR_DRAIN;
                while !self.stderr_ended.load(Ordering::Acquire) && Instant::now() < read_by {
                    std::thread::sleep(Duration::from_millis(5));
                }
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then the exit status (which must come within 10 s).
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        match self.wait_exit(Duration::from_secs(10)) {
            Some(status) => status,
            None => panic!("ferryd did not exit after SIGTERM; log:\n{}", self.log()),
        }
    }

    /// CPU seconds (user + system) the process has used.
    pub fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).expect("read stat");
        let after_comm = &stat[stat.rfind(')').expect("comm") + 2..];
        let fields: Vec<&str> = after_comm.split_whitespace().collect();
        // Fields 14 and 15 of stat (utime, stime), counted from after the comm field.
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        ticks as f64 / 100.0
    }

    /// Open file descriptors of the process.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Whether the daemon itself holds a listening TCP socket on `port`. Asking the daemon's own
    /// descriptors, not connect(): in a parallel suite another test may bind a port the daemon
    /// has just closed.
    pub fn listens_on(&self, port: u16) -> bool {
        let pid = self.pid();
        let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("read the daemon's descriptors")
            .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
            .filter_map(|target| {
                let target = target.to_string_lossy().into_owned();
                Some(target.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
            })
            .collect();
        // A daemon has sockets (its health endpoint at least): none seen means /proc could not
        // be read, and "not listening" would be an answer nobody checked.
        assert!(
            !inodes.is_empty(),
            "no socket among ferryd's descriptors (pid {pid})"
        );
        ["tcp", "tcp6"].iter().any(|table| {
            let text = match std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) {
                Ok(text) => text,
                // tcp6 is absent on a kernel without IPv6; tcp never is.
                Err(e) if *table == "tcp" => panic!("read /proc/{pid}/net/tcp: {e}"),
                Err(_) => String::new(),
            };
            text.lines().skip(1).any(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                // local_address is fields[1] ("ADDR:PORT" in hex), st fields[3] (0A: LISTEN),
                // inode fields[9].
                fields.len() > 9
                    && fields[3] == "0A"
                    && fields[1]
                        .rsplit(':')
                        .next()
                        .and_then(|p| u16::from_str_radix(p, 16).ok())
                        == Some(port)
                    && inodes.iter().any(|inode| inode == fields[9])
            })
        })
    }
}

impl Daemon {
    /// The daemon's `ferryd_accounting_mismatches_total`: scraped from /metrics while it runs;
    /// once it has exited (or when its endpoint cannot be asked plainly), the most its log says
    /// (the "stopped" summary, or one ERROR line per mismatch).
    pub fn accounting_mismatches(&self) -> u64 {
        let running = kill(Pid::from_raw(self.pid()), None).is_ok();
        if running
            && let Some(addr) = self.health_addr
            && let Some(n) = settled_mismatches(addr)
        {
            return n;
        }
        let summary = self
            .log_lines(" stopped")
            .iter()
            .filter_map(|l| field(l, "accounting_mismatches")?.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        summary.max(self.log_lines("byte accounting mismatch").len() as u64)
    }

    /// Declares that this daemon is expected to have counted `n` accounting mismatches (only a
    /// test that loses a byte on purpose does).
    pub fn expect_accounting_mismatches(&mut self, n: u64) {
        self.expected_mismatches = n;
    }
}

/// Every test daemon proves, at the end of its life, that no byte was lost: bytes read from
/// each side of every connection that ended in order were written to the other. A test that
/// already failed is not failed twice.
impl Drop for Daemon {
    fn drop(&mut self) {
        let mismatches = if std::thread::panicking() {
            None
        } else {
            Some(self.accounting_mismatches())
        };
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(n) = mismatches
            && n != self.expected_mismatches
        {
            panic!(
                "byte accounting: ferryd counted {n} mismatch(es), the test expected {}; its log:\n{}",
                self.expected_mismatches,
                self.log_lines("byte accounting mismatch").join("\n")
            );
        }
    }
}

/// Where the configuration's `[health]` table says the endpoint listens (a wildcard address is
/// reached on loopback); `None` when it cannot tell.
fn health_listen(config: &str) -> Option<SocketAddr> {
    let section = config.split("[health]").nth(1)?;
    let section = section.split("\n[").next()?;
    let value = section
        .lines()
        .find_map(|l| l.trim().strip_prefix("listen"))?
        .split('"')
        .nth(1)?;
    let addr: SocketAddr = value.parse().ok()?;
    let ip = if addr.ip().is_unspecified() {
        std::net::IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        addr.ip()
    };
    Some(SocketAddr::new(ip, addr.port()))
}

/// How long the accounting check waits for the connections a test has just let go to end in
/// the daemon (each is checked at its end), before it reads the counter anyway.
const SETTLE: Duration = Duration::from_secs(3);

/// `ferryd_accounting_mismatches_total` at `addr` once no connection is live any more (or
/// [`SETTLE`] has passed, which it says): a client the test dropped a moment ago is still ending
/// in the daemon, and its check must be counted too. `None` when the page cannot be had. Also
/// for the few tests that start a daemon outside [`Daemon`] (their own stderr).
pub fn settled_mismatches(addr: SocketAddr) -> Option<u64> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let page = metrics_page(addr)?;
        let live: u64 = page
            .lines()
            .filter(|l| l.starts_with("ferryd_connections_live{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        if live == 0 || Instant::now() >= deadline {
            if live > 0 {
                eprintln!(
                    "byte accounting: {live} connection(s) still live after {SETTLE:?}; their ends are not checked"
                );
            }
            return page.lines().find_map(|l| {
                l.strip_prefix("ferryd_accounting_mismatches_total")?
                    .trim()
                    .parse()
                    .ok()
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn metrics_page(addr: SocketAddr) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
    let mut page = String::new();
    stream.read_to_string(&mut page).ok()?;
    Some(page)
}

/// How long [`Daemon::wait_exit`] waits, after the exit, for the rest of the daemon's stderr.
const STDERR_DRAIN: Duration = Duration::from_secs(2);
