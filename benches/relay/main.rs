//! ferryd against the relays a user would pick instead, on loopback, in one run:
//! direct (no proxy), ferryd (splice), ferryd (copy), HAProxy with and without splice, nginx
//! stream, socat.
//!
//! Every contender relays to the same upstream, which this program runs: the first byte of a
//! connection picks its behaviour (`S` sink, `E` echo, `H` hold open). Rounds are interleaved,
//! each starting one contender later (A B C, B C A, C A B, ...), and each figure is the median of
//! the rounds, with the spread (min-max), so that a noisy machine moves every contender alike.
//!
//! Two shapes: the machine's two cores shared by everything (every proxy on one thread or
//! worker, the load generator and upstream beside it), and the proxy VM's own shape, one core:
//! each proxy pinned to CPU 0 while this program (load and upstream) runs on CPU 1, measuring the
//! most one core relays on one stream and the share of that core a 250 Mbit/s stream (the proxy
//! VM's network) costs.
//!
//! `cargo bench --bench relay` runs the full benchmark and rewrites the results section of
//! BENCHMARKS.md and BENCHMARKS.svg. `cargo bench --bench relay -- --smoke` runs one short round,
//! checks that every installed contender starts and moves bytes, and writes nothing.
//! `cargo bench --bench relay -- --listing` measures what listing `/connections` with 5,000 idle
//! connections open costs the relay's latency, and writes nothing.
//! It installs nothing: HAProxy, nginx (with its stream module) and socat come from the
//! distribution (docs/testing.md says how); a missing one is reported and left out.

#[path = "../../tests/common/mod.rs"]
mod common;

mod chart;
mod contenders;
mod listing;
mod load;
mod procfs;
mod report;
mod upstream;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use chart::chart;
use contenders::{Kind, start};
use load::{bulk, connection_rate, footprint, paced, ping_pong, request_response};
use procfs::{cpu_seconds, cpu_seconds_precise, pin};
use report::{Metric, Samples, report, write_results};
use upstream::start_upstream;

pub(crate) const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// Sizes of one run.
#[derive(Clone, Copy)]
pub(crate) struct Plan {
    pub(crate) rounds: usize,
    pub(crate) bulk_bytes: u64,
    pub(crate) round_trips: usize,
    /// Request/response exchanges per size.
    pub(crate) exchanges: usize,
    pub(crate) connections: usize,
    pub(crate) idle_connections: usize,
    /// How long the paced 250 Mbit/s stream of the one-core shape lasts.
    pub(crate) paced_seconds: f64,
}

/// Request/response sizes each way, in KiB: WinRM's SOAP envelopes run from a few KiB to a few
/// hundred, one exchange at a time; 1 KiB stands for an SSH command and its output.
pub(crate) const EXCHANGE_KIB: [u32; 4] = [1, 16, 64, 256];

/// The exchange sizes measured again in the one-core shape: those where ferryd and its peers
/// are within the unpinned rounds' spread of each other (at 64 and 256 KiB they are not).
pub(crate) const PINNED_EXCHANGE_KIB: [u32; 2] = [1, 16];

/// The proxy VM's network: what the one-core shape's paced stream sends.
pub(crate) const VM_BITS_PER_SECOND: f64 = 250e6;

pub(crate) const FULL: Plan = Plan {
    // Seven rather than the minimum five: tail latency on a shared 2-core machine is noisy.
    rounds: 7,
    bulk_bytes: 2 << 30,
    round_trips: 10_000,
    exchanges: 2_000,
    // 5,000 rather than 1,000: a thousand connections take about 60 ms, too short to rank.
    connections: 5_000,
    idle_connections: 5_000,
    paced_seconds: 6.0,
};

pub(crate) const SMOKE: Plan = Plan {
    rounds: 1,
    bulk_bytes: 16 << 20,
    round_trips: 200,
    exchanges: 50,
    connections: 50,
    idle_connections: 50,
    paced_seconds: 0.5,
};

