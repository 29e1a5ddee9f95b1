//! Socket plumbing shared by the listeners and the relay: binding with retries, the per-socket
//! options both legs get, and passing a reset on.
//!
//! This module owns what is set on a socket and how a socket is closed abruptly. It must not
//! decide who is admitted or where bytes go.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::TcpStream;

use crate::config::Keepalive;

/// Accept queue length. The kernel clamps it to net.core.somaxconn (128 on Ubuntu 18.04), which
/// is plenty for a builder's handful of connections and absorbs a burst of probes and retries.
const LISTEN_BACKLOG: i32 = 1024;

/// How long a bind that fails with "address in use" or "address not available" is retried at
/// start. 60000-60001 lie inside the default ephemeral port range, so an outgoing connection can
/// briefly hold one; at boot, the listen address may not be configured yet.
pub const BIND_RETRY_WINDOW: Duration = Duration::from_secs(30);
/// Shortest pause after an accept failure such as EMFILE: the pending connection stays in the
/// backlog and the listener stays readable, so accepting again at once would spin.
const ACCEPT_PAUSE_MIN: Duration = Duration::from_millis(20);
/// Longest pause: long enough to cost nothing, short enough that service resumes within a second
/// of descriptors being freed.
const ACCEPT_PAUSE_MAX: Duration = Duration::from_millis(500);

/// Pause between bind attempts.
const BIND_RETRY_EVERY: Duration = Duration::from_millis(250);

