//! Running iptables-save and iptables-restore: version detection, the xtables lock, a bound on
//! every run, and errors that name the command and repeat its stderr.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};
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
/// How often a running command is checked for having finished.
const POLL_EVERY: Duration = Duration::from_millis(10);

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
/// exit status and stderr. The command runs in a process group of its own and is killed, group
/// and all, when it outlives [`COMMAND_TIMEOUT`]: a wrapper script's children go too, so no pipe
/// is left open behind it.
fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, NatError> {
    run_bounded(program, args, stdin, COMMAND_TIMEOUT)
}

pub(crate) fn run_bounded(
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
    limit: Duration,
) -> Result<String, NatError> {
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
        .process_group(0)
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => NatError(format!(
                "`{shown}`: {program} is not installed (install the iptables package)"
            )),
            _ => NatError(format!("`{shown}` could not start: {e}")),
        })?;
    let deadline = Instant::now() + limit;
    // Input and output move on threads of their own, so a command that neither reads nor exits
    // cannot hold this one past the deadline.
    let feeder = match (stdin, child.stdin.take()) {
        (Some(input), Some(mut pipe)) => {
            let input = input.to_string();
            Some(std::thread::spawn(move || pipe.write_all(input.as_bytes())))
        }
        _ => None,
    };
    let stdout = child.stdout.take().map(collect);
    let stderr = child.stderr.take().map(collect);
    let pid = child.id() as libc::pid_t;
    let status = loop {
        match exited(pid) {
            Ok(true) => {
                // The leader is done but not reaped, so its pid (the group's id) cannot be
                // reused: whatever it left running in the group goes too, so no descendant holds
                // the output pipes open past this point.
                // SAFETY: signalling the process group this function created.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
                match child.wait() {
                    Ok(status) => break status,
                    Err(e) => return Err(NatError(format!("`{shown}` failed: {e}"))),
                }
            }
            Ok(false) if Instant::now() < deadline => std::thread::sleep(POLL_EVERY),
            Ok(false) => {
                // SAFETY: signalling the process group this function created; the child has not
                // been reaped, so its id cannot have been reused.
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                let _ = child.wait();
                return Err(NatError(format!(
                    "`{shown}` did not finish within {} and was killed (a hung iptables, or the xtables lock held by another program)",
                    humantime::format_duration(limit)
                )));
            }
            Err(e) => return Err(NatError(format!("`{shown}` failed: {e}"))),
        }
    };
    let fed = feeder.map(|f| f.join());
    let out = stdout.map(|h| h.join().unwrap_or_default()).unwrap_or_default();
    let err = stderr.map(|h| h.join().unwrap_or_default()).unwrap_or_default();
    if !status.success() {
        let stderr = String::from_utf8_lossy(&err);
        let mut message = format!("`{shown}` failed ({status}): {}", stderr.trim());
        if let Some(input) = stdin {
            message.push_str(&format!("\ninput was:\n{input}"));
        }
        return Err(NatError(message));
    }
    if let Some(Ok(Err(e))) = fed {
        return Err(NatError(format!("`{shown}`: cannot write its input: {e}")));
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Whether the child `pid` has exited, without reaping it (waitid with WNOWAIT).
fn exited(pid: libc::pid_t) -> std::io::Result<bool> {
    // SAFETY: siginfo_t is plain data; waitid fills it or leaves it zeroed.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a siginfo_t; pid is our unreaped child.
    let rc = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: with WNOHANG, si_pid stays 0 when the child has not exited.
    Ok(unsafe { info.si_pid() } != 0)
}

/// Reads a child's output to the end on a thread of its own.
fn collect(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        bytes
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hung_command_and_its_children_are_killed_at_the_bound() {
        let started = Instant::now();
        // The shell's child keeps stdout open: only killing the group lets the readers finish.
        let e = run_bounded(
            "sh",
            &["-c", "sleep 30 & sleep 30"],
            None,
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(e.0.contains("did not finish within 300ms and was killed"), "{e}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn a_descendant_holding_the_output_open_does_not_hold_the_caller() {
        let started = Instant::now();
        let out = run_bounded(
            "sh",
            &["-c", "sleep 30 & echo done"],
            None,
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(out.trim(), "done");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn output_and_failures_are_reported() {
        assert_eq!(run("sh", &["-c", "cat"], Some("in\n")).unwrap(), "in\n");
        let e = run("sh", &["-c", "echo nope >&2; exit 3"], None).unwrap_err();
        assert!(e.0.contains("exit status: 3") && e.0.contains("nope"), "{e}");
        let e = run("ferryd-no-such-program", &[], None).unwrap_err();
        assert!(e.0.contains("is not installed"), "{e}");
    }
}
