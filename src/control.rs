//! The control socket: a local Unix socket through which a privileged user ends a relayed
//! connection on purpose (`ferryd connections --close ID`).
//!
//! Who may use it is decided by the kernel first, the way HAProxy's stats socket does it: the
//! socket is mode 0660 in a directory of the daemon's own (`/run/ferryd`, mode 0750), so only
//! root, the daemon's user and members of its group can connect at all. Reading the listing
//! needs no privilege beyond the health endpoint's `metrics_allow`, but HTTP on loopback is open
//! to every local user, so ending a connection is never offered there. The daemon then checks
//! the peer's credentials itself (SO_PEERCRED, and the peer's groups), so a socket whose mode was
//! widened by hand still refuses everyone else, and it logs who asked.
//!
//! The protocol is one line each way: `close ID` is answered `ok ...` or `error ...`. Every
//! client is bounded (one line of at most [`MAX_LINE`] bytes within [`CLIENT_TIMEOUT`], at most
//! [`MAX_CLIENTS`] at once). This module must not decide how a connection ends: it asks the
//! connection (see [`crate::connections::Live::close`]), and the relay resets both sides.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use crate::connections::Table;
use crate::logging::RateLimit;
use crate::relay::Engine;

/// The socket's mode: read and write (connect) for the daemon's user and group only.
const SOCKET_MODE: u32 = 0o660;
/// A request is one short line; anything longer is refused.
pub const MAX_LINE: usize = 256;
/// A client has this long to send its line and read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a refused client's request is waited for before the refusal is written: long enough
/// for the line `ferryd connections` sends at once, short enough that refused clients cannot keep
/// the [`MAX_CLIENTS`] slots from those who may close connections.
const REFUSED_READ: Duration = Duration::from_millis(200);
/// Clients served at once; more are closed at once (this is an administrator's tool, not a
/// service).
const MAX_CLIENTS: usize = 8;

/// Binds the control socket at `path` and serves it on a task of the current runtime, until the
/// process ends. A socket file left by an earlier process (a restart, or the image before a live
/// upgrade) is replaced; one another process still listens on is not. Returns why the socket
/// cannot be had: the caller logs it, and the relay runs without it.
pub fn spawn(path: &Path, engine: Arc<Engine>) -> Result<(), String> {
    let listener = bind(path)?;
    let path = path.to_path_buf();
    tokio::spawn(serve(listener, path, engine));
    Ok(())
}

fn bind(path: &Path) -> Result<UnixListener, String> {
    let shown = path.display();
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(format!("{shown} exists and is not a socket; remove it"));
        }
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(format!(
                    "{shown} is in use by another process (is a second ferryd running?)"
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path)
                    .map_err(|e| format!("cannot replace the stale socket {shown}: {e}"))?;
            }
            Err(e) => return Err(format!("cannot tell whether {shown} is in use: {e}")),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot look at {shown}: {e}")),
    }
    let listener = UnixListener::bind(path).map_err(|e| {
        let hint = match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied => {
                " (the unit's RuntimeDirectory=ferryd makes /run/ferryd; elsewhere set control_socket to a directory this user may write, or \"\" to turn it off)"
            }
            _ => "",
        };
        format!("cannot listen on {shown}: {e}{hint}")
    })?;
    // Created with the umask's mode (the unit's 0077 gives 0600, stricter than wanted), then
    // opened to the group.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(|e| format!("cannot set the mode of {shown}: {e}"))?;
    Ok(listener)
}

async fn serve(listener: UnixListener, path: PathBuf, engine: Arc<Engine>) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    let error_log = RateLimit::new();
    tracing::info!(path = %path.display(), "control socket listening (root, the daemon's user and its group may end connections)");
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                if let Some(suppressed) = error_log.admit() {
                    tracing::warn!(path = %path.display(), error = %e, suppressed, "control socket: accept failed");
                }
                // Out of descriptors or memory: let the relay have them for a moment.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let engine = engine.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(CLIENT_TIMEOUT, serve_client(stream, &engine.table)).await;
            drop(permit);
        });
    }
}

async fn serve_client(mut stream: UnixStream, table: &Table) {
    let answer = match stream.peer_cred() {
        Err(e) => format!("error: cannot read your credentials: {e}"),
        Ok(cred) => match authorized(cred.uid(), cred.gid(), cred.pid()) {
            Err(why) => {
                tracing::warn!(
                    uid = cred.uid(),
                    pid = cred.pid(),
                    "control socket: refused a client: {why}"
                );
                // Read the request first, unheeded: a socket closed with unread bytes is reset,
                // and the refusal would never reach the one refused.
                let _ = tokio::time::timeout(REFUSED_READ, read_line(&mut stream)).await;
                format!("error: {why}")
            }
            Ok(()) => match read_line(&mut stream).await {
                Err(e) => format!("error: {e}"),
                Ok(line) => answer(&line, table, cred.uid(), cred.pid()),
            },
        },
    };
    let _ = stream.write_all(format!("{answer}\n").as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Whether the peer is root, the daemon's user, or in the daemon's group (primary or
/// supplementary, the latter read from /proc).
fn authorized(uid: u32, gid: u32, pid: Option<i32>) -> Result<(), String> {
    // SAFETY: these have no preconditions.
    let (own_uid, own_gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if uid == 0 || uid == own_uid || gid == own_gid {
        return Ok(());
    }
    let refused =
        || format!("only root, uid {own_uid} and members of group {own_gid} may use the control socket");
    let pid = pid.ok_or_else(refused)?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|_| refused())?;
    let in_group = status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .is_some_and(|groups| groups.split_whitespace().any(|g| g.parse() == Ok(own_gid)));
    if in_group { Ok(()) } else { Err(refused()) }
}

async fn read_line(stream: &mut UnixStream) -> Result<String, String> {
    let mut buf = Vec::with_capacity(64);
    let mut chunk = [0u8; 64];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("cannot read the request: {e}"))?;
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.iter().position(|b| *b == b'\n') {
            buf.truncate(end);
            break;
        }
        if buf.len() > MAX_LINE {
            return Err(format!("request longer than {MAX_LINE} bytes"));
        }
        if n == 0 {
            break;
        }
    }
    String::from_utf8(buf).map_err(|_| "request is not UTF-8".to_string())
}

/// The answer to one request line from the user `uid` (process `pid`).
fn answer(line: &str, table: &Table, uid: u32, pid: Option<i32>) -> String {
    let mut words = line.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some("close"), Some(id), None) => {
            let Ok(id) = id.parse::<u64>() else {
                return format!("error: {id:?} is not a connection id");
            };
            let Some(live) = table.get(id) else {
                return format!("error: no relayed connection has id {id} (ended already, or never relayed)");
            };
            let by = match pid {
                Some(pid) => format!("uid {uid} (pid {pid})"),
                None => format!("uid {uid}"),
            };
            tracing::info!(conn = id, route = %live.who.route, client = %live.who.client, by = %by, "closing a connection at an administrator's request");
            live.close(by);
            format!(
                "ok: connection {id} (route {}, client {}) is being closed: both sides reset",
                live.who.route, live.who.client
            )
        }
        _ => format!("error: unknown request {line:?} (this socket takes \"close ID\")"),
    }
}
