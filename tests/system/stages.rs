//! The stages of the package's life under systemd, in the order the booted container goes
//! through them (each leaves the unit running for the next, except the last).

use super::*;

/// Install: both services are enabled, started and ready through notify, run as the ferryd
/// user, the relay with no capability at all and the NAT keeper with exactly two and no network
/// socket.
pub(super) fn installed(c: &Container, release: &str) {
    // Install: both services are enabled, started, and became ready through notify.
    c.ok("dpkg -i /mnt/ferryd/ferryd.deb");
    c.wait_for("systemctl is-active ferryd", "active", Duration::from_secs(20));
    c.wait_for(
        "systemctl is-active ferryd-nat",
        "active",
        Duration::from_secs(20),
    );
    assert_eq!(c.ok("systemctl is-enabled ferryd").trim(), "enabled");
    assert_eq!(c.ok("systemctl is-enabled ferryd-nat").trim(), "enabled");
    println!(
        "{release}: {}",
        c.ok("systemctl --version | head -n 1; iptables --version")
            .replace('\n', "; ")
    );
    assert!(c.ok("systemctl show -p Type ferryd").contains("Type=notify"));
    let status_text = c.ok("systemctl show -p StatusText ferryd");
    assert!(
        status_text.contains("2 routes"),
        "STATUS= from sd_notify: {status_text}"
    );
    assert_eq!(
        c.ok("cat /proc/sys/net/ipv4/ip_local_reserved_ports").trim(),
        "60000-60001,60080"
    );
    assert!(c.ok("getent passwd ferryd").starts_with("ferryd:"));
    let users = c.ok("ps -o user= -C ferryd");
    assert!(
        users.lines().count() == 2 && users.lines().all(|u| u.trim() == "ferryd"),
        "both processes run as the ferryd user: {users}"
    );
    // The relay holds nothing at all; the NAT keeper exactly NET_ADMIN and NET_RAW (bits 12
    // and 13), and has no TCP or UDP socket.
    let relay_pid = c.ok("systemctl show -p MainPID --value ferryd");
    let relay = privileges(c, &relay_pid);
    println!("{release}: the relay's {relay:?}");
    for (name, value) in &relay {
        let want = if name == "NoNewPrivs" {
            "1"
        } else {
            "0000000000000000"
        };
        assert_eq!(value, want, "{release}: the relay's {name}");
    }
    let keeper_pid = c.ok("systemctl show -p MainPID --value ferryd-nat");
    let keeper = privileges(c, &keeper_pid);
    println!("{release}: the NAT keeper's {keeper:?}");
    for (name, want) in [
        ("CapEff", "0000000000003000"),
        ("CapPrm", "0000000000003000"),
        ("NoNewPrivs", "1"),
    ] {
        assert!(
            keeper.iter().any(|(n, v)| n == name && v == want),
            "{release}: the NAT keeper's {name}: {keeper:?}"
        );
    }
    let sockets = c.ok("ss -tuapnH");
    assert!(
        !sockets.contains(&format!("pid={},", keeper_pid.trim())),
        "{release}: the NAT keeper has a network socket:\n{sockets}"
    );
}

