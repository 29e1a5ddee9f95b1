//! NAT when the world around it fails: a failing or hung iptables, NAT turned off, a live
//! upgrade, a dead NAT keeper; the relay never waits on any of it.

use super::*;

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
            bin(),
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
    daemon.expect_log(" ready config=", Duration::from_secs(5));
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

    let killed = keeper.expect_log(
        "did not finish within 20s and was killed",
        Duration::from_secs(30),
    );
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
    keeper.expect_log("NAT rules installed", Duration::from_secs(20));
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
    keeper.expect_log("NAT rules installed", Duration::from_secs(10));
    assert_eq!(
        topo.get_from_buildvm("http://192.0.2.1/"),
        Ok("192.0.2.2".to_string())
    );
    keeper.rewrite_config(&without_nat);
    keeper.signal(nix::sys::signal::Signal::SIGHUP);
    daemon.rewrite_config(&without_nat);
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    keeper.expect_log(
        "NAT is off in the configuration: ferryd's rules",
        Duration::from_secs(10),
    );
    daemon.expect_log("configuration reloaded", Duration::from_secs(10));
    // The relay learns it from the keeper's report (written and read once a second each).
    let disabled = || {
        let status = health_in_proxy(&topo, "/status");
        status.contains("\"state\":\"disabled\"").then_some(status)
    };
    until(disabled, Duration::from_secs(10))
        .unwrap_or_else(|| panic!("NAT not reported disabled: {}", health_in_proxy(&topo, "/status")));
    assert!(!topo.save("filter").contains("FERRYD"));
    assert!(!topo.save("nat").contains("FERRYD"));
    assert_eq!(topo.sh("proxy", "cat /proc/sys/net/ipv4/ip_forward").trim(), "0");
    assert!(topo.get_from_buildvm("http://192.0.2.1/").is_err());
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
    keeper.expect_log(
        "NAT is off in the configuration: ferryd's rules",
        Duration::from_secs(10),
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
    keeper.expect_log("NAT rules installed", Duration::from_secs(30));
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
            bin(),
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
    daemon.expect_log(" ready config=", Duration::from_secs(10));
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
