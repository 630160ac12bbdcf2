//! Test-only lane program. Run by the real helper as a sandboxed lane, it does what the task
//! says (exit, sleep, spam output, echo its argv) or, for `escape {json}`, tries every
//! forbidden thing and prints one JSON line per attempt. The tests decide what counts as a
//! breach; this program only reports what happened.
//!
//! Also used outside the sandbox (`connect SOCKET`) as a plain client running as another user.
#![allow(unsafe_code)]

use serde_json::{Value, json};
use std::ffi::CString;
use std::io::{Read, Write};

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Result of a raw syscall: Ok(value) or Err(errno).
fn sys(rc: i64) -> Result<i64, i32> {
    if rc < 0 { Err(errno()) } else { Ok(rc) }
}

fn report(name: &str, result: Result<i64, i32>) -> Value {
    match result {
        Ok(value) => json!({"check": name, "succeeded": true, "value": value}),
        Err(errno) => json!({"check": name, "succeeded": false, "errno": errno}),
    }
}

/// An i386 syscall (int 0x80, getpid) from a forked child: the filter must kill it with SIGSYS.
/// Reported as succeeded if the child exited normally; the errno field holds the signal.
fn foreign_architecture_syscall() -> Value {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: fork in this single-threaded program; the child only makes the syscall and exits.
    unsafe {
        let child = libc::fork();
        if child == 0 {
            let mut number: u32 = 20;
            std::arch::asm!("int 0x80", inout("eax") number);
            let _ = number;
            libc::_exit(0);
        }
        let mut status = 0;
        libc::waitpid(child, &mut status, 0);
        if libc::WIFSIGNALED(status) {
            return report("foreign_arch_syscall", Err(libc::WTERMSIG(status)));
        }
        report(
            "foreign_arch_syscall",
            Ok(i64::from(libc::WEXITSTATUS(status))),
        )
    }
    #[cfg(not(target_arch = "x86_64"))]
    report("foreign_arch_syscall", Err(libc::SIGSYS))
}

/// An x32 syscall (getpid with the x32 bit) from a forked child, which exits with the errno.
/// Refused with EPERM by the lane's own filter; a systemd unit's `SystemCallArchitectures=native`
/// kills the caller instead, reported as errno 1000 + the signal.
fn x32_syscall() -> Value {
    // SAFETY: fork in this single-threaded program; the child only makes the syscall and exits.
    unsafe {
        let child = libc::fork();
        if child == 0 {
            let rc = libc::syscall(0x4000_0000 | 39);
            libc::_exit(if rc < 0 { errno().min(255) } else { 0 });
        }
        let mut status = 0;
        libc::waitpid(child, &mut status, 0);
        if libc::WIFSIGNALED(status) {
            return report("x32_syscall", Err(1000 + libc::WTERMSIG(status)));
        }
        match libc::WEXITSTATUS(status) {
            0 => report("x32_syscall", Ok(0)),
            errno => report("x32_syscall", Err(errno)),
        }
    }
}

