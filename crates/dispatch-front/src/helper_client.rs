//! The front's connection to the helper: one Unix-socket connection, multiplexed (each request
//! carries an id, responses are routed back by id), re-established on the next call after the
//! helper restarts. A call made while the helper is down gets a clear error. Calls beyond what
//! the helper serves at once on a connection (it says how many at the handshake) wait their
//! turn here, first come first served, instead of being refused by the helper; waits for a
//! result may hold at most half of the places, so quick calls always get through.

use dispatch_proto::{
    FrameLimit, HelloReply, PROTOCOL_VERSION, Request, RequestEnvelope, Response, ResponseEnvelope,
    encode_frame, read_frame, write_frame,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};

#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    #[error("the dispatch helper is not reachable at {socket}: {reason}")]
    Unreachable { socket: String, reason: String },
    #[error(
        "the connection to the dispatch helper was lost while the request was in flight; the helper may have restarted"
    )]
    Disconnected,
    #[error("the dispatch helper did not answer within {0} s")]
    Timeout(u64),
    #[error("the dispatch helper broke the protocol: {0}")]
    Protocol(String),
    /// Refused here, before anything was sent: the helper would reject a frame this long.
    #[error(
        "the request is too large to send: its arguments encode to {bytes} bytes, and a request may take at most {limit}; shorten the longest (a task_description may have at most 8000 characters)"
    )]
    TooLarge { bytes: u64, limit: u32 },
    /// The helper answered, then closed the connection during the handshake: it refuses
    /// peers it does not admit without a word.
    #[error(
        "the dispatch helper at {socket} closed the connection during the handshake: this user is probably not an admitted client (see [clients] in the helper config)"
    )]
    NotAdmitted { socket: String },
    /// A personal helper (which admits its own user) that kept closing the handshake.
    #[error(
        "the personal dispatch helper at {socket} kept closing the connection during the handshake: this user has too many connections open to it (limits.max_connections_per_client), or this process runs inside one of its lanes (see {log})"
    )]
    PersonalHelperRefused { socket: String, log: String },
}

/// The characters of a client's claimed name the helper records.
pub const CLAIMED_NAME_CHARS: usize = 128;

/// How long connecting and the handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(25);

/// What a connection's reader and writer share with callers. `alive` and `pending` change
/// together under one lock, so a request is either registered on a live connection (and will
/// be answered or failed) or refused at once.
#[derive(Default)]
struct Shared {
    alive: bool,
    pending: HashMap<u64, Waiter>,
}

/// A request the helper has not answered yet.
struct Waiter {
    answer: oneshot::Sender<Response>,
    /// Its places (see [`Connection::in_flight`]), held until the helper answers it or the
    /// connection ends, not until its caller stops waiting: the helper serves it till then,
    /// and counts it against this connection's limit.
    _places: Places,
}

type Places = (
    tokio::sync::OwnedSemaphorePermit,
    Option<tokio::sync::OwnedSemaphorePermit>,
);

impl Shared {
    fn close(&mut self) {
        self.alive = false;
        // Dropping the senders wakes every waiter with "disconnected".
        self.pending.clear();
    }
}

struct Connection {
    /// Whole encoded frames; one writer task writes them, so a caller that gives up half-way
    /// can never leave half a frame on the stream.
    outbox: mpsc::Sender<Vec<u8>>,
    shared: Arc<Mutex<Shared>>,
    hello: HelloReply,
    /// Places for requests in flight: as many as the helper serves at once on a connection.
    in_flight: Arc<tokio::sync::Semaphore>,
    /// Of those, the ones a waiting `Result` may hold.
    waits: Arc<tokio::sync::Semaphore>,
}

impl Connection {
    fn alive(&self) -> bool {
        lock(&self.shared).alive
    }
}

fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct HelperClient {
    socket: PathBuf,
    /// Personal mode: starts the user's helper when none answers.
    launcher: Option<crate::personal::Launcher>,
    /// The caller's values of the variables the helper passes to lanes (`HelloReply::pass_env`):
    /// this front's own environment, read once.
    lane_env: Vec<(String, String)>,
    client_name: Mutex<Option<String>>,
    connection: tokio::sync::Mutex<Option<Arc<Connection>>>,
    next_id: AtomicU64,
}

