//! Sealing the sandbox a little further, before any child exists: a seccomp filter, stacked on Docker's
//! default profile and inherited by every process of the session, makes ptrace, process_vm_readv,
//! process_vm_writev and pidfd_getfd fail with EPERM, and this process marks itself non-dumpable.
//! It owns the BPF program and its installation; whether to start without it is `main`'s to decide.

use std::io;

use crate::sys::{c_int, c_ulong, prctl};

#[repr(C)]
struct SockFilter {
    code: u16,
    jt: u8,
    jf: u8,
    k: u32,
}

#[repr(C)]
struct SockFprog {
    len: u16,
    filter: *const SockFilter,
}

/// Offsets of `nr` and `arch` in `struct seccomp_data`.
const SECCOMP_NR: u32 = 0;
const SECCOMP_ARCH: u32 = 4;
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JEQ_K: u16 = 0x15;
const BPF_JGE_K: u16 = 0x35;
const BPF_RET_K: u16 = 0x06;
const RET_ALLOW: u32 = 0x7FFF_0000;
/// SECCOMP_RET_ERRNO | EPERM.
const RET_EPERM: u32 = 0x0005_0000 | 1;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
/// Per audit architecture: ptrace, process_vm_readv, process_vm_writev, pidfd_getfd. Each native
/// architecture comes with its 32-bit compat one (int 0x80 on x86_64, AArch32 on arm64), which Docker's
/// profile allows too.
const DENIED: [(u32, [u32; 4]); 4] = [
    (AUDIT_ARCH_X86_64, [101, 310, 311, 438]), // x32 calls: all refused
    (0x4000_0003, [26, 347, 348, 438]),        // AUDIT_ARCH_I386
    (0xC000_00B7, [117, 270, 271, 438]),       // AUDIT_ARCH_AARCH64
    (0x4000_0028, [26, 376, 377, 438]),        // AUDIT_ARCH_ARM
];
const PR_SET_DUMPABLE: c_int = 4;
const PR_SET_SECCOMP: c_int = 22;
const PR_SET_NO_NEW_PRIVS: c_int = 38;
const SECCOMP_MODE_FILTER: c_ulong = 2;

fn ins(code: u16, jt: u8, jf: u8, k: u32) -> SockFilter {
    SockFilter { code, jt, jf, k }
}

/// The classic BPF program: per known architecture, EPERM for its denied calls; any other architecture,
/// EPERM for every call (fail closed: its numbers mean something else).
fn seccomp_program() -> Vec<SockFilter> {
    let mut prog = Vec::new();
    for (arch, denied) in DENIED.iter() {
        let mut checks: Vec<(u16, u32)> = Vec::new();
        if *arch == AUDIT_ARCH_X86_64 {
            checks.push((BPF_JGE_K, X32_SYSCALL_BIT));
        }
        checks.extend(denied.iter().map(|n| (BPF_JEQ_K, *n)));
        let mut block = vec![ins(BPF_LD_W_ABS, 0, 0, SECCOMP_NR)];
        for (i, (code, k)) in checks.iter().enumerate() {
            block.push(ins(*code, (checks.len() - i) as u8, 0, *k)); // jump to the block's EPERM
        }
        block.push(ins(BPF_RET_K, 0, 0, RET_ALLOW));
        block.push(ins(BPF_RET_K, 0, 0, RET_EPERM));
        prog.push(ins(BPF_LD_W_ABS, 0, 0, SECCOMP_ARCH));
        prog.push(ins(BPF_JEQ_K, 0, block.len() as u8, *arch)); // not this architecture: skip its block
        prog.extend(block);
    }
    prog.push(ins(BPF_RET_K, 0, 0, RET_EPERM));
    prog
}

/// Installs the filter and drops dumpability; an error message if it cannot.
pub fn sandbox() -> Result<(), String> {
    if !cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) {
        return Err(format!("unknown architecture {:?}: no seccomp filter for it", std::env::consts::ARCH));
    }
    let prog = seccomp_program();
    let fprog = SockFprog { len: prog.len() as u16, filter: prog.as_ptr() };
    let steps: [(&str, c_int, c_ulong, c_ulong); 3] = [
        ("PR_SET_NO_NEW_PRIVS", PR_SET_NO_NEW_PRIVS, 1, 0),
        ("PR_SET_SECCOMP", PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &fprog as *const SockFprog as c_ulong),
        ("PR_SET_DUMPABLE", PR_SET_DUMPABLE, 0, 0),
    ];
    for (name, option, arg, ptr) in steps.iter() {
        // SAFETY: prctl with integer arguments and, for PR_SET_SECCOMP, a pointer to a live sock_fprog.
        if unsafe { prctl(*option, *arg, *ptr, 0, 0) } != 0 {
            return Err(format!("prctl({}): {}", name, io::Error::last_os_error()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_has_one_block_per_architecture_and_fails_closed() {
        let prog = seccomp_program();
        // Per architecture: load arch, jump, load nr, checks (+ x32 on x86_64), allow, deny; then deny.
        assert_eq!(prog.len(), 4 * 9 + 1 + 1);
        assert_eq!(prog.last().map(|i| i.k), Some(RET_EPERM));
        assert_eq!(prog[1].k, AUDIT_ARCH_X86_64);
        assert_eq!(prog[1].jf as usize, 8);
    }
}
