//! Broker configuration.

use crate::raft::RaftTuning;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub use escrow_client::defaults::DEFAULT_CLIENT_PORT;

/// Default Raft (peer) port of `escrow dev`.
pub const DEFAULT_RAFT_PORT: u16 = 7450;

/// Where the node's certificate, key and cluster CA are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsFiles {
    /// PEM certificate chain presented to clients and peers.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM cluster CA: peers must present a certificate it issued (mutual TLS).
    pub ca: PathBuf,
}

/// Everything a broker node needs to run. Loaded from TOML by `escrow serve --config`;
/// every field has a default, and `ESCROW_*` environment variables override the file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
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
    /// Most request bytes the node holds at once across all connections; more wait.
    pub max_in_flight_bytes: usize,
    /// Initialize a single-node cluster of this node if it has no Raft state yet.
    pub bootstrap: bool,
    /// Raft timing and batching.
    pub raft: RaftTuning,
    /// Idempotent-producer state is forgotten after this long without a publish.
    pub producer_idle_expiry_ms: u64,
    /// Message ids published with dedup are remembered this long (outlive any relay outage).
    pub dedupe_window_ms: u64,
    /// Most message ids remembered; the oldest are forgotten first beyond it (bounds disk).
    pub dedupe_max_ids: u64,
    /// Deliveries to a group after which an unacked message moves to `%DLQ%<group>`.
    pub max_deliveries: u32,
    /// Retry delays after a nack without a delay, by delivery count (the last repeats).
    pub retry_backoff_ms: Vec<u64>,
    /// Furthest in the future a delayed message may be scheduled.
    pub max_delay_ms: u64,
    /// Transaction check-back defaults (RocketMQ's: 6 s, 30 s, 15 checks).
    pub txn: TxnSettings,
    /// Per-topic overrides of `txn`, by topic name.
    pub txn_topics: BTreeMap<String, TxnSettings>,
    /// Most pending half messages; more are refused with `OVERLOADED`.
    pub max_pending_txns: usize,
}

/// When and how often the leader checks back on a pending transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TxnSettings {
    /// First check this long after the half message was stored (a message may ask for another).
    pub first_check_ms: u64,
    /// Then every this long.
    pub check_interval_ms: u64,
    /// After this many checks without a decision, the message is abandoned.
    pub max_checks: u32,
}

impl Default for TxnSettings {
    fn default() -> Self {
        TxnSettings {
            first_check_ms: 6_000,
            check_interval_ms: 30_000,
            max_checks: 15,
        }
    }
}

