//! The NAT rules ferryd wants, what the live tables hold, the difference between the two, and the
//! iptables-restore input that turns one into the other.
//!
//! Pure text in, text out: nothing here runs a command, so every decision is unit-tested. Each
//! rule in ferryd's chains carries a comment with a fingerprint of the whole wanted rule set, so
//! drift is detected without predicting how a given iptables version prints a rule.

use std::fmt::Write as _;

use crate::config::{Destination, Nat};

/// ferryd's chain in the nat table, reached from POSTROUTING.
pub const NAT_CHAIN: &str = "FERRYD-POSTROUTING";
/// ferryd's chain in the filter table, reached from FORWARD.
pub const FILTER_CHAIN: &str = "FERRYD-FORWARD";
/// The comment on the two jump rules in the built-in chains, so they can be found and removed.
pub const JUMP_COMMENT: &str = "ferryd";

/// One of the two tables ferryd touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Table {
    /// nat or filter.
    pub name: &'static str,
    /// The built-in chain that jumps to ferryd's chain.
    pub builtin: &'static str,
    /// ferryd's chain.
    pub chain: &'static str,
}

/// The nat table: MASQUERADE for the build VM's traffic leaving the uplink.
pub const NAT: Table = Table {
    name: "nat",
    builtin: "POSTROUTING",
    chain: NAT_CHAIN,
};
/// The filter table: forwarding accepts (and the egress restriction).
pub const FILTER: Table = Table {
    name: "filter",
    builtin: "FORWARD",
    chain: FILTER_CHAIN,
};

/// The rules ferryd wants in its two chains, as iptables arguments after `-A CHAIN`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    /// Rules of FERRYD-POSTROUTING.
    pub nat: Vec<String>,
    /// Rules of FERRYD-FORWARD.
    pub filter: Vec<String>,
    /// The comment every rule carries: "ferryd:" and a hash of the rule set.
    pub fingerprint: String,
}

impl Wanted {
    /// The rules of `table`.
    pub fn rules(&self, table: Table) -> &[String] {
        if table == NAT { &self.nat } else { &self.filter }
    }
}

/// Builds the wanted rules for `nat` leaving through `out_interface`.
pub fn wanted(nat: &Nat, out_interface: &str) -> Wanted {
    let mut masquerade = Vec::new();
    let mut forward = Vec::new();
    for source in &nat.sources {
        masquerade.push(format!("-s {source} -o {out_interface} -j MASQUERADE"));
        match &nat.allow_destinations {
            None => forward.push(format!("-s {source} -o {out_interface} -j ACCEPT")),
            Some(destinations) => {
                for destination in destinations {
                    forward.extend(accept_to(source, out_interface, destination));
                }
            }
        }
        forward.push(format!(
            "-d {source} -i {out_interface} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
        ));
        if nat.allow_destinations.is_some() {
            // Whatever the list does not admit, the build VM may not forward anywhere.
            forward.push(format!("-s {source} -j DROP"));
        }
    }
    let fingerprint = format!("ferryd:{:016x}", fnv1a(masquerade.iter().chain(&forward)));
    let tag = |rule: String| match rule.rsplit_once(" -j ") {
        Some((matches, target)) => format!("{matches} -m comment --comment {fingerprint} -j {target}"),
        None => rule,
    };
    Wanted {
        nat: masquerade.into_iter().map(tag).collect(),
        filter: forward.into_iter().map(tag).collect(),
        fingerprint,
    }
}

fn accept_to(source: &crate::allow::Cidr, out: &str, destination: &Destination) -> Vec<String> {
    let base = format!("-s {source} -d {} -o {out}", destination.net);
    match destination.ports {
        None => vec![format!("{base} -j ACCEPT")],
        Some((lo, hi)) => {
            let ports = if lo == hi {
                lo.to_string()
            } else {
                format!("{lo}:{hi}")
            };
            ["tcp", "udp"]
                .iter()
                .map(|proto| format!("{base} -p {proto} -m {proto} --dport {ports} -j ACCEPT"))
                .collect()
        }
    }
}

/// FNV-1a over the rule texts: stable across runs and versions, which a std hasher is not.
fn fnv1a<'a>(rules: impl Iterator<Item = &'a String>) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for rule in rules {
        for byte in rule.bytes().chain(std::iter::once(b'\n')) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

/// What one table holds that concerns ferryd, read from `iptables-save -t TABLE`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Live {
    /// Whether ferryd's chain exists.
    pub chain_exists: bool,
    /// The rules of ferryd's chain, as saved (`-A FERRYD-... ...`).
    pub chain_rules: Vec<String>,
    /// Jumps to ferryd's chain from the built-in chain: (1-based position, saved line).
    pub jumps: Vec<(usize, String)>,
}

