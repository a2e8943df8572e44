//! `escrow group …` and `escrow dlq …`: consumer-group lag and dead letters.

use super::ConnArgs;
use clap::Subcommand;
use escrow_client::unexpected;
use escrow_proto::{Request, Response};

#[derive(Debug, Subcommand)]
pub(crate) enum GroupCommand {
    /// Consumer groups with acked and backlog counts, per topic.
    List,
    /// Per queue: published, acked, in flight and backlog of one group.
    Lag {
        /// Topic name.
        #[arg(long)]
        topic: String,
        /// Consumer group.
        #[arg(long)]
        group: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum DlqCommand {
    /// Dead letters of a group not redriven yet.
    List {
        /// Consumer group.
        #[arg(long)]
        group: String,
        /// Most entries to show.
        #[arg(long, default_value_t = 100)]
        max: u32,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Deliver dead letters to their group again (as new messages, delivery count reset).
    Redrive {
        /// Consumer group.
        #[arg(long)]
        group: String,
        /// Most entries to redrive.
        #[arg(long, default_value_t = 1000)]
        max: u32,
    },
}

pub(crate) async fn run_group(conn: &ConnArgs, command: GroupCommand) -> anyhow::Result<()> {
    let client = conn.connect().await?;
    match command {
        GroupCommand::List => match client.request(&Request::ListGroups).await? {
            Response::Groups(groups) => {
                println!("TOPIC\tGROUP\tACKED\tBACKLOG");
                for g in groups {
                    println!("{}\t{}\t{}\t{}", g.topic, g.group, g.acked, g.backlog);
                }
                Ok(())
            }
            other => Err(unexpected("list_groups", &other).into()),
        },
        GroupCommand::Lag { topic, group } => {
            match client.request(&Request::GroupLag { topic, group }).await? {
                Response::Lag(queues) => {
                    println!("QUEUE\tPUBLISHED\tACKED\tIN_FLIGHT\tBACKLOG");
                    for q in &queues {
                        println!(
                            "{}\t{}\t{}\t{}\t{}",
                            q.queue, q.published, q.acked, q.in_flight, q.backlog
                        );
                    }
                    let sum =
                        |f: fn(&escrow_proto::QueueLag) -> u64| queues.iter().map(f).sum::<u64>();
                    println!(
                        "total\t{}\t{}\t{}\t{}",
                        sum(|q| q.published),
                        sum(|q| q.acked),
                        sum(|q| q.in_flight),
                        sum(|q| q.backlog)
                    );
                    Ok(())
                }
                other => Err(unexpected("group_lag", &other).into()),
            }
        }
    }
}

pub(crate) async fn run_dlq(conn: &ConnArgs, command: DlqCommand) -> anyhow::Result<()> {
    let client = conn.connect().await?;
    match command {
        DlqCommand::List { group, max, json } => {
            match client.request(&Request::DlqList { group, max }).await? {
                Response::DeadLetters(letters) => {
                    if !json {
                        println!("DLQ_OFFSET\tTOPIC\tQUEUE\tOFFSET\tDELIVERIES\tID");
                    }
                    for d in letters {
                        if json {
                            println!(
                                "{}",
                                serde_json::json!({
                                    "dlq_offset": d.position.offset,
                                    "topic": d.topic,
                                    "queue": d.origin.queue,
                                    "offset": d.origin.offset,
                                    "deliveries": d.deliveries,
                                    "dead_at_ms": d.dead_at_ms,
                                    "id": d.message.id,
                                    "body": String::from_utf8_lossy(&d.message.body),
                                })
                            );
                        } else {
                            println!(
                                "{}\t{}\t{}\t{}\t{}\t{}",
                                d.position.offset,
                                d.topic,
                                d.origin.queue,
                                d.origin.offset,
                                d.deliveries,
                                d.message.id
                            );
                        }
                    }
                    Ok(())
                }
                other => Err(unexpected("dlq_list", &other).into()),
            }
        }
        DlqCommand::Redrive { group, max } => {
            match client.request(&Request::DlqRedrive { group, max }).await? {
                Response::Redriven(n) => {
                    println!("redriven {n}");
                    Ok(())
                }
                other => Err(unexpected("dlq_redrive", &other).into()),
            }
        }
    }
}
