//! `ferryd connections`: the running daemon's relayed connections, from its `/connections`, as a
//! table a person reads at a glance (or as JSON), and `--close ID`, which asks the daemon over
//! its control socket to end one.
//!
//! This module owns asking and printing. It must not decide who may close a connection: the
//! control socket's permissions and the daemon do (see the daemon's `control` module).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use super::client::Client;
use crate::config::Config;
use crate::connections::view::{ConnectionView, DirectionView};

/// How long `--close` keeps trying a socket that is not there or not listening: a live upgrade
/// leaves it so for well under a second, between the old image's exec and the new one's bind.
const CLOSE_RETRY: Duration = Duration::from_secs(3);
/// How long to wait for the daemon's answer on the control socket.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(3);

/// What `ferryd connections` was asked to do.
#[derive(Debug)]
pub struct Request<'a> {
    /// The configuration file (to find the health endpoint and the control socket).
    pub config: &'a Path,
    /// Only this route's connections.
    pub route: Option<&'a str>,
    /// Print JSON instead of the table.
    pub json: bool,
    /// End this connection instead of listing.
    pub close: Option<u64>,
}

/// Lists the connections, or closes one. Exit 0 on success, 1 when the daemon could not be
/// asked or refused.
pub fn run(request: Request<'_>) -> ExitCode {
    let config = match std::fs::read_to_string(request.config) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            eprintln!("ferryd connections: {}", refusal(request.config, &e));
            return ExitCode::FAILURE;
        }
        // Any other failure to read is said by `Config::load`, in its words.
        Err(_) => Config::load(request.config),
        Ok(text) => Config::parse(&text, request.config),
    };
    let config = match config {
        Ok(config) => config,
        Err(e) => {
            eprintln!("ferryd: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = match request.close {
        Some(id) => close(&config, id).map(|answer| println!("{answer}")),
        None => list(&config, request.route).map(|mut all| {
            if request.json {
                // Plain data: serializing it cannot fail.
                println!("{}", serde_json::to_string_pretty(&all).unwrap_or_default());
            } else {
                all.sort_by(|a, b| b.age_s.total_cmp(&a.age_s).then(a.id.cmp(&b.id)));
                print!("{}", table(&all));
            }
        }),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferryd connections: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Why `path` cannot be read by this user (`e`, a permission error), said as the rule it
/// enforces: the package installs the configuration readable by root and the daemon's group
/// only, the same people the control socket lets close a connection, so "Permission denied"
/// here means "not one of them".
fn refusal(path: &Path, e: &io::Error) -> String {
    // The file's group, or its directory's when that is closed too (the package's /etc/ferryd
    // is 0750 root:ferryd).
    let group = std::fs::metadata(path)
        .or_else(|_| {
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
            std::fs::metadata(dir.unwrap_or(Path::new(".")))
        })
        .map(|m| group_name(std::os::unix::fs::MetadataExt::gid(&m)))
        .unwrap_or_else(|_| "the daemon's group".into());
    format!(
        "cannot read {} ({e}): only root and members of {group} may list or close ferryd's \
         connections with this command (the health endpoint's /connections is open to the \
         sources its access rule admits)",
        path.display()
    )
}

/// `group NAME` from /etc/group, or `group GID` when it has no name there.
fn group_name(gid: u32) -> String {
    let named = std::fs::read_to_string("/etc/group").ok().and_then(|groups| {
        groups.lines().find_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            (fields.nth(1)?.parse() == Ok(gid)).then(|| name.to_string())
        })
    });
    format!("group {}", named.unwrap_or_else(|| gid.to_string()))
}

/// The daemon's `/connections`, only `route`'s when given.
fn list(config: &Config, route: Option<&str>) -> Result<Vec<ConnectionView>, String> {
    let mut all: Vec<ConnectionView> = Client::new(&config.health).json("/connections")?;
    if let Some(route) = route {
        if !config.routes.iter().any(|r| r.name == route) {
            return Err(format!(
                "no route is named {route:?} in {} (routes: {})",
                config.path.display(),
                config
                    .routes
                    .iter()
                    .map(|r| r.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        all.retain(|c| c.route == route);
    }
    Ok(all)
}

/// Asks the daemon to end connection `id`; its answer, or why it could not be asked.
fn close(config: &Config, id: u64) -> Result<String, String> {
    let path = config.control_socket.as_deref().ok_or_else(|| {
        format!(
            "the control socket is turned off (control_socket = \"\" in {})",
            config.path.display()
        )
    })?;
    let shown = path.display();
    let started = Instant::now();
    let mut stream = loop {
        match UnixStream::connect(path) {
            Ok(stream) => break stream,
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                return Err(format!(
                    "permission denied on {shown}: ending a connection takes root or membership of the daemon's group (ferryd when installed from the package); listing them does not"
                ));
            }
            // Not there, or nobody listening: a live upgrade in progress, or no daemon.
            Err(e)
                if started.elapsed() < CLOSE_RETRY
                    && matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(format!("cannot reach the daemon's control socket {shown}: {e}")),
        }
    };
    let talk = |stream: &mut UnixStream| -> io::Result<String> {
        stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        stream.set_write_timeout(Some(ANSWER_TIMEOUT))?;
        stream.write_all(format!("close {id}\n").as_bytes())?;
        let mut answer = String::new();
        stream.take(4096).read_to_string(&mut answer)?;
        Ok(answer.trim_end().to_string())
    };
    let answer = talk(&mut stream).map_err(|e| format!("no answer on {shown}: {e}"))?;
    match answer.strip_prefix("ok: ") {
        Some(ok) => Ok(ok.to_string()),
        None => Err(answer.strip_prefix("error: ").unwrap_or(&answer).to_string()),
    }
}

/// The connections as aligned columns, in the order given, with a count at the end.
fn table(all: &[ConnectionView]) -> String {
    if all.is_empty() {
        return "no relayed connections\n".to_string();
    }
    let header = [
        "ID",
        "ROUTE",
        "CLIENT",
        "UPSTREAM",
        "AGE",
        "IDLE",
        "UP",
        "DOWN",
        "CLIENT→UPSTREAM",
        "UPSTREAM→CLIENT",
        "ENDS IN",
    ];
    let rows: Vec<[String; 11]> = all
        .iter()
        .map(|c| {
            let client = match (c.proxied_client, c.link_id) {
                (Some(proxied), Some(link)) => format!("{proxied} (link {link})"),
                (Some(proxied), None) => proxied.to_string(),
                (None, _) => c.client.to_string(),
            };
            [
                c.id.to_string(),
                c.route.clone(),
                client,
                c.upstream.to_string(),
                duration(c.age_s),
                duration(c.idle_s),
                bytes(c.bytes_up),
                bytes(c.bytes_down),
                direction(&c.up),
                direction(&c.down),
                c.deadline_s.map_or_else(|| "never".to_string(), duration),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let padded: Vec<String> = cells
            .zip(widths)
            .map(|(cell, width)| format!("{cell}{}", " ".repeat(width - cell.chars().count())))
            .collect();
        out.push_str(padded.join("  ").trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in &rows {
        line(&mut row.iter().map(String::as_str));
    }
    out.push_str(&format!(
        "{} connection{}\n",
        all.len(),
        if all.len() == 1 { "" } else { "s" }
    ));
    out
}

/// "open splice", "half-closed copy", with what it holds when it holds something.
fn direction(d: &DirectionView) -> String {
    if d.held_bytes == 0 {
        format!("{} {}", d.state, d.mode)
    } else {
        format!("{} {} holding {}", d.state, d.mode, bytes(d.held_bytes))
    }
}

/// Seconds as a person reads them: 42s, 3m07s, 2h03m, 1d04h.
fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// Bytes in binary units: 512 B, 1.5 KiB, 3.2 MiB, 1.1 GiB.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes_read_at_a_glance() {
        assert_eq!(duration(0.4), "0s");
        assert_eq!(duration(187.0), "3m07s");
        assert_eq!(duration(7380.0), "2h03m");
        assert_eq!(duration(100_800.0), "1d04h");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(5 * 1024 * 1024 * 1024), "5.0 GiB");
    }

    #[test]
    fn the_table_aligns_and_counts() {
        let view = |id, route: &str, age| ConnectionView {
            id,
            route: route.into(),
            client: "10.0.0.5:51234".parse().unwrap(),
            proxied_client: None,
            link_id: None,
            upstream: "10.1.0.4:22".parse().unwrap(),
            age_s: age,
            idle_s: 1.0,
            bytes_up: 2048,
            bytes_down: 10,
            up: DirectionView {
                state: "open".into(),
                mode: "splice".into(),
                held_bytes: 4096,
            },
            down: DirectionView {
                state: "half-closed".into(),
                mode: "copy".into(),
                held_bytes: 0,
            },
            deadline_s: None,
        };
        let text = table(&[view(7, "ssh", 7380.0), view(12, "winrm", 3.0)]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].starts_with("ID  ROUTE"), "{text}");
        assert!(
            lines[1].contains("2h03m") && lines[1].contains("open splice holding 4.0 KiB"),
            "{text}"
        );
        assert!(
            lines[2].contains("half-closed copy") && lines[2].contains("never"),
            "{text}"
        );
        // Columns line up: the route column starts at the same place on every line.
        let at = |line: &str, word: &str| line.find(word).unwrap();
        assert_eq!(at(lines[0], "ROUTE"), at(lines[1], "ssh"));
        assert_eq!(at(lines[0], "ROUTE"), at(lines[2], "winrm"));
        assert_eq!(lines[3], "2 connections");
        assert_eq!(table(&[]), "no relayed connections\n");
    }
}
