//! The Debian package on a real systemd (root only), on each release in
//! `common::container::RELEASES`: a minimal root made with debootstrap (cached between runs),
//! booted with systemd-nspawn in a network namespace of its own, the package installed,
//! exercised and purged inside.

#[path = "../common/mod.rs"]
mod common;
mod stages;

use std::process::Command;
use std::time::{Duration, Instant};

use common::TempDir;
use common::container::{Container, can_run, deb, root};

const TEST_CONFIG: &str = r#"allow = ["127.0.0.0/8"]
probe_sources = ["168.63.129.16/32"]
drain_timeout = "3s"

[[route]]
name = "ssh"
listen = "0.0.0.0:60001"
upstream = "127.0.0.1:22"

[nat]
sources = ["10.9.9.9/32"]
out_interface = "lo"
reconcile_interval = "2s"
"#;

/// [`TEST_CONFIG`] with a second route, to an echo server, for 1,000 connections.
const MANY_CONFIG: &str = r#"allow = ["127.0.0.0/8"]
probe_sources = ["168.63.129.16/32"]
drain_timeout = "3s"

[[route]]
name = "ssh"
listen = "0.0.0.0:60001"
upstream = "127.0.0.1:22"

[[route]]
name = "many"
listen = "127.0.0.1:60000"
upstream = "127.0.0.1:7777"
max_connections = 2000

[nat]
sources = ["10.9.9.9/32"]
out_interface = "lo"
reconcile_interval = "2s"
"#;

