//! `dispatch-helper`: the privileged side of dispatch-mcp. It trusts nothing the front says:
//! every request is re-validated against its own root-owned configuration, which alone
//! chooses the argv, the host, the limits and the sandbox.
#![forbid(unsafe_code)]

pub mod admission;
pub mod audit;
pub mod commit;
pub mod config;
pub mod identities;
pub mod jobs;
pub mod lane;
pub mod lane_users;
pub mod output;
pub mod queue;
pub mod server;
pub mod store;
pub mod workdirs;

use clap::{Parser, Subcommand};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

/// Threads lanes are forked from (see dispatch_sandbox::LaneSpawner): enough that one slow
/// fork+exec does not queue every other dispatch behind it.
const LANE_SPAWNER_THREADS: usize = 4;

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

#[derive(Debug, Parser)]
#[command(
    name = "dispatch-helper",
    version,
    about = "Privileged helper for dispatch-mcp: validates dispatch requests against its own \
             allowlist, runs each lane sandboxed as its org-user, and audits everything.",
    long_about = None
)]
struct Cli {
    /// Helper configuration (TOML). Must be owned by root and not group/world-writable when
    /// the helper runs as root.
    #[arg(long, short, global = true, default_value = config::DEFAULT_CONFIG)]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon: bind the socket (or take it from systemd), serve until SIGTERM.
    /// SIGHUP reloads the configuration and allowlist (a bad new config keeps the old one).
    Serve {
        /// Stop when the parent process exits (the demo's private helper; a personal helper
        /// outlives the front that started it).
        #[arg(long, hide = true)]
        die_with_parent: bool,
    },
    /// Load and validate the configuration and allowlist; print targets and warnings.
    /// Exits non-zero if the configuration cannot be used.
    Check,
    /// Audit log tools.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Show the job store (state dir from the config, or --state-dir).
    Jobs {
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Verify the hash chain of an audit log; names the first edited, removed or reordered line.
    Verify { file: PathBuf },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { die_with_parent } => {
            init_tracing();
            if die_with_parent {
                let parent = nix::unistd::getppid();
                if let Err(error) =
                    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                {
                    return fail(format!("set the parent death signal: {error}"));
                }
                if nix::unistd::getppid() != parent || parent.as_raw() == 1 {
                    return fail("the parent exited before the helper started".into());
                }
            }
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => return fail(format!("cannot start the runtime: {error}")),
            };
            match runtime.block_on(serve(&cli.config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(message) => fail(message),
            }
        }
        Command::Check => check(&cli.config),
        Command::Audit {
            command: AuditCommand::Verify { file },
        } => match audit::verify(&file) {
            Ok(count) => {
                println!("{}: {count} records, hash chain intact", file.display());
                ExitCode::SUCCESS
            }
            Err(error) => fail(format!("audit verify FAILED: {error}")),
        },
        Command::Jobs { state_dir } => jobs_command(&cli.config, state_dir),
    }
}

fn fail(message: String) -> ExitCode {
    eprintln!("dispatch-helper: {message}");
    ExitCode::FAILURE
}

