//! The systemd protocols against a real ferryd: notify messages and their order, the watchdog
//! stopping when the runtime stalls, and socket activation.

mod common;

use std::io::Write as _;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

/// A fake service manager: a datagram socket collecting every notification.
struct Manager {
    path: std::path::PathBuf,
    messages: Arc<Mutex<Vec<(Instant, String)>>>,
    _dir: TempDir,
}

impl Manager {
    fn new() -> Manager {
        let dir = TempDir::new("notify");
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        // The daemon runs under a uid of its own: it may write to the socket, as systemd's is.
        writable_by_all(&path);
        let messages = Arc::new(Mutex::new(Vec::new()));
        let sink = messages.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                sink.lock()
                    .unwrap()
                    .push((Instant::now(), String::from_utf8_lossy(&buf[..n]).into_owned()));
            }
        });
        Manager {
            path,
            messages,
            _dir: dir,
        }
    }

    fn all(&self) -> Vec<String> {
        self.messages
            .lock()
            .unwrap()
            .iter()
            .map(|(_, m)| m.clone())
            .collect()
    }

    /// Index of the first message at or after `from` containing `needle`, waiting for it.
    fn find(&self, needle: &str, from: usize) -> Option<usize> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let all = self.all();
            if let Some(i) = all.iter().skip(from).position(|m| m.contains(needle)) {
                return Some(from + i);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn watchdogs_since(&self, since: Instant) -> usize {
        let messages = self.messages.lock().unwrap();
        messages
            .iter()
            .filter(|(at, m)| *at >= since && m == "WATCHDOG=1")
            .count()
    }
}

/// Lets any user send to the socket at `path` (the daemon runs under a uid of its own).
fn writable_by_all(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777)).unwrap();
}

