//! Crate-level proof of the spawn sequence: a sandboxed lane runs as the target user with
//! no_new_privs, seccomp and Landlock in force, and a forbidden write fails. The full escape
//! suite runs through the real helper in the workspace's tests/escape.rs.

use dispatch_sandbox::cgroup::{CgroupSetting, cgroup2_mount};
use dispatch_sandbox::{
    Containment, LanePlan, LaneSpawner, SandboxPolicy, prepare, resolve_identity,
};
use std::io::Read;
use std::process::Command;

const USER: &str = "dispatch-t-alice";

fn ensure_user(name: &str) -> bool {
    if !nix::unistd::geteuid().is_root() {
        // Not eprintln!: the harness would swallow it for a passing test.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr().lock(),
            "*** SKIPPED: not root; the uid drop cannot be exercised ***"
        );
        return false;
    }
    if nix::unistd::User::from_name(name).unwrap().is_none() {
        let status = Command::new("useradd")
            .args(["--create-home", "--shell", "/bin/sh", "--user-group", name])
            .status()
            .expect("useradd");
        // Another test may have created it concurrently.
        assert!(status.success() || nix::unistd::User::from_name(name).unwrap().is_some());
    }
    true
}

/// A cgroup tree of this test's own under the cgroup v2 mount, removed when dropped.
struct TestCgroup(std::path::PathBuf);

impl TestCgroup {
    fn new(name: &str) -> Option<TestCgroup> {
        let mount = cgroup2_mount()?;
        Some(TestCgroup(mount.join(format!(
            "dispatch-sandbox-test-{}-{name}",
            std::process::id()
        ))))
    }

