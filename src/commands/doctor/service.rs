//! Checks of ferryd as a service: the unit over D-Bus (state, restarts, watchdog, last exit
//! status) and the open-file limit against what the routes may hold.

use super::{ASK_CAP, Finding, Status, finding};
use crate::config::Config;

pub(super) fn unit_state() -> Result<crate::systemd::unit::UnitState, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        tokio::time::timeout(ASK_CAP, crate::systemd::unit::query("ferryd.service"))
            .await
            .unwrap_or_else(|_| Err("systemd did not answer in time".into()))
    })
}

pub(super) fn unit_check(unit: &Result<crate::systemd::unit::UnitState, String>) -> Finding {
    let name = "unit";
    match unit {
        Err(e) => finding(
            name,
            Status::Warn,
            format!("not checked: {e}"),
            "under systemd, check `systemctl status ferryd`",
        ),
        Ok(u) if u.active_state == "active" => {
            let mut detail = format!("ferryd.service active ({}), main PID {}", u.sub_state, u.main_pid);
            if u.watchdog_usec == 0 {
                detail.push_str(", no watchdog");
            }
            if u.restarts > 0 {
                finding(
                    name,
                    Status::Warn,
                    format!("{detail}, restarted {} times since it was started", u.restarts),
                    "`journalctl -u ferryd` shows why it restarted",
                )
            } else {
                finding(name, Status::Ok, detail, "")
            }
        }
        Ok(u) => finding(
            name,
            Status::Fail,
            format!(
                "ferryd.service {} ({}), last exit status {}{}",
                u.active_state,
                u.sub_state,
                u.exec_main_status,
                if u.exec_main_status == 78 {
                    " (configuration error)"
                } else {
                    ""
                }
            ),
            "`journalctl -u ferryd -n 50` shows why; fix it, then `systemctl restart ferryd`",
        ),
    }
}

pub(super) fn descriptors_check(config: &Config, main_pid: Option<u32>) -> Finding {
    let name = "descriptors";
    let limit = main_pid
        .filter(|pid| *pid > 0)
        .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/limits")).ok())
        .and_then(|limits| {
            limits
                .lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3)?.parse::<u64>().ok())
        });
    let (limit, whose) = match limit {
        Some(l) => (l, "the daemon's"),
        None => match nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
            Ok((soft, _)) => (soft, "this shell's (the daemon's was not found)"),
            Err(e) => {
                return finding(
                    name,
                    Status::Warn,
                    format!("cannot read the open-file limit: {e}"),
                    "",
                );
            }
        },
    };
    let connections: usize = config.routes.iter().map(|r| r.max_connections).sum();
    let pipes = if config.splice { config.max_pipes } else { 0 };
    let need = (2 * connections + 2 * pipes + 64) as u64;
    if limit >= need {
        finding(
            name,
            Status::Ok,
            format!(
                "{whose} limit {limit} covers {need} (2 per connection up to max_connections, 2 per pipe, 64 spare)"
            ),
            "",
        )
    } else {
        finding(
            name,
            Status::Warn,
            format!(
                "{whose} limit {limit} is below {need} (2 per connection up to max_connections, 2 per pipe, 64 spare)"
            ),
            "raise LimitNOFILE= in the unit, or lower max_connections",
        )
    }
}
