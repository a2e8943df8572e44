//! End to end on PostgreSQL: ten writers commit (or roll back) orders with their outbox rows;
//! two `escrow-relay` processes publish them into a 3-node cluster; one relay is SIGKILLed
//! while it holds a claim and the broker leader is stopped once; a consumer applies every
//! message through the inbox. The effects must equal the committed orders exactly, each
//! once, each key in order.

mod common;

use common::*;
use escrow_consumer::Consumer;
use escrow_outbox::pg::{PgConfig, PgInbox, PgOutbox};
use escrow_outbox::{NewMessage, Processed};
use escrow_tests::TestCluster;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const WRITERS: u64 = 10;
const ORDERS_PER_WRITER: u64 = 250;
const CUSTOMERS: u64 = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn committed_orders_are_applied_exactly_once_in_key_order() -> anyhow::Result<()> {
    let Some(admin) =
        connect_or_skip("committed_orders_are_applied_exactly_once_in_key_order").await
    else {
        return Ok(());
    };
    let schema = fresh_schema(&admin, "e2e").await?;
    let owned = schema.clone();
    let result = tokio::spawn(async move {
        tokio::time::timeout(Duration::from_secs(110), scenario(&owned)).await
    })
    .await;
    drop_schema(&admin, &schema).await;
    settle(result)
}

async fn scenario(s: &str) -> anyhow::Result<()> {
    let url = database_url();
    let mut cluster = TestCluster::voters(3).await?;
    let broker = cluster.client();
    create_topic(&broker, "orders", 4).await?;

    let setup = connect().await?;
    setup
        .batch_execute(&format!(
            "CREATE TABLE {s}.customers (key text PRIMARY KEY, seq integer NOT NULL DEFAULT 0);
             CREATE TABLE {s}.orders (id bigint PRIMARY KEY, key text NOT NULL, seq integer NOT NULL);
             CREATE SEQUENCE {s}.order_ids;
             -- No unique constraint: a second application must show up, not fail.
             CREATE TABLE {s}.effects (applied bigserial PRIMARY KEY, order_id bigint NOT NULL,
                                       key text NOT NULL, seq integer NOT NULL);
             INSERT INTO {s}.customers (key) SELECT 'c' || g FROM generate_series(1, {CUSTOMERS}) g;"
        ))
        .await?;
    let table = format!("{s}.outbox");
    let outbox = PgOutbox::new(&url, PgConfig::for_table(&table))?;
    outbox.migrate(&setup).await?;
    let inbox = PgInbox::new(&format!("{s}.inbox"))?;
    inbox.migrate(&setup).await?;

    // Two relay processes; relay A names its connections so we can see it hold a claim.
    let ca = cluster.ca().display().to_string();
    let url_a = with_application_name(&url, &format!("{s}_relay_a"));
    let relay_args = |db: &str| -> Vec<String> {
        [
            "--database-url",
            db,
            "--table",
            &table,
            "run",
            "--server",
            &broker.server,
            "--ca",
            &ca,
            "--batch-size",
            "200",
            "--workers",
            "2",
            "--poll-interval-ms",
            "200",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    let args_a = relay_args(&url_a);
    let args_b = relay_args(&url);
    let mut relay_a = RelayProcess::spawn(&args_a.iter().map(String::as_str).collect::<Vec<_>>())?;
    let mut relay_b = RelayProcess::spawn(&args_b.iter().map(String::as_str).collect::<Vec<_>>())?;

    // The consumer applies each order through the inbox.
    let stop = Arc::new(AtomicBool::new(false));
    let duplicates = Arc::new(AtomicU64::new(0));
    let positions: Positions = Arc::default();
    let consumer = tokio::spawn(consume(
        broker.clone(),
        inbox.clone(),
        s.to_string(),
        stop.clone(),
        duplicates.clone(),
        positions.clone(),
    ));

    // Ten writers: order, customer sequence and outbox row in one transaction; ~20% rolled back.
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        writers.push(tokio::spawn(write_orders(w, outbox.clone(), s.to_string())));
    }

    // Kill relay A (SIGKILL) while it holds a claim transaction, once rows are flowing.
    wait_until(Duration::from_secs(20), || async {
        Ok(count(&setup, &format!("SELECT count(*) FROM {s}.effects")).await? > 100)
    })
    .await?;
    let held_claim = wait_until(Duration::from_secs(20), || async {
        let n: i64 = setup
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 \
                 AND state = 'idle in transaction'",
                &[&format!("{s}_relay_a")],
            )
            .await?
            .try_get(0)?;
        Ok(n > 0)
    })
    .await?;
    anyhow::ensure!(held_claim, "relay A never held a claim");
    relay_a.kill()?;

    // Stop the broker leader once, mid-stream, and bring it back.
    wait_until(Duration::from_secs(20), || async {
        Ok(count(&setup, &format!("SELECT count(*) FROM {s}.effects")).await? > 300)
    })
    .await?;
    cluster.bounce_leader().await?;

    let mut committed = BTreeSet::new();
    let mut rolled_back = BTreeSet::new();
    for w in writers {
        let (c, r) = w.await??;
        committed.extend(c);
        rolled_back.extend(r);
    }
    anyhow::ensure!(!rolled_back.is_empty(), "some orders must roll back");

    let expected = committed.len() as i64;
    let done = wait_until(Duration::from_secs(60), || async {
        Ok(count(&setup, &format!("SELECT count(*) FROM {s}.effects")).await? >= expected)
    })
    .await?;
    // Let any late duplicate land before judging.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    consumer.await??;
    if !done {
        let applied = count(&setup, &format!("SELECT count(*) FROM {s}.effects")).await?;
        let status = outbox.status(&setup).await?;
        anyhow::bail!(
            "effects never reached {expected} orders: {applied} applied; outbox {status:?}"
        );
    }
    anyhow::ensure!(relay_b.alive(), "relay B died");

    // Effects equal the committed orders: none missing, none twice, none rolled back.
    let mut applied: Vec<i64> = Vec::new();
    let mut per_key: BTreeMap<String, Vec<i32>> = BTreeMap::new();
    for row in setup
        .query(
            &format!("SELECT order_id, key, seq FROM {s}.effects ORDER BY applied"),
            &[],
        )
        .await?
    {
        applied.push(row.try_get(0)?);
        per_key
            .entry(row.try_get(1)?)
            .or_default()
            .push(row.try_get(2)?);
    }
    let applied_set: BTreeSet<i64> = applied.iter().copied().collect();
    assert_eq!(
        applied.len(),
        applied_set.len(),
        "an order was applied twice"
    );
    assert_eq!(
        applied_set, committed,
        "effects differ from the committed orders"
    );
    assert!(
        applied_set.is_disjoint(&rolled_back),
        "a rolled-back order was applied"
    );
    // Committed sequences per key are 1..=n (rollbacks undo the increment); applied in order.
    let mut final_seq: BTreeMap<String, i32> = BTreeMap::new();
    for row in setup
        .query(&format!("SELECT key, seq FROM {s}.customers"), &[])
        .await?
    {
        final_seq.insert(row.try_get(0)?, row.try_get(1)?);
    }
    for (key, seqs) in &per_key {
        let n = final_seq.get(key).copied().unwrap_or(0);
        assert_eq!(
            *seqs,
            (1..=n).collect::<Vec<_>>(),
            "key {key} applied out of order"
        );
    }
    let status = outbox.status(&setup).await?;
    assert_eq!(status.pending, 0);
    assert_eq!(status.parked, 0);
    // The broker stored every message once, whatever the relays re-sent (G5).
    {
        let stored = positions.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        assert_eq!(stored.len(), committed.len(), "messages delivered");
        for (id, at) in stored.iter() {
            assert_eq!(at.len(), 1, "message {id} stored at {at:?}");
        }
    }
    eprintln!(
        "pg e2e: {} committed, {} rolled back, {} duplicate deliveries skipped by the inbox",
        committed.len(),
        rolled_back.len(),
        duplicates.load(Ordering::Relaxed)
    );
    drop(relay_b);
    cluster.shutdown().await;
    Ok(())
}

