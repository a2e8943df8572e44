//! Three-node clusters in one process over real QUIC: partitions, snapshots, membership.
#![allow(clippy::unwrap_used)] // test helpers: a poisoned lock is a test failure

use escrow_client::{Client, Connection};
use escrow_consumer::Consumer;
use escrow_producer::{Producer, ProducerConfig};
use escrow_proto::{CreateTopic, ErrorCode, Message, Publish, Request, Response};
use escrow_tests::{drain_ids, test_tuning, TestCluster};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Acked = Arc<Mutex<BTreeSet<String>>>;

/// Clusters of three nodes with fast election timeouts starve each other on two cores:
/// the tests of this file take turns.
static ONE_CLUSTER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Publishes until `stop`, recording acknowledged ids.
fn publish_in_background(
    producer: Producer,
    prefix: &'static str,
    stop: Arc<AtomicBool>,
) -> (Acked, tokio::task::JoinHandle<()>) {
    let acked: Acked = Default::default();
    let out = acked.clone();
    let task = tokio::spawn(async move {
        let mut waits = tokio::task::JoinSet::new();
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let id = format!("{prefix}-{i}");
            i += 1;
            let Ok(pending) = producer
                .send_async("t", Message::new(id.clone(), id.clone().into_bytes()))
                .await
            else {
                break;
            };
            let acked = acked.clone();
            waits.spawn(async move {
                if pending.wait().await.is_ok() {
                    acked.lock().unwrap().insert(id);
                }
            });
            while waits.try_join_next().is_some() {}
        }
        while waits.join_next().await.is_some() {}
    });
    (out, task)
}

async fn wait_for_acks(acked: &Acked, at_least: usize) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while acked.lock().unwrap().len() < at_least {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "only {} acks",
            acked.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Every message id stored in topic `t`, read through a fresh group; fails on duplicates.
async fn stored_ids(client: &Client, group: &str) -> anyhow::Result<BTreeSet<String>> {
    drain_ids(
        &Consumer::on(client.clone(), group, "t"),
        Duration::from_millis(500),
    )
    .await
}

async fn create_topic(client: &Client) -> anyhow::Result<()> {
    client
        .request(&Request::CreateTopic(CreateTopic {
            topic: "t".into(),
            queues: 4,
        }))
        .await?;
    Ok(())
}

fn producer_config(cluster: &TestCluster) -> ProducerConfig {
    let mut client = cluster.client();
    client.request_timeout = Duration::from_secs(2);
    let mut config = ProducerConfig::new(client);
    config.window = 64;
    config
}

fn assert_none_lost(acked: &BTreeSet<String>, stored: &BTreeSet<String>) {
    let lost: Vec<_> = acked.difference(stored).take(5).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged messages lost, e.g. {lost:?}",
        acked.difference(stored).count()
    );
}

/// A cluster of three voters with topic `t`: the cluster, its leader, a client, a producer.
async fn three_voters_with_topic() -> anyhow::Result<(TestCluster, usize, Client, Producer)> {
    let cluster = TestCluster::voters(3).await?;
    let leader = cluster.wait_leader(&[0, 1, 2]).await?;
    let client = Client::connect(cluster.client()).await?;
    create_topic(&client).await?;
    let producer = Producer::connect(producer_config(&cluster)).await?;
    Ok((cluster, leader, client, producer))
}

/// Followers apply committed entries in batches (a patch to the vendored openraft), yet
/// when writes stop the leader's heartbeats still bring every follower to the leader's
/// applied index: a handful of writes, fewer than a batch, are applied within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_apply_the_last_writes_once_the_leader_goes_idle() -> anyhow::Result<()> {
    let _turn = ONE_CLUSTER_AT_A_TIME.lock().await;
    let (cluster, leader, _client, producer) = three_voters_with_topic().await?;
    for i in 0..5 {
        producer
            .send("t", Message::new(format!("m{i}"), vec![1; 10]))
            .await?;
    }
    let applied = cluster.node(leader).raft().metrics().borrow().last_applied;
    for follower in (0..3).filter(|&i| i != leader) {
        cluster
            .node(follower)
            .raft()
            .wait(Some(Duration::from_secs(1)))
            .applied_index_at_least(applied.map(|l| l.index), "follower applied")
            .await
            .map_err(|e| anyhow::anyhow!("node {follower} did not apply {applied:?}: {e}"))?;
    }
    cluster.shutdown().await;
    Ok(())
}

