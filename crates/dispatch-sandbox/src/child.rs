//! The child side of the spawn: the only `unsafe` code in the workspace outside tests.
//!
//! This runs between `fork` and `exec` in a copy of the multi-threaded helper, where only
//! async-signal-safe operations are allowed: every step below is one plain system call on data
//! prepared before the fork. Nothing allocates, locks or reads a file.
//!
//! std's `Command` only carries an errno from the child to the parent, so a failing step is
//! encoded as `step * STEP_SCALE + errno` and decoded by [`decode_spawn_error`].
#![allow(unsafe_code)]

use seccompiler::BpfProgram;
use std::ffi::CString;
use std::fmt;
use std::io;
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicI32, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildStep {
    Signals = 1,
    NewSession,
    Rlimits,
    SetGroups,
    SetGid,
    SetUid,
    VerifyIds,
    RootNotRegainable,
    ChangeDir,
    ParentDeathSignal,
    ParentAlive,
    NotDumpable,
    CloseFds,
    NoNewPrivs,
    Landlock,
    Seccomp,
    LaneGuard,
    Exec,
}

impl ChildStep {
    const ALL: [ChildStep; 18] = [
        ChildStep::Signals,
        ChildStep::NewSession,
        ChildStep::Rlimits,
        ChildStep::SetGroups,
        ChildStep::SetGid,
        ChildStep::SetUid,
        ChildStep::VerifyIds,
        ChildStep::RootNotRegainable,
        ChildStep::ChangeDir,
        ChildStep::ParentDeathSignal,
        ChildStep::ParentAlive,
        ChildStep::NotDumpable,
        ChildStep::CloseFds,
        ChildStep::NoNewPrivs,
        ChildStep::Landlock,
        ChildStep::Seccomp,
        ChildStep::LaneGuard,
        ChildStep::Exec,
    ];
}

impl fmt::Display for ChildStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChildStep::Signals => "block signals and reset their handlers",
            ChildStep::NewSession => "new session (setsid)",
            ChildStep::Rlimits => "resource limits (setrlimit)",
            ChildStep::SetGroups => "supplementary groups (setgroups)",
            ChildStep::SetGid => "group id (setresgid)",
            ChildStep::SetUid => "user id (setresuid)",
            ChildStep::VerifyIds => "verify uid/gid (getresuid/getresgid)",
            ChildStep::RootNotRegainable => "verify root cannot be regained",
            ChildStep::ChangeDir => "enter the lane work directory (chdir, as the lane user)",
            ChildStep::ParentDeathSignal => "parent death signal (PR_SET_PDEATHSIG)",
            ChildStep::ParentAlive => "parent still alive (getppid)",
            ChildStep::NotDumpable => "not dumpable (PR_SET_DUMPABLE 0)",
            ChildStep::CloseFds => "close inherited fds (close_range CLOEXEC)",
            ChildStep::NoNewPrivs => "no_new_privs (PR_SET_NO_NEW_PRIVS)",
            ChildStep::Landlock => "landlock (landlock_restrict_self)",
            ChildStep::Seccomp => "seccomp filter",
            ChildStep::LaneGuard => "lane guard fork",
            ChildStep::Exec => "exec of the dispatch program",
        })
    }
}

const STEP_SCALE: i32 = 10_000;

fn step_error(step: ChildStep, errno: i32) -> io::Error {
    io::Error::from_raw_os_error(step as i32 * STEP_SCALE + errno)
}

fn last_errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EINVAL)
}

/// Split an error from `Command::spawn` into the step that failed and the OS error.
pub(crate) fn decode_spawn_error(error: io::Error) -> (ChildStep, io::Error) {
    match error.raw_os_error() {
        Some(code) if code >= STEP_SCALE => {
            let step = ChildStep::ALL
                .into_iter()
                .find(|s| *s as i32 == code / STEP_SCALE)
                .unwrap_or(ChildStep::Exec);
            (step, io::Error::from_raw_os_error(code % STEP_SCALE))
        }
        _ => (ChildStep::Exec, error),
    }
}

