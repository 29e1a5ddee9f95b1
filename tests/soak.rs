//! Soak: thousands of connections through one ferryd, each with a randomly chosen pattern
//! (client-first bulk, SSH-like server-first banner, half-close from either side, resets from
//! either side mid-transfer, a slow reader, idle pauses), while SIGHUP reloads arrive every
//! 100 ms. Orderly connections must be byte-exact both ways, resets must reach the other side
//! within a bound, nothing may hang, and afterwards ferryd's descriptors and memory must be back
//! near where they started.
//!
//! Quick mode (the default, about 20 s) runs in CI. `FERRYD_SOAK_SECS=3600 cargo test --release
//! --test soak -- --nocapture` runs it for an hour; `FERRYD_SOAK_SEED=N` replays a run.

mod common;

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

/// How long a reset may take to reach the other side.
const RESET_BOUND: Duration = Duration::from_secs(5);
/// No read may block longer than this: a connection that hangs fails the test.
const HANG_BOUND: Duration = Duration::from_secs(30);

/// One shared pseudo-random block; a connection's stream starts at an offset chosen by its seed.
fn block() -> &'static [u8] {
    static BLOCK: OnceLock<Vec<u8>> = OnceLock::new();
    BLOCK.get_or_init(|| {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..(1 << 20) + 13)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect()
    })
}

fn send_pattern(stream: &mut impl Write, seed: u32, len: usize) -> std::io::Result<()> {
    let b = block();
    let mut at = seed as usize % b.len();
    let mut left = len;
    while left > 0 {
        let n = left.min(b.len() - at).min(64 * 1024);
        stream.write_all(&b[at..at + n])?;
        at = (at + n) % b.len();
        left -= n;
    }
    Ok(())
}

/// Reads exactly `len` bytes (then expects EOF when `then_eof`), comparing with the pattern.
fn expect_pattern(
    stream: &mut impl Read,
    seed: u32,
    len: usize,
    then_eof: bool,
    slow: bool,
) -> Result<(), String> {
    let b = block();
    let mut at = seed as usize % b.len();
    let mut got = 0;
    let mut buf = vec![0u8; if slow { 512 } else { 64 * 1024 }];
    while got < len {
        let want = (len - got).min(buf.len());
        let n = stream
            .read(&mut buf[..want])
            .map_err(|e| format!("read after {got}/{len} bytes: {e}"))?;
        if n == 0 {
            return Err(format!("EOF after {got} of {len} bytes"));
        }
        let mut i = 0;
        while i < n {
            let m = (n - i).min(b.len() - at);
            if buf[i..i + m] != b[at..at + m] {
                return Err(format!("corrupted bytes within {got}..{}", got + n));
            }
            at = (at + m) % b.len();
            i += m;
        }
        got += n;
        if slow {
            std::thread::sleep(Duration::from_micros(300));
        }
    }
    if then_eof {
        match stream.read(&mut buf[..1]) {
            Ok(0) => {}
            Ok(_) => return Err("more bytes than sent".into()),
            Err(e) => return Err(format!("expected EOF, got {e}")),
        }
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Pattern {
    /// Client streams, upstream echoes concurrently; client half-closes; both byte-exact.
    Bulk,
    /// Upstream speaks first (SSH-like banner), then echo.
    Banner,
    /// Client sends and half-closes; upstream answers only after EOF.
    ClientFin,
    /// Upstream sends and half-closes; client answers only after EOF.
    UpstreamFin,
    /// Client resets mid-transfer: upstream must see a reset.
    ClientReset,
    /// Upstream resets mid-transfer: client must see a reset.
    UpstreamReset,
    /// Upstream sends a lot; client reads slowly (backpressure through the relay).
    SlowReader,
    /// Quiet pauses between small exchanges.
    Pauses,
}

const PATTERNS: [Pattern; 8] = [
    Pattern::Bulk,
    Pattern::Banner,
    Pattern::ClientFin,
    Pattern::UpstreamFin,
    Pattern::ClientReset,
    Pattern::UpstreamReset,
    Pattern::SlowReader,
    Pattern::Pauses,
];

impl Pattern {
    fn code(self) -> u8 {
        PATTERNS.iter().position(|p| *p == self).unwrap_or(0) as u8
    }
}

/// What the upstream side found, by connection id.
type Verdicts = Arc<Mutex<HashMap<u64, Result<(), String>>>>;

/// The upstream: server-first for Banner (it always writes a banner line first), otherwise
/// client-first with a 13-byte header: pattern, connection id (u64), seed (u32).
fn start_upstream(verdicts: Verdicts) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let verdicts = verdicts.clone();
            std::thread::spawn(move || upstream_conn(stream, verdicts));
        }
    });
    addr
}

