//! The systemd unit and the Debian package: directives systemd 237 really applies, a static
//! binary, lintian, and `systemd-analyze verify` where systemd is installed.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

/// Directives the unit may use, with the systemd version that introduced each (from systemd's
/// NEWS). Anything not listed, or newer than 237 (Ubuntu 18.04), fails the test: systemd ignores
/// unknown directives with a warning, so hardening would silently disappear there.
const DIRECTIVES: &[(&str, u32)] = &[
    ("Description", 1),
    ("Documentation", 1),
    ("Wants", 1),
    ("After", 1),
    ("Type", 1),
    ("NotifyAccess", 1),
    ("ExecStartPre", 1),
    ("ExecStart", 1),
    ("ExecReload", 1),
    ("Restart", 1),
    ("RestartSec", 1),
    ("RestartPreventExitStatus", 189),
    ("WatchdogSec", 1),
    ("FileDescriptorStoreMax", 219),
    ("TimeoutStopSec", 1),
    ("LimitNOFILE", 1),
    ("User", 1),
    ("Group", 1),
    ("WantedBy", 1),
    ("CapabilityBoundingSet", 1),
    ("NoNewPrivileges", 187),
    ("SystemCallFilter", 187),
    ("SystemCallErrorNumber", 209),
    ("SystemCallArchitectures", 209),
    ("PrivateTmp", 1),
    ("PrivateDevices", 1),
    ("ProtectSystem", 214),
    ("ProtectHome", 214),
    ("RestrictAddressFamilies", 211),
    ("AmbientCapabilities", 229),
    ("MemoryDenyWriteExecute", 231),
    ("RestrictRealtime", 231),
    ("ReadWritePaths", 231),
    ("ProtectKernelTunables", 232),
    ("ProtectKernelModules", 232),
    ("ProtectControlGroups", 232),
    ("RestrictNamespaces", 233),
    ("StateDirectory", 235),
    ("LockPersonality", 235),
    // Reload propagation is from 2012, long before 237.
    ("PropagatesReloadTo", 187),
    ("ReloadPropagatedFrom", 187),
    ("RuntimeDirectory", 211),
    ("RuntimeDirectoryMode", 211),
    ("UMask", 1),
    ("RemoveIPC", 232),
    ("IPAddressDeny", 235),
    // Known to be newer than 237: listed so the message says why, not just "unknown".
    ("PrivateMounts", 239),
    ("ProtectHostname", 242),
    ("RestrictSUIDSGID", 242),
    ("ProtectKernelLogs", 244),
    ("ProtectClock", 245),
    ("ProtectProc", 247),
    ("ProcSubset", 247),
    ("SystemCallLog", 247),
    ("RestrictFileSystems", 249),
];

/// System call groups systemd 237 knows. `@system-service`, `@pkey`, `@known`, `@sandbox` and
/// the like came later; an unknown group is dropped there, which can leave a filter that kills
/// the daemon with SIGSYS.
const GROUPS_237: &[&str] = &[
    "@basic-io",
    "@clock",
    "@cpu-emulation",
    "@debug",
    "@default",
    "@file-system",
    "@io-event",
    "@ipc",
    "@keyring",
    "@module",
    "@mount",
    "@network-io",
    "@obsolete",
    "@privileged",
    "@process",
    "@raw-io",
    "@reboot",
    "@resources",
    "@swap",
];

fn unit_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/ferryd.service")
}

/// The NAT keeper's unit.
fn nat_unit_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/ferryd-nat.service")
}

