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
    let out = Command::new(bin())
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
    let out = Command::new(bin())
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
    let version = Command::new(bin()).arg("--version").output().unwrap();
    assert!(version.status.success());
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("ferryd {}", env!("CARGO_PKG_VERSION"))
    );
    let help = Command::new(bin()).arg("--help").output().unwrap();
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("run") && help.contains("check"), "{help}");
    let run_help = Command::new(bin()).args(["run", "--help"]).output().unwrap();
    assert!(run_help.status.success());
    assert!(String::from_utf8_lossy(&run_help.stdout).contains("/etc/ferryd/ferryd.toml"));
}

/// `ferryd run` on an invalid file exits 1 with the reason.
#[test]
fn run_refuses_an_invalid_file_with_ex_config() {
    let mut daemon = Daemon::spawn_with("allow = [\"x\"]\n", |_| {});
    let status = daemon.wait_exit(Duration::from_secs(5)).expect("exits");
    // 78 (EX_CONFIG): the unit's RestartPreventExitStatus= stops a restart loop on it.
    assert_eq!(status.code(), Some(78));
    assert!(daemon.log().contains("invalid CIDR \"x\""), "{}", daemon.log());
}

/// A listen port held by someone else at start is retried; once it is released, ferryd starts.
#[test]
fn run_retries_a_busy_listen_port() {
    let holder = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let upstream = Upstream::echo();
    let daemon = Daemon::spawn_with(&config_one_route(port, upstream.addr, "", ""), |_| {});
    daemon.expect_log("cannot listen yet", Duration::from_secs(5));
    assert!(daemon.log_lines(" ready config=").is_empty(), "{}", daemon.log());
    drop(holder);
    daemon.expect_log(" ready config=", Duration::from_secs(5));
    let mut client = std::net::TcpStream::connect(local(port)).unwrap();
    echo_roundtrip(&mut client, b"after retry").unwrap();
}

/// `nat down` takes `--config` like its siblings and needs nothing from it; `nat status` exits 2
/// when it cannot check at all (here: iptables is not on PATH), which scripts can tell from 1
/// (checked, and drifted).
#[test]
fn nat_commands_take_config_and_status_says_when_it_cannot_check() {
    let dir = TempDir::new("nat-cli");
    let config = dir.path().join("ferryd.toml");
    std::fs::write(
        &config,
        format!("{GOOD}\n[nat]\nsources = [\"10.0.1.4/32\"]\nout_interface = \"eth0\"\n"),
    )
    .unwrap();
    let help = Command::new(bin())
        .args(["nat", "down", "--help"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("--config"));
    let down = Command::new(bin())
        .args(["nat", "down", "--config", "/nonexistent/ferryd.toml"])
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&down.stderr);
    assert!(
        !stderr.contains("unexpected argument"),
        "--config must be accepted: {stderr}"
    );
    let status = Command::new(bin())
        .args(["nat", "status", "--config"])
        .arg(&config)
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    assert_eq!(
        status.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(String::from_utf8_lossy(&status.stderr).contains("iptables is not installed"));
}

/// Completion scripts for the shells the package installs them for.
#[test]
fn completions_for_bash_and_zsh() {
    for (shell, marker) in [("bash", "complete -F"), ("zsh", "#compdef ferryd")] {
        let out = Command::new(bin()).args(["completions", shell]).output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(marker), "{shell}: {text}");
        for sub in ["run", "check", "nat", "status"] {
            assert!(text.contains(sub), "{shell} completion lacks {sub}");
        }
    }
    let bash = Command::new(bin())
        .args(["completions", "bash"])
        .output()
        .unwrap();
    let parsed = Command::new("bash")
        .args(["-n", "/dev/stdin"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write as _;
            child.stdin.take().unwrap().write_all(&bash.stdout)?;
            child.wait()
        })
        .unwrap();
    assert!(parsed.success(), "the bash completion does not parse");
}