/// The journal's MESSAGE_IDs, a configuration error (78, no restart loop), the probe, `ferryd
/// status`, and the control socket as the unit makes it.
pub(super) fn operated(c: &Container, release: &str) {
    // The journal finds the ready line by its stable MESSAGE_ID.
    let ready = c.ok(&format!(
        "journalctl -u ferryd --no-pager -o cat MESSAGE_ID={}",
        ferryd::logging::ids::READY
    ));
    assert!(ready.contains("ready"), "{ready}");

    // A configuration error stops the unit with 78 (EX_CONFIG) instead of a restart loop.
    c.ok("cp /etc/ferryd/ferryd.toml /root/good.toml && echo 'bogus_key = 1' >> /etc/ferryd/ferryd.toml");
    let _ = c.sh("systemctl restart ferryd");
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        c.ok("systemctl show -p ExecMainStatus --value ferryd").trim(),
        "78"
    );
    assert_eq!(c.ok("systemctl show -p NRestarts --value ferryd").trim(), "0");
    assert_eq!(c.ok("systemctl is-active ferryd || true").trim(), "failed");
    c.ok("cp /root/good.toml /etc/ferryd/ferryd.toml && systemctl reset-failed ferryd && systemctl start ferryd");
    c.wait_for("systemctl is-active ferryd", "active", Duration::from_secs(20));

    // The health endpoint answers the probe path from loopback.
    let health =
        c.ok("exec 3<>/dev/tcp/127.0.0.1/60080; printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3; cat <&3");
    assert!(health.starts_with("HTTP/1.0 200"), "{health}");
    // `ferryd status` reads /status and the unit over the container's system bus.
    let status = c.ok("ferryd status");
    assert!(
        status.contains("systemd:  ferryd.service active (running)"),
        "{status}"
    );
    // The control socket as the unit makes it: only root, ferryd and the ferryd group reach it.
    assert_eq!(c.ok("stat -c '%a %U:%G' /run/ferryd").trim(), "750 ferryd:ferryd");
    assert_eq!(
        c.ok("stat -c '%a %U:%G' /run/ferryd/control.sock").trim(),
        "660 ferryd:ferryd"
    );
    let unknown = c.sh("ferryd connections --close 999999");
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("no relayed connection has id 999999"),
        "{release}: root reaches the control socket: {unknown:?}"
    );
    // The package's /etc/ferryd/ferryd.toml is not readable by others: that is the first gate,
    // and the command says who may pass it.
    let packaged = c.sh("setpriv --reuid=nobody --regid=nogroup --clear-groups ferryd connections --close 1");
    assert!(
        !packaged.status.success()
            && String::from_utf8_lossy(&packaged.stderr).contains("only root and members of group ferryd"),
        "{release}: a user outside the ferryd group, the package's configuration: {packaged:?}"
    );
    // A copy that is readable, so that the socket itself is what refuses.
    c.ok("install -m 0644 /etc/ferryd/ferryd.toml /tmp/readable.toml");
    let outsider = c.sh("setpriv --reuid=nobody --regid=nogroup --clear-groups ferryd connections --config /tmp/readable.toml --close 1");
    assert!(
        !outsider.status.success() && String::from_utf8_lossy(&outsider.stderr).contains("permission denied"),
        "{release}: a user outside the ferryd group: {outsider:?}"
    );
}

