//! ferryd against the relays a user would pick instead, on loopback, in one run:
//! direct (no proxy), ferryd (splice), ferryd (copy), HAProxy with and without splice, nginx
//! stream, socat.
//!
//! Every contender relays to the same upstream, which this program runs: the first byte of a
//! connection picks its behaviour (`S` sink, `E` echo, `H` hold open). Rounds are interleaved
//! (A B C ... A B C ...) and each figure is the median of the rounds, with the spread (min-max),
//! so that a noisy machine moves every contender alike.
//!
//! `cargo bench --bench relay` runs the full benchmark and rewrites the results section of
//! BENCHMARKS.md and BENCHMARKS.svg. `cargo bench --bench relay -- --smoke` runs one short round,
//! checks that every installed contender starts and moves bytes, and writes nothing.
//! It installs nothing: HAProxy, nginx (with its stream module) and socat come from the
//! distribution (README says how); a missing one is reported and left out.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The ferryd under test: this build's, or the one FERRYD_BIN names (for example the static
/// musl binary the package ships, `target/x86_64-unknown-linux-musl/release/ferryd`).
fn ferryd_bin() -> String {
    std::env::var("FERRYD_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_ferryd").to_string())
}
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// Sizes of one run.
#[derive(Clone, Copy)]
struct Plan {
    rounds: usize,
    bulk_bytes: u64,
    round_trips: usize,
    connections: usize,
    idle_connections: usize,
}

const FULL: Plan = Plan {
    // Seven rather than the minimum five: tail latency on a shared 2-core machine is noisy.
    rounds: 7,
    bulk_bytes: 2 << 30,
    round_trips: 10_000,
    connections: 1_000,
    idle_connections: 5_000,
};

const SMOKE: Plan = Plan {
    rounds: 1,
    bulk_bytes: 16 << 20,
    round_trips: 200,
    connections: 50,
    idle_connections: 50,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Direct,
    Ferryd,
    FerrydCopy,
    HaproxySplice,
    Haproxy,
    Nginx,
    Socat,
}

impl Kind {
    const ALL: [Kind; 7] = [
        Kind::Direct,
        Kind::Ferryd,
        Kind::FerrydCopy,
        Kind::HaproxySplice,
        Kind::Haproxy,
        Kind::Nginx,
        Kind::Socat,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Ferryd => "ferryd",
            Kind::FerrydCopy => "ferryd (copy)",
            Kind::HaproxySplice => "haproxy splice",
            Kind::Haproxy => "haproxy",
            Kind::Nginx => "nginx stream",
            Kind::Socat => "socat",
        }
    }
}

