//! The contenders: which relays exist, how each is started on loopback in front of the shared
//! upstream (one thread or worker each), and how it is stopped.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{TempDir, free_port};

/// The ferryd under test: this build's, or the one FERRYD_BIN names (for example the static
/// musl binary the package ships, `target/x86_64-unknown-linux-musl/release/ferryd`).
pub(crate) fn ferryd_bin() -> String {
    std::env::var("FERRYD_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_ferryd").to_string())
}

/// An earlier ferryd to measure beside this one in the same run ("ferryd (before)"), when
/// FERRYD_BEFORE_BIN names its binary: what a change bought, with the machine's noise shared.
pub(crate) fn ferryd_before_bin() -> Option<String> {
    std::env::var("FERRYD_BEFORE_BIN").ok()
}
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Kind {
    Direct,
    Ferryd,
    FerrydBefore,
    FerrydCopy,
    HaproxySplice,
    Haproxy,
    Nginx,
    Socat,
}

impl Kind {
    pub(crate) const ALL: [Kind; 8] = [
        Kind::Direct,
        Kind::Ferryd,
        Kind::FerrydBefore,
        Kind::FerrydCopy,
        Kind::HaproxySplice,
        Kind::Haproxy,
        Kind::Nginx,
        Kind::Socat,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Ferryd => "ferryd",
            Kind::FerrydBefore => "ferryd (before)",
            Kind::FerrydCopy => "ferryd (copy)",
            Kind::HaproxySplice => "haproxy splice",
            Kind::Haproxy => "haproxy",
            Kind::Nginx => "nginx stream",
            Kind::Socat => "socat",
        }
    }
}

/// A relay under test.
pub(crate) struct Proxy {
    pub(crate) kind: Kind,
    pub(crate) listen: SocketAddr,
    /// ferryd's health endpoint (/status, /connections).
    pub(crate) health: Option<SocketAddr>,
    pub(crate) child: Option<Child>,
    pub(crate) _dir: TempDir,
}

impl Drop for Proxy {
    /// Stops the contender: SIGTERM first, which nginx's master passes on to its worker (a
    /// SIGKILL to the master alone left the worker running, still listening, after every run),
    /// then SIGKILL after a second for anything that did not go.
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            // SAFETY: kill has no memory-safety preconditions; the pid is our own child's.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(1);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub(crate) fn installed(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

pub(crate) fn nginx_stream_module() -> Option<&'static str> {
    [
        "/usr/lib/nginx/modules/ngx_stream_module.so",
        "/usr/share/nginx/modules/ngx_stream_module.so",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
}

/// Starts `kind` relaying to `upstream`; `None` when its program is not installed. `logged`: it
/// logs every connection the way an operator would have it (ferryd its default INFO lines,
/// HAProxy `option tcplog`, nginx stream an `access_log`), into a file in its directory; socat
/// logs nothing either way.
pub(crate) fn start(kind: Kind, upstream: SocketAddr, logged: bool) -> Option<Proxy> {
    let dir = TempDir::new(&format!("{kind:?}"));
    if kind == Kind::Direct {
        return Some(Proxy {
            kind,
            listen: upstream,
            health: None,
            child: None,
            _dir: dir,
        });
    }
    let port = free_port();
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse().ok()?;
    let mut health = None;
    let mut command = match kind {
        Kind::Direct => unreachable!(),
        Kind::Ferryd | Kind::FerrydCopy | Kind::FerrydBefore => {
            let bin = match kind {
                Kind::FerrydBefore => ferryd_before_bin()?,
                _ => ferryd_bin(),
            };
            let health_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().ok()?;
            health = Some(health_addr);
            let config = format!(
                "allow = [\"127.0.0.0/8\"]\nworkers = 1\nsplice = {}\nmax_connections = 20000\ndrain_timeout = \"1s\"\n{}\n[[route]]\nname = \"bench\"\nlisten = \"{listen}\"\nupstream = \"{upstream}\"\n\n[health]\nlisten = \"{health_addr}\"\n",
                kind != Kind::FerrydCopy,
                // An earlier version may not know the key (it came with 0.4.0).
                if kind == Kind::FerrydBefore {
                    ""
                } else {
                    "control_socket = \"\"\n"
                },
            );
            let path = dir.path().join("ferryd.toml");
            std::fs::write(&path, config).ok()?;
            let mut c = Command::new(bin);
            c.args(["run", "--config"])
                .arg(path)
                .env("FERRYD_LOG", if logged { "info" } else { "warn" });
            c
        }
        Kind::HaproxySplice | Kind::Haproxy => {
            if !installed("haproxy", "-v") {
                return None;
            }
            let splice = if kind == Kind::HaproxySplice {
                "    option splice-auto\n"
            } else {
                ""
            };
            let (global_log, log) = if logged {
                (
                    "    log stdout format raw local0\n",
                    "    log global\n    option tcplog\n",
                )
            } else {
                ("", "")
            };
            let config = format!(
                "global\n    maxconn 6000\n    nbthread 1\n{global_log}\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\n{log}{splice}\nfrontend f\n    bind {listen}\n    default_backend b\n\nbackend b\n    server s {upstream}\n"
            );
            let path = dir.path().join("haproxy.cfg");
            std::fs::write(&path, config).ok()?;
            let mut c = Command::new("haproxy");
            c.args(["-db", "-f"]).arg(path);
            c
        }
        Kind::Nginx => {
            let module = nginx_stream_module()?;
            if !installed("nginx", "-v") {
                return None;
            }
            let prefix = dir.path().display().to_string();
            let log = if logged {
                format!(
                    "    log_format basic '$remote_addr [$time_local] $protocol $status $bytes_sent $bytes_received $session_time $upstream_addr';\n    access_log {prefix}/access.log basic;\n"
                )
            } else {
                String::new()
            };
            let config = format!(
                "load_module {module};\nworker_processes 1;\nworker_rlimit_nofile 20000;\ndaemon off;\npid {prefix}/nginx.pid;\nerror_log {prefix}/error.log;\nevents {{ worker_connections 12000; }}\nstream {{\n{log}    server {{\n        listen {listen};\n        proxy_pass {upstream};\n        proxy_half_close on;\n    }}\n}}\n"
            );
            let path = dir.path().join("nginx.conf");
            std::fs::write(&path, config).ok()?;
            let mut c = Command::new("nginx");
            c.args(["-p", &prefix, "-c"]).arg(path);
            c
        }
        Kind::Socat => {
            if !installed("socat", "-V") {
                return None;
            }
            let mut c = Command::new("socat");
            c.arg(format!(
                "TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=1024"
            ))
            .arg(format!("TCP:{upstream}"));
            c
        }
    };
    // Logged, whatever a contender writes to stdout or stderr goes to a file, as a log would.
    let output = |name: &str| {
        if logged {
            std::fs::File::create(dir.path().join(name)).map_or_else(|_| Stdio::null(), Stdio::from)
        } else {
            Stdio::null()
        }
    };
    let child = command
        .stdin(Stdio::null())
        .stdout(output("stdout.log"))
        .stderr(output("stderr.log"))
        .spawn()
        .ok()?;
    let proxy = Proxy {
        kind,
        listen,
        health,
        child: Some(child),
        _dir: dir,
    };
    // Ready when it accepts and relays an echo.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if echo_once(listen).is_ok() {
            return Some(proxy);
        }
        if Instant::now() > deadline {
            eprintln!("{}: did not start relaying within 10 s", kind.name());
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(crate) fn echo_once(target: SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect(target)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"Eping")?;
    let mut back = [0u8; 4];
    s.read_exact(&mut back)?;
    Ok(())
}
