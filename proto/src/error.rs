//! Error codes that cross the wire. Numbers are stable and never reused.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A stable numeric error code.
///
/// A newtype rather than an enum so that a client can carry a code it does not
/// know yet (from a newer server) without failing to decode the response.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ErrorCode(pub u16);

macro_rules! codes {
    ($( $(#[$doc:meta])* $name:ident = $num:expr; )*) => {
        impl ErrorCode {
            $( $(#[$doc])* pub const $name: ErrorCode = ErrorCode($num); )*

            /// The code's symbolic name, or `"UNKNOWN"` for a number this build does not know.
            pub fn name(self) -> &'static str {
                match self.0 {
                    $( $num => stringify!($name), )*
                    _ => "UNKNOWN",
                }
            }

            /// Every code this build knows, in numeric order.
            pub const ALL: &'static [ErrorCode] = &[$( ErrorCode($num), )*];
        }
    };
}

codes! {
    /// The frame could not be decoded as a request or response.
    MALFORMED = 100;
    /// The frame's declared length exceeds the maximum frame size.
    FRAME_TOO_LARGE = 101;
    /// The client's protocol version is not supported by this server.
    UNSUPPORTED_VERSION = 102;
    /// A request arrived before the connection's `Hello` handshake completed.
    HANDSHAKE_REQUIRED = 103;
    /// Credentials were missing or wrong.
    UNAUTHENTICATED = 104;
    /// A field of the request is out of range or badly formed.
    INVALID_ARGUMENT = 110;
    /// A message body or its metadata exceeds the per-message limit.
    MESSAGE_TOO_LARGE = 111;
    /// A publish batch holds more messages than allowed.
    BATCH_TOO_LARGE = 112;
    /// A producer retried a batch stored so long ago that its positions are forgotten;
    /// it is stored (once), but where cannot be answered.
    SEQUENCE_DUPLICATE = 113;
    /// The topic does not exist.
    UNKNOWN_TOPIC = 200;
    /// A topic with that name exists already.
    TOPIC_EXISTS = 201;
    /// The receipt handle does not match a lease this consumer group holds
    /// (the message was acked already, or its lease went to another consumer).
    RECEIPT_STALE = 202;
    /// No transaction with that id is pending or remembered.
    TXN_UNKNOWN = 203;
    /// The transaction was already decided the other way; the first decision stands.
    TXN_CONFLICT = 204;
    /// This node is not the leader; the error carries the leader's address when known.
    NOT_LEADER = 300;
    /// Durable storage failed; the request was not applied.
    STORAGE_FAILURE = 500;
    /// An unexpected server-side failure.
    INTERNAL = 501;
    /// The server is at a limit (connections, streams, in-flight bytes); retry later.
    OVERLOADED = 502;
    /// The server is shutting down.
    SHUTTING_DOWN = 503;
}

impl ErrorCode {
    /// Whether a client may retry the same request (possibly elsewhere) and expect a different outcome.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::NOT_LEADER | ErrorCode::OVERLOADED | ErrorCode::SHUTTING_DOWN
        )
    }
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name(), self.0)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

/// The error a server answers with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorResponse {
    /// Stable code; match on this, not on the text.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub message: String,
    /// With [`ErrorCode::NOT_LEADER`]: the leader's client address, when known.
    pub leader: Option<String>,
}

impl ErrorResponse {
    /// An error with a code and a message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorResponse {
            code,
            message: message.into(),
            leader: None,
        }
    }
}

impl fmt::Display for ErrorResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)?;
        if let Some(leader) = &self.leader {
            write!(f, " (leader: {leader})")?;
        }
        Ok(())
    }
}

impl std::error::Error for ErrorResponse {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn codes_are_unique_and_named() {
        let mut seen = HashSet::new();
        for code in ErrorCode::ALL {
            assert!(seen.insert(code.0), "duplicate code {}", code.0);
            assert_ne!(code.name(), "UNKNOWN");
        }
        assert_eq!(ErrorCode(9999).name(), "UNKNOWN");
    }

    #[test]
    fn stable_numbers() {
        // These numbers are a public contract: changing one breaks deployed clients.
        assert_eq!(ErrorCode::MALFORMED.0, 100);
        assert_eq!(ErrorCode::FRAME_TOO_LARGE.0, 101);
        assert_eq!(ErrorCode::UNKNOWN_TOPIC.0, 200);
        assert_eq!(ErrorCode::NOT_LEADER.0, 300);
        assert_eq!(ErrorCode::STORAGE_FAILURE.0, 500);
    }
}
