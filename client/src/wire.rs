//! Reading and writing whole frames on QUIC streams (shared by client and broker).

use escrow_proto::frame::{self, FrameError, HEADER_LEN};
use serde::{de::DeserializeOwned, Serialize};

/// Why a frame could not be moved over a stream.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The frame itself is bad (too large, malformed).
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The stream or connection failed.
    #[error("stream: {0}")]
    Io(String),
}

/// Reads a frame header and checks the declared length against `max`.
///
/// Returns `Ok(None)` when the stream ended cleanly before a header.
pub async fn read_header(
    recv: &mut quinn::RecvStream,
    max: u32,
) -> Result<Option<usize>, StreamError> {
    let mut header = [0u8; HEADER_LEN];
    match recv.read_exact(&mut header).await {
        Ok(()) => Ok(Some(frame::payload_len(header, max)?)),
        Err(quinn::ReadExactError::FinishedEarly(0)) => Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(n)) => {
            Err(FrameError::Malformed(format!("stream ended after {n} header bytes")).into())
        }
        Err(quinn::ReadExactError::ReadError(e)) => Err(StreamError::Io(e.to_string())),
    }
}

/// Reads a payload of `len` bytes (already checked by [`read_header`]).
///
/// The buffer is filled from quinn's received chunks rather than zeroed first: zeroing a
/// large buffer makes the allocator hand back fresh pages, and every frame would pay a
/// page fault per 4 KiB.
pub async fn read_body(recv: &mut quinn::RecvStream, len: usize) -> Result<Vec<u8>, StreamError> {
    let mut payload = Vec::with_capacity(len);
    while payload.len() < len {
        match recv.read_chunk(len - payload.len(), true).await {
            Ok(Some(chunk)) => payload.extend_from_slice(&chunk.bytes),
            Ok(None) => {
                return Err(FrameError::Malformed(format!(
                    "stream ended after {} of {len} payload bytes",
                    payload.len()
                ))
                .into())
            }
            Err(e) => return Err(StreamError::Io(e.to_string())),
        }
    }
    Ok(payload)
}

/// Reads one frame's payload, checking its declared length against `max` before allocating.
///
/// Returns `Ok(None)` when the stream ended cleanly before a header.
pub async fn read_payload(
    recv: &mut quinn::RecvStream,
    max: u32,
) -> Result<Option<Vec<u8>>, StreamError> {
    match read_header(recv, max).await? {
        Some(len) => read_body(recv, len).await.map(Some),
        None => Ok(None),
    }
}

/// Reads and decodes one frame; a stream that ends before a frame is malformed.
pub async fn read_frame<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    max: u32,
) -> Result<T, StreamError> {
    let payload = read_payload(recv, max)
        .await?
        .ok_or_else(|| FrameError::Malformed("stream ended before a frame".into()))?;
    Ok(frame::decode(&payload)?)
}

/// Encodes and writes one frame, then finishes the send side.
pub async fn write_frame<T: Serialize>(
    send: &mut quinn::SendStream,
    value: &T,
    max: u32,
) -> Result<(), StreamError> {
    let bytes = frame::encode(value, max)?;
    // Handing quinn the buffer itself spares it a copy of the frame.
    send.write_chunk(bytes::Bytes::from(bytes))
        .await
        .map_err(|e| StreamError::Io(e.to_string()))?;
    send.finish().map_err(|e| StreamError::Io(e.to_string()))?;
    Ok(())
}
