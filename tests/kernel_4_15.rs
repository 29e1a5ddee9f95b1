//! ferryd on the system-call surface of Ubuntu 18.04's kernel (4.15): a filter makes every newer
//! system call fail with ENOSYS, and the daemon must still start, splice, reload and drain.

mod common;

use std::net::{Shutdown, TcpStream};
use std::process::Command;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

/// The filter itself works: a post-4.15 call (pidfd_open, 434) fails under it.
#[test]
fn filter_hides_newer_system_calls() {
    let mut command = Command::new("python3");
    command.args(["-c", "import os; os.pidfd_open(os.getpid())"]);
    as_linux_4_15(&mut command);
    let Ok(out) = command.output() else {
        common::skip::skipped("python3 is not installed");
        return;
    };
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Function not implemented"));
}

#[test]
fn relays_reloads_and_drains_on_the_4_15_syscall_surface() {
    const TOTAL: u64 = 64 * 1024 * 1024;
    let upstream = Upstream::start(|stream| {
        let mut reader = stream.try_clone().unwrap();
        let checker = std::thread::spawn(move || Pattern::new(11).verify(&mut reader));
        let mut writer = stream;
        Pattern::new(12).send(&mut writer, TOTAL).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
        assert_eq!(checker.join().unwrap().unwrap(), TOTAL);
    });
    let port = free_port();
    let config = config_one_route(port, upstream.addr, "", "");
    let mut daemon = Daemon::start_with(&config, as_linux_4_15);

    daemon.signal(Signal::SIGHUP);
    daemon.expect_log("configuration reloaded", Duration::from_secs(5));

    let client = TcpStream::connect(local(port)).unwrap();
    let mut reader = client.try_clone().unwrap();
    let checker = std::thread::spawn(move || Pattern::new(12).verify(&mut reader));
    let mut writer = client;
    Pattern::new(11).send(&mut writer, TOTAL).unwrap();
    writer.shutdown(Shutdown::Write).unwrap();
    assert_eq!(checker.join().unwrap().unwrap(), TOTAL);

    assert!(daemon.stop().success(), "log:\n{}", daemon.log());
    let summary = daemon.expect_log(" stopped relayed=", Duration::from_secs(1));
    let spliced: u64 = field(&summary, "spliced_bytes").unwrap().parse().unwrap();
    assert!(spliced >= 2 * TOTAL - 2 * 64 * 1024, "{summary}");
    assert_eq!(field(&summary, "fallback_refused"), Some("0"));
    let log = daemon.log();
    assert!(!log.contains("ERROR"), "{log}");
}