/// Starts ferryd with `socket` passed as systemd would (fd 3, LISTEN_FDS=1, LISTEN_FDNAMES=`name`,
/// LISTEN_PID its own pid: `exec` keeps the shell's pid, so $$ is ferryd's).
fn spawn_with_passed_socket(config: &str, socket: &TcpListener, name: &str) -> Daemon {
    let fd = socket.as_raw_fd();
    let name = name.to_string();
    Daemon::spawn_command(config, |path| {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(format!(
                "LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES={name} exec \"$0\" run --config \"$1\""
            ))
            .arg(bin())
            .arg(path);
        unprivileged(&mut command);
        // SAFETY: dup2 is async-signal-safe; the new fd 3 is not close-on-exec.
        unsafe {
            command.pre_exec(move || {
                if libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        command
    })
}

#[test]
fn notify_ready_status_reload_and_stopping_in_order() {
    let manager = Manager::new();
    let upstream = Upstream::echo();
    let config = config_one_route(free_port(), upstream.addr, "", "");
    let socket = manager.path.clone();
    let mut daemon = Daemon::start_with(&config, |c| {
        c.env("NOTIFY_SOCKET", &socket).env("WATCHDOG_USEC", "400000");
    });

    let ready = manager.find("READY=1", 0).expect("READY=1");
    let all = manager.all();
    assert!(
        all[ready].contains("STATUS=1 routes, 0 live connections"),
        "{all:?}"
    );
    assert!(
        manager.find("WATCHDOG=1", ready).is_some(),
        "watchdog pings after READY: {all:?}"
    );

    daemon.signal(Signal::SIGHUP);
    let reloading = manager.find("RELOADING=1", ready).expect("RELOADING=1");
    assert!(
        manager.all()[reloading].contains("MONOTONIC_USEC="),
        "{:?}",
        manager.all()
    );
    let ready_again = manager
        .find("READY=1", reloading + 1)
        .expect("READY=1 after the reload");

    assert!(daemon.stop().success());
    let stopping = manager.find("STOPPING=1", ready_again).expect("STOPPING=1");
    assert!(ready < reloading && reloading < ready_again && ready_again < stopping);
    // No READY before the listeners were bound: the daemon logs "listening" before "ready".
    let log = daemon.log();
    assert!(log.find("listening route=").unwrap() < log.find(" ready config=").unwrap());
}

#[test]
fn watchdog_pings_stop_when_the_runtime_stalls() {
    let manager = Manager::new();
    let upstream = Upstream::echo();
    let config = config_one_route(free_port(), upstream.addr, "workers = 1", "");
    let socket = manager.path.clone();
    let daemon = Daemon::start_with(&config, |c| {
        c.env("NOTIFY_SOCKET", &socket)
            .env("WATCHDOG_USEC", "400000")
            .env("FERRYD_TEST_FAULTS", "stall");
    });
    manager.find("READY=1", 0).expect("ready");
    let healthy_window = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        manager.watchdogs_since(healthy_window) >= 3,
        "pings while healthy: {:?}",
        manager.all()
    );

    daemon.signal(Signal::SIGUSR1);
    daemon.expect_log("test fault: stalling", Duration::from_secs(2));
    std::thread::sleep(Duration::from_millis(1500));
    let stalled_window = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        manager.watchdogs_since(stalled_window),
        0,
        "pings went on while stalled"
    );
    daemon.expect_log("withholding watchdog pings", Duration::from_secs(2));
}

#[test]
fn socket_activation_relays_on_the_passed_socket() {
    let upstream = Upstream::echo();
    let passed = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = passed.local_addr().unwrap().port();
    // A client that connects before ferryd even runs waits in the passed socket's backlog.
    let mut early = std::net::TcpStream::connect(local(port)).unwrap();
    early.set_read_timeout(Some(Duration::from_secs(10))).unwrap();

    let config = config_one_route(port, upstream.addr, "", "");
    let daemon = spawn_with_passed_socket(&config, &passed, "test");
    daemon.expect_log(" ready config=", Duration::from_secs(5));
    daemon.expect_log("using the socket passed by systemd", Duration::from_secs(1));
    echo_roundtrip(&mut early, b"queued before start").unwrap();
    let mut later = std::net::TcpStream::connect(local(port)).unwrap();
    echo_roundtrip(&mut later, b"after start").unwrap();
}

/// An accept loop that dies stops the watchdog pings and turns the health probe to 503 with the
/// route named.
#[test]
fn dead_accept_loop_stops_pings_and_fails_the_probe() {
    let manager = Manager::new();
    let upstream = Upstream::echo();
    let config = config_one_route(free_port(), upstream.addr, "", "");
    let socket = manager.path.clone();
    let daemon = Daemon::start_with(&config, |c| {
        c.env("NOTIFY_SOCKET", &socket)
            .env("WATCHDOG_USEC", "400000")
            .env("FERRYD_TEST_FAULTS", "kill-accept");
    });
    manager.find("WATCHDOG=1", 0).expect("pings while healthy");
    daemon.signal(Signal::SIGUSR1);
    daemon.expect_log("test fault: aborting", Duration::from_secs(2));
    std::thread::sleep(Duration::from_millis(500));
    let window = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        manager.watchdogs_since(window),
        0,
        "pings went on with a dead accept loop"
    );
    let answer = daemon.health_request("GET /healthz HTTP/1.0\r\n\r\n").unwrap();
    assert!(answer.contains(" 503 "), "{answer}");
    assert!(
        answer.contains("route test: accept loop on 127.0.0.1:"),
        "{answer}"
    );
}

