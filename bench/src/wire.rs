//! A lean tern connection for load generation.
//!
//! The SDK's [`tern_sdk::Connection`] waits for each request's response
//! and flushes every frame on its own; an open-loop generator must keep
//! sending whatever the server does, and on two shared cores it cannot
//! afford a write system call per message. So the benchmark speaks the
//! protocol directly with the protocol crate's codec: a writer task that
//! coalesces queued frames into one write, and a reader the caller drives.
//! Connections can be bound to a chosen 127.0.0.x source address, which
//! lifts the 28k ephemeral ports per (source, destination) pair.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;
use prost::encoding::encoded_len_varint;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tern_proto::{ErrorCode, FrameCodec, FrameHeader, HEADER_LEN, PROTOCOL_VERSION, RequestType, pb};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio_util::codec::FramedRead;

pub type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
pub type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;
pub type Frames = FramedRead<BoxRead, FrameCodec>;

/// How to reach an access node.
#[derive(Clone)]
pub struct Dial {
    pub addr: SocketAddr,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
}

impl Dial {
    /// `addr` is `ip:port`; with `ca`, TLS trusting that CA and checking the
    /// certificate against the host part of `addr`.
    pub fn new(addr: &str, ca: Option<&Path>) -> anyhow::Result<Dial> {
        let sock: SocketAddr =
            addr.parse().with_context(|| format!("access address {addr:?} is not ip:port"))?;
        let tls = match ca {
            None => None,
            Some(ca) => {
                let name = ServerName::from(sock.ip());
                Some((tls_connector(ca)?, name))
            }
        };
        Ok(Dial { addr: sock, tls })
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// TCP connect (from `source` if given) and, for TLS, the handshake.
    pub async fn open(&self, source: Option<IpAddr>) -> anyhow::Result<(BoxRead, BoxWrite)> {
        let socket = TcpSocket::new_v4()?;
        if let Some(ip) = source {
            socket.bind(SocketAddr::new(ip, 0)).with_context(|| format!("cannot bind {ip}"))?;
        }
        let tcp: TcpStream = socket.connect(self.addr).await.context("connect")?;
        tcp.set_nodelay(true)?;
        match &self.tls {
            None => {
                let (r, w) = tcp.into_split();
                Ok((Box::new(r), Box::new(w)))
            }
            Some((connector, name)) => {
                let stream = connector.connect(name.clone(), tcp).await.context("TLS handshake")?;
                let (r, w) = tokio::io::split(stream);
                Ok((Box::new(r), Box::new(w)))
            }
        }
    }
}

/// A TLS client configuration trusting the PEM certificates in `ca`.
pub fn tls_connector(ca: &Path) -> anyhow::Result<tokio_rustls::TlsConnector> {
    let pem = std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.context("bad PEM")?)?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // Every connection does a full handshake: the connect storm measures
    // new clients, not reconnecting ones holding a session ticket.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// One encoded frame.
pub fn encode(kind: RequestType, sequence: u32, body: &impl prost::Message) -> Bytes {
    let len = body.encoded_len();
    let mut buf = BytesMut::with_capacity(HEADER_LEN + len);
    put_header(&mut buf, kind, sequence, len);
    body.encode(&mut buf).expect("buffer has room");
    buf.freeze()
}

/// Writes the header of a frame of `kind` with a body of `body_len` bytes.
fn put_header(buf: &mut impl BufMut, kind: RequestType, sequence: u32, body_len: usize) {
    FrameHeader {
        head_length: HEADER_LEN as u32,
        client_version: PROTOCOL_VERSION,
        request_type: kind as u32,
        sequence,
        body_length: body_len as u32,
    }
    .write(buf);
}

/// An ACK_MESSAGES frame for `ids` with sequence 0 (an ACK the server does
/// not answer, as the SDK's): byte for byte what [`encode`] makes of
/// `pb::AckMessagesRequest` (tested), written a varint at a time where
/// prost writes a byte at a time. A receiver ACKs every message it gets,
/// and prost's writes were a tenth of the generator's CPU in S4.
pub fn encode_ack(ids: &[u64]) -> Bytes {
    let packed: usize = ids.iter().map(|&id| encoded_len_varint(id)).sum();
    // proto3 leaves an empty repeated field out.
    let body_len = if ids.is_empty() { 0 } else { 1 + encoded_len_varint(packed as u64) + packed };
    let mut buf = Vec::with_capacity(HEADER_LEN + body_len);
    put_header(&mut buf, RequestType::AckMessages, 0, body_len);
    if !ids.is_empty() {
        // Field 1, length-delimited (packed).
        buf.push(1 << 3 | 2);
        put_varint(&mut buf, packed as u64);
        for &id in ids {
            put_varint(&mut buf, id);
        }
    }
    debug_assert_eq!(buf.len(), HEADER_LEN + body_len);
    Bytes::from(buf)
}

/// Appends `value` as a protobuf varint.
fn put_varint(buf: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        buf.push(value as u8 | 0x80);
        value >>= 7;
    }
    buf.push(value as u8);
}

