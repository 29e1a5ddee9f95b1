//! CIDR parsing never panics, and matching agrees with a bit-by-bit reference.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ferryd::allow::Cidr;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 17 {
        return;
    }
    let (addr_bytes, text) = data.split_at(16);
    let Ok(text) = std::str::from_utf8(text) else { return };
    let Ok(cidr) = text.parse::<Cidr>() else { return };
    let raw: [u8; 16] = addr_bytes.try_into().unwrap_or([0; 16]);
    let v6 = Ipv6Addr::from(raw);
    let v4 = Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]);
    // The reference: parse the printed block back into (network, prefix) and compare bits.
    let printed = cidr.to_string();
    let (net, len) = printed.split_once('/').unwrap_or((&printed, ""));
    let len: u32 = len.parse().unwrap_or(0);
    for source in [IpAddr::V4(v4), IpAddr::V6(v6), IpAddr::V6(v4.to_ipv6_mapped())] {
        let canonical = source.to_canonical();
        let expected = match (net.parse::<IpAddr>(), canonical) {
            (Ok(IpAddr::V4(n)), IpAddr::V4(s)) => len == 0 || (u32::from(n) ^ u32::from(s)) >> (32 - len) == 0,
            (Ok(IpAddr::V6(n)), IpAddr::V6(s)) => len == 0 || (u128::from(n) ^ u128::from(s)) >> (128 - len) == 0,
            _ => false,
        };
        assert_eq!(cidr.contains(source), expected, "{source} in {printed}");
    }
});