/// A relay under test.
struct Proxy {
    kind: Kind,
    listen: SocketAddr,
    child: Option<Child>,
    _dir: TempDir,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("ferryd-bench-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
}

fn installed(program: &str, arg: &str) -> bool {
    Command::new(program)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn nginx_stream_module() -> Option<&'static str> {
    [
        "/usr/lib/nginx/modules/ngx_stream_module.so",
        "/usr/share/nginx/modules/ngx_stream_module.so",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
}

/// Starts `kind` relaying to `upstream`; `None` when its program is not installed.
fn start(kind: Kind, upstream: SocketAddr) -> Option<Proxy> {
    let dir = TempDir::new(&format!("{kind:?}"));
    if kind == Kind::Direct {
        return Some(Proxy {
            kind,
            listen: upstream,
            child: None,
            _dir: dir,
        });
    }
    let port = free_port();
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse().ok()?;
    let mut command = match kind {
        Kind::Direct => unreachable!(),
        Kind::Ferryd | Kind::FerrydCopy => {
            let config = format!(
                "allow = [\"127.0.0.0/8\"]\nworkers = 1\nsplice = {}\nmax_connections = 20000\ndrain_timeout = \"1s\"\n\n[[route]]\nname = \"bench\"\nlisten = \"{listen}\"\nupstream = \"{upstream}\"\n\n[health]\nlisten = \"127.0.0.1:{}\"\n",
                kind == Kind::Ferryd,
                free_port()
            );
            let path = dir.0.join("ferryd.toml");
            std::fs::write(&path, config).ok()?;
            let mut c = Command::new(ferryd_bin());
            c.args(["run", "--config"]).arg(path).env("FERRYD_LOG", "warn");
            c
        }
        Kind::HaproxySplice | Kind::Haproxy => {
            if !installed("haproxy", "-v") {
                return None;
            }
            let splice = if kind == Kind::HaproxySplice {
                "    option splice-auto\n"
            } else {
                ""
            };
            let config = format!(
                "global\n    maxconn 6000\n    nbthread 1\n\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\n{splice}\nfrontend f\n    bind {listen}\n    default_backend b\n\nbackend b\n    server s {upstream}\n"
            );
            let path = dir.0.join("haproxy.cfg");
            std::fs::write(&path, config).ok()?;
            let mut c = Command::new("haproxy");
            c.args(["-db", "-f"]).arg(path);
            c
        }
        Kind::Nginx => {
            let module = nginx_stream_module()?;
            if !installed("nginx", "-v") {
                return None;
            }
            let prefix = dir.0.display().to_string();
            let config = format!(
                "load_module {module};\nworker_processes 1;\nworker_rlimit_nofile 20000;\ndaemon off;\npid {prefix}/nginx.pid;\nerror_log {prefix}/error.log;\nevents {{ worker_connections 12000; }}\nstream {{\n    server {{\n        listen {listen};\n        proxy_pass {upstream};\n        proxy_half_close on;\n    }}\n}}\n"
            );
            let path = dir.0.join("nginx.conf");
            std::fs::write(&path, config).ok()?;
            let mut c = Command::new("nginx");
            c.args(["-p", &prefix, "-c"]).arg(path);
            c
        }
        Kind::Socat => {
            if !installed("socat", "-V") {
                return None;
            }
            let mut c = Command::new("socat");
            c.arg(format!(
                "TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=1024"
            ))
            .arg(format!("TCP:{upstream}"));
            c
        }
    };
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let proxy = Proxy {
        kind,
        listen,
        child: Some(child),
        _dir: dir,
    };
    // Ready when it accepts and relays an echo.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if echo_once(listen).is_ok() {
            return Some(proxy);
        }
        if Instant::now() > deadline {
            eprintln!("{}: did not start relaying within 10 s", kind.name());
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn echo_once(target: SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect(target)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"Eping")?;
    let mut back = [0u8; 4];
    s.read_exact(&mut back)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The upstream: one listener, behaviour chosen by the first byte.

fn start_upstream(held: Arc<AtomicUsize>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            listener.set_nonblocking(true).expect("nonblocking");
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let held = held.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, held).await;
                });
            }
        });
    });
    addr
}

async fn serve(mut stream: tokio::net::TcpStream, held: Arc<AtomicUsize>) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = stream.set_nodelay(true);
    let mut first = [0u8; 1];
    if stream.read(&mut first).await? == 0 {
        return Ok(());
    }
    match first[0] {
        b'S' => {
            let mut buf = vec![0u8; 256 * 1024];
            while stream.read(&mut buf).await? > 0 {}
            stream.write_all(b"done").await?;
        }
        b'E' => {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                stream.write_all(&buf[..n]).await?;
            }
        }
        _ => {
            held.fetch_add(1, Ordering::SeqCst);
            let mut buf = [0u8; 64];
            while stream.read(&mut buf).await? > 0 {}
            held.fetch_sub(1, Ordering::SeqCst);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Measurements.

/// Process tree of `pid` (the proxy and its workers).
fn tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let parent = all[i];
        if let Ok(children) = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")) {
            all.extend(children.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
        }
        i += 1;
    }
    all
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// CPU seconds of the proxy's process tree, including waited-for children (socat's forks).
fn cpu_seconds(proxy: &Proxy) -> f64 {
    let Some(child) = &proxy.child else { return 0.0 };
    let mut ticks = 0u64;
    for pid in tree(child.id()) {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else { continue };
        let fields: Vec<u64> = stat[close + 2..]
            .split_whitespace()
            .filter_map(|f| f.parse().ok())
            .collect();
        // After the state field: utime, stime, cutime, cstime are fields 14-17 of stat.
        if fields.len() > 14 {
            ticks += fields[10] + fields[11] + fields[12] + fields[13];
        }
    }
    ticks as f64 / clock_ticks()
}

