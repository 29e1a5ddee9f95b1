//! What /proc says about a contender: CPU time, resident memory and descriptors of its whole
//! process tree.

use crate::contenders::Proxy;

/// Process tree of `pid` (the proxy and its workers).
pub(crate) fn tree(pid: u32) -> Vec<u32> {
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

pub(crate) fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// CPU seconds of the proxy's process tree, including waited-for children (socat's forks).
pub(crate) fn cpu_seconds(proxy: &Proxy) -> f64 {
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

/// CPU seconds of the proxy's process tree with nanosecond precision: every live thread's time on
/// a CPU from schedstat, plus the clock-tick counts of children already reaped (socat's forks).
/// The one-core share at 250 Mbit/s is a few percent of a core, too little for clock ticks alone.
pub(crate) fn cpu_seconds_precise(proxy: &Proxy) -> f64 {
    let Some(child) = &proxy.child else { return 0.0 };
    let mut ns = 0u64;
    let mut reaped_ticks = 0u64;
    for pid in tree(child.id()) {
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for task in tasks.flatten() {
                let schedstat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
                ns += schedstat
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
            }
        }
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            && let Some(close) = stat.rfind(')')
        {
            let fields: Vec<u64> = stat[close + 2..]
                .split_whitespace()
                .filter_map(|f| f.parse().ok())
                .collect();
            if fields.len() > 14 {
                reaped_ticks += fields[12] + fields[13];
            }
        }
    }
    ns as f64 / 1e9 + reaped_ticks as f64 / clock_ticks()
}

/// Pins every thread of `pid`'s process tree to `cpus` (taskset's list syntax, "0" or "0,1").
/// Returns false when taskset is missing or refused.
pub(crate) fn pin(pid: u32, cpus: &str) -> bool {
    tree(pid).iter().all(|p| {
        std::process::Command::new("taskset")
            .args(["-a", "-p", "-c", cpus, &p.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

pub(crate) fn rss_kib(proxy: &Proxy) -> u64 {
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
pub(crate) fn fds(proxy: &Proxy) -> (usize, usize) {
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

/// `/proc/PID/task/TID/schedstat` of the thread of `pid` named `name`: (nanoseconds on a CPU,
/// nanoseconds runnable but waiting for one), or `None` before the thread exists.
pub(crate) fn thread_schedstat(pid: u32, name: &str) -> Option<(u64, u64)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    for task in tasks.flatten() {
        let dir = task.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("schedstat")).ok()?;
        let mut fields = stat.split_whitespace().filter_map(|f| f.parse::<u64>().ok());
        return Some((fields.next()?, fields.next()?));
    }
    None
}

/// The CPU each thread of `pid` last ran on, with its CPU time so far (ticks): `(tid, cpu,
/// ticks)` per thread (`/proc/PID/task/TID/stat`, fields 39, 14 and 15).
pub(crate) fn threads_cpu(pid: u32) -> Vec<(u32, u32, u64)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| {
            let tid: u32 = task.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
            // Fields after the command name, which is in parentheses and may hold spaces.
            let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            let ticks = rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?;
            Some((tid, rest.get(36)?.parse().ok()?, ticks))
        })
        .collect()
}

/// The calling thread's id.
pub(crate) fn gettid() -> u32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() as u32 }
}
