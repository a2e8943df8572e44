//! The relay: claim pending rows, publish them with their ids, mark them sent.
//!
//! Each worker loops: claim up to `batch_size` rows (a store transaction), keep the rows
//! that may go without overtaking an older row of their key ([`crate::core::publishable`]),
//! pack them into publish requests (a key never splits between two requests), publish the
//! requests concurrently, then mark the sent rows and the failed ones in the same store
//! transaction. Several workers (and several relay processes) run at once: a row claimed by
//! one is invisible to the others, and a key whose oldest row is claimed elsewhere waits.
//!
//! A crash anywhere leaves rows pending; the next claim publishes them again with the same
//! message ids and the broker stores them once (`dedupe_by_id`).

use crate::core::{self, classify, ErrorKind, Failed, PublishRequest, RetryPolicy};
use crate::{OutboxError, OutboxRow, OutboxStatus, RowFailure};
use escrow_client::ClientConfig;
use escrow_producer::{Producer, ProducerConfig, ProducerError};
use escrow_proto::{Message, MAX_BATCH_MESSAGES};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Rows a worker claimed and may publish now.
#[derive(Debug, Default)]
pub struct Claimed {
    /// Publishable rows, in id order.
    pub rows: Vec<OutboxRow>,
    /// Claimed rows that must wait for an older row of their key (left pending).
    pub held: Vec<u64>,
}

/// A store the relay can drain: the seam between the relay loop and PostgreSQL or redb.
pub trait RelayStore: Send + Sync + 'static {
    /// One worker's claim session (a connection, for PostgreSQL).
    type Worker: ClaimWorker;

    /// Opens a worker session.
    fn open_worker(&self) -> impl Future<Output = Result<Self::Worker, OutboxError>> + Send;

    /// Bumps `wake` whenever new rows may have been committed; runs until dropped.
    fn listen(&self, wake: watch::Sender<u64>) -> impl Future<Output = ()> + Send;

    /// Deletes sent rows older than `retention`, at most `batch` per transaction; only
    /// one cleaner works at a time. Returns how many were deleted.
    fn clean(
        &self,
        retention: Duration,
        batch: usize,
    ) -> impl Future<Output = Result<u64, OutboxError>> + Send;

    /// Backlog, lag and parked rows.
    fn status(&self) -> impl Future<Output = Result<OutboxStatus, OutboxError>> + Send;
}

/// One claim session: `claim`, then exactly one of `finish` or `release`.
pub trait ClaimWorker: Send + 'static {
    /// Claims up to `limit` pending rows whose next attempt is due.
    fn claim(&mut self, limit: usize) -> impl Future<Output = Result<Claimed, OutboxError>> + Send;

    /// Marks `sent` rows sent and records `failed` ones, ending the claim.
    fn finish(
        &mut self,
        sent: &[u64],
        failed: &[RowFailure],
    ) -> impl Future<Output = Result<(), OutboxError>> + Send;

    /// Ends the claim without changing any row.
    fn release(&mut self) -> impl Future<Output = Result<(), OutboxError>> + Send;
}

/// Relay settings.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// Rows claimed at once by one worker (at most 4096).
    pub batch_size: usize,
    /// Concurrent claim loops (each with its own store connection).
    pub workers: usize,
    /// Most rows in one publish request.
    pub max_request_messages: usize,
    /// About the most body bytes in one publish request.
    pub max_request_bytes: usize,
    /// How often to look for rows when no wake-up arrives (the table is the truth).
    pub poll_interval: Duration,
    /// Retries and parking of rows the broker refuses.
    pub retry: RetryPolicy,
    /// How often the cleaner runs (`None`: never, e.g. when another process cleans).
    pub clean_interval: Option<Duration>,
    /// How long sent rows are kept before the cleaner deletes them.
    pub retention: Duration,
    /// Rows deleted per cleaner transaction.
    pub clean_batch: usize,
}