/// An echo server for many connections at once (one thread, selectors), on 127.0.0.1:7777.
const ECHO_SERVER: &str = r#"
import selectors, socket
sel = selectors.DefaultSelector()
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 7777)); srv.listen(4096); srv.setblocking(False)
sel.register(srv, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        if key.fileobj is srv:
            c, _ = srv.accept(); c.setblocking(True); sel.register(c, selectors.EVENT_READ)
        else:
            data = key.fileobj.recv(4096)
            if data:
                key.fileobj.sendall(data)
            else:
                sel.unregister(key.fileobj); key.fileobj.close()
"#;

/// Opens 1,000 connections through the relay's second route and echoes on each, waits for
/// /tmp/many-go, echoes on each again, and writes how many came through both times.
const MANY: &str = r#"
import os, socket, time
conns = []
for i in range(1000):
    s = socket.create_connection(("127.0.0.1", 60000), timeout=30)
    s.sendall(b"one %d\n" % i)
    conns.append(s)
first = sum(1 for i, s in enumerate(conns) if s.recv(64) == b"one %d\n" % i)
open("/tmp/many-first", "w").write(str(first))
while not os.path.exists("/tmp/many-go"):
    time.sleep(0.1)
second = 0
for i, s in enumerate(conns):
    try:
        s.sendall(b"two %d\n" % i)
        if s.recv(64) == b"two %d\n" % i:
            second += 1
    except OSError:
        pass
open("/tmp/many-second", "w").write(str(second))
"#;

/// Holds one connection through the relay: reads sshd's banner, waits for /tmp/go, then sends a
/// client banner and records what sshd answers (its key exchange), proving the connection
/// outlived whatever happened in between.
const HOLDER: &str = r#"
import os, socket, time
s = socket.create_connection(("127.0.0.1", 60001), timeout=30)
open("/tmp/banner", "wb").write(s.recv(256))
while not os.path.exists("/tmp/go"):
    time.sleep(0.1)
s.sendall(b"SSH-2.0-ferryd-test\r\n")
open("/tmp/after", "wb").write(s.recv(64))
"#;

#[test]
fn package_on_bullseye() {
    package_installs_runs_reloads_stops_and_purges_under_systemd("bullseye");
}

#[test]
fn package_on_bookworm() {
    package_installs_runs_reloads_stops_and_purges_under_systemd("bookworm");
}

#[test]
fn package_on_trixie() {
    package_installs_runs_reloads_stops_and_purges_under_systemd("trixie");
}

/// The capability sets and no_new_privs of process `pid` in the container, from
/// /proc/PID/status: (name, value).
fn privileges(c: &Container, pid: &str) -> Vec<(String, String)> {
    c.ok(&format!(
        "grep -E '^(Cap|NoNewPrivs)' /proc/{}/status",
        pid.trim()
    ))
    .lines()
    .filter_map(|line| {
        let (name, value) = line.split_once(':')?;
        Some((name.to_string(), value.trim().to_string()))
    })
    .collect()
}

fn package_installs_runs_reloads_stops_and_purges_under_systemd(release: &'static str) {
    if !can_run() {
        return;
    }
    let Some(deb) = deb() else {
        common::skip::skipped("the package is not built (run packaging/build-deb; .ci/run does)");
        return;
    };
    let root = root(release);
    let share = TempDir::new("system");
    std::fs::copy(&deb, share.path().join("ferryd.deb")).unwrap();
    std::fs::write(share.path().join("ferryd.toml"), TEST_CONFIG).unwrap();
    std::fs::write(share.path().join("holder.py"), HOLDER).unwrap();
    std::fs::write(share.path().join("echo.py"), ECHO_SERVER).unwrap();
    std::fs::write(share.path().join("many.py"), MANY).unwrap();
    std::fs::write(share.path().join("many.toml"), MANY_CONFIG).unwrap();
    let c = Container::boot(&root, share.path());

    // OpenSSH 9.8 and later (trixie) penalise a source whose connections end before
    // authenticating, as this test's connect loops do by the dozen: not what is tested here.
    c.ok("if sshd -T 2>/dev/null | grep -q '^persourcepenalties '; then echo 'PerSourcePenalties no' > /etc/ssh/sshd_config.d/ferryd-test.conf && systemctl restart ssh; fi");

    stages::installed(&c, release);
    stages::operated(&c, release);
    stages::nat_kept(&c, release);
    stages::restarts_and_reloads(&c);
    stages::live_upgrades(&c, release);
    stages::upgrades_that_hold_back(&c);
    stages::stopped_and_purged(&c);
}

/// Image bakers install into a root that is not running (a chroot), then boot it: the unit must
/// be enabled by the installation and run at first boot.
#[test]
fn offline_install_into_an_image_root_runs_at_first_boot() {
    if !can_run() {
        return;
    }
    let Some(deb) = deb() else {
        common::skip::skipped("the package is not built (run packaging/build-deb; .ci/run does)");
        return;
    };
    let pristine = root("bullseye");
    let image = TempDir::new("image");
    let root = image.path().join("root");
    let copied = Command::new("cp")
        .arg("-a")
        .arg(&pristine)
        .arg(&root)
        .status()
        .unwrap();
    assert!(copied.success());
    std::fs::copy(&deb, root.join("tmp/ferryd.deb")).unwrap();
    let installed = Command::new("chroot")
        .arg(&root)
        .args([
            "apt-get",
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "/tmp/ferryd.deb",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .unwrap();
    assert!(
        installed.status.success(),
        "{}{}",
        String::from_utf8_lossy(&installed.stdout),
        String::from_utf8_lossy(&installed.stderr)
    );
    for unit in ["ferryd.service", "ferryd-nat.service"] {
        assert!(
            root.join("etc/systemd/system/multi-user.target.wants")
                .join(unit)
                .symlink_metadata()
                .is_ok(),
            "{unit} was not enabled by an offline installation"
        );
    }
    // Relay to the image's own sshd.
    std::fs::write(root.join("etc/ferryd/ferryd.toml"), TEST_CONFIG).unwrap();

    let share = TempDir::new("image-share");
    let c = Container::boot(&root, share.path());
    c.wait_for("systemctl is-active ferryd", "active", Duration::from_secs(30));
    c.wait_for(
        "systemctl is-active ferryd-nat",
        "active",
        Duration::from_secs(30),
    );
    c.wait_for(
        "exec 3<>/dev/tcp/127.0.0.1/60001; head -c 7 <&3",
        "SSH-2.0",
        Duration::from_secs(10),
    );
}
