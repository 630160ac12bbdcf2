//! The helper's own configuration: one root-owned TOML file. It alone chooses the argv, the
//! host, the limits and the sandbox; nothing the front sends can change them.

use dispatch_policy::{Allowlist, ArgvTemplate, DEFAULT_TEMPLATE};
use dispatch_sandbox::SandboxPolicy;
use nix::unistd::{Group, User};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_CONFIG: &str = "/etc/dispatch-mcp/helper.toml";

/// The file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// The `.repos.json` allowlist. Overridden by DISPATCH_REPOS_JSON.
    pub allowlist: PathBuf,
    /// The dispatch argv template. Default: the Python server's.
    #[serde(default = "default_argv")]
    pub argv: Vec<String>,
    /// PATH used once, at load, to resolve a bare argv[0].
    #[serde(default = "default_search_path")]
    pub search_path: String,
    /// Overridden by DISPATCH_SSH_HOST.
    #[serde(default = "default_host")]
    pub host: String,
    /// Overridden by DISPATCH_MAX_ITERATIONS.
    #[serde(default = "default_max_iterations")]
    pub max_iterations: u32,
    /// Accept tasks that start with '-'. Off by default: the task is always one argv element,
    /// but a dispatch command that parses options could still take `--help` there for an
    /// option. Turn on only if the command stops option parsing before the task.
    #[serde(default)]
    pub allow_option_like_tasks: bool,
    /// Seconds a lane may run before it is stopped. Overridden by DISPATCH_TIMEOUT.
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u64,
    /// Seconds between SIGTERM and SIGKILL when a lane is stopped.
    #[serde(default = "default_grace")]
    pub kill_grace_seconds: u64,
    pub state_dir: PathBuf,
    pub audit_log: PathBuf,
    pub socket: PathBuf,
    /// Group owning the socket (mode `socket_mode`) when the helper binds it itself.
    #[serde(default)]
    pub socket_group: Option<String>,
    #[serde(default = "default_socket_mode")]
    pub socket_mode: u32,
    /// The lane user's work area: `{home}`, `{unix_user}` and `{orguser}` are substituted. Each
    /// job runs in its own directory beneath it, made by the lane as its user; nothing else of
    /// the home is writable. Default (empty): `<state_dir>/lanes/{unix_user}`, made by the
    /// helper when missing.
    #[serde(default)]
    pub work_dir: String,
    /// Keep a job's directory when its record is deleted or pruned (default: removed with it).
    #[serde(default)]
    pub keep_work_dirs: bool,
    /// Environment variables a caller may pass to its lanes (their values come with each
    /// dispatch, are never recorded, and override the lane's defaults). Default: none. `PATH`
    /// also lets lanes run programs beneath each of its absolute directories.
    #[serde(default)]
    pub pass_env: Vec<String>,
    /// Stop after this many seconds with no connection, no running lane and nothing queued
    /// (0: never). For a helper started on demand, such as a user's personal one.
    #[serde(default)]
    pub exit_when_idle_seconds: u64,
    /// The Python server's variables, as values (the process environment overrides them):
    /// how a personal helper keeps the settings of the MCP client entry that started it.
    #[serde(default)]
    pub environment: EnvironmentTable,
    /// Groups an org-user's account must not be in (root mode): their powers would reach its
    /// lanes. Default: `lane_users::DEFAULT_FORBIDDEN_GROUPS`.
    #[serde(default = "default_forbidden_lane_groups")]
    pub forbidden_lane_groups: Vec<String>,
    /// Let several orgs run as one unix account (their `allowed_clients` then overlap).
    #[serde(default)]
    pub allow_shared_unix_users: bool,
    #[serde(default)]
    pub clients: ClientsConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub sandbox: SandboxPolicy,
}

