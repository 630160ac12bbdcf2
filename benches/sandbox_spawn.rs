//! Benchmark (printed, not asserted): a sandboxed spawn+exit of /bin/true against a bare spawn
//! of the same argv, interleaved in one run, as a ratio. Target ≤ 1.25×.
//!
//! cargo bench --bench sandbox_spawn    (as root for the real uid drop; otherwise same-uid)

use dispatch_sandbox::cgroup::{CgroupSetting, cgroup2_mount};
use dispatch_sandbox::{
    Containment, LanePlan, LaneSpawner, Sandbox, SandboxPolicy, current_identity, resolve_identity,
};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ROUNDS: usize = 400;
/// As many spawner threads as the helper starts.
const HELPER_SPAWNER_THREADS: usize = 4;

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort_unstable();
    samples[((samples.len() as f64 - 1.0) * p).round() as usize]
}

/// The baseline: `/bin/true` by std (posix_spawn), its output piped as a lane's is, waited for.
fn bare_spawn() {
    let status = Command::new("/bin/true")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .status()
        .unwrap();
    assert!(status.success());
}

/// Throughput with 16 threads spawning at once, sandboxed (through a spawner of as many threads
/// as the helper's) and bare, alternating rounds: the ceiling the helper's 16-client phase could
/// reach with nothing of its own (no socket, records, job directories or supervision).
fn concurrent_ceiling(spawner: &LaneSpawner, sandbox: &Sandbox, plan: &LanePlan) {
    const THREADS: usize = 16;
    const PER_THREAD: usize = 100;
    let rate = |spawn_one: &(dyn Fn() + Sync)| {
        let started = Instant::now();
        std::thread::scope(|scope| {
            for _ in 0..THREADS {
                scope.spawn(|| (0..PER_THREAD).for_each(|_| spawn_one()));
            }
        });
        (THREADS * PER_THREAD) as f64 / started.elapsed().as_secs_f64()
    };
    let sandboxed = || {
        let lane = spawner
            .spawn(sandbox.prepare(plan.clone()).unwrap())
            .unwrap();
        assert!(lane.wait().unwrap().status.success());
    };
    let (mut bare_rates, mut sandboxed_rates) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        bare_rates.push(rate(&bare_spawn));
        sandboxed_rates.push(rate(&sandboxed));
    }
    let median = |rates: &mut Vec<f64>| {
        rates.sort_by(f64::total_cmp);
        rates[rates.len() / 2]
    };
    let (bare_rate, sandboxed_rate) = (median(&mut bare_rates), median(&mut sandboxed_rates));
    println!(
        "  {THREADS} threads at once, {} spawns each way x3 rounds: bare {bare_rate:.0}/s, sandboxed (spawner of {} threads) {sandboxed_rate:.0}/s, ratio {:.2}x",
        THREADS * PER_THREAD,
        HELPER_SPAWNER_THREADS,
        sandboxed_rate / bare_rate
    );
}

