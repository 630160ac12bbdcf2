//! The child side of the spawn: with `reaper.rs`, the only `unsafe` code in the workspace
//! outside tests.
//!
//! A lane is started the way `posix_spawn` starts a process: `clone(CLONE_VM | CLONE_VFORK)` on a
//! stack owned by the spawner thread, which stays suspended until the child has called `execve`
//! (or exited). Until then the child runs inside the helper's memory, so:
//! - every step is one plain system call on data prepared before the clone: nothing allocates,
//!   locks, panics, or reads what the helper's other threads may be writing;
//! - credentials change through raw system calls: glibc's `setres*id` wrappers would try to
//!   broadcast the change to every thread on the helper's thread list, which the child shares;
//! - a failing step is reported through [`ChildReport`], in the suspended parent's frame.
//!
//! A fork would copy the helper's page tables for every dispatch: measured, that alone made a
//! sandboxed spawn cost 1.2× a bare one (see `benches/sandbox_spawn.rs`).
#![allow(unsafe_code)]

use seccompiler::BpfProgram;
use std::ffi::CString;
use std::fmt;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildStep {
    Signals = 1,
    JoinCgroup,
    NewSession,
    RegisterWithReaper,
    Stdio,
    Rlimits,
    SetGroups,
    SetGid,
    SetUid,
    AmbientCapabilities,
    VerifyIds,
    RootNotRegainable,
    MakeWorkDir,
    ChangeDir,
    ParentDeathSignal,
    ParentAlive,
    CloseFds,
    NoNewPrivs,
    Landlock,
    Seccomp,
    Gate,
    Exec,
    Clone,
    EndedBeforeExec,
}

impl ChildStep {
    const ALL: [ChildStep; 24] = [
        ChildStep::Signals,
        ChildStep::JoinCgroup,
        ChildStep::NewSession,
        ChildStep::RegisterWithReaper,
        ChildStep::Stdio,
        ChildStep::Rlimits,
        ChildStep::SetGroups,
        ChildStep::SetGid,
        ChildStep::SetUid,
        ChildStep::AmbientCapabilities,
        ChildStep::VerifyIds,
        ChildStep::RootNotRegainable,
        ChildStep::MakeWorkDir,
        ChildStep::ChangeDir,
        ChildStep::ParentDeathSignal,
        ChildStep::ParentAlive,
        ChildStep::CloseFds,
        ChildStep::NoNewPrivs,
        ChildStep::Landlock,
        ChildStep::Seccomp,
        ChildStep::Gate,
        ChildStep::Exec,
        ChildStep::Clone,
        ChildStep::EndedBeforeExec,
    ];

    fn from_code(code: i32) -> ChildStep {
        ChildStep::ALL
            .into_iter()
            .find(|step| *step as i32 == code)
            .unwrap_or(ChildStep::Exec)
    }
}

impl fmt::Display for ChildStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChildStep::Signals => "block, reset or unblock signals (rt_sigprocmask, rt_sigaction)",
            ChildStep::JoinCgroup => "enter the lane's cgroup (cgroup.procs)",
            ChildStep::NewSession => "new session (setsid)",
            ChildStep::RegisterWithReaper => "register the process group with the lane reaper",
            ChildStep::Stdio => "stdin /dev/null, stdout/stderr to the capture pipes (dup2)",
            ChildStep::Rlimits => "resource limits (setrlimit)",
            ChildStep::SetGroups => "supplementary groups (setgroups)",
            ChildStep::SetGid => "group id (setresgid)",
            ChildStep::SetUid => "user id (setresuid)",
            ChildStep::AmbientCapabilities => "clear ambient capabilities (PR_CAP_AMBIENT)",
            ChildStep::VerifyIds => "verify uid/gid/groups (getresuid/getresgid/getgroups)",
            ChildStep::RootNotRegainable => "verify root cannot be regained",
            ChildStep::MakeWorkDir => {
                "make the job's own directory and its Landlock rule (mkdir, as the lane user)"
            }
            ChildStep::ChangeDir => "enter the lane work directory (chdir, as the lane user)",
            ChildStep::ParentDeathSignal => "parent death signal (PR_SET_PDEATHSIG)",
            ChildStep::ParentAlive => "parent still alive (getppid)",
            ChildStep::CloseFds => "close inherited fds (close_range)",
            ChildStep::NoNewPrivs => "no_new_privs (PR_SET_NO_NEW_PRIVS)",
            ChildStep::Landlock => "landlock (landlock_restrict_self)",
            ChildStep::Seccomp => "seccomp filter",
            ChildStep::Gate => "wait for the helper's go-ahead (it withheld it)",
            ChildStep::Exec => "exec of the dispatch program",
            ChildStep::Clone => "create the lane process (clone)",
            ChildStep::EndedBeforeExec => "the lane process ended before its exec",
        })
    }
}

