//! Escrow's wire protocol: requests, responses, messages, stable error codes and
//! length-prefixed postcard framing.
//!
//! This crate is sans-IO: it depends on no async runtime and opens no socket. The
//! broker and the client libraries share it.
//!
//! ```
//! use escrow_proto::{frame, Message, Publish, Request, MAX_FRAME_LEN};
//!
//! let request = Request::Publish(Publish {
//!     topic: "orders".into(),
//!     producer: None,
//!     messages: vec![Message::new("order-1", b"{\"id\":1}".to_vec())],
//!     dedupe_by_id: false,
//! });
//! let bytes = frame::encode(&request, MAX_FRAME_LEN)?;
//! let len = frame::payload_len(bytes[..4].try_into().unwrap(), MAX_FRAME_LEN)?;
//! let decoded: Request = frame::decode(&bytes[4..4 + len])?;
//! assert_eq!(decoded, request);
//! # Ok::<(), escrow_proto::frame::FrameError>(())
//! ```

pub mod error;
pub mod frame;
pub mod limits;
pub mod message;
pub mod request;
pub mod response;

pub use error::{ErrorCode, ErrorResponse};
pub use limits::*;
pub use message::{
    dead_letter_topic, is_reserved, validate_group, validate_name, Delivery, Message, Position,
    ReceiptHandle,
};
pub mod txn;
pub use request::*;
pub use response::*;

/// Version of the request/response protocol, exchanged in [`Hello`].
pub const PROTOCOL_VERSION: u16 = 1;

/// ALPN protocol name of client connections.
pub const ALPN_CLIENT: &[u8] = b"escrow/1";

/// ALPN protocol name of node-to-node (Raft) connections.
pub const ALPN_RAFT: &[u8] = b"escrow-raft/1";
