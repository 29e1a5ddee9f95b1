//! The "auto" classifier of a connection's first bytes, on any byte sequence arriving in any
//! split: it never panics, it decides once and for good (a longer prefix never changes a
//! decision), and a connection it lets through as not carrying a header is relayed whole (the
//! classifier only peeks: the bytes it looked at are the bytes relayed). A connection taken for
//! a header is either read as one or refused, never relayed with part of it missing.
#![no_main]

use ferryd::proxy_header::{self, First};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut decided: Option<(usize, First)> = None;
    for n in 0..=data.len() {
        match (proxy_header::classify(&data[..n]), decided) {
            (Some(first), None) => decided = Some((n, first)),
            (Some(first), Some((_, before))) => assert_eq!(first, before, "changed its mind at {n}"),
            (None, Some((at, before))) => panic!("decided {before:?} at {at}, undecided again at {n}"),
            (None, None) => {}
        }
    }
    if let Some((_, First::Header)) = decided {
        // Read as a header: accepted whole or refused, never half.
        let _ = proxy_header::could_be_header(&data[..data.len().min(proxy_header::FIXED_LEN)]);
        let _ = proxy_header::parse(data);
    }
});
