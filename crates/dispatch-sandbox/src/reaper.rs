//! The lane reaper: one small process per helper that kills every live lane's process group
//! when the helper dies, however it dies (SIGKILL included).
//!
//! `PR_SET_PDEATHSIG` only reaches a lane's first process; whatever it started (ssh, git) would
//! be reparented and live on. So the helper forks this process once, when the spawner starts.
//! It keeps nothing but the read end of a pipe, and each lane registers its group on that pipe
//! itself, before exec, so no process of the lane exists before its registration. When every
//! write end is closed (the helper is gone; lanes lose theirs at exec), the reaper SIGKILLs each
//! registered group, and, where lanes have cgroups, kills their parent cgroup whole (which also
//! reaches a lane process that left its group with `setsid`), and exits.
//!
//! The helper forgets a group *before* it reaps the group's leader: until the reap the pid,
//! which is the group id, cannot be reused, so the reaper never signals an unrelated group.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

pub(crate) const REGISTER: i32 = 1;
pub(crate) const FORGET: i32 = 2;
/// Most groups the spawner lets run at once. The reaper's table has room for twice as many, so
/// lanes that pass the check concurrently still fit.
pub(crate) const CAPACITY: usize = 16 * 1024;
const MESSAGE_LEN: usize = 8;

/// One registration message: operation and process group id, native-endian.
pub(crate) fn message(operation: i32, pgid: libc::pid_t) -> [u8; MESSAGE_LEN] {
    let mut bytes = [0u8; MESSAGE_LEN];
    bytes[..4].copy_from_slice(&operation.to_ne_bytes());
    bytes[4..].copy_from_slice(&pgid.to_ne_bytes());
    bytes
}

pub(crate) struct Reaper {
    pid: libc::pid_t,
    /// Close-on-exec, non-blocking write end of the registration pipe: a stopped reaper makes
    /// registrations fail (and spawns with them) instead of hanging the helper.
    pub writer: OwnedFd,
    /// Set once the process has been reaped: its pid must never be waited for again, since it
    /// may by then belong to a lane.
    exited: std::sync::atomic::AtomicBool,
}

impl Reaper {
    /// Fork the reaper. Must be called after the process was made non-dumpable: the reaper is a
    /// copy of the helper's memory.
    ///
    /// `kill_all` is the lanes' parent `cgroup.kill`, if lanes have cgroups.
    pub(crate) fn start(kill_all: Option<RawFd>) -> io::Result<Reaper> {
        let (reader, writer) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        nix::fcntl::fcntl(
            &writer,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )?;
        // Room for a full table of registrations, so a successor can be told of every live
        // lane before it starts reading. Best effort: the default size only makes that slower.
        let _ = nix::fcntl::fcntl(
            &writer,
            nix::fcntl::FcntlArg::F_SETPIPE_SZ((2 * CAPACITY * MESSAGE_LEN) as libc::c_int),
        );
        // Allocated before the fork: the child must not allocate.
        let mut table = vec![0 as libc::pid_t; 2 * CAPACITY].into_boxed_slice();
        let reader_fd = reader.as_raw_fd();
        // Held across the fork, so the new reaper is known as the helper's own child before
        // anything could look for orphans (the child never touches its copy of the lock).
        let mut own = crate::spawner::own_children();
        // SAFETY: the child runs only `reaper_main`, which makes async-signal-safe calls on the
        // table allocated above and integers, and never returns; fork is safe to call here.
        let pid = unsafe { libc::fork() };
        match pid {
            -1 => Err(io::Error::last_os_error()),
            // SAFETY: we are the forked child (see above).
            0 => unsafe { reaper_main(reader_fd, kill_all, &mut table) },
            pid => {
                own.insert(pid);
                Ok(Reaper {
                    pid,
                    writer,
                    exited: std::sync::atomic::AtomicBool::new(false),
                })
            }
        }
    }

    /// Send one message, waiting up to a second for room in the pipe (a reaper that has just
    /// started drains it once it is running).
    pub(crate) fn send(&self, operation: i32, pgid: libc::pid_t) -> io::Result<()> {
        let bytes = message(operation, pgid);
        for _ in 0..1000 {
            match nix::unistd::write(&self.writer, &bytes) {
                Ok(written) if written == bytes.len() => return Ok(()),
                Ok(_) => return Err(io::Error::new(io::ErrorKind::WriteZero, "short write")),
                Err(nix::errno::Errno::EAGAIN) => {
                    std::thread::sleep(std::time::Duration::from_millis(1))
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(error) => return Err(error.into()),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the reaper has not read its pipe for a second",
        ))
    }

    /// True once the reaper process has exited (it is reaped here, once).
    pub(crate) fn has_exited(&self) -> bool {
        use std::sync::atomic::Ordering;
        if self.exited.load(Ordering::SeqCst) {
            return true;
        }
        // Held across the wait: once reaped the pid is free, and is forgotten before any new
        // child's entry under it could be made.
        let mut own = crate::spawner::own_children();
        // SAFETY: a zeroed siginfo_t is a valid output buffer for waitid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid on our own child (not yet reaped: `exited` is false), into `info`.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                self.pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG,
            )
        };
        // SAFETY: si_pid is valid to read after waitid; it stays 0 if nothing exited.
        let exited = rc == -1 || unsafe { info.si_pid() } == self.pid;
        if exited {
            self.exited.store(true, Ordering::SeqCst);
            own.remove(self.pid);
        }
        exited
    }

    #[cfg(test)]
    pub(crate) fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// True while the reaper is stopped by a signal (`T`): it reads no registration, and would
    /// kill nothing if the helper died, until continued. Only a process of the helper's own
    /// user can stop it: in personal mode, a lane where Landlock cannot scope its signals.
    pub(crate) fn is_stopped(&self) -> bool {
        // Not reaped yet (`exited` is false), so the pid is still the reaper's own.
        !self.exited.load(std::sync::atomic::Ordering::SeqCst)
            && crate::watchdog::is_stopped(self.pid)
    }

    /// Stop a reaper that must not act on its end-of-file (one that could not be told of every
    /// running lane), and reap it.
    pub(crate) fn discard(&self) {
        if !self.has_exited() {
            // SAFETY: kill of our own child, not yet reaped (`has_exited` is false).
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            let mut own = crate::spawner::own_children();
            let _ = crate::child::reap(self.pid);
            self.exited.store(true, std::sync::atomic::Ordering::SeqCst);
            own.remove(self.pid);
        }
    }
}

