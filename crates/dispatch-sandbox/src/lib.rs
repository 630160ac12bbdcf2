//! The sandboxed spawn of a lane.
//!
//! Everything that reads files, asks NSS or allocates happens in the helper, before the clone
//! ([`prepare`]): resolving the unix user, opening the Landlock ruleset, compiling the seccomp
//! programs, building argv and environment. The child ([`child`]), started like `posix_spawn`
//! starts one (a vfork-style clone, no copy of the helper's memory), then runs one fixed
//! sequence of plain system calls on that prepared data, in this order:
//!
//! 1. signal handlers back to their defaults; into the lane's own cgroup (`cgroup.rs`); new
//!    session and process group
//! 2. the group registered with the lane reaper; stdin `/dev/null`, stdout/stderr to the capture pipes
//! 3. rlimits (`limits.rs`: those no cgroup controller holds)
//! 4. `setgroups` → `setresgid` → `setresuid`, verified with `getres*`, and `setresuid(0,0,0)` must fail;
//!    then `chdir` into the work dir as the lane user
//! 5. `PR_SET_PDEATHSIG` (after the drop, which clears it) and a `getppid` check
//! 6. every fd above 2 marked close-on-exec
//! 7. `no_new_privs`
//! 8. Landlock
//! 9. seccomp: inherited at the clone from the spawner thread, which put itself under the
//!    policy's programs when it started (attaching them per lane was the largest share of a
//!    spawn); a lane whose policy has changed since adds its own, last
//! 10. exec of the fixed argv
//!
//! If the helper asks, the child waits at a gate (`gate.rs`) between 3 and 4, still as root,
//! until the helper lets the lane run: the clone and the first steps overlap the sync of the
//! job's record.
//!
//! Any failing step aborts the spawn, and the error names the step.
//!
//! Spawns go through [`LaneSpawner`], a pool of long-lived threads: `PR_SET_PDEATHSIG` fires when the
//! *thread* that created the child exits, not the process, so that thread must outlive every
//! lane. The death signal only reaches the lane's first process, so the spawner also runs the
//! lane reaper (`reaper.rs`), which kills every live lane's whole group (and, with cgroups, every
//! lane's whole cgroup) when the helper dies.

pub mod cgroup;
mod child;
mod gate;
pub use gate::LaneGate;
mod identity;
mod landlock_rules;
pub use landlock_rules::{kernel_landlock_abi, open_at_abi};
mod limits;
pub use limits::{LimitReport, Limits, bytes};
mod reaper;
mod seccomp_filter;
mod spawner;
mod watchdog;

pub use child::ChildStep;
/// The most lanes one helper can have running at once (its reaper's table).
pub const MAX_LANES: usize = reaper::CAPACITY;
pub use identity::{LaneIdentity, current_identity, resolve_identity};
pub use spawner::{Containment, LaneEnd, LaneSpawner, LaneUsage, SpawnedLane, wait_for_exit};

use std::os::fd::OwnedFd;
use std::path::PathBuf;

/// What the administrator configures for every lane.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxPolicy {
    /// Refuse to run lanes if the kernel's Landlock ABI is below this (0 disables Landlock:
    /// only for kernels without it, and the job record then says so).
    pub landlock_min_abi: u32,
    /// Read and execute (system paths).
    pub read_exec_paths: Vec<PathBuf>,
    /// Read only, in addition to the org-user's home.
    pub read_paths: Vec<PathBuf>,
    /// Read only where they exist (what lanes need of `/etc`, which differs between systems),
    /// looked up afresh for every lane. Not `/etc` itself: it holds the helper's own
    /// configuration and allowlist.
    pub read_paths_if_present: Vec<PathBuf>,
    /// Read and write, in addition to the lane work directory and /dev/null.
    pub read_write_paths: Vec<PathBuf>,
    /// TCP ports lanes may connect to (where the kernel has Landlock ABI ≥ 4). TCP bind is never allowed.
    pub tcp_connect_ports: Vec<u16>,
    /// Allow `socket(AF_UNIX, …)`. Off by default: a lane must not reach the helper's socket even
    /// in unprivileged mode where it runs as the helper's own user.
    pub allow_unix_sockets: bool,
    pub limits: Limits,
    /// Extra environment variables, `NAME=value`, set by the administrator (never inherited).
    pub extra_env: Vec<String>,
    /// Where lane cgroups live (read when the helper starts; a reload does not move them).
    pub cgroup: cgroup::CgroupSetting,
    /// Run lanes even without a cgroup to contain them (root mode refuses to otherwise): a
    /// lane's daemonised descendant can then outlive it until the helper notices.
    pub allow_uncontained: bool,
}

