//! Personal mode as a user runs it: a real non-root account starts `dispatch-mcp` with no
//! arguments (the Python server's MCP entry), no system helper, and the Python project's
//! environment. Its fronts come and go as MCP clients restart them; its helper is shared,
//! durable, and stops when idle. Lanes run the user's `dotfiles-dispatch` (a stand-in here)
//! with the user's identity passed through, and can write nothing of the home.

mod support;

use rmcp::model::{CallToolRequestParams, CallToolResult};
use rmcp::service::RunningService;
use rmcp::transport::{ConfigureCommandExt, TokioChildProcess};
use rmcp::{RoleClient, ServiceExt};
use serde_json::{Value, json};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::*;

type Client = RunningService<RoleClient, ()>;

const TOKEN: &str = "ghp_personal_mode_secret_0123456789";

/// The stand-in for `dotfiles-dispatch ORGUSER REPO TASK --host H --max N`: prints its argv,
/// then does what the task names.
const FAKE_DISPATCH: &str = r#"#!/bin/sh
for arg in "$@"; do printf '<%s>' "$arg"; done; echo
echo $$ > lane.pid
case "$3" in
  sleep*) sleep "${3#sleep }"; echo slept ;;
  identity)
    echo "SSH_AUTH_SOCK=$SSH_AUTH_SOCK"
    echo "GH_TOKEN_LENGTH=${#GH_TOKEN}"
    echo "PATH=$PATH"
    beside-dispatch ;;
  plant)
    for f in "$HOME/.bashrc" "$HOME/.ssh/authorized_keys"; do
      if (echo planted >> "$f") 2>/dev/null; then echo "WROTE $f"; else echo "denied $f"; fi
    done
    if (echo planted > ../planted-beside) 2>/dev/null; then echo "WROTE beside its directory"; fi
    echo mine > made-here && echo "work dir $(pwd) writable" ;;
esac
"#;

/// One user's world: binaries it can run, a home for the front (allowlist, state), a runtime
/// dir, and a PATH with the dispatch command and a tool beside it.
struct World {
    user: nix::unistd::User,
    root: tempfile::TempDir,
}

