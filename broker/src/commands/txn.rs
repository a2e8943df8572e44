//! Transactional messages: send half, end (commit / rollback / unknown), check-back polls, list.

use super::{invalid, Reply};
use crate::broker::Shared;
use crate::proposer::Committed;
use crate::state::command::{Command, HalfMessage, Output};
use crate::state::unknown_topic;
use escrow_proto::txn::{
    EndTxn, HalfSent, PollChecks, SendHalf, TxnCheck, TxnDecision, TxnInfo, TxnOutcome, TxnState,
};
use escrow_proto::{
    is_reserved, validate_name, ErrorCode, ErrorResponse, Response, MAX_BATCH_MESSAGES, MAX_ID_LEN,
    MAX_INVISIBLE_MS, MAX_WAIT_MS,
};
use std::time::Duration;

fn validate_instance(instance: &str) -> Result<(), ErrorResponse> {
    if instance.is_empty() || instance.len() > MAX_ID_LEN {
        return Err(invalid(format!(
            "producer instance must be 1..={MAX_ID_LEN} bytes"
        )));
    }
    Ok(())
}

/// Checks a half message and turns it into its command (routing included).
fn prepare_half(shared: &Shared, half: SendHalf) -> Result<Command, ErrorResponse> {
    validate_name("topic", &half.topic)?;
    validate_name("producer group", &half.producer_group)?;
    validate_instance(&half.instance)?;
    half.message.validate()?;
    if is_reserved(&half.topic) {
        return Err(invalid("reserved topics take no transactional messages"));
    }
    if half.first_check_ms.is_some_and(|ms| ms > MAX_INVISIBLE_MS) {
        return Err(invalid(format!(
            "first check must be at most {MAX_INVISIBLE_MS} ms away"
        )));
    }
    let queues = {
        let view = shared.view();
        if view.txns.len() >= shared.config.max_pending_txns {
            return Err(ErrorResponse::new(
                ErrorCode::OVERLOADED,
                format!(
                    "{} transactions pending (max_pending_txns); end some first",
                    view.txns.len()
                ),
            ));
        }
        match view.topics.get(&half.topic) {
            Some(t) => t.queues.len() as u32,
            None => return Err(unknown_topic(&half.topic)),
        }
    };
    let spread = shared
        .round_robin
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        % queues;
    let first_check_ms = half
        .first_check_ms
        .unwrap_or(shared.config.txn_settings(&half.topic).first_check_ms);
    Ok(Command::SendHalf {
        half: Box::new(HalfMessage {
            queue: super::publish::route(&half.message, queues, spread),
            topic: half.topic,
            producer_group: half.producer_group,
            instance: half.instance,
            message: half.message,
        }),
        first_check_at_ms: escrow_client::now_ms().saturating_add(first_check_ms),
    })
}

fn half_sent(committed: Result<Committed, ErrorResponse>) -> Result<HalfSent, ErrorResponse> {
    let committed = committed?;
    match committed.output {
        Output::HalfStored(txn_id) => Ok(HalfSent {
            txn_id,
            commit_index: committed.durability.commit_index,
        }),
        Output::Rejected(e) => Err(e),
        other => Err(invalid(format!("unexpected output {other:?}"))),
    }
}

pub(super) async fn send_half(shared: &Shared, half: SendHalf) -> Reply {
    shared.require_leader()?;
    let command = prepare_half(shared, half)?;
    half_sent(shared.proposer.propose(command).await).map(Response::HalfSent)
}

pub(super) async fn send_halves(shared: &Shared, halves: Vec<SendHalf>) -> Reply {
    check_batch(halves.len())?;
    shared.require_leader()?;
    let prepared: Vec<Result<Command, ErrorResponse>> = halves
        .into_iter()
        .map(|h| prepare_half(shared, h))
        .collect();
    let answers = propose_valid(shared, prepared).await;
    Ok(Response::HalvesSent(
        answers.into_iter().map(half_sent).collect(),
    ))
}

fn check_batch(len: usize) -> Result<(), ErrorResponse> {
    if len == 0 || len > MAX_BATCH_MESSAGES {
        return Err(ErrorResponse::new(
            ErrorCode::BATCH_TOO_LARGE,
            format!("between 1 and {MAX_BATCH_MESSAGES} per request"),
        ));
    }
    Ok(())
}

/// Proposes the commands that passed their checks together; refusals keep their place.
/// The commands are moved, not cloned: each holds a message body.
async fn propose_valid(
    shared: &Shared,
    prepared: Vec<Result<Command, ErrorResponse>>,
) -> Vec<Result<Committed, ErrorResponse>> {
    let mut commands = Vec::with_capacity(prepared.len());
    let refusals: Vec<Option<ErrorResponse>> = prepared
        .into_iter()
        .map(|p| match p {
            Ok(command) => {
                commands.push(command);
                None
            }
            Err(e) => Some(e),
        })
        .collect();
    let mut committed = shared.proposer.propose_all(commands).await.into_iter();
    refusals
        .into_iter()
        .map(|refusal| match refusal {
            None => committed
                .next()
                .unwrap_or_else(|| Err(invalid("missing answer"))),
            Some(e) => Err(e),
        })
        .collect()
}

/// What an `EndTxn` needs: a command, or an answer without one (`Unknown`).
fn prepare_end(shared: &Shared, end: &EndTxn) -> Result<Option<Command>, ErrorResponse> {
    match end.decision {
        TxnDecision::Commit | TxnDecision::Rollback => Ok(Some(Command::EndTxn {
            txn_id: end.txn_id,
            commit: end.decision == TxnDecision::Commit,
        })),
        // Nothing to decide: the schedule goes on.
        TxnDecision::Unknown if shared.view().txns.contains_key(&end.txn_id) => Ok(None),
        TxnDecision::Unknown => Err(ErrorResponse::new(
            ErrorCode::TXN_UNKNOWN,
            format!("transaction {} is not pending", end.txn_id),
        )),
    }
}

