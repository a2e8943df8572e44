//! Length-prefixed postcard frames.
//!
//! A frame is a 4-byte big-endian payload length followed by the postcard payload.
//! The length is checked against the limit before any buffer is allocated.

use crate::error::{ErrorCode, ErrorResponse};
use serde::{de::DeserializeOwned, Serialize};

/// Bytes of the length prefix.
pub const HEADER_LEN: usize = 4;

/// Why a frame could not be read or written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The declared or actual payload length exceeds the limit.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Declared length.
        len: u64,
        /// The limit.
        max: u32,
    },
    /// The payload is not a valid encoding of the expected type.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The payload decoded but bytes were left over.
    #[error("malformed frame: {0} trailing bytes")]
    TrailingBytes(usize),
}

impl FrameError {
    /// The wire error code for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::TooLarge { .. } => ErrorCode::FRAME_TOO_LARGE,
            FrameError::Malformed(_) | FrameError::TrailingBytes(_) => ErrorCode::MALFORMED,
        }
    }
}

impl From<FrameError> for ErrorResponse {
    fn from(e: FrameError) -> Self {
        ErrorResponse::new(e.code(), e.to_string())
    }
}

/// Encodes `value` after `prefix` into a buffer allocated once at its final size.
///
/// Growing the buffer by doubling would copy a large value several times over and, for
/// buffers of many pages, take fresh pages from the kernel at every step.
pub fn encode_after<T: Serialize + ?Sized>(prefix: &[u8], value: &T) -> postcard::Result<Vec<u8>> {
    let size = postcard::experimental::serialized_size(value)?;
    encode_sized(prefix, value, size)
}

fn encode_sized<T: Serialize + ?Sized>(
    prefix: &[u8],
    value: &T,
    size: usize,
) -> postcard::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(prefix.len() + size);
    buf.extend_from_slice(prefix);
    postcard::to_extend(value, buf)
}

/// Encodes `value` as a whole frame (header and payload).
pub fn encode<T: Serialize>(value: &T, max: u32) -> Result<Vec<u8>, FrameError> {
    let malformed = |e: postcard::Error| FrameError::Malformed(e.to_string());
    let size = postcard::experimental::serialized_size(value).map_err(malformed)?;
    // Checked before anything is allocated or copied.
    within_limit(size, max)?;
    let mut buf = encode_sized(&[0u8; HEADER_LEN], value, size).map_err(malformed)?;
    let len = buf.len() - HEADER_LEN;
    within_limit(len, max)?;
    buf[..HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(buf)
}

fn within_limit(len: usize, max: u32) -> Result<(), FrameError> {
    if len > max as usize {
        return Err(FrameError::TooLarge {
            len: len as u64,
            max,
        });
    }
    Ok(())
}

/// Reads the payload length from a header, refusing lengths over `max`.
pub fn payload_len(header: [u8; HEADER_LEN], max: u32) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header);
    if len > max {
        return Err(FrameError::TooLarge {
            len: u64::from(len),
            max,
        });
    }
    Ok(len as usize)
}

/// Decodes a payload (without header); every byte must be consumed.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    let (value, rest) =
        postcard::take_from_bytes(payload).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::TrailingBytes(rest.len()));
    }
    Ok(value)
}

/// Incremental decoder for a byte stream holding consecutive frames.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max: u32,
}

impl FrameDecoder {
    /// A decoder refusing payloads over `max` bytes.
    pub fn new(max: u32) -> Self {
        FrameDecoder {
            buf: Vec::new(),
            max,
        }
    }

    /// Appends received bytes.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete payload, `Ok(None)` when more bytes are needed.
    ///
    /// After an error the stream is unusable: framing is lost.
    pub fn next_payload(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        let Some(header) = self.buf.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let len = payload_len(*header, self.max)?;
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let payload = self.buf[HEADER_LEN..HEADER_LEN + len].to_vec();
        self.buf.drain(..HEADER_LEN + len);
        Ok(Some(payload))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Message, Publish, Request, Response};

    fn sample() -> Request {
        Request::Publish(Publish {
            topic: "orders".into(),
            producer: None,
            messages: vec![Message::new("m-1", b"hello".to_vec())],
            dedupe_by_id: false,
        })
    }

    #[test]
    fn round_trip() {
        let frame = encode(&sample(), 1024).unwrap();
        let len = payload_len(frame[..4].try_into().unwrap(), 1024).unwrap();
        assert_eq!(len, frame.len() - 4);
        let back: Request = decode(&frame[4..]).unwrap();
        assert_eq!(back, sample());
    }

    #[test]
    fn oversized_header_is_refused_before_allocation() {
        let err = payload_len(u32::MAX.to_be_bytes(), 1024).unwrap_err();
        assert_eq!(err.code(), ErrorCode::FRAME_TOO_LARGE);
        let err = encode(&sample(), 4).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }));
    }

    #[test]
    fn trailing_bytes_are_malformed() {
        let mut frame = encode(&sample(), 1024).unwrap();
        frame.push(0);
        let err = decode::<Request>(&frame[4..]).unwrap_err();
        assert_eq!(err.code(), ErrorCode::MALFORMED);
    }

    #[test]
    fn stream_decoder_splits_frames() {
        let a = encode(&sample(), 1024).unwrap();
        let b = encode(&Response::InvisibilityChanged, 1024).unwrap();
        let mut all = a.clone();
        all.extend_from_slice(&b);
        let mut dec = FrameDecoder::new(1024);
        for byte in &all {
            dec.extend(std::slice::from_ref(byte));
        }
        assert_eq!(dec.next_payload().unwrap().unwrap(), a[4..]);
        assert_eq!(dec.next_payload().unwrap().unwrap(), b[4..]);
        assert_eq!(dec.next_payload().unwrap(), None);
    }
}