/// The leader replicates while its own log write is in flight but counts itself toward
/// the quorum only once that write is flushed: with its disk stalled, writes commit through
/// the two followers; with one follower cut off as well, nothing is acknowledged until the
/// leader's write completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_counts_itself_toward_the_quorum_only_after_its_own_fsync() -> anyhow::Result<()> {
    let _turn = ONE_CLUSTER_AT_A_TIME.lock().await;
    let (cluster, leader, client, producer) = three_voters_with_topic().await?;
    let send = |id: &str| {
        let producer = producer.clone();
        let message = Message::new(id, id.as_bytes().to_vec());
        tokio::spawn(async move { producer.send("t", message).await })
    };
    send("before").await??;

    cluster.node(leader).stall_log_writes(true);
    tokio::time::timeout(Duration::from_secs(5), send("followers"))
        .await
        .map_err(|_| anyhow::anyhow!("two flushed followers did not commit a write"))???;

    let follower = (0..3).find(|&i| i != leader).unwrap();
    cluster.filter.isolate(follower as u64 + 1);
    let pending = send("needs-the-leader");
    tokio::time::sleep(Duration::from_secs(1)).await;
    if pending.is_finished() {
        let outcome = pending.await?;
        panic!(
            "finished with one follower flushed and the leader's write not on disk: {outcome:?}"
        );
    }
    cluster.node(leader).stall_log_writes(false);
    tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .map_err(|_| anyhow::anyhow!("no ack once the leader's write was flushed"))???;

    // Read back before healing: the isolated follower's raised term would force an election.
    let stored = stored_ids(&client, "audit").await?;
    let expected: BTreeSet<String> = ["before", "followers", "needs-the-leader"]
        .map(String::from)
        .into();
    assert_eq!(stored, expected);
    cluster.filter.heal();
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_leader_cannot_acknowledge_and_converges_after_healing() -> anyhow::Result<()> {
    let _turn = ONE_CLUSTER_AT_A_TIME.lock().await;
    let cluster = TestCluster::voters(3).await?;
    let old = cluster.wait_leader(&[0, 1, 2]).await?;
    let old_id = old as u64 + 1;
    let client = Client::connect(cluster.client()).await?;
    create_topic(&client).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let producer = Producer::connect(producer_config(&cluster)).await?;
    let (acked, task) = publish_in_background(producer, "m", stop.clone());
    wait_for_acks(&acked, 300).await?;

    cluster.filter.isolate(old_id);
    // A write sent straight to the isolated leader is never acknowledged.
    let direct = Connection::connect(&cluster.client_of(old)).await?;
    let attempt = tokio::time::timeout(
        Duration::from_secs(3),
        direct.request(&Request::Publish(Publish {
            topic: "t".into(),
            producer: None,
            messages: vec![Message::new("isolated-write", b"x".to_vec())],
            dedupe_by_id: false,
        })),
    )
    .await;
    match attempt {
        Err(_) => {} // no quorum, no answer
        Ok(Err(e)) => assert!(
            matches!(e.code(), Some(ErrorCode::NOT_LEADER) | None),
            "{e}"
        ),
        Ok(Ok(r)) => panic!("an isolated leader acknowledged a write: {r:?}"),
    }
    let others: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    let new = cluster.wait_leader(&others).await?;
    let before = acked.lock().unwrap().len();
    wait_for_acks(&acked, before + 300).await?;

    cluster.filter.heal();
    let new_term = cluster.node(new).raft().metrics().borrow().current_term;
    cluster
        .node(old)
        .raft()
        .wait(Some(Duration::from_secs(10)))
        .metrics(
            |m| m.current_term >= new_term && m.current_leader == Some(new as u64 + 1),
            "old leader follows the new one",
        )
        .await?;
    stop.store(true, Ordering::Relaxed);
    task.await?;
    cluster.wait_caught_up_with(new).await?;

    let acked = acked.lock().unwrap().clone();
    let stored = stored_ids(&client, "audit").await?;
    assert_none_lost(&acked, &stored);
    cluster.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wiped_node_catches_up_through_a_snapshot() -> anyhow::Result<()> {
    let _turn = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut tuning = test_tuning();
    tuning.snapshot_after_entries = 40;
    tuning.keep_after_snapshot = 5;
    let mut cluster = TestCluster::new(3, tuning).await?;
    cluster.join_all_as_voters().await?;
    let client = Client::connect(cluster.client()).await?;
    create_topic(&client).await?;
    let producer = Producer::connect(producer_config(&cluster)).await?;
    // Each body is its id: every message read back below is checked whole.
    let message = |id: String| Message::new(id.clone(), id.into_bytes());
    for i in 0..150 {
        producer.send("t", message(format!("a{i}"))).await?;
    }
    cluster.wipe_node(2).await?;
    for i in 0..100 {
        producer.send("t", message(format!("b{i}"))).await?;
    }
    let leader = cluster.wait_leader(&[0, 1]).await?;
    let purged = cluster.node(leader).raft().metrics().borrow().purged;
    assert!(
        purged.is_some(),
        "the leader purged its log behind a snapshot"
    );
    cluster.start_node(2).await?;
    cluster.wait_caught_up_with(leader).await?;
    let m = cluster.node(2).raft().metrics().borrow().clone();
    assert!(
        m.snapshot.is_some(),
        "the wiped node installed a snapshot: {m:?}"
    );

    // Its state equals the leader's: the same offsets in every queue.
    let describe = Request::DescribeTopic { topic: "t".into() };
    let on_wiped = Connection::connect(&cluster.client_of(2))
        .await?
        .request(&describe)
        .await?;
    let on_leader = Connection::connect(&cluster.client_of(leader))
        .await?
        .request(&describe)
        .await?;
    assert_eq!(on_wiped, on_leader);
    let Response::Topic(t) = on_wiped else {
        panic!("not a topic")
    };
    assert_eq!(t.queues.iter().map(|q| q.next_offset).sum::<u64>(), 250);

    // Every body is readable on both, from their files: the wiped node's come from the
    // snapshot (inline) and its own log since; the leader's from log entries it purged
    // behind its snapshot (a purge keeps them).
    cluster.stop_node(2).await;
    cluster.stop_node(leader).await;
    for node in [2, leader] {
        let bodies = stored_bodies(&cluster.data_dir(node))?;
        assert_eq!(bodies.len(), 250, "node {}", node + 1);
        for (id, body) in bodies {
            assert_eq!(body, id.as_bytes(), "node {}: body of {id}", node + 1);
        }
    }
    cluster.shutdown().await;
    Ok(())
}

/// `(id, body)` of every message of topic `t` in the redb files of a stopped node.
fn stored_bodies(data_dir: &std::path::Path) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    use escrow_broker::raft::log_store::LogStore;
    use escrow_broker::storage::Store;
    let store = Store::open(&data_dir.join("state.redb"))?;
    let log = LogStore::open(&data_dir.join("raft-log.redb"), Arc::default())?;
    store.attach_log(Arc::new(log));
    let mut out = Vec::new();
    for (name, topic, ends) in store.load()?.topics {
        if name != "t" {
            continue;
        }
        for (queue, end) in (0u32..).zip(ends) {
            let offsets: Vec<u64> = (0..end).collect();
            for (_, _, record) in store.read(topic.id, queue, &offsets)? {
                out.push((record.message.id, record.message.body));
            }
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_grows_and_shrinks_under_load() -> anyhow::Result<()> {
    let _turn = ONE_CLUSTER_AT_A_TIME.lock().await;
    let cluster = TestCluster::new(3, test_tuning()).await?;
    cluster.wait_leader(&[0]).await?;
    let client = Client::connect(cluster.client_of(0)).await?;
    create_topic(&client).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let producer = Producer::connect(producer_config(&cluster)).await?;
    let (acked, task) = publish_in_background(producer, "g", stop.clone());
    wait_for_acks(&acked, 200).await?;

    let raft = cluster.node(0).raft();
    for i in 1..3 {
        raft.add_learner(i as u64 + 1, cluster.node_addr(i), true)
            .await?;
        let n = acked.lock().unwrap().len();
        wait_for_acks(&acked, n + 100).await?;
    }
    raft.change_membership(BTreeSet::from([1, 2, 3]), false)
        .await?;
    let n = acked.lock().unwrap().len();
    wait_for_acks(&acked, n + 200).await?;
    raft.change_membership(BTreeSet::from([1, 2]), false)
        .await?;
    let n = acked.lock().unwrap().len();
    wait_for_acks(&acked, n + 200).await?;
    stop.store(true, Ordering::Relaxed);
    task.await?;

    assert_eq!(cluster.node(0).voters(), BTreeSet::from([1, 2]));
    let acked = acked.lock().unwrap().clone();
    let stored = stored_ids(&client, "audit").await?;
    assert_none_lost(&acked, &stored);
    cluster.shutdown().await;
    Ok(())
}
