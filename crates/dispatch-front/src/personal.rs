//! Personal mode: one durable helper per user, for those who run no system service. Every front
//! of the user shares it; it outlives them (lanes keep running, jobs and results survive
//! client restarts), and stops by itself once idle with no lane and no client. The first
//! front that finds no helper answering starts one; the helper's own lock keeps it to one.
//!
//! - socket: `$XDG_RUNTIME_DIR/dispatch-mcp/helper.sock` (else in the state dir);
//! - state, audit log, job directories, `helper.toml`, `helper.log`:
//!   `$XDG_STATE_HOME/dispatch-mcp` (default `~/.local/state/dispatch-mcp`).
//!
//! Its configuration is written from the MCP client entry's environment, with the Python
//! server's defaults: allowlist `~/.repos.json`, `dotfiles-dispatch` from PATH, 50 iterations,
//! a 60 s timeout, and the caller's identity (`DISPATCH_PASS_ENV`, default `GH_TOKEN`,
//! `GITHUB_TOKEN`, `PATH`; `SSH_AUTH_SOCK` only when named there) passed to lanes. A front whose environment differs
//! rewrites it and asks the running helper to reload (SIGHUP).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::net::UnixStream;

/// The Python server's variables, written into the helper's `[environment]`.
const PYTHON_VARIABLES: [&str; 4] = [
    "DISPATCH_REPOS_JSON",
    "DISPATCH_SSH_HOST",
    "DISPATCH_MAX_ITERATIONS",
    "DISPATCH_TIMEOUT",
];
/// Not `SSH_AUTH_SOCK` unless the user names it: the agent needs Unix sockets, and the kernel's
/// Landlock (ABI 7) cannot narrow those to one path, so a lane could also reach the user's
/// session bus, and through it `systemd --user`, outside its sandbox (SECURITY.md). ssh still
/// finds the keys in the (readable) home without an agent.
const DEFAULT_PASS_ENV: [&str; 3] = ["GH_TOKEN", "GITHUB_TOKEN", "PATH"];
/// How long a personal helper waits with no client, lane or queued dispatch before it stops.
const DEFAULT_IDLE_EXIT_SECONDS: u64 = 600;
/// How long a start (or a wait for another front's start) may take.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// helper.log is started afresh (the old one kept as helper.log.1) beyond this size.
const MAX_LOG_BYTES: u64 = 1024 * 1024;

