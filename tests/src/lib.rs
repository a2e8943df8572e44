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
        init_logging();
        let dir = tempfile::tempdir()?;
        let certs = tls::ensure_dev_tls(dir.path(), &[])?;
        let mut node = TestNode {
            broker: None,
            dir,
            ca: certs.ca_cert,
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
