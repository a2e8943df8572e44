//! The scenarios.

use crate::report::{histogram, progress, Latency, Report, Totals};
use anyhow::Context;
use clap::Args;
use escrow_client::{unexpected, Client, ClientConfig};
use escrow_consumer::Consumer;
use escrow_producer::{Producer, ProducerConfig};
use escrow_proto::{CreateTopic, ErrorCode, Message, Request, Response};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How much is published: body size, message count and window.
#[derive(Debug, Args)]
pub(crate) struct Load {
    /// Body size in bytes.
    #[arg(long, default_value_t = 1024)]
    pub(crate) size: usize,
    /// Messages to publish in total.
    #[arg(long, default_value_t = 100_000)]
    pub(crate) count: u64,
    /// Messages sent and not yet acknowledged at once, per producer (1 = one at a time).
    #[arg(long, default_value_t = 256)]
    pub(crate) window: usize,
}

#[derive(Debug, Args)]
pub(crate) struct PublishArgs {
    /// Topic (created if missing).
    #[arg(long, default_value = "bench")]
    topic: String,
    /// Queues of the topic when it is created.
    #[arg(long, default_value_t = 4)]
    queues: u32,
    #[command(flatten)]
    load: Load,
    /// Producers, each with its own connection.
    #[arg(long, default_value_t = 1)]
    producers: u64,
    /// Messages published first and not measured.
    #[arg(long, default_value_t = 1000)]
    warmup: u64,
    /// Publish requests in flight per producer (sends queued meanwhile form the next batch).
    #[arg(long, default_value_t = 4)]
    requests_in_flight: usize,
}

#[derive(Debug, Args)]
pub(crate) struct DrainArgs {
    /// Topic to drain.
    #[arg(long, default_value = "bench")]
    topic: String,
    /// Consumer group (a new group reads from the start).
    #[arg(long, default_value = "bench-drain")]
    group: String,
    /// Consumers, each with its own connection.
    #[arg(long, default_value_t = 1)]
    consumers: u64,
    /// Stop after this many messages (or when the topic runs dry).
    #[arg(long, default_value_t = 100_000)]
    count: u64,
    /// Messages per receive.
    #[arg(long, default_value_t = 256)]
    batch: u32,
}

pub(crate) async fn broker_fsyncs(conn: &Client) -> anyhow::Result<u64> {
    match conn.request(&Request::Stats).await? {
        Response::Stats(s) => Ok(s.fsyncs),
        other => Err(unexpected("stats", &other).into()),
    }
}

pub(crate) async fn ensure_topic(conn: &Client, topic: &str, queues: u32) -> anyhow::Result<()> {
    let create = Request::CreateTopic(CreateTopic {
        topic: topic.to_string(),
        queues,
    });
    match conn.request(&create).await {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some(ErrorCode::TOPIC_EXISTS) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

pub(crate) async fn publish(client: &ClientConfig, args: PublishArgs) -> anyhow::Result<Report> {
    let admin = Client::connect(client.clone())
        .await
        .with_context(|| format!("connecting to {}", client.server))?;
    ensure_topic(&admin, &args.topic, args.queues).await?;
    let mut producers = Vec::new();
    for _ in 0..args.producers.max(1) {
        let mut config = ProducerConfig::new(client.clone());
        config.window = args.load.window.max(1);
        config.max_requests_in_flight = args.requests_in_flight.max(1);
        producers.push(Producer::connect(config).await?);
    }
    let body = vec![b'x'; args.load.size];
    if args.warmup > 0 {
        run_publishers(&producers, &args.topic, &body, args.warmup, None).await?;
    }
    let fsyncs_before = broker_fsyncs(&admin).await?;
    let done = Arc::new(AtomicU64::new(0));
    let ticker = progress("publish", done.clone(), args.load.count);
    let started = Instant::now();
    let (latency, errors) = run_publishers(
        &producers,
        &args.topic,
        &body,
        args.load.count,
        Some(done.clone()),
    )
    .await?;
    let elapsed = started.elapsed();
    ticker.abort();
    let fsyncs = broker_fsyncs(&admin).await? - fsyncs_before;
    let ok = args.load.count - errors;
    Ok(Report::new(
        "publish",
        serde_json::json!({
            "size": args.load.size, "count": args.load.count, "window": args.load.window,
            "producers": args.producers, "queues": args.queues, "server": client.server,
            "requests_in_flight": args.requests_in_flight,
        }),
        Totals {
            messages: ok,
            bytes: ok * args.load.size as u64,
            elapsed,
            fsyncs,
            errors,
        },
        &latency,
    ))
}

/// Publishes `count` messages spread over the producers; returns latencies and error count.
async fn run_publishers(
    producers: &[Producer],
    topic: &str,
    body: &[u8],
    count: u64,
    done: Option<Arc<AtomicU64>>,
) -> anyhow::Result<(hdrhistogram::Histogram<u64>, u64)> {
    let latency = Arc::new(Mutex::new(histogram()));
    let errors = Arc::new(AtomicU64::new(0));
    let n = producers.len() as u64;
    let mut tasks = Vec::new();
    for (p, producer) in producers.iter().enumerate() {
        let share = count / n + u64::from((p as u64) < count % n);
        let (producer, topic, body) = (producer.clone(), topic.to_string(), body.to_vec());
        let (latency, errors, done) = (latency.clone(), errors.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut acks = tokio::task::JoinSet::new();
            for _ in 0..share {
                // Latency counts from admission into the window to the durable ack.
                let pending = producer
                    .send_async(&topic, Message::new("", body.clone()))
                    .await;
                let started = Instant::now();
                let (latency, errors, done) = (latency.clone(), errors.clone(), done.clone());
                acks.spawn(async move {
                    let ok = match pending {
                        Ok(p) => p.wait().await.is_ok(),
                        Err(_) => false,
                    };
                    if ok {
                        let us = started.elapsed().as_micros() as u64;
                        if let Ok(mut h) = latency.lock() {
                            let _ = h.record(us.max(1));
                        }
                        if let Some(d) = &done {
                            d.fetch_add(1, Relaxed);
                        }
                    } else {
                        errors.fetch_add(1, Relaxed);
                    }
                });
                while acks.try_join_next().is_some() {}
            }
            while acks.join_next().await.is_some() {}
        }));
    }
    for t in tasks {
        t.await?;
    }
    let h = latency
        .lock()
        .map(|h| h.clone())
        .unwrap_or_else(|_| histogram());
    Ok((h, errors.load(Relaxed)))
}

