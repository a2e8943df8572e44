//! Transactional publishing: half message + commit per message, many in flight.

use crate::report::{histogram, progress, Report, Totals};
use crate::scenarios::{broker_fsyncs, ensure_topic};
use anyhow::Context;
use clap::Args;
use escrow_client::{Client, ClientConfig};
use escrow_producer::txn::{TransactionChecker, TransactionalProducer};
use escrow_proto::txn::{TxnCheck, TxnDecision};
use escrow_proto::Message;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Debug, Args)]
pub(crate) struct TxnArgs {
    /// Topic (created if missing).
    #[arg(long, default_value = "bench-txn")]
    topic: String,
    /// Queues of the topic when it is created.
    #[arg(long, default_value_t = 4)]
    queues: u32,
    /// Body size in bytes.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Transactions in total.
    #[arg(long, default_value_t = 50_000)]
    count: u64,
    /// Transactions in flight at once (each: send half, then commit).
    #[arg(long, default_value_t = 256)]
    window: u64,
}

/// The bench commits everything itself; a check-back would mean a lost commit.
struct CommitAll;

impl TransactionChecker for CommitAll {
    async fn check(&self, _check: &TxnCheck) -> TxnDecision {
        TxnDecision::Commit
    }
}

pub(crate) async fn txn(client: &ClientConfig, args: TxnArgs) -> anyhow::Result<Report> {
    let admin = Client::connect(client.clone())
        .await
        .with_context(|| format!("connecting to {}", client.server))?;
    ensure_topic(&admin, &args.topic, args.queues).await?;
    let producer =
        Arc::new(TransactionalProducer::connect(client.clone(), "bench", CommitAll).await?);
    let fsyncs_before = broker_fsyncs(&admin).await?;
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let latency = Arc::new(Mutex::new(histogram()));
    let ticker = progress("txn", done.clone(), args.count);
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.window.max(1) {
        let (producer, next, done, errors, latency) = (
            producer.clone(),
            next.clone(),
            done.clone(),
            errors.clone(),
            latency.clone(),
        );
        let (topic, size, count) = (args.topic.clone(), args.size, args.count);
        workers.push(tokio::spawn(async move {
            while next.fetch_add(1, Relaxed) < count {
                let t = Instant::now();
                let outcome = async {
                    let half = producer
                        .send_half(&topic, Message::new("", vec![0u8; size]))
                        .await?;
                    half.commit().await
                }
                .await;
                match outcome {
                    Ok(_) => {
                        done.fetch_add(1, Relaxed);
                        if let Ok(mut h) = latency.lock() {
                            let _ = h.record((t.elapsed().as_micros() as u64).max(1));
                        }
                    }
                    Err(_) => {
                        errors.fetch_add(1, Relaxed);
                    }
                }
            }
        }));
    }
    for w in workers {
        w.await?;
    }
    let elapsed = started.elapsed();
    ticker.abort();
    let fsyncs = broker_fsyncs(&admin).await? - fsyncs_before;
    let messages = done.load(Relaxed);
    let latency = latency
        .lock()
        .map(|h| h.clone())
        .unwrap_or_else(|_| histogram());
    Ok(Report::new(
        "txn",
        serde_json::json!({
            "count": args.count, "window": args.window, "size": args.size,
            "server": client.server,
        }),
        Totals {
            messages,
            bytes: messages * args.size as u64,
            elapsed,
            fsyncs,
            errors: errors.load(Relaxed),
        },
        &latency,
    ))
}
