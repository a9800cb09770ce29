//! One client connection, served by one task: the TLS session (rustls'
//! unbuffered API over the socket), frame decoding, requests, and the frames
//! other tasks queue for it (pushes, notices).
//!
//! Memory per idle connection is what an access node pays for every client
//! (S1 in `bench/README.md`), so an idle connection holds no buffer: the task
//! waits for socket readiness rather than inside a read, reads into a buffer
//! allocated for that read, and releases every buffer (plaintext in and out,
//! TLS records in, the outbound queue) once it is empty. What stays is the
//! task itself, the rustls session state (keys, handshake outcome) and the
//! connection's entry in the node.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, BytesMut};
use rustls::ServerConfig;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use tern_dispatcher::SendRequest;
use tern_proto::pb::{self, NoticeKind};
use tern_proto::{
    ErrorCode, Frame, FrameCodec, FrameError, HEADER_LEN, RequestType, ServiceError, ServiceResult,
};
use tern_router_auth::Identity;
use tern_store::Placement;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::codec::Decoder;
use tracing::Instrument;

use crate::{AccessNode, ConnHandle};

/// Bytes asked of the socket by a read into an empty buffer: most reads
/// are one heartbeat or request, and a connection with more to read is read
/// again with [`READ_CHUNK`].
const FIRST_READ: usize = 1024;

/// Bytes asked of the socket per read after the first.
const READ_CHUNK: usize = 8 * 1024;

/// Unsent bytes above which a connection stops reading requests and taking
/// queued frames until the client reads: responses wait (back-pressure on the
/// client's own reads) and pushes stay in the bounded outbound queue, where
/// the slow-consumer policy applies.
const HIGH_WATER: usize = 64 * 1024;

/// Frames other tasks queue for a connection: pushes and notices. Bounded;
/// its memory is released whenever the connection's task empties it.
pub(crate) struct Outbox {
    state: Mutex<OutboxState>,
    capacity: usize,
}

#[derive(Default)]
struct OutboxState {
    frames: VecDeque<Frame>,
    /// The task is asked to send what is queued and close.
    closing: bool,
    /// The task is finishing: nothing more is accepted.
    shut: bool,
    /// The connection's task, waiting for frames or a close.
    waiting: Option<Waker>,
}

/// Why [`Outbox::push`] refused a frame.
pub(crate) enum Refused {
    /// `capacity` frames are waiting: the client is not reading.
    Full,
    /// The connection is closing.
    Closed,
}

impl Outbox {
    pub(crate) fn new(capacity: usize) -> Self {
        Self { state: Mutex::default(), capacity }
    }

    fn lock(&self) -> MutexGuard<'_, OutboxState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a frame for the connection; never waits.
    pub(crate) fn push(&self, frame: Frame) -> Result<(), Refused> {
        self.push_all([frame])
    }

    /// Queues frames for the connection, in order, under one lock and with
    /// one wake-up; never waits. `Full` once the queue is: the frames
    /// before that one are queued (the connection is closed then anyway).
    pub(crate) fn push_all(&self, frames: impl IntoIterator<Item = Frame>) -> Result<(), Refused> {
        let (queued, waiting) = {
            let mut state = self.lock();
            if state.shut {
                return Err(Refused::Closed);
            }
            let mut queued = Ok(());
            for frame in frames {
                if state.frames.len() >= self.capacity {
                    queued = Err(Refused::Full);
                    break;
                }
                state.frames.push_back(frame);
            }
            (queued, state.waiting.take())
        };
        if let Some(task) = waiting {
            task.wake();
        }
        queued
    }

    /// Asks the connection to send what is queued and close.
    pub(crate) fn close(&self) {
        let waiting = {
            let mut state = self.lock();
            state.closing = true;
            state.waiting.take()
        };
        if let Some(task) = waiting {
            task.wake();
        }
    }

