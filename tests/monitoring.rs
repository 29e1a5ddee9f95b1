//! The monitoring the package ships: the Prometheus alert rules pass `promtool check rules` and
//! their unit tests (`promtool test rules`), and every metric the rules and the Grafana
//! dashboard query exists in a real scrape of a running ferryd.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use common::*;

fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn promtool() -> bool {
    let found = Command::new("promtool").arg("--version").output().is_ok();
    if !found {
        common::skip::skipped("promtool is not installed (Debian's prometheus package; .ci/run installs it)");
    }
    found
}

#[test]
fn alert_rules_check_and_their_unit_tests_pass() {
    if !promtool() {
        return;
    }
    let check = Command::new("promtool")
        .args(["check", "rules"])
        .arg(repo("packaging/prometheus/ferryd-alerts.yml"))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let test = Command::new("promtool")
        .args(["test", "rules"])
        .arg(repo("tests/prometheus/ferryd-alerts.test.yml"))
        .output()
        .unwrap();
    assert!(
        test.status.success(),
        "{}{}",
        String::from_utf8_lossy(&test.stdout),
        String::from_utf8_lossy(&test.stderr)
    );
}

/// Metric names (ferryd_*, process_*) in a PromQL text.
fn metric_names(promql: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = promql.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &promql[i..];
        let boundary = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if boundary && (rest.starts_with("ferryd_") || rest.starts_with("process_")) {
            let len = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            names.insert(rest[..len].to_string());
            i += len;
        } else {
            i += 1;
        }
    }
    names
}

/// Every sample name in a scrape.
fn scraped_names(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

#[test]
fn every_metric_the_rules_and_the_dashboard_query_exists() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo("packaging/grafana/ferryd.json")).unwrap())
            .expect("the dashboard is JSON");
    assert_eq!(dashboard["title"], "ferryd");
    let mut queried = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            queried.extend(metric_names(target["expr"].as_str().expect("expr")));
        }
    }
    let rules = std::fs::read_to_string(repo("packaging/prometheus/ferryd-alerts.yml")).unwrap();
    for line in rules.lines().filter(|l| l.trim_start().starts_with("expr:")) {
        queried.extend(metric_names(line));
    }
    assert!(queried.len() >= 15, "{queried:?}");

    let upstream = Upstream::echo();
    let port = free_port();
    let daemon = Daemon::start(&config_one_route(port, upstream.addr, "", ""));
    let mut client = std::net::TcpStream::connect(local(port)).unwrap();
    echo_roundtrip(&mut client, b"some traffic").unwrap();
    let scrape = http_from(
        std::net::Ipv4Addr::LOCALHOST,
        daemon.health_port.unwrap(),
        "GET /metrics HTTP/1.0\r\n\r\n",
    )
    .unwrap();
    let exposed = scraped_names(&scrape);
    let missing: Vec<&String> = queried.iter().filter(|n| !exposed.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "queried but not exposed: {missing:?}\nexposed: {exposed:?}"
    );
}

/// docs/operations.md's table of journal MESSAGE_IDs is exactly the list the daemon sends: every
/// `pub const NAME: &str = "..."` of src/logging/ids.rs, read from the source so that a new id
/// cannot be left out of the table.
#[test]
fn operations_doc_lists_every_message_id() {
    let is_id = |s: &str| s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit());
    let source = std::fs::read_to_string(repo("src/logging/ids.rs")).unwrap();
    let in_code: std::collections::BTreeMap<&str, &str> = source
        .lines()
        .filter_map(|line| line.trim().strip_prefix("pub const "))
        .filter_map(|line| line.split_once(": &str = \""))
        .map(|(name, rest)| (name, rest.trim_end_matches("\";")))
        .collect();
    assert!(
        in_code
            .values()
            .any(|id| *id == ferryd::logging::ids::UPGRADE_REFUSED),
        "src/logging/ids.rs was not read right: {in_code:?}"
    );
    for (name, id) in &in_code {
        assert!(is_id(id), "{name} = {id:?} is not a 128-bit hex id");
    }
    let doc = std::fs::read_to_string(repo("docs/operations.md")).unwrap();
    let in_table: BTreeSet<&str> = doc
        .lines()
        .filter(|line| line.starts_with('|'))
        .flat_map(|line| line.split('`').skip(1).step_by(2))
        .filter(|s| is_id(s))
        .collect();
    let missing: Vec<&str> = in_code
        .iter()
        .filter(|(_, id)| !in_table.contains(*id))
        .map(|(name, _)| *name)
        .collect();
    let unknown: Vec<&str> = in_table
        .iter()
        .filter(|id| !in_code.values().any(|v| v == *id))
        .copied()
        .collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "docs/operations.md's MESSAGE_ID table lacks {missing:?} and lists ids the code does not send: {unknown:?}"
    );
}
