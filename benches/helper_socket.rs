//! Benchmark (printed, not asserted): dispatch round trips at the helper's socket, with 1 and 16
//! concurrent clients, against a bare spawn of the same lane in the same run; 16 clients again
//! with the lane user's work area on a tmpfs, against the same on the machine's filesystem; and
//! the helper's memory after 10,000 jobs.
//!
//! cargo bench --bench helper_socket     (as root, after `bash .ci/setup`)
//!
//! A dispatch round trip is: check, commit the acceptance and the job record (one journal line)
//! while the lane is prepared, forked and sandboxed as far as its gate, let it exec, answer. The lane is
//! /bin/true. Commits are grouped: one `fdatasync` covers every record queued meanwhile; the
//! syncs each phase cost (read from the helper's own count, which it writes in its
//! `helper_stopped` record) are printed per dispatch, the lane's end (record and audit)
//! included. So is the CPU time each dispatch cost, from the helper's `/proc/<pid>/stat`: its
//! lane's (the process from its clone to its exit, which the helper reaps) against a bare
//! spawn's, and the helper's own threads' (less noisy than a rate on a shared machine, and
//! what says where a dispatch's cost goes).

#[path = "../tests/support/mod.rs"]
mod support;

use dispatch_proto::{JobState, Request, Response};
use std::time::{Duration, Instant};
use support::*;

const TOTAL_JOBS: usize = 10_000;

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort_unstable();
    samples[((samples.len() as f64 - 1.0) * p).round() as usize]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn status_kib(pid: i32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// CPU time in µs so far of process `pid`: its own threads, and the children it has reaped
/// (the helper's: its lanes, each from its clone to its exit), from `/proc/<pid>/stat`.
fn cpu_micros(pid: i32) -> (f64, f64) {
    let ticks_per_second: f64 = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After the command name: state (field 3), ..., utime (14), stime, cutime, cstime (17).
    let fields: Vec<f64> = stat
        .rsplit_once(") ")
        .unwrap()
        .1
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0.0))
        .collect();
    let micros = 1e6 / ticks_per_second;
    (
        (fields[11] + fields[12]) * micros,
        (fields[13] + fields[14]) * micros,
    )
}

async fn dispatch_rtt(client: &mut Client) -> Duration {
    let start = Instant::now();
    match client.dispatch("alice-org", "alice-repo", "bench").await {
        // Accepted: started, or (past the running caps) waiting for a slot.
        Response::Job(job) => assert!(matches!(job.state, JobState::Running | JobState::Queued)),
        other => panic!("dispatch failed: {other:?}"),
    }
    start.elapsed()
}

async fn run(clients: usize, per_client: usize, helper: &TestHelper) -> (Vec<Duration>, Duration) {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let mut client = helper.client().await;
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::with_capacity(per_client);
            for _ in 0..per_client {
                samples.push(dispatch_rtt(&mut client).await);
            }
            samples
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    (all, started.elapsed())
}

/// One client whose every dispatch finds the helper idle: it waits for each lane's end (and a
/// moment for its record and cgroup to be done with) before the next. Back to back, a dispatch
/// shares the 2 cores with the previous lane's end; this is the dispatch by itself. Batches of
/// bare spawns are interleaved with batches of dispatches, so that the two are measured under
/// the same load from the machine's other tenants: the ratio of their p50s is this phase's
/// figure. Returns (dispatches, bare spawns, wall time of the dispatches).
async fn run_paced(
    batches: usize,
    helper: &TestHelper,
) -> (Vec<Duration>, Vec<Duration>, Duration) {
    const BATCH: usize = 50;
    let mut client = helper.client().await;
    let (mut samples, mut bare) = (Vec::new(), Vec::new());
    let mut wall = Duration::ZERO;
    for _ in 0..batches {
        bare.extend(bare_spawns(BATCH));
        let started = Instant::now();
        for _ in 0..BATCH {
            let start = Instant::now();
            let handle = match client.dispatch("alice-org", "alice-repo", "bench").await {
                Response::Job(job) => job.handle,
                other => panic!("dispatch failed: {other:?}"),
            };
            samples.push(start.elapsed());
            client.result(&handle, 5_000).await;
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        wall += started.elapsed();
    }
    (samples, bare, wall)
}

/// Spawn and reap the same lane as the helper's, without any of the helper.
fn bare_spawns(count: usize) -> Vec<Duration> {
    (0..count)
        .map(|_| {
            let start = Instant::now();
            std::process::Command::new("/bin/true")
                .arg("bench")
                .status()
                .unwrap();
            start.elapsed()
        })
        .collect()
}

/// A tmpfs mounted over a lane user's work area, owned by that user as the area is, and
/// unmounted when dropped.
struct TmpfsArea(std::path::PathBuf);

impl TmpfsArea {
    fn mount(area: &std::path::Path) -> Option<TmpfsArea> {
        use std::os::unix::fs::MetadataExt;
        let owner = std::fs::metadata(area).ok()?;
        let options = format!("mode=0700,uid={},gid={},size=64m", owner.uid(), owner.gid());
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &options, "dispatch-bench"])
            .arg(area)
            .status()
            .is_ok_and(|s| s.success());
        mounted.then(|| TmpfsArea(area.to_owned()))
    }
}

