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
use std::time::{Duration, Instant};

/// The binary cargo built. Run it through [`bin`].
const BUILT: &str = env!("CARGO_BIN_EXE_ferryd");

/// The ferryd binary under test, at a path an ordinary uid can run. As root the suite runs each
/// daemon under a uid of its own (see `daemon::unprivileged`), and a checkout inside a directory
/// closed to others (root's home, a `mktemp -d`) would refuse them with EACCES; then the binary
/// is copied, once per build, into a directory anyone may enter.
pub fn bin() -> &'static str {
    static RUNNABLE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    RUNNABLE.get_or_init(|| {
        let built = Path::new(BUILT);
        if open_to_others(built) {
            return BUILT.to_string();
        }
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(built).expect("the built binary");
        let modified = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let shared = std::env::temp_dir().join("ferryd-test-bin");
        let dir = shared.join(format!("{}-{modified}", meta.len()));
        let copy = dir.join("ferryd");
        if !copy.exists() {
            // Copies of earlier builds go: one build's copy is enough.
            if let Ok(entries) = std::fs::read_dir(&shared) {
                for entry in entries.flatten() {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
            std::fs::create_dir_all(&dir).expect("a directory for the binary");
            let open = std::fs::Permissions::from_mode(0o755);
            std::fs::set_permissions(&shared, open.clone()).expect("open the directory");
            std::fs::set_permissions(&dir, open.clone()).expect("open the directory");
            let part = dir.join(format!("ferryd.{}", std::process::id()));
            std::fs::copy(built, &part).expect("copy the binary");
            std::fs::set_permissions(&part, open).expect("make the copy runnable");
            std::fs::rename(&part, &copy).expect("put the copy in place");
        }
        copy.display().to_string()
    })
}

/// Whether every directory above `path` lets others through, and others may run `path`.
fn open_to_others(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let others_x = |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o001 != 0);
    others_x(path)
        && path
            .ancestors()
            .skip(1)
            .filter(|a| !a.as_os_str().is_empty())
            .all(others_x)
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local addr").port()
}

/// `check`'s first `Some`, asked every 50 ms until `timeout` has passed: for what the daemon does
/// on its own time (a report read once a second, a counter updated as a connection ends), where
/// a fixed sleep would be too short on a loaded machine and too long everywhere else.
pub fn until<T>(mut check: impl FnMut() -> Option<T>, timeout: Duration) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(found) = check() {
            return Some(found);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
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
