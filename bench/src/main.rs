//! `escrow-bench`: named benchmark scenarios against a running broker.
//!
//! ```text
//! escrow-bench publish --size 1024 --count 200000 --window 256 --producers 1
//! escrow-bench drain --consumers 4 --count 200000
//! escrow-bench consume --consumers 4 --rate 5000 --count 50000
//! escrow-bench txn --window 256 --count 50000
//! escrow-bench outbox --database-url postgresql://postgres@127.0.0.1/postgres --rows 200000
//! escrow-bench disk --dir /tmp     # the machine's fdatasync time, no broker involved
//! escrow-bench nats-publish --url nats://127.0.0.1:14222 --replicas 3   # --features nats
//! escrow-bench rabbitmq-publish --url amqp://guest:guest@127.0.0.1:5672/%2f   # --features rabbitmq
//! ```
//! Reports msgs/s, MB/s, latency percentiles and the broker's fsync count; `--json FILE`
//! writes the same as a machine-readable report.

mod consume;
mod disk;
#[cfg(feature = "nats")]
mod nats;
mod outbox;
#[cfg(any(feature = "nats", feature = "rabbitmq"))]
mod peer;
#[cfg(feature = "rabbitmq")]
mod rabbitmq;
mod report;
mod scenarios;
mod txn;

use clap::{Args, Parser, Subcommand};
use escrow_client::{defaults, ClientConfig};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(name = "escrow-bench", about = "Escrow benchmark scenarios")]
struct Cli {
    #[command(flatten)]
    conn: ConnArgs,
    /// Write a JSON report to this file.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Args)]
struct ConnArgs {
    /// Broker address (host:port); defaults to where `escrow dev` listens.
    #[arg(long, global = true, env = "ESCROW_SERVER")]
    server: Option<String>,
    /// CA certificate (PEM); defaults to `escrow dev`'s.
    #[arg(long, global = true, env = "ESCROW_CA")]
    ca: Option<PathBuf>,
}

impl ConnArgs {
    fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new(
            self.server.clone().unwrap_or_else(defaults::default_server),
            defaults::trust(self.ca.as_deref(), None),
        );
        c.client_name = "escrow-bench".into();
        c
    }
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Durable publishing: every message acknowledged after commit and fsync.
    Publish(scenarios::PublishArgs),
    /// Consumer-group drain: receive and ack everything in a topic.
    Drain(scenarios::DrainArgs),
    /// Live end to end: publish at a steady rate while push consumers handle the messages.
    Consume(consume::ConsumeArgs),
    /// Transactional publishing: half message + commit each, many in flight.
    Txn(txn::TxnArgs),
    /// Outbox relay: PostgreSQL outbox rows published into the broker and marked sent.
    Outbox(outbox::OutboxArgs),
    /// The disk's floor, no broker: small writes each followed by fdatasync.
    Disk(disk::DiskArgs),
    /// The publish scenario against NATS JetStream, for comparison.
    #[cfg(feature = "nats")]
    NatsPublish(nats::NatsArgs),
    /// The publish scenario against a RabbitMQ quorum queue, for comparison.
    #[cfg(feature = "rabbitmq")]
    RabbitmqPublish(rabbitmq::RabbitArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let client = cli.conn.client();
    let report = match cli.scenario {
        Scenario::Publish(args) => scenarios::publish(&client, args).await?,
        Scenario::Drain(args) => scenarios::drain(&client, args).await?,
        Scenario::Consume(args) => consume::consume(&client, args).await?,
        Scenario::Txn(args) => txn::txn(&client, args).await?,
        Scenario::Outbox(args) => outbox::outbox(&client, args).await?,
        Scenario::Disk(args) => disk::disk(args)?,
        #[cfg(feature = "nats")]
        Scenario::NatsPublish(args) => nats::publish(args).await?,
        #[cfg(feature = "rabbitmq")]
        Scenario::RabbitmqPublish(args) => rabbitmq::publish(args).await?,
    };
    report.print();
    if let Some(path) = cli.json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
        eprintln!("report written to {}", path.display());
    }
    Ok(())
}
