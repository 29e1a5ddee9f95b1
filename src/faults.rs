//! Faults for the test suite, so tests can show that the watchdog and the health endpoint notice
//! what they are meant to notice. Compiled only with the `test-faults` cargo feature, which the
//! test suite turns on for itself (a dev-dependency of the package on itself); the release binary
//! and the Debian package contain none of this.
//!
//! `FERRYD_TEST_FAULTS` arms one fault, which SIGUSR1 then triggers: `stall` blocks every worker
//! thread; `kill-accept` aborts the first route's accept loop. SIGUSR2 is never used: it is
//! reserved for the live upgrade. `handover-emfile` fires by itself, once, in the first live
//! upgrade, after the new binary's check passed: the open-file limit drops so that no descriptor
//! can be had, and the hand-over document cannot be created. `slow-exec` holds every live
//! upgrade for 1.5 s between making descriptors inheritable and the exec, so that a test can see
//! what a child forked then would inherit. `drop-byte` fires by itself, once: the first copy
//! burst of the process writes one byte fewer than it read, so a test can see the byte
//! accounting count the loss.

/// The environment variable that arms a fault.
pub const ENV: &str = "FERRYD_TEST_FAULTS";

/// A fault SIGUSR1 triggers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Every worker thread blocks for an hour: the heartbeat stops.
    Stall,
    /// The first route's accept loop is aborted.
    KillAccept,
}

/// The fault armed in the environment, if any.
pub fn armed() -> Option<Fault> {
    match std::env::var(ENV).ok()?.as_str() {
        "stall" => Some(Fault::Stall),
        "kill-accept" => Some(Fault::KillAccept),
        _ => None,
    }
}

/// Just before a live upgrade writes its document: with `handover-emfile` armed, the first time,
/// lowers the soft open-file limit to the lowest free descriptor number, so that no new
/// descriptor can be had (the limit bounds the numbers, and every one below it is taken).
pub fn before_handover() {
    static FIRED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if std::env::var(ENV).ok().as_deref() != Some("handover-emfile")
        || FIRED.swap(true, std::sync::atomic::Ordering::Relaxed)
    {
        return;
    }
    let Ok(probe) = std::fs::File::open("/dev/null") else {
        return;
    };
    let lowest_free = std::os::fd::AsRawFd::as_raw_fd(&probe) as u64;
    drop(probe);
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .unwrap_or((lowest_free, lowest_free));
    let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, lowest_free, hard);
    tracing::warn!(
        limit = lowest_free,
        "test fault: the open-file limit is now the lowest free descriptor"
    );
}

/// Between making the hand-over's descriptors inheritable and the exec: with `slow-exec` armed,
/// waits 1.5 s.
pub fn in_exec_window() {
    if std::env::var(ENV).ok().as_deref() == Some("slow-exec") {
        std::thread::sleep(std::time::Duration::from_millis(1500));
    }
}

/// With `drop-byte` armed: true once, for the first copy burst that asks.
pub fn drop_byte() -> bool {
    static ARMED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    static FIRED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    *ARMED.get_or_init(|| std::env::var(ENV).ok().as_deref() == Some("drop-byte"))
        && !FIRED.swap(true, std::sync::atomic::Ordering::Relaxed)
}
