//! Running an external command with a bound on its life: iptables for NAT and the doctor, and
//! the next ferryd binary's handover check before a live upgrade.
//!
//! This module owns the waiting: the command runs in a process group of its own, its output is
//! read on threads of its own, and at the bound the whole group is killed, so a hung command
//! (or a descendant holding its pipes) never holds the caller. It must not interpret output.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Held (shared) while a child is forked, and (exclusive) by a live upgrade while descriptors are
/// inheritable for its exec: a child forked then would hold every connection and listener open
/// for as long as it runs.
static FORKS: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// Keeps any command from starting until the guard is dropped (or the process image replaced).
/// A command being started is waited for; that takes a fork and an exec, not the command's run.
pub fn forbid_forks() -> std::sync::RwLockWriteGuard<'static, ()> {
    FORKS.write().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// How often a running command is checked for having finished.
const POLL_EVERY: Duration = Duration::from_millis(10);

/// Why a command gave no output.
#[derive(Debug)]
pub enum CommandError {
    /// The program does not exist; carries the command line as shown.
    Missing(String),
    /// It could not start, failed (the message has its status and stderr) or hit the bound.
    Failed(String),
}

impl std::fmt::Display for CommandError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CommandError::Missing(shown) => write!(f, "`{shown}`: the program does not exist"),
            CommandError::Failed(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for CommandError {}

/// Runs `program args`, feeding `stdin`; returns stdout, or an error naming the command with its
/// exit status and stderr. The command runs in a process group of its own and is killed, group
/// and all, when it outlives `limit`: a wrapper script's children go too, so no pipe is left open
/// behind it.
pub fn run_bounded(
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
    limit: Duration,
) -> Result<String, CommandError> {
    let shown = format!("{program} {}", args.join(" "));
    let forking = FORKS.read().unwrap_or_else(|poisoned| poisoned.into_inner());
    let spawned = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn();
    drop(forking);
    let mut child = spawned.map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => CommandError::Missing(shown.clone()),
        _ => CommandError::Failed(format!("`{shown}` could not start: {e}")),
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
                    Err(e) => return Err(CommandError::Failed(format!("`{shown}` failed: {e}"))),
                }
            }
            Ok(false) if Instant::now() < deadline => std::thread::sleep(POLL_EVERY),
            Ok(false) => {
                // SAFETY: signalling the process group this function created; the child has not
                // been reaped, so its id cannot have been reused.
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                let _ = child.wait();
                return Err(CommandError::Failed(format!(
                    "`{shown}` did not finish within {} and was killed",
                    humantime::format_duration(limit)
                )));
            }
            Err(e) => return Err(CommandError::Failed(format!("`{shown}` failed: {e}"))),
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
        return Err(CommandError::Failed(message));
    }
    if let Some(Ok(Err(e))) = fed {
        return Err(CommandError::Failed(format!(
            "`{shown}`: cannot write its input: {e}"
        )));
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
        assert!(
            e.to_string()
                .contains("did not finish within 300ms and was killed"),
            "{e}"
        );
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
}
