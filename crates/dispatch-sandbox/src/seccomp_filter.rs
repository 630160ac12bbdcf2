//! The seccomp programs, compiled in the helper before the fork.
//!
//! Two programs:
//! - the deny list, compiled by seccompiler, returning EPERM (lanes run ssh, git and tmux, so an
//!   allow list would be a guess that breaks them), with seccompiler's own architecture check;
//! - a nine-instruction ABI gate, written out below: a foreign architecture is killed; x32
//!   syscall numbers (bit 30 set on x86_64) are refused wholesale, since a deny list keyed on
//!   x86_64 numbers would not match their x32 aliases; and `clone3` returns ENOSYS, not EPERM:
//!   its flags live in memory seccomp cannot read, and ENOSYS makes libc fall back to `clone`,
//!   whose flags the deny list does inspect.
//!
//! The gate is hand-written because every program is attached (verified, translated and
//! JIT-compiled by the kernel) once per spawner thread, and was once per lane: a third program
//! cost a measurable share of every spawn for two instructions.

use crate::{SandboxError, SandboxPolicy};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch, sock_filter,
};
use std::collections::BTreeMap;

/// Syscalls numbered after the architectures' tables were unified (424 and up), which the libc
/// crate does not name yet: the same number on every architecture we build for.
const SYS_STATMOUNT: i64 = 457;
const SYS_LISTMOUNT: i64 = 458;
const SYS_LSM_GET_SELF_ATTR: i64 = 459;
const SYS_LSM_SET_SELF_ATTR: i64 = 460;
const SYS_LSM_LIST_MODULES: i64 = 461;
const SYS_OPEN_TREE_ATTR: i64 = 467;
/// Protocols and a socket type the libc crate does not name (or only as deprecated).
const IPPROTO_L2TP: i32 = 115;
const IPPROTO_SMC: i32 = 256;
const SOCK_PACKET: i32 = 10;

/// Syscalls no lane has a reason to make: debugging other processes, kernel attack surface,
/// namespaces and mounts (sandbox escapes), keys, and host-wide settings. Checked against the
/// whole x86_64 table of 6.18: what is left allowed is what ordinary programs (ssh, git, a
/// shell, interpreters) use, plus harmless process-local calls.
const DENIED: &[(&str, i64)] = &[
    ("ptrace", libc::SYS_ptrace),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("fsopen", libc::SYS_fsopen),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fspick", libc::SYS_fspick),
    ("move_mount", libc::SYS_move_mount),
    ("open_tree", libc::SYS_open_tree),
    ("mount_setattr", libc::SYS_mount_setattr),
    ("pivot_root", libc::SYS_pivot_root),
    ("chroot", libc::SYS_chroot),
    ("unshare", libc::SYS_unshare),
    ("setns", libc::SYS_setns),
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("acct", libc::SYS_acct),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("reboot", libc::SYS_reboot),
    ("settimeofday", libc::SYS_settimeofday),
    ("clock_settime", libc::SYS_clock_settime),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("adjtimex", libc::SYS_adjtimex),
    ("sethostname", libc::SYS_sethostname),
    ("setdomainname", libc::SYS_setdomainname),
    ("iopl", libc::SYS_iopl),
    ("ioperm", libc::SYS_ioperm),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("name_to_handle_at", libc::SYS_name_to_handle_at),
    ("quotactl", libc::SYS_quotactl),
    ("vhangup", libc::SYS_vhangup),
    ("uselib", libc::SYS_uselib),
    // Another process's file descriptors, its memory policy and its kernel objects: what
    // ptrace would give, by other doors (stopped only by Landlock's scoping, ABI 6+, otherwise).
    ("pidfd_getfd", libc::SYS_pidfd_getfd),
    ("kcmp", libc::SYS_kcmp),
    ("process_madvise", libc::SYS_process_madvise),
    ("process_mrelease", libc::SYS_process_mrelease),
    ("get_robust_list", libc::SYS_get_robust_list),
    // The mount tree, read or changed.
    ("open_tree_attr", SYS_OPEN_TREE_ATTR),
    ("listmount", SYS_LISTMOUNT),
    ("statmount", SYS_STATMOUNT),
    // Host-wide watching and the kernel log.
    ("fanotify_init", libc::SYS_fanotify_init),
    ("fanotify_mark", libc::SYS_fanotify_mark),
    ("syslog", libc::SYS_syslog),
    ("lookup_dcookie", libc::SYS_lookup_dcookie),
    // LSM attributes of the lane itself (the sandbox is not the lane's to inspect or change).
    ("lsm_get_self_attr", SYS_LSM_GET_SELF_ATTR),
    ("lsm_set_self_attr", SYS_LSM_SET_SELF_ATTR),
    ("lsm_list_modules", SYS_LSM_LIST_MODULES),
    ("quotactl_fd", libc::SYS_quotactl_fd),
    // Obsolete interfaces, kept by kernels for old binaries: attack surface only.
    ("_sysctl", libc::SYS__sysctl),
    ("sysfs", libc::SYS_sysfs),
    ("ustat", libc::SYS_ustat),
    ("remap_file_pages", libc::SYS_remap_file_pages),
    ("modify_ldt", libc::SYS_modify_ldt),
    ("epoll_ctl_old", libc::SYS_epoll_ctl_old),
    ("epoll_wait_old", libc::SYS_epoll_wait_old),
];