impl Drop for TmpfsArea {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// The filesystem type a path is on, as `findmnt` names it.
fn filesystem_of(path: &std::path::Path) -> String {
    std::process::Command::new("findmnt")
        .args(["-n", "-o", "FSTYPE", "-T"])
        .arg(path)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| "its filesystem".into())
}

/// Until every job has ended (the newest end last).
async fn wait_all_finished(helper: &TestHelper) -> u64 {
    let mut client = helper.client().await;
    loop {
        // A list of every job would not fit one response frame.
        match client
            .request(Request::List {
                filter: None,
                detail: false,
                limit: 200,
            })
            .await
        {
            Response::List { total, jobs } if jobs.iter().all(|j| j.state.is_terminal()) => {
                return total;
            }
            Response::List { .. } => tokio::time::sleep(Duration::from_millis(100)).await,
            other => panic!("{other:?}"),
        }
    }
}

/// Stop the helper; the syncs it made since it started, from its `helper_stopped` record.
fn stop_and_count_syncs(helper: &mut TestHelper) -> u64 {
    helper.stop();
    let stopped = helper.audited("helper_stopped");
    let detail = stopped.last().unwrap()["detail"]
        .as_str()
        .unwrap()
        .to_owned();
    let before = detail.split(" syncs").next().unwrap();
    before.rsplit(' ').next().unwrap().parse().unwrap()
}