/// Everything the child needs, as plain data built before the clone.
pub(crate) struct ChildPlan {
    pub change_uid: bool,
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    pub groups: Vec<libc::gid_t>,
    /// `groups` as the kernel reports them back (sorted), and room to read them into.
    pub groups_sorted: Vec<libc::gid_t>,
    pub groups_readback: std::cell::UnsafeCell<Vec<libc::gid_t>>,
    pub rlimits: Vec<(libc::__rlimit_resource_t, libc::rlimit)>,
    pub helper_pid: libc::pid_t,
    pub work_dir: CString,
    /// Make `work_dir` (as the lane user) and add its Landlock rule before entering it.
    pub make_work_dir: bool,
    /// The rights of that rule.
    pub work_dir_access: u64,
    /// The lane cgroup's `cgroup.procs`, open for writing, if the lane has a cgroup.
    pub cgroup_procs_fd: Option<RawFd>,
    /// stdin, stdout, stderr of the lane; all above 2 and close-on-exec in the helper.
    pub stdio: [RawFd; 3],
    /// Write end of the reaper's registration pipe.
    pub reaper_fd: RawFd,
    pub landlock_fd: Option<RawFd>,
    /// The read end of the lane's gate, if it waits there before its identity (`gate.rs`).
    pub gate_fd: Option<RawFd>,
    /// Programs the lane must add to those it inherits from its spawner thread: none unless
    /// the policy changed since that thread started.
    pub seccomp: Vec<BpfProgram>,
    pub exec: ExecImage,
}

/// A failed spawn: the step, its errno, and the child to reap if one was created.
pub(crate) struct SpawnFailure {
    pub step: ChildStep,
    pub error: io::Error,
    pub child: Option<libc::pid_t>,
}

/// Written by the child, read by the parent once `clone` has returned. CLONE_VFORK orders the
/// two: the parent does not run again until the child has exec'd or exited.
struct ChildReport {
    failed_step: AtomicI32,
    errno: AtomicI32,
}

struct ChildContext<'a> {
    plan: &'a ChildPlan,
    report: ChildReport,
}

/// The child's stack: a private mapping with an inaccessible guard page below it, so an
/// overflow faults instead of writing over the helper's heap. Reused for every spawn by the
/// thread that owns it.
pub(crate) struct ChildStack {
    base: *mut libc::c_void,
    len: usize,
    guard: usize,
}

// SAFETY: the mapping is owned by this value and used by one spawn at a time (`spawn` takes
// `&mut`); no other reference to it exists.
unsafe impl Send for ChildStack {}

impl ChildStack {
    const SIZE: usize = 256 * 1024;

    pub(crate) fn new() -> io::Result<ChildStack> {
        // SAFETY: sysconf takes an integer.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .unwrap_or(4096)
            .max(4096);
        let len = ChildStack::SIZE + page;
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing; the
        // result is checked before use.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let stack = ChildStack {
            base,
            len,
            guard: page,
        };
        // SAFETY: the first page of the mapping we own; the stack grows down towards it.
        if unsafe { libc::mprotect(base, page, libc::PROT_NONE) } == -1 {
            return Err(io::Error::last_os_error());
        }
        Ok(stack)
    }

    /// The highest 16-byte aligned address: the stack grows down on every architecture we build for.
    fn top(&mut self) -> *mut libc::c_void {
        debug_assert!(self.len > self.guard);
        (self.base as usize + self.len) as *mut libc::c_void
    }
}

impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping created in `new`, which nothing uses any more.
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// Start the lane. Returns its pid (also its process group id) once it has exec'd.
///
/// `child_pid` gets the child's pid from the kernel as the child is created, before it runs
/// (`CLONE_PARENT_SETTID`): the helper's other threads know it while this one waits.
pub(crate) fn spawn(
    plan: &ChildPlan,
    stack: &mut ChildStack,
    child_pid: &AtomicI32,
) -> Result<libc::pid_t, SpawnFailure> {
    let context = ChildContext {
        plan,
        report: ChildReport {
            // Until the child says it reached its exec: one killed before has not started.
            failed_step: AtomicI32::new(ChildStep::EndedBeforeExec as i32),
            errno: AtomicI32::new(0),
        },
    };
    // Block every signal in this thread for the clone: the child starts with them blocked, so
    // none of the helper's handlers can run in it before it has reset them.
    // SAFETY: (whole block) sigset operations on locals; pthread_sigmask on this thread.
    let previous = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut previous: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut previous);
        previous
    };
    // SAFETY: CLONE_VFORK suspends this thread until the child has exec'd or exited, so
    // `context` and the stack (borrowed mutably for the call) outlive every use by the child;
    // `child_entry` only makes async-signal-safe calls and never returns.
    let pid = unsafe {
        libc::clone(
            child_entry,
            stack.top(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PARENT_SETTID | libc::SIGCHLD,
            (&raw const context).cast_mut().cast(),
            child_pid.as_ptr(),
        )
    };
    let clone_error = io::Error::last_os_error();
    // SAFETY: restoring this thread's own mask, saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut()) };
    if pid == -1 {
        return Err(SpawnFailure {
            step: ChildStep::Clone,
            error: clone_error,
            child: None,
        });
    }
    match context.report.failed_step.load(Ordering::SeqCst) {
        0 => Ok(pid),
        step => Err(SpawnFailure {
            step: ChildStep::from_code(step),
            error: io::Error::from_raw_os_error(context.report.errno.load(Ordering::SeqCst)),
            child: Some(pid),
        }),
    }
}

/// The child's first and only code before execve.
extern "C" fn child_entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `ChildContext` passed to clone by `spawn`, whose thread is suspended
    // (CLONE_VFORK) and keeps it alive until this process execs or exits.
    let context = unsafe { &*arg.cast::<ChildContext<'_>>() };
    let (step, errno) = match child_sequence(context.plan, &context.report) {
        Err(failure) => failure,
        Ok(()) => (ChildStep::Exec, libc::EINVAL),
    };
    context.report.errno.store(errno, Ordering::SeqCst);
    context
        .report
        .failed_step
        .store(step as i32, Ordering::SeqCst);
    // SAFETY: _exit is async-signal-safe and does not return; it runs no atexit handlers, which
    // belong to the helper.
    unsafe { libc::_exit(127) }
}

type StepResult = Result<(), (ChildStep, i32)>;

fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EINVAL)
}

fn check(step: ChildStep, rc: libc::c_long) -> StepResult {
    if rc == -1 {
        Err((step, errno()))
    } else {
        Ok(())
    }
}

