//! A peer in the same run: the publish scenario against a RabbitMQ quorum queue
//! (`--features rabbitmq`, `bench/compare-rabbitmq.sh`). Messages are persistent and every
//! one is acknowledged by a publisher confirm, which a quorum queue sends once the message
//! is in its Raft log, fsynced, on a majority of its replicas.

use crate::peer::Acks;
use crate::report::Report;
use crate::scenarios::Load;
use anyhow::Context;
use clap::Args;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use std::time::Instant;

#[derive(Debug, Args)]
pub(crate) struct RabbitArgs {
    /// AMQP URL.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    url: String,
    /// Quorum queue made for the run (deleted first if it exists).
    #[arg(long, default_value = "escrow-bench")]
    queue: String,
    #[command(flatten)]
    load: Load,
}

/// Persistent messages (AMQP delivery mode 2).
const PERSISTENT: u8 = 2;

pub(crate) async fn publish(args: RabbitArgs) -> anyhow::Result<Report> {
    let connection = Connection::connect(&args.url, ConnectionProperties::default())
        .await
        .with_context(|| format!("connecting to {}", args.url))?;
    let channel = connection.create_channel().await?;
    let _ = channel
        .queue_delete(args.queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let mut queue_args = FieldTable::default();
    queue_args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    channel
        .queue_declare(
            args.queue.as_str().into(),
            QueueDeclareOptions::durable(),
            queue_args,
        )
        .await
        .context("declaring the quorum queue")?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let body = vec![b'x'; args.load.size];
    let mut confirms = Acks::new(args.load.window);
    for _ in 0..args.load.count {
        confirms.make_room().await;
        let sent = Instant::now();
        let confirm = channel
            .basic_publish(
                "".into(),
                args.queue.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default().with_delivery_mode(PERSISTENT),
            )
            .await?;
        confirms.track(sent, async move {
            match confirm.await {
                Ok(c) if c.is_ack() => Ok(()),
                Ok(_) => Err("nacked".to_string()),
                Err(e) => Err(e.to_string()),
            }
        });
    }
    let parameters = serde_json::json!({
        "url": args.url, "queue": args.queue, "size": args.load.size,
        "count": args.load.count, "window": args.load.window,
    });
    let report = confirms
        .finish("rabbitmq-publish", parameters, &args.load)
        .await;
    let _ = channel
        .queue_delete(args.queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = connection.close(200, "done".into()).await;
    Ok(report)
}