/// The reaper's whole life: keep only its two descriptors, learn which groups are live until the
/// helper is gone, then kill them all (and every lane's cgroup) and exit.
///
/// # Safety
/// Only in the freshly forked reaper child: it may only make async-signal-safe calls.
unsafe fn reaper_main(reader: RawFd, kill_all: Option<RawFd>, table: &mut [libc::pid_t]) -> ! {
    // SAFETY: (whole block) the callees make only async-signal-safe calls on locals, integers
    // and the table allocated before the fork.
    unsafe {
        detach_from_helper();
        let has_kill_all = keep_only(reader, kill_all);
        let live = read_registrations(table);
        // End of file: the helper is gone.
        for &pgid in &table[..live] {
            libc::kill(-pgid, libc::SIGKILL);
        }
        if has_kill_all {
            libc::write(1, b"1".as_ptr().cast(), 1);
        }
        libc::_exit(0)
    }
}

/// Only SIGKILL ends the reaper early: SIGINT from a terminal, SIGTERM or SIGHUP meant for the
/// helper must not remove the guarantee while the helper still runs lanes.
///
/// # Safety
/// Only in the reaper child (see [`reaper_main`]).
unsafe fn detach_from_helper() {
    // SAFETY: sigset operations on a local; prctl with a static string.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::sigprocmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
        let name = c"dispatch-reaper".as_ptr() as libc::c_ulong;
        libc::prctl(libc::PR_SET_NAME, name, 0, 0, 0);
    }
}

/// Keep nothing of the helper's but the pipe, as fd 0, and the lanes' `cgroup.kill`, if any,
/// as fd 1: not its sockets, not the pipe's write end (or the reaper would never see
/// end-of-file), not its stdio. Both are first copied above the stdio range, so neither can
/// overwrite the other whatever their numbers. If a step fails the reaper exits at once, and
/// the next spawn replaces it. Returns whether fd 1 is the `cgroup.kill`.
///
/// # Safety
/// Only in the reaper child (see [`reaper_main`]).
unsafe fn keep_only(reader: RawFd, kill_all: Option<RawFd>) -> bool {
    // SAFETY: fcntl, dup3 and close_range on descriptors, all async-signal-safe.
    unsafe {
        let reader = libc::fcntl(reader, libc::F_DUPFD, 10);
        let kill_all = kill_all.map(|fd| libc::fcntl(fd, libc::F_DUPFD, 10));
        if reader == -1 || kill_all == Some(-1) || libc::dup3(reader, 0, 0) == -1 {
            libc::_exit(1);
        }
        if let Some(fd) = kill_all
            && libc::dup3(fd, 1, 0) == -1
        {
            libc::_exit(1);
        }
        let first_closed: u32 = if kill_all.is_some() { 2 } else { 1 };
        if libc::syscall(libc::SYS_close_range, first_closed, u32::MAX, 0u32) == -1 {
            libc::_exit(1);
        }
        kill_all.is_some()
    }
}

/// Read registrations from fd 0 until end-of-file; returns how many groups are live, at the
/// front of `table`.
///
/// # Safety
/// Only in the reaper child (see [`reaper_main`]).
unsafe fn read_registrations(table: &mut [libc::pid_t]) -> usize {
    let mut live = 0usize;
    let mut buffer = [0u8; 512 * MESSAGE_LEN];
    let mut pending = 0usize;
    loop {
        // SAFETY: raw read into the unused tail of a local buffer.
        let read = unsafe {
            libc::read(
                0,
                buffer.as_mut_ptr().add(pending).cast(),
                buffer.len() - pending,
            )
        };
        if read == -1 && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        if read <= 0 {
            return live;
        }
        pending += read as usize;
        let whole = pending - pending % MESSAGE_LEN;
        for chunk in buffer[..whole].chunks_exact(MESSAGE_LEN) {
            let operation = i32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            let pgid = i32::from_ne_bytes([chunk[4], chunk[5], chunk[6], chunk[7]]);
            if pgid <= 1 {
                continue;
            }
            let position = table[..live].iter().position(|&known| known == pgid);
            match (operation, position) {
                (REGISTER, None) if live < table.len() => {
                    table[live] = pgid;
                    live += 1;
                }
                (FORGET, Some(index)) => {
                    live -= 1;
                    table[index] = table[live];
                }
                _ => {}
            }
        }
        buffer.copy_within(whole..pending, 0);
        pending -= whole;
    }
}
