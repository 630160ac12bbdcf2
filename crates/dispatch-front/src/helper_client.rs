//! The front's connection to the helper: one Unix-socket connection, multiplexed (each request
//! carries an id, responses are routed back by id), re-established on the next call after the
//! helper restarts. A call made while the helper is down gets a clear error; nothing is queued.

use dispatch_proto::{
    CodecError, FrameLimit, HelloReply, PROTOCOL_VERSION, Request, RequestEnvelope, Response,
    ResponseEnvelope, read_frame, write_frame,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::oneshot;

#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    #[error("the dispatch helper is not reachable at {socket}: {reason}")]
    Unreachable { socket: String, reason: String },
    #[error(
        "the connection to the dispatch helper was lost while the request was in flight; the helper may have restarted"
    )]
    Disconnected,
    #[error("the dispatch helper broke the protocol: {0}")]
    Protocol(String),
}

struct Connection {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Response>>>>,
    alive: Arc<AtomicBool>,
    hello: HelloReply,
}

pub struct HelperClient {
    socket: PathBuf,
    client_name: Mutex<Option<String>>,
    connection: tokio::sync::Mutex<Option<Arc<Connection>>>,
    next_id: AtomicU64,
}

impl HelperClient {
    pub fn new(socket: PathBuf) -> HelperClient {
        HelperClient {
            socket,
            client_name: Mutex::new(None),
            connection: tokio::sync::Mutex::new(None),
            next_id: AtomicU64::new(1),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The MCP client's name, passed to the helper as a claim on the next (re)connection.
    pub fn set_client_name(&self, name: Option<String>) {
        let mut current = self.client_name.lock().unwrap_or_else(|p| p.into_inner());
        if current.is_none() {
            *current = name;
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
            other => other,
        }
    }

    /// The helper's handshake reply (connecting if needed).
    pub async fn hello(&self) -> Result<HelloReply, HelperError> {
        Ok(self.connection().await?.hello.clone())
    }

    async fn request_once(&self, body: Request) -> Result<Response, HelperError> {
        let connection = self.connection().await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = oneshot::channel();
        connection
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, sender);
        let sent = {
            let mut writer = connection.writer.lock().await;
            write_frame(
                &mut *writer,
                &RequestEnvelope { id, body },
                FrameLimit::REQUEST,
            )
            .await
        };
        if let Err(error) = sent {
            connection
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            connection.alive.store(false, Ordering::SeqCst);
            return Err(match error {
                CodecError::Oversized { .. } => HelperError::Protocol(error.to_string()),
                _ => HelperError::Disconnected,
            });
        }
        receiver.await.map_err(|_| HelperError::Disconnected)
    }

    async fn connection(&self) -> Result<Arc<Connection>, HelperError> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref()
            && connection.alive.load(Ordering::SeqCst)
        {
            return Ok(connection.clone());
        }
        let connection = Arc::new(self.connect().await?);
        *slot = Some(connection.clone());
        Ok(connection)
    }

    async fn connect(&self) -> Result<Connection, HelperError> {
        let unreachable = |reason: String| HelperError::Unreachable {
            socket: self.socket.display().to_string(),
            reason,
        };
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let (mut reader, mut writer) = stream.into_split();
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
        write_frame(&mut writer, &hello, FrameLimit::REQUEST)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let reply: Option<ResponseEnvelope> = read_frame(&mut reader, FrameLimit::RESPONSE)
            .await
            .map_err(|e| HelperError::Protocol(e.to_string()))?;
        let hello = match reply.map(|r| r.body) {
            Some(Response::Hello(hello)) => hello,
            Some(Response::Error(error)) => return Err(HelperError::Protocol(error.message)),
            Some(other) => return Err(HelperError::Protocol(format!("unexpected handshake reply {other:?}"))),
            // The helper closes without a word on peers it does not admit.
            None => return Err(unreachable("the helper closed the connection during the handshake: this user is probably not an admitted client (see [clients] in the helper config)".into())),
        };
        let pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Response>>>> = Arc::default();
        let alive = Arc::new(AtomicBool::new(true));
        let (reader_pending, reader_alive) = (pending.clone(), alive.clone());
        tokio::spawn(async move {
            // Until end of stream or any error: either way the connection is finished.
            while let Ok(Some(response)) =
                read_frame::<ResponseEnvelope, _>(&mut reader, FrameLimit::RESPONSE).await
            {
                let waiter = reader_pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&response.id);
                if let Some(waiter) = waiter {
                    let _ = waiter.send(response.body);
                }
            }
            reader_alive.store(false, Ordering::SeqCst);
            // Dropping the senders wakes every waiter with "disconnected".
            reader_pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
        });
        Ok(Connection {
            writer: tokio::sync::Mutex::new(writer),
            pending,
            alive,
            hello,
        })
    }
}
