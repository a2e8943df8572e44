//! End to end on redb: ten writer threads commit (or abort) orders with their outbox rows in
//! the application's redb file; two in-process relays publish them into a 3-node cluster;
//! one relay is stopped mid-claim (its task aborted) and the broker leader is stopped once;
//! a consumer applies every message through a redb inbox in its own file. The effects must
//! equal the committed orders exactly, each once, each key in order.

mod common;

use common::{create_topic, Lcg};
use escrow_consumer::Consumer;
use escrow_outbox::redb_store::{RedbInbox, RedbOutbox};
use escrow_outbox::relay::{Relay, RelayConfig};
use escrow_outbox::{NewMessage, Processed};
use escrow_producer::{Producer, ProducerConfig};
use escrow_tests::TestCluster;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CUSTOMERS: TableDefinition<&str, u64> = TableDefinition::new("customers");
const ORDERS: TableDefinition<u64, &str> = TableDefinition::new("orders");
const EFFECTS: TableDefinition<u64, &str> = TableDefinition::new("effects");

const WRITERS: u64 = 10;
const ORDERS_PER_WRITER: u64 = 200;
const KEYS: u64 = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redb_orders_are_applied_exactly_once_in_key_order() -> anyhow::Result<()> {
    tokio::time::timeout(Duration::from_secs(110), scenario())
        .await
        .map_err(|_| anyhow::anyhow!("scenario timed out"))?
}

fn relay_config() -> RelayConfig {
    RelayConfig {
        batch_size: 200,
        poll_interval: Duration::from_millis(200),
        ..RelayConfig::default()
    }
}

async fn producer(cluster: &TestCluster) -> anyhow::Result<Producer> {
    let mut config = ProducerConfig::new(cluster.client());
    config.dedupe_by_id = true;
    Ok(Producer::connect(config).await?)
}