fn upstream_conn(mut s: TcpStream, verdicts: Verdicts) {
    let _ = s.set_read_timeout(Some(HANG_BOUND));
    // Every connection gets the banner first (server speaks first, like sshd); clients that are
    // not Banner simply read it before their own protocol.
    if s.write_all(b"SSH-2.0-soak\r\n").is_err() {
        return;
    }
    let mut header = [0u8; 13];
    if s.read_exact(&mut header).is_err() {
        return;
    }
    let pattern = PATTERNS[header[0] as usize % PATTERNS.len()];
    let id = u64::from_be_bytes(header[1..9].try_into().unwrap_or_default());
    let seed = u32::from_be_bytes(header[9..13].try_into().unwrap_or_default());
    let len = size_for(seed);
    let verdict: Result<(), String> = match pattern {
        Pattern::Bulk | Pattern::Banner | Pattern::Pauses => {
            // Echo until EOF, then close.
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break Ok(()),
                    Ok(n) => {
                        if let Err(e) = s.write_all(&buf[..n]) {
                            break Err(format!("echo write: {e}"));
                        }
                    }
                    Err(e) => break Err(format!("echo read: {e}")),
                }
            }
        }
        Pattern::ClientFin => expect_pattern(&mut s, seed, len, true, false)
            .and_then(|()| send_pattern(&mut s, seed.wrapping_add(7), len).map_err(|e| e.to_string())),
        Pattern::UpstreamFin => send_pattern(&mut s, seed, len)
            .map_err(|e| e.to_string())
            .and_then(|()| s.shutdown(Shutdown::Write).map_err(|e| e.to_string()))
            .and_then(|()| expect_pattern(&mut s, seed.wrapping_add(7), len, true, false)),
        Pattern::ClientReset => {
            // Read until the reset arrives; it must be a reset, not an orderly EOF.
            let _ = s.set_read_timeout(Some(RESET_BOUND));
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break Err("client reset arrived as an orderly EOF".to_string()),
                    Ok(_) => continue,
                    Err(e) if e.kind() == ErrorKind::ConnectionReset => break Ok(()),
                    Err(e) => break Err(format!("waiting for the client's reset: {e}")),
                }
            }
        }
        Pattern::UpstreamReset => {
            let _ = send_pattern(&mut s, seed, len / 2);
            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
            drop(s);
            Ok(())
        }
        Pattern::SlowReader => send_pattern(&mut s, seed, 4 * len).map_err(|e| e.to_string()),
    };
    verdicts.lock().unwrap().insert(id, verdict);
}

/// Transfer sizes from a few bytes to 256 KiB.
fn size_for(seed: u32) -> usize {
    match seed % 4 {
        0 => 1 + seed as usize % 64,
        1 => 1 + seed as usize % 4096,
        2 => 1 + seed as usize % 65536,
        _ => 1 + seed as usize % (256 * 1024),
    }
}

/// Runs one connection of `pattern`; Err describes what went wrong on the client side.
fn client_conn(target: SocketAddr, pattern: Pattern, id: u64, seed: u32) -> Result<(), String> {
    let mut s = TcpStream::connect(target).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(HANG_BOUND)).map_err(|e| e.to_string())?;
    let mut banner = [0u8; 14];
    s.read_exact(&mut banner).map_err(|e| format!("banner: {e}"))?;
    if &banner != b"SSH-2.0-soak\r\n" {
        return Err("wrong banner".into());
    }
    let mut header = [0u8; 13];
    header[0] = pattern.code();
    header[1..9].copy_from_slice(&id.to_be_bytes());
    header[9..13].copy_from_slice(&seed.to_be_bytes());
    s.write_all(&header).map_err(|e| format!("header: {e}"))?;
    let len = size_for(seed);
    match pattern {
        Pattern::Bulk | Pattern::Banner => {
            let mut reader = s.try_clone().map_err(|e| e.to_string())?;
            let check = std::thread::spawn(move || expect_pattern(&mut reader, seed, len, true, false));
            send_pattern(&mut s, seed, len).map_err(|e| format!("send: {e}"))?;
            s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
            check.join().map_err(|_| "reader panicked".to_string())?
        }
        Pattern::Pauses => {
            for round in 0..3u32 {
                std::thread::sleep(Duration::from_millis(50 + (seed % 100) as u64));
                let piece = 1 + (seed.wrapping_add(round) % 512) as usize;
                send_pattern(&mut s, seed.wrapping_add(round), piece).map_err(|e| e.to_string())?;
                expect_pattern(&mut s, seed.wrapping_add(round), piece, false, false)?;
            }
            s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
            expect_pattern(&mut s, 0, 0, true, false)
        }
        Pattern::ClientFin => {
            send_pattern(&mut s, seed, len).map_err(|e| e.to_string())?;
            s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
            expect_pattern(&mut s, seed.wrapping_add(7), len, true, false)
        }
        Pattern::UpstreamFin => {
            expect_pattern(&mut s, seed, len, true, false)?;
            send_pattern(&mut s, seed.wrapping_add(7), len).map_err(|e| e.to_string())?;
            s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
            expect_pattern(&mut s, 0, 0, true, false)
        }
        Pattern::ClientReset => {
            let _ = send_pattern(&mut s, seed, len / 2 + 1);
            socket2::SockRef::from(&s)
                .set_linger(Some(Duration::ZERO))
                .map_err(|e| e.to_string())?;
            drop(s);
            Ok(())
        }
        Pattern::UpstreamReset => {
            s.set_read_timeout(Some(RESET_BOUND)).map_err(|e| e.to_string())?;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => return Err("upstream reset arrived as an orderly EOF".into()),
                    Ok(_) => continue,
                    Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(()),
                    Err(e) => return Err(format!("waiting for the upstream's reset: {e}")),
                }
            }
        }
        Pattern::SlowReader => expect_pattern(&mut s, seed, 4 * len, true, true),
    }
}