/// The benchmark's flags (`cargo bench --bench relay -- FLAGS`).
#[derive(clap::Parser)]
#[command(about = "ferryd against HAProxy, nginx and socat on loopback")]
struct Args {
    /// One short round: checks that every installed contender starts and moves bytes; writes
    /// nothing.
    #[arg(long)]
    smoke: bool,
    /// Only these contenders (names with spaces as '-', comma-separated), for profiling and
    /// before/after comparisons: the tables go to stdout, nothing is written.
    #[arg(long, value_delimiter = ',')]
    only: Option<Vec<String>>,
    /// The number of rounds instead of the plan's.
    #[arg(long)]
    rounds: Option<usize>,
    /// The connection-rate count instead of the plan's (for profiling that figure).
    #[arg(long)]
    connections: Option<usize>,
    /// What reading /connections with thousands open costs the relay (see listing.rs).
    #[arg(long)]
    listing: bool,
    /// Every contender logs each connection the way an operator would have it (ferryd as it
    /// ships, HAProxy `option tcplog`, nginx stream `access_log`), into files; prints, writes
    /// nothing.
    #[arg(long)]
    logged: bool,
    /// Passed by `cargo bench` to every benchmark binary.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Where the one-core shape runs: the proxy pinned to CPU 0, this program to CPU 1, and back to
/// every CPU after.
struct OneCore {
    me: u32,
    all_cpus: String,
}

/// Starts every contender asked for: those that run, and the names of those that did not.
/// Under `FERRYD_TESTS_REQUIRE_ALL=1` (CI, where every contender is installed) one left out
/// ends the run with a failure: it means a missing install step, not a result.
fn start_contenders(
    args: &Args,
    upstream: std::net::SocketAddr,
) -> (Vec<contenders::Proxy>, Vec<&'static str>) {
    let mut proxies = Vec::new();
    let mut missing = Vec::new();
    for kind in Kind::ALL {
        // "ferryd (before)" is measured only when asked for.
        if kind == Kind::FerrydBefore && contenders::ferryd_before_bin().is_none() {
            continue;
        }
        if args
            .only
            .as_ref()
            .is_some_and(|o| !o.contains(&kind.name().replace(' ', "-")))
        {
            continue;
        }
        match start(kind, upstream, args.logged) {
            Some(p) => proxies.push(p),
            None => missing.push(kind.name()),
        }
    }
    for name in &missing {
        eprintln!("{name}: not installed or did not start; left out");
    }
    if !missing.is_empty() && std::env::var("FERRYD_TESTS_REQUIRE_ALL").is_ok_and(|v| v == "1") {
        eprintln!("FERRYD_TESTS_REQUIRE_ALL=1: every contender must run");
        std::process::exit(1);
    }
    (proxies, missing)
}

/// The smoke run's verdict: every contender started moved bytes, ferryd among them; exits 1
/// otherwise.
fn smoke_verdict(proxies: &[contenders::Proxy], results: &BTreeMap<Kind, Samples>, missing: &[&str]) {
    let moved_everywhere = proxies.iter().all(|p| {
        results
            .get(&p.kind)
            .and_then(|s| s.stats(Metric::Gbps1))
            .is_some_and(|(median, _, _)| median > 0.0)
    });
    let ferryd_ok = proxies.iter().any(|p| p.kind == Kind::Ferryd);
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
}

fn main() {
    let args = <Args as clap::Parser>::parse();
    let mut plan = if args.smoke { SMOKE } else { FULL };
    if let Some(n) = args.rounds {
        plan.rounds = n;
    }
    if let Some(n) = args.connections {
        plan.connections = n;
    }
    // The one-core shape needs two CPUs (one for the proxy, one for the load) and taskset.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let me = std::process::id();
    let one_core = (cores >= 2 && pin(me, "0-1")).then(|| OneCore {
        me,
        all_cpus: format!("0-{}", cores - 1),
    });
    if one_core.is_none() {
        eprintln!("one-core shape left out: it needs 2 CPUs and taskset (util-linux)");
    }
    let held = Arc::new(AtomicUsize::new(0));
    let upstream = start_upstream(held.clone());
    if args.listing {
        listing::run(upstream, &held, plan.idle_connections, plan.rounds.min(5), 20_000);
        return;
    }

    let (proxies, missing) = start_contenders(&args, upstream);
    let mut results: BTreeMap<Kind, Samples> = BTreeMap::new();
    for round_number in 0..plan.rounds {
        eprintln!("round {}/{}", round_number + 1, plan.rounds);
        // Each round starts one contender later (A B C, B C A, ...): a machine that is slower
        // for whoever runs first in a round (after the previous round's bulk transfers) then
        // slows every contender alike, not always the same one.
        for i in 0..proxies.len() {
            let proxy = &proxies[(i + round_number) % proxies.len()];
            round(
                proxy,
                &plan,
                one_core.as_ref(),
                results.entry(proxy.kind).or_default(),
            );
        }
    }
    added_latency(&mut results);
    for proxy in &proxies {
        footprint_of(proxy, &plan, &held, &mut results);
    }

    let kinds: Vec<Kind> = proxies.iter().map(|p| p.kind).collect();
    if args.only.is_some() || args.logged {
        // A partial run: its tables on stdout, nothing written.
        println!("{}", report(&results, &kinds, &missing, plan));
        return;
    }
    if args.smoke {
        smoke_verdict(&proxies, &results, &missing);
        return;
    }
    let markdown = report(&results, &kinds, &missing, plan);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    write_results(&root.join("BENCHMARKS.md"), &markdown);
    std::fs::write(root.join("BENCHMARKS.svg"), chart(&results, &kinds)).expect("write BENCHMARKS.svg");
    println!("{markdown}");
}

/// One round of every figure for one contender, into `samples`.
fn round(proxy: &contenders::Proxy, plan: &Plan, one_core: Option<&OneCore>, samples: &mut Samples) {
    let cpu_before = cpu_seconds(proxy);
    let t1 = bulk(proxy.listen, plan.bulk_bytes, 1);
    let t8 = bulk(proxy.listen, plan.bulk_bytes, 8);
    let cpu = cpu_seconds(proxy) - cpu_before;
    let gib = 2.0 * plan.bulk_bytes as f64 / GIB;
    samples.add(Metric::Gbps1, plan.bulk_bytes as f64 * 8.0 / t1 / 1e9);
    samples.add(Metric::Gbps8, plan.bulk_bytes as f64 * 8.0 / t8 / 1e9);
    if proxy.kind != Kind::Direct {
        samples.add(Metric::Cpu, cpu / gib);
    }
    let (p50, p99) = small_exchanges(proxy, plan, &EXCHANGE_KIB, Placement::Shared, samples);
    let (cps, setup99) = connection_rate(proxy.listen, plan.connections);
    samples.add(Metric::Cps, cps);
    samples.add(Metric::Setup99, setup99);
    let core = match (one_core, &proxy.child) {
        (Some(shape), Some(child)) => one_core_round(proxy, child.id(), shape, plan, samples),
        _ => (f64::NAN, f64::NAN),
    };
    eprintln!(
        "  {:15} {:6.2} / {:6.2} Gbit/s  {:5.2} CPU s/GiB  rtt p50 {:6.1} p99 {:6.1} µs  {:7.0} conn/s  one core: {:6.2} Gbit/s, {:5.2}% at 250 Mbit/s",
        proxy.kind.name(),
        plan.bulk_bytes as f64 * 8.0 / t1 / 1e9,
        plan.bulk_bytes as f64 * 8.0 / t8 / 1e9,
        cpu / gib,
        p50,
        p99,
        cps,
        core.0,
        core.1
    );
}

/// Where the small exchanges ran: the two shapes' figures are kept apart.
#[derive(Clone, Copy)]
enum Placement {
    /// Proxy, load and upstream wherever the scheduler puts them.
    Shared,
    /// The proxy on CPU 0, load and upstream on CPU 1.
    OneCore,
}

impl Placement {
    /// The ping-pong's p50 and p99 figures.
    fn ping_pong(self) -> [Metric; 2] {
        match self {
            Placement::Shared => [Metric::Rtt50, Metric::Rtt99],
            Placement::OneCore => [Metric::CoreRtt50, Metric::CoreRtt99],
        }
    }

