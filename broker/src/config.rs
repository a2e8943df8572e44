//! Broker configuration.

use std::net::SocketAddr;
use std::path::PathBuf;

pub use escrow_client::defaults::DEFAULT_CLIENT_PORT;

/// Where the node's certificate and key are.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// PEM certificate chain presented to clients.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// Everything a broker node needs to run.
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// This node's id.
    pub node_id: u64,
    /// Client listen address (QUIC/UDP).
    pub listen: SocketAddr,
    /// Data directory: `state.redb` lives here.
    pub data_dir: PathBuf,
    /// Server certificate and key.
    pub tls: TlsFiles,
    /// Most concurrent client connections; more are refused.
    pub max_connections: usize,
    /// Most concurrent request streams per connection (bounds a client's pipelining window).
    pub max_streams_per_connection: u32,
}

impl BrokerConfig {
    /// A configuration with defaults for everything but the paths and address.
    pub fn new(listen: SocketAddr, data_dir: PathBuf, tls: TlsFiles) -> BrokerConfig {
        BrokerConfig {
            node_id: 1,
            listen,
            data_dir,
            tls,
            max_connections: 1024,
            max_streams_per_connection: 1024,
        }
    }

    /// Checks the values make sense.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_connections == 0 {
            return Err("max_connections must be at least 1".into());
        }
        if self.max_streams_per_connection == 0 {
            return Err("max_streams_per_connection must be at least 1".into());
        }
        Ok(())
    }
}