/// (directive, value) pairs of a unit file.
fn directives(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

fn problems_for_237(text: &str) -> Vec<String> {
    let mut problems = Vec::new();
    for (key, value) in directives(text) {
        match DIRECTIVES.iter().find(|(name, _)| *name == key) {
            None => problems.push(format!(
                "{key}= is not in the list of directives known to systemd 237"
            )),
            Some((_, version)) if *version > 237 => problems.push(format!(
                "{key}= arrived in systemd {version}; Ubuntu 18.04 has 237"
            )),
            Some(_) => {}
        }
        if key == "Type" && value == "notify-reload" {
            problems.push("Type=notify-reload arrived in systemd 253".into());
        }
        if key == "SystemCallFilter" {
            for word in value.trim_start_matches('~').split_whitespace() {
                if word.starts_with('@') && !GROUPS_237.contains(&word) {
                    problems.push(format!("SystemCallFilter group {word} is unknown to systemd 237"));
                }
            }
        }
    }
    problems
}

#[test]
fn unit_uses_only_what_systemd_237_applies() {
    for unit in [unit_path(), nat_unit_path()] {
        let problems = problems_for_237(&std::fs::read_to_string(&unit).unwrap());
        assert!(problems.is_empty(), "{}: {problems:#?}", unit.display());
    }
    let text = std::fs::read_to_string(unit_path()).unwrap();
    // The checker itself catches what it is meant to catch.
    let bad = format!(
        "{text}\nProtectClock=yes\nSystemCallFilter=@system-service\nType=notify-reload\nFrobnicate=1\n"
    );
    let found = problems_for_237(&bad);
    assert_eq!(found.len(), 4, "{found:#?}");
}

/// The values of `key` in a unit's text.
fn values(text: &str, key: &str) -> Vec<String> {
    directives(text)
        .into_iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v)
        .collect()
}

/// What both units must have: notify with the watchdog, a reload that validates first, no
/// restart loop on a bad file, the ferryd user, and the hardening systemd 237 applies.
fn common_settings(text: &str, name: &str) {
    let get = |k: &str| values(text, k);
    assert_eq!(get("Type"), ["notify"], "{name}");
    assert_eq!(get("NotifyAccess"), ["main"], "{name}");
    assert_eq!(get("User"), ["ferryd"], "{name}");
    assert!(
        get("ExecReload")[0].contains("ferryd check"),
        "{name}: reload validates first"
    );
    assert!(get("ExecReload")[1].contains("kill -HUP"), "{name}");
    assert_eq!(
        get("RestartPreventExitStatus"),
        ["78"],
        "{name}: a bad configuration must not restart in a loop"
    );
    for hardening in [
        "NoNewPrivileges",
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectControlGroups",
        "RestrictAddressFamilies",
        "RestrictNamespaces",
        "RestrictRealtime",
        "LockPersonality",
        "MemoryDenyWriteExecute",
        "SystemCallArchitectures",
        "SystemCallFilter",
        "WatchdogSec",
        "CapabilityBoundingSet",
        "UMask",
        "RemoveIPC",
    ] {
        assert_eq!(get(hardening).len(), 1, "{name}: {hardening}= missing");
    }
}

#[test]
fn unit_has_the_required_settings() {
    let text = std::fs::read_to_string(unit_path()).unwrap();
    common_settings(&text, "ferryd.service");
    let get = |k: &str| values(&text, k);
    let stop: u64 = get("TimeoutStopSec")[0].trim_end_matches('s').parse().unwrap();
    let drain = ferryd::config::DEFAULT_DRAIN_TIMEOUT.as_secs();
    assert!(
        stop > drain + 2,
        "TimeoutStopSec {stop}s must exceed drain_timeout {drain}s"
    );
    // The relay holds no privilege: an empty bounding set, no ambient capability, no step that
    // runs with full privileges, nothing writable in /proc/sys.
    assert_eq!(
        get("CapabilityBoundingSet"),
        [""],
        "the relay's bounding set must be empty"
    );
    assert!(get("AmbientCapabilities").is_empty());
    assert!(
        get("ExecStartPre").is_empty(),
        "no privileged step in the relay's unit"
    );
    assert!(get("ReadWritePaths").is_empty());
    assert_eq!(get("PropagatesReloadTo"), ["ferryd-nat.service"]);
}