    /// The p50 and p99 figures of the exchange of `kib` KiB each way.
    fn exchange(self, kib: u32) -> [Metric; 2] {
        match self {
            Placement::Shared => [Metric::Exchange50(kib), Metric::Exchange99(kib)],
            Placement::OneCore => [Metric::CoreExchange50(kib), Metric::CoreExchange99(kib)],
        }
    }
}

/// The 1-byte ping-pong and the request/response exchanges of `sizes` KiB, into the figures of
/// `placement`; returns the ping-pong's p50 and p99 for the round's progress line.
fn small_exchanges(
    proxy: &contenders::Proxy,
    plan: &Plan,
    sizes: &[u32],
    placement: Placement,
    samples: &mut Samples,
) -> (f64, f64) {
    let (p50, p99) = match (placement, &proxy.child) {
        (Placement::Shared, Some(child)) => {
            let (trip, beside) = with_placement(child.id(), || ping_pong(proxy.listen, plan.round_trips));
            eprintln!(
                "  {:15} ping-pong p50 {:.1} µs; the proxy's busiest thread ran on the client's CPU in {:.0}% of samples",
                proxy.kind.name(),
                trip.0,
                100.0 * beside
            );
            trip
        }
        _ => ping_pong(proxy.listen, plan.round_trips),
    };
    let [rtt50, rtt99] = placement.ping_pong();
    samples.add(rtt50, p50);
    samples.add(rtt99, p99);
    for &kib in sizes {
        let (x50, x99) = request_response(proxy.listen, kib as usize * 1024, plan.exchanges);
        let [m50, m99] = placement.exchange(kib);
        samples.add(m50, x50);
        samples.add(m99, x99);
    }
    (p50, p99)
}

/// Runs `load` (on this thread) while sampling, every 2 ms, which CPU the proxy's busiest thread
/// (over its whole process tree: nginx's worker, socat's children) and this thread last ran on:
/// the load's result, and the share of samples where they were the same CPU. Every proxy is
/// measured with the sampler running; `direct`, which has no process, without it.
fn with_placement<T: Send>(pid: u32, load: impl FnOnce() -> T + Send) -> (T, f64) {
    let client = procfs::gettid();
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let (mut same, mut all) = (0u32, 0u32);
            let threads = || -> Vec<(u32, u32, u64)> {
                procfs::tree(pid)
                    .into_iter()
                    .flat_map(procfs::threads_cpu)
                    .collect()
            };
            let start: std::collections::HashMap<u32, u64> = threads()
                .into_iter()
                .map(|(tid, _, ticks)| (tid, ticks))
                .collect();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(2));
                let busiest = threads()
                    .into_iter()
                    .max_by_key(|(tid, _, ticks)| ticks.saturating_sub(start.get(tid).copied().unwrap_or(0)));
                let mine = procfs::threads_cpu(std::process::id())
                    .into_iter()
                    .find(|(tid, _, _)| *tid == client);
                if let (Some((_, theirs, _)), Some((_, ours, _))) = (busiest, mine) {
                    all += 1;
                    same += u32::from(theirs == ours);
                }
            }
            if all == 0 {
                f64::NAN
            } else {
                f64::from(same) / f64::from(all)
            }
        });
        let out = load();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        (out, sampler.join().unwrap_or(f64::NAN))
    })
}

