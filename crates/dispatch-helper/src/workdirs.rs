//! Each job's own directory: made by the helper beneath the lane user's work area before the
//! lane is prepared, owned by the lane user, the only place a lane may write (with its
//! configured extra paths). Removed with the job's record unless `keep_work_dirs`.
//!
//! The area may belong to the lane user (its home, or its directory under the state dir), who
//! could race the helper with links there: every step works through a directory fd opened
//! without following links, so the helper only ever makes and hands over the directory it
//! made itself.

use dispatch_sandbox::LaneIdentity;
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::{Mode, fchmod, mkdirat};
use std::os::fd::OwnedFd;
use std::path::Path;

fn open_dir_at(dir: Option<&OwnedFd>, path: &Path) -> nix::Result<OwnedFd> {
    let flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY;
    match dir {
        Some(dir) => openat(dir, path, flags, Mode::empty()),
        None => openat(nix::fcntl::AT_FDCWD, path, flags, Mode::empty()),
    }
}

/// Hand a directory the helper made to the lane user, private to it.
fn hand_over(fd: &OwnedFd, identity: &LaneIdentity) -> nix::Result<()> {
    if nix::unistd::geteuid().is_root() {
        nix::unistd::fchown(fd, Some(identity.uid.into()), Some(identity.gid.into()))?;
    }
    fchmod(fd, Mode::from_bits_truncate(0o700))
}

/// The lane user's area. Made when missing only where the helper owns the parent (the default,
/// under its state dir): an administrator's own location must exist.
fn open_area(area: &Path, identity: &LaneIdentity) -> Result<OwnedFd, String> {
    match open_dir_at(None, area) {
        Ok(fd) => return Ok(fd),
        Err(nix::errno::Errno::ENOENT) => {}
        Err(errno) => return Err(format!("work area {}: {}", area.display(), errno.desc())),
    }
    let (Some(parent), Some(name)) = (area.parent(), area.file_name()) else {
        return Err(format!("work area {} does not exist", area.display()));
    };
    let parent_fd = open_dir_at(None, parent)
        .map_err(|e| format!("work area {}: parent: {}", area.display(), e.desc()))?;
    let parent_owner = nix::sys::stat::fstat(&parent_fd)
        .map_err(|e| format!("work area {}: {}", area.display(), e.desc()))?
        .st_uid;
    if parent_owner != nix::unistd::geteuid().as_raw() {
        return Err(format!(
            "work area {} does not exist (the helper makes it only inside a directory of its own)",
            area.display()
        ));
    }
    match mkdirat(&parent_fd, name, Mode::from_bits_truncate(0o700)) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
        Err(errno) => {
            return Err(format!(
                "make work area {}: {}",
                area.display(),
                errno.desc()
            ));
        }
    }
    let fd = open_dir_at(Some(&parent_fd), Path::new(name))
        .map_err(|e| format!("work area {}: {}", area.display(), e.desc()))?;
    hand_over(&fd, identity).map_err(|e| format!("work area {}: {}", area.display(), e.desc()))?;
    Ok(fd)
}

/// Make (or, for a queued job taking its turn, find) the job's directory `area/handle`.
pub fn make(area: &Path, handle: &str, identity: &LaneIdentity) -> Result<(), String> {
    let area_fd = open_area(area, identity)?;
    let job = area.join(handle);
    let fail = |what: &str, errno: nix::errno::Errno| {
        format!("job directory {}: {what}: {}", job.display(), errno.desc())
    };
    let made = match mkdirat(&area_fd, handle, Mode::from_bits_truncate(0o700)) {
        Ok(()) => true,
        // Already there (a queued job's second preparation, or something the lane user put in
        // its place): the sandbox's own checks refuse anything but the user's real directory.
        Err(nix::errno::Errno::EEXIST) => false,
        Err(errno) => return Err(fail("make", errno)),
    };
    if made {
        let fd = open_dir_at(Some(&area_fd), Path::new(handle)).map_err(|e| fail("open", e))?;
        hand_over(&fd, identity).map_err(|e| fail("hand over", e))?;
    }
    Ok(())
}

/// Remove a job's directory and everything in it (blocking). std's `remove_dir_all` does not
/// follow links, so a lane's link there removes the link, not what it names.
pub fn remove(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> LaneIdentity {
        dispatch_sandbox::current_identity().unwrap()
    }

    #[test]
    fn makes_the_area_and_the_job_dir_private() {
        let dir = tempfile::tempdir().unwrap();
        let area = dir.path().join("lanes").join("me");
        std::fs::create_dir(dir.path().join("lanes")).unwrap();
        make(&area, "d-1", &me()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(area.join("d-1"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        // Again (a queued job's turn): found, not an error.
        make(&area, "d-1", &me()).unwrap();
        remove(&area.join("d-1")).unwrap();
        assert!(!area.join("d-1").exists());
        remove(&area.join("d-1")).unwrap();
    }

    #[test]
    fn a_link_in_place_of_the_area_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        let area = dir.path().join("area");
        std::os::unix::fs::symlink(&elsewhere, &area).unwrap();
        let error = make(&area, "d-1", &me()).unwrap_err();
        assert!(error.contains("work area"), "{error}");
        assert!(!elsewhere.join("d-1").exists());
    }

    #[test]
    fn removing_follows_no_link() {
        let dir = tempfile::tempdir().unwrap();
        let kept = dir.path().join("kept");
        std::fs::create_dir(&kept).unwrap();
        std::fs::write(kept.join("precious"), "x").unwrap();
        let job = dir.path().join("job");
        std::fs::create_dir(&job).unwrap();
        std::os::unix::fs::symlink(&kept, job.join("link")).unwrap();
        remove(&job).unwrap();
        assert!(kept.join("precious").exists());
    }
}