#[derive(Debug, Clone)]
pub struct Launcher {
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    helper_bin: PathBuf,
    config_text: String,
    /// Why this front's configuration was not given to the running helper (it would refuse
    /// it, and serve this front under another front's settings): every call says so, until it
    /// can be given (see [`Launcher::usable`]).
    unusable: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn toml_string(value: &str) -> String {
    // TOML basic strings share JSON's escapes for everything written here.
    serde_json::to_string(value).expect("strings serialize")
}

fn home() -> Result<PathBuf, String> {
    if let Some(home) = env_nonempty("HOME") {
        return Ok(PathBuf::from(home));
    }
    nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten()
        .map(|user| user.dir)
        .ok_or_else(|| "personal mode needs a home directory (HOME is not set)".to_owned())
}

/// Where the user's helper keeps its state, and where its socket is.
pub fn paths() -> Result<(PathBuf, PathBuf), String> {
    let state_base = match env_nonempty("XDG_STATE_HOME").filter(|p| p.starts_with('/')) {
        Some(dir) => PathBuf::from(dir),
        None => home()?.join(".local/state"),
    };
    let state_dir = state_base.join("dispatch-mcp");
    let runtime = env_nonempty("XDG_RUNTIME_DIR")
        .filter(|p| p.starts_with('/') && Path::new(p).is_dir())
        .map(|dir| PathBuf::from(dir).join("dispatch-mcp"))
        .unwrap_or_else(|| state_dir.clone());
    Ok((state_dir, runtime.join("helper.sock")))
}

/// A relative `DISPATCH_REPOS_JSON` names a file from where the MCP client started this front,
/// as it did for the Python server; the helper runs elsewhere (in its state directory), so it
/// is given the whole path. `~/…` stays for the helper to expand.
fn from_here(name: &str, value: String) -> String {
    let relative = !value.starts_with('/') && !value.starts_with('~');
    if name != "DISPATCH_REPOS_JSON" || !relative {
        return value;
    }
    match std::env::current_dir() {
        Ok(here) => here.join(&value).display().to_string(),
        Err(_) => value,
    }
}

/// How long a check of a new configuration may take (it reads the allowlist, asks NSS).
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// What `child` wrote to stderr and how it ended, if it ends within `limit`; killed if not.
fn output_within(
    mut child: std::process::Child,
    limit: Duration,
) -> std::io::Result<std::process::Output> {
    let deadline = Instant::now() + limit;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::other(format!(
                "`dispatch-helper check` took more than {} s",
                limit.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.wait_with_output()
}

/// How long a front waits for the running helper to reload its configuration.
const RELOAD_WAIT: Duration = Duration::from_secs(5);

/// The outcome of the first reload the audit log at `path` records after byte `from`, if any.
fn reload_outcome(path: &Path, from: u64) -> Option<Result<(), String>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path).ok()?;
    file.seek(SeekFrom::Start(from)).ok()?;
    let mut tail = String::new();
    file.read_to_string(&mut tail).ok()?;
    tail.lines().find_map(|line| {
        let record: serde_json::Value = serde_json::from_str(line).ok()?;
        match record["event"].as_str()? {
            "config_reloaded" => Some(Ok(())),
            "config_reload_failed" => Some(Err(record["detail"]
                .as_str()
                .unwrap_or("no reason given")
                .to_owned())),
            _ => None,
        }
    })
}

/// The names passed to lanes: `DISPATCH_PASS_ENV` (comma or space separated; empty for none),
/// else the default.
fn pass_env() -> Vec<String> {
    match std::env::var("DISPATCH_PASS_ENV") {
        Ok(list) => list
            .split([',', ' '])
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .map(str::to_owned)
            .collect(),
        // Root's personal helper runs lanes as other accounts: root's identity stays with root.
        Err(_) if nix::unistd::geteuid().is_root() => Vec::new(),
        Err(_) => DEFAULT_PASS_ENV.iter().map(|s| s.to_string()).collect(),
    }
}

/// This front's environment, of which only the names a helper passes (its handshake says
/// which) are ever sent.
pub fn lane_env_of_this_process() -> Vec<(String, String)> {
    // `vars()` would panic on a value that is not UTF-8; such a variable is simply not passed.
    std::env::vars_os()
        .filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)))
        .collect()
}

/// As the Python server did: a number it cannot read is a warning and the default. The helper
/// says so in its log; the front says it where the MCP client shows a server's messages.
pub fn warn_about_numbers() {
    for (name, whole) in [
        ("DISPATCH_MAX_ITERATIONS", true),
        ("DISPATCH_TIMEOUT", false),
    ] {
        let Some(value) = env_nonempty(name) else {
            continue;
        };
        let readable = if whole {
            value.trim().parse::<u32>().is_ok()
        } else {
            value
                .trim()
                .parse::<f64>()
                .is_ok_and(|s| s.is_finite() && s >= 1.0)
        };
        if !readable {
            eprintln!(
                "dispatch-mcp: warning: {name}={value:?} is not a valid number; using the default"
            );
        }
    }
}