/// Everything the child needs, as plain data.
pub(crate) struct ChildPlan {
    pub change_uid: bool,
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    pub groups: Vec<libc::gid_t>,
    pub rlimits: Vec<(libc::__rlimit_resource_t, libc::rlimit)>,
    pub helper_pid: libc::pid_t,
    pub work_dir: std::ffi::CString,
    pub landlock_fd: Option<RawFd>,
    pub seccomp: Vec<BpfProgram>,
    pub exec: ExecImage,
    /// The lane's stack for the instant between clone and execve.
    pub lane_stack: Vec<u8>,
}

pub(crate) fn install(command: &mut Command, mut plan: ChildPlan) {
    // SAFETY: the closure runs in the forked child before exec. `child_sequence` only makes
    // async-signal-safe system calls on data owned by `plan`, which was fully built before the
    // fork; it does not allocate, lock, or touch the parent's other threads' state.
    unsafe {
        command.pre_exec(move || child_sequence(&mut plan));
    }
}

fn check(step: ChildStep, rc: libc::c_long) -> io::Result<()> {
    if rc == -1 {
        Err(step_error(step, last_errno()))
    } else {
        Ok(())
    }
}

fn child_sequence(plan: &mut ChildPlan) -> io::Result<()> {
    // 0. Signals: this is a copy of the helper, whose runtime installed handlers for SIGTERM,
    //    SIGHUP and SIGINT. Block everything first (so the death signal armed below stays
    //    pending for the guard's sigwaitinfo instead of running a copied handler), then put every
    //    handler back to its default so neither the guard nor the lane inherits one.
    // SAFETY: sigset and sigaction calls on locals; an invalid signal number is simply refused.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        if libc::sigprocmask(libc::SIG_BLOCK, &all, std::ptr::null_mut()) == -1 {
            return Err(step_error(ChildStep::Signals, last_errno()));
        }
        let mut default: libc::sigaction = std::mem::zeroed();
        default.sa_sigaction = libc::SIG_DFL;
        for signal in 1..=libc::SIGRTMAX() {
            if signal != libc::SIGKILL && signal != libc::SIGSTOP {
                libc::sigaction(signal, &default, std::ptr::null_mut());
            }
        }
    }

    // 1. Own session and process group, so the helper can signal the whole lane at once.
    // SAFETY: setsid takes no arguments.
    let rc = unsafe { libc::setsid() };
    check(ChildStep::NewSession, rc.into())?;

    // 2. Resource limits, while still privileged (lowering needs no privilege, but a raise
    //    after the drop could be refused).
    for (resource, limit) in &plan.rlimits {
        // SAFETY: `limit` points to a valid rlimit for the duration of the call.
        let rc = unsafe { libc::setrlimit(*resource, limit) };
        check(ChildStep::Rlimits, rc.into())?;
    }

    // 3. Identity: groups, then gid, then uid (after setresuid we could no longer change the
    //    others).
    if plan.change_uid {
        // SAFETY: pointer and length describe `plan.groups`, alive for the call.
        let rc = unsafe { libc::setgroups(plan.groups.len(), plan.groups.as_ptr()) };
        check(ChildStep::SetGroups, rc.into())?;
        // SAFETY: plain integer arguments.
        let rc = unsafe { libc::setresgid(plan.gid, plan.gid, plan.gid) };
        check(ChildStep::SetGid, rc.into())?;
        // SAFETY: plain integer arguments.
        let rc = unsafe { libc::setresuid(plan.uid, plan.uid, plan.uid) };
        check(ChildStep::SetUid, rc.into())?;
    }
    verify_ids(plan)?;
    // Entered as the lane user, so the directory's own permissions apply and the helper needs
    // no capability to override them.
    // SAFETY: `work_dir` is a NUL-terminated string owned by `plan`.
    let rc = unsafe { libc::chdir(plan.work_dir.as_ptr()) };
    check(ChildStep::ChangeDir, rc.into())?;

    // 4. Death signal after the drop (changing credentials clears it). SIGTERM, not SIGKILL:
    //    the lane guard catches it and kills the whole process group (see `lane_guard`).
    let term = libc::SIGTERM as libc::c_ulong;
    // SAFETY: plain integer arguments.
    let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, term, 0, 0, 0) };
    check(ChildStep::ParentDeathSignal, rc.into())?;
    // The helper may have died before the signal was armed.
    // SAFETY: getppid takes no arguments.
    if unsafe { libc::getppid() } != plan.helper_pid {
        return Err(step_error(ChildStep::ParentAlive, libc::ESRCH));
    }

    // The guard keeps a copy of the helper's memory for the lane's lifetime: make sure the lane
    // cannot read it through /proc even when it runs as the same user (unprivileged mode). The
    // exec'd lane itself is dumpable again, as any program is.
    // SAFETY: plain integer arguments.
    let rc = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0 as libc::c_ulong, 0, 0, 0) };
    check(ChildStep::NotDumpable, rc.into())?;

    // 5. Nothing inherited survives exec. close_range(CLOSE_RANGE_CLOEXEC) rather than a plain
    //    close: std still needs its own error pipe until exec.
    // SAFETY: plain integer arguments.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    check(ChildStep::CloseFds, rc)?;

    // 6. no_new_privs: exec can no longer grant privileges (setuid bits, file capabilities).
    // SAFETY: plain integer arguments.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0) };
    check(ChildStep::NoNewPrivs, rc.into())?;

    // 7. Landlock, on the ruleset the helper built.
    if let Some(fd) = plan.landlock_fd {
        // SAFETY: `fd` is a Landlock ruleset fd owned by the prepared lane, open across the fork.
        let rc = unsafe { libc::syscall(libc::SYS_landlock_restrict_self, fd, 0u32) };
        check(ChildStep::Landlock, rc)?;
    }

    // 8. seccomp last, so that none of the steps above needed a syscall it denies.
    for program in &plan.seccomp {
        let fprog = libc::sock_fprog {
            len: program.len() as libc::c_ushort,
            // seccompiler's sock_filter has the kernel's layout (u16, u8, u8, u32).
            filter: program.as_ptr().cast::<libc::sock_filter>().cast_mut(),
        };
        let mode = libc::SECCOMP_SET_MODE_FILTER;
        // SAFETY: `fprog` points into `program`, alive for the call; the kernel copies it.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                mode,
                0 as libc::c_ulong,
                &raw const fprog,
            )
        };
        check(ChildStep::Seccomp, rc)?;
    }

    // 9. Split into the guard (this process, group leader) and the lane (its child, which
    //    execs the fixed argv).
    lane_guard(plan)
}

