//! Shared set-up for the integration tests: real test users, a real helper process on a real
//! socket, and a small protocol client.
#![allow(dead_code)]

use dispatch_proto::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The seven tools, sorted.
pub const TOOLS: [&str; 7] = [
    "dispatch_cancel",
    "dispatch_delete",
    "dispatch_lanes",
    "dispatch_list",
    "dispatch_result",
    "dispatch_status",
    "dispatch_unit",
];

pub const ALICE: &str = "dispatch-t-alice";
pub const BOB: &str = "dispatch-t-bob";
pub const MALLORY: &str = "dispatch-t-mallory";

pub fn helper_bin() -> &'static str {
    env!("CARGO_BIN_EXE_dispatch-helper")
}
pub fn front_bin() -> &'static str {
    env!("CARGO_BIN_EXE_dispatch-mcp")
}
pub fn probe_bin() -> &'static str {
    env!("CARGO_BIN_EXE_dispatch-escape-probe")
}
pub fn demo_lane_bin() -> &'static str {
    env!("CARGO_BIN_EXE_dispatch-demo-lane")
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Say loudly that a test cannot run here, and why.
pub fn skip(test: &str, why: &str) {
    // Straight to the process's stderr: the test harness captures eprintln! of passing tests,
    // and a skip must never pass silently.
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr().lock(),
        "\n*** SKIPPED {test}: {why} ***\n"
    );
}

static USERS: Mutex<()> = Mutex::new(());

/// Create the test users if missing (idempotent; .ci/run creates them too), each with a home,
/// a lane work directory, and homes readable by others so only Landlock can deny reading them.
pub fn ensure_users() {
    let _guard = USERS.lock().unwrap_or_else(|p| p.into_inner());
    for name in [ALICE, BOB, MALLORY] {
        if nix::unistd::User::from_name(name).unwrap().is_none() {
            let status = Command::new("useradd")
                .args(["--create-home", "--shell", "/bin/sh", "--user-group", name])
                .stderr(Stdio::null())
                .status()
                .expect("useradd runs");
            assert!(
                status.success() || nix::unistd::User::from_name(name).unwrap().is_some(),
                "could not create test user {name}"
            );
        }
        let user = nix::unistd::User::from_name(name).unwrap().unwrap();
        std::fs::create_dir_all(&user.dir).unwrap();
        std::fs::set_permissions(&user.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        nix::unistd::chown(&user.dir, Some(user.uid), Some(user.gid)).unwrap();
        // Where a lane would plant what runs later: present and the user's own, so that only
        // the sandbox can stop a lane that writes there.
        for dir in [
            "dispatch-work",
            ".ssh",
            ".config",
            ".config/systemd",
            ".config/systemd/user",
        ] {
            let dir = user.dir.join(dir);
            std::fs::create_dir_all(&dir).unwrap();
            nix::unistd::chown(&dir, Some(user.uid), Some(user.gid)).unwrap();
        }
    }
}

pub fn user(name: &str) -> nix::unistd::User {
    nix::unistd::User::from_name(name)
        .unwrap()
        .expect("test user exists")
}

pub struct HelperOptions {
    pub argv: Vec<String>,
    pub timeout_seconds: u64,
    pub extra_toml: String,
    pub sandbox_toml: String,
    pub env: Vec<(String, String)>,
    pub socket_mode: u32,
}

impl Default for HelperOptions {
    fn default() -> Self {
        HelperOptions {
            argv: vec![
                probe_bin().into(),
                "lane".into(),
                "{orguser}".into(),
                "{repo}".into(),
                "{task}".into(),
            ],
            timeout_seconds: 30,
            extra_toml: String::new(),
            sandbox_toml: String::new(),
            env: Vec::new(),
            socket_mode: 0o660,
        }
    }
}

pub const ALLOWLIST: &str = r#"{
  "orgs": {
    "alice-org": {"unix_user": "dispatch-t-alice"},
    "bob-org": {"unix_user": "dispatch-t-bob"},
    "restricted-org": {"unix_user": "dispatch-t-mallory", "allowed_clients": {"users": ["dispatch-t-bob"]}}
  },
  "repos": {
    "alice-repo": {"org": "alice-org", "github": "alice/alice-repo"},
    "bob-repo": {"org": "bob-org", "github": "bob/bob-repo"},
    "restricted-repo": {"org": "restricted-org", "github": "alice/restricted"}
  }
}"#;