    /// Ready when frames are queued (if `frames`) or a close is asked (if
    /// `closing`); otherwise the task is woken when that changes. (A waker
    /// in the outbox rather than a `Notify`: waiting costs the task's future
    /// no room.)
    fn poll_ready(&self, cx: &mut Context<'_>, frames: bool, closing: bool) -> Poll<()> {
        let mut state = self.lock();
        if (frames && !state.frames.is_empty()) || (closing && state.closing) {
            return Poll::Ready(());
        }
        if !state.waiting.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            state.waiting = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    fn closing(&self) -> bool {
        self.lock().closing
    }

    /// Everything queued; the queue gives up its memory.
    fn take(&self) -> VecDeque<Frame> {
        std::mem::take(&mut self.lock().frames)
    }

    /// Refuses further frames and returns what is queued.
    fn shut(&self) -> VecDeque<Frame> {
        let mut state = self.lock();
        state.shut = true;
        state.waiting = None;
        std::mem::take(&mut state.frames)
    }
}

/// Serves a new connection on its own task: the TLS handshake if `tls`,
/// then requests until the connection ends.
///
/// Each kind of connection is its own task type, built from the fewest
/// nested futures, because the task's future is allocated for as long as
/// the connection lives (arguments of async functions keep their own room in
/// the future, so every layer counts).
pub(crate) fn spawn(node: Arc<AccessNode>, stream: TcpStream, peer: SocketAddr, tls: Option<&TlsAcceptor>) {
    let id = node.next_connection_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let span = tracing::info_span!("conn", %peer, conn = id, user = tracing::field::Empty);
    match tls {
        Some(acceptor) => match Tls::new(acceptor.config().clone()) {
            Ok(wire) => {
                tokio::spawn(serve_tls(node, Io::new(stream, wire), id).instrument(span));
            }
            Err(e) => tracing::warn!(parent: &span, error = %e, "TLS session not created"),
        },
        None => {
            tokio::spawn(serve_plain(node, Io::new(stream, Plain), id).instrument(span));
        }
    }
}

async fn serve_tls(node: Arc<AccessNode>, mut io: Io<Tls>, id: u64) {
    // Boxed: its future is needed once, not for the life of the task.
    let handshake = Box::pin(tokio::time::timeout(node.config.handshake_timeout, io.handshake())).await;
    match handshake {
        Ok(Ok(())) => run(node, &mut io, id).await,
        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
        Err(_) => tracing::debug!("TLS handshake timed out"),
    }
}

async fn serve_plain(node: Arc<AccessNode>, mut io: Io<Plain>, id: u64) {
    run(node, &mut io, id).await
}

async fn run<W: Wire>(node: Arc<AccessNode>, io: &mut Io<W>, id: u64) {
    let handle = Arc::new(ConnHandle::new(node.config.outbound_queue));
    node.lock_connections().insert(id, handle.clone());
    let conn = Connection { node: node.clone(), handle: handle.clone(), id };
    conn.serve(io).await;
    // Boxed: its future is needed once, not for the life of the task.
    Box::pin(end(&node, &handle, io, id)).await;
}

/// Sends what is queued and closes; removes the connection and its placement.
async fn end<W: Wire>(node: &AccessNode, handle: &ConnHandle, io: &mut Io<W>, id: u64) {
    let queued = handle.outbox.shut();
    node.lock_connections().remove(&id);
    let identity = handle.identity.lock().unwrap_or_else(|e| e.into_inner()).take();
    let detach = async {
        if let Some(identity) = identity {
            let placement = Placement {
                user_id: identity.user_id,
                device_id: identity.device_id,
                node_id: node.config.node_id.clone(),
                connection_id: id,
            };
            if let Err(e) = node.services.auth.detach(&placement).await {
                tracing::warn!(error = %e, "placement not removed");
            }
        }
    };
    // Send what is queued and close, but a peer that stopped reading does
    // not hold the task: past the timeout the socket is dropped.
    let flush = tokio::time::timeout(node.config.handshake_timeout, io.finish(queued));
    let _ = tokio::join!(detach, flush);
    tracing::debug!("connection closed");
}

/// What a connection speaks over its socket: plaintext frames or TLS.
trait Wire: Send {
    /// The buffer bytes read from the socket are appended to.
    fn read_buffer<'a>(&'a mut self, input: &'a mut BytesMut) -> &'a mut BytesMut;
    /// Turns what was read into application bytes in `input` (and TLS
    /// records to send, such as a key update, in `output`).
    fn received(&mut self, input: &mut BytesMut, output: &mut BytesMut) -> io::Result<()>;
    /// Appends `frames` to `output`, encrypted where needed.
    fn send(
        &mut self,
        frames: impl IntoIterator<Item = Frame>,
        input: &mut BytesMut,
        output: &mut BytesMut,
    ) -> io::Result<()>;
    /// Appends the end of the session (TLS close_notify) to `output`.
    fn close(&mut self, input: &mut BytesMut, output: &mut BytesMut);
    /// The peer ended the session (TLS close_notify).
    fn peer_closed(&self) -> bool;
    /// Releases buffers that are empty.
    fn release(&mut self);
}

fn put_frame(dst: &mut BytesMut, frame: &Frame) {
    dst.reserve(HEADER_LEN + frame.body.len());
    frame.header().write(dst);
    dst.extend_from_slice(&frame.body);
}

/// Appends `frames` to `dst`, with room made once for as many frames the
/// size of the first as the iterator knows of: the pushes of a batch are
/// copies of a few messages, and growing the buffer frame by frame copied
/// what it held at every doubling.
fn put_frames(dst: &mut BytesMut, frames: impl IntoIterator<Item = Frame>) {
    let mut frames = frames.into_iter().peekable();
    if let Some(first_len) = frames.peek().map(|first| HEADER_LEN + first.body.len()) {
        dst.reserve(frames.size_hint().0.saturating_mul(first_len));
    }
    for frame in frames {
        put_frame(dst, &frame);
    }
}

/// Plaintext TCP (trusted networks only).
struct Plain;

impl Wire for Plain {
    fn read_buffer<'a>(&'a mut self, input: &'a mut BytesMut) -> &'a mut BytesMut {
        input
    }

    fn received(&mut self, _input: &mut BytesMut, _output: &mut BytesMut) -> io::Result<()> {
        Ok(())
    }

    fn send(
        &mut self,
        frames: impl IntoIterator<Item = Frame>,
        _input: &mut BytesMut,
        output: &mut BytesMut,
    ) -> io::Result<()> {
        put_frames(output, frames);
        Ok(())
    }

    fn close(&mut self, _input: &mut BytesMut, _output: &mut BytesMut) {}

    fn peer_closed(&self) -> bool {
        false
    }

    fn release(&mut self) {}
}

/// A TLS session on rustls' unbuffered API: the connection owns every
/// buffer, so none outlives its use (the buffered `ServerConnection` keeps a
/// 4 KiB receive buffer for as long as the connection lives).
struct Tls {
    /// Boxed because it is large and `Io` is moved.
    session: Box<UnbufferedServerConnection>,
    /// TLS records read and not yet processed.
    incoming: BytesMut,
    peer_closed: bool,
}

/// Where a TLS session stands after processing what it was given.
enum Phase {
    /// The handshake needs more from the peer.
    Handshaking,
    /// Application data flows.
    Open,
    /// Both sides sent close_notify.
    Closed,
}

/// Something to send once the session can.
enum Seal<'a> {
    Data(&'a [u8]),
    CloseNotify,
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Lets `write` fill the end of `output`, growing it once to the size the
/// writer asks for if `hint` was too small.
fn fill<E>(
    output: &mut BytesMut,
    hint: usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, E>,
    required: impl Fn(&E) -> Option<usize>,
) -> Result<(), E> {
    let start = output.len();
    output.resize(start + hint, 0);
    let mut written = write(&mut output[start..]);
    if let Some(size) = written.as_ref().err().and_then(&required) {
        output.resize(start + size, 0);
        written = write(&mut output[start..]);
    }
    match written {
        Ok(n) => {
            output.truncate(start + n);
            Ok(())
        }
        Err(e) => {
            output.truncate(start);
            Err(e)
        }
    }
}

fn encode_required(e: &EncodeError) -> Option<usize> {
    match e {
        EncodeError::InsufficientSize(s) => Some(s.required_size),
        _ => None,
    }
}

fn encrypt_required(e: &EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(s) => Some(s.required_size),
        _ => None,
    }
}

impl Tls {
    fn new(config: Arc<ServerConfig>) -> Result<Self, rustls::Error> {
        Ok(Self {
            session: Box::new(UnbufferedServerConnection::new(config)?),
            incoming: BytesMut::new(),
            peer_closed: false,
        })
    }