/// Who may talk to the helper at all (per-org rules in the allowlist narrow it further). The
/// helper's own uid is always admitted.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientsConfig {
    #[serde(default)]
    pub users: Vec<String>,
    #[serde(default)]
    pub groups: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub max_connections: usize,
    pub max_in_flight_per_connection: usize,
    pub idle_timeout_seconds: u64,
    pub max_running_jobs: usize,
    /// Per client uid, so one client cannot take every slot.
    pub max_running_jobs_per_client: usize,
    /// Per lane (org-user and repo), as a dispatcher of one repo would allow.
    pub max_running_jobs_per_lane: usize,
    /// Dispatches that wait for a slot when the caps above are reached, per client and in all;
    /// past these a dispatch is refused.
    pub max_queued_per_client: usize,
    pub max_queued: usize,
    pub max_connections_per_client: usize,
    /// Older finished records of a client are pruned beyond this many (audited).
    pub max_finished_jobs_per_client: usize,
    pub output_tail_bytes: usize,
    pub max_result_wait_seconds: u64,
    pub max_list: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 64,
            max_in_flight_per_connection: 8,
            idle_timeout_seconds: 300,
            max_running_jobs: 32,
            max_running_jobs_per_client: 8,
            max_running_jobs_per_lane: 8,
            max_queued_per_client: 64,
            max_queued: 1024,
            max_connections_per_client: 16,
            max_finished_jobs_per_client: 1000,
            output_tail_bytes: 16 * 1024,
            max_result_wait_seconds: 600,
            max_list: 500,
        }
    }
}

fn default_argv() -> Vec<String> {
    DEFAULT_TEMPLATE.iter().map(|s| s.to_string()).collect()
}
fn default_search_path() -> String {
    "/usr/local/bin:/usr/bin:/bin".into()
}
fn default_host() -> String {
    "localhost".into()
}
fn default_max_iterations() -> u32 {
    20
}
fn default_timeout() -> u64 {
    600
}
fn default_grace() -> u64 {
    5
}
fn default_socket_mode() -> u32 {
    0o660
}

/// `[environment]`: the same variables the process environment may set.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvironmentTable {
    #[serde(rename = "DISPATCH_REPOS_JSON")]
    pub repos_json: Option<String>,
    #[serde(rename = "DISPATCH_SSH_HOST")]
    pub ssh_host: Option<String>,
    #[serde(rename = "DISPATCH_MAX_ITERATIONS")]
    pub max_iterations: Option<String>,
    #[serde(rename = "DISPATCH_TIMEOUT")]
    pub timeout: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: String, message: String },
    #[error("{0}")]
    Unsafe(String),
    #[error("environment variable {name}={value:?}: {message}")]
    Env {
        name: &'static str,
        value: String,
        message: String,
    },
    #[error("{0}")]
    Invalid(String),
}

/// Everything the helper decides with, loaded and checked.
#[derive(Debug)]
pub struct Settings {
    pub file: ConfigFile,
    pub template: ArgvTemplate,
    pub allowlist: Allowlist,
    pub warnings: Vec<String>,
    pub admitted_uids: BTreeSet<u32>,
    pub admitted_gids: BTreeSet<u32>,
    pub unprivileged: bool,
    /// The helper's own account name (the lane user in unprivileged mode).
    pub own_user: String,
    /// `file.sandbox` with its seccomp programs compiled.
    pub sandbox: dispatch_sandbox::Sandbox,
    /// Per org-user: the gids of its `allowed_clients.groups`, resolved at load so that no
    /// request waits on a group lookup.
    pub org_client_gids: std::collections::BTreeMap<String, BTreeSet<u32>>,
    /// Orgs whose unix account may not run lanes (root mode), with the reason (see `lane_users`).
    pub refused_orgs: BTreeMap<String, String>,
    /// The lane accounts' identities, each looked up at most once a second (a reload starts
    /// afresh).
    pub identities: crate::identities::IdentityCache,
}

impl Settings {
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.file.timeout_seconds)
    }
    pub fn grace(&self) -> Duration {
        Duration::from_secs(self.file.kill_grace_seconds)
    }
}

/// Environment overrides, read once by the caller (so tests can pass their own).
#[derive(Debug, Default, Clone)]
pub struct EnvOverrides {
    pub repos_json: Option<String>,
    pub ssh_host: Option<String>,
    pub max_iterations: Option<String>,
    pub timeout: Option<String>,
}

