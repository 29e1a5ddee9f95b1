//! The system calls of a live upgrade: the document's memfd, which descriptors cross execve,
//! the execve itself, and, in a new image whose document was refused, closing what was
//! inherited so nothing is held open by nobody.

use std::ffi::{CString, OsString};
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::fcntl::{FcntlArg, FdFlag, fcntl};

/// Writes `bytes` into a new memfd (close-on-exec, rewound), for the next image to read.
pub fn memfd_with(bytes: &[u8]) -> io::Result<OwnedFd> {
    let name = c"ferryd-handover";
    // SAFETY: a valid NUL-terminated name and flags; the kernel returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_memfd_create, name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just created and nothing else owns it.
    let mut file = unsafe { File::from_raw_fd(fd as RawFd) };
    file.write_all(bytes)?;
    file.rewind()?;
    Ok(file.into())
}

/// Reads a document from the descriptor the previous image named, at most `limit` bytes (one
/// more is read to tell an oversized document from one of exactly that size).
pub fn read_all(fd: OwnedFd, limit: usize) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    File::from(fd).take(limit as u64 + 1).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Lets `fd` cross execve (clears FD_CLOEXEC).
pub fn inherit(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a number; an unknown descriptor is an EBADF error, not undefined behaviour.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    fcntl(borrowed, FcntlArg::F_SETFD(FdFlag::empty()))?;
    Ok(())
}

/// Makes `fd` close-on-exec again, after an exec that failed: nothing this image forks may
/// inherit it. A descriptor that cannot take the flag is left as it is (it was open a moment ago;
/// the only error is EBADF).
pub fn keep_private(fd: RawFd) {
    // SAFETY: fcntl on a number; an unknown descriptor is an EBADF error, not undefined behaviour.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let _ = fcntl(borrowed, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
}

/// Whether `fd` is open and crossed execve (FD_CLOEXEC clear).
pub fn inherited(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only reads the descriptor's flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    flags >= 0 && flags & libc::FD_CLOEXEC == 0
}

/// Replaces this program image with `exe`, same process. Returns only on failure.
pub fn execve(exe: &Path, args: &[OsString], env: &[(OsString, OsString)]) -> io::Error {
    let cstring = |bytes: &[u8]| {
        CString::new(bytes).map_err(|_| io::Error::other("a NUL byte in an argument or the environment"))
    };
    let path = match cstring(exe.as_os_str().as_bytes()) {
        Ok(path) => path,
        Err(e) => return e,
    };
    let argv: Result<Vec<CString>, io::Error> = args.iter().map(|a| cstring(a.as_bytes())).collect();
    let envp: Result<Vec<CString>, io::Error> = env
        .iter()
        .map(|(k, v)| cstring(&[k.as_bytes(), b"=", v.as_bytes()].concat()))
        .collect();
    let (argv, envp) = match (argv, envp) {
        (Ok(argv), Ok(envp)) => (argv, envp),
        (Err(e), _) | (_, Err(e)) => return e,
    };
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut envp_ptrs: Vec<*const libc::c_char> = envp.iter().map(|e| e.as_ptr()).collect();
    envp_ptrs.push(std::ptr::null());
    // SAFETY: NUL-terminated strings and NULL-terminated arrays that outlive the call; execve
    // returns only on failure.
    unsafe { libc::execve(path.as_ptr(), argv_ptrs.as_ptr(), envp_ptrs.as_ptr()) };
    io::Error::last_os_error()
}

/// Closes every descriptor above stderr that crossed execve (FD_CLOEXEC clear), except listening
/// TCP sockets, which it returns: in a new image whose handover document was refused, the
/// connections and pipes are the previous image's, which nobody will serve; a connected socket
/// is reset, so its peer learns at once instead of waiting on a silent connection (and never
/// takes a cut stream for a complete one). The listeners are kept for the daemon to claim by
/// their address: closing them would refuse the connects waiting in their backlogs, and under
/// systemd, whose fd store holds a copy of each, binding their ports again would fail.
/// Returns how many were closed, and the listeners kept.
pub fn close_inherited() -> (usize, Vec<std::net::TcpListener>) {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return (0, Vec::new());
    };
    let fds: Vec<RawFd> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    let mut closed = 0;
    let mut listeners = Vec::new();
    for fd in fds {
        // SAFETY: F_GETFD only reads the descriptor's flags.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags < 0 || flags & libc::FD_CLOEXEC != 0 {
            continue;
        }
        // SAFETY: an inherited descriptor no part of this image owns (everything this image
        // opens is close-on-exec); taking it to keep or close it exactly once.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let socket = socket2::SockRef::from(&owned);
        let tcp = socket.r#type().is_ok_and(|t| t == socket2::Type::STREAM)
            && socket.local_addr().is_ok_and(|a| a.as_socket().is_some());
        if tcp && socket.is_listener().unwrap_or(false) {
            if socket.set_cloexec(true).is_ok() && socket.set_nonblocking(true).is_ok() {
                listeners.push(std::net::TcpListener::from(owned));
                continue;
            }
        } else if socket.r#type().is_ok() {
            let _ = socket.set_linger(Some(std::time::Duration::ZERO));
        }
        drop(owned);
        closed += 1;
    }
    (closed, listeners)
}