impl Default for SandboxPolicy {
    fn default() -> Self {
        SandboxPolicy {
            landlock_min_abi: 1,
            read_exec_paths: ["/usr", "/bin", "/sbin", "/lib", "/lib64"]
                .iter()
                .map(PathBuf::from)
                .filter(|p| p.exists())
                .collect(),
            read_paths: vec![PathBuf::from("/proc"), PathBuf::from("/dev/urandom")],
            read_paths_if_present: ETC_FOR_LANES.iter().map(PathBuf::from).collect(),
            read_write_paths: Vec::new(),
            tcp_connect_ports: vec![22, 443],
            allow_unix_sockets: false,
            limits: Limits::default(),
            extra_env: Vec::new(),
            cgroup: cgroup::CgroupSetting::Auto,
            allow_uncontained: false,
        }
    }
}

/// One lane to start: all values already validated by the policy crate.
#[derive(Debug, Clone)]
pub struct LanePlan {
    pub identity: LaneIdentity,
    /// argv[0] is absolute (the template resolved it at load time).
    pub argv: Vec<String>,
    pub work_dir: PathBuf,
    /// Make `work_dir` in the lane, as the lane user, after the uid drop: the job's own
    /// directory, in its parent (the lane user's work area, which must be that user's). The
    /// helper needs no right to write there (its unit has no CAP_DAC_OVERRIDE or CAP_CHOWN),
    /// and the Landlock rule for it is added on the new directory's fd before the ruleset is
    /// enforced. False: `work_dir` exists and is used as it is.
    pub make_work_dir: bool,
    /// The caller's values of the variables the helper passes (`pass_env`), checked by it:
    /// set after the lane's defaults, before the administrator's `extra_env`.
    pub passed_env: Vec<(String, String)>,
    /// Directories beneath which the lane may run programs besides the system paths (those of
    /// a passed PATH).
    pub exec_paths: Vec<PathBuf>,
    /// Change uid/gid/groups to the identity's. False in unprivileged mode, where the identity
    /// must be the helper's own user.
    pub change_uid: bool,
}

/// What was enforced, for the job record.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Enforcement {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub landlock_abi: u32,
    pub landlock: String,
    pub seccomp: bool,
    pub no_new_privs: bool,
    pub same_uid: bool,
    /// What ends everything the lane starts: its cgroup, or (without one) its process group and
    /// the helper as subreaper.
    pub containment: String,
    /// Each limit and what holds it.
    pub limits: Vec<LimitReport>,
}

/// A lane ready to start: everything the child needs, computed in the helper.
pub struct PreparedLane {
    plan: LanePlan,
    env: Vec<(String, String)>,
    landlock: Option<OwnedFd>,
    /// See `BuiltRuleset::work_dir_access`.
    work_dir_access: u64,
    seccomp: Vec<seccompiler::BpfProgram>,
    limits: Limits,
    enforcement: Enforcement,
    /// The read end of the lane's gate, if it is held (see [`PreparedLane::hold_before_exec`]).
    gate: Option<OwnedFd>,
}

impl PreparedLane {
    pub fn enforcement(&self) -> &Enforcement {
        &self.enforcement
    }

