//! Egress NAT for the build VM: IP forwarding, a MASQUERADE rule and forwarding accepts, in
//! chains ferryd owns, kept in place by reconciling.
//!
//! This module owns the kernel side of the proxy VM as a NAT gateway: `net.ipv4.ip_forward`
//! (remembering the value it replaced) and ferryd's two chains, FERRYD-POSTROUTING (nat) and
//! FERRYD-FORWARD (filter), each reached by one jump at the top of the built-in chain. Changes
//! go through `iptables-restore --noflush`, atomically per table. It must never flush, delete or
//! reorder a rule it does not own. It needs CAP_NET_ADMIN (and CAP_NET_RAW for iptables) and,
//! under the shipped unit's sandbox, /proc/sys/net/ipv4/ip_forward left writable: it runs in the
//! NAT keeper's process ([`keeper`], `ferryd nat run`, ferryd-nat.service) and in the one-shot
//! `ferryd nat up|down|status`, never in the relay's, which only reads the keeper's
//! [`report`].

pub(crate) mod iptables;
pub mod keeper;
pub(crate) mod reconciler;
pub mod report;
mod rules;

use std::fmt;
use std::path::PathBuf;

use crate::config::Nat;
use iptables::Iptables;
use rules::{FILTER, Live, NAT, Wanted};

/// A NAT operation that failed, with the command, its stderr, or the file involved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatError(pub String);

impl fmt::Display for NatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NatError {}

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
/// Where ferryd keeps the ip_forward value it replaced, so `nat down` can restore it. systemd's
/// StateDirectory= sets STATE_DIRECTORY; elsewhere /var/lib/ferryd.
const SAVED_FORWARD_FILE: &str = "ip_forward.before-ferryd";
/// Written next to it whenever ferryd has put its rules in place, removed when they are taken
/// away: a configuration without NAT looks for leftovers (and runs iptables at all) only when it
/// is there, so a host that never used ferryd's NAT never sees an iptables command from it.
const APPLIED_MARKER: &str = "nat-applied";

/// Notes that ferryd's rules are in place. Best effort: without a writable state directory the
/// only loss is that turning NAT off later needs `ferryd nat down` by hand.
fn mark_applied() {
    let marker = state_dir().join(APPLIED_MARKER);
    if !marker.exists() {
        let _ = std::fs::create_dir_all(state_dir());
        let _ = std::fs::write(
            &marker,
            "ferryd's NAT rules were put in place; `ferryd nat down` removes them\n",
        );
    }
}

fn state_dir() -> PathBuf {
    std::env::var_os("STATE_DIRECTORY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/ferryd"))
}

/// What a reconcile did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Everything was already as wanted; nothing was changed.
    InSync,
    /// Nothing of ferryd's was there; it was installed.
    Installed,
    /// Something had drifted (the reason); it was repaired.
    Repaired(String),
}

impl fmt::Display for Applied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Applied::InSync => f.write_str("NAT already in place; nothing changed"),
            Applied::Installed => f.write_str("NAT installed"),
            Applied::Repaired(why) => write!(f, "NAT repaired ({why})"),
        }
    }
}

/// The uplink: the configured interface, or the one of the IPv4 default route.
pub fn out_interface(nat: &Nat) -> Result<String, NatError> {
    if let Some(name) = &nat.out_interface {
        return Ok(name.clone());
    }
    let table = std::fs::read_to_string("/proc/net/route").map_err(|e| {
        NatError(format!(
            "cannot read /proc/net/route to find the default route: {e}"
        ))
    })?;
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            (cols.len() > 7 && cols[1] == "00000000" && cols[7] == "00000000").then(|| cols[0].to_string())
        })
        .next()
        .ok_or_else(|| {
            NatError(
                "no IPv4 default route, so no uplink to masquerade through: set [nat] out_interface".into(),
            )
        })
}

/// The live tables as far as ferryd is concerned.
struct LiveTables {
    nat: Live,
    filter: Live,
}

fn read_live(ipt: &Iptables) -> Result<LiveTables, NatError> {
    Ok(LiveTables {
        nat: rules::parse_live(&ipt.save("nat", false)?, NAT),
        filter: rules::parse_live(&ipt.save("filter", false)?, FILTER),
    })
}

fn drift_of(wanted: &Wanted, live: &LiveTables) -> Option<String> {
    rules::drift(wanted, NAT, &live.nat).or_else(|| rules::drift(wanted, FILTER, &live.filter))
}

