//! Three `escrow serve` processes on loopback; the leader is killed with SIGKILL while a
//! producer publishes with a window of 64. Nothing acknowledged is lost or duplicated,
//! and the restarted node catches up (as `escrow cluster status` shows).

use escrow_client::Client;
use escrow_consumer::Consumer;
use escrow_producer::{Producer, ProducerConfig};
use escrow_proto::{CreateTopic, Message, Request};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

mod common;
use common::{cli, client_config, wait_until, ProcessCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_sigkill_loses_nothing_acknowledged() -> anyhow::Result<()> {
    let mut cluster = ProcessCluster::start(3, "").await?;
    let (seeds, ca) = (cluster.seeds.clone(), cluster.ca.clone());
    let ca_arg = ca.display().to_string();
    let client = Client::connect(client_config(&seeds, &ca)).await?;
    client
        .request(&Request::CreateTopic(CreateTopic {
            topic: "orders".into(),
            queues: 4,
        }))
        .await?;
    let mut config = ProducerConfig::new(client_config(&seeds, &ca));
    config.window = 64;
    let producer = Producer::connect(config).await?;
    let acked: Arc<Mutex<BTreeSet<String>>> = Default::default();
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (acked, stop) = (acked.clone(), stop.clone());
        tokio::spawn(async move {
            let mut waits = tokio::task::JoinSet::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("order-{i}");
                i += 1;
                let Ok(p) = producer
                    .send_async("orders", Message::new(id.clone(), id.clone().into_bytes()))
                    .await
                else {
                    break;
                };
                let acked = acked.clone();
                waits.spawn(async move {
                    if p.wait().await.is_ok() {
                        acked.lock().map(|mut a| a.insert(id)).ok();
                    }
                });
                while waits.try_join_next().is_some() {}
            }
            while waits.join_next().await.is_some() {}
        })
    };
    let count = || acked.lock().map(|a| a.len()).unwrap_or(0);
    wait_until("1500 acks", || async { count() >= 1500 }).await?;

    let victim = cluster.leader_index().await.unwrap_or(0);
    let leader = cluster.nodes[victim].id;
    cluster.nodes[victim].kill()?;
    let before = count();
    wait_until("1500 more acks after the kill", || async {
        count() >= before + 1500
    })
    .await?;
    stop.store(true, Ordering::Relaxed);
    publisher.await?;

    cluster.nodes[victim].spawn()?;
    let addrs: Vec<String> = cluster.nodes.iter().map(|n| n.client.clone()).collect();
    let mut last = String::new();
    wait_until("the restarted node to catch up", || {
        let out = cli(&[
            "--server", &seeds, "--ca", &ca_arg, "cluster", "status", "--json",
        ]);
        last = format!("{out:?}");
        let caught_up = out.ok().is_some_and(|text| {
            let rows: Vec<serde_json::Value> = text
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            let applied: BTreeSet<u64> =
                rows.iter().filter_map(|r| r["applied"].as_u64()).collect();
            rows.len() == 3 && applied.len() == 1 && rows.iter().all(|r| r.get("error").is_none())
        });
        async move { caught_up }
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}; last status: {last}"))?;
    eprintln!(
        "{}",
        cli(&["--server", &seeds, "--ca", &ca_arg, "cluster", "status"])?
    );

    let consumer = Consumer::connect(&client_config(&seeds, &ca), "audit", "orders").await?;
    let stored = common::drain_unique_ids(&consumer).await?;
    let acked = acked.lock().map(|a| a.clone()).unwrap_or_default();
    let lost: Vec<_> = acked.difference(&stored).take(5).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged messages lost, e.g. {lost:?}",
        acked.difference(&stored).count()
    );
    eprintln!(
        "killed node {leader}; {} acknowledged, {} stored, none lost or duplicated; nodes {addrs:?}",
        acked.len(),
        stored.len()
    );
    Ok(())
}
