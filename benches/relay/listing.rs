//! `--listing`: what reading `/connections` costs the relay while thousands of connections are
//! open. ferryd holds `count` idle relayed connections; one connection ping-pongs single bytes
//! through it, in rounds without and with a client listing `/connections` back to back on the
//! health endpoint meanwhile. Prints the listing's time and size and the ping-pong's p50 and
//! p99 for both; writes nothing. ferryd runs on one core, its health endpoint's thread beside
//! its relay worker, as on the 1-vCPU proxy VM.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::contenders::{Kind, start};
use crate::load::{percentile, ping_pong};
use crate::procfs::pin;

/// One GET of `/connections`: (seconds from connect to the last byte, body bytes).
fn list_once(health: SocketAddr) -> std::io::Result<(f64, usize)> {
    let started = Instant::now();
    let mut s = TcpStream::connect(health)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET /connections HTTP/1.0\r\n\r\n")?;
    let mut response = Vec::new();
    s.read_to_end(&mut response)?;
    let body = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(0, |head| response.len() - head - 4);
    Ok((started.elapsed().as_secs_f64(), body))
}

pub(crate) fn run(upstream: SocketAddr, held: &AtomicUsize, count: usize, rounds: usize, trips: usize) {
    let Some(proxy) = start(Kind::Ferryd, upstream) else {
        eprintln!("ferryd did not start");
        return;
    };
    let Some(health) = proxy.health else {
        return;
    };
    // The proxy VM's shape: ferryd (relay and health endpoint threads alike) on one core, this
    // program (ping-pong, lister, upstream) on the other.
    let pinned = proxy
        .child
        .as_ref()
        .is_some_and(|child| pin(child.id(), "0") && pin(std::process::id(), "1"));
    eprintln!(
        "{}",
        if pinned {
            "ferryd pinned to CPU 0, the load to CPU 1"
        } else {
            "not pinned (needs 2 CPUs and taskset): everything shares the machine"
        }
    );
    let base = held.load(Ordering::SeqCst);
    let mut idle = Vec::with_capacity(count);
    for _ in 0..count {
        let mut s = TcpStream::connect(proxy.listen).expect("connect");
        s.write_all(b"H").expect("hold");
        idle.push(s);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while held.load(Ordering::SeqCst) < base + count {
        assert!(
            Instant::now() < deadline,
            "the idle connections did not all reach the upstream"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (_, body) = list_once(health).expect("list");
    eprintln!("{count} idle connections held; one listing is {body} bytes");

    let (mut quiet50, mut quiet99, mut busy50, mut busy99, mut lists) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let (p50, p99) = ping_pong(proxy.listen, trips);
        quiet50.push(p50);
        quiet99.push(p99);
        let stop = AtomicBool::new(false);
        let (p50, p99, times) = std::thread::scope(|scope| {
            let lister = scope.spawn(|| {
                let mut times = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((t, _)) = list_once(health) {
                        times.push(t * 1e3);
                    }
                }
                times
            });
            let (p50, p99) = ping_pong(proxy.listen, trips);
            stop.store(true, Ordering::Relaxed);
            (p50, p99, lister.join().expect("lister"))
        });
        busy50.push(p50);
        busy99.push(p99);
        eprintln!(
            "round {}: ping-pong p50/p99 {:.1}/{:.1} µs quiet, {:.1}/{:.1} µs while listing ({} listings)",
            round + 1,
            quiet50[round],
            quiet99[round],
            p50,
            p99,
            times.len()
        );
        lists.extend(times);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        percentile(v, 50.0)
    };
    lists.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{count} idle connections: listing {:.1} ms p50, {:.1} ms p99, {:.1} ms max ({} listings of {body} bytes)",
        percentile(&lists, 50.0),
        percentile(&lists, 99.0),
        lists.last().copied().unwrap_or(0.0),
        lists.len()
    );
    println!(
        "ping-pong (median of {rounds} rounds of {trips}): p50 {:.1} µs quiet vs {:.1} µs while listing; p99 {:.1} µs quiet vs {:.1} µs while listing",
        median(&mut quiet50),
        median(&mut busy50),
        median(&mut quiet99),
        median(&mut busy99)
    );
    drop(idle);
}