fn verify_ids(plan: &ChildPlan) -> io::Result<()> {
    let (mut ruid, mut euid, mut suid) = (0, 0, 0);
    let (mut rgid, mut egid, mut sgid) = (0, 0, 0);
    // SAFETY: the pointers are to live locals.
    let rc = unsafe { libc::getresuid(&mut ruid, &mut euid, &mut suid) };
    check(ChildStep::VerifyIds, rc.into())?;
    // SAFETY: the pointers are to live locals.
    let rc = unsafe { libc::getresgid(&mut rgid, &mut egid, &mut sgid) };
    check(ChildStep::VerifyIds, rc.into())?;
    if [ruid, euid, suid] != [plan.uid; 3] || [rgid, egid, sgid] != [plan.gid; 3] {
        return Err(step_error(ChildStep::VerifyIds, libc::EPERM));
    }
    if plan.uid != 0 {
        // SAFETY: plain integer arguments; success here is the failure we test for.
        let regained = unsafe { libc::setresuid(0, 0, 0) == 0 || libc::setresgid(0, 0, 0) == 0 };
        if regained {
            return Err(step_error(ChildStep::RootNotRegainable, libc::EPERM));
        }
    }
    Ok(())
}

/// The lane's exec arguments, built in the helper before the fork: the child cannot allocate.
pub(crate) struct ExecImage {
    _strings: Vec<CString>,
    path: *const libc::c_char,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
}