impl EnvOverrides {
    pub fn from_process() -> Self {
        let get = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
        EnvOverrides {
            repos_json: get("DISPATCH_REPOS_JSON"),
            ssh_host: get("DISPATCH_SSH_HOST"),
            max_iterations: get("DISPATCH_MAX_ITERATIONS"),
            timeout: get("DISPATCH_TIMEOUT"),
        }
    }

    /// These, each falling back to the configuration's `[environment]` table.
    fn or(&self, table: &EnvironmentTable) -> EnvOverrides {
        EnvOverrides {
            repos_json: self.repos_json.clone().or(table.repos_json.clone()),
            ssh_host: self.ssh_host.clone().or(table.ssh_host.clone()),
            max_iterations: self.max_iterations.clone().or(table.max_iterations.clone()),
            timeout: self.timeout.clone().or(table.timeout.clone()),
        }
    }
}

pub fn load(path: &Path, env: &EnvOverrides) -> Result<Settings, ConfigError> {
    let running_as_root = nix::unistd::geteuid().is_root();
    if running_as_root {
        check_strict_modes(path)?;
    }
    let mut file = read_file(path)?;
    let env = env.or(&file.environment);
    let env_warnings = apply_env(&mut file, &env);
    check_pass_env(&file.pass_env, running_as_root)?;
    validate_host(&file.host)?;
    check_limits(&file)?;
    if running_as_root {
        check_strict_modes(&file.allowlist)?;
    }
    let loaded =
        Allowlist::load(&file.allowlist).map_err(|e| ConfigError::Invalid(e.to_string()))?;
    let template = ArgvTemplate::parse(&file.argv, Some(file.search_path.as_ref()))
        .map_err(|e| ConfigError::Invalid(format!("config {}: {e}", path.display())))?;
    if running_as_root {
        // The program runs as every org-user: nobody but root may be able to change it.
        check_strict_modes(template.program())?;
    }
    let mut warnings = loaded.warnings;
    warnings.extend(env_warnings);
    refuse_grants_of_own_files(&file, path)?;
    let sandbox = dispatch_sandbox::Sandbox::new(file.sandbox.clone())
        .map_err(|e| ConfigError::Invalid(format!("config {}: sandbox: {e}", path.display())))?;
    let own_uid = nix::unistd::geteuid();
    let own_user = User::from_uid(own_uid)
        .ok()
        .flatten()
        .map(|u| u.name)
        .ok_or_else(|| {
            ConfigError::Invalid(format!("the helper's uid {own_uid} has no passwd entry"))
        })?;
    let (admitted_uids, admitted_gids) = admitted_clients(&file.clients, own_uid, &mut warnings);
    let org_client_gids = org_client_gids(&loaded.allowlist, &mut warnings);
    let refused_orgs = if running_as_root {
        refused_orgs(&file, &loaded.allowlist, &mut warnings)
    } else {
        Default::default()
    };
    Ok(Settings {
        refused_orgs,
        file,
        template,
        allowlist: loaded.allowlist,
        warnings,
        admitted_uids,
        admitted_gids,
        unprivileged: !running_as_root,
        own_user,
        sandbox,
        org_client_gids,
        identities: Default::default(),
    })
}

fn read_file(path: &Path) -> Result<ConfigFile, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// The orgs whose lane users may not run lanes (see `lane_users::vet`), each with a warning.
fn refused_orgs(
    file: &ConfigFile,
    allowlist: &Allowlist,
    warnings: &mut Vec<String>,
) -> BTreeMap<String, String> {
    let refused = crate::lane_users::vet(
        allowlist,
        &file.forbidden_lane_groups,
        file.allow_shared_unix_users,
        crate::lane_users::Account::lookup,
    );
    for (org, reason) in &refused {
        warnings.push(format!("org {org} refused: {reason}"));
    }
    refused
}

