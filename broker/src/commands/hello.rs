use super::Reply;
use crate::broker::Shared;
use crate::server::connection::Session;
use escrow_proto::{
    ErrorCode, ErrorResponse, Hello, HelloOk, Response, MAX_FRAME_LEN, PROTOCOL_VERSION,
};

pub(super) fn handle(shared: &Shared, session: &Session, hello: Hello) -> Reply {
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(ErrorResponse::new(
            ErrorCode::UNSUPPORTED_VERSION,
            format!(
                "client speaks protocol {}, this server speaks {PROTOCOL_VERSION}",
                hello.protocol_version
            ),
        ));
    }
    tracing::debug!(client = %hello.client_name, "hello");
    session.mark_ready();
    Ok(Response::HelloOk(HelloOk {
        protocol_version: PROTOCOL_VERSION,
        node_id: shared.config.node_id,
        max_frame_len: MAX_FRAME_LEN,
    }))
}
