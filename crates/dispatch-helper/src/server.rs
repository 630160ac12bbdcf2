//! The socket side: admission by SO_PEERCRED before any byte is read, the handshake, then
//! concurrent requests per connection under per-connection and global limits. Any malformed,
//! oversized or unexpected frame closes that connection only; every such event is audited.

use crate::admission::Refusal;
use crate::audit::PeerIdentity;
use crate::jobs::{Helper, Peer};
use dispatch_proto::{
    CodecError, ErrorKind, ErrorReply, FrameLimit, HelloReply, PROTOCOL_VERSION, Request,
    RequestEnvelope, Response, ResponseEnvelope, read_frame, write_frame,
};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UnixListener;
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Semaphore, mpsc};

pub async fn accept_loop(helper: Arc<Helper>, listener: UnixListener) {
    let settings = helper.settings();
    let connections = Arc::new(Semaphore::new(settings.file.limits.max_connections));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Who it is comes from the kernel at once; the account lookup waits until it holds slots.
        let Ok(cred) = stream.peer_cred() else {
            audit_violation(&helper, None, "client_refused", "SO_PEERCRED unavailable");
            continue;
        };
        let identity = PeerIdentity {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid(),
        };
        // The peer's own limit first: a uid that floods uses up its own slots, never the others'.
        let per_client = helper.settings().file.limits.max_connections_per_client;
        let Some(uid_slot) = helper.connection_slot(identity.uid, per_client) else {
            let detail = format!(
                "uid {} already holds {per_client} connections (the per-client limit)",
                identity.uid
            );
            refuse(&helper, identity, "connection_refused", detail);
            continue;
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            let detail = "the helper's connection limit was reached".to_owned();
            refuse(&helper, identity, "connection_refused", detail);
            continue;
        };
        let helper = helper.clone();
        tokio::spawn(async move {
            serve_connection(helper, stream, cred, uid_slot).await;
            drop(permit);
        });
    }
}

fn refuse(helper: &Helper, peer: PeerIdentity, event: &'static str, detail: String) {
    helper.refusals.record(Refusal {
        event,
        peer: Some(peer),
        claimed_client: None,
        detail,
    });
}

/// The kernel's view of the peer, plus its account's name and groups (an NSS lookup, so off
/// the runtime's workers).
async fn resolve_peer(cred: tokio::net::unix::UCred) -> Option<Peer> {
    tokio::task::spawn_blocking(move || Peer::from_cred(cred.uid(), cred.gid(), cred.pid()))
        .await
        .ok()
}

fn admitted(helper: &Helper, peer: &Peer) -> bool {
    let settings = helper.settings();
    settings.admitted_uids.contains(&peer.identity.uid)
        || peer
            .groups
            .iter()
            .any(|g| settings.admitted_gids.contains(g))
}

/// A lane never dispatches, whatever its uid and however the sandbox is configured (a lane
/// allowed Unix sockets, run by a user who is also a client, could otherwise reach the socket):
/// why the peer is refused, if its process belongs to a lane. The peer's pidfd, taken before the
/// check, tells whether the process that connected is still the one that was checked: one that
/// connected and exited (leaving the socket to a child, or its pid to another process) cannot
/// be judged, and is refused too.
async fn from_a_lane(helper: &Arc<Helper>, peer: &Peer, stream: &UnixStream) -> Option<String> {
    let Some(pid) = peer.identity.pid else {
        return Some("the peer's pid is unknown (SO_PEERCRED)".to_owned());
    };
    let pidfd = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerPidfd).ok();
    let (lookup, uid) = (helper.clone(), peer.identity.uid);
    let is_lane = tokio::task::spawn_blocking(move || lookup.is_lane_process(pid, uid))
        .await
        .unwrap_or(true);
    if is_lane {
        return Some(format!(
            "process {pid} belongs to a lane, and lanes never dispatch"
        ));
    }
    let gone = match &pidfd {
        Some(pidfd) => has_exited(pidfd),
        None => {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
                == Err(nix::errno::Errno::ESRCH)
        }
    };
    gone.then(|| format!("process {pid} exited before it could be checked; refused"))
}

/// A pidfd becomes readable when its process exits.
fn has_exited(pidfd: &std::os::fd::OwnedFd) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::ZERO).is_ok_and(|ready| ready > 0)
}