/// The fixed sequence. Only returns on failure: success ends in execve.
fn child_sequence(plan: &ChildPlan, report: &ChildReport) -> StepResult {
    block_all_signals()?;
    reset_signal_handlers()?;

    // 1. Into the lane's cgroup before anything else: every process the lane ever starts is
    //    then in it, however it re-parents or re-groups itself, and ends with it.
    if let Some(fd) = plan.cgroup_procs_fd {
        join_cgroup(fd)?;
    }
    // Own session and process group, so the helper can signal the whole lane at once.
    new_session()?;

    // 2. The reaper learns of the group before anything in it runs: no process of the lane
    //    exists before its group is registered for the kill that follows the helper's death.
    register_with_reaper(plan.reaper_fd)?;
    connect_stdio(&plan.stdio)?;

    // 3. Resource limits, while still privileged; the open-file limit once the work directory
    //    is open (the lane has not yet shed the helper's fds, which may count past it).
    set_rlimits(plan, |resource| resource != libc::RLIMIT_NOFILE)?;

    // Held, if the helper asks, until it lets the lane run (its record is durable, nothing
    // stopped it meanwhile): still as root, so no process of the lane's user can signal, stop
    // or trace it, and the helper's memory it shares keeps the helper's dumpable flag.
    if let Some(fd) = plan.gate_fd {
        hold_at_gate(plan, fd)?;
    }

    // 4. Identity: groups, then gid, then uid (after setresuid the others could not change).
    if plan.change_uid {
        drop_identity(plan)?;
    }
    clear_ambient_capabilities()?;
    verify_ids(plan)?;

    // 5. Death signal again at once (changing credentials cleared it), then make sure the
    //    helper did not die before it was armed: a lane whose helper is gone makes nothing.
    //    It fires when the spawner thread exits, which lives as long as the helper. The reaper
    //    takes care of the rest of the group.
    arm_parent_death_signal(plan)?;
    // Entered as the lane user, so the directory's own permissions apply.
    if plan.make_work_dir {
        make_work_dir(plan)?;
    } else {
        enter_work_dir(plan)?;
    }
    set_rlimits(plan, |resource| resource == libc::RLIMIT_NOFILE)?;

    // 6. Nothing inherited survives exec; 7. exec can grant no privileges.
    mark_inherited_fds_cloexec()?;
    set_no_new_privs()?;

    // 8. Landlock, on the ruleset the helper built.
    if let Some(fd) = plan.landlock_fd {
        restrict_with_landlock(fd)?;
    }

    // 9. seccomp: the lane inherited the spawner thread's filter at the clone (see
    //    `restrict_spawner_thread`); only a lane whose policy changed since adds its own,
    //    last, so that none of the steps above needed a syscall it denies.
    for program in &plan.seccomp {
        install_seccomp(program)?;
    }

    // 10. The lane starts with no signal blocked, and execs the fixed argv.
    unblock_all_signals()?;
    report.failed_step.store(0, Ordering::SeqCst);
    exec_lane(plan)
}

fn new_session() -> StepResult {
    // SAFETY: setsid takes no arguments.
    check(ChildStep::NewSession, unsafe { libc::setsid() }.into())
}

/// Ambient capabilities would survive exec; a root helper's are already gone with the uid
/// change, an unprivileged helper's (systemd AmbientCapabilities=) must not reach the lane.
fn clear_ambient_capabilities() -> StepResult {
    let clear = libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong;
    // SAFETY: plain integer arguments.
    let rc = unsafe { libc::prctl(libc::PR_CAP_AMBIENT, clear, 0, 0, 0) };
    check(ChildStep::AmbientCapabilities, rc.into())
}

/// The work directory the helper named, where the lane does not make its own.
fn enter_work_dir(plan: &ChildPlan) -> StepResult {
    // SAFETY: `work_dir` is a NUL-terminated string owned by `plan`.
    let rc = unsafe { libc::chdir(plan.work_dir.as_ptr()) };
    check(ChildStep::ChangeDir, rc.into())
}

/// CLOEXEC rather than close: the Landlock ruleset is still needed after this.
fn mark_inherited_fds_cloexec() -> StepResult {
    // SAFETY: plain integer arguments.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    check(ChildStep::CloseFds, rc)
}

/// no_new_privs: exec can no longer grant privileges (setuid bits, file capabilities).
fn set_no_new_privs() -> StepResult {
    // SAFETY: plain integer arguments.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0) };
    check(ChildStep::NoNewPrivs, rc.into())
}

fn restrict_with_landlock(ruleset: RawFd) -> StepResult {
    // SAFETY: `ruleset` is a Landlock ruleset fd owned by the prepared lane, open in this child.
    let rc = unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0u32) };
    check(ChildStep::Landlock, rc)
}

fn unblock_all_signals() -> StepResult {
    set_signal_mask(libc::SIG_SETMASK, 0)
}

