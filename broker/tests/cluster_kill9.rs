//! Three `escrow serve` processes on loopback; the leader is killed with SIGKILL while a
//! producer publishes with a window of 64. Nothing acknowledged is lost or duplicated,
//! and the restarted node catches up (as `escrow cluster status` shows).

use escrow_client::{Client, ClientConfig, Connection, Trust};
use escrow_consumer::Consumer;
use escrow_producer::{Producer, ProducerConfig};
use escrow_proto::{ClusterRequest, CreateTopic, Message, Request, Response};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

mod common;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const ESCROW: &str = env!("CARGO_BIN_EXE_escrow");

struct Node {
    id: u64,
    client: String,
    raft: String,
    config: PathBuf,
    child: Option<Child>,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn cli(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(ESCROW).args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "escrow {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Node {
    fn spawn(&mut self) -> anyhow::Result<()> {
        let config = self.config.display().to_string();
        let (child, line) = common::spawn_escrow(&["serve", "--config", &config])?;
        anyhow::ensure!(line.contains("listening"), "node {} said {line:?}", self.id);
        self.child = Some(child);
        Ok(())
    }

    fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?; // SIGKILL
            child.wait()?;
        }
        Ok(())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

fn write_config(
    dir: &Path,
    id: u64,
    client: &str,
    raft: &str,
    ca_dir: &Path,
) -> anyhow::Result<PathBuf> {
    let node_dir = dir.join(format!("n{id}"));
    cli(&[
        "cert",
        "node",
        "--ca-dir",
        &ca_dir.display().to_string(),
        "--out",
        &node_dir.join("tls").display().to_string(),
    ])?;
    let config = format!(
        r#"node_id = {id}
listen = "{client}"
raft_listen = "{raft}"
data_dir = "{data}"
bootstrap = {bootstrap}

[tls]
cert = "{tls}/node.pem"
key = "{tls}/node.key"
ca = "{ca}/ca.pem"

[raft]
heartbeat_ms = 50
election_min_ms = 300
election_max_ms = 600
"#,
        data = node_dir.join("data").display(),
        bootstrap = id == 1,
        tls = node_dir.join("tls").display(),
        ca = ca_dir.display(),
    );
    let path = dir.join(format!("n{id}.toml"));
    std::fs::write(&path, config)?;
    Ok(path)
}

fn client_config(addrs: &str, ca: &Path) -> ClientConfig {
    let mut c = ClientConfig::new(addrs, Trust::CaFile(ca.to_path_buf()));
    c.request_timeout = Duration::from_secs(2);
    c
}

async fn status(addr: &str, ca: &Path) -> Option<escrow_proto::ClusterStatus> {
    let conn = Connection::connect(&client_config(addr, ca)).await.ok()?;
    match conn
        .request(&Request::Cluster(ClusterRequest::Status))
        .await
        .ok()?
    {
        Response::Cluster(s) => Some(s),
        _ => None,
    }
}

async fn wait_until<F, Fut>(what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check().await {
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_sigkill_loses_nothing_acknowledged() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ca_dir = dir.path().join("ca");
    cli(&["cert", "ca", "--dir", &ca_dir.display().to_string()])?;
    let ca = ca_dir.join("ca.pem");
    let mut nodes = Vec::new();
    for id in 1..=3 {
        let client = format!("127.0.0.1:{}", free_port()?);
        let raft = format!("127.0.0.1:{}", free_port()?);
        let config = write_config(dir.path(), id, &client, &raft, &ca_dir)?;
        nodes.push(Node {
            id,
            client,
            raft,
            config,
            child: None,
        });
    }
    for node in &mut nodes {
        node.spawn()?;
    }
    let seeds = nodes
        .iter()
        .map(|n| n.client.clone())
        .collect::<Vec<_>>()
        .join(",");
    let first = nodes[0].client.clone();
    wait_until("node 1 to lead", || async {
        status(&first, &ca)
            .await
            .is_some_and(|s| s.role == "leader")
    })
    .await?;
    let ca_arg = ca.display().to_string();
    for node in &nodes[1..] {
        let id = node.id.to_string();
        cli(&[
            "--server",
            &first,
            "--ca",
            &ca_arg,
            "cluster",
            "add-learner",
            "--id",
            &id,
            "--raft-addr",
            &node.raft,
            "--client-addr",
            &node.client,
        ])?;
        cli(&[
            "--server", &first, "--ca", &ca_arg, "cluster", "promote", "--id", &id,
        ])?;
    }

    let client = Client::connect(client_config(&seeds, &ca)).await?;
    client
        .request(&Request::CreateTopic(CreateTopic {
            topic: "orders".into(),
            queues: 4,
        }))
        .await?;
    let mut config = ProducerConfig::new(client_config(&seeds, &ca));
    config.window = 64;
    let producer = Producer::connect(config).await?;
    let acked: Arc<Mutex<BTreeSet<String>>> = Default::default();
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (acked, stop) = (acked.clone(), stop.clone());
        tokio::spawn(async move {
            let mut waits = tokio::task::JoinSet::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("order-{i}");
                i += 1;
                let Ok(p) = producer
                    .send_async("orders", Message::new(id.clone(), id.clone().into_bytes()))
                    .await
                else {
                    break;
                };
                let acked = acked.clone();
                waits.spawn(async move {
                    if p.wait().await.is_ok() {
                        acked.lock().map(|mut a| a.insert(id)).ok();
                    }
                });
                while waits.try_join_next().is_some() {}
            }
            while waits.join_next().await.is_some() {}
        })
    };
    let count = || acked.lock().map(|a| a.len()).unwrap_or(0);
    wait_until("1500 acks", || async { count() >= 1500 }).await?;

