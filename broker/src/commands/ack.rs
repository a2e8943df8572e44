use super::{invalid, Reply};
use crate::broker::Shared;
use crate::state::command::{Command, Output};
use crate::state::unknown_topic;
use escrow_client::now_ms;
use escrow_proto::{
    validate_group, validate_name, Ack, AckResult, ChangeInvisibility, ErrorCode, ErrorResponse,
    Nack, ReceiptHandle, Response, MAX_BATCH_MESSAGES, MAX_INVISIBLE_MS,
};

fn check(topic: &str, group: &str, receipts: usize) -> Result<(), ErrorResponse> {
    validate_name("topic", topic)?;
    validate_group(group)?;
    if receipts == 0 || receipts > MAX_BATCH_MESSAGES {
        return Err(invalid(format!(
            "between 1 and {MAX_BATCH_MESSAGES} receipts per request"
        )));
    }
    Ok(())
}

fn queue_count(shared: &Shared, topic: &str) -> Result<u32, ErrorResponse> {
    shared
        .view()
        .topics
        .get(topic)
        .map(|t| t.queues.len() as u32)
        .ok_or_else(|| unknown_topic(topic))
}

pub(super) async fn ack(shared: &Shared, ack: Ack) -> Reply {
    check(&ack.topic, &ack.group, ack.receipts.len())?;
    shared.require_leader()?;
    let queues = queue_count(shared, &ack.topic)?;
    let key = (ack.group.clone(), ack.topic.clone());
    let now = now_ms();
    let mut accepted = Vec::with_capacity(ack.receipts.len());
    let mut rejected = Vec::new();
    {
        let leases = shared.leases();
        let group = leases.get(&key);
        for receipt in &ack.receipts {
            let verdict = if receipt.queue >= queues {
                Err(ErrorCode::INVALID_ARGUMENT)
            } else {
                group.map_or(Ok(()), |g| g.check_ack(now, receipt))
            };
            match verdict {
                Ok(()) => accepted.push((receipt.queue, receipt.offset)),
                Err(code) => rejected.push((*receipt, code)),
            }
        }
    }
    if !accepted.is_empty() {
        let committed = shared
            .proposer
            .propose(Command::Ack {
                topic: ack.topic,
                group: ack.group,
                offsets: accepted.clone(),
            })
            .await?;
        match committed.output {
            Output::Acked(_) => {}
            Output::Rejected(e) => return Err(e),
            other => return Err(invalid(format!("unexpected output {other:?}"))),
        }
        if let Some(group) = shared.leases().get_mut(&key) {
            for (queue, offset) in &accepted {
                group.remove(*queue, *offset);
            }
        }
    }
    Ok(Response::Acked(AckResult {
        applied: accepted.len() as u32,
        rejected,
    }))
}

fn change(
    shared: &Shared,
    topic: &str,
    group: &str,
    receipts: &[ReceiptHandle],
    invisible_for_ms: Option<u64>,
) -> Result<AckResult, ErrorResponse> {
    check(topic, group, receipts.len())?;
    if invisible_for_ms.is_some_and(|ms| ms > MAX_INVISIBLE_MS) {
        return Err(invalid(format!(
            "delay must be at most {MAX_INVISIBLE_MS} ms"
        )));
    }
    queue_count(shared, topic)?;
    shared.require_leader()?;
    let now = now_ms();
    let mut leases = shared.leases();
    let mut group = leases.get_mut(&(group.to_string(), topic.to_string()));
    let mut result = AckResult {
        applied: 0,
        rejected: Vec::new(),
    };
    let backoff = &shared.config.retry_backoff_ms;
    for receipt in receipts {
        let outcome = match group.as_mut() {
            Some(g) => {
                // No delay given: the backoff ladder step for this delivery.
                let delay = invisible_for_ms.or_else(|| {
                    g.deliveries(receipt).map(|n| {
                        let step = (n as usize).saturating_sub(1);
                        backoff.get(step).or(backoff.last()).copied().unwrap_or(0)
                    })
                });
                match delay {
                    Some(delay) => g.change_visibility(now, receipt, delay),
                    None => Err(ErrorCode::RECEIPT_STALE),
                }
            }
            None => Err(ErrorCode::RECEIPT_STALE),
        };
        match outcome {
            Ok(()) => result.applied += 1,
            Err(code) => result.rejected.push((*receipt, code)),
        }
    }
    Ok(result)
}

pub(super) fn nack(shared: &Shared, nack: Nack) -> Reply {
    change(
        shared,
        &nack.topic,
        &nack.group,
        &nack.receipts,
        nack.delay_ms,
    )
    .map(Response::Nacked)
}

pub(super) fn change_invisibility(shared: &Shared, c: ChangeInvisibility) -> Reply {
    let result = change(
        shared,
        &c.topic,
        &c.group,
        std::slice::from_ref(&c.receipt),
        Some(c.invisible_for_ms),
    )?;
    match result.rejected.first() {
        Some((_, code)) => Err(ErrorResponse::new(
            *code,
            "the receipt does not name a current lease",
        )),
        None => Ok(Response::InvisibilityChanged),
    }
}
