//! Running iptables-save and iptables-restore: version detection, the xtables lock, and errors
//! that name the command and repeat its stderr.

use std::fs::OpenOptions;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

use super::NatError;

/// The lock every iptables binary of the legacy backend takes around a change.
const XTABLES_LOCK: &str = "/run/xtables.lock";
/// How long to wait for another tool to release it (iptables' own `--wait` default is forever;
/// a bounded wait turns a stuck holder into an error that names the lock).
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// The iptables tools found on this host.
#[derive(Debug, Clone)]
pub struct Iptables {
    /// "1.8.9 (nf_tables)", for messages.
    pub version: String,
    /// iptables-restore knows `--wait` (1.6.2 and later) and takes the lock itself.
    restore_waits: bool,
}

impl Iptables {
    /// Finds iptables and learns its version.
    pub fn detect() -> Result<Iptables, NatError> {
        let out = run("iptables", &["--version"], None)?;
        // "iptables v1.8.9 (nf_tables)" or "iptables v1.6.1"
        let version = out
            .trim()
            .trim_start_matches("iptables")
            .trim()
            .trim_start_matches('v')
            .to_string();
        let numbers: Vec<u32> = version
            .split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .take(3)
            .filter_map(|n| n.parse().ok())
            .collect();
        let restore_waits = numbers.as_slice() >= [1, 6, 2].as_slice();
        Ok(Iptables {
            version,
            restore_waits,
        })
    }

    /// `iptables-save -t TABLE`, with packet and byte counters when `counters`.
    pub fn save(&self, table: &str, counters: bool) -> Result<String, NatError> {
        let mut args = vec!["-t", table];
        if counters {
            args.push("-c");
        }
        run("iptables-save", &args, None)
    }

    /// `iptables-restore --noflush` with `input`, under the xtables lock.
    pub fn restore(&self, input: &str) -> Result<(), NatError> {
        if self.restore_waits {
            run("iptables-restore", &["--noflush", "--wait"], Some(input)).map(|_| ())
        } else {
            // iptables 1.6.1 (Ubuntu 18.04): restore neither waits for nor takes the lock.
            let _lock = xtables_lock()?;
            run("iptables-restore", &["--noflush"], Some(input)).map(|_| ())
        }
    }
}

fn xtables_lock() -> Result<Flock<std::fs::File>, NatError> {
    let deadline = Instant::now() + LOCK_WAIT;
    // flock needs only an open descriptor: open read-only when the file exists, so the
    // sandboxed daemon (not root, /run read-only but this file) can take it too.
    let mut file = OpenOptions::new()
        .read(true)
        .open(XTABLES_LOCK)
        .or_else(|_| {
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(XTABLES_LOCK)
        })
        .map_err(|e| NatError(format!("cannot open {XTABLES_LOCK}: {e}")))?;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((back, errno)) if errno == nix::errno::Errno::EWOULDBLOCK && Instant::now() < deadline => {
                file = back;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err((_, errno)) => {
                return Err(NatError(format!(
                    "cannot take {XTABLES_LOCK} within {}s (another iptables user holds it): {errno}",
                    LOCK_WAIT.as_secs()
                )));
            }
        }
    }
}

/// Runs `program args`, feeding `stdin`; returns stdout, or an error naming the command with its
/// exit status and stderr.
fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, NatError> {
    let shown = format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => NatError(format!(
                "`{shown}`: {program} is not installed (install the iptables package)"
            )),
            _ => NatError(format!("`{shown}` could not start: {e}")),
        })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|e| NatError(format!("`{shown}`: cannot write its input: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| NatError(format!("`{shown}` failed: {e}")))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let mut message = format!("`{shown}` failed ({}): {}", out.status, stderr.trim());
        if let Some(input) = stdin {
            message.push_str(&format!("\ninput was:\n{input}"));
        }
        return Err(NatError(message));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
