//! Unit tests of parsing, defaults, errors and rendering.

use std::path::Path;

use super::resolve::listens_overlap;
use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("test.toml"))
}

const MINIMAL: &str = r#"
allow = ["10.0.0.0/24"]

[[route]]
name = "ssh"
listen = "0.0.0.0:60001"
upstream = "10.0.1.4:22"
"#;

#[test]
fn minimal_file_gets_documented_defaults() {
    let config = parse(MINIMAL).unwrap();
    let route = &config.routes[0];
    assert_eq!(route.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
    assert_eq!(route.idle_timeout, Some(DEFAULT_IDLE_TIMEOUT));
    assert_eq!(route.max_connections, DEFAULT_MAX_CONNECTIONS);
    assert_eq!(route.keepalive.time, Duration::from_secs(60));
    assert!(route.allow.contains("10.0.0.9".parse().unwrap()));
    assert!(config.probe_sources.contains("168.63.129.16".parse().unwrap()));
    assert_eq!(config.drain_timeout, DEFAULT_DRAIN_TIMEOUT);
}

#[test]
fn route_settings_override_top_level_defaults() {
    let config = parse(
        r#"
allow = ["10.0.0.0/24"]
idle_timeout = "10m"
[[route]]
name = "a"
listen = "0.0.0.0:1"
upstream = "10.0.1.4:22"
allow = ["192.0.2.0/24"]
idle_timeout = "0s"
[[route]]
name = "b"
listen = "0.0.0.0:2"
upstream = "buildvm.internal:5986"
"#,
    )
    .unwrap();
    assert!(!config.routes[0].allow.contains("10.0.0.9".parse().unwrap()));
    assert_eq!(config.routes[0].idle_timeout, None);
    assert_eq!(config.routes[1].idle_timeout, Some(Duration::from_secs(600)));
    assert_eq!(
        config.routes[1].upstream,
        Upstream::Host {
            host: "buildvm.internal".into(),
            port: 5986
        }
    );
}

#[test]
fn effective_configuration_round_trips() {
    let config = parse(MINIMAL).unwrap();
    let again = parse(&config.to_toml()).unwrap();
    assert_eq!(config, again);
}

fn error_of(text: &str) -> String {
    parse(text).unwrap_err().to_string()
}

#[test]
fn errors_name_the_place_and_the_problem() {
    let bad_cidr = error_of(&MINIMAL.replace("10.0.0.0/24", "10.0.0.0/33"));
    assert!(bad_cidr.starts_with("test.toml:2:"), "{bad_cidr}");
    assert!(bad_cidr.contains("invalid CIDR \"10.0.0.0/33\""), "{bad_cidr}");

    let unknown = error_of(&format!("{MINIMAL}colour = \"blue\"\n"));
    assert!(unknown.contains("unknown field `colour`"), "{unknown}");
    assert!(unknown.starts_with("test.toml:8:"), "{unknown}");

    let duplicate = error_of(&format!(
        "{MINIMAL}[[route]]\nname = \"two\"\nlisten = \"0.0.0.0:60001\"\nupstream = \"10.0.1.4:5986\"\n"
    ));
    assert!(duplicate.contains("already used by route \"ssh\""), "{duplicate}");
    assert!(duplicate.starts_with("test.toml:10:"), "{duplicate}");

    let no_allow = error_of(&MINIMAL.replace("allow = [\"10.0.0.0/24\"]", ""));
    assert!(no_allow.contains("has no allow list"), "{no_allow}");

    let huge = error_of(&format!("{MINIMAL}idle_timeout = \"300000000000y\"\n"));
    assert!(huge.contains("longer than ten years"), "{huge}");

    let bad_duration = error_of(&format!("{MINIMAL}connect_timeout = \"5 parsecs\"\n"));
    assert!(
        bad_duration.contains("invalid duration \"5 parsecs\""),
        "{bad_duration}"
    );

    let port_zero = error_of(&MINIMAL.replace("10.0.1.4:22", "10.0.1.4:0"));
    assert!(port_zero.contains("port 0"), "{port_zero}");

    let empty_name = error_of(&MINIMAL.replace("\"ssh\"", "\"\""));
    assert!(empty_name.contains("route name is empty"), "{empty_name}");
}

#[test]
fn health_defaults_to_probe_sources_and_loopback() {
    let config = parse(MINIMAL).unwrap();
    assert_eq!(config.health.listen, DEFAULT_HEALTH_LISTEN);
    assert_eq!(config.health.path, "/healthz");
    assert!(config.health.allow.contains("168.63.129.16".parse().unwrap()));
    assert!(config.health.allow.contains("127.0.0.1".parse().unwrap()));
    assert!(!config.health.allow.contains("10.0.0.9".parse().unwrap()));
    assert!(config.health.metrics_allow.contains("::1".parse().unwrap()));
    assert!(
        !config
            .health
            .metrics_allow
            .contains("168.63.129.16".parse().unwrap())
    );
    let clash = error_of(&MINIMAL.replace("0.0.0.0:60001", "127.0.0.1:60080"));
    assert!(clash.contains("collides with the health endpoint"), "{clash}");
}

#[test]
fn nat_table_is_validated() {
    let nat = |body: &str| parse(&format!("{MINIMAL}\n[nat]\n{body}\n"));
    let config = nat("sources = [\"10.0.1.4/32\"]\nallow_destinations = [\"0.0.0.0/0:443\", \"192.0.2.0/24:8000-8100\", \"198.51.100.7\"]").unwrap();
    assert!(config.nat.enabled);
    let dests = config.nat.allow_destinations.clone().unwrap();
    assert_eq!(dests[0].ports, Some((443, 443)));
    assert_eq!(dests[1].ports, Some((8000, 8100)));
    assert_eq!(dests[2].ports, None);
    assert_eq!(parse(&config.to_toml()).unwrap(), config);
    assert!(!parse(MINIMAL).unwrap().nat.enabled);
    for (body, want) in [
        ("enabled = true", "needs sources"),
        ("sources = [\"2001:db8::1\"]", "IPv4 only"),
        (
            "sources = [\"10.0.1.4\"]\nallow_destinations = [\"0.0.0.0/0:0\"]",
            "not a port",
        ),
        (
            "sources = [\"10.0.1.4\"]\nallow_destinations = [\"0.0.0.0/0:90-80\"]",
            "backwards",
        ),
        (
            "sources = [\"10.0.1.4\"]\nout_interface = \"eth0; rm -rf\"",
            "not an interface name",
        ),
    ] {
        let e = nat(body).unwrap_err().to_string();
        assert!(e.contains(want), "{body}: {e}");
    }
}

#[test]
fn wildcard_listen_collides_with_specific_address() {
    assert!(listens_overlap(
        "0.0.0.0:1".parse().unwrap(),
        "10.0.0.1:1".parse().unwrap()
    ));
    assert!(listens_overlap(
        "[::]:1".parse().unwrap(),
        "10.0.0.1:1".parse().unwrap()
    ));
    assert!(!listens_overlap(
        "10.0.0.2:1".parse().unwrap(),
        "10.0.0.1:1".parse().unwrap()
    ));
    assert!(!listens_overlap(
        "0.0.0.0:1".parse().unwrap(),
        "0.0.0.0:2".parse().unwrap()
    ));
}
