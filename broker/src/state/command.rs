//! Commands: every change of replicated state is one of these, applied in log order.

use escrow_proto::txn::TxnState;
use escrow_proto::{ErrorResponse, Message, Position, ProducerSequence, TopicInfo};
use serde::{Deserialize, Serialize};

/// A batch of commands committed together (one log entry) at one time.
///
/// The leader stamps `at_ms`, so applying the batch is deterministic everywhere.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// Leader's clock when the batch was formed (milliseconds since the Unix epoch).
    pub at_ms: u64,
    /// The commands, applied in order.
    pub commands: Vec<Command>,
}

/// One state change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Create a topic with `queues` queues.
    CreateTopic {
        /// Topic name.
        name: String,
        /// Queue count.
        queues: u32,
    },
    /// Append messages; the leader has routed each to its queue.
    Append {
        /// Topic name.
        topic: String,
        /// Producer id and sequence of the first message.
        producer: Option<ProducerSequence>,
        /// `(queue, message)` in request order.
        records: Vec<(u32, Message)>,
        /// Store each message id at most once in this topic (within the dedup window).
        dedupe_by_id: bool,
    },
    /// Forget idempotent producers idle since before `idle_before_ms`.
    ExpireProducers {
        /// Producers last seen before this time are forgotten.
        idle_before_ms: u64,
    },
    /// Mark offsets acked for a consumer group.
    Ack {
        /// Topic name.
        topic: String,
        /// Consumer group.
        group: String,
        /// `(queue, offset)` pairs.
        offsets: Vec<(u32, u64)>,
    },
    /// Forget deduplication ids stored before `stored_before_ms`, and the oldest beyond
    /// `keep_at_most` (at most a bounded number per command).
    ExpireMessageIds {
        /// Ids stored before this time are forgotten.
        stored_before_ms: u64,
        /// Most ids remembered.
        keep_at_most: u64,
    },
    /// Move messages a group could not process to its dead-letter topic: acked for the
    /// group and appended to `%DLQ%<group>` (created on first use), atomically.
    DeadLetter {
        /// Topic the messages are in.
        topic: String,
        /// Consumer group.
        group: String,
        /// `(queue, offset)` of each message, paired with `records`.
        offsets: Vec<(u32, u64)>,
        /// The dead-letter copies (queue 0), carrying their origin in headers.
        records: Vec<(u32, Message)>,
    },
    /// Bring dead letters back: each origin offset becomes unacked for the group, and
    /// the dead letter is marked redriven (acked by the reserved redrive group).
    Redrive {
        /// Consumer group.
        group: String,
        /// Offsets in the dead-letter topic (queue 0).
        dead_letters: Vec<u64>,
        /// Origin `(topic, queue, offset)` of each dead letter.
        origins: Vec<(String, u32, u64)>,
    },
    /// Store a half message, invisible until committed.
    SendHalf {
        /// Topic, routed queue, group, instance, message.
        half: Box<HalfMessage>,
        /// When the first check-back is due.
        first_check_at_ms: u64,
    },
    /// Commit or roll back a pending transaction (the first decision stands).
    EndTxn {
        /// The transaction.
        txn_id: u64,
        /// `Commit` or `Rollback`.
        commit: bool,
    },
    /// Check-backs were sent: count them and schedule the next ones.
    TxnChecked {
        /// `(transaction, next check at)`.
        checks: Vec<(u64, u64)>,
    },
    /// Transactions out of checks: move them to the abandoned topic, never delivered.
    AbandonTxns {
        /// The transactions.
        txn_ids: Vec<u64>,
    },
    /// Several commands applied in order within one log entry (one request's worth).
    /// Not nested.
    Each(Vec<Command>),
}

impl Command {
    /// Message body bytes the command carries.
    pub fn body_bytes(&self) -> usize {
        match self {
            Command::Append { records, .. } => records.iter().map(|(_, m)| m.body.len()).sum(),
            Command::SendHalf { half, .. } => half.message.body.len(),
            Command::Each(commands) => commands.iter().map(Command::body_bytes).sum(),
            _ => 0,
        }
    }
}

impl Batch {
    /// The message bodies the batch brings, in the order apply numbers them (the
    /// ordinals of [`crate::storage::BodyAt`]): every `Append` record and every
    /// `SendHalf` message, commands in order, the commands of an `Each` in place, a
    /// nested `Each` (refused by apply) contributing nothing.
    pub fn bodies(&self) -> impl Iterator<Item = &[u8]> {
        self.commands
            .iter()
            .flat_map(|command| match command {
                Command::Each(inner) => inner.as_slice(),
                command => std::slice::from_ref(command),
            })
            .flat_map(|command| {
                let (records, half): (&[(u32, Message)], _) = match command {
                    Command::Append { records, .. } => (records, None),
                    Command::SendHalf { half, .. } => (&[], Some(&half.message)),
                    _ => (&[], None),
                };
                records.iter().map(|(_, m)| m).chain(half)
            })
            .map(|message| message.body.as_slice())
    }
}

/// A half message in a `SendHalf` command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HalfMessage {
    /// Topic it goes to when committed.
    pub topic: String,
    /// Queue, routed by the leader.
    pub queue: u32,
    /// Producer group asked on check-back.
    pub producer_group: String,
    /// The sending producer instance.
    pub instance: String,
    /// The message.
    pub message: Message,
}

/// The result of applying one command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Output {
    /// A topic was created.
    TopicCreated(TopicInfo),
    /// Messages were appended at these positions.
    Appended(Vec<Position>),
    /// This many offsets were newly acked.
    Acked(u32),
    /// This many idle producers were forgotten.
    Expired(u32),
    /// The command was refused and changed nothing (deterministically, on every node).
    Rejected(ErrorResponse),
    /// A half message was stored as this transaction.
    HalfStored(u64),
    /// What stands for a transaction.
    TxnEnded(TxnState),
    /// One output per command of an `Each`, in order.
    Each(Vec<Output>),
}
