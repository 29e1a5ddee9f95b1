//! Property tests: the configuration parser never panics and every configuration it accepts
//! survives a round trip through `ferryd check`'s output; the allowlist matcher agrees with a
//! naive reference; the health endpoint answers arbitrary bytes without falling over; and a
//! handover document of any content is read or refused, never a panic.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use ferryd::allow::{Allowlist, Cidr};
use ferryd::config::Config;
use proptest::prelude::*;

fn parse(text: &str) -> Result<Config, ferryd::config::ConfigError> {
    Config::parse(text, Path::new("prop.toml"))
}

/// Lines that are almost a configuration: real keys with plausible and implausible values.
fn config_line() -> impl Strategy<Value = String> {
    // The per-route keys come from the configuration's own list, so a new one is covered here
    // without touching this file.
    let mut keys = ferryd::config::ROUTE_TUNABLE_KEYS.to_vec();
    keys.extend([
        "probe_sources",
        "drain_timeout",
        "workers",
        "splice",
        "max_pipes",
        "name",
        "listen",
        "upstream",
        "shutdown_grace",
        "path",
        "sources",
        "enabled",
        "require_nat",
        "bogus",
    ]);
    let key = prop::sample::select(keys);
    let value = prop::sample::select(vec![
        "[\"10.0.0.0/24\"]",
        "[\"0.0.0.0/0\", \"::/0\"]",
        "[\"10.0.0.1/33\"]",
        "[]",
        "\"30s\"",
        "\"0s\"",
        "\"1x\"",
        "0",
        "1",
        "65536",
        "-1",
        "true",
        "\"ssh\"",
        "\"\"",
        "\"0.0.0.0:60001\"",
        "\"127.0.0.1:0\"",
        "\"10.0.1.4:22\"",
        "\"buildvm:5986\"",
        "\"[::1]:22\"",
        "\"/healthz\"",
        "{ a = 1 }",
    ]);
    let table = prop::sample::select(vec!["", "[[route]]\n", "[health]\n", "[nat]\n"]);
    (table, key, value).prop_map(|(t, k, v)| format!("{t}{k} = {v}\n"))
}

