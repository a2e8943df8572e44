//! The `outbox` scenario: relay throughput from a PostgreSQL outbox table into the broker.
//!
//! Fills a fresh outbox table with `--rows` pending rows (not measured), then runs
//! `--relays` in-process relays (each with its own producer connection and `--workers`
//! claim loops, like that many `escrow-relay` sidecars) until every row is marked sent.
//! The figure is rows published and marked sent per second.

use crate::report::{histogram, Report, Totals};
use crate::scenarios::{broker_fsyncs, ensure_topic};
use anyhow::Context;
use clap::Args;
use escrow_client::{Client, ClientConfig};
use escrow_outbox::pg::{PgConfig, PgOutbox};
use escrow_outbox::relay::{Relay, RelayConfig};
use std::time::{Duration, Instant};

#[derive(Debug, Args)]
pub(crate) struct OutboxArgs {
    /// PostgreSQL connection string or URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgresql://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// Topic (created if missing).
    #[arg(long, default_value = "outbox-bench")]
    topic: String,
    /// Queues of the topic when it is created.
    #[arg(long, default_value_t = 4)]
    queues: u32,
    /// Rows to relay.
    #[arg(long, default_value_t = 200_000)]
    rows: u64,
    /// Body size in bytes.
    #[arg(long, default_value_t = 256)]
    size: usize,
    /// Distinct aggregate keys.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// Rows claimed per batch.
    #[arg(long, default_value_t = 1000)]
    batch_size: usize,
    /// Claim loops per relay.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Relays (each with its own broker connection).
    #[arg(long, default_value_t = 1)]
    relays: usize,
    /// Rows per publish request.
    #[arg(long, default_value_t = 1000)]
    request_rows: usize,
    /// Keep the table afterwards (default: dropped).
    #[arg(long)]
    keep: bool,
}

pub(crate) async fn outbox(client: &ClientConfig, args: OutboxArgs) -> anyhow::Result<Report> {
    let (db, connection) = tokio_postgres::connect(&args.database_url, tokio_postgres::NoTls)
        .await
        .context("connecting to PostgreSQL")?;
    tokio::spawn(connection);
    let conn = Client::connect(client.clone()).await?;
    ensure_topic(&conn, &args.topic, args.queues).await?;

    let table = format!("escrow_bench_outbox_{}", std::process::id());
    let mut config = PgConfig::for_table(&table);
    config.message_id_prefix = format!("{table}-{}", escrow_client::now_ms());
    let store = PgOutbox::new(args.database_url.clone(), config)?;
    db.batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
        .await?;
    store.migrate(&db).await?;
    eprintln!("filling {table} with {} rows", args.rows);
    db.execute(
        &format!(
            "INSERT INTO {table} (topic, key, body) \
             SELECT $1::text, 'k' || (g % $2::int8), convert_to(repeat('x', $3::int4), 'UTF8') \
             FROM generate_series(1::int8, $4::int8) g"
        ),
        &[
            &args.topic,
            &i64::try_from(args.keys.max(1))?,
            &i32::try_from(args.size)?,
            &i64::try_from(args.rows)?,
        ],
    )
    .await?;
    db.batch_execute(&format!("VACUUM ANALYZE {table}")).await?;

    let relay_config = RelayConfig {
        batch_size: args.batch_size,
        workers: args.workers,
        max_request_messages: args.request_rows,
        clean_interval: None,
        ..RelayConfig::default()
    };
    let fsyncs_before = broker_fsyncs(&conn).await?;
    let started = Instant::now();
    let mut metrics = Vec::new();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut running = Vec::new();
    for _ in 0..args.relays.max(1) {
        let relay = Relay::connect(store.clone(), client.clone(), relay_config.clone()).await?;
        metrics.push(relay.metrics());
        let mut stopped = stopped.clone();
        running.push(tokio::spawn(relay.run(async move {
            let _ = stopped.wait_for(|s| *s).await;
        })));
    }
    let published = || metrics.iter().map(|m| m.snapshot().published).sum::<u64>();
    let mut last = (0, Instant::now());
    while published() < args.rows {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if last.1.elapsed() >= Duration::from_secs(1) {
            let now = published();
            eprintln!("outbox: {now}/{} ({} msgs/s)", args.rows, now - last.0);
            last = (now, Instant::now());
        }
    }
    let elapsed = started.elapsed();
    let _ = stop.send(true);
    for r in running {
        r.await??;
    }
    let fsyncs = broker_fsyncs(&conn).await?.saturating_sub(fsyncs_before);
    let pending: i64 = db
        .query_one(
            &format!("SELECT count(*) FROM {table} WHERE state <> 'sent'"),
            &[],
        )
        .await?
        .try_get(0)?;
    anyhow::ensure!(pending == 0, "{pending} rows not sent");
    let errors: u64 = metrics.iter().map(|m| m.snapshot().transient_errors).sum();
    if !args.keep {
        db.batch_execute(&format!("DROP TABLE {table}")).await?;
    }
    let parameters = serde_json::json!({
        "rows": args.rows, "size": args.size, "keys": args.keys, "batch_size": args.batch_size,
        "workers": args.workers, "relays": args.relays, "request_rows": args.request_rows,
        "latency": "not measured (backlog drain)",
    });
    Ok(Report::new(
        "outbox",
        parameters,
        Totals {
            messages: args.rows,
            bytes: args.rows * args.size as u64,
            elapsed,
            fsyncs,
            errors,
        },
        &histogram(),
    ))
}
