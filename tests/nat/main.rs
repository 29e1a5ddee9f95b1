//! NAT egress in network namespaces the test builds and always removes (root only); the
//! topology is in tests/common/netns.rs.

#[path = "../common/mod.rs"]
mod common;
mod failures;

use std::process::Command;
use std::time::{Duration, Instant};

use common::netns::*;
use common::*;

fn nat_config(extra_nat: &str) -> String {
    topology_config("", "127.0.0.1:60080", extra_nat)
}

fn write_config(dir: &TempDir, text: &str) -> String {
    let path = dir.path().join("ferryd.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn nat_up_is_idempotent_keeps_foreign_rules_and_down_restores() {
    if !can_run() {
        return;
    }
    let mut topo = Topology::new();
    topo.start_web(80);
    let dir = TempDir::new("nat-config");
    let config = write_config(&dir, &nat_config(""));

    assert!(
        topo.get_from_buildvm("http://192.0.2.1/").is_err(),
        "egress works before NAT?"
    );

    // Foreign rules, two per chain so their order can be checked.
    topo.sh("proxy", "iptables -A FORWARD -s 203.0.113.1/32 -m comment --comment foreign-1 -j ACCEPT && iptables -A FORWARD -s 203.0.113.2/32 -m comment --comment foreign-2 -j ACCEPT");
    topo.sh("proxy", "iptables -t nat -A POSTROUTING -d 203.0.113.1/32 -m comment --comment foreign-3 -j RETURN && iptables -t nat -A POSTROUTING -d 203.0.113.2/32 -m comment --comment foreign-4 -j RETURN");
    let foreign = |topo: &Topology| -> Vec<String> {
        let mut rules = topo.rules_of("filter", "FORWARD");
        rules.extend(topo.rules_of("nat", "POSTROUTING"));
        rules.into_iter().filter(|r| r.contains("foreign")).collect()
    };
    let foreign_before = foreign(&topo);
    assert_eq!(foreign_before.len(), 4);

    let up = topo.ferryd(&["nat", "up", "--config", &config]);
    assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));
    assert_eq!(topo.sh("proxy", "cat /proc/sys/net/ipv4/ip_forward").trim(), "1");
    assert_eq!(
        topo.get_from_buildvm("http://192.0.2.1/"),
        Ok("192.0.2.2".to_string()),
        "server sees the proxy's uplink address"
    );

    // The jumps come first in the built-in chains; foreign rules keep their order.
    assert!(topo.rules_of("filter", "FORWARD")[0].contains("-j FERRYD-FORWARD"));
    assert!(topo.rules_of("nat", "POSTROUTING")[0].contains("-j FERRYD-POSTROUTING"));
    assert_eq!(foreign(&topo), foreign_before);

    // A second `up` changes nothing: same rules, one copy each, counters not reset.
    let masq_counter = |topo: &Topology| -> u64 {
        let saved = topo.sh("proxy", "iptables-save -c -t nat");
        let line = saved
            .lines()
            .find(|l| l.contains("-j MASQUERADE"))
            .unwrap()
            .to_string();
        line[1..line.find(':').unwrap()].parse().unwrap()
    };
    let before = (topo.save("filter"), topo.save("nat"));
    let packets = masq_counter(&topo);
    assert!(packets >= 1, "the GET went through the masquerade rule");
    let again = topo.ferryd(&["nat", "up", "--config", &config]);
    assert!(again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("nothing changed"),
        "{}",
        String::from_utf8_lossy(&again.stdout)
    );
    let strip = |s: &str| {
        s.lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(strip(&topo.save("filter")), strip(&before.0));
    assert_eq!(strip(&topo.save("nat")), strip(&before.1));
    assert_eq!(masq_counter(&topo), packets, "counters survive a second up");
    assert_eq!(
        topo.rules_of("filter", "FORWARD")
            .iter()
            .filter(|r| r.contains("FERRYD"))
            .count(),
        1
    );

    let status = topo.ferryd(&["nat", "status", "--config", &config]);
    let report = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{report}");
    assert!(report.contains("in sync:       yes"), "{report}");
    assert!(
        report.contains("out interface: eth0 (IPv4 default route)"),
        "{report}"
    );
    assert!(report.contains("MASQUERADE"), "{report}");

    let down = topo.ferryd(&["nat", "down"]);
    assert!(down.status.success(), "{}", String::from_utf8_lossy(&down.stderr));
    assert!(!topo.save("filter").contains("FERRYD"));
    assert!(!topo.save("nat").contains("FERRYD"));
    assert_eq!(
        topo.sh("proxy", "cat /proc/sys/net/ipv4/ip_forward").trim(),
        "0",
        "ip_forward restored"
    );
    assert_eq!(foreign(&topo), foreign_before, "foreign rules untouched by down");
    assert!(topo.get_from_buildvm("http://192.0.2.1/").is_err());
}