    /// Runs the session over the records in `incoming`: application data is
    /// appended to `input`, records to send (handshake, alerts, key updates,
    /// `seal`) to `output`.
    fn pump(
        &mut self,
        input: &mut BytesMut,
        output: &mut BytesMut,
        mut seal: Option<Seal<'_>>,
    ) -> io::Result<Phase> {
        loop {
            let UnbufferedStatus { mut discard, state } =
                self.session.process_tls_records(&mut self.incoming);
            let state = match state {
                Ok(state) => state,
                Err(e) => {
                    // A fatal alert may be queued: it goes out before the close.
                    if let Ok(ConnectionState::EncodeTlsData(mut alert)) =
                        self.session.process_tls_records(&mut []).state
                    {
                        let _ = fill(output, 64, |buf| alert.encode(buf), encode_required);
                    }
                    return Err(tls_error(e));
                }
            };
            let phase = match state {
                ConnectionState::ReadTraffic(mut records) => {
                    while let Some(record) = records.next_record() {
                        let record = record.map_err(tls_error)?;
                        discard += record.discard;
                        input.extend_from_slice(record.payload);
                    }
                    None
                }
                ConnectionState::ReadEarlyData(mut records) => {
                    while let Some(record) = records.next_record() {
                        let record = record.map_err(tls_error)?;
                        discard += record.discard;
                        input.extend_from_slice(record.payload);
                    }
                    None
                }
                ConnectionState::EncodeTlsData(mut records) => {
                    fill(output, 1024, |buf| records.encode(buf), encode_required)
                        .map_err(io::Error::other)?;
                    None
                }
                // `output` is written in order before the task waits for the
                // peer, which is all "transmitted" has to mean here.
                ConnectionState::TransmitTlsData(records) => {
                    records.done();
                    None
                }
                ConnectionState::BlockedHandshake => Some(Phase::Handshaking),
                ConnectionState::PeerClosed => {
                    self.peer_closed = true;
                    None
                }
                ConnectionState::Closed => {
                    self.peer_closed = true;
                    Some(Phase::Closed)
                }
                ConnectionState::WriteTraffic(mut traffic) => {
                    match seal.take() {
                        Some(Seal::Data(data)) => {
                            let hint = data.len() + (data.len() / 16_384 + 1) * 32;
                            fill(output, hint, |buf| traffic.encrypt(data, buf), encrypt_required)
                                .map_err(io::Error::other)?;
                        }
                        Some(Seal::CloseNotify) => {
                            fill(output, 64, |buf| traffic.queue_close_notify(buf), encrypt_required)
                                .map_err(io::Error::other)?;
                        }
                        None => {}
                    }
                    Some(Phase::Open)
                }
                _ => Some(Phase::Closed),
            };
            self.incoming.advance(discard);
            if let Some(phase) = phase {
                if seal.is_some() {
                    return Err(io::Error::other("TLS session cannot send application data"));
                }
                return Ok(phase);
            }
        }
    }
}

impl Wire for Tls {
    fn read_buffer<'a>(&'a mut self, _input: &'a mut BytesMut) -> &'a mut BytesMut {
        &mut self.incoming
    }

    fn received(&mut self, input: &mut BytesMut, output: &mut BytesMut) -> io::Result<()> {
        self.pump(input, output, None).map(|_| ())
    }

    fn send(
        &mut self,
        frames: impl IntoIterator<Item = Frame>,
        input: &mut BytesMut,
        output: &mut BytesMut,
    ) -> io::Result<()> {
        // Every frame of a batch in as few records as possible.
        let mut plain = BytesMut::new();
        put_frames(&mut plain, frames);
        if plain.is_empty() {
            return Ok(());
        }
        self.pump(input, output, Some(Seal::Data(&plain))).map(|_| ())
    }

    fn close(&mut self, input: &mut BytesMut, output: &mut BytesMut) {
        let _ = self.pump(input, output, Some(Seal::CloseNotify));
    }

    fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    fn release(&mut self) {
        if self.incoming.is_empty() {
            self.incoming = BytesMut::new();
        }
    }
}

/// The socket and the buffers of one connection.
struct Io<W> {
    stream: TcpStream,
    wire: W,
    /// Application bytes received and not yet decoded into frames.
    input: BytesMut,
    /// Bytes for the socket not yet written.
    output: BytesMut,
    /// The end of a TLS 1.3 handshake that the client does not wait for
    /// (its session ticket), kept back to go out in front of the first
    /// reply: one send per login instead of two. Moved into `output` before
    /// anything else is added there, so records stay in order.
    held: BytesMut,
    /// The peer ended its side (or the session).
    eof: bool,
    /// Writes that took bytes (the tests count sends).
    #[cfg(test)]
    writes: usize,
}

impl<W: Wire> Io<W> {
    fn new(stream: TcpStream, wire: W) -> Self {
        Self {
            stream,
            wire,
            input: BytesMut::new(),
            output: BytesMut::new(),
            held: BytesMut::new(),
            eof: false,
            #[cfg(test)]
            writes: 0,
        }
    }

    /// Puts the held handshake records back in front of `output`.
    fn unhold(&mut self) {
        if !self.held.is_empty() {
            let later = std::mem::take(&mut self.output);
            self.output = std::mem::take(&mut self.held);
            self.output.extend_from_slice(&later);
        }
    }

    /// Reads once, if the socket has something, without waiting.
    ///
    /// Through tokio's `AsyncRead` rather than `try_read_buf`: a read that
    /// leaves room in the buffer has drained the socket, and tokio then
    /// clears the readiness itself, so the loop does not read again only to
    /// get `WouldBlock` (one syscall saved per request). The waker is a
    /// no-op: if this finds nothing, the loop registers its own before it
    /// waits (`poll_ready`, `readable`).
    fn read_ready(&mut self) -> io::Result<()> {
        let buf = self.wire.read_buffer(&mut self.input);
        buf.reserve(if buf.is_empty() { FIRST_READ } else { READ_CHUNK });
        let mut cx = Context::from_waker(Waker::noop());
        match tokio_util::io::poll_read_buf(Pin::new(&mut self.stream), &mut cx, buf) {
            Poll::Ready(Ok(0)) => self.eof = true,
            Poll::Ready(Ok(_)) => {}
            Poll::Pending => return Ok(()),
            Poll::Ready(Err(e)) => return Err(e),
        }
        if self.held.is_empty() {
            self.wire.received(&mut self.input, &mut self.output)?;
        } else {
            // Receiving may answer (a TLS key update): that answer goes
            // after the held records, and only then are they released.
            // (A failure's alert too, so it is still sent before the close.)
            let mut answer = BytesMut::new();
            let received = self.wire.received(&mut self.input, &mut answer);
            if !answer.is_empty() {
                self.unhold();
                self.output.extend_from_slice(&answer);
            }
            received?;
        }
        if self.wire.peer_closed() {
            self.eof = true;
        }
        Ok(())
    }