    fn containment(&self) -> Containment {
        Containment::establish(&CgroupSetting::Path(self.0.clone())).unwrap()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // The spare lane cgroups the spawner kept ready, then the tree.
        std::thread::sleep(std::time::Duration::from_millis(100));
        for spare in std::fs::read_dir(self.0.join("lanes"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let _ = std::fs::remove_dir(spare.path());
        }
        let _ = std::fs::remove_dir(self.0.join("lanes"));
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn run(script: &str) -> (i32, String, String) {
    let (end, out, err) = run_contained(script, Containment::none("this test"));
    (end.status.code().unwrap_or(-1), out, err)
}

fn run_contained(
    script: &str,
    containment: Containment,
) -> (dispatch_sandbox::LaneEnd, String, String) {
    run_contained_with(script, containment, &SandboxPolicy::default())
}

fn run_contained_with(
    script: &str,
    containment: Containment,
    policy: &SandboxPolicy,
) -> (dispatch_sandbox::LaneEnd, String, String) {
    run_reloaded(script, containment, policy, policy)
}

/// `argv` as a lane of the test user, in a work directory of its own (there while the returned
/// directory is kept).
fn plan_in_own_dir(argv: Vec<String>) -> (tempfile::TempDir, LanePlan) {
    let identity = resolve_identity(USER).unwrap();
    let work = tempfile::tempdir().unwrap();
    nix::unistd::chown(
        work.path(),
        Some(identity.uid.into()),
        Some(identity.gid.into()),
    )
    .unwrap();
    let plan = LanePlan {
        identity,
        argv,
        work_dir: work.path().to_owned(),
        make_work_dir: false,
        passed_env: Vec::new(),
        exec_paths: Vec::new(),
        change_uid: true,
    };
    (work, plan)
}

/// `script` as a lane prepared under `policy`, spawned by threads that started under
/// `spawner_policy` (as after a reload).
fn run_reloaded(
    script: &str,
    containment: Containment,
    policy: &SandboxPolicy,
    spawner_policy: &SandboxPolicy,
) -> (dispatch_sandbox::LaneEnd, String, String) {
    let (_work, plan) = plan_in_own_dir(vec!["/bin/sh".into(), "-c".into(), script.into()]);
    run_prepared(plan, containment, policy, spawner_policy)
}

/// Spawn `plan` prepared under `policy` from a spawner whose threads started under
/// `spawner_policy` (they differ after a reload).
fn run_prepared(
    plan: LanePlan,
    containment: Containment,
    policy: &SandboxPolicy,
    spawner_policy: &SandboxPolicy,
) -> (dispatch_sandbox::LaneEnd, String, String) {
    let prepared = prepare(plan, policy).unwrap();
    let spawner_sandbox = dispatch_sandbox::Sandbox::new(spawner_policy.clone()).unwrap();
    let spawner = LaneSpawner::start(1, containment, &spawner_sandbox).unwrap();
    let mut lane = spawner.spawn(prepared).unwrap();
    let mut out = String::new();
    let mut err = String::new();
    lane.stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    lane.stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let end = lane.wait().unwrap();
    (end, out, err)
}

#[test]
fn a_descendant_that_leaves_the_lanes_group_dies_with_the_lane() {
    if !ensure_user(USER) {
        return;
    }
    let Some(cgroup) = TestCgroup::new("escape") else {
        panic!("no cgroup v2 hierarchy is mounted");
    };
    let marker = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        marker.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    // A double-forked child in a new session (out of the lane's group), with its output
    // detached so the lane's pipes close: it writes its pid, then lives on.
    let pid_file = marker.path().join("pid");
    let script = format!(
        "setsid sh -c 'echo $$ > {}; exec sleep 300' </dev/null >/dev/null 2>&1 & sleep 0.3",
        pid_file.display()
    );
    let mut policy = SandboxPolicy::default();
    policy.read_write_paths.push(marker.path().to_owned());
    let (end, _out, err) = run_contained_with(&script, cgroup.containment(), &policy);
    assert!(end.status.success(), "{err}");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Its stat is gone or it is a zombie awaiting its reaper: not running.
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit(") ")
                .next()
                .map(|rest| rest.chars().next().unwrap())
        });
    assert!(
        matches!(state, None | Some('Z')),
        "BREACH: the setsid descendant {pid} outlived its lane (state {state:?})"
    );
    assert!(end.usage.cpu_user_ms + end.usage.cpu_system_ms < 10_000);
}

#[test]
fn lane_runs_as_the_user_with_every_layer_on() {
    if !ensure_user(USER) {
        return;
    }
    let (code, out, err) = run("id -u; grep -E '^(NoNewPrivs|Seccomp|CapEff):' /proc/self/status");
    assert_eq!(code, 0, "stderr: {err}");
    let uid = nix::unistd::User::from_name(USER)
        .unwrap()
        .unwrap()
        .uid
        .as_raw();
    assert!(out.starts_with(&format!("{uid}\n")), "{out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    assert!(out.contains("Seccomp:\t2"), "{out}");
    assert!(out.contains("CapEff:\t0000000000000000"), "{out}");
}

#[test]
fn a_lane_starts_with_no_signal_blocked_or_ignored_whatever_its_helper_ignores() {
    if !ensure_user(USER) {
        return;
    }
    // Ignored signals survive exec: the helper's must be put back to the default in the
    // child, which reads them from its status. This process, as the helper, ignores SIGPIPE
    // (the Rust runtime does), so there is one to put back.
    let own = std::fs::read_to_string("/proc/self/status").unwrap();
    let ignored = own
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:\t"))
        .unwrap();
    let ignored = u64::from_str_radix(ignored, 16).unwrap();
    assert_ne!(
        ignored & (1 << (libc::SIGPIPE - 1)),
        0,
        "SigIgn {ignored:#x}"
    );
    let (_work, plan) = plan_in_own_dir(vec!["/bin/cat".into(), "/proc/self/status".into()]);
    let policy = SandboxPolicy::default();
    let (end, out, err) = run_prepared(plan, Containment::none("this test"), &policy, &policy);
    assert_eq!(end.status.code(), Some(0), "stderr: {err}");
    for line in ["SigBlk:\t0000000000000000", "SigIgn:\t0000000000000000"] {
        assert!(out.lines().any(|l| l == line), "no {line:?} in:\n{out}");
    }
}

#[test]
fn a_lane_runs_under_its_own_seccomp_policy_even_after_a_reload() {
    if !ensure_user(USER) {
        return;
    }
    let script = "python3 -c 'import socket; socket.socket(socket.AF_UNIX); print(\"made\")'";
    let strict = SandboxPolicy::default();
    let lenient = SandboxPolicy {
        allow_unix_sockets: true,
        ..SandboxPolicy::default()
    };
    // Threads started under the same policy: the inherited filter is the lane's.
    let (end, out, _) = run_reloaded(script, Containment::none("test"), &strict, &strict);
    assert!(
        !end.status.success() && !out.contains("made"),
        "BREACH: {out}"
    );
    let (end, out, err) = run_reloaded(script, Containment::none("test"), &lenient, &lenient);
    assert!(end.status.success() && out.contains("made"), "{out} {err}");
    // A reload to a stricter policy holds at once: the lane adds its own programs.
    let (end, out, _) = run_reloaded(script, Containment::none("test"), &strict, &lenient);
    assert!(
        !end.status.success() && !out.contains("made"),
        "BREACH after a reload: {out}"
    );
    // One to a more lenient policy holds from the next restart: the lane runs under both.
    let (end, out, _) = run_reloaded(script, Containment::none("test"), &lenient, &strict);
    assert!(!end.status.success(), "{out}");
}

#[test]
fn a_granted_etc_file_replaced_by_rename_stays_readable_and_a_new_one_becomes_so() {
    if !ensure_user(USER) {
        return;
    }
    let etc = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        etc.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let passwd = etc.path().join("passwd");
    let later = etc.path().join("gitconfig");
    std::fs::write(&passwd, "first\n").unwrap();
    let policy = SandboxPolicy {
        read_paths_if_present: vec![passwd.clone(), later.clone()],
        ..SandboxPolicy::default()
    };
    // One sandbox for every lane, as the helper holds it.
    let sandbox = dispatch_sandbox::Sandbox::new(policy).unwrap();
    let spawner = LaneSpawner::start(1, Containment::none("test"), &sandbox).unwrap();
    let identity = resolve_identity(USER).unwrap();
    let work = tempfile::tempdir().unwrap();
    nix::unistd::chown(
        work.path(),
        Some(identity.uid.into()),
        Some(identity.gid.into()),
    )
    .unwrap();
    let run = |script: String| {
        let plan = LanePlan {
            identity: identity.clone(),
            argv: vec!["/bin/sh".into(), "-c".into(), script],
            work_dir: work.path().to_owned(),
            make_work_dir: false,
            passed_env: Vec::new(),
            exec_paths: Vec::new(),
            change_uid: true,
        };
        let mut lane = spawner.spawn(sandbox.prepare(plan).unwrap()).unwrap();
        let mut out = String::new();
        lane.stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        (lane.wait().unwrap().status.success(), out)
    };
    let cat = format!("cat {} {}", passwd.display(), later.display());
    let (_, out) = run(cat.clone());
    assert_eq!(out, "first\n", "only the file that exists is granted");
    // Replaced by rename (as useradd does), and the other one created.
    let fresh = etc.path().join("passwd.new");
    std::fs::write(&fresh, "second\n").unwrap();
    std::fs::rename(&fresh, &passwd).unwrap();
    std::fs::write(&later, "[user]\n").unwrap();
    for path in [&passwd, &later] {
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
    }
    let (ok, out) = run(cat);
    assert!(ok && out == "second\n[user]\n", "{out:?}");
}

#[test]
fn write_outside_the_work_dir_is_denied_by_landlock() {
    if !ensure_user(USER) {
        return;
    }
    let home = resolve_identity(USER).unwrap().home;
    // The user owns their home, so only Landlock can stop this write.
    let target = home.join("landlock-probe");
    let _ = std::fs::remove_file(&target);
    let (code, _out, err) = run(&format!("echo breach > {}", target.display()));
    assert_ne!(code, 0, "writing into the home must fail under Landlock");
    assert!(
        !target.exists(),
        "file was created: a breach (stderr {err})"
    );
}

#[test]
fn work_dir_must_exist() {
    if !ensure_user(USER) {
        return;
    }
    let plan = LanePlan {
        identity: resolve_identity(USER).unwrap(),
        argv: vec!["/bin/true".into()],
        work_dir: "/nonexistent/work".into(),
        make_work_dir: false,
        passed_env: Vec::new(),
        exec_paths: Vec::new(),
        change_uid: true,
    };
    let err = prepare(plan, &SandboxPolicy::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("lane work directory /nonexistent/work"),
        "{err}"
    );
}

#[test]
fn work_dir_must_be_the_lane_users_own_real_directory() {
    if !ensure_user(USER) {
        return;
    }
    let identity = resolve_identity(USER).unwrap();
    let root_owned = tempfile::tempdir().unwrap();
    let plan = |work_dir: &std::path::Path| LanePlan {
        identity: identity.clone(),
        argv: vec!["/bin/true".into()],
        work_dir: work_dir.to_owned(),
        make_work_dir: false,
        passed_env: Vec::new(),
        exec_paths: Vec::new(),
        change_uid: true,
    };
    let err = prepare(plan(root_owned.path()), &SandboxPolicy::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("is owned by uid 0, not by the lane user"),
        "{err}"
    );
    let link = root_owned.path().join("link");
    std::os::unix::fs::symlink("/tmp", &link).unwrap();
    let err = prepare(plan(&link), &SandboxPolicy::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("is a symbolic link"), "{err}");
}

#[test]
fn missing_landlock_path_is_an_error_not_a_skip() {
    if !ensure_user(USER) {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let identity = resolve_identity(USER).unwrap();
    nix::unistd::chown(
        work.path(),
        Some(identity.uid.into()),
        Some(identity.gid.into()),
    )
    .unwrap();
    let plan = LanePlan {
        identity,
        argv: vec!["/bin/true".into()],
        work_dir: work.path().to_owned(),
        make_work_dir: false,
        passed_env: Vec::new(),
        exec_paths: Vec::new(),
        change_uid: true,
    };
    let policy = SandboxPolicy {
        read_paths: vec!["/nonexistent/read".into()],
        ..SandboxPolicy::default()
    };
    // Refused when the policy is loaded, not at the first dispatch.
    let at_load = dispatch_sandbox::Sandbox::new(policy.clone())
        .unwrap_err()
        .to_string();
    assert!(
        at_load.contains("read path /nonexistent/read cannot be opened"),
        "{at_load}"
    );
    let err = prepare(plan, &policy).err().unwrap().to_string();
    assert!(
        err.contains("read path /nonexistent/read cannot be opened"),
        "{err}"
    );
}

#[test]
fn root_is_never_a_lane_user() {
    let err = resolve_identity("root").unwrap_err().to_string();
    assert!(err.contains("refusing to run a lane as uid 0"), "{err}");
}

/// This process's children still running as spawner threads (a lane before its exec keeps
/// the name of the thread that cloned it), with the `Uid:` line of each.
fn held_children() -> Vec<(i32, String)> {
    let mut found = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for pid in children
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim().to_owned())
                    .unwrap_or_default()
            };
            if field("Name:").starts_with("lane-spawner") {
                found.push((pid, field("Uid:")));
            }
        }
    }
    found
}

