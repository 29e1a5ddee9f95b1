//! A build VM that is not there yet is told apart from one that stopped answering: `/status`
//! records per route when the upstream first and last answered since ferryd started, and the
//! failed dials by kind since; `ferryd doctor` says which it is.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::*;

fn status(daemon: &Daemon) -> serde_json::Value {
    let answer = daemon.health_request("GET /status HTTP/1.0\r\n\r\n").unwrap();
    serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap()
}

/// The doctor's upstream finding of route `test`.
fn upstream_finding(daemon: &Daemon) -> serde_json::Value {
    let out = std::process::Command::new(bin())
        .args(["doctor", "--json", "--config"])
        .arg(&daemon.config)
        .output()
        .expect("run ferryd doctor");
    let findings: serde_json::Value = serde_json::from_slice(&out.stdout).expect("doctor's JSON");
    findings
        .as_array()
        .and_then(|all| all.iter().find(|f| f["check"] == "route test: upstream"))
        .cloned()
        .unwrap_or_else(|| panic!("no upstream finding in {findings}"))
}

/// A client's attempt; the upstream's answer is not what matters here, the dial is.
fn attempt(port: u16) {
    let mut client = TcpStream::connect(local(port)).unwrap();
    client.write_all(b"SSH-2.0-client\r\n").unwrap();
    client.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let _ = std::io::Read::read(&mut client, &mut [0u8; 64]);
}

#[test]
fn a_build_vm_not_there_yet_is_told_from_one_that_stopped() {
    // The build VM's port: nothing listens yet.
    let upstream_port = free_port();
    let port = free_port();
    let daemon = Daemon::start(&config_one_route(port, local(upstream_port), "", ""));
    attempt(port);
    attempt(port);
    let seen = &status(&daemon)["routes"][0]["upstream_seen"];
    assert!(seen["last_answered_at"].is_null(), "{seen}");
    assert_eq!(seen["failed_since"]["upstream-refused"], 2, "{seen}");
    let finding = upstream_finding(&daemon);
    assert_eq!(finding["status"], "fail", "{finding}");
    let detail = finding["detail"].as_str().unwrap_or("");
    assert!(
        detail.contains("has not answered since ferryd started") && detail.contains("refused 2 time(s)"),
        "{detail}"
    );

    // It comes up, answers, then stops: "answered until HH:MM, not since".
    let listener = std::net::TcpListener::bind(local(upstream_port)).unwrap();
    attempt(port);
    let seen = &status(&daemon)["routes"][0]["upstream_seen"];
    assert!(
        seen["first_answered_at"].is_u64() && seen["last_answered_at"].is_u64(),
        "{seen}"
    );
    assert!(
        seen["failed_since"].as_object().is_some_and(|f| f.is_empty()),
        "{seen}"
    );
    drop(listener);
    attempt(port);
    let finding = upstream_finding(&daemon);
    let detail = finding["detail"].as_str().unwrap_or("");
    assert!(
        detail.contains("it answered until") && detail.contains("UTC, not since (refused 1 time(s))"),
        "{detail}"
    );
}
