//! The command line: `ferryd check` messages and output, version and help, and start-up
//! behaviour of `ferryd run` that needs no traffic.

mod common;

use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use common::*;

const GOOD: &str = r#"allow = ["10.0.0.0/24"]
probe_sources = ["168.63.129.16/32"]
drain_timeout = "30s"

[[route]]
name = "ssh"
listen = "0.0.0.0:60001"
upstream = "10.0.1.4:22"

[[route]]
name = "winrm"
listen = "0.0.0.0:60000"
upstream = "10.0.1.4:5986"
"#;

/// Runs `ferryd check` on `text`; returns (exit code, stdout, stderr).
fn check(text: &str) -> (i32, String, String) {
    let dir = TempDir::new("check");
    let path = dir.path().join("ferryd.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(BIN)
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).replace(&path.display().to_string(), "FILE");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
    )
}

#[test]
fn check_accepts_the_example_and_prints_every_route() {
    let (code, stdout, stderr) = check(GOOD);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("name = \"ssh\""), "{stdout}");
    assert!(stdout.contains("upstream = \"10.0.1.4:5986\""), "{stdout}");
    assert!(stdout.contains("max_connections = 1024"), "{stdout}");
    assert!(stdout.contains("keepalive_time = \"1m\""), "{stdout}");
    // What check prints is itself a valid configuration with the same meaning.
    let (code, again, stderr) = check(&stdout);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(again, stdout);
}

#[test]
fn check_accepts_the_shipped_example_file() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml")).unwrap();
    let (code, _, stderr) = check(&text);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn check_names_file_line_and_problem() {
    let cases = [
        (
            GOOD.replace("10.0.0.0/24", "10.0.0.0/40"),
            "FILE:1:",
            "invalid CIDR \"10.0.0.0/40\"",
        ),
        (
            GOOD.replace("drain_timeout", "drain_timout"),
            "FILE:3:",
            "unknown field `drain_timout`",
        ),
        (
            GOOD.replace("0.0.0.0:60000", "0.0.0.0:60001"),
            "FILE:12:",
            "listen address 0.0.0.0:60001 is already used by route \"ssh\"",
        ),
        (
            GOOD.replace("allow = [\"10.0.0.0/24\"]", ""),
            "FILE:5:",
            "route \"ssh\" has no allow list",
        ),
        (
            GOOD.replace("\"30s\"", "\"30 fortnights\""),
            "FILE:3:",
            "invalid duration \"30 fortnights\"",
        ),
        (GOOD.replace("10.0.1.4:22", "10.0.1.4:0"), "FILE:8:", "port 0"),
        (GOOD.replace("\"ssh\"", "\"\""), "FILE:6:", "route name is empty"),
        ("allow = [".to_string(), "FILE:1:", ""),
    ];
    for (text, place, message) in cases {
        let (code, stdout, stderr) = check(&text);
        assert_eq!(code, 1, "expected failure for {message:?}: {stderr}");
        assert!(stdout.is_empty());
        assert!(stderr.contains(place), "{message:?}: wanted {place} in {stderr}");
        assert!(stderr.contains(message), "wanted {message:?} in {stderr}");
    }
}

#[test]
fn check_reports_an_unreadable_file() {
    let out = Command::new(BIN)
        .args(["check", "--config", "/nonexistent/ferryd.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/nonexistent/ferryd.toml: cannot read"),
        "{stderr}"
    );
}

#[test]
fn version_and_help() {
    let version = Command::new(BIN).arg("--version").output().unwrap();
    assert!(version.status.success());
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("ferryd {}", env!("CARGO_PKG_VERSION"))
    );
    let help = Command::new(BIN).arg("--help").output().unwrap();
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("run") && help.contains("check"), "{help}");
    let run_help = Command::new(BIN).args(["run", "--help"]).output().unwrap();
    assert!(run_help.status.success());
    assert!(String::from_utf8_lossy(&run_help.stdout).contains("/etc/ferryd/ferryd.toml"));
}

/// `ferryd run` on an invalid file exits 1 with the reason.
#[test]
fn run_refuses_an_invalid_file() {
    let mut daemon = Daemon::spawn_with("allow = [\"x\"]\n", |_| {});
    let status = daemon.wait_exit(Duration::from_secs(5)).expect("exits");
    assert_eq!(status.code(), Some(1));
    assert!(daemon.log().contains("invalid CIDR \"x\""), "{}", daemon.log());
}

/// A listen port held by someone else at start is retried; once it is released, ferryd starts.
#[test]
fn run_retries_a_busy_listen_port() {
    let holder = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let upstream = Upstream::echo();
    let daemon = Daemon::spawn_with(&config_one_route(port, upstream.addr, "", ""), |_| {});
    assert!(
        daemon
            .wait_for_log("cannot listen yet", Duration::from_secs(5))
            .is_some(),
        "{}",
        daemon.log()
    );
    assert!(daemon.log_lines(" ready config=").is_empty(), "{}", daemon.log());
    drop(holder);
    assert!(
        daemon
            .wait_for_log(" ready config=", Duration::from_secs(5))
            .is_some(),
        "{}",
        daemon.log()
    );
    let mut client = std::net::TcpStream::connect(local(port)).unwrap();
    echo_roundtrip(&mut client, b"after retry").unwrap();
}
