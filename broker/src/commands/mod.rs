//! One file per request kind; [`dispatch`] routes a decoded request to it.

mod ack;
mod cluster;
mod groups;
mod hello;
mod publish;
mod receive;
mod stats;
mod topic;
mod txn;

use crate::broker::Shared;
use crate::server::connection::Session;
use escrow_proto::{ErrorCode, ErrorResponse, Request, Response};

/// What every handler returns: a response, or an error response.
type Reply = Result<Response, ErrorResponse>;

pub(crate) use txn::{checks_delivered, ChecksSent};

/// Handles one request. Check-backs handed to a poll come back as [`ChecksSent`]: they
/// count only once the producer has received them ([`checks_delivered`]).
pub(crate) async fn dispatch(
    shared: &Shared,
    session: &Session,
    request: Request,
) -> (Response, Option<ChecksSent>) {
    if !session.ready() && !matches!(request, Request::Hello(_)) {
        let refused = ErrorResponse::new(ErrorCode::HANDSHAKE_REQUIRED, "send Hello first");
        return (Response::Error(refused), None);
    }
    if let Request::PollChecks(poll) = request {
        return match txn::poll(shared, poll).await {
            Ok((response, sent)) => (response, sent),
            Err(e) => (Response::Error(e), None),
        };
    }
    let reply = match request {
        Request::Hello(hello) => hello::handle(shared, session, hello),
        Request::CreateTopic(create) => topic::create(shared, create).await,
        Request::ListTopics => topic::list(shared),
        Request::DescribeTopic { topic } => topic::describe(shared, &topic),
        Request::Publish(publish) => publish::handle(shared, publish).await,
        Request::ListGroups => groups::list(shared),
        Request::GroupLag { topic, group } => groups::lag(shared, &topic, &group),
        Request::DlqList { group, max } => groups::dlq_list(shared, &group, max),
        Request::DlqRedrive { group, max } => groups::dlq_redrive(shared, &group, max).await,
        Request::SendHalf(half) => txn::send_half(shared, half).await,
        Request::EndTxn(end) => txn::end(shared, end).await,
        Request::PollChecks(_) => Err(invalid("check-back polls are handled above")),
        Request::ListTxns { max } => txn::list(shared, max),
        Request::SendHalves(halves) => txn::send_halves(shared, halves).await,
        Request::EndTxns(ends) => txn::end_many(shared, ends).await,
        Request::Receive(receive) => receive::handle(shared, receive).await,
        Request::Ack(ack) => ack::ack(shared, ack).await,
        Request::Nack(nack) => ack::nack(shared, nack),
        Request::ChangeInvisibility(change) => ack::change_invisibility(shared, change),
        Request::Stats => stats::handle(shared),
        Request::Cluster(cluster) => cluster::handle(shared, cluster).await,
    };
    (reply.unwrap_or_else(Response::Error), None)
}

/// An `INVALID_ARGUMENT` error.
fn invalid(message: impl Into<String>) -> ErrorResponse {
    ErrorResponse::new(ErrorCode::INVALID_ARGUMENT, message)
}
