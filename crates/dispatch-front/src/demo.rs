//! `dispatch-mcp demo`: the whole path on a fresh machine, no root, no config. It starts the real
//! front (`dispatch-mcp serve --demo-helper`, which starts a real helper) as a child process
//! and drives it over stdio as an MCP client, printing each step.

use crate::embedded::{DEMO_ORGUSER, DEMO_REPO, new_private_dir};
use rmcp::model::{
    CallToolRequestParams, CallToolResult, ClientCapabilities, ClientConfig, Implementation,
};
use rmcp::transport::TokioChildProcess;
use rmcp::{ServiceExt, transport::ConfigureCommandExt};
use serde_json::{Value, json};
use std::path::Path;

fn text(result: &CallToolResult) -> String {
    result
        .content
        .first()
        .and_then(|c| c.as_text())
        .map(|t| t.text.clone())
        .unwrap_or_default()
}

fn section(title: &str) {
    println!(
        "\n── {title} {}",
        "─".repeat(60usize.saturating_sub(title.len()))
    );
}

pub async fn run() -> Result<(), String> {
    let dir = new_private_dir()?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let front_log = dir.join("front.log");
    let client = start_front(&exe, &dir, &front_log).await?;
    println!(
        "dispatch-mcp demo: the real front and a real helper (embedded, {}), driven over MCP stdio.",
        if nix::unistd::geteuid().is_root() {
            "root mode, demo lane as nobody"
        } else {
            "unprivileged mode"
        }
    );
    show_server(&client).await?;
    show_lanes(&client).await?;
    let handle = dispatch_demo_unit(&client).await?;
    let result = show_status_and_result(&client, &handle).await?;
    show_list(&client).await?;
    let rejected = show_refusal(&client).await?;

    section("audit");
    println!("audit log: {}", dir.join("audit.jsonl").display());
    println!(
        "verify it: {} audit verify {}",
        exe.with_file_name("dispatch-helper").display(),
        dir.join("audit.jsonl").display()
    );
    let _ = client.cancel().await;
    if result["status"] == "succeeded" && rejected {
        println!("\ndemo completed.");
        Ok(())
    } else {
        Err(format!(
            "the demo did not go as expected (front log: {})",
            front_log.display()
        ))
    }
}

/// The real front as a child process (`serve --demo-helper`, which starts its own helper in
/// `dir`), initialized over stdio; its log goes to `front_log`.
async fn start_front(exe: &Path, dir: &Path, front_log: &Path) -> Result<Client, String> {
    let log = std::fs::File::create(front_log).map_err(|e| e.to_string())?;
    let command = tokio::process::Command::new(exe).configure(|cmd| {
        cmd.args(["serve", "--demo-helper"])
            .env("DISPATCH_EMBEDDED_DIR", dir)
            .env_remove("DISPATCH_REPOS_JSON");
    });
    let (transport, _) = TokioChildProcess::builder(command)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("start the front: {e}"))?;
    ClientConfig::new(
        ClientCapabilities::default(),
        Implementation::new("dispatch-mcp-demo", env!("CARGO_PKG_VERSION")),
    )
    .serve(transport)
    .await
    .map_err(|e| {
        format!(
            "MCP initialize with the front failed: {e} (see {})",
            front_log.display()
        )
    })
}

type Client = rmcp::service::RunningService<rmcp::RoleClient, ClientConfig>;

async fn call(client: &Client, name: &'static str, args: Value) -> Result<CallToolResult, String> {
    client
        .call_tool(
            CallToolRequestParams::new(name)
                .with_arguments(args.as_object().cloned().unwrap_or_default()),
        )
        .await
        .map_err(|e| format!("{name}: {e}"))
}