/// Binds a non-blocking listening socket with SO_REUSEADDR, so a restart is not refused by the
/// previous process's connections in TIME_WAIT. It is a std listener so that any runtime (the
/// relay's or the health endpoint's) can take it.
pub fn listen(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// [`listen`], retried for up to `window` while the error is one that goes away by itself.
pub async fn listen_with_retry(addr: SocketAddr, window: Duration) -> io::Result<std::net::TcpListener> {
    let deadline = tokio::time::Instant::now() + window;
    let mut logged = false;
    loop {
        match listen(addr) {
            Ok(listener) => return Ok(listener),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::AddrInUse | io::ErrorKind::AddrNotAvailable
                ) && tokio::time::Instant::now() + BIND_RETRY_EVERY < deadline =>
            {
                if !logged {
                    tracing::warn!(listen = %addr, error = %e, "cannot listen yet; retrying for up to {}s", window.as_secs());
                    logged = true;
                }
                tokio::time::sleep(BIND_RETRY_EVERY).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// TCP_NODELAY (SSH keystrokes and WinRM requests are small and latency-bound), keepalive
/// (Azure silently drops flows idle for about 4 minutes) and SO_OOBINLINE on a listening socket;
/// Linux copies them into every socket it completes a handshake for from then on. Returns how
/// many accepted sockets to set up one by one: those the kernel had already queued (a socket
/// passed by systemd or a previous image, or the moment between listen() and now: the options
/// are copied at the handshake, not at accept(), and the queue is first in, first out), or
/// every one, when the listening socket would not take the options (a failure is logged), because
/// the relay relies on SO_OOBINLINE on both legs (see `relay::pump`).
pub fn tune_listener(listener: &tokio::net::TcpListener, keepalive: &Keepalive) -> Untuned {
    match tune_socket(SockRef::from(listener), keepalive) {
        // A queue that cannot be measured is taken to be as long as it can be.
        Ok(()) => Untuned::First(accept_queue_len(listener).unwrap_or(LISTEN_BACKLOG as u32)),
        Err(e) => {
            tracing::warn!(error = %e, "cannot set TCP_NODELAY, SO_OOBINLINE and keepalive on the listening socket; setting them on each accepted socket instead");
            Untuned::All
        }
    }
}

/// Which accepted sockets lack the listening socket's options: see [`tune_listener`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Untuned {
    /// The next N accepted (queued before the options were set).
    First(u32),
    /// Every one.
    All,
}

impl Untuned {
    /// Whether the socket just accepted needs setting up; counts it.
    pub fn take_one(&mut self) -> bool {
        match self {
            Untuned::All => true,
            Untuned::First(0) => false,
            Untuned::First(n) => {
                *n -= 1;
                true
            }
        }
    }
}

/// TCP_NODELAY, keepalive and SO_OOBINLINE on one socket (the upstream leg, before it
/// connects). SO_OOBINLINE keeps TCP urgent data in the stream, so the relay passes it on in
/// order instead of the kernel setting the byte aside, where a plain read never sees it.
pub fn tune_socket(sock: SockRef<'_>, keepalive: &Keepalive) -> io::Result<()> {
    let params = TcpKeepalive::new()
        .with_time(keepalive.time)
        .with_interval(keepalive.interval)
        .with_retries(keepalive.probes);
    sock.set_tcp_nodelay(true)?;
    sock.set_out_of_band_inline(true)?;
    sock.set_tcp_keepalive(&params)
}

/// TCP_INFO of `socket`, fields a kernel older than this build left out at zero.
fn tcp_info(socket: &impl AsRawFd) -> io::Result<libc::tcp_info> {
    // SAFETY: tcp_info is plain data; all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `info`, which is that large.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(info)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Why the peer of a connected `socket` looks gone, if it does: data sent to it has had no
/// acknowledgement (and nothing else came from it) for `silence_bound`, every retransmission
/// unanswered; or at least `probes` (and 3) window probes in a row went unanswered while
/// data waits for its window to open. A live peer that only advertises a zero window answers its
/// window probes (an answer resets the kernel's count of unanswered ones, `tcpi_probes`, and the
/// time of the last acknowledgement) and has nothing unacknowledged in flight, so it never looks
/// gone, however long it reads nothing. At least 3 probes, because a receiver answers at most
/// one out-of-window segment per half second (tcp_invalid_ratelimit) and the first probes come
/// faster. A socket that cannot say does not look gone. The caller asks twice, a while apart,
/// before it believes it (see `relay`): right after a long silence, the first data sent has not
/// been acknowledged yet, and its peer is not gone.
pub fn peer_looks_gone(
    socket: std::os::fd::BorrowedFd<'_>,
    silence_bound: Duration,
    probes: u32,
) -> Option<String> {
    let info = tcp_info(&socket).ok()?;
    // A peer that sends data is there, even when its segments carry no new acknowledgement.
    let heard = info.tcpi_last_ack_recv.min(info.tcpi_last_data_recv);
    let silence = Duration::from_millis(u64::from(heard));
    if info.tcpi_unacked > 0 && silence >= silence_bound {
        return Some(format!(
            "no acknowledgement for {} s with {} segment(s) unacknowledged: the peer is gone",
            silence.as_secs(),
            info.tcpi_unacked
        ));
    }
    if info.tcpi_notsent_bytes > 0 && u32::from(info.tcpi_probes) >= probes.max(3) {
        return Some(format!(
            "{} window probes unanswered with {} bytes waiting: the peer is gone",
            info.tcpi_probes, info.tcpi_notsent_bytes
        ));
    }
    None
}

/// Connections waiting in `listener`'s accept queue: TCP_INFO's `tcpi_unacked` holds the queue's
/// length for a listening socket (Linux 2.6.18 on, so Ubuntu 18.04's 4.15 too).
pub fn accept_queue_len(listener: &impl AsRawFd) -> io::Result<u32> {
    tcp_info(listener).map(|info| info.tcpi_unacked)
}

/// Bytes waiting in `socket`'s receive queue (FIONREAD). A received FIN is not counted.
pub fn unread_bytes(socket: &impl AsRawFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer, which points at a live c_int.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::FIONREAD as _, &mut n) };
    if rc == 0 {
        Ok(n.max(0) as usize)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The ioctl that asks whether a socket's read position is at the urgent mark
/// (asm-generic/sockios.h); the libc crate does not name it.
const SIOCATMARK: u32 = 0x8905;

/// Whether the next byte to read from `socket` is TCP's urgent mark (SIOCATMARK). The kernel
/// stops every read and splice there: a read that ends short at the mark has not drained the
/// socket, and a splice there returns EAGAIN (or 0, when a FIN follows) though bytes remain.
pub fn at_urgent_mark(socket: &impl AsRawFd) -> bool {
    let mut at: libc::c_int = 0;
    // SAFETY: SIOCATMARK writes one int through the pointer, which points at a live c_int.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), SIOCATMARK as _, &mut at) };
    rc == 0 && at != 0
}

/// Shuts down the write side of `socket`: the peer gets a FIN once what is queued has gone.
pub fn shutdown_write(socket: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    SockRef::from(&socket).shutdown(std::net::Shutdown::Write)
}

/// Closes `stream` with a reset (SO_LINGER 0) instead of a FIN: the peer learns at once that the
/// connection is refused or was broken, rather than seeing an orderly end of data.
pub fn reset<S: std::os::fd::AsFd>(stream: S) {
    let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// Resets both sockets of a relayed connection: one that cannot go on is cut where it stood,
/// and must never end with a FIN a peer could take for a complete stream (bytes may have been
/// on their way). The one way a parked or moved connection is given up.
pub fn reset_both<A: std::os::fd::AsFd, B: std::os::fd::AsFd>(client: A, upstream: B) {
    reset(client);
    reset(upstream);
}

/// What [`AcceptLoop::next`] returns: a connection, or the control future's output (a reload, a
/// stop) for the caller to act on.
#[derive(Debug)]
pub enum Next<T> {
    /// A connection to admit, with its peer.
    Connection(TcpStream, SocketAddr),
    /// The control future completed.
    Control(T),
}

/// The one accept loop of every listener (each route's and the health endpoint's): accepts, and
/// after a failure that concerns the listener (EMFILE, ENFILE, ENOMEM) pauses with a growing
/// back-off instead of spinning, while the caller's control future (settings changed, stop)
/// stays live in the same select, pause or not.
#[derive(Debug)]
pub struct AcceptLoop {
    listener: tokio::net::TcpListener,
    name: String,
    backoff: AcceptBackoff,
    resume_at: Option<tokio::time::Instant>,
    failures: u64,
}

impl AcceptLoop {
    /// An accept loop on `listener`, named `name` in its log lines (a route's name, "health").
    pub fn new(listener: tokio::net::TcpListener, name: &str) -> Self {
        AcceptLoop {
            listener,
            name: name.to_string(),
            backoff: AcceptBackoff::default(),
            resume_at: None,
            failures: 0,
        }
    }

    /// The listening socket (for its address and options).
    pub fn listener(&self) -> &tokio::net::TcpListener {
        &self.listener
    }

    /// The listening socket, out of the runtime: a live upgrade keeps it for taking the route
    /// back should the hand-over fail, when no new descriptor may be had.
    pub fn into_listener(self) -> Option<std::net::TcpListener> {
        self.listener.into_std().ok()
    }

    /// Accept failures that paused the loop since the last call, for the caller's counter.
    pub fn take_failures(&mut self) -> u64 {
        std::mem::take(&mut self.failures)
    }

    /// Waits for the next connection or for `control`, whichever comes first.
    pub async fn next<T>(&mut self, control: impl Future<Output = T>) -> Next<T> {
        tokio::pin!(control);
        loop {
            let paused = self.resume_at;
            tokio::select! {
                out = &mut control => return Next::Control(out),
                accepted = self.listener.accept(), if paused.is_none() => match accepted {
                    Ok((stream, peer)) => {
                        self.backoff.recovered(&self.name);
                        return Next::Connection(stream, peer);
                    }
                    Err(e) => {
                        let pause = self.backoff.failed(&self.name, &e);
                        if !pause.is_zero() {
                            self.failures += 1;
                            self.resume_at = Some(tokio::time::Instant::now() + pause);
                        }
                    }
                },
                _ = tokio::time::sleep_until(paused.unwrap_or_else(tokio::time::Instant::now)), if paused.is_some() => {
                    self.resume_at = None;
                }
            }
        }
    }
}

/// Accept failures that last until descriptors or memory are freed elsewhere: pause and retry,
/// logging once when it starts and once when it ends.
#[derive(Debug, Default)]
struct AcceptBackoff {
    failures: u64,
    since: Option<Instant>,
    pause: Duration,
}

impl AcceptBackoff {
    /// Notes a failed accept on `route`; returns how long to pause after `e` (zero for errors that concern one connection only).
    fn failed(&mut self, route: &str, e: &io::Error) -> Duration {
        let per_connection = matches!(
            e.kind(),
            io::ErrorKind::ConnectionAborted
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::PermissionDenied
        ) || e.raw_os_error() == Some(libc::EPROTO);
        if per_connection {
            tracing::debug!(route, error = %e, "accept failed for one connection");
            return Duration::ZERO;
        }
        if self.failures == 0 {
            self.since = Some(Instant::now());
            tracing::warn!(route, error = %e, "accept failing; pausing accepts until it recovers (connections wait in the backlog)");
        }
        self.failures += 1;
        self.pause = (self.pause * 2).clamp(ACCEPT_PAUSE_MIN, ACCEPT_PAUSE_MAX);
        self.pause
    }

    /// Notes a successful accept; logs the end of a failure episode.
    fn recovered(&mut self, route: &str) {
        if self.failures > 0 {
            let lasted = self.since.map(|s| s.elapsed()).unwrap_or_default();
            tracing::info!(
                route,
                failed_accepts = self.failures,
                lasted_ms = lasted.as_millis() as u64,
                "accepting again"
            );
            *self = AcceptBackoff::default();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ferryd relies on Linux copying TCP_NODELAY and the keepalive settings from a listening
    /// socket into each socket it accepts; this checks it on the running kernel.
    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay_and_keepalive() {
        let listener =
            tokio::net::TcpListener::from_std(listen("127.0.0.1:0".parse().unwrap()).unwrap()).unwrap();
        let keepalive = Keepalive {
            time: Duration::from_secs(45),
            interval: Duration::from_secs(7),
            probes: 3,
        };
        tune_listener(&listener, &keepalive);
        let addr = listener.local_addr().unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let sock = SockRef::from(&accepted);
        assert!(sock.tcp_nodelay().unwrap());
        assert!(sock.out_of_band_inline().unwrap());
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(45));
        assert_eq!(sock.tcp_keepalive_interval().unwrap(), Duration::from_secs(7));
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), 3);
    }
}