/// NAT under the unit: a reload reaches the keeper, drift is repaired by the sandboxed keeper,
/// iptables missing degrades NAT and not the relay, a killed keeper is seen at once.
pub(super) fn nat_kept(c: &Container, release: &str) {
    // Our configuration (relay to the container's sshd, NAT on): a reload of the relay reaches
    // the NAT keeper too (PropagatesReloadTo=), which applies NAT.
    c.ok("cp /mnt/ferryd/ferryd.toml /etc/ferryd/ferryd.toml && systemctl reload ferryd");
    c.wait_for(
        "journalctl -u ferryd-nat --no-pager",
        "NAT keeper: configuration reloaded",
        Duration::from_secs(10),
    );
    c.wait_for("systemctl is-active ferryd", "active", Duration::from_secs(20));
    c.wait_for("iptables-save", "FERRYD-POSTROUTING", Duration::from_secs(10));
    // ip_forward goes on last (NAT fails closed).
    c.wait_for("cat /proc/sys/net/ipv4/ip_forward", "1", Duration::from_secs(10));
    // The sandboxed keeper (user ferryd, CAP_NET_ADMIN/CAP_NET_RAW only) can read and repair
    // the rules: the relay's health stays 200, and a flush is repaired.
    let probe = "exec 3<>/dev/tcp/127.0.0.1/60080; printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3; cat <&3";
    c.wait_for(probe, "HTTP/1.0 200", Duration::from_secs(10));
    c.ok("iptables -F FERRYD-FORWARD");
    c.wait_for(
        "journalctl -u ferryd-nat --no-pager",
        "NAT state had drifted; repaired",
        Duration::from_secs(10),
    );
    // doctor reads the unit over the container's system bus.
    let doctor = c.sh("ferryd doctor --json");
    let findings: serde_json::Value = serde_json::from_slice(&doctor.stdout).unwrap();
    let unit = findings
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == "unit")
        .unwrap_or_else(|| panic!("{findings}"));
    assert_eq!(unit["status"], "ok", "{unit}");
    assert!(
        unit["detail"]
            .as_str()
            .unwrap()
            .contains("ferryd.service active (running)"),
        "{unit}"
    );
    // ip_forward turned off behind its back is repaired by the sandboxed daemon itself (the unit
    // leaves that one file of the read-only /proc/sys writable).
    c.ok("echo 0 > /proc/sys/net/ipv4/ip_forward");
    c.wait_for("cat /proc/sys/net/ipv4/ip_forward", "1", Duration::from_secs(10));
    c.wait_for(
        "journalctl -u ferryd-nat -o verbose --no-pager",
        "FERRYD_DRIFT=net.ipv4.ip_forward was 0",
        Duration::from_secs(10),
    );

    // NAT cannot be set up at all (iptables missing): the unit still starts, relays and answers
    // the probe with 200, and /status names the failure. Once iptables is back, NAT converges.
    c.ok("mkdir -p /root/ipt && mv /usr/sbin/iptables /usr/sbin/iptables-save /usr/sbin/iptables-restore /root/ipt/ && systemctl restart ferryd-nat ferryd");
    c.wait_for("systemctl is-active ferryd", "active", Duration::from_secs(20));
    c.wait_for(
        "exec 3<>/dev/tcp/127.0.0.1/60001; head -c 7 <&3",
        "SSH-2.0",
        Duration::from_secs(10),
    );
    c.wait_for(probe, "HTTP/1.0 200", Duration::from_secs(10));
    let status_doc =
        "exec 3<>/dev/tcp/127.0.0.1/60080; printf 'GET /status HTTP/1.0\\r\\n\\r\\n' >&3; cat <&3";
    let failed = c.wait_for(status_doc, "\"state\":\"failed\"", Duration::from_secs(10));
    assert!(failed.contains("iptables is not installed"), "{failed}");
    // STATUS= names it too (refreshed with the heartbeat, within a second).
    c.wait_for(
        "systemctl show -p StatusText ferryd",
        "NAT FAILED",
        Duration::from_secs(5),
    );
    let nat_failed = c.ok(&format!(
        "journalctl -u ferryd-nat --no-pager -o cat MESSAGE_ID={}",
        ferryd::logging::ids::NAT_FAILED
    ));
    assert!(
        nat_failed.contains("cannot put the NAT rules in place"),
        "{nat_failed}"
    );
    c.ok("mv /root/ipt/* /usr/sbin/");
    c.wait_for(status_doc, "\"state\":\"ok\"", Duration::from_secs(10));

    // The NAT keeper killed (and not restarted): the relay's /status says so at once, SSH keeps
    // being relayed, and with require_nat the probe turns 503; the rules stay.
    c.ok("mkdir -p /run/systemd/system/ferryd-nat.service.d && printf '[Service]\\nRestart=no\\n' > /run/systemd/system/ferryd-nat.service.d/no-restart.conf && systemctl daemon-reload");
    c.ok("cp /etc/ferryd/ferryd.toml /root/before-require.toml && printf '\\n[health]\\nrequire_nat = true\\n' >> /etc/ferryd/ferryd.toml && systemctl reload ferryd");
    c.wait_for(probe, "HTTP/1.0 200", Duration::from_secs(10));
    c.ok("kill -KILL $(systemctl show -p MainPID --value ferryd-nat)");
    let killed = Instant::now();
    let refused = c.wait_for(probe, "HTTP/1.0 503", Duration::from_secs(5));
    println!(
        "{release}: NAT keeper killed; after {:?} the probe said {}",
        killed.elapsed(),
        refused.lines().last().unwrap_or("")
    );
    assert!(refused.contains("NAT keeper"), "{refused}");
    c.wait_for(status_doc, "\"state\":\"failed\"", Duration::from_secs(2));
    c.wait_for(
        "exec 3<>/dev/tcp/127.0.0.1/60001; head -c 7 <&3",
        "SSH-2.0",
        Duration::from_secs(5),
    );
    assert!(
        c.ok("iptables-save").contains("FERRYD-POSTROUTING"),
        "the rules stay"
    );
    c.ok("rm -rf /run/systemd/system/ferryd-nat.service.d && systemctl daemon-reload && cp /root/before-require.toml /etc/ferryd/ferryd.toml && systemctl start ferryd-nat && systemctl reload ferryd");
    c.wait_for(status_doc, "\"state\":\"ok\"", Duration::from_secs(10));
}

