//! Responses the server sends, one per request.

use crate::error::{ErrorCode, ErrorResponse};
use crate::message::{Delivery, Position, ReceiptHandle};
use serde::{Deserialize, Serialize};

/// Every response. New variants are only ever appended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// The request failed; nothing was applied.
    Error(ErrorResponse),
    /// Handshake accepted.
    HelloOk(HelloOk),
    /// A topic, after create or describe.
    Topic(TopicInfo),
    /// All topics.
    Topics(Vec<TopicInfo>),
    /// A publish is durable.
    Published(Published),
    /// Leased messages (possibly none after the wait).
    Messages(Vec<Delivery>),
    /// Acks applied.
    Acked(AckResult),
    /// Nacks applied.
    Nacked(AckResult),
    /// Lease changed.
    InvisibilityChanged,
    /// Broker counters.
    Stats(BrokerStats),
    /// A node's cluster status.
    Cluster(ClusterStatus),
    /// Consumer groups.
    Groups(Vec<GroupInfo>),
    /// Lag of one group, per queue.
    Lag(Vec<QueueLag>),
    /// Dead letters.
    DeadLetters(Vec<DeadLetter>),
    /// This many dead letters were redriven.
    Redriven(u32),
    /// A half message is stored.
    HalfSent(crate::txn::HalfSent),
    /// What stands for a transaction after `EndTxn`.
    TxnEnded(crate::txn::TxnOutcome),
    /// Check-backs for this producer (possibly none after the wait).
    Checks(Vec<crate::txn::TxnCheck>),
    /// Pending transactions.
    Txns(Vec<crate::txn::TxnInfo>),
    /// One answer per half message of `SendHalves`, in order.
    HalvesSent(Vec<Result<crate::txn::HalfSent, ErrorResponse>>),
    /// One answer per transaction of `EndTxns`, in order.
    TxnsEnded(Vec<Result<crate::txn::TxnOutcome, ErrorResponse>>),
}

/// A consumer group with progress on a topic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupInfo {
    /// Consumer group.
    pub group: String,
    /// Topic.
    pub topic: String,
    /// Messages acked by the group.
    pub acked: u64,
    /// Messages not acked yet.
    pub backlog: u64,
}

/// One queue's lag for one group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueLag {
    /// Queue index.
    pub queue: u32,
    /// Messages published (next offset).
    pub published: u64,
    /// Messages acked by the group.
    pub acked: u64,
    /// Messages leased and not acked (leader-local).
    pub in_flight: u64,
    /// Messages not acked: published - acked.
    pub backlog: u64,
}

/// A message in a group's dead-letter topic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Where it sits in the dead-letter topic.
    pub position: Position,
    /// Topic it came from.
    pub topic: String,
    /// Where it sat in that topic.
    pub origin: Position,
    /// Deliveries made before it was dead-lettered.
    pub deliveries: u32,
    /// When it was dead-lettered.
    pub dead_at_ms: u64,
    /// The message as published.
    pub message: crate::message::Message,
}

/// One node's view of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The answering node.
    pub node_id: u64,
    /// `leader`, `follower`, `candidate`, `learner` or `shutdown`.
    pub role: String,
    /// Current term.
    pub term: u64,
    /// The leader it knows of.
    pub leader: Option<u64>,
    /// Index of its last log entry.
    pub last_log: Option<u64>,
    /// Highest index it knows committed.
    pub committed: Option<u64>,
    /// Highest index applied to its state machine.
    pub applied: Option<u64>,
    /// Last index covered by its snapshot.
    pub snapshot: Option<u64>,
    /// Last index purged from its log.
    pub purged: Option<u64>,
    /// Members of the cluster as it knows them.
    pub members: Vec<Member>,
}

/// A cluster member.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Node id.
    pub node_id: u64,
    /// Raft address.
    pub raft_addr: String,
    /// Client address.
    pub client_addr: String,
    /// Voter (true) or learner.
    pub voter: bool,
}

/// Handshake answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloOk {
    /// The server's protocol version.
    pub protocol_version: u16,
    /// The node's id.
    pub node_id: u64,
    /// Largest frame the server accepts.
    pub max_frame_len: u32,
}

/// A topic and its queues.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicInfo {
    /// Topic name.
    pub name: String,
    /// Per-queue offsets, indexed by queue number.
    pub queues: Vec<QueueInfo>,
    /// Creation time (milliseconds since the Unix epoch).
    pub created_at_ms: u64,
}

/// Offsets of one queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueInfo {
    /// Offset of the oldest retained message.
    pub low_offset: u64,
    /// Offset the next message will get.
    pub next_offset: u64,
}

/// Proof that a publish is durable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    /// One position per message, in request order.
    pub positions: Vec<Position>,
    /// How the batch was made durable (G1: the ack says so).
    pub durability: Durability,
}

/// What stands behind an acknowledgement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Durability {
    /// Commit index of the write (the replicated log index once replicated).
    pub commit_index: u64,
    /// Nodes that had written and fsynced the entry before the ack.
    pub fsynced_replicas: u32,
    /// Voting members at that time.
    pub voters: u32,
}

/// Outcome of an ack or nack.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckResult {
    /// How many receipts took effect.
    pub applied: u32,
    /// Receipts that did not, with the reason.
    pub rejected: Vec<(ReceiptHandle, ErrorCode)>,
}

/// Broker counters since the process started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerStats {
    /// Durable storage commits (each one fsync).
    pub fsyncs: u64,
    /// Commands applied to the state machine.
    pub commands_applied: u64,
    /// Messages appended.
    pub messages_appended: u64,
    /// Message bytes appended (bodies).
    pub bytes_appended: u64,
    /// Open client connections.
    pub connections: u64,
}