fn route_block() -> impl Strategy<Value = String> {
    (1u16..=65535, 1u16..=65535, 0usize..4, prop::option::of(1usize..5000)).prop_map(|(listen, up, name, max)| {
        let mut block = format!(
            "\n[[route]]\nname = \"r{name}\"\nlisten = \"127.0.0.1:{listen}\"\nupstream = \"10.0.1.4:{up}\"\n"
        );
        if let Some(max) = max {
            block.push_str(&format!("max_connections = {max}\n"));
        }
        block
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Arbitrary text never panics the parser.
    #[test]
    fn parser_never_panics_on_arbitrary_text(text in "\\PC{0,400}") {
        let _ = parse(&text);
    }

    /// Near-configurations: accepted ones round-trip through the effective configuration.
    #[test]
    fn accepted_configurations_round_trip(
        top in prop::collection::vec(config_line(), 0..6),
        routes in prop::collection::vec(route_block(), 0..4),
        tail in prop::collection::vec(config_line(), 0..3),
    ) {
        let text = format!("allow = [\"10.0.0.0/8\"]\n{}{}{}", top.concat(), routes.concat(), tail.concat());
        if let Ok(config) = parse(&text) {
            let printed = config.to_toml();
            let again = parse(&printed).map_err(|e| TestCaseError::fail(format!("{e}\n{printed}")))?;
            prop_assert_eq!(&again, &config);
            prop_assert_eq!(again.to_toml(), printed);
        }
    }

    /// Well-formed configurations with random valid values: every one is accepted and comes back
    /// identical through the effective configuration.
    #[test]
    fn valid_configurations_are_accepted_and_round_trip(
        durations in prop::collection::vec(prop::sample::select(vec!["1s", "500ms", "30s", "2m", "1h 30m", "0s"]), 4),
        numbers in prop::collection::vec(1usize..100_000, 2),
        probes in 1u32..=127,
        route_count in 1usize..4,
        base_port in 1024u16..60000,
        v6_listen in any::<bool>(),
        health_path in "/[a-z]{1,12}",
        nat in prop::option::of((any::<u8>(), prop::option::of(1u16..=65535))),
    ) {
        let mut text = format!(
            "allow = [\"10.0.0.0/24\", \"2001:db8::/32\"]\nconnect_timeout = \"{}\"\nidle_timeout = \"{}\"\nmax_connections = {}\nkeepalive_probes = {probes}\nmax_pipes = {}\nshutdown_grace = \"{}\"\n",
            if durations[0] == "0s" { "5s" } else { durations[0] },
            durations[1],
            numbers[0],
            numbers[1],
            durations[2],
        );
        for i in 0..route_count {
            let port = base_port + i as u16;
            let listen = if v6_listen { format!("[::1]:{port}") } else { format!("127.0.0.1:{port}") };
            text.push_str(&format!(
                "\n[[route]]\nname = \"route-{i}\"\nlisten = \"{listen}\"\nupstream = \"buildvm{i}.internal:{}\"\nfin_timeout = \"{}\"\n",
                22 + i,
                if durations[3] == "0s" { "1m" } else { durations[3] },
            ));
        }
        text.push_str(&format!("\n[health]\nlisten = \"127.0.0.1:65000\"\npath = \"{health_path}\"\n"));
        if let Some((octet, port)) = nat {
            let dest = match port {
                Some(p) => format!("192.0.2.0/24:{p}"),
                None => "0.0.0.0/0".to_string(),
            };
            text.push_str(&format!("\n[nat]\nsources = [\"10.0.1.{octet}/32\"]\nallow_destinations = [\"{dest}\"]\n"));
        }
        if ["/metrics", "/status"].contains(&health_path.as_str()) {
            return Ok(());
        }
        let config = parse(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        let printed = config.to_toml();
        let again = parse(&printed).map_err(|e| TestCaseError::fail(format!("{e}\n{printed}")))?;
        prop_assert_eq!(&again, &config);
    }

    /// The matcher agrees with a bit-by-bit reference, for IPv4, IPv6 and IPv4-mapped sources.
    #[test]
    fn allowlist_matches_the_reference(
        v4 in prop::collection::vec((any::<u32>(), 0u8..=32), 0..5),
        v6 in prop::collection::vec((any::<u128>(), 0u8..=128), 0..3),
        probe4 in any::<u32>(),
        probe6 in any::<u128>(),
        near in any::<bool>(),
    ) {
        let mut blocks = Vec::new();
        let mut text = Vec::new();
        for (addr, len) in &v4 {
            let net = if *len == 0 { 0 } else { addr & (u32::MAX << (32 - len)) };
            text.push(format!("{}/{len}", Ipv4Addr::from(net)));
            blocks.push((IpAddr::V4(Ipv4Addr::from(net)), *len));
        }
        for (addr, len) in &v6 {
            let net = if *len == 0 { 0 } else { addr & (u128::MAX << (128 - len)) };
            text.push(format!("{}/{len}", Ipv6Addr::from(net)));
            blocks.push((IpAddr::V6(Ipv6Addr::from(net)), *len));
        }
        let list = Allowlist::new(text.iter().map(|t| t.parse::<Cidr>().unwrap()).collect());
        // Probe near the first block half the time, so matches are not all misses.
        let p4 = match (near, v4.first()) {
            (true, Some((a, _))) => a ^ (probe4 & 0xff),
            _ => probe4,
        };
        let sources = [
            IpAddr::V4(Ipv4Addr::from(p4)),
            IpAddr::V6(Ipv4Addr::from(p4).to_ipv6_mapped()),
            IpAddr::V6(Ipv6Addr::from(probe6)),
        ];
        for source in sources {
            let canonical = source.to_canonical();
            let reference = blocks.iter().any(|(net, len)| match (net, canonical) {
                (IpAddr::V4(n), IpAddr::V4(s)) => *len == 0 || (u32::from(*n) ^ u32::from(s)) >> (32 - len) == 0,
                (IpAddr::V6(n), IpAddr::V6(s)) => *len == 0 || (u128::from(*n) ^ u128::from(s)) >> (128 - len) == 0,
                _ => false,
            });
            prop_assert_eq!(list.contains(source), reference, "{} in {:?}", source, text);
        }
    }
}

/// Arbitrary bytes to the health endpoint get an HTTP answer or a closed connection, never a
/// crash; and the endpoint still answers a real probe afterwards.
#[test]
fn health_endpoint_survives_arbitrary_requests() {
    let upstream = common::Upstream::echo();
    let daemon = common::Daemon::start(&common::config_one_route(
        common::free_port(),
        upstream.addr,
        "",
        "",
    ));
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(200));
    let junk = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..600).prop_map(|v| String::from_utf8_lossy(&v).into_owned()),
        ("(GET|HEAD|POST|PUT|get|GeT) (/healthz|/metrics|/status|/|/x|\\*|[a-z/]{0,20}) (HTTP/1\\.0|HTTP/1\\.1|HTTP/2\\.0|HTTP/9|)",
            prop::collection::vec("[A-Za-z-]{1,12}: [ -~]{0,40}", 0..4))
            .prop_map(|(line, headers)| format!("{line}\r\n{}\r\n\r\n", headers.join("\r\n"))),
    ];
    runner
        .run(&junk, |request| {
            let answer = daemon.health_request(&request).unwrap_or_default();
            if let Some(code) = answer.split_whitespace().nth(1) {
                prop_assert!(
                    ["200", "400", "403", "404", "405", "431", "501", "505"].contains(&code),
                    "{:?} -> {}",
                    request,
                    answer
                );
            }
            Ok(())
        })
        .unwrap();
    let answer = daemon.health_request("GET /healthz HTTP/1.0\r\n\r\n").unwrap();
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
}