/// A restart refuses no connection (the fd store), a reload keeps a live SSH connection, and
/// the journal holds the structured fields.
pub(super) fn restarts_and_reloads(c: &Container) {
    // The listeners live in systemd's fd store: a restart with a client connecting in a loop
    // refuses nothing (connections wait in the kept backlog for the next process). Each client
    // sends its identification string first, as an OpenSSH client does (RFC 4253 lets both sides
    // send at once): a silent one would wait out proxy_protocol "auto"'s 200 ms each time.
    c.ok(
        "rm -f /tmp/refused /tmp/served; (for i in $(seq 1 150); do if (exec 3<>/dev/tcp/127.0.0.1/60001 && printf 'SSH-2.0-loop\\r\\n' >&3 && head -c 7 <&3 | grep -q SSH) 2>/dev/null; then echo x >> /tmp/served; else echo x >> /tmp/refused; fi; sleep 0.02; done; touch /tmp/loop-done) >/dev/null 2>&1 &",
    );
    std::thread::sleep(Duration::from_millis(500));
    let pid_before = c.ok("systemctl show -p MainPID --value ferryd");
    c.ok("systemctl restart ferryd");
    c.wait_for(
        "ls /tmp/loop-done 2>/dev/null",
        "loop-done",
        Duration::from_secs(30),
    );
    assert_ne!(
        c.ok("systemctl show -p MainPID --value ferryd"),
        pid_before,
        "restarted"
    );
    let refused = c.ok("wc -l < /tmp/refused 2>/dev/null || echo 0");
    let served = c.ok("wc -l < /tmp/served 2>/dev/null || echo 0");
    assert_eq!(
        refused.trim(),
        "0",
        "connections failed across the restart ({} served)",
        served.trim()
    );
    assert!(served.trim().parse::<u32>().unwrap_or(0) >= 100, "{served}");

    // A live SSH connection through 60001 survives a reload that changes the allowlist.
    c.ok(
        "rm -f /tmp/go /tmp/banner /tmp/after; setsid python3 /mnt/ferryd/holder.py >/tmp/holder.log 2>&1 &",
    );
    c.wait_for(
        "cat /tmp/banner 2>/dev/null",
        "SSH-2.0-OpenSSH",
        Duration::from_secs(10),
    );
    // systemctl reload only sends SIGHUP: wait for this reload's own line, one more than the
    // journal held before (earlier reloads already wrote the same message).
    let reloads = format!(
        "journalctl -u ferryd --no-pager -o cat MESSAGE_ID={} | grep -c 'configuration reloaded'",
        ferryd::logging::ids::RELOADED
    );
    let before: u32 = c
        .ok(&format!("{reloads} || true"))
        .trim()
        .parse()
        .expect("a count of reloads");
    assert!(before >= 1, "the earlier reloads are in the journal");
    c.ok("sed -i 's|^allow = .*|allow = [\"127.0.0.2/32\"]|' /etc/ferryd/ferryd.toml && systemctl reload ferryd");
    c.wait_for(
        &format!("[ \"$({reloads})\" -gt {before} ] && echo reloaded-again"),
        "reloaded-again",
        Duration::from_secs(10),
    );
    let refused = c.sh("exec 3<>/dev/tcp/127.0.0.1/60001 && head -c 1 <&3");
    assert!(refused.stdout.is_empty(), "127.0.0.1 is no longer allowed");
    c.ok("touch /tmp/go");
    let after = c.wait_for(
        "cat /tmp/after 2>/dev/null | od -An -c | head -n 1",
        " ",
        Duration::from_secs(10),
    );
    assert!(
        !after.trim().is_empty(),
        "the live connection was dropped by the reload"
    );

    // journald holds ferryd's structured fields.
    let denied = c.ok("journalctl -u ferryd -o verbose --no-pager FERRYD_END=denied");
    assert!(denied.contains("FERRYD_ROUTE=ssh"), "{denied}");
    assert!(denied.contains("FERRYD_CLIENT=127.0.0.1:"), "{denied}");
    // Every line about a relayed connection carries its id as a field of its own.
    let first = c.ok("journalctl -u ferryd -o verbose --no-pager FERRYD_CONN=1");
    assert!(
        first.contains("connection opened") && first.contains("FERRYD_ROUTE="),
        "{first}"
    );
}

