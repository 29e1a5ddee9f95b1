//! The pipe pool and the two splice(2) moves: socket → pipe and pipe → socket.
//!
//! This module owns pipes: creating them non-blocking, lending them only while bytes are in
//! flight, taking back only empty ones, and bounding how many exist. It must not decide when to
//! read or write (the pump does, from tokio readiness) and must never be asked to move
//! `usize::MAX` bytes: newer kernels answer EINVAL.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};

/// The capacity ferryd asks for each pipe (F_SETPIPE_SZ): sixteen times the default 64 KiB, the
/// largest an unprivileged process may ask for (fs.pipe-max-size). Each splice moves up to the
/// pipe's capacity, so a bigger pipe means fewer syscalls and wake-ups per byte: on loopback,
/// 256 KiB pipes cut CPU per GiB by about a third against the default 64 KiB, and 1 MiB pipes
/// took it from 0.35 to 0.26 s (BENCHMARKS.md). The per-user pipe budget (fs.pipe-user-pages-soft, 64 MiB) bounds how
/// many such pipes may exist: see [`crate::config`]'s default `max_pipes`. Above the budget the
/// kernel refuses the resize and the pipe keeps a smaller size, which still works.
pub const PIPE_SIZE: usize = 1024 * 1024;

/// Empty pipes kept for reuse. Creating a pipe is two fds and a syscall; keeping a few dozen
/// covers the bursts of a build (parallel uploads) without holding fds for idle connections.
const IDLE_PIPES_KEPT: usize = 32;

/// A non-blocking pipe: the kernel buffer that splice moves pages through.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// What one splice may ask for: the pipe's capacity. A pipe can report full with less than
    /// this in it (every skb fragment takes a whole slot), so the drain loop always moves what
    /// the pipe actually holds; and never usize::MAX, which newer kernels answer with EINVAL.
    chunk: usize,
}

impl Pipe {
    /// A fresh pipe, enlarged to [`PIPE_SIZE`] when the kernel allows it.
    fn new() -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let chunk = fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32))
            .or_else(|_| fcntl(&write, FcntlArg::F_GETPIPE_SZ))
            .map_or(DEFAULT_PIPE_SIZE, |size| size.max(1) as usize);
        Ok(Pipe { read, write, chunk })
    }
}

impl Pipe {
    /// A pipe handed over by the previous program image: made non-blocking and close-on-exec
    /// again, its capacity read back.
    pub fn from_fds(read: OwnedFd, write: OwnedFd) -> io::Result<Pipe> {
        for fd in [&read, &write] {
            let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
            fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
            fcntl(fd, FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))?;
        }
        let chunk =
            fcntl(&write, FcntlArg::F_GETPIPE_SZ).map_or(DEFAULT_PIPE_SIZE, |size| size.max(1) as usize);
        Ok(Pipe { read, write, chunk })
    }

    /// The two ends' numbers, read then write, for the hand-over document.
    pub fn raw_fds(&self) -> (std::os::fd::RawFd, std::os::fd::RawFd) {
        use std::os::fd::AsRawFd;
        (self.read.as_raw_fd(), self.write.as_raw_fd())
    }

    /// Moves up to `len` bytes of what the pipe holds into `socket`; how many went.
    pub fn drain_to(&self, socket: impl AsFd, len: usize) -> io::Result<usize> {
        Ok(splice(&self.read, None, socket, None, len, flags())?)
    }
}

/// The capacity of a pipe nobody resized (16 pages).
const DEFAULT_PIPE_SIZE: usize = 64 * 1024;

/// A bounded set of pipes shared by every connection.
#[derive(Debug)]
pub struct PipePool {
    idle: Mutex<Vec<Pipe>>,
    alive: AtomicUsize,
    created: AtomicU64,
    max: usize,
    /// The largest capacity a pipe of this pool has had. A pipe made while the user was over
    /// the pipe budget has a page or two and cannot be enlarged; kept in the pool it would make
    /// every burst that borrows it slow for the rest of the daemon's life, so it is closed when
    /// given back, and a later pipe can have the full size once the budget allows.
    largest: AtomicUsize,
}

impl PipePool {
    /// A pool that lets at most `max` pipes exist at once.
    pub fn new(max: usize) -> Self {
        PipePool {
            idle: Mutex::new(Vec::new()),
            alive: AtomicUsize::new(0),
            created: AtomicU64::new(0),
            max,
            largest: AtomicUsize::new(0),
        }
    }

