//! The harmless lane program the embedded demo dispatches to. It takes the same arguments as
//! `dotfiles-dispatch` (`ORGUSER REPO TASK --host HOST --max N`), does no work, and reports
//! what it received and the sandbox it finds itself in, so the demo can show both.
#![forbid(unsafe_code)]

use std::io::Write;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (orguser, repo, task) = match args.as_slice() {
        [orguser, repo, task, ..] => (orguser, repo, task),
        _ => {
            eprintln!("usage: dispatch-demo-lane ORGUSER REPO TASK [--host HOST] [--max N]");
            std::process::exit(2);
        }
    };
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!("{name}:"))
                    .map(|v| v.trim().to_owned())
            })
            .unwrap_or_else(|| "?".into())
    };
    // /tmp is writable by everyone as far as file modes go: only Landlock can refuse this.
    let probe = std::path::Path::new("/tmp").join(format!(
        "dispatch-demo-landlock-probe-{}",
        std::process::id()
    ));
    let outside_write = match std::fs::write(&probe, "x") {
        Ok(()) => {
            let _ = std::fs::remove_file(&probe);
            "ALLOWED (Landlock is not in force)".to_owned()
        }
        Err(error) => format!("denied ({error})"),
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "demo lane: would dispatch to {orguser}/{repo}");
    let _ = writeln!(
        out,
        "task (one argv element, {} chars): {task}",
        task.chars().count()
    );
    let _ = writeln!(out, "extra args: {:?}", &args[3..]);
    let _ = writeln!(
        out,
        "running as uid {} in {}",
        field("Uid"),
        std::env::current_dir()
            .map(|d| d.display().to_string())
            .unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "NoNewPrivs {}  Seccomp {}  CapEff {}",
        field("NoNewPrivs"),
        field("Seccomp"),
        field("CapEff")
    );
    let _ = writeln!(out, "writing outside the work dir (/tmp): {outside_write}");
}
