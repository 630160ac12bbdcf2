//! The gate a lane waits at, cloned and partly set up, before it takes its user's identity.
//!
//! The first part of a spawn (clone, signals, cgroup, session, reaper, stdio, rlimits) needs
//! nothing the helper is still deciding, so it can run while the job's record is being synced;
//! the lane must not run, nor make anything, before that record is durable, nor after a cancel
//! or a shutdown that came meanwhile. The child reads one byte from a pipe: [`GO`] lets it go
//! on to its identity and the rest of its sequence; anything else, or an end of file, makes it
//! exit without running or making anything. It waits as root, so no process of the lane's
//! user can stop it there and keep a spawner thread waiting.
//!
//! An explicit refusal rather than a close: a child cloned while the gate was open holds a
//! copy of its write end until it closes what it does not need, so a close alone could reach
//! the waiting lane late.

use crate::SandboxError;
use std::io;
use std::os::fd::{AsFd, OwnedFd};

/// The byte that lets a held lane go on.
pub(crate) const GO: u8 = 1;
const STOP: u8 = 0;

/// The helper's side: [`LaneGate::open`] lets the lane run; dropping it unopened refuses.
#[derive(Debug)]
pub struct LaneGate {
    writer: Option<OwnedFd>,
}

/// A gate and the end its lane reads (close-on-exec, numbered above stdio).
pub(crate) fn new_gate() -> Result<(LaneGate, OwnedFd), SandboxError> {
    let (reader, writer) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|errno| SandboxError::Spawn(errno.into()))?;
    let reader = crate::spawner::above_stdio(reader).map_err(SandboxError::Spawn)?;
    Ok((
        LaneGate {
            writer: Some(writer),
        },
        reader,
    ))
}

impl LaneGate {
    /// Let the lane go on. An error means it was not told and will not run (the pipe has room
    /// for the byte, so this only fails if the descriptor does).
    pub fn open(mut self) -> io::Result<()> {
        match self.writer.take() {
            Some(writer) => send(&writer, GO),
            None => Ok(()),
        }
    }
}

impl Drop for LaneGate {
    fn drop(&mut self) {
        if let Some(writer) = self.writer.take() {
            // If even this fails, the lane sees the end of the file once the last copy of the
            // write end is closed, and exits all the same.
            let _ = send(&writer, STOP);
        }
    }
}

fn send(writer: &impl AsFd, byte: u8) -> io::Result<()> {
    loop {
        match nix::unistd::write(writer, &[byte]) {
            Ok(1) => return Ok(()),
            Ok(_) => return Err(io::ErrorKind::WriteZero.into()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(errno) => return Err(errno.into()),
        }
    }
}
