//! A [`pb::BusEnvelope`](crate::pb::BusEnvelope) split into its parts in one
//! pass, its message and its receivers left encoded.
//!
//! A group message's envelope lists every member but the sender (a thousand
//! names in a large group), and the consecutive messages of a group carry
//! the same list. Left encoded, equal lists are equal bytes: offline-svc
//! decodes each distinct list of a batch once and shares it among the
//! messages, and group-svc, which needs only the message, decodes no list
//! at all. (Decoding every list whole was a thousand strings allocated,
//! checked and freed per message: a tenth of the server's time in a fan-out
//! to a thousand members.) [`encode_envelope`] writes one from borrowed
//! receivers, so the dispatcher copies no member list either.

use bytes::{Buf, Bytes, BytesMut};
use prost::encoding::{DecodeContext, WireType, decode_key, decode_varint, skip_field};
use prost::{DecodeError, Message as _};

use crate::pb;

/// Why an envelope (or its encoded receivers) could not be read.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("bus envelope: {0}")]
    Decode(#[from] DecodeError),
    #[error("bus envelope: {0}")]
    Malformed(&'static str),
}

const MESSAGE: u32 = 1;
const RECEIVERS: u32 = 2;
const SENDER_DEVICE: u32 = 3;

/// The parts of an encoded bus envelope.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EnvelopeParts {
    /// The encoded `Message` (empty if the envelope has none).
    pub message: Bytes,
    /// The receivers as encoded: their records, in order. Two envelopes
    /// list the same receivers exactly when these bytes are equal (for the
    /// envelopes tern's dispatchers write, which encode each list the same
    /// way). [`decode_receivers`] reads them.
    pub receivers: Bytes,
    /// The device the message was sent from; empty if unknown.
    pub sender_device: String,
}

impl EnvelopeParts {
    /// Splits an encoded envelope. Unknown fields are skipped and a known
    /// field of the wrong wire type is an error, as with a protobuf
    /// decoder; a repeated message field keeps its last occurrence (the
    /// envelopes tern writes have one).
    pub fn split(payload: &Bytes) -> Result<Self, EnvelopeError> {
        let mut parts = Self::default();
        // Where the receivers' records seen so far start and end, while
        // they are contiguous (always, for tern's envelopes); copied out
        // into `scattered` once another field comes between two of them.
        let mut span: Option<(usize, usize)> = None;
        let mut scattered: Option<BytesMut> = None;
        let mut buf = &payload[..];
        while buf.has_remaining() {
            let start = payload.len() - buf.len();
            let (tag, wire_type) = decode_key(&mut buf)?;
            if !matches!(tag, MESSAGE | RECEIVERS | SENDER_DEVICE) {
                skip_field(wire_type, tag, &mut buf, DecodeContext::default())?;
                continue;
            }
            if wire_type != WireType::LengthDelimited {
                return Err(EnvelopeError::Malformed("a field has the wrong wire type"));
            }
            let len = usize::try_from(decode_varint(&mut buf)?).unwrap_or(usize::MAX);
            if len > buf.len() {
                return Err(EnvelopeError::Malformed("a field runs past the end"));
            }
            let at = payload.len() - buf.len();
            buf.advance(len);
            let end = at + len;
            match tag {
                MESSAGE => parts.message = payload.slice(at..end),
                // Checked when decoded: once per distinct list.
                RECEIVERS => match (&mut scattered, &mut span) {
                    (Some(copy), _) => copy.extend_from_slice(&payload[start..end]),
                    (None, Some((_, last))) if *last == start => *last = end,
                    (None, Some((first, last))) => {
                        let mut copy = BytesMut::from(&payload[*first..*last]);
                        copy.extend_from_slice(&payload[start..end]);
                        scattered = Some(copy);
                    }
                    (None, None) => span = Some((start, end)),
                },
                _ => {
                    parts.sender_device = std::str::from_utf8(&payload[at..end])
                        .map_err(|_| EnvelopeError::Malformed("sender_device is not UTF-8"))?
                        .to_owned();
                }
            }
        }
        parts.receivers = match (scattered, span) {
            (Some(copy), _) => copy.freeze(),
            (None, Some((first, last))) => payload.slice(first..last),
            (None, None) => Bytes::new(),
        };
        Ok(parts)
    }
}

