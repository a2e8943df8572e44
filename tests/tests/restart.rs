//! Everything acknowledged survives a restart; acked progress does too.

use escrow_client::Client;
use escrow_consumer::Consumer;
use escrow_producer::{Producer, ProducerConfig};
use escrow_proto::{CreateTopic, Message, Request};
use escrow_tests::{drain_ids, TestNode};
use std::collections::BTreeSet;
use std::time::Duration;

#[tokio::test]
async fn acknowledged_messages_and_progress_survive_restart() -> anyhow::Result<()> {
    let mut node = TestNode::start().await?;
    let conn = Client::connect(node.client()).await?;
    conn.request(&Request::CreateTopic(CreateTopic {
        topic: "t".into(),
        queues: 3,
    }))
    .await?;
    let producer = Producer::connect(ProducerConfig::new(node.client())).await?;
    let mut sent = BTreeSet::new();
    for i in 0..300 {
        let id = format!("m{i}");
        producer
            .send("t", Message::new(id.clone(), id.clone().into_bytes()))
            .await?;
        sent.insert(id);
    }
    // Ack the first 100 received; leave 100 more leased but unacked.
    let consumer = Consumer::on(conn.clone(), "g", "t");
    let acked: BTreeSet<String> = {
        let batch = consumer
            .receive(100, Duration::from_secs(60), Duration::ZERO)
            .await?;
        consumer
            .ack(&batch.iter().map(|d| d.receipt).collect::<Vec<_>>())
            .await?;
        batch.into_iter().map(|d| d.message.id).collect()
    };
    assert_eq!(acked.len(), 100);
    let leased = consumer
        .receive(100, Duration::from_secs(60), Duration::ZERO)
        .await?;
    assert_eq!(leased.len(), 100);
    drop((conn, producer, consumer));

    node.restart().await?;

    let conn = Client::connect(node.client()).await?;
    let consumer = Consumer::on(conn, "g", "t");
    let after = drain_ids(&consumer, Duration::from_millis(200)).await?;
    // Leases are soft state: the 100 leased-but-unacked come back, the 100 acked never do.
    let expected: BTreeSet<String> = sent.difference(&acked).cloned().collect();
    assert_eq!(after, expected);
    Ok(())
}
