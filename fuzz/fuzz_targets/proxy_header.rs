//! The PROXY v2 header parser never panics on arbitrary bytes, a header it accepts encodes back
//! to one that parses the same, and the length it announces is never past the bound.
#![no_main]

use ferryd::proxy_header::{self, FIXED_LEN, MAX_HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = proxy_header::could_be_header(data);
    if let Some(fixed) = data.get(..FIXED_LEN).and_then(|b| <&[u8; FIXED_LEN]>::try_from(b).ok()) {
        if let Ok(len) = proxy_header::header_len(fixed) {
            assert!(len <= MAX_HEADER_LEN);
        }
    }
    if let Ok(header) = proxy_header::parse(data) {
        let again = proxy_header::parse(&proxy_header::encode(&header)).expect("re-encoded header parses");
        assert_eq!(again.command, header.command);
        assert_eq!(again.addresses, header.addresses);
        assert_eq!(again.link_id, header.link_id);
    }
});
