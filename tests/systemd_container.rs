//! The deployment under a real systemd: a container booted with `systemd-nspawn` over this
//! machine's own /usr (systemd as its PID 1), the project installed there with its own
//! `systemd/install.sh` as the README says, and the real front driven by a real MCP client as a
//! member of `dispatch` (`tests/systemd-container/inside.sh` lists every check). Root only;
//! outside CI a missing prerequisite skips loudly, under `CI=true` it fails.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use support::*;

/// Checks the container run must report, each as `CHECK <name> PASS`.
const REQUIRED: [&str; 43] = [
    "helper_check",
    "socket",
    "dispatch_as_orguser_sandboxed",
    "dispatch_in_its_own_cgroup",
    "dispatch_reports_usage",
    "config_root_only",
    "lane_cannot_read_helper.toml",
    "lane_cannot_read_repos.json",
    "lane_cannot_read_audit.jsonl",
    "eve_socket_denied",
    "bob_not_admitted",
    "bob_audited",
    "proc_other_lane_hidden",
    "proc_visible_without_protectproc",
    "escape-setsid_gone_with_its_lane",
    "escape-setpgid_gone_with_its_lane",
    "escape-setsid_gone_when_cancelled",
    "escape-setpgid_gone_when_cancelled",
    "escape-setsid_gone_when_timed_out",
    "reload_bad_config_kept",
    "reload_still_serves",
    "restart_job_final",
    "restart_no_lane_left",
    "kill9_escaped_descendant_gone",
    "kill9_job_lost",
    "kill9_nothing_left",
    "stop_kills_lanes",
    "stop_job_final",
    "escape_probe_denied_under_the_unit",
    "journal_has_helper_logs",
    "journal_has_containment",
    "lanes_watched_on_pidfds",
    "open_file_limit_raised",
    "job_dir_made_by_its_lane",
    "job_dir_removed_with_its_record",
    "personal_socket_listening",
    "personal_helper_socket_activated",
    "personal_lane_outlives_front",
    "personal_result_from_a_new_front",
    "personal_idle_exit",
    "personal_restarted_on_demand_with_its_jobs",
    "personal_audit_intact",
    "security_exposure_at_most_2",
];

fn prerequisite_missing(why: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("the real-systemd test cannot run: {why} (.ci/setup installs it)");
    }
    skip("deployment under a real systemd", why);
}

#[test]
fn the_installed_units_run_lanes_under_a_real_systemd() {
    if !is_root() {
        return prerequisite_missing("needs root to boot a container");
    }
    if Command::new("systemd-nspawn")
        .arg("--version")
        .output()
        .is_err()
    {
        return prerequisite_missing("systemd-nspawn is not installed (package systemd-container)");
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let scripts = repo.join("tests/systemd-container");
    let bins = Path::new(helper_bin()).parent().unwrap();
    let state = tempfile::tempdir().unwrap();
    let output = Command::new("sh")
        .arg(scripts.join("run.sh"))
        .env("WORK", &scripts)
        .env("STATE", state.path())
        .env("SRC", &repo)
        .env("BINS", bins)
        .env("RUN_TIMEOUT", "240")
        .output()
        .expect("run.sh runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Shown in full on failure; the TIME lines are the figures for the run.
    println!("{stdout}");
    let failed: Vec<&str> = stdout.lines().filter(|l| l.contains(" FAIL ")).collect();
    let missing: Vec<&str> = REQUIRED
        .iter()
        .filter(|name| {
            !stdout
                .lines()
                .any(|l| l.starts_with(&format!("CHECK {name} PASS")))
        })
        .copied()
        .collect();
    assert!(
        output.status.success() && failed.is_empty() && missing.is_empty(),
        "the deployment under a real systemd failed (exit {:?}):\nfailed: {failed:#?}\nmissing: {missing:#?}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        output.status.code()
    );
}