/// Encodes a bus envelope: the same bytes as a [`pb::BusEnvelope`] holding
/// `message`, `receivers` and `sender_device`, with the receivers borrowed.
pub fn encode_envelope<'a>(
    message: &pb::Message,
    receivers: impl Iterator<Item = &'a str> + Clone,
    sender_device: &str,
) -> Vec<u8> {
    let field_len = |len: usize| 1 + prost::encoding::encoded_len_varint(len as u64) + len;
    let message_len = message.encoded_len();
    let receivers_len: usize = receivers.clone().map(|r| field_len(r.len())).sum();
    let device_len = if sender_device.is_empty() { 0 } else { field_len(sender_device.len()) };
    let mut buf = Vec::with_capacity(field_len(message_len) + receivers_len + device_len);
    let field = |buf: &mut Vec<u8>, tag: u32, len: usize| {
        prost::encoding::encode_key(tag, WireType::LengthDelimited, buf);
        prost::encoding::encode_varint(len as u64, buf);
    };
    field(&mut buf, MESSAGE, message_len);
    message.encode_raw(&mut buf);
    for receiver in receivers {
        field(&mut buf, RECEIVERS, receiver.len());
        buf.extend_from_slice(receiver.as_bytes());
    }
    if !sender_device.is_empty() {
        field(&mut buf, SENDER_DEVICE, sender_device.len());
        buf.extend_from_slice(sender_device.as_bytes());
    }
    buf
}

/// The receivers of [`EnvelopeParts::receivers`], in order.
pub fn decode_receivers(mut encoded: &[u8]) -> Result<Vec<String>, EnvelopeError> {
    let mut receivers = Vec::new();
    while encoded.has_remaining() {
        let (tag, wire_type) = decode_key(&mut encoded)?;
        if tag != RECEIVERS || wire_type != WireType::LengthDelimited {
            return Err(EnvelopeError::Malformed("the receivers hold a record of another field"));
        }
        let len = usize::try_from(decode_varint(&mut encoded)?).unwrap_or(usize::MAX);
        if len > encoded.len() {
            return Err(EnvelopeError::Malformed("a receiver runs past the end of the list"));
        }
        let (name, rest) = encoded.split_at(len);
        let name =
            std::str::from_utf8(name).map_err(|_| EnvelopeError::Malformed("a receiver is not UTF-8"))?;
        receivers.push(name.to_owned());
        encoded = rest;
    }
    Ok(receivers)
}

#[cfg(test)]
mod tests {
    use prost::Message as _;
    use prost::encoding::{encode_key, encode_varint};

    use super::*;

    #[test]
    fn an_envelope_encoded_from_borrowed_receivers_is_the_protobuf_encoding() {
        for (receivers, device) in
            [(&["bob", "carol"][..], "phone"), (&["dave"], ""), (&[], "tab"), (&[], "")]
        {
            let encoded = encode_envelope(&message(7), receivers.iter().copied(), device);
            assert_eq!(encoded, envelope(receivers, device), "{receivers:?} {device:?}");
            assert_eq!(encoded.capacity(), encoded.len(), "sized up front");
        }
        let long = "x".repeat(300);
        let encoded = encode_envelope(&message(7), [long.as_str()].into_iter(), "");
        assert_eq!(encoded, envelope(&[&long], ""));
    }

    fn message(msg_id: u64) -> pb::Message {
        pb::Message { msg_id, group_id: "g".into(), content: b"hi".to_vec(), ..Default::default() }
    }

