//! The signals the daemon acts on (SIGHUP, SIGTERM, SIGINT, SIGUSR1, SIGUSR2), read from a
//! signalfd instead of caught by handlers.
//!
//! This module owns the signal mask. [`block`] runs first in `ferryd run`, before any thread
//! exists, so every thread inherits it and no signal is ever delivered to a handler or to its
//! default action: each one waits, pending, until the daemon reads it. That is what a live upgrade
//! needs. execve keeps the mask and the pending set but resets handlers, so with handlers a
//! SIGTERM or a second SIGUSR2 arriving between the two program images would kill the process;
//! with the mask it waits for the new image, which reads it once it is ready. It must not decide
//! what a signal means: the daemon does.

use std::io;

use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use tokio::io::unix::AsyncFd;

/// Every signal the daemon acts on.
const HANDLED: [Signal; 5] = [
    Signal::SIGHUP,
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

fn set() -> SigSet {
    let mut set = SigSet::empty();
    for signal in HANDLED {
        set.add(signal);
    }
    set
}

/// Blocks the handled signals in the calling thread, and so in every thread it starts. Call it
/// before any other thread exists. A blocked signal is queued even when its disposition is
/// "ignore" (the kernel never treats a blocked signal as ignored), so one a parent left ignored,
/// like nohup's SIGHUP, still reaches the signalfd.
pub fn block() -> io::Result<()> {
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set()), None)?;
    Ok(())
}

/// A signal the daemon acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sig {
    /// Reload the configuration.
    Hangup,
    /// Drain and exit (systemd's stop).
    Terminate,
    /// Drain and exit (Ctrl-C).
    Interrupt,
    /// Test faults in a test build; ignored otherwise.
    User1,
    /// Live upgrade.
    User2,
}

impl Sig {
    /// The signal's name, for the log.
    pub fn name(self) -> &'static str {
        match self {
            Sig::Hangup => "SIGHUP",
            Sig::Terminate => "SIGTERM",
            Sig::Interrupt => "SIGINT",
            Sig::User1 => "SIGUSR1",
            Sig::User2 => "SIGUSR2",
        }
    }

    fn from_number(number: u32) -> Option<Sig> {
        match Signal::try_from(number as i32).ok()? {
            Signal::SIGHUP => Some(Sig::Hangup),
            Signal::SIGTERM => Some(Sig::Terminate),
            Signal::SIGINT => Some(Sig::Interrupt),
            Signal::SIGUSR1 => Some(Sig::User1),
            Signal::SIGUSR2 => Some(Sig::User2),
            _ => None,
        }
    }
}

/// The daemon's signal source. Signals read during start-up that are not a stop are kept and
/// returned by [`Signals::next`] once the daemon serves.
pub struct Signals {
    fd: AsyncFd<SignalFd>,
    deferred: Vec<Sig>,
}

impl Signals {
    /// Opens the signalfd (inside the runtime). The signals must already be blocked ([`block`]).
    pub fn open() -> io::Result<Signals> {
        let fd = SignalFd::with_flags(&set(), SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
        // SAFETY: the SignalFd owns its descriptor and returns the same one for as long as it
        // lives; it is moved into the AsyncFd and closed only when that is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(Signals {
            fd,
            deferred: Vec::new(),
        })
    }

    async fn read(&self) -> io::Result<Sig> {
        loop {
            let mut ready = self.fd.readable().await?;
            let read = ready.try_io(|fd| match fd.get_ref().read_signal() {
                Ok(Some(info)) => Ok(Sig::from_number(info.ssi_signo)),
                Ok(None) => Err(io::ErrorKind::WouldBlock.into()),
                Err(e) => Err(e.into()),
            });
            match read {
                Ok(Ok(Some(sig))) => return Ok(sig),
                // A signal outside the set cannot be read from this fd; skip it all the same.
                Ok(Ok(None)) => {}
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
    }

    /// The next signal: first any kept during start-up, then as they arrive.
    pub async fn next(&mut self) -> io::Result<Sig> {
        if !self.deferred.is_empty() {
            return Ok(self.deferred.remove(0));
        }
        self.read().await
    }

    /// Completes at SIGTERM or SIGINT, with the signal's name; other signals are kept for later.
    pub async fn stop_requested(&mut self) -> &'static str {
        loop {
            match self.read().await {
                Ok(sig @ (Sig::Terminate | Sig::Interrupt)) => return sig.name(),
                Ok(sig) => self.deferred.push(sig),
                Err(e) => {
                    tracing::error!(error = %e, "cannot read signals; SIGTERM will not be heard until the daemon serves");
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}
