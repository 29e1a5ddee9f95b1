//! The standard `process_*` metrics (Prometheus client conventions), read from /proc/self at
//! scrape time: open and maximum descriptors, resident memory, CPU time, start time. A value
//! that cannot be read is left out rather than reported as zero.

use std::os::unix::ffi::OsStrExt as _;
use std::time::UNIX_EPOCH;

use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::state::State;

/// Registers the process metrics, unprefixed, into `registry`.
pub(super) fn register(registry: &mut Registry, state: &State) {
    if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
        // The directory handle read_dir holds is one of the entries; leave it out.
        let open = entries
            .flatten()
            .filter(|e| e.file_name().as_bytes() != b".")
            .count()
            .saturating_sub(1);
        registry.register(
            "process_open_fds",
            "Open file descriptors",
            ConstGauge::new(open as i64),
        );
    }
    if let Ok((soft, _)) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
        registry.register(
            "process_max_fds",
            "The open-file limit (RLIMIT_NOFILE, soft)",
            ConstGauge::new(i64::try_from(soft).unwrap_or(i64::MAX)),
        );
    }
    let page = sysconf(libc::_SC_PAGESIZE).unwrap_or(4096);
    if let Some(pages) = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<i64>().ok())
    {
        registry.register(
            "process_resident_memory_bytes",
            "Resident memory",
            ConstGauge::new(pages * page),
        );
    }
    if let Some(seconds) = cpu_seconds() {
        registry.register(
            "process_cpu_seconds",
            "User and system CPU time",
            ConstCounter::new(seconds),
        );
    }
    let started = state
        .started_at()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    registry.register(
        "process_start_time_seconds",
        "When the daemon started, in seconds since the Unix epoch",
        ConstGauge::new(started),
    );
}

/// utime + stime from /proc/self/stat, in seconds.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let per_second = sysconf(libc::_SC_CLK_TCK).unwrap_or(100);
    Some(ticks as f64 / per_second as f64)
}

/// A positive sysconf(3) value.
fn sysconf(name: libc::c_int) -> Option<i64> {
    // SAFETY: sysconf has no preconditions; it returns -1 for an unknown name.
    let value = unsafe { libc::sysconf(name) };
    (value > 0).then_some(value as i64)
}