/// The running caps and the timeout are at least 1 (at 0 nothing would ever run), and the
/// output tail is within its range.
fn check_limits(file: &ConfigFile) -> Result<(), ConfigError> {
    let limits = &file.limits;
    let caps = [
        ("max_running_jobs", limits.max_running_jobs as u64),
        (
            "max_running_jobs_per_client",
            limits.max_running_jobs_per_client as u64,
        ),
        (
            "max_running_jobs_per_lane",
            limits.max_running_jobs_per_lane as u64,
        ),
    ];
    refuse_zero(&caps, "every dispatch would wait forever")?;
    let serving = [
        ("max_connections", limits.max_connections as u64),
        (
            "max_connections_per_client",
            limits.max_connections_per_client as u64,
        ),
        (
            "max_in_flight_per_connection",
            limits.max_in_flight_per_connection as u64,
        ),
        ("idle_timeout_seconds", limits.idle_timeout_seconds),
        ("max_list", u64::from(limits.max_list)),
    ];
    refuse_zero(&serving, "no request would ever be served")?;
    if limits.max_running_jobs > dispatch_sandbox::MAX_LANES {
        return Err(ConfigError::Invalid(format!(
            "limits.max_running_jobs is {}, but one helper can run at most {} lanes (its \
             reaper tracks that many)",
            limits.max_running_jobs,
            dispatch_sandbox::MAX_LANES
        )));
    }
    check_durations(file)?;
    if file.timeout_seconds == 0 {
        return Err(ConfigError::Invalid(
            "timeout_seconds must be at least 1".into(),
        ));
    }
    check_output_tail_bytes(limits.output_tail_bytes)
}

/// The first of `limits` that is 0 is refused, saying what would happen at 0.
fn refuse_zero(limits: &[(&str, u64)], at_zero: &str) -> Result<(), ConfigError> {
    match limits.iter().find(|(_, value)| *value == 0) {
        Some((name, _)) => Err(ConfigError::Invalid(format!(
            "limits.{name} must be at least 1 (at 0 {at_zero})"
        ))),
        None => Ok(()),
    }
}

/// No wait may be so long that the clock arithmetic of it overflows.
fn check_durations(file: &ConfigFile) -> Result<(), ConfigError> {
    let limits = &file.limits;
    let durations = [
        ("limits.idle_timeout_seconds", limits.idle_timeout_seconds),
        (
            "limits.max_result_wait_seconds",
            limits.max_result_wait_seconds,
        ),
        ("kill_grace_seconds", file.kill_grace_seconds),
    ];
    match durations.iter().find(|(_, value)| *value > TEN_YEARS) {
        Some((name, value)) => Err(ConfigError::Invalid(format!(
            "{name} is {value}, more than ten years ({TEN_YEARS} seconds): the clock \
             arithmetic of a wait that long would overflow"
        ))),
        None => Ok(()),
    }
}

/// The longest wait a setting may ask for.
const TEN_YEARS: u64 = 10 * 366 * 24 * 3600;

/// The uids and gids of `[clients]` (the helper's own uid always), resolved now; a name that
/// does not resolve is a warning, not an error.
fn admitted_clients(
    clients: &ClientsConfig,
    own_uid: nix::unistd::Uid,
    warnings: &mut Vec<String>,
) -> (BTreeSet<u32>, BTreeSet<u32>) {
    let mut admitted_uids = BTreeSet::from([own_uid.as_raw()]);
    let mut admitted_gids = BTreeSet::new();
    for name in &clients.users {
        match User::from_name(name) {
            Ok(Some(user)) => {
                admitted_uids.insert(user.uid.as_raw());
            }
            _ => warnings.push(format!("clients.users: no such user {name:?}; ignored")),
        }
    }
    for name in &clients.groups {
        match Group::from_name(name) {
            Ok(Some(group)) => {
                admitted_gids.insert(group.gid.as_raw());
            }
            _ => warnings.push(format!("clients.groups: no such group {name:?}; ignored")),
        }
    }
    (admitted_uids, admitted_gids)
}

