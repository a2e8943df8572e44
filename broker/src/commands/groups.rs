//! Consumer-group administration: list, lag, dead letters and their redrive.

use super::receive::{
    DLQ_DELIVERIES_HEADER, DLQ_OFFSET_HEADER, DLQ_QUEUE_HEADER, DLQ_TOPIC_HEADER,
};
use super::{invalid, Reply};
use crate::broker::Shared;
use crate::state::command::{Command, Output};
use crate::state::{unknown_topic, GroupTopic, REDRIVE_GROUP};
use escrow_proto::{
    dead_letter_topic, is_reserved, validate_group, validate_name, DeadLetter, GroupInfo, Position,
    QueueLag, Response, MAX_RECEIVE_MESSAGES,
};
use std::collections::BTreeSet;

pub(super) fn list(shared: &Shared) -> Reply {
    // Groups with replicated progress, plus those only leasing so far (leader-local).
    let leasing: Vec<GroupTopic> = shared.leases().keys().cloned().collect();
    let view = shared.view();
    let keys: BTreeSet<&GroupTopic> = view.progress.keys().chain(leasing.iter()).collect();
    let groups = keys
        .into_iter()
        .filter(|(group, _)| !is_reserved(group))
        .filter_map(|key| {
            let state = view.topics.get(&key.1)?;
            let progress = view.progress.get(key);
            let (acked, published) =
                state
                    .queues
                    .iter()
                    .enumerate()
                    .fold((0, 0), |(acked, published), (i, q)| {
                        let done = progress
                            .and_then(|p| p.get(i))
                            .map_or(0, |p| p.acked_count(q.next_offset));
                        (acked + done, published + q.next_offset)
                    });
            Some(GroupInfo {
                group: key.0.clone(),
                topic: key.1.clone(),
                acked,
                backlog: published.saturating_sub(acked),
            })
        })
        .collect();
    Ok(Response::Groups(groups))
}

pub(super) fn lag(shared: &Shared, topic: &str, group: &str) -> Reply {
    validate_name("topic", topic)?;
    validate_name("group", group)?;
    let key = (group.to_string(), topic.to_string());
    let view = shared.view();
    let state = view.topics.get(topic).ok_or_else(|| unknown_topic(topic))?;
    let progress = view.progress.get(&key);
    // In-flight counts are leader-local; a follower reports none.
    let in_flight = shared
        .leases()
        .get(&key)
        .map(|g| g.in_flight())
        .unwrap_or_default();
    let lags = state
        .queues
        .iter()
        .enumerate()
        .map(|(i, q)| {
            let acked = progress
                .and_then(|p| p.get(i))
                .map_or(0, |p| p.acked_count(q.next_offset));
            QueueLag {
                queue: i as u32,
                published: q.next_offset,
                acked,
                in_flight: in_flight.get(i).copied().unwrap_or(0),
                backlog: q.next_offset.saturating_sub(acked),
            }
        })
        .collect();
    Ok(Response::Lag(lags))
}

/// Dead letters of `group` not redriven yet, oldest first.
fn pending_dead_letters(
    shared: &Shared,
    group: &str,
    max: u32,
) -> Result<Vec<DeadLetter>, escrow_proto::ErrorResponse> {
    validate_group(group)?;
    if max == 0 || max > MAX_RECEIVE_MESSAGES {
        return Err(invalid(format!("max must be 1..={MAX_RECEIVE_MESSAGES}")));
    }
    let dlq = dead_letter_topic(group);
    let (topic_id, next, progress) = {
        let view = shared.view();
        let Some(state) = view.topics.get(&dlq) else {
            return Ok(Vec::new());
        };
        let progress = view
            .progress
            .get(&(REDRIVE_GROUP.to_string(), dlq.clone()))
            .and_then(|p| p.first().cloned())
            .unwrap_or_default();
        (state.id, state.queues[0].next_offset, progress)
    };
    let mut out = Vec::new();
    let mut from = progress.floor;
    while from < next && out.len() < max as usize {
        let to = next.min(from + 256);
        let offsets: Vec<u64> = (from..to).filter(|o| !progress.is_acked(*o)).collect();
        for (offset, stored_at_ms, record) in shared.store.read(topic_id, 0, &offsets)? {
            if out.len() >= max as usize {
                break;
            }
            let header = |name: &str| record.message.headers.get(name).cloned();
            let number = |name: &str| header(name).and_then(|v| v.parse::<u64>().ok());
            let (Some(topic), Some(queue), Some(origin_offset)) = (
                header(DLQ_TOPIC_HEADER),
                number(DLQ_QUEUE_HEADER),
                number(DLQ_OFFSET_HEADER),
            ) else {
                continue;
            };
            out.push(DeadLetter {
                position: Position { queue: 0, offset },
                topic,
                origin: Position {
                    queue: u32::try_from(queue).unwrap_or(u32::MAX),
                    offset: origin_offset,
                },
                deliveries: number(DLQ_DELIVERIES_HEADER)
                    .and_then(|d| u32::try_from(d).ok())
                    .unwrap_or(0),
                dead_at_ms: stored_at_ms,
                message: record.message,
            });
        }
        from = to;
    }
    Ok(out)
}

pub(super) fn dlq_list(shared: &Shared, group: &str, max: u32) -> Reply {
    Ok(Response::DeadLetters(pending_dead_letters(
        shared, group, max,
    )?))
}

pub(super) async fn dlq_redrive(shared: &Shared, group: &str, max: u32) -> Reply {
    shared.require_leader()?;
    let pending = pending_dead_letters(shared, group, max)?;
    if pending.is_empty() {
        return Ok(Response::Redriven(0));
    }
    let command = Command::Redrive {
        group: group.to_string(),
        dead_letters: pending.iter().map(|d| d.position.offset).collect(),
        origins: pending
            .iter()
            .map(|d| (d.topic.clone(), d.origin.queue, d.origin.offset))
            .collect(),
    };
    match shared.proposer.propose(command).await?.output {
        Output::Acked(n) => Ok(Response::Redriven(n)),
        Output::Rejected(e) => Err(e),
        other => Err(invalid(format!("unexpected output {other:?}"))),
    }
}
