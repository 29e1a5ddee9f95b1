//! `ferryd doctor`: every check of the setting around the proxy VM, each with a verdict, what
//! was seen and the fix in one sentence, in seconds.
//!
//! This module owns the checks and their wording. It reads (the configuration, the daemon's
//! `/status`, the kernel's tables, iptables, systemd over D-Bus) and never changes anything.
//! Every check has its own time bound, and the run stays under 10 s. It works without the daemon
//! (the checks that need it say so) and without root (the checks that need it warn).

mod firewall;

use std::io;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use serde::Serialize;

use crate::config::{Config, Route};
use crate::status::StatusDocument;

/// Azure probes every 5 s at least by default and at most every 15 s as usually configured;
/// twice the longest ordinary interval without a probe means they are not arriving.
const PROBE_SILENCE: u64 = 30;
/// How long a dial of the upstream may take in doctor (connect_timeout, capped so the whole run
/// stays short; the routes are dialled at the same time).
const DIAL_CAP: Duration = Duration::from_secs(4);
/// How long an iptables or D-Bus question may take.
const ASK_CAP: Duration = Duration::from_secs(3);

/// A check's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// As it should be.
    Ok,
    /// Worth a look, or could not be checked.
    Warn,
    /// Broken: something a builder will run into.
    Fail,
}

/// One line of doctor's report.
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    /// The check's name.
    pub check: String,
    /// The verdict.
    pub status: Status,
    /// What was seen.
    pub detail: String,
    /// The fix, in one sentence (empty when nothing is to be done).
    pub fix: String,
}

fn finding(
    check: impl Into<String>,
    status: Status,
    detail: impl Into<String>,
    fix: impl Into<String>,
) -> Finding {
    Finding {
        check: check.into(),
        status,
        detail: detail.into(),
        fix: fix.into(),
    }
}

/// Runs every check, prints them (text or `--json`), exits 0 when nothing failed, 1 otherwise.
pub fn run(config_path: &Path, json: bool) -> ExitCode {
    let findings = checks(config_path);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&findings).unwrap_or_else(|_| "[]".into())
        );
    } else {
        for f in &findings {
            let status = match f.status {
                Status::Ok => "ok  ",
                Status::Warn => "warn",
                Status::Fail => "FAIL",
            };
            if f.fix.is_empty() {
                println!("{status} {}: {}", f.check, f.detail);
            } else {
                println!("{status} {}: {} -- fix: {}", f.check, f.detail, f.fix);
            }
        }
    }
    if findings.iter().any(|f| f.status == Status::Fail) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn checks(config_path: &Path) -> Vec<Finding> {
    let mut out = Vec::new();
    let config = match Config::load(config_path) {
        Ok(config) => {
            out.push(finding(
                "config",
                Status::Ok,
                format!(
                    "{}: valid, {} route(s)",
                    config_path.display(),
                    config.routes.len()
                ),
                "",
            ));
            config
        }
        Err(e) => {
            out.push(finding(
                "config",
                Status::Fail,
                e.to_string(),
                "correct the file (`ferryd check` shows the effective configuration), then `systemctl restart ferryd`",
            ));
            return out;
        }
    };
    let target = crate::status::local_target(config.health.listen);
    let doc = crate::status::fetch_status(target);
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;

    // Dial every upstream at the same time, while the rest is checked.
    let dials: Vec<_> = config
        .routes
        .iter()
        .map(|route| {
            let route = route.clone();
            std::thread::spawn(move || dial(&route))
        })
        .collect();

    match &doc {
        Ok(doc) => out.push(finding(
            "daemon",
            Status::Ok,
            format!(
                "ferryd {} answering on {target}, up {}s, {}",
                doc.version,
                doc.uptime_seconds,
                if doc.ready {
                    "ready".to_string()
                } else {
                    format!("NOT ready: {}", doc.reason.clone().unwrap_or_default())
                }
            ),
            "",
        )),
        Err(e) => out.push(finding(
            "daemon",
            Status::Warn,
            format!("not answering on http://{target}/status ({e}); the checks that need it are skipped"),
            "start it (`systemctl start ferryd`); the unit check below says why it is not running",
        )),
    }
    out.push(health_check(target, &config, doc.as_ref().ok()));
    for (route, dialled) in config.routes.iter().zip(dials) {
        out.push(listening_check(route, doc.as_ref().ok()));
        out.push(dialled.join().unwrap_or_else(|_| {
            finding(
                format!("route {}: upstream", route.name),
                Status::Warn,
                "the check failed",
                "",
            )
        }));
        if let Ok(doc) = &doc {
            out.push(allowlist_check(route, &config, doc));
        }
    }
    if let Ok(doc) = &doc {
        out.push(probes_check(&config, doc));
    }
    out.push(firewall_check(&config, root));
    if config.nat.enabled {
        out.extend(nat_checks(&config, root));
    }
    out.push(ports_check(&config));
    let unit = unit_state();
    out.push(unit_check(&unit));
    out.push(descriptors_check(&config, unit.as_ref().ok().map(|u| u.main_pid)));
    out
}