/// Returns only if the exec failed.
fn exec_lane(plan: &ChildPlan) -> StepResult {
    // SAFETY: the exec image's NUL-terminated strings and NULL-terminated pointer arrays, owned
    // by `plan`.
    unsafe {
        libc::execve(
            plan.exec.path,
            plan.exec.argv.as_ptr(),
            plan.exec.envp.as_ptr(),
        );
    }
    Err((ChildStep::Exec, errno()))
}

/// Wait at the gate: first keep only the descriptors still needed (none of another lane's
/// pipes or gates stays open here while it waits), make sure the lane dies with the helper
/// (armed again after the uid change, which clears it), then read one byte:
/// [`crate::gate::GO`], or the spawn fails here. An end of file or any other byte is a refusal.
fn hold_at_gate(plan: &ChildPlan, gate: RawFd) -> StepResult {
    close_all_but(&[Some(gate), plan.landlock_fd])?;
    arm_parent_death_signal(plan)?;
    let mut byte = 0u8;
    loop {
        // SAFETY: raw read (not libc's, a cancellation point that touches the parent thread's
        // descriptor) of one byte into a live local.
        let rc = unsafe { libc::syscall(libc::SYS_read, gate, (&raw mut byte).cast::<u8>(), 1) };
        match rc {
            1 if byte == crate::gate::GO => return Ok(()),
            -1 if errno() == libc::EINTR => continue,
            -1 => return Err((ChildStep::Gate, errno())),
            _ => return Err((ChildStep::Gate, libc::ECANCELED)),
        }
    }
}

/// Close every descriptor above stdio but those in `keep`.
fn close_all_but(keep: &[Option<RawFd>; 2]) -> StepResult {
    let (a, b) = match *keep {
        [Some(a), Some(b)] => (a.min(b), a.max(b)),
        [Some(only), None] | [None, Some(only)] => (only, only),
        [None, None] => (2, 2),
    };
    for (first, last) in [(3, a - 1), (a + 1, b - 1), (b + 1, i32::MAX)] {
        if first > last || last < 3 {
            continue;
        }
        let first = first.max(3);
        // SAFETY: plain integer arguments; closes only this process's own descriptor table.
        let rc = unsafe { libc::syscall(libc::SYS_close_range, first as u32, last as u32, 0u32) };
        check(ChildStep::CloseFds, rc)?;
    }
    Ok(())
}

/// `PR_SET_PDEATHSIG`, then check that the helper did not die before it was armed.
fn arm_parent_death_signal(plan: &ChildPlan) -> StepResult {
    let kill = libc::SIGKILL as libc::c_ulong;
    // SAFETY: plain integer arguments.
    let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, kill, 0, 0, 0) };
    check(ChildStep::ParentDeathSignal, rc.into())?;
    // SAFETY: getppid takes no arguments.
    if unsafe { libc::getppid() } != plan.helper_pid {
        return Err((ChildStep::ParentAlive, libc::ESRCH));
    }
    Ok(())
}

/// The plan's limits on the resources `which` selects.
fn set_rlimits(plan: &ChildPlan, which: impl Fn(libc::__rlimit_resource_t) -> bool) -> StepResult {
    for (resource, limit) in plan.rlimits.iter().filter(|(r, _)| which(*r)) {
        // SAFETY: `limit` points to a valid rlimit for the duration of the call.
        let rc = unsafe { libc::setrlimit(*resource, limit) };
        check(ChildStep::Rlimits, rc.into())?;
    }
    Ok(())
}

/// `struct landlock_path_beneath_attr` (the libc crate does not define it): packed, as the
/// kernel's.
#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

const LANDLOCK_RULE_PATH_BENEATH: libc::c_long = 1;

