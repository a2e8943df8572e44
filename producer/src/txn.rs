//! Transactional producer: half messages, commit or rollback, and check-back answers.
//!
//! ```no_run
//! use escrow_client::{ClientConfig, Trust};
//! use escrow_producer::txn::{TransactionChecker, TransactionalProducer};
//! use escrow_proto::txn::{TxnCheck, TxnDecision};
//! use escrow_proto::Message;
//!
//! struct OrdersTable;
//! impl TransactionChecker for OrdersTable {
//!     async fn check(&self, check: &TxnCheck) -> TxnDecision {
//!         // Look the order up in the database the local transaction wrote to.
//!         let committed = !check.message.id.is_empty();
//!         if committed { TxnDecision::Commit } else { TxnDecision::Rollback }
//!     }
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let client = ClientConfig::new("127.0.0.1:7440", Trust::CaFile("ca.pem".into()));
//! let producer = TransactionalProducer::connect(client, "order-service", OrdersTable).await?;
//! let (order_id, outcome) = producer
//!     .send_in_transaction("orders", Message::new("order-1", b"{}".to_vec()), || async {
//!         // Insert the order in the local database here; Err rolls the message back.
//!         Ok::<_, std::io::Error>(1)
//!     })
//!     .await?;
//! println!("order {order_id}: {:?}", outcome.state);
//! # Ok(()) }
//! ```

use crate::ProducerError;
use escrow_client::{unexpected, Client, ClientConfig, ClientError};
use escrow_proto::txn::{
    EndTxn, HalfSent, PollChecks, SendHalf, TxnCheck, TxnDecision, TxnOutcome, TxnSource,
};
use escrow_proto::{ErrorResponse, Message, Request, Response};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

/// Answers the broker's check-back: did the local transaction behind a half message commit?
///
/// Read the outcome from the store the local transaction wrote to; answer `Unknown` only
/// while it may still be running.
pub trait TransactionChecker: Send + Sync + 'static {
    /// The decision for `check`.
    fn check(&self, check: &TxnCheck) -> impl Future<Output = TxnDecision> + Send;
}

/// How long one check-back poll waits on the broker.
const POLL_WAIT: Duration = Duration::from_secs(2);

/// A producer of transactional messages in a producer group.
///
/// While it lives it answers check-backs for its group with its checker (for its own half
/// messages and, when their sender is gone, for the group's).
///
/// Concurrent `send_half` calls, and concurrent commits and rollbacks, travel together:
/// whatever queued while earlier requests were in flight goes as one request.
#[derive(Debug)]
pub struct TransactionalProducer {
    group: String,
    instance: String,
    next: AtomicU64,
    halves: Batcher<SendHalf, HalfSent>,
    ends: Batcher<EndTxn, TxnOutcome>,
    stop: watch::Sender<bool>,
    poller: tokio::task::JoinHandle<()>,
}

/// A stored half message, waiting for [`Transaction::commit`] or [`Transaction::rollback`].
#[derive(Debug)]
#[must_use = "a half message stays invisible until committed (or is resolved by check-back)"]
pub struct Transaction {
    ends: Batcher<EndTxn, TxnOutcome>,
    /// The transaction's id.
    pub txn_id: u64,
}

/// Most items in one batched request.
const MAX_BATCH: usize = 1024;
/// Batched requests in flight at once, per kind (halves, ends): four in all, as for a
/// publishing producer. Fewer, larger requests cost the broker less per transaction.
const REQUESTS_IN_FLIGHT: usize = 2;

type Reply<O> = oneshot::Sender<Result<O, ProducerError>>;

/// Turns concurrent calls into batched requests answered item by item.
struct Batcher<I, O> {
    tx: mpsc::UnboundedSender<(I, Reply<O>)>,
}

impl<I, O> Clone for Batcher<I, O> {
    fn clone(&self) -> Self {
        Batcher {
            tx: self.tx.clone(),
        }
    }
}

impl<I, O> std::fmt::Debug for Batcher<I, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Batcher")
    }
}

