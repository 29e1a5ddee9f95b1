//! `ferryd doctor` against real failures, in network namespaces (root only): each failure is
//! created, doctor names it with FAIL (or warn, for the allowlist), exits 1, and `--json` gives
//! the same verdict. A healthy setup has no FAIL and exits 0.

mod common;

use std::time::{Duration, Instant};

use common::netns::*;
use common::*;

/// A configuration in the topology: relay 60001 → the build VM's 22, NAT on, probes from the
/// load balancer's 10.0.0.99.
fn config(reconcile: &str) -> String {
    topology_config(
        r#"connect_timeout = "2s""#,
        "0.0.0.0:60080",
        &format!("reconcile_interval = \"{reconcile}\"\ncheck_target = \"192.0.2.1:80\""),
    )
}

/// Doctor's verdicts by check, from a text run and a JSON run of the same state.
struct Report {
    text: String,
    code: Option<i32>,
    json: Vec<(String, String, String)>,
}

impl Report {
    fn status_of(&self, check: &str) -> Option<&str> {
        self.json
            .iter()
            .find(|(c, _, _)| c == check)
            .map(|(_, s, _)| s.as_str())
    }

    fn detail_of(&self, check: &str) -> &str {
        self.json
            .iter()
            .find(|(c, _, _)| c == check)
            .map_or("", |(_, _, d)| d.as_str())
    }

    /// `check` failed, in the text as in the JSON, and doctor exited 1.
    fn assert_fails(&self, check: &str, seen: &str) {
        assert_eq!(self.status_of(check), Some("fail"), "{check}:\n{}", self.text);
        assert!(
            self.text
                .lines()
                .any(|l| l.starts_with(&format!("FAIL {check}:"))),
            "{}",
            self.text
        );
        assert!(
            self.detail_of(check).contains(seen),
            "{check}: {}",
            self.detail_of(check)
        );
        assert_eq!(self.code, Some(1), "{}", self.text);
    }
}

fn doctor(topo: &Topology, config: &str) -> Report {
    let run = |json: bool| {
        let mut args = vec!["doctor", "--config", config];
        if json {
            args.push("--json");
        }
        let started = Instant::now();
        let out = topo.ferryd(&args);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "doctor took {:?}",
            started.elapsed()
        );
        out
    };
    let text = run(false);
    let json = run(true);
    let parsed: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let json = parsed
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["check"].as_str().unwrap().to_string(),
                f["status"].as_str().unwrap().to_string(),
                f["detail"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    Report {
        text: String::from_utf8_lossy(&text.stdout).into_owned(),
        code: text.status.code(),
        json,
    }
}

