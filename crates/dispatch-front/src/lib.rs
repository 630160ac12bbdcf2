//! `dispatch-mcp`: the unprivileged MCP front. It holds no privilege and makes no security
//! decision: tool calls become helper requests, helper answers become MCP results.
#![forbid(unsafe_code)]

pub mod demo;
pub mod embedded;
pub mod helper_client;
pub mod mcp;
pub mod personal;
pub mod schemas;
pub mod service;
pub mod task_wire;
pub mod tasks;

use clap::{Parser, Subcommand};
use rmcp::ServiceExt;
use std::path::PathBuf;
use std::process::ExitCode;

pub const DEFAULT_SOCKET: &str = "/run/dispatch-mcp/helper.sock";

#[derive(Debug, Parser)]
#[command(
    name = "dispatch-mcp",
    version,
    about = "MCP server (stdio) that dispatches units of work to allowlisted org-user/repo lanes \
             through the dispatch-helper daemon. Run without arguments, it serves MCP on stdio."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve MCP on stdio (the default). Uses the system helper when its socket answers, else
    /// the user's personal helper (started on demand, shared by all of the user's fronts, and
    /// configured from this environment as the Python server was: DISPATCH_REPOS_JSON, default
    /// ~/.repos.json; DISPATCH_SSH_HOST; DISPATCH_MAX_ITERATIONS; DISPATCH_TIMEOUT; PATH).
    Serve {
        /// Use the personal helper even if a system helper answers.
        #[arg(long)]
        embedded_helper: bool,
        /// A private demo helper for this session only (used by `dispatch-mcp demo`).
        #[arg(long, hide = true)]
        demo_helper: bool,
        /// Helper socket (default: DISPATCH_HELPER_SOCKET, else the system helper's
        /// /run/dispatch-mcp/helper.sock if it answers, else the personal helper).
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Run the whole path once on this machine, printing each step: an embedded helper, the
    /// real front over stdio, every tool, a rejected dispatch, and where the audit log is.
    Demo,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // stdout is the MCP channel: logs go to stderr only.
    let filter = tracing_subscriber::EnvFilter::try_from_env("DISPATCH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("dispatch-mcp: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = match cli.command.unwrap_or(Command::Serve {
        embedded_helper: false,
        demo_helper: false,
        socket: None,
    }) {
        Command::Serve {
            embedded_helper,
            demo_helper,
            socket,
        } => runtime.block_on(serve(embedded_helper, demo_helper, socket)),
        Command::Demo => runtime.block_on(demo::run()),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("dispatch-mcp: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The helper this front talks to: the socket it was told, else the system helper if it
/// answers, else the user's personal one.
async fn choose_helper(
    personal: bool,
    demo: bool,
    socket: Option<PathBuf>,
) -> Result<
    (
        helper_client::HelperClient,
        Option<embedded::EmbeddedHelper>,
    ),
    String,
> {
    if demo {
        let dir = std::env::var_os("DISPATCH_EMBEDDED_DIR").map(PathBuf::from);
        let helper = embedded::start(dir).await?;
        eprintln!(
            "dispatch-mcp: demo helper on {}; audit log {}",
            helper.socket.display(),
            helper.audit_log.display()
        );
        let client = helper_client::HelperClient::new(helper.socket.clone());
        return Ok((client, Some(helper)));
    }
    let told = socket.or_else(|| {
        std::env::var_os("DISPATCH_HELPER_SOCKET")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
    });
    let lane_env = personal::lane_env_of_this_process();
    if let Some(socket) = told {
        let client = helper_client::HelperClient::new(socket).with_lane_env(lane_env);
        return Ok((client, None));
    }
    if !personal {
        // A real handshake, not a bare connect: the helper audits connections that say nothing.
        // A system helper that answers but does not admit this user is still the one to use:
        // its refusal, not a personal helper, is what the user should see.
        let system = helper_client::HelperClient::new(PathBuf::from(DEFAULT_SOCKET))
            .with_lane_env(lane_env.clone());
        if std::path::Path::new(DEFAULT_SOCKET).exists()
            && matches!(
                system.hello().await,
                Ok(_) | Err(helper_client::HelperError::NotAdmitted { .. })
            )
        {
            return Ok((system, None));
        }
    }
    personal::warn_about_numbers();
    let launcher = personal::Launcher::prepare()?;
    Ok((
        helper_client::HelperClient::personal(launcher).with_lane_env(lane_env),
        None,
    ))
}

async fn serve(personal: bool, demo: bool, socket: Option<PathBuf>) -> Result<(), String> {
    let (client, _demo) = choose_helper(personal, demo, socket).await?;
    let service = service::DispatchService::new(client);
    let (input, output) = rmcp::transport::stdio();
    let adapted = task_wire::adapt(input, output);
    let running = mcp::DispatchServer::new(service)
        .serve((adapted.reader, adapted.writer))
        .await
        .map_err(|e| format!("MCP initialize failed: {e}"))?;
    let ended = running.waiting().await;
    // rmcp's last answers are in the adapter's pipe: out to stdout before the process ends.
    let _ = adapted.flushed.await;
    ended.map_err(|e| format!("MCP session ended with an error: {e}"))?;
    Ok(())
}
