//! Socket-level tests against the real `dispatch-helper` binary: every hostile input gets a
//! clear error or a closed connection, is audited, spawns nothing, and the helper keeps serving.

mod support;

use dispatch_proto::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;
use support::*;

/// Send raw bytes on a fresh connection and collect whatever comes back until the helper closes.
fn raw_exchange(helper: &TestHelper, bytes: &[u8], shutdown_write: bool) -> Vec<u8> {
    let mut stream = UnixStream::connect(&helper.socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = stream.write_all(bytes);
    if shutdown_write {
        let _ = stream.shutdown(std::net::Shutdown::Write);
    }
    let mut reply = Vec::new();
    let result = stream.read_to_end(&mut reply);
    assert!(
        result.is_ok() || !reply.is_empty(),
        "the helper neither replied nor closed: {result:?}"
    );
    reply
}

fn hello_frame() -> Vec<u8> {
    encode_frame(
        &RequestEnvelope {
            id: 1,
            body: Request::Hello {
                version: PROTOCOL_VERSION,
                client_name: None,
            },
        },
        FrameLimit::REQUEST,
    )
    .unwrap()
}

/// Decode every response frame in a byte stream.
fn responses(mut bytes: &[u8]) -> Vec<Response> {
    let mut out = Vec::new();
    while bytes.len() >= 4 {
        let len = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
        let envelope: ResponseEnvelope = decode(&bytes[4..4 + len]).unwrap();
        out.push(envelope.body);
        bytes = &bytes[4 + len..];
    }
    out
}

fn protocol_error_text(reply: &[u8]) -> String {
    match responses(reply).last() {
        Some(Response::Error(ErrorReply {
            kind: ErrorKind::Protocol,
            message,
        })) => message.clone(),
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

async fn still_serves(helper: &TestHelper) {
    // The next legitimate client is served (after, at most, the helper has worked through a
    // flood it was just sent).
    let mut client = None;
    for _ in 0..100 {
        if let Some(connected) = try_client(helper).await {
            client = Some(connected);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut client = client.expect("the helper stopped serving legitimate clients");
    match client.request(Request::Lanes).await {
        Response::Lanes { lanes } => assert_eq!(lanes.len(), 2, "{lanes:?}"),
        other => panic!("helper stopped serving: {other:?}"),
    }
}

async fn try_client(helper: &TestHelper) -> Option<Client> {
    let stream = tokio::net::UnixStream::connect(&helper.socket).await.ok()?;
    let mut stream = stream;
    let hello = RequestEnvelope {
        id: 1,
        body: Request::Hello {
            version: PROTOCOL_VERSION,
            client_name: None,
        },
    };
    write_frame(&mut stream, &hello, FrameLimit::REQUEST)
        .await
        .ok()?;
    let _: ResponseEnvelope = read_frame(&mut stream, FrameLimit::RESPONSE).await.ok()??;
    drop(stream);
    Some(helper.client().await)
}

fn violations_mentioning(helper: &TestHelper, text: &str) -> usize {
    helper
        .audit_lines()
        .iter()
        .filter(|l| {
            l["event"] == "protocol_violation"
                && l["detail"].as_str().unwrap_or_default().contains(text)
        })
        .count()
}

#[tokio::test]
async fn hostile_frames_close_only_their_connection_and_are_audited() {
    let Some(helper) = start_helper("hostile_frames", HelperOptions::default()) else {
        return;
    };

    // Garbage before the handshake.
    let reply = raw_exchange(&helper, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", true);
    assert!(
        protocol_error_text(&reply).contains("oversized frame"),
        "{reply:?}"
    );

    // Truncated frame: the prefix promises 100 bytes, 10 arrive, then EOF.
    let mut truncated = 100u32.to_be_bytes().to_vec();
    truncated.extend_from_slice(&[1; 10]);
    let reply = raw_exchange(&helper, &truncated, true);
    assert!(protocol_error_text(&reply).contains("truncated frame"));

    // A 4 GiB length prefix.
    let reply = raw_exchange(&helper, &u32::MAX.to_be_bytes(), false);
    assert!(
        protocol_error_text(&reply).contains("length prefix 4294967295 exceeds the limit of 65536")
    );

    // A frame one byte over the limit, after a valid handshake.
    let mut over = hello_frame();
    over.extend_from_slice(&(MAX_REQUEST_FRAME + 1).to_be_bytes());
    over.extend(std::iter::repeat_n(0u8, MAX_REQUEST_FRAME as usize + 1));
    let reply = raw_exchange(&helper, &over, false);
    assert!(matches!(responses(&reply)[0], Response::Hello(_)));
    assert!(protocol_error_text(&reply).contains("exceeds the limit"));

    // An unknown message type after the handshake.
    let mut unknown = hello_frame();
    unknown.extend_from_slice(&[0, 0, 0, 2, 2, 100]);
    let reply = raw_exchange(&helper, &unknown, false);
    assert!(protocol_error_text(&reply).contains("unknown message"));

    // A request before the handshake.
    let lanes = encode_frame(
        &RequestEnvelope {
            id: 9,
            body: Request::Lanes,
        },
        FrameLimit::REQUEST,
    )
    .unwrap();
    let reply = raw_exchange(&helper, &lanes, false);
    assert!(protocol_error_text(&reply).contains("must be Hello"));

    // The wrong protocol version.
    let old = encode_frame(
        &RequestEnvelope {
            id: 1,
            body: Request::Hello {
                version: 99,
                client_name: None,
            },
        },
        FrameLimit::REQUEST,
    )
    .unwrap();
    let reply = raw_exchange(&helper, &old, false);
    assert!(protocol_error_text(&reply).contains(&format!(
        "wrong protocol version: peer speaks 99, this side speaks {PROTOCOL_VERSION}"
    )));

    still_serves(&helper).await;
    wait_until(
        "the violations to be audited",
        Duration::from_secs(10),
        || helper.audited("protocol_violation").len() >= 7,
    );
    for text in [
        "oversized",
        "truncated",
        "4294967295",
        "unknown message",
        "before the handshake",
        "wrong protocol version",
    ] {
        assert!(
            violations_mentioning(&helper, text) >= 1,
            "no audit record mentions {text:?}"
        );
    }
    // None of this spawned anything.
    assert!(helper.audited("dispatch_accepted").is_empty());
}

/// How many more refusals a coalesced audit record stands for.
fn held_back(detail: &str) -> u64 {
    detail
        .split_once("(and ")
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_thousand_dropped_connections_do_not_stop_the_helper() {
    let Some(helper) = start_helper("thousand_connections", HelperOptions::default()) else {
        return;
    };
    for _ in 0..1000 {
        drop(UnixStream::connect(&helper.socket).unwrap());
    }
    still_serves(&helper).await;
    // Each is audited as closed before the handshake, or refused at the connection limit:
    // one record each for a burst, then records that count the ones held back.
    support::wait_until("1000 audited refusals", Duration::from_secs(30), || {
        let mut records = helper.audited("protocol_violation");
        records.extend(helper.audited("connection_refused"));
        let counted: u64 = records
            .iter()
            .map(|r| 1 + held_back(r["detail"].as_str().unwrap_or_default()))
            .sum();
        counted >= 1000
    });
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_the_timeout() {
    let options = HelperOptions {
        extra_toml: "[limits]\nidle_timeout_seconds = 1\n".into(),
        ..Default::default()
    };
    let Some(helper) = start_helper("idle_connection", options) else {
        return;
    };
    let mut idle = UnixStream::connect(&helper.socket).unwrap();
    idle.write_all(&hello_frame()).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let started = std::time::Instant::now();
    let mut all = Vec::new();
    idle.read_to_end(&mut all).unwrap();
    assert!(
        matches!(responses(&all)[..], [Response::Hello(_)]),
        "only the hello reply, then EOF"
    );
    assert!(started.elapsed() < Duration::from_secs(8));
    // A connection that has made requests is closed once it falls idle, too.
    let mut used = UnixStream::connect(&helper.socket).unwrap();
    let mut frames = hello_frame();
    frames.extend(
        encode_frame(
            &RequestEnvelope {
                id: 2,
                body: Request::Lanes,
            },
            FrameLimit::REQUEST,
        )
        .unwrap(),
    );
    used.write_all(&frames).unwrap();
    used.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let started = std::time::Instant::now();
    let mut all = Vec::new();
    used.read_to_end(&mut all).unwrap();
    let replies = responses(&all);
    assert!(
        matches!(replies[..], [Response::Hello(_), Response::Lanes { .. }]),
        "{replies:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(8));

    still_serves(&helper).await;
    support::wait_until("idle audit record", Duration::from_secs(5), || {
        !helper.audited("idle_timeout").is_empty()
    });
}

#[tokio::test]
async fn a_peer_running_as_a_non_admitted_uid_is_refused_before_any_request() {
    // 0666 so the filesystem lets the connection through: the helper's own check must refuse it.
    let options = HelperOptions {
        socket_mode: 0o666,
        ..Default::default()
    };
    let Some(helper) = start_helper("non_admitted_peer", options) else {
        return;
    };
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(helper.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mallory = user(MALLORY);
    let output = Command::new(probe_bin())
        .arg("connect")
        .arg(&helper.socket)
        .uid(mallory.uid.as_raw())
        .gid(mallory.gid.as_raw())
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["connected"], true, "{report}");
    assert_eq!(
        report["hello"], "closed",
        "a refused peer must get no reply at all: {report}"
    );
    wait_until("the refusal to be audited", Duration::from_secs(5), || {
        !helper.audited("client_refused").is_empty()
    });
    let refused = helper.audited("client_refused");
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0]["peer"]["uid"], mallory.uid.as_raw());
    assert!(
        refused[0]["detail"]
            .as_str()
            .unwrap()
            .contains("not an admitted client")
    );
    still_serves(&helper).await;
}

use std::os::unix::process::CommandExt;

#[tokio::test]
async fn invalid_dispatches_are_rejected_named_and_audited_and_spawn_nothing() {
    let Some(helper) = start_helper("invalid_dispatches", HelperOptions::default()) else {
        return;
    };
    let mut client = helper.client().await;
    let cases: Vec<(&str, &str, String, ErrorKind, &str)> = vec![
        (
            "nobody",
            "alice-repo",
            "x".into(),
            ErrorKind::NotAllowlisted,
            "unknown orguser \"nobody\"; known org-users: alice-org, bob-org",
        ),
        (
            "alice-org",
            "nope",
            "x".into(),
            ErrorKind::NotAllowlisted,
            "unknown repo \"nope\"; known targets: alice-org/alice-repo, bob-org/bob-repo",
        ),
        (
            "alice-org",
            "bob-repo",
            "x".into(),
            ErrorKind::OwnerMismatch,
            "repo bob-repo belongs to orguser bob-org, not alice-org",
        ),
        (
            "alice-org",
            "../bob-repo",
            "x".into(),
            ErrorKind::Invalid,
            "invalid repo \"../bob-repo\"",
        ),
        (
            "../alice-org",
            "alice-repo",
            "x".into(),
            ErrorKind::Invalid,
            "invalid orguser",
        ),
        (
            "alice-org",
            "alice-repo",
            "run\0this".into(),
            ErrorKind::Invalid,
            "NUL byte at character 3",
        ),
        (
            "alice-org",
            "alice-repo",
            "y".repeat(8001),
            ErrorKind::Invalid,
            "8001 characters long",
        ),
        (
            "alice-org",
            "alice-repo",
            "   ".into(),
            ErrorKind::Invalid,
            "is empty",
        ),
        (
            "alice-org",
            "alice-repo",
            "--help".into(),
            ErrorKind::Invalid,
            "starts with '-' (\"--help\"), which the dispatch command could read as an option",
        ),
        // An org this client may not use is unknown to it, as in dispatch_lanes.
        (
            "restricted-org",
            "restricted-repo",
            "x".into(),
            ErrorKind::NotAllowlisted,
            "unknown orguser \"restricted-org\"; known org-users: alice-org, bob-org",
        ),
    ];
    for (orguser, repo, task, kind, text) in &cases {
        match client.dispatch(orguser, repo, task).await {
            Response::Error(error) => {
                assert_eq!(error.kind, *kind, "{orguser}/{repo}: {}", error.message);
                assert!(
                    error.message.contains(text),
                    "{orguser}/{repo}: {:?} lacks {text:?}",
                    error.message
                );
            }
            other => panic!("{orguser}/{repo} was not rejected: {other:?}"),
        }
    }
    assert_eq!(helper.audited("dispatch_rejected").len(), cases.len());
    assert!(helper.audited("dispatch_accepted").is_empty());
    assert_eq!(client.total(None).await, 0);
    // The restricted org is not offered to this client.
    match client.request(Request::Lanes).await {
        Response::Lanes { lanes } => assert!(lanes.iter().all(|l| l.orguser != "restricted-org")),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn handles_are_private_to_the_uid_that_created_them() {
    let options = HelperOptions {
        socket_mode: 0o666,
        extra_toml: format!("[clients]\nusers = [{MALLORY:?}]\n"),
        ..Default::default()
    };
    let Some(helper) = start_helper("private_handles", options) else {
        return;
    };
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(helper.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut client = helper.client().await;
    let job = client
        .dispatch_ok("alice-org", "alice-repo", "exit:0")
        .await;
    client.result(&job.handle, 10_000).await;

    let mallory = user(MALLORY);
    let ask = |handle: &str| {
        let output = Command::new(probe_bin())
            .arg("connect")
            .arg(&helper.socket)
            .arg(handle)
            .uid(mallory.uid.as_raw())
            .gid(mallory.gid.as_raw())
            .output()
            .unwrap();
        let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        report["status"].as_str().unwrap_or_default().to_owned()
    };
    let theirs = ask(&job.handle);
    let never = ask("d-00000000000000000000000000000000");
    assert!(theirs.contains("UnknownHandle"), "{theirs}");
    assert_eq!(
        theirs.replace(&job.handle, "H"),
        never.replace("d-00000000000000000000000000000000", "H"),
        "another uid's handle must look exactly like one that never existed"
    );
    // A malformed handle is a validation error naming the rule.
    let error = client
        .error(Request::Status {
            handle: "../../etc/passwd".into(),
            output_from: None,
        })
        .await;
    assert_eq!(error.kind, ErrorKind::Invalid);
    assert!(
        error.message.contains("invalid handle"),
        "{}",
        error.message
    );
}

#[tokio::test]
async fn a_lane_never_becomes_a_client_though_its_user_is_one() {
    // The worst configuration for it: lanes may open Unix sockets, the socket is open to all,
    // and the lane's own user is an admitted client.
    let options = HelperOptions {
        socket_mode: 0o666,
        extra_toml: format!("[clients]\nusers = [\"{ALICE}\"]\n"),
        sandbox_toml: "allow_unix_sockets = true\n".into(),
        ..Default::default()
    };
    let Some(helper) = start_helper("lane_as_client", options) else {
        return;
    };
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(helper.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let alice = user(ALICE);
    // The same user from outside any lane is admitted: the refusal is about the process.
    let output = Command::new(probe_bin())
        .arg("connect")
        .arg(&helper.socket)
        .uid(alice.uid.as_raw())
        .gid(alice.gid.as_raw())
        .output()
        .unwrap();
    let outside: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(
        outside["hello"]
            .as_str()
            .unwrap_or_default()
            .starts_with("Hello"),
        "{outside}"
    );
    // From inside a lane: refused before any reply.
    let mut client = helper.client().await;
    let task = format!("connect {}", helper.socket.display());
    let job = client.dispatch_ok("alice-org", "alice-repo", &task).await;
    let done = client.result(&job.handle, 20_000).await;
    let stdout = &done.stdout.as_ref().unwrap().text;
    let inside: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(inside["connected"], true, "{inside}");
    assert_eq!(
        inside["hello"], "closed",
        "BREACH: a lane spoke to the helper as a client: {inside}"
    );
    wait_until("the refusal to be audited", Duration::from_secs(5), || {
        helper.audited("client_refused").iter().any(|r| {
            r["detail"]
                .as_str()
                .unwrap_or_default()
                .contains("belongs to a lane")
        })
    });
    assert!(
        helper.audited("dispatch_accepted").len() == 1,
        "only the test's own dispatch"
    );

    // Nor by connecting and handing the connection to a child before the helper looks.
    let task = format!("hand-over {}", helper.socket.display());
    let job = client.dispatch_ok("alice-org", "alice-repo", &task).await;
    let done = client.result(&job.handle, 20_000).await;
    let stdout = &done.stdout.as_ref().unwrap().text;
    assert!(stdout.contains("\"hello\":\"closed\""), "BREACH: {stdout}");
}

#[tokio::test]
async fn lane_accounts_with_powers_beyond_their_own_are_refused_with_the_reason() {
    // bob's own group stands in for a privileged one (docker, disk, …): the list is the
    // administrator's. (Homes of / or of another owner: unit tests in lane_users.rs.)
    let options = HelperOptions {
        extra_toml: format!("forbidden_lane_groups = [{BOB:?}]\n"),
        ..Default::default()
    };
    let Some(helper) = start_helper("lane_account_refusal", options) else {
        return;
    };
    let check = Command::new(helper_bin())
        .args(["check", "--config"])
        .arg(&helper.config)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&check.stdout);
    assert!(
        said.contains("org bob-org refused: unix user dispatch-t-bob is in the privileged group(s) dispatch-t-bob"),
        "{said}"
    );
    let mut client = helper.client().await;
    let refused = client
        .error(Request::Dispatch(DispatchRequest {
            orguser: "bob-org".into(),
            repo: "bob-repo".into(),
            task: "exit:0".into(),
            description: None,
            lane_env: Vec::new(),
        }))
        .await;
    assert_eq!(refused.kind, ErrorKind::NotPermitted, "{refused:?}");
    // The reason is the administrator's (`check` above); the client learns the lane is refused.
    assert!(
        refused.message.contains("its account was refused")
            && !refused.message.contains("privileged"),
        "{}",
        refused.message
    );
    // Not offered either; the others still are, and work.
    match client.request(Request::Lanes).await {
        Response::Lanes { lanes } => {
            assert!(lanes.iter().all(|l| l.orguser != "bob-org"), "{lanes:?}");
            assert!(lanes.iter().any(|l| l.orguser == "alice-org"), "{lanes:?}");
        }
        other => panic!("{other:?}"),
    }
    client
        .runs_to_success("alice-org", "alice-repo", "exit:0")
        .await;
}

#[tokio::test]
async fn concurrent_deletes_of_one_job_delete_it_once_and_fail_no_other_way() {
    let Some(helper) = start_helper("concurrent_deletes", HelperOptions::default()) else {
        return;
    };
    let mut client = helper.client().await;
    let job = client
        .dispatch_ok("alice-org", "alice-repo", "exit:0")
        .await;
    client.result(&job.handle, 20_000).await;
    // Six deletes in flight on one connection at once.
    for id in 100..106 {
        let frame = RequestEnvelope {
            id,
            body: Request::Delete {
                handle: job.handle.clone(),
            },
        };
        write_frame(&mut client.stream, &frame, FrameLimit::REQUEST)
            .await
            .unwrap();
    }
    let mut answers = Vec::new();
    for _ in 0..6 {
        let response: ResponseEnvelope = read_frame(&mut client.stream, FrameLimit::RESPONSE)
            .await
            .unwrap()
            .unwrap();
        answers.push(response.body);
    }
    let deleted = answers
        .iter()
        .filter(|a| matches!(a, Response::Deleted { .. }))
        .count();
    let unknown = answers
        .iter()
        .filter(|a| matches!(a, Response::Error(e) if e.kind == ErrorKind::UnknownHandle))
        .count();
    assert_eq!((deleted, unknown), (1, 5), "{answers:#?}");
    assert_eq!(helper.audited("deleted").len(), 1);
}

#[tokio::test]
async fn a_flooding_client_hurts_only_itself() {
    let options = HelperOptions {
        socket_mode: 0o666,
        extra_toml: format!("[clients]\nusers = [{MALLORY:?}, {BOB:?}]\n"),
        ..Default::default()
    };
    let Some(helper) = start_helper("connect_flood", options) else {
        return;
    };
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(helper.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let as_user = |name: &str, args: &[String]| {
        let account = user(name);
        Command::new(probe_bin())
            .args(args)
            .uid(account.uid.as_raw())
            .gid(account.gid.as_raw())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let socket = helper.socket.display().to_string();
    // mallory, an admitted client, connects and closes as fast as it can for 1.5 s...
    let flood = as_user(MALLORY, &["flood".into(), socket.clone(), "1500".into()]);
    std::thread::sleep(Duration::from_millis(200));
    // ...while bob, another admitted client, handshakes twelve times.
    let mut refused = Vec::new();
    for _ in 0..12 {
        let output = as_user(BOB, &["connect".into(), socket.clone()])
            .wait_with_output()
            .unwrap();
        let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        if !report["hello"]
            .as_str()
            .unwrap_or_default()
            .starts_with("Hello")
        {
            refused.push(report);
        }
    }
    let flooded: serde_json::Value =
        serde_json::from_slice(&flood.wait_with_output().unwrap().stdout).unwrap();
    assert!(
        refused.is_empty(),
        "bob was refused during mallory's flood ({flooded}): {refused:?}"
    );
    let attempts = flooded["connected"].as_u64().unwrap();
    assert!(
        attempts > 500,
        "the flood was too weak to show anything: {flooded}"
    );
    // Its refusals and violations are coalesced: a record a second per kind, each counting.
    std::thread::sleep(Duration::from_millis(1500));
    let mallory_uid = user(MALLORY).uid.as_raw();
    let records: Vec<serde_json::Value> = helper
        .audit_lines()
        .into_iter()
        .filter(|r| r["peer"]["uid"] == mallory_uid)
        .collect();
    let kinds: std::collections::BTreeSet<String> = records
        .iter()
        .map(|r| {
            format!(
                "{} {}",
                r["event"],
                r["detail"]
                    .as_str()
                    .unwrap_or_default()
                    .split(" (and")
                    .next()
                    .unwrap_or_default()
            )
        })
        .collect();
    // Per kind (closed before the handshake, refused at its limit, or after the flooder
    // exited): a burst of 20, then about 5 a second.
    assert!(
        records.len() <= 30 * kinds.len(),
        "{} audit records for one flood of {attempts} connections: {kinds:#?}",
        records.len()
    );
    let counted: u64 = records
        .iter()
        .map(|r| 1 + held_back(r["detail"].as_str().unwrap_or_default()))
        .sum();
    assert!(
        counted >= attempts,
        "the records count {counted} of {attempts} refusals"
    );
    assert!(
        records.iter().any(|r| r["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("more of this kind")),
        "{records:#?}"
    );
    println!(
        "flood: {attempts} connections by mallory, {} audit records, bob admitted 12 of 12",
        records.len()
    );
}

/// A running lane is watched without holding one of the runtime's blocking threads (it has at
/// most 512): with more lanes running than that, the helper still answers dispatches, new
/// connections and status requests, instead of queueing them until some lane ends. And it
/// starts under the soft open-file limit systemd gives services, 1024, which it raises: each
/// lane holds a few fds, and the 193rd lane failed with EMFILE before it did.
#[tokio::test]
async fn more_running_lanes_than_blocking_threads_leave_the_helper_answering() {
    const LANES: usize = 600;
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    // Inherited by the helper. The other tests of this binary need far fewer.
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if hard <= 1024 {
        skip(
            "more_running_lanes_than_blocking_threads",
            "the hard open-file limit is 1024 or less: 600 lanes cannot be held",
        );
        return;
    }
    setrlimit(Resource::RLIMIT_NOFILE, 1024, hard).unwrap();
    let options = HelperOptions {
        argv: vec!["/bin/sleep".into(), "{task}".into()],
        timeout_seconds: 300,
        extra_toml: "[limits]\nmax_running_jobs = 1024\nmax_running_jobs_per_client = 1024\n\
                     max_running_jobs_per_lane = 1024\n"
            .into(),
        sandbox_toml: "[sandbox.limits]\nprocesses = 4096\n".into(),
        ..Default::default()
    };
    let Some(helper) = start_helper("more_lanes_than_blocking_threads", options) else {
        return;
    };
    let answered = Duration::from_secs(20);
    let mut client = helper.client().await;
    let mut first = None;
    for running in 0..LANES {
        let reply =
            tokio::time::timeout(answered, client.dispatch("alice-org", "alice-repo", "200"))
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "a dispatch was not answered within {answered:?} while {running} lanes ran"
                    )
                });
        match reply {
            Response::Job(job) if job.state == JobState::Running => {
                first.get_or_insert(job.handle);
            }
            other => panic!("dispatch with {running} lanes running: {other:?}"),
        }
    }
    let mut other = tokio::time::timeout(answered, helper.client())
        .await
        .expect("a new connection was not answered while 600 lanes ran");
    let status = tokio::time::timeout(answered, other.request(Request::status(first.unwrap())))
        .await
        .expect("a status request was not answered while 600 lanes ran");
    assert!(
        matches!(&status, Response::Job(job) if job.state == JobState::Running),
        "{status:?}"
    );
}
