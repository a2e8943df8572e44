//! A real `escrow dev` process killed with SIGKILL mid-stream loses no acknowledged message.

use escrow_client::{ClientConfig, Connection, Trust};
use escrow_consumer::Consumer;
use escrow_producer::{Producer, ProducerConfig};
use escrow_proto::{CreateTopic, Message, Request};
use std::collections::BTreeSet;
use std::path::Path;

mod common;
use common::Process;
use std::time::Duration;

/// Starts `escrow dev` on a free loopback port and returns it with its address.
fn spawn_dev(dir: &Path) -> anyhow::Result<(Process, String)> {
    let dir = dir.display().to_string();
    let (child, first) = common::spawn_escrow(&[
        "dev",
        "--listen",
        "127.0.0.1:0",
        "--raft-listen",
        "127.0.0.1:0",
        "--data-dir",
        &dir,
    ])?;
    // "escrow dev: single node listening on 127.0.0.1:PORT (QUIC)"
    let addr = first
        .split_whitespace()
        .find(|w| w.starts_with("127.0.0.1:"))
        .ok_or_else(|| anyhow::anyhow!("no address in {first:?}"))?
        .to_string();
    Ok((child, addr))
}

fn client(addr: &str, dir: &Path) -> ClientConfig {
    let mut c = ClientConfig::new(addr, Trust::CaFile(dir.join("tls").join("ca.pem")));
    c.request_timeout = Duration::from_secs(5);
    c
}

/// Starts `escrow dev` in `dir` and creates the topic "orders" with `queues` queues.
async fn dev_with_orders(dir: &Path, queues: u32) -> anyhow::Result<(Process, String)> {
    let (child, addr) = spawn_dev(dir)?;
    Connection::connect(&client(&addr, dir))
        .await?
        .request(&Request::CreateTopic(CreateTopic {
            topic: "orders".into(),
            queues,
        }))
        .await?;
    Ok((child, addr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_no_acknowledged_message() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (mut child, addr) = dev_with_orders(dir.path(), 4).await?;

    // Publish continuously with a window of 64; kill -9 once 2000 are acknowledged.
    let mut config = ProducerConfig::new(client(&addr, dir.path()));
    config.window = 64;
    let producer = Producer::connect(config).await?;
    let (acked_tx, mut acked_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let publisher = tokio::spawn(async move {
        for i in 0..100_000u64 {
            let id = format!("order-{i}");
            let Ok(pending) = producer
                .send_async("orders", Message::new(id.clone(), id.clone().into_bytes()))
                .await
            else {
                break;
            };
            let tx = acked_tx.clone();
            tokio::spawn(async move {
                if pending.wait().await.is_ok() {
                    let _ = tx.send(id);
                }
            });
        }
    });
    let mut acked = BTreeSet::new();
    while acked.len() < 2000 {
        let id = tokio::time::timeout(Duration::from_secs(30), acked_rx.recv())
            .await?
            .ok_or_else(|| anyhow::anyhow!("publisher stopped"))?;
        acked.insert(id);
    }
    child.kill()?; // SIGKILL
    child.wait()?;
    // Acks already on their way when the process died count too: they were acknowledged.
    tokio::time::sleep(Duration::from_millis(500)).await;
    publisher.abort();
    while let Ok(id) = acked_rx.try_recv() {
        acked.insert(id);
    }

    let (mut child, addr) = spawn_dev(dir.path())?;
    let consumer = Consumer::connect(&client(&addr, dir.path()), "audit", "orders").await?;
    let stored = common::drain_unique_ids(&consumer).await?;
    child.kill()?;
    child.wait()?;
    let lost: Vec<_> = acked.difference(&stored).take(5).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged messages lost, e.g. {lost:?}",
        acked.difference(&stored).count()
    );
    assert!(stored.len() >= acked.len());
    eprintln!(
        "acknowledged {} before/around SIGKILL, {} stored after restart",
        acked.len(),
        stored.len()
    );
    Ok(())
}

/// Answers nothing definite: the test decides every transaction itself.
struct NeverKnows;

impl escrow_producer::txn::TransactionChecker for NeverKnows {
    async fn check(&self, _check: &escrow_proto::txn::TxnCheck) -> escrow_proto::txn::TxnDecision {
        escrow_proto::txn::TxnDecision::Unknown
    }
}

/// Half messages live in the state machine's memory until its next durable commit; a
/// SIGKILL before it must lose none of the acknowledged ones (the log replays them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_keeps_acknowledged_half_messages_pending() -> anyhow::Result<()> {
    use escrow_proto::txn::{EndTxn, TxnDecision, TxnSource, TxnState};
    use escrow_proto::Response;

    let dir = tempfile::tempdir()?;
    let (mut child, addr) = dev_with_orders(dir.path(), 2).await?;
    let producer = escrow_producer::txn::TransactionalProducer::connect(
        client(&addr, dir.path()),
        "shop",
        NeverKnows,
    )
    .await?;
    let mut txn_ids = BTreeSet::new();
    for i in 0..20 {
        if i == 10 {
            // The first ten are made durable by the time-bound durable commit, which
            // the next apply after a second makes; the last ten only by the log.
            tokio::time::sleep(Duration::from_millis(1200)).await;
        }
        let id = format!("order-{i}");
        let txn = producer
            .send_half("orders", Message::new(id.clone(), id.into_bytes()))
            .await?;
        txn_ids.insert(txn.txn_id);
    }
    // At once: well within the state machine's durable-commit interval.
    child.kill()?; // SIGKILL
    child.wait()?;
    drop(producer);

    let (mut child, addr) = spawn_dev(dir.path())?;
    let conn = Connection::connect(&client(&addr, dir.path())).await?;
    let pending: BTreeSet<u64> = match conn.request(&Request::ListTxns { max: 1000 }).await? {
        Response::Txns(list) => list.into_iter().map(|t| t.txn_id).collect(),
        other => anyhow::bail!("unexpected {other:?}"),
    };
    assert_eq!(
        pending, txn_ids,
        "acknowledged half messages lost or invented"
    );
    for &txn_id in &txn_ids {
        let r = conn
            .request(&Request::EndTxn(EndTxn {
                txn_id,
                decision: TxnDecision::Commit,
                source: TxnSource::Operator,
            }))
            .await?;
        assert!(
            matches!(&r, Response::TxnEnded(o) if matches!(o.state, TxnState::Committed(_))),
            "commit of {txn_id}: {r:?}"
        );
    }
    let consumer = Consumer::connect(&client(&addr, dir.path()), "audit", "orders").await?;
    let received = common::drain_unique_ids(&consumer).await?;
    child.kill()?;
    child.wait()?;
    assert_eq!(received.len(), txn_ids.len());
    Ok(())
}
