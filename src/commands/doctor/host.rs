//! Checks of the proxy VM itself: the host firewall's INPUT chain, NAT (ip_forward, ferryd's
//! chains, the FORWARD policy, the uplink) and the ephemeral port range.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use super::{ASK_CAP, Finding, Status, finding, firewall};
use crate::config::Config;

fn iptables_save(limit: Duration) -> Result<String, String> {
    crate::subprocess::run_bounded("iptables-save", &["-t", "filter"], None, limit).map_err(|e| e.to_string())
}

pub(super) fn firewall_check(config: &Config, root: bool) -> Finding {
    let name = "host firewall";
    if !root {
        return finding(
            name,
            Status::Warn,
            "not checked: reading iptables needs root",
            "run `sudo ferryd doctor`",
        );
    }
    let saved = match iptables_save(ASK_CAP) {
        Ok(saved) => saved,
        Err(e) => {
            return finding(
                name,
                Status::Warn,
                format!("not checked: {}", e.lines().next().unwrap_or("")),
                "",
            );
        }
    };
    let mut ports: Vec<u16> = config.routes.iter().map(|r| r.listen.port()).collect();
    ports.push(config.health.listen.port());
    let mut sources: Vec<(IpAddr, &str)> = config
        .probe_sources
        .blocks()
        .iter()
        .filter_map(|c| first_address(c).map(|ip| (ip, "probe source")))
        .collect();
    for route in &config.routes {
        sources.extend(
            route
                .allow
                .blocks()
                .iter()
                .filter_map(|c| first_address(c).map(|ip| (ip, "allowed source"))),
        );
    }
    let mut undecided = Vec::new();
    for (source, kind) in &sources {
        for port in &ports {
            match firewall::input_verdict(&saved, *source, *port) {
                firewall::Verdict::Accepted => {}
                firewall::Verdict::Dropped(rule) => {
                    return finding(
                        name,
                        Status::Fail,
                        format!("INPUT drops the {kind} {source} on port {port}: {rule}"),
                        format!("admit {source} on port {port} in the host firewall (ahead of that rule)"),
                    );
                }
                firewall::Verdict::Undecided(chain) => undecided.push(chain),
            }
        }
    }
    undecided.sort();
    undecided.dedup();
    if undecided.is_empty() {
        finding(
            name,
            Status::Ok,
            "INPUT admits the probe and allowed sources on the relay and health ports",
            "",
        )
    } else {
        finding(
            name,
            Status::Warn,
            format!(
                "INPUT hands these connections to {}, which this check does not read",
                undecided.join(", ")
            ),
            "if that is ufw, check `ufw status` admits the probe source and the balancer on the relay and health ports",
        )
    }
}

fn first_address(cidr: &crate::allow::Cidr) -> Option<IpAddr> {
    cidr.to_string().split('/').next()?.parse().ok()
}

pub(super) fn nat_checks(config: &Config, root: bool) -> Vec<Finding> {
    let mut out = Vec::new();
    let forwarding = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap_or_default();
    out.push(if forwarding.trim() == "1" {
        finding("nat: ip_forward", Status::Ok, "net.ipv4.ip_forward = 1", "")
    } else {
        finding(
            "nat: ip_forward",
            Status::Fail,
            format!(
                "net.ipv4.ip_forward = {}: the build VM's packets are not forwarded",
                forwarding.trim()
            ),
            "`sudo ferryd nat up` (the daemon's reconcile loop also turns it on within reconcile_interval)",
        )
    });
    match crate::nat::out_interface(&config.nat) {
        Ok(name) if Path::new(&format!("/sys/class/net/{name}")).exists() => {
            out.push(finding("nat: uplink", Status::Ok, format!("{name} exists"), ""));
        }
        Ok(name) => out.push(finding(
            "nat: uplink",
            Status::Fail,
            format!("{name} does not exist"),
            "set [nat] out_interface to the uplink's name",
        )),
        Err(e) => out.push(finding(
            "nat: uplink",
            Status::Fail,
            e.0,
            "add a default route, or set [nat] out_interface",
        )),
    }
    if !root {
        out.push(finding(
            "nat: rules",
            Status::Warn,
            "not checked: reading iptables needs root",
            "run `sudo ferryd doctor`",
        ));
        return out;
    }
    let nat = config.nat.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(crate::nat::check(&nat));
    });
    out.push(match rx.recv_timeout(ASK_CAP) {
        Ok(Ok(None)) => finding(
            "nat: rules",
            Status::Ok,
            "ferryd's chains are in place and match the configuration",
            "",
        ),
        Ok(Ok(Some(drift))) => finding(
            "nat: rules",
            Status::Fail,
            drift,
            "`sudo ferryd nat up` puts them back (the daemon repairs them within reconcile_interval)",
        ),
        Ok(Err(e)) => finding(
            "nat: rules",
            Status::Warn,
            format!("not checked: {}", e.0.lines().next().unwrap_or("")),
            "",
        ),
        Err(_) => finding(
            "nat: rules",
            Status::Warn,
            "not checked: iptables did not answer in time",
            "",
        ),
    });
    if let Ok(saved) = iptables_save(ASK_CAP) {
        let policy = firewall::forward_policy(&saved).unwrap_or_default();
        let jump = saved
            .lines()
            .any(|l| l.starts_with("-A FORWARD ") && l.contains("-j FERRYD-FORWARD"));
        out.push(match (policy.as_str(), jump) {
            ("DROP", false) => finding(
                "nat: forward policy",
                Status::Fail,
                "FORWARD's policy is DROP (ufw sets it) and ferryd's accept rules are not reached",
                "`sudo ferryd nat up` puts ferryd's FORWARD accepts first",
            ),
            (policy, _) => finding(
                "nat: forward policy",
                Status::Ok,
                format!(
                    "FORWARD policy {policy}, ferryd's accepts {}",
                    if jump { "first" } else { "absent" }
                ),
                "",
            ),
        });
    }
    out
}

pub(super) fn ports_check(config: &Config) -> Finding {
    let name = "ports";
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut bounds = range.split_whitespace().filter_map(|n| n.parse::<u16>().ok());
    let (Some(lo), Some(hi)) = (bounds.next(), bounds.next()) else {
        return finding(name, Status::Warn, "cannot read net.ipv4.ip_local_port_range", "");
    };
    let reserved = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_reserved_ports").unwrap_or_default();
    let is_reserved = |port: u16| {
        reserved
            .trim()
            .split(',')
            .filter(|s| !s.is_empty())
            .any(|part| match part.split_once('-') {
                Some((a, b)) => (a.parse().unwrap_or(u16::MAX)..=b.parse().unwrap_or(0)).contains(&port),
                None => part.parse() == Ok(port),
            })
    };
    let mut ports: Vec<u16> = config.routes.iter().map(|r| r.listen.port()).collect();
    ports.push(config.health.listen.port());
    let exposed: Vec<String> = ports
        .iter()
        .filter(|p| (lo..=hi).contains(*p) && !is_reserved(**p))
        .map(u16::to_string)
        .collect();
    if exposed.is_empty() {
        finding(
            name,
            Status::Ok,
            format!("listen ports outside the ephemeral range {lo}-{hi} or reserved"),
            "",
        )
    } else {
        finding(
            name,
            Status::Warn,
            format!(
                "ports {} lie in the ephemeral range {lo}-{hi} and are not reserved: an outgoing connection can take one",
                exposed.join(", ")
            ),
            format!(
                "reserve them: sysctl -w net.ipv4.ip_local_reserved_ports={} (the package's /usr/lib/sysctl.d/60-ferryd.conf does)",
                exposed.join(",")
            ),
        )
    }
}
