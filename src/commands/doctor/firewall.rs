//! Reading the host firewall the way the kernel would for one new TCP connection: the INPUT
//! chain of `iptables-save -t filter`, rule by rule, for a source address and a destination
//! port. Only what can be decided from the text is decided: a rule with a match this reader does
//! not understand is skipped (and said), a jump to another chain stops the walk as undecided.

use std::net::IpAddr;

use crate::allow::Cidr;

/// What the INPUT chain does with a new connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// An ACCEPT rule, or the policy ACCEPT.
    Accepted,
    /// A DROP or REJECT rule (the rule's text), or the policy DROP.
    Dropped(String),
    /// A jump to another chain (ufw's, say) decides; its name.
    Undecided(String),
}

/// Walks INPUT in `saved` (iptables-save output) for a TCP SYN from `source` to `port`.
pub fn input_verdict(saved: &str, source: IpAddr, port: u16) -> Verdict {
    let mut in_filter = false;
    let mut policy = "ACCEPT".to_string();
    for line in saved.lines() {
        if let Some(table) = line.strip_prefix('*') {
            in_filter = table.trim() == "filter";
            continue;
        }
        if !in_filter {
            continue;
        }
        if let Some(rest) = line.strip_prefix(":INPUT ") {
            policy = rest.split_whitespace().next().unwrap_or("ACCEPT").to_string();
            continue;
        }
        let Some(rule) = line.strip_prefix("-A INPUT ") else {
            continue;
        };
        let Some(target) = applies(rule, source, port) else {
            continue;
        };
        return match target.as_str() {
            "ACCEPT" => Verdict::Accepted,
            "DROP" | "REJECT" => Verdict::Dropped(format!("-A INPUT {rule}")),
            "RETURN" => break,
            "LOG" => continue,
            chain => Verdict::Undecided(chain.to_string()),
        };
    }
    if policy == "DROP" {
        Verdict::Dropped(":INPUT DROP (the chain's policy)".into())
    } else {
        Verdict::Accepted
    }
}

/// The rule's target when the rule matches a new TCP connection from `source` to `port`.
fn applies(rule: &str, source: IpAddr, port: u16) -> Option<String> {
    let words: Vec<&str> = rule.split_whitespace().collect();
    let mut target = None;
    let mut i = 0;
    while i < words.len() {
        let value = words.get(i + 1).copied().unwrap_or("");
        let negated = i > 0 && words[i - 1] == "!";
        let matched = match words[i] {
            "-s" => Some(cidr_contains(value, source)),
            "-p" => Some(value == "tcp" || value == "6" || value == "all"),
            "--dport" => Some(port_matches(value, port)),
            "--dports" => Some(value.split(',').any(|p| port_matches(p, port))),
            "-i" => Some(value != "lo"),
            "--ctstate" | "--state" => Some(value.split(',').any(|s| s == "NEW")),
            "-j" | "-g" => {
                target = Some(value.to_string());
                None
            }
            // Matches that do not narrow a plain new TCP connection.
            "-m" | "--comment" | "-d" | "--sport" | "--tcp-flags" | "--syn" => None,
            _ => None,
        };
        if let Some(matched) = matched
            && matched == negated
        {
            return None;
        }
        i += if words[i].starts_with('-') && words[i] != "--syn" {
            2
        } else {
            1
        };
    }
    target
}

fn cidr_contains(text: &str, addr: IpAddr) -> bool {
    text.split(',')
        .filter_map(|t| t.parse::<Cidr>().ok())
        .any(|c| c.contains(addr))
}

fn port_matches(text: &str, port: u16) -> bool {
    match text.split_once(':') {
        Some((lo, hi)) => {
            let lo = lo.parse().unwrap_or(0);
            let hi = hi.parse().unwrap_or(u16::MAX);
            (lo..=hi).contains(&port)
        }
        None => text.parse() == Ok(port),
    }
}

/// The FORWARD chain's policy in `saved`.
pub fn forward_policy(saved: &str) -> Option<String> {
    saved
        .lines()
        .find_map(|l| l.strip_prefix(":FORWARD "))
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVED: &str = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n\
        -A INPUT -i lo -j ACCEPT\n\
        -A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
        -A INPUT -s 168.63.129.16/32 -p tcp -m tcp --dport 60080 -j DROP\n\
        -A INPUT -p tcp -m multiport --dports 60000,60001 -j ACCEPT\n\
        -A INPUT -p udp -j DROP\nCOMMIT\n";

    #[test]
    fn first_matching_rule_decides() {
        let probe: IpAddr = "168.63.129.16".parse().unwrap();
        assert!(
            matches!(input_verdict(SAVED, probe, 60080), Verdict::Dropped(r) if r.contains("--dport 60080"))
        );
        assert_eq!(input_verdict(SAVED, probe, 60001), Verdict::Accepted);
        let other: IpAddr = "10.0.0.7".parse().unwrap();
        assert_eq!(input_verdict(SAVED, other, 60080), Verdict::Accepted);
        assert_eq!(forward_policy(SAVED).as_deref(), Some("DROP"));
        let policy_drop = "*filter\n:INPUT DROP [0:0]\n-A INPUT -j ufw-before-input\nCOMMIT\n";
        assert_eq!(
            input_verdict(policy_drop, other, 60001),
            Verdict::Undecided("ufw-before-input".into())
        );
    }
}