    /// Hold this lane, once spawned, before it takes its user's identity (still root, in its
    /// cgroup, its stdio and rlimits set, nothing else of the helper's open) until the
    /// returned gate is opened; dropping the gate unopened makes the spawn fail there, with
    /// nothing made or run.
    ///
    /// The spawn is answered only after the exec (or the failure), so the gate must be opened
    /// or dropped by someone other than the caller waiting for that answer.
    pub fn hold_before_exec(&mut self) -> Result<LaneGate, SandboxError> {
        let (gate, reader) = gate::new_gate()?;
        self.gate = Some(reader);
        Ok(gate)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("resolve unix user {user:?}: {reason}")]
    Identity { user: String, reason: String },
    #[error("landlock: {0}")]
    Landlock(String),
    #[error("seccomp: {0}")]
    Seccomp(String),
    #[error("lane work directory {path}: {reason}")]
    WorkDir { path: String, reason: String },
    #[error("environment: {0}")]
    Environment(String),
    #[error("spawn failed at step '{step}': {error}")]
    ChildStep {
        step: ChildStep,
        error: std::io::Error,
    },
    #[error("spawn failed: {0}")]
    Spawn(std::io::Error),
    #[error("the lane spawner thread is gone")]
    SpawnerGone,
    #[error(
        "the lane was stopped (SIGSTOP) before its exec, so it was killed and nothing ran: a \
         spawner thread is never left waiting for a stopped lane"
    )]
    StoppedBeforeExec,
    #[error("the lane reaper could not be started or reached: {0}")]
    Reaper(std::io::Error),
    #[error("{0} lanes are already running; no more can be tracked")]
    TooManyLanes(usize),
    #[error("refusing to change uid: {0}")]
    SuidDumpable(String),
    #[error("limits: {0}")]
    Limits(String),
    #[error("{0}")]
    Cgroup(#[from] cgroup::CgroupError),
}

/// What lanes read of `/etc` by default: accounts and name service, the resolver, the dynamic
/// linker, time zone, certificates, and the ssh, git and tmux system configuration.
pub const ETC_FOR_LANES: &[&str] = &[
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
    "/etc/hosts",
    "/etc/host.conf",
    "/etc/resolv.conf",
    "/etc/gai.conf",
    "/etc/services",
    "/etc/protocols",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/timezone",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/ca-certificates.conf",
    "/etc/pki",
    "/etc/ssh",
    "/etc/gitconfig",
    "/etc/tmux.conf",
    "/etc/alternatives",
    "/etc/mime.types",
    "/etc/crypto-policies",
    "/etc/gnutls",
    "/etc/krb5.conf",
    "/etc/krb5.conf.d",
    "/etc/profile",
    "/etc/profile.d",
    "/etc/bash.bashrc",
    "/etc/environment",
    "/etc/inputrc",
    "/etc/gitattributes",
    "/etc/terminfo",
];

/// Fixed PATH for lanes: never the helper's own.
pub const LANE_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// A sandbox policy with its seccomp programs compiled and its shared Landlock paths opened
/// once: they do not depend on the lane, so the helper builds this when it loads its
/// configuration (and fails there, not per dispatch). A reload (SIGHUP) builds a new one.
#[derive(Debug)]
pub struct Sandbox {
    policy: SandboxPolicy,
    seccomp: Vec<seccompiler::BpfProgram>,
    shared_paths: Option<landlock_rules::SharedPaths>,
}

impl Sandbox {
    pub fn new(policy: SandboxPolicy) -> Result<Sandbox, SandboxError> {
        policy.limits.validate().map_err(SandboxError::Limits)?;
        let seccomp = seccomp_filter::compile(&policy)?;
        let shared_paths = landlock_rules::SharedPaths::open(&policy)?;
        Ok(Sandbox {
            policy,
            seccomp,
            shared_paths,
        })
    }

    pub fn policy(&self) -> &SandboxPolicy {
        &self.policy
    }

    pub(crate) fn seccomp(&self) -> &[seccompiler::BpfProgram] {
        &self.seccomp
    }

    /// Whether a lane of `plan` can run, and what it will run under, without opening anything
    /// for it: its work directory, its environment, the kernel's Landlock against the floor.
    /// Cheap, so the helper checks a dispatch with it before accepting it, and prepares the
    /// lane (the costly part) while the acceptance is being made durable.
    pub fn check(&self, plan: &LanePlan) -> Result<Enforcement, SandboxError> {
        check_work_dir(plan)?;
        build_env(plan, &self.policy)?;
        let landlock = landlock_rules::level(&self.policy)?;
        let identity = &plan.identity;
        Ok(Enforcement {
            uid: identity.uid,
            gid: identity.gid,
            groups: identity.groups.clone(),
            landlock_abi: landlock.abi,
            landlock: landlock.description,
            seccomp: true,
            no_new_privs: true,
            same_uid: !plan.change_uid,
            // Filled in by the spawner, which knows the lane's cgroup.
            containment: String::new(),
            limits: Vec::new(),
        })
    }