/// The helper's child named `dispatch-reaper`, from /proc/PID/stat (comm and parent pid).
fn find_reaper(helper_pid: i64) -> Option<i64> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: i64 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let (comm, rest) = stat.split_once(" (")?.1.rsplit_once(") ")?;
            let parent: i64 = rest.split_whitespace().nth(1)?.parse().ok()?;
            (comm == "dispatch-reaper" && parent == helper_pid).then_some(pid)
        })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // Template in the tests: [probe, "lane", {orguser}, {repo}, {task}]; outside: [probe, mode, ...].
    let task = if args.get(1).map(String::as_str) == Some("lane") {
        args.get(4).cloned().unwrap_or_default()
    } else {
        args[1..].join(" ")
    };
    let (mode, rest) = task
        .split_once(' ')
        .map_or((task.as_str(), ""), |(m, r)| (m, r));
    match mode {
        _ if mode.starts_with("exit:") => {
            println!("lane ran; exiting with {}", &mode[5..]);
            eprintln!("to stderr");
            std::process::exit(mode[5..].parse().unwrap_or(1));
        }
        _ if mode.starts_with("sleep:") => {
            println!("sleeping");
            std::io::stdout().flush().unwrap();
            std::thread::sleep(std::time::Duration::from_secs(
                mode[6..].parse().unwrap_or(60),
            ));
        }
        _ if mode.starts_with("ticks:") => {
            // A lane that works for a while and says so: one line every 200 ms.
            for tick in 1..=mode[6..].parse::<u32>().unwrap_or(10) {
                println!("tick {tick}");
                eprintln!("err {tick}");
                std::io::stdout().flush().unwrap();
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        }
        _ if mode.starts_with("flood:") => {
            // A lane that prints as fast as it can: MiB of output, in large writes.
            let line = [b'x'; 1023]
                .iter()
                .chain(b"\n")
                .copied()
                .collect::<Vec<u8>>();
            let mut out = std::io::stdout().lock();
            for _ in 0..mode[6..].parse::<usize>().unwrap_or(1) * 1024 {
                out.write_all(&line).unwrap();
            }
            out.flush().unwrap();
        }
        _ if mode.starts_with("sleep-group:") => {
            let seconds: u64 = mode[12..].parse().unwrap_or(60);
            // SAFETY: fork in a single-threaded test program; the child only sleeps and exits.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                std::thread::sleep(std::time::Duration::from_secs(seconds));
                std::process::exit(0);
            }
            println!(
                "{}",
                json!({"lane_pid": std::process::id(), "child_pid": pid})
            );
            std::io::stdout().flush().unwrap();
            std::thread::sleep(std::time::Duration::from_secs(seconds));
        }
        _ if mode.starts_with("leave-child:") => {
            let seconds: u64 = mode[12..].parse().unwrap_or(60);
            // SAFETY: fork in a single-threaded test program; the child only sleeps and exits.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                std::thread::sleep(std::time::Duration::from_secs(seconds));
                std::process::exit(0);
            }
            println!("{}", json!({"left_child": pid}));
        }
        _ if mode.starts_with("spam:") => {
            let bytes: usize = mode[5..].parse().unwrap_or(0);
            let line = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde\n";
            let mut out = std::io::stdout().lock();
            for _ in 0..bytes / line.len() {
                out.write_all(line).unwrap();
            }
            out.write_all(b"END\n").unwrap();
        }
        _ if mode.starts_with("escape-setsid:") => leave_lane(&mode[14..], Leave::Setsid),
        _ if mode.starts_with("escape-setpgid:") => leave_lane(&mode[15..], Leave::Setpgid),
        _ if mode.starts_with("forkbomb") => fork_bomb(),
        _ if mode.starts_with("hog:") => hog(mode[4..].parse().unwrap_or(1024)),
        _ if mode.starts_with("burn:") => burn(mode[5..].parse().unwrap_or(10)),
        "escape" => escape(serde_json::from_str(rest).expect("escape takes a JSON object")),
        "connect" => connect(rest),
        "flood" => flood(rest),
        "hand-over" => hand_over(rest),
        _ => println!("{}", json!({"argv": args})),
    }
}

enum Leave {
    /// Double fork, then `setsid`: a daemon in its own session, reparented away from the lane.
    Setsid,
    /// Fork, then `setpgid(0, 0)`: out of the lane's process group, same session.
    Setpgid,
}