impl HelperClient {
    pub fn new(socket: PathBuf) -> HelperClient {
        HelperClient {
            socket,
            launcher: None,
            lane_env: Vec::new(),
            client_name: Mutex::new(None),
            connection: tokio::sync::Mutex::new(None),
            next_id: AtomicU64::new(1),
        }
    }

    /// A client of the user's personal helper, which it starts when none answers.
    pub fn personal(launcher: crate::personal::Launcher) -> HelperClient {
        let mut client = HelperClient::new(launcher.socket.clone());
        client.launcher = Some(launcher);
        client
    }

    /// Offer this environment's values to lanes (only the names the helper passes are sent).
    pub fn with_lane_env(mut self, env: Vec<(String, String)>) -> HelperClient {
        self.lane_env = env;
        self
    }

    /// The values to send with a dispatch: those of the names this helper passes.
    pub async fn lane_env(&self) -> Result<Vec<(String, String)>, HelperError> {
        let hello = self.hello().await?;
        Ok(self
            .lane_env
            .iter()
            .filter(|(name, _)| hello.pass_env.contains(name))
            .cloned()
            .collect())
    }

    pub fn is_personal(&self) -> bool {
        self.launcher.is_some()
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The MCP client's name, passed to the helper as a claim on the next (re)connection: its
    /// first [`CLAIMED_NAME_CHARS`] characters, all the helper keeps (a longer one could not
    /// even be sent).
    pub fn set_client_name(&self, name: Option<String>) {
        let mut current = self.client_name.lock().unwrap_or_else(|p| p.into_inner());
        if current.is_none() {
            *current = name.map(|n| n.chars().take(CLAIMED_NAME_CHARS).collect());
        }
    }

    /// Send one request and wait for its response. Read-only requests are retried once on a
    /// fresh connection if the old one turned out to be dead; dispatch, cancel and delete never
    /// are (they must not happen twice).
    pub async fn request(&self, body: Request) -> Result<Response, HelperError> {
        let retryable = matches!(
            body,
            Request::Status { .. } | Request::Result { .. } | Request::List { .. } | Request::Lanes
        );
        match self.request_once(body.clone()).await {
            Err(HelperError::Disconnected) if retryable => self.request_once(body).await,
            // A personal helper that stopped for idleness just as this front connected refused
            // the request unseen; the next connection starts a new helper.
            Ok(Response::Error(error)) if self.launcher.is_some() && is_stopping(&error) => {
                *self.connection.lock().await = None;
                tokio::time::sleep(Duration::from_millis(200)).await;
                self.request_once(body).await
            }
            other => other,
        }
    }

    /// The helper's handshake reply (connecting if needed).
    pub async fn hello(&self) -> Result<HelloReply, HelperError> {
        Ok(self.connection().await?.hello.clone())
    }

    async fn request_once(&self, body: Request) -> Result<Response, HelperError> {
        // A wait asked of the helper, plus room for the dispatch itself (fsyncs, a fork): the
        // whole call, its turn included, ends within this.
        let patience = match &body {
            Request::Result { wait_ms, .. } => Duration::from_millis(u64::from(*wait_ms)),
            _ => Duration::ZERO,
        } + Duration::from_secs(60);
        let deadline = tokio::time::Instant::now() + patience;
        let too_late = || HelperError::Timeout(patience.as_secs());
        let connection = tokio::time::timeout_at(deadline, self.connection())
            .await
            .map_err(|_| too_late())??;
        // Our turn first (held until the answer): the helper would refuse more than this. A
        // result that would wait waits for a place no longer than it would have waited for the
        // dispatch, then asks without waiting: its caller hears within the time it gave.
        let mut body = body;
        let wait_place = match &mut body {
            Request::Result { wait_ms, .. } if *wait_ms > 0 => {
                let given = Duration::from_millis(u64::from(*wait_ms));
                match tokio::time::timeout(given, place(&connection.waits)).await {
                    Ok(place) => Some(place?),
                    Err(_) => {
                        *wait_ms = 0;
                        None
                    }
                }
            }
            _ => None,
        };
        let in_flight = tokio::time::timeout_at(deadline, place(&connection.in_flight))
            .await
            .map_err(|_| too_late())??;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = encode_frame(&RequestEnvelope { id, body }, FrameLimit::REQUEST).map_err(
            |e| match e {
                dispatch_proto::CodecError::Oversized { length, limit } => HelperError::TooLarge {
                    bytes: length,
                    limit,
                },
                other => HelperError::Protocol(other.to_string()),
            },
        )?;
        // Room in the outbox before the request is registered: once registered it is sent at
        // once, so a caller that gives up can never leave a registered request unsent.
        let room = tokio::time::timeout_at(deadline, connection.outbox.reserve())
            .await
            .map_err(|_| too_late())?
            .map_err(|_| HelperError::Disconnected)?;
        // Past its time (every wait above ends at the deadline, but may still be ready just
        // after it) it is not sent at all: its caller is told it timed out, and nothing was done.
        if tokio::time::Instant::now() >= deadline {
            return Err(too_late());
        }
        let (answer, receiver) = oneshot::channel();
        {
            let mut shared = lock(&connection.shared);
            if !shared.alive {
                return Err(HelperError::Disconnected);
            }
            let waiter = Waiter {
                answer,
                _places: (in_flight, wait_place),
            };
            shared.pending.insert(id, waiter);
        }
        room.send(frame);
        // Given up on (or this future dropped), the request keeps its places until the helper
        // answers it: the reader drops its waiter then.
        match tokio::time::timeout_at(deadline, receiver).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(_)) => Err(HelperError::Disconnected),
            Err(_) => Err(too_late()),
        }
    }

    async fn connection(&self) -> Result<Arc<Connection>, HelperError> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref()
            && connection.alive()
        {
            return Ok(connection.clone());
        }
        let connection = tokio::time::timeout(CONNECT_TIMEOUT, self.connect_until_admitted())
            .await
            .map_err(|_| HelperError::Unreachable {
                socket: self.socket.display().to_string(),
                reason: format!("no handshake within {} s", CONNECT_TIMEOUT.as_secs()),
            })??;
        let connection = Arc::new(connection);
        *slot = Some(connection.clone());
        Ok(connection)
    }

    /// [`HelperClient::connect`], again while a personal helper closes the handshake: it admits
    /// its own user, so one that closes is stopping (idle, or killed and its last threads not
    /// yet gone, its socket still taking connections). The next attempt finds or starts its
    /// successor. A system helper's refusal is final.
    /// Tried for a few seconds, backing off: a helper stopping is gone in milliseconds, and
    /// what lasts (this user's connections used up, or a front inside a lane) is said as such.
    async fn connect_until_admitted(&self) -> Result<Connection, HelperError> {
        let Some(launcher) = &self.launcher else {
            return self.connect().await;
        };
        let give_up = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut pause = Duration::from_millis(20);
        loop {
            match self.connect().await {
                Err(HelperError::NotAdmitted { socket }) => {
                    if tokio::time::Instant::now() + pause > give_up {
                        let log = launcher.log_path().display().to_string();
                        return Err(HelperError::PersonalHelperRefused { socket, log });
                    }
                    tracing::debug!("the personal helper closed the handshake; trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
                outcome => return outcome,
            }
        }
    }

    async fn connect(&self) -> Result<Connection, HelperError> {
        let unreachable = |reason: String| HelperError::Unreachable {
            socket: self.socket.display().to_string(),
            reason,
        };
        let stream = match &self.launcher {
            Some(launcher) => {
                // A check and a reload block for a moment, on this front's multi-thread runtime.
                tokio::task::block_in_place(|| launcher.usable()).map_err(unreachable)?;
                launcher.connect_or_start().await.map_err(unreachable)?
            }
            None => UnixStream::connect(&self.socket)
                .await
                .map_err(|e| unreachable(e.to_string()))?,
        };
        let (mut reader, mut writer) = stream.into_split();
        let hello = self.handshake(&mut reader, &mut writer).await?;
        Ok(Connection::start(reader, writer, hello))
    }

    /// Our Hello, and the helper's: what it offers, or why it does not serve us.
    async fn handshake(
        &self,
        reader: &mut OwnedReadHalf,
        writer: &mut OwnedWriteHalf,
    ) -> Result<HelloReply, HelperError> {
        let client_name = self
            .client_name
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let hello = RequestEnvelope {
            id: 0,
            body: Request::Hello {
                version: PROTOCOL_VERSION,
                client_name,
            },
        };
        // A helper that does not admit this peer closes at once, before or after our hello:
        // a broken pipe, a reset or an end of stream here all mean that.
        let not_admitted = || HelperError::NotAdmitted {
            socket: self.socket.display().to_string(),
        };
        write_frame(&mut *writer, &hello, FrameLimit::REQUEST)
            .await
            .map_err(|_| not_admitted())?;
        let reply: Option<ResponseEnvelope> = read_frame(&mut *reader, FrameLimit::RESPONSE)
            .await
            .map_err(|e| match e {
                dispatch_proto::CodecError::Io(_) | dispatch_proto::CodecError::Closed => {
                    not_admitted()
                }
                other => HelperError::Protocol(other.to_string()),
            })?;
        match reply.map(|r| r.body) {
            Some(Response::Hello(hello)) => Ok(hello),
            Some(Response::Error(error)) => Err(HelperError::Protocol(error.message)),
            Some(other) => Err(HelperError::Protocol(format!(
                "unexpected handshake reply {other:?}"
            ))),
            // The helper closes without a word on peers it does not admit.
            None => Err(not_admitted()),
        }
    }
}

impl Connection {
    /// The connection's two pumps: one task writes queued frames, one hands each response to
    /// its waiter; either ending (an error, the end of the stream) finishes the connection.
    fn start(
        mut reader: OwnedReadHalf,
        mut writer: OwnedWriteHalf,
        hello: HelloReply,
    ) -> Connection {
        let shared = Arc::new(Mutex::new(Shared {
            alive: true,
            pending: HashMap::new(),
        }));
        let (outbox, mut frames) = mpsc::channel::<Vec<u8>>(32);
        let writer_shared = shared.clone();
        tokio::spawn(async move {
            while let Some(frame) = frames.recv().await {
                let written = async {
                    writer.write_all(&frame).await?;
                    writer.flush().await
                };
                if written.await.is_err() {
                    break;
                }
            }
            lock(&writer_shared).close();
        });
        let reader_shared = shared.clone();
        tokio::spawn(async move {
            // Until end of stream or any error: either way the connection is finished.
            while let Ok(Some(response)) =
                read_frame::<ResponseEnvelope, _>(&mut reader, FrameLimit::RESPONSE).await
            {
                let waiter = lock(&reader_shared).pending.remove(&response.id);
                if let Some(waiter) = waiter {
                    // Its caller may have stopped listening; its places go back either way.
                    let _ = waiter.answer.send(response.body);
                }
            }
            lock(&reader_shared).close();
        });
        let places = (hello.max_in_flight as usize).max(1);
        Connection {
            outbox,
            shared,
            in_flight: Arc::new(tokio::sync::Semaphore::new(places)),
            waits: Arc::new(tokio::sync::Semaphore::new((places / 2).max(1))),
            hello,
        }
    }
}

/// The refusal of a helper that is shutting down (`draining`): nothing was done.
fn is_stopping(error: &dispatch_proto::ErrorReply) -> bool {
    error.kind == dispatch_proto::ErrorKind::Busy
        && error.message.contains("the helper is shutting down")
}

async fn place(
    places: &Arc<tokio::sync::Semaphore>,
) -> Result<tokio::sync::OwnedSemaphorePermit, HelperError> {
    places
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| HelperError::Disconnected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A helper that serves 2 requests at once on its one connection: it answers those it holds
    /// each time it is told to, records the most it ever held unanswered, and passes on each
    /// request it receives.
    fn holding_helper(
        listener: UnixListener,
    ) -> (
        mpsc::Sender<()>,
        Arc<AtomicU64>,
        mpsc::UnboundedReceiver<Request>,
    ) {
        let (answer, mut told) = mpsc::channel::<()>(8);
        let (seen, received) = mpsc::unbounded_channel();
        let most = Arc::new(AtomicU64::new(0));
        let held_most = most.clone();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (mut reader, mut writer) = stream.into_split();
            let hello: RequestEnvelope = read_frame(&mut reader, FrameLimit::REQUEST)
                .await
                .unwrap()
                .unwrap();
            let reply = Response::Hello(HelloReply {
                version: PROTOCOL_VERSION,
                helper_version: "test".into(),
                peer_uid: 0,
                unprivileged: true,
                max_in_flight: 2,
                pass_env: Vec::new(),
            });
            let envelope = ResponseEnvelope {
                id: hello.id,
                body: reply,
            };
            write_frame(&mut writer, &envelope, FrameLimit::RESPONSE)
                .await
                .unwrap();
            let mut held = Vec::new();
            loop {
                tokio::select! {
                    request = read_frame::<RequestEnvelope, _>(&mut reader, FrameLimit::REQUEST) => {
                        let Ok(Some(request)) = request else { return };
                        held.push(request.id);
                        let _ = seen.send(request.body);
                        held_most.fetch_max(held.len() as u64, Ordering::SeqCst);
                    }
                    Some(()) = told.recv() => {
                        for id in held.drain(..) {
                            let body = Response::Lanes { lanes: Vec::new() };
                            let envelope = ResponseEnvelope { id, body };
                            write_frame(&mut writer, &envelope, FrameLimit::RESPONSE)
                                .await
                                .unwrap();
                        }
                    }
                }
            }
        });
        (answer, most, received)
    }

    /// A caller that stops waiting (an MCP client that cancels its call) does not free its
    /// request's place while the helper still serves it: the helper would refuse one more.
    #[tokio::test]
    async fn a_request_given_up_on_keeps_its_place_until_the_helper_answers_it() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("helper.sock");
        let (answer, most, _received) = holding_helper(UnixListener::bind(&socket).unwrap());
        let client = Arc::new(HelperClient::new(socket));
        let call = |client: &Arc<HelperClient>| {
            let client = client.clone();
            tokio::spawn(async move { client.request(Request::Lanes).await })
        };
        for _ in 0..2 {
            let given_up = call(&client);
            tokio::time::sleep(Duration::from_millis(100)).await;
            given_up.abort();
        }
        let third = call(&client);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            most.load(Ordering::SeqCst),
            2,
            "the helper was sent more requests than it serves at once"
        );
        assert!(!third.is_finished(), "{:?}", third.await);
        // Once the helper answers the two, the third goes, and is answered in its turn.
        answer.send(()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        answer.send(()).await.unwrap();
        let answered = tokio::time::timeout(Duration::from_secs(5), third)
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(answered, Ok(Response::Lanes { .. })),
            "{answered:?}"
        );
        assert_eq!(most.load(Ordering::SeqCst), 2);
    }

    /// A result that would wait, finding every place for waits taken, asks without waiting once
    /// the time it was given is up, rather than waiting for a place past it.
    #[tokio::test]
    async fn a_result_that_finds_no_place_to_wait_asks_without_waiting_in_its_time() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("helper.sock");
        let (_answer, _most, mut received) = holding_helper(UnixListener::bind(&socket).unwrap());
        let client = Arc::new(HelperClient::new(socket));
        let result = |client: &Arc<HelperClient>, wait_ms: u32| {
            let client = client.clone();
            let body = Request::Result {
                handle: "d-1".into(),
                wait_ms,
                output_from: None,
            };
            tokio::spawn(async move { client.request(body).await })
        };
        // 2 places, 1 of them for waits: a long wait holds it.
        let _long = result(&client, 60_000);
        let first = tokio::time::timeout(Duration::from_secs(5), received.recv()).await;
        assert!(
            matches!(
                first,
                Ok(Some(Request::Result {
                    wait_ms: 60_000,
                    ..
                }))
            ),
            "{first:?}"
        );
        let started = std::time::Instant::now();
        let _short = result(&client, 300);
        let second = tokio::time::timeout(Duration::from_secs(5), received.recv()).await;
        assert!(
            matches!(second, Ok(Some(Request::Result { wait_ms: 0, .. }))),
            "{second:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
}