    /// Prepare a lane in the helper: Landlock ruleset and environment for this lane.
    pub fn prepare(&self, plan: LanePlan) -> Result<PreparedLane, SandboxError> {
        let enforcement = self.check(&plan)?;
        self.prepare_checked(plan, enforcement)
    }

    /// [`Sandbox::prepare`] of a plan [`Sandbox::check`] passed, with what it returned.
    pub fn prepare_checked(
        &self,
        plan: LanePlan,
        enforcement: Enforcement,
    ) -> Result<PreparedLane, SandboxError> {
        let env = build_env(&plan, &self.policy)?;
        let landlock = landlock_rules::build(&plan, &self.policy, self.shared_paths.as_ref())?;
        Ok(PreparedLane {
            plan,
            env,
            landlock: landlock.ruleset,
            work_dir_access: landlock.work_dir_access,
            seccomp: self.seccomp.clone(),
            limits: self.policy.limits,
            enforcement,
            gate: None,
        })
    }
}

/// The work dir gets read-write Landlock rights opened by the helper: it must be the lane user's
/// own real directory, not a symlink someone pointed elsewhere. One the lane makes itself is
/// checked by its parent, the area it goes in.
fn check_work_dir(plan: &LanePlan) -> Result<(), SandboxError> {
    let work_dir_error = |reason: String| SandboxError::WorkDir {
        path: plan.work_dir.display().to_string(),
        reason,
    };
    let checked = match (plan.make_work_dir, plan.work_dir.parent()) {
        (true, Some(area)) => area,
        (true, None) => return Err(work_dir_error("has no parent directory".into())),
        (false, _) => plan.work_dir.as_path(),
    };
    let meta = std::fs::symlink_metadata(checked).map_err(|e| work_dir_error(e.to_string()))?;
    if meta.file_type().is_symlink() {
        return Err(work_dir_error(
            "is a symbolic link; it must be a real directory".into(),
        ));
    }
    if !meta.is_dir() {
        return Err(work_dir_error("not a directory".into()));
    }
    let owner = std::os::unix::fs::MetadataExt::uid(&meta);
    if owner != plan.identity.uid {
        return Err(work_dir_error(format!(
            "{}is owned by uid {owner}, not by the lane user {} (uid {})",
            if plan.make_work_dir {
                "its parent "
            } else {
                ""
            },
            plan.identity.name,
            plan.identity.uid
        )));
    }
    Ok(())
}

/// One-off preparation (compiles the seccomp programs each time; the helper uses [`Sandbox`]).
pub fn prepare(plan: LanePlan, policy: &SandboxPolicy) -> Result<PreparedLane, SandboxError> {
    Sandbox::new(policy.clone())?.prepare(plan)
}

fn build_env(
    plan: &LanePlan,
    policy: &SandboxPolicy,
) -> Result<Vec<(String, String)>, SandboxError> {
    let identity = &plan.identity;
    let mut env = vec![
        ("HOME".to_owned(), identity.home.display().to_string()),
        ("USER".to_owned(), identity.name.clone()),
        ("LOGNAME".to_owned(), identity.name.clone()),
        ("PATH".to_owned(), LANE_PATH.to_owned()),
        ("LANG".to_owned(), "C.UTF-8".to_owned()),
        ("TMPDIR".to_owned(), plan.work_dir.display().to_string()),
    ];
    for (name, value) in &plan.passed_env {
        env.retain(|(existing, _)| existing != name);
        env.push((name.clone(), value.clone()));
    }
    for entry in &policy.extra_env {
        let (name, value) = entry.split_once('=').ok_or_else(|| {
            SandboxError::Environment(format!("extra_env entry {entry:?} is not NAME=value"))
        })?;
        let valid_name = !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid_name || name.starts_with("LD_") || value.contains('\0') {
            return Err(SandboxError::Environment(format!(
                "extra_env entry {entry:?}: the name must be [A-Za-z_][A-Za-z0-9_]* and not LD_*"
            )));
        }
        env.retain(|(existing, _)| existing != name);
        env.push((name.to_owned(), value.to_owned()));
    }
    Ok(env)
}