fn socket_addr() -> impl Strategy<Value = std::net::SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| (Ipv4Addr::from(ip), port).into()),
        (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, port)| (Ipv6Addr::from(ip), port).into()),
    ]
}

proptest! {
    /// Arbitrary bytes never make the PROXY v2 parser panic.
    #[test]
    fn proxy_header_parser_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = ferryd::proxy_header::parse(&bytes);
        let _ = ferryd::proxy_header::could_be_header(&bytes);
    }

    /// Any header the encoder builds parses back to the same fields and consumes exactly its
    /// length, whatever follows it.
    #[test]
    fn proxy_headers_round_trip(
        local in any::<bool>(),
        source in socket_addr(),
        destination in socket_addr(),
        link_id in prop::option::of(any::<u32>()),
        tlvs in prop::collection::vec((any::<u8>(), prop::collection::vec(any::<u8>(), 0..40)), 0..6),
        trailing in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        use ferryd::proxy_header::{self, Command, Header};
        let same_family = source.is_ipv4() == destination.is_ipv4();
        let mut all = tlvs.into_iter().filter(|(kind, _)| *kind != proxy_header::AZURE_TLV).collect::<Vec<_>>();
        if let Some(id) = link_id {
            all.insert(all.len() / 2, proxy_header::azure_link_tlv(id));
        }
        let header = Header {
            command: if local { Command::Local } else { Command::Proxy },
            addresses: same_family.then_some((source, destination)),
            tlvs: all,
            link_id,
        };
        let mut bytes = proxy_header::encode(&header);
        let len = bytes.len();
        bytes.extend_from_slice(&trailing);
        let fixed: [u8; 16] = bytes[..16].try_into().unwrap();
        prop_assert_eq!(proxy_header::header_len(&fixed).unwrap(), len);
        prop_assert_eq!(proxy_header::parse(&bytes[..len]).unwrap(), header);
    }
}

