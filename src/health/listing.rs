//! `/connections`, built where it cannot hold up the relay: on a thread of its own in the idle
//! scheduling class.
//!
//! Listing 5,000 connections is about 10 ms of work (reading each connection and writing about
//! 1.5 MB of JSON). On the proxy VM's single vCPU, done at the relay's priority (on the health
//! endpoint's thread, or any other) it takes the core from the relay for a scheduler slice at a
//! time, and a keystroke arriving then waits: the benchmark's `--listing` mode measured the
//! relay's ping-pong p99 going from 79 µs to 2.2 ms while listings ran back to back. In the idle
//! class the relay preempts the listing as soon as it wakes, and the p99 stays where it was. The
//! cost is the other way: when the relay keeps the core busy, a listing gets only what is left
//! (under a ping-pong that saturates the core, about 1 s for 5,000), bounded by
//! [`LISTING_TIMEOUT`], past which the request is answered 503 saying why. This module must not
//! change what is listed, only where and when it is built.

use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::state::State;

/// How long a request waits for its listing before it is answered 503.
pub const LISTING_TIMEOUT: Duration = Duration::from_secs(10);
/// Listings waiting for the thread at most; more are answered 503 at once.
const QUEUE: usize = 4;

type Job = (Arc<State>, oneshot::Sender<String>);

/// The listing of `state`'s connections as JSON, or why there is none.
pub async fn connections(state: Arc<State>) -> Result<String, &'static str> {
    static WORKER: OnceLock<Option<SyncSender<Job>>> = OnceLock::new();
    let worker = WORKER
        .get_or_init(spawn)
        .as_ref()
        .ok_or("cannot start the thread that builds the listing")?;
    let (reply, answer) = oneshot::channel();
    worker.try_send((state, reply)).map_err(|e| match e {
        TrySendError::Full(_) => "too many listings at once; try again",
        TrySendError::Disconnected(_) => "the thread that builds the listing has ended",
    })?;
    match tokio::time::timeout(LISTING_TIMEOUT, answer).await {
        Ok(Ok(body)) => Ok(body),
        Ok(Err(_)) => Err("the thread that builds the listing has ended"),
        Err(_) => Err("the relay kept the CPU busy and the listing yields to it; try again"),
    }
}

fn spawn() -> Option<SyncSender<Job>> {
    let (jobs, queue) = sync_channel::<Job>(QUEUE);
    let spawned = std::thread::Builder::new()
        .name("ferryd-listing".into())
        .spawn(move || {
            yield_to_the_relay();
            while let Ok((state, reply)) = queue.recv() {
                let _ = reply.send(render(&state));
            }
        });
    match spawned {
        Ok(_) => Some(jobs),
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the thread that builds /connections");
            None
        }
    }
}

/// Puts the calling thread in the idle scheduling class (SCHED_IDLE: allowed without privilege,
/// and by the unit's RestrictRealtime=, which forbids only the real-time classes). The scheduler
/// then preempts it the moment a thread of another class wakes, the relay included: a rule of
/// Linux 4.15's CFS and of today's EEVDF alike, where a low nice value only weighs the shares and
/// leaves a woken thread to wait for the current one's slice. Where the class is refused, nice 19
/// is the fallback.
fn yield_to_the_relay() {
    // SAFETY: all zeros is a valid sched_param (priority 0, which SCHED_IDLE requires; musl's
    // has more fields than glibc's).
    let param: libc::sched_param = unsafe { std::mem::zeroed() };
    // The system call itself: musl's sched_setscheduler() is a stub that fails with ENOSYS
    // (Linux's call is per thread, not per process as POSIX says), and the package's binary is
    // linked with musl.
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param that outlives the call.
    let set = unsafe {
        libc::syscall(
            libc::SYS_sched_setscheduler,
            0 as libc::pid_t,
            libc::SCHED_IDLE,
            &param as *const libc::sched_param,
        )
    };
    if set == 0 {
        return;
    }
    let idle = std::io::Error::last_os_error();
    // SAFETY: PRIO_PROCESS with who = 0 is the calling thread on Linux.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) } == 0 {
        tracing::debug!(error = %idle, "the thread that builds /connections cannot take the idle scheduling class; it runs at nice 19");
    } else {
        let e = std::io::Error::last_os_error();
        tracing::warn!(error = %e, idle_class = %idle, "cannot lower the priority of the thread that builds /connections: a listing may delay the relay");
    }
}

/// Every relayed connection, oldest first, as a JSON array. The table is only locked to copy
/// its pointers; each connection is read after, with relaxed loads.
fn render(state: &State) -> String {
    let all = state.engine.connections().snapshot();
    let views: Vec<crate::connections::ConnectionView> = all
        .iter()
        .map(|live| crate::connections::ConnectionView::of(live))
        .collect();
    drop(all);
    // Serializing plain data cannot fail; an empty array is the fallback.
    let mut body = serde_json::to_string(&views).unwrap_or_else(|_| "[]".into());
    body.push('\n');
    body
}