fn init_tracing() {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_env("DISPATCH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    // Under systemd, log to the journal with structured fields.
    if std::env::var_os("JOURNAL_STREAM").is_some()
        && let Ok(journald) = tracing_journald::layer()
    {
        registry.with(journald).init();
        return;
    }
    registry
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .init();
}

fn check(path: &Path) -> ExitCode {
    match config::load(path, &config::EnvOverrides::from_process()) {
        Ok(settings) => {
            println!("config: {}", path.display());
            println!(
                "mode: {}",
                if settings.unprivileged {
                    "unprivileged (lanes run as the helper's own user)"
                } else {
                    "root (lanes run as their org-users)"
                }
            );
            println!("allowlist: {}", settings.file.allowlist.display());
            println!(
                "argv: {:?}",
                std::iter::once(settings.template.program().display().to_string())
                    .chain(settings.file.argv[1..].iter().cloned())
                    .collect::<Vec<_>>()
            );
            println!(
                "host: {}  max_iterations: {}  timeout: {} s",
                settings.file.host, settings.file.max_iterations, settings.file.timeout_seconds
            );
            let abi = dispatch_sandbox::kernel_landlock_abi().max(0) as u32;
            println!(
                "landlock: kernel ABI {abi}, floor {}",
                settings.file.sandbox.landlock_min_abi
            );
            let open = dispatch_sandbox::open_at_abi(abi);
            if !open.is_empty() {
                println!("  not restricted at this ABI: {}", open.join("; "));
            }
            print_containment(&settings);
            println!("targets:");
            for target in settings.allowlist.targets() {
                let org = settings.allowlist.org(&target.orguser);
                println!(
                    "  {}/{} -> github {} (runs as {}){}",
                    target.orguser,
                    target.repo,
                    target.github,
                    org.map(|o| o.unix_user.to_string()).unwrap_or_default(),
                    if settings.refused_orgs.contains_key(target.orguser.as_str()) {
                        "  REFUSED: see the warning below"
                    } else {
                        ""
                    }
                );
            }
            for warning in &settings.warnings {
                println!("warning: {warning}");
            }
            ExitCode::SUCCESS
        }
        Err(error) => fail(format!("configuration unusable: {error}")),
    }
}

/// What contains lanes and holds each limit. `auto` is decided by the running helper (its own
/// cgroup under systemd's Delegate=yes), so both possibilities are shown for it.
fn print_containment(settings: &config::Settings) {
    use dispatch_sandbox::cgroup::CgroupSetting;
    let sandbox = &settings.file.sandbox;
    let controllers = match &sandbox.cgroup {
        CgroupSetting::Off => None,
        CgroupSetting::Auto => {
            println!(
                "containment: sandbox.cgroup = \"auto\": the helper's own cgroup when systemd \
                 delegates one (Delegate=yes); otherwise {}",
                if settings.unprivileged || sandbox.allow_uncontained {
                    "process groups and the subreaper"
                } else {
                    "the helper refuses to start (allow_uncontained is off)"
                }
            );
            None
        }
        CgroupSetting::Path(path) => match dispatch_sandbox::cgroup::inspect(path) {
            Ok(controllers) => {
                println!(
                    "containment: cgroup per lane under {}/lanes",
                    path.display()
                );
                Some(controllers)
            }
            Err(error) => {
                println!("containment: {} is unusable: {error}", path.display());
                None
            }
        },
    };
    println!("limits (without a cgroup controller, the rlimit shown holds it):");
    for limit in sandbox.limits.report(controllers, settings.unprivileged) {
        println!(
            "  {:<10} {:<16} {}",
            limit.limit, limit.value, limit.mechanism
        );
    }
    println!(
        "  {:<10} {:<16} the helper's timeout",
        "wall_clock",
        format!("{} s", settings.file.timeout_seconds)
    );
}

fn jobs_command(config_path: &Path, state_dir: Option<PathBuf>) -> ExitCode {
    let state_dir = match state_dir {
        Some(dir) => dir,
        None => match config::load(config_path, &config::EnvOverrides::from_process()) {
            Ok(settings) => settings.file.state_dir,
            Err(error) => return fail(format!("{error} (or pass --state-dir)")),
        },
    };
    let store = match store::JobStore::open_read_only(&state_dir) {
        Ok(store) => store,
        Err(error) => {
            return fail(format!(
                "cannot open the job store in {}: {error}",
                state_dir.display()
            ));
        }
    };
    match store.load_all() {
        Ok((mut records, warnings)) => {
            records.sort_by(|a, b| a.job.requested_at.cmp(&b.job.requested_at));
            for r in records {
                println!(
                    "{}  {:<10} uid {:<6} {}/{}  {}  {}",
                    r.job.handle,
                    r.job.state.as_str(),
                    r.owner_uid,
                    r.job.orguser,
                    r.job.repo,
                    r.job.requested_at,
                    r.job.detail
                );
            }
            for warning in warnings {
                eprintln!("warning: {warning}");
            }
            ExitCode::SUCCESS
        }
        Err(error) => fail(format!("cannot read the job store: {error}")),
    }
}

/// Every running lane holds about five fds here (its output pipes, its pidfd, its cgroup), so
/// the soft limit systemd gives services (1024) would refuse lanes from about the 190th on,
/// whatever `max_running_jobs` allows. Raised to the hard limit, as systemd advises programs
/// that need more; lanes get their own limit (`sandbox.limits.nofile`) whatever this is.
fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!(from = soft, to = hard, "raised the open file limit"),
            Err(error) => {
                tracing::warn!(%error, soft, hard, "could not raise the open file limit");
            }
        },
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "could not read the open file limit"),
    }
}