impl BrokerConfig {
    /// Check-back settings of a topic (its override, else the broker's).
    pub fn txn_settings(&self, topic: &str) -> TxnSettings {
        self.txn_topics.get(topic).copied().unwrap_or(self.txn)
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        let data_dir = PathBuf::from("escrow-data");
        let tls = TlsFiles {
            cert: data_dir.join("tls").join("node.pem"),
            key: data_dir.join("tls").join("node.key"),
            ca: data_dir.join("tls").join("ca.pem"),
        };
        BrokerConfig::new(
            SocketAddr::from(([127, 0, 0, 1], DEFAULT_CLIENT_PORT)),
            SocketAddr::from(([127, 0, 0, 1], DEFAULT_RAFT_PORT)),
            data_dir,
            tls,
        )
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this configuration.
    #[error("parsing {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// An environment override has a bad value.
    #[error("environment variable {name}: {message}")]
    Env {
        /// The variable.
        name: &'static str,
        /// Why.
        message: String,
    },
    /// The values are inconsistent.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

fn env_parse<T: std::str::FromStr>(name: &'static str) -> Result<Option<T>, ConfigError>
where
    T::Err: std::fmt::Display,
{
    match std::env::var(name) {
        Ok(v) => v.parse().map(Some).map_err(|e: T::Err| ConfigError::Env {
            name,
            message: e.to_string(),
        }),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(e) => Err(ConfigError::Env {
            name,
            message: e.to_string(),
        }),
    }
}

impl BrokerConfig {
    /// Loads `path` (or the defaults), applies `ESCROW_*` overrides and validates.
    ///
    /// Overrides: `ESCROW_NODE_ID`, `ESCROW_LISTEN`, `ESCROW_RAFT_LISTEN`,
    /// `ESCROW_ADVERTISE_CLIENT`, `ESCROW_ADVERTISE_RAFT`, `ESCROW_DATA_DIR`,
    /// `ESCROW_TLS_CERT`, `ESCROW_TLS_KEY`, `ESCROW_TLS_CA`, `ESCROW_BOOTSTRAP`.
    pub fn load(path: Option<&Path>) -> Result<BrokerConfig, ConfigError> {
        let mut config = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })?
            }
            None => BrokerConfig::default(),
        };
        if let Some(v) = env_parse("ESCROW_NODE_ID")? {
            config.node_id = v;
        }
        if let Some(v) = env_parse("ESCROW_LISTEN")? {
            config.listen = v;
        }
        if let Some(v) = env_parse("ESCROW_RAFT_LISTEN")? {
            config.raft_listen = v;
        }
        if let Some(v) = env_parse::<String>("ESCROW_ADVERTISE_CLIENT")? {
            config.advertise_client = Some(v);
        }
        if let Some(v) = env_parse::<String>("ESCROW_ADVERTISE_RAFT")? {
            config.advertise_raft = Some(v);
        }
        if let Some(v) = env_parse::<PathBuf>("ESCROW_DATA_DIR")? {
            config.data_dir = v;
        }
        if let Some(v) = env_parse::<PathBuf>("ESCROW_TLS_CERT")? {
            config.tls.cert = v;
        }
        if let Some(v) = env_parse::<PathBuf>("ESCROW_TLS_KEY")? {
            config.tls.key = v;
        }
        if let Some(v) = env_parse::<PathBuf>("ESCROW_TLS_CA")? {
            config.tls.ca = v;
        }
        if let Some(v) = env_parse("ESCROW_BOOTSTRAP")? {
            config.bootstrap = v;
        }
        config.validate().map_err(ConfigError::Invalid)?;
        Ok(config)
    }

    /// The configuration as TOML (for `--print-config`).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render: {e}"))
    }

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
            max_in_flight_bytes: 256 * 1024 * 1024,
            bootstrap: false,
            raft: RaftTuning::default(),
            producer_idle_expiry_ms: 7 * 24 * 60 * 60 * 1000,
            dedupe_window_ms: 24 * 60 * 60 * 1000,
            dedupe_max_ids: 10_000_000,
            max_deliveries: 16,
            retry_backoff_ms: [
                10, 30, 60, 120, 180, 240, 300, 360, 420, 480, 540, 600, 1200, 1800, 3600, 7200,
            ]
            .iter()
            .map(|s| s * 1000)
            .collect(),
            max_delay_ms: 7 * 24 * 60 * 60 * 1000,
            txn: TxnSettings::default(),
            txn_topics: BTreeMap::new(),
            max_pending_txns: 100_000,
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
        if self.max_in_flight_bytes < escrow_proto::MAX_FRAME_LEN as usize {
            return Err("max_in_flight_bytes must hold at least one maximal frame (8 MiB)".into());
        }
        if self.producer_idle_expiry_ms == 0 {
            return Err("producer_idle_expiry_ms must be positive".into());
        }
        for t in std::iter::once(&self.txn).chain(self.txn_topics.values()) {
            if t.check_interval_ms == 0 || t.max_checks == 0 {
                return Err("txn check_interval_ms and max_checks must be positive".into());
            }
        }
        if self.max_deliveries == 0 {
            return Err("max_deliveries must be positive".into());
        }
        if self.retry_backoff_ms.is_empty()
            || self
                .retry_backoff_ms
                .iter()
                .any(|&d| d > escrow_proto::MAX_INVISIBLE_MS)
        {
            return Err(format!(
                "retry_backoff_ms needs 1 or more delays of at most {} ms",
                escrow_proto::MAX_INVISIBLE_MS
            ));
        }
        if self.dedupe_window_ms == 0 || self.dedupe_max_ids == 0 {
            return Err("dedupe_window_ms and dedupe_max_ids must be positive".into());
        }
        self.raft.config().map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_round_trip_and_partial_files() {
        let config = BrokerConfig::default();
        let text = config.to_toml();
        let back: BrokerConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, config);
        let partial: BrokerConfig =
            toml::from_str("node_id = 3\nlisten = \"127.0.0.1:9000\"\n[raft]\nheartbeat_ms = 50\n")
                .unwrap();
        assert_eq!(partial.node_id, 3);
        assert_eq!(partial.raft.heartbeat_ms, 50);
        assert_eq!(
            partial.raft.election_min_ms,
            RaftTuning::default().election_min_ms
        );
        assert!(
            toml::from_str::<BrokerConfig>("nodeid = 3").is_err(),
            "typos are refused"
        );
    }
}