/// A lane whose plan makes `dir/job` and writes `ran` there: what shows whether it ran.
fn marking_plan(dir: &std::path::Path) -> LanePlan {
    let identity = resolve_identity(USER).unwrap();
    nix::unistd::chown(dir, Some(identity.uid.into()), Some(identity.gid.into())).unwrap();
    LanePlan {
        identity,
        argv: vec!["/bin/sh".into(), "-c".into(), "echo ran > ran".into()],
        work_dir: dir.join("job"),
        make_work_dir: true,
        passed_env: Vec::new(),
        exec_paths: Vec::new(),
        change_uid: true,
    }
}

/// `marking_plan(work)` handed to `spawner`, held at its gate: the gate, and where the spawn's
/// outcome arrives.
fn spawn_held(
    sandbox: &dispatch_sandbox::Sandbox,
    spawner: &LaneSpawner,
    work: &std::path::Path,
) -> (
    dispatch_sandbox::LaneGate,
    std::sync::mpsc::Receiver<
        Result<dispatch_sandbox::SpawnedLane, dispatch_sandbox::SandboxError>,
    >,
) {
    let mut prepared = sandbox.prepare(marking_plan(work)).unwrap();
    let gate = prepared.hold_before_exec().unwrap();
    let (reply, answer) = std::sync::mpsc::channel();
    spawner.spawn_then(prepared, move |outcome| {
        let _ = reply.send(outcome);
    });
    (gate, answer)
}

