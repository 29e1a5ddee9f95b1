//! Results: the samples of every round, the figures and their medians and spreads, and the
//! markdown section of BENCHMARKS.md.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use crate::contenders::{Kind, ferryd_bin};
use crate::load::percentile;
use crate::{GIB, Plan};

/// What is measured: the keys of [`Samples`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Metric {
    /// Throughput of one stream (Gbit/s).
    Gbps1,
    /// Throughput of eight streams (Gbit/s).
    Gbps8,
    /// CPU seconds per GiB relayed.
    Cpu,
    /// Ping-pong round trip p50 and p99 (µs), raw.
    Rtt50,
    /// See [`Metric::Rtt50`].
    Rtt99,
    /// Ping-pong p50 and p99 added over direct (µs).
    P50,
    /// See [`Metric::P50`].
    P99,
    /// Request/response of this many KiB each way, p50 (µs).
    Exchange50(u32),
    /// See [`Metric::Exchange50`]; p99.
    Exchange99(u32),
    /// Connections per second.
    Cps,
    /// Connection setup p99 (µs).
    Setup99,
    /// Idle RSS (KiB).
    IdleRss,
    /// RSS per idle connection (KiB).
    ConnKib,
    /// Descriptors per idle connection.
    ConnFds,
    /// Pipe descriptors held with idle connections.
    PipeFds,
    /// One core: throughput of one stream (Gbit/s).
    CoreGbps1,
    /// One core: share of the core used to relay 250 Mbit/s (%).
    CoreShare,
    /// One core: how busy the proxy's core was during the one-stream test (%): below 100, the
    /// load on the other core, not the proxy, set the pace.
    CoreBusy,
    /// One core: ping-pong round trip p50 and p99 (µs), raw: every contender pays the same
    /// crossing between the two cores, so the ratios are those of the latency added.
    CoreRtt50,
    /// See [`Metric::CoreRtt50`].
    CoreRtt99,
    /// One core: request/response of this many KiB each way, p50 (µs).
    CoreExchange50(u32),
    /// See [`Metric::CoreExchange50`]; p99.
    CoreExchange99(u32),
}

/// What ferryd aims for on a figure (the issue's goals).
#[derive(Clone, Copy)]
pub(crate) enum Goal {
    /// ferryd / best peer at most (lower is better) or at least (higher is better) this.
    Ratio(f64),
    /// ferryd's own value at most this.
    AtMost(f64),
}

#[derive(Default, Clone)]
pub(crate) struct Samples(pub(crate) BTreeMap<Metric, Vec<f64>>);

impl Samples {
    pub(crate) fn add(&mut self, metric: Metric, value: f64) {
        self.0.entry(metric).or_default().push(value);
    }

    pub(crate) fn stats(&self, metric: Metric) -> Option<(f64, f64, f64)> {
        let mut v = self.0.get(&metric)?.clone();
        if v.is_empty() {
            return None;
        }
        v.sort_by(|a, b| a.total_cmp(b));
        Some((percentile(&v, 50.0), v[0], v[v.len() - 1]))
    }
}

pub(crate) struct Figure {
    pub(crate) metric: Metric,
    pub(crate) title: &'static str,
    pub(crate) unit: &'static str,
    pub(crate) higher_is_better: bool,
    pub(crate) goal: Option<Goal>,
}