/// Live upgrades through the package manager and `ferryd upgrade`: an SSH session never
/// stops, and 1,000 connections cross under a 2 s watchdog.
pub(super) fn live_upgrades(c: &Container, release: &str) {
    // A live upgrade through the package manager: `apt install` of a package with a bumped
    // version while an SSH session through the relay prints a counter every 100 ms. The session
    // never stops, and the unit's main process is the same one, now running the new file.
    c.ok("mkdir -p /root/.ssh && chmod 700 /root/.ssh && rm -f /root/.ssh/id /root/.ssh/id.pub && ssh-keygen -q -t ed25519 -N '' -f /root/.ssh/id && cat /root/.ssh/id.pub >> /root/.ssh/authorized_keys");
    c.ok("rm -rf /root/next && dpkg-deb -R /mnt/ferryd/ferryd.deb /root/next && sed -i 's/^Version: .*/&+next1/' /root/next/DEBIAN/control && dpkg-deb -b /root/next /root/ferryd_next.deb >/dev/null");
    let pid_before = c.ok("systemctl show -p MainPID --value ferryd");
    c.ok(
        "rm -f /tmp/counter /tmp/session-done; (ssh -b 127.0.0.2 -p 60001 -i /root/.ssh/id -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes root@127.0.0.1 'for i in $(seq 1 80); do echo $i; sleep 0.1; done' >/tmp/counter 2>/tmp/session.err; echo $? >/tmp/session-done) >/dev/null 2>&1 &",
    );
    c.wait_for(
        "test \"$(wc -l < /tmp/counter)\" -ge 5 && echo counting",
        "counting",
        Duration::from_secs(20),
    );
    let keeper_before = c.ok("systemctl show -p MainPID --value ferryd-nat");
    let install = c.sh("apt-get install -y -q /root/ferryd_next.deb 2>&1");
    let said = String::from_utf8_lossy(&install.stdout);
    assert!(install.status.success(), "{said}");
    assert!(said.contains("ferryd upgraded in place"), "{said}");
    for line in said.lines().filter(|l| l.contains("upgraded in place")) {
        println!("package upgrade: {line}");
    }
    let done = c.wait_for("cat /tmp/session-done 2>/dev/null", "0", Duration::from_secs(30));
    assert_eq!(done.trim(), "0", "{}", c.ok("cat /tmp/session.err"));
    let counter = c.ok("cat /tmp/counter");
    let expected: Vec<String> = (1..=80).map(|i| i.to_string()).collect();
    assert_eq!(
        counter.lines().collect::<Vec<_>>(),
        expected,
        "the session's counter"
    );
    assert_eq!(
        c.ok("systemctl show -p MainPID --value ferryd"),
        pid_before,
        "the same process"
    );
    assert!(c.ok("dpkg-query -W -f='${Version}' ferryd").ends_with("+next1"));
    // The same binary: the NAT keeper was not restarted.
    assert_eq!(
        c.ok("systemctl show -p MainPID --value ferryd-nat"),
        keeper_before,
        "the NAT keeper was restarted though its binary did not change"
    );
    let exe = c.ok(&format!("readlink /proc/{}/exe", pid_before.trim()));
    assert_eq!(
        exe.trim(),
        "/usr/bin/ferryd",
        "runs the new file (not a deleted one)"
    );
    let upgraded = c.ok(&format!(
        "journalctl -u ferryd --no-pager -o cat MESSAGE_ID={}",
        ferryd::logging::ids::UPGRADED
    ));
    assert!(upgraded.contains("live upgrade complete"), "{upgraded}");
    assert_eq!(c.ok("systemctl is-active ferryd").trim(), "active");

    // Another upgrade (back to the package as built) keeps the locally modified conffile and
    // hands over again.
    c.ok("dpkg -i /mnt/ferryd/ferryd.deb");
    assert!(
        c.ok("cat /etc/ferryd/ferryd.toml").contains("127.0.0.2/32"),
        "local edits kept"
    );
    c.wait_for("systemctl is-active ferryd", "active", Duration::from_secs(20));
    assert_eq!(
        c.ok("systemctl show -p MainPID --value ferryd"),
        pid_before,
        "handed over on upgrade, not restarted"
    );

    // With a short watchdog (2 s) and 1,000 connections through a second route, a live upgrade
    // keeps every connection and never misses a ping: the unit is not restarted.
    c.ok("mkdir -p /etc/systemd/system/ferryd.service.d && printf '[Service]\nWatchdogSec=2s\n' > /etc/systemd/system/ferryd.service.d/watchdog.conf && systemctl daemon-reload");
    c.ok("cp /etc/ferryd/ferryd.toml /root/before-many.toml && cp /mnt/ferryd/many.toml /etc/ferryd/ferryd.toml");
    c.ok("systemctl restart ferryd");
    c.wait_for("systemctl is-active ferryd", "active", Duration::from_secs(20));
    assert_eq!(c.ok("systemctl show -p WatchdogUSec --value ferryd").trim(), "2s");
    c.ok("rm -f /tmp/many-first /tmp/many-second /tmp/many-go; setsid python3 /mnt/ferryd/echo.py >/tmp/echo.log 2>&1 &");
    c.wait_for("ss -ltnH", "127.0.0.1:7777", Duration::from_secs(10));
    c.ok("ulimit -n 4096; setsid python3 /mnt/ferryd/many.py >/tmp/many.log 2>&1 &");
    let first = c.wait_for(
        "cat /tmp/many-first 2>/dev/null || cat /tmp/many.log /tmp/echo.log",
        "1000",
        Duration::from_secs(60),
    );
    assert_eq!(first.trim(), "1000", "{}", c.ok("cat /tmp/many.log"));
    let pid_before = c.ok("systemctl show -p MainPID --value ferryd");
    let restarts_before = c.ok("systemctl show -p NRestarts --value ferryd");
    let said = c.sh("ferryd upgrade --config /etc/ferryd/ferryd.toml");
    let said_text = String::from_utf8_lossy(&said.stdout).into_owned();
    assert!(
        said.status.success() && said_text.contains("1000 connection(s) moved, none reset"),
        "{said_text}{}",
        String::from_utf8_lossy(&said.stderr)
    );
    println!("1,000 connections, WatchdogSec=2s: {}", said_text.trim());
    // The moved connections are listed by the new image, which took the control socket over.
    let listed = c.ok("ferryd connections --route many | tail -n 1");
    assert_eq!(listed.trim(), "1000 connections", "{release}");
    // The listing is built in the idle scheduling class, which the unit's sandbox allows.
    let classes = c.ok("ps -L -o cls=,comm= -p $(systemctl show -p MainPID --value ferryd)");
    assert!(
        classes
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["IDL", "ferryd-listing"]),
        "{release}: {classes}"
    );
    let unknown = c.sh("ferryd connections --close 999999");
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("no relayed connection has id 999999"),
        "{release}: the control socket after the upgrade: {unknown:?}"
    );
    c.ok("touch /tmp/many-go");
    let second = c.wait_for(
        "cat /tmp/many-second 2>/dev/null",
        "1000",
        Duration::from_secs(60),
    );
    assert_eq!(second.trim(), "1000", "{}", c.ok("cat /tmp/many.log"));
    // Several watchdog periods later: the same process, never restarted.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(c.ok("systemctl show -p MainPID --value ferryd"), pid_before);
    assert_eq!(
        c.ok("systemctl show -p NRestarts --value ferryd"),
        restarts_before
    );
    let journal = c.ok("journalctl -u ferryd --no-pager");
    assert!(!journal.contains("Watchdog timeout"), "{journal}");
    c.ok("pkill -f '[m]any.py'; pkill -f '[e]cho.py'; rm -f /etc/systemd/system/ferryd.service.d/watchdog.conf && systemctl daemon-reload && cp /root/before-many.toml /etc/ferryd/ferryd.toml && systemctl restart ferryd");
    c.wait_for("systemctl is-active ferryd", "active", Duration::from_secs(20));
}