/// Reads the parts of `saved` (iptables-save output, with or without -c counters) about `table`.
pub fn parse_live(saved: &str, table: Table) -> Live {
    let mut live = Live::default();
    let mut in_table = false;
    let mut builtin_position = 0;
    let chain_decl = format!(":{} ", table.chain);
    let chain_rule = format!("-A {} ", table.chain);
    let builtin_rule = format!("-A {} ", table.builtin);
    for raw in saved.lines() {
        if let Some(name) = raw.strip_prefix('*') {
            in_table = name.trim() == table.name;
            continue;
        }
        if !in_table {
            continue;
        }
        // With -c, rules start with "[packets:bytes] ".
        let line = match raw.strip_prefix('[') {
            Some(rest) => rest.split_once("] ").map_or(raw, |(_, rule)| rule),
            None => raw,
        };
        if line.starts_with(&chain_decl) {
            live.chain_exists = true;
        } else if line.starts_with(&chain_rule) {
            live.chain_rules.push(line.to_string());
        } else if line.starts_with(&builtin_rule) {
            builtin_position += 1;
            if jumps_to(line, table.chain) {
                live.jumps.push((builtin_position, line.to_string()));
            }
        }
    }
    live
}

fn jumps_to(line: &str, chain: &str) -> bool {
    line.split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .any(|w| (w[0] == "-j" || w[0] == "-g") && w[1] == chain)
}

/// Why `live` differs from `wanted` in `table`, or `None` when it does not.
pub fn drift(wanted: &Wanted, table: Table, live: &Live) -> Option<String> {
    let expected = wanted.rules(table).len();
    if !live.chain_exists {
        return Some(format!("{}/{} is missing", table.name, table.chain));
    }
    if live.chain_rules.len() != expected {
        return Some(format!(
            "{}/{} has {} rules, expected {expected}",
            table.name,
            table.chain,
            live.chain_rules.len()
        ));
    }
    if let Some(stale) = live.chain_rules.iter().find(|r| !r.contains(&wanted.fingerprint)) {
        return Some(format!(
            "{}/{} holds a rule ferryd did not write this way: {stale}",
            table.name, table.chain
        ));
    }
    match live.jumps.as_slice() {
        [] => Some(format!(
            "{}/{} no longer jumps to {}",
            table.name, table.builtin, table.chain
        )),
        [(1, _)] => None,
        [(position, _)] => Some(format!(
            "{}/{}: the jump to {} is rule {position}, not rule 1 (another tool inserted rules ahead of it)",
            table.name, table.builtin, table.chain
        )),
        many => Some(format!(
            "{}/{} jumps to {} {} times",
            table.name,
            table.builtin,
            table.chain,
            many.len()
        )),
    }
}

/// iptables-restore input (for `--noflush`) that makes `table` match `wanted`: it flushes and
/// refills ferryd's own chain, removes every existing jump to it, and inserts one jump as rule 1
/// of the built-in chain. No other rule is flushed, deleted or reordered.
pub fn apply_input(wanted: &Wanted, table: Table, live: &Live, out: &mut String) {
    let _ = writeln!(out, "*{}", table.name);
    // Declaring a chain in --noflush mode creates it, or flushes it when it exists.
    let _ = writeln!(out, ":{} - [0:0]", table.chain);
    for (_, jump) in &live.jumps {
        let _ = writeln!(out, "-D{}", &jump[2..]);
    }
    let _ = writeln!(
        out,
        "-I {} 1 -m comment --comment {JUMP_COMMENT} -j {}",
        table.builtin, table.chain
    );
    for rule in wanted.rules(table) {
        let _ = writeln!(out, "-A {} {rule}", table.chain);
    }
    let _ = writeln!(out, "COMMIT");
}