/// `TAG:HOLD`: start a descendant that leaves the lane's process group and lives on, writing
/// its pid to `TAG.pid` in the work dir and appending to `TAG.alive` every 100 ms; then hold
/// the lane for HOLD seconds (0: end it at once).
fn leave_lane(spec: &str, how: Leave) {
    let (tag, hold) = spec.split_once(':').unwrap_or((spec, "0"));
    let hold: u64 = hold.parse().unwrap_or(0);
    let (pid_file, alive_file) = (format!("{tag}.pid"), format!("{tag}.alive"));
    // SAFETY: fork in a single-threaded program; the children only make plain calls below.
    unsafe {
        let first = libc::fork();
        if first == 0 {
            match how {
                Leave::Setsid => {
                    libc::setsid();
                    if libc::fork() != 0 {
                        libc::_exit(0);
                    }
                }
                Leave::Setpgid => {
                    libc::setpgid(0, 0);
                }
            }
            // Detached from the lane's output, so the lane's pipes close when it ends.
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
            for fd in 0..3 {
                libc::dup2(null, fd);
            }
            let _ = std::fs::write(&pid_file, std::process::id().to_string());
            loop {
                let mut alive = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&alive_file);
                if let Ok(file) = alive.as_mut() {
                    let _ = writeln!(file, "alive");
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
        let mut status = 0;
        if matches!(how, Leave::Setsid) {
            libc::waitpid(first, &mut status, 0);
        }
    }
    // Hold the lane until the descendant is surely running.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::fs::metadata(&pid_file).is_err() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    println!(
        "{}",
        json!({"left": std::fs::read_to_string(&pid_file).unwrap_or_default()})
    );
    std::io::stdout().flush().unwrap();
    std::thread::sleep(std::time::Duration::from_secs(hold));
}

/// Fork until the kernel refuses, keeping every child alive, and keep trying for a while as a
/// real fork bomb would; then report how far it got.
fn fork_bomb() {
    let mut forked = 0u32;
    let mut refused = 0u32;
    let mut last_errno = 0;
    while refused < 150 {
        // SAFETY: fork in a single-threaded program; the child only sleeps and exits.
        match unsafe { libc::fork() } {
            0 => {
                std::thread::sleep(std::time::Duration::from_secs(30));
                std::process::exit(0);
            }
            -1 => {
                refused += 1;
                last_errno = errno();
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            _ => forked += 1,
        }
        if forked >= 100_000 {
            break;
        }
    }
    println!("{}", json!({"forked": forked, "errno": last_errno}));
    std::process::exit(3);
}

/// Allocate and touch memory in 4 MiB steps up to `mib`; exit 4 when an allocation fails.
fn hog(mib: usize) {
    let mut held: Vec<Vec<u8>> = Vec::new();
    for step in 0..mib / 4 {
        let mut chunk: Vec<u8> = Vec::new();
        if chunk.try_reserve_exact(4 << 20).is_err() {
            println!("{}", json!({"allocated_mib": step * 4}));
            std::io::stdout().flush().unwrap();
            std::process::exit(4);
        }
        chunk.resize(4 << 20, 1);
        held.push(chunk);
    }
    println!("{}", json!({"allocated_mib": mib}));
}

/// The lane's own cgroup directory (cgroup v2, wherever the hierarchy is mounted).
fn own_cgroup_dir() -> Option<std::path::PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))?
        .trim_start_matches('/');
    // The hierarchy's root is readable; the lane's own directory may not even be reachable.
    ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .iter()
        .map(std::path::Path::new)
        .find(|mount| mount.join("cgroup.controllers").exists())
        .map(|mount| mount.join(path))
}