/// Upgrades that must not act: a binary that rejects the installed configuration leaves the
/// daemon running; a disabled unit stays disabled.
pub(super) fn upgrades_that_hold_back(c: &Container) {
    // An upgrade whose binary rejects the installed configuration (a renamed or unknown key)
    // leaves the running daemon alone and the package configured.
    c.ok("cp /etc/ferryd/ferryd.toml /root/good.toml && echo 'bogus_key = 1' >> /etc/ferryd/ferryd.toml");
    let pid_before = c.ok("systemctl show -p MainPID --value ferryd");
    let upgrade = c.sh("dpkg -i /mnt/ferryd/ferryd.deb");
    let said = String::from_utf8_lossy(&upgrade.stderr);
    assert!(upgrade.status.success(), "the upgrade must not fail: {said}");
    assert!(said.contains("was NOT restarted"), "{said}");
    assert!(said.contains("bogus_key"), "the reason is shown: {said}");
    assert_eq!(
        c.ok("systemctl show -p MainPID --value ferryd"),
        pid_before,
        "the old daemon keeps running"
    );
    assert!(
        c.ok("dpkg-query -W -f='${Status}' ferryd")
            .contains("install ok installed")
    );
    c.ok("cp /root/good.toml /etc/ferryd/ferryd.toml");

    // An upgrade never re-enables a unit the administrator disabled.
    c.ok("systemctl disable ferryd 2>/dev/null");
    c.ok("dpkg -i /mnt/ferryd/ferryd.deb");
    assert_eq!(
        c.ok("systemctl is-enabled ferryd || true").trim(),
        "disabled",
        "the upgrade re-enabled a disabled unit"
    );
    c.ok("systemctl enable ferryd 2>/dev/null");
}