pub(crate) const FIGURES: &[Figure] = &[
    Figure {
        metric: Metric::CoreGbps1,
        title: "One core: throughput, 1 stream",
        unit: "Gbit/s",
        higher_is_better: true,
        goal: Some(Goal::Ratio(1.3)),
    },
    Figure {
        metric: Metric::CoreBusy,
        title: "One core: the proxy's core busy during that stream",
        unit: "% of the core",
        higher_is_better: false,
        goal: None,
    },
    Figure {
        metric: Metric::CoreShare,
        title: "One core: share used to relay 250 Mbit/s",
        unit: "% of the core",
        higher_is_better: false,
        goal: Some(Goal::Ratio(0.5)),
    },
    Figure {
        metric: Metric::CoreRtt50,
        title: "One core: ping-pong round trip p50",
        unit: "µs",
        higher_is_better: false,
        goal: Some(Goal::Ratio(1.0)),
    },
    Figure {
        metric: Metric::CoreRtt99,
        title: "One core: ping-pong round trip p99",
        unit: "µs",
        higher_is_better: false,
        goal: Some(Goal::Ratio(1.0)),
    },
    Figure {
        metric: Metric::CoreExchange50(1),
        title: "One core: request/response 1 KiB each way, p50",
        unit: "µs",
        higher_is_better: false,
        goal: Some(Goal::Ratio(1.0)),
    },
    Figure {
        metric: Metric::CoreExchange99(1),
        title: "One core: request/response 1 KiB each way, p99",
        unit: "µs",
        higher_is_better: false,
        goal: Some(Goal::Ratio(1.0)),
    },
    Figure {
        metric: Metric::CoreExchange50(16),
        title: "One core: request/response 16 KiB each way, p50",
        unit: "µs",
        higher_is_better: false,
        goal: Some(Goal::Ratio(1.0)),
    },
    Figure {
        metric: Metric::CoreExchange99(16),
        title: "One core: request/response 16 KiB each way, p99",
        unit: "µs",
        higher_is_better: false,
        goal: Some(Goal::Ratio(1.0)),
    },
    Figure {
        metric: Metric::Gbps1,
        title: "Throughput, 1 stream",
        unit: "Gbit/s",
        higher_is_better: true,
        goal: Some(Goal::Ratio(1.3)),
    },
    Figure {
        metric: Metric::Gbps8,
        title: "Throughput, 8 streams",
        unit: "Gbit/s",
        higher_is_better: true,
        goal: None,
    },
    Figure {
        metric: Metric::Cpu,
        title: "Proxy CPU per GiB relayed",
        unit: "CPU s/GiB",
        higher_is_better: false,
        goal: Some(Goal::Ratio(0.5)),
    },
    Figure {
        metric: Metric::P50,
        title: "Ping-pong p50 added over direct",
        unit: "µs",
        higher_is_better: false,
        goal: Some(Goal::Ratio(1.0)),
    },
    Figure {
        metric: Metric::P99,
        title: "Ping-pong p99 added over direct",
        unit: "µs",
        higher_is_better: false,
        goal: Some(Goal::Ratio(1.0)),
    },
    Figure {
        metric: Metric::Exchange50(1),
        title: "Request/response 1 KiB each way, p50",
        unit: "µs",
        higher_is_better: false,
        goal: Some(Goal::Ratio(1.0)),
    },
    Figure {
        metric: Metric::Exchange99(1),
        title: "Request/response 1 KiB each way, p99",
        unit: "µs",
        higher_is_better: false,
        goal: Some(Goal::Ratio(1.0)),
    },
    Figure {
        metric: Metric::Exchange50(16),
        title: "Request/response 16 KiB each way, p50",
        unit: "µs",
        higher_is_better: false,
        goal: Some(Goal::Ratio(1.0)),
    },
    Figure {
        metric: Metric::Exchange99(16),
        title: "Request/response 16 KiB each way, p99",
        unit: "µs",
        higher_is_better: false,
        goal: Some(Goal::Ratio(1.0)),
    },
    Figure {
        metric: Metric::Exchange50(64),
        title: "Request/response 64 KiB each way, p50",
        unit: "µs",
        higher_is_better: false,
        goal: Some(Goal::Ratio(1.0)),
    },
    Figure {
        metric: Metric::Exchange99(64),
        title: "Request/response 64 KiB each way, p99",
        unit: "µs",
        higher_is_better: false,
        goal: Some(Goal::Ratio(1.0)),
    },
    Figure {
        metric: Metric::Exchange50(256),
        title: "Request/response 256 KiB each way, p50",
        unit: "µs",
        higher_is_better: false,
        goal: Some(Goal::Ratio(1.0)),
    },
    Figure {
        metric: Metric::Exchange99(256),
        title: "Request/response 256 KiB each way, p99",
        unit: "µs",
        higher_is_better: false,
        goal: Some(Goal::Ratio(1.0)),
    },
    Figure {
        metric: Metric::Cps,
        title: "Connections per second",
        unit: "conn/s",
        higher_is_better: true,
        goal: Some(Goal::Ratio(1.2)),
    },
    Figure {
        metric: Metric::Setup99,
        title: "Connection setup p99",
        unit: "µs",
        higher_is_better: false,
        goal: None,
    },
    Figure {
        metric: Metric::IdleRss,
        title: "Idle RSS",
        unit: "KiB",
        higher_is_better: false,
        goal: Some(Goal::AtMost(3072.0)),
    },
    Figure {
        metric: Metric::ConnKib,
        title: "RSS per idle connection",
        unit: "KiB",
        higher_is_better: false,
        goal: Some(Goal::AtMost(3.0)),
    },
    Figure {
        metric: Metric::ConnFds,
        title: "fds per idle connection",
        unit: "fds",
        higher_is_better: false,
        goal: Some(Goal::AtMost(2.0)),
    },
    Figure {
        metric: Metric::PipeFds,
        title: "Pipe fds held with idle connections",
        unit: "fds",
        higher_is_better: false,
        goal: None,
    },
];

