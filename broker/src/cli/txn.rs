//! `escrow txn …`: pending transactions, and resolving one by hand.

use super::ConnArgs;
use clap::Subcommand;
use escrow_client::unexpected;
use escrow_proto::txn::{EndTxn, TxnDecision, TxnSource};
use escrow_proto::{Request, Response};

#[derive(Debug, Subcommand)]
pub(crate) enum TxnCommand {
    /// Pending half messages: id, topic, producer group, age, checks made.
    List {
        /// Most to show.
        #[arg(long, default_value_t = 1000)]
        max: u32,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Commit a pending transaction: its message becomes visible.
    Commit {
        /// Transaction id (from `escrow txn list`).
        id: u64,
    },
    /// Roll back a pending transaction: its message is discarded.
    Rollback {
        /// Transaction id (from `escrow txn list`).
        id: u64,
    },
}

pub(crate) async fn run(conn: &ConnArgs, command: TxnCommand) -> anyhow::Result<()> {
    let client = conn.connect().await?;
    let (id, decision) = match command {
        TxnCommand::List { max, json } => {
            return match client.request(&Request::ListTxns { max }).await? {
                Response::Txns(txns) => {
                    let now = escrow_client::now_ms();
                    if !json {
                        println!(
                            "ID\tTOPIC\tPRODUCER_GROUP\tAGE_S\tCHECKS\tNEXT_CHECK_S\tMESSAGE_ID"
                        );
                    }
                    for t in txns {
                        let age = now.saturating_sub(t.stored_at_ms) as f64 / 1000.0;
                        let next = t.next_check_at_ms.saturating_sub(now) as f64 / 1000.0;
                        if json {
                            println!(
                                "{}",
                                serde_json::json!({
                                    "id": t.txn_id, "topic": t.topic,
                                    "producer_group": t.producer_group, "instance": t.instance,
                                    "message_id": t.message_id, "age_ms": now.saturating_sub(t.stored_at_ms),
                                    "checks": t.checks, "next_check_at_ms": t.next_check_at_ms,
                                })
                            );
                        } else {
                            println!(
                                "{}\t{}\t{}\t{age:.1}\t{}\t{next:.1}\t{}",
                                t.txn_id, t.topic, t.producer_group, t.checks, t.message_id
                            );
                        }
                    }
                    Ok(())
                }
                other => Err(unexpected("list_txns", &other).into()),
            };
        }
        TxnCommand::Commit { id } => (id, TxnDecision::Commit),
        TxnCommand::Rollback { id } => (id, TxnDecision::Rollback),
    };
    let request = Request::EndTxn(EndTxn {
        txn_id: id,
        decision,
        source: TxnSource::Operator,
    });
    match client.request(&request).await? {
        Response::TxnEnded(outcome) => {
            println!("transaction {id}: {:?}", outcome.state);
            Ok(())
        }
        other => Err(unexpected("end_txn", &other).into()),
    }
}