impl<I: Send + 'static, O: Send + 'static> Batcher<I, O> {
    fn start<F, Fut>(send: F) -> Batcher<I, O>
    where
        F: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<Result<O, ErrorResponse>>, ProducerError>> + Send + 'static,
    {
        let (tx, mut rx) = mpsc::unbounded_channel::<(I, Reply<O>)>();
        let send = Arc::new(send);
        tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(REQUESTS_IN_FLIGHT));
            while let Some(first) = rx.recv().await {
                // Wait for a request slot first: what queues meanwhile joins this batch.
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                crate::settle(&rx).await;
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(item) => batch.push(item),
                        Err(_) => break,
                    }
                }
                let send = send.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    let (items, replies): (Vec<I>, Vec<Reply<O>>) = batch.into_iter().unzip();
                    let count = replies.len();
                    match send(items).await {
                        Ok(answers) if answers.len() == count => {
                            for (answer, reply) in answers.into_iter().zip(replies) {
                                let _ =
                                    reply.send(answer.map_err(|e| ClientError::Server(e).into()));
                            }
                        }
                        Ok(answers) => {
                            for reply in replies {
                                let _ = reply.send(Err(ProducerError::Batch {
                                    code: None,
                                    message: format!("{} answers for {count} items", answers.len()),
                                }));
                            }
                        }
                        Err(e) => {
                            for reply in replies {
                                let _ = reply.send(Err(ProducerError::Batch {
                                    code: e.code(),
                                    message: e.to_string(),
                                }));
                            }
                        }
                    }
                });
            }
        });
        Batcher { tx }
    }

    async fn call(&self, item: I) -> Result<O, ProducerError> {
        let (reply, rx) = oneshot::channel();
        let closed = || ProducerError::Batch {
            code: None,
            message: "producer closed".into(),
        };
        self.tx.send((item, reply)).map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }
}

/// Why a transaction helper failed.
#[derive(Debug, thiserror::Error)]
pub enum TxnError<E> {
    /// Sending the half message or ending the transaction failed.
    #[error(transparent)]
    Producer(#[from] ProducerError),
    /// The local transaction failed; the half message was rolled back.
    #[error("local transaction failed: {0}")]
    Local(E),
}

impl TransactionalProducer {
    /// Connects as a new instance of `producer_group`; `checker` answers check-backs.
    pub async fn connect<C: TransactionChecker>(
        client: ClientConfig,
        producer_group: impl Into<String>,
        checker: C,
    ) -> Result<TransactionalProducer, ProducerError> {
        let client = Client::connect(client).await?;
        let group = producer_group.into();
        escrow_proto::validate_name("producer group", &group).map_err(ProducerError::Invalid)?;
        let instance = format!("{:016x}", crate::random_u64());
        let (stop, stopped) = watch::channel(false);
        let poller = tokio::spawn(answer_checks(
            client.clone(),
            group.clone(),
            instance.clone(),
            Arc::new(checker),
            stopped,
        ));
        let halves = {
            let client = client.clone();
            Batcher::start(move |halves| {
                let client = client.clone();
                async move {
                    match client.request(&Request::SendHalves(halves)).await? {
                        Response::HalvesSent(answers) => Ok(answers),
                        other => Err(unexpected("send_halves", &other).into()),
                    }
                }
            })
        };
        let ends = {
            let client = client.clone();
            Batcher::start(move |ends| {
                let client = client.clone();
                async move {
                    match client.request(&Request::EndTxns(ends)).await? {
                        Response::TxnsEnded(answers) => Ok(answers),
                        other => Err(unexpected("end_txns", &other).into()),
                    }
                }
            })
        };
        Ok(TransactionalProducer {
            group,
            instance,
            next: AtomicU64::new(0),
            halves,
            ends,
            stop,
            poller,
        })
    }

    /// This instance's id within its group.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Stores `message` as a half message: durable, invisible to consumers.
    pub async fn send_half(
        &self,
        topic: &str,
        message: Message,
    ) -> Result<Transaction, ProducerError> {
        self.send_half_checked_after(topic, message, None).await
    }