/// xorshift, seeded, so a failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn soak_with_reloads() {
    let secs: u64 = std::env::var("FERRYD_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("FERRYD_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    eprintln!("soak: {secs}s, seed {seed} (replay with FERRYD_SOAK_SEED={seed})");

    let verdicts: Verdicts = Arc::new(Mutex::new(HashMap::new()));
    let upstream = start_upstream(verdicts.clone());
    let port = free_port();
    let config = config_one_route(port, upstream, "", "max_connections = 4096");
    let daemon = Daemon::start_with(&config, |c| {
        c.env("FERRYD_LOG", "warn");
    });
    let target = local(port);

    // Warm up (pipes pooled, runtime threads up), then take the baseline.
    for i in 0..50 {
        client_conn(target, Pattern::Bulk, u64::MAX - i, 1000 + i as u32).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let (fds_before, rss_before) = (daemon.fd_count(), rss_kib(daemon.pid()));

    let stop = Arc::new(AtomicBool::new(false));
    let reloads = Arc::new(AtomicU64::new(0));
    let reloader = {
        let stop = stop.clone();
        let reloads = reloads.clone();
        let pid = daemon.pid();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGHUP);
                reloads.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    let deadline = Instant::now() + Duration::from_secs(secs);
    let next_id = Arc::new(AtomicU64::new(0));
    let failures: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let counts: Arc<Mutex<HashMap<Pattern, u64>>> = Arc::new(Mutex::new(HashMap::new()));
    let clients: Vec<_> = (0..16u64)
        .map(|t| {
            let (next_id, failures, counts, verdicts) = (
                next_id.clone(),
                failures.clone(),
                counts.clone(),
                verdicts.clone(),
            );
            std::thread::spawn(move || {
                let mut rng = Rng(seed ^ (t + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
                while Instant::now() < deadline {
                    let pattern = PATTERNS[(rng.next() % PATTERNS.len() as u64) as usize];
                    let conn_seed = rng.next() as u32;
                    let id = next_id.fetch_add(1, Ordering::Relaxed);
                    let started = Instant::now();
                    let result = client_conn(target, pattern, id, conn_seed);
                    // The upstream's view of the same connection.
                    let upstream_view = loop {
                        if let Some(v) = verdicts.lock().unwrap().remove(&id) {
                            break v;
                        }
                        if started.elapsed() > HANG_BOUND {
                            break Err("the upstream never finished".into());
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    };
                    for (side, r) in [("client", result), ("upstream", upstream_view)] {
                        if let Err(e) = r {
                            failures
                                .lock()
                                .unwrap()
                                .push(format!("{pattern:?} id {id} seed {conn_seed}: {side}: {e}"));
                        }
                    }
                    *counts.lock().unwrap().entry(pattern).or_default() += 1;
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    reloader.join().unwrap();

    std::thread::sleep(Duration::from_secs(1));
    let (fds_after, rss_after) = (daemon.fd_count(), rss_kib(daemon.pid()));
    let total: u64 = counts.lock().unwrap().values().sum();
    let report = format!(
        "soak: {total} connections in {secs}s ({:?}), {} reloads; fds {fds_before} -> {fds_after}; RSS {rss_before} -> {rss_after} KiB; seed {seed}",
        counts.lock().unwrap(),
        reloads.load(Ordering::Relaxed)
    );
    eprintln!("{report}");
    let _ = std::fs::write(
        concat!(env!("CARGO_MANIFEST_DIR"), "/target/soak-report.txt"),
        &report,
    );

    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} failures (seed {seed}):\n{}",
        failures.len(),
        failures.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
    assert!(total >= 500, "too few connections for a soak: {report}");
    assert!(daemon.log_lines("reload rejected").is_empty());
    // Descriptors: back to the baseline, give or take pooled pipes (at most 32, two fds each).
    assert!(fds_after <= fds_before + 64, "descriptors leaked: {report}");
    assert!(
        rss_after <= rss_before + 16 * 1024,
        "memory grew by more than 16 MiB: {report}"
    );
    let stats = daemon.health_request("GET /status HTTP/1.0\r\n\r\n").unwrap();
    assert!(
        stats.contains("\"live\":0"),
        "connections still counted live: {stats}"
    );
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}
