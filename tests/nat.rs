//! NAT egress in network namespaces the test builds and always removes (root only); the
//! topology is in tests/common/netns.rs.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::netns::*;
use common::*;

fn nat_config(extra_nat: &str) -> String {
    format!(
        r#"allow = ["10.0.0.0/24"]
probe_sources = ["10.0.0.99/32"]
drain_timeout = "1s"

[[route]]
name = "ssh"
listen = "0.0.0.0:60001"
upstream = "10.0.1.4:22"

[health]
listen = "127.0.0.1:60080"

[nat]
sources = ["10.0.1.4/32"]
{extra_nat}
"#
    )
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
        eprintln!("sshd not installed: the build VM runs a TCP echo on port 22 instead");
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
    assert!(
        daemon
            .wait_for_log(" ready config=", Duration::from_secs(10))
            .is_some(),
        "{}",
        daemon.log()
    );
    assert!(
        keeper
            .wait_for_log("NAT rules installed", Duration::from_secs(5))
            .is_some(),
        "{}",
        keeper.log()
    );

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
    assert!(
        keeper
            .wait_for_log("NAT state had drifted; repaired", Duration::from_secs(5))
            .is_some(),
        "{}",
        keeper.log()
    );
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
            BIN,
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

/// NAT fails closed: an iptables-restore that rejects the nat table's input (after the filter
/// table went in) leaves ip_forward as it was, no ferryd rule behind, and the build VM without a
/// way out.
#[test]
fn failed_nat_up_leaves_forwarding_off_and_no_rule_behind() {
    if !can_run() {
        return;
    }
    let Some((_, _, real_restore)) = real_tools() else {
        common::skip::skipped("no iptables-restore to stand behind");
        return;
    };
    let tools = stand_ins(&[(
        "iptables-restore",
        format!(
            "input=$(cat)\n\
             case \"$input\" in *MASQUERADE*) echo 'iptables-restore: line 4 failed' >&2; exit 1;; esac\n\
             printf '%s\\n' \"$input\" | exec {real_restore} \"$@\"\n"
        ),
    )]);
    let mut topo = Topology::new();
    topo.start_web(80);
    let dir = TempDir::new("nat-config");
    let config = write_config(&dir, &nat_config(""));
    let up = Command::new("ip")
        .args([
            "netns",
            "exec",
            &topo.ns("proxy"),
            BIN,
            "nat",
            "up",
            "--config",
            &config,
        ])
        .env("STATE_DIRECTORY", topo.state.path())
        .env("PATH", path_with(&tools))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&up.stderr);
    assert!(!up.status.success(), "nat up must fail: {stderr}");
    assert!(stderr.contains("line 4 failed"), "{stderr}");
    assert!(stderr.contains("removed again"), "{stderr}");
    assert_eq!(
        topo.sh("proxy", "cat /proc/sys/net/ipv4/ip_forward").trim(),
        "0",
        "ip_forward unchanged"
    );
    assert!(!topo.save("filter").contains("FERRYD"), "{}", topo.save("filter"));
    assert!(!topo.save("nat").contains("FERRYD"), "{}", topo.save("nat"));
    assert!(
        topo.get_from_buildvm("http://192.0.2.1/").is_err(),
        "nothing is forwarded"
    );
}