impl Default for RelayConfig {
    /// Batches of 1000 rows, 2 workers, requests of up to 1000 rows or 4 MiB, a poll every
    /// second, cleaning every 10 s of rows sent more than 10 minutes ago, 1000 per batch.
    fn default() -> Self {
        RelayConfig {
            batch_size: 1000,
            workers: 2,
            max_request_messages: 1000,
            max_request_bytes: 4 * 1024 * 1024,
            poll_interval: Duration::from_secs(1),
            retry: RetryPolicy::default(),
            clean_interval: Some(Duration::from_secs(10)),
            retention: Duration::from_secs(600),
            clean_batch: 1000,
        }
    }
}

/// Counters of a running relay (since it started).
#[derive(Debug, Default)]
pub struct RelayMetrics {
    /// Rows published and marked sent.
    pub published: AtomicU64,
    /// Rows the broker refused (each failed attempt).
    pub row_failures: AtomicU64,
    /// Rows parked.
    pub parked: AtomicU64,
    /// Claim rounds that published something.
    pub rounds: AtomicU64,
    /// Rounds abandoned because of a transient error (broker or store unreachable).
    pub transient_errors: AtomicU64,
    /// Sent rows deleted by the cleaner.
    pub cleaned: AtomicU64,
    /// Milliseconds from a row's creation to its publication, for the last published row.
    pub last_lag_ms: AtomicU64,
}

/// A snapshot of [`RelayMetrics`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RelayCounters {
    /// Rows published and marked sent.
    pub published: u64,
    /// Rows the broker refused (each failed attempt).
    pub row_failures: u64,
    /// Rows parked.
    pub parked: u64,
    /// Claim rounds that published something.
    pub rounds: u64,
    /// Rounds abandoned because of a transient error.
    pub transient_errors: u64,
    /// Sent rows deleted by the cleaner.
    pub cleaned: u64,
    /// Creation-to-publication time of the last published row, in milliseconds.
    pub last_lag_ms: u64,
}

impl RelayMetrics {
    /// The current values.
    pub fn snapshot(&self) -> RelayCounters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RelayCounters {
            published: get(&self.published),
            row_failures: get(&self.row_failures),
            parked: get(&self.parked),
            rounds: get(&self.rounds),
            transient_errors: get(&self.transient_errors),
            cleaned: get(&self.cleaned),
            last_lag_ms: get(&self.last_lag_ms),
        }
    }
}

/// Publishes an outbox store's pending rows to the broker.
#[derive(Debug)]
pub struct Relay<S> {
    store: Arc<S>,
    producer: Producer,
    config: RelayConfig,
    metrics: Arc<RelayMetrics>,
}

impl<S: RelayStore> Relay<S> {
    /// Connects a producer with `dedupe_by_id` (required: re-sent rows must be stored once).
    pub async fn connect(
        store: S,
        client: ClientConfig,
        config: RelayConfig,
    ) -> Result<Relay<S>, OutboxError> {
        let mut producer = ProducerConfig::new(client);
        producer.dedupe_by_id = true;
        let producer = Producer::connect(producer).await?;
        Ok(Relay::new(Arc::new(store), producer, config))
    }

    /// A relay on an existing producer, which must have been made with `dedupe_by_id`.
    pub fn new(store: Arc<S>, producer: Producer, config: RelayConfig) -> Relay<S> {
        Relay {
            store,
            producer,
            config,
            metrics: Arc::default(),
        }
    }

    /// The relay's counters (shared; they keep counting while it runs).
    pub fn metrics(&self) -> Arc<RelayMetrics> {
        self.metrics.clone()
    }

    /// The store.
    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    /// Runs workers, the wake-up listener and the cleaner until `shutdown` completes.
    /// A claim in flight at shutdown is abandoned: its rows stay pending.
    pub async fn run(self, shutdown: impl Future<Output = impl Sized>) -> Result<(), OutboxError> {
        let (wake_tx, wake_rx) = watch::channel(0u64);
        let mut tasks = JoinSet::new();
        {
            let store = self.store.clone();
            tasks.spawn(async move { store.listen(wake_tx).await });
        }
        for worker in 0..self.config.workers.max(1) {
            let w = Worker {
                store: self.store.clone(),
                producer: self.producer.clone(),
                config: self.config.clone(),
                metrics: self.metrics.clone(),
                wake: wake_rx.clone(),
            };
            tasks.spawn(async move { w.run(worker).await });
        }
        if let Some(every) = self.config.clean_interval {
            let store = self.store.clone();
            let metrics = self.metrics.clone();
            let (retention, batch) = (self.config.retention, self.config.clean_batch);
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    match store.clean(retention, batch).await {
                        Ok(n) => {
                            metrics.cleaned.fetch_add(n, Ordering::Relaxed);
                        }
                        Err(e) => tracing::warn!(error = %e, "cleaning sent outbox rows"),
                    }
                }
            });
        }
        shutdown.await;
        tasks.shutdown().await;
        Ok(())
    }
}