#[test]
fn allow_destinations_restricts_egress() {
    if !can_run() {
        return;
    }
    let mut topo = Topology::new();
    topo.start_web(80);
    topo.start_web(8080);
    let dir = TempDir::new("nat-config");
    let config = write_config(&dir, &nat_config("allow_destinations = [\"192.0.2.1/32:80\"]"));
    let up = topo.ferryd(&["nat", "up", "--config", &config]);
    assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));
    assert_eq!(
        topo.get_from_buildvm("http://192.0.2.1:80/"),
        Ok("192.0.2.2".to_string())
    );
    assert!(
        topo.get_from_buildvm("http://192.0.2.1:8080/").is_err(),
        "8080 is not allowed"
    );
}

#[test]
fn daemon_repairs_drift_and_relays_while_the_build_vm_downloads() {
    if !can_run() {
        return;
    }
    let mut topo = Topology::new();
    topo.start_web(80);
    let keys = TempDir::new("sshd");
    let sshd = std::path::Path::new("/usr/sbin/sshd").exists()
        && Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(keys.path().join("host_key"))
            .status()
            .is_ok_and(|s| s.success());
    if sshd {
        std::fs::create_dir_all("/run/sshd").unwrap();
        let key = keys.path().join("host_key").display().to_string();
        topo.spawn(
            "buildvm",
            &[
                "/usr/sbin/sshd",
                "-D",
                "-e",
                "-f",
                "/dev/null",
                "-h",
                &key,
                "-o",
                "ListenAddress=10.0.1.4:22",
                "-o",
                "PidFile=none",
            ],
        );
    } else {
        common::skip::skipped(
            "(part) sshd is not installed: the build VM runs a TCP echo on port 22 instead",
        );
        topo.spawn("buildvm", &["python3", "-c", ECHO]);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !topo.sh("buildvm", "ss -ltnH").contains(":22 ") {
        assert!(Instant::now() < deadline, "port 22 did not open in the build VM");
        std::thread::sleep(Duration::from_millis(50));
    }

    let config = nat_config("reconcile_interval = \"1s\"");
    let keeper = topo.keeper(&config, None);
    let daemon = topo.daemon(&config, None);
    daemon.expect_log(" ready config=", Duration::from_secs(10));
    keeper.expect_log("NAT rules installed", Duration::from_secs(5));

    // The load balancer reaches the build VM's port 22 through the relay while the build VM
    // downloads through NAT.
    let lb = topo.ns("lb");
    let banner = Command::new("ip")
        .args(["netns", "exec", &lb, "python3", "-c"])
        .arg("import socket; s = socket.create_connection(('10.0.0.5', 60001), timeout=5); print(s.recv(64).decode().strip())")
        .output()
        .unwrap();
    let banner = String::from_utf8_lossy(&banner.stdout);
    assert!(
        banner.starts_with("SSH-2.0-"),
        "banner through the relay: {banner:?}; log:\n{}",
        daemon.log()
    );
    if sshd {
        assert!(banner.contains("OpenSSH"), "{banner}");
    }
    assert_eq!(
        topo.get_from_buildvm("http://192.0.2.1/"),
        Ok("192.0.2.2".to_string())
    );

    // Someone flushes ferryd's chains and removes a jump: repaired within a reconcile interval.
    topo.sh("proxy", "iptables -F FERRYD-FORWARD && iptables -t nat -F FERRYD-POSTROUTING && iptables -D FORWARD -m comment --comment ferryd -j FERRYD-FORWARD");
    keeper.expect_log("NAT state had drifted; repaired", Duration::from_secs(5));
    assert_eq!(
        topo.get_from_buildvm("http://192.0.2.1/"),
        Ok("192.0.2.2".to_string())
    );
    // The relay reads it all from the keeper's report (within two seconds: the keeper writes
    // it every second, the relay reads it every second), and counts the repair.
    status_says(&topo, &["\"state\":\"ok\"", "\"repairs\":1"]);

    // SIGKILL of either process leaves NAT in place: the build VM keeps its way out while
    // ferryd is down.
    let (mut daemon, mut keeper) = (daemon, keeper);
    daemon.signal(nix::sys::signal::Signal::SIGKILL);
    daemon.wait_exit(Duration::from_secs(5)).expect("killed");
    keeper.signal(nix::sys::signal::Signal::SIGKILL);
    keeper.wait_exit(Duration::from_secs(5)).expect("killed");
    assert!(
        topo.save("nat").contains("-j FERRYD-POSTROUTING"),
        "NAT removed by a kill"
    );
    assert_eq!(
        topo.get_from_buildvm("http://192.0.2.1/"),
        Ok("192.0.2.2".to_string())
    );
}

/// On iptables 1.6.1 (Ubuntu 18.04) iptables-restore has no `--wait` and takes no lock, so ferryd
/// must hold /run/xtables.lock itself. Stand-in tools report 1.6.1, refuse `--wait` as 1.6.1
/// does, and fail unless the lock is held while they run.
#[test]
fn nat_up_with_iptables_1_6_1_holds_the_xtables_lock() {
    if !can_run() {
        return;
    }
    let Some(real_restore) = ["/usr/sbin/iptables-nft-restore", "/usr/sbin/iptables-restore"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
    else {
        common::skip::skipped("no iptables-restore to stand behind the 1.6.1 shims");
        return;
    };
    let real_save = real_restore.replace("-restore", "-save");
    let real_iptables = real_restore.replace("-restore", "");
    let shims = TempDir::new("ipt161");
    let write = |name: &str, body: String| {
        use std::os::unix::fs::PermissionsExt;
        let path = shims.path().join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    write(
        "iptables",
        format!(
            "[ \"$1\" = --version ] && {{ echo 'iptables v1.6.1'; exit 0; }}\nexec {real_iptables} \"$@\"\n"
        ),
    );
    write("iptables-save", format!("exec {real_save} \"$@\"\n"));
    write(
        "iptables-restore",
        format!(
            "for a in \"$@\"; do [ \"$a\" = --wait ] && {{ echo \"iptables-restore: unrecognized option '--wait'\" >&2; exit 2; }}; done\n\
             if flock -n /run/xtables.lock true; then echo 'xtables lock not held by the caller' >&2; exit 3; fi\n\
             exec {real_restore} \"$@\"\n"
        ),
    );

    let mut topo = Topology::new();
    topo.start_web(80);
    let dir = TempDir::new("nat-config");
    let config = write_config(&dir, &nat_config(""));
    let path = format!(
        "{}:{}",
        shims.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let up = Command::new("ip")
        .args([
            "netns",
            "exec",
            &topo.ns("proxy"),
            bin(),
            "nat",
            "up",
            "--config",
            &config,
        ])
        .env("STATE_DIRECTORY", topo.state.path())
        .env("PATH", &path)
        .output()
        .unwrap();
    assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stderr));
    assert_eq!(
        topo.get_from_buildvm("http://192.0.2.1/"),
        Ok("192.0.2.2".to_string())
    );
}

/// The real iptables tools behind the stand-ins: (iptables, iptables-save, iptables-restore).
fn real_tools() -> Option<(String, String, String)> {
    let restore = ["/usr/sbin/iptables-nft-restore", "/usr/sbin/iptables-restore"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())?;
    Some((
        restore.replace("-restore", ""),
        restore.replace("-restore", "-save"),
        restore.to_string(),
    ))
}

/// A directory of stand-in tools to put first on PATH.
fn stand_ins(tools: &[(&str, String)]) -> TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("stand-ins");
    for (name, body) in tools {
        let path = dir.path().join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    dir
}

fn path_with(dir: &TempDir) -> String {
    format!(
        "{}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// Waits (up to 3 s: the keeper writes its report every second, the relay reads it every
/// second) until the relay's `/status` contains every one of `needles`.
fn status_says(topo: &Topology, needles: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let status = health_in_proxy(topo, "/status");
        if needles.iter().all(|n| status.contains(n)) {
            return;
        }
        assert!(Instant::now() < deadline, "waited for {needles:?} in {status}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// GET on the proxy's health endpoint from inside its namespace: "STATUS BODY".
fn health_in_proxy(topo: &Topology, path: &str) -> String {
    let script = format!(
        "import http.client; c = http.client.HTTPConnection('127.0.0.1', 60080, timeout=5); c.request('GET', '{path}'); r = c.getresponse(); print(r.status, r.read().decode().strip())"
    );
    let out = Command::new("ip")
        .args(["netns", "exec", &topo.ns("proxy"), "python3", "-c", &script])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The banner of the build VM's port 22 read through the relay from the load balancer's side.
fn banner_through_relay(topo: &Topology) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &topo.ns("lb"), "python3", "-c"])
        .arg("import socket; s = socket.create_connection(('10.0.0.5', 60001), timeout=5); print(s.recv(64).decode().strip())")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn start_echo_sshd(topo: &mut Topology) {
    topo.spawn("buildvm", &["python3", "-c", ECHO]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !topo.sh("buildvm", "ss -ltnH").contains(":22 ") {
        assert!(Instant::now() < deadline, "port 22 did not open in the build VM");
        std::thread::sleep(Duration::from_millis(50));
    }
}
