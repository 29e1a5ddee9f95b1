//! Any text: the parser never panics, and what it accepts round-trips through the effective
//! configuration `ferryd check` prints.
#![no_main]

use std::path::Path;

use ferryd::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(config) = Config::parse(text, Path::new("fuzz.toml")) {
        let printed = config.to_toml();
        let again = Config::parse(&printed, Path::new("fuzz.toml"))
            .unwrap_or_else(|e| panic!("effective configuration rejected: {e}\n{printed}"));
        assert_eq!(again, config);
    }
});
