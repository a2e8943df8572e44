use super::{invalid, Reply};
use crate::broker::Shared;
use crate::groups::{GroupLeases, Leased};
use crate::state::unknown_topic;
use escrow_client::now_ms;
use escrow_proto::{
    validate_name, Delivery, ErrorResponse, Position, Receive, Response, MAX_FRAME_LEN,
    MAX_INVISIBLE_MS, MAX_RECEIVE_MESSAGES, MAX_WAIT_MS,
};
use std::time::Duration;
use tokio::time::Instant;

/// Bytes of messages one response may carry, leaving room for framing.
const RESPONSE_BUDGET: usize = MAX_FRAME_LEN as usize * 3 / 4;

pub(super) async fn handle(shared: &Shared, receive: Receive) -> Reply {
    validate_name("topic", &receive.topic)?;
    validate_name("group", &receive.group)?;
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
        let (topic_id, leased, next_expiry) = {
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
            let leased = group.select(
                now,
                receive.max as usize,
                receive.invisible_for_ms,
                &topic.queues,
                progress,
            );
            (topic.id, leased, group.next_expiry())
        };
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