/// The tests that hold a lane, one at a time: each looks for the one held lane of this process.
static HOLDING_A_LANE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// What a test that holds a lane starts from, its turn taken: a spawner of one thread, so that a
/// lane that kept it waiting would keep every later one from starting. None without the test
/// user (`ensure_user` says so).
fn one_thread_spawner() -> Option<(
    std::sync::MutexGuard<'static, ()>,
    dispatch_sandbox::Sandbox,
    LaneSpawner,
)> {
    if !ensure_user(USER) {
        return None;
    }
    let turn = HOLDING_A_LANE.lock().unwrap_or_else(|p| p.into_inner());
    let sandbox = dispatch_sandbox::Sandbox::new(SandboxPolicy::default()).unwrap();
    let spawner = LaneSpawner::start(1, Containment::none("this test"), &sandbox).unwrap();
    Some((turn, sandbox, spawner))
}

/// The one lane of this process still before its exec a while later, with its `Uid:` line.
/// Tests run side by side: another test's lane may be between its clone and its exec for a
/// moment; only a held one is still there.
fn the_held_child() -> (i32, String) {
    let first = held_children();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let held: Vec<_> = held_children()
        .into_iter()
        .filter(|child| first.contains(child))
        .collect();
    assert_eq!(held.len(), 1, "one held lane: {held:?}");
    held.into_iter().next().unwrap()
}