struct Worker<S: RelayStore> {
    store: Arc<S>,
    producer: Producer,
    config: RelayConfig,
    metrics: Arc<RelayMetrics>,
    wake: watch::Receiver<u64>,
}

/// What one round did.
enum Round {
    /// Nothing was due.
    Idle,
    /// Rows were claimed but all wait for an older row of their key elsewhere.
    Blocked,
    /// Rows were published (or failed permanently).
    Progress,
    /// The broker was unreachable; nothing changed.
    Transient,
}

impl<S: RelayStore> Worker<S> {
    async fn run(mut self, index: usize) {
        let mut session: Option<S::Worker> = None;
        let mut backoff = Duration::from_millis(50);
        let mut blocked_wait = Duration::from_millis(5);
        loop {
            self.wake.borrow_and_update();
            let worker = match &mut session {
                Some(w) => w,
                None => match self.store.open_worker().await {
                    Ok(w) => session.insert(w),
                    Err(e) => {
                        tracing::warn!(worker = index, error = %e, "opening outbox store session");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                },
            };
            match self.round(worker).await {
                Ok(Round::Progress) => {
                    backoff = Duration::from_millis(50);
                    blocked_wait = Duration::from_millis(5);
                }
                Ok(Round::Idle) => self.idle(self.config.poll_interval).await,
                Ok(Round::Blocked) => {
                    // Another claim holds the oldest rows of these keys; it usually ends soon.
                    self.idle(blocked_wait).await;
                    blocked_wait = (blocked_wait * 2).min(self.config.poll_interval);
                }
                Ok(Round::Transient) => {
                    self.metrics
                        .transient_errors
                        .fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    tracing::warn!(worker = index, error = %e, "outbox store failed; reconnecting");
                    self.metrics
                        .transient_errors
                        .fetch_add(1, Ordering::Relaxed);
                    session = None;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn idle(&mut self, at_most: Duration) {
        let _ = tokio::time::timeout(at_most, self.wake.changed()).await;
    }

    async fn round(&self, worker: &mut S::Worker) -> Result<Round, OutboxError> {
        let limit = self.config.batch_size.clamp(1, MAX_BATCH_MESSAGES);
        let claimed = match worker.claim(limit).await {
            Ok(c) => c,
            Err(e) => {
                let _ = worker.release().await;
                return Err(e);
            }
        };
        if claimed.rows.is_empty() {
            worker.release().await?;
            return Ok(if claimed.held.is_empty() {
                Round::Idle
            } else {
                Round::Blocked
            });
        }
        let (requests, _held) = core::pack(
            claimed.rows,
            self.config
                .max_request_messages
                .clamp(1, MAX_BATCH_MESSAGES),
            self.config.max_request_bytes,
        );
        let mut publishing = JoinSet::new();
        for request in requests {
            let producer = self.producer.clone();
            publishing.spawn(async move { publish(&producer, request).await });
        }
        let mut outcome = Outcome::default();
        while let Some(done) = publishing.join_next().await {
            match done {
                Ok(o) => outcome.merge(o),
                Err(e) => {
                    // A publish task panicked: treat its rows as unpublished.
                    tracing::error!(error = %e, "publish task failed");
                    outcome.transient = true;
                }
            }
        }
        let failures: Vec<RowFailure> = outcome
            .refused
            .iter()
            .map(|(row, error)| {
                let attempts = row.attempts.saturating_add(1);
                let retry_in = match self.config.retry.after_failure(attempts) {
                    Failed::RetryIn(d) => Some(d),
                    Failed::Park => None,
                };
                RowFailure {
                    id: row.id,
                    attempts,
                    error: error.clone(),
                    retry_in,
                }
            })
            .collect();
        let sent: Vec<u64> = outcome.sent.iter().map(|(id, _)| *id).collect();
        if sent.is_empty() && failures.is_empty() {
            worker.release().await?;
            return Ok(Round::Transient);
        }
        worker.finish(&sent, &failures).await?;
        let now = crate::now_ms();
        if let Some(created) = outcome.sent.iter().map(|(_, c)| *c).max() {
            self.metrics
                .last_lag_ms
                .store(now.saturating_sub(created), Ordering::Relaxed);
        }
        self.metrics
            .published
            .fetch_add(sent.len() as u64, Ordering::Relaxed);
        self.metrics
            .row_failures
            .fetch_add(failures.len() as u64, Ordering::Relaxed);
        let parked = failures.iter().filter(|f| f.retry_in.is_none()).count() as u64;
        self.metrics.parked.fetch_add(parked, Ordering::Relaxed);
        self.metrics.rounds.fetch_add(1, Ordering::Relaxed);
        if outcome.transient {
            return Ok(Round::Transient);
        }
        Ok(Round::Progress)
    }
}

/// What happened to the rows of one or more requests.
#[derive(Debug, Default)]
struct Outcome {
    /// (row id, created_at_ms) of rows the broker stored.
    sent: Vec<(u64, u64)>,
    /// Rows the broker refused, with the error.
    refused: Vec<(OutboxRow, String)>,
    /// Some rows were not published for a transient reason (they stay pending).
    transient: bool,
}

impl Outcome {
    fn merge(&mut self, other: Outcome) {
        self.sent.extend(other.sent);
        self.refused.extend(other.refused);
        self.transient |= other.transient;
    }
}

fn to_message(row: &OutboxRow) -> Message {
    Message {
        id: row.message_id.clone(),
        key: row.key.clone(),
        headers: row.headers.clone(),
        body: row.body.clone(),
        born_at_ms: row.created_at_ms,
        ..Message::default()
    }
}

/// Publishes one request; when the broker refuses it, finds the refused rows one by one.
async fn publish(producer: &Producer, request: PublishRequest) -> Outcome {
    let messages: Vec<Message> = request.rows.iter().map(to_message).collect();
    let mut outcome = Outcome::default();
    match producer.send_batch(&request.topic, messages).await {
        Ok(_) => {
            outcome.sent = request
                .rows
                .iter()
                .map(|r| (r.id, r.created_at_ms))
                .collect();
            return outcome;
        }
        Err(e) if classify(e.code()) == ErrorKind::Transient => {
            tracing::debug!(error = %e, topic = %request.topic, "publish failed; will retry");
            outcome.transient = true;
            return outcome;
        }
        Err(e) if request.rows.len() == 1 => {
            outcome.refused = request
                .rows
                .into_iter()
                .map(|r| (r, describe(&e)))
                .collect();
            return outcome;
        }
        Err(_) => {}
    }
    // One row (or all) is refused: send them singly, in order, so the others still go.
    // After a key's row fails, its later rows wait (left pending, untouched).
    let mut failed_keys: Vec<String> = Vec::new();
    for row in request.rows {
        if let Some(key) = &row.key {
            if failed_keys.contains(key) {
                continue;
            }
        }
        match producer
            .send_batch(&request.topic, vec![to_message(&row)])
            .await
        {
            Ok(_) => outcome.sent.push((row.id, row.created_at_ms)),
            Err(e) if classify(e.code()) == ErrorKind::Transient => {
                outcome.transient = true;
                return outcome;
            }
            Err(e) => {
                if let Some(key) = &row.key {
                    failed_keys.push(key.clone());
                }
                outcome.refused.push((row, describe(&e)));
            }
        }
    }
    outcome
}

fn describe(e: &ProducerError) -> String {
    match e.code() {
        Some(code) => format!("{} ({}): {e}", code.name(), code.0),
        None => e.to_string(),
    }
}
