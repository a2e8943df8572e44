//! Test harness: real brokers on `127.0.0.1:0` with real redb files in temp directories.

use escrow_broker::config::{BrokerConfig, TlsFiles};
use escrow_broker::{tls, Broker};
use escrow_client::{ClientConfig, Trust};
use std::path::PathBuf;

/// A broker in this process, with its data directory.
#[derive(Debug)]
pub struct TestNode {
    /// The running broker (None while stopped).
    pub broker: Option<Broker>,
    /// Its data directory (kept across restarts).
    pub dir: tempfile::TempDir,
    ca: PathBuf,
    configure: fn(&mut BrokerConfig),
}

/// Logs to the test's captured output; `RUST_LOG` selects what.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

impl TestNode {
    /// Starts a node on a free loopback port in a new temp directory.
    pub async fn start() -> anyhow::Result<TestNode> {
        TestNode::start_with(|_| {}).await
    }

    /// Starts a node whose configuration `configure` adjusts (on every restart too).
    pub async fn start_with(configure: fn(&mut BrokerConfig)) -> anyhow::Result<TestNode> {
        init_logging();
        let dir = tempfile::tempdir()?;
        let certs = tls::ensure_dev_tls(dir.path(), &[])?;
        let mut node = TestNode {
            broker: None,
            dir,
            ca: certs.ca_cert,
            configure,
        };
        node.restart().await?;
        Ok(node)
    }

    /// (Re)starts the broker on the same data directory, on a new free port.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        if let Some(broker) = self.broker.take() {
            broker.shutdown().await;
        }
        let tls_dir = self.dir.path().join("tls");
        let mut config = BrokerConfig::new(
            "127.0.0.1:0".parse()?,
            "127.0.0.1:0".parse()?,
            self.dir.path().to_path_buf(),
            TlsFiles {
                cert: tls_dir.join("node.pem"),
                key: tls_dir.join("node.key"),
                ca: self.ca.clone(),
            },
        );
        config.bootstrap = true;
        (self.configure)(&mut config);
        let broker = Broker::start(config).await?;
        wait_for_leader(&broker).await?;
        self.broker = Some(broker);
        Ok(())
    }

    /// Stops the broker (storage closed), keeping the data directory.
    pub async fn stop(&mut self) {
        if let Some(broker) = self.broker.take() {
            broker.shutdown().await;
        }
    }

    /// The client address of the running broker.
    pub fn addr(&self) -> String {
        self.broker
            .as_ref()
            .map(|b| b.local_addr().to_string())
            .unwrap_or_default()
    }

    /// A client configuration trusting this node's dev CA.
    pub fn client(&self) -> ClientConfig {
        ClientConfig::new(self.addr(), Trust::CaFile(self.ca.clone()))
    }
}

/// Waits until `broker` leads and has applied its own first entry (ready to serve).
pub async fn wait_for_leader(broker: &Broker) -> anyhow::Result<()> {
    let id = broker.node_id();
    broker
        .raft()
        .wait(Some(std::time::Duration::from_secs(10)))
        .metrics(
            |m| {
                m.current_leader == Some(id)
                    && m.last_applied
                        .is_some_and(|l| l.leader_id.term == m.current_term)
            },
            "leader ready",
        )
        .await?;
    Ok(())
}

/// An in-process cluster on loopback sharing one CA and one fault filter.
pub struct TestCluster {
    /// Nodes by index (node id = index + 1); `None` while stopped.
    pub nodes: Vec<Option<Broker>>,
    dirs: Vec<tempfile::TempDir>,
    /// Client and Raft addresses of each node, kept across restarts.
    addrs: Vec<(std::net::SocketAddr, std::net::SocketAddr)>,
    ca_dir: tempfile::TempDir,
    /// Fault injection on Raft traffic between nodes.
    pub filter: std::sync::Arc<escrow_broker::raft::filter::NetworkFilter>,
    /// Raft settings every node starts with.
    pub tuning: escrow_broker::raft::RaftTuning,
    configure: fn(&mut BrokerConfig),
}