    /// Writes what the socket takes now.
    fn write_ready(&mut self) -> io::Result<()> {
        while !self.output.is_empty() {
            match self.stream.try_write(&self.output) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.output.advance(n);
                    #[cfg(test)]
                    {
                        self.writes += 1;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Ready when the socket can be read (if `read`) or written (if
    /// `write`): `(readable, writable)`. Polled in place, without a future
    /// that would take room in the task.
    fn poll_ready(&self, cx: &mut Context<'_>, read: bool, write: bool) -> Poll<io::Result<(bool, bool)>> {
        let mut readable = false;
        if read {
            match self.stream.poll_read_ready(cx) {
                Poll::Ready(Ok(())) => readable = true,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
        }
        let mut writable = false;
        if write {
            match self.stream.poll_write_ready(cx) {
                Poll::Ready(Ok(())) => writable = true,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
        }
        if readable || writable { Poll::Ready(Ok((readable, writable))) } else { Poll::Pending }
    }

    async fn write_all(&mut self) -> io::Result<()> {
        loop {
            self.write_ready()?;
            if self.output.is_empty() {
                return Ok(());
            }
            self.stream.writable().await?;
        }
    }

    fn send(&mut self, frames: impl IntoIterator<Item = Frame>) -> io::Result<()> {
        self.unhold();
        self.wire.send(frames, &mut self.input, &mut self.output)
    }

    /// Gives back the memory of empty buffers: an idle connection keeps none.
    fn release(&mut self) {
        if self.input.is_empty() {
            self.input = BytesMut::new();
        }
        if self.output.is_empty() {
            self.output = BytesMut::new();
        }
        self.wire.release();
    }

    /// Sends `frames` and the end of the session, then shuts the write side.
    async fn finish(&mut self, frames: VecDeque<Frame>) -> io::Result<()> {
        self.send(frames)?;
        self.wire.close(&mut self.input, &mut self.output);
        self.write_all().await?;
        self.stream.shutdown().await
    }
}

impl Io<Tls> {
    async fn handshake(&mut self) -> io::Result<()> {
        loop {
            let phase = self.wire.pump(&mut self.input, &mut self.output, None);
            if matches!(phase, Ok(Phase::Open))
                && self.wire.session.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3)
            {
                // The client has finished; what is left is for later (see `held`).
                self.held = std::mem::take(&mut self.output);
                return Ok(());
            }
            // Handshake records, or the alert that explains a failure.
            let written = self.write_all().await;
            match phase? {
                Phase::Open => return written,
                Phase::Closed => return Err(io::ErrorKind::UnexpectedEof.into()),
                // The peer's last flight may end with its close: what it
                // sent after the handshake is still served.
                Phase::Handshaking if self.eof => return Err(io::ErrorKind::UnexpectedEof.into()),
                Phase::Handshaking => {
                    written?;
                    self.stream.readable().await?;
                    self.read_ready()?;
                }
            }
        }
    }
}

/// Most consecutive sends of one connection served by one dispatcher call.
/// Bounds the wait of the first (it is answered with the last).
const MAX_SEND_BATCH: usize = 64;

/// Whether `frame` is a send (served in bursts).
fn is_send(frame: &Frame) -> bool {
    matches!(frame.kind(), Some(RequestType::SendSingle | RequestType::SendGroup))
}

/// The next whole frame in the input buffer, if any.
fn next_frame<W: Wire>(codec: &mut FrameCodec, io: &mut Io<W>) -> Result<Option<Frame>, FrameError> {
    if io.eof { codec.decode_eof(&mut io.input) } else { codec.decode(&mut io.input) }
}

/// The answer to a request that needs a logged-in connection.
fn not_logged_in() -> ServiceError {
    ServiceError::new(ErrorCode::NotLoggedIn, "log in first")
}

/// What a request leaves to send, and whether the connection ends after it.
struct Reply {
    frame: Option<Frame>,
    close: bool,
}

impl Reply {
    fn send(frame: Frame) -> Self {
        Self { frame: Some(frame), close: false }
    }
}

struct Connection {
    node: Arc<AccessNode>,
    handle: Arc<ConnHandle>,
    id: u64,
}

impl Connection {
    fn identity(&self) -> Option<Identity> {
        self.handle.identity.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn logged_in(&self) -> bool {
        self.handle.identity.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    fn unacked_pending(&self) -> bool {
        !self.handle.unacked.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
    }

    /// The connection's loop: requests in, responses and queued frames out,
    /// until the client leaves, breaks a rule, idles out, or the node closes
    /// the connection (slow consumer, kick, drain).
    async fn serve<W: Wire>(&self, io: &mut Io<W>) {
        let config = &self.node.config;
        let mut codec = FrameCodec::new(config.max_body_len);
        // A connection must log in within the handshake timeout, whatever it
        // sends before; after LOGIN, each frame restarts the idle timeout.
        let mut idle_at = Instant::now() + config.handshake_timeout;
        // When to look for pushes the client has not ACKed (only while some
        // are outstanding).
        let mut ack_at: Option<Instant> = None;
        let sleep = tokio::time::sleep_until(idle_at);
        tokio::pin!(sleep);
        let mut fired = false;
        // A frame read while gathering a burst of sends that is not a send:
        // served next.
        let mut lookahead: Option<Frame> = None;
        loop {
            if self.handle.outbox.closing() {
                return;
            }
            // The requests received, unless the client is not reading what
            // it is sent.
            while io.output.len() < HIGH_WATER {
                let frame = match lookahead.take().map(Ok).or_else(|| next_frame(&mut codec, io).transpose())
                {
                    Some(Ok(frame)) => frame,
                    None => break,
                    Some(Err(e)) => return self.framing_failed(io, &e),
                };
                let mut broken = None;
                let replies = if is_send(&frame) {
                    // The sends that follow it are served with it: one
                    // durable write for a pipelining client's burst.
                    let mut sends = vec![frame];
                    while sends.len() < MAX_SEND_BATCH {
                        match next_frame(&mut codec, io) {
                            Ok(Some(next)) if is_send(&next) => sends.push(next),
                            Ok(Some(next)) => {
                                lookahead = Some(next);
                                break;
                            }
                            Ok(None) => break,
                            Err(e) => {
                                // Answered after the sends before it.
                                broken = Some(e);
                                break;
                            }
                        }
                    }
                    Box::pin(self.while_serving(io, self.handle_sends(sends))).await
                } else {
                    // Boxed: a request's future is large and short-lived, and
                    // an idle connection's task should not carry its space.
                    vec![Box::pin(self.while_serving(io, self.handle_frame(frame))).await]
                };
                let close = replies.iter().any(|reply| reply.close);
                if io.send(replies.into_iter().filter_map(|reply| reply.frame)).is_err() {
                    return;
                }
                if let Some(e) = broken {
                    return self.framing_failed(io, &e);
                }
                if close || self.handle.outbox.closing() {
                    return;
                }
                if self.logged_in() {
                    idle_at = Instant::now() + config.idle_timeout;
                }
            }
            if io.eof && lookahead.is_none() && io.output.len() < HIGH_WATER {
                // Every frame before the end was served.
                return;
            }
            if io.output.len() < HIGH_WATER {
                let frames = self.handle.outbox.take();
                if !frames.is_empty() && io.send(frames).is_err() {
                    return;
                }
            }
            if ack_at.is_none() && self.unacked_pending() {
                ack_at = Some(Instant::now() + config.push_ack_timeout / 2);
            }
            if io.write_ready().is_err() {
                return;
            }
            io.release();

            let wake = ack_at.map_or(idle_at, |at| at.min(idle_at));
            if fired || sleep.deadline() != wake {
                sleep.as_mut().reset(wake);
                fired = false;
            }
            let reading = io.output.len() < HIGH_WATER;
            let writing = !io.output.is_empty();
            tokio::select! {
                biased;
                _ = poll_fn(|cx| self.handle.outbox.poll_ready(cx, reading, true)) => {}
                _ = &mut sleep => {
                    fired = true;
                    let now = Instant::now();
                    if now >= idle_at {
                        tracing::debug!("idle timeout");
                        return;
                    }
                    if ack_at.is_some_and(|at| now >= at) {
                        if let Some(notice) = self.check_unacked()
                            && io.send([notice]).is_err()
                        {
                            return;
                        }
                        ack_at = self.unacked_pending().then(|| now + config.push_ack_timeout / 2);
                    }
                }
                ready = poll_fn(|cx| io.poll_ready(cx, reading, writing)) => {
                    let Ok((readable, writable)) = ready else { return };
                    if writable && io.write_ready().is_err() {
                        return;
                    }
                    if readable && io.read_ready().is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Runs `request` while still sending what other tasks queue for this
    /// connection (pushes keep flowing during a slow request).
    async fn while_serving<W: Wire, T>(&self, io: &mut Io<W>, request: impl Future<Output = T>) -> T {
        tokio::pin!(request);
        let mut broken = false;
        loop {
            let taking = !broken && io.output.len() < HIGH_WATER;
            let writing = !broken && !io.output.is_empty();
            tokio::select! {
                biased;
                reply = &mut request => return reply,
                _ = poll_fn(|cx| self.handle.outbox.poll_ready(cx, true, false)), if taking => {
                    let frames = self.handle.outbox.take();
                    broken = io.send(frames).is_err() || io.write_ready().is_err();
                }
                ready = poll_fn(|cx| io.poll_ready(cx, false, true)), if writing => {
                    broken = ready.is_err() || io.write_ready().is_err();
                }
            }
        }
    }

    /// Sends the ERROR frame of a stream that cannot be read on (when the
    /// peer can still hear it); the connection then ends.
    fn framing_failed<W: Wire>(&self, io: &mut Io<W>, e: &FrameError) {
        if let Some(code) = e.code() {
            let error = ServiceError::new(code, e.to_string());
            if let Some(frame) = self.fail(0, &error).frame {
                let _ = io.send([frame]);
            }
        }
    }

    /// Tells a client whose pushes went unacknowledged to pull them.
    fn check_unacked(&self) -> Option<Frame> {
        let timeout = self.node.config.push_ack_timeout;
        let overdue = {
            let mut unacked = self.handle.unacked.lock().unwrap_or_else(|e| e.into_inner());
            let overdue = unacked.overdue(timeout);
            if overdue {
                unacked.clear();
            }
            overdue
        };
        overdue.then(|| {
            let notice =
                pb::Notice { kind: NoticeKind::Sync as i32, reason: "unacknowledged messages: pull".into() };
            Frame::new(RequestType::Notice, 0, &notice)
        })
    }

    /// An error frame; closes the connection when the code says so.
    fn fail(&self, sequence: u32, error: &ServiceError) -> Reply {
        tracing::debug!(code = %error.code, message = %error.message, "request failed");
        Reply {
            frame: Some(Frame::error(sequence, error.code, error.message.clone())),
            close: error.code.closes_connection(),
        }
    }

    fn reply<M: prost::Message>(&self, frame: &Frame, kind: RequestType, result: ServiceResult<M>) -> Reply {
        match result {
            Ok(body) => Reply::send(Frame::new(kind, frame.sequence, &body)),
            Err(e) => self.fail(frame.sequence, &e),
        }
    }

    async fn handle_frame(&self, frame: Frame) -> Reply {
        let Some(kind) = frame.kind() else {
            let e = ServiceError::new(
                ErrorCode::UnknownRequestType,
                format!("unknown requestType {}", frame.request_type),
            );
            return self.fail(frame.sequence, &e);
        };
        match kind {
            RequestType::Heartbeat => {
                Reply::send(Frame::new(RequestType::Heartbeat, frame.sequence, &pb::Heartbeat {}))
            }
            RequestType::Login => self.login(&frame).await,
            RequestType::PushMessage | RequestType::Notice | RequestType::Error => {
                let e = ServiceError::new(
                    ErrorCode::UnknownRequestType,
                    format!("requestType {} is sent by servers only", frame.request_type),
                );
                self.fail(frame.sequence, &e)
            }
            _ => match self.identity() {
                None => self.fail(frame.sequence, &not_logged_in()),
                Some(identity) => self.request(kind, &frame, &identity).await,
            },
        }
    }

    /// Consecutive SEND_SINGLE / SEND_GROUP frames of a logged-in
    /// connection, served in order by one dispatcher call; one reply each,
    /// in the same order (a body that does not decode fails alone).
    async fn handle_sends(&self, frames: Vec<Frame>) -> Vec<Reply> {
        let Some(identity) = self.identity() else {
            return frames.iter().map(|frame| self.fail(frame.sequence, &not_logged_in())).collect();
        };
        let mut replies: Vec<Option<Reply>> = Vec::with_capacity(frames.len());
        let mut requests = Vec::with_capacity(frames.len());
        let mut sent = Vec::with_capacity(frames.len());
        for (index, frame) in frames.iter().enumerate() {
            let request = match frame.kind() {
                Some(RequestType::SendGroup) => decode(frame).map(SendRequest::Group),
                _ => decode(frame).map(SendRequest::Single),
            };
            match request {
                Ok(request) => {
                    requests.push(request);
                    sent.push(index);
                    replies.push(None);
                }
                Err(e) => replies.push(Some(self.fail(frame.sequence, &e))),
            }
        }
        let dispatch = &self.node.services.dispatch;
        let acks = dispatch.send_batch(&identity.user_id, &identity.device_id, requests).await;
        for (index, ack) in sent.into_iter().zip(acks) {
            let frame = &frames[index];
            let kind = frame.kind().unwrap_or(RequestType::SendSingle);
            replies[index] = Some(self.reply(frame, kind, ack));
        }
        replies
            .into_iter()
            .zip(&frames)
            .map(|(reply, frame)| {
                reply.unwrap_or_else(|| {
                    self.fail(frame.sequence, &ServiceError::internal("the dispatcher gave no answer"))
                })
            })
            .collect()
    }

    async fn login(&self, frame: &Frame) -> Reply {
        if self.logged_in() {
            let e = ServiceError::new(ErrorCode::AlreadyLoggedIn, "this connection is already logged in");
            return self.fail(frame.sequence, &e);
        }
        if self.node.draining.load(std::sync::atomic::Ordering::SeqCst) {
            let notice = pb::Notice {
                kind: NoticeKind::Reconnect as i32,
                reason: "server is shutting down; reconnect".into(),
            };
            return Reply { frame: Some(Frame::new(RequestType::Notice, 0, &notice)), close: true };
        }
        let req: pb::LoginRequest = match decode(frame) {
            Ok(req) => req,
            Err(e) => return self.fail(frame.sequence, &e),
        };
        let node = &self.node;
        let attached =
            node.services.auth.attach(&req.token, &req.device_id, &node.config.node_id, self.id).await;
        let (identity, previous) = match attached {
            Ok(ok) => ok,
            Err(e) => return self.fail(frame.sequence, &e),
        };
        tracing::Span::current().record("user", identity.user_id.as_str());
        *self.handle.identity.lock().unwrap_or_else(|e| e.into_inner()) = Some(identity.clone());
        if let Some(previous) = previous {
            // The same device logged in again: the newer connection wins.
            const REASON: &str = "logged in again from the same device";
            if previous.node_id == node.config.node_id {
                if previous.connection_id != self.id {
                    node.kick(&previous, REASON);
                }
            } else if let Some(remote) = &node.services.remote_kick {
                remote.kick(&previous, REASON);
            }
        }
        let pending =
            node.services.offline.pending(&identity.user_id, &identity.device_id).await.unwrap_or(0);
        let response = pb::LoginResponse {
            user_id: identity.user_id,
            device_id: identity.device_id,
            connection_id: self.id,
            heartbeat_interval_ms: node.config.heartbeat_interval.as_millis() as u32,
            idle_timeout_ms: node.config.idle_timeout.as_millis() as u32,
            pending_offline: pending,
        };
        Reply::send(Frame::new(RequestType::Login, frame.sequence, &response))
    }

    async fn request(&self, kind: RequestType, frame: &Frame, identity: &Identity) -> Reply {
        let services = &self.node.services;
        let (user, device) = (identity.user_id.as_str(), identity.device_id.as_str());
        match kind {
            RequestType::AckMessages => {
                let result = async {
                    let req: pb::AckMessagesRequest = decode(frame)?;
                    services.offline.ack(user, device, &req.msg_ids).await?;
                    self.handle.unacked.lock().unwrap_or_else(|e| e.into_inner()).acked(&req.msg_ids);
                    Ok(pb::Empty {})
                }
                .await;
                // An ACK with sequence 0 asks for no answer (PROTOCOL §5.3):
                // a receiver ACKs every burst of pushes, and the answer was a
                // send of its own for most of them.
                match result {
                    Ok(_) if frame.sequence == 0 => Reply { frame: None, close: false },
                    result => self.reply(frame, kind, result),
                }
            }
            RequestType::PullOffline => {
                let result = async {
                    let req: pb::PullOfflineRequest = decode(frame)?;
                    let (messages, more) =
                        services.offline.pull(user, device, req.after_msg_id, req.limit).await?;
                    Ok(pb::PullOfflineResponse { messages, more })
                }
                .await;
                self.reply(frame, kind, result)
            }
            RequestType::CreateGroup => {
                let result = async { services.dispatch.create_group(user, decode(frame)?).await }.await;
                self.reply(frame, kind, result)
            }
            RequestType::JoinGroup | RequestType::LeaveGroup | RequestType::GroupMembers => {
                let result = async {
                    let req: pb::GroupRequest = decode(frame)?;
                    match kind {
                        RequestType::JoinGroup => services.dispatch.join_group(user, &req.group_id).await,
                        RequestType::LeaveGroup => services.dispatch.leave_group(user, &req.group_id).await,
                        _ => services.dispatch.group_members(user, &req.group_id).await,
                    }
                }
                .await;
                self.reply(frame, kind, result)
            }
            RequestType::ListGroups => {
                let result = async {
                    let _: pb::Empty = decode(frame)?;
                    Ok(pb::ListGroupsResponse { groups: services.dispatch.list_groups(user).await? })
                }
                .await;
                self.reply(frame, kind, result)
            }
            RequestType::GroupHistory => {
                let result = async {
                    let req: pb::GroupHistoryRequest = decode(frame)?;
                    let (messages, more) =
                        services.history.history(user, &req.group_id, req.before_msg_id, req.limit).await?;
                    Ok(pb::GroupHistoryResponse { messages, more })
                }
                .await;
                self.reply(frame, kind, result)
            }
            RequestType::OnlineUsers => {
                let result = async {
                    let _: pb::Empty = decode(frame)?;
                    let user_ids = services
                        .sessions
                        .online_users(1_000)
                        .await
                        .map_err(|e| ServiceError::internal(format!("backend failure: {e}")))?;
                    Ok(pb::OnlineUsersResponse { user_ids })
                }
                .await;
                self.reply(frame, kind, result)
            }
            RequestType::SendSingle
            | RequestType::SendGroup
            | RequestType::Login
            | RequestType::Heartbeat
            | RequestType::PushMessage
            | RequestType::Notice
            | RequestType::Error => {
                unreachable!("sends are served in bursts; the rest before the login check")
            }
        }
    }
}

fn decode<M: prost::Message + Default>(frame: &Frame) -> ServiceResult<M> {
    frame.decode().map_err(|e| {
        ServiceError::new(
            ErrorCode::BadBody,
            format!("body of requestType {} does not decode: {e}", frame.request_type),
        )
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use bytes::Bytes;
    use futures::{SinkExt, StreamExt};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    use tokio::net::TcpListener;
    use tokio_util::codec::Framed;

    use super::*;

    fn frame(sequence: u32, len: usize) -> Frame {
        let body: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        Frame {
            client_version: tern_proto::PROTOCOL_VERSION,
            request_type: RequestType::Heartbeat as u32,
            sequence,
            body: Bytes::from(body),
        }
    }

    #[tokio::test]
    async fn tls13_session_carries_frames_both_ways() {
        session_carries_frames_both_ways(&rustls::version::TLS13).await;
    }

    #[tokio::test]
    async fn tls12_session_carries_frames_both_ways() {
        session_carries_frames_both_ways(&rustls::version::TLS12).await;
    }

    /// The unbuffered TLS session against a stock rustls client: frames split
    /// over many records, a frame larger than a record both ways, a key
    /// update asked by the client (TLS 1.3), and a clean close from each side.
    async fn session_carries_frames_both_ways(version: &'static rustls::SupportedProtocolVersion) {
        let dir = tempfile::tempdir().unwrap();
        let generated = crate::tls::ensure_self_signed(&dir.path().join("tls"), &[]).unwrap();
        let acceptor = crate::tls::acceptor(&generated.server).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let last = frame(99, 100_000);
        let server_last = last.clone();
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut io = Io::new(stream, Tls::new(acceptor.config().clone()).unwrap());
            io.handshake().await.unwrap();
            let mut codec = FrameCodec::new(200_000);
            let mut echoed = 0;
            loop {
                while let Some(frame) = codec.decode(&mut io.input).unwrap() {
                    io.send([frame]).unwrap();
                    echoed += 1;
                }
                io.write_all().await.unwrap();
                io.release();
                // Waiting, the connection holds no buffer it does not need.
                assert_eq!(io.output.capacity(), 0);
                if io.input.is_empty() {
                    assert_eq!(io.input.capacity(), 0);
                }
                if io.wire.incoming.is_empty() {
                    assert_eq!(io.wire.incoming.capacity(), 0);
                }
                if io.eof {
                    break;
                }
                poll_fn(|cx| io.poll_ready(cx, true, false)).await.unwrap();
                io.read_ready().unwrap();
            }
            assert!(io.input.is_empty());
            io.finish(VecDeque::from([server_last])).await.unwrap();
            echoed
        });

        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&generated.ca_cert).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.protocol_version(), Some(version.version));
        let mut client = Framed::new(tls, FrameCodec::new(200_000));
        let sent = [frame(1, 0), frame(2, 10), frame(3, 40_000), frame(4, 3)];
        for (i, f) in sent.iter().enumerate() {
            if i == 3 && version.version == rustls::ProtocolVersion::TLSv1_3 {
                client.get_mut().get_mut().1.refresh_traffic_keys().unwrap();
            }
            client.send(f.clone()).await.unwrap();
        }
        for expected in &sent {
            let got = tokio::time::timeout(Duration::from_secs(10), client.next()).await.unwrap();
            assert_eq!(&got.unwrap().unwrap(), expected);
        }
        // close_notify: the server sends its last frame, then its own close.
        client.get_mut().shutdown().await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), client.next()).await.unwrap();
        assert_eq!(got.unwrap().unwrap(), last);
        assert!(client.next().await.is_none(), "a clean end of the session");
        assert_eq!(server.await.unwrap(), sent.len());
    }

    /// A client that reconnects with the ticket of its first session
    /// resumes it (no certificate signature or verification), the ticket
    /// is held back until the server's first reply, and the
    /// server picks TLS_AES_128_GCM_SHA256 even though the client lists
    /// TLS_AES_256_GCM_SHA384 first.
    #[tokio::test]
    async fn a_reconnecting_client_resumes_with_its_ticket() {
        let dir = tempfile::tempdir().unwrap();
        let generated = crate::tls::ensure_self_signed(&dir.path().join("tls"), &[]).unwrap();
        let acceptor = crate::tls::acceptor(&generated.server).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            for _ in 0..2 {
                let (stream, _) = listener.accept().await.unwrap();
                let mut io = Io::new(stream, Tls::new(acceptor.config().clone()).unwrap());
                io.handshake().await.unwrap();
                let handshake_writes = io.writes;
                let mut codec = FrameCodec::new(1_000);
                let frame = loop {
                    if let Some(frame) = codec.decode(&mut io.input).unwrap() {
                        break frame;
                    }
                    poll_fn(|cx| io.poll_ready(cx, true, false)).await.unwrap();
                    io.read_ready().unwrap();
                };
                // As the connection does while a request is served: write
                // what is pending (the held ticket is not).
                io.write_ready().unwrap();
                io.send([frame]).unwrap();
                io.write_all().await.unwrap();
                assert_eq!(io.writes, handshake_writes + 1, "the ticket and the reply go out in one send");
            }
        });

        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&generated.ca_cert).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let store = Arc::new(TicketCounter {
            inner: rustls::client::ClientSessionMemoryCache::new(8),
            tickets: AtomicUsize::new(0),
        });
        config.resumption = rustls::client::Resumption::store(store.clone());
        let config = Arc::new(config);
        let mut kinds = Vec::new();
        for sequence in 1..=2 {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let tls = tokio_rustls::TlsConnector::from(config.clone())
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
                .unwrap();
            let session = tls.get_ref().1;
            kinds.push(session.handshake_kind());
            assert_eq!(
                session.negotiated_cipher_suite().map(|s| s.suite()),
                Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
            );
            let mut client = Framed::new(tls, FrameCodec::new(1_000));
            // The server's ticket waits for its first reply: reading before
            // asking anything gets no ticket.
            let tickets = store.tickets.load(Ordering::SeqCst);
            assert!(tokio::time::timeout(Duration::from_millis(300), client.next()).await.is_err());
            assert_eq!(store.tickets.load(Ordering::SeqCst), tickets, "a ticket came before any reply");
            client.send(frame(sequence, 10)).await.unwrap();
            // Reading the echo also reads the ticket the server sent first.
            let echoed = tokio::time::timeout(Duration::from_secs(10), client.next()).await.unwrap();
            assert_eq!(echoed.unwrap().unwrap(), frame(sequence, 10));
        }
        server.await.unwrap();
        assert_eq!(kinds, [Some(rustls::HandshakeKind::Full), Some(rustls::HandshakeKind::Resumed)]);
        assert!(store.tickets.load(Ordering::SeqCst) >= 2, "each session gave a ticket");
    }

    /// A client session cache that counts the TLS 1.3 tickets it is given.
    #[derive(Debug)]
    struct TicketCounter {
        inner: rustls::client::ClientSessionMemoryCache,
        tickets: AtomicUsize,
    }

    impl rustls::client::ClientSessionStore for TicketCounter {
        fn set_kx_hint(&self, server: ServerName<'static>, group: rustls::NamedGroup) {
            self.inner.set_kx_hint(server, group)
        }
        fn kx_hint(&self, server: &ServerName<'_>) -> Option<rustls::NamedGroup> {
            self.inner.kx_hint(server)
        }
        fn set_tls12_session(
            &self,
            server: ServerName<'static>,
            value: rustls::client::Tls12ClientSessionValue,
        ) {
            self.inner.set_tls12_session(server, value)
        }
        fn tls12_session(&self, server: &ServerName<'_>) -> Option<rustls::client::Tls12ClientSessionValue> {
            self.inner.tls12_session(server)
        }
        fn remove_tls12_session(&self, server: &ServerName<'static>) {
            self.inner.remove_tls12_session(server)
        }
        fn insert_tls13_ticket(
            &self,
            server: ServerName<'static>,
            value: rustls::client::Tls13ClientSessionValue,
        ) {
            self.tickets.fetch_add(1, Ordering::SeqCst);
            self.inner.insert_tls13_ticket(server, value)
        }
        fn take_tls13_ticket(
            &self,
            server: &ServerName<'static>,
        ) -> Option<rustls::client::Tls13ClientSessionValue> {
            self.inner.take_tls13_ticket(server)
        }
    }

    #[test]
    fn a_batch_of_frames_goes_into_room_made_once() {
        let batch: VecDeque<Frame> = (1..=10).map(|sequence| frame(sequence, 100)).collect();
        let mut one_by_one = BytesMut::new();
        batch.iter().for_each(|f| put_frame(&mut one_by_one, f));
        let mut whole = BytesMut::new();
        put_frames(&mut whole, batch);
        assert_eq!(whole, one_by_one);
        assert_eq!(whole.capacity(), whole.len(), "room for the ten frames, made once");
        let mut mixed = BytesMut::new();
        put_frames(&mut mixed, [frame(1, 10), frame(2, 500)]);
        assert_eq!(mixed.len(), 2 * HEADER_LEN + 510, "frames of other sizes all go in");
    }

    /// A read that leaves room in the buffer drained the socket: the
    /// connection does not read again (to get `WouldBlock`) until more
    /// arrives, and what arrives later is still seen.
    #[tokio::test]
    async fn a_request_costs_one_read() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let mut io = Io::new(stream, Plain);
        let mut codec = FrameCodec::new(1_000);
        for sequence in 1..=3 {
            let mut bytes = BytesMut::new();
            put_frame(&mut bytes, &frame(sequence, 30));
            client.write_all(&bytes).await.unwrap();
            let got = tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    poll_fn(|cx| io.poll_ready(cx, true, false)).await.unwrap();
                    io.read_ready().unwrap();
                    if let Some(frame) = codec.decode(&mut io.input).unwrap() {
                        break frame;
                    }
                }
            })
            .await
            .expect("the request is read");
            assert_eq!(got, frame(sequence, 30));
            let still_ready = poll_fn(|cx| Poll::Ready(io.poll_ready(cx, true, false).is_ready())).await;
            assert!(!still_ready, "request {sequence}: the socket is not read again before more arrives");
        }
    }

