//! The frame header and the streaming frame codec.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::{ErrorCode, PROTOCOL_VERSION, RequestType};

/// Size of the fixed header; also the only valid `headLength`.
pub const HEADER_LEN: usize = 20;

/// Default ceiling for `bodyLength`: 64 KiB.
pub const DEFAULT_MAX_BODY_LEN: u32 = 64 * 1024;

/// The 20-byte big-endian header in front of every body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub head_length: u32,
    pub client_version: u32,
    pub request_type: u32,
    pub sequence: u32,
    pub body_length: u32,
}

impl FrameHeader {
    /// Reads a header from the first 20 bytes of `buf` (which must hold them).
    pub fn parse(mut buf: &[u8]) -> Self {
        Self {
            head_length: buf.get_u32(),
            client_version: buf.get_u32(),
            request_type: buf.get_u32(),
            sequence: buf.get_u32(),
            body_length: buf.get_u32(),
        }
    }

    pub fn write(&self, dst: &mut impl BufMut) {
        dst.put_u32(self.head_length);
        dst.put_u32(self.client_version);
        dst.put_u32(self.request_type);
        dst.put_u32(self.sequence);
        dst.put_u32(self.body_length);
    }
}

/// One decoded frame. `request_type` is kept raw so that an unknown type can
/// be answered with an error that names it instead of failing the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub client_version: u32,
    pub request_type: u32,
    pub sequence: u32,
    pub body: Bytes,
}

impl Frame {
    /// A frame whose body is `message` encoded as protobuf.
    pub fn new(request_type: RequestType, sequence: u32, message: &impl prost::Message) -> Self {
        Self {
            client_version: PROTOCOL_VERSION,
            request_type: request_type as u32,
            sequence,
            body: Bytes::from(message.encode_to_vec()),
        }
    }

    /// An ERROR frame answering the request with `sequence`.
    pub fn error(sequence: u32, code: ErrorCode, message: impl Into<String>) -> Self {
        let body = crate::pb::ErrorBody { code: code as u32, message: message.into() };
        Self::new(RequestType::Error, sequence, &body)
    }

    pub fn kind(&self) -> Option<RequestType> {
        RequestType::from_u32(self.request_type)
    }

    /// Decodes the body as `M`.
    pub fn decode<M: prost::Message + Default>(&self) -> Result<M, prost::DecodeError> {
        M::decode(self.body.clone())
    }

    /// Encodes header and body into one buffer (for transports such as
    /// WebSocket that carry a frame per message).
    pub fn to_bytes(&self) -> Bytes {
        let mut buf = BytesMut::with_capacity(HEADER_LEN + self.body.len());
        self.header().write(&mut buf);
        buf.extend_from_slice(&self.body);
        buf.freeze()
    }

    pub fn header(&self) -> FrameHeader {
        FrameHeader {
            head_length: HEADER_LEN as u32,
            client_version: self.client_version,
            request_type: self.request_type,
            sequence: self.sequence,
            body_length: self.body.len() as u32,
        }
    }
}

/// Why a byte stream could not be decoded into frames. Every variant except
/// `Io` maps to an [`ErrorCode`] the server reports before closing.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("headLength is {0}, expected 20")]
    BadHeader(u32),
    #[error("bodyLength {len} exceeds the maximum of {max} bytes")]
    TooLarge { len: u32, max: u32 },
    #[error("connection ended inside a frame ({buffered} bytes buffered)")]
    Truncated { buffered: usize },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl FrameError {
    /// The protocol error code for this failure; `None` for I/O errors, where
    /// the peer is gone and nothing can be sent.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::BadHeader(_) => Some(ErrorCode::BadHeader),
            Self::TooLarge { .. } => Some(ErrorCode::FrameTooLarge),
            Self::Truncated { .. } => Some(ErrorCode::TruncatedFrame),
            Self::Io(_) => None,
        }
    }
}