#[tokio::main]
async fn main() {
    if !is_root() {
        eprintln!("*** SKIPPED helper_socket: needs root (real uid drops to the test users) ***");
        return;
    }
    ensure_users();
    let mut helper = TestHelper::start(HelperOptions {
        argv: vec!["/bin/true".into(), "{task}".into()],
        extra_toml: "[limits]\nmax_running_jobs = 1024\nmax_running_jobs_per_client = 1024\nmax_running_jobs_per_lane = 1024\nmax_connections_per_client = 64\n".into(),
        ..Default::default()
    });

    // Baseline, same run: spawn and reap the same lane without any of the helper.
    let mut bare = bare_spawns(300);
    let bare_p50 = percentile(&mut bare, 0.5);
    // The throughput baseline: 16 threads spawning it back to back, none of the helper.
    let bare_cpu_before = cpu_micros(std::process::id() as i32).1;
    let bare_throughput = {
        let started = Instant::now();
        let spawners: Vec<_> = (0..16)
            .map(|_| std::thread::spawn(|| bare_spawns(250)))
            .collect();
        spawners.into_iter().for_each(|s| drop(s.join().unwrap()));
        4000.0 / started.elapsed().as_secs_f64()
    };
    // What one bare spawn costs in CPU, from its clone to its exit.
    let bare_cpu = (cpu_micros(std::process::id() as i32).1 - bare_cpu_before) / 4000.0;

    let mut warm = helper.client().await;
    let mut last = String::new();
    for _ in 0..50 {
        dispatch_rtt(&mut warm).await;
    }
    if let Response::List { jobs, .. } = warm
        .request(Request::List {
            filter: None,
            detail: false,
            limit: 1,
        })
        .await
    {
        last = jobs[0].handle.clone();
    }
    // The socket's own cost, same run: a status request (no disk, no spawn).
    let mut status = Vec::new();
    for _ in 0..300 {
        let start = Instant::now();
        warm.request(Request::status(last.clone())).await;
        status.push(start.elapsed());
    }
    let status_p50 = percentile(&mut status, 0.5);
    drop(warm);
    wait_all_finished(&helper).await;
    // What a start and a stop cost by themselves, to take off each phase's count.
    let idle_syncs = {
        stop_and_count_syncs(&mut helper);
        helper.launch();
        stop_and_count_syncs(&mut helper)
    };
    helper.launch();
    let (mut paced, mut paced_bare, paced_wall) = run_paced(6, &helper).await;
    let paced_bare_p50 = percentile(&mut paced_bare, 0.5);
    wait_all_finished(&helper).await;
    let paced_syncs = stop_and_count_syncs(&mut helper).saturating_sub(idle_syncs);
    let alice_area = helper.work.path().join(ALICE);
    let work_filesystem = filesystem_of(helper.work.path());
    let mut phase = async |clients: usize, per_client: usize| {
        helper.launch();
        let before = cpu_micros(helper.pid());
        let (samples, wall) = run(clients, per_client, &helper).await;
        wait_all_finished(&helper).await;
        let after = cpu_micros(helper.pid());
        let count = samples.len() as f64;
        let cpu = ((after.0 - before.0) / count, (after.1 - before.1) / count);
        let syncs = stop_and_count_syncs(&mut helper).saturating_sub(idle_syncs);
        (samples, wall, syncs, cpu)
    };
    let (mut one, one_wall, one_syncs, one_cpu) = phase(1, 1000).await;
    let (mut sixteen, sixteen_wall, sixteen_syncs, sixteen_cpu) = phase(16, 250).await;
    // The same 16 clients with the lane user's work area on a tmpfs (the journal and the audit
    // log stay where they were): what making and removing each job's directory costs on the
    // machine's own filesystem.
    let on_tmpfs = match TmpfsArea::mount(&alice_area) {
        Some(_area) => {
            let (samples, wall, _, _) = phase(16, 250).await;
            Some(samples.len() as f64 / wall.as_secs_f64())
        }
        None => None,
    };
    helper.launch();
    println!(
        "helper_socket: dispatch round trip over the Unix socket (lane /bin/true, uid drop, Landlock, seccomp, group-committed records)"
    );
    println!(
        "  baseline bare spawn+wait of /bin/true          p50 {:>8.1} µs",
        micros(bare_p50)
    );
    println!(
        "  a status request's round trip (the socket's own cost) p50 {:>8.1} µs",
        micros(status_p50)
    );
    for (label, samples, wall, syncs, baseline) in [
        ("1 client ", &mut one, one_wall, one_syncs, bare_p50),
        (
            "1 paced  ",
            &mut paced,
            paced_wall,
            paced_syncs,
            paced_bare_p50,
        ),
        (
            "16 clients",
            &mut sixteen,
            sixteen_wall,
            sixteen_syncs,
            bare_p50,
        ),
    ] {
        let count = samples.len();
        let p50 = percentile(samples, 0.5);
        let p99 = percentile(samples, 0.99);
        println!(
            "  {label}: {count:>5} dispatches  p50 {:>8.1} µs ({:.2}x baseline)  p99 {:>8.1} µs  throughput {:>7.1} dispatches/s  syncs/dispatch {:.2} (before group commit: 6)",
            micros(p50),
            p50.as_secs_f64() / baseline.as_secs_f64(),
            micros(p99),
            count as f64 / wall.as_secs_f64(),
            syncs as f64 / count as f64
        );
    }
    println!(
        "  (1 paced: its baseline is the p50 of bare spawns interleaved with it in batches of 50, {:.1} µs)",
        micros(paced_bare_p50)
    );
    let sixteen_rate = sixteen.len() as f64 / sixteen_wall.as_secs_f64();
    println!(
        "  (16 clients: bare spawns of the same lane by 16 threads, none of the helper, reach {bare_throughput:.1}/s; the dispatches reached {:.2}x that)",
        sixteen_rate / bare_throughput
    );
    for (label, (own, lanes)) in [("1 client ", one_cpu), ("16 clients", sixteen_cpu)] {
        println!(
            "  {label}: CPU per dispatch: the lane (its process, clone to exit) {lanes:>6.0} µs vs a bare spawn's {bare_cpu:>6.0} µs ({:.2}x); the helper's own threads {own:>6.0} µs ({:.2}x a bare spawn)",
            lanes / bare_cpu,
            own / bare_cpu
        );
    }
    match on_tmpfs {
        Some(rate) => println!(
            "  16 clients, job directories on a tmpfs: {rate:.1} dispatches/s ({:.2}x the same on {}; {:.2}x the bare spawns)",
            rate / sixteen_rate,
            work_filesystem,
            rate / bare_throughput
        ),
        None => println!("  (16 clients on a tmpfs: not measured, the tmpfs could not be mounted)"),
    }

    // Fill up to 10,000 jobs, let them finish, then read the helper's memory.
    let done = 50 + paced.len() + one.len() + sixteen.len();
    let rss_before = status_kib(helper.pid(), "VmRSS");
    run(16, (TOTAL_JOBS - done).div_ceil(16), &helper).await;
    let total = wait_all_finished(&helper).await;
    println!("  jobs recorded: {total}");
    println!(
        "  helper memory after {TOTAL_JOBS} jobs: VmRSS {} KiB (was {rss_before} KiB after {done} jobs), peak VmHWM {} KiB",
        status_kib(helper.pid(), "VmRSS"),
        status_kib(helper.pid(), "VmHWM")
    );
}
