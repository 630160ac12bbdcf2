//! What the official Python SDK 1.x spends per tool call checking our output schemas (it checks
//! each schema against its dialect's meta-schema on every call): `benches/sdk1_schema_cost.py`,
//! run with the SDK 1.x that `.ci/setup` installs, prints the figures and their baselines.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = std::env::var_os("DISPATCH_BENCH_PYTHON_SDK1")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".ci/venv-sdk1/bin/python3"));
    if !python.exists() {
        eprintln!(
            "*** SKIPPED client_schema_cost: {} not found (run `bash .ci/setup`) ***",
            python.display()
        );
        return;
    }
    let status = Command::new(python)
        .arg(root.join("benches/sdk1_schema_cost.py"))
        .arg(env!("CARGO_BIN_EXE_dispatch-mcp"))
        .stderr(std::process::Stdio::null())
        .status()
        .expect("run the Python bench");
    assert!(status.success(), "the Python bench failed: {status}");
}