/// Makes the live state match `nat`: ferryd's chains and jumps as wanted, then IP forwarding on.
/// Changes nothing when everything is already in place, so it is both `nat up` and the
/// reconcile step.
///
/// It fails closed. The filter table (the forwarding accepts and, with `allow_destinations`, the
/// DROP that limits egress) is applied before the nat table's MASQUERADE, and ip_forward is
/// turned on last, so no step can leave masquerading without its filter or forwarding without
/// its rules. When a first install fails part-way, what it applied is removed again.
pub fn reconcile(nat: &Nat) -> Result<Applied, NatError> {
    let ipt = Iptables::detect()?;
    let wanted = rules::wanted(nat, &out_interface(nat)?);
    let live = read_live(&ipt)?;
    let fresh = !live.nat.chain_exists && !live.filter.chain_exists;
    let drift = drift_of(&wanted, &live);
    let forwarding = read_forwarding()? == "1";
    if drift.is_none() && forwarding {
        mark_applied();
        return Ok(Applied::InSync);
    }
    match apply(&ipt, &wanted, &live) {
        Ok(()) if fresh => Ok(Applied::Installed),
        Ok(()) => Ok(Applied::Repaired(
            drift.unwrap_or_else(|| "net.ipv4.ip_forward was 0".into()),
        )),
        Err(e) if fresh => Err(match remove_chains(&ipt) {
            Ok(()) => NatError(format!(
                "{e}\n(the rules applied before the failure were removed again)"
            )),
            Err(undo) => NatError(format!("{e}\nand removing what was applied failed too: {undo}")),
        }),
        Err(e) => Err(e),
    }
}

/// The steps of [`reconcile`], in their fail-closed order: filter, nat, a check, forwarding.
fn apply(ipt: &Iptables, wanted: &Wanted, live: &LiveTables) -> Result<(), NatError> {
    // Marked before the first change: a process killed part-way still leaves the marker that
    // tells a later configuration without NAT to look for leftovers.
    mark_applied();
    let mut changed = false;
    for (table, live) in [(FILTER, &live.filter), (NAT, &live.nat)] {
        if rules::drift(wanted, table, live).is_some() {
            let mut input = String::new();
            rules::apply_input(wanted, table, live, &mut input);
            ipt.restore(&input)?;
            changed = true;
        }
    }
    if changed && let Some(still) = drift_of(wanted, &read_live(ipt)?) {
        return Err(NatError(format!(
            "applied the NAT rules with iptables {}, but they still differ: {still}",
            ipt.version
        )));
    }
    enable_forwarding()?;
    Ok(())
}

/// Removes every jump to ferryd's chains and the chains, nat table first so masquerading never
/// outlives the filter rules.
fn remove_chains(ipt: &Iptables) -> Result<(), NatError> {
    let live = read_live(ipt)?;
    let mut input = String::new();
    rules::remove_input(NAT, &live.nat, &mut input);
    rules::remove_input(FILTER, &live.filter, &mut input);
    if !input.is_empty() {
        ipt.restore(&input)?;
    }
    Ok(())
}

/// What a configuration without NAT needs: ferryd's rules and chains removed if any are left
/// from an earlier configuration, and ip_forward restored if ferryd changed it. Returns whether
/// anything was there to undo. It runs nothing unless ferryd's marker (or its saved ip_forward)
/// says NAT was in place; without iptables on PATH there can be no rules to remove.
pub fn clear() -> Result<bool, NatError> {
    let marker = state_dir().join(APPLIED_MARKER);
    if !marker.exists() && !state_dir().join(SAVED_FORWARD_FILE).exists() {
        return Ok(false);
    }
    let mut undone = false;
    if iptables::installed() {
        let ipt = Iptables::detect()?;
        let live = read_live(&ipt)?;
        let present = live.nat.chain_exists
            || live.filter.chain_exists
            || !live.nat.jumps.is_empty()
            || !live.filter.jumps.is_empty();
        if present {
            remove_chains(&ipt)?;
            undone = true;
        }
    }
    undone |= state_dir().join(SAVED_FORWARD_FILE).exists();
    restore_forwarding()?;
    let _ = std::fs::remove_file(marker);
    Ok(undone)
}

/// Whether the live state matches `nat`; `Some(reason)` when it does not.
pub fn check(nat: &Nat) -> Result<Option<String>, NatError> {
    let ipt = Iptables::detect()?;
    let wanted = rules::wanted(nat, &out_interface(nat)?);
    if read_forwarding()? != "1" {
        return Ok(Some("net.ipv4.ip_forward is 0".into()));
    }
    Ok(drift_of(&wanted, &read_live(&ipt)?))
}

