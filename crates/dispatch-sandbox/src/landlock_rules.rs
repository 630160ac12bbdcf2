//! The Landlock ruleset, built in the helper before the clone. The child only calls
//! `landlock_restrict_self` on the prepared fd.
//!
//! The paths every lane shares (system paths, `/dev/null`, the administrator's extra paths) are
//! opened once, when the configuration is loaded ([`SharedPaths`]): a missing one stops the load
//! rather than every dispatch, and each lane's ruleset only adds the rules. The lane's own paths
//! (program, home, work directory) are opened per lane.

use crate::{LanePlan, SandboxError, SandboxPolicy};
use landlock::{
    ABI, Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, NetPort, PathBeneath,
    PathFd, Ruleset, RulesetAttr, RulesetCreated, RulesetCreatedAttr, Scope,
};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

/// The policy's shared paths, opened (O_PATH) with the rights each gets.
pub(crate) struct SharedPaths {
    abi: ABI,
    rules: Vec<(PathBuf, PathFd, BitFlags<AccessFs>)>,
    /// `read_paths_if_present`, as last opened: each is checked against the path (one `stat`)
    /// for every lane and opened again if the path now names another file (see [`build`]).
    if_present: std::sync::Mutex<Vec<IfPresent>>,
}

struct IfPresent {
    path: PathBuf,
    /// The open file and its identity (device, inode), or nothing while the path names none.
    opened: Option<(PathFd, (u64, u64), BitFlags<AccessFs>)>,
}

impl IfPresent {
    /// Bring the opened file in line with what the path names now.
    fn refresh(&mut self, read: BitFlags<AccessFs>, abi: ABI) {
        let now = nix::sys::stat::stat(&self.path).ok();
        let current = now.map(|stat| (stat.st_dev, stat.st_ino));
        let same = matches!((&self.opened, current), (Some((_, id, _)), Some(now)) if *id == now);
        if !same {
            self.opened = current.and_then(|_| {
                let fd = PathFd::new(&self.path).ok()?;
                let stat = nix::sys::stat::fstat(&fd).ok()?;
                let is_dir = stat.st_mode & libc::S_IFMT == libc::S_IFDIR;
                let access = if is_dir {
                    read
                } else {
                    read & AccessFs::from_file(abi)
                };
                Some((fd, (stat.st_dev, stat.st_ino), access))
            });
        }
    }
}

impl std::fmt::Debug for SharedPaths {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let paths: Vec<_> = self.rules.iter().map(|(path, _, _)| path).collect();
        f.debug_struct("SharedPaths")
            .field("abi", &self.abi)
            .field("paths", &paths)
            .finish()
    }
}

/// Open a path for a rule, and narrow `access` to what a file can have if it is not a directory.
fn open_for_rule(
    path: &Path,
    access: BitFlags<AccessFs>,
    abi: ABI,
    why: &str,
) -> Result<(PathFd, BitFlags<AccessFs>), SandboxError> {
    // path_beneath_rules() silently skips paths that do not exist; a configured path that is
    // missing must be an error instead.
    let fd = PathFd::new(path).map_err(|e| {
        SandboxError::Landlock(format!(
            "{why} path {} cannot be opened: {e}",
            path.display()
        ))
    })?;
    // The type of what was opened, not of whatever the path names a moment later.
    let is_dir =
        nix::sys::stat::fstat(&fd).is_ok_and(|stat| stat.st_mode & libc::S_IFMT == libc::S_IFDIR);
    let access = if is_dir {
        access
    } else {
        access & AccessFs::from_file(abi)
    };
    Ok((fd, access))
}

impl SharedPaths {
    /// None when the kernel has no Landlock (each lane then decides against the policy's floor).
    pub(crate) fn open(policy: &SandboxPolicy) -> Result<Option<SharedPaths>, SandboxError> {
        let abi = ABI::from(kernel_landlock_abi());
        if abi == ABI::Unsupported {
            return Ok(None);
        }
        let read_exec = AccessFs::from_read(abi);
        let read = read_exec & !AccessFs::Execute;
        let read_write = AccessFs::from_all(abi);
        let dev_null = [PathBuf::from("/dev/null")];
        let groups = [
            (&policy.read_exec_paths[..], read_exec, "read_exec"),
            (&policy.read_paths[..], read, "read"),
            (&dev_null[..], read_write, "/dev/null"),
            (&policy.read_write_paths[..], read_write, "read_write"),
        ];
        let mut rules = Vec::new();
        for (paths, access, why) in groups {
            for path in paths {
                let (fd, access) = open_for_rule(path, access, abi, why)?;
                rules.push((path.clone(), fd, access));
            }
        }
        let if_present = policy
            .read_paths_if_present
            .iter()
            .map(|path| IfPresent {
                path: path.clone(),
                opened: None,
            })
            .collect();
        Ok(Some(SharedPaths {
            abi,
            rules,
            if_present: std::sync::Mutex::new(if_present),
        }))
    }
}

