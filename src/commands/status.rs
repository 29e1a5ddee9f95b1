//! `ferryd status`: a person's summary of the running daemon, from its /status document and from
//! systemd's view of the unit over D-Bus.
//!
//! This module owns asking and printing. It must not change anything, and it says plainly which
//! source could not be reached.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use super::client::Client;
use crate::config::Config;
use crate::state::Outcome;
use crate::status::StatusDocument;

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
    match Client::new(&config.health).status() {
        Ok(doc) => print!("{}", summarize(&doc)),
        Err(e) => {
            println!("daemon:   {e}");
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