/// The daemon, step by step; each failure says which step.
async fn serve(config_path: &Path) -> Result<(), String> {
    // Handlers first: a SIGHUP that arrives once the socket accepts connections must reload,
    // not kill the helper (SIGHUP's default action).
    use tokio::signal::unix::{SignalKind, signal};
    let handler = |kind| signal(kind).map_err(|e| format!("install signal handlers: {e}"));
    let mut hangup = handler(SignalKind::hangup())?;
    let mut terminate = handler(SignalKind::terminate())?;
    let mut interrupt = handler(SignalKind::interrupt())?;
    let settings = load_settings(config_path)?;
    raise_open_file_limit();
    create_own_dirs(&settings)?;
    // Before the audit log is opened (and perhaps repaired) or the socket taken over.
    let _instance = lock_single_instance(&settings.file.state_dir, &settings.file.socket)?;
    let (audit, store, audit_notes) = open_durable_state(&settings)?;
    let containment = establish_containment(&settings)?;
    tracing::info!(containment = %containment.describe(), "lane containment");
    let spawner =
        dispatch_sandbox::LaneSpawner::start(LANE_SPAWNER_THREADS, containment, &settings.sandbox)
            .map_err(|e| format!("start the lane spawner thread: {e}"))?;
    let listener = take_or_bind_socket(&settings)
        .map_err(|e| format!("socket {}: {e}", settings.file.socket.display()))?;
    let socket_path = settings.file.socket.clone();
    let helper = jobs::Helper::new(settings, audit, store, spawner);
    recover_jobs(&helper).await?;
    audit_start(&helper, audit_notes, &socket_path).await?;

    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    tracing::info!(socket = %socket_path.display(), "serving");
    let server = tokio::spawn(server::accept_loop(helper.clone(), listener));
    let mut idle = IdleWatch::default();
    let why = loop {
        tokio::select! {
            _ = hangup.recv() => reload(&helper, config_path).await,
            _ = terminate.recv() => break "SIGTERM",
            _ = interrupt.recv() => break "SIGINT",
            _ = tokio::time::sleep(IDLE_CHECK) => {
                let limit = helper.settings().file.exit_when_idle_seconds;
                if idle.long_enough(helper.is_idle(), limit) {
                    break "idle: no client, no lane and nothing queued";
                }
            }
        }
    };
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    server.abort();
    stop(&helper, why).await;
    Ok(())
}

fn load_settings(config_path: &Path) -> Result<config::Settings, String> {
    let settings = config::load(config_path, &config::EnvOverrides::from_process())
        .map_err(|e| format!("load configuration: {e}"))?;
    for warning in &settings.warnings {
        tracing::warn!(%warning, "configuration");
    }
    if settings.unprivileged {
        tracing::warn!(user = %settings.own_user, "not running as root: every lane runs as the helper's own user");
    }
    Ok(settings)
}

/// The job table back from the store, every lane left running marked lost; dispatches that
/// were waiting for a slot when the last helper stopped start now.
async fn recover_jobs(helper: &Arc<jobs::Helper>) -> Result<(), String> {
    let warnings = helper
        .recover()
        .await
        .map_err(|e| format!("recover jobs: {e}"))?;
    for warning in warnings {
        tracing::warn!(%warning, "job store");
    }
    helper.start_queued();
    Ok(())
}

/// The state directory, the audit log's directory and (with the default work areas) their
/// parent, which lanes only pass through.
fn create_own_dirs(settings: &config::Settings) -> Result<(), String> {
    create_private_dir(&settings.file.state_dir).map_err(|e| {
        format!(
            "create state dir {}: {e}",
            settings.file.state_dir.display()
        )
    })?;
    if let Some(parent) = settings.file.audit_log.parent() {
        create_private_dir(parent)
            .map_err(|e| format!("create audit log dir {}: {e}", parent.display()))?;
    }
    if settings.file.work_dir.is_empty() {
        let lanes = settings.file.state_dir.join("lanes");
        store::create_dir_durably(&lanes, 0o711)
            .map_err(|e| format!("create {}: {e}", lanes.display()))?;
    }
    Ok(())
}