/// Streaming codec for [`Frame`]s with a ceiling on `bodyLength`.
#[derive(Debug, Clone, Copy)]
pub struct FrameCodec {
    max_body_len: u32,
}

impl FrameCodec {
    pub fn new(max_body_len: u32) -> Self {
        Self { max_body_len }
    }

    pub fn max_body_len(&self) -> u32 {
        self.max_body_len
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_BODY_LEN)
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if src.len() < HEADER_LEN {
            return Ok(None);
        }
        let header = FrameHeader::parse(&src[..HEADER_LEN]);
        // Both checks happen before any body byte is awaited or buffered.
        if header.head_length != HEADER_LEN as u32 {
            return Err(FrameError::BadHeader(header.head_length));
        }
        if header.body_length > self.max_body_len {
            return Err(FrameError::TooLarge { len: header.body_length, max: self.max_body_len });
        }
        let total = HEADER_LEN + header.body_length as usize;
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        src.advance(HEADER_LEN);
        let body = src.split_to(header.body_length as usize).freeze();
        Ok(Some(Frame {
            client_version: header.client_version,
            request_type: header.request_type,
            sequence: header.sequence,
            body,
        }))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => Err(FrameError::Truncated { buffered: src.len() }),
        }
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        dst.reserve(HEADER_LEN + frame.body.len());
        frame.header().write(dst);
        dst.extend_from_slice(&frame.body);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;

    fn encode(frame: &Frame) -> BytesMut {
        let mut buf = BytesMut::new();
        FrameCodec::default().encode(frame.clone(), &mut buf).unwrap();
        buf
    }

    #[test]
    fn round_trip_byte_by_byte() {
        let frame = Frame::new(
            RequestType::SendSingle,
            7,
            &pb::SendSingleRequest {
                client_msg_id: "c1".into(),
                sender: String::new(),
                receiver: "bob".into(),
                content: b"hi".to_vec(),
            },
        );
        let bytes = encode(&frame);
        assert_eq!(&bytes[..4], &[0, 0, 0, 20]);
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        let mut out = None;
        for b in bytes.iter() {
            assert!(out.is_none(), "frame decoded before its last byte");
            buf.extend_from_slice(&[*b]);
            out = codec.decode(&mut buf).unwrap();
        }
        assert_eq!(out.unwrap(), frame);
        assert!(buf.is_empty());
    }

    #[test]
    fn rejects_bad_head_length_before_body() {
        let mut buf = BytesMut::new();
        FrameHeader { head_length: 16, client_version: 1, request_type: 2, sequence: 0, body_length: 0 }
            .write(&mut buf);
        assert!(matches!(FrameCodec::default().decode(&mut buf), Err(FrameError::BadHeader(16))));
    }

    #[test]
    fn rejects_oversized_body_from_header_alone() {
        let mut buf = BytesMut::new();
        FrameHeader { head_length: 20, client_version: 1, request_type: 3, sequence: 1, body_length: 1025 }
            .write(&mut buf);
        let err = FrameCodec::new(1024).decode(&mut buf).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { len: 1025, max: 1024 }));
        assert_eq!(err.code(), Some(ErrorCode::FrameTooLarge));
    }

    #[test]
    fn truncated_frame_at_eof_is_an_error() {
        let frame = Frame::new(RequestType::Heartbeat, 1, &pb::Heartbeat {});
        let mut bytes = encode(&frame);
        bytes.truncate(10);
        let err = FrameCodec::default().decode_eof(&mut bytes).unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::TruncatedFrame));
        assert!(FrameCodec::default().decode_eof(&mut BytesMut::new()).unwrap().is_none());
    }

    #[test]
    fn two_frames_in_one_buffer() {
        let a = Frame::new(RequestType::Heartbeat, 1, &pb::Heartbeat {});
        let b = Frame::error(2, ErrorCode::BadBody, "nope");
        let mut buf = encode(&a);
        buf.extend_from_slice(&encode(&b));
        let mut codec = FrameCodec::default();
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(a));
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(b));
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
    }
}
