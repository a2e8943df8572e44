//! Requests a client sends, one per bidirectional stream.

use crate::message::{Message, ReceiptHandle};
use serde::{Deserialize, Serialize};

/// Every request. New variants are only ever appended (postcard encodes the variant index).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// First request on every connection: version and credentials.
    Hello(Hello),
    /// Create a topic.
    CreateTopic(CreateTopic),
    /// List all topics.
    ListTopics,
    /// Describe one topic, with per-queue offsets.
    DescribeTopic {
        /// Topic name.
        topic: String,
    },
    /// Publish one or more messages to a topic.
    Publish(Publish),
    /// Lease messages for a consumer group.
    Receive(Receive),
    /// Acknowledge leased messages: they are done for this group.
    Ack(Ack),
    /// Give leased messages back, visible again after a delay.
    Nack(Nack),
    /// Extend or shorten a lease.
    ChangeInvisibility(ChangeInvisibility),
    /// Broker counters (commits, fsyncs, messages).
    Stats,
    /// Cluster membership and status.
    Cluster(ClusterRequest),
    /// Consumer groups with progress, per topic.
    ListGroups,
    /// Per-queue lag of one group on one topic.
    GroupLag {
        /// Topic name.
        topic: String,
        /// Consumer group.
        group: String,
    },
    /// Dead letters of a group not yet redriven.
    DlqList {
        /// Consumer group.
        group: String,
        /// Most entries to list.
        max: u32,
    },
    /// Bring dead letters back to their group (delivered again as new).
    DlqRedrive {
        /// Consumer group.
        group: String,
        /// Most entries to redrive.
        max: u32,
    },
    /// Store a transactional half message.
    SendHalf(crate::txn::SendHalf),
    /// Commit, roll back, or report a transaction unknown.
    EndTxn(crate::txn::EndTxn),
    /// Wait for check-backs addressed to this producer instance.
    PollChecks(crate::txn::PollChecks),
    /// Pending transactions.
    ListTxns {
        /// Most to list.
        max: u32,
    },
    /// Store several half messages (each its own transaction), answered one by one.
    SendHalves(Vec<crate::txn::SendHalf>),
    /// End several transactions, answered one by one.
    EndTxns(Vec<crate::txn::EndTxn>),
}

/// Cluster administration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClusterRequest {
    /// This node's Raft status and the membership it knows (any node answers).
    Status,
    /// Make this uninitialized node a one-voter cluster.
    Init,
    /// Add a node as a learner (it receives the log but does not vote).
    AddLearner {
        /// The new node's id (never reuse one).
        node_id: u64,
        /// Its Raft address.
        raft_addr: String,
        /// Its client address.
        client_addr: String,
    },
    /// Make a learner a voter.
    Promote {
        /// Node id.
        node_id: u64,
    },
    /// Remove a node (voter or learner) from the cluster.
    Remove {
        /// Node id.
        node_id: u64,
    },
}

impl Request {
    /// Short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Hello(_) => "hello",
            Request::CreateTopic(_) => "create_topic",
            Request::ListTopics => "list_topics",
            Request::DescribeTopic { .. } => "describe_topic",
            Request::Publish(_) => "publish",
            Request::Receive(_) => "receive",
            Request::Ack(_) => "ack",
            Request::Nack(_) => "nack",
            Request::ChangeInvisibility(_) => "change_invisibility",
            Request::Stats => "stats",
            Request::Cluster(_) => "cluster",
            Request::ListGroups => "list_groups",
            Request::GroupLag { .. } => "group_lag",
            Request::DlqList { .. } => "dlq_list",
            Request::DlqRedrive { .. } => "dlq_redrive",
            Request::SendHalf(_) => "send_half",
            Request::EndTxn(_) => "end_txn",
            Request::PollChecks(_) => "poll_checks",
            Request::ListTxns { .. } => "list_txns",
            Request::SendHalves(_) => "send_halves",
            Request::EndTxns(_) => "end_txns",
        }
    }
}

/// Connection handshake.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The client's [`crate::PROTOCOL_VERSION`].
    pub protocol_version: u16,
    /// Free-form client name for logs.
    pub client_name: String,
    /// Authentication token, when the server requires one.
    pub token: Option<String>,
}

/// Create a topic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateTopic {
    /// Topic name.
    pub topic: String,
    /// Number of queues (partitions), at least 1.
    pub queues: u32,
}

/// Idempotence data of a publish: the producer's id and the sequence of its first message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerSequence {
    /// Unique per producer instance.
    pub producer_id: u64,
    /// Sequence number of the first message; the i-th message has `first_sequence + i`.
    pub first_sequence: u64,
}

/// Publish a batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publish {
    /// Topic name.
    pub topic: String,
    /// The producer's id and sequence, for deduplication of retries.
    pub producer: Option<ProducerSequence>,
    /// The messages, stored in this order.
    pub messages: Vec<Message>,
    /// Store each message id at most once per topic within the broker's dedup window
    /// (outbox relays: a republished row is acknowledged, not stored again).
    pub dedupe_by_id: bool,
}

/// Lease up to `max` messages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receive {
    /// Topic name.
    pub topic: String,
    /// Consumer group.
    pub group: String,
    /// Most messages to return.
    pub max: u32,
    /// How long the returned messages stay invisible to others unless acked.
    pub invisible_for_ms: u64,
    /// How long to wait for a first message when none is ready.
    pub wait_ms: u64,
}

/// Acknowledge leased messages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// Topic name.
    pub topic: String,
    /// Consumer group.
    pub group: String,
    /// Receipts from [`crate::Delivery::receipt`].
    pub receipts: Vec<ReceiptHandle>,
}

/// Return leased messages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nack {
    /// Topic name.
    pub topic: String,
    /// Consumer group.
    pub group: String,
    /// Receipts from [`crate::Delivery::receipt`].
    pub receipts: Vec<ReceiptHandle>,
    /// Visible again after this delay; `None`: the broker's retry backoff for the
    /// message's delivery count (10 s, 30 s, 1 m, 2 m, … by default).
    pub delay_ms: Option<u64>,
}

/// Change when a leased message becomes visible again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeInvisibility {
    /// Topic name.
    pub topic: String,
    /// Consumer group.
    pub group: String,
    /// The lease to change.
    pub receipt: ReceiptHandle,
    /// Invisible for this long from now.
    pub invisible_for_ms: u64,
}