/// Each way out of (or around) the lane's cgroup; all must fail. Reported as failed with
/// ENOENT when the lane has no cgroup to escape.
fn cgroup_escapes() -> Vec<Value> {
    let Some(dir) = own_cgroup_dir() else {
        return [
            "cgroup_leave",
            "cgroup_raise_limit",
            "cgroup_mkdir",
            "cgroup_kill_others",
        ]
        .iter()
        .map(|name| report(name, Err(libc::ENOENT)))
        .collect();
    };
    let write = |path: std::path::PathBuf, value: &str| {
        std::fs::write(path, value)
            .map(|_| 0)
            .map_err(|e| e.raw_os_error().unwrap_or(-1))
    };
    let parent = dir.parent().unwrap_or(&dir).to_owned();
    vec![
        report("cgroup_leave", write(parent.join("cgroup.procs"), "0")),
        report(
            "cgroup_raise_limit",
            write(dir.join("pids.max"), "max")
                .or_else(|_| write(dir.join("cgroup.max.descendants"), "max")),
        ),
        report(
            "cgroup_mkdir",
            std::fs::create_dir(dir.join("escape"))
                .map(|_| 0)
                .map_err(|e| e.raw_os_error().unwrap_or(-1)),
        ),
        report("cgroup_kill_others", write(parent.join("cgroup.kill"), "1")),
    ]
}

/// Spin on the CPU for `seconds` of wall time.
fn burn(seconds: u64) {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    let mut x = 0u64;
    while std::time::Instant::now() < until {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
    }
    println!("{}", json!({"burned": x % 2}));
}

/// `SOCKET`: a process of the lane connects, hands the connection to its own child and exits,
/// so the pid the helper sees is gone when it checks; the child then tries the handshake and
/// prints the answer. The lane's first process waits for it.
fn hand_over(rest: &str) {
    use dispatch_proto::{FrameLimit, Request, RequestEnvelope, encode_frame};
    let socket = rest
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    // SAFETY: fork in a single-threaded program; each child makes plain calls and exits.
    unsafe {
        if libc::fork() == 0 {
            let Ok(mut stream) = std::os::unix::net::UnixStream::connect(&socket) else {
                libc::_exit(1);
            };
            if libc::fork() != 0 {
                libc::_exit(0);
            }
            std::thread::sleep(std::time::Duration::from_millis(300));
            let hello = Request::Hello {
                version: dispatch_proto::PROTOCOL_VERSION,
                client_name: Some("handed-over".into()),
            };
            let frame =
                encode_frame(&RequestEnvelope { id: 1, body: hello }, FrameLimit::REQUEST).unwrap();
            let _ = stream.write_all(&frame);
            let mut prefix = [0u8; 4];
            let answer = if stream.read_exact(&mut prefix).is_ok() {
                "answered"
            } else {
                "closed"
            };
            println!("{}", json!({"hello": answer}));
            libc::_exit(0);
        }
    }
    std::thread::sleep(std::time::Duration::from_secs(2));
}

/// `SOCKET MILLIS`: connect and close at once, as fast as it can, for MILLIS; print how often.
fn flood(rest: &str) {
    let mut words = rest.split_whitespace();
    let socket = words.next().unwrap_or_default();
    let millis: u64 = words.next().and_then(|m| m.parse().ok()).unwrap_or(1000);
    let until = std::time::Instant::now() + std::time::Duration::from_millis(millis);
    let (mut connected, mut failed) = (0u64, 0u64);
    while std::time::Instant::now() < until {
        match std::os::unix::net::UnixStream::connect(socket) {
            Ok(stream) => {
                connected += 1;
                drop(stream);
            }
            Err(_) => failed += 1,
        }
    }
    println!("{}", json!({"connected": connected, "failed": failed}));
}

