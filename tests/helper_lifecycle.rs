//! Job lifecycle through the real helper and real sandboxed lanes: succeeded, failed,
//! timed_out, cancelled, lost; delete rules; bounded output; result wait; fail-closed audit;
//! audit verification; reload; strict modes.

mod support;

use dispatch_proto::*;
use std::process::Command;
use std::time::Duration;
use support::*;

/// Pids of processes whose command line contains `marker` (lanes carry their task in argv).
fn processes_with(marker: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|raw| String::from_utf8_lossy(&raw).contains(marker))
                .unwrap_or(false)
        })
        .filter(|pid| alive(*pid))
        .collect()
}

/// `dispatch-helper check` must refuse `config`, saying `expected`.
fn check_refuses(config: &std::path::Path, expected: &str) {
    let output = Command::new(helper_bin())
        .args(["check", "--config"])
        .arg(config)
        .output()
        .unwrap();
    assert!(
        !output.status.success(),
        "check accepted {}",
        config.display()
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(expected), "{stderr}");
}

fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    Some(rest.split(' ').map(str::to_owned).collect())
}

fn process_group_of(pid: i32) -> i32 {
    stat_fields(pid).expect("process exists")[2]
        .parse()
        .unwrap()
}

/// Live (non-zombie) processes in a process group.
fn group_members(pgid: i32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| stat_fields(*pid).is_some_and(|f| f[0] != "Z" && f[2] == pgid.to_string()))
        .collect()
}

fn marker(name: &str) -> String {
    format!("{name}-{}-{}", std::process::id(), rand_suffix())
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64
}

