//! Poison rows: a row the broker refuses for good (unknown topic, body over the limit) is
//! retried with backoff, parked after N attempts with its last error, shown by
//! `escrow-relay status` and the relay's metrics, while every other row keeps flowing.

mod common;

use common::*;
use escrow_consumer::Consumer;
use escrow_outbox::core::RetryPolicy;
use escrow_outbox::pg::{PgConfig, PgOutbox};
use escrow_outbox::redb_store::RedbOutbox;
use escrow_outbox::relay::{Relay, RelayConfig};
use escrow_outbox::{NewMessage, OutboxStatus};
use escrow_tests::TestNode;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

const TOO_LARGE: usize = escrow_proto::MAX_BODY_LEN + 1;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pg_poison_rows_are_parked_and_shown_while_others_flow() -> anyhow::Result<()> {
    let Some(admin) =
        connect_or_skip("pg_poison_rows_are_parked_and_shown_while_others_flow").await
    else {
        return Ok(());
    };
    let schema = fresh_schema(&admin, "poison").await?;
    let owned = schema.clone();
    let result = tokio::spawn(async move {
        tokio::time::timeout(Duration::from_secs(60), pg_scenario(&owned)).await
    })
    .await;
    drop_schema(&admin, &schema).await;
    settle(result)
}

async fn pg_scenario(s: &str) -> anyhow::Result<()> {
    let url = database_url();
    let node = TestNode::start().await?;
    let broker = node.client();
    create_topic(&broker, "orders", 2).await?;
    let table = format!("{s}.outbox");
    let outbox = PgOutbox::new(&url, PgConfig::for_table(&table))?;
    let db = connect().await?;
    outbox.migrate(&db).await?;

    let enqueue = |range: std::ops::Range<u32>| {
        let (outbox, db) = (&outbox, &db);
        async move {
            let mut ids = Vec::new();
            for i in range {
                let m = NewMessage::new("orders", format!("order {i}")).key(format!("k{}", i % 5));
                ids.push(outbox.enqueue(db, &m).await?);
            }
            anyhow::Ok(ids)
        }
    };
    let mut good = enqueue(0..50).await?;
    // The unknown-topic row shares key k0 with good rows: they wait until it is parked.
    let unknown = outbox
        .enqueue(&db, &NewMessage::new("no-such-topic", "lost").key("k0"))
        .await?;
    let too_large = outbox
        .enqueue(
            &db,
            &NewMessage::new("orders", vec![b'x'; TOO_LARGE]).key("big"),
        )
        .await?;
    good.extend(enqueue(50..100).await?);

    let ca = node.client().trust;
    let escrow_client::Trust::CaFile(ca) = ca else {
        anyhow::bail!("test node trusts a CA file");
    };
    let ca = ca.display().to_string();
    let _relay = RelayProcess::spawn(&[
        "--database-url",
        &url,
        "--table",
        &table,
        "run",
        "--server",
        &broker.server,
        "--ca",
        &ca,
        "--max-attempts",
        "3",
        "--backoff-ms",
        "50",
        "--poll-interval-ms",
        "100",
    ])?;
    // More rows arrive while the poison rows are being retried.
    tokio::time::sleep(Duration::from_millis(100)).await;
    good.extend(enqueue(100..200).await?);

    let status = wait_status(&outbox, &db, |st| st.pending == 0 && st.parked == 2).await?;
    let parked: BTreeSet<u64> = status.parked_rows.iter().map(|p| p.id).collect();
    assert_eq!(parked, BTreeSet::from([unknown, too_large]));
    for p in &status.parked_rows {
        assert_eq!(p.attempts, 3, "parked after max attempts: {p:?}");
        let expected = if p.id == unknown {
            "UNKNOWN_TOPIC"
        } else {
            "MESSAGE_TOO_LARGE"
        };
        assert!(p.last_error.contains(expected), "{p:?}");
    }

    // The CLI shows the same.
    let text = relay_cli(&["--database-url", &url, "--table", &table, "status"])?;
    assert!(text.contains("parked:           2"), "{text}");
    assert!(text.contains("backlog:          0 pending"), "{text}");
    assert!(
        text.contains(&format!(
            "parked row {unknown} topic=no-such-topic key=k0 attempts=3"
        )),
        "{text}"
    );
    assert!(
        text.contains("UNKNOWN_TOPIC") && text.contains("MESSAGE_TOO_LARGE"),
        "{text}"
    );
    let json: serde_json::Value = serde_json::from_str(&relay_cli(&[
        "--database-url",
        &url,
        "--table",
        &table,
        "status",
        "--json",
    ])?)?;
    assert_eq!(json["parked"], 2);
    assert_eq!(json["pending"], 0);
    assert!(
        json["sent_last_minute"].as_u64().unwrap_or(0) >= 200,
        "{json}"
    );

    // Every good row reached the broker, once, and k0's rows after the poison one too.
    let consumer = Consumer::connect(&broker, "check", "orders").await?;
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.len() < good.len() && Instant::now() < deadline {
        for d in consumer
            .receive(512, Duration::from_secs(30), Duration::from_millis(500))
            .await?
        {
            assert!(seen.insert(d.message.id.clone()), "{} twice", d.message.id);
        }
    }
    let expected: BTreeSet<String> = good.iter().map(|id| format!("{table}-{id}")).collect();
    assert_eq!(seen, expected);

    // Once the topic exists, an operator retries the parked rows: the unknown-topic one goes.
    create_topic(&broker, "no-such-topic", 1).await?;
    let out = relay_cli(&[
        "--database-url",
        &url,
        "--table",
        &table,
        "retry-parked",
        "--id",
        &unknown.to_string(),
    ])?;
    assert!(out.starts_with("1 parked rows"), "{out}");
    let status = wait_status(&outbox, &db, |st| st.pending == 0 && st.parked == 1).await?;
    assert_eq!(status.parked_rows[0].id, too_large);
    Ok(())
}

