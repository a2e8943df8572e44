//! Broker configuration.

use crate::raft::RaftTuning;
use std::net::SocketAddr;
use std::path::PathBuf;

pub use escrow_client::defaults::DEFAULT_CLIENT_PORT;

/// Default Raft (peer) port of `escrow dev`.
pub const DEFAULT_RAFT_PORT: u16 = 7450;

/// Where the node's certificate, key and cluster CA are.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// PEM certificate chain presented to clients and peers.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM cluster CA: peers must present a certificate it issued (mutual TLS).
    pub ca: PathBuf,
}

/// Everything a broker node needs to run.
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// This node's id (unique in the cluster, never reused).
    pub node_id: u64,
    /// Client listen address (QUIC/UDP).
    pub listen: SocketAddr,
    /// Raft listen address for peers (QUIC/UDP).
    pub raft_listen: SocketAddr,
    /// Client address peers and clients are told (default: the bound `listen` address).
    pub advertise_client: Option<String>,
    /// Raft address peers are told (default: the bound `raft_listen` address).
    pub advertise_raft: Option<String>,
    /// Data directory: `state.redb` and `raft-log.redb` live here.
    pub data_dir: PathBuf,
    /// Certificates.
    pub tls: TlsFiles,
    /// Most concurrent client connections; more are refused.
    pub max_connections: usize,
    /// Most concurrent request streams per connection (bounds a client's pipelining window).
    pub max_streams_per_connection: u32,
    /// Initialize a single-node cluster of this node if it has no Raft state yet.
    pub bootstrap: bool,
    /// Raft timing and batching.
    pub raft: RaftTuning,
    /// Idempotent-producer state is forgotten after this long without a publish.
    pub producer_idle_expiry_ms: u64,
}

impl BrokerConfig {
    /// A configuration with defaults for everything but the paths and addresses.
    pub fn new(
        listen: SocketAddr,
        raft_listen: SocketAddr,
        data_dir: PathBuf,
        tls: TlsFiles,
    ) -> BrokerConfig {
        BrokerConfig {
            node_id: 1,
            listen,
            raft_listen,
            advertise_client: None,
            advertise_raft: None,
            data_dir,
            tls,
            max_connections: 1024,
            max_streams_per_connection: 1024,
            bootstrap: false,
            raft: RaftTuning::default(),
            producer_idle_expiry_ms: 7 * 24 * 60 * 60 * 1000,
        }
    }

    /// Checks the values make sense.
    pub fn validate(&self) -> Result<(), String> {
        if self.node_id == 0 {
            return Err("node_id must be at least 1".into());
        }
        if self.max_connections == 0 {
            return Err("max_connections must be at least 1".into());
        }
        if self.max_streams_per_connection == 0 {
            return Err("max_streams_per_connection must be at least 1".into());
        }
        if self.producer_idle_expiry_ms == 0 {
            return Err("producer_idle_expiry_ms must be positive".into());
        }
        self.raft.config().map(|_| ())
    }
}