fn main() {
    let root = nix::unistd::geteuid().is_root();
    let (identity, change_uid) = if root {
        let name = "dispatch-t-alice";
        if nix::unistd::User::from_name(name).unwrap().is_none() {
            eprintln!("*** SKIPPED sandbox_spawn: run `bash .ci/setup` first to create {name} ***");
            return;
        }
        (resolve_identity(name).unwrap(), true)
    } else {
        eprintln!(
            "note: not root, so the lane keeps this uid (no uid drop); everything else is applied"
        );
        (current_identity().unwrap(), false)
    };
    let work = tempfile::tempdir().unwrap();
    if root {
        nix::unistd::chown(
            work.path(),
            Some(identity.uid.into()),
            Some(identity.gid.into()),
        )
        .unwrap();
    }
    // As the helper holds it: seccomp compiled once, Landlock built per lane.
    let sandbox = Sandbox::new(SandboxPolicy::default()).unwrap();
    // As root, each lane gets its own cgroup (created, joined, emptied and removed per spawn),
    // as in the helper; elsewhere there is none to create.
    let cgroup_base = cgroup2_mount()
        .filter(|_| root)
        .map(|mount| mount.join(format!("dispatch-bench-{}", std::process::id())));
    let containment = match &cgroup_base {
        Some(base) => Containment::establish(&CgroupSetting::Path(base.clone())).unwrap(),
        None => Containment::none("not root"),
    };
    println!("containment: {}", containment.describe());
    let spawner = LaneSpawner::start(HELPER_SPAWNER_THREADS, containment, &sandbox).unwrap();
    // For comparison: the same spawn with no cgroup (process group and subreaper only).
    let uncontained = LaneSpawner::start(1, Containment::none("comparison"), &sandbox).unwrap();
    let plan = LanePlan {
        identity,
        argv: vec!["/bin/true".into()],
        work_dir: work.path().to_owned(),
        make_work_dir: false,
        passed_env: Vec::new(),
        exec_paths: Vec::new(),
        change_uid,
    };

    let bare = || {
        let start = Instant::now();
        bare_spawn();
        start.elapsed()
    };
    // std uses posix_spawn (a vfork) when it can; any pre_exec hook forces a full fork. Printed
    // for comparison: the sandboxed spawn uses a vfork-style clone too, for exactly this cost.
    let bare_fork = || {
        let start = Instant::now();
        let mut command = Command::new("/bin/true");
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: the hook does nothing, so it is trivially async-signal-safe.
        #[allow(unsafe_code)]
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, || Ok(()));
        }
        assert!(command.status().unwrap().success());
        start.elapsed()
    };
    let sandboxed_without_cgroup = || {
        let prepared = sandbox.prepare(plan.clone()).unwrap();
        let start = Instant::now();
        let lane = uncontained.spawn(prepared).unwrap();
        let end = lane.wait().unwrap();
        assert!(end.status.success());
        start.elapsed()
    };
    let sandboxed = |include_prepare: bool| {
        let prepared_early = (!include_prepare).then(|| sandbox.prepare(plan.clone()).unwrap());
        let start = Instant::now();
        let prepared = prepared_early.unwrap_or_else(|| sandbox.prepare(plan.clone()).unwrap());
        let lane = spawner.spawn(prepared).unwrap();
        let end = lane.wait().unwrap();
        assert!(end.status.success());
        start.elapsed()
    };
    for _ in 0..20 {
        bare();
        sandboxed(true);
    }
    let prepare_only = || {
        let start = Instant::now();
        let prepared = sandbox.prepare(plan.clone()).unwrap();
        let elapsed = start.elapsed();
        drop(prepared);
        elapsed
    };
    let (mut bare_samples, mut full_samples, mut spawn_samples) =
        (Vec::new(), Vec::new(), Vec::new());
    let (mut fork_samples, mut prepare_samples) = (Vec::new(), Vec::new());
    let mut uncontained_samples = Vec::new();
    for _ in 0..ROUNDS {
        bare_samples.push(bare());
        fork_samples.push(bare_fork());
        full_samples.push(sandboxed(true));
        spawn_samples.push(sandboxed(false));
        uncontained_samples.push(sandboxed_without_cgroup());
        prepare_samples.push(prepare_only());
    }
    let bare_p50 = percentile(&mut bare_samples, 0.5);
    let full_p50 = percentile(&mut full_samples, 0.5);
    let spawn_p50 = percentile(&mut spawn_samples, 0.5);
    println!("sandbox_spawn: {ROUNDS} interleaved rounds of /bin/true (uid drop: {change_uid})");
    println!(
        "  baseline  bare std::process spawn+wait          p50 {:>8.1} µs  p99 {:>8.1} µs",
        bare_p50.as_secs_f64() * 1e6,
        percentile(&mut bare_samples, 0.99).as_secs_f64() * 1e6
    );
    let fork_p50 = percentile(&mut fork_samples, 0.5);
    println!(
        "  bare spawn forced to fork (empty pre_exec)      p50 {:>8.1} µs  p99 {:>8.1} µs  ratio {:.2}x",
        fork_p50.as_secs_f64() * 1e6,
        percentile(&mut fork_samples, 0.99).as_secs_f64() * 1e6,
        fork_p50.as_secs_f64() / bare_p50.as_secs_f64()
    );
    println!(
        "  sandboxed spawn+wait (prepared before timing)   p50 {:>8.1} µs  p99 {:>8.1} µs  ratio {:.2}x (target <= 1.25x)",
        spawn_p50.as_secs_f64() * 1e6,
        percentile(&mut spawn_samples, 0.99).as_secs_f64() * 1e6,
        spawn_p50.as_secs_f64() / bare_p50.as_secs_f64()
    );
    let uncontained_p50 = percentile(&mut uncontained_samples, 0.5);
    println!(
        "  the same without a cgroup (comparison)          p50 {:>8.1} µs  p99 {:>8.1} µs  ratio {:.2}x",
        uncontained_p50.as_secs_f64() * 1e6,
        percentile(&mut uncontained_samples, 0.99).as_secs_f64() * 1e6,
        uncontained_p50.as_secs_f64() / bare_p50.as_secs_f64()
    );
    println!(
        "  prepare alone (Landlock ruleset, environment)   p50 {:>8.1} µs  p99 {:>8.1} µs  ratio {:.2}x",
        percentile(&mut prepare_samples, 0.5).as_secs_f64() * 1e6,
        percentile(&mut prepare_samples, 0.99).as_secs_f64() * 1e6,
        percentile(&mut prepare_samples, 0.5).as_secs_f64() / bare_p50.as_secs_f64()
    );
    println!(
        "  sandboxed prepare+spawn+wait (the helper's path) p50 {:>8.1} µs  p99 {:>8.1} µs  ratio {:.2}x",
        full_p50.as_secs_f64() * 1e6,
        percentile(&mut full_samples, 0.99).as_secs_f64() * 1e6,
        full_p50.as_secs_f64() / bare_p50.as_secs_f64()
    );
    concurrent_ceiling(&spawner, &sandbox, &plan);
    drop(spawner);
    drop(uncontained);
    if let Some(base) = cgroup_base {
        // The spare lane cgroups the spawner kept ready, then the tree.
        std::thread::sleep(Duration::from_millis(100));
        for spare in std::fs::read_dir(base.join("lanes"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let _ = std::fs::remove_dir(spare.path());
        }
        let _ = std::fs::remove_dir(base.join("lanes"));
        let _ = std::fs::remove_dir(base);
    }
}
