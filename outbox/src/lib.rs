//! Escrow outbox and inbox: local message tables (eBay's pattern, Pritchett's
//! *BASE: An ACID Alternative*) with a relay that publishes pending rows to the broker.
//!
//! - **Outbox**: the application writes its message with [`pg::PgOutbox::enqueue`] (inside its
//!   own PostgreSQL transaction) or [`redb_store::RedbOutbox::enqueue`] (inside its own redb
//!   write transaction), in the same transaction as its business data. A message exists if
//!   and only if that transaction committed.
//! - **Relay** ([`relay::Relay`], in-process, or the `escrow-relay` sidecar for PostgreSQL):
//!   claims pending rows, publishes them with their stable ids (`<prefix>-<row id>`) through a
//!   producer with `dedupe_by_id`, so a re-sent row is stored once (G5), and marks them sent.
//!   Rows of one key are published in the order the application wrote them.
//! - **Inbox** ([`pg::PgInbox`], [`redb_store::RedbInbox`]): runs a consumer's effect and
//!   records the message id in the same local transaction; a duplicate delivery is skipped (G6).
//!
//! ```no_run
//! use escrow_client::{ClientConfig, Trust};
//! use escrow_outbox::pg::{PgConfig, PgOutbox};
//! use escrow_outbox::relay::{Relay, RelayConfig};
//! use escrow_outbox::NewMessage;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let url = "postgresql://postgres@127.0.0.1/test";
//! let outbox = PgOutbox::new(url, PgConfig::default())?;
//! let (mut client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
//! tokio::spawn(connection);
//! outbox.migrate(&client).await?;
//!
//! let tx = client.transaction().await?;
//! tx.execute("INSERT INTO orders (id, total) VALUES ($1, $2)", &[&7i64, &1250i64]).await?;
//! outbox
//!     .enqueue(&tx, &NewMessage::new("orders", b"{\"order\":7}".to_vec()).key("customer-42"))
//!     .await?;
//! tx.commit().await?;
//!
//! let broker = ClientConfig::new("127.0.0.1:7440", Trust::CaFile("ca.pem".into()));
//! let relay = Relay::connect(outbox, broker, RelayConfig::default()).await?;
//! relay.run(tokio::signal::ctrl_c()).await?;
//! # Ok(()) }
//! ```

pub mod core;
pub mod pg;
pub mod redb_store;
pub mod relay;

use std::collections::BTreeMap;
use std::time::Duration;

/// Why an outbox, inbox or relay operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutboxError {
    /// PostgreSQL refused a statement or the connection failed.
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// redb failed (storage, transaction or table error).
    #[error("redb: {0}")]
    Redb(#[from] redb::Error),
    /// A stored row could not be decoded (the file holds data this version cannot read).
    #[error("corrupt outbox row {id}: {reason}")]
    Corrupt {
        /// The row id.
        id: u64,
        /// What was wrong.
        reason: String,
    },
    /// A setting or argument is not acceptable (table name, message).
    #[error("invalid: {0}")]
    Invalid(String),
    /// The relay could not connect its producer.
    #[error("producer: {0}")]
    Producer(#[from] escrow_producer::ProducerError),
}

impl OutboxError {
    pub(crate) fn redb(e: impl Into<redb::Error>) -> OutboxError {
        OutboxError::Redb(e.into())
    }
}

/// A message to put into the outbox.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NewMessage {
    /// Topic to publish to.
    pub topic: String,
    /// Aggregate key: rows of one key are published in the order they were written, and
    /// the broker routes them to one queue.
    pub key: Option<String>,
    /// Application headers.
    pub headers: BTreeMap<String, String>,
    /// The payload.
    pub body: Vec<u8>,
}

impl NewMessage {
    /// A message for `topic` with a body and no key.
    pub fn new(topic: impl Into<String>, body: impl Into<Vec<u8>>) -> NewMessage {
        NewMessage {
            topic: topic.into(),
            body: body.into(),
            ..NewMessage::default()
        }
    }

    /// Sets the aggregate key.
    pub fn key(mut self, key: impl Into<String>) -> NewMessage {
        self.key = Some(key.into());
        self
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> NewMessage {
        self.headers.insert(name.into(), value.into());
        self
    }
}

/// A pending row as the relay claims it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxRow {
    /// Row id: increasing in write order (per key, when the application serializes
    /// writes of a key, which any aggregate with a version does).
    pub id: u64,
    /// The message id the broker deduplicates by: `<prefix>-<id>`.
    pub message_id: String,
    /// Topic.
    pub topic: String,
    /// Aggregate key.
    pub key: Option<String>,
    /// Application headers.
    pub headers: BTreeMap<String, String>,
    /// The payload.
    pub body: Vec<u8>,
    /// Failed attempts so far.
    pub attempts: u32,
    /// When the row was written (milliseconds since the Unix epoch).
    pub created_at_ms: u64,
}

/// Where a row is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowState {
    /// Waiting to be published (possibly until its next attempt).
    Pending,
    /// Published and acknowledged by the broker; deleted by the cleaner after the retention.
    Sent,
    /// Failed too often; kept with its last error until an operator retries or deletes it.
    Parked,
}

impl RowState {
    /// The name stored in PostgreSQL's `state` column.
    pub fn as_str(self) -> &'static str {
        match self {
            RowState::Pending => "pending",
            RowState::Sent => "sent",
            RowState::Parked => "parked",
        }
    }
}

/// A row that failed permanently in one relay round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowFailure {
    /// Row id.
    pub id: u64,
    /// Attempts including this one.
    pub attempts: u32,
    /// What the broker said.
    pub error: String,
    /// Retry after this delay, or park when `None`.
    pub retry_in: Option<Duration>,
}

/// A parked row, as status reports show it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ParkedRow {
    /// Row id.
    pub id: u64,
    /// Topic.
    pub topic: String,
    /// Aggregate key.
    pub key: Option<String>,
    /// Attempts made.
    pub attempts: u32,
    /// The last error.
    pub last_error: String,
}

/// What an outbox table holds now: the relay's backlog, lag and parked rows.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct OutboxStatus {
    /// Rows waiting to be published (the backlog).
    pub pending: u64,
    /// Rows given up on.
    pub parked: u64,
    /// Sent rows not yet deleted by the cleaner.
    pub sent_retained: u64,
    /// Rows marked sent within the last minute (the publish rate, per minute).
    pub sent_last_minute: u64,
    /// Age of the oldest pending row in milliseconds (the relay lag); 0 when none is pending.
    pub lag_ms: u64,
    /// Up to ten parked rows, oldest first.
    pub parked_rows: Vec<ParkedRow>,
}

/// What an inbox's `process` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Processed<T> {
    /// The effect ran and committed with the message id.
    Applied(T),
    /// The id was recorded already: the effect did not run.
    Duplicate,
}

/// Why an inbox's `process` failed; nothing was committed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InboxError<E> {
    /// The effect returned an error.
    #[error("effect failed: {0}")]
    Effect(E),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] OutboxError),
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    escrow_client::now_ms()
}
