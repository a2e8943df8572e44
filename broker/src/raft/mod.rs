//! Raft replication: the one module that knows openraft.
//!
//! openraft types stay behind this adapter so a later move to openraft 0.10 stays cheap.
//! - [`log_store`]: the Raft log and vote on redb (one write transaction per append).
//! - [`state_machine`]: applies committed [`Batch`]es through [`crate::state::StateMachine`], snapshots.
//! - [`network`]: Raft RPCs over QUIC (ALPN `escrow-raft/1`, mutual TLS), with a fault filter.

// openraft's trait signatures fix `StorageError` (large) as the error type.
#![allow(clippy::result_large_err)]

pub mod filter;
pub mod log_store;
pub mod network;
pub mod state_machine;

use crate::state::command::{Batch, Output};
use serde::{Deserialize, Serialize};

/// Addresses of a cluster member, replicated in the membership config.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddr {
    /// Where peers reach its Raft endpoint.
    pub raft_addr: String,
    /// Where clients reach it.
    pub client_addr: String,
}

impl std::fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "raft={} client={}", self.raft_addr, self.client_addr)
    }
}

openraft::declare_raft_types!(
    /// Escrow's Raft types: a log entry carries one [`Batch`], shared (not copied) between
    /// the log cache, replication and the state machine.
    pub TypeConfig:
        D = std::sync::Arc<Batch>,
        R = Vec<Output>,
        NodeId = u64,
        Node = NodeAddr,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = std::io::Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The Raft handle.
pub type Raft = openraft::Raft<TypeConfig>;
/// A log id.
pub type LogId = openraft::LogId<u64>;
/// A log entry.
pub type Entry = openraft::Entry<TypeConfig>;
/// Membership as stored.
pub type StoredMembership = openraft::StoredMembership<u64, NodeAddr>;
/// Storage errors as openraft wants them.
pub type StorageError = openraft::StorageError<u64>;
/// Raft metrics.
pub type Metrics = openraft::RaftMetrics<u64, NodeAddr>;
/// Raft configuration.
pub use openraft::Config as RaftConfig;
/// Server state (leader, follower, ...).
pub use openraft::ServerState;

/// Raft timing and batching settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftTuning {
    /// Leader heartbeat interval.
    pub heartbeat_ms: u64,
    /// Election timeout range.
    pub election_min_ms: u64,
    /// Election timeout range.
    pub election_max_ms: u64,
    /// Most entries in one AppendEntries (each entry is a group-commit batch).
    pub max_payload_entries: u64,
    /// Build a snapshot after this many log entries since the last one.
    pub snapshot_after_entries: u64,
    /// Log entries kept behind a snapshot (lets slightly lagging followers catch up from the log).
    pub keep_after_snapshot: u64,
}

impl Default for RaftTuning {
    fn default() -> Self {
        RaftTuning {
            heartbeat_ms: 100,
            // A follower waits for its own fsync in openraft 0.9's core; one that stalled for
            // 400 ms on the development VM called an election against a healthy leader when
            // it woke up (2026-12-01). One to two seconds, as etcd and Kafka's KRaft default to.
            election_min_ms: 1000,
            election_max_ms: 2000,
            max_payload_entries: 64,
            snapshot_after_entries: 50_000,
            keep_after_snapshot: 1000,
        }
    }
}

impl RaftTuning {
    /// The openraft configuration.
    pub fn config(&self) -> Result<RaftConfig, String> {
        RaftConfig {
            cluster_name: "escrow".into(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_min_ms,
            election_timeout_max: self.election_max_ms,
            max_payload_entries: self.max_payload_entries,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_after_entries),
            max_in_snapshot_log_to_keep: self.keep_after_snapshot,
            install_snapshot_timeout: 10_000,
            ..RaftConfig::default()
        }
        .validate()
        .map_err(|e| e.to_string())
    }
}

fn io_error<E: std::error::Error + 'static>(
    subject: openraft::ErrorSubject<u64>,
    verb: openraft::ErrorVerb,
    e: &E,
) -> StorageError {
    openraft::StorageIOError::new(subject, verb, openraft::AnyError::new(e)).into()
}
