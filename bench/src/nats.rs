//! A peer in the same run: the publish scenario against NATS JetStream (`--features nats`,
//! `bench/compare-nats.sh`). Every message is acknowledged by JetStream once stored on the
//! stream's replicas; with `sync_interval: always` that includes their fsync.

use crate::peer::Acks;
use crate::report::Report;
use crate::scenarios::Load;
use anyhow::Context;
use async_nats::jetstream::{self, stream};
use clap::Args;
use std::time::Instant;

#[derive(Debug, Args)]
pub(crate) struct NatsArgs {
    /// NATS server URL.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    url: String,
    /// Stream made for the run (deleted first if it exists); its subject is `<stream>.bench`.
    #[arg(long, default_value = "ESCROWBENCH")]
    stream: String,
    /// Replicas of the stream.
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    #[command(flatten)]
    load: Load,
}

pub(crate) async fn publish(args: NatsArgs) -> anyhow::Result<Report> {
    let client = async_nats::connect(&args.url)
        .await
        .with_context(|| format!("connecting to {}", args.url))?;
    let js = jetstream::new(client);
    let subject = format!("{}.bench", args.stream);
    let _ = js.delete_stream(&args.stream).await;
    js.create_stream(stream::Config {
        name: args.stream.clone(),
        subjects: vec![subject.clone()],
        num_replicas: args.replicas,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .context("creating the stream")?;
    let body = bytes::Bytes::from(vec![b'x'; args.load.size]);
    let mut acks = Acks::new(args.load.window);
    for _ in 0..args.load.count {
        acks.make_room().await;
        let sent = Instant::now();
        let ack = js.publish(subject.clone(), body.clone()).await?;
        acks.track(sent, async move {
            ack.await.map(|_| ()).map_err(|e| e.to_string())
        });
    }
    let parameters = serde_json::json!({
        "url": args.url, "replicas": args.replicas, "size": args.load.size,
        "count": args.load.count, "window": args.load.window,
    });
    let report = acks.finish("nats-publish", parameters, &args.load).await;
    let _ = js.delete_stream(&args.stream).await;
    Ok(report)
}
