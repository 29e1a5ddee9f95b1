//! `ferryd status`: a person's summary of the running daemon, from its /status document and from
//! systemd's view of the unit over D-Bus.
//!
//! This module owns asking and printing. It must not change anything, and it says plainly which
//! source could not be reached.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use crate::config::Config;
use crate::state::Outcome;

pub mod document;

pub use document::StatusDocument;

/// How long to wait for the daemon's answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(3);

/// Prints the summary; exit 0 when both the daemon and systemd answered, 1 when the daemon did
/// not, 2 when only systemd could not be asked.
pub fn run(config_path: &Path, unit: &str) -> ExitCode {
    let config = match Config::load(config_path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("ferryd: {e}");
            return ExitCode::from(1);
        }
    };
    let mut code = 0u8;
    let target = local_target(config.health.listen);
    match fetch_status(target, &health_preamble(&config.health)) {
        Ok(doc) => print!("{}", summarize(&doc)),
        Err(e) => {
            println!("daemon:   not answering on http://{target}/status: {e}");
            code = 1;
        }
    }
    let unit_state = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|rt| rt.block_on(crate::systemd::unit::query(unit)));
    match unit_state {
        Ok(u) => println!(
            "systemd:  {unit} {} ({}), main PID {}, {} automatic restarts",
            u.active_state, u.sub_state, u.main_pid, u.restarts
        ),
        Err(e) => {
            println!("systemd:  cannot read the state of {unit}: {e}");
            if code == 0 {
                code = 2;
            }
        }
    }
    ExitCode::from(code)
}

/// The address to ask: a wildcard listen address is reached on loopback.
pub fn local_target(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// What a local client writes first on the health port: a LOCAL PROXY v2 header when the
/// listener expects one (`[health] proxy_protocol = "v2"`), else nothing.
pub fn health_preamble(health: &crate::config::Health) -> Vec<u8> {
    if health.proxy_protocol == crate::config::ProxyProtocol::V2 {
        crate::proxy_header::encode(&crate::proxy_header::Header {
            command: crate::proxy_header::Command::Local,
            addresses: None,
            tlvs: Vec::new(),
            link_id: None,
        })
    } else {
        Vec::new()
    }
}

/// One HTTP/1.0 GET of `path` on the health endpoint at `target`, after `preamble`; the whole
/// answer, head and body. Every step is bounded by [`ASK_TIMEOUT`].
pub(crate) fn get(target: SocketAddr, preamble: &[u8], path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&target, ASK_TIMEOUT)?;
    stream.set_read_timeout(Some(ASK_TIMEOUT))?;
    let mut request = preamble.to_vec();
    request.extend_from_slice(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes());
    stream.write_all(&request)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    Ok(String::from_utf8_lossy(&response).into_owned())
}

pub fn fetch_status(target: SocketAddr, preamble: &[u8]) -> Result<StatusDocument, String> {
    let text = get(target, preamble, "/status").map_err(|e| e.to_string())?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or("malformed HTTP response")?;
    let status_line = head.lines().next().unwrap_or_default();
    if !status_line.contains(" 200 ") {
        return Err(format!(
            "answered {status_line:?} (is this source in [health] metrics_allow?)"
        ));
    }
    serde_json::from_str(body).map_err(|e| format!("unreadable /status document: {e}"))
}

fn summarize(doc: &StatusDocument) -> String {
    let mut out = String::new();
    let uptime = Duration::from_secs(doc.uptime_seconds);
    out.push_str(&format!(
        "daemon:   ferryd {} up {}, {}\n",
        doc.version,
        humantime::format_duration(uptime),
        if doc.ready {
            "ready".to_string()
        } else {
            format!("NOT READY: {}", doc.reason.as_deref().unwrap_or("unknown reason"))
        }
    ));
    for route in &doc.routes {
        out.push_str(&format!(
            "route:    {} {} -> {}: {} live, {} relayed, {} denied, {} probes, {} B up, {} B down\n",
            route.name,
            route.listen,
            route.upstream,
            route.live,
            route.relayed,
            route.count(Outcome::Denied),
            route.count(Outcome::Probe),
            route.bytes_up,
            route.bytes_down,
        ));
        if let Some(error) = &route.last_upstream_error {
            out.push_str(&format!(
                "          last upstream error {}s ago: {}\n",
                error.seconds_ago, error.reason
            ));
        }
    }
    match &doc.nat.reason {
        Some(reason) => out.push_str(&format!("nat:      {}: {reason}\n", doc.nat.state)),
        None if !doc.nat.state.is_empty() => out.push_str(&format!("nat:      {}\n", doc.nat.state)),
        None => {}
    }
    let relay = &doc.relay;
    out.push_str(&format!(
        "relay:    {} B spliced, {} B copied, fallbacks {} (no pipe) / {} (refused), pipes {} in use / {} pooled\n",
        relay.spliced_bytes,
        relay.copied_bytes,
        relay.fallback_no_pipe,
        relay.fallback_refused,
        relay.pipes_in_use,
        relay.pipes_pooled
    ));
    let upgrade = &doc.upgrade;
    if let Some(last) = &upgrade.last {
        out.push_str(&format!(
            "upgrade:  {} live upgrade(s) of {} asked for; the last, {}s ago: {} ({})\n",
            upgrade.completed,
            upgrade.attempts,
            last.seconds_ago,
            if last.ok { "done" } else { "FAILED" },
            match (last.moved, last.pause_ms) {
                (Some(moved), Some(pause)) => format!(
                    "{}; {}, pause {pause} ms",
                    last.detail,
                    moved_phrase(moved, last.not_moved.unwrap_or(0))
                ),
                _ => last.detail.clone(),
            }
        ));
    }
    out
}

/// "N connection(s) moved, none reset" (or "M reset"): what a live upgrade did with the
/// connections, as `ferryd status` and `ferryd upgrade` say it.
pub fn moved_phrase(moved: usize, not_moved: usize) -> String {
    match not_moved {
        0 => format!("{moved} connection(s) moved, none reset"),
        n => format!("{moved} connection(s) moved, {n} reset instead"),
    }
}