/// Connect to the helper socket as whoever runs this, handshake, optionally ask for the status
/// of a handle, and print what happened (as JSON).
fn connect(rest: &str) {
    use dispatch_proto::{
        FrameLimit, Request, RequestEnvelope, ResponseEnvelope, decode, encode_frame,
    };
    let mut words = rest.split_whitespace();
    let socket = words.next().unwrap_or_default();
    let handle = words.next();
    let mut stream = match std::os::unix::net::UnixStream::connect(socket) {
        Ok(stream) => stream,
        Err(error) => {
            println!(
                "{}",
                json!({"connected": false, "error": error.to_string()})
            );
            return;
        }
    };
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(10)));
    let mut exchange = |id: u64, body: Request| -> Value {
        let frame = encode_frame(&RequestEnvelope { id, body }, FrameLimit::REQUEST).unwrap();
        // A peer the helper refuses may find the connection closed before it even writes
        // (EPIPE): either way what matters is whether any reply comes back.
        let _ = stream.write_all(&frame);
        let mut prefix = [0u8; 4];
        if stream.read_exact(&mut prefix).is_err() {
            return json!("closed");
        }
        let mut body = vec![0u8; u32::from_be_bytes(prefix) as usize];
        if stream.read_exact(&mut body).is_err() {
            return json!("truncated");
        }
        match decode::<ResponseEnvelope>(&body) {
            Ok(response) => json!(format!("{:?}", response.body)),
            Err(error) => json!(format!("undecodable: {error}")),
        }
    };
    let hello = exchange(
        1,
        Request::Hello {
            version: dispatch_proto::PROTOCOL_VERSION,
            client_name: Some("probe".into()),
        },
    );
    let status = handle.map(|h| {
        exchange(
            2,
            Request::Status {
                handle: h.to_owned(),
                output_from: None,
            },
        )
    });
    println!(
        "{}",
        json!({"connected": true, "hello": hello, "status": status})
    );
}