#[tokio::test]
async fn succeeded_and_failed_record_exit_code_output_and_enforcement() {
    let Some(helper) = start_helper("succeeded_failed", HelperOptions::default()) else {
        return;
    };
    let mut client = helper.client().await;
    let ok = client
        .dispatch_ok("alice-org", "alice-repo", "exit:0")
        .await;
    assert_eq!(ok.state, JobState::Running);
    assert_eq!(ok.github, "alice/alice-repo");
    let done = client.result(&ok.handle, 20_000).await;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    assert_eq!(done.exit_code, Some(0));
    assert!(
        done.stdout
            .as_ref()
            .unwrap()
            .text
            .contains("lane ran; exiting with 0")
    );
    assert!(done.finished_at.is_some() && done.started_at.is_some());
    let sandbox = done.sandbox.as_ref().unwrap();
    assert_eq!(sandbox.uid, user(ALICE).uid.as_raw());
    assert!(sandbox.seccomp && sandbox.no_new_privs && !sandbox.same_uid);
    assert!(
        sandbox.landlock.starts_with("enforced"),
        "{}",
        sandbox.landlock
    );
    assert_eq!(
        done.argv.as_ref().unwrap()[1..],
        ["lane", "alice-org", "alice-repo", "exit:0"]
    );

    let bad = client.dispatch_ok("bob-org", "bob-repo", "exit:3").await;
    let done = client.result(&bad.handle, 20_000).await;
    assert_eq!(done.state, JobState::Failed);
    assert_eq!(done.exit_code, Some(3));
    assert_eq!(done.detail, "exited with status 3");
    assert!(done.stderr.as_ref().unwrap().text.contains("to stderr"));
    assert_eq!(done.sandbox.as_ref().unwrap().uid, user(BOB).uid.as_raw());

    let events: Vec<String> = helper
        .audit_lines()
        .iter()
        .map(|l| l["event"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        events.iter().filter(|e| *e == "dispatch_accepted").count(),
        2
    );
    assert_eq!(events.iter().filter(|e| *e == "finished").count(), 2);
    let accepted = &helper.audited("dispatch_accepted")[0];
    assert_eq!(accepted["peer"]["uid"], 0);
    assert_eq!(accepted["claimed_client"], "integration-test");
    assert_eq!(
        accepted["claimed_client_note"],
        "claimed by the front, not verified"
    );
    assert_eq!(accepted["task_sha256"].as_str().unwrap().len(), 64);
    assert_eq!(accepted["argv"][4], "exit:0");
}

#[tokio::test]
async fn a_lane_past_its_timeout_is_stopped_as_timed_out() {
    let Some(helper) = start_helper(
        "timed_out",
        HelperOptions {
            timeout_seconds: 1,
            ..Default::default()
        },
    ) else {
        return;
    };
    let mut client = helper.client().await;
    let tag = marker("timeout");
    let job = client
        .dispatch_ok("alice-org", "alice-repo", &format!("sleep-group:60 {tag}"))
        .await;
    let done = client.result(&job.handle, 20_000).await;
    assert_eq!(done.state, JobState::TimedOut, "{done:?}");
    assert!(
        done.detail.starts_with("timed out after 1 s"),
        "{}",
        done.detail
    );
    wait_until(
        "the lane's processes to be gone",
        Duration::from_secs(5),
        || processes_with(&tag).is_empty(),
    );
    assert_eq!(helper.audited("timed_out").len(), 1);
}

#[tokio::test]
async fn cancel_kills_the_whole_process_group_and_is_idempotent() {
    let Some(helper) = start_helper("cancel", HelperOptions::default()) else {
        return;
    };
    let mut client = helper.client().await;
    let tag = marker("cancel");
    let job = client
        .dispatch_ok("alice-org", "alice-repo", &format!("sleep-group:60 {tag}"))
        .await;
    // The lane and its own child carry the task in argv; the lane leads their process group.
    wait_until("two lane processes", Duration::from_secs(10), || {
        processes_with(&tag).len() >= 2
    });
    let group = process_group_of(processes_with(&tag)[0]);
    assert!(group_members(group).len() >= 2, "lane + child");
    let cancelled = match client
        .request(Request::Cancel {
            handle: job.handle.clone(),
        })
        .await
    {
        Response::Job(job) => job,
        other => panic!("{other:?}"),
    };
    assert_eq!(cancelled.state, JobState::Cancelled, "{cancelled:?}");
    wait_until(
        "the lane's whole group to be gone",
        Duration::from_secs(5),
        || group_members(group).is_empty(),
    );
    // Cancelling a finished job changes nothing.
    match client
        .request(Request::Cancel {
            handle: job.handle.clone(),
        })
        .await
    {
        Response::Job(again) => assert_eq!(again.state, JobState::Cancelled),
        other => panic!("{other:?}"),
    }
    assert_eq!(helper.audited("cancelled").len(), 1);
    assert_eq!(helper.audited("cancel_requested").len(), 1);
}

#[tokio::test]
async fn delete_removes_only_finished_jobs() {
    let Some(helper) = start_helper("delete", HelperOptions::default()) else {
        return;
    };
    let mut client = helper.client().await;
    let running = client
        .dispatch_ok("alice-org", "alice-repo", "sleep:60")
        .await;
    let error = client
        .error(Request::Delete {
            handle: running.handle.clone(),
        })
        .await;
    assert_eq!(error.kind, ErrorKind::NotTerminal);
    assert!(
        error.message.contains("still running; cancel it first"),
        "{}",
        error.message
    );
    client
        .request(Request::Cancel {
            handle: running.handle.clone(),
        })
        .await;
    match client
        .request(Request::Delete {
            handle: running.handle.clone(),
        })
        .await
    {
        Response::Deleted { handle } => assert_eq!(handle, running.handle),
        other => panic!("{other:?}"),
    }
    let error = client
        .error(Request::Status {
            handle: running.handle.clone(),
            output_from: None,
        })
        .await;
    assert_eq!(error.kind, ErrorKind::UnknownHandle);
    assert!(stored_record(&helper.state, &running.handle).is_none());
    assert_eq!(helper.audited("deleted").len(), 1);
}

#[tokio::test]
async fn output_tails_are_bounded_with_a_visible_marker() {
    let options = HelperOptions {
        extra_toml: "[limits]\noutput_tail_bytes = 4096\n".into(),
        ..Default::default()
    };
    let Some(helper) = start_helper("output_tail", options) else {
        return;
    };
    let mut client = helper.client().await;
    let job = client
        .dispatch_ok("alice-org", "alice-repo", "spam:500000")
        .await;
    let done = client.result(&job.handle, 20_000).await;
    let tail = done.stdout.unwrap();
    assert!(tail.truncated);
    assert_eq!(
        tail.total_bytes,
        500_000 / 64 * 64 + 4,
        "every byte is counted"
    );
    assert!(tail.text.starts_with("[… "), "{}", &tail.text[..60]);
    assert!(
        tail.text
            .contains("earlier bytes truncated; showing the last 4096")
    );
    assert!(tail.text.ends_with("END\n"));
    assert!(tail.text.len() < 4096 + 200);
}

#[tokio::test]
async fn result_waits_for_the_end_and_list_filters_by_glob() {
    let Some(helper) = start_helper("result_wait", HelperOptions::default()) else {
        return;
    };
    let mut client = helper.client().await;
    let job = client
        .dispatch_ok("alice-org", "alice-repo", "sleep:1")
        .await;
    let now = client.result(&job.handle, 0).await;
    assert_eq!(now.state, JobState::Running);
    let started = std::time::Instant::now();
    let done = client.result(&job.handle, 30_000).await;
    assert_eq!(done.state, JobState::Succeeded);
    assert!(started.elapsed() < Duration::from_secs(20));

    client.dispatch_ok("bob-org", "bob-repo", "exit:0").await;
    match client
        .request(Request::List {
            filter: Some("test sleep*".into()),
            detail: true,
            limit: 0,
        })
        .await
    {
        Response::List { total, jobs } => {
            assert_eq!(total, 1);
            assert_eq!(jobs[0].handle, job.handle);
            assert!(jobs[0].argv.is_some(), "detailed list carries argv");
        }
        other => panic!("{other:?}"),
    }
    match client
        .request(Request::List {
            filter: None,
            detail: false,
            limit: 0,
        })
        .await
    {
        Response::List { total, jobs } => {
            assert_eq!(total, 2);
            assert!(jobs.iter().all(|j| j.argv.is_none()));
        }
        other => panic!("{other:?}"),
    }
    let error = client
        .error(Request::List {
            filter: Some("[".into()),
            detail: false,
            limit: 0,
        })
        .await;
    assert!(
        error.message.contains("invalid filter \"[\""),
        "{}",
        error.message
    );
}

#[tokio::test]
async fn a_helper_killed_mid_job_takes_the_lane_down_and_reports_it_lost_after_restart() {
    let Some(mut helper) = start_helper("lost", HelperOptions::default()) else {
        return;
    };
    let tag = marker("lost");
    let handle = {
        let mut client = helper.client().await;
        client
            .dispatch_ok("alice-org", "alice-repo", &format!("sleep-group:60 {tag}"))
            .await
            .handle
    };
    wait_until("two lane processes", Duration::from_secs(10), || {
        processes_with(&tag).len() >= 2
    });
    let group = process_group_of(processes_with(&tag)[0]);
    assert!(group_members(group).len() >= 2, "lane + child");
    helper.kill9();
    // The lane's death signal kills its first process; the reaper kills the rest of the group.
    wait_until(
        "the lane's whole group to die with the helper",
        Duration::from_secs(5),
        || group_members(group).is_empty(),
    );
    helper.launch();
    let mut client = helper.client().await;
    match client
        .request(Request::Status {
            handle: handle.clone(),
            output_from: None,
        })
        .await
    {
        Response::Job(job) => {
            assert_eq!(job.state, JobState::Lost, "{job:?}");
            assert!(job.detail.contains("helper restarted"), "{}", job.detail);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(helper.audited("lost").len(), 1);
}

/// A restart that finds many jobs left running records them lost together: their records and
/// audit records share commits, not two syncs each before the helper serves (which, with a
/// slow disk and a thousand lanes, outlasted systemd's start timeout).
#[tokio::test]
async fn many_jobs_lost_at_once_are_recorded_in_shared_commits() {
    const LANES: usize = 30;
    let options = HelperOptions {
        extra_toml: "[limits]\nmax_running_jobs_per_client = 32\nmax_running_jobs_per_lane = 32\n"
            .into(),
        ..Default::default()
    };
    let Some(mut helper) = start_helper("lost_together", options) else {
        return;
    };
    let mut handles = Vec::new();
    {
        let mut client = helper.client().await;
        for _ in 0..LANES {
            let job = client
                .dispatch_ok("alice-org", "alice-repo", "sleep:60")
                .await;
            assert_eq!(job.state, JobState::Running, "{job:?}");
            handles.push(job.handle);
        }
    }
    helper.kill9();
    helper.launch();
    let mut client = helper.client().await;
    for handle in &handles {
        assert_eq!(client.result(handle, 0).await.state, JobState::Lost);
    }
    drop(client);
    helper.stop();
    assert_eq!(helper.audited("lost").len(), LANES);
    let stopped = helper.audited("helper_stopped");
    let detail = stopped.last().unwrap()["detail"].as_str().unwrap();
    let syncs: usize = detail
        .split(" syncs")
        .next()
        .and_then(|before| before.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no sync count in {detail:?}"));
    println!("{LANES} lost jobs recorded at start; the run made {syncs} syncs in all");
    assert!(
        syncs < LANES,
        "{syncs} syncs for {LANES} lost jobs: they were committed one by one"
    );
    helper.assert_audit_chain_intact();
}

/// The helper's live child named `dispatch-reaper`.
fn reaper_of(helper_pid: i32) -> Option<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .find(|pid| {
            let named = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim_end() == "dispatch-reaper");
            named
                && stat_fields(*pid).is_some_and(|f| f[0] != "Z" && f[1] == helper_pid.to_string())
        })
}

#[tokio::test]
async fn a_killed_reaper_is_replaced_and_the_replacement_knows_every_running_lane() {
    let Some(mut helper) = start_helper("reaper", HelperOptions::default()) else {
        return;
    };
    let mut client = helper.client().await;
    let mut start_lane = async |name: &str| {
        let tag = marker(name);
        client
            .dispatch_ok("alice-org", "alice-repo", &format!("sleep-group:60 {tag}"))
            .await;
        wait_until("two lane processes", Duration::from_secs(10), || {
            processes_with(&tag).len() >= 2
        });
        process_group_of(processes_with(&tag)[0])
    };
    let first_group = start_lane("reaper-a").await;
    let first_reaper = reaper_of(helper.pid()).expect("the helper runs a reaper");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first_reaper),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until("the reaper to die", Duration::from_secs(5), || {
        !alive(first_reaper)
    });
    // The next dispatch finds the reaper gone, starts another, and registers the running lane
    // with it as well as the new one.
    let second_group = start_lane("reaper-b").await;
    let second_reaper = reaper_of(helper.pid()).expect("a replacement reaper");
    assert_ne!(first_reaper, second_reaper);
    assert!(group_members(first_group).len() >= 2 && group_members(second_group).len() >= 2);
    helper.kill9();
    wait_until(
        "both lanes' whole groups to die with the helper",
        Duration::from_secs(5),
        || group_members(first_group).is_empty() && group_members(second_group).is_empty(),
    );
    wait_until("the reaper to exit", Duration::from_secs(5), || {
        !alive(second_reaper)
    });
}

#[tokio::test]
async fn an_unwritable_audit_log_refuses_the_dispatch_and_nothing_runs() {
    let Some(helper) = start_helper("audit_fail_closed", HelperOptions::default()) else {
        return;
    };
    let mut client = helper.client().await;
    // The readiness probe's connection is audited in the background; let that land first.
    wait_until(
        "the readiness probe's record",
        Duration::from_secs(5),
        || !helper.audited("protocol_violation").is_empty(),
    );
    // Root ignores file modes, so make the path impossible to append to: a directory.
    std::fs::rename(&helper.audit, helper.audit.with_extension("moved")).unwrap();
    std::fs::create_dir(&helper.audit).unwrap();
    let tag = marker("failclosed");
    let error = match client
        .dispatch("alice-org", "alice-repo", &format!("sleep:30 {tag}"))
        .await
    {
        Response::Error(error) => error,
        other => panic!("dispatch ran without an audit record: {other:?}"),
    };
    assert_eq!(error.kind, ErrorKind::AuditUnavailable);
    assert!(
        error
            .message
            .contains("the audit log could not be written, so nothing ran"),
        "{}",
        error.message
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        processes_with(&tag).is_empty(),
        "a lane ran without an audit record"
    );
    assert_eq!(client.total(None).await, 0);
    // Its job record, committed only once its acceptance is durable, was never written.
    let journal =
        std::fs::read_to_string(helper.state.join("jobs/journal.jsonl")).unwrap_or_default();
    assert!(
        !journal.contains(&tag),
        "a job record exists for a dispatch whose acceptance was never audited"
    );
    // Its lane was set up while the commit ran, held at its gate, then given up: the job
    // directory it made is gone with it.
    let area = helper.work.path().join(ALICE);
    let left = || std::fs::read_dir(&area).map_or(0, |entries| entries.count());
    wait_until(
        "the directory of the lane given up to be removed",
        Duration::from_secs(5),
        || left() == 0,
    );
}

/// A dispatch of alice's that ran and succeeded.
async fn a_finished_job(client: &mut Client) -> JobView {
    let done = client
        .dispatch_ok("alice-org", "alice-repo", "exit:0")
        .await;
    let done = client.result(&done.handle, 10_000).await;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    done
}

/// A deletion and its `deleted` record are one journal line: one that cannot be audited is not
/// made (it used to be, and the client was told it was deleted).
#[tokio::test]
async fn a_deletion_that_cannot_be_audited_is_refused_and_the_job_stays() {
    let Some(helper) = start_helper("delete_unaudited", HelperOptions::default()) else {
        return;
    };
    let mut client = helper.client().await;
    let done = a_finished_job(&mut client).await;
    // Root ignores file modes, so make the log impossible to append to: a directory.
    std::fs::rename(&helper.audit, helper.audit.with_extension("moved")).unwrap();
    std::fs::create_dir(&helper.audit).unwrap();
    let error = client
        .error(Request::Delete {
            handle: done.handle.clone(),
        })
        .await;
    assert_eq!(error.kind, ErrorKind::Internal, "{error:?}");
    assert!(
        error.message.contains(&done.handle)
            && error.message.contains("was not deleted")
            && error.message.contains("could not be audited"),
        "{}",
        error.message
    );
    // Still listed and still stored, with no removal in the journal.
    let after = client.result(&done.handle, 0).await;
    assert_eq!(after.state, JobState::Succeeded, "{after:?}");
    assert!(stored_record(&helper.state, &done.handle).is_some());
    let journal =
        std::fs::read_to_string(helper.state.join("jobs/journal.jsonl")).unwrap_or_default();
    assert!(
        !journal.contains("\"removed\"") && !journal.contains("\"remove\""),
        "a removal was journaled without its audit record"
    );
}

#[tokio::test]
async fn audit_verify_passes_on_a_real_log_and_names_each_tampering() {
    let Some(helper) = start_helper("audit_verify", HelperOptions::default()) else {
        return;
    };
    let mut client = helper.client().await;
    for task in ["exit:0", "exit:1", "exit:2"] {
        let job = client.dispatch_ok("alice-org", "alice-repo", task).await;
        client.result(&job.handle, 20_000).await;
    }
    let verify = |path: &std::path::Path| {
        let output = Command::new(helper_bin())
            .args(["audit", "verify"])
            .arg(path)
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned()
                + &String::from_utf8_lossy(&output.stderr),
        )
    };
    let (ok, text) = verify(&helper.audit);
    assert!(ok, "{text}");
    assert!(text.contains("hash chain intact"), "{text}");

    let original: Vec<String> = std::fs::read_to_string(&helper.audit)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert!(original.len() >= 7, "{}", original.len());
    let tampered = helper.dir.path().join("tampered.jsonl");
    let edited_at = original
        .iter()
        .position(|l| l.contains("\"exit:1\""))
        .unwrap();
    let edited_message = format!("line {}: the record was edited", edited_at + 1);
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "edited",
            {
                let mut l = original.clone();
                l[edited_at] = l[edited_at].replace("exit:1", "exit:9");
                l
            },
            &edited_message,
        ),
        (
            "removed",
            {
                let mut l = original.clone();
                l.remove(2);
                l
            },
            "line 3: the chain is broken",
        ),
        (
            "reordered",
            {
                let mut l = original.clone();
                l.swap(4, 5);
                l
            },
            "line 5: the chain is broken",
        ),
    ];
    for (what, lines, expected) in cases {
        std::fs::write(&tampered, lines.join("\n") + "\n").unwrap();
        let (ok, text) = verify(&tampered);
        assert!(!ok, "{what}: verify passed on a tampered log");
        assert!(text.contains(expected), "{what}: {text}");
        assert!(!text.contains("crash interrupted"), "{what}: {text}");
    }
    // A last record a crash cut short still fails, saying what it is and what repairs it.
    let last = original.last().unwrap();
    let mut torn = original[..original.len() - 1].join("\n") + "\n";
    torn.push_str(&last[..last.len() / 2]);
    std::fs::write(&tampered, torn).unwrap();
    let (ok, text) = verify(&tampered);
    assert!(!ok, "verify passed on a log whose last record is cut short");
    assert!(
        text.contains(&format!(
            "line {}: not a complete audit record",
            original.len()
        )) && text.contains("a write a crash interrupted"),
        "{text}"
    );
}