/// Audited coalesced per uid and kind (see `admission`): a connection that misbehaves or is
/// refused is closed at once, and a flood of them costs the audit log a record a second.
fn audit_violation(helper: &Helper, peer: Option<&Peer>, event: &'static str, detail: &str) {
    helper.refusals.record(Refusal {
        event,
        peer: peer.map(|p| p.identity),
        claimed_client: peer.and_then(|p| p.claimed_client.clone()),
        detail: detail.to_owned(),
    });
}

/// Answer a bad handshake with a protocol error (best effort), then audit it; the caller closes.
async fn refuse_handshake(
    helper: &Helper,
    peer: &Peer,
    writer: &mut OwnedWriteHalf,
    id: u64,
    message: &str,
    detail: &str,
) {
    let refusal = ResponseEnvelope {
        id,
        body: protocol_error(message),
    };
    let _ = write_frame(writer, &refusal, FrameLimit::RESPONSE).await;
    audit_violation(helper, Some(peer), "protocol_violation", detail);
}

fn protocol_error(message: impl Into<String>) -> Response {
    Response::Error(ErrorReply {
        kind: ErrorKind::Protocol,
        message: message.into(),
    })
}

/// The id of a frame that decoded far enough to have one (0 otherwise).
fn describe(error: &CodecError) -> String {
    match error {
        CodecError::Io(e) => format!("i/o error: {e}"),
        other => other.to_string(),
    }
}

async fn serve_connection(
    helper: Arc<Helper>,
    stream: UnixStream,
    cred: tokio::net::unix::UCred,
    _uid_slot: crate::jobs::ConnectionSlot,
) {
    let Some(mut peer) = admit_peer(&helper, cred, &stream).await else {
        return;
    };
    let limits = helper.settings().file.limits.clone();
    let idle = Duration::from_secs(limits.idle_timeout_seconds);
    let (mut reader, mut writer) = stream.into_split();
    if !handshake(&helper, &mut peer, &mut reader, &mut writer, idle).await {
        return;
    }
    let (responses, writer_task) =
        respond_in_order(writer, idle, limits.max_in_flight_per_connection + 1);
    let in_flight = Arc::new(Semaphore::new(limits.max_in_flight_per_connection));
    let peer = Arc::new(peer);
    let reason = read_requests(
        &helper,
        &peer,
        &mut reader,
        &responses,
        &in_flight,
        idle,
        limits.max_in_flight_per_connection,
    )
    .await;
    if let Some((event, detail)) = reason {
        audit_violation(&helper, Some(&peer), event, &detail);
    }
    drop(responses);
    // Let in-flight requests finish sending (their own senders keep the writer alive).
    let _ = writer_task.await;
}

/// Who the peer is, if it may be a client at all: an account that resolves, admitted by the
/// configuration, and not a lane. A refusal is audited.
async fn admit_peer(
    helper: &Arc<Helper>,
    cred: tokio::net::unix::UCred,
    stream: &UnixStream,
) -> Option<Peer> {
    let Some(peer) = resolve_peer(cred).await else {
        audit_violation(
            helper,
            None,
            "client_refused",
            "the peer's account could not be looked up",
        );
        return None;
    };
    if !admitted(helper, &peer) {
        let detail = format!(
            "uid {} ({}) is not an admitted client (see [clients] in the helper config)",
            peer.identity.uid,
            peer.user_name.as_deref().unwrap_or("no passwd entry")
        );
        audit_violation(helper, Some(&peer), "client_refused", &detail);
        return None;
    }
    if let Some(detail) = from_a_lane(helper, &peer, stream).await {
        audit_violation(helper, Some(&peer), "client_refused", &detail);
        return None;
    }
    Some(peer)
}

/// The first frame must be a Hello of our protocol version, before the idle timeout: then the
/// peer's claimed name is noted and the helper answers with what it offers. False (audited)
/// otherwise.
async fn handshake(
    helper: &Arc<Helper>,
    peer: &mut Peer,
    reader: &mut OwnedReadHalf,
    writer: &mut OwnedWriteHalf,
    idle: Duration,
) -> bool {
    let Some(hello_id) = read_hello(helper, peer, reader, writer, idle).await else {
        return false;
    };
    let settings = helper.settings();
    let hello = Response::Hello(HelloReply {
        version: PROTOCOL_VERSION,
        helper_version: env!("CARGO_PKG_VERSION").to_owned(),
        peer_uid: peer.identity.uid,
        unprivileged: settings.unprivileged,
        max_in_flight: settings.file.limits.max_in_flight_per_connection as u32,
        pass_env: settings.file.pass_env.clone(),
    });
    let envelope = ResponseEnvelope {
        id: hello_id,
        body: hello,
    };
    write_frame(writer, &envelope, FrameLimit::RESPONSE)
        .await
        .is_ok()
}