fn escape(config: Value) {
    let str_of = |key: &str| config[key].as_str().unwrap_or_default().to_owned();
    let mut checks = Vec::new();

    // Identity and status.
    let (mut r, mut e, mut s) = (0, 0, 0);
    let (mut rg, mut eg, mut sg) = (0, 0, 0);
    // SAFETY: pointers to live locals.
    unsafe {
        libc::getresuid(&mut r, &mut e, &mut s);
        libc::getresgid(&mut rg, &mut eg, &mut sg);
    }
    let mut groups = vec![0 as libc::gid_t; 256];
    // SAFETY: the buffer holds 256 gids.
    let count = unsafe { libc::getgroups(256, groups.as_mut_ptr()) };
    groups.truncate(count.max(0) as usize);
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status.lines().find_map(|l| {
            l.strip_prefix(&format!("{name}:"))
                .map(|v| v.trim().to_owned())
        })
    };
    checks.push(json!({"check": "identity", "uid": [r, e, s], "gid": [rg, eg, sg], "groups": groups,
        "CapEff": field("CapEff"), "CapPrm": field("CapPrm"), "NoNewPrivs": field("NoNewPrivs"), "Seccomp": field("Seccomp")}));

    // Filesystem.
    let outside = str_of("outside_file");
    checks.push(report(
        "write_outside_work_dir",
        std::fs::OpenOptions::new()
            .append(true)
            .open(&outside)
            .and_then(|mut f| f.write_all(b"BREACH"))
            .map(|_| 0)
            .map_err(|e| e.raw_os_error().unwrap_or(-1)),
    ));
    // Beside its own directory, in the lane user's work area (the user's own: only Landlock
    // keeps one job out of another's).
    checks.push(report(
        "write_work_area",
        std::fs::write("../planted-by-a-lane", "BREACH")
            .map(|_| 0)
            .map_err(|e| e.raw_os_error().unwrap_or(-1)),
    ));
    // The lane user's own files, which DAC lets it write: only Landlock keeps a lane from
    // planting what would run later, outside any sandbox.
    let home = std::env::var("HOME").unwrap_or_default();
    for (check, file) in [
        ("write_home_bashrc", format!("{home}/.bashrc")),
        (
            "write_home_authorized_keys",
            format!("{home}/.ssh/authorized_keys"),
        ),
        (
            "write_home_systemd_user_unit",
            format!("{home}/.config/systemd/user/escape.service"),
        ),
    ] {
        checks.push(report(
            check,
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(&file)
                .and_then(|mut f| f.write_all(b"BREACH\n"))
                .map(|_| 0)
                .map_err(|e| e.raw_os_error().unwrap_or(-1)),
        ));
    }
    // A configuration file of the helper's kind under /etc, readable by everyone: only
    // Landlock (which grants what lanes need of /etc, not /etc) stands in the way.
    if let Some(config_file) = config["etc_config_file"].as_str() {
        checks.push(report(
            "read_etc_config",
            std::fs::read(config_file)
                .map(|b| b.len() as i64)
                .map_err(|e| e.raw_os_error().unwrap_or(-1)),
        ));
    }
    let other_home = str_of("other_home_file");
    checks.push(report(
        "read_other_home",
        std::fs::read(&other_home)
            .map(|b| b.len() as i64)
            .map_err(|e| e.raw_os_error().unwrap_or(-1)),
    ));
    // The helper (our parent) and its lane reaper (a fork of it) hold the helper's memory and
    // environment. The reaper must be found, or its check below would fail for the wrong reason.
    let helper_pid = config["helper_pid"].as_i64().unwrap_or(1);
    let reaper = find_reaper(helper_pid);
    checks.push(report("reaper_found", reaper.ok_or(libc::ESRCH)));
    for (name, pid) in [
        ("read_reaper_environ", reaper.unwrap_or(-1)),
        ("read_helper_environ", helper_pid),
    ] {
        let read = std::fs::read(format!("/proc/{pid}/environ"));
        checks.push(report(
            name,
            read.map(|b| b.len() as i64)
                .map_err(|e| e.raw_os_error().unwrap_or(-1)),
        ));
    }
    checks.push(report(
        "parent_is_helper",
        // SAFETY: getppid takes no arguments.
        match i64::from(unsafe { libc::getppid() }) {
            parent if parent == helper_pid => Ok(parent),
            _ => Err(libc::ESRCH),
        },
    ));
    // The job's own directory, where the helper starts the lane.
    let here = std::env::current_dir()
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    let work_file = format!("{here}/probe-write-ok");
    checks.push(report(
        "write_inside_work_dir",
        std::fs::write(&work_file, "ok")
            .map(|_| 0)
            .map_err(|e| e.raw_os_error().unwrap_or(-1)),
    ));

    // Privilege.
    // SAFETY: plain integer arguments.
    checks.push(report(
        "setresuid_root",
        sys(unsafe { libc::setresuid(0, 0, 0) } as i64),
    ));
    let suid = str_of("setuid_binary");
    let output = std::process::Command::new(&suid).arg("-u").output();
    checks.push(json!({"check": "setuid_binary", "output": output.as_ref().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()).unwrap_or_else(|e| format!("error: {e}"))}));

    // Seccomp-denied syscalls (each would succeed or fail differently without the filter).
    // SAFETY: (all below) raw syscalls with arguments that cannot corrupt this process's memory:
    // null or valid pointers to locals, and the kernel rejects or performs the operation.
    unsafe {
        checks.push(report(
            "ptrace_traceme",
            sys(libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0)),
        ));
        let mut local = [0u8; 8];
        let source = [7u8; 8];
        let liov = libc::iovec {
            iov_base: local.as_mut_ptr().cast(),
            iov_len: 8,
        };
        let riov = libc::iovec {
            iov_base: source.as_ptr() as *mut _,
            iov_len: 8,
        };
        checks.push(report(
            "process_vm_readv",
            sys(libc::process_vm_readv(libc::getpid(), &liov, 1, &riov, 1, 0) as i64),
        ));
        let mut params = [0u8; 120];
        checks.push(report(
            "io_uring_setup",
            sys(libc::syscall(
                libc::SYS_io_uring_setup,
                1,
                params.as_mut_ptr(),
            )),
        ));
        // Each of these succeeds (or fails differently, e.g. EFAULT for a null argument) for
        // an unprivileged process without the filter; the filter answers EPERM first.
        let me = libc::getpid();
        let pidfd = libc::syscall(libc::SYS_pidfd_open, me, 0);
        checks.push(report(
            "pidfd_getfd",
            sys(libc::syscall(libc::SYS_pidfd_getfd, pidfd, 0, 0)),
        ));
        checks.push(report(
            "kcmp",
            sys(libc::syscall(
                libc::SYS_kcmp,
                me,
                me,
                0, /* KCMP_FILE */
                0,
                0,
            )),
        ));
        let advice = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        checks.push(report(
            "process_madvise",
            sys(libc::syscall(
                libc::SYS_process_madvise,
                pidfd,
                &raw const advice,
                1,
                20, /* MADV_COLD */
                0,
            )),
        ));
        checks.push(report(
            "fanotify_init",
            // FAN_CLASS_NOTIF | FAN_REPORT_FID, allowed unprivileged since Linux 5.13.
            sys(libc::syscall(
                libc::SYS_fanotify_init,
                0x0000_0200,
                libc::O_RDONLY,
            )),
        ));
        checks.push(report("listmount", sys(libc::syscall(458, 0, 0, 0, 0))));
        checks.push(report("statmount", sys(libc::syscall(457, 0, 0, 0, 0))));
        let root = CString::new("/").unwrap();
        checks.push(report(
            "open_tree_attr",
            sys(libc::syscall(467, libc::AT_FDCWD, root.as_ptr(), 0, 0, 0)),
        ));
        let mut size: u32 = 0;
        checks.push(report(
            "lsm_list_modules",
            sys(libc::syscall(461, 0, &raw mut size, 0)),
        ));
        let mut ldt = [0u8; 16];
        checks.push(report(
            "modify_ldt",
            sys(libc::syscall(
                libc::SYS_modify_ldt,
                0,
                ldt.as_mut_ptr(),
                ldt.len(),
            )),
        ));
        // Socket families no lane needs (netlink and AF_ALG open unprivileged without the
        // filter), and a socketpair of anything but AF_UNIX (EOPNOTSUPP without it).
        checks.push(report(
            "netlink_socket",
            sys(libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, 0 /* NETLINK_ROUTE */) as i64),
        ));
        checks.push(report(
            "alg_socket",
            sys(libc::socket(libc::AF_ALG, libc::SOCK_SEQPACKET, 0) as i64),
        ));
        // Internet sockets of kinds and protocols no lane needs (module autoloading).
        checks.push(report(
            "sctp_socket",
            sys(libc::socket(libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_SCTP) as i64),
        ));
        checks.push(report(
            "dccp_socket",
            sys(libc::socket(libc::AF_INET6, libc::SOCK_DCCP, libc::IPPROTO_DCCP) as i64),
        ));
        let mut pair = [0i32; 2];
        checks.push(report(
            "inet_socketpair",
            sys(libc::socketpair(libc::AF_INET, libc::SOCK_STREAM, 0, pair.as_mut_ptr()) as i64),
        ));
        // Whatever these opened (a breach, reported above) must not look like an inherited fd.
        libc::close(pidfd as i32);
        for check in checks.iter().rev().take(14) {
            if check["succeeded"] == true
                && let Some(fd) = check["value"].as_i64().filter(|&fd| fd > 2)
            {
                libc::close(fd as i32);
            }
        }
        let mut attr = [0u8; 128];
        checks.push(report(
            "bpf",
            sys(libc::syscall(
                libc::SYS_bpf,
                0, /* BPF_MAP_CREATE */
                attr.as_mut_ptr(),
                128,
            )),
        ));
        checks.push(report(
            "unshare_newuser",
            sys(libc::unshare(libc::CLONE_NEWUSER) as i64),
        ));
        let tmp = CString::new("/tmp").unwrap();
        let fstype = CString::new("tmpfs").unwrap();
        checks.push(report(
            "mount",
            sys(libc::mount(
                fstype.as_ptr(),
                tmp.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            ) as i64),
        ));
        checks.push(report(
            "keyctl",
            sys(libc::syscall(
                libc::SYS_keyctl,
                0,  /* KEYCTL_GET_KEYRING_ID */
                -3, /* session */
                0,
            )),
        ));
        let c = b'x';
        checks.push(report(
            "tiocsti",
            sys(libc::ioctl(0, libc::TIOCSTI, &c) as i64),
        ));
        // The same command with garbage in the upper 32 bits (CVE-2019-10063).
        checks.push(report(
            "tiocsti_high_bits",
            sys(libc::syscall(
                libc::SYS_ioctl,
                0,
                0xdead_beef_0000_0000u64 | libc::TIOCSTI,
                &c,
            )),
        ));
        // x32 alias of getpid (39 | X32 bit).
        // In a forked child: a unit with SystemCallArchitectures=native kills the caller.
        checks.push(x32_syscall());
        // clone3 with a zero size: the kernel itself would answer EINVAL; the filter answers
        // ENOSYS before the kernel looks, so libc falls back to clone, whose flags it checks.
        checks.push(report(
            "clone3",
            sys(libc::syscall(
                libc::SYS_clone3,
                std::ptr::null::<u8>(),
                0usize,
            )),
        ));
        checks.push(foreign_architecture_syscall());
        checks.push(report(
            "kill_helper",
            sys(libc::kill(config["helper_pid"].as_i64().unwrap_or(1) as i32, 0) as i64),
        ));
        checks.push(report(
            "unix_socket",
            sys(libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) as i64),
        ));
    }
    let helper_socket = std::os::unix::net::UnixStream::connect(str_of("helper_socket"));
    checks.push(report(
        "connect_helper_socket",
        helper_socket
            .map(|_| 0)
            .map_err(|e| e.raw_os_error().unwrap_or(-1)),
    ));

    // Its own cgroup: leave it for its parent, raise its limits, make a sub-cgroup.
    checks.extend(cgroup_escapes());

    // Network.
    checks.push(report(
        "tcp_bind",
        std::net::TcpListener::bind("127.0.0.1:0")
            .map(|_| 0)
            .map_err(|e| e.raw_os_error().unwrap_or(-1)),
    ));
    for (name, key) in [
        ("tcp_connect_denied_port", "denied_port"),
        ("tcp_connect_allowed_port", "allowed_port"),
    ] {
        let port = config[key].as_u64().unwrap_or(0);
        checks.push(report(
            name,
            std::net::TcpStream::connect(("127.0.0.1", port as u16))
                .map(|_| 0)
                .map_err(|e| e.raw_os_error().unwrap_or(-1)),
        ));
    }

    // File descriptors: everything open above 2 (the listing's own fd excluded).
    let fds: Vec<i64> = std::fs::read_dir("/proc/self/fd")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    checks.push(json!({"check": "fds", "open": fds}));

    // Environment.
    let env: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
    checks.push(json!({"check": "env", "names": env}));

    // Limits.
    let mut nofile = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: pointer to a live local.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut nofile) };
    let mut opened = Vec::new();
    for _ in 0..(nofile.rlim_cur as usize + 10) {
        match std::fs::File::open("/dev/null") {
            Ok(f) => opened.push(f),
            Err(_) => break,
        }
    }
    checks.push(json!({"check": "nofile", "limit": nofile.rlim_cur, "opened": opened.len()}));
    drop(opened);
    // SAFETY: ignoring SIGXFSZ so an over-limit write returns EFBIG instead of killing us.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let big = "probe-big";
    let fsize = config["fsize"].as_u64().unwrap_or(0) as usize;
    let written = std::fs::write(big, vec![b'x'; fsize + 4096]);
    let size = std::fs::metadata(big).map(|m| m.len()).unwrap_or(0);
    checks.push(json!({"check": "fsize", "write_ok": written.is_ok(), "size": size}));

    for check in checks {
        println!("{check}");
    }
}