/// The audit log and the job store, made whole after whatever ended the last helper, and the
/// one group-committing writer started for both; with the notes the log must record about
/// its repair.
fn open_durable_state(
    settings: &config::Settings,
) -> Result<(audit::AuditLog, store::JobStore, Vec<String>), String> {
    let (audit, audit_repair) = audit::AuditLog::open(&settings.file.audit_log)
        .map_err(|e| format!("open audit log: {e}"))?;
    let store = store::JobStore::open(&settings.file.state_dir)
        .map_err(|e| format!("open job store: {e}"))?;
    // Before any compaction drops them: audit records the journal kept that a crash took from
    // the log before its sync go back into it.
    let restored = audit
        .restore(&store.take_kept_audit())
        .map_err(|e| format!("restore the audit log from the job journal: {e}"))?;
    if store.wants_compaction() {
        store
            .compact()
            .map_err(|e| format!("compact the job store: {e}"))?;
    }
    // From here every audit record and job record goes through the one group-committing writer.
    commit::start(&audit, &store).map_err(|e| format!("start the durable writer: {e}"))?;
    let notes = audit_repair.into_iter().chain(restored).collect();
    Ok((audit, store, notes))
}

/// The log's own repairs, then `helper_started`: the helper serves only once both are durable.
async fn audit_start(
    helper: &jobs::Helper,
    repairs: Vec<String>,
    socket_path: &Path,
) -> Result<(), String> {
    for note in repairs {
        tracing::warn!(%note, "audit log repaired");
        helper
            .audit
            .append(audit::AuditEvent {
                event: "audit_log_repaired",
                outcome: "repaired".into(),
                detail: Some(note),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("write the audit log: {e}"))?;
    }
    helper
        .audit
        .append(audit::AuditEvent {
            event: "helper_started",
            outcome: "serving".into(),
            detail: Some(format!(
                "socket {}; lanes: {}",
                socket_path.display(),
                helper.containment()
            )),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("write the first audit record: {e}"))
}

/// Every lane stopped, `helper_stopped` recorded, and the audit log synced (its records are
/// durable in the job journal meanwhile).
async fn stop(helper: &jobs::Helper, why: &str) {
    helper.shutdown().await;
    tracing::info!(why, "stopping");
    let _ = helper
        .audit
        .append(audit::AuditEvent {
            event: "helper_stopped",
            outcome: "stopped".into(),
            detail: Some(format!(
                "{why}; {} syncs of the audit log and job journal since start",
                store::SYNCS.load(std::sync::atomic::Ordering::Relaxed)
            )),
            ..Default::default()
        })
        .await;
    if let Err(error) = helper.audit.sync() {
        tracing::error!(%error, "could not sync the audit log at exit; the job journal keeps its records");
    }
}

const IDLE_CHECK: std::time::Duration = std::time::Duration::from_millis(500);

/// Since when the helper has been idle, as seen by its periodic checks.
#[derive(Default)]
struct IdleWatch {
    since: Option<std::time::Instant>,
}

impl IdleWatch {
    /// Whether it has been idle for `limit_seconds` (never, at 0).
    fn long_enough(&mut self, idle_now: bool, limit_seconds: u64) -> bool {
        if limit_seconds == 0 || !idle_now {
            self.since = None;
            return false;
        }
        let since = *self.since.get_or_insert_with(std::time::Instant::now);
        since.elapsed() >= std::time::Duration::from_secs(limit_seconds)
    }
}

/// Set up the lanes' cgroup tree and end whatever a previous helper's lanes left in it. In root
/// mode, lanes that no cgroup contains are refused unless the administrator opted out.
fn establish_containment(
    settings: &config::Settings,
) -> Result<dispatch_sandbox::Containment, String> {
    let sandbox = &settings.file.sandbox;
    let containment = dispatch_sandbox::Containment::establish(&sandbox.cgroup)
        .map_err(|e| format!("set up the lanes' cgroups: {e}"))?;
    match containment.tree() {
        Some(tree) => {
            let swept = tree
                .sweep()
                .map_err(|e| format!("end the previous helper's lanes: {e}"))?;
            if !swept.is_empty() {
                tracing::warn!(lanes = ?swept, "killed lanes a previous helper left running");
            }
            // Only now: the sweep would have removed spares made before it.
            tree.prefill();
        }
        None if !settings.unprivileged && !sandbox.allow_uncontained => {
            return Err(format!(
                "refusing to run lanes that nothing contains: {} (set sandbox.cgroup to a \
                 cgroup v2 directory, run under systemd with Delegate=yes, or accept it with \
                 sandbox.allow_uncontained = true)",
                containment.describe()
            ));
        }
        None => {}
    }
    Ok(containment)
}

async fn reload(helper: &Arc<jobs::Helper>, config_path: &Path) {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Reloading]);
    let outcome = match config::load(config_path, &config::EnvOverrides::from_process()) {
        Ok(settings) => {
            let mut detail = format!(
                "{} targets, {} warnings",
                settings.allowlist.targets().count(),
                settings.warnings.len()
            );
            // The accept loop's semaphore was sized at start, whatever reloads said since.
            let serving = helper.max_connections_at_start;
            if settings.file.limits.max_connections != serving {
                let kept = format!(
                    "limits.max_connections keeps its old value, {serving}, until the helper restarts"
                );
                tracing::warn!("{kept}");
                detail.push_str("; ");
                detail.push_str(&kept);
            }
            tracing::info!(%detail, "configuration reloaded (socket and state paths keep their old values until restart)");
            if !helper.spawner_inherits_exactly(&settings.sandbox) {
                tracing::warn!(
                    "the seccomp policy changed (allow_unix_sockets): lanes run under both the \
                     old and the new filter until the helper restarts, so a stricter one holds \
                     now and a more lenient one from the restart"
                );
            }
            helper.replace_settings(settings);
            // Raised caps may let waiting dispatches start.
            helper.start_queued();
            audit::AuditEvent {
                event: "config_reloaded",
                outcome: "reloaded".into(),
                detail: Some(detail),
                ..Default::default()
            }
        }
        Err(error) => {
            tracing::error!(%error, "reload failed; keeping the previous configuration");
            audit::AuditEvent {
                event: "config_reload_failed",
                outcome: "kept previous".into(),
                detail: Some(error.to_string()),
                ..Default::default()
            }
        }
    };
    let _ = helper.audit.append(outcome).await;
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
}

