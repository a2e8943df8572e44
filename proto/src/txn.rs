//! Transactional ("half") messages: stored invisibly, then committed or rolled back once.

use crate::message::{Message, Position};
use serde::{Deserialize, Serialize};

/// Where half messages go when no check-back resolved them (never delivered to their topic).
pub const ABANDONED_TOPIC: &str = "%TXN-ABANDONED%";

/// Store a half message: durable, invisible to every consumer until committed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendHalf {
    /// Topic the message goes to when committed.
    pub topic: String,
    /// Producer group asked to resolve the transaction if its producer goes silent.
    pub producer_group: String,
    /// The sending producer instance (asked first).
    pub instance: String,
    /// The message.
    pub message: Message,
    /// First check-back after this long instead of the broker's setting.
    pub first_check_ms: Option<u64>,
}

/// A half message is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HalfSent {
    /// The transaction's id, for `EndTxn`.
    pub txn_id: u64,
    /// Commit index of the entry that stored it.
    pub commit_index: u64,
}

/// A producer's (or an operator's) decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TxnDecision {
    /// Make the message visible in its queue.
    Commit,
    /// Discard the message.
    Rollback,
    /// Not known yet: keep checking back.
    Unknown,
}

/// Who decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnSource {
    /// The producer that sent the half message, after its local transaction.
    Producer,
    /// A producer of the group, answering a check-back.
    CheckBack,
    /// An operator (`escrow txn commit|rollback`).
    Operator,
}

/// End a transaction. Acknowledged: the answer says what stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndTxn {
    /// From [`HalfSent::txn_id`] or [`TxnCheck::txn_id`].
    pub txn_id: u64,
    /// The decision.
    pub decision: TxnDecision,
    /// Who decided.
    pub source: TxnSource,
}

/// What stands for a transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnState {
    /// Waiting for a decision.
    Pending,
    /// Committed: the message is at this position.
    Committed(Position),
    /// Rolled back: the message is gone.
    RolledBack,
    /// No decision after the maximum number of checks: moved to the abandoned topic.
    Abandoned,
}

/// The answer to `EndTxn`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnOutcome {
    /// The transaction.
    pub txn_id: u64,
    /// What stands now.
    pub state: TxnState,
}

/// A transactional producer waits for check-backs of its group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PollChecks {
    /// Producer group.
    pub producer_group: String,
    /// This producer instance.
    pub instance: String,
    /// How long to wait for a check when none is due.
    pub wait_ms: u64,
}

/// The broker asks: did the local transaction behind this half message commit?
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnCheck {
    /// The transaction.
    pub txn_id: u64,
    /// Its topic.
    pub topic: String,
    /// The half message.
    pub message: Message,
    /// Checks made so far, this one included.
    pub check: u32,
}

/// A pending transaction, as `escrow txn list` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnInfo {
    /// The transaction.
    pub txn_id: u64,
    /// Its topic.
    pub topic: String,
    /// Producer group.
    pub producer_group: String,
    /// The producer instance that sent it.
    pub instance: String,
    /// The message id.
    pub message_id: String,
    /// When it was stored.
    pub stored_at_ms: u64,
    /// Check-backs made.
    pub checks: u32,
    /// When the next check is due.
    pub next_check_at_ms: u64,
}