async fn wait_status(
    outbox: &PgOutbox,
    db: &tokio_postgres::Client,
    done: impl Fn(&OutboxStatus) -> bool,
) -> anyhow::Result<OutboxStatus> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = outbox.status(db).await?;
        if done(&status) {
            return Ok(status);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "status never settled: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redb_poison_row_is_parked_and_counted_while_others_flow() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = TestNode::start().await?;
    create_topic(&node.client(), "orders", 2).await?;
    let db = Arc::new(redb::Database::create(dir.path().join("app.redb"))?);
    let outbox = RedbOutbox::new(db.clone(), "app")?;
    let enqueue = |m: NewMessage| -> anyhow::Result<u64> {
        let tx = db.begin_write()?;
        let id = outbox.enqueue(&tx, &m)?;
        tx.commit()?;
        outbox.wake();
        Ok(id)
    };
    let poison = enqueue(NewMessage::new("no-such-topic", "lost").key("k0"))?;
    for i in 0..100 {
        enqueue(NewMessage::new("orders", format!("order {i}")).key(format!("k{}", i % 5)))?;
    }
    let config = RelayConfig {
        retry: RetryPolicy {
            max_attempts: 4,
            first_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(100),
        },
        poll_interval: Duration::from_millis(50),
        ..RelayConfig::default()
    };
    let relay = Relay::connect(outbox.clone(), node.client(), config).await?;
    let metrics = relay.metrics();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(relay.run(async move {
        let _ = stopped.await;
    }));
    let deadline = Instant::now() + Duration::from_secs(20);
    // The relay counts a round right after committing it, so the table can show the
    // parked row a moment before the counters do: wait for both.
    let (status, counters) = loop {
        let st = outbox.status_now()?;
        let counters = metrics.snapshot();
        if st.pending == 0 && st.parked == 1 && counters.parked == 1 && counters.published >= 100 {
            break (st, counters);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "never settled: {st:?} {counters:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.parked_rows[0].id, poison);
    assert_eq!(status.parked_rows[0].attempts, 4);
    assert!(status.parked_rows[0].last_error.contains("UNKNOWN_TOPIC"));
    assert_eq!(counters.published, 100);
    assert_eq!(counters.parked, 1);
    assert_eq!(counters.row_failures, 4);
    let _ = stop.send(());
    running.await??;
    Ok(())
}