// SAFETY: the raw pointers point into the heap buffers of `_strings`, which this value owns and
// never mutates; a CString's buffer does not move when the CString (or the Vec) moves. The
// value is only read after construction, so sharing or sending it is sound.
unsafe impl Send for ExecImage {}
// SAFETY: see `Send`: the value is immutable after construction.
unsafe impl Sync for ExecImage {}

impl ExecImage {
    pub(crate) fn new(
        argv: &[String],
        env: &[(String, String)],
    ) -> Result<ExecImage, &'static str> {
        if argv.is_empty() {
            return Err("the argv is empty");
        }
        let mut strings = Vec::with_capacity(argv.len() + env.len());
        for arg in argv {
            strings.push(CString::new(arg.as_str()).map_err(|_| "an argument contains NUL")?);
        }
        for (name, value) in env {
            let entry = CString::new(format!("{name}={value}"))
                .map_err(|_| "an environment value contains NUL")?;
            strings.push(entry);
        }
        let pointers: Vec<*const libc::c_char> = strings.iter().map(|s| s.as_ptr()).collect();
        let (argv_ptrs, env_ptrs) = pointers.split_at(argv.len());
        let mut argv = argv_ptrs.to_vec();
        argv.push(std::ptr::null());
        let mut envp = env_ptrs.to_vec();
        envp.push(std::ptr::null());
        Ok(ExecImage {
            path: strings[0].as_ptr(),
            _strings: strings,
            argv,
            envp,
        })
    }
}

/// What the guard shares with the lane during the vfork-style clone (same memory until exec).
struct LaneStart<'a> {
    exec: &'a ExecImage,
    guard_pid: libc::pid_t,
    failed_step: AtomicI32,
    errno: AtomicI32,
}

/// Start the lane off a guard. The guard (this process) stays behind as the process-group
/// leader, with the death signal armed: when the helper dies (even by SIGKILL) the guard
/// receives SIGTERM, sees that its parent changed, and SIGKILLs the whole group, so no lane
/// process outlives the helper unless it deliberately left the group. A SIGTERM from the helper
/// itself (cancel, timeout) is left to the lane; the guard exits with the lane's status.
///
/// The lane is started like posix_spawn does it: clone(CLONE_VM | CLONE_VFORK) on a stack
/// allocated before the fork, straight into execve. Copying the address space a second time
/// would double the cost of every dispatch.
fn lane_guard(plan: &mut ChildPlan) -> io::Result<()> {
    // SAFETY: sigset operations on a local; signal numbers are valid.
    let guarded = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in [libc::SIGCHLD, libc::SIGTERM, libc::SIGHUP, libc::SIGINT] {
            libc::sigaddset(&mut set, signal);
        }
        set
    };
    // Every signal has been blocked since the start of the sequence, so none is lost between
    // the clone and sigwaitinfo.
    let start = LaneStart {
        exec: &plan.exec,
        // SAFETY: getpid takes no arguments.
        guard_pid: unsafe { libc::getpid() },
        failed_step: AtomicI32::new(0),
        errno: AtomicI32::new(0),
    };
    // The stack grows down on every architecture we build for: pass its 16-byte aligned top.
    let stack = plan.lane_stack.as_mut_ptr_range().end as usize & !0xf;
    // SAFETY: CLONE_VFORK suspends this process until the lane has exec'd or exited, so `start`
    // and the stack (owned by `plan`, not used by anyone else) outlive every use by the lane;
    // `lane_entry` only makes async-signal-safe calls and never returns.
    let lane_pid = unsafe {
        libc::clone(
            lane_entry,
            stack as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (&raw const start).cast_mut().cast(),
        )
    };
    if lane_pid == -1 {
        return Err(step_error(ChildStep::LaneGuard, last_errno()));
    }
    let failed_step = start.failed_step.load(Ordering::SeqCst);
    if failed_step != 0 {
        // The lane never ran: reap it and let std report the step to the helper.
        // SAFETY: `lane_pid` is our child; a null status pointer is allowed.
        unsafe { libc::waitpid(lane_pid, std::ptr::null_mut(), 0) };
        let step = if failed_step == ChildStep::Exec as i32 {
            ChildStep::Exec
        } else {
            ChildStep::LaneGuard
        };
        return Err(step_error(step, start.errno.load(Ordering::SeqCst)));
    }
    // SAFETY: the guard never returns to std: it drops every fd std gave it (its error pipe, so
    // the helper's spawn() completes now that the lane has exec'd), waits, and exits.
    unsafe { guard_loop(lane_pid, plan.helper_pid, &guarded) }
}