pub(crate) struct BuiltRuleset {
    /// None only when the policy's floor is 0 and the kernel has no Landlock.
    pub ruleset: Option<OwnedFd>,
    /// The rights of the work directory, for the rule the lane adds itself on the directory it
    /// makes (`LanePlan::make_work_dir`); 0 without Landlock.
    pub work_dir_access: u64,
}

/// The Landlock a lane gets on this kernel under `policy`, as its report states it.
pub(crate) struct Level {
    pub abi: u32,
    pub description: String,
}

/// The kernel's Landlock against the policy's floor, and what lanes will get: refused below the
/// floor. Nothing is opened, so a dispatch learns this before it is accepted.
pub(crate) fn level(policy: &SandboxPolicy) -> Result<Level, SandboxError> {
    let abi_number = ABI::from(kernel_landlock_abi()) as u32;
    if abi_number < policy.landlock_min_abi {
        return Err(SandboxError::Landlock(format!(
            "the kernel offers Landlock ABI {abi_number}, below the configured floor {}; refusing to run lanes",
            policy.landlock_min_abi
        )));
    }
    if abi_number == ABI::Unsupported as u32 {
        return Ok(Level {
            abi: 0,
            description: "not enforced: the kernel has no Landlock and landlock_min_abi is 0"
                .into(),
        });
    }
    let mut features = vec!["filesystem"];
    if abi_number >= ABI::V4 as u32 {
        features.push("tcp bind/connect");
    }
    if abi_number >= ABI::V6 as u32 {
        features.push("signal and abstract-socket scoping");
    }
    let open = open_at_abi(abi_number);
    let mut description = format!("enforced (ABI {abi_number}: {})", features.join(", "));
    if !open.is_empty() {
        description.push_str(&format!(
            "; not restricted at this ABI: {}",
            open.join(", ")
        ));
    }
    Ok(Level {
        abi: abi_number,
        description,
    })
}

/// A lane's ruleset: everything this ABI can restrict is handled (so denied), and the rules
/// grant the shared paths, the lane's own paths, the `/etc` entries present now and the
/// configured TCP ports.
pub(crate) fn build(
    plan: &LanePlan,
    policy: &SandboxPolicy,
    shared: Option<&SharedPaths>,
) -> Result<BuiltRuleset, SandboxError> {
    let level = level(policy)?;
    let abi = ABI::from(level.abi as i32);
    if abi == ABI::Unsupported {
        return Ok(BuiltRuleset {
            ruleset: None,
            work_dir_access: 0,
        });
    }
    let shared = shared.filter(|shared| shared.abi == abi).ok_or_else(|| {
        SandboxError::Landlock(format!(
            "the shared paths were opened for another Landlock ABI than the kernel's {}",
            level.abi
        ))
    })?;
    let mut created = handling_everything(abi)?;
    add_path_rules(&mut created, plan, shared, abi)?;
    if abi as u32 >= ABI::V4 as u32 {
        for &port in &policy.tcp_connect_ports {
            (&mut created)
                .add_rule(NetPort::new(port, AccessNet::ConnectTcp))
                .map_err(|e| {
                    SandboxError::Landlock(format!("allow tcp connect to port {port}: {e}"))
                })?;
        }
    }
    let ruleset: Option<OwnedFd> = created.into();
    let ruleset =
        ruleset.ok_or_else(|| SandboxError::Landlock("the kernel returned no ruleset".into()))?;
    // The child's stdio goes onto 0–2 before it uses the ruleset: never one of those numbers.
    let ruleset = crate::spawner::above_stdio(ruleset)
        .map_err(|e| SandboxError::Landlock(format!("copy the ruleset above stdio: {e}")))?;
    Ok(BuiltRuleset {
        ruleset: Some(ruleset),
        work_dir_access: AccessFs::from_all(abi).bits(),
    })
}

/// A ruleset that handles every right `abi` has (filesystem, TCP from ABI 4, signal and
/// abstract-socket scoping from ABI 6), with no rule yet. Hard requirement: we only ask for
/// what this ABI has, so a downgrade would be a bug, not a kernel limit.
fn handling_everything(abi: ABI) -> Result<RulesetCreated, SandboxError> {
    let fail =
        |what: &str, e: landlock::RulesetError| SandboxError::Landlock(format!("{what}: {e}"));
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(AccessFs::from_all(abi))
        .map_err(|e| fail("handle filesystem access", e))?;
    if abi as u32 >= ABI::V4 as u32 {
        ruleset = ruleset
            .handle_access(AccessNet::BindTcp | AccessNet::ConnectTcp)
            .map_err(|e| fail("handle network access", e))?;
    }
    if abi as u32 >= ABI::V6 as u32 {
        ruleset = ruleset
            .scope(Scope::AbstractUnixSocket | Scope::Signal)
            .map_err(|e| fail("scope signals and abstract sockets", e))?;
    }
    ruleset.create().map_err(|e| fail("create ruleset", e))
}

