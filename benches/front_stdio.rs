//! Benchmark (printed, not asserted): the stdio front. Cold start to `initialized` against a bare
//! start+exit of the same binary; dispatch p50/p99 and throughput with 1 and 8 concurrent tool
//! calls through the front against the same dispatches sent straight to the helper's socket,
//! in the same run; and the front's peak RSS.
//!
//! cargo bench --bench front_stdio      (as root, after `bash .ci/setup`)

#[path = "../tests/support/mod.rs"]
mod support;

use rmcp::ServiceExt;
use rmcp::model::{CallToolRequestParams, ClientCapabilities, ClientConfig, Implementation};
use rmcp::service::RunningService;
use rmcp::transport::{ConfigureCommandExt, TokioChildProcess};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;

type Mcp = RunningService<rmcp::RoleClient, ClientConfig>;

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort_unstable();
    samples[((samples.len() as f64 - 1.0) * p).round() as usize]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

async fn connect(socket: &std::path::Path) -> (Mcp, u32) {
    let command = tokio::process::Command::new(front_bin()).configure(|c| {
        c.arg("serve").arg("--socket").arg(socket);
    });
    let transport = TokioChildProcess::new(command).unwrap();
    let pid = transport.id().unwrap();
    let client = ClientConfig::new(
        ClientCapabilities::default(),
        Implementation::new("bench", "1"),
    )
    .serve(transport)
    .await
    .unwrap();
    (client, pid)
}

fn arguments() -> rmcp::model::JsonObject {
    serde_json::json!({"orguser": "alice-org", "repo": "alice-repo", "task_description": "bench"})
        .as_object()
        .unwrap()
        .clone()
}

async fn through_front(
    client: Arc<Mcp>,
    calls: usize,
    concurrency: usize,
) -> (Vec<Duration>, Duration) {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            for _ in 0..calls / concurrency {
                let start = Instant::now();
                let result = client
                    .call_tool(
                        CallToolRequestParams::new("dispatch_unit").with_arguments(arguments()),
                    )
                    .await
                    .unwrap();
                assert_ne!(result.is_error, Some(true));
                samples.push(start.elapsed());
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

async fn direct(
    helper: &TestHelper,
    calls: usize,
    concurrency: usize,
) -> (Vec<Duration>, Duration) {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let mut client = helper.client().await;
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            for _ in 0..calls / concurrency {
                let start = Instant::now();
                client.dispatch_ok("alice-org", "alice-repo", "bench").await;
                samples.push(start.elapsed());
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

#[tokio::main]
async fn main() {
    if !is_root() {
        eprintln!("*** SKIPPED front_stdio: needs root (real uid drops to the test users) ***");
        return;
    }
    ensure_users();
    let helper = TestHelper::start(HelperOptions {
        argv: vec!["/bin/true".into(), "{task}".into()],
        extra_toml: "[limits]\nmax_running_jobs = 1024\nmax_running_jobs_per_client = 1024\nmax_connections_per_client = 64\n".into(),
        ..Default::default()
    });

    // Cold start: process start to MCP `initialized`, against start+exit of the same binary.
    let (mut cold, mut bare) = (Vec::new(), Vec::new());
    for _ in 0..20 {
        let start = Instant::now();
        std::process::Command::new(front_bin())
            .arg("--version")
            .output()
            .unwrap();
        bare.push(start.elapsed());
        let start = Instant::now();
        let (client, _) = connect(&helper.socket).await;
        cold.push(start.elapsed());
        client.cancel().await.unwrap();
    }
    let bare_p50 = percentile(&mut bare, 0.5);
    let cold_p50 = percentile(&mut cold, 0.5);
    println!("front_stdio: the dispatch-mcp front over stdio (rmcp client), lane /bin/true");
    println!(
        "  cold start to initialized   p50 {:>8.1} µs   baseline `dispatch-mcp --version` p50 {:>8.1} µs   ratio {:.2}x",
        micros(cold_p50),
        micros(bare_p50),
        cold_p50.as_secs_f64() / bare_p50.as_secs_f64()
    );

    let (client, pid) = connect(&helper.socket).await;
    let client = Arc::new(client);
    through_front(client.clone(), 50, 1).await;
    direct(&helper, 50, 1).await;
    for concurrency in [1usize, 8] {
        let calls = 400;
        let (mut front, front_wall) = through_front(client.clone(), calls, concurrency).await;
        let (mut socket, socket_wall) = direct(&helper, calls, concurrency).await;
        let (f50, f99) = (percentile(&mut front, 0.5), percentile(&mut front, 0.99));
        let (s50, s99) = (percentile(&mut socket, 0.5), percentile(&mut socket, 0.99));
        println!(
            "  {concurrency} concurrent: front p50 {:>8.1} µs p99 {:>8.1} µs {:>7.1}/s | helper socket directly p50 {:>8.1} µs p99 {:>8.1} µs {:>7.1}/s | front/direct p50 {:.2}x",
            micros(f50),
            micros(f99),
            front.len() as f64 / front_wall.as_secs_f64(),
            micros(s50),
            micros(s99),
            socket.len() as f64 / socket_wall.as_secs_f64(),
            f50.as_secs_f64() / s50.as_secs_f64()
        );
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or("?")
            .trim()
            .to_owned()
    };
    println!(
        "  front memory: peak VmHWM {}, VmRSS {}",
        field("VmHWM"),
        field("VmRSS")
    );
}