/// Stop within TimeoutStopSec (NAT stays); purge leaves nothing behind but the system user.
pub(super) fn stopped_and_purged(c: &Container) {
    // Stop finishes within TimeoutStopSec and leaves NAT in place.
    let started = Instant::now();
    c.ok("systemctl stop ferryd");
    assert!(
        started.elapsed() < Duration::from_secs(45),
        "stop took {:?}",
        started.elapsed()
    );
    assert_eq!(c.ok("systemctl is-active ferryd || true").trim(), "inactive");
    let stopped = c.ok(&format!(
        "journalctl -u ferryd --no-pager -o cat MESSAGE_ID={}",
        ferryd::logging::ids::STOPPED
    ));
    assert!(stopped.contains("stopped"), "{stopped}");
    assert!(
        c.ok("iptables-save").contains("FERRYD-FORWARD"),
        "NAT survives a stop"
    );

    // Purge leaves no configuration, unit or NAT rule behind, and keeps the system user (Debian
    // practice: a UID is never reused).
    c.ok("apt-get purge -y -q ferryd");
    assert!(
        c.sh("getent passwd ferryd").status.success(),
        "the system user is kept"
    );
    assert!(
        !c.sh("test -e /etc/ferryd").status.success(),
        "/etc/ferryd left behind"
    );
    assert!(
        !c.sh("test -e /lib/systemd/system/ferryd.service")
            .status
            .success(),
        "unit left behind"
    );
    assert!(!c.ok("iptables-save").contains("FERRYD"), "NAT rules left behind");
    assert_eq!(
        c.ok("cat /proc/sys/net/ipv4/ip_forward").trim(),
        "0",
        "ip_forward restored"
    );
}
