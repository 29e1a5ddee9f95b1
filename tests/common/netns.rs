//! Test hosts in network namespaces (root only), for NAT, doctor and anything that crosses a
//! network: the topology below, built per test and always removed.
//!
//! ```text
//!   lb (10.0.0.10) ── proxy (10.0.0.5 | 10.0.1.5 | 192.0.2.2 uplink) ── internet (192.0.2.1)
//!                            │
//!                      buildvm (10.0.1.4, default via 10.0.1.5)
//! ```
//! `internet` has no route back to 10.0.1.0/24: only masquerading makes replies return.
#![allow(dead_code)]

use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::{TempDir, bin};

/// Answers every GET with the client's address.
pub const WHOAMI: &str = r#"
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = self.client_address[0].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
"#;

/// Echoes bytes back (the build VM's port 22 when sshd is not installed).
pub const ECHO: &str = r#"
import socket, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 22))
s.listen(16)
def serve(c):
    c.sendall(b"SSH-2.0-echo\r\n")
    while True:
        d = c.recv(65536)
        if not d:
            break
        c.sendall(d)
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

pub const GET: &str = r#"
import sys, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())
except Exception as e:
    print("FAIL", e)
    sys.exit(1)
"#;

pub fn can_run() -> bool {
    super::skip::needs(
        Some("network namespaces and iptables"),
        &["ip", "iptables", "python3"],
    )
}

/// The four namespaces, removed (with every process in them) when dropped.
pub struct Topology {
    prefix: String,
    children: Vec<Child>,
    pub state: TempDir,
}