pub struct TestHelper {
    /// The cgroup v2 directory this helper's lanes live under (as root), removed on drop.
    pub cgroup: Option<PathBuf>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub audit: PathBuf,
    pub state: PathBuf,
    pub config: PathBuf,
    pub child: Option<Child>,
    pub stderr_log: PathBuf,
    /// The lane users' work areas (`<work>/<unix user>`), this helper's own: every job's
    /// directory is made there, and all of it goes with the helper.
    pub work: tempfile::TempDir,
    env: Vec<(String, String)>,
}

impl TestHelper {
    pub fn start(options: HelperOptions) -> TestHelper {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let allowlist = root.join("repos.json");
        std::fs::write(&allowlist, ALLOWLIST).unwrap();
        let config = root.join("helper.toml");
        let socket = root.join("run/helper.sock");
        let audit = root.join("log/audit.jsonl");
        let state = root.join("state");
        // As root, lanes get a cgroup tree of this helper's own, as a delegated one under systemd
        // would be; it is kept across relaunches of the same helper (a restart sweeps it).
        let cgroup = (is_root() && !options.sandbox_toml.contains("cgroup")).then(|| {
            let mount = dispatch_sandbox::cgroup::cgroup2_mount()
                .expect("root tests need a cgroup v2 hierarchy (.ci/setup)");
            mount.join("dispatch-tests").join(root.file_name().unwrap())
        });
        let sandbox_toml = match &cgroup {
            Some(path) => format!("cgroup = {:?}\n{}", path, options.sandbox_toml),
            None => options.sandbox_toml.clone(),
        };
        let argv = options
            .argv
            .iter()
            .map(|a| format!("{a:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        // Each lane user's area, its own (a lane makes its job's directory there as that user).
        let work = tempfile::Builder::new()
            .prefix("dispatch-work-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
            .unwrap()
            .unwrap();
        let lane_users = [ALICE, BOB, MALLORY].map(nix::unistd::User::from_name);
        for account in lane_users.into_iter().flatten().flatten().chain([me]) {
            let area = work.path().join(&account.name);
            std::fs::create_dir(&area).unwrap();
            std::fs::set_permissions(&area, std::fs::Permissions::from_mode(0o700)).unwrap();
            if is_root() {
                nix::unistd::chown(&area, Some(account.uid), Some(account.gid)).unwrap();
            }
        }
        let work_dir = format!("{}/{{unix_user}}", work.path().display());
        let text = format!(
            "allowlist = {allowlist:?}\nargv = [{argv}]\nstate_dir = {state:?}\naudit_log = {audit:?}\n\
             socket = {socket:?}\nsocket_mode = {mode}\ntimeout_seconds = {timeout}\nkill_grace_seconds = 1\n\
             work_dir = {work_dir:?}\n{extra}\n[sandbox]\n{sandbox}\n",
            mode = options.socket_mode,
            timeout = options.timeout_seconds,
            extra = options.extra_toml,
            sandbox = sandbox_toml,
        );
        std::fs::write(&config, text).unwrap();
        for file in [&allowlist, &config] {
            std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let mut helper = TestHelper {
            work,
            cgroup,
            stderr_log: root.join("helper.stderr"),
            dir,
            socket,
            audit,
            state,
            config,
            child: None,
            env: options.env,
        };
        helper.launch();
        helper
    }

    /// Start (or start again) the helper process on the same config and state.
    pub fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr_log)
            .unwrap();
        let mut command = Command::new(helper_bin());
        command
            .args(["serve", "--config"])
            .arg(&self.config)
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let _ = std::fs::remove_file(&self.socket);
        let started_before = self.starts_audited();
        self.child = Some(command.spawn().expect("start dispatch-helper"));
        self.wait_ready(started_before);
    }

    /// Until the helper serves: its socket takes connections (it is bound before the job
    /// store is recovered) and it has audited its start (after its repairs, if any), which
    /// it does only then.
    fn wait_ready(&mut self, started_before: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok()
                && self.starts_audited() > started_before
            {
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("helper exited early with {status}: {}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("helper did not become ready: {}", self.stderr());
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// `helper_started` records so far, read while the helper may be writing (a line not yet
    /// whole is not counted).
    fn starts_audited(&self) -> usize {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .filter(|line| line.ends_with('}') && line.contains("\"event\":\"helper_started\""))
            .count()
    }

    /// The audit log's records so far. The helper may be writing one as it is read: a last
    /// line without its newline is not one yet.
    pub fn audit_lines(&self) -> Vec<serde_json::Value> {
        let bytes = std::fs::read(&self.audit).unwrap_or_default();
        let end = bytes.iter().rposition(|&b| b == b'\n').unwrap_or(0);
        String::from_utf8(bytes[..end].to_vec())
            .expect("audit lines are UTF-8")
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit lines are JSON"))
            .collect()
    }

    /// `dispatch-helper audit verify` passes on this helper's audit log.
    pub fn assert_audit_chain_intact(&self) {
        assert_audit_log_verifies(&self.audit);
    }

    /// Audit records of one event kind.
    pub fn audited(&self, event: &str) -> Vec<serde_json::Value> {
        self.audit_lines()
            .into_iter()
            .filter(|l| l["event"] == event)
            .collect()
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.socket).await
    }
}

impl TestHelper {
    /// Lane cgroups with processes in them now (the helper also keeps a few fresh, empty ones
    /// ready, which do not count).
    pub fn populated_lane_cgroups(&self) -> Vec<String> {
        let Some(base) = &self.cgroup else {
            return Vec::new();
        };
        self.lane_cgroups()
            .into_iter()
            .filter(|name| {
                std::fs::read_to_string(base.join("lanes").join(name).join("cgroup.events"))
                    .is_ok_and(|events| events.contains("populated 1"))
            })
            .collect()
    }

    /// Every lane cgroup directory that exists now.
    pub fn lane_cgroups(&self) -> Vec<String> {
        let Some(base) = &self.cgroup else {
            return Vec::new();
        };
        std::fs::read_dir(base.join("lanes"))
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// SIGTERM, and wait (up to 30 s, then SIGKILL: a helper waits up to 5 s for starts in
    /// progress, then its lanes' grace period, before it syncs and exits).
    pub fn stop(&mut self) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if child.try_wait().unwrap().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for TestHelper {
    fn drop(&mut self) {
        self.stop();
        // Whatever a killed helper left: kill it, then remove the tree.
        if let Some(base) = &self.cgroup {
            let lanes = base.join("lanes");
            for name in self.lane_cgroups() {
                let lane = lanes.join(name);
                let _ = std::fs::write(lane.join("cgroup.kill"), "1");
                let deadline = Instant::now() + Duration::from_secs(5);
                while std::fs::remove_dir(&lane).is_err() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            let _ = std::fs::remove_dir(&lanes);
            let _ = std::fs::remove_dir(base);
            // The shared parent, once the last test's tree is gone.
            if let Some(parent) = base.parent() {
                let _ = std::fs::remove_dir(parent);
            }
        }
    }
}

pub struct Client {
    pub stream: tokio::net::UnixStream,
    next_id: u64,
    pub hello: HelloReply,
}

impl Client {
    /// As `connect`, but None when the helper refuses or drops the connection.
    pub async fn try_connect(socket: &Path) -> Option<Client> {
        let stream = tokio::net::UnixStream::connect(socket).await.ok()?;
        let mut client = Client {
            stream,
            next_id: 1,
            hello: HelloReply {
                version: 0,
                helper_version: String::new(),
                peer_uid: 0,
                unprivileged: false,
                max_in_flight: 8,
                pass_env: Vec::new(),
            },
        };
        let hello = Request::Hello {
            version: PROTOCOL_VERSION,
            client_name: Some("integration-test".into()),
        };
        match client.try_request(hello).await? {
            Response::Hello(hello) => client.hello = hello,
            _ => return None,
        }
        Some(client)
    }

    pub async fn connect(socket: &Path) -> Client {
        Client::try_connect(socket)
            .await
            .expect("connect to the helper and complete the handshake")
    }

    /// As `request`, but None when the connection fails (the helper died) instead of a panic.
    pub async fn try_request(&mut self, body: Request) -> Option<Response> {
        let id = self.next_id;
        self.next_id += 1;
        let envelope = RequestEnvelope { id, body };
        write_frame(&mut self.stream, &envelope, FrameLimit::REQUEST)
            .await
            .ok()?;
        loop {
            let response: ResponseEnvelope = read_frame(&mut self.stream, FrameLimit::RESPONSE)
                .await
                .ok()??;
            if response.id == id {
                return Some(response.body);
            }
        }
    }

    pub async fn request(&mut self, body: Request) -> Response {
        self.try_request(body)
            .await
            .expect("the helper answered (it did not close or reset the connection)")
    }

    pub async fn dispatch(&mut self, orguser: &str, repo: &str, task: &str) -> Response {
        self.request(Request::Dispatch(DispatchRequest {
            orguser: orguser.into(),
            repo: repo.into(),
            task: task.into(),
            description: Some(format!("test {task}").chars().take(100).collect()),
            lane_env: Vec::new(),
        }))
        .await
    }

    /// Dispatch `task` and wait for it to succeed (the helper serves, and its lanes run).
    pub async fn runs_to_success(&mut self, orguser: &str, repo: &str, task: &str) {
        let job = self.dispatch_ok(orguser, repo, task).await;
        let done = self.result(&job.handle, 20_000).await;
        assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    }

    pub async fn dispatch_ok(&mut self, orguser: &str, repo: &str, task: &str) -> JobView {
        match self.dispatch(orguser, repo, task).await {
            Response::Job(job) => *job,
            other => panic!("dispatch of {task:?} failed: {other:?}"),
        }
    }

    pub async fn result(&mut self, handle: &str, wait_ms: u32) -> JobView {
        match self
            .request(Request::Result {
                handle: handle.into(),
                wait_ms,
                output_from: None,
            })
            .await
        {
            Response::Job(job) => *job,
            other => panic!("result failed: {other:?}"),
        }
    }

    /// How many of this client's jobs match `filter`.
    pub async fn total(&mut self, filter: Option<&str>) -> u64 {
        let list = Request::List {
            filter: filter.map(str::to_owned),
            detail: false,
            limit: 0,
        };
        match self.request(list).await {
            Response::List { total, .. } => total,
            other => panic!("list failed: {other:?}"),
        }
    }

    pub async fn error(&mut self, body: Request) -> ErrorReply {
        match self.request(body).await {
            Response::Error(error) => error,
            other => panic!("expected an error, got {other:?}"),
        }
    }
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

pub fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("timed out waiting for {what}");
}

/// `wait_until` for async tests whose condition depends on the runtime making progress.
pub async fn wait_until_async(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

impl TestHelper {
    /// Stop the directly started helper and start it again the way systemd would: through
    /// `systemd-socket-activate`, which owns the listening socket and passes it as LISTEN_FDS.
    pub fn relaunch_socket_activated(&mut self, notify_socket: &Path) {
        self.kill9();
        let _ = std::fs::remove_file(&self.socket);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr_log)
            .unwrap();
        let child = Command::new("systemd-socket-activate")
            .arg("--listen")
            .arg(&self.socket)
            .arg(format!(
                "--setenv=NOTIFY_SOCKET={}",
                notify_socket.display()
            ))
            .arg(helper_bin())
            .args(["serve", "--config"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("systemd-socket-activate runs");
        self.child = Some(child);
        wait_until("the activation socket", Duration::from_secs(10), || {
            self.socket.exists()
        });
    }
}

/// Start a helper for a test that needs root (real uid drops to real test users), or say loudly
/// that the test is skipped and return None.
pub fn start_helper(test: &str, options: HelperOptions) -> Option<TestHelper> {
    if !is_root() {
        skip(test, "needs root to create test users and drop to them");
        return None;
    }
    ensure_users();
    Some(TestHelper::start(options))
}

/// `dispatch-helper audit verify` passes on the audit log at `path`.
pub fn assert_audit_log_verifies(path: impl AsRef<std::ffi::OsStr>) {
    let verify = Command::new(helper_bin())
        .args(["audit", "verify"])
        .arg(path.as_ref())
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
}

/// A job's record as the helper's store holds it durably (its snapshot, then its journal, the
/// latest line winning), read the way the helper reads it back after a crash.
pub fn stored_record(state_dir: &Path, handle: &str) -> Option<serde_json::Value> {
    let jobs = state_dir.join("jobs");
    let mut latest = None;
    for line in std::fs::read_to_string(jobs.join("snapshot.jsonl"))
        .unwrap_or_default()
        .lines()
    {
        let record: serde_json::Value = serde_json::from_str(line).unwrap();
        if record["handle"] == handle {
            latest = Some(record);
        }
    }
    for line in std::fs::read_to_string(jobs.join("journal.jsonl"))
        .unwrap_or_default()
        .lines()
    {
        let Ok(op) = serde_json::from_str::<serde_json::Value>(line) else {
            continue; // a torn last line, as the helper would cut it
        };
        // A record saved alone or with its audit record (an acceptance, an end, a loss); a
        // removal alone or with its audit record (a deletion, a pruning).
        let saved = [&op["save"], &op["accepted"]["record"]];
        if let Some(record) = saved.into_iter().find(|r| r["handle"] == handle) {
            latest = Some(record.clone());
        } else if op["remove"] == handle || op["removed"]["handle"] == handle {
            latest = None;
        }
    }
    latest
}