    fn envelope(receivers: &[&str], sender_device: &str) -> Bytes {
        let envelope = pb::BusEnvelope {
            message: Some(message(7)),
            receivers: receivers.iter().map(|&r| r.to_owned()).collect(),
            sender_device: sender_device.into(),
        };
        Bytes::from(envelope.encode_to_vec())
    }

    fn field(buf: &mut Vec<u8>, tag: u32, value: &[u8]) {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(value.len() as u64, buf);
        buf.extend_from_slice(value);
    }

    #[test]
    fn an_envelope_splits_into_its_message_receivers_and_device() {
        let parts = EnvelopeParts::split(&envelope(&["bob", "carol"], "phone")).unwrap();
        assert_eq!(parts.message, message(7).encode_to_vec());
        assert_eq!(decode_receivers(&parts.receivers).unwrap(), ["bob", "carol"]);
        assert_eq!(parts.sender_device, "phone");

        let empty = EnvelopeParts::split(&Bytes::new()).unwrap();
        assert_eq!(empty, EnvelopeParts::default());
        assert!(decode_receivers(&empty.receivers).unwrap().is_empty());
    }

    #[test]
    fn equal_lists_are_equal_bytes_and_different_lists_are_not() {
        let split = |receivers: &[&str], device| EnvelopeParts::split(&envelope(receivers, device)).unwrap();
        assert_eq!(split(&["bob", "carol"], "phone").receivers, split(&["bob", "carol"], "").receivers);
        assert_ne!(split(&["bob", "carol"], "").receivers, split(&["bob", "caro"], "").receivers);
        assert_ne!(split(&["bob", "carol"], "").receivers, split(&["carol", "bob"], "").receivers);
    }

    #[test]
    fn receivers_split_by_other_fields_and_unknown_fields_still_read_in_order() {
        let mut buf = Vec::new();
        field(&mut buf, RECEIVERS, b"bob");
        field(&mut buf, SENDER_DEVICE, b"tab");
        encode_key(9, WireType::Varint, &mut buf);
        encode_varint(300, &mut buf);
        field(&mut buf, RECEIVERS, b"carol");
        field(&mut buf, MESSAGE, &message(1).encode_to_vec());
        field(&mut buf, RECEIVERS, b"dave");
        field(&mut buf, 12, b"unknown");
        let parts = EnvelopeParts::split(&Bytes::from(buf.clone())).unwrap();
        assert_eq!(decode_receivers(&parts.receivers).unwrap(), ["bob", "carol", "dave"]);
        assert_eq!(parts.sender_device, "tab");
        assert_eq!(parts.message, message(1).encode_to_vec());
        // The same as a protobuf decoder reads it.
        let decoded = pb::BusEnvelope::decode(&buf[..]).unwrap();
        assert_eq!(decoded.receivers, ["bob", "carol", "dave"]);
    }

    #[test]
    fn a_broken_envelope_is_an_error() {
        let whole = envelope(&["bob"], "phone");
        let reads = (1..whole.len()).filter(|&cut| EnvelopeParts::split(&whole.slice(..cut)).is_ok()).count();
        assert_eq!(reads, 2, "only the cuts between the three fields read (with fewer parts)");
        let mut bad = Vec::new();
        field(&mut bad, RECEIVERS, &[0xff, 0xfe]);
        let parts = EnvelopeParts::split(&Bytes::from(bad)).unwrap();
        assert!(decode_receivers(&parts.receivers).is_err(), "a receiver that is not UTF-8");
        let mut bad = Vec::new();
        field(&mut bad, SENDER_DEVICE, &[0xff]);
        assert!(EnvelopeParts::split(&Bytes::from(bad)).is_err(), "a sender_device that is not UTF-8");
        assert!(EnvelopeParts::split(&Bytes::from_static(&[0x10, 0x01])).is_err(), "receivers as a varint");
        assert!(decode_receivers(&[0x0a, 0x01, b'x']).is_err(), "a record of another field");
        assert!(decode_receivers(&[0x12, 0x05, b'x']).is_err(), "a receiver past the end");
    }
}
