//! Booted Debian containers for the package's system tests (root only): minimal roots made
//! with debootstrap, one per release and cached between runs, booted with systemd-nspawn in a
//! network namespace of their own.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The releases the package is tested on: the oldest reachable here (systemd 247, iptables 1.8
/// legacy by default), bookworm (252) and trixie (257, iptables with the nft backend only).
pub const RELEASES: [&str; 3] = ["bullseye", "bookworm", "trixie"];

/// Where the pristine root is kept between runs (FERRYD_TEST_CACHE overrides).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("FERRYD_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/ferryd-tests"))
}

pub fn can_run() -> bool {
    super::skip::needs(
        Some("debootstrap, systemd-nspawn"),
        &["debootstrap", "systemd-nspawn", "nsenter"],
    )
}

pub fn deb() -> Option<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target"),
        PathBuf::from,
    );
    let deb = target
        .join("debian")
        .join(format!("ferryd_{}_amd64.deb", env!("CARGO_PKG_VERSION")));
    deb.exists().then_some(deb)
}

/// The cached root of `release`, made on first use. The tests run on several threads: the first
/// to ask for a release makes its root and the others wait for it (on a fresh machine, two of
/// them once ran debootstrap into the same temporary directory at once, and both failed).
pub fn root(release: &'static str) -> PathBuf {
    static ROOTS: Mutex<BTreeMap<&'static str, Arc<OnceLock<PathBuf>>>> = Mutex::new(BTreeMap::new());
    let once = ROOTS
        .lock()
        .unwrap()
        .entry(release)
        .or_insert_with(|| Arc::new(OnceLock::new()))
        .clone();
    once.get_or_init(|| make_root(release)).clone()
}

fn make_root(release: &str) -> PathBuf {
    let root = cache_dir().join(format!("{release}-v1"));
    if root.join("usr/bin/systemctl").exists() {
        return root;
    }
    // One recipe for CI (which starts it while the code compiles) and for the tests.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/test-roots");
    let out = Command::new(&script)
        .arg(release)
        .env("FERRYD_TEST_CACHE", cache_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success() && root.join("usr/bin/systemctl").exists(),
        "{} {release} failed: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    root
}

/// A booted container; powered off and removed when dropped.
pub struct Container {
    nspawn: Child,
    leader: i32,
}

impl Container {
    pub fn boot(root: &Path, share: &Path) -> Container {
        let nspawn = Command::new("systemd-nspawn")
            // systemd 257's nspawn leaves /proc/sys read-only in the container unless told
            // otherwise; NAT writes net.ipv4.ip_forward (older releases ignore the variable).
            .env("SYSTEMD_NSPAWN_API_VFS_WRITABLE", "network")
            .arg("-D")
            .arg(root)
            .args([
                "--ephemeral",
                "--boot",
                "--register=no",
                "--keep-unit",
                "--private-network",
                "--quiet",
            ])
            .args(["--console=passive", "--capability=CAP_NET_ADMIN,CAP_NET_RAW"])
            .arg(format!("--bind-ro={}:/mnt/ferryd", share.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let nspawn_pid = nspawn.id() as i32;
        let deadline = Instant::now() + Duration::from_secs(60);
        let leader = loop {
            if let Some(pid) = find_init(nspawn_pid) {
                break pid;
            }
            assert!(Instant::now() < deadline, "the container's systemd did not start");
            std::thread::sleep(Duration::from_millis(100));
        };
        let container = Container { nspawn, leader };
        loop {
            let state = container.sh("systemctl is-system-running 2>/dev/null || true");
            let state = String::from_utf8_lossy(&state.stdout).trim().to_string();
            if state == "running" || state == "degraded" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the container did not finish booting: {state}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        container
    }

    /// Runs a shell script inside the container.
    pub fn sh(&self, script: &str) -> Output {
        Command::new("nsenter")
            .args([
                "-t",
                &self.leader.to_string(),
                "-a",
                "-r",
                "-w",
                "--",
                "/bin/bash",
                "-c",
                script,
            ])
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Runs a script that must succeed; returns its stdout.
    pub fn ok(&self, script: &str) -> String {
        let out = self.sh(script);
        assert!(
            out.status.success(),
            "in the container: {script}\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn wait_for(&self, script: &str, want: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let out = String::from_utf8_lossy(&self.sh(script).stdout).into_owned();
            if out.contains(want) {
                return out;
            }
            assert!(
                Instant::now() < deadline,
                "waited for {want:?} from `{script}`; last: {out}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // SIGTERM to nspawn asks the container to power off; then make sure it is gone.
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.nspawn.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}

/// The container's systemd: a descendant of nspawn named "systemd".
fn find_init(nspawn: i32) -> Option<i32> {
    let mut frontier = vec![nspawn];
    for _ in 0..3 {
        let mut next = Vec::new();
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let Some(close) = stat.rfind(')') else { continue };
            let comm = &stat[stat.find('(').unwrap_or(0) + 1..close];
            let ppid: i32 = stat[close + 2..]
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            if frontier.contains(&ppid) {
                if comm == "systemd" {
                    return Some(pid);
                }
                next.push(pid);
            }
        }
        frontier = next;
    }
    None
}
