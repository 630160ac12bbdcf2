//! `dispatch-mcp demo` runs to completion on this machine as root and as an ordinary user, and
//! leaves an audit log whose hash chain verifies.

mod support;

use std::os::unix::process::CommandExt;
use std::process::Command;
use support::*;

fn check_demo(output: std::process::Output, who: &str) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "demo as {who} failed:\n{stdout}\n{stderr}"
    );
    for expected in [
        "tools: dispatch_cancel, dispatch_delete, dispatch_lanes, dispatch_list, dispatch_result, dispatch_status, dispatch_unit",
        "demo/demo-repo",
        "status \"succeeded\"  returncode 0",
        "task (one argv element, 78 chars): Say hello from the sandbox. Shell syntax stays data: $(rm -rf /) `id` ; --help",
        "NoNewPrivs 1  Seccomp 2",
        "writing outside the work dir (/tmp): denied",
        "isError true: unknown repo \"not-allowlisted\"",
        "demo completed.",
    ] {
        assert!(
            stdout.contains(expected),
            "demo as {who}: missing {expected:?} in\n{stdout}"
        );
    }
    let audit = stdout
        .lines()
        .find_map(|l| l.strip_prefix("audit log: "))
        .expect("the demo names its audit log");
    assert_audit_log_verifies(audit);
    // The demo keeps its directory for the user to inspect; a test run need not.
    let _ = std::fs::remove_dir_all(std::path::Path::new(audit).parent().unwrap());
}

#[test]
fn the_demo_runs_as_root() {
    if !is_root() {
        return skip("demo as root", "not running as root");
    }
    let output = Command::new(front_bin())
        .arg("demo")
        .env_remove("DISPATCH_REPOS_JSON")
        .output()
        .unwrap();
    check_demo(output, "root");
}

#[test]
fn the_demo_runs_as_an_ordinary_user() {
    if !is_root() {
        // Not root: this test process is itself an ordinary user.
        let output = Command::new(front_bin())
            .arg("demo")
            .env_remove("DISPATCH_REPOS_JSON")
            .output()
            .unwrap();
        return check_demo(output, "the current user");
    }
    ensure_users();
    let alice = user(ALICE);
    let output = Command::new(front_bin())
        .arg("demo")
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", &alice.dir)
        .current_dir("/")
        .uid(alice.uid.as_raw())
        .gid(alice.gid.as_raw())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(stdout.contains("unprivileged mode"), "{stdout}");
    assert!(stdout.contains(&format!("runs as {ALICE}")), "{stdout}");
    check_demo(output, ALICE);
}
