//! The relay holds no privilege. The shipped unit starts it with every capability set empty; this
//! makes sure of it wherever it was started from: a live upgrade from a version whose relay kept
//! NAT's capabilities (they survive an execve), or a start by hand with capabilities in hand.
//!
//! It must run while the process has one thread: capabilities belong to each thread, and every
//! thread started later copies the one that starts it.

/// `_LINUX_CAPABILITY_VERSION_3` (linux/capability.h): two 32-bit words per set.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Empties the ambient, inheritable, permitted and effective capability sets of this (single-
/// threaded) process, unless it runs as root (a relay started by hand as root keeps what root
/// has: the operator chose it). The bounding set is left: emptying it needs CAP_SETPCAP, and with
/// the other sets empty and no_new_privs (the unit sets it) nothing can be regained from it.
/// Returns whether anything was held and dropped.
pub fn drop_all() -> std::io::Result<bool> {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } == 0 {
        return Ok(false);
    }
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: a valid version 3 header and room for the two words version 3 writes.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let held = data
        .iter()
        .any(|d| d.effective != 0 || d.permitted != 0 || d.inheritable != 0);
    // SAFETY: prctl with integer arguments only.
    let ambient = unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) };
    if ambient != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if held {
        let empty = [CapData::default(); 2];
        // SAFETY: a valid version 3 header and the two words version 3 reads.
        let rc = unsafe { libc::syscall(libc::SYS_capset, &header, empty.as_ptr()) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(held)
}