    /// Lends an empty pipe, creating one while under the bound. `Ok(None)` when the bound is
    /// reached: the caller copies through a buffer instead.
    pub fn take(&self) -> io::Result<Option<Lease<'_>>> {
        if let Some(pipe) = self.lock_idle().pop() {
            return Ok(Some(Lease::new(self, pipe)));
        }
        let reserved = self.alive.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < self.max).then_some(n + 1)
        });
        if reserved.is_err() {
            return Ok(None);
        }
        match Pipe::new() {
            Ok(pipe) => {
                self.created.fetch_add(1, Ordering::Relaxed);
                self.largest.fetch_max(pipe.chunk, Ordering::Relaxed);
                Ok(Some(Lease::new(self, pipe)))
            }
            Err(e) => {
                self.alive.fetch_sub(1, Ordering::AcqRel);
                Err(e)
            }
        }
    }

    /// Lends `pipe`, which holds `pending` bytes and crossed a live upgrade, as if this pool had
    /// made it: it counts among the pipes that exist (even past `max`: the previous image's
    /// pipes were within it, and this image's pool starts empty), and goes back to the pool, or
    /// is closed, like any other once dropped.
    pub fn adopt(&self, pipe: Pipe, pending: usize) -> Lease<'_> {
        self.alive.fetch_add(1, Ordering::AcqRel);
        self.largest.fetch_max(pipe.chunk, Ordering::Relaxed);
        let mut lease = Lease::new(self, pipe);
        lease.pending = pending;
        lease
    }

    /// Pipes that exist now, lent or idle.
    pub fn alive(&self) -> usize {
        self.alive.load(Ordering::Relaxed)
    }

    /// Pipes created since start; far fewer than connections when the pool works.
    pub fn created(&self) -> u64 {
        self.created.load(Ordering::Relaxed)
    }

    /// The most pipes that may exist at once.
    pub fn limit(&self) -> usize {
        self.max
    }

    /// Empty pipes waiting in the pool.
    pub fn idle(&self) -> usize {
        self.lock_idle().len()
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<Pipe>> {
        // A panic while holding this lock cannot leave the Vec inconsistent; keep going.
        self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn give_back(&self, pipe: Pipe, empty: bool) {
        if empty && pipe.chunk >= self.largest.load(Ordering::Relaxed) {
            let mut idle = self.lock_idle();
            if idle.len() < IDLE_PIPES_KEPT {
                idle.push(pipe);
                return;
            }
        }
        // Not empty (an error cut a transfer short), undersized, or the pool is full: close it.
        drop(pipe);
        self.alive.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A pipe lent to one direction of one connection while bytes are in flight. It goes back to the
/// pool when dropped, and only if it is empty; a pipe with bytes left in it is closed instead,
/// so stale data can never leak into another connection.
#[derive(Debug)]
pub struct Lease<'a> {
    pool: &'a PipePool,
    pipe: Option<Pipe>,
    pending: usize,
}

impl<'a> Lease<'a> {
    fn new(pool: &'a PipePool, pipe: Pipe) -> Self {
        Lease {
            pool,
            pipe: Some(pipe),
            pending: 0,
        }
    }

    /// Bytes in the pipe, waiting to be written out.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// The most one splice into the pipe moves.
    pub fn capacity(&self) -> usize {
        self.pipe.as_ref().map_or(0, |pipe| pipe.chunk)
    }

    /// Moves up to a pipe's capacity from `socket` into the pipe. `Ok(0)` is end of stream.
    /// Call only with an empty pipe: then EAGAIN can only mean "socket empty".
    pub fn fill_from(&mut self, socket: impl AsFd) -> io::Result<usize> {
        debug_assert_eq!(
            self.pending, 0,
            "splice into a non-empty pipe makes EAGAIN ambiguous"
        );
        let pipe = self.pipe.as_ref().ok_or_else(gone)?;
        let n = splice(socket, None, &pipe.write, None, pipe.chunk, flags())?;
        self.pending += n;
        Ok(n)
    }

    /// Moves what the pipe holds into `socket`; returns how much went.
    pub fn drain_to(&mut self, socket: impl AsFd) -> io::Result<usize> {
        let pipe = self.pipe.as_ref().ok_or_else(gone)?;
        let n = pipe.drain_to(socket, self.pending)?;
        self.pending -= n.min(self.pending);
        Ok(n)
    }

    /// Takes the pipe out of the pool with the bytes it holds: a connection parked for a live
    /// upgrade hands them to the next program image. The pool counts it as gone.
    pub fn detach(mut self) -> Option<(Pipe, usize)> {
        let pipe = self.pipe.take()?;
        self.pool.alive.fetch_sub(1, Ordering::AcqRel);
        Some((pipe, self.pending))
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(pipe) = self.pipe.take() {
            self.pool.give_back(pipe, self.pending == 0);
        }
    }
}

fn flags() -> SpliceFFlags {
    SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK
}

fn gone() -> io::Error {
    io::Error::other("pipe already returned to the pool")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_is_bounded_and_reuses_empty_pipes() {
        let pool = PipePool::new(2);
        let a = pool.take().unwrap().unwrap();
        let b = pool.take().unwrap().unwrap();
        assert!(pool.take().unwrap().is_none(), "third pipe over a bound of two");
        drop(a);
        assert_eq!(pool.idle(), 1);
        let c = pool.take().unwrap().unwrap();
        assert_eq!(pool.alive(), 2);
        drop((b, c));
        assert_eq!(pool.idle(), 2);
    }

    #[test]
    fn pipes_are_enlarged() {
        let pool = PipePool::new(1);
        let lease = pool.take().unwrap().unwrap();
        let pipe = lease.pipe.as_ref().unwrap();
        // Unless this user is over the pipe budget, the resize takes.
        assert_eq!(pipe.chunk, PIPE_SIZE);
        assert_eq!(
            fcntl(&pipe.write, FcntlArg::F_GETPIPE_SZ).unwrap() as usize,
            PIPE_SIZE
        );
    }

    #[test]
    fn pipe_with_bytes_left_is_closed_not_pooled() {
        let pool = PipePool::new(4);
        let (mut tx, rx) = std::os::unix::net::UnixStream::pair().unwrap();
        // splice needs a socket or pipe on the input side; a unix stream socket works.
        use std::io::Write;
        tx.write_all(b"left over").unwrap();
        let mut lease = pool.take().unwrap().unwrap();
        assert_eq!(lease.fill_from(&rx).unwrap(), 9);
        drop(lease);
        assert_eq!(pool.idle(), 0);
        assert_eq!(pool.alive(), 0);
    }
}