#[test]
fn nat_unit_holds_only_what_nat_needs() {
    let text = std::fs::read_to_string(nat_unit_path()).unwrap();
    common_settings(&text, "ferryd-nat.service");
    let get = |k: &str| values(&text, k);
    assert_eq!(
        get("ExecStart"),
        ["/usr/bin/ferryd nat run --config /etc/ferryd/ferryd.toml"]
    );
    assert_eq!(get("CapabilityBoundingSet"), ["CAP_NET_ADMIN CAP_NET_RAW"]);
    assert_eq!(get("AmbientCapabilities"), ["CAP_NET_ADMIN CAP_NET_RAW"]);
    // It talks to no one over IP, and opens no IPv6 socket at all.
    assert_eq!(get("IPAddressDeny"), ["any"]);
    let families = get("RestrictAddressFamilies");
    assert!(!families[0].contains("AF_INET6"), "{families:?}");
    assert_eq!(get("RuntimeDirectory"), ["ferryd-nat"]);
    assert!(
        ferryd::config::DEFAULT_NAT_REPORT_FILE.starts_with("/run/ferryd-nat/"),
        "the report's default path is in the unit's runtime directory"
    );
}

/// The built package (packaging/build-deb; .ci/run builds it before the tests).
fn built_deb() -> Option<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target"),
        std::path::PathBuf::from,
    );
    let dir = target.join("debian");
    let version = env!("CARGO_PKG_VERSION");
    let deb = dir.join(format!("ferryd_{version}_amd64.deb"));
    if deb.exists() {
        Some(deb)
    } else {
        common::skip::skipped(&format!(
            "{} not built; run packaging/build-deb first (.ci/run does)",
            deb.display()
        ));
        None
    }
}

#[test]
fn packaged_binary_is_static_and_package_is_complete() {
    let Some(deb) = built_deb() else { return };
    let dir = common::TempDir::new("deb");
    let ok = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(ok.success());
    let bin = dir.path().join("usr/bin/ferryd");
    let headers = Command::new("readelf").arg("-lW").arg(&bin).output().unwrap();
    let headers = String::from_utf8_lossy(&headers.stdout);
    assert!(
        !headers.contains("INTERP"),
        "the packaged binary has an ELF interpreter"
    );
    let dynamic = Command::new("readelf").arg("-dW").arg(&bin).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&dynamic.stdout).contains("libc.so"),
        "needs libc.so"
    );
    // Relocated at start-up from a packed table (.cargo/config.toml): without it the
    // 126 KiB RELA table of the static PIE is read into memory at every start.
    let sections = Command::new("readelf").arg("-SW").arg(&bin).output().unwrap();
    let sections = String::from_utf8_lossy(&sections.stdout);
    assert!(
        sections.contains(".relr.dyn"),
        "the packaged binary has no packed relocations (RELR):\n{sections}"
    );
    // The test-only faults (the `test-faults` feature) never reach the package.
    let image = std::fs::read(&bin).unwrap();
    for marker in [&b"FERRYD_TEST_FAULTS"[..], b"test fault:"] {
        assert!(
            !image.windows(marker.len()).any(|w| w == marker),
            "the packaged binary carries a test fault ({})",
            String::from_utf8_lossy(marker)
        );
    }
    for path in [
        "lib/systemd/system/ferryd.service",
        "lib/systemd/system/ferryd-nat.service",
        "etc/ferryd/ferryd.toml",
        "usr/lib/sysctl.d/60-ferryd.conf",
        "usr/share/doc/ferryd/README.md",
        "usr/share/doc/ferryd/docs/configuration.md",
        "usr/share/doc/ferryd/docs/operations.md",
        "usr/share/doc/ferryd/docs/design.md",
        "usr/share/doc/ferryd/docs/testing.md",
        "usr/share/doc/ferryd/copyright",
        "usr/share/man/man8/ferryd.8.gz",
        "usr/share/man/man5/ferryd.toml.5.gz",
        "usr/share/doc/ferryd/changelog.gz",
        "usr/share/bash-completion/completions/ferryd",
        "usr/share/zsh/vendor-completions/_ferryd",
        "usr/share/ferryd/prometheus/ferryd-alerts.yml",
        "usr/share/ferryd/grafana/ferryd.json",
    ] {
        assert!(dir.path().join(path).exists(), "{path} missing from the package");
    }
    let version = Command::new(&bin).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&version.stdout).contains(env!("CARGO_PKG_VERSION")));
    // The shipped configuration is valid, and open to nobody by accident.
    let check = Command::new(&bin)
        .args(["check", "--config"])
        .arg(dir.path().join("etc/ferryd/ferryd.toml"))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(!String::from_utf8_lossy(&check.stdout).contains("0.0.0.0/0"));
    let fields = Command::new("dpkg-deb").arg("-f").arg(&deb).output().unwrap();
    let fields = String::from_utf8_lossy(&fields.stdout);
    for field in [
        "Depends:",
        "Recommends: iptables",
        "Section: net",
        "Priority: optional",
        "Description:",
    ] {
        assert!(fields.contains(field), "control lacks {field}:\n{fields}");
    }
    // Exactly one conffile: the configuration (a local edit survives every upgrade).
    let control = common::TempDir::new("deb-control");
    let extracted = Command::new("dpkg-deb")
        .arg("-e")
        .arg(&deb)
        .arg(control.path())
        .status()
        .unwrap();
    assert!(extracted.success());
    let conffiles = std::fs::read_to_string(control.path().join("conffiles")).unwrap();
    assert_eq!(conffiles.lines().collect::<Vec<_>>(), ["/etc/ferryd/ferryd.toml"]);
    // The newest changelog entry is this version.
    let changelog =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/debian/changelog"))
            .unwrap();
    assert!(
        changelog.starts_with(&format!("ferryd ({}) ", env!("CARGO_PKG_VERSION"))),
        "packaging/debian/changelog has no entry for this version"
    );
}

