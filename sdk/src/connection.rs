//! One framed connection to an access node: TLS or plaintext, requests
//! matched to responses by `sequence`, and server-initiated frames (pushes,
//! notices, connection-level errors) handed out as [`ServerEvent`]s.
//!
//! A connection can also be ended from this side without the server's help
//! (`abort`, and the optional read deadline `set_idle_timeout`): a half-open
//! TCP connection to a vanished peer never delivers EOF, so waiting for the
//! server to close it would wait forever.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tern_proto::pb;
use tern_proto::{ErrorCode, Frame, FrameCodec, RequestType, ServiceError};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use crate::ClientError;

/// How to secure the connection.
#[derive(Debug, Clone)]
pub enum TlsMode {
    /// Plaintext; only for servers started with plaintext explicitly enabled.
    Plain,
    /// TLS, trusting the CA certificate(s) in this PEM file (e.g. the
    /// `tls/ca.pem` that `tern standalone` writes into its data directory).
    CaFile(PathBuf),
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// `host:port` of the access node.
    pub addr: String,
    pub tls: TlsMode,
    /// Name checked against the server certificate; defaults to the host
    /// part of `addr`.
    pub server_name: Option<String>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// Largest frame body accepted from the server.
    pub max_body_len: u32,
}

impl ConnectOptions {
    pub fn new(addr: impl Into<String>, tls: TlsMode) -> Self {
        Self {
            addr: addr.into(),
            tls,
            server_name: None,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            max_body_len: tern_proto::MAX_SERVER_BODY_LEN,
        }
    }
}

/// Something the server sent on its own.
#[derive(Debug, Clone)]
pub enum ServerEvent {
    Message(pb::Message),
    Notice(pb::Notice),
    /// The connection ended; the error frame that preceded it, if any.
    Closed(Option<ServiceError>),
}

type Pending = Arc<Mutex<HashMap<u32, oneshot::Sender<Result<Frame, ServiceError>>>>>;
type Sink = FramedWrite<Box<dyn AsyncWrite + Send + Unpin>, FrameCodec>;

/// How long `abort` waits for the write side to shut down cleanly: a dead
/// peer may never take the bytes still buffered.
const ABORT_GRACE: Duration = Duration::from_secs(1);

/// A live connection. Cheap to clone; all clones share the socket.
#[derive(Clone)]
pub struct Connection {
    /// `None` once aborted, so the write half is dropped and the socket can
    /// close even while clones of the connection are still around.
    sink: Arc<tokio::sync::Mutex<Option<Sink>>>,
    pending: Pending,
    next_sequence: Arc<AtomicU32>,
    request_timeout: Duration,
    /// Cancelled by `abort`: the reader stops and writes give up.
    aborted: CancellationToken,
    /// Cancelled when the reader has stopped: the connection is over.
    ended: CancellationToken,
    /// The reader's deadline for the next frame; `None` waits forever.
    idle_timeout: Arc<watch::Sender<Option<Duration>>>,
    /// Whether the TLS handshake resumed an earlier session (`None` for
    /// plaintext).
    tls_resumed: Option<bool>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The TLS client for the CA file `ca`, shared by every connection that
/// trusts the same certificates: its session cache is what lets a
/// reconnect resume with the ticket of the previous session (skipping the
/// server's signature and its verification). Keyed by the file's contents,
/// so a replaced CA file gets a fresh configuration.
fn tls_connector(ca: &PathBuf) -> Result<tokio_rustls::TlsConnector, ClientError> {
    static CONNECTORS: Mutex<Vec<(Vec<u8>, tokio_rustls::TlsConnector)>> = Mutex::new(Vec::new());
    /// Distinct CA files remembered; beyond this the oldest is forgotten.
    const REMEMBERED: usize = 8;
    let pem =
        std::fs::read(ca).map_err(|e| ClientError::Tls(format!("cannot read {}: {e}", ca.display())))?;
    let mut connectors = CONNECTORS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, connector)) = connectors.iter().find(|(known, _)| *known == pem) {
        return Ok(connector.clone());
    }
    let connector = new_tls_connector(ca, &pem)?;
    if connectors.len() == REMEMBERED {
        connectors.remove(0);
    }
    connectors.push((pem, connector.clone()));
    Ok(connector)
}

