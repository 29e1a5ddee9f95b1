//! `--listing`: what reading `/connections` costs the relay while thousands of connections are
//! open. ferryd holds `count` idle relayed connections; one connection ping-pongs single bytes
//! through it, in rounds without and with a client listing `/connections` back to back on the
//! health endpoint meanwhile. Prints the listing's time and size and the ping-pong's p50 and
//! p99 for both; writes nothing. ferryd runs on one core, its health endpoint's thread beside
//! its relay worker, as on the 1-vCPU proxy VM. Each round also runs a control: the same
//! client reading a body of the same size from a stand-in process beside ferryd (python3, idle
//! class), which is what moving those bytes costs the ping-pong without ferryd building them.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::contenders::{Kind, start};
use crate::load::{percentile, ping_pong};
use crate::procfs::{pin, thread_schedstat};

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

/// A latency measurement: (p50, p99) in microseconds.
type Load<'a> = dyn Fn() -> (f64, f64) + Sync + 'a;

/// Round trips of one byte every `every` (a person typing fast, not a saturating stream):
/// (p50, p99) in microseconds.
fn paced_ping_pong(target: SocketAddr, trips: usize, every: Duration) -> (f64, f64) {
    let mut s = TcpStream::connect(target).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    s.write_all(b"E").expect("mode");
    let mut samples = Vec::with_capacity(trips);
    let mut byte = [0u8; 1];
    let mut next = Instant::now();
    for _ in 0..trips {
        next += every;
        let started = Instant::now();
        s.write_all(b"x").expect("write");
        s.read_exact(&mut byte).expect("read");
        samples.push(started.elapsed().as_secs_f64() * 1e6);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    (percentile(&samples, 50.0), percentile(&samples, 99.0))
}

/// What ferryd's listing thread did while the load ran with listings: milliseconds on the CPU
/// and milliseconds runnable but waiting for it (the idle class waits whenever anything else on
/// the core has work).
#[derive(Clone, Copy, Default)]
struct ListingThread {
    on_cpu_ms: f64,
    waiting_ms: f64,
}

/// Runs `load` twice, alone and while another thread lists /connections back to back: the
/// load's (p50, p99) each time, the listing times (ms) and what ferryd's listing thread did.
fn with_and_without_listing(
    ferryd: u32,
    source: SocketAddr,
    load: &Load<'_>,
) -> ((f64, f64), (f64, f64), Vec<f64>, ListingThread) {
    let quiet = load();
    let before = thread_schedstat(ferryd, "ferryd-listing").unwrap_or_default();
    let stop = AtomicBool::new(false);
    let (busy, times) = std::thread::scope(|scope| {
        let lister = scope.spawn(|| {
            // This program's own lister shares CPU 1 with the ping-pong client and the upstream:
            // in the idle class it cannot delay them, so what moves the ping-pong is ferryd.
            // SAFETY: all zeros is a valid sched_param; pid 0 is this thread.
            let param: libc::sched_param = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
            let mut times = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Ok((t, _)) = list_once(source) {
                    times.push(t * 1e3);
                }
            }
            times
        });
        let busy = load();
        stop.store(true, Ordering::Relaxed);
        (busy, lister.join().expect("lister"))
    });
    let after = thread_schedstat(ferryd, "ferryd-listing").unwrap_or_default();
    let thread = ListingThread {
        on_cpu_ms: after.0.saturating_sub(before.0) as f64 / 1e6,
        waiting_ms: after.1.saturating_sub(before.1) as f64 / 1e6,
    };
    (quiet, busy, times, thread)
}

/// The control: a process that is not ferryd, beside it on CPU 0 in the idle class, answering
/// every GET with a body as large as ferryd's listing, in the pieces ferryd writes (16 KiB).
/// Listed from instead of ferryd, it shows what moving that many bytes through loopback to the
/// measuring client costs the ping-pong by itself, so that what is left is ferryd's.
struct StandIn {
    child: std::process::Child,
    addr: SocketAddr,
}

impl Drop for StandIn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const STAND_IN: &str = r#"
import os, socket, sys, threading
os.sched_setaffinity(0, {0})
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
body = b"x" * int(sys.argv[1])
head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(64)
print(server.getsockname()[1], flush=True)
def answer(conn):
    try:
        conn.recv(4096)
        conn.sendall(head)
        for i in range(0, len(body), 16384):
            conn.sendall(body[i:i + 16384])
    except OSError:
        pass
    conn.close()