/// The id of the peer's Hello, its claimed name noted; `None` (refused and audited) for
/// anything else.
async fn read_hello(
    helper: &Arc<Helper>,
    peer: &mut Peer,
    reader: &mut OwnedReadHalf,
    writer: &mut OwnedWriteHalf,
    idle: Duration,
) -> Option<u64> {
    let first = tokio::time::timeout(
        idle,
        read_frame::<RequestEnvelope, _>(&mut *reader, FrameLimit::REQUEST),
    )
    .await;
    match first {
        Err(_) => {
            let detail = "no handshake before the idle timeout";
            audit_violation(helper, Some(peer), "idle_timeout", detail);
            None
        }
        Ok(Ok(None)) => {
            let detail = "closed before the handshake";
            audit_violation(helper, Some(peer), "protocol_violation", detail);
            None
        }
        Ok(Err(error)) => {
            let detail = format!("bad handshake frame: {}", describe(&error));
            refuse_handshake(helper, peer, writer, 0, &describe(&error), &detail).await;
            None
        }
        Ok(Ok(Some(RequestEnvelope {
            id,
            body:
                Request::Hello {
                    version,
                    client_name,
                },
        }))) => {
            peer.claimed_client = client_name.map(|n| n.chars().take(128).collect());
            if version != PROTOCOL_VERSION {
                let message = CodecError::WrongVersion {
                    peer: version,
                    ours: PROTOCOL_VERSION,
                }
                .to_string();
                refuse_handshake(helper, peer, writer, id, &message, &message).await;
                return None;
            }
            Some(id)
        }
        Ok(Ok(Some(RequestEnvelope { id, .. }))) => {
            let message = "the first request on a connection must be Hello (the handshake)";
            let detail = "request before the handshake";
            refuse_handshake(helper, peer, writer, id, message, detail).await;
            None
        }
    }
}

/// One task writes every response of a connection, in the order they are sent to it: the
/// requests run concurrently. A response too large for a frame is replaced by an error; a
/// peer that stops reading for `idle` ends it.
fn respond_in_order(
    mut writer: OwnedWriteHalf,
    idle: Duration,
    capacity: usize,
) -> (mpsc::Sender<ResponseEnvelope>, tokio::task::JoinHandle<()>) {
    let (responses, mut outbox) = mpsc::channel::<ResponseEnvelope>(capacity);
    let writer_task = tokio::spawn(async move {
        while let Some(response) = outbox.recv().await {
            let id = response.id;
            let written = tokio::time::timeout(
                idle,
                write_frame(&mut writer, &response, FrameLimit::RESPONSE),
            )
            .await
            .unwrap_or(Err(CodecError::Closed));
            let Err(error) = written else { continue };
            if matches!(error, CodecError::Oversized { .. }) {
                let fallback = ResponseEnvelope {
                    id,
                    body: Response::Error(ErrorReply {
                        kind: ErrorKind::Internal,
                        message: error.to_string(),
                    }),
                };
                if write_frame(&mut writer, &fallback, FrameLimit::RESPONSE)
                    .await
                    .is_ok()
                {
                    continue;
                }
            }
            break;
        }
    });
    (responses, writer_task)
}