async fn scenario() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cluster = TestCluster::voters(3).await?;
    let broker = cluster.client();
    create_topic(&broker, "orders", 4).await?;

    let app_db = Arc::new(Database::create(dir.path().join("app.redb"))?);
    let outbox = RedbOutbox::new(app_db.clone(), "orders-outbox")?;
    let consumer_db = Arc::new(Database::create(dir.path().join("consumer.redb"))?);
    let inbox = RedbInbox::new(consumer_db.clone())?;

    let store = Arc::new(outbox.clone());
    let relay_a = Relay::new(store.clone(), producer(&cluster).await?, relay_config());
    let relay_b = Relay::new(store.clone(), producer(&cluster).await?, relay_config());
    let metrics_b = relay_b.metrics();
    let relay_a = tokio::spawn(relay_a.run(std::future::pending::<()>()));
    let (stop_b, stop_b_rx) = tokio::sync::oneshot::channel::<()>();
    let relay_b = tokio::spawn(relay_b.run(async move {
        let _ = stop_b_rx.await;
    }));

    let stop = Arc::new(AtomicBool::new(false));
    let duplicates = Arc::new(AtomicU64::new(0));
    let positions: Positions = Arc::default();
    let consumer = tokio::spawn(consume(
        broker.clone(),
        inbox,
        consumer_db.clone(),
        stop.clone(),
        duplicates.clone(),
        positions.clone(),
    ));

    let next_order = Arc::new(AtomicU64::new(1));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (outbox, db, next_order) = (outbox.clone(), app_db.clone(), next_order.clone());
        writers.push(tokio::task::spawn_blocking(move || {
            write_orders(w, &outbox, &db, &next_order)
        }));
    }

    // Stop relay A abruptly while rows are claimed (its claims are given back).
    let claimed = wait_until(Duration::from_secs(20), || Ok(outbox.claimed() > 0)).await?;
    anyhow::ensure!(claimed, "no relay ever held a claim");
    relay_a.abort();
    let _ = relay_a.await;

    // Stop the broker leader once and bring it back.
    wait_until(Duration::from_secs(20), || {
        Ok(effects(&consumer_db)?.len() > 300)
    })
    .await?;
    cluster.bounce_leader().await?;

    let mut committed = BTreeSet::new();
    let mut aborted = BTreeSet::new();
    for w in writers {
        let (c, a) = w.await??;
        committed.extend(c);
        aborted.extend(a);
    }
    anyhow::ensure!(!aborted.is_empty(), "some orders must be aborted");
    let done = wait_until(Duration::from_secs(60), || {
        Ok(effects(&consumer_db)?.len() >= committed.len())
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    consumer.await??;
    anyhow::ensure!(
        done,
        "effects never reached {} orders: {} applied; outbox {:?}; {} claimed; relay B {:?}",
        committed.len(),
        effects(&consumer_db)?.len(),
        outbox.status_now()?,
        outbox.claimed(),
        metrics_b.snapshot()
    );

    // Effects equal the committed orders: none missing, none twice, none aborted; in key order.
    let applied = effects(&consumer_db)?;
    let ids: Vec<u64> = applied.iter().map(|(id, _, _)| *id).collect();
    let id_set: BTreeSet<u64> = ids.iter().copied().collect();
    assert_eq!(ids.len(), id_set.len(), "an order was applied twice");
    assert_eq!(
        id_set, committed,
        "effects differ from the committed orders"
    );
    assert!(id_set.is_disjoint(&aborted), "an aborted order was applied");
    let mut per_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (_, key, seq) in &applied {
        per_key.entry(key.clone()).or_default().push(*seq);
    }
    let finals = customer_seqs(&app_db)?;
    for (key, seqs) in &per_key {
        let n = finals.get(key).copied().unwrap_or(0);
        assert_eq!(
            *seqs,
            (1..=n).collect::<Vec<_>>(),
            "key {key} applied out of order"
        );
    }
    let status = outbox.status_now()?;
    assert_eq!(status.pending, 0);
    assert_eq!(status.parked, 0);
    assert!(
        metrics_b.snapshot().published > 0,
        "relay B published nothing"
    );
    // The broker stored every message once, whatever the relays re-sent (G5).
    {
        let stored = positions.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        assert_eq!(stored.len(), committed.len(), "messages delivered");
        for (id, at) in stored.iter() {
            assert_eq!(at.len(), 1, "message {id} stored at {at:?}");
        }
    }
    eprintln!(
        "redb e2e: {} committed, {} aborted, {} duplicate deliveries skipped by the inbox",
        committed.len(),
        aborted.len(),
        duplicates.load(Ordering::Relaxed)
    );
    let _ = stop_b.send(());
    relay_b.await??;
    cluster.shutdown().await;
    Ok(())
}

async fn wait_until(
    limit: Duration,
    mut check: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<bool> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check()? {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(false)
}

fn write_orders(
    writer: u64,
    outbox: &RedbOutbox,
    db: &Database,
    next_order: &AtomicU64,
) -> anyhow::Result<(Vec<u64>, Vec<u64>)> {
    let mut rng = Lcg(writer * 104_729 + 3);
    let (mut committed, mut aborted) = (Vec::new(), Vec::new());
    for _ in 0..ORDERS_PER_WRITER {
        let key = format!("c{}", rng.next() % KEYS + 1);
        let id = next_order.fetch_add(1, Ordering::Relaxed);
        let tx = db.begin_write()?;
        let seq = {
            let mut customers = tx.open_table(CUSTOMERS)?;
            let seq = customers.get(key.as_str())?.map_or(0, |v| v.value()) + 1;
            customers.insert(key.as_str(), seq)?;
            seq
        };
        let body = format!("{id},{key},{seq}");
        tx.open_table(ORDERS)?.insert(id, body.as_str())?;
        outbox.enqueue(&tx, &NewMessage::new("orders", body).key(key))?;
        if rng.next().is_multiple_of(5) {
            tx.abort()?;
            aborted.push(id);
        } else {
            tx.commit()?;
            outbox.wake();
            committed.push(id);
        }
        if rng.next().is_multiple_of(4) {
            std::thread::sleep(Duration::from_millis(3));
        }
    }
    Ok((committed, aborted))
}

fn customer_seqs(db: &Database) -> anyhow::Result<BTreeMap<String, u64>> {
    let tx = db.begin_read()?;
    let table = tx.open_table(CUSTOMERS)?;
    let mut out = BTreeMap::new();
    for entry in table.iter()? {
        let (k, v) = entry?;
        out.insert(k.value().to_string(), v.value());
    }
    Ok(out)
}

/// (order id, key, seq) in the order they were applied.
fn effects(db: &Database) -> anyhow::Result<Vec<(u64, String, u64)>> {
    let tx = db.begin_read()?;
    let table = match tx.open_table(EFFECTS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    for entry in table.iter()? {
        let (_, v) = entry?;
        out.push(parse(v.value())?);
    }
    Ok(out)
}

fn parse(body: &str) -> anyhow::Result<(u64, String, u64)> {
    let mut parts = body.split(',');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(id), Some(key), Some(seq)) => Ok((id.parse()?, key.to_string(), seq.parse()?)),
        _ => anyhow::bail!("bad body {body:?}"),
    }
}

async fn consume(
    broker: escrow_client::ClientConfig,
    inbox: RedbInbox,
    db: Arc<Database>,
    stop: Arc<AtomicBool>,
    duplicates: Arc<AtomicU64>,
    positions: Positions,
) -> anyhow::Result<()> {
    let consumer = Consumer::connect(&broker, "billing", "orders").await?;
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
        let (inbox, db, dups) = (inbox.clone(), db.clone(), duplicates.clone());
        let receipts = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let mut done = Vec::new();
            for d in batch {
                let body = String::from_utf8(d.message.body.clone())?;
                let outcome = inbox.process(&d.message.id, |tx| -> anyhow::Result<()> {
                    let mut effects = tx.open_table(EFFECTS)?;
                    let next = effects.last()?.map_or(0, |(k, _)| k.value()) + 1;
                    effects.insert(next, body.as_str())?;
                    Ok(())
                });
                match outcome {
                    Ok(Processed::Duplicate) => {
                        dups.fetch_add(1, Ordering::Relaxed);
                        done.push(d.receipt);
                    }
                    Ok(Processed::Applied(())) => done.push(d.receipt),
                    Err(e) => anyhow::bail!("applying {}: {e}", d.message.id),
                }
            }
            drop(db);
            Ok(done)
        })
        .await??;
        if !receipts.is_empty() {
            if let Err(e) = consumer.ack(&receipts).await {
                eprintln!("ack failed (redelivery will be skipped by the inbox): {e}");
            }
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
