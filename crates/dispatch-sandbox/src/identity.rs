use crate::SandboxError;
use nix::unistd::{Gid, User, getgrouplist};
use std::ffi::CString;
use std::path::PathBuf;

/// A local account, resolved in the helper before any fork (NSS is not safe after fork).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaneIdentity {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups from getgrouplist, including the primary group.
    pub groups: Vec<u32>,
    pub home: PathBuf,
}

/// Resolve `name`; refuses root, whatever the allowlist says.
pub fn resolve_identity(name: &str) -> Result<LaneIdentity, SandboxError> {
    let fail = |reason: String| SandboxError::Identity {
        user: name.to_owned(),
        reason,
    };
    let user = User::from_name(name)
        .map_err(|e| fail(format!("lookup failed: {e}")))?
        .ok_or_else(|| fail("no such user on this machine".into()))?;
    if user.uid.is_root() || user.gid == Gid::from_raw(0) {
        return Err(fail("refusing to run a lane as uid 0 or gid 0".into()));
    }
    let c_name = CString::new(name).map_err(|_| fail("name contains NUL".into()))?;
    let mut groups: Vec<u32> = getgrouplist(&c_name, user.gid)
        .map_err(|e| fail(format!("getgrouplist failed: {e}")))?
        .into_iter()
        .map(Gid::as_raw)
        .collect();
    groups.sort_unstable();
    groups.dedup();
    if groups.contains(&0) {
        return Err(fail(
            "the user is a member of group 0 (root); refusing".into(),
        ));
    }
    Ok(LaneIdentity {
        name: name.to_owned(),
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
        groups,
        home: user.dir,
    })
}

/// The helper's own account, for unprivileged mode.
pub fn current_identity() -> Result<LaneIdentity, SandboxError> {
    let uid = nix::unistd::geteuid();
    let user = User::from_uid(uid)
        .map_err(|e| SandboxError::Identity {
            user: uid.to_string(),
            reason: e.to_string(),
        })?
        .ok_or_else(|| SandboxError::Identity {
            user: uid.to_string(),
            reason: "the helper's own uid has no passwd entry".into(),
        })?;
    let groups = nix::unistd::getgroups()
        .map(|g| g.into_iter().map(Gid::as_raw).collect())
        .unwrap_or_default();
    Ok(LaneIdentity {
        name: user.name,
        uid: uid.as_raw(),
        gid: nix::unistd::getegid().as_raw(),
        groups,
        home: user.dir,
    })
}