impl std::fmt::Debug for TestCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCluster")
            .field("addrs", &self.addrs)
            .finish_non_exhaustive()
    }
}

/// Fast elections for tests.
pub fn test_tuning() -> escrow_broker::raft::RaftTuning {
    escrow_broker::raft::RaftTuning {
        heartbeat_ms: 50,
        election_min_ms: 300,
        election_max_ms: 600,
        ..Default::default()
    }
}

impl TestCluster {
    /// A cluster of one bootstrapped node plus `extra` uninitialized nodes (not members yet).
    pub async fn new(
        total: usize,
        tuning: escrow_broker::raft::RaftTuning,
    ) -> anyhow::Result<TestCluster> {
        TestCluster::new_with(total, tuning, |_| {}).await
    }

    /// As [`TestCluster::new`], with `configure` adjusting every node's configuration.
    pub async fn new_with(
        total: usize,
        tuning: escrow_broker::raft::RaftTuning,
        configure: fn(&mut BrokerConfig),
    ) -> anyhow::Result<TestCluster> {
        init_logging();
        let mut cluster = TestCluster {
            nodes: Vec::new(),
            dirs: Vec::new(),
            addrs: Vec::new(),
            ca_dir: tempfile::tempdir()?,
            filter: Default::default(),
            tuning,
            configure,
        };
        for i in 0..total {
            cluster.dirs.push(tempfile::tempdir()?);
            cluster.nodes.push(None);
            cluster
                .addrs
                .push(("127.0.0.1:0".parse()?, "127.0.0.1:0".parse()?));
            cluster.start_node(i).await?;
        }
        Ok(cluster)
    }

    /// A running cluster of `n` voters with node 1 leading.
    pub async fn voters(n: usize) -> anyhow::Result<TestCluster> {
        let cluster = TestCluster::new(n, test_tuning()).await?;
        cluster.join_all_as_voters().await?;
        Ok(cluster)
    }

    /// Adds every other node to node 1's cluster as a voter.
    pub async fn join_all_as_voters(&self) -> anyhow::Result<()> {
        let others: Vec<_> = (1..self.nodes.len())
            .map(|i| (i as u64 + 1, self.node_addr(i)))
            .collect();
        self.node(0).add_voters(&others).await?;
        Ok(())
    }

    /// Node `i`'s advertised addresses.
    pub fn node_addr(&self, i: usize) -> escrow_broker::raft::NodeAddr {
        escrow_broker::raft::NodeAddr {
            raft_addr: self.addrs[i].1.to_string(),
            client_addr: self.addrs[i].0.to_string(),
        }
    }

    /// The running node at index `i`.
    pub fn node(&self, i: usize) -> &Broker {
        match &self.nodes[i] {
            Some(b) => b,
            None => panic!("node {} is stopped", i + 1),
        }
    }

    /// Starts node `i` (again), on the addresses it had.
    pub async fn start_node(&mut self, i: usize) -> anyhow::Result<()> {
        let ca = tls::ensure_ca(self.ca_dir.path())?;
        let dir = self.dirs[i].path().to_path_buf();
        let (cert, key) = tls::ensure_node_cert(&ca, &dir.join("tls"), &[])?;
        let (client, raft) = self.addrs[i];
        let mut config = BrokerConfig::new(
            client,
            raft,
            dir.join("data"),
            TlsFiles {
                cert,
                key,
                ca: ca.cert,
            },
        );
        config.node_id = i as u64 + 1;
        config.bootstrap = i == 0;
        config.raft = self.tuning.clone();
        (self.configure)(&mut config);
        let broker = Broker::start_with_filter(config, self.filter.clone()).await?;
        self.addrs[i] = (broker.local_addr(), broker.raft_addr());
        self.nodes[i] = Some(broker);
        Ok(())
    }