/// The listening sockets go to systemd's fd store under their names (FDSTORE=1, FDNAME=), with
/// the descriptor attached, so a restart keeps them open; a route removed by a reload has its
/// stored socket removed.
#[test]
fn listening_sockets_go_to_the_fd_store() {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let dir = TempDir::new("fdstore");
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    writable_by_all(&path);
    socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let upstream = Upstream::echo();
    let port = free_port();
    let daemon = Daemon::start_with(&config_one_route(port, upstream.addr, "", ""), |c| {
        c.env("NOTIFY_SOCKET", &path);
    });
    let mut stored = Vec::new();
    let mut other = Vec::new();
    while stored.len() < 2 {
        let mut buf = [0u8; 1024];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 4]);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg = nix::sys::socket::recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            nix::sys::socket::MsgFlags::empty(),
        )
        .unwrap_or_else(|e| panic!("{e}; seen {other:?}; log:\n{}", daemon.log()));
        let fds: Vec<OwnedFd> = msg
            .cmsgs()
            .unwrap()
            .filter_map(|c| match c {
                nix::sys::socket::ControlMessageOwned::ScmRights(fds) => Some(fds),
                _ => None,
            })
            .flatten()
            // SAFETY: the kernel just installed these descriptors in this process for us.
            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
            .collect();
        let text = String::from_utf8_lossy(msg.iovs().next().unwrap()).into_owned();
        if text.contains("FDSTORE=1") {
            assert_eq!(fds.len(), 1, "{text}");
            let local = socket2::SockRef::from(&fds[0])
                .local_addr()
                .unwrap()
                .as_socket()
                .unwrap();
            assert!(socket2::SockRef::from(&fds[0]).is_listener().unwrap());
            stored.push((text, local.port()));
        } else {
            other.push(text);
        }
    }
    assert!(
        stored
            .iter()
            .any(|(t, p)| t.contains("FDNAME=test") && *p == port),
        "{stored:?}"
    );
    assert!(
        stored
            .iter()
            .any(|(t, p)| t.contains("FDNAME=health") && Some(*p) == daemon.health_port),
        "{stored:?}"
    );

    // A reload that removes the route removes its stored socket.
    daemon.rewrite_config(
        &config_one_route(free_port(), upstream.addr, "", "").replace("name = \"test\"", "name = \"other\""),
    );
    daemon.signal(Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut buf = [0u8; 1024];
        let n = socket.recv(&mut buf).unwrap();
        if String::from_utf8_lossy(&buf[..n]).contains("FDSTOREREMOVE=1\nFDNAME=test") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no FDSTOREREMOVE for the removed route"
        );
    }
}

/// A socket passed under a route's name but bound elsewhere (the address changed in the file
/// before a restart) is not used: ferryd binds the configured address and closes the stale one.
#[test]
fn a_passed_socket_at_an_old_address_is_not_used() {
    let upstream = Upstream::echo();
    let stale = TcpListener::bind("127.0.0.1:0").unwrap();
    let stale_port = stale.local_addr().unwrap().port();
    let port = free_port();
    let config = config_one_route(port, upstream.addr, "", "");
    let daemon = spawn_with_passed_socket(&config, &stale, "test");
    daemon.expect_log(" ready config=", Duration::from_secs(5));
    daemon.expect_log("or its address changed); closing it", Duration::from_secs(1));
    assert!(daemon.log_lines("using the socket passed by systemd").is_empty());
    let mut client = std::net::TcpStream::connect(local(port)).unwrap();
    echo_roundtrip(&mut client, b"served at the configured address").unwrap();
    assert!(
        !daemon.listens_on(stale_port),
        "the stale socket is still open in ferryd"
    );
    drop(stale);
}

