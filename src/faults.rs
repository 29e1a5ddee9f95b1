//! Faults for the test suite, so tests can show that the watchdog and the health endpoint notice
//! what they are meant to notice. Compiled only with the `test-faults` cargo feature, which the
//! test suite turns on for itself (a dev-dependency of the package on itself); the release binary
//! and the Debian package contain none of this.
//!
//! `FERRYD_TEST_FAULTS` arms one fault, which SIGUSR1 then triggers: `stall` blocks every worker
//! thread; `kill-accept` aborts the first route's accept loop. SIGUSR2 is never used: it is
//! reserved for the live upgrade.

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
