//! Transactional messages over real QUIC: invisibility until commit, conflicting
//! decisions, check-back from another producer process after a SIGKILL, abandonment
//! after the maximum checks, and a new leader resuming the check schedule.

use escrow_client::Client;
use escrow_consumer::Consumer;
use escrow_producer::txn::{TransactionChecker, TransactionalProducer};
use escrow_proto::txn::{TxnCheck, TxnDecision, TxnInfo, TxnState, ABANDONED_TOPIC};
use escrow_proto::{CreateTopic, ErrorCode, Message, Request, Response};
use escrow_tests::{TestCluster, TestNode};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

async fn create_topic(client: &Client, name: &str) -> anyhow::Result<()> {
    let r = client
        .request(&Request::CreateTopic(CreateTopic {
            topic: name.into(),
            queues: 2,
        }))
        .await?;
    anyhow::ensure!(matches!(r, Response::Topic(_)), "create: {r:?}");
    Ok(())
}

async fn pending(client: &Client) -> anyhow::Result<Vec<TxnInfo>> {
    match client.request(&Request::ListTxns { max: 1000 }).await? {
        Response::Txns(t) => Ok(t),
        other => anyhow::bail!("unexpected {other:?}"),
    }
}

/// A child process killed (SIGKILL) when the test ends, even when it fails.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Answers every check with `decision`, counting the checks it was asked.
#[derive(Clone)]
struct Always(TxnDecision, Arc<AtomicU32>);

impl TransactionChecker for Always {
    async fn check(&self, _check: &TxnCheck) -> TxnDecision {
        self.1.fetch_add(1, Ordering::SeqCst);
        self.0
    }
}

fn unknown() -> (Always, Arc<AtomicU32>) {
    let calls = Arc::new(AtomicU32::new(0));
    (Always(TxnDecision::Unknown, calls.clone()), calls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_messages_stay_invisible_until_commit_and_rollbacks_never_appear() -> anyhow::Result<()>
{
    let node = TestNode::start().await?;
    let client = Client::connect(node.client()).await?;
    create_topic(&client, "orders").await?;
    let (checker, _) = unknown();
    let producer = TransactionalProducer::connect(node.client(), "shop", checker).await?;

    // A consumer polls throughout and records when it saw what.
    let seen: Arc<Mutex<BTreeMap<String, (Instant, u32)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let (seen, stop) = (seen.clone(), stop.clone());
        let consumer = Consumer::connect(&node.client(), "audit", "orders").await?;
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let batch = consumer
                    .receive(100, Duration::from_secs(60), Duration::from_millis(50))
                    .await?;
                let now = Instant::now();
                for d in batch {
                    if let Ok(mut s) = seen.lock() {
                        s.entry(d.message.id).or_insert((now, 0)).1 += 1;
                    }
                }
            }
            anyhow::Ok(())
        })
    };

    let keep = producer
        .send_half("orders", Message::new("keep", b"k".to_vec()))
        .await?;
    let drop_it = producer
        .send_half("orders", Message::new("drop", b"d".to_vec()))
        .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        seen.lock().map(|s| s.is_empty()).unwrap_or(false),
        "a half message was delivered before its commit"
    );
    let commit_sent = Instant::now();
    let outcome = keep.commit().await?;
    assert!(matches!(outcome.state, TxnState::Committed(_)));
    assert_eq!(drop_it.rollback().await?.state, TxnState::RolledBack);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    poller.await??;

    let seen = seen.lock().map(|s| s.clone()).unwrap_or_default();
    let (at, times) = seen
        .get("keep")
        .copied()
        .ok_or_else(|| anyhow::anyhow!("the committed message was never delivered"))?;
    assert!(at >= commit_sent, "delivered before the commit was sent");
    assert_eq!(times, 1);
    assert!(
        !seen.contains_key("drop"),
        "a rolled-back message was delivered"
    );
    assert!(pending(&client).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn a_second_decision_the_other_way_is_refused_and_the_first_stands() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let client = Client::connect(node.client()).await?;
    create_topic(&client, "orders").await?;
    let (checker, _) = unknown();
    let producer = TransactionalProducer::connect(node.client(), "shop", checker).await?;
    let client = &client;
    let end = |txn_id, decision| async move {
        escrow_producer::txn::end(
            client,
            txn_id,
            decision,
            escrow_proto::txn::TxnSource::Operator,
        )
        .await
    };

    let committed = producer
        .send_half("orders", Message::new("c", b"1".to_vec()))
        .await?;
    let id = committed.txn_id;
    let first = committed.commit().await?;
    let again = end(id, TxnDecision::Commit).await?;
    assert_eq!(
        first, again,
        "repeating the decision answers the same outcome"
    );
    let refused = end(id, TxnDecision::Rollback).await;
    assert_eq!(
        refused.err().and_then(|e| e.code()),
        Some(ErrorCode::TXN_CONFLICT)
    );

    let rolled = producer
        .send_half("orders", Message::new("r", b"2".to_vec()))
        .await?;
    let id = rolled.txn_id;
    rolled.rollback().await?;
    let refused = end(id, TxnDecision::Commit).await;
    assert_eq!(
        refused.err().and_then(|e| e.code()),
        Some(ErrorCode::TXN_CONFLICT)
    );
    assert_eq!(
        end(9_999, TxnDecision::Commit)
            .await
            .err()
            .and_then(|e| e.code()),
        Some(ErrorCode::TXN_UNKNOWN)
    );

    let consumer = Consumer::connect(&node.client(), "g", "orders").await?;
    let ids = escrow_tests::drain_ids(&consumer, Duration::from_millis(300)).await?;
    assert_eq!(
        ids.into_iter().collect::<Vec<_>>(),
        ["c"],
        "exactly one outcome stands"
    );
    Ok(())
}

