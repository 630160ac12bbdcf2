//! The Landlock ruleset, built in the helper before the fork. The child only calls
//! `landlock_restrict_self` on the prepared fd.

use crate::{LanePlan, SandboxError, SandboxPolicy};
use landlock::{
    ABI, Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, NetPort, PathBeneath,
    PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr, Scope,
};
use std::os::fd::OwnedFd;
use std::path::Path;

pub(crate) struct BuiltRuleset {
    /// None only when the policy's floor is 0 and the kernel has no Landlock.
    pub ruleset: Option<OwnedFd>,
    pub abi: u32,
    pub description: String,
}

pub(crate) fn build(plan: &LanePlan, policy: &SandboxPolicy) -> Result<BuiltRuleset, SandboxError> {
    let abi = ABI::from(kernel_landlock_abi());
    let abi_number = abi as u32;
    if abi_number < policy.landlock_min_abi {
        return Err(SandboxError::Landlock(format!(
            "the kernel offers Landlock ABI {abi_number}, below the configured floor {}; refusing to run lanes",
            policy.landlock_min_abi
        )));
    }
    if abi == ABI::Unsupported {
        return Ok(BuiltRuleset {
            ruleset: None,
            abi: 0,
            description: "not enforced: the kernel has no Landlock and landlock_min_abi is 0"
                .into(),
        });
    }

    let fail =
        |what: &str, e: landlock::RulesetError| SandboxError::Landlock(format!("{what}: {e}"));
    let read_exec = AccessFs::from_read(abi);
    let read = read_exec & !AccessFs::Execute;
    let read_write = AccessFs::from_all(abi);
    let has_net = abi as u32 >= ABI::V4 as u32;
    let has_scopes = abi as u32 >= ABI::V6 as u32;

    // Every right we handle for this ABI is denied unless a rule grants it. Hard requirement:
    // we only ask for what this ABI has, so a downgrade would be a bug, not a kernel limit.
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(AccessFs::from_all(abi))
        .map_err(|e| fail("handle filesystem access", e))?;
    if has_net {
        ruleset = ruleset
            .handle_access(AccessNet::BindTcp | AccessNet::ConnectTcp)
            .map_err(|e| fail("handle network access", e))?;
    }
    if has_scopes {
        ruleset = ruleset
            .scope(Scope::AbstractUnixSocket | Scope::Signal)
            .map_err(|e| fail("scope signals and abstract sockets", e))?;
    }
    let mut created = ruleset.create().map_err(|e| fail("create ruleset", e))?;

    let mut grant = |path: &Path,
                     access: BitFlags<AccessFs>,
                     why: &str|
     -> Result<(), SandboxError> {
        // path_beneath_rules() silently skips paths that do not exist; a configured path that
        // is missing must be an error instead.
        let fd = PathFd::new(path).map_err(|e| {
            SandboxError::Landlock(format!(
                "{why} path {} cannot be opened: {e}",
                path.display()
            ))
        })?;
        // The type of what was opened, not of whatever the path names a moment later.
        let is_dir = nix::sys::stat::fstat(&fd)
            .is_ok_and(|stat| stat.st_mode & libc::S_IFMT == libc::S_IFDIR);
        let access = if is_dir {
            access
        } else {
            access & AccessFs::from_file(abi)
        };
        (&mut created)
            .add_rule(PathBeneath::new(fd, access))
            .map_err(|e| SandboxError::Landlock(format!("add rule for {}: {e}", path.display())))?;
        Ok(())
    };

    for path in &policy.read_exec_paths {
        grant(path, read_exec, "read_exec")?;
    }
    // The program itself must be executable even when it lives outside the system paths.
    grant(Path::new(&plan.argv[0]), read_exec, "program")?;
    // The home comes from passwd, not from the configuration: an account without one (such as
    // nobody's /nonexistent) simply has nothing to read.
    if plan.identity.home.is_dir() {
        grant(&plan.identity.home, read, "home")?;
    }
    for path in &policy.read_paths {
        grant(path, read, "read")?;
    }
    grant(&plan.work_dir, read_write, "work_dir")?;
    grant(Path::new("/dev/null"), read_write, "/dev/null")?;
    for path in &policy.read_write_paths {
        grant(path, read_write, "read_write")?;
    }
    if has_net {
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

    let mut features = vec!["filesystem"];
    if has_net {
        features.push("tcp bind/connect");
    }
    if has_scopes {
        features.push("signal and abstract-socket scoping");
    }
    Ok(BuiltRuleset {
        ruleset: Some(ruleset),
        abi: abi_number,
        description: format!("enforced (ABI {abi_number}: {})", features.join(", ")),
    })
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