/// The filesystem rules: the shared paths, the lane's program, home, work dir (unless the lane
/// makes it) and PATH directories, and the `/etc` entries present now.
fn add_path_rules(
    created: &mut RulesetCreated,
    plan: &LanePlan,
    shared: &SharedPaths,
    abi: ABI,
) -> Result<(), SandboxError> {
    let read_exec = AccessFs::from_read(abi);
    let read = read_exec & !AccessFs::Execute;
    let read_write = AccessFs::from_all(abi);
    let mut add = |path: &Path, fd: &dyn AsFd, access: BitFlags<AccessFs>| {
        (&mut *created)
            .add_rule(PathBeneath::new(fd.as_fd(), access))
            .map(|_| ())
            .map_err(|e| SandboxError::Landlock(format!("add rule for {}: {e}", path.display())))
    };
    for (path, fd, access) in &shared.rules {
        add(path, fd, *access)?;
    }
    let mut grant = |path: &Path, access: BitFlags<AccessFs>, why: &str| {
        let (fd, access) = open_for_rule(path, access, abi, why)?;
        add(path, &fd, access)
    };
    // The program itself must be executable even when it lives outside the system paths.
    grant(Path::new(&plan.argv[0]), read_exec, "program")?;
    // The home comes from passwd, not from the configuration: an account without one (such as
    // nobody's /nonexistent) simply has nothing to read.
    if plan.identity.home.is_dir() {
        grant(&plan.identity.home, read, "home")?;
    }
    // A directory the lane makes gets its rule in the lane, on the fd of what it made.
    if !plan.make_work_dir {
        grant(&plan.work_dir, read_write, "work_dir")?;
    }
    for path in &plan.exec_paths {
        grant(path, read_exec, "PATH")?;
    }
    // Checked for every lane, not once: a rule holds the inode it was opened on, and these
    // files are replaced by rename all the time (useradd, ldconfig, the resolver, `git config
    // --system`). One that does not exist now (or is a dangling link) is simply not granted.
    let mut if_present = shared.if_present.lock().unwrap_or_else(|p| p.into_inner());
    for entry in if_present.iter_mut() {
        entry.refresh(read, abi);
        if let Some((fd, _, access)) = &entry.opened {
            add(&entry.path, fd, *access)?;
        }
    }
    Ok(())
}

/// What Landlock leaves unrestricted at `abi` that a newer kernel restricts: said in every
/// job's sandbox report and by `dispatch-helper check`, so an administrator who keeps a low
/// `landlock_min_abi` knows what that allows.
pub fn open_at_abi(abi: u32) -> Vec<&'static str> {
    [
        (1, "everything (no Landlock)"),
        (3, "truncating files (ABI 3)"),
        (4, "TCP bind and connect to any port (ABI 4)"),
        (5, "ioctl on device files (ABI 5)"),
        (
            6,
            "signals to processes outside the lane and abstract Unix sockets (ABI 6)",
        ),
    ]
    .into_iter()
    .filter(|&(since, _)| abi < since)
    .map(|(_, what)| what)
    .collect()
}

/// The kernel's Landlock ABI version (0 without Landlock), capped by what the landlock crate
/// knows (`ABI::from` maps newer versions to the newest it supports).
pub fn kernel_landlock_abi() -> i32 {
    const LANDLOCK_CREATE_RULESET_VERSION: u32 = 1;
    // SAFETY: with a NULL attribute, size 0 and the VERSION flag the kernel only returns the ABI
    // version (or an error); no memory is read or written.
    #[allow(unsafe_code)]
    let version = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    version.max(0) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_abi_says_what_it_leaves_open() {
        assert_eq!(open_at_abi(7), Vec::<&str>::new());
        assert_eq!(open_at_abi(6), Vec::<&str>::new());
        let at_five = open_at_abi(5);
        assert_eq!(at_five.len(), 1);
        assert!(at_five[0].starts_with("signals"));
        let at_one = open_at_abi(1);
        assert!(at_one.iter().any(|gap| gap.starts_with("TCP")));
        assert!(at_one.iter().any(|gap| gap.starts_with("truncating")));
        assert!(open_at_abi(0)[0].contains("no Landlock"));
    }
}
