use super::ConnArgs;
use anyhow::{bail, Context};
use clap::Args;
use escrow_producer::{Producer, ProducerConfig};
use escrow_proto::Message;
use std::collections::VecDeque;
use tokio::io::AsyncBufReadExt;

#[derive(Debug, Args)]
pub(crate) struct SendArgs {
    /// Topic to publish to.
    #[arg(long)]
    topic: String,
    /// Routing key (messages with one key keep their order in one queue).
    #[arg(long)]
    key: Option<String>,
    /// FIFO message group: delivered one at a time, in order, within each consumer group.
    #[arg(long)]
    message_group: Option<String>,
    /// Deliver no earlier than this many milliseconds from now.
    #[arg(long)]
    delay_ms: Option<u64>,
    /// Header `name=value` (repeatable).
    #[arg(long = "header", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// Sends in flight at once when reading standard input.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Message body; without it, every line of standard input is one message.
    body: Option<String>,
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("header {s:?} is not name=value"))
}

impl SendArgs {
    fn message(&self, body: Vec<u8>) -> Message {
        let mut message = Message::new("", body);
        message.key = self.key.clone();
        message.message_group = self.message_group.clone();
        message.deliver_at_ms = self
            .delay_ms
            .map(|d| escrow_client::now_ms().saturating_add(d));
        message.headers = self.headers.iter().cloned().collect();
        message
    }
}

pub(crate) async fn run(conn: &ConnArgs, args: SendArgs) -> anyhow::Result<()> {
    let mut config = ProducerConfig::new(conn.client_config());
    config.window = args.window.max(1);
    let server = config.client.server.clone();
    let producer = Producer::connect(config)
        .await
        .with_context(|| format!("connecting to {server}"))?;
    if let Some(body) = &args.body {
        let receipt = producer
            .send(&args.topic, args.message(body.clone().into_bytes()))
            .await?;
        println!(
            "sent queue={} offset={} commit_index={}",
            receipt.position.queue, receipt.position.offset, receipt.durability.commit_index
        );
        return Ok(());
    }
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut pending = VecDeque::new();
    let (mut sent, mut failed) = (0u64, 0u64);
    let mut first_error = None;
    let mut settle = |result: Result<_, escrow_producer::ProducerError>| match result {
        Ok(_) => sent += 1,
        Err(e) => {
            failed += 1;
            first_error.get_or_insert(e);
        }
    };
    while let Some(line) = lines.next_line().await.context("reading standard input")? {
        while pending.len() >= args.window {
            if let Some(p) = pending.pop_front() {
                settle(escrow_producer::PendingSend::wait(p).await);
            }
        }
        pending.push_back(
            producer
                .send_async(&args.topic, args.message(line.into_bytes()))
                .await?,
        );
    }
    for p in pending {
        settle(p.wait().await);
    }
    eprintln!("sent {sent} messages, {failed} failed");
    if let Some(e) = first_error {
        bail!(
            "{failed} of {} sends failed; first error: {e}",
            sent + failed
        );
    }
    Ok(())
}