/// Frames read from `read`, into tokio-util's default 8 KiB buffer. Each
/// read takes at most the buffer's room: a 512-byte buffer cut the storm
/// workers' RSS by a quarter but multiplied the fan-out receivers' reads.
pub fn frames(read: BoxRead) -> Frames {
    FramedRead::new(read, FrameCodec::new(tern_proto::MAX_SERVER_BODY_LEN))
}

/// Sends LOGIN (sequence 1) and waits for its answer, skipping anything
/// that arrives before it.
pub async fn login(
    frames: &mut Frames,
    write: &mut BoxWrite,
    token: &str,
    device: &str,
) -> anyhow::Result<pb::LoginResponse> {
    let request = pb::LoginRequest { token: token.to_owned(), device_id: device.to_owned() };
    write.write_all(&encode(RequestType::Login, 1, &request)).await?;
    write.flush().await?;
    let wait = async {
        while let Some(frame) = frames.next().await {
            let frame = frame.map_err(|e| anyhow!("read: {e}"))?;
            if frame.sequence != 1 {
                continue;
            }
            if frame.kind() == Some(RequestType::Error) {
                let e: pb::ErrorBody = frame.decode().unwrap_or_default();
                let code = ErrorCode::from_u32(e.code).map(|c| c.as_str()).unwrap_or("?");
                bail!("LOGIN refused: {code} {}", e.message);
            }
            return Ok(frame.decode::<pb::LoginResponse>()?);
        }
        bail!("connection closed before the LOGIN answer")
    };
    tokio::time::timeout(Duration::from_secs(30), wait).await.map_err(|_| anyhow!("LOGIN timed out"))?
}

/// Starts a task that writes queued frames, as many per system call as are
/// queued (up to 64 KiB). The queue is bounded: a sender that outruns the
/// connection waits, and the wait counts in its messages' latency.
pub fn spawn_writer(mut write: BoxWrite, queue: usize) -> mpsc::Sender<Bytes> {
    let (tx, mut rx) = mpsc::channel::<Bytes>(queue);
    tokio::spawn(async move {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        while let Some(first) = rx.recv().await {
            buf.extend_from_slice(&first);
            while buf.len() < 64 * 1024 {
                match rx.try_recv() {
                    Ok(more) => buf.extend_from_slice(&more),
                    Err(_) => break,
                }
            }
            if write.write_all(&buf).await.is_err() || write.flush().await.is_err() {
                break;
            }
            buf.clear();
        }
        let _ = write.shutdown().await;
    });
    tx
}

/// The `i`-th of `n` loopback source addresses 127.0.0.2 … (so 127.0.0.1,
/// where the servers listen, keeps its own ports).
pub fn source_ip(i: usize, n: usize) -> Option<IpAddr> {
    if n == 0 {
        return None;
    }
    let k = (i % n) as u32 + 2;
    Some(IpAddr::from([127, ((k >> 16) & 0xff) as u8, ((k >> 8) & 0xff) as u8, (k & 0xff) as u8]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_util::codec::Decoder;

    #[test]
    fn encoded_frames_decode() {
        let body = pb::SendSingleRequest {
            client_msg_id: "c1".into(),
            sender: String::new(),
            receiver: "bob".into(),
            content: b"hi".to_vec(),
        };
        let bytes = encode(RequestType::SendSingle, 7, &body);
        // The worked example of docs/PROTOCOL.md §2.2.
        assert_eq!(bytes.len(), 33);
        let frame = FrameCodec::default().decode(&mut BytesMut::from(&bytes[..])).unwrap().unwrap();
        assert_eq!(frame.sequence, 7);
        assert_eq!(frame.decode::<pb::SendSingleRequest>().unwrap(), body);
    }

    #[test]
    fn hand_encoded_acks_are_what_prost_encodes() {
        let cases: [&[u64]; 5] = [
            &[],
            &[0],
            &[1, 127, 128, 16_383, 16_384],
            &[u64::MAX, 1 << 63, 7_371_234_567_890_123_456],
            &[300; 1000],
        ];
        for ids in cases {
            let expected =
                encode(RequestType::AckMessages, 0, &pb::AckMessagesRequest { msg_ids: ids.to_vec() });
            assert_eq!(encode_ack(ids), expected, "{ids:?}");
        }
    }

    #[test]
    fn source_addresses() {
        assert_eq!(source_ip(0, 0), None);
        assert_eq!(source_ip(0, 4), Some(IpAddr::from([127, 0, 0, 2])));
        assert_eq!(source_ip(5, 4), Some(IpAddr::from([127, 0, 0, 3])));
        assert_eq!(source_ip(300, 1000), Some(IpAddr::from([127, 0, 1, 46])));
    }
}