/// Ask the helper to reload its configuration.
fn send_sighup(helper: &TestHelper) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(helper.pid()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
}

#[tokio::test]
async fn a_bad_reload_keeps_the_old_config() {
    let Some(helper) = start_helper("reload", HelperOptions::default()) else {
        return;
    };
    let good = std::fs::read_to_string(&helper.config).unwrap();
    std::fs::write(
        &helper.config,
        good.replace("argv = [", "argv = [\"relative/prog\", "),
    )
    .unwrap();
    send_sighup(&helper);
    wait_until(
        "the failed reload to be audited",
        Duration::from_secs(5),
        || !helper.audited("config_reload_failed").is_empty(),
    );
    let failure = &helper.audited("config_reload_failed")[0];
    assert!(
        failure["detail"]
            .as_str()
            .unwrap()
            .contains("relative path"),
        "{failure}"
    );
    let mut client = helper.client().await;
    client
        .runs_to_success("alice-org", "alice-repo", "exit:0")
        .await;
}

#[test]
fn a_group_writable_config_is_refused_at_start_naming_file_and_mode() {
    if !is_root() {
        return skip(
            "strict_modes",
            "strict modes apply only when the helper runs as root",
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("helper.toml");
    std::fs::write(&config, "allowlist = '/nonexistent'\nstate_dir = '/tmp/x'\naudit_log = '/tmp/x/a'\nsocket = '/tmp/x/s'\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o664)).unwrap();
    check_refuses(
        &config,
        "helper.toml is writable by group or others (mode 0664)",
    );
}

/// A copy of the probe as the dispatch program, in a directory of its own (root's, 0755), for
/// tests that change it once the helper has loaded it; and the argv that runs it as a lane.
fn program_copy() -> (tempfile::TempDir, std::path::PathBuf, Vec<String>) {
    use std::os::unix::fs::PermissionsExt;
    let programs = tempfile::tempdir().unwrap();
    std::fs::set_permissions(programs.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let program = programs.path().join("lane-program");
    std::fs::copy(probe_bin(), &program).unwrap();
    let argv = [
        &program.display().to_string(),
        "lane",
        "{orguser}",
        "{repo}",
        "{task}",
    ]
    .map(String::from)
    .to_vec();
    (programs, program, argv)
}

#[tokio::test]
async fn a_lane_that_cannot_start_fails_with_the_step_that_failed() {
    if !is_root() {
        return skip(
            "spawn failure",
            "needs root to create test users and drop to them",
        );
    }
    ensure_users();
    // The dispatch program made non-executable after the helper loaded (and so resolved and
    // checked) it: only the exec itself can fail.
    let (_programs, program, argv) = program_copy();
    use std::os::unix::fs::PermissionsExt;
    let options = HelperOptions {
        argv,
        ..Default::default()
    };
    let helper = TestHelper::start(options);
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut client = helper.client().await;
    let error = match client.dispatch("alice-org", "alice-repo", "exit:0").await {
        Response::Error(error) => error,
        other => panic!("a non-executable program was reported as started: {other:?}"),
    };
    assert_eq!(error.kind, ErrorKind::SpawnFailed);
    assert!(
        error
            .message
            .contains("spawn failed at step 'exec of the dispatch program'"),
        "{}",
        error.message
    );
    assert!(
        error.message.contains("Permission denied"),
        "{}",
        error.message
    );
    // The job exists, failed, with the reason; and both events are audited.
    let handle = error.message.split_whitespace().nth(1).unwrap().to_owned();
    match client.request(Request::status(handle)).await {
        Response::Job(job) => {
            assert_eq!(job.state, JobState::Failed);
            assert!(
                job.detail.contains("exec of the dispatch program"),
                "{}",
                job.detail
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(helper.audited("dispatch_accepted").len(), 1);
    assert_eq!(helper.audited("spawn_failed").len(), 1);
}

/// A lane is prepared (its Landlock rules opened) while its acceptance is being made durable,
/// so a preparation that fails after the checks passed ends an accepted job: failed, named,
/// audited, its slot given back.
#[tokio::test]
async fn a_lane_whose_sandbox_cannot_be_prepared_fails_named_and_frees_its_slot() {
    if !is_root() {
        return skip(
            "preparation failure",
            "needs root to create test users and drop to them",
        );
    }
    ensure_users();
    let (programs, program, argv) = program_copy();
    let options = HelperOptions {
        argv,
        // One slot in all: a slot not given back would leave the next dispatch queued.
        extra_toml: "[limits]\nmax_running_jobs = 1\n".into(),
        ..Default::default()
    };
    let helper = TestHelper::start(options);
    // Gone after the helper loaded (and checked) it: the Landlock rule for it cannot be opened.
    let aside = programs.path().join("aside");
    std::fs::rename(&program, &aside).unwrap();
    let mut client = helper.client().await;
    let error = match client.dispatch("alice-org", "alice-repo", "exit:0").await {
        Response::Error(error) => error,
        other => panic!("a lane without its program was reported as started: {other:?}"),
    };
    assert_eq!(error.kind, ErrorKind::SpawnFailed, "{}", error.message);
    for expected in [
        "sandbox preparation failed",
        "program path",
        "cannot be opened",
    ] {
        assert!(error.message.contains(expected), "{}", error.message);
    }
    let handle = error.message.split_whitespace().nth(1).unwrap().to_owned();
    match client.request(Request::status(handle.clone())).await {
        Response::Job(job) => {
            assert_eq!(job.state, JobState::Failed);
            assert!(job.detail.contains("program path"), "{}", job.detail);
        }
        other => panic!("{other:?}"),
    }
    let stored = stored_record(&helper.state, &handle).expect("the failed job is stored");
    assert_eq!(stored["state"], "Failed", "{stored}");
    let accepted = helper.audited("dispatch_accepted");
    let failed = helper.audited("spawn_failed");
    assert_eq!((accepted.len(), failed.len()), (1, 1));
    assert_eq!(failed[0]["handle"], handle.as_str());
    // Its slot is free again: the next dispatch runs at once rather than waiting.
    std::fs::rename(&aside, &program).unwrap();
    let job = client
        .dispatch_ok("alice-org", "alice-repo", "exit:0")
        .await;
    assert_eq!(job.state, JobState::Running, "{job:?}");
    assert_eq!(
        client.result(&job.handle, 10_000).await.state,
        JobState::Succeeded
    );
}

#[tokio::test]
async fn without_root_lanes_run_as_the_helper_user_and_other_accounts_are_refused() {
    if !is_root() {
        return skip(
            "unprivileged helper",
            "needs root to start the helper as a test user",
        );
    }
    ensure_users();
    let alice = user(ALICE);
    // Everything the unprivileged helper owns lives in a directory of its user's.
    let dir = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let home = dir.path().join("helper");
    std::fs::create_dir(&home).unwrap();
    nix::unistd::chown(&home, Some(alice.uid), Some(alice.gid)).unwrap();
    let allowlist = home.join("repos.json");
    std::fs::write(
        &allowlist,
        r#"{"orgs": {"mine": {}, "theirs": {"unix_user": "dispatch-t-bob"}},
            "repos": {"my-repo": {"org": "mine", "github": "me/my-repo"}, "their-repo": {"org": "theirs", "github": "them/their-repo"}}}"#,
    )
    .unwrap();
    let socket = home.join("helper.sock");
    let config = home.join("helper.toml");
    std::fs::write(
        &config,
        format!(
            "allowlist = {allowlist:?}\nargv = [{:?}, \"lane\", \"{{orguser}}\", \"{{repo}}\", \"{{task}}\"]\n\
             state_dir = {:?}\naudit_log = {:?}\nsocket = {socket:?}\nsocket_mode = 0o666\nwork_dir = \"{{home}}/dispatch-work\"\n\
             [clients]\nusers = [\"root\"]\n",
            probe_bin(),
            home.join("state"),
            home.join("audit.jsonl"),
        ),
    )
    .unwrap();
    for file in [&allowlist, &config] {
        nix::unistd::chown(file, Some(alice.uid), Some(alice.gid)).unwrap();
    }
    use std::os::unix::process::CommandExt;
    /// Kills the helper however the test ends (a leaked helper would hold the test's output open).
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let child = KillOnDrop(
        Command::new(helper_bin())
            .args(["serve", "--config"])
            .arg(&config)
            .uid(alice.uid.as_raw())
            .gid(alice.gid.as_raw())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until("the unprivileged helper", Duration::from_secs(20), || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    });
    let mut client = Client::connect(&socket).await;
    assert!(client.hello.unprivileged);

    let error = match client.dispatch("theirs", "their-repo", "exit:0").await {
        Response::Error(error) => error,
        other => panic!("an org of another account was served without root: {other:?}"),
    };
    assert_eq!(error.kind, ErrorKind::NotPermitted);
    assert!(
        error.message.contains("orguser theirs runs as unix user dispatch-t-bob, but the helper is not running as root and can only run lanes as its own user dispatch-t-alice"),
        "{}",
        error.message
    );
    let job = client.dispatch_ok("mine", "my-repo", "exit:0").await;
    let done = client.result(&job.handle, 20_000).await;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    let sandbox = done.sandbox.unwrap();
    assert!(sandbox.same_uid && sandbox.seccomp && sandbox.landlock.starts_with("enforced"));
    assert_eq!(sandbox.uid, alice.uid.as_raw());
    // Same uid as the helper, yet the lane cannot read the helper's or its reaper's memory image.
    let escape = format!("escape {{\"helper_pid\": {}}}", child.0.id());
    let job = client.dispatch_ok("mine", "my-repo", &escape).await;
    let done = client.result(&job.handle, 20_000).await;
    let stdout = done.stdout.unwrap().text;
    for check in [
        "read_reaper_environ",
        "read_helper_environ",
        "ptrace_traceme",
        "unix_socket",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.contains(&format!("\"check\":\"{check}\"")))
            .unwrap_or_else(|| panic!("no {check} in {stdout}"));
        assert!(
            line.contains("\"succeeded\":false"),
            "BREACH in unprivileged mode: {line}"
        );
    }
    assert!(
        stdout.contains("{\"check\":\"reaper_found\",\"succeeded\":true"),
        "the reaper must have been found for its check to mean anything: {stdout}"
    );
    drop(child);
}

#[tokio::test]
async fn processes_a_lane_leaves_in_its_group_are_killed_when_it_ends() {
    let Some(helper) = start_helper("stragglers", HelperOptions::default()) else {
        return;
    };
    let mut client = helper.client().await;
    let job = client
        .dispatch_ok("alice-org", "alice-repo", "leave-child:60")
        .await;
    let done = client.result(&job.handle, 20_000).await;
    assert_eq!(done.state, JobState::Succeeded);
    let printed: serde_json::Value =
        serde_json::from_str(done.stdout.unwrap().text.trim()).unwrap();
    let left = printed["left_child"].as_i64().unwrap() as i32;
    wait_until(
        "the left-behind child to be killed",
        Duration::from_secs(5),
        || !alive(left),
    );
}

#[tokio::test]
async fn hostile_list_filters_are_refused_and_the_helper_keeps_serving() {
    let Some(helper) = start_helper("hostile filters", HelperOptions::default()) else {
        return;
    };
    let mut client = helper.client().await;
    let deep = format!("{}a{}", "{".repeat(300), "}".repeat(300));
    let nested = "{a,{b,{c,{d,{e,f}}}}}".to_owned();
    for (filter, why) in [
        (deep, "longer than 200 characters"),
        (nested, "nested deeper than 4"),
    ] {
        let error = client
            .error(Request::List {
                filter: Some(filter),
                detail: false,
                limit: 0,
            })
            .await;
        assert_eq!(error.kind, ErrorKind::Invalid);
        assert!(error.message.contains(why), "{}", error.message);
    }
    match client
        .request(Request::List {
            filter: Some("{a,b}*".into()),
            detail: false,
            limit: 0,
        })
        .await
    {
        Response::List { total, .. } => assert_eq!(total, 0),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_dispatch_program_others_can_change_is_refused_at_load() {
    if !is_root() {
        return skip(
            "program strict modes",
            "strict modes apply only when the helper runs as root",
        );
    }
    let dir = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let program = dir.path().join("dispatch-program");
    std::fs::copy(probe_bin(), &program).unwrap();
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o777)).unwrap();
    let allowlist = dir.path().join("repos.json");
    std::fs::write(&allowlist, ALLOWLIST).unwrap();
    let config = dir.path().join("helper.toml");
    std::fs::write(
        &config,
        format!(
            "allowlist = {allowlist:?}\nargv = [{program:?}, \"{{task}}\"]\nstate_dir = '/tmp/x'\naudit_log = '/tmp/x/a'\nsocket = '/tmp/x/s'\n"
        ),
    )
    .unwrap();
    for file in [&allowlist, &config] {
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    check_refuses(
        &config,
        "dispatch-program is writable by group or others (mode 0777)",
    );
}

#[tokio::test]
async fn one_client_cannot_take_every_slot_and_old_records_are_pruned() {
    let options = HelperOptions {
        extra_toml: "[limits]\nmax_running_jobs_per_client = 1\nmax_queued_per_client = 1\nmax_connections_per_client = 2\nmax_finished_jobs_per_client = 2\n".into(),
        ..Default::default()
    };
    let Some(helper) = start_helper("per-client limits", options) else {
        return;
    };
    // Running lanes: one runs, the next waits for its slot, the one after that is refused.
    let mut client = helper.client().await;
    let first = client
        .dispatch_ok("alice-org", "alice-repo", "sleep:30")
        .await;
    let waiting = client
        .dispatch_ok("alice-org", "alice-repo", "sleep:30")
        .await;
    assert_eq!(waiting.state, JobState::Queued, "{waiting:?}");
    let error = client
        .error(Request::Dispatch(DispatchRequest {
            orguser: "alice-org".into(),
            repo: "alice-repo".into(),
            task: "sleep:30".into(),
            description: None,
            lane_env: Vec::new(),
        }))
        .await;
    assert_eq!(error.kind, ErrorKind::Busy);
    assert!(
        error.message.contains("its share of the queue"),
        "{}",
        error.message
    );
    // The slot frees: the waiting one starts.
    client
        .request(Request::Cancel {
            handle: first.handle.clone(),
        })
        .await;
    wait_until_async(
        "the queued dispatch to start",
        Duration::from_secs(10),
        || {
            helper.audited("dispatch_accepted").len() >= 2
                && stored_record(&helper.state, &waiting.handle)
                    .is_some_and(|record| record["state"] == "Running")
        },
    )
    .await;
    client
        .request(Request::Cancel {
            handle: waiting.handle.clone(),
        })
        .await;

    // Connections: this client already holds one; a second is fine, a third is refused.
    let _second = helper.client().await;
    let mut third = tokio::net::UnixStream::connect(&helper.socket)
        .await
        .unwrap();
    let hello = RequestEnvelope {
        id: 1,
        body: Request::Hello {
            version: PROTOCOL_VERSION,
            client_name: None,
        },
    };
    let _ = write_frame(&mut third, &hello, FrameLimit::REQUEST).await;
    let reply = read_frame::<ResponseEnvelope, _>(&mut third, FrameLimit::RESPONSE).await;
    assert!(
        matches!(reply, Ok(None) | Err(_)),
        "a third connection was served: {reply:?}"
    );
    wait_until("the refusal to be audited", Duration::from_secs(5), || {
        helper.audited("connection_refused").iter().any(|r| {
            r["detail"]
                .as_str()
                .unwrap_or("")
                .contains("per-client limit")
        })
    });

    // Retention: the oldest finished records beyond two are pruned, and that is audited.
    for task in ["exit:0", "exit:1", "exit:2"] {
        let job = client.dispatch_ok("alice-org", "alice-repo", task).await;
        client.result(&job.handle, 20_000).await;
    }
    // Five finished (two cancelled above, three here): the three oldest go.
    wait_until("pruning", Duration::from_secs(5), || {
        helper.audited("pruned").len() >= 3
    });
    assert_eq!(client.total(None).await, 2);
    let error = client
        .error(Request::Status {
            handle: first.handle.clone(),
            output_from: None,
        })
        .await;
    assert_eq!(
        error.kind,
        ErrorKind::UnknownHandle,
        "the oldest record was pruned"
    );
}

#[tokio::test]
async fn sighup_reloads_the_allowlist() {
    let Some(helper) = start_helper("reload ok", HelperOptions::default()) else {
        return;
    };
    let allowlist = helper.dir.path().join("repos.json");
    let grown = ALLOWLIST.replace(
        r#""bob-repo": {"org": "bob-org", "github": "bob/bob-repo"},"#,
        r#""bob-repo": {"org": "bob-org", "github": "bob/bob-repo"}, "bob-second": {"org": "bob-org", "github": "bob/second"},"#,
    );
    assert_ne!(grown, ALLOWLIST);
    std::fs::write(&allowlist, grown).unwrap();
    // A limit sized at start is kept, and the reload says so.
    let mut config = std::fs::read_to_string(&helper.config).unwrap();
    config.push_str("\n[limits]\nmax_connections = 32\n");
    std::fs::write(&helper.config, config).unwrap();
    send_sighup(&helper);
    wait_until("the reload to be audited", Duration::from_secs(5), || {
        !helper.audited("config_reloaded").is_empty()
    });
    // Again, to 48: what holds is still the value at start, not the last reload's.
    let config = std::fs::read_to_string(&helper.config).unwrap();
    std::fs::write(
        &helper.config,
        config.replace("max_connections = 32", "max_connections = 48"),
    )
    .unwrap();
    send_sighup(&helper);
    wait_until("the second reload", Duration::from_secs(5), || {
        helper.audited("config_reloaded").len() == 2
    });
    for reloaded in helper.audited("config_reloaded") {
        assert!(
            reloaded["detail"].as_str().unwrap().contains(
                "limits.max_connections keeps its old value, 64, until the helper restarts"
            ),
            "{reloaded}"
        );
    }
    let mut client = helper.client().await;
    match client.request(Request::Lanes).await {
        Response::Lanes { lanes } => {
            assert!(lanes.iter().any(|l| l.repo == "bob-second"), "{lanes:?}")
        }
        other => panic!("{other:?}"),
    }
    client
        .runs_to_success("bob-org", "bob-second", "exit:0")
        .await;
}

#[tokio::test]
async fn a_second_helper_on_the_same_state_refuses_to_start() {
    let Some(helper) = start_helper("single instance", HelperOptions::default()) else {
        return;
    };
    let second = Command::new(helper_bin())
        .args(["serve", "--config"])
        .arg(&helper.config)
        .env_remove("LISTEN_FDS")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "a second helper started: {said}");
    assert!(
        said.contains(&format!("another dispatch-helper (pid {})", helper.pid())),
        "{said}"
    );
    // The first one is untouched: it still serves, and its audit chain is whole.
    let mut client = helper.client().await;
    client
        .runs_to_success("alice-org", "alice-repo", "exit:0")
        .await;
    helper.assert_audit_chain_intact();
}

#[tokio::test]
async fn a_job_record_that_cannot_be_saved_refuses_the_dispatch_and_nothing_runs() {
    let Some(helper) = start_helper("record_fail_closed", HelperOptions::default()) else {
        return;
    };
    let mut client = helper.client().await;
    // Root ignores file modes, so make the record impossible to write: the jobs directory
    // becomes a file.
    let jobs = helper.state.join("jobs");
    std::fs::rename(&jobs, jobs.with_extension("moved")).unwrap();
    std::fs::write(&jobs, "not a directory").unwrap();
    let tag = marker("recordfail");
    let error = match client
        .dispatch("alice-org", "alice-repo", &format!("sleep:30 {tag}"))
        .await
    {
        Response::Error(error) => error,
        other => panic!("a lane started with no record to mark lost after a crash: {other:?}"),
    };
    assert!(
        error
            .message
            .contains("could not be saved, so its lane was not started"),
        "{}",
        error.message
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        processes_with(&tag).is_empty(),
        "a lane ran without a durable record"
    );
    // The audit log says the accepted dispatch ended there.
    wait_until("the failure to be audited", Duration::from_secs(5), || {
        helper.audited("spawn_failed").iter().any(|r| {
            r["detail"]
                .as_str()
                .unwrap_or_default()
                .contains("could not be saved")
        })
    });
}

#[tokio::test]
async fn dispatches_past_the_caps_wait_in_line_survive_a_restart_and_can_be_cancelled() {
    let options = HelperOptions {
        extra_toml: "[limits]\nmax_running_jobs = 1\n".into(),
        ..Default::default()
    };
    let Some(mut helper) = start_helper("queue", options) else {
        return;
    };
    let mut client = helper.client().await;
    let running = client
        .dispatch_ok("alice-org", "alice-repo", "sleep:60")
        .await;
    assert_eq!(running.state, JobState::Running);
    let mut waiting = Vec::new();
    for task in ["exit:0", "exit:3", "exit:0"] {
        let job = client.dispatch_ok("alice-org", "alice-repo", task).await;
        assert_eq!(job.state, JobState::Queued, "{job:?}");
        assert!(
            job.detail.contains("waiting for a lane slot"),
            "{}",
            job.detail
        );
        waiting.push(job.handle);
    }
    // Cancelled while it waits: it never runs.
    match client
        .request(Request::Cancel {
            handle: waiting[1].clone(),
        })
        .await
    {
        Response::Job(job) => {
            assert_eq!(job.state, JobState::Cancelled, "{job:?}");
            assert!(job.detail.contains("never ran"), "{}", job.detail);
        }
        other => panic!("{other:?}"),
    }
    // The helper dies with one running and two waiting: the running one is lost, the waiting
    // ones are not, and start (in order) once it is back.
    drop(client);
    helper.kill9();
    helper.launch();
    let mut client = helper.client().await;
    assert_eq!(
        client.result(&running.handle, 0).await.state,
        JobState::Lost
    );
    for handle in [&waiting[0], &waiting[2]] {
        let done = client.result(handle, 20_000).await;
        assert_eq!(done.state, JobState::Succeeded, "{done:?}");
        assert!(done.started_at.is_some());
    }
    let first = client.result(&waiting[0], 0).await.started_at.unwrap();
    let third = client.result(&waiting[2], 0).await.started_at.unwrap();
    assert!(first <= third, "first in, first out: {first} vs {third}");
    assert_eq!(
        client.result(&waiting[1], 0).await.state,
        JobState::Cancelled
    );
}

/// Audit records are durable once the job journal's sync returns; the log's own sync comes
/// later. Should a crash take the log's tail before that sync (simulated: the helper killed,
/// the log's last records cut off), the next start puts them back from the journal, in order,
/// hash for hash, and says so in the log.
#[tokio::test]
async fn audit_records_a_crash_took_from_the_log_come_back_from_the_journal() {
    let Some(mut helper) = start_helper("audit_restore", HelperOptions::default()) else {
        return;
    };
    let mut client = helper.client().await;
    for task in ["exit:0", "exit:0", "exit:3"] {
        let job = client.dispatch_ok("alice-org", "alice-repo", task).await;
        client.result(&job.handle, 20_000).await;
    }
    drop(client);
    helper.kill9();
    let text = std::fs::read_to_string(&helper.audit).unwrap();
    let all: Vec<&str> = text.lines().collect();
    // The last dispatch's acceptance and end, and whatever followed them.
    let cut_from = all
        .iter()
        .rposition(|line| line.contains("\"dispatch_accepted\""))
        .unwrap();
    let lost = all[cut_from..].to_vec();
    assert!(lost.len() >= 2, "{lost:?}");
    std::fs::write(&helper.audit, all[..cut_from].join("\n") + "\n").unwrap();
    helper.launch();
    let after = std::fs::read_to_string(&helper.audit).unwrap();
    let after: Vec<&str> = after.lines().collect();
    assert_eq!(
        &after[cut_from..cut_from + lost.len()],
        &lost[..],
        "the records the crash took are back, unchanged and in order"
    );
    let repaired = helper.audited("audit_log_repaired");
    assert!(
        repaired.iter().any(|r| r["detail"]
            .as_str()
            .unwrap_or_default()
            .contains(&format!("wrote back {} records", lost.len()))),
        "{repaired:?}"
    );
    helper.assert_audit_chain_intact();
}

/// Dispatch `sleep:30 TAG-N` and `sleep:0 TAG-N` in turn (half end at once, so lanes keep
/// starting) until the helper is gone, noting each acknowledged handle with its state then. A
/// refusal (busy, draining) is tried again.
async fn dispatch_until_gone(
    mut client: Client,
    tag: String,
    acknowledged: std::sync::Arc<std::sync::Mutex<Vec<(String, JobState)>>>,
) {
    for task in 1.. {
        let sleep = if task % 2 == 0 { "sleep:30" } else { "sleep:0" };
        let request = Request::Dispatch(DispatchRequest {
            orguser: "alice-org".into(),
            repo: "alice-repo".into(),
            task: format!("{sleep} {tag}-{task}"),
            description: None,
            lane_env: Vec::new(),
        });
        match client.try_request(request).await {
            Some(Response::Job(job)) => acknowledged.lock().unwrap().push((job.handle, job.state)),
            Some(Response::Error(_)) => tokio::time::sleep(Duration::from_millis(5)).await,
            Some(other) => panic!("{other:?}"),
            None => return, // the helper is gone
        }
    }
}

/// Kill -9 of the helper under 16 clients' load, three times: every dispatch whose reply
/// arrived is in the store after the restart (final or `lost` if it was running, never
/// `running`; one that waited for a slot waits again or has started), and the audit chain
/// verifies. Acknowledged means durable, group commit or not.
#[tokio::test]
async fn kill_9_under_load_loses_no_acknowledged_dispatch() {
    let options = HelperOptions {
        // Few slots, so that some dispatches are queued when the helper dies.
        extra_toml: "[limits]\nmax_running_jobs = 6\nmax_running_jobs_per_client = 6\nmax_connections_per_client = 32\n".into(),
        ..Default::default()
    };
    let Some(mut helper) = start_helper("kill9_under_load", options) else {
        return;
    };
    let acknowledged = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, JobState)>::new()));
    for round in 0..3 {
        let mut clients = Vec::new();
        for _ in 0..16 {
            let Some(client) = Client::try_connect(&helper.socket).await else {
                panic!(
                    "round {round}: the helper refused a client\nhelper: {}\naudit: {:?}",
                    helper
                        .stderr()
                        .lines()
                        .filter(|l| !l.contains("lane started"))
                        .collect::<Vec<_>>()
                        .join("\n"),
                    helper
                        .audit_lines()
                        .iter()
                        .rev()
                        .take(6)
                        .collect::<Vec<_>>()
                );
            };
            let tag = format!("kill9-round-{round}");
            clients.push(tokio::spawn(dispatch_until_gone(
                client,
                tag,
                acknowledged.clone(),
            )));
        }
        tokio::time::sleep(Duration::from_millis(400 + 150 * round)).await;
        helper.kill9();
        for client in clients {
            client.await.unwrap();
        }
        helper.launch();
        let mut client = helper.client().await;
        let acked = acknowledged.lock().unwrap().clone();
        assert!(
            acked.len() > 16,
            "round {round}: only {} dispatches acknowledged",
            acked.len()
        );
        for (handle, state_when_acked) in &acked {
            let status = Request::Status {
                handle: handle.clone(),
                output_from: None,
            };
            let job = match client.try_request(status).await {
                Some(Response::Job(job)) => job,
                other => panic!(
                    "round {round}: acknowledged {handle} lost: {other:?}\nhelper: {}\naudit: {:?}",
                    helper.stderr(),
                    helper
                        .audit_lines()
                        .iter()
                        .rev()
                        .take(5)
                        .collect::<Vec<_>>()
                ),
            };
            if *state_when_acked == JobState::Running {
                assert_ne!(
                    job.state,
                    JobState::Running,
                    "round {round}: {handle} was running when the helper died and still says so"
                );
                assert_ne!(job.state, JobState::Queued);
            }
        }
        // Cancel what runs or waits now, so the next round starts from free slots.
        for (handle, _) in &acked {
            client
                .request(Request::Cancel {
                    handle: handle.clone(),
                })
                .await;
        }
    }
    helper.assert_audit_chain_intact();
}

/// A stop (SIGTERM) while 16 clients dispatch: lanes being set up, held at their gate while
/// their records are synced, or running. The helper stops in order (its `helper_stopped`
/// record), no lane process is left, and after a restart no job it acknowledged as running
/// says so still.
#[tokio::test]
async fn a_helper_stopped_under_load_ends_every_lane_and_leaves_none_running() {
    let options = HelperOptions {
        extra_toml: "[limits]\nmax_running_jobs = 64\nmax_running_jobs_per_client = 64\nmax_running_jobs_per_lane = 64\nmax_connections_per_client = 32\n".into(),
        ..Default::default()
    };
    let Some(mut helper) = start_helper("stop_under_load", options) else {
        return;
    };
    let tag = marker("stopload");
    let acknowledged = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, JobState)>::new()));
    let mut clients = Vec::new();
    for _ in 0..16 {
        let client = helper.client().await;
        clients.push(tokio::spawn(dispatch_until_gone(
            client,
            tag.clone(),
            acknowledged.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stopped_before = helper.audited("helper_stopped").len();
    helper.stop();
    for client in clients {
        client.await.unwrap();
    }
    assert_eq!(
        helper.audited("helper_stopped").len(),
        stopped_before + 1,
        "the helper did not stop in order (killed after its stop timed out?)\n{}",
        helper.stderr()
    );
    wait_until("no lane process left", Duration::from_secs(5), || {
        processes_with(&tag).is_empty()
    });
    helper.launch();
    let mut client = helper.client().await;
    let acked = acknowledged.lock().unwrap().clone();
    assert!(
        acked.len() >= 16,
        "only {} dispatches acknowledged",
        acked.len()
    );
    for (handle, _) in acked
        .iter()
        .filter(|(_, state)| *state == JobState::Running)
    {
        let job = client
            .request(Request::Status {
                handle: handle.clone(),
                output_from: None,
            })
            .await;
        match job {
            Response::Job(job) => assert!(
                job.state.is_terminal(),
                "{handle} was running at the stop and is {:?} after the restart",
                job.state
            ),
            other => panic!("acknowledged {handle} lost: {other:?}"),
        }
    }
}

/// A process of alice's that stops, again and again, every process of alice's that is a lane of
/// the helper `helper_pid` between its uid change and its exec (still named like the spawner
/// thread that cloned it). Killed when dropped.
struct StopsAlicesLanes(std::process::Child);

impl StopsAlicesLanes {
    fn start(helper_pid: i32) -> StopsAlicesLanes {
        use std::os::unix::process::CommandExt;
        let alice = user(ALICE);
        // Not pkill: `pkill -u` finds none of them (a lane before its exec is not dumpable, so
        // its /proc directory is root's). This notes each new child of the helper named so, and
        // tries to stop it again and again, each time only if it still is: refused while it is
        // root (held at its gate), a stop succeeds once the lane has taken alice's uid, if that
        // is before its exec; then it is done with it. Other tests' lanes are left alone.
        let script = "import os, signal, sys\n\
            helper = sys.argv[1]\n\
            def unexeced_lane(pid):\n\
            \x20   try:\n\
            \x20       with open('/proc/%d/stat' % pid) as stat:\n\
            \x20           name, rest = stat.read().rsplit(') ', 1)\n\
            \x20   except (OSError, ValueError):\n\
            \x20       return False\n\
            \x20   return '(lane-spawner' in name and rest.split()[1] == helper\n\
            seen, lanes = set(), set()\n\
            while True:\n\
            \x20   for name in os.listdir('/proc'):\n\
            \x20       if name.isdigit() and name not in seen:\n\
            \x20           seen.add(name)\n\
            \x20           if unexeced_lane(int(name)):\n\
            \x20               lanes.add(int(name))\n\
            \x20   for _ in range(50):\n\
            \x20       for pid in list(lanes):\n\
            \x20           if not unexeced_lane(pid):\n\
            \x20               lanes.discard(pid)\n\
            \x20               continue\n\
            \x20           try:\n\
            \x20               os.kill(pid, signal.SIGSTOP)\n\
            \x20               lanes.discard(pid)\n\
            \x20           except PermissionError:\n\
            \x20               pass\n\
            \x20           except OSError:\n\
            \x20               lanes.discard(pid)\n";
        let child = std::process::Command::new("python3")
            .args(["-c", script, &helper_pid.to_string()])
            .uid(alice.uid.as_raw())
            .gid(alice.gid.as_raw())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        StopsAlicesLanes(child)
    }
}

impl Drop for StopsAlicesLanes {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_user_who_stops_their_own_lanes_before_their_exec_hurts_only_themselves() {
    let Some(helper) = start_helper(
        "stopped_before_exec",
        HelperOptions {
            argv: vec!["/bin/true".into(), "{task}".into()],
            // A stop that comes as the lane execs stops the program itself: it runs out its
            // time, which is short here.
            timeout_seconds: 2,
            // Every dispatch a spawn: none waits in the queue for a slot.
            extra_toml: "[limits]\nmax_running_jobs = 1024\nmax_running_jobs_per_client = 1024\n\
                         max_running_jobs_per_lane = 1024\n"
                .into(),
            ..Default::default()
        },
    ) else {
        return;
    };
    let mut client = helper.client().await;
    let dispatch = async |client: &mut Client, org: &str, repo: &str| {
        tokio::time::timeout(
            Duration::from_secs(10),
            client.dispatch(org, repo, "stop me"),
        )
        .await
        .expect("a dispatch waited 10 s: a stopped lane keeps a spawner thread")
    };
    // Alice stops her own lanes where she can, between their uid change and their exec. The
    // helper has 4 spawner threads: without the watchdog, 4 such stops would keep every lane
    // of every user from starting.
    let stopper = StopsAlicesLanes::start(helper.pid());
    let (mut stopped, mut attempts) = (0, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while stopped < 8 && std::time::Instant::now() < deadline {
        attempts += 1;
        match dispatch(&mut client, "alice-org", "alice-repo").await {
            Response::Error(error)
                if error.message.contains("stopped (SIGSTOP) before its exec") =>
            {
                stopped += 1;
            }
            Response::Job(_) | Response::Error(_) => {}
            other => panic!("{other:?}"),
        }
    }
    drop(stopper);
    assert!(
        stopped >= 8,
        "alice's stopper hit only {stopped} of {attempts} lanes in 60 s: nothing was tested"
    );
    // Bob's lanes start as before, and alice's again once she stops stopping them.
    for (org, repo) in [("bob-org", "bob-repo"), ("alice-org", "alice-repo")] {
        for _ in 0..10 {
            match dispatch(&mut client, org, repo).await {
                Response::Job(job) => assert_eq!(job.state, JobState::Running),
                other => panic!("{org}'s dispatch failed: {other:?}"),
            }
        }
    }
    eprintln!("alice's stopper hit {stopped} of {attempts} of her lanes before their exec");
}

/// A stop (SIGTERM) while dispatches that waited for the one slot take their turn, one after
/// another: none of them is cancelled or lost by it. One whose turn the stop interrupts
/// (checked, prepared, its lane held at the gate) goes back in line, in the store, and runs
/// after the restart; only a lane already running is stopped. Stops at different moments of
/// the queue's turnover until one has come in that window (a few milliseconds each time).
#[tokio::test]
async fn a_stop_while_queued_dispatches_take_their_turn_cancels_none_of_them() {
    let options = HelperOptions {
        extra_toml: "[limits]\nmax_running_jobs = 1\nmax_running_jobs_per_client = 1\nmax_queued_per_client = 2000\nmax_queued = 2000\nmax_finished_jobs_per_client = 2000\n".into(),
        ..Default::default()
    };
    let Some(mut helper) = start_helper("stop_at_turn", options) else {
        return;
    };
    let tag = marker("turn");
    let mut queued = Vec::new();
    let mut stops = 0;
    while stops < 40 && (stops < 10 || helper.audited("queued_dispatch_requeued").is_empty()) {
        let mut client = helper.client().await;
        for task in 0..30 {
            let request = Request::Dispatch(DispatchRequest {
                orguser: "alice-org".into(),
                repo: "alice-repo".into(),
                task: format!("sleep:0 {tag}-{stops}-{task}"),
                description: None,
                lane_env: Vec::new(),
            });
            match client.request(request).await {
                Response::Job(job) if job.state == JobState::Queued => queued.push(job.handle),
                Response::Job(_) => {}
                other => panic!("stop {stops}: {other:?}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(5 + 11 * (stops % 10))).await;
        helper.stop();
        helper.launch();
        stops += 1;
    }
    let requeued = helper.audited("queued_dispatch_requeued");
    eprintln!("{} of {stops} stops interrupted a turn", requeued.len());
    assert!(
        !requeued.is_empty(),
        "no stop of {stops} came while a waiting dispatch took its turn"
    );
    let mut client = helper.client().await;
    for handle in &queued {
        let job = client.result(handle, 30_000).await;
        assert!(
            job.state.is_terminal() && job.state != JobState::Lost,
            "{handle} waited for its turn and is {:?} after the stops: {}",
            job.state,
            job.detail
        );
        assert!(
            !job.detail.contains("never ran"),
            "{handle} waited for its turn and was cancelled by a stop: {:?} {}",
            job.state,
            job.detail
        );
    }
    assert!(
        queued.len() >= 200,
        "only {} dispatches waited",
        queued.len()
    );
    for record in &requeued {
        let handle = record["handle"].as_str().unwrap_or_default();
        let job = client.result(handle, 0).await;
        assert!(
            job.started_at.is_some(),
            "{handle} put back in line never ran: {job:?}"
        );
    }
    helper.assert_audit_chain_intact();
}

/// A finished job whose stored record cannot be read (its journal lines damaged on disk) is an
/// error naming it, not a result that silently has no output.
#[tokio::test]
async fn a_result_whose_record_cannot_be_read_is_an_error_not_a_result_without_output() {
    let Some(helper) = start_helper("damaged_result", HelperOptions::default()) else {
        return;
    };
    let mut client = helper.client().await;
    let job = client
        .dispatch_ok("alice-org", "alice-repo", "exit:0")
        .await;
    let done = client.result(&job.handle, 20_000).await;
    assert!(done.state.is_terminal(), "{:?}", done.state);
    let shown = done.stdout.map(|t| t.text).unwrap_or_default();
    assert!(shown.contains("lane ran"), "{shown:?}");
    // Every line about the job overwritten in place (same length, so nothing else moves).
    let journal = helper.state.join("jobs").join("journal.jsonl");
    let text = std::fs::read_to_string(&journal).unwrap();
    let damaged: String = text
        .split_inclusive('\n')
        .map(|line| match line.contains(&job.handle) {
            true => "x".repeat(line.len() - 1) + "\n",
            false => line.to_owned(),
        })
        .collect();
    assert_ne!(text, damaged);
    std::fs::write(&journal, damaged).unwrap();
    let error = client.error(Request::result(&job.handle, 0)).await;
    assert_eq!(error.kind, ErrorKind::Internal, "{error:?}");
    assert!(error.message.contains(&job.handle), "{}", error.message);
}

/// Makes a file immutable (`chattr +i`: even the helper's open descriptor can no longer write
/// it) until dropped.
/// The helper's job journal made immutable (`chattr +i`: even its open descriptor fails), until
/// dropped; None (said loudly, and a failure under CI) where that cannot be done.
fn immutable_journal(helper: &TestHelper, test: &str) -> Option<Immutable> {
    let journal = helper.state.join("jobs").join("journal.jsonl");
    let immutable = Immutable::set(journal);
    if immutable.is_none() {
        let why = "chattr +i failed (no chattr, or a filesystem without the immutable flag)";
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
        skip(test, why);
    }
    immutable
}

struct Immutable(std::path::PathBuf);

impl Immutable {
    fn set(path: std::path::PathBuf) -> Option<Immutable> {
        let set = Command::new("chattr").arg("+i").arg(&path).status();
        set.is_ok_and(|s| s.success()).then_some(Immutable(path))
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

/// A cancel of a waiting dispatch whose end cannot be recorded (the journal refuses every
/// write) is an error saying so: the store still holds it waiting, and a restart would run it.
/// Not a reply that it was cancelled.
#[tokio::test]
async fn a_cancel_that_cannot_be_recorded_says_so() {
    let options = HelperOptions {
        extra_toml: "[limits]\nmax_running_jobs = 1\n".into(),
        ..Default::default()
    };
    let Some(helper) = start_helper("cancel_not_durable", options) else {
        return;
    };
    let mut client = helper.client().await;
    let tag = marker("undurable");
    let running = client
        .dispatch_ok("alice-org", "alice-repo", &format!("sleep:30 {tag}"))
        .await;
    let waiting = client
        .dispatch_ok("alice-org", "alice-repo", &format!("sleep:0 {tag}"))
        .await;
    assert_eq!(waiting.state, JobState::Queued, "{running:?}");
    let Some(_immutable) = immutable_journal(&helper, "a_cancel_that_cannot_be_recorded_says_so")
    else {
        return;
    };
    let error = client
        .error(Request::Cancel {
            handle: waiting.handle.clone(),
        })
        .await;
    assert_eq!(error.kind, ErrorKind::Internal, "{error:?}");
    assert!(
        error.message.contains(&waiting.handle) && error.message.contains("could not be recorded"),
        "{}",
        error.message
    );
    // Nothing changed: it still waits, as the store says, and the audit log does not say it
    // was cancelled.
    let after = client.result(&waiting.handle, 0).await;
    assert_eq!(after.state, JobState::Queued, "{after:?}");
    let cancelled = helper.audited("cancelled");
    assert!(
        cancelled
            .iter()
            .all(|r| r["handle"] != waiting.handle.as_str()),
        "{cancelled:?}"
    );
}

/// A deletion whose removal the journal refuses is not made, and not audited as made (its
/// audit record went with the removal's journal line; it used to be written to the log alone).
#[tokio::test]
async fn a_deletion_that_cannot_be_recorded_is_neither_made_nor_audited() {
    let Some(helper) = start_helper("delete_not_durable", HelperOptions::default()) else {
        return;
    };
    let mut client = helper.client().await;
    let done = a_finished_job(&mut client).await;
    let Some(_immutable) = immutable_journal(
        &helper,
        "a_deletion_that_cannot_be_recorded_is_neither_made_nor_audited",
    ) else {
        return;
    };
    let error = client
        .error(Request::Delete {
            handle: done.handle.clone(),
        })
        .await;
    assert_eq!(error.kind, ErrorKind::Internal, "{error:?}");
    assert!(
        error
            .message
            .contains("was not deleted: its record could not be removed"),
        "{}",
        error.message
    );
    assert_eq!(
        client.result(&done.handle, 0).await.state,
        JobState::Succeeded
    );
    assert!(
        helper.audited("deleted").is_empty(),
        "a deletion that was not made is in the audit log"
    );
}