/// The one-core shape's figures (the proxy on CPU 0, this program on CPU 1): the most one core
/// relays on one stream, and the share of that core a 250 Mbit/s stream costs.
fn one_core_round(
    proxy: &contenders::Proxy,
    pid: u32,
    shape: &OneCore,
    plan: &Plan,
    samples: &mut Samples,
) -> (f64, f64) {
    if !(pin(pid, "0") && pin(shape.me, "1")) {
        return (f64::NAN, f64::NAN);
    }
    let busy_before = cpu_seconds_precise(proxy);
    let t = bulk(proxy.listen, plan.bulk_bytes, 1);
    samples.add(
        Metric::CoreBusy,
        100.0 * (cpu_seconds_precise(proxy) - busy_before) / t,
    );
    // socat's per-connection child must be gone and reaped before the baseline, or its time
    // would move from its own counters to its parent's between the reads.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let before = cpu_seconds_precise(proxy);
    let wall = paced(proxy.listen, VM_BITS_PER_SECOND, plan.paced_seconds);
    let share = 100.0 * (cpu_seconds_precise(proxy) - before) / wall;
    let core = (plan.bulk_bytes as f64 * 8.0 / t / 1e9, share);
    samples.add(Metric::CoreGbps1, core.0);
    samples.add(Metric::CoreShare, core.1);
    // The small exchanges again, placed: unpinned, the scheduler puts the proxy beside the
    // client on some rounds and not on others, and a round's latency moves by a quarter with
    // it, for every contender alike (50 against 64 µs for one binary in one run).
    small_exchanges(proxy, plan, &PINNED_EXCHANGE_KIB, Placement::OneCore, samples);
    pin(pid, &shape.all_cpus);
    pin(shape.me, &shape.all_cpus);
    core
}

/// Latency added over direct, round by round against direct's median.
fn added_latency(results: &mut BTreeMap<Kind, Samples>) {
    let direct = results.get(&Kind::Direct).cloned().unwrap_or_default();
    let (d50, d99) = (
        direct.stats(Metric::Rtt50).map_or(0.0, |s| s.0),
        direct.stats(Metric::Rtt99).map_or(0.0, |s| s.0),
    );
    for (kind, samples) in results.iter_mut() {
        if *kind == Kind::Direct {
            continue;
        }
        let r50 = samples.0.get(&Metric::Rtt50).cloned().unwrap_or_default();
        let r99 = samples.0.get(&Metric::Rtt99).cloned().unwrap_or_default();
        for v in r50 {
            samples.add(Metric::P50, v - d50);
        }
        for v in r99 {
            samples.add(Metric::P99, v - d99);
        }
    }
}

/// Footprint, once per contender (socat forks a process per connection: measured with fewer).
fn footprint_of(
    proxy: &contenders::Proxy,
    plan: &Plan,
    held: &Arc<AtomicUsize>,
    results: &mut BTreeMap<Kind, Samples>,
) {
    if proxy.kind == Kind::Direct {
        return;
    }
    let count = if proxy.kind == Kind::Socat {
        plan.idle_connections.min(200)
    } else {
        plan.idle_connections
    };
    if let Some((idle, per_conn, per_fds, pipes)) = footprint(proxy, count, held) {
        let s = results.entry(proxy.kind).or_default();
        s.add(Metric::IdleRss, idle);
        s.add(Metric::ConnKib, per_conn);
        s.add(Metric::ConnFds, per_fds);
        s.add(Metric::PipeFds, pipes as f64);
        eprintln!(
            "  {:15} idle {idle:.0} KiB, {per_conn:.1} KiB and {per_fds:.2} fds per connection ({count} idle), {pipes} pipe fds",
            proxy.kind.name()
        );
    }
}
