//! `ferryd nat up|down|status`: the build VM's egress NAT by hand, with the same reconciler the
//! NAT keeper runs (`crate::nat`); needs CAP_NET_ADMIN and CAP_NET_RAW. `ferryd nat run`, the
//! keeper itself, is in [`super::run`].
//!
//! It must not decide what the rules are: `crate::nat` does.

use std::process::ExitCode;

use crate::cli::NatAction;
use crate::config::Config;

/// `ferryd nat status` exits 2 when it cannot check at all (as opposed to 1: checked, drifted).
const NAT_CANNOT_CHECK: u8 = 2;

/// Applies, removes or checks the rules; exit 0 when done (or in sync), 1 when not, 2 when
/// `status` could not check.
pub fn run(action: NatAction) -> ExitCode {
    let load = |path: &std::path::Path| Config::load(path).map_err(|e| e.to_string());
    let result = match action {
        NatAction::Up { config } => load(&config).and_then(|c| {
            if !c.nat.enabled {
                // Off in the configuration: undo what an earlier configuration left, as the
                // daemon does at start and reload.
                let undone = crate::nat::clear().map_err(|e| e.to_string())?;
                println!(
                    "{}: NAT is not enabled ([nat] enabled = true); {}",
                    config.display(),
                    if undone {
                        "removed ferryd's earlier rules and restored ip_forward"
                    } else {
                        "nothing to do"
                    }
                );
                return Ok(true);
            }
            crate::nat::reconcile(&c.nat)
                .map(|applied| {
                    println!("{applied}");
                    true
                })
                .map_err(|e| e.to_string())
        }),
        NatAction::Down { config: _ } => crate::nat::down()
            .map(|()| {
                println!("ferryd's NAT rules and chains are removed");
                true
            })
            .map_err(|e| e.to_string()),
        NatAction::Run { config } => return super::run::nat_keeper(&config),
        NatAction::Status { config } => {
            let checked = load(&config).and_then(|c| {
                crate::nat::status(&c.nat)
                    .map(|(report, in_sync)| {
                        print!("{report}");
                        in_sync
                    })
                    .map_err(|e| e.to_string())
            });
            return match checked {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("ferryd: cannot check NAT: {e}");
                    ExitCode::from(NAT_CANNOT_CHECK)
                }
            };
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("ferryd: {e}");
            ExitCode::FAILURE
        }
    }
}