/// The job's own directory, made by the lane user in its work area: a new directory (one
/// already there, which only that user could have put there, is refused), entered through
/// the fd it was opened on, which also carries its Landlock rule: the rule and the working
/// directory are what was made, whatever the path names a moment later.
fn make_work_dir(plan: &ChildPlan) -> StepResult {
    // SAFETY: `work_dir` is a NUL-terminated string owned by `plan`.
    let rc = unsafe { libc::mkdir(plan.work_dir.as_ptr(), 0o700) };
    check(ChildStep::MakeWorkDir, rc.into())?;
    let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: as above; the fd is closed at exec (O_CLOEXEC).
    let fd = unsafe { libc::open(plan.work_dir.as_ptr(), flags) };
    check(ChildStep::MakeWorkDir, fd.into())?;
    if let Some(ruleset) = plan.landlock_fd {
        let rule = PathBeneathAttr {
            allowed_access: plan.work_dir_access,
            parent_fd: fd,
        };
        // SAFETY: a pointer to a live local of the kernel's attribute layout; plain integers.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_landlock_add_rule,
                ruleset,
                LANDLOCK_RULE_PATH_BENEATH,
                &raw const rule,
                0u32,
            )
        };
        check(ChildStep::MakeWorkDir, rc)?;
    }
    // SAFETY: `fd` is the directory opened above.
    let rc = unsafe { libc::fchdir(fd) };
    check(ChildStep::ChangeDir, rc.into())
}

/// The kernel's sigset for rt_sigprocmask: 64 signals on every architecture we build for.
const KERNEL_SIGSET_SIZE: usize = 8;

/// Every signal, glibc's internal ones included (its `sigprocmask` wrapper leaves those out).
fn block_all_signals() -> StepResult {
    set_signal_mask(libc::SIG_BLOCK, !0)
}

/// Raw `rt_sigprocmask` on this thread: every bit of `mask`, glibc's internal signals too.
fn set_signal_mask(how: libc::c_int, mask: u64) -> StepResult {
    // SAFETY: raw rt_sigprocmask with a pointer to a live local of the kernel's sigset size.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            how,
            &raw const mask,
            std::ptr::null_mut::<u64>(),
            KERNEL_SIGSET_SIZE,
        )
    };
    check(ChildStep::Signals, rc)
}

/// The child has its own copy of the helper's signal handlers (no CLONE_SIGHAND): put every one
/// back to the default, including SIGPIPE, which the Rust runtime ignores and exec would keep,
/// and glibc's internal ones, which its `sigaction` wrapper refuses to touch.
fn reset_signal_handlers() -> StepResult {
    // The kernel's struct sigaction: handler, flags, restorer, mask. All zero is SIG_DFL.
    let default = [0u64; 4];
    for signal in 1..=64 {
        if signal == libc::SIGKILL || signal == libc::SIGSTOP {
            continue;
        }
        // SAFETY: raw rt_sigaction with a pointer to a live, zeroed kernel sigaction.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                signal,
                &raw const default,
                std::ptr::null_mut::<u64>(),
                KERNEL_SIGSET_SIZE,
            )
        };
        check(ChildStep::Signals, rc)?;
    }
    Ok(())
}

/// Writing "0" to `cgroup.procs` moves the writing process.
fn join_cgroup(fd: RawFd) -> StepResult {
    let me = b"0";
    // SAFETY: raw write of a local byte string to the helper's open cgroup.procs fd.
    let written = unsafe { libc::syscall(libc::SYS_write, fd, me.as_ptr(), me.len()) };
    match written {
        -1 => Err((ChildStep::JoinCgroup, errno())),
        1 => Ok(()),
        _ => Err((ChildStep::JoinCgroup, libc::EIO)),
    }
}

fn register_with_reaper(fd: RawFd) -> StepResult {
    // SAFETY: getpid takes no arguments.
    let pid = unsafe { libc::syscall(libc::SYS_getpid) } as libc::pid_t;
    let message = crate::reaper::message(crate::reaper::REGISTER, pid);
    // SAFETY: raw write (not libc's, a cancellation point that touches the parent thread's
    // descriptor) of the local 8-byte message; a pipe write this small is atomic.
    let written = unsafe { libc::syscall(libc::SYS_write, fd, message.as_ptr(), message.len()) };
    match written {
        -1 => Err((ChildStep::RegisterWithReaper, errno())),
        n if n as usize != message.len() => Err((ChildStep::RegisterWithReaper, libc::EIO)),
        _ => Ok(()),
    }
}

