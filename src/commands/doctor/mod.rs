//! `ferryd doctor`: every check of the setting around the proxy VM, each with a verdict, what
//! was seen and the fix in one sentence, in seconds.
//!
//! This module owns the checks and their wording. It reads (the configuration, the daemon's
//! `/status`, the kernel's tables, iptables, systemd over D-Bus) and never changes anything.
//! Every check has its own time bound, and the run stays under 10 s. It works without the daemon
//! (the checks that need it say so) and without root (the checks that need it warn).

mod egress;
mod firewall;
mod host;
mod routes;
mod service;

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use serde::Serialize;

use super::client::Client;
use crate::config::Config;
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
    let client = Client::new(&config.health);
    let doc = client.status();
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;

    // The proxy VM's own way out, meanwhile (with NAT: the build VM's rides on it).
    let egress = {
        let config = config.clone();
        std::thread::spawn(move || {
            if config.nat.enabled {
                egress::egress_check(&config)
            } else {
                finding("egress", Status::Ok, "not checked: NAT is off", "")
            }
        })
    };
    // Dial every upstream at the same time, while the rest is checked.
    let dials: Vec<_> = config
        .routes
        .iter()
        .map(|route| {
            let route = route.clone();
            std::thread::spawn(move || routes::dial(&route))
        })
        .collect();

    match &doc {
        Ok(doc) => out.push(finding(
            "daemon",
            Status::Ok,
            format!(
                "ferryd {} answering on {}, up {}s, {}",
                doc.version,
                client.target,
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
            format!("{e}; the checks that need it are skipped"),
            "start it (`systemctl start ferryd`); the unit check below says why it is not running",
        )),
    }
    out.push(health_check(&client, &config, doc.as_ref().ok()));
    for (route, dialled) in config.routes.iter().zip(dials) {
        out.push(routes::listening_check(route, doc.as_ref().ok()));
        let dialled = dialled.join().unwrap_or_else(|_| {
            finding(
                format!("route {}: upstream", route.name),
                Status::Warn,
                "the check failed",
                "",
            )
        });
        out.push(match &doc {
            Ok(doc) => routes::with_history(dialled, route, doc),
            Err(_) => dialled,
        });
        if let Ok(doc) = &doc {
            out.push(routes::allowlist_check(route, &config, doc));
            out.push(routes::proxy_check(route, doc));
        }
    }
    if let Ok(doc) = &doc {
        out.push(probes_check(&config, doc));
    }
    out.push(host::firewall_check(&config, root));
    if config.nat.enabled {
        out.extend(host::nat_checks(&config, root));
        out.push(
            egress
                .join()
                .unwrap_or_else(|_| finding("egress", Status::Warn, "the check failed", "")),
        );
        if root {
            out.push(egress::masquerade_check());
        }
    }
    out.push(host::ports_check(&config));
    let unit = service::unit_state();
    out.push(service::unit_check(&unit));
    out.push(service::descriptors_check(
        &config,
        unit.as_ref().ok().map(|u| u.main_pid),
    ));
    out
}

fn health_check(client: &Client, config: &Config, doc: Option<&StatusDocument>) -> Finding {
    let name = "health endpoint";
    if doc.is_none() {
        return finding(name, Status::Warn, "not checked: the daemon is not answering", "");
    }
    let target = client.target;
    match client.get(&config.health.path) {
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