pub fn run(args: &[&str]) -> Output {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl Topology {
    pub fn new() -> Topology {
        static N: AtomicUsize = AtomicUsize::new(0);
        let prefix = format!("fd{}x{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let topo = Topology {
            prefix,
            children: Vec::new(),
            state: TempDir::new("nat-state"),
        };
        for ns in ["lb", "proxy", "buildvm", "internet"] {
            run(&["ip", "netns", "add", &topo.ns(ns)]);
            topo.sh(ns, "ip link set lo up");
        }
        let (lb, proxy, buildvm, internet) = (
            topo.ns("lb"),
            topo.ns("proxy"),
            topo.ns("buildvm"),
            topo.ns("internet"),
        );
        run(&[
            "ip", "-n", &proxy, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns",
            &internet,
        ]);
        run(&[
            "ip", "-n", &proxy, "link", "add", "eth1", "type", "veth", "peer", "name", "eth0", "netns",
            &buildvm,
        ]);
        run(&[
            "ip", "-n", &proxy, "link", "add", "eth2", "type", "veth", "peer", "name", "eth0", "netns", &lb,
        ]);
        topo.sh("proxy", "ip addr add 192.0.2.2/24 dev eth0 && ip addr add 10.0.1.5/24 dev eth1 && ip addr add 10.0.0.5/24 dev eth2 && ip link set eth0 up && ip link set eth1 up && ip link set eth2 up && ip route add default via 192.0.2.1");
        topo.sh(
            "internet",
            "ip addr add 192.0.2.1/24 dev eth0 && ip link set eth0 up",
        );
        topo.sh(
            "buildvm",
            "ip addr add 10.0.1.4/24 dev eth0 && ip link set eth0 up && ip route add default via 10.0.1.5",
        );
        topo.sh("lb", "ip addr add 10.0.0.10/24 dev eth0 && ip link set eth0 up");
        topo.sh("proxy", "echo 0 > /proc/sys/net/ipv4/ip_forward");
        topo
    }

    pub fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    /// Runs a shell command in a namespace; panics on failure.
    pub fn sh(&self, ns: &str, script: &str) -> String {
        let out = self.try_sh(ns, script);
        assert!(
            out.status.success(),
            "in {ns}: {script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn try_sh(&self, ns: &str, script: &str) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns(ns), "sh", "-c", script])
            .env("STATE_DIRECTORY", self.state.path())
            .output()
            .unwrap()
    }

    /// Starts a long-running process in a namespace.
    pub fn spawn(&mut self, ns: &str, args: &[&str]) {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns(ns)])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.children.push(child);
    }

    /// Runs `ferryd ARGS` in the proxy namespace.
    pub fn ferryd(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns("proxy"), bin()])
            .args(args)
            .env("STATE_DIRECTORY", self.state.path())
            .output()
            .unwrap()
    }

    /// Where the NAT keeper of this topology reports, for the relay to read.
    pub fn report_file(&self) -> std::path::PathBuf {
        self.state.path().join("nat-report.json")
    }

    /// `config` with this topology's report file in its `[nat]` table, if it has one.
    fn with_report(&self, config: &str) -> String {
        if config.contains("report_file") {
            return config.to_string();
        }
        config.replacen(
            "[nat]\n",
            &format!("[nat]\nreport_file = \"{}\"\n", self.report_file().display()),
            1,
        )
    }

    /// Starts the relay (`ferryd run`) on `config` in the proxy namespace as the shipped unit
    /// runs it: an ordinary uid with no capability at all (setpriv), without waiting for it.
    pub fn daemon(&self, config: &str, path: Option<&str>) -> super::Daemon {
        let ns = self.ns("proxy");
        let path = path.map(str::to_string);
        let uid = super::unprivileged_uid().to_string();
        super::Daemon::spawn_command(&self.with_report(config), |file| {
            let mut command = Command::new("ip");
            command
                .args(["netns", "exec", &ns, "setpriv", "--reuid", &uid, "--regid", &uid])
                .args([
                    "--clear-groups",
                    "--inh-caps=-all",
                    "--bounding-set=-all",
                    "--no-new-privs",
                ])
                .args([bin(), "run", "--config"])
                .arg(file);
            if let Some(path) = &path {
                command.env("PATH", path);
            }
            command
        })
    }

    /// Starts the NAT keeper (`ferryd nat run`) on `config` in the proxy namespace, with this
    /// topology's state directory and `path` as PATH (None: the test's own), and waits until it
    /// is ready.
    pub fn keeper(&self, config: &str, path: Option<&str>) -> super::Daemon {
        let ns = self.ns("proxy");
        let state = self.state.path().to_path_buf();
        let path = path.map(str::to_string);
        let keeper = super::Daemon::spawn_command(&self.with_report(config), |file| {
            let mut command = Command::new("ip");
            command
                .args(["netns", "exec", &ns, bin(), "nat", "run", "--config"])
                .arg(file)
                .env("STATE_DIRECTORY", &state);
            if let Some(path) = &path {
                command.env("PATH", path);
            }
            command
        });
        // If it never comes: the NAT keeper did not start.
        keeper.expect_log("NAT keeper ready", Duration::from_secs(10));
        keeper
    }

    /// GET from the build VM; Ok(body) or Err(reason).
    pub fn get_from_buildvm(&self, url: &str) -> Result<String, String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns("buildvm"), "python3", "-c", GET, url])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() { Ok(text) } else { Err(text) }
    }

    pub fn start_web(&mut self, port: u16) {
        self.spawn("internet", &["python3", "-c", WHOAMI, &port.to_string()]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.sh("internet", "ss -ltnH").contains(&format!(":{port} ")) {
            assert!(Instant::now() < deadline, "web server on {port} did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn save(&self, table: &str) -> String {
        self.sh("proxy", &format!("iptables-save -t {table}"))
    }

    pub fn rules_of(&self, table: &str, chain: &str) -> Vec<String> {
        self.save(table)
            .lines()
            .filter(|l| l.starts_with(&format!("-A {chain} ")))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in ["lb", "proxy", "buildvm", "internet"] {
            let name = self.ns(ns);
            if let Ok(out) = Command::new("ip").args(["netns", "pids", &name]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

/// A configuration in the topology: one route, `ssh`, from 0.0.0.0:60001 (the relay's address
/// seen from the balancer) to the build VM's 22, admitting the balancer's subnet and its probes
/// from 10.0.0.99, NAT for the build VM; `route`, `health_listen` and `nat` add to or set each
/// part.
pub fn topology_config(route: &str, health_listen: &str, nat: &str) -> String {
    format!(
        r#"allow = ["10.0.0.0/24"]
probe_sources = ["10.0.0.99/32"]
drain_timeout = "1s"

[[route]]
name = "ssh"
listen = "0.0.0.0:60001"
upstream = "10.0.1.4:22"
{route}

[health]
listen = "{health_listen}"

[nat]
sources = ["10.0.1.4/32"]
{nat}
"#
    )
}