fn connect_stdio(stdio: &[RawFd; 3]) -> StepResult {
    for (target, source) in stdio.iter().enumerate() {
        // The sources are all above 2 (see the spawner), so dup2 always makes a new descriptor,
        // without close-on-exec.
        // SAFETY: plain integer arguments.
        let rc = unsafe { libc::dup2(*source, target as libc::c_int) };
        check(ChildStep::Stdio, rc.into())?;
    }
    Ok(())
}

fn drop_identity(plan: &ChildPlan) -> StepResult {
    let (uid, gid) = (plan.uid as libc::c_long, plan.gid as libc::c_long);
    // SAFETY: raw system calls (see the module comment) with integer arguments and a pointer
    // and length describing `plan.groups`, alive for the call.
    unsafe {
        let groups = plan.groups.as_ptr();
        let rc = libc::syscall(libc::SYS_setgroups, plan.groups.len(), groups);
        check(ChildStep::SetGroups, rc)?;
        check(
            ChildStep::SetGid,
            libc::syscall(libc::SYS_setresgid, gid, gid, gid),
        )?;
        check(
            ChildStep::SetUid,
            libc::syscall(libc::SYS_setresuid, uid, uid, uid),
        )?;
    }
    Ok(())
}

fn verify_ids(plan: &ChildPlan) -> StepResult {
    let (mut ruid, mut euid, mut suid): (libc::uid_t, libc::uid_t, libc::uid_t) = (0, 0, 0);
    let (mut rgid, mut egid, mut sgid): (libc::gid_t, libc::gid_t, libc::gid_t) = (0, 0, 0);
    // SAFETY: raw system calls writing to live locals.
    unsafe {
        let rc = libc::syscall(libc::SYS_getresuid, &mut ruid, &mut euid, &mut suid);
        check(ChildStep::VerifyIds, rc)?;
        let rc = libc::syscall(libc::SYS_getresgid, &mut rgid, &mut egid, &mut sgid);
        check(ChildStep::VerifyIds, rc)?;
    }
    if [ruid, euid, suid] != [plan.uid; 3] || [rgid, egid, sgid] != [plan.gid; 3] {
        return Err((ChildStep::VerifyIds, libc::EPERM));
    }
    if plan.change_uid {
        // SAFETY: the parent is suspended and nothing else uses the buffer during the spawn
        // (it belongs to this plan); its length is groups.len() + 1, so a longer list than
        // expected is detected instead of overflowing.
        let readback = unsafe { &mut *plan.groups_readback.get() };
        // SAFETY: raw getgroups into the buffer, with its length.
        let count =
            unsafe { libc::syscall(libc::SYS_getgroups, readback.len(), readback.as_mut_ptr()) };
        check(ChildStep::VerifyIds, count)?;
        let Some(granted) = readback.get_mut(..count as usize) else {
            return Err((ChildStep::VerifyIds, libc::EINVAL));
        };
        // The kernel sorts by global id, which inside a user namespace need not be our order;
        // sort_unstable works in place and does not allocate.
        granted.sort_unstable();
        if granted != &plan.groups_sorted[..] {
            return Err((ChildStep::VerifyIds, libc::EPERM));
        }
    }
    if plan.uid != 0 {
        // SAFETY: raw system calls with integer arguments; success is the failure we test for.
        let regained = unsafe {
            libc::syscall(libc::SYS_setresuid, 0, 0, 0) == 0
                || libc::syscall(libc::SYS_setresgid, 0, 0, 0) == 0
        };
        if regained {
            return Err((ChildStep::RootNotRegainable, libc::EPERM));
        }
    }
    Ok(())
}