/// Read requests until the peer closes (None) or misbehaves (Some(event, detail)).
async fn read_requests(
    helper: &Arc<Helper>,
    peer: &Arc<Peer>,
    reader: &mut OwnedReadHalf,
    responses: &mpsc::Sender<ResponseEnvelope>,
    in_flight: &Arc<Semaphore>,
    idle: Duration,
    max_in_flight: usize,
) -> Option<(&'static str, String)> {
    // One read in progress at a time, never cancelled half-way (read_frame is not cancel-safe);
    // the idle deadline runs beside it and only closes a connection with nothing in flight.
    let mut read = Box::pin(read_frame::<RequestEnvelope, _>(
        &mut *reader,
        FrameLimit::REQUEST,
    ));
    let idle_deadline = tokio::time::sleep(idle);
    tokio::pin!(idle_deadline);
    loop {
        let frame = tokio::select! {
            frame = &mut read => frame,
            _ = &mut idle_deadline => {
                if in_flight.available_permits() == max_in_flight {
                    return Some(("idle_timeout", format!("no request for {} s", idle.as_secs())));
                }
                idle_deadline.as_mut().reset(tokio::time::Instant::now() + idle);
                continue;
            }
        };
        drop(read);
        read = Box::pin(read_frame::<RequestEnvelope, _>(
            &mut *reader,
            FrameLimit::REQUEST,
        ));
        idle_deadline
            .as_mut()
            .reset(tokio::time::Instant::now() + idle);
        let envelope = match frame {
            Ok(Some(envelope)) => envelope,
            Ok(None) => return None,
            Err(error) => return Some(protocol_violation(responses, 0, describe(&error)).await),
        };
        if let Request::Hello { .. } = envelope.body {
            let message = "duplicate handshake".to_owned();
            return Some(protocol_violation(responses, envelope.id, message).await);
        }
        start_request(helper, peer, envelope, responses, in_flight, max_in_flight).await;
    }
}

/// Answer request `id` with a protocol error saying `message`: the connection ends after it.
async fn protocol_violation(
    responses: &mpsc::Sender<ResponseEnvelope>,
    id: u64,
    message: String,
) -> (&'static str, String) {
    let body = protocol_error(message.clone());
    let _ = responses.send(ResponseEnvelope { id, body }).await;
    ("protocol_violation", message)
}

/// Run one request on a task of its own, its response sent when done; past the connection's
/// in-flight limit, refused as busy at once.
async fn start_request(
    helper: &Arc<Helper>,
    peer: &Arc<Peer>,
    envelope: RequestEnvelope,
    responses: &mpsc::Sender<ResponseEnvelope>,
    in_flight: &Arc<Semaphore>,
    max_in_flight: usize,
) {
    let Ok(permit) = in_flight.clone().try_acquire_owned() else {
        let busy = Response::Error(ErrorReply {
            kind: ErrorKind::Busy,
            message: format!("at most {max_in_flight} requests may be in flight on one connection"),
        });
        let _ = responses
            .send(ResponseEnvelope {
                id: envelope.id,
                body: busy,
            })
            .await;
        return;
    };
    let (helper, peer, responses) = (helper.clone(), peer.clone(), responses.clone());
    tokio::spawn(async move {
        let body = handle_request(&helper, &peer, envelope.body).await;
        let _ = responses
            .send(ResponseEnvelope {
                id: envelope.id,
                body,
            })
            .await;
        drop(permit);
    });
}

async fn handle_request(helper: &Arc<Helper>, peer: &Peer, request: Request) -> Response {
    let result = match request {
        Request::Hello { .. } => Err(ErrorReply {
            kind: ErrorKind::Protocol,
            message: "duplicate handshake".into(),
        }),
        Request::Dispatch(dispatch) => helper
            .dispatch(peer, dispatch)
            .await
            .map(|v| Response::Job(Box::new(v))),
        Request::Status {
            handle,
            output_from,
        } => helper
            .status(peer, &handle, output_from)
            .map(|v| Response::Job(Box::new(v))),
        Request::Result {
            handle,
            wait_ms,
            output_from,
        } => helper
            .result(peer, &handle, wait_ms, output_from)
            .await
            .map(|v| Response::Job(Box::new(v))),
        Request::List {
            filter,
            detail,
            limit,
        } => helper
            .list(peer, filter.as_deref(), detail, limit)
            .map(|(total, jobs)| Response::List { total, jobs }),
        Request::Cancel { handle } => helper
            .cancel(peer, &handle)
            .await
            .map(|v| Response::Job(Box::new(v))),
        Request::Delete { handle } => helper
            .delete(peer, &handle)
            .await
            .map(|handle| Response::Deleted { handle }),
        Request::Lanes => Ok(Response::Lanes {
            lanes: helper.lanes(peer),
        }),
    };
    result.unwrap_or_else(Response::Error)
}