impl Launcher {
    /// The user's helper as this front's environment configures it. Writes `helper.toml` when
    /// it differs and can be used, and asks a running helper to reload it.
    pub fn prepare() -> Result<Launcher, String> {
        let (state_dir, socket) = paths()?;
        let helper_bin = crate::embedded::sibling("dispatch-helper", "DISPATCH_HELPER_BIN")?;
        // Root's personal helper runs lanes as other accounts, which must reach their job
        // directories in its state: traversable, not listable.
        let state_mode = if nix::unistd::geteuid().is_root() {
            0o711
        } else {
            0o700
        };
        for (dir, mode) in [
            (&state_dir, state_mode),
            (&socket.parent().unwrap_or(&state_dir).to_path_buf(), 0o700),
        ] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(mode)
                .create(dir)
                .map_err(|e| format!("create {}: {e}", dir.display()))?;
        }
        let config_text = config_text(&state_dir, &socket)?;
        let launcher = Launcher {
            config: state_dir.join("helper.toml"),
            log: state_dir.join("helper.log"),
            state_dir,
            socket,
            helper_bin,
            config_text,
            unusable: Default::default(),
        };
        let unusable = launcher.settle()?;
        if let Some(why) = &unusable {
            eprintln!("dispatch-mcp: {why}");
        }
        *launcher.unusable_now() = unusable;
        Ok(launcher)
    }

    /// Give this front's configuration to the helper: written when it differs, and the running
    /// helper (if any) asked to reload it. Why this front may not use the helper, if it may
    /// not: its configuration is one no helper could use (checked before it is written), or
    /// one the running helper refused (then the configuration it keeps goes back on disk, so
    /// that its next start does not fail on this one).
    fn settle(&self) -> Result<Option<String>, String> {
        let previous = std::fs::read_to_string(&self.config).ok();
        if previous.as_deref() == Some(self.config_text.as_str()) {
            return Ok(None);
        }
        if let Some(why) = self.refusal_of_new_config() {
            return Ok(Some(why));
        }
        self.write_config(&self.config_text)?;
        if let Some(pid) = self.running_helper()
            && let Err(why) = self.reload(pid)
        {
            // Unless another front has written its own meanwhile.
            let still_ours =
                std::fs::read_to_string(&self.config).is_ok_and(|text| text == self.config_text);
            if let (true, Some(previous)) = (still_ours, previous) {
                let _ = self.write_config(&previous);
            }
            return Ok(Some(format!(
                "the personal helper refused this server's settings: {why}"
            )));
        }
        Ok(None)
    }

    fn unusable_now(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.unusable.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this front may use the personal helper now, or why not. Once refused, its
    /// configuration is tried again at each call (blocking: a check, perhaps a reload), so
    /// that a cause that passes (an allowlist not written yet) does not outlast it.
    pub fn usable(&self) -> Result<(), String> {
        let mut unusable = self.unusable_now();
        if unusable.is_none() {
            return Ok(());
        }
        *unusable = self.settle()?;
        match &*unusable {
            Some(why) => Err(why.clone()),
            None => Ok(()),
        }
    }

    /// Ask the running helper to reload the configuration just written, and wait (a few
    /// seconds at most) until its audit log says it did: this front's first call then runs
    /// under its settings, not the last front's. An error if it refused them.
    fn reload(&self, pid: nix::unistd::Pid) -> Result<(), String> {
        let audit = self.state_dir.join("audit.jsonl");
        let from = std::fs::metadata(&audit).map_or(0, |m| m.len());
        if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).is_err() {
            // Gone meanwhile (an idle stop): the next one starts on the new configuration.
            return Ok(());
        }
        eprintln!(
            "dispatch-mcp: the personal helper's configuration changed; asked it (pid {pid}) to reload"
        );
        let deadline = Instant::now() + RELOAD_WAIT;
        while Instant::now() < deadline {
            match reload_outcome(&audit, from) {
                Some(outcome) => return outcome,
                None => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        eprintln!(
            "dispatch-mcp: the personal helper did not say within {} s that it reloaded; going on",
            RELOAD_WAIT.as_secs()
        );
        Ok(())
    }

    /// A configuration is checked before it replaces another (`dispatch-helper check`, as the
    /// helper would load it), so that this front neither replaces a good one, which a running
    /// helper keeps and the next start needs, with one no helper could start on, nor goes on
    /// being served under another front's settings. Why not, if it is unusable.
    fn refusal_of_new_config(&self) -> Option<String> {
        let candidate = self
            .config
            .with_extension(format!("toml.{}.check", std::process::id()));
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&candidate)
            .and_then(|mut file| file.write_all(self.config_text.as_bytes()));
        let checked = written.and_then(|()| {
            let mut command = std::process::Command::new(&self.helper_bin);
            command
                .arg("--config")
                .arg(&candidate)
                .arg("check")
                .current_dir(&self.state_dir)
                .stdin(std::process::Stdio::null());
            for name in PYTHON_VARIABLES {
                command.env_remove(name);
            }
            command
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped());
            output_within(command.spawn()?, CHECK_TIMEOUT)
        });
        let _ = std::fs::remove_file(&candidate);
        match checked {
            Ok(output) if output.status.success() => None,
            Ok(output) => Some(format!(
                "this server's environment gives the personal helper a configuration it cannot \
                 use, so the helper keeps the one it has (other MCP entries' settings) and this \
                 server serves nothing until it can: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )),
            // Not checked (it could not run, or took too long): the helper itself refuses a bad
            // reload, and keeps its old settings.
            Err(error) => {
                eprintln!("dispatch-mcp: could not check the new configuration: {error}");
                None
            }
        }
    }

    fn write_config(&self, text: &str) -> Result<(), String> {
        // Several fronts may start at once: each writes its own file and renames it in place.
        let temporary = self
            .config
            .with_extension(format!("toml.{}.new", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&temporary)?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&temporary, &self.config)
        };
        write().map_err(|e| format!("write {}: {e}", self.config.display()))
    }

    /// Where the helper's stderr goes.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The pid of the helper holding the state's lock, if it is alive, a dispatch-helper and
    /// this user's: by its command name and its status, since the helper makes itself
    /// non-dumpable, which hides its `/proc/<pid>/exe` even from its own user (and makes root
    /// the owner of its `/proc/<pid>`).
    fn running_helper(&self) -> Option<nix::unistd::Pid> {
        let text = std::fs::read_to_string(self.state_dir.join("helper.lock")).ok()?;
        let pid: i32 = text.trim().parse().ok()?;
        let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        // The kernel keeps the first 15 bytes of the name: all of "dispatch-helper".
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let real_uid = status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))?
            .split_whitespace()
            .next()?
            .parse::<u32>()
            .ok()?;
        let ours = real_uid == nix::unistd::geteuid().as_raw();
        (name.trim_end() == "dispatch-helper" && ours).then(|| nix::unistd::Pid::from_raw(pid))
    }

    /// Where the running helper listens, as it says beside its lock: another front's settings (another
    /// `XDG_RUNTIME_DIR`) may have named another socket than this front's when it started, and
    /// it keeps that one until it restarts. This front's own while none runs.
    fn serving_socket(&self) -> PathBuf {
        let named = || {
            let text = std::fs::read_to_string(self.state_dir.join("helper.socket-path")).ok()?;
            let socket = text.trim();
            (!socket.is_empty()).then(|| PathBuf::from(socket))
        };
        match self.running_helper().and_then(|_| named()) {
            Some(socket) => socket,
            None => self.socket.clone(),
        }
    }

    /// A connection to the user's helper, starting it if none answers: the caller does the
    /// handshake on it. Another front starting one at the same moment is waited for.
    pub async fn connect_or_start(&self) -> Result<UnixStream, String> {
        if let Ok(stream) = UnixStream::connect(self.serving_socket()).await {
            return Ok(stream);
        }
        let deadline = Instant::now() + START_TIMEOUT;
        let mut ours: Option<tokio::process::Child> = None;
        loop {
            if let Ok(stream) = UnixStream::connect(self.serving_socket()).await {
                if let Some(child) = ours.take() {
                    reap_in_background(child);
                }
                return Ok(stream);
            }
            let ours_running = match ours.as_mut().map(|c| c.try_wait()) {
                Some(Ok(None)) => true,
                Some(Ok(Some(status))) => {
                    ours = None;
                    // Lost the race to another front's helper (its lock), or failed.
                    let lost_race = self.last_log_line().contains("another dispatch-helper");
                    if !lost_race && self.running_helper().is_none() {
                        return Err(format!(
                            "the personal helper exited ({status}) before serving: {} \
                             (configuration {}, log {})",
                            self.last_log_line(),
                            self.config.display(),
                            self.log.display()
                        ));
                    }
                    false
                }
                _ => false,
            };
            if !ours_running && self.running_helper().is_none() {
                ours = Some(self.spawn()?);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the personal helper did not open {} within {} s (log {})",
                    self.socket.display(),
                    START_TIMEOUT.as_secs(),
                    self.log.display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Start the helper in its own process group, with its stderr in `helper.log`, so that it
    /// outlives this front and the MCP client's signals to it.
    fn spawn(&self) -> Result<tokio::process::Child, String> {
        if std::fs::metadata(&self.log).is_ok_and(|m| m.len() > MAX_LOG_BYTES) {
            let _ = std::fs::rename(&self.log, self.log.with_extension("log.1"));
        }
        let log = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&self.log)
            .map_err(|e| format!("open {}: {e}", self.log.display()))?;
        let mut command = tokio::process::Command::new(&self.helper_bin);
        command
            .args(["serve", "--config"])
            .arg(&self.config)
            .current_dir(&self.state_dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .process_group(0)
            .env(
                "DISPATCH_LOG",
                std::env::var("DISPATCH_LOG").unwrap_or_else(|_| "info".into()),
            );
        // Its configuration carries these; a later front's values must not lose to the ones
        // frozen in the environment of whichever front started it.
        for name in PYTHON_VARIABLES
            .iter()
            .chain(&["LISTEN_FDS", "LISTEN_PID", "NOTIFY_SOCKET"])
        {
            command.env_remove(name);
        }
        command
            .spawn()
            .map_err(|e| format!("start {}: {e}", self.helper_bin.display()))
    }

    fn last_log_line(&self) -> String {
        std::fs::read_to_string(&self.log)
            .ok()
            .and_then(|log| {
                log.lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| "it wrote nothing".into())
    }
}

fn reap_in_background(mut child: tokio::process::Child) {
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
}

fn config_text(state_dir: &Path, socket: &Path) -> Result<String, String> {
    let home = home()?;
    let pass = pass_env();
    let idle = match env_nonempty("DISPATCH_IDLE_EXIT_SECONDS") {
        Some(value) => value.trim().parse().unwrap_or_else(|_| {
            eprintln!(
                "dispatch-mcp: warning: DISPATCH_IDLE_EXIT_SECONDS={value:?} is not a whole number; using {DEFAULT_IDLE_EXIT_SECONDS}"
            );
            DEFAULT_IDLE_EXIT_SECONDS
        }),
        None => DEFAULT_IDLE_EXIT_SECONDS,
    };
    let search_path =
        std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into());
    let list = |items: &[String]| {
        items
            .iter()
            .map(|s| toml_string(s))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut environment = String::new();
    for name in PYTHON_VARIABLES {
        if let Some(value) = env_nonempty(name) {
            let value = from_here(name, value);
            environment.push_str(&format!("{name} = {}\n", toml_string(&value)));
        }
    }
    let path = |p: &Path| toml_string(&p.display().to_string());
    Ok(format!(
        "# Written by dispatch-mcp for {user}'s personal helper, from the MCP client entry's\n\
         # environment; rewritten (and the helper reloaded) when a front's environment differs.\n\
         allowlist = {allowlist}\n\
         argv = [\"dotfiles-dispatch\", \"{{orguser}}\", \"{{repo}}\", \"{{task}}\", \"--host\", \"{{host}}\", \"--max\", \"{{max_iterations}}\"]\n\
         search_path = {search_path}\n\
         max_iterations = 50\n\
         timeout_seconds = 60\n\
         state_dir = {state}\n\
         audit_log = {audit}\n\
         socket = {socket}\n\
         socket_mode = 0o600\n\
         pass_env = [{pass}]\n\
         exit_when_idle_seconds = {idle}\n\
         \n[environment]\n{environment}\n\
         [sandbox]\n\
         # No delegated cgroup for a user's own helper: lanes are contained by their process\n\
         # group and the helper as subreaper (each job's sandbox report says so).\n\
         allow_uncontained = true\n\
         # Only for the agent socket (SSH_AUTH_SOCK); see SECURITY.md on what it allows.\n\
         allow_unix_sockets = {unix}\n",
        user = nix::unistd::User::from_uid(nix::unistd::geteuid())
            .ok()
            .flatten()
            .map(|u| u.name)
            .unwrap_or_else(|| nix::unistd::geteuid().to_string()),
        allowlist = path(&home.join(".repos.json")),
        search_path = toml_string(&search_path),
        state = path(state_dir),
        audit = path(&state_dir.join("audit.jsonl")),
        socket = path(socket),
        pass = list(&pass),
        unix = pass.iter().any(|name| name == "SSH_AUTH_SOCK"),
    ))
}