/// Namespace-creating clone flags.
const NAMESPACE_FLAGS: &[u64] = &[
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWCGROUP as u64,
];

const X32_SYSCALL_BIT: u32 = 0x4000_0000;

pub(crate) fn compile(policy: &SandboxPolicy) -> Result<Vec<BpfProgram>, SandboxError> {
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| SandboxError::Seccomp(format!("unsupported architecture: {e:?}")))?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED.iter().map(|&(_, nr)| (nr, Vec::new())).collect();
    rules.extend(argument_rules()?);
    rules.insert(libc::SYS_socket, socket_rules(policy)?);
    let deny = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| SandboxError::Seccomp(format!("build deny list: {e}")))?;
    let deny = BpfProgram::try_from(deny)
        .map_err(|e| SandboxError::Seccomp(format!("compile deny list: {e}")))?;
    Ok(vec![abi_gate(arch), deny])
}

fn cond(arg: u8, len: Len, op: Op, value: u64) -> Result<SeccompCondition, SandboxError> {
    SeccompCondition::new(arg, len, op, value)
        .map_err(|e| SandboxError::Seccomp(format!("condition on arg {arg}: {e}")))
}

/// A rule matches when all its conditions hold.
fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, SandboxError> {
    SeccompRule::new(conditions).map_err(|e| SandboxError::Seccomp(format!("rule: {e}")))
}

/// System calls refused only for some arguments (any matching rule refuses), sockets aside.
fn argument_rules() -> Result<Vec<(i64, Vec<SeccompRule>)>, SandboxError> {
    Ok(vec![
        // Injecting keystrokes into a terminal. The command is compared as 32 bits: the kernel
        // truncates it to unsigned int, and a 64-bit compare could be dodged by setting the
        // upper half (CVE-2019-10063).
        (
            libc::SYS_ioctl,
            vec![
                rule(vec![cond(1, Len::Dword, Op::Eq, libc::TIOCSTI)?])?,
                rule(vec![cond(1, Len::Dword, Op::Eq, libc::TIOCLINUX)?])?,
            ],
        ),
        // Changing the execution domain (personality(0xffffffff) only queries it).
        (
            libc::SYS_personality,
            vec![rule(vec![
                cond(0, Len::Dword, Op::Ne, 0)?,
                cond(0, Len::Dword, Op::Ne, 0xffff_ffff)?,
            ])?],
        ),
        // clone with any namespace flag.
        (
            libc::SYS_clone,
            NAMESPACE_FLAGS
                .iter()
                .map(|&flag| rule(vec![cond(0, Len::Qword, Op::MaskedEq(flag), flag)?]))
                .collect::<Result<_, _>>()?,
        ),
        // A connected pair reaches nothing outside the lane: only AF_UNIX, always.
        (
            libc::SYS_socketpair,
            vec![rule(vec![cond(
                0,
                Len::Dword,
                Op::Ne,
                libc::AF_UNIX as u64,
            )?])?],
        ),
    ])
}

