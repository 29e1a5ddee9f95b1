//! The loads: bulk streams, ping-pong round trips, connection rate, and idle connections for the
//! footprint.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::contenders::Proxy;
use crate::procfs::{fds, rss_kib};

/// Sends `total` bytes over `streams` parallel connections into the sink; returns seconds.
pub(crate) fn bulk(target: SocketAddr, total: u64, streams: usize) -> f64 {
    let block = vec![0x5au8; 256 * 1024];
    let per = total / streams as u64;
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..streams {
            let block = &block;
            scope.spawn(move || {
                let mut s = TcpStream::connect(target).expect("connect");
                s.write_all(b"S").expect("write");
                let mut left = per;
                while left > 0 {
                    let n = left.min(block.len() as u64) as usize;
                    s.write_all(&block[..n]).expect("write");
                    left -= n as u64;
                }
                s.shutdown(Shutdown::Write).expect("shutdown");
                let mut done = [0u8; 4];
                s.read_exact(&mut done)
                    .expect("the sink confirms it read everything");
            });
        }
    });
    started.elapsed().as_secs_f64()
}

/// One stream paced at `bits_per_second` for `seconds` into the sink; returns the seconds it
/// took (the sink's confirmation included).
pub(crate) fn paced(target: SocketAddr, bits_per_second: f64, seconds: f64) -> f64 {
    const CHUNK: usize = 64 * 1024;
    let block = vec![0x5au8; CHUNK];
    let total = (bits_per_second / 8.0 * seconds) as u64;
    let started = Instant::now();
    let mut s = TcpStream::connect(target).expect("connect");
    s.write_all(b"S").expect("write");
    let mut sent = 0u64;
    while sent < total {
        let n = (total - sent).min(CHUNK as u64) as usize;
        s.write_all(&block[..n]).expect("write");
        sent += n as u64;
        let due = Duration::from_secs_f64(sent as f64 * 8.0 / bits_per_second);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    s.shutdown(Shutdown::Write).expect("shutdown");
    let mut done = [0u8; 4];
    s.read_exact(&mut done)
        .expect("the sink confirms it read everything");
    started.elapsed().as_secs_f64()
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// 1-byte request/response round trips on one connection: (p50, p99) in microseconds.
pub(crate) fn ping_pong(target: SocketAddr, trips: usize) -> (f64, f64) {
    let mut s = TcpStream::connect(target).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    s.write_all(b"E").expect("mode");
    let mut samples = Vec::with_capacity(trips);
    let mut byte = [0u8; 1];
    for i in 0..trips + 100 {
        let started = Instant::now();
        s.write_all(b"x").expect("write");
        s.read_exact(&mut byte).expect("read");
        if i >= 100 {
            samples.push(started.elapsed().as_secs_f64() * 1e6);
        }
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    (percentile(&samples, 50.0), percentile(&samples, 99.0))
}

/// Request/response exchanges of `size` bytes each way, one at a time on one connection (a WinRM
/// envelope and its answer, an SSH command and its output): the whole request is written, then
/// the whole response read. (p50, p99) in microseconds, from the request's first byte to the
/// response's last.
pub(crate) fn request_response(target: SocketAddr, size: usize, exchanges: usize) -> (f64, f64) {
    let mut s = TcpStream::connect(target).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    s.write_all(b"R").expect("mode");
    let mut request = (size as u32).to_be_bytes().to_vec();
    request.extend(std::iter::repeat_n(0x5au8, size));
    let mut response = vec![0u8; size];
    let warm_up = (exchanges / 10).max(5);
    let mut samples = Vec::with_capacity(exchanges);
    for i in 0..exchanges + warm_up {
        let started = Instant::now();
        s.write_all(&request).expect("write");
        s.read_exact(&mut response).expect("read");
        if i >= warm_up {
            samples.push(started.elapsed().as_secs_f64() * 1e6);
        }
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    (percentile(&samples, 50.0), percentile(&samples, 99.0))
}

/// Connect, one small message each way, close; 4 clients in parallel. Returns (connections per
/// second, p99 setup time in microseconds: connect until the echo is back, upstream dial
/// included).
pub(crate) fn connection_rate(target: SocketAddr, total: usize) -> (f64, f64) {
    const CLIENTS: usize = 4;
    let started = Instant::now();
    let mut samples: Vec<f64> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|_| {
                scope.spawn(move || {
                    let mut times = Vec::new();
                    for _ in 0..total / CLIENTS {
                        let t = Instant::now();
                        let mut s = TcpStream::connect(target).expect("connect");
                        s.write_all(b"Ehello").expect("write");
                        let mut back = [0u8; 5];
                        s.read_exact(&mut back).expect("read");
                        times.push(t.elapsed().as_secs_f64() * 1e6);
                    }
                    times
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("client"))
            .collect()
    });
    let rate = samples.len() as f64 / started.elapsed().as_secs_f64();
    samples.sort_by(|a, b| a.total_cmp(b));
    (rate, percentile(&samples, 99.0))
}

/// Idle RSS, then RSS and fds with `count` idle relayed connections: (idle KiB, KiB per
/// connection, fds per connection, pipe fds held).
pub(crate) fn footprint(proxy: &Proxy, count: usize, held: &AtomicUsize) -> Option<(f64, f64, f64, usize)> {
    proxy.child.as_ref()?;
    let idle_rss = rss_kib(proxy) as f64;
    let (idle_fds, _) = fds(proxy);
    let base_held = held.load(Ordering::SeqCst);
    let mut conns = Vec::with_capacity(count);
    for _ in 0..count {
        let mut s = TcpStream::connect(proxy.listen).ok()?;
        s.write_all(b"H").ok()?;
        conns.push(s);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while held.load(Ordering::SeqCst) < base_held + count {
        if Instant::now() > deadline {
            eprintln!(
                "{}: only {} of {count} connections reached the upstream",
                proxy.kind.name(),
                held.load(Ordering::SeqCst) - base_held
            );
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let rss = rss_kib(proxy) as f64;
    let (all_fds, pipe_fds) = fds(proxy);
    drop(conns);
    let deadline = Instant::now() + Duration::from_secs(30);
    while held.load(Ordering::SeqCst) > base_held && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    Some((
        idle_rss,
        (rss - idle_rss) / count as f64,
        (all_fds as f64 - idle_fds as f64) / count as f64,
        pipe_fds,
    ))
}