    let leader = status(&first, &ca)
        .await
        .and_then(|s| s.leader)
        .unwrap_or(1);
    let victim = nodes.iter().position(|n| n.id == leader).unwrap_or(0);
    nodes[victim].kill()?;
    let before = count();
    wait_until("1500 more acks after the kill", || async {
        count() >= before + 1500
    })
    .await?;
    stop.store(true, Ordering::Relaxed);
    publisher.await?;

    nodes[victim].spawn()?;
    let addrs: Vec<String> = nodes.iter().map(|n| n.client.clone()).collect();
    let mut last = String::new();
    wait_until("the restarted node to catch up", || {
        let out = cli(&[
            "--server", &seeds, "--ca", &ca_arg, "cluster", "status", "--json",
        ]);
        last = format!("{out:?}");
        let caught_up = out.ok().is_some_and(|text| {
            let rows: Vec<serde_json::Value> = text
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            let applied: BTreeSet<u64> =
                rows.iter().filter_map(|r| r["applied"].as_u64()).collect();
            rows.len() == 3 && applied.len() == 1 && rows.iter().all(|r| r.get("error").is_none())
        });
        async move { caught_up }
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}; last status: {last}"))?;
    eprintln!(
        "{}",
        cli(&["--server", &seeds, "--ca", &ca_arg, "cluster", "status"])?
    );

    let consumer = Consumer::connect(&client_config(&seeds, &ca), "audit", "orders").await?;
    let mut stored = BTreeSet::new();
    loop {
        let batch = consumer
            .receive(1000, Duration::from_secs(60), Duration::from_millis(500))
            .await?;
        if batch.is_empty() {
            break;
        }
        for d in batch {
            assert!(
                stored.insert(d.message.id.clone()),
                "{} stored twice",
                d.message.id
            );
        }
    }
    let acked = acked.lock().map(|a| a.clone()).unwrap_or_default();
    let lost: Vec<_> = acked.difference(&stored).take(5).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged messages lost, e.g. {lost:?}",
        acked.difference(&stored).count()
    );
    eprintln!(
        "killed node {leader}; {} acknowledged, {} stored, none lost or duplicated; nodes {addrs:?}",
        acked.len(),
        stored.len()
    );
    Ok(())
}
