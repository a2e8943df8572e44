//! Three `escrow serve` processes; the leader is killed with SIGKILL while a consumer
//! group drains a topic. No message whose ack was confirmed is delivered again, every
//! message ends acked, and only messages in flight at the kill are redelivered.

use escrow_client::Client;
use escrow_consumer::Consumer;
use escrow_producer::{Producer, ProducerConfig};
use escrow_proto::{CreateTopic, Message, Request};
use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

mod common;
use common::ProcessCluster;

const MESSAGES: usize = 3000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_sigkill_during_consumption_redelivers_only_in_flight() -> anyhow::Result<()> {
    let mut cluster = ProcessCluster::start(3, "").await?;
    let client = Client::connect(cluster.client()).await?;
    client
        .request(&Request::CreateTopic(CreateTopic {
            topic: "work".into(),
            queues: 4,
        }))
        .await?;
    let producer = Producer::connect(ProducerConfig::new(cluster.client())).await?;
    for chunk in (0..MESSAGES).collect::<Vec<_>>().chunks(500) {
        let batch = chunk
            .iter()
            .map(|i| Message::new(format!("job-{i}"), vec![0u8; 64]))
            .collect();
        producer.send_batch("work", batch).await?;
    }

    let consumer = Consumer::connect(&cluster.client(), "workers", "work").await?;
    let mut confirmed: BTreeSet<String> = BTreeSet::new();
    let mut ack_in_doubt: BTreeSet<String> = BTreeSet::new();
    let mut deliveries: HashMap<String, u32> = HashMap::new();
    let mut killed = None;
    let mut in_flight_at_kill: BTreeSet<String> = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while confirmed.len() < MESSAGES {
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} of {MESSAGES} acked in time",
            confirmed.len()
        );
        let batch = match consumer
            .receive(100, Duration::from_secs(60), Duration::from_millis(500))
            .await
        {
            Ok(b) => b,
            Err(e) if e.is_retryable() => continue,
            Err(e) => return Err(e.into()),
        };
        for d in &batch {
            assert!(
                !confirmed.contains(&d.message.id),
                "{} delivered again after its ack was confirmed",
                d.message.id
            );
            *deliveries.entry(d.message.id.clone()).or_default() += 1;
        }
        let receipts: Vec<_> = batch.iter().map(|d| d.receipt).collect();
        if receipts.is_empty() {
            continue;
        }
        if killed.is_none() && confirmed.len() >= MESSAGES / 3 {
            // Kill the leader while this batch is leased and unacked: it is in flight.
            let victim = cluster.leader_index().await.unwrap_or(0);
            cluster.nodes[victim].kill()?;
            killed = Some(cluster.nodes[victim].id);
            in_flight_at_kill.extend(batch.into_iter().map(|d| d.message.id));
            continue;
        }
        match consumer.ack(&receipts).await {
            Ok(result) => {
                let rejected: std::collections::HashSet<_> =
                    result.rejected.iter().map(|(r, _)| *r).collect();
                for d in batch {
                    if !rejected.contains(&d.receipt) {
                        confirmed.insert(d.message.id);
                    }
                }
            }
            // The ack may or may not have committed: these are the in-flight window.
            Err(_) => {
                ack_in_doubt.extend(batch.into_iter().map(|d| d.message.id));
            }
        }
    }
    let killed = killed.ok_or_else(|| anyhow::anyhow!("the leader was never killed"))?;
    let redelivered: BTreeSet<String> = deliveries
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(
        confirmed.len(),
        MESSAGES,
        "every message acked once confirmed"
    );
    assert!(
        in_flight_at_kill.is_subset(&redelivered),
        "messages leased but unacked at the kill come back"
    );
    let unexpected: Vec<_> = redelivered
        .difference(&in_flight_at_kill)
        .filter(|id| !ack_in_doubt.contains(*id))
        .collect();
    assert!(
        unexpected.is_empty(),
        "redelivered though neither in flight at the kill nor with an ack in doubt: {unexpected:?}"
    );
    let redelivered = redelivered.len();
    eprintln!(
        "killed node {killed}; {MESSAGES} acked, {redelivered} redelivered (in flight at the kill)"
    );
    Ok(())
}