pub(crate) async fn drain(client: &ClientConfig, args: DrainArgs) -> anyhow::Result<Report> {
    let admin = Client::connect(client.clone())
        .await
        .with_context(|| format!("connecting to {}", client.server))?;
    let fsyncs_before = broker_fsyncs(&admin).await?;
    let done = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let latency = Arc::new(Mutex::new(histogram()));
    let e2e = Arc::new(Mutex::new(histogram()));
    let ticker = progress("drain", done.clone(), args.count);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.consumers.max(1) {
        let consumer = Consumer::connect(client, &args.group, &args.topic).await?;
        let (done, bytes, errors) = (done.clone(), bytes.clone(), errors.clone());
        let (latency, e2e) = (latency.clone(), e2e.clone());
        let (count, batch) = (args.count, args.batch);
        tasks.push(tokio::spawn(async move {
            while done.load(Relaxed) < count {
                let t = Instant::now();
                let got = consumer
                    .receive(batch, Duration::from_secs(60), Duration::from_millis(500))
                    .await;
                let Ok(got) = got else {
                    errors.fetch_add(1, Relaxed);
                    continue;
                };
                if got.is_empty() {
                    break;
                }
                let now = escrow_client::now_ms();
                if let Ok(mut h) = e2e.lock() {
                    for d in &got {
                        let _ = h.record((now.saturating_sub(d.message.born_at_ms) * 1000).max(1));
                    }
                }
                let receipts: Vec<_> = got.iter().map(|d| d.receipt).collect();
                match consumer.ack(&receipts).await {
                    Ok(r) => {
                        done.fetch_add(u64::from(r.applied), Relaxed);
                        let b: usize = got.iter().map(|d| d.message.body.len()).sum();
                        bytes.fetch_add(b as u64, Relaxed);
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
    for t in tasks {
        t.await?;
    }
    let elapsed = started.elapsed();
    ticker.abort();
    let fsyncs = broker_fsyncs(&admin).await? - fsyncs_before;
    let latency = latency
        .lock()
        .map(|h| h.clone())
        .unwrap_or_else(|_| histogram());
    let mut report = Report::new(
        "drain",
        serde_json::json!({
            "consumers": args.consumers, "batch": args.batch, "count": args.count,
            "group": args.group, "server": client.server,
        }),
        Totals {
            messages: done.load(Relaxed),
            bytes: bytes.load(Relaxed),
            elapsed,
            fsyncs,
            errors: errors.load(Relaxed),
        },
        &latency,
    );
    report.end_to_end = e2e.lock().ok().map(|h| Latency::of(&h));
    Ok(report)
}