fn ended(
    txn_id: u64,
    committed: Option<Result<Committed, ErrorResponse>>,
) -> Result<TxnOutcome, ErrorResponse> {
    let Some(committed) = committed else {
        return Ok(TxnOutcome {
            txn_id,
            state: TxnState::Pending,
        });
    };
    match committed?.output {
        Output::TxnEnded(state) => Ok(TxnOutcome { txn_id, state }),
        Output::Rejected(e) => Err(e),
        other => Err(invalid(format!("unexpected output {other:?}"))),
    }
}

pub(super) async fn end(shared: &Shared, end: EndTxn) -> Reply {
    shared.require_leader()?;
    let committed = match prepare_end(shared, &end)? {
        Some(command) => Some(shared.proposer.propose(command).await),
        None => None,
    };
    tracing::debug!(txn = end.txn_id, source = ?end.source, decision = ?end.decision, "end transaction");
    ended(end.txn_id, committed).map(Response::TxnEnded)
}

pub(super) async fn end_many(shared: &Shared, ends: Vec<EndTxn>) -> Reply {
    check_batch(ends.len())?;
    shared.require_leader()?;
    let prepared: Vec<Result<Option<Command>, ErrorResponse>> =
        ends.iter().map(|e| prepare_end(shared, e)).collect();
    let commands: Vec<Command> = prepared
        .iter()
        .filter_map(|p| p.as_ref().ok().cloned().flatten())
        .collect();
    let mut committed = shared.proposer.propose_all(commands).await.into_iter();
    let answers = ends
        .iter()
        .zip(prepared)
        .map(|(end, p)| match p {
            Ok(Some(_)) => ended(end.txn_id, committed.next()),
            Ok(None) => ended(end.txn_id, None),
            Err(e) => Err(e),
        })
        .collect();
    Ok(Response::TxnsEnded(answers))
}

/// Check-backs handed to a poll, counted once delivered.
#[derive(Debug)]
pub(crate) struct ChecksSent {
    group: String,
    instance: String,
    ids: Vec<u64>,
    /// `(transaction, next check at)`.
    schedule: Vec<(u64, u64)>,
}

pub(super) async fn poll(
    shared: &Shared,
    poll: PollChecks,
) -> Result<(Response, Option<ChecksSent>), ErrorResponse> {
    validate_name("producer group", &poll.producer_group)?;
    validate_instance(&poll.instance)?;
    if poll.wait_ms > MAX_WAIT_MS {
        return Err(invalid(format!("wait must be at most {MAX_WAIT_MS} ms")));
    }
    shared.require_leader()?;
    let (group, instance) = (poll.producer_group, poll.instance);
    let wake = shared.checks.poll_begin(&group, &instance);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(poll.wait_ms);
    let ids = loop {
        let ids = shared.checks.take(&group, &instance);
        if !ids.is_empty() || tokio::time::Instant::now() >= deadline {
            break ids;
        }
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep_until(deadline) => {}
        }
    };
    shared.checks.poll_end(&group, &instance);
    if ids.is_empty() {
        return Ok((Response::Checks(Vec::new()), None));
    }
    let now = escrow_client::now_ms();
    let mut checks = Vec::with_capacity(ids.len());
    let mut schedule = Vec::with_capacity(ids.len());
    for id in &ids {
        let pending = shared.view().txns.get(id).cloned();
        let Some(txn) = pending else { continue };
        let record = match shared.store.read_half(*id) {
            Ok(Some(record)) => record,
            Ok(None) => continue,
            Err(e) => {
                shared.checks.release(&ids, None);
                return Err(e.into());
            }
        };
        let interval = shared.config.txn_settings(&txn.topic).check_interval_ms;
        schedule.push((*id, now.saturating_add(interval)));
        checks.push(TxnCheck {
            txn_id: *id,
            topic: txn.topic,
            message: record.message,
            check: txn.checks + 1,
        });
    }
    let sent = ChecksSent {
        group,
        instance,
        ids,
        schedule,
    };
    Ok((Response::Checks(checks), Some(sent)))
}

/// After a response with check-backs: a delivered check is counted (replicated) and
/// scheduled again; an undelivered one goes to another instance at the next scan, and
/// the instance that did not take it is no longer asked.
pub(crate) async fn checks_delivered(shared: &Shared, sent: ChecksSent, delivered: bool) {
    if !delivered {
        tracing::info!(group = %sent.group, instance = %sent.instance, "check-backs not delivered; asking another instance");
        shared
            .checks
            .release(&sent.ids, Some((&sent.group, &sent.instance)));
        return;
    }
    let counted = shared
        .proposer
        .propose(Command::TxnChecked {
            checks: sent.schedule,
        })
        .await;
    shared.checks.release(&sent.ids, None);
    if let Err(e) = counted {
        tracing::warn!(error = ?e, "counting delivered check-backs failed; they will be asked again");
    }
}

pub(super) fn list(shared: &Shared, max: u32) -> Reply {
    let view = shared.view();
    Ok(Response::Txns(
        view.txns
            .iter()
            .take(max as usize)
            .map(|(id, t)| TxnInfo {
                txn_id: *id,
                topic: t.topic.clone(),
                producer_group: t.producer_group.clone(),
                instance: t.instance.clone(),
                message_id: t.message_id.clone(),
                stored_at_ms: t.stored_at_ms,
                checks: t.checks,
                next_check_at_ms: t.next_check_at_ms,
            })
            .collect(),
    ))
}