    /// As [`Self::send_half`], with the first check-back `first_check` after the send
    /// instead of the broker's setting (for local transactions known to run long).
    pub async fn send_half_checked_after(
        &self,
        topic: &str,
        mut message: Message,
        first_check: Option<Duration>,
    ) -> Result<Transaction, ProducerError> {
        if message.id.is_empty() {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            message.id = format!("{}-{n:x}", self.instance);
        }
        if message.born_at_ms == 0 {
            message.born_at_ms = escrow_client::now_ms();
        }
        message.validate().map_err(ProducerError::Invalid)?;
        let half = SendHalf {
            topic: topic.to_string(),
            producer_group: self.group.clone(),
            instance: self.instance.clone(),
            message,
            first_check_ms: first_check.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        };
        let sent = self.halves.call(half).await?;
        Ok(Transaction {
            ends: self.ends.clone(),
            txn_id: sent.txn_id,
        })
    }

    /// Sends a half message, runs `local` (the local transaction), then commits on `Ok`
    /// or rolls back on `Err`. If this process dies in between, check-back decides.
    pub async fn send_in_transaction<F, Fut, T, E>(
        &self,
        topic: &str,
        message: Message,
        local: F,
    ) -> Result<(T, TxnOutcome), TxnError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let txn = self.send_half(topic, message).await?;
        match local().await {
            Ok(value) => Ok((value, txn.commit().await?)),
            Err(e) => {
                if let Err(rollback) = txn.rollback().await {
                    tracing::warn!(error = %rollback, "rollback failed; check-back will decide");
                }
                Err(TxnError::Local(e))
            }
        }
    }

    /// Stops answering check-backs (other instances of the group take over).
    pub async fn close(mut self) {
        self.stop.send_replace(true);
        let _ = (&mut self.poller).await;
    }
}

impl Drop for TransactionalProducer {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

impl Transaction {
    /// Makes the message visible in its queue. Acknowledged: the outcome says what stands.
    pub async fn commit(self) -> Result<TxnOutcome, ProducerError> {
        self.end(TxnDecision::Commit).await
    }

    /// Discards the message.
    pub async fn rollback(self) -> Result<TxnOutcome, ProducerError> {
        self.end(TxnDecision::Rollback).await
    }

    async fn end(self, decision: TxnDecision) -> Result<TxnOutcome, ProducerError> {
        self.ends
            .call(EndTxn {
                txn_id: self.txn_id,
                decision,
                source: TxnSource::Producer,
            })
            .await
    }
}

/// Ends transaction `txn_id` with `decision`.
pub async fn end(
    client: &Client,
    txn_id: u64,
    decision: TxnDecision,
    source: TxnSource,
) -> Result<TxnOutcome, ProducerError> {
    let request = Request::EndTxn(EndTxn {
        txn_id,
        decision,
        source,
    });
    match client.request(&request).await? {
        Response::TxnEnded(outcome) => Ok(outcome),
        other => Err(unexpected("end_txn", &other).into()),
    }
}

async fn answer_checks<C: TransactionChecker>(
    client: Client,
    group: String,
    instance: String,
    checker: Arc<C>,
    mut stop: watch::Receiver<bool>,
) {
    let poll = Request::PollChecks(PollChecks {
        producer_group: group,
        instance,
        wait_ms: POLL_WAIT.as_millis() as u64,
    });
    while !*stop.borrow() {
        let checks = tokio::select! {
            _ = stop.changed() => return,
            r = client.request(&poll) => r,
        };
        let checks = match checks {
            Ok(Response::Checks(c)) => c,
            Ok(other) => {
                tracing::warn!(response = ?other, "unexpected answer to a check-back poll");
                Vec::new()
            }
            Err(e) => {
                tracing::debug!(error = %e, "check-back poll failed; polling again");
                tokio::time::sleep(Duration::from_millis(200)).await;
                Vec::new()
            }
        };
        for check in checks {
            let decision = checker.check(&check).await;
            if let Err(e) = end(&client, check.txn_id, decision, TxnSource::CheckBack).await {
                tracing::warn!(error = %e, txn = check.txn_id, "answering a check-back failed");
            }
        }
    }
}
