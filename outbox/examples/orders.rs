//! An orders service on PostgreSQL with an outbox, and a shipping consumer with an inbox.
//!
//! ```text
//! escrow dev &                                   # a broker (or any cluster: ESCROW_SERVER, ESCROW_CA)
//! DATABASE_URL=postgresql://postgres@127.0.0.1/postgres cargo run -p escrow-outbox --example orders
//! ```
//! Each order and its `OrderPlaced` message commit in one transaction (a rolled-back order
//! sends nothing); an in-process relay publishes the messages (in production: the
//! `escrow-relay` sidecar); the shipping consumer creates one shipment per order, exactly
//! once, through the inbox, even when a message is delivered twice.

use escrow_client::{defaults, Client, ClientConfig};
use escrow_consumer::Consumer;
use escrow_outbox::pg::{PgConfig, PgInbox, PgOutbox};
use escrow_outbox::relay::{Relay, RelayConfig};
use escrow_outbox::{NewMessage, Processed};
use escrow_proto::{CreateTopic, ErrorCode, Request};
use std::time::{Duration, Instant};

const ORDERS: i64 = 20;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgresql://postgres@127.0.0.1:5432/postgres".into());
    let server = std::env::var("ESCROW_SERVER").unwrap_or_else(|_| defaults::default_server());
    let ca = std::env::var_os("ESCROW_CA").map(std::path::PathBuf::from);
    let broker = ClientConfig::new(server, defaults::trust(ca.as_deref(), None));

    let (mut db, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    db.batch_execute(
        "CREATE TABLE IF NOT EXISTS example_orders (id bigint PRIMARY KEY, customer text NOT NULL, total_cents bigint NOT NULL);
         CREATE TABLE IF NOT EXISTS example_shipments (order_id bigint PRIMARY KEY, customer text NOT NULL);",
    )
    .await?;
    let outbox = PgOutbox::new(&url, PgConfig::for_table("example_outbox"))?;
    outbox.migrate(&db).await?;
    let inbox = PgInbox::new("example_inbox")?;
    inbox.migrate(&db).await?;
    create_topic(&broker, "example-orders").await?;

    // The relay runs beside the service until the example ends.
    let relay = Relay::connect(outbox.clone(), broker.clone(), RelayConfig::default()).await?;
    let (stop_relay, relay_stopped) = tokio::sync::oneshot::channel::<()>();
    let relay = tokio::spawn(relay.run(async move {
        let _ = relay_stopped.await;
    }));

    // Place orders: business row and message in one transaction.
    let first: i64 = db
        .query_one("SELECT coalesce(max(id), 0) + 1 FROM example_orders", &[])
        .await?
        .try_get(0)?;
    let mut placed = 0;
    for id in first..first + ORDERS {
        let customer = format!("customer-{}", id % 4);
        let tx = db.transaction().await?;
        tx.execute(
            "INSERT INTO example_orders (id, customer, total_cents) VALUES ($1, $2, $3)",
            &[&id, &customer, &(id * 100)],
        )
        .await?;
        let event = format!(r#"{{"type":"OrderPlaced","order":{id},"customer":"{customer}"}}"#);
        outbox
            .enqueue(
                &tx,
                &NewMessage::new("example-orders", event).key(&customer),
            )
            .await?;
        if id % 10 == 0 {
            tx.rollback().await?; // payment declined: no order, no message
        } else {
            tx.commit().await?;
            placed += 1;
        }
    }
    println!(
        "placed {placed} orders (and rolled back {})",
        ORDERS - placed
    );

    // Shipping: one shipment per order, however often a message arrives.
    let consumer = Consumer::connect(&broker, "shipping", "example-orders").await?;
    let (mut shipping_db, connection) =
        tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let mut shipped = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while shipped < placed && Instant::now() < deadline {
        let batch = consumer
            .receive(100, Duration::from_secs(30), Duration::from_secs(1))
            .await?;
        let mut done = Vec::new();
        for delivery in batch {
            let event: serde_json::Value = serde_json::from_slice(&delivery.message.body)?;
            let order = event["order"].as_i64().unwrap_or_default();
            let customer = event["customer"].as_str().unwrap_or_default().to_string();
            let outcome = inbox
                .process(&mut shipping_db, &delivery.message.id, async |tx| {
                    tx.execute(
                        "INSERT INTO example_shipments (order_id, customer) VALUES ($1, $2)",
                        &[&order, &customer],
                    )
                    .await
                })
                .await?;
            if let Processed::Applied(_) = outcome {
                shipped += 1;
                println!("shipped order {order} for {customer}");
            }
            done.push(delivery.receipt);
        }
        if !done.is_empty() {
            consumer.ack(&done).await?;
        }
    }
    let status = outbox.status(&db).await?;
    println!(
        "shipped {shipped} of {placed}; outbox backlog {} rows, lag {} ms, parked {}",
        status.pending, status.lag_ms, status.parked
    );
    let _ = stop_relay.send(());
    relay.await??;
    anyhow::ensure!(shipped == placed, "not every order was shipped in time");
    Ok(())
}

async fn create_topic(broker: &ClientConfig, topic: &str) -> anyhow::Result<()> {
    let client = Client::connect(broker.clone()).await?;
    let create = Request::CreateTopic(CreateTopic {
        topic: topic.into(),
        queues: 4,
    });
    match client.request(&create).await {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some(ErrorCode::TOPIC_EXISTS) => Ok(()),
        Err(e) => Err(e.into()),
    }
}
