//! `dispatch-mcp`: the unprivileged MCP front. It holds no privilege and makes no security
//! decision: tool calls become helper requests, helper answers become MCP results.
#![forbid(unsafe_code)]

pub mod demo;
pub mod embedded;
pub mod helper_client;
pub mod mcp;
pub mod service;

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
    /// Serve MCP on stdio (the default).
    Serve {
        /// Start a private helper process for this session (no systemd, no root needed).
        /// Honours DISPATCH_REPOS_JSON, DISPATCH_SSH_HOST, DISPATCH_MAX_ITERATIONS,
        /// DISPATCH_TIMEOUT and PATH like the Python server; without DISPATCH_REPOS_JSON it
        /// serves a demo allowlist and a harmless demo lane.
        #[arg(long)]
        embedded_helper: bool,
        /// Helper socket (default: DISPATCH_HELPER_SOCKET, else /run/dispatch-mcp/helper.sock).
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
        socket: None,
    }) {
        Command::Serve {
            embedded_helper,
            socket,
        } => runtime.block_on(serve(embedded_helper, socket)),
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

async fn serve(embedded_helper: bool, socket: Option<PathBuf>) -> Result<(), String> {
    let mut _embedded = None;
    let socket = if embedded_helper {
        let dir = std::env::var_os("DISPATCH_EMBEDDED_DIR").map(PathBuf::from);
        let helper = embedded::start(dir).await?;
        eprintln!(
            "dispatch-mcp: embedded helper ({}) on {}; audit log {}",
            if helper.drop_in {
                "drop-in: DISPATCH_REPOS_JSON and dotfiles-dispatch"
            } else {
                "demo lanes"
            },
            helper.socket.display(),
            helper.audit_log.display()
        );
        let socket = helper.socket.clone();
        _embedded = Some(helper);
        socket
    } else {
        socket
            .or_else(|| {
                std::env::var_os("DISPATCH_HELPER_SOCKET")
                    .filter(|s| !s.is_empty())
                    .map(PathBuf::from)
            })
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
    };
    let service = service::DispatchService::new(helper_client::HelperClient::new(socket));
    let running = mcp::DispatchServer::new(service)
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| format!("MCP initialize failed: {e}"))?;
    running
        .waiting()
        .await
        .map_err(|e| format!("MCP session ended with an error: {e}"))?;
    Ok(())
}
