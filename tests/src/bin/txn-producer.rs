//! A transactional producer process for the check-back test (`tests/tests/transactions.rs`).
//!
//! `txn-producer SERVER CA GROUP TOPIC STORE half-then-hang N`: sends N half messages
//! `order-0..N`, runs the local transaction (a row in the redb file STORE) for the even
//! ones, prints `ready`, and hangs without ending any transaction (to be SIGKILLed).
//!
//! `txn-producer SERVER CA GROUP TOPIC STORE check`: answers check-backs for GROUP from
//! STORE (row present: commit; absent: rollback), prints `checking`, runs until killed.

use escrow_client::{ClientConfig, Trust};
use escrow_producer::txn::{TransactionChecker, TransactionalProducer};
use escrow_proto::txn::{TxnCheck, TxnDecision};
use escrow_proto::Message;
use redb::{Database, ReadableDatabase, TableDefinition};
use std::io::Write;
use std::sync::Arc;

const ORDERS: TableDefinition<&str, u64> = TableDefinition::new("orders");

struct OrdersStore(Arc<Database>);

impl TransactionChecker for OrdersStore {
    async fn check(&self, check: &TxnCheck) -> TxnDecision {
        let found = self.0.begin_read().ok().and_then(|txn| {
            let table = txn.open_table(ORDERS).ok()?;
            table
                .get(check.message.id.as_str())
                .ok()
                .map(|v| v.is_some())
        });
        match found {
            Some(true) => TxnDecision::Commit,
            Some(false) => TxnDecision::Rollback,
            None => TxnDecision::Unknown,
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [server, ca, group, topic, store, mode, rest @ ..] = args.as_slice() else {
        anyhow::bail!("usage: txn-producer SERVER CA GROUP TOPIC STORE (half-then-hang N | check)");
    };
    let db = Arc::new(Database::create(store)?);
    {
        let txn = db.begin_write()?;
        txn.open_table(ORDERS)?;
        txn.commit()?;
    }
    let client = ClientConfig::new(server.as_str(), Trust::CaFile(ca.into()));
    let producer =
        TransactionalProducer::connect(client, group.as_str(), OrdersStore(db.clone())).await?;
    match mode.as_str() {
        "half-then-hang" => {
            let n: u64 = rest.first().map_or(Ok(4), |n| n.parse())?;
            let mut pending = Vec::new();
            for i in 0..n {
                let id = format!("order-{i}");
                pending.push(
                    producer
                        .send_half(topic, Message::new(&id, id.clone().into_bytes()))
                        .await?,
                );
                if i % 2 == 0 {
                    let txn = db.begin_write()?;
                    txn.open_table(ORDERS)?.insert(id.as_str(), i)?;
                    txn.commit()?;
                }
            }
            println!("ready");
            std::io::stdout().flush()?;
            // Crash point: between the local transaction and EndTxn.
            std::future::pending::<()>().await;
        }
        "check" => {
            println!("checking");
            std::io::stdout().flush()?;
            std::future::pending::<()>().await;
        }
        other => anyhow::bail!("unknown mode {other:?}"),
    }
    Ok(())
}