fn probe(topo: &Topology) {
    // The load balancer's prober, from its own address.
    topo.sh("lb", "ip addr add 10.0.0.99/24 dev eth0 2>/dev/null || true");
    let out = topo.try_sh(
        "lb",
        "python3 -c \"import socket; s = socket.socket(); s.bind(('10.0.0.99', 0)); s.connect(('10.0.0.5', 60001)); s.close()\"",
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// The relay and the NAT keeper on `config`.
fn start_daemon(topo: &Topology, config: &str) -> (Daemon, Daemon) {
    let keeper = topo.keeper(config, None);
    let daemon = topo.daemon(config, None);
    daemon.expect_log(" ready config=", Duration::from_secs(10));
    (daemon, keeper)
}

#[test]
fn doctor_names_each_failure_and_passes_a_healthy_setup() {
    if !can_run() {
        return;
    }
    let mut topo = Topology::new();
    topo.sh(
        "proxy",
        "sysctl -qw net.ipv4.ip_local_reserved_ports=60000-60001,60080",
    );
    topo.spawn("buildvm", &["python3", "-c", ECHO]);
    topo.start_web(80);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !topo.sh("buildvm", "ss -ltnH").contains(":22 ") {
        assert!(Instant::now() < deadline, "port 22 did not open in the build VM");
        std::thread::sleep(Duration::from_millis(50));
    }
    let dir = TempDir::new("doctor");
    let path = dir.path().join("ferryd.toml");
    std::fs::write(&path, config("1h")).unwrap();
    let path = path.display().to_string();

    // Healthy: the daemon runs, NAT is in place, a probe arrived.
    let (mut daemon, keeper) = start_daemon(&topo, &config("1h"));
    keeper.expect_log("NAT rules installed", Duration::from_secs(10));
    probe(&topo);
    // The build VM downloads through NAT: ferryd's MASQUERADE counts it.
    assert_eq!(
        topo.get_from_buildvm("http://192.0.2.1/"),
        Ok("192.0.2.2".to_string())
    );
    let healthy = doctor(&topo, &path);
    assert_eq!(healthy.code, Some(0), "{}", healthy.text);
    for (check, status, _) in &healthy.json {
        // Outside systemd, the unit can only be a warning.
        if check != "unit" {
            assert_eq!(status, "ok", "{check} in a healthy setup:\n{}", healthy.text);
        }
    }

    // Denied connections from an address outside the allowlist: named, with the count.
    topo.sh("lb", "ip addr add 10.0.5.7/32 dev eth0");
    topo.sh("proxy", "ip route add 10.0.5.7/32 dev eth2");
    for _ in 0..3 {
        let _ = topo.try_sh(
            "lb",
            "python3 -c \"import socket; s = socket.socket(); s.bind(('10.0.5.7', 0)); s.settimeout(2); s.connect(('10.0.0.5', 60001)); s.recv(1)\"",
        );
    }
    let denied = doctor(&topo, &path);
    assert_eq!(
        denied.status_of("route ssh: allowlist"),
        Some("warn"),
        "{}",
        denied.text
    );
    assert!(
        denied
            .detail_of("route ssh: allowlist")
            .contains("10.0.5.7 (3 times"),
        "{}",
        denied.text
    );

    // The upstream drops SYNs (a firewall in the build VM): timed out.
    topo.sh("buildvm", "iptables -I INPUT -p tcp --dport 22 -j DROP");
    let dropped = doctor(&topo, &path);
    eprintln!("doctor with the build VM dropping SYNs:\n{}", dropped.text);
    dropped.assert_fails("route ssh: upstream", "did not answer");
    topo.sh("buildvm", "iptables -D INPUT -p tcp --dport 22 -j DROP");

    // Nothing listens on the upstream port: refused.
    topo.sh(
        "buildvm",
        "iptables -I INPUT -p tcp --dport 22 -j REJECT --reject-with tcp-reset",
    );
    doctor(&topo, &path).assert_fails("route ssh: upstream", "refused");
    topo.sh(
        "buildvm",
        "iptables -D INPUT -p tcp --dport 22 -j REJECT --reject-with tcp-reset",
    );

    // The host firewall drops the probe source.
    topo.sh("proxy", "iptables -I INPUT -s 10.0.0.99 -j DROP");
    doctor(&topo, &path).assert_fails("host firewall", "10.0.0.99");
    topo.sh("proxy", "iptables -D INPUT -s 10.0.0.99 -j DROP");

    // NAT: ip_forward off; ferryd's chain flushed; FORWARD policy DROP without ferryd's accept.
    // (reconcile_interval is an hour here, so the daemon does not repair them first.)
    topo.sh("proxy", "echo 0 > /proc/sys/net/ipv4/ip_forward");
    doctor(&topo, &path).assert_fails("nat: ip_forward", "= 0");
    topo.sh("proxy", "echo 1 > /proc/sys/net/ipv4/ip_forward");
    topo.sh("proxy", "iptables -F FERRYD-FORWARD");
    doctor(&topo, &path).assert_fails("nat: rules", "FERRYD-FORWARD");
    topo.sh(
        "proxy",
        "iptables -P FORWARD DROP && iptables -D FORWARD -m comment --comment ferryd -j FERRYD-FORWARD",
    );
    doctor(&topo, &path).assert_fails("nat: forward policy", "DROP");
    topo.sh("proxy", "iptables -P FORWARD ACCEPT");

    // Probes stop: no probe for longer than 30 s.
    let quiet_since = Instant::now();
    while quiet_since.elapsed() < Duration::from_secs(32) {
        std::thread::sleep(Duration::from_millis(500));
    }
    doctor(&topo, &path).assert_fails("probes", "no probe for");

    // The daemon stopped and someone else holds the listen port.
    daemon.stop();
    topo.spawn(
        "proxy",
        &["python3", "-c", "import socket, time; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', 60001)); s.listen(); time.sleep(60)"],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !topo.sh("proxy", "ss -ltnH").contains(":60001 ") {
        assert!(Instant::now() < deadline, "the squatter did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let held = doctor(&topo, &path);
    held.assert_fails("route ssh: listening", "held by python3");
    assert_eq!(held.status_of("daemon"), Some("warn"), "{}", held.text);
}

/// The proxy VM's own way out, which the build VM's NAT rides on: each way of not having one is
/// named, with its likely cause; and a build VM whose traffic does not come through the proxy VM
/// shows as MASQUERADE having counted nothing.
#[test]
fn doctor_names_what_keeps_the_proxy_vm_from_getting_out() {
    if !can_run() {
        return;
    }
    let mut topo = Topology::new();
    topo.start_web(80);
    topo.spawn("buildvm", &["python3", "-c", ECHO]);
    let dir = TempDir::new("doctor-egress");
    let path = dir.path().join("ferryd.toml");
    std::fs::write(&path, config("1h")).unwrap();
    let path = path.display().to_string();
    let (_daemon, keeper) = start_daemon(&topo, &config("1h"));
    keeper.expect_log("NAT rules installed", Duration::from_secs(10));

    // Out, but the build VM's traffic does not come this way: MASQUERADE counted nothing.
    topo.sh("buildvm", "ip route replace default dev eth0");
    let report = doctor(&topo, &path);
    eprintln!("doctor with the build VM routed elsewhere:\n{}", report.text);
    assert_eq!(report.status_of("egress"), Some("ok"), "{}", report.text);
    assert_eq!(
        report.status_of("nat: masquerade"),
        Some("warn"),
        "{}",
        report.text
    );
    assert!(
        report.detail_of("nat: masquerade").contains("counted no packet"),
        "{}",
        report.text
    );

    // The outside address drops SYNs (a private subnet without default outbound access).
    topo.sh("internet", "iptables -I INPUT -p tcp --dport 80 -j DROP");
    let dropped = doctor(&topo, &path);
    eprintln!("doctor with the way out dropping SYNs:\n{}", dropped.text);
    dropped.assert_fails("egress", "got no answer");
    topo.sh("internet", "iptables -D INPUT -p tcp --dport 80 -j DROP");

    // The resolver cannot be reached.
    let netns_etc = std::path::PathBuf::from("/etc/netns").join(topo.ns("proxy"));
    std::fs::create_dir_all(&netns_etc).unwrap();
    std::fs::write(
        netns_etc.join("resolv.conf"),
        "nameserver 192.0.2.53\noptions timeout:1 attempts:1\n",
    )
    .unwrap();
    let named = dir.path().join("named.toml");
    std::fs::write(
        &named,
        config("1h").replace("192.0.2.1:80", "downloads.example.test:80"),
    )
    .unwrap();
    let unresolved = doctor(&topo, &named.display().to_string());
    let _ = std::fs::remove_dir_all(&netns_etc);
    eprintln!("doctor with the resolver unreachable:\n{}", unresolved.text);
    unresolved.assert_fails("egress", "cannot resolve downloads.example.test:80");
    assert!(unresolved.text.contains("168.63.129.16"), "{}", unresolved.text);

    // The uplink is down: no default route at all.
    topo.sh("proxy", "ip link set eth0 down");
    let down = doctor(&topo, &path);
    eprintln!("doctor with the uplink down:\n{}", down.text);
    down.assert_fails("egress", "no IPv4 default route");
}
