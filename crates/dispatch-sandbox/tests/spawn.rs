//! Crate-level proof of the spawn sequence: a sandboxed lane runs as the target user with
//! no_new_privs, seccomp and Landlock in force, and a forbidden write fails. The full escape
//! suite runs through the real helper in the workspace's tests/escape.rs.

use dispatch_sandbox::{LanePlan, LaneSpawner, SandboxPolicy, prepare, resolve_identity};
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

fn run(script: &str) -> (i32, String, String) {
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
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        work_dir: work.path().to_owned(),
        change_uid: true,
    };
    let prepared = prepare(plan, &SandboxPolicy::default()).unwrap();
    let spawner = LaneSpawner::start(1).unwrap();
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
    let status = lane.wait().unwrap();
    (status.code().unwrap_or(-1), out, err)
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