fn health_check(target: SocketAddr, config: &Config, doc: Option<&StatusDocument>) -> Finding {
    let name = "health endpoint";
    if doc.is_none() {
        return finding(name, Status::Warn, "not checked: the daemon is not answering", "");
    }
    let request = format!("GET {} HTTP/1.0\r\n\r\n", config.health.path);
    match ask(target, &request) {
        Ok(answer) if answer.contains(" 200 ") => finding(
            name,
            Status::Ok,
            format!("{}{} answers 200", target, config.health.path),
            "",
        ),
        Ok(answer) => {
            let reason = answer.split("\r\n\r\n").nth(1).unwrap_or("").trim().to_string();
            finding(
                name,
                Status::Fail,
                format!(
                    "{}{} answers {}: {reason}",
                    target,
                    config.health.path,
                    answer.lines().next().unwrap_or("")
                ),
                "the load balancer sends nothing to this VM while the probe fails: fix the reason given",
            )
        }
        Err(e) => finding(
            name,
            Status::Fail,
            format!("no answer from {target}: {e}"),
            "check [health] listen and that ferryd runs",
        ),
    }
}

fn ask(target: SocketAddr, request: &str) -> io::Result<String> {
    use std::io::{Read, Write};
    let mut stream = TcpStream::connect_timeout(&target, ASK_CAP)?;
    stream.set_read_timeout(Some(ASK_CAP))?;
    stream.write_all(request.as_bytes())?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

fn listening_check(route: &Route, doc: Option<&StatusDocument>) -> Finding {
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

fn dial(route: &Route) -> Finding {
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

fn allowlist_check(route: &Route, config: &Config, doc: &StatusDocument) -> Finding {
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

fn probes_check(config: &Config, doc: &StatusDocument) -> Finding {
    let name = "probes";
    let latest = doc
        .routes
        .iter()
        .filter_map(|r| r.last_probe.as_ref())
        .chain(doc.health_probe.as_ref())
        .min_by_key(|p| p.seconds_ago);
    let sources: Vec<String> = config
        .probe_sources
        .blocks()
        .iter()
        .map(ToString::to_string)
        .collect();
    match latest {
        Some(p) if p.seconds_ago <= PROBE_SILENCE => finding(
            name,
            Status::Ok,
            format!("latest probe {}s ago from {}", p.seconds_ago, p.source),
            "",
        ),
        Some(p) => finding(
            name,
            Status::Fail,
            format!("no probe for {}s (the latest from {})", p.seconds_ago, p.source),
            "the load balancer's probes stopped arriving: the NSG must admit the AzureLoadBalancer service tag to the health and relay ports, and the probe must point at this VM",
        ),
        None if doc.uptime_seconds <= PROBE_SILENCE => finding(
            name,
            Status::Warn,
            format!("no probe yet; ferryd started {}s ago", doc.uptime_seconds),
            "run doctor again in half a minute",
        ),
        None => finding(
            name,
            Status::Fail,
            format!(
                "no probe from {} in the {}s since ferryd started",
                sources.join(", "),
                doc.uptime_seconds
            ),
            "the NSG must admit the AzureLoadBalancer service tag to the health and relay ports, and the balancer's probe must point at this VM's health port (or a relay port)",
        ),
    }
}

fn iptables_save(limit: Duration) -> Result<String, String> {
    crate::nat::iptables::run_bounded("iptables-save", &["-t", "filter"], None, limit).map_err(|e| e.0)
}

fn firewall_check(config: &Config, root: bool) -> Finding {
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

fn nat_checks(config: &Config, root: bool) -> Vec<Finding> {
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

fn ports_check(config: &Config) -> Finding {
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

fn unit_state() -> Result<crate::systemd::unit::UnitState, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        tokio::time::timeout(ASK_CAP, crate::systemd::unit::query("ferryd.service"))
            .await
            .unwrap_or_else(|_| Err("systemd did not answer in time".into()))
    })
}

fn unit_check(unit: &Result<crate::systemd::unit::UnitState, String>) -> Finding {
    let name = "unit";
    match unit {
        Err(e) => finding(
            name,
            Status::Warn,
            format!("not checked: {e}"),
            "under systemd, check `systemctl status ferryd`",
        ),
        Ok(u) if u.active_state == "active" => {
            let mut detail = format!("ferryd.service active ({}), main PID {}", u.sub_state, u.main_pid);
            if u.watchdog_usec == 0 {
                detail.push_str(", no watchdog");
            }
            if u.restarts > 0 {
                finding(
                    name,
                    Status::Warn,
                    format!("{detail}, restarted {} times since it was started", u.restarts),
                    "`journalctl -u ferryd` shows why it restarted",
                )
            } else {
                finding(name, Status::Ok, detail, "")
            }
        }
        Ok(u) => finding(
            name,
            Status::Fail,
            format!(
                "ferryd.service {} ({}), last exit status {}{}",
                u.active_state,
                u.sub_state,
                u.exec_main_status,
                if u.exec_main_status == 78 {
                    " (configuration error)"
                } else {
                    ""
                }
            ),
            "`journalctl -u ferryd -n 50` shows why; fix it, then `systemctl restart ferryd`",
        ),
    }
}

fn descriptors_check(config: &Config, main_pid: Option<u32>) -> Finding {
    let name = "descriptors";
    let limit = main_pid
        .filter(|pid| *pid > 0)
        .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/limits")).ok())
        .and_then(|limits| {
            limits
                .lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3)?.parse::<u64>().ok())
        });
    let (limit, whose) = match limit {
        Some(l) => (l, "the daemon's"),
        None => match nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
            Ok((soft, _)) => (soft, "this shell's (the daemon's was not found)"),
            Err(e) => {
                return finding(
                    name,
                    Status::Warn,
                    format!("cannot read the open-file limit: {e}"),
                    "",
                );
            }
        },
    };
    let connections: usize = config.routes.iter().map(|r| r.max_connections).sum();
    let pipes = if config.splice { config.max_pipes } else { 0 };
    let need = (2 * connections + 2 * pipes + 64) as u64;
    if limit >= need {
        finding(
            name,
            Status::Ok,
            format!(
                "{whose} limit {limit} covers {need} (2 per connection up to max_connections, 2 per pipe, 64 spare)"
            ),
            "",
        )
    } else {
        finding(
            name,
            Status::Warn,
            format!(
                "{whose} limit {limit} is below {need} (2 per connection up to max_connections, 2 per pipe, 64 spare)"
            ),
            "raise LimitNOFILE= in the unit, or lower max_connections",
        )
    }
}