/// One helper per state directory: a second one would take over the socket path and append to
/// the same audit log, breaking its chain. Held (and released by the kernel) with the process.
/// It names the holder's pid; `helper.socket-path` beside it, the socket it serves (kept until
/// it restarts, whatever a reload says), where a personal front whose own settings name
/// another finds it.
fn lock_single_instance(
    state_dir: &Path,
    socket: &Path,
) -> Result<nix::fcntl::Flock<std::fs::File>, String> {
    use std::io::{Read, Seek, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let path = state_dir.join("helper.lock");
    // Root's alone (a lock anyone could open, anyone could hold), and never through a link.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(&path)
        .map_err(|e| format!("open {}: {e}", path.display()))?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("restrict {}: {e}", path.display()))?;
    let mut lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(mut file, errno)| {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            format!(
                "another dispatch-helper (pid {}) already serves {} ({}): refusing to start \
                     a second one on the same state, socket and audit log",
                holder.trim(),
                state_dir.display(),
                errno.desc()
            )
        })?;
    let _ = lock.set_len(0);
    let _ = lock.rewind();
    let _ = write!(lock, "{}", std::process::id());
    // Written after the lock is held, so it is always the holder's. Informational: a failure
    // to write it costs a front with other settings its way to this helper, nothing else.
    let named = state_dir.join("helper.socket-path");
    let _ = std::fs::write(&named, format!("{}\n", socket.display()));
    Ok(lock)
}

fn create_private_dir(path: &Path) -> std::io::Result<()> {
    store::create_dir_durably(path, 0o700)
}

fn take_or_bind_socket(settings: &config::Settings) -> std::io::Result<tokio::net::UnixListener> {
    let mut fds = listenfd::ListenFd::from_env();
    if let Some(listener) = fds.take_unix_listener(0)? {
        tracing::info!("using the socket passed by systemd");
        listener.set_nonblocking(true)?;
        return tokio::net::UnixListener::from_std(listener);
    }
    let path = &settings.file.socket;
    if let Some(parent) = path.parent()
        && !parent.is_dir()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)?;
    }
    // A stale socket from a previous run; anything else at the path is left alone.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)?;
        } else {
            return Err(std::io::Error::other("the path exists and is not a socket"));
        }
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(
        path,
        std::fs::Permissions::from_mode(settings.file.socket_mode),
    )?;
    if let Some(group) = &settings.file.socket_group {
        let group = nix::unistd::Group::from_name(group)
            .map_err(std::io::Error::other)?
            .ok_or_else(|| {
                std::io::Error::other(format!("socket_group {group:?} does not exist"))
            })?;
        nix::unistd::chown(path, None, Some(group.gid)).map_err(std::io::Error::other)?;
    }
    Ok(listener)
}