/// The lane's first and only code before execve, on the stack prepared by the helper.
extern "C" fn lane_entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `LaneStart` the guard passed to clone; the guard is suspended
    // (CLONE_VFORK) and keeps it alive until this process execs or exits.
    let start = unsafe { &*arg.cast::<LaneStart<'_>>() };
    let fail = |step: ChildStep, errno: i32| -> libc::c_int {
        start.errno.store(errno, Ordering::SeqCst);
        start.failed_step.store(step as i32, Ordering::SeqCst);
        // SAFETY: _exit is async-signal-safe and does not return.
        unsafe { libc::_exit(127) }
    };
    // SAFETY: (whole block) async-signal-safe calls on a local set, integers, and the exec
    // image's NUL-terminated strings and NULL-terminated pointer arrays.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        if libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) == -1
            || libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) == -1
        {
            return fail(ChildStep::LaneGuard, last_errno());
        }
        if libc::getppid() != start.guard_pid {
            return fail(ChildStep::LaneGuard, libc::ESRCH);
        }
        libc::execve(
            start.exec.path,
            start.exec.argv.as_ptr(),
            start.exec.envp.as_ptr(),
        );
    }
    fail(ChildStep::Exec, last_errno())
}

/// # Safety
/// Must only be called in the forked guard process, with `guarded` blocked.
unsafe fn guard_loop(
    lane_pid: libc::pid_t,
    helper_pid: libc::pid_t,
    guarded: &libc::sigset_t,
) -> ! {
    // SAFETY: (whole block) only async-signal-safe calls on locals and integers.
    unsafe {
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
        loop {
            let signal = libc::sigwaitinfo(guarded, std::ptr::null_mut());
            if signal == libc::SIGCHLD {
                let mut status = 0;
                if libc::waitpid(lane_pid, &mut status, libc::WNOHANG) == lane_pid {
                    exit_like(status);
                }
            } else if signal != -1 && libc::getppid() != helper_pid {
                // The helper is gone: take the whole group down with us.
                libc::kill(0, libc::SIGKILL);
                libc::_exit(128 + libc::SIGKILL);
            }
        }
    }
}

/// Exit the way the lane did, so the helper sees the lane's own exit code or signal.
///
/// # Safety
/// Only async-signal-safe calls; must run in the guard.
unsafe fn exit_like(status: libc::c_int) -> ! {
    // SAFETY: plain integer arguments and a local sigset.
    unsafe {
        if libc::WIFSIGNALED(status) {
            let signal = libc::WTERMSIG(status);
            libc::signal(signal, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, signal);
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::kill(libc::getpid(), signal);
            libc::_exit(128 + signal);
        }
        libc::_exit(libc::WEXITSTATUS(status));
    }
}