/// A batch of half messages with refusals among them: each answer keeps its place, the
/// accepted ones are stored with their own bodies, and the refused ones store nothing.
#[tokio::test]
async fn refusals_in_a_batch_of_halves_keep_their_places() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let client = Client::connect(node.client()).await?;
    create_topic(&client, "orders").await?;
    let half = |topic: &str, id: &str| escrow_proto::txn::SendHalf {
        topic: topic.into(),
        producer_group: "shop".into(),
        instance: "shop-1".into(),
        message: Message::new(id, id.as_bytes().to_vec()),
        first_check_ms: None,
    };
    let batch = vec![
        half("missing", "a"),
        half("orders", "b"),
        half("", "c"),
        half("orders", "d"),
    ];
    let answers = match client.request(&Request::SendHalves(batch)).await? {
        Response::HalvesSent(answers) => answers,
        other => anyhow::bail!("unexpected {other:?}"),
    };
    let codes: Vec<Option<ErrorCode>> = answers
        .iter()
        .map(|a| a.as_ref().err().map(|e| e.code))
        .collect();
    assert_eq!(
        codes,
        [
            Some(ErrorCode::UNKNOWN_TOPIC),
            None,
            Some(ErrorCode::INVALID_ARGUMENT),
            None
        ]
    );
    let mut ends = Vec::new();
    for answer in answers.into_iter().flatten() {
        ends.push(escrow_proto::txn::EndTxn {
            txn_id: answer.txn_id,
            decision: TxnDecision::Commit,
            source: escrow_proto::txn::TxnSource::Producer,
        });
    }
    assert_eq!(
        pending(&client).await?.len(),
        2,
        "only the accepted are pending"
    );
    match client.request(&Request::EndTxns(ends)).await? {
        Response::TxnsEnded(outcomes) => {
            assert_eq!(outcomes.len(), 2, "one answer per decision: {outcomes:?}");
            assert!(outcomes
                .iter()
                .all(|o| matches!(o, Ok(o) if matches!(o.state, TxnState::Committed(_)))))
        }
        other => anyhow::bail!("unexpected {other:?}"),
    }
    let consumer = Consumer::connect(&node.client(), "g", "orders").await?;
    let ids = escrow_tests::drain_ids(&consumer, Duration::from_millis(300)).await?;
    assert_eq!(ids.into_iter().collect::<Vec<_>>(), ["b", "d"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checker_that_never_knows_ends_in_the_abandoned_topic() -> anyhow::Result<()> {
    let node = TestNode::start_with(|c| {
        c.txn.first_check_ms = 200;
        c.txn.check_interval_ms = 300;
        c.txn.max_checks = 3;
    })
    .await?;
    let client = Client::connect(node.client()).await?;
    create_topic(&client, "orders").await?;
    let (checker, calls) = unknown();
    let producer = TransactionalProducer::connect(node.client(), "shop", checker).await?;
    let _txn = producer
        .send_half("orders", Message::new("limbo", b"?".to_vec()))
        .await?;

    let abandoned = Consumer::connect(&node.client(), "ops", ABANDONED_TOPIC).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let letter = loop {
        anyhow::ensure!(Instant::now() < deadline, "never abandoned");
        let got = abandoned
            .receive(10, Duration::from_secs(30), Duration::from_millis(500))
            .await;
        match got {
            Ok(mut batch) if !batch.is_empty() => break batch.remove(0),
            _ => {}
        }
    };
    assert_eq!(letter.message.id, "limbo");
    assert_eq!(
        letter
            .message
            .headers
            .get("escrow-txn-checks")
            .map(String::as_str),
        Some("3")
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "checks made = checks counted"
    );
    assert!(pending(&client).await?.is_empty());
    let consumer = Consumer::connect(&node.client(), "g", "orders").await?;
    assert!(
        escrow_tests::drain_ids(&consumer, Duration::from_millis(300))
            .await?
            .is_empty(),
        "an abandoned message is never delivered to its topic"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_killed_before_ending_is_resolved_by_another_of_its_group() -> anyhow::Result<()>
{
    const FIRST_CHECK_MS: u64 = 1000;
    const INTERVAL_MS: u64 = 1500;
    let node = TestNode::start_with(|c| {
        c.txn.first_check_ms = FIRST_CHECK_MS;
        c.txn.check_interval_ms = INTERVAL_MS;
    })
    .await?;
    let client = Client::connect(node.client()).await?;
    create_topic(&client, "orders").await?;
    let store = node.dir.path().join("orders-db.redb");
    let ca = node.dir.path().join("tls").join("ca.pem");
    let spawn = |mode: &[&str]| {
        let mut args = vec![
            node.addr(),
            ca.display().to_string(),
            "shop".to_string(),
            "orders".to_string(),
            store.display().to_string(),
        ];
        args.extend(mode.iter().map(|s| s.to_string()));
        let mut child = Command::new(env!("CARGO_BIN_EXE_txn-producer"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        anyhow::Ok((child, line))
    };

    let (first, said) = spawn(&["half-then-hang", "4"])?;
    let mut first = KillOnDrop(first);
    anyhow::ensure!(said.trim() == "ready", "first producer said {said:?}");
    let halves_at = Instant::now();
    first.0.kill()?; // SIGKILL between the local transactions and EndTxn
    first.0.wait()?;
    assert_eq!(pending(&client).await?.len(), 4);

    let (second, said) = spawn(&["check"])?;
    let second = KillOnDrop(second);
    anyhow::ensure!(said.trim() == "checking", "second producer said {said:?}");
    let deadline = halves_at + Duration::from_millis(FIRST_CHECK_MS + INTERVAL_MS + 1500);
    while !pending(&client).await?.is_empty() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "unresolved after first check + one interval: {:?}",
            pending(&client).await?
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let resolved_after = halves_at.elapsed();
    drop(second);

    let consumer = Consumer::connect(&node.client(), "g", "orders").await?;
    let ids = escrow_tests::drain_ids(&consumer, Duration::from_millis(300)).await?;
    assert_eq!(
        ids.into_iter().collect::<Vec<_>>(),
        ["order-0", "order-2"],
        "committed exactly the orders whose local transaction committed"
    );
    eprintln!("resolved by the second producer {resolved_after:?} after the half messages");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_resumes_check_backs_with_counts_kept() -> anyhow::Result<()> {
    let mut cluster = TestCluster::new_with(3, escrow_tests::test_tuning(), |c| {
        c.txn.first_check_ms = 300;
        c.txn.check_interval_ms = 400;
        c.txn.max_checks = 1000;
    })
    .await?;
    cluster.join_all_as_voters().await?;
    let client = Client::connect(cluster.client()).await?;
    create_topic(&client, "orders").await?;
    let (checker, calls) = unknown();
    let producer = TransactionalProducer::connect(cluster.client(), "shop", checker).await?;
    let _txn = producer
        .send_half("orders", Message::new("slow", b"s".to_vec()))
        .await?;
    let checks = |txns: Vec<TxnInfo>| txns.first().map_or(0, |t| t.checks);
    let deadline = Instant::now() + Duration::from_secs(20);
    while checks(pending(&client).await?) < 3 {
        anyhow::ensure!(Instant::now() < deadline, "checks did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let leader = cluster.wait_leader(&[0, 1, 2]).await?;
    cluster.crash_node(leader).await;
    let before = checks(pending(&client).await?);
    let others: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    cluster.wait_leader(&others).await?;
    let after_failover = checks(pending(&client).await?);
    assert!(
        after_failover >= before && before >= 3,
        "counts reset by the new leader: {before} then {after_failover}"
    );
    while checks(pending(&client).await?) < before + 3 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the new leader did not continue checking"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(producer);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let counted = checks(pending(&client).await?);
    let made = calls.load(Ordering::SeqCst);
    // Checks count once delivered: one delivered just before the leader died may be
    // made and not counted.
    assert!(
        counted <= made && made <= counted + 1,
        "checks made {made}, counted {counted}"
    );
    cluster.shutdown().await;
    Ok(())
}
