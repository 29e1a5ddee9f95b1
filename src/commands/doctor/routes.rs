//! Per-route checks: ferryd listening (or who holds the port), the upstream answering a TCP
//! connect (refused, timed out or unreachable, each with its own fix), and the sources the
//! allowlist denied recently.

use std::io;
use std::net::{IpAddr, SocketAddr, TcpStream};

use super::{DIAL_CAP, Finding, Status, finding};
use crate::config::{Config, Route};
use crate::status::StatusDocument;

pub(super) fn listening_check(route: &Route, doc: Option<&StatusDocument>) -> Finding {
    let name = format!("route {}: listening", route.name);
    if let Some(doc) = doc {
        return match doc.routes.iter().find(|r| r.name == route.name) {
            Some(r) if r.listen == route.listen.to_string() => finding(
                name,
                Status::Ok,
                format!("ferryd listens on {}", route.listen),
                "",
            ),
            Some(r) => finding(
                name,
                Status::Warn,
                format!("ferryd listens on {}, the file says {}", r.listen, route.listen),
                "`systemctl reload ferryd` applies the file",
            ),
            None => finding(
                name,
                Status::Fail,
                "the running ferryd has no such route",
                "`systemctl reload ferryd` applies the file",
            ),
        };
    }
    match std::net::TcpListener::bind(route.listen) {
        Ok(_) => finding(
            name,
            Status::Warn,
            format!("{} is free, but ferryd is not running", route.listen),
            "start ferryd",
        ),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => finding(
            name,
            Status::Fail,
            format!(
                "{} is held by {}",
                route.listen,
                holder(route.listen.port()).unwrap_or_else(|| "another socket".into())
            ),
            "stop what holds it, or if it is an outgoing connection's ephemeral port, reserve the port (net.ipv4.ip_local_reserved_ports) and restart ferryd",
        ),
        Err(e) => finding(
            name,
            Status::Warn,
            format!("cannot test {}: {e}", route.listen),
            "",
        ),
    }
}

/// Who holds TCP `port`: the process with the socket's inode among its descriptors.
fn holder(port: u16) -> Option<String> {
    let hex = format!(":{port:04X} ");
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() > 9 && format!("{} ", cols[1]).contains(&hex) {
                inodes.push(format!("socket:[{}]", cols[9]));
            }
        }
    }
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(link) = std::fs::read_link(fd.path())
                && inodes.iter().any(|i| link.to_string_lossy() == *i)
            {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                return Some(format!("{} (pid {pid})", comm.trim()));
            }
        }
    }
    (!inodes.is_empty()).then(|| "a socket of another process or namespace".into())
}

pub(super) fn dial(route: &Route) -> Finding {
    let name = format!("route {}: upstream", route.name);
    let limit = route.connect_timeout.min(DIAL_CAP);
    let addrs: Vec<SocketAddr> = match &route.upstream {
        crate::config::Upstream::Addr(a) => vec![*a],
        crate::config::Upstream::Host { host, port } => {
            use std::net::ToSocketAddrs;
            match (host.as_str(), *port).to_socket_addrs() {
                Ok(a) => a.collect(),
                Err(e) => {
                    return finding(
                        name,
                        Status::Fail,
                        format!("{} does not resolve: {e}", route.upstream),
                        "check the name, or write the build VM's address",
                    );
                }
            }
        }
    };
    let Some(addr) = addrs.first().copied() else {
        return finding(
            name,
            Status::Fail,
            format!("{} resolves to nothing", route.upstream),
            "check the name",
        );
    };
    match TcpStream::connect_timeout(&addr, limit) {
        Ok(_) => finding(name, Status::Ok, format!("{addr} accepts connections"), ""),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => finding(
            name,
            Status::Fail,
            format!("{addr} refused the connection: nothing listens there"),
            "sshd or WinRM is down on the build VM, or it is still booting: wait, or check the service on the build VM",
        ),
        Err(e) if matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock) => finding(
            name,
            Status::Fail,
            format!(
                "{addr} did not answer within {}s: the SYN is dropped on the way",
                limit.as_secs()
            ),
            "look at the network security group of the build VM's subnet or NIC and at the firewall inside the build VM: both must admit the proxy VM on this port",
        ),
        Err(e) => finding(
            name,
            Status::Fail,
            format!("{addr} is unreachable: {e}"),
            "the proxy VM has no route to the build VM: check the subnets and route tables",
        ),
    }
}

