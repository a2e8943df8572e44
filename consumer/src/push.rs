//! The push consumer: a handler run on every message with bounded concurrency.
//!
//! Success acks the message; an error nacks it for a retry after the broker's backoff.
//! Leases of long-running handlers are extended in the background. Stopping finishes
//! in-flight handlers within a grace period and gives the rest back at once.

use crate::{Consumer, ConsumerError};
use escrow_proto::{Delivery, ReceiptHandle};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Settings of [`Consumer::run`].
#[derive(Clone, Copy, Debug)]
pub struct PushOptions {
    /// Handlers running at once (and messages leased but not yet handled, at most).
    pub concurrency: usize,
    /// Lease time of each message; extended while its handler runs.
    pub invisible_for: Duration,
    /// Long-poll wait of each receive.
    pub wait: Duration,
    /// How long a stop waits for running handlers before giving their messages back.
    pub shutdown_grace: Duration,
}

impl Default for PushOptions {
    fn default() -> Self {
        PushOptions {
            concurrency: 16,
            invisible_for: Duration::from_secs(30),
            wait: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// What a [`Consumer::run`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PushStats {
    /// Messages handled and acked.
    pub acked: u64,
    /// Messages whose handler failed (nacked for a retry).
    pub failed: u64,
    /// Messages given back unhandled at shutdown.
    pub released: u64,
}

#[derive(Default)]
struct Counters {
    acked: AtomicU64,
    failed: AtomicU64,
}

impl Consumer {
    /// Runs `handler` on every message until `stop` completes, at most
    /// `options.concurrency` at once. `Ok` acks the message; `Err` nacks it for a retry
    /// with the broker's backoff (after `max_deliveries` it goes to the dead-letter topic).
    pub async fn run<H, Fut, E>(
        &self,
        options: PushOptions,
        handler: H,
        stop: impl Future<Output = ()>,
    ) -> Result<PushStats, ConsumerError>
    where
        H: Fn(Delivery) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        let concurrency = options.concurrency.max(1);
        let slots = Arc::new(Semaphore::new(concurrency));
        let running: Arc<Mutex<HashMap<ReceiptHandle, ()>>> = Arc::default();
        let counters = Arc::new(Counters::default());
        let (acks, ack_rx) = tokio::sync::mpsc::unbounded_channel();
        let acker = tokio::spawn(ack_in_batches(self.clone(), ack_rx, counters.clone()));
        let mut tasks = JoinSet::new();
        tokio::pin!(stop);
        let outcome = loop {
            // Lease only as many messages as there are free handler slots.
            let free = tokio::select! {
                _ = &mut stop => break Ok(()),
                permit = slots.clone().acquire_many_owned(1) => match permit {
                    Ok(p) => p,
                    Err(_) => break Ok(()),
                },
            };
            drop(free);
            let room = slots.available_permits().max(1) as u32;
            let batch = tokio::select! {
                _ = &mut stop => break Ok(()),
                batch = self.receive(room, options.invisible_for, options.wait) => batch,
            };
            let batch = match batch {
                Ok(b) => b,
                Err(e) if e.is_retryable() => {
                    tracing::warn!(error = %e, "receive failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                Err(e) => break Err(e),
            };
            for delivery in batch {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    break;
                };
                let receipt = delivery.receipt;
                running
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(receipt, ());
                let consumer = self.clone();
                let handler = handler.clone();
                let running = running.clone();
                let counters = counters.clone();
                let acks = acks.clone();
                tasks.spawn(async move {
                    let _permit = permit;
                    consumer
                        .handle_one(delivery, handler, options.invisible_for, &counters, &acks)
                        .await;
                    running
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&receipt);
                });
            }
            while tasks.try_join_next().is_some() {}
        };
        // Graceful stop: let running handlers finish, then give back what is left.
        let _ = tokio::time::timeout(options.shutdown_grace, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        tasks.shutdown().await;
        drop(acks);
        if let Err(e) = acker.await {
            tracing::warn!(error = %e, "ack task failed");
        }
        let left: Vec<ReceiptHandle> = running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(r, _)| r)
            .collect();
        let mut released = 0;
        if !left.is_empty() {
            match self.nack(&left, Duration::ZERO).await {
                Ok(r) => released = u64::from(r.applied),
                Err(e) => {
                    tracing::warn!(error = %e, "giving back unfinished messages failed; they reappear after their lease")
                }
            }
        }
        outcome.map(|()| PushStats {
            acked: counters.acked.load(Relaxed),
            failed: counters.failed.load(Relaxed),
            released,
        })
    }

    async fn handle_one<H, Fut, E>(
        &self,
        delivery: Delivery,
        handler: H,
        invisible_for: Duration,
        counters: &Counters,
        acks: &tokio::sync::mpsc::UnboundedSender<ReceiptHandle>,
    ) where
        H: Fn(Delivery) -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: std::fmt::Display,
    {
        let receipt = delivery.receipt;
        let work = handler(delivery);
        tokio::pin!(work);
        // Extend the lease at half its length while the handler runs.
        let period = (invisible_for / 2).max(Duration::from_millis(50));
        let mut extend = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        let result = loop {
            tokio::select! {
                result = &mut work => break result,
                _ = extend.tick() => {
                    if let Err(e) = self.change_invisibility(receipt, invisible_for).await {
                        tracing::warn!(error = %e, ?receipt, "lease extension failed");
                    }
                }
            }
        };
        match result {
            Ok(()) => {
                if acks.send(receipt).is_err() {
                    tracing::warn!(?receipt, "ack task gone; the message will be redelivered");
                }
            }
            Err(e) => {
                counters.failed.fetch_add(1, Relaxed);
                tracing::warn!(error = %e, ?receipt, "handler failed; retrying after backoff");
                if let Err(e) = self.nack_with_backoff(&[receipt]).await {
                    tracing::warn!(error = %e, "nack failed; the message reappears after its lease");
                }
            }
        }
    }
}

/// Most receipts in one ack request.
const MAX_ACK_BATCH: usize = 1024;

/// Sends the receipts of finished handlers as few ack requests: everything that queued up
/// while the previous request was in flight goes in the next one.
async fn ack_in_batches(
    consumer: Consumer,
    mut receipts: tokio::sync::mpsc::UnboundedReceiver<ReceiptHandle>,
    counters: Arc<Counters>,
) {
    let mut batch = Vec::new();
    while let Some(first) = receipts.recv().await {
        batch.push(first);
        while batch.len() < MAX_ACK_BATCH {
            match receipts.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        match consumer.ack(&batch).await {
            Ok(r) => {
                counters.acked.fetch_add(u64::from(r.applied), Relaxed);
                if !r.rejected.is_empty() {
                    tracing::warn!(
                        rejected = r.rejected.len(),
                        "acks refused; those messages will be redelivered"
                    );
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, count = batch.len(), "ack failed; the messages will be redelivered")
            }
        }
        batch.clear();
    }
}
