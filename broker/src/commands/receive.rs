use super::{invalid, Reply};
use crate::broker::Shared;
use crate::groups::{Exhausted, GroupLeases, LeasePolicy, Leased, MessageMeta};
use crate::state::command::{Command, Output};
use crate::state::unknown_topic;
use crate::storage::{StorageError, Store};
use escrow_client::now_ms;
use escrow_proto::{
    dead_letter_topic, validate_group, validate_name, Delivery, ErrorResponse, Message, Position,
    Receive, Response, MAX_FRAME_LEN, MAX_INVISIBLE_MS, MAX_RECEIVE_MESSAGES, MAX_WAIT_MS,
};
use std::time::Duration;
use tokio::time::Instant;

/// Bytes of messages one response may carry, leaving room for framing.
const RESPONSE_BUDGET: usize = MAX_FRAME_LEN as usize * 3 / 4;

pub(super) async fn handle(shared: &Shared, receive: Receive) -> Reply {
    validate_name("topic", &receive.topic)?;
    validate_group(&receive.group)?;
    if receive.max == 0 || receive.max > MAX_RECEIVE_MESSAGES {
        return Err(invalid(format!("max must be 1..={MAX_RECEIVE_MESSAGES}")));
    }
    if receive.invisible_for_ms == 0 || receive.invisible_for_ms > MAX_INVISIBLE_MS {
        return Err(invalid(format!(
            "invisible_for must be 1..={MAX_INVISIBLE_MS} ms"
        )));
    }
    if receive.wait_ms > MAX_WAIT_MS {
        return Err(invalid(format!("wait must be at most {MAX_WAIT_MS} ms")));
    }
    let deadline = Instant::now() + Duration::from_millis(receive.wait_ms);
    let mut commits = shared.commits.clone();
    let key = (receive.group.clone(), receive.topic.clone());
    loop {
        // Leases are granted only by a caught-up leader; leadership may change mid-poll.
        shared.require_leader()?;
        // Mark the current commit seen before looking, so a commit racing with the look wakes us.
        commits.borrow_and_update();
        let now = now_ms();
        let policy = LeasePolicy {
            invisible_for_ms: receive.invisible_for_ms,
            max_deliveries: shared.config.max_deliveries,
        };
        let (topic_id, selection, next_expiry) = {
            let view = shared.view();
            let topic = view
                .topics
                .get(&receive.topic)
                .ok_or_else(|| unknown_topic(&receive.topic))?;
            let progress = view.progress.get(&key).map(Vec::as_slice);
            let mut leases = shared.leases();
            let group = leases
                .entry(key.clone())
                .or_insert_with(|| GroupLeases::new(topic.queues.len(), now.saturating_mul(1000)));
            let mut meta = |queue, from, to| read_meta(&shared.store, topic.id, queue, from, to);
            let selection = group.select(
                now,
                receive.max as usize,
                policy,
                &topic.queues,
                progress,
                &mut meta,
            )?;
            (topic.id, selection, group.next_expiry())
        };
        if !selection.exhausted.is_empty() {
            dead_letter(shared, &receive, topic_id, &selection.exhausted).await;
        }
        let leased = selection.leased;
        if !leased.is_empty() {
            return deliver(shared, &receive, topic_id, leased).map(Response::Messages);
        }
        let now_instant = Instant::now();
        if now_instant >= deadline {
            return Ok(Response::Messages(Vec::new()));
        }
        let mut wake = deadline;
        if let Some(expiry) = next_expiry {
            wake = wake.min(now_instant + Duration::from_millis(expiry.saturating_sub(now_ms())));
        }
        tokio::select! {
            changed = commits.changed() => {
                if changed.is_err() {
                    tokio::time::sleep_until(deadline).await;
                }
            }
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
}

/// Reads the leased messages; leases that do not fit in the response are given back.
fn deliver(
    shared: &Shared,
    receive: &Receive,
    topic_id: u32,
    leased: Vec<Leased>,
) -> Result<Vec<Delivery>, ErrorResponse> {
    let mut deliveries = Vec::with_capacity(leased.len());
    let mut bytes = 0usize;
    let mut undelivered = Vec::new();
    let mut start = 0;
    while start < leased.len() {
        let queue = leased[start].queue;
        let end = leased[start..]
            .iter()
            .position(|l| l.queue != queue)
            .map_or(leased.len(), |n| start + n);
        let run = &leased[start..end];
        start = end;
        if bytes >= RESPONSE_BUDGET {
            undelivered.extend_from_slice(run);
            continue;
        }
        let offsets: Vec<u64> = run.iter().map(|l| l.offset).collect();
        let records = match shared.store.read(topic_id, queue, &offsets) {
            Ok(records) => records,
            Err(e) => {
                tracing::error!(error = %e, queue, "reading leased messages");
                undelivered.extend_from_slice(&leased);
                give_back(shared, receive, &undelivered);
                return Err(e.into());
            }
        };
        for (lease, (offset, stored_at_ms, record)) in run.iter().zip(records) {
            let size = record.message.body.len() + record.message.metadata_len();
            if !deliveries.is_empty() && bytes + size > RESPONSE_BUDGET {
                undelivered.push(*lease);
                bytes = RESPONSE_BUDGET;
                continue;
            }
            bytes += size;
            deliveries.push(Delivery {
                topic: receive.topic.clone(),
                position: Position { queue, offset },
                message: record.message,
                stored_at_ms,
                delivery_count: lease.deliveries,
                receipt: lease.receipt(),
            });
        }
    }
    give_back(shared, receive, &undelivered);
    Ok(deliveries)
}

fn give_back(shared: &Shared, receive: &Receive, leased: &[Leased]) {
    if leased.is_empty() {
        return;
    }
    let mut leases = shared.leases();
    if let Some(group) = leases.get_mut(&(receive.group.clone(), receive.topic.clone())) {
        for lease in leased {
            group.give_back(lease);
        }
    }
}

/// Lease-relevant metadata of offsets `from..to` of a queue.
fn read_meta(
    store: &Store,
    topic_id: u32,
    queue: u32,
    from: u64,
    to: u64,
) -> Result<Vec<MessageMeta>, StorageError> {
    let offsets: Vec<u64> = (from..to).collect();
    Ok(store
        .read_without_bodies(topic_id, queue, &offsets)?
        .into_iter()
        .map(|(_, _, record)| MessageMeta {
            fifo: record
                .message
                .message_group
                .as_deref()
                .map(|g| super::publish::fnv1a(g.as_bytes())),
            deliver_at_ms: record.message.deliver_at_ms.unwrap_or(0),
        })
        .collect())
}

/// Header names of a dead letter's origin.
pub(crate) const DLQ_TOPIC_HEADER: &str = "escrow-dlq-topic";
pub(crate) const DLQ_QUEUE_HEADER: &str = "escrow-dlq-queue";
pub(crate) const DLQ_OFFSET_HEADER: &str = "escrow-dlq-offset";
pub(crate) const DLQ_DELIVERIES_HEADER: &str = "escrow-dlq-deliveries";

/// Moves messages out of deliveries to the group's dead-letter topic (one Raft command).
/// On failure they stay leased and are tried again later.
async fn dead_letter(shared: &Shared, receive: &Receive, topic_id: u32, exhausted: &[Exhausted]) {
    let mut offsets = Vec::with_capacity(exhausted.len());
    let mut records: Vec<(u32, Message)> = Vec::with_capacity(exhausted.len());
    for e in exhausted {
        let record = match shared.store.read(topic_id, e.queue, &[e.offset]) {
            Ok(mut r) => match r.pop() {
                Some((_, _, record)) => record,
                None => continue,
            },
            Err(error) => {
                tracing::error!(%error, "reading a message to dead-letter");
                return;
            }
        };
        let mut message = record.message;
        for (name, value) in [
            (DLQ_TOPIC_HEADER, receive.topic.clone()),
            (DLQ_QUEUE_HEADER, e.queue.to_string()),
            (DLQ_OFFSET_HEADER, e.offset.to_string()),
            (DLQ_DELIVERIES_HEADER, e.deliveries.to_string()),
        ] {
            message.headers.insert(name.to_string(), value);
        }
        // Delivery-time settings belong to the original delivery, not the dead letter.
        message.deliver_at_ms = None;
        offsets.push((e.queue, e.offset));
        records.push((0, message));
    }
    let command = Command::DeadLetter {
        topic: receive.topic.clone(),
        group: receive.group.clone(),
        offsets: offsets.clone(),
        records,
    };
    match shared.proposer.propose(command).await {
        Ok(c) if matches!(c.output, Output::Acked(_)) => {
            tracing::info!(
                group = %receive.group,
                topic = %receive.topic,
                count = offsets.len(),
                dlq = %dead_letter_topic(&receive.group),
                "messages out of deliveries moved to the dead-letter topic"
            );
            if let Some(group) = shared
                .leases()
                .get_mut(&(receive.group.clone(), receive.topic.clone()))
            {
                for (queue, offset) in offsets {
                    group.remove(queue, offset);
                }
            }
        }
        Ok(c) => tracing::warn!(output = ?c.output, "dead-lettering refused"),
        Err(e) => tracing::warn!(error = ?e, "dead-lettering failed; will retry"),
    }
}
