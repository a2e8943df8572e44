//! Consumer groups over real QUIC: fan-out to groups, sharing within a group, retries
//! with delivery counts, dead letters and redrive, FIFO message groups, delay messages.

use escrow_client::Client;
use escrow_consumer::{Consumer, PushOptions};
use escrow_producer::{Producer, ProducerConfig};
use escrow_proto::{CreateTopic, Message, Request, Response};
use escrow_tests::TestNode;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

async fn topic(node: &TestNode, name: &str, queues: u32) -> anyhow::Result<Client> {
    let client = Client::connect(node.client()).await?;
    let r = client
        .request(&Request::CreateTopic(CreateTopic {
            topic: name.into(),
            queues,
        }))
        .await?;
    anyhow::ensure!(matches!(r, Response::Topic(_)), "create topic: {r:?}");
    Ok(client)
}

/// A tiny deterministic pseudo-random number (no dependency needed for jitter).
fn jitter(seed: u64) -> u64 {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^ (x >> 29)
}

/// Runs `consumers` push consumers of `group` until `done` says stop (or 60 s pass).
async fn run_consumers<F, Fut>(
    node: &TestNode,
    group: &str,
    topic: &str,
    consumers: usize,
    concurrency: usize,
    handler: F,
    done: impl Fn() -> bool,
) -> anyhow::Result<u64>
where
    F: Fn(escrow_proto::Delivery) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut runs = Vec::new();
    for _ in 0..consumers {
        let consumer = Consumer::connect(&node.client(), group, topic).await?;
        let handler = handler.clone();
        let mut stop = stop_rx.clone();
        let options = PushOptions {
            concurrency,
            wait: Duration::from_millis(200),
            ..PushOptions::default()
        };
        runs.push(tokio::spawn(async move {
            consumer
                .run(options, handler, async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop_tx.send_replace(true);
    let mut acked = 0;
    for run in runs {
        acked += run.await??.acked;
    }
    Ok(acked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_group_gets_everything_and_a_group_shares_the_work() -> anyhow::Result<()> {
    const N: usize = 2000;
    let node = TestNode::start().await?;
    let client = topic(&node, "orders", 4).await?;
    let producer = Producer::connect(ProducerConfig::new(node.client())).await?;
    for chunk in (0..N).collect::<Vec<_>>().chunks(500) {
        let batch = chunk
            .iter()
            .map(|i| Message::new(format!("o-{i}"), vec![1]))
            .collect();
        producer.send_batch("orders", batch).await?;
    }

    // Group "audit": one consumer sees all N.
    let audit = Consumer::connect(&node.client(), "audit", "orders").await?;
    let seen = escrow_tests::drain_ids(&audit, Duration::from_millis(300)).await?;
    assert_eq!(seen.len(), N);

    // Group "billing": four consumers share the work, never one message in two at once.
    let running: Arc<Mutex<HashSet<String>>> = Arc::default();
    let handled: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let handler = {
        let (running, handled) = (running.clone(), handled.clone());
        move |d: escrow_proto::Delivery| {
            let (running, handled) = (running.clone(), handled.clone());
            async move {
                let id = d.message.id;
                let fresh = running
                    .lock()
                    .map_err(|e| e.to_string())?
                    .insert(id.clone());
                assert!(fresh, "{id} handled by two consumers at once");
                tokio::time::sleep(Duration::from_micros(jitter(d.position.offset) % 500)).await;
                running.lock().map_err(|e| e.to_string())?.remove(&id);
                *handled
                    .lock()
                    .map_err(|e| e.to_string())?
                    .entry(id)
                    .or_default() += 1;
                Ok(())
            }
        }
    };
    let count = || handled.lock().map(|h| h.len()).unwrap_or(0);
    let acked = run_consumers(&node, "billing", "orders", 4, 8, handler, || count() >= N).await?;
    let handled = handled.lock().map(|h| h.clone()).unwrap_or_default();
    assert_eq!(handled.len(), N);
    assert!(handled.values().all(|n| *n == 1), "each handled once");
    assert_eq!(acked, N as u64);

    match client
        .request(&Request::GroupLag {
            topic: "orders".into(),
            group: "billing".into(),
        })
        .await?
    {
        Response::Lag(queues) => {
            assert_eq!(queues.iter().map(|q| q.published).sum::<u64>(), N as u64);
            assert_eq!(queues.iter().map(|q| q.acked).sum::<u64>(), N as u64);
            assert!(queues.iter().all(|q| q.backlog == 0 && q.in_flight == 0));
        }
        other => anyhow::bail!("unexpected {other:?}"),
    }
    match client.request(&Request::ListGroups).await? {
        Response::Groups(groups) => {
            let billing = groups
                .iter()
                .find(|g| g.group == "billing")
                .ok_or_else(|| anyhow::anyhow!("billing not listed"))?;
            assert_eq!((billing.acked, billing.backlog), (N as u64, 0));
            // The audit group received but never acked: its whole backlog remains.
            let audit = groups.iter().find(|g| g.group == "audit");
            assert!(audit.is_none_or(|g| g.backlog == N as u64));
        }
        other => anyhow::bail!("unexpected {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn unacked_messages_return_counted_then_dead_letter_and_redrive() -> anyhow::Result<()> {
    let node = TestNode::start_with(|c| c.max_deliveries = 3).await?;
    let client = topic(&node, "jobs", 1).await?;
    let producer = Producer::connect(ProducerConfig::new(node.client())).await?;
    producer
        .send("jobs", Message::new("poison", b"boom".to_vec()))
        .await?;
    producer
        .send("jobs", Message::new("fine", b"ok".to_vec()))
        .await?;
    let consumer = Consumer::connect(&node.client(), "g", "jobs").await?;
    let invisible = Duration::from_millis(300);
    let wait = Duration::from_secs(2);

    // "fine" is acked at once; "poison" is never acked.
    let first = consumer.receive(10, invisible, wait).await?;
    assert_eq!(first.len(), 2);
    let fine = first
        .iter()
        .find(|d| d.message.id == "fine")
        .map(|d| d.receipt);
    consumer.ack(&fine.into_iter().collect::<Vec<_>>()).await?;
    let mut counts = vec![first
        .iter()
        .find(|d| d.message.id == "poison")
        .map(|d| d.delivery_count)];
    for _ in 0..2 {
        let started = Instant::now();
        let again = consumer.receive(10, invisible, wait).await?;
        assert!(
            started.elapsed() >= Duration::from_millis(150),
            "not redelivered before its invisibility time"
        );
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].message.id, "poison");
        counts.push(Some(again[0].delivery_count));
    }
    assert_eq!(counts, [Some(1), Some(2), Some(3)]);

    // Out of deliveries: the next expiry moves it to the dead-letter topic.
    let after = consumer
        .receive(10, invisible, Duration::from_secs(1))
        .await?;
    assert!(
        after.is_empty(),
        "a message past max_deliveries is not delivered: {after:?}"
    );
    let letters = match client
        .request(&Request::DlqList {
            group: "g".into(),
            max: 10,
        })
        .await?
    {
        Response::DeadLetters(l) => l,
        other => anyhow::bail!("unexpected {other:?}"),
    };
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].message.id, "poison");
    assert_eq!(letters[0].topic, "jobs");
    assert_eq!(letters[0].deliveries, 3);
    // The dead-letter topic is an ordinary topic to consume.
    let dlq = Consumer::connect(&node.client(), "inspect", "%DLQ%g").await?;
    let dead = escrow_tests::drain_ids(&dlq, Duration::from_millis(300)).await?;
    assert_eq!(dead, BTreeSet::from(["poison".to_string()]));

    // Redrive: back to the group as a new delivery, and gone from the list.
    match client
        .request(&Request::DlqRedrive {
            group: "g".into(),
            max: 10,
        })
        .await?
    {
        Response::Redriven(1) => {}
        other => anyhow::bail!("unexpected {other:?}"),
    }
    let back = consumer.receive(10, invisible, wait).await?;
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].message.id, "poison");
    assert_eq!(back[0].delivery_count, 1);
    consumer.ack(&[back[0].receipt]).await?;
    match client
        .request(&Request::DlqList {
            group: "g".into(),
            max: 10,
        })
        .await?
    {
        Response::DeadLetters(l) => assert!(l.is_empty(), "redriven letters are not listed"),
        other => anyhow::bail!("unexpected {other:?}"),
    }
    assert!(consumer
        .receive(10, invisible, Duration::from_millis(500))
        .await?
        .is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_message_groups_are_handled_in_order_one_at_a_time() -> anyhow::Result<()> {
    const GROUPS: usize = 100;
    const PER_GROUP: usize = 100;
    let node = TestNode::start().await?;
    topic(&node, "ledger", 4).await?;
    let producer = Producer::connect(ProducerConfig::new(node.client())).await?;
    let all: Vec<(usize, usize)> = (0..PER_GROUP)
        .flat_map(|seq| (0..GROUPS).map(move |g| (g, seq)))
        .collect();
    for chunk in all.chunks(1000) {
        let batch = chunk
            .iter()
            .map(|(g, seq)| {
                let mut m = Message::new(format!("{g}-{seq}"), seq.to_string().into_bytes());
                m.message_group = Some(format!("account-{g}"));
                m
            })
            .collect();
        producer.send_batch("ledger", batch).await?;
    }

    let busy: Arc<Mutex<HashSet<String>>> = Arc::default();
    let order: Arc<Mutex<HashMap<String, Vec<usize>>>> = Arc::default();
    let handler = {
        let (busy, order) = (busy.clone(), order.clone());
        move |d: escrow_proto::Delivery| {
            let (busy, order) = (busy.clone(), order.clone());
            async move {
                let group = d.message.message_group.unwrap_or_default();
                let seq: usize = String::from_utf8_lossy(&d.message.body)
                    .parse()
                    .map_err(|e| format!("{e}"))?;
                let fresh = busy
                    .lock()
                    .map_err(|e| e.to_string())?
                    .insert(group.clone());
                assert!(fresh, "two messages of {group} handled at once");
                tokio::time::sleep(Duration::from_micros(jitter(d.position.offset) % 2000)).await;
                order
                    .lock()
                    .map_err(|e| e.to_string())?
                    .entry(group.clone())
                    .or_default()
                    .push(seq);
                busy.lock().map_err(|e| e.to_string())?.remove(&group);
                Ok(())
            }
        }
    };
    let total = || {
        order
            .lock()
            .map(|o| o.values().map(Vec::len).sum::<usize>())
            .unwrap_or(0)
    };
    run_consumers(&node, "posting", "ledger", 8, 4, handler, || {
        total() >= GROUPS * PER_GROUP
    })
    .await?;
    let order = order.lock().map(|o| o.clone()).unwrap_or_default();
    assert_eq!(order.len(), GROUPS);
    for (group, seqs) in &order {
        assert_eq!(
            *seqs,
            (0..PER_GROUP).collect::<Vec<_>>(),
            "{group} handled out of order"
        );
    }
    Ok(())
}

#[tokio::test]
async fn delayed_messages_are_not_received_before_their_time() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    topic(&node, "reminders", 1).await?;
    let producer = Producer::connect(ProducerConfig::new(node.client())).await?;
    let due = escrow_client::now_ms() + 1500;
    let mut later = Message::new("later", b"x".to_vec());
    later.deliver_at_ms = Some(due);
    producer.send("reminders", later).await?;
    producer
        .send("reminders", Message::new("now", b"y".to_vec()))
        .await?;
    let consumer = Consumer::connect(&node.client(), "g", "reminders").await?;
    let first = consumer
        .receive(10, Duration::from_secs(30), Duration::from_millis(200))
        .await?;
    assert_eq!(
        first
            .iter()
            .map(|d| d.message.id.as_str())
            .collect::<Vec<_>>(),
        ["now"]
    );
    // A long poll wakes when the delayed message comes due, not before.
    let got = consumer
        .receive(10, Duration::from_secs(30), Duration::from_secs(5))
        .await?;
    let received_at = escrow_client::now_ms();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message.id, "later");
    assert!(
        received_at >= due,
        "received {} ms early",
        due - received_at
    );
    assert!(
        received_at < due + 1000,
        "the long poll slept past the due time"
    );

    // Beyond the maximum delay is refused.
    let mut far = Message::new("far", b"z".to_vec());
    far.deliver_at_ms = Some(escrow_client::now_ms() + 30 * 24 * 3600 * 1000);
    let refused = producer.send("reminders", far).await;
    assert_eq!(
        refused.err().and_then(|e| e.code()),
        Some(escrow_proto::ErrorCode::INVALID_ARGUMENT)
    );
    Ok(())
}