pub(crate) fn command_output(program: &str, args: &[&str]) -> String {
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

pub(crate) fn report(
    results: &BTreeMap<Kind, Samples>,
    kinds: &[Kind],
    missing: &[&str],
    plan: Plan,
) -> String {
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
        "- plan: {} interleaved rounds; bulk {} GiB per test; {} round trips; {} request/response exchanges per size; {} connections for the rate; {} idle connections (socat: 200); every proxy on one thread or worker; one-core shape: the proxy pinned to CPU 0, load and upstream on CPU 1, a {} s stream paced at 250 Mbit/s",
        plan.rounds,
        plan.bulk_bytes as f64 / GIB,
        plan.round_trips,
        plan.exchanges,
        plan.connections,
        plan.idle_connections,
        plan.paced_seconds
    );
    if !missing.is_empty() {
        let _ = writeln!(out, "- left out (not installed): {}", missing.join(", "));
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Median of the rounds, with the spread (min-max). \"vs best peer\" divides by the best median among the other relays (HAProxy with and without splice, nginx, socat) on that figure."
    );
    let _ = writeln!(out);
    let _ = writeln!(out, "### Goals: ferryd against the best peer on each figure");
    let _ = writeln!(out);
    let _ = writeln!(out, "| figure | best peer | ferryd | ratio | goal | |");
    let _ = writeln!(out, "| --- | --- | ---: | ---: | --- | --- |");
    for figure in FIGURES {
        let Some(goal) = figure.goal else { continue };
        let Some(ours) = results
            .get(&Kind::Ferryd)
            .and_then(|s| s.stats(figure.metric))
            .map(|s| s.0)
        else {
            continue;
        };
        let best = best_peer(results, kinds, figure);
        let ratio = best
            .filter(|(_, b)| b.abs() > f64::EPSILON)
            .map(|(_, b)| ours / b);
        let (goal_text, met) = match goal {
            Goal::Ratio(r) if figure.higher_is_better => (format!(">= {r}x"), ratio.map(|x| x >= r)),
            Goal::Ratio(r) => (format!("<= {r}x"), ratio.map(|x| x <= r)),
            Goal::AtMost(v) => (format!("<= {} {}", num(v), figure.unit), Some(ours <= v)),
        };
        let _ = writeln!(
            out,
            "| {} ({}) | {} | {} | {} | {goal_text} | {} |",
            figure.title,
            figure.unit,
            best.map_or("-".into(), |(k, b)| format!("{} {}", k.name(), num(b))),
            num(ours),
            ratio.map_or("-".into(), |x| format!("{x:.2}x")),
            match met {
                Some(true) => "met",
                Some(false) => "NOT met",
                None => "-",
            }
        );
    }
    for figure in FIGURES {
        let _ = writeln!(out);
        let _ = writeln!(out, "### {} ({})", figure.title, figure.unit);
        let _ = writeln!(out);
        let _ = writeln!(out, "| contender | median | spread | vs best peer |");
        let _ = writeln!(out, "| --- | ---: | ---: | ---: |");
        let reference = best_peer(results, kinds, figure).map(|(_, b)| b);
        for kind in kinds {
            let Some((median, lo, hi)) = results.get(kind).and_then(|s| s.stats(figure.metric)) else {
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
    // Without a direct run (`--only` left it out) there is nothing to compare with.
    let direct = (
        med(results, Kind::Direct, Metric::Gbps1),
        med(results, Kind::Direct, Metric::Gbps8),
    );
    if direct.0 > 0.0 && direct.1 > 0.0 {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "Direct, for reference: {:.2} Gbit/s (1 stream), {:.2} Gbit/s (8 streams); ferryd reaches {:.0}% and {:.0}% of it.",
            direct.0,
            direct.1,
            100.0 * med(results, Kind::Ferryd, Metric::Gbps1) / direct.0,
            100.0 * med(results, Kind::Ferryd, Metric::Gbps8) / direct.1
        );
    }
    out
}

/// The other relay with the best median on `figure` (not direct, not ferryd in either mode).
pub(crate) fn best_peer(
    results: &BTreeMap<Kind, Samples>,
    kinds: &[Kind],
    figure: &Figure,
) -> Option<(Kind, f64)> {
    kinds
        .iter()
        .filter(|k| {
            !matches!(
                k,
                Kind::Direct | Kind::Ferryd | Kind::FerrydCopy | Kind::FerrydBefore
            )
        })
        .filter_map(|k| Some((*k, results.get(k)?.stats(figure.metric)?.0)))
        .filter(|(_, v)| v.is_finite())
        .reduce(|a, b| {
            let better = if figure.higher_is_better {
                b.1 > a.1
            } else {
                b.1 < a.1
            };
            if better { b } else { a }
        })
}

pub(crate) fn med(results: &BTreeMap<Kind, Samples>, kind: Kind, metric: Metric) -> f64 {
    results
        .get(&kind)
        .and_then(|s| s.stats(metric))
        .map_or(0.0, |s| s.0)
}

pub(crate) fn num(v: f64) -> String {
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
pub(crate) fn write_results(path: &Path, results: &str) {
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