/// A connection the kernel accepted into the passed socket's queue before ferryd ran never
/// inherited the options ferryd sets on the listening socket (they are copied at the
/// handshake): ferryd must set them on it, or its urgent byte is lost (no SO_OOBINLINE) and
/// Azure's idle cut takes it (no keepalive).
#[test]
fn a_connection_queued_before_start_gets_the_socket_options() {
    skip_unless!(common::skip::have("ss"), "`ss` (iproute2) is not installed");
    // An upstream that hands over everything it reads on its first connection.
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let tx = std::sync::Mutex::new(Some(tx));
    let upstream = Upstream::start(move |mut stream| {
        let Some(tx) = tx.lock().unwrap().take() else {
            return;
        };
        let mut got = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stream, &mut got);
        let _ = tx.send(got);
    });
    let passed = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = passed.local_addr().unwrap().port();
    let mut early = std::net::TcpStream::connect(local(port)).unwrap();
    let config = config_one_route(port, upstream.addr, "", "keepalive_time = \"45s\"");
    let daemon = spawn_with_passed_socket(&config, &passed, "test");
    daemon.expect_log(" ready config=", Duration::from_secs(5));
    early.set_nodelay(true).unwrap();
    early.write_all(b"ab").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    socket2::SockRef::from(&early).send_out_of_band(b"!").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    early.write_all(b"cd").unwrap();
    // ferryd's side of the early connection carries the 45 s keepalive timer (once accepted
    // and set up, which is ferryd's own time: asked until it shows).
    let client_port = early.local_addr().unwrap().port();
    let leg = || {
        let out = Command::new("ss")
            .args(["-tnoH", "state", "established"])
            .output()
            .unwrap();
        let table = String::from_utf8_lossy(&out.stdout).into_owned();
        let leg = table.lines().find(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            cols.len() >= 4
                && cols[2].ends_with(&format!(":{port}"))
                && cols[3].ends_with(&format!(":{client_port}"))
        });
        leg.map(str::to_string)
            .ok_or_else(|| format!("ferryd's side of the early connection in:\n{table}"))
    };
    let leg = until(
        || leg().ok().filter(|l| l.contains("timer:(keepalive,4")),
        Duration::from_secs(5),
    )
    .map_or_else(leg, Ok)
    .unwrap_or_else(|e| panic!("{e}"));
    early.shutdown(std::net::Shutdown::Write).unwrap();
    let got = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the upstream's bytes");
    assert_eq!(
        String::from_utf8_lossy(&got),
        "ab!cd",
        "the urgent byte of a connection queued before start"
    );
    assert!(
        leg.contains("timer:(keepalive,4"),
        "no 45 s keepalive on a connection queued before start: {leg}"
    );
}

/// The relay holds no capability even when it is handed some (as a live upgrade from a version
/// whose relay kept NAT's capabilities does: ambient capabilities survive an execve): the
/// ambient, inheritable, permitted and effective sets are empty once it runs.
#[test]
fn the_relay_drops_capabilities_it_is_handed() {
    skip_unless!(
        common::skip::root() && common::skip::have("setpriv"),
        "needs root and setpriv"
    );
    let upstream = Upstream::echo();
    let port = free_port();
    let uid = unprivileged_uid().to_string();
    let daemon = Daemon::spawn_command(&config_one_route(port, upstream.addr, "", ""), |path| {
        let mut command = Command::new("setpriv");
        command
            .args(["--reuid", &uid, "--regid", &uid, "--clear-groups"])
            .args([
                "--inh-caps=+net_admin,+net_raw",
                "--ambient-caps=+net_admin,+net_raw",
            ])
            .args([bin(), "run", "--config"])
            .arg(path);
        for var in ["JOURNAL_STREAM", "NOTIFY_SOCKET", "WATCHDOG_USEC"] {
            command.env_remove(var);
        }
        command
    });
    daemon.expect_log(" ready config=", Duration::from_secs(10));
    assert!(
        !daemon.log_lines("dropped them all").is_empty(),
        "{}",
        daemon.log()
    );
    let held: Vec<_> = capabilities(daemon.pid())
        .into_iter()
        .filter(|(name, value)| *value != 0 && name != "CapBnd")
        .collect();
    assert!(held.is_empty(), "the relay holds {held:?}");
    let mut client = std::net::TcpStream::connect(local(port)).unwrap();
    echo_roundtrip(&mut client, b"relayed without privilege").unwrap();
}