#[test]
fn a_held_lane_runs_nothing_until_its_gate_opens_and_never_if_it_is_dropped() {
    use std::time::Duration;
    let Some((_turn, sandbox, spawner)) = one_thread_spawner() else {
        return;
    };

    // Opened: cloned and waiting, as root, having made nothing, until the go.
    let work = tempfile::tempdir().unwrap();
    let (gate, answer) = spawn_held(&sandbox, &spawner, work.path());
    let held = answer.recv_timeout(Duration::from_millis(500));
    assert!(
        held.is_err(),
        "the spawn was answered before the gate opened"
    );
    assert!(
        !work.path().join("job").exists(),
        "the lane made its directory before its gate opened: a breach"
    );
    // It waits as root: its user cannot stop it there (and so keep the spawner thread waiting).
    let (pid, uids) = the_held_child();
    assert_eq!(
        uids, "0\t0\t0\t0",
        "the held lane is not root while it waits"
    );
    let identity = resolve_identity(USER).unwrap();
    let stop = {
        use std::os::unix::process::CommandExt;
        Command::new("kill")
            .args(["-STOP", &pid.to_string()])
            .uid(identity.uid)
            .gid(identity.gid)
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
    };
    assert!(
        !stop.success(),
        "the lane's user stopped the held lane: a breach"
    );
    gate.open().unwrap();
    let lane = answer
        .recv()
        .unwrap()
        .expect("an opened gate lets the lane exec");
    assert!(lane.wait().unwrap().status.success());
    assert!(
        work.path().join("job/ran").exists(),
        "the lane did not run once let go"
    );

    // Dropped: the spawn fails at the gate, and nothing ran.
    let work = tempfile::tempdir().unwrap();
    let (gate, answer) = spawn_held(&sandbox, &spawner, work.path());
    std::thread::sleep(Duration::from_millis(100));
    drop(gate);
    match answer.recv().unwrap() {
        Err(error) => assert!(error.to_string().contains("go-ahead"), "{error}"),
        Ok(_) => panic!("a lane whose gate was dropped was started: a breach"),
    }
    assert!(
        !work.path().join("job/ran").exists(),
        "a refused lane ran: a breach"
    );
}