    /// Crashes the leader ([`Broker::crash`]: no goodbye to clients or peers), waits for
    /// another node to lead, then restarts the old leader. Returns its index.
    pub async fn bounce_leader(&mut self) -> anyhow::Result<usize> {
        let all: Vec<usize> = (0..self.nodes.len()).collect();
        let leader = self.wait_leader(&all).await?;
        self.crash_node(leader).await;
        let others: Vec<usize> = all.into_iter().filter(|&i| i != leader).collect();
        self.wait_leader(&others).await?;
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        self.start_node(leader).await?;
        Ok(leader)
    }

    /// Crashes node `i` ([`Broker::crash`]), keeping what it fsynced.
    pub async fn crash_node(&mut self, i: usize) {
        if let Some(b) = self.nodes[i].take() {
            b.crash().await;
        }
    }

    /// Stops node `i` (gracefully), keeping its data.
    pub async fn stop_node(&mut self, i: usize) {
        if let Some(b) = self.nodes[i].take() {
            b.shutdown().await;
        }
    }

    /// Stops node `i` and deletes its data (certificates are kept).
    pub async fn wipe_node(&mut self, i: usize) -> anyhow::Result<()> {
        self.stop_node(i).await;
        std::fs::remove_dir_all(self.dirs[i].path().join("data"))?;
        Ok(())
    }

    /// Node `i`'s data directory (its redb files).
    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.dirs[i].path().join("data")
    }

    /// The CA clients trust.
    pub fn ca(&self) -> PathBuf {
        self.ca_dir.path().join("ca.pem")
    }

    /// A client configuration listing every node as a seed.
    pub fn client(&self) -> ClientConfig {
        let seeds: Vec<String> = self.addrs.iter().map(|(c, _)| c.to_string()).collect();
        ClientConfig::new(seeds.join(","), Trust::CaFile(self.ca()))
    }

    /// A client configuration for node `i` alone.
    pub fn client_of(&self, i: usize) -> ClientConfig {
        ClientConfig::new(self.addrs[i].0.to_string(), Trust::CaFile(self.ca()))
    }

    /// Waits until some running node leads with its view caught up; returns its index.
    pub async fn wait_leader(&self, among: &[usize]) -> anyhow::Result<usize> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        loop {
            for &i in among {
                if let Some(b) = &self.nodes[i] {
                    let m = b.raft().metrics().borrow().clone();
                    if m.current_leader == Some(b.node_id())
                        && m.last_applied
                            .is_some_and(|l| l.leader_id.term == m.current_term)
                    {
                        return Ok(i);
                    }
                }
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "no leader among {among:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Waits until every running node has applied at least `index`.
    pub async fn wait_applied(&self, index: u64) -> anyhow::Result<()> {
        for b in self.nodes.iter().flatten() {
            b.raft()
                .wait(Some(std::time::Duration::from_secs(20)))
                .applied_index_at_least(Some(index), "caught up")
                .await?;
        }
        Ok(())
    }

    /// Waits until every running node has applied everything node `i` has applied.
    pub async fn wait_caught_up_with(&self, i: usize) -> anyhow::Result<()> {
        let applied = self
            .node(i)
            .raft()
            .metrics()
            .borrow()
            .last_applied
            .map_or(0, |l| l.index);
        self.wait_applied(applied).await
    }

    /// Shuts every node down.
    pub async fn shutdown(mut self) {
        for i in 0..self.nodes.len() {
            self.stop_node(i).await;
        }
    }
}

/// Receives everything `consumer` gets until a receive waits `idle` in vain, and returns
/// the message ids; a message delivered twice is an error.
pub async fn drain_ids(
    consumer: &escrow_consumer::Consumer,
    idle: std::time::Duration,
) -> anyhow::Result<std::collections::BTreeSet<String>> {
    let mut ids = std::collections::BTreeSet::new();
    loop {
        let batch = consumer
            .receive(1000, std::time::Duration::from_secs(60), idle)
            .await?;
        if batch.is_empty() {
            return Ok(ids);
        }
        for d in batch {
            anyhow::ensure!(
                ids.insert(d.message.id.clone()),
                "{} delivered twice",
                d.message.id
            );
        }
    }
}