/// A hung iptables never holds the relay: READY comes at once, the relay and the probe work,
/// the stuck command is killed after its bound and reported, and NAT converges once iptables
/// answers again.
#[test]
fn hung_iptables_is_killed_after_its_bound_and_never_delays_the_relay() {
    if !can_run() {
        return;
    }
    let Some((_, _, real_restore)) = real_tools() else {
        common::skip::skipped("no iptables-restore to stand behind");
        return;
    };
    let hang = TempDir::new("hang-flag");
    let flag = hang.path().join("hang");
    std::fs::write(&flag, "").unwrap();
    // `exec -a` gives the sleeping process a name this test can look for afterwards.
    let tools = stand_ins(&[(
        "iptables-restore",
        format!(
            "if [ -e {flag} ]; then bash -c 'exec -a ferryd-test-hung-restore sleep 600'; fi\nexec {real_restore} \"$@\"\n",
            flag = flag.display()
        ),
    )]);
    let mut topo = Topology::new();
    start_echo_sshd(&mut topo);
    let started = Instant::now();
    // The next attempt comes 5 s after the killed one: time enough to look for leftovers and
    // lift the hang before it starts (with 1 s, a loaded machine would see a second hang).
    let config = nat_config("reconcile_interval = \"5s\"");
    let keeper = topo.keeper(&config, Some(&path_with(&tools)));
    let daemon = topo.daemon(&config, None);
    assert!(
        daemon
            .wait_for_log(" ready config=", Duration::from_secs(5))
            .is_some(),
        "{}",
        daemon.log()
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        banner_through_relay(&topo).starts_with("SSH-2.0-"),
        "{}",
        daemon.log()
    );
    assert!(
        health_in_proxy(&topo, "/healthz").starts_with("200"),
        "{}",
        daemon.log()
    );
    assert!(
        health_in_proxy(&topo, "/status").contains("\"state\":\"pending\""),
        "{}",
        health_in_proxy(&topo, "/status")
    );

    let killed = keeper
        .wait_for_log(
            "did not finish within 20s and was killed",
            Duration::from_secs(30),
        )
        .unwrap_or_else(|| panic!("{}", keeper.log()));
    assert!(killed.contains("cannot put the NAT rules in place"), "{killed}");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(19), "killed after {waited:?}");
    let leftovers = Command::new("pgrep")
        .args(["-f", "ferryd-test-hung-restore"])
        .output()
        .unwrap();
    assert!(
        leftovers.stdout.is_empty(),
        "the hung command's processes were left: {}",
        String::from_utf8_lossy(&leftovers.stdout)
    );
    status_says(&topo, &["\"state\":\"failed\""]);
    assert!(health_in_proxy(&topo, "/healthz").starts_with("200"));

    std::fs::remove_file(&flag).unwrap();
    assert!(
        keeper
            .wait_for_log("NAT rules installed", Duration::from_secs(20))
            .is_some(),
        "{}",
        keeper.log()
    );
    status_says(&topo, &["\"state\":\"ok\""]);
    assert_eq!(topo.sh("proxy", "cat /proc/sys/net/ipv4/ip_forward").trim(), "1");
}

/// `[nat]` removed: at the reload, and at a start, ferryd's rules and chains go and ip_forward
/// is restored, as `ferryd nat down` does; the relay is untouched.
#[test]
fn turning_nat_off_removes_the_rules_at_reload_and_at_start() {
    if !can_run() {
        return;
    }
    let mut topo = Topology::new();
    topo.start_web(80);
    start_echo_sshd(&mut topo);
    let path = std::env::var("PATH").unwrap_or_default();
    let config = nat_config("reconcile_interval = \"1s\"");
    let without_nat = config[..config.find("[nat]").unwrap()].to_string();

    // Reload: systemd's PropagatesReloadTo= reloads both processes; here, each by hand.
    let mut keeper = topo.keeper(&config, Some(&path));
    let mut daemon = topo.daemon(&config, None);
    assert!(
        keeper
            .wait_for_log("NAT rules installed", Duration::from_secs(10))
            .is_some(),
        "{}",
        keeper.log()
    );
    assert_eq!(
        topo.get_from_buildvm("http://192.0.2.1/"),
        Ok("192.0.2.2".to_string())
    );
    keeper.rewrite_config(&without_nat);
    keeper.signal(nix::sys::signal::Signal::SIGHUP);
    daemon.rewrite_config(&without_nat);
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(
        keeper
            .wait_for_log(
                "NAT is off in the configuration: ferryd's rules",
                Duration::from_secs(10)
            )
            .is_some(),
        "{}",
        keeper.log()
    );
    daemon
        .wait_for_log("configuration reloaded", Duration::from_secs(10))
        .expect("the relay reloaded");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!topo.save("filter").contains("FERRYD"));
    assert!(!topo.save("nat").contains("FERRYD"));
    assert_eq!(topo.sh("proxy", "cat /proc/sys/net/ipv4/ip_forward").trim(), "0");
    assert!(topo.get_from_buildvm("http://192.0.2.1/").is_err());
    assert!(health_in_proxy(&topo, "/status").contains("\"state\":\"disabled\""));
    assert!(banner_through_relay(&topo).starts_with("SSH-2.0-"));
    daemon.stop();
    keeper.stop();

    // Start: NAT left in place by a stopped daemon, then a start without [nat].
    let up = topo.ferryd(&[
        "nat",
        "up",
        "--config",
        &write_config(&TempDir::new("c"), &config),
    ]);
    assert!(up.status.success());
    assert!(topo.save("nat").contains("FERRYD"));
    let keeper = topo.keeper(&without_nat, Some(&path));
    assert!(
        keeper
            .wait_for_log(
                "NAT is off in the configuration: ferryd's rules",
                Duration::from_secs(10)
            )
            .is_some(),
        "{}",
        keeper.log()
    );
    assert!(!topo.save("nat").contains("FERRYD"));
    assert_eq!(topo.sh("proxy", "cat /proc/sys/net/ipv4/ip_forward").trim(), "0");
}

