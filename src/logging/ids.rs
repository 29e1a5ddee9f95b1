//! Stable journal MESSAGE_IDs for the events an operator or a monitoring tool looks for, so that
//! `journalctl MESSAGE_ID=...` finds them whatever the wording of the line. An event carries one
//! as its `message_id` field, which the journal sink writes as MESSAGE_ID (and the text sink as
//! `message_id=`). Never change a value: it is an interface.

/// Every listener is bound and READY=1 was sent.
pub const READY: &str = "d04b9f585fec4200a9e10688cfb8d443";
/// A SIGHUP reload was applied.
pub const RELOADED: &str = "42189998de0740e8a62ec11a5ff8f63f";
/// A SIGHUP reload was rejected; the running configuration stays in force.
pub const RELOAD_REJECTED: &str = "7ab54b2f5ce448d2a41aa12b2668f9d7";
/// NAT could not be put in place (logged when the reason is new).
pub const NAT_FAILED: &str = "b1131590c383426aad0992083df7beee";
/// The daemon stopped after its drain.
pub const STOPPED: &str = "59e51f48b0814c9c8753b94127ba247f";
/// A live upgrade completed: the new program image took over every listener and connection.
pub const UPGRADED: &str = "be53090be0b945588d82afcbe642ce40";
/// A live upgrade was refused (the binary at ferryd's path cannot take over); nothing changed.
pub const UPGRADE_REFUSED: &str = "b1a044e8657b4659a7125405873c4519";