#[test]
fn lintian_reports_no_errors_and_no_warnings() {
    let Some(deb) = built_deb() else { return };
    let Ok(out) = Command::new("lintian")
        .args(["--tag-display-limit", "0"])
        .arg(&deb)
        .output()
    else {
        common::skip::skipped("lintian is not installed");
        return;
    };
    let report = String::from_utf8_lossy(&out.stdout);
    // Warnings fail too: an override is allowed only with a comment saying why
    // (packaging/debian/lintian-overrides).
    let problems: Vec<&str> = report
        .lines()
        .filter(|l| l.starts_with("E:") || l.starts_with("W:"))
        .collect();
    assert!(problems.is_empty(), "lintian:\n{report}");
}

#[test]
fn systemd_analyze_verify_passes() {
    let Ok(probe) = Command::new("systemd-analyze").arg("--version").output() else {
        common::skip::skipped("systemd-analyze is not installed");
        return;
    };
    assert!(probe.status.success());
    // verify wants the executables to exist: point the units at this build's binary.
    let dir = common::TempDir::new("verify");
    for (unit, name) in [
        (unit_path(), "ferryd.service"),
        (nat_unit_path(), "ferryd-nat.service"),
    ] {
        let text = std::fs::read_to_string(unit)
            .unwrap()
            .replace("/usr/bin/ferryd", common::bin());
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    // The man page is installed by the package, not on this host.
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.path().join("ferryd.service"))
        .arg(dir.path().join("ferryd-nat.service"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Lines about other units on this host are not ours to judge.
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("ferryd")).collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify:\n{stderr}"
    );
}

/// The exposure score of a unit file, as `systemd-analyze security --offline=yes` gives it
/// (systemd 250 and later), if that can be had.
fn exposure(unit: &Path) -> Option<f64> {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes"])
        .arg(unit)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains("Overall exposure level"))?;
    line.split(':').nth(1)?.split_whitespace().next()?.parse().ok()
}

/// Both units score far better than Debian's own haproxy.service and nginx.service (with only
/// directives systemd 237 knows); the scores are the ones docs/operations.md quotes.
#[test]
fn units_are_less_exposed_than_haproxy_and_nginx() {
    let Some(relay) = exposure(&unit_path()) else {
        common::skip::skipped("no `systemd-analyze security --offline` here (systemd 250+)");
        return;
    };
    let nat = exposure(&nat_unit_path()).expect("the NAT keeper's unit is scored");
    println!("exposure: ferryd.service {relay}, ferryd-nat.service {nat}");
    assert!(relay <= 2.5 && nat <= 2.5, "relay {relay}, NAT {nat}");
    for peer in [
        "/lib/systemd/system/haproxy.service",
        "/lib/systemd/system/nginx.service",
    ] {
        if let Some(score) = exposure(Path::new(peer)) {
            println!("exposure: {peer} {score}");
            assert!(relay < score && nat < score, "{peer} scores {score}");
        }
    }
}
