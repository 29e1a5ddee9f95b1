//! Seccomp filters a test puts on a child process: Linux 4.15's system-call surface, or a
//! kernel that refuses splice.

use std::io::{self};
use std::process::Command;

/// Makes the child see the x86-64 system-call surface of Linux 4.15 (Ubuntu 18.04's kernel):
/// every call added later (io_pgetevents and rseq, 333-334; everything from 424 on: pidfd_*,
/// io_uring_*, clone3, close_range, openat2, ...) fails with ENOSYS. Installed with
/// seccomp in the child between fork and exec.
pub fn as_linux_4_15(command: &mut Command) {
    with_seccomp(command, &PROGRAM);
}

/// Installs the seccomp filter `program` in the child between fork and exec.
fn with_seccomp(command: &mut Command, program: &'static [libc::sock_filter]) {
    use std::os::unix::process::CommandExt;
    // SAFETY: only async-signal-safe prctl calls between fork and exec; `program` is static.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            let prog = libc::sock_fprog {
                len: program.len() as u16,
                filter: program.as_ptr() as *mut libc::sock_filter,
            };
            if libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const libc::sock_fprog,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

const fn bpf(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}
const LD_W_ABS: u16 = 0x20;
const JEQ_K: u16 = 0x15;
const JGE_K: u16 = 0x35;
const RET_K: u16 = 0x06;
const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
const RET_ALLOW: u32 = 0x7fff_0000;
const RET_ENOSYS: u32 = 0x0005_0000 | libc::ENOSYS as u32;
static PROGRAM: [libc::sock_filter; 9] = [
    bpf(LD_W_ABS, 0, 0, 4),              // 0: arch
    bpf(JEQ_K, 0, 5, AUDIT_ARCH_X86_64), // 1: other arch -> allow
    bpf(LD_W_ABS, 0, 0, 0),              // 2: syscall number
    bpf(JEQ_K, 4, 0, 333),               // 3: io_pgetevents -> ENOSYS
    bpf(JEQ_K, 3, 0, 334),               // 4: rseq -> ENOSYS
    bpf(JGE_K, 0, 1, 424),               // 5: below 424 -> allow
    bpf(JGE_K, 0, 1, 512),               // 6: 424..512 -> ENOSYS
    bpf(RET_K, 0, 0, RET_ALLOW),         // 7
    bpf(RET_K, 0, 0, RET_ENOSYS),        // 8
];

/// Makes every splice(2) in the child fail with EINVAL, as a kernel or socket type that cannot
/// splice answers: the relay must fall back to copying. Installed like [`as_linux_4_15`].
pub fn without_splice(command: &mut Command) {
    with_seccomp(command, &NO_SPLICE);
}

const RET_EINVAL: u32 = 0x0005_0000 | libc::EINVAL as u32;
static NO_SPLICE: [libc::sock_filter; 6] = [
    bpf(LD_W_ABS, 0, 0, 4),              // 0: arch
    bpf(JEQ_K, 0, 3, AUDIT_ARCH_X86_64), // 1: other arch -> allow
    bpf(LD_W_ABS, 0, 0, 0),              // 2: syscall number
    bpf(JEQ_K, 0, 1, 275),               // 3: splice -> EINVAL, else allow
    bpf(RET_K, 0, 0, RET_EINVAL),        // 4
    bpf(RET_K, 0, 0, RET_ALLOW),         // 5
];