impl World {
    fn new(test: &str) -> Option<World> {
        if !is_root() {
            skip(
                test,
                "needs root to run the front as a real non-root test user",
            );
            return None;
        }
        ensure_users();
        let user = user(ALICE);
        let root = tempfile::Builder::new()
            .prefix("dispatch-personal-")
            .tempdir()
            .unwrap();
        let world = World { user, root };
        std::fs::set_permissions(world.root.path(), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        for dir in ["bin", "home", "run", "tmp"] {
            std::fs::create_dir(world.path(dir)).unwrap();
        }
        for binary in [front_bin(), helper_bin()] {
            let name = Path::new(binary).file_name().unwrap();
            std::fs::copy(binary, world.path("bin").join(name)).unwrap();
        }
        std::fs::write(world.path("bin/dotfiles-dispatch"), FAKE_DISPATCH).unwrap();
        std::fs::write(
            world.path("bin/beside-dispatch"),
            "#!/bin/sh\necho beside-dispatch ran\n",
        )
        .unwrap();
        for tool in ["dotfiles-dispatch", "beside-dispatch"] {
            let path = world.path("bin").join(tool);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        // The Python server's default allowlist: ~/.repos.json, one repo without "github".
        std::fs::write(
            world.path("home/.repos.json"),
            r#"{"orgs": {"acme": {}}, "repos": {"widgets": {"org": "acme"}}}"#,
        )
        .unwrap();
        for dir in ["home", "run", "tmp"] {
            let path = world.path(dir);
            nix::unistd::chown(&path, Some(world.user.uid), Some(world.user.gid)).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).unwrap();
        }
        nix::unistd::chown(
            &world.path("home/.repos.json"),
            Some(world.user.uid),
            Some(world.user.gid),
        )
        .unwrap();
        Some(world)
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.root.path().join(relative)
    }

    fn state(&self) -> PathBuf {
        self.path("home/.local/state/dispatch-mcp")
    }

    /// `dispatch-mcp` with no arguments, as the user, with the MCP entry's environment.
    async fn front(&self, env: &[(&str, &str)]) -> Client {
        let path = format!("{}:/usr/bin:/bin", self.path("bin").display());
        let command =
            tokio::process::Command::new(self.path("bin/dispatch-mcp")).configure(|cmd| {
                cmd.env_clear()
                    .env("HOME", self.path("home"))
                    .env("XDG_RUNTIME_DIR", self.path("run"))
                    .env("TMPDIR", self.path("tmp"))
                    .env("PATH", path)
                    .env("SSH_AUTH_SOCK", "/run/user/agent.sock")
                    .env("GH_TOKEN", TOKEN)
                    .envs(env.iter().copied())
                    .current_dir(self.path("home"))
                    .uid(self.user.uid.as_raw())
                    .gid(self.user.gid.as_raw());
            });
        ().serve(TokioChildProcess::new(command).unwrap())
            .await
            .expect("MCP initialize with the personal front")
    }

    /// The pid of the user's helper, from its lock, if it is alive.
    fn helper_pid(&self) -> Option<i32> {
        let pid = std::fs::read_to_string(self.state().join("helper.lock"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        alive(pid).then_some(pid)
    }

    /// A socket of the test's own where the user's helper's would be (in a run directory the
    /// user owns, as the front makes it), and its path.
    fn listen_in_the_helpers_place(&self) -> (std::os::unix::net::UnixListener, PathBuf) {
        use std::os::unix::fs::DirBuilderExt;
        let dir = self.path("run/dispatch-mcp");
        std::fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
        nix::unistd::chown(&dir, Some(self.user.uid), Some(self.user.gid)).unwrap();
        let socket = dir.join("helper.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        nix::unistd::chown(&socket, Some(self.user.uid), Some(self.user.gid)).unwrap();
        (listener, socket)
    }

    fn audit(&self) -> String {
        std::fs::read_to_string(self.state().join("audit.jsonl")).unwrap_or_default()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(pid) = self.helper_pid() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

async fn call(client: &Client, tool: &str, arguments: Value) -> CallToolResult {
    client
        .call_tool(
            CallToolRequestParams::new(tool.to_owned())
                .with_arguments(arguments.as_object().unwrap().clone()),
        )
        .await
        .expect("tools/call")
}

fn ok(result: CallToolResult) -> Value {
    assert_ne!(result.is_error, Some(true), "tool error: {result:?}");
    result.structured_content.expect("structured content")
}

fn error_text(result: CallToolResult) -> String {
    assert_eq!(
        result.is_error,
        Some(true),
        "expected a tool error: {result:?}"
    );
    result
        .content
        .first()
        .and_then(|c| c.as_text())
        .map(|t| t.text.clone())
        .unwrap_or_default()
}

async fn dispatch(client: &Client, task: &str) -> String {
    let job = ok(call(
        client,
        "dispatch_unit",
        json!({"orguser": "acme", "repo": "widgets", "task_description": task}),
    )
    .await);
    job["handle"].as_str().unwrap().to_owned()
}

async fn result(client: &Client, handle: &str) -> Value {
    ok(call(
        client,
        "dispatch_result",
        json!({"handle": handle, "wait_seconds": 30}),
    )
    .await)
}

fn stdout(result: &Value) -> String {
    result["stdout"]["text"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Handles in `dispatch_list`.
async fn listed(client: &Client) -> Vec<String> {
    let list = ok(call(client, "dispatch_list", json!({})).await);
    list["dispatches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["handle"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn a_job_outlives_its_front_and_a_new_front_follows_it() {
    let Some(world) = World::new("personal mode: restart of the front") else {
        return;
    };
    let first = world.front(&[]).await;
    let handle = dispatch(&first, "sleep 3").await;
    let helper = world.helper_pid().expect("the personal helper runs");
    let lane_pid_file = world
        .state()
        .join(format!("lanes/{ALICE}/{handle}/lane.pid"));
    wait_until_async("the lane to start", Duration::from_secs(10), || {
        lane_pid_file.exists()
    })
    .await;
    // The MCP client restarts its server: the front goes (killed with its stdio).
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lane: i32 = std::fs::read_to_string(&lane_pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(lane), "the lane must not die with the front");
    assert_eq!(
        world.helper_pid(),
        Some(helper),
        "the helper outlives the front"
    );

    let second = world.front(&[]).await;
    assert!(
        listed(&second).await.contains(&handle),
        "the job is listed by the new front"
    );
    let done = result(&second, &handle).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert!(stdout(&done).contains("slept"), "{done}");
    // Python's defaults: the repo name for github, localhost, 50 iterations.
    assert!(
        stdout(&done).starts_with("<acme><widgets><sleep 3><--host><localhost><--max><50>"),
        "{done}"
    );
    assert_eq!(done["github"], "widgets");
    // By default the agent is not passed, and lanes get no Unix sockets.
    let config = std::fs::read_to_string(world.state().join("helper.toml")).unwrap();
    assert!(
        config.contains("pass_env = [\"GH_TOKEN\", \"GITHUB_TOKEN\", \"PATH\"]"),
        "{config}"
    );
    assert!(config.contains("allow_unix_sockets = false"), "{config}");
    // Python's detail: what the command printed; our words beside it.
    assert_eq!(done["detail"], stdout(&done).trim());
    assert_eq!(done["outcome"], "exited with status 0");
    assert_eq!(
        world.helper_pid(),
        Some(helper),
        "one helper served both fronts"
    );
    drop(second);
    // No temp dir of ours is left anywhere, and no front was audited as a broken client.
    assert_eq!(std::fs::read_dir(world.path("tmp")).unwrap().count(), 0);
    assert!(
        !world.audit().contains("protocol_violation"),
        "{}",
        world.audit()
    );
    assert_audit_log_verifies(world.state().join("audit.jsonl"));
}

#[tokio::test]
async fn two_fronts_share_one_helper_which_stops_when_idle_and_comes_back() {
    let Some(world) = World::new("personal mode: sharing and idle exit") else {
        return;
    };
    let idle = [("DISPATCH_IDLE_EXIT_SECONDS", "1")];
    let (a, b) = tokio::join!(world.front(&idle), world.front(&idle));
    let (from_a, from_b) = tokio::join!(dispatch(&a, "from a"), dispatch(&b, "from b"));
    let helper = world.helper_pid().expect("the personal helper runs");
    for client in [&a, &b] {
        let handles = listed(client).await;
        assert!(
            handles.contains(&from_a) && handles.contains(&from_b),
            "both fronts see both jobs: {handles:?}"
        );
    }
    result(&a, &from_a).await;
    result(&b, &from_b).await;
    // Still in use: the helper stays.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        world.helper_pid(),
        Some(helper),
        "a helper with clients stays"
    );
    drop(a);
    drop(b);
    wait_until_async("the idle helper to stop", Duration::from_secs(10), || {
        !alive(helper)
    })
    .await;
    assert!(
        world
            .audit()
            .contains("idle: no client, no lane and nothing queued")
    );

    // The next front starts it again, with every job still there.
    let c = world.front(&idle).await;
    let handles = listed(&c).await;
    assert!(
        handles.contains(&from_a) && handles.contains(&from_b),
        "{handles:?}"
    );
    assert_ne!(world.helper_pid(), Some(helper));
    drop(c);
    assert_audit_log_verifies(world.state().join("audit.jsonl"));
}

#[tokio::test]
async fn a_killed_helper_leaves_a_stale_socket_that_the_next_front_recovers() {
    let Some(world) = World::new("personal mode: stale socket") else {
        return;
    };
    let front = world.front(&[]).await;
    let handle = dispatch(&front, "sleep 30").await;
    let helper = world.helper_pid().expect("the personal helper runs");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(helper),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until_async("the helper to die", Duration::from_secs(5), || {
        !alive(helper)
    })
    .await;
    assert!(
        world.path("run/dispatch-mcp/helper.sock").exists(),
        "the dead helper's socket is still there"
    );
    // The same front's next call: the socket refuses, a new helper takes over.
    let status = ok(call(&front, "dispatch_status", json!({"handle": handle})).await);
    assert_eq!(status["status"], "lost", "{status}");
    let again = world.helper_pid().expect("a new helper runs");
    assert_ne!(again, helper);
    let next = dispatch(&front, "after the crash").await;
    assert_eq!(result(&front, &next).await["status"], "succeeded");
    // Documented differences from Python: newest first (a durable list that `limit` cuts),
    // and handles that are random and never reused.
    assert_eq!(listed(&front).await, [next.clone(), handle.clone()]);
    for h in [&handle, &next] {
        let hex = h.strip_prefix("d-").unwrap();
        assert!(
            hex.len() == 32 && hex.chars().all(|c| c.is_ascii_hexdigit()),
            "{h}"
        );
    }
    drop(front);
}

#[tokio::test]
async fn the_users_identity_reaches_the_lane_but_no_record() {
    let Some(world) = World::new("personal mode: identity pass-through") else {
        return;
    };
    // The agent only when named (it opens Unix sockets; see SECURITY.md).
    let pass = [(
        "DISPATCH_PASS_ENV",
        "SSH_AUTH_SOCK,GH_TOKEN,GITHUB_TOKEN,PATH",
    )];
    let front = world.front(&pass).await;
    let handle = dispatch(&front, "identity").await;
    let done = result(&front, &handle).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let out = stdout(&done);
    assert!(out.contains("SSH_AUTH_SOCK=/run/user/agent.sock"), "{out}");
    assert!(
        out.contains(&format!("GH_TOKEN_LENGTH={}", TOKEN.len())),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "PATH={}:/usr/bin:/bin",
            world.path("bin").display()
        )),
        "{out}"
    );
    // A tool installed beside dotfiles-dispatch runs (its directory is on the passed PATH).
    assert!(out.contains("beside-dispatch ran"), "{out}");
    // The token's value is in no record: not the audit log, not the job's record or result.
    let mut record = done.clone();
    record["stdout"] = Value::Null;
    assert!(!record.to_string().contains(TOKEN), "{record}");
    assert!(!world.audit().contains(TOKEN));
    let jobs = std::fs::read_dir(world.state().join("jobs")).unwrap();
    for job in jobs.flatten() {
        let text = std::fs::read_to_string(job.path()).unwrap_or_default();
        assert!(!text.contains(TOKEN), "{}", job.path().display());
    }
    drop(front);
}

#[tokio::test]
async fn a_lane_cannot_plant_anything_in_the_home() {
    let Some(world) = World::new("personal mode: home read-only") else {
        return;
    };
    let home = world.user.dir.clone();
    let before = |name: &str| std::fs::read(home.join(name)).unwrap_or_default();
    let (bashrc, keys) = (before(".bashrc"), before(".ssh/authorized_keys"));
    let front = world.front(&[]).await;
    let handle = dispatch(&front, "plant").await;
    let done = result(&front, &handle).await;
    let out = stdout(&done);
    assert!(!out.contains("WROTE"), "BREACH: {out}");
    assert!(
        out.contains(&format!("denied {}/.bashrc", home.display())),
        "{out}"
    );
    assert!(out.contains("authorized_keys"), "{out}");
    assert_eq!(before(".bashrc"), bashrc, "BREACH: ~/.bashrc changed");
    assert_eq!(
        before(".ssh/authorized_keys"),
        keys,
        "BREACH: authorized_keys changed"
    );
    // Its own directory is writable, and goes with its record.
    let job_dir = world.state().join(format!("lanes/{ALICE}/{handle}"));
    assert!(out.contains("writable"), "{out}");
    assert!(job_dir.join("made-here").exists());
    ok(call(&front, "dispatch_delete", json!({"handle": handle})).await);
    assert!(
        !job_dir.exists(),
        "the job's directory is removed with its record"
    );
    drop(front);
}

/// The Python server's variables as an MCP entry sets them: `~` in the allowlist path is the
/// home, an unreadable number is a warning and the default, the host is taken as given, and
/// DISPATCH_TIMEOUT bounds the command.
#[tokio::test]
async fn the_python_variables_keep_their_meaning_and_leniency() {
    let Some(world) = World::new("personal mode: Python variables") else {
        return;
    };
    let front = world
        .front(&[
            ("DISPATCH_REPOS_JSON", "~/.repos.json"),
            ("DISPATCH_MAX_ITERATIONS", "abc"),
            ("DISPATCH_SSH_HOST", "build-host"),
            ("DISPATCH_TIMEOUT", "2"),
        ])
        .await;
    let quick = dispatch(&front, "quick").await;
    let done = result(&front, &quick).await;
    assert!(
        stdout(&done).starts_with("<acme><widgets><quick><--host><build-host><--max><50>"),
        "{done}"
    );
    let slow = dispatch(&front, "sleep 30").await;
    let stopped = result(&front, &slow).await;
    assert_eq!(stopped["status"], "timed_out", "{stopped}");
    assert_eq!(stopped["stopped_by"], "wall_clock", "{stopped}");
    let log = std::fs::read_to_string(world.state().join("helper.log")).unwrap_or_default();
    assert!(
        log.contains("DISPATCH_MAX_ITERATIONS=\"abc\" is not a whole number; using 50"),
        "{log}"
    );
    drop(front);
}

/// A relative `DISPATCH_REPOS_JSON` names a file from where the client started the front, as
/// it did for the Python server, not from wherever the helper runs.
#[tokio::test]
async fn a_relative_allowlist_path_is_read_from_where_the_front_started() {
    let Some(world) = World::new("personal mode: relative DISPATCH_REPOS_JSON") else {
        return;
    };
    let lanes = world.path("home/lanes");
    std::fs::create_dir(&lanes).unwrap();
    std::fs::rename(world.path("home/.repos.json"), lanes.join("repos.json")).unwrap();
    nix::unistd::chown(&lanes, Some(world.user.uid), Some(world.user.gid)).unwrap();
    let front = world
        .front(&[("DISPATCH_REPOS_JSON", "lanes/repos.json")])
        .await;
    let done = result(&front, &dispatch(&front, "quick").await).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    drop(front);
}

/// A second MCP entry with other settings reloads the running helper: the last front started
/// wins, for every front (the README's rule). Its check of the running helper used to read the
/// helper's `/proc/<pid>/exe`, which the helper, non-dumpable, hides from its own user: no
/// reload was ever sent.
#[tokio::test]
async fn a_front_with_other_settings_reloads_the_running_helper() {
    let Some(world) = World::new("personal mode: a second entry's settings") else {
        return;
    };
    let first = world.front(&[("DISPATCH_SSH_HOST", "host-a")]).await;
    let done = result(&first, &dispatch(&first, "one").await).await;
    assert!(stdout(&done).contains("<host-a>"), "{done}");
    let pid = world.helper_pid().expect("a running helper");
    let second = world.front(&[("DISPATCH_SSH_HOST", "host-b")]).await;
    let done = result(&second, &dispatch(&second, "two").await).await;
    assert!(stdout(&done).contains("<host-b>"), "{done}");
    assert_eq!(world.helper_pid(), Some(pid), "the same helper, reloaded");
    drop(second);
    drop(first);
}

/// A front without `XDG_RUNTIME_DIR` (cron, `su`) names another socket than the one the
/// running helper serves, which keeps its socket until it restarts: the front finds it where
/// the helper names it, beside its lock.
#[tokio::test]
async fn a_front_with_another_runtime_dir_finds_the_running_helper() {
    let Some(world) = World::new("personal mode: another XDG_RUNTIME_DIR") else {
        return;
    };
    let first = world.front(&[]).await;
    dispatch(&first, "one").await;
    let pid = world.helper_pid().expect("a running helper");
    let second = world.front(&[("XDG_RUNTIME_DIR", "")]).await;
    let done = result(&second, &dispatch(&second, "two").await).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(world.helper_pid(), Some(pid), "the same helper");
    drop(second);
    drop(first);
}

/// A refused front never writes its configuration, helper running or not: once the helper is
/// gone, the next start (by any front) must not fail on it.
#[tokio::test]
async fn a_refused_front_leaves_the_configuration_alone_after_the_helper_is_gone() {
    let Some(world) = World::new("personal mode: refused, then the helper gone") else {
        return;
    };
    let good = world.front(&[]).await;
    dispatch(&good, "one").await;
    let config = world.state().join("helper.toml");
    let before = std::fs::read_to_string(&config).unwrap();
    let missing = world.path("home/missing.json");
    let refused = world
        .front(&[("DISPATCH_REPOS_JSON", missing.to_str().unwrap())])
        .await;
    let args = json!({"orguser": "acme", "repo": "widgets", "task_description": "x"});
    assert!(
        error_text(call(&refused, "dispatch_unit", args.clone()).await).contains("missing.json")
    );
    let pid = world.helper_pid().expect("a running helper");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    while world.helper_pid().is_some() {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(error_text(call(&refused, "dispatch_unit", args).await).contains("missing.json"));
    assert_eq!(std::fs::read_to_string(&config).unwrap(), before);
    let done = result(&good, &dispatch(&good, "two").await).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    drop(refused);
    drop(good);
}

/// A front refused for a cause that passes (its allowlist not written yet) is tried again at
/// its next call, and serves once the cause is gone, without a restart.
#[tokio::test]
async fn a_front_refused_for_a_missing_allowlist_serves_once_it_exists() {
    let Some(world) = World::new("personal mode: an allowlist written later") else {
        return;
    };
    let first = world.front(&[]).await;
    dispatch(&first, "one").await;
    let later = world.path("home/later.json");
    let second = world
        .front(&[("DISPATCH_REPOS_JSON", later.to_str().unwrap())])
        .await;
    let args = json!({"orguser": "acme", "repo": "widgets", "task_description": "x"});
    let error = error_text(call(&second, "dispatch_unit", args.clone()).await);
    assert!(error.contains("later.json"), "{error}");
    std::fs::copy(world.path("home/.repos.json"), &later).unwrap();
    nix::unistd::chown(&later, Some(world.user.uid), Some(world.user.gid)).unwrap();
    let done = result(&second, &dispatch(&second, "two").await).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    drop(second);
    drop(first);
}

/// A front whose environment makes a configuration the helper cannot use, beside a running
/// helper that serves another MCP entry: it says so on every call, and neither replaces the
/// good configuration (which a restart could then not start on) nor is served under it.
#[tokio::test]
async fn a_front_whose_settings_are_unusable_says_so_and_leaves_the_running_helper_alone() {
    let Some(world) = World::new("personal mode: unusable settings beside a running helper") else {
        return;
    };
    let good = world.front(&[("DISPATCH_SSH_HOST", "build-host")]).await;
    dispatch(&good, "first").await;
    let config = world.state().join("helper.toml");
    let before = std::fs::read_to_string(&config).unwrap();
    let bad = world.front(&[("DISPATCH_SSH_HOST", "my host")]).await;
    let error = error_text(
        call(
            &bad,
            "dispatch_unit",
            json!({"orguser": "acme", "repo": "widgets", "task_description": "x"}),
        )
        .await,
    );
    assert!(
        error.contains("cannot use") && error.contains("my host"),
        "{error}"
    );
    assert_eq!(std::fs::read_to_string(&config).unwrap(), before);
    let done = result(&good, &dispatch(&good, "second").await).await;
    assert!(stdout(&done).contains("<build-host>"), "{done}");
    drop(bad);
    drop(good);
}

#[tokio::test]
async fn without_an_allowlist_the_error_names_it_and_no_demo_is_served() {
    let Some(world) = World::new("personal mode: no allowlist") else {
        return;
    };
    std::fs::remove_file(world.path("home/.repos.json")).unwrap();
    let front = world.front(&[]).await;
    let error = error_text(call(&front, "dispatch_lanes", json!({})).await);
    assert!(
        error.contains(&world.path("home/.repos.json").display().to_string()),
        "the error names ~/.repos.json: {error}"
    );
    assert!(!error.contains("demo"), "{error}");
    drop(front);
}

/// A personal helper admits its own user: one that closes the handshake is stopping (idle, or
/// killed and its last threads not yet gone, its socket still taking connections). The front
/// tries again and finds or starts its successor, rather than tell the agent it is "not
/// admitted". Played here by a socket that takes one connection, closes it and goes away.
#[tokio::test]
async fn a_personal_helper_closing_the_handshake_is_replaced_not_reported_as_a_refusal() {
    let Some(world) = World::new("personal mode: a helper that stops during the handshake") else {
        return;
    };
    let (stopping, socket) = world.listen_in_the_helpers_place();
    let closed_once = std::thread::spawn(move || {
        let (connection, _) = stopping.accept().unwrap();
        std::fs::remove_file(&socket).unwrap();
        drop(stopping);
        drop(connection);
    });
    let front = world.front(&[]).await;
    let handle = dispatch(&front, "after a helper that stopped").await;
    closed_once.join().unwrap();
    assert_eq!(result(&front, &handle).await["status"], "succeeded");
    assert!(world.helper_pid().is_some(), "a new helper serves");
    drop(front);
}

/// One that keeps closing the handshake (this user's connections used up, a front inside a
/// lane) is not retried for ever: within seconds the agent is told what that can mean.
#[tokio::test]
async fn a_personal_helper_that_keeps_closing_the_handshake_is_reported_as_such() {
    let Some(world) = World::new("personal mode: a helper that refuses every handshake") else {
        return;
    };
    let (refusing, _) = world.listen_in_the_helpers_place();
    refusing.set_nonblocking(true).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let refuser = std::thread::spawn(move || {
        let mut refused = 0;
        while !stopped.load(std::sync::atomic::Ordering::SeqCst) {
            match refusing.accept() {
                Ok((connection, _)) => {
                    refused += 1;
                    drop(connection);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        refused
    });
    let front = world.front(&[]).await;
    let started = std::time::Instant::now();
    let said = error_text(
        call(
            &front,
            "dispatch_unit",
            json!({"orguser": "acme", "repo": "widgets", "task_description": "refused"}),
        )
        .await,
    );
    let took = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let refused = refuser.join().unwrap();
    assert!(said.contains("kept closing"), "{said}");
    assert!(said.contains("max_connections_per_client"), "{said}");
    assert!(took < Duration::from_secs(15), "retried for {took:?}");
    assert!((2..100).contains(&refused), "{refused} handshakes tried");
    drop(front);
}