    #[test]
    fn outbox_is_bounded_and_gives_back_its_memory() {
        let outbox = Outbox::new(2);
        assert!(outbox.push(frame(1, 1)).is_ok());
        assert!(outbox.push(frame(2, 1)).is_ok());
        assert!(matches!(outbox.push(frame(3, 1)), Err(Refused::Full)));
        let taken = outbox.take();
        assert_eq!(taken.len(), 2);
        assert_eq!(outbox.lock().frames.capacity(), 0);
        assert!(!outbox.closing());
        outbox.close();
        assert!(outbox.closing());
        assert!(outbox.push(frame(4, 1)).is_ok(), "a closing connection still flushes what comes");
        assert_eq!(outbox.shut().len(), 1);
        assert!(matches!(outbox.push(frame(5, 1)), Err(Refused::Closed)));
    }

    #[test]
    fn a_run_of_frames_is_queued_in_order_up_to_the_bound() {
        let outbox = Outbox::new(3);
        assert!(outbox.push_all([frame(1, 1), frame(2, 1)]).is_ok());
        assert!(matches!(outbox.push_all([frame(3, 1), frame(4, 1)]), Err(Refused::Full)));
        let sequences: Vec<u32> = outbox.take().iter().map(|f| f.sequence).collect();
        assert_eq!(sequences, [1, 2, 3], "the frames before the bound are queued, in order");
        outbox.shut();
        assert!(matches!(outbox.push_all([frame(5, 1)]), Err(Refused::Closed)));
    }
}
