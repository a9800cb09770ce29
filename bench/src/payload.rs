//! The message content the benchmark sends: who sent it, which message of
//! that sender it is, and when it was due, so the receiver can measure
//! latency from the intended send time and verify delivery.
//!
//! Layout (big-endian): `run` u32, `stream` u32, `index` u64, `due_ns` u64,
//! then zero padding up to the configured size.

/// Bytes of the fixed part.
pub const HEADER: usize = 24;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Which run (rate step) sent it: late arrivals from an earlier run are
    /// told apart instead of being counted twice.
    pub run: u32,
    /// The sender (1:1 pair or group) within the run.
    pub stream: u32,
    /// The sender's message number, from 0.
    pub index: u64,
    /// Intended send time on [`crate::clock`].
    pub due_ns: u64,
}

impl Stamp {
    /// The content: the stamp padded with zeros to `size` bytes (at least
    /// the stamp itself).
    pub fn encode(&self, size: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(size.max(HEADER));
        out.extend_from_slice(&self.run.to_be_bytes());
        out.extend_from_slice(&self.stream.to_be_bytes());
        out.extend_from_slice(&self.index.to_be_bytes());
        out.extend_from_slice(&self.due_ns.to_be_bytes());
        out.resize(size.max(HEADER), 0);
        out
    }

    /// Reads a stamp; `None` if the content is not one of ours.
    pub fn decode(content: &[u8]) -> Option<Stamp> {
        if content.len() < HEADER {
            return None;
        }
        let u32_at = |i: usize| u32::from_be_bytes(content[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_be_bytes(content[i..i + 8].try_into().expect("8 bytes"));
        Some(Stamp { run: u32_at(0), stream: u32_at(4), index: u64_at(8), due_ns: u64_at(16) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_padding() {
        let s = Stamp { run: 7, stream: 3, index: 1 << 40, due_ns: 123_456_789_012 };
        let bytes = s.encode(64);
        assert_eq!(bytes.len(), 64);
        assert_eq!(Stamp::decode(&bytes), Some(s));
        assert_eq!(s.encode(0).len(), HEADER);
        assert_eq!(Stamp::decode(b"hello"), None);
    }
}
