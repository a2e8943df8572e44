//! Helpers for tests that run the `escrow` binary as real processes.
// Each test binary uses a different part of this module.
#![allow(dead_code)]

use escrow_client::{ClientConfig, Connection, Trust};
use escrow_proto::{ClusterRequest, Request, Response};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process that is killed (SIGKILL) when dropped, so a failing test leaves
/// nothing running.
pub(crate) struct Process(Child);

impl std::ops::Deref for Process {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Process {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `escrow ARGS`, waits for the first line it prints (its banner) and keeps
/// draining its output so it never writes to a closed pipe.
pub(crate) fn spawn_escrow(args: &[&str]) -> anyhow::Result<(Process, String)> {
    let mut child = Process(
        Command::new(ESCROW)
            .args(args)
            .env("RUST_LOG", "warn,openraft=off")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?,
    );
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut reader = BufReader::new(stdout);
    let mut first = String::new();
    reader.read_line(&mut first)?;
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    Ok((child, first))
}

/// The `escrow` binary under test.
pub(crate) const ESCROW: &str = env!("CARGO_BIN_EXE_escrow");

/// One `escrow serve` process of a [`ProcessCluster`].
pub(crate) struct Node {
    pub(crate) id: u64,
    pub(crate) client: String,
    pub(crate) raft: String,
    config: PathBuf,
    child: Option<Process>,
}

impl Node {
    /// Starts (or restarts) the process on its config and data directory.
    pub(crate) fn spawn(&mut self) -> anyhow::Result<()> {
        let config = self.config.display().to_string();
        let (child, line) = spawn_escrow(&["serve", "--config", &config])?;
        anyhow::ensure!(line.contains("listening"), "node {} said {line:?}", self.id);
        self.child = Some(child);
        Ok(())
    }

    /// Kills the process with SIGKILL.
    pub(crate) fn kill(&mut self) -> anyhow::Result<()> {
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

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Runs the `escrow` CLI and returns its standard output.
pub(crate) fn cli(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(ESCROW).args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "escrow {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn write_config(
    dir: &Path,
    id: u64,
    client: &str,
    raft: &str,
    ca_dir: &Path,
    extra: &str,
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
{extra}

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

/// A client configuration for `addrs` with a short request timeout.
pub(crate) fn client_config(addrs: &str, ca: &Path) -> ClientConfig {
    let mut c = ClientConfig::new(addrs, Trust::CaFile(ca.to_path_buf()));
    c.request_timeout = Duration::from_secs(2);
    c
}

/// One node's cluster status, if it answers.
pub(crate) async fn status(addr: &str, ca: &Path) -> Option<escrow_proto::ClusterStatus> {
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

/// Polls `check` every 100 ms for up to 30 s.
pub(crate) async fn wait_until<F, Fut>(what: &str, mut check: F) -> anyhow::Result<()>
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

/// `escrow serve` processes on loopback forming one cluster, node 1 bootstrapped.
pub(crate) struct ProcessCluster {
    pub(crate) nodes: Vec<Node>,
    /// The CA certificate clients trust.
    pub(crate) ca: PathBuf,
    /// Every node's client address, comma-separated.
    pub(crate) seeds: String,
    _dir: tempfile::TempDir,
}

impl ProcessCluster {
    /// Starts `n` nodes and makes them all voters; `extra` is added to every node's
    /// config file (top-level TOML keys).
    pub(crate) async fn start(n: u64, extra: &str) -> anyhow::Result<ProcessCluster> {
        let dir = tempfile::tempdir()?;
        let ca_dir = dir.path().join("ca");
        cli(&["cert", "ca", "--dir", &ca_dir.display().to_string()])?;
        let ca = ca_dir.join("ca.pem");
        let mut nodes = Vec::new();
        for id in 1..=n {
            let client = format!("127.0.0.1:{}", free_port()?);
            let raft = format!("127.0.0.1:{}", free_port()?);
            let config = write_config(dir.path(), id, &client, &raft, &ca_dir, extra)?;
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
        Ok(ProcessCluster {
            nodes,
            ca,
            seeds,
            _dir: dir,
        })
    }

    /// A client configuration reaching every node.
    pub(crate) fn client(&self) -> ClientConfig {
        client_config(&self.seeds, &self.ca)
    }

    /// Index in `nodes` of the node the first answering node names as leader.
    pub(crate) async fn leader_index(&self) -> Option<usize> {
        for node in &self.nodes {
            if let Some(leader) = status(&node.client, &self.ca).await.and_then(|s| s.leader) {
                return self.nodes.iter().position(|n| n.id == leader);
            }
        }
        None
    }
}

/// Receives (without acking) until a poll comes back empty; the ids seen, each once.
pub(crate) async fn drain_unique_ids(
    consumer: &escrow_consumer::Consumer,
) -> anyhow::Result<std::collections::BTreeSet<String>> {
    let mut ids = std::collections::BTreeSet::new();
    loop {
        let batch = consumer
            .receive(1000, Duration::from_secs(60), Duration::from_millis(500))
            .await?;
        if batch.is_empty() {
            return Ok(ids);
        }
        for d in batch {
            anyhow::ensure!(
                ids.insert(d.message.id.clone()),
                "{} stored twice",
                d.message.id
            );
        }
    }
}