/// Each org's allowed client groups as gids, resolved now; an allowed client user or group
/// that does not exist is a warning.
fn org_client_gids(
    allowlist: &dispatch_policy::Allowlist,
    warnings: &mut Vec<String>,
) -> std::collections::BTreeMap<String, BTreeSet<u32>> {
    let mut org_client_gids = std::collections::BTreeMap::new();
    for org in allowlist.orgs() {
        let Some(clients) = &org.allowed_clients else {
            continue;
        };
        let gids = clients
            .groups
            .iter()
            .filter_map(|g| Group::from_name(g.as_str()).ok().flatten())
            .map(|g| g.gid.as_raw())
            .collect();
        org_client_gids.insert(org.orguser.to_string(), gids);
        for user in &clients.users {
            if User::from_name(user.as_str()).ok().flatten().is_none() {
                warnings.push(format!(
                    "org {}: allowed client user {user} does not exist",
                    org.orguser
                ));
            }
        }
        for group in &clients.groups {
            if Group::from_name(group.as_str()).ok().flatten().is_none() {
                warnings.push(format!(
                    "org {}: allowed client group {group} does not exist",
                    org.orguser
                ));
            }
        }
    }
    org_client_gids
}

/// Lanes must not read the helper's own files: a configuration (such as one kept from before
/// `/etc` stopped being granted) whose sandbox paths contain the configuration, the allowlist,
/// the state directory or the audit log is refused, naming both.
fn refuse_grants_of_own_files(file: &ConfigFile, config_path: &Path) -> Result<(), ConfigError> {
    let real = |path: &Path| path.canonicalize().unwrap_or_else(|_| path.to_owned());
    let own = [
        ("this configuration", real(config_path)),
        ("the allowlist", real(&file.allowlist)),
        ("the state directory", real(&file.state_dir)),
        ("the audit log", real(&file.audit_log)),
    ];
    let sandbox = &file.sandbox;
    let granted = sandbox
        .read_exec_paths
        .iter()
        .chain(&sandbox.read_paths)
        .chain(&sandbox.read_write_paths)
        .chain(&sandbox.read_paths_if_present);
    for grant in granted {
        let grant_real = real(grant);
        if let Some((what, path)) = own.iter().find(|(_, path)| path.starts_with(&grant_real)) {
            return Err(ConfigError::Invalid(format!(
                "the sandbox grants lanes {}, which contains {what} ({}): lanes must not read \
                 the helper's files; grant the entries they need instead (see \
                 read_paths_if_present in the shipped helper.toml)",
                grant.display(),
                path.display()
            )));
        }
    }
    Ok(())
}

fn default_forbidden_lane_groups() -> Vec<String> {
    crate::lane_users::DEFAULT_FORBIDDEN_GROUPS
        .iter()
        .map(|g| g.to_string())
        .collect()
}

/// The Python server's environment, as it read it: a path may start with `~`, and a number it
/// cannot read is a warning and the setting's value, never a dead server.
fn apply_env(file: &mut ConfigFile, env: &EnvOverrides) -> Vec<String> {
    let mut warnings = Vec::new();
    if let Some(path) = &env.repos_json {
        file.allowlist = expand_home(path);
    }
    if let Some(host) = &env.ssh_host {
        file.host = host.clone();
    }
    if let Some(value) = &env.max_iterations {
        match value.trim().parse() {
            Ok(max) => file.max_iterations = max,
            Err(_) => warnings.push(format!(
                "DISPATCH_MAX_ITERATIONS={value:?} is not a whole number; using {}",
                file.max_iterations
            )),
        }
    }
    if let Some(value) = &env.timeout {
        match value.trim().parse::<f64>() {
            Ok(seconds) if seconds.is_finite() && seconds >= 1.0 => {
                file.timeout_seconds = seconds.ceil() as u64;
            }
            _ => warnings.push(format!(
                "DISPATCH_TIMEOUT={value:?} is not a number of seconds of at least 1; using {}",
                file.timeout_seconds
            )),
        }
    }
    warnings
}

/// `~` and `~/…` name the home of the user the helper runs as (`$HOME`), as a shell would.
fn expand_home(path: &str) -> PathBuf {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    match (path.strip_prefix('~'), home) {
        (Some(""), Some(home)) => home,
        (Some(rest), Some(home)) if rest.starts_with('/') => {
            home.join(rest.trim_start_matches('/'))
        }
        _ => PathBuf::from(path),
    }
}

