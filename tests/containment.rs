//! Lane containment through the real helper, as real users: nothing a lane starts outlives it,
//! however it re-groups itself, and every lane is bounded in processes, memory and CPU time,
//! with the result naming the limit that stopped it and what the lane cost.
//!
//! The hostile lanes are the escape probe's modes: `escape-setsid` (double fork + setsid),
//! `escape-setpgid`, `forkbomb`, `hog`, `burn`.

mod support;

use dispatch_proto::*;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use support::*;

/// How long an escaped descendant may survive the end of its lane.
const GONE_WITHIN: Duration = Duration::from_secs(1);

fn tag(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("contain-{name}-{}-{nanos}", std::process::id())
}

/// Where a lane of `user_name` wrote `file`: in its job's own directory, one of those in the
/// user's work area of this helper (tags are unique, so the first found is the one).
fn in_job_dir(helper: &TestHelper, user_name: &str, file: &str) -> PathBuf {
    let area = helper.work.path().join(user_name);
    std::fs::read_dir(&area)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join(file))
        .find(|path| path.exists())
        .unwrap_or_else(|| area.join(file))
}

/// The pid the escaped descendant wrote, once it is running.
fn escaped_pid(helper: &TestHelper, user_name: &str, tag: &str) -> i32 {
    let file = format!("{tag}.pid");
    let mut found = PathBuf::new();
    wait_until(
        "the escaped descendant to start",
        Duration::from_secs(10),
        || {
            found = in_job_dir(helper, user_name, &file);
            std::fs::read_to_string(&found).is_ok_and(|s| !s.is_empty())
        },
    );
    let pid = std::fs::read_to_string(&found)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(pid), "the descendant {pid} should be running now");
    pid
}

/// The descendant is gone (or a zombie) within a second, and its liveness file stops growing.
fn assert_gone(helper: &TestHelper, pid: i32, user_name: &str, tag: &str, after: &str) {
    let deadline = Instant::now() + GONE_WITHIN;
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        !alive(pid),
        "BREACH: the lane's escaped descendant {pid} still runs 1 s after {after}"
    );
    let alive_file = in_job_dir(helper, user_name, &format!("{tag}.alive"));
    let size = || std::fs::metadata(&alive_file).map(|m| m.len()).unwrap_or(0);
    let before = size();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        before,
        size(),
        "BREACH: something still writes {tag}.alive after {after}"
    );
    let _ = std::fs::remove_file(alive_file);
    let _ = std::fs::remove_file(in_job_dir(helper, user_name, &format!("{tag}.pid")));
}

fn start(test: &str, sandbox: &str, timeout_seconds: u64) -> Option<TestHelper> {
    start_helper(
        test,
        HelperOptions {
            sandbox_toml: sandbox.to_owned(),
            timeout_seconds,
            ..Default::default()
        },
    )
}

#[tokio::test]
async fn escaped_descendants_end_with_their_lane_however_it_ends() {
    let Some(mut helper) = start("containment: escaped descendants", "", 3) else {
        return;
    };
    assert!(helper.cgroup.is_some());
    for how in ["escape-setsid", "escape-setpgid"] {
        // The lane ends by itself (successfully), a second after its descendant started.
        let t = tag("done");
        let mut client = helper.client().await;
        let job = client
            .dispatch_ok("alice-org", "alice-repo", &format!("{how}:{t}:1"))
            .await;
        let pid = escaped_pid(&helper, ALICE, &t);
        let done = client.result(&job.handle, 20_000).await;
        assert_eq!(done.state, JobState::Succeeded, "{done:?}");
        assert_gone(
            &helper,
            pid,
            ALICE,
            &t,
            &format!("its lane succeeded ({how})"),
        );

        // Cancelled while it runs.
        let t = tag("cancel");
        let job = client
            .dispatch_ok("alice-org", "alice-repo", &format!("{how}:{t}:60"))
            .await;
        let pid = escaped_pid(&helper, ALICE, &t);
        let cancelled = client
            .request(Request::Cancel {
                handle: job.handle.clone(),
            })
            .await;
        assert!(
            matches!(&cancelled, Response::Job(j) if j.state == JobState::Cancelled),
            "{cancelled:?}"
        );
        assert_gone(&helper, pid, ALICE, &t, &format!("cancel ({how})"));

        // Timed out (the helper's timeout is 3 s).
        let t = tag("timeout");
        let job = client
            .dispatch_ok("alice-org", "alice-repo", &format!("{how}:{t}:60"))
            .await;
        let pid = escaped_pid(&helper, ALICE, &t);
        let done = client.result(&job.handle, 20_000).await;
        assert_eq!(done.state, JobState::TimedOut, "{done:?}");
        assert_eq!(done.stopped_by.as_deref(), Some("wall_clock"));
        assert_gone(&helper, pid, ALICE, &t, &format!("the timeout ({how})"));

        // The helper is killed -9 and started again: the job is lost, its lane and all it started are gone.
        let t = tag("kill9");
        let job = client
            .dispatch_ok("alice-org", "alice-repo", &format!("{how}:{t}:60"))
            .await;
        let pid = escaped_pid(&helper, ALICE, &t);
        drop(client);
        helper.kill9();
        helper.launch();
        assert_gone(
            &helper,
            pid,
            ALICE,
            &t,
            &format!("kill -9 of the helper and its restart ({how})"),
        );
        let mut client = helper.client().await;
        let lost = client.result(&job.handle, 0).await;
        assert_eq!(lost.state, JobState::Lost, "{lost:?}");
        assert!(
            helper.populated_lane_cgroups().is_empty(),
            "{:?}",
            helper.populated_lane_cgroups()
        );
    }
    // Every lane's cgroup is removed once it has ended.
    assert!(
        helper.populated_lane_cgroups().is_empty(),
        "{:?}",
        helper.populated_lane_cgroups()
    );
}

