//! Source allowlists: the sets of CIDRs that decide who may use a route and who is a
//! load-balancer prober.
//!
//! This module owns parsing a CIDR written by a person and matching a peer address against a
//! set of them. It must not know about sockets or routes: the caller asks "is this address in
//! the set?" right after accept, before anything is dialled, and acts on the answer.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

/// One CIDR block, as written in the configuration ("10.0.0.0/24", "2001:db8::/32", or a bare
/// address, which means a single host).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr(IpNet);

impl Cidr {
    /// An IPv4 block, for constants; an invalid prefix length fails the build.
    pub const fn v4(addr: std::net::Ipv4Addr, prefix: u8) -> Cidr {
        Cidr(IpNet::V4(ipnet::Ipv4Net::new_assert(addr, prefix)))
    }

    /// An IPv6 block, for constants; an invalid prefix length fails the build.
    pub const fn v6(addr: std::net::Ipv6Addr, prefix: u8) -> Cidr {
        Cidr(IpNet::V6(ipnet::Ipv6Net::new_assert(addr, prefix)))
    }

    /// Whether `addr` lies inside this block. IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`,
    /// which a dual-stack listener reports for IPv4 clients) are compared as the IPv4 address
    /// they carry, so an operator never has to write both forms.
    pub fn contains(&self, addr: IpAddr) -> bool {
        self.0.contains(&addr.to_canonical())
    }

    /// Whether this is an IPv4 block.
    pub fn is_ipv4(&self) -> bool {
        matches!(self.0, IpNet::V4(_))
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let net = if text.contains('/') {
            let net: IpNet = text.parse().map_err(|_| {
                format!("invalid CIDR {text:?}: expected an address and a prefix length such as 10.0.0.0/24 or 2001:db8::/32")
            })?;
            if net.trunc() != net {
                return Err(format!(
                    "invalid CIDR {text:?}: host bits are set below the /{} prefix (did you mean {}?)",
                    net.prefix_len(),
                    net.trunc()
                ));
            }
            net
        } else {
            let addr: IpAddr = text.parse().map_err(|_| {
                format!("invalid CIDR {text:?}: expected an address such as 10.0.0.4 or a block such as 10.0.0.0/24")
            })?;
            IpNet::from(addr.to_canonical())
        };
        Ok(Cidr(net))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<'de> serde::Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A set of CIDR blocks. An empty set admits nobody; the configuration refuses to build a route
/// with one, so "open to everyone" is always written out as 0.0.0.0/0 or ::/0.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Allowlist {
    blocks: Vec<Cidr>,
}

impl Allowlist {
    /// Builds a set from parsed blocks, in the order they were written.
    pub fn new(blocks: Vec<Cidr>) -> Self {
        Allowlist { blocks }
    }

    /// Whether `addr` is in any block. A linear scan: allowlists here hold a handful of
    /// entries (the load balancer's few NAT addresses), where a scan beats any tree.
    pub fn contains(&self, addr: IpAddr) -> bool {
        self.blocks.iter().any(|block| block.contains(addr))
    }

    /// The blocks, for printing the effective configuration.
    pub fn blocks(&self) -> &[Cidr] {
        &self.blocks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(blocks: &[&str]) -> Allowlist {
        Allowlist::new(blocks.iter().map(|b| b.parse().unwrap()).collect())
    }

    #[test]
    fn ipv4_block_matches_plain_and_mapped_sources() {
        let allow = set(&["10.0.0.0/24"]);
        assert!(allow.contains("10.0.0.7".parse().unwrap()));
        assert!(allow.contains("::ffff:10.0.0.7".parse().unwrap()));
        assert!(!allow.contains("10.0.1.7".parse().unwrap()));
        assert!(!allow.contains("::ffff:10.0.1.7".parse().unwrap()));
    }

    #[test]
    fn ipv6_block_matches_ipv6_only() {
        let allow = set(&["2001:db8::/32"]);
        assert!(allow.contains("2001:db8::1".parse().unwrap()));
        assert!(!allow.contains("2001:db9::1".parse().unwrap()));
        assert!(!allow.contains("10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn bare_address_is_one_host() {
        let allow = set(&["168.63.129.16"]);
        assert!(allow.contains("168.63.129.16".parse().unwrap()));
        assert!(!allow.contains("168.63.129.17".parse().unwrap()));
    }

    #[test]
    fn mapped_address_in_config_means_ipv4() {
        let allow = set(&["::ffff:127.0.0.1"]);
        assert!(allow.contains("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn rejects_malformed_and_host_bits() {
        assert!("10.0.0.300/24".parse::<Cidr>().is_err());
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("banana".parse::<Cidr>().is_err());
        let err = "10.0.0.5/24".parse::<Cidr>().unwrap_err();
        assert!(err.contains("10.0.0.0/24"), "{err}");
    }

    #[test]
    fn empty_set_admits_nobody() {
        assert!(!Allowlist::default().contains("127.0.0.1".parse().unwrap()));
    }
}