fn new_tls_connector(ca: &Path, pem: &[u8]) -> Result<tokio_rustls::TlsConnector, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| ClientError::Tls(format!("bad PEM in {}: {e}", ca.display())))?;
        roots.add(cert).map_err(|e| ClientError::Tls(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(ClientError::Tls(format!("no certificate in {}", ca.display())));
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

impl Connection {
    /// Connects (and completes the TLS handshake). Events arrive on the
    /// returned receiver until the connection closes, ending with
    /// [`ServerEvent::Closed`].
    pub async fn connect(
        options: &ConnectOptions,
    ) -> Result<(Connection, mpsc::UnboundedReceiver<ServerEvent>), ClientError> {
        let tcp = tokio::time::timeout(options.connect_timeout, TcpStream::connect(&options.addr))
            .await
            .map_err(|_| ClientError::Timeout)??;
        tcp.set_nodelay(true)?;
        Self::over_stream(tcp, options).await
    }

    /// Like [`Connection::connect`] over an already connected socket (the
    /// benchmark binds sockets to chosen source addresses).
    pub async fn over_stream(
        tcp: TcpStream,
        options: &ConnectOptions,
    ) -> Result<(Connection, mpsc::UnboundedReceiver<ServerEvent>), ClientError> {
        match &options.tls {
            TlsMode::Plain => Ok(Self::start(tcp, options, None)),
            TlsMode::CaFile(ca) => {
                let connector = tls_connector(ca)?;
                let host = match &options.server_name {
                    Some(name) => name.clone(),
                    None => options.addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(&options.addr).to_owned(),
                };
                let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
                let name = ServerName::try_from(host.clone())
                    .map_err(|_| ClientError::Tls(format!("invalid server name {host:?}")))?;
                let stream = tokio::time::timeout(options.connect_timeout, connector.connect(name, tcp))
                    .await
                    .map_err(|_| ClientError::Timeout)?
                    .map_err(|e| ClientError::Tls(e.to_string()))?;
                let resumed = stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
                Ok(Self::start(stream, options, Some(resumed)))
            }
        }
    }

    fn start<S>(
        stream: S,
        options: &ConnectOptions,
        tls_resumed: Option<bool>,
    ) -> (Connection, mpsc::UnboundedReceiver<ServerEvent>)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (read_half, write_half) = tokio::io::split(stream);
        let codec = FrameCodec::new(options.max_body_len);
        let sink: Sink = FramedWrite::new(Box::new(write_half), codec);
        let pending: Pending = Arc::default();
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (idle_timeout, idle_rx) = watch::channel(None);
        let conn = Connection {
            sink: Arc::new(tokio::sync::Mutex::new(Some(sink))),
            pending: pending.clone(),
            next_sequence: Arc::new(AtomicU32::new(1)),
            request_timeout: options.request_timeout,
            aborted: CancellationToken::new(),
            ended: CancellationToken::new(),
            idle_timeout: Arc::new(idle_timeout),
            tls_resumed,
        };
        tokio::spawn(read_loop(
            FramedRead::new(read_half, codec),
            pending,
            events_tx,
            conn.aborted.clone(),
            conn.ended.clone(),
            idle_rx,
        ));
        (conn, events_rx)
    }

    /// Whether the TLS handshake resumed an earlier session with its ticket
    /// (`None` on a plaintext connection).
    pub fn tls_resumed(&self) -> Option<bool> {
        self.tls_resumed
    }

    /// Sends a frame without waiting for an answer: an ACK with sequence 0,
    /// or (in tests) malformed input.
    pub async fn send_frame(&self, frame: Frame) -> Result<(), ClientError> {
        let send = async {
            let mut sink = self.sink.lock().await;
            let sink = sink.as_mut().ok_or(ClientError::Closed)?;
            sink.send(frame).await.map_err(|e| ClientError::Io(std::io::Error::other(e.to_string())))
        };
        // Giving up on abort also releases the sink lock that `abort` needs.
        tokio::select! {
            _ = self.aborted.cancelled() => Err(ClientError::Closed),
            sent = send => sent,
        }
    }

    /// Sends `body` as `kind` and waits for the matching response.
    pub async fn request<Req, Resp>(&self, kind: RequestType, body: &Req) -> Result<Resp, ClientError>
    where
        Req: prost::Message,
        Resp: prost::Message + Default,
    {
        let frame = self.request_frame(kind, body).await?;
        frame.decode().map_err(|e| ClientError::Protocol(format!("undecodable response: {e}")))
    }

    async fn request_frame<Req: prost::Message>(
        &self,
        kind: RequestType,
        body: &Req,
    ) -> Result<Frame, ClientError> {
        let mut sequence = self.next_sequence.fetch_add(1, Ordering::Relaxed);
        if sequence == 0 {
            // 0 is reserved for server-initiated frames.
            sequence = self.next_sequence.fetch_add(1, Ordering::Relaxed);
        }
        let (tx, rx) = oneshot::channel();
        self.lock_pending().insert(sequence, tx);
        // The send is under the deadline too: writing to a dead peer blocks
        // once the socket buffer is full. A request made after the reader
        // stopped (which fails the waiters it knows of) fails at once.
        let exchange = async {
            self.send_frame(Frame::new(kind, sequence, body)).await?;
            tokio::select! {
                _ = self.ended.cancelled() => Err(ClientError::Closed),
                answer = rx => answer.map_err(|_| ClientError::Closed),
            }
        };
        let outcome = tokio::time::timeout(self.request_timeout, exchange).await;
        self.lock_pending().remove(&sequence);
        match outcome {
            Err(_) => Err(ClientError::Timeout),
            Ok(Err(e)) => Err(e),
            Ok(Ok(Err(service))) => Err(ClientError::Server(service)),
            Ok(Ok(Ok(frame))) => Ok(frame),
        }
    }

    fn lock_pending(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<u32, oneshot::Sender<Result<Frame, ServiceError>>>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes the write side; the server then closes the connection.
    pub async fn close(&self) {
        let close = async {
            if let Some(sink) = self.sink.lock().await.as_mut() {
                let _ = sink.close().await;
            }
        };
        tokio::select! {
            _ = self.aborted.cancelled() => {}
            () = close => {}
        }
    }

    /// Ends the connection now, without waiting for the server: the reader
    /// stops (failing waiting requests and emitting [`ServerEvent::Closed`])
    /// and the socket is shut down. For a peer that no longer answers, where
    /// [`Connection::close`] would leave the reader waiting forever.
    pub(crate) async fn abort(&self) {
        self.aborted.cancel();
        // Writers give the lock up as soon as `aborted` fires.
        let sink = self.sink.lock().await.take();
        if let Some(mut sink) = sink {
            let _ = tokio::time::timeout(ABORT_GRACE, sink.close()).await;
        }
    }

    /// Waits until the connection is over (the reader has stopped).
    pub(crate) async fn ended(&self) {
        self.ended.cancelled().await;
    }

    /// Treats the connection as dead, ending it, when no frame arrives for
    /// `timeout` (`None`: wait forever, the default).
    pub(crate) fn set_idle_timeout(&self, timeout: Option<Duration>) {
        self.idle_timeout.send_replace(timeout);
    }
}

/// When the idle timer fires for a connection whose last frame arrived at
/// `last_frame`; far in the future when there is no timeout.
fn idle_deadline(last_frame: Instant, timeout: Option<Duration>) -> Instant {
    last_frame + timeout.unwrap_or(Duration::from_secs(365 * 86_400))
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut frames: FramedRead<R, FrameCodec>,
    pending: Pending,
    events: mpsc::UnboundedSender<ServerEvent>,
    aborted: CancellationToken,
    ended: CancellationToken,
    mut idle_timeout: watch::Receiver<Option<Duration>>,
) {
    let mut last_error = None;
    let mut last_frame = Instant::now();
    // Re-armed when it fires rather than on every frame, which keeps timer
    // work off the per-frame path.
    let idle_timer = tokio::time::sleep_until(idle_deadline(last_frame, *idle_timeout.borrow()));
    tokio::pin!(idle_timer);
    loop {
        let next = tokio::select! {
            _ = aborted.cancelled() => break,
            Ok(()) = idle_timeout.changed() => {
                let timeout = *idle_timeout.borrow_and_update();
                idle_timer.as_mut().reset(idle_deadline(last_frame, timeout));
                continue;
            }
            () = &mut idle_timer => {
                let deadline = idle_deadline(last_frame, *idle_timeout.borrow());
                if deadline <= Instant::now() {
                    tracing::debug!("no frame within the idle timeout; dropping the connection");
                    break;
                }
                idle_timer.as_mut().reset(deadline);
                continue;
            }
            next = frames.next() => next,
        };
        let Some(next) = next else { break };
        last_frame = Instant::now();
        let frame = match next {
            Ok(frame) => frame,
            Err(e) => {
                tracing::debug!(error = %e, "connection read failed");
                break;
            }
        };
        match frame.kind() {
            Some(RequestType::PushMessage) => match frame.decode::<pb::Message>() {
                Ok(message) => {
                    let _ = events.send(ServerEvent::Message(message));
                }
                Err(e) => tracing::warn!(error = %e, "undecodable push dropped"),
            },
            Some(RequestType::Notice) => {
                if let Ok(notice) = frame.decode::<pb::Notice>() {
                    let _ = events.send(ServerEvent::Notice(notice));
                }
            }
            Some(RequestType::Error) => {
                let body: pb::ErrorBody = frame.decode().unwrap_or_default();
                let code = ErrorCode::from_u32(body.code).unwrap_or(ErrorCode::Internal);
                let error = ServiceError::new(code, body.message);
                let waiter = pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&frame.sequence);
                match waiter {
                    Some(waiter) => {
                        let _ = waiter.send(Err(error.clone()));
                    }
                    None => tracing::debug!(%error, "connection-level error"),
                }
                if code.closes_connection() {
                    last_error = Some(error);
                }
            }
            _ => {
                let waiter = pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&frame.sequence);
                if let Some(waiter) = waiter {
                    let _ = waiter.send(Ok(frame));
                }
            }
        }
    }
    // Fail every request still waiting.
    pending.lock().unwrap_or_else(|e| e.into_inner()).clear();
    ended.cancel();
    let _ = events.send(ServerEvent::Closed(last_error));
}
