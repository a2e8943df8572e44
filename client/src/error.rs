use escrow_proto::{frame::FrameError, ErrorCode, ErrorResponse};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The server answered with an error; nothing was applied.
    #[error("server error {0}")]
    Server(ErrorResponse),
    /// The server address could not be resolved or reached, or the connection broke.
    /// A request in flight may or may not have been applied.
    #[error("connection to {addr}: {reason}")]
    Connection {
        /// The server address.
        addr: String,
        /// What went wrong.
        reason: String,
    },
    /// TLS material could not be loaded, or the server's certificate was not trusted.
    #[error("tls: {0}")]
    Tls(String),
    /// A frame from the server was too large or malformed.
    #[error("protocol: {0}")]
    Protocol(#[from] FrameError),
    /// The server answered with a response of the wrong kind.
    #[error("unexpected response to {request}: {response}")]
    UnexpectedResponse {
        /// Request kind.
        request: &'static str,
        /// Response received, abbreviated.
        response: String,
    },
    /// No answer within the request timeout. The request may or may not have been applied.
    #[error("request {0} timed out")]
    Timeout(&'static str),
}

impl ClientError {
    /// The server's error code, if the server answered with an error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server(e) => Some(e.code),
            _ => None,
        }
    }

    /// Whether trying again later may succeed (a failover, overload or broken connection).
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Server(e) => matches!(
                e.code,
                ErrorCode::NOT_LEADER
                    | ErrorCode::OVERLOADED
                    | ErrorCode::SHUTTING_DOWN
                    | ErrorCode::STORAGE_FAILURE
            ),
            ClientError::Connection { .. } | ClientError::Timeout(_) => true,
            _ => false,
        }
    }
}
