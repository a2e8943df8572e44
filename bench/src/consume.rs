//! Live end-to-end scenario: a producer publishes at a steady rate while push consumers
//! handle the messages; latency is publish call → handler start, measured on one clock.

use crate::report::{histogram, progress, Latency, Report, Totals};
use crate::scenarios::{broker_fsyncs, ensure_topic};
use anyhow::Context;
use clap::Args;
use escrow_client::{Client, ClientConfig};
use escrow_consumer::{Consumer, PushOptions};
use escrow_producer::{Producer, ProducerConfig};
use escrow_proto::Message;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Args)]
pub(crate) struct ConsumeArgs {
    /// Topic (created if missing; use a fresh one per run).
    #[arg(long, default_value = "bench-e2e")]
    topic: String,
    /// Queues of the topic when it is created.
    #[arg(long, default_value_t = 4)]
    queues: u32,
    /// Consumer group.
    #[arg(long, default_value = "bench-e2e")]
    group: String,
    /// Body size in bytes (at least 8: the send time travels in the body).
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Messages to publish and handle.
    #[arg(long, default_value_t = 50_000)]
    count: u64,
    /// Publish rate in messages per second (0: as fast as the window allows).
    #[arg(long, default_value_t = 5_000)]
    rate: u64,
    /// Push consumers, each with its own connection.
    #[arg(long, default_value_t = 1)]
    consumers: usize,
    /// Handlers running at once per consumer.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
}

pub(crate) async fn consume(client: &ClientConfig, args: ConsumeArgs) -> anyhow::Result<Report> {
    let admin = Client::connect(client.clone())
        .await
        .with_context(|| format!("connecting to {}", client.server))?;
    ensure_topic(&admin, &args.topic, args.queues).await?;
    let fsyncs_before = broker_fsyncs(&admin).await?;
    let clock = Instant::now();
    let handled = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let e2e = Arc::new(Mutex::new(histogram()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut consumers = Vec::new();
    for _ in 0..args.consumers.max(1) {
        let consumer = Consumer::connect(client, &args.group, &args.topic).await?;
        let (handled, bytes, e2e) = (handled.clone(), bytes.clone(), e2e.clone());
        let mut stop = stop_rx.clone();
        let options = PushOptions {
            concurrency: args.concurrency.max(1),
            wait: Duration::from_secs(1),
            ..PushOptions::default()
        };
        consumers.push(tokio::spawn(async move {
            let handler = move |d: escrow_proto::Delivery| {
                let (handled, bytes, e2e) = (handled.clone(), bytes.clone(), e2e.clone());
                async move {
                    let sent_us = d
                        .message
                        .body
                        .get(..8)
                        .and_then(|b| b.try_into().ok())
                        .map_or(0, u64::from_le_bytes);
                    let now_us = clock.elapsed().as_micros() as u64;
                    if let Ok(mut h) = e2e.lock() {
                        let _ = h.record(now_us.saturating_sub(sent_us).max(1));
                    }
                    handled.fetch_add(1, Relaxed);
                    bytes.fetch_add(d.message.body.len() as u64, Relaxed);
                    Ok::<(), std::convert::Infallible>(())
                }
            };
            consumer
                .run(options, handler, async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
        }));
    }

    let producer = Producer::connect(ProducerConfig::new(client.clone())).await?;
    let ticker = progress("handled", handled.clone(), args.count);
    let started = Instant::now();
    let publisher = tokio::spawn({
        let (count, rate, size, topic) =
            (args.count, args.rate, args.size.max(8), args.topic.clone());
        async move {
            let mut waits = tokio::task::JoinSet::new();
            for i in 0..count {
                if rate > 0 {
                    let due = started + Duration::from_secs_f64(i as f64 / rate as f64);
                    tokio::time::sleep_until(due.into()).await;
                }
                let mut body = vec![0u8; size];
                body[..8].copy_from_slice(&(clock.elapsed().as_micros() as u64).to_le_bytes());
                let pending = producer.send_async(&topic, Message::new("", body)).await?;
                waits.spawn(pending.wait());
                while waits.try_join_next().is_some() {}
            }
            while let Some(r) = waits.join_next().await {
                r??;
            }
            anyhow::Ok(())
        }
    });
    let deadline = Instant::now() + Duration::from_secs(600);
    while handled.load(Relaxed) < args.count && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = started.elapsed();
    ticker.abort();
    publisher.await??;
    stop_tx.send_replace(true);
    for c in consumers {
        c.await??;
    }
    let fsyncs = broker_fsyncs(&admin).await? - fsyncs_before;
    let e2e = e2e
        .lock()
        .map(|h| h.clone())
        .unwrap_or_else(|_| histogram());
    let mut report = Report::new(
        "consume",
        serde_json::json!({
            "consumers": args.consumers, "concurrency": args.concurrency, "count": args.count,
            "rate": args.rate, "size": args.size, "server": client.server,
        }),
        Totals {
            messages: handled.load(Relaxed),
            bytes: bytes.load(Relaxed),
            elapsed,
            fsyncs,
            errors: 0,
        },
        &e2e,
    );
    report.end_to_end = Some(Latency::of(&e2e));
    Ok(report)
}