/// Removes every ferryd rule and chain, and restores ip_forward if ferryd changed it.
pub fn down() -> Result<(), NatError> {
    remove_chains(&Iptables::detect()?)?;
    restore_forwarding()?;
    let _ = std::fs::remove_file(state_dir().join(APPLIED_MARKER));
    Ok(())
}

/// A report for `ferryd nat status`: the rules with their counters, ip_forward, the uplink, and
/// whether the live state matches the configuration. Returns the text and whether it matches.
pub fn status(nat: &Nat) -> Result<(String, bool), NatError> {
    let ipt = Iptables::detect()?;
    let mut out = String::new();
    let forwarding = read_forwarding()?;
    let saved = std::fs::read_to_string(state_dir().join(SAVED_FORWARD_FILE)).ok();
    out.push_str(&format!(
        "ip_forward:    {forwarding}{}\n",
        saved.map_or(String::new(), |v| format!(
            " (ferryd changed it from {}; `nat down` restores that)",
            v.trim()
        ))
    ));
    let uplink = out_interface(nat);
    out.push_str(&format!(
        "out interface: {}\n",
        match (&uplink, &nat.out_interface) {
            (Ok(name), Some(_)) => format!("{name} (configured)"),
            (Ok(name), None) => format!("{name} (IPv4 default route)"),
            (Err(e), _) => format!("unknown: {e}"),
        }
    ));
    out.push_str(&format!("iptables:      {}\n", ipt.version));
    for table in [NAT, FILTER] {
        let saved = ipt.save(table.name, true)?;
        let live = rules::parse_live(&saved, table);
        out.push_str(&format!("{}/{}:\n", table.name, table.chain));
        for line in saved
            .lines()
            .filter(|l| l.contains(&format!("-A {} ", table.chain)))
        {
            out.push_str(&format!("  {line}\n"));
        }
        if !live.chain_exists {
            out.push_str("  (chain absent)\n");
        }
        let positions: Vec<String> = live.jumps.iter().map(|(p, _)| p.to_string()).collect();
        out.push_str(&format!(
            "  reached from {} at rule {}\n",
            table.builtin,
            if positions.is_empty() {
                "-".to_string()
            } else {
                positions.join(", ")
            }
        ));
    }
    let verdict = match &uplink {
        Ok(_) if !nat.enabled => Some("NAT is not enabled in the configuration".to_string()),
        Ok(_) => check(nat)?,
        Err(e) => Some(e.to_string()),
    };
    let in_sync = verdict.is_none();
    out.push_str(&format!(
        "in sync:       {}\n",
        verdict.map_or("yes".to_string(), |why| format!("no: {why}"))
    ));
    Ok((out, in_sync))
}

fn read_forwarding() -> Result<String, NatError> {
    std::fs::read_to_string(IP_FORWARD)
        .map(|v| v.trim().to_string())
        .map_err(|e| NatError(format!("cannot read {IP_FORWARD}: {e}")))
}

/// Turns forwarding on; returns whether it was off. The first time ferryd turns it on, the old
/// value is saved so `nat down` can put it back.
fn enable_forwarding() -> Result<bool, NatError> {
    let before = read_forwarding()?;
    if before == "1" {
        return Ok(false);
    }
    let saved = state_dir().join(SAVED_FORWARD_FILE);
    if !saved.exists() {
        if let Some(dir) = saved.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| NatError(format!("cannot create {}: {e}", dir.display())))?;
        }
        std::fs::write(&saved, format!("{before}\n")).map_err(|e| {
            NatError(format!(
                "cannot save the old ip_forward value in {}: {e}",
                saved.display()
            ))
        })?;
    }
    std::fs::write(IP_FORWARD, "1\n").map_err(|e| {
        NatError(format!(
            "cannot write {IP_FORWARD}: {e} (it needs CAP_NET_ADMIN, and under systemd a unit that leaves the file writable: ReadWritePaths={IP_FORWARD})"
        ))
    })?;
    Ok(true)
}

fn restore_forwarding() -> Result<(), NatError> {
    let saved = state_dir().join(SAVED_FORWARD_FILE);
    let Ok(value) = std::fs::read_to_string(&saved) else {
        return Ok(());
    };
    std::fs::write(IP_FORWARD, format!("{}\n", value.trim()))
        .map_err(|e| NatError(format!("cannot restore {IP_FORWARD}: {e}")))?;
    std::fs::remove_file(&saved).map_err(|e| NatError(format!("cannot remove {}: {e}", saved.display())))
}
