//! Byte encodings of the message database's keys and values.
//!
//! The database orders keys as bytes, so every key is built to sort as its
//! parts do: an integer is 8 bytes big-endian, a string is its length (4
//! bytes big-endian) and then its bytes. With the length first, the keys that
//! start with one string (a receiver's offline entries, a topic's records)
//! form one contiguous range that no other string's keys fall into, whatever
//! bytes the strings hold.

use crate::{StoreError, StoreResult};

/// Builds a key part by part.
#[derive(Default)]
pub(crate) struct Key(Vec<u8>);

impl Key {
    pub(crate) fn new() -> Self {
        Self(Vec::with_capacity(48))
    }

    /// Appends a string: its length, then its bytes.
    pub(crate) fn str(mut self, s: &str) -> Self {
        // Keys are ids, topic and group names: far below 4 GiB.
        let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
        self.0.extend_from_slice(&len.to_be_bytes());
        self.0.extend_from_slice(s.as_bytes());
        self
    }

    /// Appends an integer, big-endian so that keys sort by it.
    pub(crate) fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub(crate) fn build(self) -> Vec<u8> {
        self.0
    }
}

/// Reads a key back part by part, in the order it was built.
pub(crate) struct KeyReader<'a>(&'a [u8]);

impl<'a> KeyReader<'a> {
    pub(crate) fn new(key: &'a [u8]) -> Self {
        Self(key)
    }

    pub(crate) fn str(&mut self) -> StoreResult<&'a str> {
        let len = self.u32()? as usize;
        let (s, rest) = self.0.split_at_checked(len).ok_or_else(|| corrupt("string longer than its key"))?;
        self.0 = rest;
        std::str::from_utf8(s).map_err(|_| corrupt("string is not UTF-8"))
    }

    pub(crate) fn u64(&mut self) -> StoreResult<u64> {
        let (v, rest) = self.0.split_first_chunk::<8>().ok_or_else(|| corrupt("integer cut short"))?;
        self.0 = rest;
        Ok(u64::from_be_bytes(*v))
    }

    fn u32(&mut self) -> StoreResult<u32> {
        let (v, rest) = self.0.split_first_chunk::<4>().ok_or_else(|| corrupt("length cut short"))?;
        self.0 = rest;
        Ok(u32::from_be_bytes(*v))
    }
}

/// A value made of integers only.
pub(crate) fn u64s<const N: usize>(values: [u64; N]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_be_bytes()).collect()
}

/// Reads back a value written by [`u64s`].
pub(crate) fn read_u64s<const N: usize>(bytes: &[u8]) -> StoreResult<[u64; N]> {
    if bytes.len() != N * 8 {
        return Err(corrupt("integer value of the wrong length"));
    }
    let mut out = [0; N];
    for (v, chunk) in out.iter_mut().zip(bytes.chunks_exact(8)) {
        *v = u64::from_be_bytes(chunk.try_into().map_err(|_| corrupt("integer cut short"))?);
    }
    Ok(out)
}

/// A key or value that does not decode: the file was damaged or written by
/// an incompatible version.
pub(crate) fn corrupt(what: &str) -> StoreError {
    StoreError::Backend(format!("corrupt message database: {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_by_their_parts_and_read_back() {
        let a = Key::new().str("bob").u64(2).build();
        let b = Key::new().str("bob").u64(10).build();
        let c = Key::new().str("bobby").u64(1).build();
        assert!(a < b, "integers sort numerically");
        let bob = Key::new().str("bob").build();
        assert!(a.starts_with(&bob) && b.starts_with(&bob));
        assert!(!c.starts_with(&bob), "a longer string is not inside the shorter one's range");
        let mut r = KeyReader::new(&c);
        assert_eq!(r.str().unwrap(), "bobby");
        assert_eq!(r.u64().unwrap(), 1);
        assert!(r.u64().is_err(), "nothing left");
        assert_eq!(read_u64s::<2>(&u64s([7, u64::MAX])).unwrap(), [7, u64::MAX]);
        assert!(read_u64s::<2>(&[0; 15]).is_err());
    }
}