/// Sockets of the families lanes use and no others (netlink, packet, crypto, vsock, … are
/// kernel attack surface and nothing ssh or git needs): a socket of any other family is
/// refused, as one condition per allowed family, all of which must hold to refuse.
fn socket_rules(policy: &SandboxPolicy) -> Result<Vec<SeccompRule>, SandboxError> {
    let mut families = vec![libc::AF_INET, libc::AF_INET6];
    if policy.allow_unix_sockets {
        families.push(libc::AF_UNIX);
    }
    let not_allowed = families
        .iter()
        .map(|&family| cond(0, Len::Dword, Op::Ne, family as u64))
        .collect::<Result<Vec<_>, _>>()?;
    let mut rules = vec![rule(not_allowed)?];
    // Within the Internet families, only the stream and datagram sockets ssh, git and the
    // resolver use: raw, reliable-datagram, seqpacket (SCTP), DCCP and packet sockets, and the
    // protocols that load rarely used kernel modules, are refused.
    for family in [libc::AF_INET, libc::AF_INET6] {
        for kind in [
            libc::SOCK_RAW,
            libc::SOCK_RDM,
            libc::SOCK_SEQPACKET,
            libc::SOCK_DCCP,
            SOCK_PACKET,
        ] {
            rules.push(rule(vec![
                cond(0, Len::Dword, Op::Eq, family as u64)?,
                cond(1, Len::Dword, Op::MaskedEq(0xf), kind as u64)?,
            ])?);
        }
    }
    for protocol in [
        libc::IPPROTO_DCCP,
        IPPROTO_L2TP,
        libc::IPPROTO_SCTP,
        IPPROTO_SMC,
        libc::IPPROTO_MPTCP,
    ] {
        rules.push(rule(vec![cond(2, Len::Dword, Op::Eq, protocol as u64)?])?);
    }
    Ok(rules)
}

const SECCOMP_DATA_NR: u32 = 0;
const SECCOMP_DATA_ARCH: u32 = 4;

/// The audit architecture seccomp reports for native syscalls (linux/audit.h).
fn native_audit_arch(arch: TargetArch) -> u32 {
    const EM_X86_64: u32 = 62;
    const EM_AARCH64: u32 = 183;
    const EM_RISCV: u32 = 243;
    const ARCH_64BIT: u32 = 0x8000_0000;
    const LITTLE_ENDIAN: u32 = 0x4000_0000;
    ARCH_64BIT
        | LITTLE_ENDIAN
        | match arch {
            TargetArch::x86_64 => EM_X86_64,
            TargetArch::aarch64 => EM_AARCH64,
            TargetArch::riscv64 => EM_RISCV,
        }
}

/// Kill a foreign architecture, refuse x32 numbers, and answer `clone3` with ENOSYS.
fn abi_gate(arch: TargetArch) -> BpfProgram {
    let stmt = |code: u32, k: u32| sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |code: u32, k: u32, jt: u8, jf: u8| sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let load = |offset: u32| stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, offset);
    let ret = |value: u32| stmt(libc::BPF_RET | libc::BPF_K, value);
    let if_equal =
        |k: u32, jt: u8, jf: u8| jump(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, k, jt, jf);
    let x32_numbers = if cfg!(target_arch = "x86_64") {
        X32_SYSCALL_BIT
    } else {
        // No such ABI elsewhere: a number no syscall reaches keeps the program shape the same.
        u32::MAX
    };
    vec![
        /* 0 */ load(SECCOMP_DATA_ARCH),
        /* 1 */ if_equal(native_audit_arch(arch), 1, 0),
        /* 2 */ ret(libc::SECCOMP_RET_KILL_PROCESS),
        /* 3 */ load(SECCOMP_DATA_NR),
        /* 4 */
        jump(
            libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K,
            x32_numbers,
            3,
            0,
        ),
        /* 5 */ if_equal(libc::SYS_clone3 as u32, 0, 1),
        /* 6 */ ret(libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
        /* 7 */ ret(libc::SECCOMP_RET_ALLOW),
        /* 8 */ ret(libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_compile_and_fit_the_kernel_limit() {
        let programs = compile(&SandboxPolicy::default()).unwrap();
        assert_eq!(programs.len(), 2);
        for program in programs {
            assert!(
                !program.is_empty() && program.len() < 4096,
                "{} instructions",
                program.len()
            );
        }
    }

    #[test]
    fn deny_list_has_no_duplicates() {
        let mut numbers: Vec<i64> = DENIED.iter().map(|(_, nr)| *nr).collect();
        numbers.sort_unstable();
        numbers.dedup();
        assert_eq!(numbers.len(), DENIED.len());
    }
}
