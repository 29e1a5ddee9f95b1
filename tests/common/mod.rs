//! Test harness shared by the integration tests, by role: the daemon under test ([`daemon`]),
//! upstream servers ([`upstream`]), client-side helpers ([`net`]), byte patterns ([`pattern`]),
//! seccomp filters ([`seccomp`]), skipping a test that needs what this machine lacks ([`skip`]),
//! and the heavier fixtures (booted containers, network namespaces, PROXY headers, sshd). Every
//! helper is reachable as `common::name`.
#![allow(dead_code)]

pub mod container;
pub mod daemon;
pub mod net;
pub mod netns;
pub mod pattern;
pub mod pp;
pub mod seccomp;
pub mod skip;
pub mod sshd;
pub mod upstream;

// Each test crate uses its own part of the harness.
#[allow(unused_imports)]
pub use {daemon::*, net::*, pattern::*, seccomp::*, upstream::*};

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

pub const BIN: &str = env!("CARGO_BIN_EXE_ferryd");

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr").port()
}

/// A directory removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ferryd-test-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `config` with a `[health]` table on 127.0.0.1:`port` appended (tables go last in TOML).
pub fn with_health(config: &str, port: u16) -> String {
    format!("{config}\n[health]\nlisten = \"127.0.0.1:{port}\"\n")
}

/// A value of `key=value` in a log line, as the stderr formatter writes it.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[start..];
    let value = rest.split(' ').next()?;
    Some(value.trim_matches('"'))
}

/// A minimal configuration: one route `name` on `listen_port` to `upstream`.
pub fn config_one_route(
    listen_port: u16,
    upstream: SocketAddr,
    extra_top: &str,
    extra_route: &str,
) -> String {
    format!(
        r#"allow = ["127.0.0.1/32"]
probe_sources = ["127.0.0.3/32"]
drain_timeout = "10s"
{extra_top}

[[route]]
name = "test"
listen = "127.0.0.1:{listen_port}"
upstream = "{upstream}"
{extra_route}
"#
    )
}