#[test]
fn a_lane_stopped_before_its_exec_is_killed_and_its_spawner_thread_goes_on() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    use std::sync::mpsc;
    use std::time::Duration;
    let Some((_turn, sandbox, spawner)) = one_thread_spawner() else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let (gate, answer) = spawn_held(&sandbox, &spawner, work.path());
    // Stopped while it waits: the one place a test can stop a lane before its exec at will. Its
    // user can stop it between its uid change and its exec, a fraction of a millisecond later;
    // what the spawner does about a stopped lane is the same wherever it stopped.
    std::thread::sleep(Duration::from_millis(300));
    let pid = Pid::from_raw(the_held_child().0);
    kill(pid, Signal::SIGSTOP).unwrap();
    // Told to go on (it may be dead by now, and the gate's pipe closed: that is no error here).
    let _ = gate.open();
    match answer.recv_timeout(Duration::from_secs(5)) {
        Ok(Err(error)) => assert!(
            error
                .to_string()
                .contains("stopped (SIGSTOP) before its exec"),
            "{error}"
        ),
        Ok(Ok(_)) => panic!("a lane stopped before its exec was started"),
        Err(_) => {
            // Still this spawn's child: nothing reaps it while its spawner thread waits.
            let _ = kill(pid, Signal::SIGKILL);
            panic!("a stopped lane kept its spawner thread waiting: a breach");
        }
    }
    assert!(
        !work.path().join("job/ran").exists(),
        "the stopped lane ran: a breach"
    );
    // The spawner thread is free: the next lane starts and runs.
    let next = tempfile::tempdir().unwrap();
    let (reply, answer) = mpsc::channel();
    spawner.spawn_then(
        sandbox.prepare(marking_plan(next.path())).unwrap(),
        move |outcome| {
            let _ = reply.send(outcome);
        },
    );
    let lane = answer
        .recv_timeout(Duration::from_secs(5))
        .expect("the spawner thread is still waiting")
        .expect("the next lane starts");
    assert!(lane.wait().unwrap().status.success());
    assert!(next.path().join("job/ran").exists());
}

#[test]
fn a_lane_ended_from_outside_before_its_exec_says_how_it_ended() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    use std::time::Duration;
    let Some((_turn, sandbox, spawner)) = one_thread_spawner() else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let (gate, answer) = spawn_held(&sandbox, &spawner, work.path());
    std::thread::sleep(Duration::from_millis(300));
    // Blocked until the lane's last step before its exec, then delivered: it ends there.
    kill(Pid::from_raw(the_held_child().0), Signal::SIGTERM).unwrap();
    gate.open().unwrap();
    match answer.recv_timeout(Duration::from_secs(5)) {
        Ok(Err(error)) => {
            let said = error.to_string();
            assert!(said.contains("ended before its exec"), "{said}");
            assert!(said.contains("SIGTERM"), "the cause is not named: {said}");
        }
        Ok(Ok(_)) => panic!("a lane ended before its exec was started"),
        Err(_) => panic!("no answer"),
    }
    assert!(
        !work.path().join("job/ran").exists(),
        "the lane ran: a breach"
    );
}