/// iptables-restore input that removes every jump to ferryd's chain in `table` and the chain.
pub fn remove_input(table: Table, live: &Live, out: &mut String) {
    if !live.chain_exists && live.jumps.is_empty() {
        return;
    }
    let _ = writeln!(out, "*{}", table.name);
    for (_, jump) in &live.jumps {
        let _ = writeln!(out, "-D{}", &jump[2..]);
    }
    if live.chain_exists {
        let _ = writeln!(out, "-F {}", table.chain);
        let _ = writeln!(out, "-X {}", table.chain);
    }
    let _ = writeln!(out, "COMMIT");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nat(destinations: Option<&[&str]>) -> Nat {
        Nat {
            enabled: true,
            sources: vec!["10.0.1.4/32".parse().unwrap()],
            out_interface: None,
            allow_destinations: destinations.map(|d| d.iter().map(|x| x.parse().unwrap()).collect()),
            reconcile_interval: std::time::Duration::from_secs(30),
            report_file: crate::config::DEFAULT_NAT_REPORT_FILE.into(),
            check_target: crate::config::DEFAULT_CHECK_TARGET.into(),
        }
    }

    #[test]
    fn unrestricted_rules() {
        let w = wanted(&nat(None), "eth0");
        assert_eq!(w.nat.len(), 1);
        assert!(w.nat[0].starts_with("-s 10.0.1.4/32 -o eth0 -m comment --comment ferryd:"));
        assert!(w.nat[0].ends_with("-j MASQUERADE"));
        assert_eq!(w.filter.len(), 2);
        assert!(w.filter.iter().all(|r| r.contains(&w.fingerprint)));
        assert!(!w.filter.iter().any(|r| r.contains("DROP")));
    }

    #[test]
    fn restricted_rules_accept_listed_then_drop() {
        let w = wanted(
            &nat(Some(&[
                "192.0.2.0/24",
                "198.51.100.0/24:443",
                "203.0.113.0/24:8000-8100",
            ])),
            "eth0",
        );
        let filter = w.filter.join("\n");
        assert!(filter.contains("-d 192.0.2.0/24 -o eth0 -m comment"));
        assert!(filter.contains("-p tcp -m tcp --dport 443"));
        assert!(filter.contains("-p udp -m udp --dport 443"));
        assert!(filter.contains("--dport 8000:8100"));
        assert!(w.filter.last().unwrap().ends_with("-j DROP"));
        assert_ne!(w.fingerprint, wanted(&nat(None), "eth0").fingerprint);
    }

    const SAVED: &str = "\
# Generated by iptables-save
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:FERRYD-FORWARD - [0:0]
[0:0] -A FORWARD -j ufw-before-forward
[5:300] -A FORWARD -m comment --comment ferryd -j FERRYD-FORWARD
-A FERRYD-FORWARD -s 10.0.1.4/32 -o eth0 -m comment --comment ferryd:0000000000000000 -j ACCEPT
COMMIT
*nat
:POSTROUTING ACCEPT [0:0]
COMMIT
";

    #[test]
    fn live_state_and_drift() {
        let live = parse_live(SAVED, FILTER);
        assert!(live.chain_exists);
        assert_eq!(live.chain_rules.len(), 1);
        assert_eq!(
            live.jumps,
            vec![(
                2,
                "-A FORWARD -m comment --comment ferryd -j FERRYD-FORWARD".to_string()
            )]
        );
        let w = wanted(&nat(None), "eth0");
        let why = drift(&w, FILTER, &live).unwrap();
        assert!(why.contains("has 1 rules, expected 2"), "{why}");
        let nat_live = parse_live(SAVED, NAT);
        assert!(drift(&w, NAT, &nat_live).unwrap().contains("missing"));

        let mut input = String::new();
        apply_input(&w, FILTER, &live, &mut input);
        assert!(input.contains("-D FORWARD -m comment --comment ferryd -j FERRYD-FORWARD\n"));
        assert!(input.contains("-I FORWARD 1 -m comment --comment ferryd -j FERRYD-FORWARD\n"));
        assert!(!input.contains("ufw"), "foreign rules are never touched");
    }

    #[test]
    fn in_sync_when_everything_matches() {
        let w = wanted(&nat(None), "eth0");
        let live = Live {
            chain_exists: true,
            chain_rules: w
                .filter
                .iter()
                .map(|r| format!("-A {FILTER_CHAIN} {r}"))
                .collect(),
            jumps: vec![(1, "-A FORWARD -j FERRYD-FORWARD".into())],
        };
        assert_eq!(drift(&w, FILTER, &live), None);
        let misplaced = Live {
            jumps: vec![(3, "-A FORWARD -j FERRYD-FORWARD".into())],
            ..live
        };
        assert!(drift(&w, FILTER, &misplaced).unwrap().contains("not rule 1"));
    }
}
