use super::{invalid, Reply};
use crate::broker::Shared;
use crate::state::command::{Command, Output};
use crate::state::unknown_topic;
use escrow_proto::{
    validate_name, ErrorCode, ErrorResponse, Message, Publish, Published, Response,
    MAX_BATCH_MESSAGES,
};
use std::sync::atomic::Ordering;

pub(super) async fn handle(shared: &Shared, publish: Publish) -> Reply {
    validate_name("topic", &publish.topic)?;
    if publish.messages.is_empty() {
        return Err(invalid("a publish needs at least one message"));
    }
    if publish.messages.len() > MAX_BATCH_MESSAGES {
        return Err(ErrorResponse::new(
            ErrorCode::BATCH_TOO_LARGE,
            format!(
                "{} messages exceed the batch limit of {MAX_BATCH_MESSAGES}",
                publish.messages.len()
            ),
        ));
    }
    let latest = escrow_client::now_ms().saturating_add(shared.config.max_delay_ms);
    for message in &publish.messages {
        message.validate()?;
        if message.deliver_at_ms.is_some_and(|at| at > latest) {
            return Err(invalid(format!(
                "deliver_at is more than the maximum delay ({} ms) ahead",
                shared.config.max_delay_ms
            )));
        }
    }
    // Only a caught-up leader's view is complete enough to route (or to refuse a topic).
    shared.require_leader()?;
    let queues = match shared.view().topics.get(&publish.topic) {
        Some(t) => t.queues.len() as u32,
        None => return Err(unknown_topic(&publish.topic)),
    };
    // Keyless messages of one batch share one queue, so the batch stays one segment.
    let spread = shared.round_robin.fetch_add(1, Ordering::Relaxed) % queues;
    let records = publish
        .messages
        .into_iter()
        .map(|m| (route(&m, queues, spread), m))
        .collect();
    let committed = shared
        .proposer
        .propose(Command::Append {
            topic: publish.topic,
            producer: publish.producer,
            records,
            dedupe_by_id: publish.dedupe_by_id,
        })
        .await?;
    match committed.output {
        Output::Appended(positions) => Ok(Response::Published(Published {
            positions,
            durability: committed.durability,
        })),
        Output::Rejected(e) => Err(e),
        other => Err(invalid(format!("unexpected output {other:?}"))),
    }
}

/// Queue for a message: by message group, else by key, else `spread`.
pub(crate) fn route(message: &Message, queues: u32, spread: u32) -> u32 {
    match message.message_group.as_ref().or(message.key.as_ref()) {
        Some(key) => (fnv1a(key.as_bytes()) % u64::from(queues)) as u32,
        None => spread,
    }
}

/// FNV-1a: stable across versions and platforms, so a key maps to the same queue everywhere.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_is_stable() {
        let mut m = Message::new("1", vec![]);
        m.key = Some("customer-42".into());
        let q = route(&m, 8, 0);
        assert_eq!(q, route(&m, 8, 5), "key wins over spread");
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        m.message_group = Some("g".into());
        assert_eq!(route(&m, 8, 0), (fnv1a(b"g") % 8) as u32);
        assert_eq!(route(&Message::new("2", vec![]), 8, 3), 3);
    }
}
