//! The escape suite: a probe runs as a lane through the real helper and tries every forbidden
//! thing; each attempt must fail. A success (or exit 0) from a forbidden action is a breach.

mod support;

use dispatch_proto::*;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use support::*;

const EPERM: i64 = 1;
const SUID_COPY: &str = "/usr/local/bin/dispatch-test-suid-id";
const NOFILE: u64 = 64;
const FSIZE: u64 = 1 << 20;

fn checks(stdout: &str) -> BTreeMap<String, Value> {
    stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .map(|v| (v["check"].as_str().unwrap_or_default().to_owned(), v))
        .collect()
}

fn assert_denied(checks: &BTreeMap<String, Value>, name: &str, errno: Option<i64>) {
    let check = checks
        .get(name)
        .unwrap_or_else(|| panic!("probe did not report {name}"));
    assert_eq!(
        check["succeeded"], false,
        "BREACH: {name} succeeded inside the sandbox: {check}"
    );
    if let Some(errno) = errno {
        assert_eq!(
            check["errno"], errno,
            "{name} failed, but not by the sandbox's denial: {check}"
        );
    }
}

#[tokio::test]
async fn a_lane_cannot_escape() {
    if !is_root() {
        return skip(
            "escape suite",
            "needs root: real uid drops to real test users",
        );
    }
    ensure_users();
    let alice = user(ALICE);

    // Things to attack.
    let scratch = tempfile::Builder::new()
        .prefix("dispatch-escape")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let outside = scratch.path().join("outside.txt");
    std::fs::write(&outside, "original").unwrap();
    // Owned by the lane user, so only Landlock stands between the lane and this file.
    nix::unistd::chown(&outside, Some(alice.uid), Some(alice.gid)).unwrap();
    let other_home_file = user(BOB).dir.join("readable.txt");
    std::fs::write(&other_home_file, "bob's").unwrap();
    std::fs::set_permissions(&other_home_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::copy("/usr/bin/id", SUID_COPY).unwrap();
    std::fs::set_permissions(SUID_COPY, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let allowed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let denied = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let allowed_port = allowed.local_addr().unwrap().port();
    let denied_port = denied.local_addr().unwrap().port();

    // 100 descriptors without CLOEXEC, inherited by the helper.
    let mut held = Vec::new();
    for _ in 0..100 {
        let file = std::fs::File::open("/dev/null").unwrap();
        nix::fcntl::fcntl(
            &file,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )
        .unwrap();
        held.push(file);
    }
    let helper = TestHelper::start(HelperOptions {
        // The probe does not parse options, so option-like tasks may reach it: that is what the
        // one-literal-argument check at the end needs.
        extra_toml: "allow_option_like_tasks = true\n".into(),
        env: vec![
            ("LD_PRELOAD".into(), "/nonexistent/dispatch-evil.so".into()),
            ("DISPATCH_TEST_SECRET".into(), "must-not-leak".into()),
        ],
        sandbox_toml: format!(
            "tcp_connect_ports = [{allowed_port}]\n[sandbox.limits]\nnofile = {NOFILE}\nfsize = {FSIZE}\n"
        ),
        ..Default::default()
    });
    drop(held);
    let helper_fds = std::fs::read_dir(format!("/proc/{}/fd", helper.pid()))
        .unwrap()
        .count();
    assert!(
        helper_fds >= 100,
        "the helper should hold the 100 inherited fds, has {helper_fds}"
    );

    // Where the deployed helper keeps its configuration: under /etc.
    let etc_dir = tempfile::Builder::new()
        .prefix("dispatch-mcp-escape-")
        .tempdir_in("/etc")
        .unwrap();
    std::fs::set_permissions(etc_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let etc_config_file = etc_dir.path().join("repos.json");
    std::fs::write(&etc_config_file, ALLOWLIST).unwrap();
    std::fs::set_permissions(&etc_config_file, std::fs::Permissions::from_mode(0o644)).unwrap();

    let work_dir = alice.dir.join("dispatch-work");
    let config = json!({
        "etc_config_file": etc_config_file,
        "outside_file": outside,
        "other_home_file": other_home_file,
        "work_dir": work_dir,
        "setuid_binary": SUID_COPY,
        "helper_pid": helper.pid(),
        "helper_socket": helper.socket,
        "allowed_port": allowed_port,
        "denied_port": denied_port,
        "fsize": FSIZE,
    });
    let mut client = helper.client().await;
    let job = client
        .dispatch_ok("alice-org", "alice-repo", &format!("escape {config}"))
        .await;
    let done = client.result(&job.handle, 30_000).await;
    let stdout = done
        .stdout
        .as_ref()
        .map(|t| t.text.clone())
        .unwrap_or_default();
    let stderr = done
        .stderr
        .as_ref()
        .map(|t| t.text.clone())
        .unwrap_or_default();
    assert_eq!(
        done.state,
        JobState::Succeeded,
        "probe did not complete: {done:?}\n{stderr}"
    );
    eprintln!("probe report:\n{stdout}");
    let checks = checks(&stdout);

    // Identity: exactly the org-user's, no capabilities, no_new_privs, seccomp filter mode.
    let identity = &checks["identity"];
    let uid = alice.uid.as_raw();
    let gid = alice.gid.as_raw();
    assert_eq!(identity["uid"], json!([uid, uid, uid]), "{identity}");
    assert_eq!(identity["gid"], json!([gid, gid, gid]), "{identity}");
    let expected_groups: Vec<u32> =
        nix::unistd::getgrouplist(&std::ffi::CString::new(ALICE).unwrap(), alice.gid)
            .unwrap()
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
    let mut groups: Vec<u32> = serde_json::from_value(identity["groups"].clone()).unwrap();
    groups.sort_unstable();
    let mut expected = expected_groups.clone();
    expected.sort_unstable();
    expected.dedup();
    assert_eq!(groups, expected, "supplementary groups");
    assert_eq!(identity["CapEff"], "0000000000000000");
    assert_eq!(identity["CapPrm"], "0000000000000000");
    assert_eq!(identity["NoNewPrivs"], "1");
    assert_eq!(identity["Seccomp"], "2");

    // Filesystem (Landlock).
    assert_denied(&checks, "write_outside_work_dir", None);
    assert_eq!(
        std::fs::read_to_string(&outside).unwrap(),
        "original",
        "BREACH: the file outside the work dir changed"
    );
    assert_denied(&checks, "read_other_home", None);
    for planted in [
        "write_work_area",
        "write_home_bashrc",
        "write_home_authorized_keys",
        "write_home_systemd_user_unit",
    ] {
        assert_denied(&checks, planted, None);
    }
    assert_denied(&checks, "read_etc_config", Some(libc::EACCES as i64));
    assert_eq!(
        checks["reaper_found"]["succeeded"], true,
        "the lane reaper must be running: {}",
        checks["reaper_found"]
    );
    assert_eq!(checks["parent_is_helper"]["succeeded"], true);
    assert_denied(&checks, "read_reaper_environ", None);
    assert_denied(&checks, "read_helper_environ", None);
    assert_eq!(
        checks["write_inside_work_dir"]["succeeded"], true,
        "the work dir must stay writable"
    );

    // Privilege.
    assert_denied(&checks, "setresuid_root", None);
    assert_eq!(
        checks["setuid_binary"]["output"],
        uid.to_string(),
        "BREACH: a setuid-root binary raised privileges"
    );

    // seccomp: each denial is EPERM from the filter, not the kernel's own answer.
    for name in [
        "ptrace_traceme",
        "process_vm_readv",
        "io_uring_setup",
        "bpf",
        "unshare_newuser",
        "mount",
        "keyctl",
        "tiocsti",
        "tiocsti_high_bits",
        "x32_syscall",
        "unix_socket",
        "pidfd_getfd",
        "kcmp",
        "process_madvise",
        "fanotify_init",
        "listmount",
        "statmount",
        "open_tree_attr",
        "lsm_list_modules",
        "modify_ldt",
        "netlink_socket",
        "alg_socket",
        "sctp_socket",
        "dccp_socket",
        "inet_socketpair",
    ] {
        assert_denied(&checks, name, Some(EPERM));
    }

    // The ABI gate: clone3 answers ENOSYS (so libc falls back to clone, which the deny list
    // inspects) and a 32-bit syscall kills the process.
    assert_denied(&checks, "clone3", Some(libc::ENOSYS as i64));
    assert_denied(&checks, "foreign_arch_syscall", Some(libc::SIGSYS as i64));

    // Signals and the helper.
    assert_denied(&checks, "kill_helper", None);
    // The lane's cgroup is the boundary: it cannot leave it, raise its limits, nest in it, or
    // kill the other lanes through their parent.
    for name in [
        "cgroup_leave",
        "cgroup_raise_limit",
        "cgroup_mkdir",
        "cgroup_kill_others",
    ] {
        assert_denied(&checks, name, None);
    }
    assert_denied(&checks, "connect_helper_socket", None);

    // Network (Landlock ABI ≥ 4).
    assert_denied(&checks, "tcp_bind", None);
    assert_denied(&checks, "tcp_connect_denied_port", None);
    assert_eq!(
        checks["tcp_connect_allowed_port"]["succeeded"], true,
        "the configured port must stay reachable"
    );

    // Nothing inherited: fds 0-2 plus the probe's own /proc/self/fd listing.
    let open: Vec<i64> = serde_json::from_value(checks["fds"]["open"].clone()).unwrap();
    let extra: Vec<i64> = open.iter().copied().filter(|fd| *fd > 2).collect();
    assert!(
        extra.len() <= 1,
        "BREACH: inherited fds {extra:?} (the helper held {helper_fds})"
    );

    // A clean environment.
    let mut names: Vec<String> = serde_json::from_value(checks["env"]["names"].clone()).unwrap();
    names.sort();
    assert_eq!(
        names,
        ["HOME", "LANG", "LOGNAME", "PATH", "TMPDIR", "USER"],
        "environment leaked"
    );

    // Limits.
    assert_eq!(checks["nofile"]["limit"], NOFILE);
    assert!(
        checks["nofile"]["opened"].as_u64().unwrap() < NOFILE,
        "{}",
        checks["nofile"]
    );
    assert_eq!(checks["fsize"]["write_ok"], false, "{}", checks["fsize"]);
    assert!(checks["fsize"]["size"].as_u64().unwrap() <= FSIZE);

    // The task is one literal argument, whatever it looks like.
    for task in ["--help", "-c 'id'", "$(touch /tmp/pwned)", "a\nb"] {
        let job = client.dispatch_ok("alice-org", "alice-repo", task).await;
        let done = client.result(&job.handle, 20_000).await;
        let printed: Value =
            serde_json::from_str(done.stdout.as_ref().unwrap().text.trim()).unwrap();
        assert_eq!(printed["argv"].as_array().unwrap().len(), 5, "{printed}");
        assert_eq!(printed["argv"][4], task, "{printed}");
    }
    assert!(!std::path::Path::new("/tmp/pwned").exists());
    let _ = std::fs::remove_file(SUID_COPY);
    drop((allowed, denied));
}
