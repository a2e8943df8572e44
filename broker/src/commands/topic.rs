use super::Reply;
use crate::broker::Shared;
use crate::state::command::{Command, Output};
use crate::state::unknown_topic;
use escrow_proto::{is_reserved, validate_name, CreateTopic, Response};

pub(super) async fn create(shared: &Shared, create: CreateTopic) -> Reply {
    validate_name("topic", &create.topic)?;
    if is_reserved(&create.topic) {
        return Err(super::invalid(
            "topic names starting with '%' are reserved for the broker (dead-letter topics)",
        ));
    }
    let committed = shared
        .proposer
        .propose(Command::CreateTopic {
            name: create.topic,
            queues: create.queues,
        })
        .await?;
    match committed.output {
        Output::TopicCreated(info) => Ok(Response::Topic(info)),
        Output::Rejected(e) => Err(e),
        other => Err(super::invalid(format!("unexpected output {other:?}"))),
    }
}

pub(super) fn list(shared: &Shared) -> Reply {
    let view = shared.view();
    Ok(Response::Topics(
        view.topics
            .iter()
            .map(|(name, state)| state.info(name))
            .collect(),
    ))
}

pub(super) fn describe(shared: &Shared, topic: &str) -> Reply {
    let view = shared.view();
    let state = view.topics.get(topic).ok_or_else(|| unknown_topic(topic))?;
    Ok(Response::Topic(state.info(topic)))
}