/// The host lands in argv after `--host`: refuse anything an ssh-like program could read as
/// an option or that is not a plain host name.
pub fn validate_host(host: &str) -> Result<(), ConfigError> {
    let ok = !host.is_empty()
        && host.len() <= 253
        && !host.starts_with('-')
        && host.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '@' | '[' | ']')
        });
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid(format!(
            "host {host:?} must be a host name ([A-Za-z0-9.-_:@[]], not starting with '-')"
        )))
    }
}

/// Like sshd's StrictModes: a file the helper trusts (its config, the allowlist, the dispatch
/// program) must be owned by root and writable by no one else, and so must every directory above
/// it (a sticky, root-owned directory such as
/// /tmp is acceptable: others cannot replace what root put there).
pub fn check_strict_modes(path: &Path) -> Result<(), ConfigError> {
    // Check the file that will actually be read: every symlink resolved.
    let absolute = std::fs::canonicalize(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let meta = std::fs::metadata(&absolute).map_err(|source| ConfigError::Read {
        path: absolute.display().to_string(),
        source,
    })?;
    check_owner_and_mode(&absolute, &meta, false)?;
    let mut dir = absolute.parent();
    while let Some(current) = dir {
        let meta = std::fs::metadata(current).map_err(|source| ConfigError::Read {
            path: current.display().to_string(),
            source,
        })?;
        check_owner_and_mode(current, &meta, true)?;
        dir = current.parent();
    }
    Ok(())
}

fn check_owner_and_mode(
    path: &Path,
    meta: &std::fs::Metadata,
    is_dir: bool,
) -> Result<(), ConfigError> {
    let mode = meta.permissions().mode() & 0o7777;
    let sticky = mode & 0o1000 != 0;
    if meta.uid() != 0 {
        return Err(ConfigError::Unsafe(format!(
            "refusing to start: {} is owned by uid {}, not root (mode {:04o})",
            path.display(),
            meta.uid(),
            mode
        )));
    }
    if mode & 0o022 != 0 && !(is_dir && sticky) {
        return Err(ConfigError::Unsafe(format!(
            "refusing to start: {} is writable by group or others (mode {:04o}); run chmod go-w on it",
            path.display(),
            mode
        )));
    }
    Ok(())
}

/// Names a caller may pass: plain variable names, never the loader's (`LD_*`) nor the ones
/// the sandbox sets for the lane's own identity and work directory.
fn check_pass_env(names: &[String], running_as_root: bool) -> Result<(), ConfigError> {
    const OWN: &[&str] = &["HOME", "USER", "LOGNAME", "TMPDIR", "PWD", "SHELL"];
    if running_as_root && names.iter().any(|name| name == "PATH") {
        return Err(ConfigError::Invalid(
            "pass_env: PATH is passed only by a helper that runs as its own user (personal \
             mode): as root it would let a caller choose where lanes of other accounts find \
             and run programs"
                .into(),
        ));
    }
    for name in names {
        let plain = !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !plain || name.starts_with("LD_") || OWN.contains(&name.as_str()) {
            return Err(ConfigError::Invalid(format!(
                "pass_env entry {name:?}: a name must be [A-Za-z_][A-Za-z0-9_]*, not LD_* and \
                 not one the sandbox sets ({})",
                OWN.join(", ")
            )));
        }
    }
    Ok(())
}

/// Resolve the work area template for a lane user (its jobs' directories are made beneath it).
pub fn work_dir(
    template: &str,
    state_dir: &Path,
    home: &Path,
    unix_user: &str,
    orguser: &str,
) -> PathBuf {
    let template = if template.is_empty() {
        format!("{}/lanes/{{unix_user}}", state_dir.display())
    } else {
        template.to_owned()
    };
    PathBuf::from(
        template
            .replace("{home}", &home.display().to_string())
            .replace("{unix_user}", unix_user)
            .replace("{orguser}", orguser),
    )
}

/// Both streams' tails travel in one response frame, beside the rest of the job; as lossy
/// UTF-8 an invalid byte becomes three.
const MAX_OUTPUT_TAIL_BYTES: usize = 128 * 1024;

fn check_output_tail_bytes(bytes: usize) -> Result<(), ConfigError> {
    if (1..=MAX_OUTPUT_TAIL_BYTES).contains(&bytes) {
        return Ok(());
    }
    Err(ConfigError::Invalid(format!(
        "limits.output_tail_bytes is {bytes}: it must be 1 to {MAX_OUTPUT_TAIL_BYTES} (the \
         output of both streams is answered in one frame of at most {} bytes)",
        dispatch_proto::MAX_RESPONSE_FRAME
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_tails_fit_one_response() {
        check_output_tail_bytes(16 * 1024).unwrap();
        check_output_tail_bytes(MAX_OUTPUT_TAIL_BYTES).unwrap();
        assert!(2 * 3 * MAX_OUTPUT_TAIL_BYTES < dispatch_proto::MAX_RESPONSE_FRAME as usize);
        for bad in [0, MAX_OUTPUT_TAIL_BYTES + 1, 8 << 20] {
            let error = check_output_tail_bytes(bad).unwrap_err().to_string();
            assert!(error.contains("limits.output_tail_bytes"), "{error}");
        }
    }

    #[test]
    fn the_shipped_example_config_parses() {
        let file: ConfigFile =
            toml::from_str(include_str!("../../../systemd/helper.toml")).unwrap();
        assert_eq!(file.socket, PathBuf::from("/run/dispatch-mcp/helper.sock"));
        assert_eq!(file.sandbox.tcp_connect_ports, [22, 443]);
        assert!(!file.allow_option_like_tasks);
        // Its sandbox grants nothing of the helper's own files.
        refuse_grants_of_own_files(&file, Path::new(DEFAULT_CONFIG)).unwrap();
    }

    #[test]
    fn a_sandbox_that_grants_the_helpers_own_files_is_refused() {
        let mut file: ConfigFile =
            toml::from_str(include_str!("../../../systemd/helper.toml")).unwrap();
        // A configuration kept from before /etc stopped being granted.
        file.sandbox.read_exec_paths.push("/etc".into());
        let error = refuse_grants_of_own_files(&file, Path::new(DEFAULT_CONFIG))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("grants lanes /etc, which contains this configuration"),
            "{error}"
        );
        file.sandbox.read_exec_paths.pop();
        file.sandbox.read_write_paths.push("/var/log".into());
        let error = refuse_grants_of_own_files(&file, Path::new(DEFAULT_CONFIG))
            .unwrap_err()
            .to_string();
        assert!(error.contains("the audit log"), "{error}");
    }

    #[test]
    fn pass_env_names_are_checked() {
        let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        check_pass_env(&names(&["SSH_AUTH_SOCK", "GH_TOKEN", "PATH"]), false).unwrap();
        check_pass_env(&names(&["GH_TOKEN"]), true).unwrap();
        let error = check_pass_env(&names(&["PATH"]), true)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("PATH is passed only by a helper that runs as its own user"),
            "{error}"
        );
        for bad in ["LD_PRELOAD", "HOME", "TMPDIR", "A-B", "1X", ""] {
            assert!(check_pass_env(&names(&[bad]), false).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn limits_the_helper_cannot_honour_are_refused_by_name() {
        let refused = |extra: &str| {
            let file: ConfigFile = toml::from_str(&format!(
                "allowlist='/a'\nstate_dir='/s'\naudit_log='/l'\nsocket='/x'\n{extra}"
            ))
            .unwrap();
            match check_limits(&file) {
                Err(ConfigError::Invalid(why)) => why,
                other => panic!("{extra:?} was not refused: {other:?}"),
            }
        };
        for (setting, named) in [
            (
                "[limits]\nmax_connections = 0",
                "limits.max_connections must be at least 1",
            ),
            (
                "[limits]\nmax_connections_per_client = 0",
                "max_connections_per_client",
            ),
            (
                "[limits]\nmax_in_flight_per_connection = 0",
                "max_in_flight_per_connection",
            ),
            ("[limits]\nidle_timeout_seconds = 0", "idle_timeout_seconds"),
            (
                "[limits]\nmax_list = 0",
                "limits.max_list must be at least 1",
            ),
            ("[limits]\nmax_running_jobs = 16385", "at most 16384 lanes"),
            (
                "[limits]\nidle_timeout_seconds = 18446744073709551615",
                "limits.idle_timeout_seconds is 18446744073709551615, more than ten years",
            ),
            (
                "kill_grace_seconds = 400000000",
                "kill_grace_seconds is 400000000",
            ),
            (
                "[limits]\nmax_result_wait_seconds = 400000000",
                "max_result_wait_seconds",
            ),
        ] {
            let why = refused(setting);
            assert!(why.contains(named), "{setting:?}: {why}");
        }
        let file: ConfigFile = toml::from_str(
            "allowlist='/a'\nstate_dir='/s'\naudit_log='/l'\nsocket='/x'\n\
             [limits]\nmax_running_jobs = 16384\nidle_timeout_seconds = 315360000\n",
        )
        .unwrap();
        check_limits(&file).unwrap();
    }

    #[test]
    fn host_rules() {
        for ok in ["localhost", "build-1.example.com", "user@host", "[::1]"] {
            validate_host(ok).unwrap();
        }
        for bad in ["", "-oProxyCommand=sh", "a b", "host;id", "h\n"] {
            assert!(validate_host(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn env_overrides_name_the_variable() {
        let mut file: ConfigFile =
            toml::from_str("allowlist='/a'\nstate_dir='/s'\naudit_log='/l'\nsocket='/x'\n")
                .unwrap();
        let env = EnvOverrides {
            repos_json: Some("/r.json".into()),
            ssh_host: Some("h2".into()),
            max_iterations: Some("7".into()),
            timeout: Some("2.5".into()),
        };
        assert!(apply_env(&mut file, &env).is_empty());
        assert_eq!(file.allowlist, PathBuf::from("/r.json"));
        assert_eq!(
            (
                file.host.as_str(),
                file.max_iterations,
                file.timeout_seconds
            ),
            ("h2", 7, 3)
        );
        // As the Python server: a number it cannot read is a warning and the current value.
        let bad = EnvOverrides {
            timeout: Some("soon".into()),
            max_iterations: Some("abc".into()),
            repos_json: Some("~/.repos.json".into()),
            ..Default::default()
        };
        let warnings = apply_env(&mut file, &bad).join("\n");
        assert!(warnings.contains("DISPATCH_TIMEOUT=\"soon\""), "{warnings}");
        assert!(
            warnings.contains("DISPATCH_MAX_ITERATIONS=\"abc\""),
            "{warnings}"
        );
        assert_eq!((file.max_iterations, file.timeout_seconds), (7, 3));
        let home = PathBuf::from(std::env::var_os("HOME").unwrap());
        assert_eq!(file.allowlist, home.join(".repos.json"));
    }

    #[test]
    fn strict_modes_follow_symlinks_to_the_real_file() {
        if !nix::unistd::geteuid().is_root() {
            // Not eprintln!: the harness would swallow it for a passing test.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr().lock(),
                "*** SKIPPED: strict modes are only enforced as root ***"
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.toml");
        std::fs::write(&real, "").unwrap();
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o666)).unwrap();
        let link = dir.path().join("link.toml");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let err = check_strict_modes(&link).unwrap_err().to_string();
        assert!(
            err.contains("real.toml is writable by group or others"),
            "{err}"
        );
    }

    #[test]
    fn strict_modes_name_the_file_and_mode() {
        if !nix::unistd::geteuid().is_root() {
            // Not eprintln!: the harness would swallow it for a passing test.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr().lock(),
                "*** SKIPPED: strict modes are only enforced as root ***"
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("helper.toml");
        std::fs::write(&file, "").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        check_strict_modes(&file).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
        let err = check_strict_modes(&file).unwrap_err().to_string();
        assert!(
            err.contains("helper.toml is writable by group or others (mode 0666)"),
            "{err}"
        );
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        nix::unistd::chown(&file, Some(65534.into()), None).unwrap();
        let err = check_strict_modes(&file).unwrap_err().to_string();
        assert!(err.contains("is owned by uid 65534, not root"), "{err}");
    }
}