while True:
    conn, _ = server.accept()
    threading.Thread(target=answer, args=(conn,), daemon=True).start()
"#;

fn stand_in(body: usize) -> Option<StandIn> {
    use std::io::BufRead;
    let mut child = std::process::Command::new("python3")
        .args(["-c", STAND_IN, &body.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take()?)
        .read_line(&mut line)
        .ok()?;
    let port: u16 = line.trim().parse().ok()?;
    Some(StandIn {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
    })
}

pub(crate) fn run(upstream: SocketAddr, held: &AtomicUsize, count: usize, rounds: usize, trips: usize) {
    let Some(proxy) = start(Kind::Ferryd, upstream, false) else {
        eprintln!("ferryd did not start");
        return;
    };
    let Some(health) = proxy.health else {
        return;
    };
    let Some(ferryd) = proxy.child.as_ref().map(|child| child.id()) else {
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
    let control = if pinned { stand_in(body) } else { None };
    if pinned && control.is_none() {
        eprintln!("no control: python3 could not start the stand-in");
    }
    let mut alone: Vec<f64> = (0..10)
        .map(|_| list_once(health).expect("list").0 * 1e3)
        .collect();
    alone.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{count} idle connections; a listing ({body} bytes) with the relay otherwise idle: {:.1} ms p50, {:.1} ms max",
        percentile(&alone, 50.0),
        alone[alone.len() - 1]
    );
    let loads: [(&str, &Load<'_>); 2] = [
        ("back-to-back ping-pong (saturates ferryd's core)", &|| {
            ping_pong(proxy.listen, trips)
        }),
        ("paced ping-pong, one trip a millisecond", &|| {
            paced_ping_pong(proxy.listen, trips / 4, Duration::from_millis(1))
        }),
    ];
    for (name, load) in loads {
        let (mut q50, mut q99, mut b50, mut b99, mut lists) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut building, mut waiting) = (Vec::new(), Vec::new());
        let (mut c99, mut r99) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            let (quiet, busy, times, thread) = with_and_without_listing(ferryd, health, load);
            if let Some(control) = &control {
                let (alone, reading, reads, _) = with_and_without_listing(ferryd, control.addr, load);
                eprintln!(
                    "{name}, round {}, control (the same bytes read from a stand-in, not ferryd): p50/p99 {:.1}/{:.1} µs quiet, {:.1}/{:.1} µs while reading ({} reads)",
                    round + 1,
                    alone.0,
                    alone.1,
                    reading.0,
                    reading.1,
                    reads.len()
                );
                if reads.is_empty() {
                    eprintln!("the stand-in answered nothing: this round's control is a second quiet run");
                }
                c99.push(alone.1);
                r99.push(reading.1);
            }
            eprintln!(
                "{name}, round {}: p50/p99 {:.1}/{:.1} µs quiet, {:.1}/{:.1} µs while listing ({} listings; ferryd's listing thread {:.1} ms on the CPU, {:.1} ms waiting for it)",
                round + 1,
                quiet.0,
                quiet.1,
                busy.0,
                busy.1,
                times.len(),
                thread.on_cpu_ms,
                thread.waiting_ms
            );
            building.push(thread.on_cpu_ms / times.len().max(1) as f64);
            waiting.push(thread.waiting_ms / times.len().max(1) as f64);
            q50.push(quiet.0);
            q99.push(quiet.1);
            b50.push(busy.0);
            b99.push(busy.1);
            lists.extend(times);
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(|a, b| a.total_cmp(b));
            percentile(v, 50.0)
        };
        lists.sort_by(|a, b| a.total_cmp(b));
        println!(
            "{name} (median of {rounds} rounds): p50 {:.1} µs quiet vs {:.1} µs while listing; p99 {:.1} µs quiet vs {:.1} µs while listing; meanwhile {} listings took {:.1} ms p50, {:.1} ms max, of which ferryd's listing thread spent {:.1} ms on the CPU and {:.1} ms waiting for it (per listing)",
            median(&mut q50),
            median(&mut b50),
            median(&mut q99),
            median(&mut b99),
            lists.len(),
            percentile(&lists, 50.0),
            lists.last().copied().unwrap_or(0.0),
            median(&mut building),
            median(&mut waiting)
        );
        if !c99.is_empty() {
            println!(
                "{name}, control (median of {rounds} rounds): p99 {:.1} µs quiet vs {:.1} µs while a client reads the same bytes from a stand-in beside ferryd",
                median(&mut c99),
                median(&mut r99)
            );
        }
    }
    drop(idle);
}