fn rss_kib(proxy: &Proxy) -> u64 {
    let Some(child) = &proxy.child else { return 0 };
    tree(child.id())
        .iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        })
        .sum()
}

/// (all fds, pipe fds) of the proxy's process tree.
fn fds(proxy: &Proxy) -> (usize, usize) {
    let Some(child) = &proxy.child else { return (0, 0) };
    let mut all = 0;
    let mut pipes = 0;
    for pid in tree(child.id()) {
        let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for entry in entries.flatten() {
            all += 1;
            if std::fs::read_link(entry.path()).is_ok_and(|t| t.to_string_lossy().starts_with("pipe:")) {
                pipes += 1;
            }
        }
    }
    (all, pipes)
}

/// Sends `total` bytes over `streams` parallel connections into the sink; returns seconds.
fn bulk(target: SocketAddr, total: u64, streams: usize) -> f64 {
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

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// 1-byte request/response round trips on one connection: (p50, p99) in microseconds.
fn ping_pong(target: SocketAddr, trips: usize) -> (f64, f64) {
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

/// Connect, one small message each way, close; 4 clients in parallel. Returns (connections per
/// second, p99 setup time in microseconds: connect until the echo is back, upstream dial
/// included).
fn connection_rate(target: SocketAddr, total: usize) -> (f64, f64) {
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
fn footprint(proxy: &Proxy, count: usize, held: &AtomicUsize) -> Option<(f64, f64, f64, usize)> {
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

// ---------------------------------------------------------------------------------------------
// Results.

#[derive(Default, Clone)]
struct Samples(BTreeMap<&'static str, Vec<f64>>);

impl Samples {
    fn add(&mut self, metric: &'static str, value: f64) {
        self.0.entry(metric).or_default().push(value);
    }

    fn stats(&self, metric: &str) -> Option<(f64, f64, f64)> {
        let mut v = self.0.get(metric)?.clone();
        if v.is_empty() {
            return None;
        }
        v.sort_by(|a, b| a.total_cmp(b));
        Some((percentile(&v, 50.0), v[0], v[v.len() - 1]))
    }
}

struct Figure {
    key: &'static str,
    title: &'static str,
    unit: &'static str,
    higher_is_better: bool,
}

const FIGURES: &[Figure] = &[
    Figure {
        key: "gbps1",
        title: "Throughput, 1 stream",
        unit: "Gbit/s",
        higher_is_better: true,
    },
    Figure {
        key: "gbps8",
        title: "Throughput, 8 streams",
        unit: "Gbit/s",
        higher_is_better: true,
    },
    Figure {
        key: "cpu",
        title: "Proxy CPU per GiB relayed",
        unit: "CPU s/GiB",
        higher_is_better: false,
    },
    Figure {
        key: "p50",
        title: "Ping-pong p50 added over direct",
        unit: "µs",
        higher_is_better: false,
    },
    Figure {
        key: "p99",
        title: "Ping-pong p99 added over direct",
        unit: "µs",
        higher_is_better: false,
    },
    Figure {
        key: "cps",
        title: "Connections per second",
        unit: "conn/s",
        higher_is_better: true,
    },
    Figure {
        key: "setup99",
        title: "Connection setup p99",
        unit: "µs",
        higher_is_better: false,
    },
    Figure {
        key: "idle_rss",
        title: "Idle RSS",
        unit: "KiB",
        higher_is_better: false,
    },
    Figure {
        key: "conn_kib",
        title: "RSS per idle connection",
        unit: "KiB",
        higher_is_better: false,
    },
    Figure {
        key: "conn_fds",
        title: "fds per idle connection",
        unit: "fds",
        higher_is_better: false,
    },
    Figure {
        key: "pipe_fds",
        title: "Pipe fds held with idle connections",
        unit: "fds",
        higher_is_better: false,
    },
];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let smoke = args.iter().any(|a| a == "--smoke");
    // `--only ferryd` (or another contender's name, spaces as '-') runs one contender, for profiling.
    let only: Option<String> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let mut plan = if smoke { SMOKE } else { FULL };
    // `--connections N` overrides the connection-rate count (for profiling that figure).
    if let Some(n) = args
        .iter()
        .position(|a| a == "--connections")
        .and_then(|i| args.get(i + 1)?.parse().ok())
    {
        plan.connections = n;
    }
    let held = Arc::new(AtomicUsize::new(0));
    let upstream = start_upstream(held.clone());

    let mut proxies = Vec::new();
    let mut missing = Vec::new();
    for kind in Kind::ALL {
        if only.as_ref().is_some_and(|o| *o != kind.name().replace(' ', "-")) {
            continue;
        }
        match start(kind, upstream) {
            Some(p) => proxies.push(p),
            None => missing.push(kind.name()),
        }
    }
    for name in &missing {
        eprintln!("{name}: not installed or did not start; left out");
    }

    let mut results: BTreeMap<Kind, Samples> = BTreeMap::new();
    for round in 0..plan.rounds {
        eprintln!("round {}/{}", round + 1, plan.rounds);
        for proxy in &proxies {
            let samples = results.entry(proxy.kind).or_default();
            let cpu_before = cpu_seconds(proxy);
            let t1 = bulk(proxy.listen, plan.bulk_bytes, 1);
            let t8 = bulk(proxy.listen, plan.bulk_bytes, 8);
            let cpu = cpu_seconds(proxy) - cpu_before;
            let gib = 2.0 * plan.bulk_bytes as f64 / GIB;
            samples.add("gbps1", plan.bulk_bytes as f64 * 8.0 / t1 / 1e9);
            samples.add("gbps8", plan.bulk_bytes as f64 * 8.0 / t8 / 1e9);
            if proxy.kind != Kind::Direct {
                samples.add("cpu", cpu / gib);
            }
            let (p50, p99) = ping_pong(proxy.listen, plan.round_trips);
            samples.add("rtt50", p50);
            samples.add("rtt99", p99);
            let (cps, setup99) = connection_rate(proxy.listen, plan.connections);
            samples.add("cps", cps);
            samples.add("setup99", setup99);
            eprintln!(
                "  {:15} {:6.2} / {:6.2} Gbit/s  {:5.2} CPU s/GiB  rtt p50 {:6.1} p99 {:6.1} µs  {:7.0} conn/s",
                proxy.kind.name(),
                plan.bulk_bytes as f64 * 8.0 / t1 / 1e9,
                plan.bulk_bytes as f64 * 8.0 / t8 / 1e9,
                cpu / gib,
                p50,
                p99,
                cps
            );
        }
    }
    // Latency added over direct, per round pairing by median.
    let direct = results.get(&Kind::Direct).cloned().unwrap_or_default();
    let (d50, d99) = (
        direct.stats("rtt50").map_or(0.0, |s| s.0),
        direct.stats("rtt99").map_or(0.0, |s| s.0),
    );
    for (kind, samples) in results.iter_mut() {
        if *kind == Kind::Direct {
            continue;
        }
        let r50 = samples.0.get("rtt50").cloned().unwrap_or_default();
        let r99 = samples.0.get("rtt99").cloned().unwrap_or_default();
        for v in r50 {
            samples.add("p50", v - d50);
        }
        for v in r99 {
            samples.add("p99", v - d99);
        }
    }

    // Footprint, once per contender (socat forks a process per connection: measured with fewer).
    for proxy in &proxies {
        if proxy.kind == Kind::Direct {
            continue;
        }
        let count = if proxy.kind == Kind::Socat {
            plan.idle_connections.min(200)
        } else {
            plan.idle_connections
        };
        if let Some((idle, per_conn, per_fds, pipes)) = footprint(proxy, count, &held) {
            let s = results.entry(proxy.kind).or_default();
            s.add("idle_rss", idle);
            s.add("conn_kib", per_conn);
            s.add("conn_fds", per_fds);
            s.add("pipe_fds", pipes as f64);
            eprintln!(
                "  {:15} idle {idle:.0} KiB, {per_conn:.1} KiB and {per_fds:.2} fds per connection ({count} idle), {pipes} pipe fds",
                proxy.kind.name()
            );
        }
    }

    let moved_everywhere = proxies.iter().all(|p| {
        results
            .get(&p.kind)
            .and_then(|s| s.stats("gbps1"))
            .is_some_and(|(median, _, _)| median > 0.0)
    });
    if smoke || only.is_some() {
        let ferryd_ok = only.is_some() || proxies.iter().any(|p| p.kind == Kind::Ferryd);
        if !moved_everywhere || !ferryd_ok {
            eprintln!("smoke: FAILED (a contender did not move bytes, or ferryd did not start)");
            std::process::exit(1);
        }
        println!(
            "smoke: {} contenders started and moved bytes ({} missing: {:?})",
            proxies.len(),
            missing.len(),
            missing
        );
        return;
    }

    let kinds: Vec<Kind> = proxies.iter().map(|p| p.kind).collect();
    let markdown = report(&results, &kinds, &missing, plan);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    write_results(&root.join("BENCHMARKS.md"), &markdown);
    std::fs::write(root.join("BENCHMARKS.svg"), chart(&results, &kinds)).expect("write BENCHMARKS.svg");
    println!("{markdown}");
}

fn command_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            let text = if o.stdout.is_empty() { o.stderr } else { o.stdout };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_else(|_| "not installed".into())
}

fn report(results: &BTreeMap<Kind, Samples>, kinds: &[Kind], missing: &[&str], plan: Plan) -> String {
    let mut out = String::new();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "Run: `cargo bench --bench relay` on {}",
        command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "- machine: {} CPUs ({cpu}), kernel {}",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        command_output("uname", &["-r"])
    );
    let _ = writeln!(
        out,
        "- versions: ferryd {} (`{}`), {}, {}, {}",
        env!("CARGO_PKG_VERSION"),
        ferryd_bin().rsplit("/target/").next().unwrap_or_default(),
        command_output("haproxy", &["-v"]),
        command_output("nginx", &["-v"]),
        command_output("socat", &["-V"]).replace(
            "socat by Gerhard Rieger and contributors - see www.dest-unreach.org",
            "socat"
        )
    );
    let _ = writeln!(
        out,
        "- plan: {} interleaved rounds; bulk {} GiB per test; {} round trips; {} connections for the rate; {} idle connections (socat: 200); every proxy on one thread or worker",
        plan.rounds,
        plan.bulk_bytes as f64 / GIB,
        plan.round_trips,
        plan.connections,
        plan.idle_connections
    );
    if !missing.is_empty() {
        let _ = writeln!(out, "- left out (not installed): {}", missing.join(", "));
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Median of the rounds, with the spread (min-max) in brackets."
    );
    for figure in FIGURES {
        let _ = writeln!(out);
        let _ = writeln!(out, "### {} ({})", figure.title, figure.unit);
        let _ = writeln!(out);
        let _ = writeln!(out, "| contender | median | spread | vs haproxy splice |");
        let _ = writeln!(out, "| --- | ---: | ---: | ---: |");
        let reference = results
            .get(&Kind::HaproxySplice)
            .and_then(|s| s.stats(figure.key))
            .map(|s| s.0);
        for kind in kinds {
            let Some((median, lo, hi)) = results.get(kind).and_then(|s| s.stats(figure.key)) else {
                continue;
            };
            let ratio = match reference {
                Some(r) if r.abs() > f64::EPSILON => format!("{:.2}×", median / r),
                _ => "-".into(),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {}-{} | {ratio} |",
                kind.name(),
                num(median),
                num(lo),
                num(hi)
            );
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Direct, for reference: {:.2} Gbit/s (1 stream), {:.2} Gbit/s (8 streams); ferryd reaches {:.0}% and {:.0}% of it.",
        med(results, Kind::Direct, "gbps1"),
        med(results, Kind::Direct, "gbps8"),
        100.0 * med(results, Kind::Ferryd, "gbps1") / med(results, Kind::Direct, "gbps1").max(1e-9),
        100.0 * med(results, Kind::Ferryd, "gbps8") / med(results, Kind::Direct, "gbps8").max(1e-9)
    );
    out
}

fn med(results: &BTreeMap<Kind, Samples>, kind: Kind, key: &str) -> f64 {
    results.get(&kind).and_then(|s| s.stats(key)).map_or(0.0, |s| s.0)
}

fn num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Replaces the text between the results markers of BENCHMARKS.md (or writes a new file), so the
/// hand-written analysis around it stays.
fn write_results(path: &Path, results: &str) {
    const START: &str = "<!-- results:start -->";
    const END: &str = "<!-- results:end -->";
    let block = format!("{START}\n{results}\n{END}");
    let text = match std::fs::read_to_string(path) {
        Ok(old) => match (old.find(START), old.find(END)) {
            (Some(a), Some(b)) if a < b => format!("{}{block}{}", &old[..a], &old[b + END.len()..]),
            _ => format!("{old}\n{block}\n"),
        },
        Err(_) => format!("# Benchmarks\n\n{block}\n"),
    };
    std::fs::write(path, text).expect("write BENCHMARKS.md");
}

/// Small multiples: one bar chart per main figure, every contender in each.
fn chart(results: &BTreeMap<Kind, Samples>, kinds: &[Kind]) -> String {
    let panels = ["gbps1", "gbps8", "cpu", "p99", "cps", "conn_kib"];
    let (pw, ph) = (300.0, 220.0);
    let cols = 3.0;
    let width = pw * cols;
    let height = ph * (panels.len() as f64 / cols).ceil();
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    for (i, key) in panels.iter().enumerate() {
        let Some(figure) = FIGURES.iter().find(|f| f.key == *key) else {
            continue;
        };
        let x0 = (i as f64 % cols) * pw;
        let y0 = (i as f64 / cols).floor() * ph;
        let values: Vec<(Kind, f64)> = kinds
            .iter()
            .filter_map(|k| {
                results
                    .get(k)
                    .and_then(|s| s.stats(key))
                    .map(|s| (*k, s.0.max(0.0)))
            })
            .collect();
        let max = values.iter().map(|v| v.1).fold(0.0f64, f64::max).max(1e-9);
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\" font-weight=\"bold\">{} ({}{})</text>",
            x0 + 10.0,
            y0 + 18.0,
            figure.title,
            figure.unit,
            if figure.higher_is_better {
                ", higher is better"
            } else {
                ", lower is better"
            }
        );
        let bar_h = 20.0;
        for (j, (kind, v)) in values.iter().enumerate() {
            let y = y0 + 32.0 + j as f64 * (bar_h + 4.0);
            let w = (pw - 130.0) * v / max;
            let colour = match kind {
                Kind::Ferryd | Kind::FerrydCopy => "#2a7ab0",
                Kind::Direct => "#999999",
                _ => "#e0a040",
            };
            let _ = writeln!(
                svg,
                "<text x=\"{}\" y=\"{}\">{}</text>",
                x0 + 10.0,
                y + 14.0,
                kind.name()
            );
            let _ = writeln!(
                svg,
                "<rect x=\"{}\" y=\"{y}\" width=\"{w:.1}\" height=\"{bar_h}\" fill=\"{colour}\"/>",
                x0 + 100.0
            );
            let _ = writeln!(
                svg,
                "<text x=\"{:.1}\" y=\"{}\">{}</text>",
                x0 + 104.0 + w,
                y + 14.0,
                num(*v)
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}
