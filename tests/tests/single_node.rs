//! Publish, receive, ack, leases and group commit over real QUIC on loopback.

use escrow_client::Client;
use escrow_consumer::Consumer;
use escrow_producer::{Producer, ProducerConfig};
use escrow_proto::{CreateTopic, ErrorCode, Message, Request, Response};
use escrow_tests::TestNode;
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

async fn create_topic(conn: &Client, name: &str, queues: u32) -> anyhow::Result<()> {
    let r = conn
        .request(&Request::CreateTopic(CreateTopic {
            topic: name.into(),
            queues,
        }))
        .await?;
    anyhow::ensure!(matches!(r, Response::Topic(ref t) if t.queues.len() == queues as usize));
    Ok(())
}

async fn stats(conn: &Client) -> anyhow::Result<escrow_proto::BrokerStats> {
    match conn.request(&Request::Stats).await? {
        Response::Stats(s) => Ok(s),
        other => anyhow::bail!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn publish_receive_ack_and_group_commit() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let conn = Client::connect(node.client()).await?;
    create_topic(&conn, "orders", 4).await?;
    let before = stats(&conn).await?;

    let producer = Producer::connect(ProducerConfig::new(node.client())).await?;
    let mut pending = Vec::new();
    for i in 0..2000 {
        let mut m = Message::new("", format!("order-{i}").into_bytes());
        m.key = Some(format!("customer-{}", i % 10));
        pending.push(producer.send_async("orders", m).await?);
    }
    let mut per_key_offsets: HashMap<u32, Vec<u64>> = HashMap::new();
    for p in pending {
        let r = p.wait().await?;
        assert_eq!(r.durability.fsynced_replicas, 1);
        per_key_offsets
            .entry(r.position.queue)
            .or_default()
            .push(r.position.offset);
    }
    let after = stats(&conn).await?;
    let fsyncs = after.fsyncs - before.fsyncs;
    assert_eq!(after.messages_appended - before.messages_appended, 2000);
    assert!(
        fsyncs < 1000,
        "group commit should share fsyncs between concurrent publishes, got {fsyncs} for 2000 messages"
    );

    // Two groups each see every message once; within a queue, in offset order.
    for group in ["billing", "shipping"] {
        let consumer = Consumer::on(conn.clone(), group, "orders");
        let mut bodies = BTreeSet::new();
        let mut last_offset: HashMap<u32, u64> = HashMap::new();
        loop {
            let batch = consumer
                .receive(300, Duration::from_secs(30), Duration::from_millis(200))
                .await?;
            if batch.is_empty() {
                break;
            }
            for d in &batch {
                assert!(bodies.insert(d.message.body.clone()), "duplicate delivery");
                assert_eq!(d.delivery_count, 1);
                if let Some(prev) = last_offset.insert(d.position.queue, d.position.offset) {
                    assert!(d.position.offset > prev, "queue order broken");
                }
            }
            let receipts: Vec<_> = batch.iter().map(|d| d.receipt).collect();
            let acked = consumer.ack(&receipts).await?;
            assert_eq!(acked.applied as usize, receipts.len());
            assert!(acked.rejected.is_empty());
        }
        assert_eq!(bodies.len(), 2000, "group {group} saw every message");
    }
    node.broker.expect("running").shutdown().await;
    Ok(())
}

#[tokio::test]
async fn unacked_messages_come_back_after_their_invisibility() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let conn = Client::connect(node.client()).await?;
    create_topic(&conn, "t", 1).await?;
    let producer = Producer::connect(ProducerConfig::new(node.client())).await?;
    producer
        .send("t", Message::new("m1", b"one".to_vec()))
        .await?;
    producer
        .send("t", Message::new("m2", b"two".to_vec()))
        .await?;
    let a = Consumer::on(conn.clone(), "g", "t");
    let b = Consumer::on(Client::connect(node.client()).await?, "g", "t");

    let first = a
        .receive(1, Duration::from_millis(300), Duration::ZERO)
        .await?;
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].message.id, "m1");
    // While leased, another consumer of the group gets the next message only.
    let other = b
        .receive(10, Duration::from_secs(30), Duration::ZERO)
        .await?;
    assert_eq!(
        other
            .iter()
            .map(|d| d.message.id.as_str())
            .collect::<Vec<_>>(),
        ["m2"]
    );
    // After the lease expires, m1 is delivered again with a higher count (long poll wakes for it).
    let again = b
        .receive(10, Duration::from_secs(30), Duration::from_secs(2))
        .await?;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].message.id, "m1");
    assert_eq!(again[0].delivery_count, 2);
    // The first holder's receipt is stale now that b holds a live lease.
    let stale = a.ack(&[first[0].receipt]).await?;
    assert_eq!(stale.applied, 0);
    assert_eq!(stale.rejected[0].1, ErrorCode::RECEIPT_STALE);
    // Nack gives it back at once; ack then removes it for good.
    let nacked = b.nack(&[again[0].receipt], Duration::ZERO).await?;
    assert_eq!(nacked.applied, 1);
    let third = a
        .receive(10, Duration::from_secs(30), Duration::ZERO)
        .await?;
    assert_eq!(third.len(), 1);
    assert_eq!(third[0].delivery_count, 3);
    a.change_invisibility(third[0].receipt, Duration::from_secs(60))
        .await?;
    a.ack(&[third[0].receipt, other[0].receipt]).await?;
    let none = a
        .receive(10, Duration::from_millis(1), Duration::from_millis(300))
        .await?;
    assert!(none.is_empty(), "acked messages never come back: {none:?}");
    Ok(())
}