async fn show_server(client: &Client) -> Result<(), String> {
    section("server");
    let info = client.peer_info();
    if let Some(info) = info.as_ref().and_then(|i| i.server_info.clone()) {
        println!("{} {}", info.name, info.version);
    }
    let tools = client.list_all_tools().await.map_err(|e| e.to_string())?;
    println!(
        "tools: {}",
        tools
            .iter()
            .map(|t| t.name.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

async fn show_lanes(client: &Client) -> Result<(), String> {
    section("dispatch_lanes");
    let lanes = call(client, "dispatch_lanes", json!({})).await?;
    let lanes_json = lanes.structured_content.clone().unwrap_or_default();
    for lane in lanes_json["lanes"].as_array().into_iter().flatten() {
        println!(
            "{}/{}  (github {}, runs as {})",
            lane["orguser"].as_str().unwrap_or(""),
            lane["repo"].as_str().unwrap_or(""),
            lane["github"].as_str().unwrap_or(""),
            lane["unix_user"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

/// A unit whose task text is shell syntax and an option: data, one argv element. Its handle.
async fn dispatch_demo_unit(client: &Client) -> Result<String, String> {
    section("dispatch_unit");
    let task = "Say hello from the sandbox. Shell syntax stays data: $(rm -rf /) `id` ; --help";
    let dispatched = call(client, "dispatch_unit", json!({"orguser": DEMO_ORGUSER, "repo": DEMO_REPO, "task_description": task, "description": "demo: hello"})).await?;
    if dispatched.is_error == Some(true) {
        return Err(format!("dispatch failed: {}", text(&dispatched)));
    }
    let job = dispatched.structured_content.clone().unwrap_or_default();
    let handle = job["handle"].as_str().unwrap_or_default().to_owned();
    println!(
        "handle {handle}  status {}  requested_at {}",
        job["status"], job["requested_at"]
    );
    Ok(handle)
}

/// Its status at once, then its result once it ended: what the demo's success is judged by.
async fn show_status_and_result(client: &Client, handle: &str) -> Result<Value, String> {
    section("dispatch_status");
    let status = call(client, "dispatch_status", json!({"handle": handle})).await?;
    let status = status.structured_content.unwrap_or_default();
    println!("status {}  detail {}", status["status"], status["detail"]);

    section("dispatch_result (wait_seconds 30)");
    let result = call(
        client,
        "dispatch_result",
        json!({"handle": handle, "wait_seconds": 30}),
    )
    .await?;
    let result = result.structured_content.unwrap_or_default();
    println!(
        "status {}  returncode {}  detail {}",
        result["status"], result["returncode"], result["detail"]
    );
    println!("stdout:");
    for line in result["stdout"]["text"].as_str().unwrap_or("").lines() {
        println!("  | {line}");
    }
    let sandbox = &result["sandbox"];
    println!(
        "sandbox: uid {} gid {}, landlock {}, seccomp {}, no_new_privs {}",
        sandbox["uid"],
        sandbox["gid"],
        sandbox["landlock"],
        sandbox["seccomp"],
        sandbox["no_new_privs"]
    );
    Ok(result)
}

async fn show_list(client: &Client) -> Result<(), String> {
    section("dispatch_list");
    let list = call(client, "dispatch_list", json!({})).await?;
    let list = list.structured_content.unwrap_or_default();
    println!("count {}", list["count"]);
    for item in list["dispatches"].as_array().into_iter().flatten() {
        println!(
            "{}  {}  {}",
            item["handle"].as_str().unwrap_or(""),
            item["status"].as_str().unwrap_or(""),
            item["description"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

/// A dispatch to a lane that is not allowlisted: whether it was refused, as it must be.
async fn show_refusal(client: &Client) -> Result<bool, String> {
    section("dispatch_unit to a lane that is not allowlisted");
    let rejected = call(
        client,
        "dispatch_unit",
        json!({"orguser": DEMO_ORGUSER, "repo": "not-allowlisted", "task_description": "anything"}),
    )
    .await?;
    println!(
        "isError {}: {}",
        rejected.is_error == Some(true),
        text(&rejected)
    );
    Ok(rejected.is_error == Some(true))
}
