use super::Reply;
use crate::broker::Shared;
use escrow_proto::Response;

pub(super) fn handle(shared: &Shared) -> Reply {
    Ok(Response::Stats(shared.metrics.snapshot()))
}
