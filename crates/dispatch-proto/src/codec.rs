//! Framing and encoding: a 4-byte big-endian length prefix followed by a postcard body.
//!
//! Postcard rather than bincode: bincode's authors declared it unmaintained (its 3.0.0 release
//! is a compile-error tombstone). Postcard is maintained, has a documented stable wire format,
//! and never pre-allocates from an attacker-supplied length beyond the input it was given.
//!
//! The length is checked against a hard per-direction limit *before* any buffer is allocated,
//! so a hostile prefix (say 4 GiB) costs the reader four bytes and a typed error.

use serde::{Serialize, de::DeserializeOwned};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest request frame. A dispatch carries at most an 8,000-character task, which in UTF-8 is
/// at most 32,000 bytes; the rest of the request is short names. 64 KiB leaves headroom and
/// keeps what a hostile client can make the helper allocate small.
pub const MAX_REQUEST_FRAME: u32 = 64 * 1024;

/// Largest response frame: job views carry bounded output tails and lists are paginated, so
/// 1 MiB bounds what a compromised helper-side peer could make the front allocate.
pub const MAX_RESPONSE_FRAME: u32 = 1024 * 1024;

/// Size of the length prefix.
pub const LENGTH_PREFIX: usize = 4;

/// Which limit a reader enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimit(pub u32);

impl FrameLimit {
    pub const REQUEST: FrameLimit = FrameLimit(MAX_REQUEST_FRAME);
    pub const RESPONSE: FrameLimit = FrameLimit(MAX_RESPONSE_FRAME);
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("truncated frame: expected {expected} bytes, got {got}")]
    Truncated { expected: usize, got: usize },
    #[error("oversized frame: length prefix {length} exceeds the limit of {limit} bytes")]
    Oversized { length: u64, limit: u32 },
    #[error("empty frame: a zero length prefix carries no message")]
    Empty,
    #[error("unknown message: the frame names a message or field variant this side does not know")]
    UnknownMessage,
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("wrong protocol version: peer speaks {peer}, this side speaks {ours}")]
    WrongVersion { peer: u16, ours: u16 },
    #[error("connection closed")]
    Closed,
    #[error("i/o error on the helper socket: {0}")]
    Io(#[from] std::io::Error),
}

/// Encode `message` into one frame (prefix + body). Fails if the body would exceed `limit`:
/// the writer refuses to produce a frame the reader is bound to reject.
pub fn encode_frame<T: Serialize>(message: &T, limit: FrameLimit) -> Result<Vec<u8>, CodecError> {
    let mut frame = vec![0u8; LENGTH_PREFIX];
    frame = postcard::to_extend(message, frame)
        .map_err(|error| CodecError::Malformed(format!("cannot encode: {error}")))?;
    let body_len = frame.len() - LENGTH_PREFIX;
    if body_len > limit.0 as usize {
        return Err(CodecError::Oversized {
            length: body_len as u64,
            limit: limit.0,
        });
    }
    if body_len == 0 {
        return Err(CodecError::Empty);
    }
    frame[..LENGTH_PREFIX].copy_from_slice(&(body_len as u32).to_be_bytes());
    Ok(frame)
}

/// A top-level frame: an id followed by an enum body with a known number of variants, so an
/// unknown message type can be told apart from a malformed one.
pub trait Envelope: DeserializeOwned {
    const BODY_VARIANTS: u32;
}

/// Decode one frame body (without its prefix). Never panics; trailing bytes are an error so a
/// frame has exactly one meaning.
pub fn decode<T: Envelope>(body: &[u8]) -> Result<T, CodecError> {
    if body.is_empty() {
        return Err(CodecError::Empty);
    }
    // Postcard writes the id and then the variant index, both as varints.
    if let Ok(((_id, variant), _)) = postcard::take_from_bytes::<(u64, u32)>(body)
        && variant >= T::BODY_VARIANTS
    {
        return Err(CodecError::UnknownMessage);
    }
    match postcard::take_from_bytes::<T>(body) {
        Ok((value, [])) => Ok(value),
        Ok((_, rest)) => Err(CodecError::Malformed(format!(
            "{} trailing bytes after the message",
            rest.len()
        ))),
        Err(error) => Err(classify(error, body.len())),
    }
}

fn classify(error: postcard::Error, len: usize) -> CodecError {
    use postcard::Error as E;
    match error {
        E::DeserializeUnexpectedEnd => CodecError::Truncated {
            expected: len + 1,
            got: len,
        },
        E::DeserializeBadEnum => CodecError::UnknownMessage,
        other => CodecError::Malformed(other.to_string()),
    }
}

/// Parse a length prefix against a limit.
pub fn check_length(prefix: [u8; LENGTH_PREFIX], limit: FrameLimit) -> Result<usize, CodecError> {
    let length = u32::from_be_bytes(prefix);
    if length == 0 {
        return Err(CodecError::Empty);
    }
    if length > limit.0 {
        return Err(CodecError::Oversized {
            length: u64::from(length),
            limit: limit.0,
        });
    }
    Ok(length as usize)
}

/// Read one frame body. `Ok(None)` is a clean end of stream between frames.
pub async fn read_frame_body<R: AsyncRead + Unpin>(
    reader: &mut R,
    limit: FrameLimit,
) -> Result<Option<Vec<u8>>, CodecError> {
    let mut prefix = [0u8; LENGTH_PREFIX];
    let mut filled = 0;
    while filled < LENGTH_PREFIX {
        let n = reader.read(&mut prefix[filled..]).await?;
        if n == 0 {
            return if filled == 0 {
                Ok(None)
            } else {
                Err(CodecError::Truncated {
                    expected: LENGTH_PREFIX,
                    got: filled,
                })
            };
        }
        filled += n;
    }
    let length = check_length(prefix, limit)?;
    // Allocation is bounded by `limit`, checked above.
    let mut body = vec![0u8; length];
    let mut got = 0;
    while got < length {
        let n = reader.read(&mut body[got..]).await?;
        if n == 0 {
            return Err(CodecError::Truncated {
                expected: length,
                got,
            });
        }
        got += n;
    }
    Ok(Some(body))
}

/// Read and decode one frame. `Ok(None)` is a clean end of stream between frames.
pub async fn read_frame<T: Envelope, R: AsyncRead + Unpin>(
    reader: &mut R,
    limit: FrameLimit,
) -> Result<Option<T>, CodecError> {
    match read_frame_body(reader, limit).await? {
        None => Ok(None),
        Some(body) => decode(&body).map(Some),
    }
}

/// Encode and write one frame, then flush.
pub async fn write_frame<T: Serialize, W: AsyncWrite + Unpin>(
    writer: &mut W,
    message: &T,
    limit: FrameLimit,
) -> Result<(), CodecError> {
    let frame = encode_frame(message, limit)?;
    writer.write_all(&frame).await?;
    writer.flush().await?;
    Ok(())
}
