//! The wire protocol between the unprivileged front (`dispatch-mcp`) and the privileged helper
//! (`dispatch-helper`).
//!
//! Everything that crosses the Unix socket is defined here and nowhere else: the messages
//! ([`messages`]) and the framing and encoding ([`codec`]). The codec is the only module that
//! knows the bytes are postcard; the rest of the workspace sees typed values and typed errors.
#![forbid(unsafe_code)]

pub mod codec;
pub mod messages;

pub use codec::{
    CodecError, Envelope, FrameLimit, MAX_REQUEST_FRAME, MAX_RESPONSE_FRAME, decode, encode_frame,
    read_frame, write_frame,
};
pub use messages::*;

/// Version of the message set. The helper refuses a handshake with any other value.
pub const PROTOCOL_VERSION: u16 = 5;
