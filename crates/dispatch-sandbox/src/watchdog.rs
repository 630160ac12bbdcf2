//! A lane stopped before its exec is killed.
//!
//! A spawner thread waits in `clone(CLONE_VFORK)` until its child has exec'd or exited. From
//! the child's uid change to its exec (a fraction of a millisecond) any process of the lane's
//! user may signal it, and a SIGSTOP there would keep the spawner thread waiting for good: a few
//! of those and no lane of any user could start. So a thread of its own looks at every spawn in
//! flight fifty times a second and kills a child it finds stopped: that lane fails, saying
//! why, and its spawner thread goes on about 20 ms later. (One stopped just as it execs is
//! killed all the same and ends by SIGKILL, as a lane that started: it may have begun to run.)
//! Only the lane's own user can stop it there, so only that user's lanes fail. (Under the root
//! helper a held lane waits at its gate as root, where its user cannot stop it; in personal
//! mode lanes run as the helper's own user, who can stop one anywhere before its exec, and the
//! same holds.)
//!
//! The pid it kills cannot be another process's: a spawn's child is reaped only after its slot
//! is settled, which takes the same lock the watchdog holds while it looks and kills (this
//! holds as long as nothing in the process reaps any child, `waitpid(-1)`, or has children
//! reaped for it, SIGCHLD ignored: nothing does).

use crate::spawner::own_children;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// How often spawns in flight are looked at: the longest a stopped lane holds its spawner.
const EVERY: Duration = Duration::from_millis(20);

/// Start the watchdog, once per process (every spawner's spawns are in one table).
pub(crate) fn start_once() -> std::io::Result<()> {
    static STARTED: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut started = STARTED.lock().unwrap_or_else(|p| p.into_inner());
    if !*started {
        std::thread::Builder::new()
            .name("lane-watchdog".into())
            .spawn(|| {
                loop {
                    std::thread::sleep(EVERY);
                    kill_stopped_in_flight();
                }
            })?;
        *started = true;
    }
    Ok(())
}

/// Kill each child of a spawn in flight that is stopped by a signal before its exec. Not one
/// stopped by a tracer (`t`): only root can trace it (it is not dumpable), as someone debugging
/// the helper with `strace -f` does.
fn kill_stopped_in_flight() {
    let own = own_children();
    for slot in &own.in_flight {
        let pid = slot.child_pid.load(Ordering::SeqCst);
        if pid <= 0 || slot.settled.load(Ordering::SeqCst) || !is_stopped(pid) {
            continue;
        }
        slot.killed_stopped.store(true, Ordering::SeqCst);
        // SIGKILL ends a stopped process too; the clone then returns, and the spawn fails.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Whether `pid` is stopped by a signal, from its state in `/proc/<pid>/stat` (`T`).
pub(crate) fn is_stopped(pid: libc::pid_t) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // The command name may hold spaces and parentheses: the state follows the last ')'.
            let state = stat.rsplit_once(") ")?.1.chars().next()?;
            Some(state == 'T')
        })
        .unwrap_or(false)
}