fn with_application_name(url: &str, name: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}application_name={name}")
}

async fn count(client: &tokio_postgres::Client, sql: &str) -> anyhow::Result<i64> {
    Ok(client.query_one(sql, &[]).await?.try_get(0)?)
}

/// Polls `check` every 50 ms until it holds or `limit` passes; returns whether it held.
async fn wait_until<F, Fut>(limit: Duration, mut check: F) -> anyhow::Result<bool>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check().await? {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(false)
}

async fn write_orders(
    writer: u64,
    outbox: PgOutbox,
    s: String,
) -> anyhow::Result<(Vec<i64>, Vec<i64>)> {
    let mut client = connect().await?;
    let mut rng = Lcg(writer * 7919 + 17);
    let (mut committed, mut rolled_back) = (Vec::new(), Vec::new());
    for _ in 0..ORDERS_PER_WRITER {
        let key = format!("c{}", rng.next() % CUSTOMERS + 1);
        let tx = client.transaction().await?;
        // The customer row lock orders this key's writes: seq and outbox id agree.
        let seq: i32 = tx
            .query_one(
                &format!("UPDATE {s}.customers SET seq = seq + 1 WHERE key = $1 RETURNING seq"),
                &[&key],
            )
            .await?
            .try_get(0)?;
        let id: i64 = tx
            .query_one(&format!("SELECT nextval('{s}.order_ids')"), &[])
            .await?
            .try_get(0)?;
        tx.execute(
            &format!("INSERT INTO {s}.orders (id, key, seq) VALUES ($1, $2, $3)"),
            &[&id, &key, &seq],
        )
        .await?;
        let message = NewMessage::new("orders", format!("{id},{key},{seq}")).key(key.clone());
        outbox.enqueue(&tx, &message).await?;
        if rng.next().is_multiple_of(5) {
            tx.rollback().await?;
            rolled_back.push(id);
        } else {
            tx.commit().await?;
            committed.push(id);
        }
        if rng.next().is_multiple_of(4) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    Ok((committed, rolled_back))
}

/// Receives, applies each message through the inbox, acks; in delivery order.
async fn consume(
    broker: escrow_client::ClientConfig,
    inbox: PgInbox,
    s: String,
    stop: Arc<AtomicBool>,
    duplicates: Arc<AtomicU64>,
    positions: Positions,
) -> anyhow::Result<()> {
    let consumer = Consumer::connect(&broker, "billing", "orders").await?;
    let mut db = connect().await?;
    let insert = format!("INSERT INTO {s}.effects (order_id, key, seq) VALUES ($1, $2, $3)");
    while !stop.load(Ordering::Relaxed) {
        let batch = match consumer
            .receive(256, Duration::from_secs(10), Duration::from_millis(300))
            .await
        {
            Ok(b) => b,
            Err(e) => {
                eprintln!("receive failed (retrying): {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        record_positions(&positions, &batch);
        let mut done = Vec::new();
        let mut undone = Vec::new();
        for delivery in batch {
            if !undone.is_empty() {
                undone.push(delivery.receipt);
                continue;
            }
            let body = String::from_utf8(delivery.message.body.clone())?;
            let mut parts = body.split(',');
            let (Some(id), Some(key), Some(seq)) = (parts.next(), parts.next(), parts.next())
            else {
                anyhow::bail!("bad body {body:?}");
            };
            let (id, key, seq): (i64, String, i32) = (id.parse()?, key.to_string(), seq.parse()?);
            let result = inbox
                .process(&mut db, &delivery.message.id, async |tx| {
                    tx.execute(&insert, &[&id, &key, &seq]).await
                })
                .await;
            match result {
                Ok(Processed::Applied(_)) => done.push(delivery.receipt),
                Ok(Processed::Duplicate) => {
                    duplicates.fetch_add(1, Ordering::Relaxed);
                    done.push(delivery.receipt);
                }
                Err(e) => {
                    // Give this and the rest back at once, so they come again in order.
                    eprintln!("applying {} failed: {e}", delivery.message.id);
                    undone.push(delivery.receipt);
                }
            }
        }
        if !done.is_empty() {
            if let Err(e) = consumer.ack(&done).await {
                eprintln!("ack failed (redelivery will be skipped by the inbox): {e}");
            }
        }
        if !undone.is_empty() {
            let _ = consumer.nack(&undone, Duration::ZERO).await;
            db = connect().await?;
        }
    }
    Ok(())
}

/// Where each message id was delivered from: more than one position means it was stored twice.
type Positions = Arc<std::sync::Mutex<BTreeMap<String, BTreeSet<(u32, u64)>>>>;

fn record_positions(positions: &Positions, batch: &[escrow_proto::Delivery]) {
    if let Ok(mut map) = positions.lock() {
        for d in batch {
            map.entry(d.message.id.clone())
                .or_default()
                .insert((d.position.queue, d.position.offset));
        }
    }
}

/// NOTIFY wakes an idle relay long before its poll interval (60 s here) would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_wakes_an_idle_relay() -> anyhow::Result<()> {
    let Some(admin) = connect_or_skip("notify_wakes_an_idle_relay").await else {
        return Ok(());
    };
    let schema = fresh_schema(&admin, "notify").await?;
    let result = tokio::time::timeout(Duration::from_secs(60), async {
        let node = escrow_tests::TestNode::start().await?;
        create_topic(&node.client(), "orders", 1).await?;
        let outbox = PgOutbox::new(
            database_url(),
            PgConfig::for_table(&format!("{schema}.outbox")),
        )?;
        outbox.migrate(&admin).await?;
        let config = escrow_outbox::relay::RelayConfig {
            poll_interval: Duration::from_secs(60),
            ..Default::default()
        };
        let relay =
            escrow_outbox::relay::Relay::connect(outbox.clone(), node.client(), config).await?;
        let metrics = relay.metrics();
        let running = tokio::spawn(relay.run(std::future::pending::<()>()));
        // Let the workers find the table empty and go idle.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let started = Instant::now();
        outbox
            .enqueue(&admin, &NewMessage::new("orders", "hello").key("k"))
            .await?;
        let woke = wait_until(Duration::from_secs(10), || async {
            Ok(metrics.snapshot().published == 1)
        })
        .await?;
        running.abort();
        anyhow::ensure!(woke, "the relay did not wake on NOTIFY");
        eprintln!(
            "published {} ms after the commit",
            started.elapsed().as_millis()
        );
        anyhow::Ok(())
    })
    .await;
    drop_schema(&admin, &schema).await;
    result.map_err(|_| anyhow::anyhow!("timed out"))?
}
