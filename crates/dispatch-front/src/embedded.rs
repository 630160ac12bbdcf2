//! The demo helper: a real `dispatch-helper` process started by the front on a private socket
//! for `dispatch-mcp demo`, with a demo allowlist and the harmless `dispatch-demo-lane`
//! program. Without root it runs in unprivileged mode (every lane runs as the current user,
//! still sandboxed); as root the demo lane runs as `nobody`. It is never served in place of a
//! missing allowlist: `serve` without a system helper uses the personal helper (`personal`).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

pub const DEMO_ORGUSER: &str = "demo";
pub const DEMO_REPO: &str = "demo-repo";

pub struct EmbeddedHelper {
    pub socket: PathBuf,
    pub audit_log: PathBuf,
    _child: tokio::process::Child,
}

pub fn sibling(name: &str, env: &str) -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os(env) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot locate this executable: {e}"))?;
    let path = exe.with_file_name(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{name} was not found next to {} (set {env} to its path)",
            exe.display()
        ))
    }
}

/// A fresh private directory for one embedded helper.
pub fn new_private_dir() -> Result<PathBuf, String> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let dir = std::env::temp_dir().join(format!(
        "dispatch-mcp-embedded-{}-{stamp}-{}",
        nix::unistd::geteuid(),
        std::process::id()
    ));
    std::fs::create_dir(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    // As root the lane runs as nobody, which must reach the lane program and its work dir.
    let mode = if nix::unistd::geteuid().is_root() {
        0o755
    } else {
        0o700
    };
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))
        .map_err(|e| e.to_string())?;
    Ok(dir)
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("write {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
        .map_err(|e| e.to_string())
}

fn toml_string(value: &str) -> String {
    // TOML basic strings share JSON's escapes for everything we write here.
    serde_json::to_string(value).expect("strings serialize")
}

pub async fn start(dir: Option<PathBuf>) -> Result<EmbeddedHelper, String> {
    let dir = match dir {
        Some(dir) => dir,
        None => new_private_dir()?,
    };
    let helper_bin = sibling("dispatch-helper", "DISPATCH_HELPER_BIN")?;
    let socket = dir.join("helper.sock");
    let audit_log = dir.join("audit.jsonl");
    let lanes = demo_lanes(&dir)?;
    let config = dir.join("helper.toml");
    write(&config, &config_text(&dir, &lanes, &socket, &audit_log))?;
    let mut child = tokio::process::Command::new(&helper_bin)
        .args(["serve", "--die-with-parent", "--config"])
        .arg(&config)
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("start {}: {e}", helper_bin.display()))?;
    wait_for_socket(&mut child, &socket, &config).await?;
    Ok(EmbeddedHelper {
        socket,
        audit_log,
        _child: child,
    })
}

/// The demo's lanes: their allowlist, the argv template of the demo lane program, and the
/// lanes' work directory.
struct DemoLanes {
    allowlist: PathBuf,
    argv: String,
    work_dir: String,
}

/// Written into `dir`: the demo allowlist, and (as root, for `nobody`) a copy of the demo lane
/// program and a work directory `nobody` owns.
fn demo_lanes(dir: &Path) -> Result<DemoLanes, String> {
    let root = nix::unistd::geteuid().is_root();
    let lane = sibling("dispatch-demo-lane", "DISPATCH_DEMO_LANE_BIN")?;
    let lane = if root {
        // nobody cannot traverse most install locations (e.g. /root/.cargo/bin).
        let copy = dir.join("dispatch-demo-lane");
        std::fs::copy(&lane, &copy).map_err(|e| format!("copy the demo lane: {e}"))?;
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| e.to_string())?;
        copy
    } else {
        lane
    };
    let unix_user = if root {
        r#", "unix_user": "nobody""#
    } else {
        ""
    };
    let allowlist = dir.join("repos.json");
    write(
        &allowlist,
        &format!(
            r#"{{"orgs": {{"{DEMO_ORGUSER}": {{"note": "demo org"{unix_user}}}}},
  "repos": {{"{DEMO_REPO}": {{"org": "{DEMO_ORGUSER}", "github": "dispatch-mcp/demo-repo"}},
            "hello-world": {{"org": "{DEMO_ORGUSER}", "github": "dispatch-mcp/hello-world"}}}}}}
"#
        ),
    )?;
    let work = dir.join("work");
    std::fs::create_dir_all(&work).map_err(|e| format!("create {}: {e}", work.display()))?;
    if root && let Ok(Some(nobody)) = nix::unistd::User::from_name("nobody") {
        nix::unistd::chown(&work, Some(nobody.uid), Some(nobody.gid)).map_err(|e| e.to_string())?;
    }
    let lane = toml_string(&lane.display().to_string());
    let argv = format!(
        r#"[{lane}, "{{orguser}}", "{{repo}}", "{{task}}", "--host", "{{host}}", "--max", "{{max_iterations}}"]"#
    );
    Ok(DemoLanes {
        allowlist,
        argv,
        work_dir: work.display().to_string(),
    })
}

/// The embedded helper's configuration.
fn config_text(dir: &Path, lanes: &DemoLanes, socket: &Path, audit_log: &Path) -> String {
    let search_path =
        std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into());
    format!(
        "# Written by dispatch-mcp for its embedded helper.\nallowlist = {}\nargv = {}\nsearch_path = {}\n\
         state_dir = {}\naudit_log = {}\nsocket = {}\nsocket_mode = 0o600\nwork_dir = {}\n\
         # No delegated cgroup here: lanes are contained by their process group and the\n\
         # helper as subreaper (each job's sandbox report says so).\n\
         [sandbox]\nallow_uncontained = true\n",
        toml_string(&lanes.allowlist.display().to_string()),
        lanes.argv,
        toml_string(&search_path),
        toml_string(&dir.join("state").display().to_string()),
        toml_string(&audit_log.display().to_string()),
        toml_string(&socket.display().to_string()),
        toml_string(&lanes.work_dir),
    )
}

/// Until the helper's socket exists, it exits, or 15 s have passed.
async fn wait_for_socket(
    child: &mut tokio::process::Child,
    socket: &Path,
    config: &Path,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        // Bound means listening (bind and listen are one step there); a probe connection
        // would be audited as a client that said nothing.
        if std::fs::symlink_metadata(socket).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "the embedded helper exited with {status} (its error is above); config {}",
                config.display()
            ));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the embedded helper did not open {} in time",
                socket.display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
