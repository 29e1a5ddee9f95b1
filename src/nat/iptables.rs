//! Running iptables-save and iptables-restore: version detection, the xtables lock, a bound on
//! every run, and errors that name the command and repeat its stderr.

use std::fs::OpenOptions;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

use super::NatError;

/// The lock every iptables binary of the legacy backend takes around a change.
const XTABLES_LOCK: &str = "/run/xtables.lock";
/// How long to wait for another tool to release it (iptables' own `--wait` default is forever;
/// a bounded wait turns a stuck holder into an error that names the lock).
const LOCK_WAIT: Duration = Duration::from_secs(10);
/// The longest any one iptables command may run before it is killed: the lock wait plus ample
/// time for the work itself (a restore of ferryd's few rules takes milliseconds). A hung
/// iptables, or a lock holder that never lets go, then costs one failed reconcile, retried at
/// the next interval, instead of a NAT task stuck for ever.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

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
            // 1.6.2+ takes the lock itself; bound its wait, never `--wait` alone (for ever).
            let seconds = LOCK_WAIT.as_secs().to_string();
            run(
                "iptables-restore",
                &["--noflush", "--wait", &seconds],
                Some(input),
            )
            .map(|_| ())
        } else {
            // iptables 1.6.1 (Ubuntu 18.04): restore neither waits for nor takes the lock.
            let _lock = xtables_lock()?;
            run("iptables-restore", &["--noflush"], Some(input)).map(|_| ())
        }
    }
}

/// Whether an `iptables` program is on PATH, without running it.
pub fn installed() -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join("iptables").is_file()))
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
/// exit status and stderr, killed at [`COMMAND_TIMEOUT`] (see [`crate::subprocess::run_bounded`]).
fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, NatError> {
    crate::subprocess::run_bounded(program, args, stdin, COMMAND_TIMEOUT).map_err(|e| match e {
        crate::subprocess::CommandError::Missing(shown) => NatError(format!(
            "`{shown}`: {program} is not installed (install the iptables package)"
        )),
        crate::subprocess::CommandError::Failed(message) => NatError(message),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_and_failures_are_reported() {
        assert_eq!(run("sh", &["-c", "cat"], Some("in\n")).unwrap(), "in\n");
        let e = run("sh", &["-c", "echo nope >&2; exit 3"], None).unwrap_err();
        assert!(e.0.contains("exit status: 3") && e.0.contains("nope"), "{e}");
        let e = run("ferryd-no-such-program", &[], None).unwrap_err();
        assert!(e.0.contains("is not installed"), "{e}");
    }
}
