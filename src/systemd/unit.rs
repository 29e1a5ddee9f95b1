//! A unit's state as systemd reports it over the system bus, for `ferryd status`.

use systemd_zbus::{ManagerProxy, ServiceProxy, UnitProxy};

/// What `systemctl status` would say about the unit, in short.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitState {
    /// active, reloading, inactive, failed, activating, deactivating.
    pub active_state: String,
    /// running, dead, auto-restart, ...
    pub sub_state: String,
    /// The main process, 0 when none.
    pub main_pid: u32,
    /// Automatic restarts since the unit was last started by hand (NRestarts, systemd 235+).
    pub restarts: u32,
    /// WatchdogSec= in microseconds; 0 when off.
    pub watchdog_usec: u64,
    /// The exit status of the main process's last run (78: a configuration error).
    pub exec_main_status: i32,
}

/// Asks systemd over the system bus about `unit` (for example "ferryd.service").
pub async fn query(unit: &str) -> Result<UnitState, String> {
    let bus = zbus::Connection::system()
        .await
        .map_err(|e| format!("no system bus: {e}"))?;
    let manager = ManagerProxy::new(&bus)
        .await
        .map_err(|e| format!("cannot reach systemd on the system bus: {e}"))?;
    let path = manager
        .get_unit(unit)
        .await
        .map_err(|e| format!("systemd does not know {unit}: {e}"))?;
    let unit_proxy = UnitProxy::builder(&bus)
        .path(path.clone())
        .map_err(|e| e.to_string())?
        .build()
        .await
        .map_err(|e| e.to_string())?;
    let service = ServiceProxy::builder(&bus)
        .path(path)
        .map_err(|e| e.to_string())?
        .build()
        .await
        .map_err(|e| e.to_string())?;
    let active_state = unit_proxy.active_state().await.map_err(|e| e.to_string())?;
    Ok(UnitState {
        active_state: format!("{active_state:?}").to_lowercase(),
        sub_state: unit_proxy.sub_state().await.map_err(|e| e.to_string())?,
        main_pid: service.main_pid().await.map_err(|e| e.to_string())?,
        restarts: service.n_restarts().await.map_err(|e| e.to_string())?,
        watchdog_usec: service.watchdog_usec().await.unwrap_or(0),
        exec_main_status: service.exec_main_status().await.unwrap_or(0),
    })
}
