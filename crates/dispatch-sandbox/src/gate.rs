//! The gate a lane waits at, set up and sandboxed, just before its exec.
//!
//! The slow part of a spawn (clone, cgroup, identity, job directory, Landlock) needs nothing the
//! helper is still deciding, so it can run while the job's record is being synced; the lane's
//! own program must not run before that record is durable, nor after a cancel or a shutdown
//! that came meanwhile. The child reads one byte from a pipe as its last step: [`GO`] lets it
//! exec; anything else, or an end of file, makes it exit without running anything.
//!
//! An explicit refusal rather than a close: every child cloned while the gate was open holds
//! a copy of its write end until its own exec, so a close alone would reach the waiting lane
//! only once those had moved on.

use crate::SandboxError;
use std::io;
use std::os::fd::{AsFd, OwnedFd};

/// The byte that lets a held lane exec.
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
    /// Let the lane exec. An error means it was not told and will not run (the pipe has room
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
