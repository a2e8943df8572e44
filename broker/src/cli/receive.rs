use super::ConnArgs;
use clap::Args;
use escrow_consumer::Consumer;
use escrow_proto::Delivery;
use std::io::Write;
use std::time::Duration;

#[derive(Debug, Args)]
pub(crate) struct ReceiveArgs {
    /// Topic to read.
    #[arg(long)]
    topic: String,
    /// Consumer group.
    #[arg(long)]
    group: String,
    /// Stop after this many messages.
    #[arg(long, default_value_t = 1)]
    max: u64,
    /// Seconds to wait for more messages before stopping.
    #[arg(long, default_value_t = 2.0)]
    wait: f64,
    /// Seconds a received message stays invisible to the group unless acked.
    #[arg(long, default_value_t = 30.0)]
    invisible: f64,
    /// Acknowledge the messages after printing them.
    #[arg(long)]
    ack: bool,
    /// Print one JSON object per message (id, queue, offset, key, headers, body, ...).
    #[arg(long)]
    json: bool,
}

fn json_line(d: &Delivery) -> serde_json::Value {
    serde_json::json!({
        "id": d.message.id,
        "topic": d.topic,
        "queue": d.position.queue,
        "offset": d.position.offset,
        "key": d.message.key,
        "message_group": d.message.message_group,
        "tags": d.message.tags,
        "headers": d.message.headers,
        "body": String::from_utf8_lossy(&d.message.body),
        "born_at_ms": d.message.born_at_ms,
        "stored_at_ms": d.stored_at_ms,
        "delivery_count": d.delivery_count,
    })
}

fn seconds(s: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(s).map_err(|e| anyhow::anyhow!("invalid duration {s}: {e}"))
}

pub(crate) async fn run(conn: &ConnArgs, args: ReceiveArgs) -> anyhow::Result<()> {
    let consumer = Consumer::on(conn.connect().await?, &args.group, &args.topic);
    let wait = seconds(args.wait)?;
    let invisible = seconds(args.invisible)?;
    let mut received = 0u64;
    while received < args.max {
        let want = (args.max - received).min(u64::from(escrow_proto::MAX_RECEIVE_MESSAGES)) as u32;
        let batch = consumer.receive(want, invisible, wait).await?;
        if batch.is_empty() {
            break;
        }
        {
            let mut out = std::io::stdout().lock();
            for d in &batch {
                if args.json {
                    writeln!(out, "{}", json_line(d))?;
                } else {
                    out.write_all(&d.message.body)?;
                    out.write_all(b"\n")?;
                }
            }
            out.flush()?;
        }
        received += batch.len() as u64;
        if args.ack {
            let receipts: Vec<_> = batch.iter().map(|d| d.receipt).collect();
            let result = consumer.ack(&receipts).await?;
            if !result.rejected.is_empty() {
                eprintln!(
                    "escrow: {} acks were rejected (first: {:?})",
                    result.rejected.len(),
                    result.rejected[0]
                );
            }
        }
    }
    Ok(())
}
