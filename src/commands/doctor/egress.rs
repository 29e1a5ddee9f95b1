//! The proxy VM's own way out, which the build VM's NAT rides on: a default route, name
//! resolution through the VM's resolver, and a TCP connect to `[nat] check_target`; and whether
//! ferryd's MASQUERADE has seen the build VM's packets at all. Azure virtual networks created
//! after March 2026 get private subnets with no default outbound access: the build fails in its
//! first download, far from anything that says why. Each step is bounded; together they stay
//! within doctor's 10 s.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use super::{ASK_CAP, DIAL_CAP, Finding, Status, finding};
use crate::config::Config;

/// Azure's resolver (and the platform's probe source).
const AZURE_DNS: &str = "168.63.129.16";

/// `egress`: the default route, the resolver, the connect.
pub(super) fn egress_check(config: &Config) -> Finding {
    let name = "egress";
    let target = &config.nat.check_target;
    if !has_default_route() {
        return finding(
            name,
            Status::Fail,
            "the proxy VM has no IPv4 default route: nothing it forwards can leave",
            "check the VM's network configuration (DHCP on its NIC); the build VM's NAT needs the proxy VM's own way out",
        );
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let asked = target.clone();
    std::thread::spawn(move || {
        let _ = tx.send(asked.to_socket_addrs().map(|a| a.collect::<Vec<SocketAddr>>()));
    });
    let addrs = match rx.recv_timeout(ASK_CAP) {
        Ok(Ok(addrs)) if !addrs.is_empty() => addrs,
        Ok(Ok(_)) | Ok(Err(_)) | Err(_) => {
            let resolvers = resolvers();
            return finding(
                name,
                Status::Fail,
                format!(
                    "cannot resolve {target} through the VM's resolver ({})",
                    if resolvers.is_empty() {
                        "none in /etc/resolv.conf".to_string()
                    } else {
                        resolvers.join(", ")
                    }
                ),
                format!(
                    "Azure's resolver is {AZURE_DNS}: an NSG rule or the host firewall may block it (UDP and TCP 53); or set [nat] check_target to an address to test the connect alone"
                ),
            );
        }
    };
    let addr = addrs[0];
    match TcpStream::connect_timeout(&addr, DIAL_CAP) {
        Ok(_) => finding(name, Status::Ok, format!("{target} ({addr}) reached"), ""),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => finding(
            name,
            Status::Ok,
            format!("{target} ({addr}) answered (it refused the port, but the way out works)"),
            "",
        ),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
            ) =>
        {
            finding(
                name,
                Status::Fail,
                format!(
                    "a connection to {target} ({addr}) got no answer within {}s: the proxy VM has no way out",
                    DIAL_CAP.as_secs()
                ),
                "a private subnet without default outbound access (new Azure virtual networks): add a NAT gateway, a public IP or a load balancer outbound rule to the proxy VM's subnet; or an NSG denies outbound traffic",
            )
        }
        Err(e) => finding(
            name,
            Status::Fail,
            format!("{target} ({addr}) is unreachable: {e}"),
            "the proxy VM has no route out: check its subnet's route table",
        ),
    }
}

/// `nat: masquerade`: whether ferryd's MASQUERADE rule has counted any packet (root only).
pub(super) fn masquerade_check() -> Finding {
    let name = "nat: masquerade";
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(crate::subprocess::run_bounded(
            "iptables",
            &[
                "-w",
                "2",
                "-t",
                "nat",
                "-L",
                "FERRYD-POSTROUTING",
                "-v",
                "-n",
                "-x",
            ],
            None,
            ASK_CAP,
        ));
    });
    let listing = match rx.recv_timeout(ASK_CAP + Duration::from_secs(1)) {
        Ok(Ok(listing)) => listing,
        Ok(Err(e)) => return finding(name, Status::Warn, format!("not checked: {e}"), ""),
        Err(_) => {
            return finding(
                name,
                Status::Warn,
                "not checked: iptables did not answer in time",
                "",
            );
        }
    };
    let packets: u64 = listing
        .lines()
        .filter(|l| l.contains("MASQUERADE"))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    if packets > 0 {
        finding(
            name,
            Status::Ok,
            format!("{packets} packet(s) from the build VM masqueraded"),
            "",
        )
    } else {
        finding(
            name,
            Status::Warn,
            "ferryd's MASQUERADE has counted no packet from the build VM",
            "the build VM's traffic does not come through the proxy VM: its subnet's route table needs 0.0.0.0/0 → next hop type Virtual appliance, the proxy VM's private IP (and the proxy VM's NIC needs IP forwarding on); or the build VM has not tried to reach out yet",
        )
    }
}

fn has_default_route() -> bool {
    std::fs::read_to_string("/proc/net/route").is_ok_and(|table| {
        table.lines().skip(1).any(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            cols.len() > 7 && cols[1] == "00000000" && cols[7] == "00000000"
        })
    })
}

fn resolvers() -> Vec<String> {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver"))
        .map(|s| s.trim().to_string())
        .collect()
}