pub(super) fn allowlist_check(route: &Route, config: &Config, doc: &StatusDocument) -> Finding {
    let name = format!("route {}: allowlist", route.name);
    let Some(status) = doc.routes.iter().find(|r| r.name == route.name) else {
        return finding(name, Status::Warn, "the running ferryd has no such route", "");
    };
    let strangers: Vec<_> = status
        .denied_sources
        .iter()
        .filter(|d| {
            d.source
                .parse()
                .is_ok_and(|ip: IpAddr| !config.probe_sources.contains(ip))
        })
        .collect();
    if strangers.is_empty() {
        return finding(name, Status::Ok, "no source denied recently", "");
    }
    let seen: Vec<String> = strangers
        .iter()
        .map(|d| format!("{} ({} times, last {}s ago)", d.source, d.count, d.last_seen_ago))
        .collect();
    let entry = strangers
        .first()
        .map(|d| {
            if d.source.contains(':') {
                format!("{}/128", d.source)
            } else {
                format!("{}/32", d.source)
            }
        })
        .unwrap_or_default();
    finding(
        name,
        Status::Warn,
        format!("denied recently: {}", seen.join(", ")),
        format!(
            "if these are the load balancer's Private Link NAT addresses, add them (\"{entry}\", or their subnet) to allow of route {}",
            route.name
        ),
    )
}

/// What the latest connections say about the Private Link Service's "TCP proxy v2", from the
/// daemon's counts: a header on a route that refuses them, none on a route that requires one,
/// or, with "auto", which it sees.
pub(super) fn proxy_check(route: &Route, doc: &StatusDocument) -> Finding {
    let name = format!("route {}: proxy protocol", route.name);
    let Some(r) = doc.routes.iter().find(|r| r.name == route.name) else {
        return finding(name, Status::Warn, "the running ferryd has no such route", "");
    };
    let refused = |reason: &str| r.header_refusals.get(reason).copied().unwrap_or(0);
    let seen = r.proxy_headers.as_deref().unwrap_or("nothing yet");
    match r.proxy_protocol.as_str() {
        "off" if refused("unexpected") > 0 => finding(
            name,
            Status::Fail,
            format!(
                "{} connection(s) began with a PROXY v2 header, which proxy_protocol = \"off\" refuses: the Private Link Service sends TCP proxy v2",
                refused("unexpected")
            ),
            format!(
                "set proxy_protocol = \"auto\" (or \"v2\") on route {}, then `systemctl reload ferryd`",
                route.name
            ),
        ),
        "v2" if refused("missing") > 0 => finding(
            name,
            Status::Fail,
            format!(
                "{} connection(s) came without the PROXY v2 header proxy_protocol = \"v2\" requires: the Private Link Service may have TCP proxy v2 off",
                refused("missing")
            ),
            format!(
                "set proxy_protocol = \"auto\" on route {} (it takes both), or turn TCP proxy v2 on at the service",
                route.name
            ),
        ),
        mode => finding(
            name,
            Status::Ok,
            format!("proxy_protocol = \"{mode}\"; PROXY v2 headers on the latest connections: {seen}"),
            "",
        ),
    }
}

/// A failed upstream dial, told apart with what the daemon saw since it started: a build VM that
/// has never answered (still booting, or an NSG drops the port) from one that answered and
/// stopped (sshd or WinRM stopped, a firewall turned on inside it mid-build).
pub(super) fn with_history(mut found: Finding, route: &Route, doc: &StatusDocument) -> Finding {
    if found.status != Status::Fail {
        return found;
    }
    let Some(r) = doc.routes.iter().find(|r| r.name == route.name) else {
        return found;
    };
    let seen = &r.upstream_seen;
    let failed: Vec<String> = seen
        .failed_since
        .iter()
        .map(|(kind, n)| {
            let how = match kind.as_str() {
                "upstream-timeout" => "timed out",
                "upstream-refused" => "refused",
                _ => "unreachable",
            };
            format!("{how} {n} time(s)")
        })
        .collect();
    let failed = if failed.is_empty() {
        "no dial failed yet".to_string()
    } else {
        failed.join(", ")
    };
    let history = match seen.last_answered_at {
        None => format!(
            "the build VM has not answered since ferryd started {} min ago ({failed}): still booting, or a network security group drops the port",
            doc.uptime_seconds / 60
        ),
        Some(at) => format!(
            "it answered until {} UTC, not since ({failed}): the service on the build VM stopped, or a firewall there was turned on",
            clock(at)
        ),
    };
    found.detail = format!("{}; {history}", found.detail);
    found
}

/// HH:MM (UTC) of `epoch_seconds`.
fn clock(epoch_seconds: u64) -> String {
    let day = epoch_seconds % 86_400;
    format!("{:02}:{:02}", day / 3600, day % 3600 / 60)
}