#[tokio::test]
async fn a_fork_bomb_stops_at_the_process_limit_and_others_keep_working() {
    // Bob runs only this lane in this test binary: RLIMIT_NPROC counts all of a user's
    // processes where no pids controller holds the limit.
    let sandbox = "[sandbox.limits]\nprocesses = 48\n";
    let Some(helper) = start("containment: fork bomb", sandbox, 60) else {
        return;
    };
    let mut client = helper.client().await;
    let bomb = client.dispatch_ok("bob-org", "bob-repo", "forkbomb").await;
    let done = client.result(&bomb.handle, 60_000).await;
    assert_eq!(done.state, JobState::Failed, "{done:?}");
    assert_eq!(done.stopped_by.as_deref(), Some("processes"), "{done:?}");
    assert!(
        done.detail.contains("process limit 48 reached"),
        "{}",
        done.detail
    );
    let report: serde_json::Value =
        serde_json::from_str(done.stdout.as_ref().unwrap().text.lines().last().unwrap()).unwrap();
    let forked = report["forked"].as_u64().unwrap();
    assert!(
        forked < 48,
        "BREACH: the bomb forked {forked} processes past a limit of 48"
    );
    let limits = &done.sandbox.as_ref().unwrap().limits;
    let processes = limits.iter().find(|l| l.limit == "processes").unwrap();
    assert_eq!(processes.value, "48");
    println!("fork bomb: {forked} forks, held by {}", processes.mechanism);
    if !processes.mechanism.starts_with("cgroup") {
        skip(
            "the pids.max path of the fork bomb test",
            "this host's cgroup v2 has no pids controller; RLIMIT_NPROC held the limit instead",
        );
    }
    // The helper and other lanes are unaffected.
    let other = client
        .dispatch_ok("alice-org", "alice-repo", "exit:0")
        .await;
    let other = client.result(&other.handle, 20_000).await;
    assert_eq!(other.state, JobState::Succeeded, "{other:?}");
}

#[tokio::test]
async fn a_memory_hog_stops_at_the_memory_limit() {
    let sandbox = "[sandbox.limits]\nmemory_bytes = 134217728\n";
    let Some(helper) = start("containment: memory hog", sandbox, 60) else {
        return;
    };
    let mut client = helper.client().await;
    let hog = client
        .dispatch_ok("alice-org", "alice-repo", "hog:4096")
        .await;
    let done = client.result(&hog.handle, 60_000).await;
    assert_eq!(done.state, JobState::Failed, "{done:?}");
    assert_eq!(done.stopped_by.as_deref(), Some("memory"), "{done:?}");
    assert!(
        done.detail.contains("memory limit 128 MiB reached"),
        "{}",
        done.detail
    );
    let usage = done
        .usage
        .as_ref()
        .expect("a finished job reports its usage");
    assert!(
        usage.peak_memory_bytes <= 160 << 20,
        "BREACH: the lane reached {} bytes past a limit of 128 MiB",
        usage.peak_memory_bytes
    );
    let stdout = &done.stdout.as_ref().unwrap().text;
    assert!(
        !stdout.contains("\"allocated_mib\":4096"),
        "BREACH: {stdout}"
    );
    let limits = &done.sandbox.as_ref().unwrap().limits;
    let memory = limits.iter().find(|l| l.limit == "memory").unwrap();
    if !memory.mechanism.starts_with("cgroup") {
        skip(
            "the memory.max path of the memory hog test",
            "this host's cgroup v2 has no memory controller; RLIMIT_DATA held the limit instead",
        );
    }
}

#[tokio::test]
async fn the_cpu_time_limit_stops_the_whole_lane() {
    let sandbox = "[sandbox.limits]\ncpu_seconds = 1\n";
    let Some(helper) = start("containment: cpu time", sandbox, 60) else {
        return;
    };
    let mut client = helper.client().await;
    let started = Instant::now();
    let burn = client
        .dispatch_ok("alice-org", "alice-repo", "burn:30")
        .await;
    let done = client.result(&burn.handle, 60_000).await;
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the burn was not stopped early"
    );
    assert_eq!(done.state, JobState::Failed, "{done:?}");
    assert_eq!(done.stopped_by.as_deref(), Some("cpu_time"), "{done:?}");
    assert!(
        done.detail.starts_with("CPU time limit 1 s reached"),
        "{}",
        done.detail
    );
    let usage = done.usage.unwrap();
    assert!(usage.cpu_user_ms + usage.cpu_system_ms >= 900, "{usage:?}");
}

#[tokio::test]
async fn every_result_reports_its_cost_and_what_held_each_limit() {
    let Some(helper) = start("containment: usage", "", 60) else {
        return;
    };
    let mut client = helper.client().await;
    let job = client
        .dispatch_ok("alice-org", "alice-repo", "burn:1")
        .await;
    let done = client.result(&job.handle, 20_000).await;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    let usage = done.usage.as_ref().unwrap();
    assert!(usage.cpu_user_ms >= 500, "a second of spinning: {usage:?}");
    assert!(usage.peak_memory_bytes >= 1 << 20, "{usage:?}");
    let sandbox = done.sandbox.as_ref().unwrap();
    assert!(
        sandbox.containment.contains("cgroup per lane"),
        "{}",
        sandbox.containment
    );
    let names: Vec<&str> = sandbox.limits.iter().map(|l| l.limit.as_str()).collect();
    for limit in ["processes", "memory", "swap", "cpu_time", "wall_clock"] {
        assert!(names.contains(&limit), "{limit} is not reported: {names:?}");
    }
    assert!(sandbox.limits.iter().all(|l| !l.mechanism.is_empty()));
}