/// Put the calling thread (a spawner thread) under the lanes' seccomp programs, once: every
/// lane it clones inherits them, so no spawn pays for attaching them. Attaching costs the
/// kernel a verification, a JIT compilation and a syscall-cache computation per program; it was
/// the largest single share of a sandboxed spawn. `no_new_privs` first, which seccomp requires
/// of a thread without `CAP_SYS_ADMIN`; both are per-thread, and this thread never execs.
/// Nothing the thread or a lane's steps before exec use is denied (the spawn tests would fail).
pub(crate) fn restrict_spawner_thread(programs: &[BpfProgram]) -> io::Result<()> {
    // SAFETY: plain integer arguments; affects only the calling thread.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0) };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    for program in programs {
        install_seccomp(program).map_err(|(_, errno)| io::Error::from_raw_os_error(errno))?;
    }
    Ok(())
}

fn install_seccomp(program: &BpfProgram) -> StepResult {
    let fprog = libc::sock_fprog {
        len: program.len() as libc::c_ushort,
        // seccompiler's sock_filter has the kernel's layout (u16, u8, u8, u32).
        filter: program.as_ptr().cast::<libc::sock_filter>().cast_mut(),
    };
    // SAFETY: `fprog` points into `program`, alive for the call; the kernel copies it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0 as libc::c_ulong,
            &raw const fprog,
        )
    };
    check(ChildStep::Seccomp, rc)
}

/// The lane's exec arguments, built in the helper before the clone: the child cannot allocate.
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

/// Block until `pid` (our child) has exited, without reaping it: until it is reaped its pid,
/// which is also its group id, cannot be reused.
pub(crate) fn wait_exited(pid: libc::pid_t) -> io::Result<()> {
    wait_unreaped(pid, 0).map(drop)
}

/// Whether `pid` (our child) has exited, without reaping it and without blocking.
pub(crate) fn has_exited(pid: libc::pid_t) -> io::Result<bool> {
    Ok(wait_unreaped(pid, libc::WNOHANG)? == pid)
}

/// `waitid` for the exit of `pid` (our child) that leaves it unreaped (WNOWAIT), with `flags`
/// besides; the pid it reports, zero when WNOHANG found the child still running.
fn wait_unreaped(pid: libc::pid_t, flags: libc::c_int) -> io::Result<libc::pid_t> {
    loop {
        // SAFETY: a zeroed siginfo_t is a valid output buffer for waitid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid on our own child, writing into the local `info`.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT | flags,
            )
        };
        match rc {
            // SAFETY: waitid filled `info` (or, under WNOHANG, left it zeroed); si_pid reads
            // a plain integer.
            0 => return Ok(unsafe { info.si_pid() }),
            _ if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => continue,
            _ => return Err(io::Error::last_os_error()),
        }
    }
}

/// A pidfd for `pid`, our unreaped child (so the id names no other process): readable once
/// the process has exited. Close-on-exec, as pidfd_open always makes it.
pub(crate) fn pidfd_open(pid: libc::pid_t) -> io::Result<std::os::fd::OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0u32) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(io::Error::other)?;
    // SAFETY: the kernel has just returned this fd; nothing else owns it.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// Reap `pid` (our child) and return its raw status and resource usage (its own and that of the
/// descendants it waited for).
pub(crate) fn reap_with_usage(
    pid: libc::pid_t,
) -> io::Result<(std::process::ExitStatus, libc::rusage)> {
    use std::os::unix::process::ExitStatusExt;
    loop {
        let mut status = 0;
        // SAFETY: a zeroed rusage is a valid output buffer.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: wait4 on our own child, writing into the locals `status` and `usage`.
        let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        match rc {
            -1 if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => continue,
            -1 => return Err(io::Error::last_os_error()),
            _ => return Ok((std::process::ExitStatus::from_raw(status), usage)),
        }
    }
}

/// Reap `pid` (our child) and return its raw status, whatever ended it (realtime signals too).
pub(crate) fn reap(pid: libc::pid_t) -> io::Result<std::process::ExitStatus> {
    use std::os::unix::process::ExitStatusExt;
    loop {
        let mut status = 0;
        // SAFETY: waitpid on our own child, writing into the local `status`.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        match rc {
            -1 if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => continue,
            -1 => return Err(io::Error::last_os_error()),
            _ => return Ok(std::process::ExitStatus::from_raw(status)),
        }
    }
}