/// NAT's state crosses a live upgrade: with `require_nat`, the probe answers 200 right after the
/// upgrade, rather than 503 ("nat: not applied yet") until the new image's first reconcile has
/// run iptables (made slow here, as on a busy VM).
#[test]
fn nat_state_crosses_a_live_upgrade() {
    if !can_run() {
        return;
    }
    let Some((iptables, save, restore)) = real_tools() else {
        common::skip::skipped("no iptables-restore");
        return;
    };
    let topo = Topology::new();
    let slow = stand_ins(&[
        ("iptables", format!("sleep 1\nexec {iptables} \"$@\"\n")),
        ("iptables-save", format!("sleep 1\nexec {save} \"$@\"\n")),
        ("iptables-restore", format!("sleep 1\nexec {restore} \"$@\"\n")),
    ]);
    let config = nat_config("reconcile_interval = \"60s\"").replace(
        "[health]\nlisten = \"127.0.0.1:60080\"\n",
        "[health]\nlisten = \"127.0.0.1:60080\"\nrequire_nat = true\n",
    );
    assert!(config.contains("require_nat"), "{config}");
    let keeper = topo.keeper(&config, Some(&path_with(&slow)));
    let daemon = topo.daemon(&config, None);
    assert!(
        keeper
            .wait_for_log("NAT rules installed", Duration::from_secs(30))
            .is_some(),
        "{}",
        keeper.log()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !health_in_proxy(&topo, "/healthz").starts_with("200") {
        assert!(Instant::now() < deadline, "{}", daemon.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &topo.ns("proxy"),
            BIN,
            "upgrade",
            "--timeout",
            "20",
            "--config",
        ])
        .arg(&daemon.config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        daemon.log()
    );
    let probe = health_in_proxy(&topo, "/healthz");
    assert!(
        probe.starts_with("200"),
        "the probe right after the upgrade: {probe}\n{}",
        daemon.log()
    );
}

/// The NAT keeper killed: the relay's `/status` says NAT failed, naming the dead keeper, within
/// a second or two (not a reconcile interval later), the probe turns 503 with `require_nat`, and
/// SSH keeps being relayed; a keeper started again brings it back.
#[test]
fn a_dead_nat_keeper_is_seen_by_the_relay_at_once() {
    if !can_run() {
        return;
    }
    let mut topo = Topology::new();
    start_echo_sshd(&mut topo);
    let config = nat_config("reconcile_interval = \"30s\"").replace(
        "[health]\nlisten = \"127.0.0.1:60080\"\n",
        "[health]\nlisten = \"127.0.0.1:60080\"\nrequire_nat = true\n",
    );
    let mut keeper = topo.keeper(&config, None);
    let daemon = topo.daemon(&config, None);
    daemon
        .wait_for_log(" ready config=", Duration::from_secs(10))
        .expect("the relay is ready");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !health_in_proxy(&topo, "/healthz").starts_with("200") {
        assert!(Instant::now() < deadline, "{}\n{}", daemon.log(), keeper.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    keeper.signal(nix::sys::signal::Signal::SIGKILL);
    keeper.wait_exit(Duration::from_secs(5)).expect("killed");
    let killed = Instant::now();
    let probe = loop {
        let probe = health_in_proxy(&topo, "/healthz");
        if probe.starts_with("503") {
            break probe;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(3),
            "still {probe} after the keeper died"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        probe.contains("NAT keeper") && probe.contains("not running"),
        "{probe}"
    );
    println!(
        "keeper killed: the probe said {probe:?} after {:?}",
        killed.elapsed()
    );
    assert!(health_in_proxy(&topo, "/status").contains("\"state\":\"failed\""));
    assert!(banner_through_relay(&topo).starts_with("SSH-2.0-"));
    // The rules stayed: the build VM's way out does not depend on the keeper running.
    assert!(topo.save("nat").contains("FERRYD-POSTROUTING"));
    let _keeper = topo.keeper(&config, None);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !health_in_proxy(&topo, "/healthz").starts_with("200") {
        assert!(Instant::now() < deadline, "{}", daemon.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}
