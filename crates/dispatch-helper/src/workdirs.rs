//! The lane user's work area, where each job's own directory is made by its lane, as the lane
//! user, after the uid drop (`LanePlan::make_work_dir`): the helper needs no right to write in
//! a user's area (under its unit it has neither CAP_DAC_OVERRIDE nor CAP_CHOWN), and a lane
//! can write nowhere else (its home is read-only). A job's directory is removed with its
//! record unless `keep_work_dirs`, by a process running as its lane user.
//!
//! The area may belong to the lane user, who could race the helper with links there: every
//! step works through directory fds opened without following links.

use dispatch_sandbox::LaneIdentity;
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::{Mode, fchmod, mkdirat};
use std::os::fd::OwnedFd;
use std::path::Path;

/// `access`: `O_PATH` to find a directory the helper may not read (a user's 0700 area: under
/// its unit the helper has no CAP_DAC_OVERRIDE), `O_RDONLY` for one it made and hands over.
fn open_dir_at(dir: Option<&OwnedFd>, path: &Path, access: OFlag) -> nix::Result<OwnedFd> {
    let flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | access;
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
    match open_dir_at(None, area, OFlag::O_PATH) {
        Ok(fd) => return Ok(fd),
        Err(nix::errno::Errno::ENOENT) => {}
        Err(errno) => return Err(format!("work area {}: {}", area.display(), errno.desc())),
    }
    let (Some(parent), Some(name)) = (area.parent(), area.file_name()) else {
        return Err(format!("work area {} does not exist", area.display()));
    };
    let parent_fd = open_dir_at(None, parent, OFlag::O_PATH)
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
        Ok(()) => {}
        // Made meanwhile by another dispatch: theirs to hand over.
        Err(nix::errno::Errno::EEXIST) => {
            return open_dir_at(Some(&parent_fd), Path::new(name), OFlag::O_PATH)
                .map_err(|e| format!("work area {}: {}", area.display(), e.desc()));
        }
        Err(errno) => {
            return Err(format!(
                "make work area {}: {}",
                area.display(),
                errno.desc()
            ));
        }
    }
    let fd = open_dir_at(Some(&parent_fd), Path::new(name), OFlag::O_RDONLY)
        .map_err(|e| format!("work area {}: {}", area.display(), e.desc()))?;
    hand_over(&fd, identity).map_err(|e| format!("work area {}: {}", area.display(), e.desc()))?;
    Ok(fd)
}

/// The lane user's area, made (and handed to the user) if it is the helper's default one and
/// missing.
pub fn ensure_area(area: &Path, identity: &LaneIdentity) -> Result<(), String> {
    open_area(area, identity).map(drop)
}

/// Remove a job's directory and everything in it (blocking). std's `remove_dir_all` does not
/// follow links, so a lane's link there removes the link, not what it names. Where the helper
/// may not enter it (root under its unit, without CAP_DAC_OVERRIDE, in a lane user's 0700
/// area), `rm` run as `uid`/`gid`, its lane user, removes it: only what that user could
/// remove goes (no shell, no option parsing of the path).
pub fn remove(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    // In-process where the helper may (its own directory, or root with CAP_DAC_OVERRIDE
    // outside the shipped unit): a process per removal costs a fork of the whole helper.
    let own = nix::unistd::geteuid().as_raw() == uid;
    match std::fs::remove_dir_all(path) {
        Ok(()) => return Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        // A lane may leave directories without write permission (a Go module cache does):
        // its user may give it back, then remove them.
        Err(error) if own && error.kind() == std::io::ErrorKind::PermissionDenied => {
            open_up(path)?;
            return std::fs::remove_dir_all(path);
        }
        Err(error) if own || error.kind() != std::io::ErrorKind::PermissionDenied => {
            return Err(error);
        }
        Err(_) => {}
    }
    let find = |name: &str| {
        ["/usr/bin", "/bin"]
            .into_iter()
            .map(|dir| format!("{dir}/{name}"))
            .find(|path| Path::new(path).is_file())
            .ok_or_else(|| std::io::Error::other(format!("no {name} in /usr/bin or /bin")))
    };
    // chmod -R follows no link it meets; what it cannot do is left to rm to report.
    let _ = as_lane_user(&find("chmod")?, &["-R", "u+rwx", "--"], path, uid, gid);
    as_lane_user(
        &find("rm")?,
        &["-rf", "--one-file-system", "--"],
        path,
        uid,
        gid,
    )
}

/// Run `program args… path` as `uid`/`gid` (no shell, a clean environment).
fn as_lane_user(
    program: &str,
    args: &[&str],
    path: &Path,
    uid: u32,
    gid: u32,
) -> std::io::Result<()> {
    use std::os::unix::process::CommandExt;
    let status = std::process::Command::new(program)
        .args(args)
        .arg(path)
        .uid(uid)
        .gid(gid)
        .env_clear()
        .current_dir("/")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "{program} as uid {uid} ended with {status}"
        )))
    }
}

/// Give the owner write and search permission on every directory beneath `path` (links are
/// not followed), so that what is in them can be removed.
fn open_up(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::symlink_metadata(path)?;
    if !meta.is_dir() {
        return Ok(());
    }
    let mode = meta.permissions().mode() | 0o700;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    for entry in std::fs::read_dir(path)? {
        open_up(&entry?.path())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> LaneIdentity {
        dispatch_sandbox::current_identity().unwrap()
    }

    #[test]
    fn makes_the_default_area_private_and_removes_a_job_dir() {
        let dir = tempfile::tempdir().unwrap();
        let area = dir.path().join("lanes").join("me");
        std::fs::create_dir(dir.path().join("lanes")).unwrap();
        ensure_area(&area, &me()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&area).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        // Already there: fine.
        ensure_area(&area, &me()).unwrap();
        std::fs::create_dir(area.join("d-1")).unwrap();
        std::fs::write(area.join("d-1/output"), "x").unwrap();
        let (uid, gid) = (me().uid, me().gid);
        remove(&area.join("d-1"), uid, gid).unwrap();
        assert!(!area.join("d-1").exists());
        // Gone already: not an error.
        remove(&area.join("d-1"), uid, gid).unwrap();
    }

    #[test]
    fn a_link_in_place_of_the_area_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        let area = dir.path().join("area");
        std::os::unix::fs::symlink(&elsewhere, &area).unwrap();
        let error = ensure_area(&area, &me()).unwrap_err();
        assert!(error.contains("work area"), "{error}");
    }

    #[test]
    fn read_only_directories_a_lane_left_are_removed_too() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let job = dir.path().join("job");
        std::fs::create_dir_all(job.join("cache/module")).unwrap();
        std::fs::write(job.join("cache/module/file"), "x").unwrap();
        for locked in ["cache/module", "cache"] {
            let path = job.join(locked);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o555)).unwrap();
        }
        // (As root, removing would succeed anyway: what its owner needs is checked directly.)
        open_up(&job).unwrap();
        for dir in ["cache/module", "cache"] {
            let mode = std::fs::metadata(job.join(dir))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o700, 0o700, "{dir} {mode:o}");
        }
        remove(&job, me().uid, me().gid).unwrap();
        assert!(!job.exists());
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
        remove(&job, me().uid, me().gid).unwrap();
        assert!(kept.join("precious").exists());
    }
}