/// A valid handover document: the base the property below mutates.
const BASE_HANDOVER: &str = r#"{"version":1,"written_by":"0.2.0","parked_at_ns":5,
    "written_at_ns":6,"exe":"/usr/bin/ferryd",
    "listeners":[{"name":"ssh","fd":3},{"name":"health","fd":4}],
    "connections":[{"route":"ssh","peer":"127.0.0.1:1","upstream":"127.0.0.1:2",
        "client_fd":5,"upstream_fd":6,"up":{"state":"done"},
        "down":{"state":"open","splice":false,"pipe":{"read_fd":7,"write_fd":8,"bytes":10}},
        "age_ms":10,"quiet_ms":2,"bytes_up":0,"bytes_down":0,"fin_timeout_ms":0}],
    "routes":{},"relay":{},"daemon":{}}"#;

#[test]
fn the_base_handover_document_is_accepted() {
    let doc = ferryd::handover::Document::decode(BASE_HANDOVER.as_bytes()).expect("accepted");
    assert_eq!(doc.descriptors(), vec![3, 4, 5, 6, 7, 8]);
}

/// JSON that is almost a handover document: the real keys, with values of every kind.
fn handover_json() -> impl Strategy<Value = String> {
    let value = prop::sample::select(vec![
        "1",
        "0",
        "2",
        "99",
        "-1",
        "3",
        "4294967296",
        "\"x\"",
        "null",
        "[]",
        "{}",
        "true",
        "[{\"name\":\"ssh\",\"fd\":3}]",
        "[{\"name\":\"ssh\",\"fd\":1}]",
        // Connections each refused for exactly one reason, and one accepted:
        "[{\"route\":\"ssh\",\"peer\":\"127.0.0.1:1\",\"upstream\":\"127.0.0.1:2\",\"client_fd\":11,\"upstream_fd\":11,\"up\":{\"state\":\"done\"},\"down\":{\"state\":\"open\",\"splice\":true,\"pipe\":{\"read_fd\":9,\"write_fd\":10,\"bytes\":10}},\"age_ms\":5,\"quiet_ms\":2,\"bytes_up\":0,\"bytes_down\":0,\"fin_timeout_ms\":0}]", // a descriptor named twice
        "[{\"route\":\"ssh\",\"peer\":\"127.0.0.1:1\",\"upstream\":\"127.0.0.1:2\",\"client_fd\":11,\"upstream_fd\":12,\"up\":{\"state\":\"done\"},\"down\":{\"state\":\"open\",\"splice\":true,\"pipe\":{\"read_fd\":9,\"write_fd\":10,\"bytes\":18446744073709551615}},\"age_ms\":5,\"quiet_ms\":2,\"bytes_up\":0,\"bytes_down\":0,\"fin_timeout_ms\":0}]", // an impossible pipe
        "[{\"route\":\"ssh\",\"peer\":\"127.0.0.1:1\",\"upstream\":\"127.0.0.1:2\",\"client_fd\":11,\"upstream_fd\":12,\"up\":{\"state\":\"done\"},\"down\":{\"state\":\"open\",\"splice\":true,\"pipe\":{\"read_fd\":9,\"write_fd\":10,\"bytes\":10}},\"age_ms\":1,\"quiet_ms\":2,\"bytes_up\":0,\"bytes_down\":0,\"fin_timeout_ms\":0}]", // quiet longer than alive
        "[{\"route\":\"ssh\",\"peer\":\"127.0.0.1:1\",\"upstream\":\"127.0.0.1:2\",\"client_fd\":1,\"upstream_fd\":12,\"up\":{\"state\":\"done\"},\"down\":{\"state\":\"open\",\"splice\":true,\"pipe\":{\"read_fd\":9,\"write_fd\":10,\"bytes\":10}},\"age_ms\":5,\"quiet_ms\":2,\"bytes_up\":0,\"bytes_down\":0,\"fin_timeout_ms\":0}]", // stdout
        "[{\"route\":\"ssh\",\"peer\":\"127.0.0.1:1\",\"upstream\":\"127.0.0.1:2\",\"client_fd\":11,\"upstream_fd\":12,\"up\":{\"state\":\"done\"},\"down\":{\"state\":\"open\",\"splice\":true,\"pipe\":{\"read_fd\":9,\"write_fd\":10,\"bytes\":10}},\"age_ms\":5,\"quiet_ms\":2,\"bytes_up\":0,\"bytes_down\":0,\"fin_timeout_ms\":0}]", // fine
        "[{\"route\":\"ssh\",\"peer\":\"127.0.0.1:1\",\"upstream\":\"127.0.0.1:2\",\"client_fd\":11,\"upstream_fd\":12,\"up\":{\"state\":\"done\"},\"down\":{\"state\":\"open\",\"splice\":false,\"pipe\":null,\"held\":\"00ff\"},\"age_ms\":5,\"quiet_ms\":2,\"bytes_up\":0,\"bytes_down\":0,\"fin_timeout_ms\":0}]", // fine, held bytes
        "[{\"route\":\"ssh\",\"peer\":\"127.0.0.1:1\",\"upstream\":\"127.0.0.1:2\",\"client_fd\":11,\"upstream_fd\":12,\"up\":{\"state\":\"done\"},\"down\":{\"state\":\"open\",\"splice\":false,\"pipe\":null,\"held\":\"0g\"},\"age_ms\":5,\"quiet_ms\":2,\"bytes_up\":0,\"bytes_down\":0,\"fin_timeout_ms\":0}]", // held bytes that are not hexadecimal
        "[{\"route\":\"ssh\",\"peer\":\"127.0.0.1:1\",\"upstream\":\"127.0.0.1:2\",\"client_fd\":11,\"upstream_fd\":12,\"up\":{\"state\":\"done\"},\"down\":{\"state\":\"open\",\"splice\":true,\"pipe\":{\"read_fd\":9,\"write_fd\":10,\"bytes\":10},\"held\":\"00\"},\"age_ms\":5,\"quiet_ms\":2,\"bytes_up\":0,\"bytes_down\":0,\"fin_timeout_ms\":0}]", // both a pipe and held bytes
    ]);
    let key = prop::sample::select(vec![
        "version",
        "written_by",
        "parked_at_ns",
        "listeners",
        "connections",
        "routes",
        "relay",
        "daemon",
        "bogus",
    ]);
    // A valid document with a few keys replaced, so that both acceptance and every refusal
    // are reached.
    prop::collection::vec((key, value), 0..4).prop_map(|pairs| {
        let mut doc: serde_json::Value = serde_json::from_str(BASE_HANDOVER).expect("the base document");
        for (key, value) in pairs {
            doc[key] = serde_json::from_str(value).expect("a JSON value");
        }
        doc.to_string()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Whatever bytes arrive as a handover document, reading it refuses or accepts, never
    /// panics; and an accepted one names no descriptor below 3 and none twice.
    #[test]
    fn handover_documents_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = ferryd::handover::Document::decode(&bytes);
    }

    /// Random bytes are rarely JSON; a valid document with bytes changed, inserted or cut
    /// reaches the parser's and the checks' deeper paths.
    #[test]
    fn damaged_handover_documents_never_panic(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8),
    ) {
        let mut bytes = BASE_HANDOVER.as_bytes().to_vec();
        for (at, byte, how) in edits {
            if bytes.is_empty() {
                break;
            }
            let i = at.index(bytes.len());
            match how {
                0 => bytes[i] = byte,
                1 => bytes.insert(i, byte),
                _ => bytes.truncate(i),
            }
        }
        let _ = ferryd::handover::Document::decode(&bytes);
    }

    #[test]
    fn accepted_handover_documents_name_safe_descriptors(text in handover_json()) {
        if let Ok(doc) = ferryd::handover::Document::decode(text.as_bytes()) {
            prop_assert!(ferryd::handover::ACCEPTED.contains(&doc.version), "{}", doc.version);
            let fds = doc.descriptors();
            prop_assert!(fds.iter().all(|fd| *fd > 2), "{:?}", fds);
            let unique: std::collections::BTreeSet<_> = fds.iter().collect();
            prop_assert_eq!(unique.len(), fds.len());
        }
    }
}
