//! systemd's fd store kept to exactly the listening sockets in use, under their current names,
//! by one mechanism for start-up and reload: what is in use and what is stale is gathered as
//! sockets are claimed, bound or dropped, then applied at once ([`FdStore::sync`]).
//!
//! It must not bind or close a socket: it only tells systemd which descriptors to keep, so that
//! a restart (or a crash) finds every port still open and queueing.

use std::net::TcpListener;
use std::os::fd::AsFd;

use crate::systemd::notify::Notifier;

/// What the fd store is to hold, gathered before it is told.
#[derive(Debug, Default)]
pub(super) struct FdStore {
    /// Names to remove: sockets no longer in use, and names that now stand for another socket.
    stale: Vec<String>,
    /// Sockets to store, each under its name (a descriptor of its own, closed once sent).
    current: Vec<(String, TcpListener)>,
}

impl FdStore {
    /// `socket` is in use under `name`, as it was passed in under `passed` (systemd's store or
    /// socket activation; empty when bound here): an entry under another name is stale. systemd
    /// ignores a copy of a socket it already holds, so storing it again costs nothing.
    pub(super) fn keep(&mut self, name: &str, passed: &str, socket: &TcpListener) {
        if self.store(name, socket) && !passed.is_empty() && passed != name {
            self.stale.push(passed.to_string());
        }
    }

    /// `socket` now stands for `name`, in place of whatever the store held under it.
    pub(super) fn replace(&mut self, name: &str, socket: &TcpListener) {
        if self.store(name, socket) {
            self.stale.push(name.to_string());
        }
    }

    /// `name` stands for no socket any more (an unclaimed one, a removed route).
    pub(super) fn forget(&mut self, name: String) {
        self.stale.push(name);
    }

    /// Whether a descriptor of `socket` could be kept to send. Without one (no descriptor left),
    /// nothing the store holds is removed for it: an older entry is better than none.
    fn store(&mut self, name: &str, socket: &TcpListener) -> bool {
        match socket.try_clone() {
            Ok(dup) => {
                self.current.push((name.to_string(), dup));
                true
            }
            Err(_) => false,
        }
    }

    /// Tells systemd: every stale name goes first, then every socket is stored (in two passes, so
    /// two routes that swapped addresses lose neither socket).
    pub(super) fn sync(self, notifier: &Notifier) {
        for name in &self.stale {
            notifier.remove_fd(name);
        }
        for (name, socket) in &self.current {
            notifier.store_fd(name, socket.as_fd());
        }
    }
}