#[tokio::test]
async fn long_poll_wakes_on_publish() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let conn = Client::connect(node.client()).await?;
    create_topic(&conn, "t", 2).await?;
    let consumer = Consumer::on(conn.clone(), "g", "t");
    let waiting = tokio::spawn(async move {
        let started = std::time::Instant::now();
        let got = consumer
            .receive(10, Duration::from_secs(30), Duration::from_secs(10))
            .await;
        (got, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let producer = Producer::connect(ProducerConfig::new(node.client())).await?;
    producer.send("t", Message::new("x", b"x".to_vec())).await?;
    let (got, elapsed) = waiting.await?;
    assert_eq!(got?.len(), 1);
    assert!(
        elapsed < Duration::from_secs(5),
        "woke on publish, not at the deadline"
    );
    Ok(())
}

#[tokio::test]
async fn message_ids_are_deduplicated_across_producers_and_restarts() -> anyhow::Result<()> {
    let mut node = TestNode::start().await?;
    let conn = Client::connect(node.client()).await?;
    create_topic(&conn, "relayed", 2).await?;
    let config = || ProducerConfig {
        dedupe_by_id: true,
        ..ProducerConfig::new(node.client())
    };
    let message = |i: usize| {
        let mut m = Message::new(format!("outbox-{i}"), vec![i as u8]);
        m.key = Some(format!("k{}", i % 3));
        m
    };
    // Two producers (as two relays after a crash would) publish overlapping ids.
    let first = Producer::connect(config()).await?;
    let original = first
        .send_batch("relayed", (0..100).map(message).collect())
        .await?;
    let second = Producer::connect(config()).await?;
    let replay = second
        .send_batch("relayed", (50..150).map(message).collect())
        .await?;
    assert_eq!(
        replay.positions[..50],
        original.positions[50..],
        "a republished id is answered with its original position"
    );
    drop((first, second));
    node.restart().await?;
    let third = Producer::connect(ProducerConfig {
        dedupe_by_id: true,
        ..ProducerConfig::new(node.client())
    })
    .await?;
    third
        .send_batch("relayed", (140..160).map(message).collect())
        .await?;
    // Without the flag an id is not checked: plain producers pay nothing for dedup.
    let plain = Producer::connect(ProducerConfig::new(node.client())).await?;
    plain.send("relayed", message(0)).await?;

    let consumer = Consumer::connect(&node.client(), "g", "relayed").await?;
    let mut seen: HashMap<String, usize> = HashMap::new();
    loop {
        let batch = consumer
            .receive(1000, Duration::from_secs(60), Duration::from_millis(300))
            .await?;
        if batch.is_empty() {
            break;
        }
        for d in batch {
            *seen.entry(d.message.id).or_default() += 1;
        }
    }
    assert_eq!(seen.len(), 160);
    assert_eq!(seen["outbox-0"], 2, "the plain publish is stored again");
    assert!(seen
        .iter()
        .all(|(id, n)| *n == 1 || id.as_str() == "outbox-0"));
    node.stop().await;
    Ok(())
}

/// Frames of many QUIC packets are reassembled byte for byte, both ways.
#[tokio::test]
async fn the_largest_bodies_arrive_intact() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let conn = Client::connect(node.client()).await?;
    create_topic(&conn, "blobs", 1).await?;
    let producer = Producer::connect(ProducerConfig::new(node.client())).await?;
    // A pattern with a long period, so a misplaced or repeated packet shows.
    let body = |seed: usize| -> Vec<u8> {
        (0..escrow_proto::MAX_BODY_LEN)
            .map(|i| ((i * 31 + i / 251 + seed) % 253) as u8)
            .collect()
    };
    for seed in 0..2 {
        producer
            .send("blobs", Message::new(format!("blob-{seed}"), body(seed)))
            .await?;
    }
    let consumer = Consumer::on(conn.clone(), "readers", "blobs");
    let mut seen = 0;
    while seen < 2 {
        let batch = consumer
            .receive(1, Duration::from_secs(30), Duration::from_secs(2))
            .await?;
        anyhow::ensure!(!batch.is_empty(), "only {seen} of 2 blobs came back");
        for d in batch {
            let seed = if d.message.id == "blob-0" { 0 } else { 1 };
            assert_eq!(d.message.body.len(), escrow_proto::MAX_BODY_LEN);
            assert!(
                d.message.body == body(seed),
                "{} came back altered",
                d.message.id
            );
            consumer.ack(&[d.receipt]).await?;
            seen += 1;
        }
    }
    Ok(())
}

/// Loopback carries datagrams far above Ethernet's 1452 bytes; MTU discovery must find
/// that, or every replication batch goes out in four times as many packets.
#[tokio::test]
async fn loopback_connections_grow_past_the_ethernet_mtu() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let conn = escrow_client::Connection::connect(&node.client()).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        // Requests keep the connection busy while discovery probes.
        conn.request(&Request::Stats).await?;
        let mtu = conn.quic().stats().path.current_mtu;
        if mtu > 1452 {
            assert!(
                mtu <= escrow_client::MAX_UDP_PAYLOAD,
                "mtu {mtu} above the bound"
            );
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "path MTU still {mtu} after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
