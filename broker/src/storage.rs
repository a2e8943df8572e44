//! The only module that opens redb tables.
//!
//! Layout (all values start with a format version byte):
//! - `meta`: `&str -> u64` — schema version, last applied log index.
//! - `topics`: topic name -> `TopicRecord`.
//! - `segments`: `(topic id, queue, base offset)` -> a segment: `[version][count u32][stored_at u64][postcard Vec<Record>]`.
//!   One segment holds the messages one commit appended to one queue. A published body
//!   stays in the Raft log entry that brought it (the record says where, [`BodyAt`]): each
//!   node writes it to disk once. Snapshots carry bodies inline.
//! - `group_progress`: `(group, topic id, queue)` -> `QueueProgress`.
//! - `producers`: producer id -> `ProducerState` (idempotent publishing).
//! - `raft_meta`: `&str` -> bytes owned by the Raft adapter (last applied log id, membership).
//! - `message_ids`: `(topic id, message id)` -> `(stored at, queue, offset)`: dedup by message id.
//! - `message_ids_by_time`: `(stored at, topic id, message id)` -> `()`: expiry order of the above.
//! - `txns`: transaction id -> `HalfRecord` (a pending half message, immutable; written by
//!   the first durable commit after it was stored, see `Unflushed`).
//! - `txn_schedule`: transaction id -> `(checks made, next check at)`.
//! - `txn_outcomes`: transaction id -> `TxnState` (decided transactions, the latest million;
//!   written by the first durable commit after the decision).

use crate::state::producers::ProducerState;
use crate::state::progress::QueueProgress;
use escrow_proto::{ErrorCode, ErrorResponse, Message, ProducerSequence};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const TOPICS: TableDefinition<&str, &[u8]> = TableDefinition::new("topics");
const SEGMENTS: TableDefinition<(u32, u32, u64), &[u8]> = TableDefinition::new("segments");
const PROGRESS: TableDefinition<(&str, u32, u32), &[u8]> = TableDefinition::new("group_progress");
const PRODUCERS: TableDefinition<u64, &[u8]> = TableDefinition::new("producers");
const RAFT_META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
const MESSAGE_IDS: TableDefinition<(u32, &str), MessageIdValue> =
    TableDefinition::new("message_ids");
const MESSAGE_IDS_BY_TIME: TableDefinition<(u64, u32, &str), ()> =
    TableDefinition::new("message_ids_by_time");
const TXNS: TableDefinition<u64, &[u8]> = TableDefinition::new("txns");
const TXN_SCHEDULE: TableDefinition<u64, (u32, u64)> = TableDefinition::new("txn_schedule");
const TXN_OUTCOMES: TableDefinition<u64, &[u8]> = TableDefinition::new("txn_outcomes");

/// 2: records may leave their body in the Raft log.
const SCHEMA_VERSION: u64 = 2;
/// redb page cache of the state machine (redb's default, 1 GiB per file, would let
/// three dev nodes in one process grow to gigabytes).
const STATE_CACHE_BYTES: usize = 32 * 1024 * 1024;
const VALUE_VERSION: u8 = 1;
const SEGMENT_HEADER_LEN: usize = 1 + 4 + 8;

const META_SCHEMA: &str = "schema_version";
const META_COMMIT_INDEX: &str = "applied_index";
const META_NEXT_TXN: &str = "next_txn_id";

/// A storage failure: fatal for the write that hit it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// redb failed.
    #[error("redb: {0}")]
    Redb(#[from] redb::Error),
    /// Stored bytes could not be decoded.
    #[error("corrupt {what}: {detail}")]
    Corrupt {
        /// What was being read.
        what: &'static str,
        /// Decoder detail.
        detail: String,
    },
    /// A value could not be encoded for storage (nothing was written).
    #[error("cannot encode {what}: {detail}")]
    Encode {
        /// What was being written.
        what: &'static str,
        /// Encoder detail.
        detail: String,
    },
    /// The data directory was written by an incompatible version.
    #[error(
        "schema version {found} is not supported (expected {SCHEMA_VERSION}): the data \
         directory was written by an incompatible version of escrow; start with an empty one"
    )]
    Schema {
        /// Version found on disk.
        found: u64,
    },
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StorageError {
            fn from(e: $t) -> Self {
                StorageError::Redb(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    std::io::Error
);

impl From<StorageError> for ErrorResponse {
    fn from(e: StorageError) -> Self {
        ErrorResponse::new(ErrorCode::STORAGE_FAILURE, e.to_string())
    }
}

/// A topic as stored.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TopicRecord {
    /// Numeric id, used in segment keys.
    pub id: u32,
    /// Queue count.
    pub queues: u32,
    /// Creation time.
    pub created_at_ms: u64,
}

/// One stored message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The message as published.
    pub message: Message,
    /// Producer id and this message's own sequence.
    pub producer: Option<ProducerSequence>,
    /// Where the body is when it was left in the Raft log (the stored message's body is
    /// then empty). [`Store::read`] returns records with their body in place and this `None`.
    pub body_in_log: Option<BodyAt>,
}

/// A body left in the Raft log: the `ordinal`-th message body the committed entry at
/// `index` brings (`Append` records and `SendHalf` messages in command order, see
/// `Batch::bodies`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BodyAt {
    /// Log index of the entry.
    pub index: u64,
    /// Position among the entry's bodies.
    pub ordinal: u32,
    /// The body's length (checked when it is read back).
    pub len: u32,
}

/// Read access to the Raft log, for bodies stored there.
pub trait LogBodies: Send + Sync + std::fmt::Debug {
    /// The bodies at `ordinals` of the committed entry at `index`, in the order asked.
    fn bodies(&self, index: u64, ordinals: &[u32]) -> Result<Vec<Vec<u8>>, String>;
    /// Returns once the log holds every entry up to `index` durably.
    fn wait_durable(&self, index: u64) -> Result<(), String>;
}

/// A record to store, borrowing its message from the log entry (no copy of the body).
/// It encodes as a [`Record`]; with `body_in_log` set, without the body.
#[derive(Debug)]
pub struct RecordRef<'a> {
    /// The message as published (borrowed from the log entry when it can be).
    pub message: std::borrow::Cow<'a, Message>,
    /// Producer id and this message's own sequence.
    pub producer: Option<ProducerSequence>,
    /// Set when the body stays in the Raft log.
    pub body_in_log: Option<BodyAt>,
}

impl Serialize for RecordRef<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut record = serializer.serialize_struct("Record", 3)?;
        match self.body_in_log {
            Some(_) => record.serialize_field("message", &WithoutBody(&self.message))?,
            None => record.serialize_field("message", &self.message)?,
        }
        record.serialize_field("producer", &self.producer)?;
        record.serialize_field("body_in_log", &self.body_in_log)?;
        record.end()
    }
}

/// Encodes a [`Message`] as if its body were empty (no copy of the rest).
struct WithoutBody<'a>(&'a Message);

impl Serialize for WithoutBody<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let m = self.0;
        let mut out = serializer.serialize_struct("Message", 8)?;
        out.serialize_field("id", &m.id)?;
        out.serialize_field("key", &m.key)?;
        out.serialize_field("message_group", &m.message_group)?;
        out.serialize_field("tags", &m.tags)?;
        out.serialize_field("headers", &m.headers)?;
        out.serialize_field("body", serde_bytes::Bytes::new(&[]))?;
        out.serialize_field("born_at_ms", &m.born_at_ms)?;
        out.serialize_field("deliver_at_ms", &m.deliver_at_ms)?;
        out.end()
    }
}

/// A decoded segment.
#[derive(Debug)]
pub struct Segment {
    /// Offset of the first record.
    pub base_offset: u64,
    /// Commit time of the batch that wrote it.
    pub stored_at_ms: u64,
    /// Records in offset order.
    pub records: Vec<Record>,
}

fn corrupt(what: &'static str, detail: impl ToString) -> StorageError {
    StorageError::Corrupt {
        what,
        detail: detail.to_string(),
    }
}

fn encode_value<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, StorageError> {
    escrow_proto::frame::encode_after(&[VALUE_VERSION], value).map_err(|e| encode_failed(what, e))
}

fn encode_failed(what: &'static str, detail: impl std::fmt::Display) -> StorageError {
    StorageError::Encode {
        what,
        detail: detail.to_string(),
    }
}

fn decode_value<T: for<'de> Deserialize<'de>>(
    what: &'static str,
    bytes: &[u8],
) -> Result<T, StorageError> {
    match bytes.split_first() {
        Some((&VALUE_VERSION, rest)) => postcard::from_bytes(rest).map_err(|e| corrupt(what, e)),
        Some((v, _)) => Err(corrupt(what, format!("unknown value version {v}"))),
        None => Err(corrupt(what, "empty value")),
    }
}

fn segment_count(bytes: &[u8]) -> Result<u32, StorageError> {
    let header = bytes
        .get(..SEGMENT_HEADER_LEN)
        .ok_or_else(|| corrupt("segment", "short header"))?;
    if header[0] != VALUE_VERSION {
        return Err(corrupt("segment", format!("unknown version {}", header[0])));
    }
    let mut count = [0u8; 4];
    count.copy_from_slice(&header[1..5]);
    Ok(u32::from_le_bytes(count))
}

fn decode_segment(base_offset: u64, bytes: &[u8]) -> Result<Segment, StorageError> {
    let count = segment_count(bytes)?;
    let mut at = [0u8; 8];
    at.copy_from_slice(&bytes[5..SEGMENT_HEADER_LEN]);
    let records: Vec<Record> =
        postcard::from_bytes(&bytes[SEGMENT_HEADER_LEN..]).map_err(|e| corrupt("segment", e))?;
    if records.len() != count as usize {
        return Err(corrupt(
            "segment",
            format!("header says {count} records, body has {}", records.len()),
        ));
    }
    Ok(Segment {
        base_offset,
        stored_at_ms: u64::from_le_bytes(at),
        records,
    })
}

/// Most encoded bytes in one segment, unless one record alone is larger. redb gives a
/// value larger than a page a page of its own, rounded up to a power of two (a 20 KB
/// segment would take 32 KB of file and page cache); segments just under 16 KiB fill
/// theirs and smaller ones share pages.
const SEGMENT_MAX_BYTES: usize = 16 * 1024 - 256;

/// An upper bound of a record's encoded size, for cutting segments.
pub trait EncodedSize {
    /// Bytes its encoding takes at most.
    fn encoded_size_bound(&self) -> usize;
}

fn message_size_bound(m: &Message) -> usize {
    // Varint lengths and tags, timestamps and the producer sequence take under 64 bytes.
    m.id.len() + m.body.len() + m.metadata_len() + 64 + 8 * (m.tags.len() + m.headers.len())
}

impl EncodedSize for Record {
    fn encoded_size_bound(&self) -> usize {
        message_size_bound(&self.message)
    }
}

impl EncodedSize for RecordRef<'_> {
    fn encoded_size_bound(&self) -> usize {
        match self.body_in_log {
            // The pointer (up to 21 bytes encoded) instead of the body.
            Some(_) => message_size_bound(&self.message) - self.message.body.len() + 24,
            None => message_size_bound(&self.message),
        }
    }
}

/// Cuts `records` into consecutive runs that each encode within [`SEGMENT_MAX_BYTES`].
fn segment_pieces<R: EncodedSize>(records: &[R]) -> Vec<&[R]> {
    let budget = SEGMENT_MAX_BYTES - SEGMENT_HEADER_LEN - 10;
    let mut pieces = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, record) in records.iter().enumerate() {
        let size = record.encoded_size_bound();
        if i > start && bytes + size > budget {
            pieces.push(&records[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < records.len() {
        pieces.push(&records[start..]);
    }
    pieces
}

fn encode_segment<R: Serialize>(stored_at_ms: u64, records: &[R]) -> Result<Vec<u8>, StorageError> {
    let mut header = [0u8; SEGMENT_HEADER_LEN];
    header[0] = VALUE_VERSION;
    header[1..5].copy_from_slice(&(records.len() as u32).to_le_bytes());
    header[5..].copy_from_slice(&stored_at_ms.to_le_bytes());
    escrow_proto::frame::encode_after(&header, records).map_err(|e| encode_failed("segment", e))
}

/// Everything loaded at startup.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Last applied log index.
    pub commit_index: u64,
    /// `(name, record, next offset per queue)`.
    pub topics: Vec<(String, TopicRecord, Vec<u64>)>,
    /// `(group, topic id, queue, progress)`.
    pub progress: Vec<(String, u32, u32, QueueProgress)>,
    /// Idempotent-producer state.
    pub producers: Vec<(u64, ProducerState)>,
    /// Pending transactions with their check schedule.
    pub txns: Vec<(u64, HalfRecord, (u32, u64))>,
    /// Id the next half message gets.
    pub next_txn_id: u64,
}

/// A pending half message as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HalfRecord {
    /// Topic it goes to when committed.
    pub topic: String,
    /// Queue it goes to (routed when it was sent).
    pub queue: u32,
    /// Producer group asked on check-back.
    pub producer_group: String,
    /// The producer instance that sent it.
    pub instance: String,
    /// The message (without its body while `body_in_log` is set).
    pub message: Message,
    /// When it was stored.
    pub stored_at_ms: u64,
    /// Where the body is in the Raft log, if it was left there ([`Store::read_half`]
    /// returns it filled in).
    pub body_in_log: Option<BodyAt>,
}

/// `(stored at, queue, offset)` of a remembered message id.
type MessageIdValue = (u64, u32, u64);

/// A whole state machine image, for Raft snapshots: every table's raw values.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Image {
    meta: Vec<(String, u64)>,
    topics: Vec<(String, Vec<u8>)>,
    segments: Vec<((u32, u32, u64), Vec<u8>)>,
    progress: Vec<((String, u32, u32), Vec<u8>)>,
    producers: Vec<(u64, Vec<u8>)>,
    raft_meta: Vec<(String, Vec<u8>)>,
    message_ids: Vec<((u32, String), MessageIdValue)>,
    txns: Vec<(u64, Vec<u8>)>,
    txn_schedule: Vec<(u64, (u32, u64))>,
    txn_outcomes: Vec<(u64, Vec<u8>)>,
}

/// Transaction state written since the last durable commit.
///
/// Most transactions are decided within a second, so a half message is kept here
/// instead of in the `txns` table, and a decided one never touches the table; the
/// outcome of a decision waits here for the next durable commit too. A durable commit
/// writes both; until then the Raft log covers them (after a crash the state machine
/// replays the log from its last durable commit).
type Unflushed = Arc<Mutex<UnflushedTxns>>;

#[derive(Debug, Default)]
struct UnflushedTxns {
    /// Half messages with their `(checks made, next check at)`.
    halves: HashMap<u64, (HalfRecord, (u32, u64))>,
    /// Encoded outcomes of decided transactions.
    outcomes: BTreeMap<u64, Vec<u8>>,
}

/// The broker's redb database.
#[derive(Debug)]
pub struct Store {
    db: Database,
    unflushed: Unflushed,
    /// The Raft log, once attached: published bodies are then left there.
    log: std::sync::OnceLock<Arc<dyn LogBodies>>,
}

impl Store {
    /// Opens or creates the database at `path`, creating tables and checking the schema version.
    pub fn open(path: &Path) -> Result<Store, StorageError> {
        let db = Database::builder()
            .set_cache_size(STATE_CACHE_BYTES)
            .create_with_backend(crate::redb_file::CoalescingFile::open(path)?)?;
        let txn = db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let found = meta.get(META_SCHEMA)?.map(|v| v.value());
            match found {
                None => {
                    meta.insert(META_SCHEMA, SCHEMA_VERSION)?;
                }
                Some(SCHEMA_VERSION) => {}
                Some(found) => return Err(StorageError::Schema { found }),
            }
            txn.open_table(TOPICS)?;
            txn.open_table(SEGMENTS)?;
            txn.open_table(PROGRESS)?;
            txn.open_table(PRODUCERS)?;
            txn.open_table(RAFT_META)?;
            txn.open_table(MESSAGE_IDS)?;
            txn.open_table(MESSAGE_IDS_BY_TIME)?;
            txn.open_table(TXNS)?;
            txn.open_table(TXN_SCHEDULE)?;
            txn.open_table(TXN_OUTCOMES)?;
        }
        txn.commit()?;
        Ok(Store {
            db,
            unflushed: Unflushed::default(),
            log: std::sync::OnceLock::new(),
        })
    }

    /// Lets later applies leave published bodies in `log` instead of copying them here.
    /// A store without a log (tests, tools) keeps every body inline.
    pub fn attach_log(&self, log: Arc<dyn LogBodies>) {
        let _ = self.log.set(log);
    }

    /// The attached Raft log.
    pub fn log(&self) -> Option<&Arc<dyn LogBodies>> {
        self.log.get()
    }

    /// Puts every body left in the log back into its record, one log read per entry.
    fn fill_bodies<'r>(
        &self,
        records: impl IntoIterator<Item = &'r mut Record>,
    ) -> Result<(), StorageError> {
        let mut wanted: BTreeMap<u64, Vec<(u32, &'r mut Record)>> = BTreeMap::new();
        for record in records {
            if let Some(at) = record.body_in_log {
                wanted
                    .entry(at.index)
                    .or_default()
                    .push((at.ordinal, record));
            }
        }
        if wanted.is_empty() {
            return Ok(());
        }
        let log = self
            .log
            .get()
            .ok_or_else(|| corrupt("segment", "a body is in the Raft log, but no log is open"))?;
        for (index, records) in wanted {
            let ordinals: Vec<u32> = records.iter().map(|(o, _)| *o).collect();
            let bodies = log
                .bodies(index, &ordinals)
                .map_err(|e| corrupt("message body in the Raft log", e))?;
            if bodies.len() != records.len() {
                return Err(corrupt(
                    "message body in the Raft log",
                    format!(
                        "entry {index}: asked {} bodies, got {}",
                        records.len(),
                        bodies.len()
                    ),
                ));
            }
            for ((_, record), body) in records.into_iter().zip(bodies) {
                let expected = record.body_in_log.map_or(0, |at| at.len as usize);
                if body.len() != expected {
                    return Err(corrupt(
                        "message body in the Raft log",
                        format!(
                            "entry {index}: a body of {} bytes where {expected} were stored",
                            body.len()
                        ),
                    ));
                }
                record.message.body = body;
                record.body_in_log = None;
            }
        }
        Ok(())
    }

    /// Reads topics, queue ends and group progress (as of the last commit; half
    /// messages not yet made durable are not included).
    pub fn load(&self) -> Result<Loaded, StorageError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        let commit_index = meta.get(META_COMMIT_INDEX)?.map_or(0, |v| v.value());
        let topics_table = txn.open_table(TOPICS)?;
        let segments = txn.open_table(SEGMENTS)?;
        let mut topics = Vec::new();
        for entry in topics_table.iter()? {
            let (name, value) = entry?;
            let record: TopicRecord = decode_value("topic", value.value())?;
            let mut ends = Vec::with_capacity(record.queues as usize);
            for queue in 0..record.queues {
                let last = segments
                    .range((record.id, queue, 0)..=(record.id, queue, u64::MAX))?
                    .next_back()
                    .transpose()?;
                let end = match last {
                    Some((key, value)) => key.value().2 + u64::from(segment_count(value.value())?),
                    None => 0,
                };
                ends.push(end);
            }
            topics.push((name.value().to_string(), record, ends));
        }
        let mut progress = Vec::new();
        for entry in txn.open_table(PROGRESS)?.iter()? {
            let (key, value) = entry?;
            let (group, topic_id, queue) = key.value();
            progress.push((
                group.to_string(),
                topic_id,
                queue,
                decode_value("group progress", value.value())?,
            ));
        }
        let mut producers = Vec::new();
        for entry in txn.open_table(PRODUCERS)?.iter()? {
            let (id, value) = entry?;
            producers.push((id.value(), decode_value("producer", value.value())?));
        }
        let schedule = txn.open_table(TXN_SCHEDULE)?;
        let mut txns = Vec::new();
        for entry in txn.open_table(TXNS)?.iter()? {
            let (id, value) = entry?;
            let id = id.value();
            let when = schedule.get(id)?.map_or((0, 0), |v| v.value());
            txns.push((id, decode_value("half message", value.value())?, when));
        }
        Ok(Loaded {
            commit_index,
            topics,
            progress,
            producers,
            txns,
            next_txn_id: meta.get(META_NEXT_TXN)?.map_or(1, |v| v.value()),
        })
    }

    /// A value the Raft adapter stored with [`Writer::put_raft_meta`].
    pub fn raft_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(RAFT_META)?;
        Ok(table.get(key)?.map(|v| v.value().to_vec()))
    }

    /// A point-in-time view for [`Store::export`]; later writes do not change it.
    pub fn freeze(&self) -> Result<Frozen, StorageError> {
        Ok(Frozen(self.db.begin_read()?))
    }

    /// Every table of a frozen view, as one consistent image (a Raft snapshot).
    pub fn export(&self, frozen: Frozen) -> Result<Vec<u8>, StorageError> {
        let txn = frozen.0;
        let mut image = Image::default();
        for e in txn.open_table(META)?.iter()? {
            let (k, v) = e?;
            image.meta.push((k.value().to_string(), v.value()));
        }
        for e in txn.open_table(TOPICS)?.iter()? {
            let (k, v) = e?;
            image
                .topics
                .push((k.value().to_string(), v.value().to_vec()));
        }
        // A snapshot is self-contained: bodies come out of the log into the image, all
        // at once so that each log entry is read once (segments go queue by queue).
        let mut pointing = Vec::new();
        for e in txn.open_table(SEGMENTS)?.iter()? {
            let (k, v) = e?;
            let key = k.value();
            let segment = decode_segment(key.2, v.value())?;
            if segment.records.iter().any(|r| r.body_in_log.is_some()) {
                pointing.push((image.segments.len(), segment));
                image.segments.push((key, Vec::new()));
            } else {
                image.segments.push((key, v.value().to_vec()));
            }
        }
        self.fill_bodies(
            pointing
                .iter_mut()
                .flat_map(|(_, segment)| segment.records.iter_mut()),
        )?;
        for (at, segment) in pointing {
            image.segments[at].1 = encode_segment(segment.stored_at_ms, &segment.records)?;
        }
        for e in txn.open_table(PROGRESS)?.iter()? {
            let (k, v) = e?;
            let (g, t, q) = k.value();
            image
                .progress
                .push(((g.to_string(), t, q), v.value().to_vec()));
        }
        for e in txn.open_table(PRODUCERS)?.iter()? {
            let (k, v) = e?;
            image.producers.push((k.value(), v.value().to_vec()));
        }
        for e in txn.open_table(RAFT_META)?.iter()? {
            let (k, v) = e?;
            image
                .raft_meta
                .push((k.value().to_string(), v.value().to_vec()));
        }
        for e in txn.open_table(MESSAGE_IDS)?.iter()? {
            let (k, v) = e?;
            let (topic, id) = k.value();
            image.message_ids.push(((topic, id.to_string()), v.value()));
        }
        for e in txn.open_table(TXNS)?.iter()? {
            let (k, v) = e?;
            let mut half: HalfRecord = decode_value("half message", v.value())?;
            if half.body_in_log.is_some() {
                self.fill_half_body(&mut half)?;
                image
                    .txns
                    .push((k.value(), encode_value("half message", &half)?));
            } else {
                image.txns.push((k.value(), v.value().to_vec()));
            }
        }
        for e in txn.open_table(TXN_SCHEDULE)?.iter()? {
            let (k, v) = e?;
            image.txn_schedule.push((k.value(), v.value()));
        }
        for e in txn.open_table(TXN_OUTCOMES)?.iter()? {
            let (k, v) = e?;
            image.txn_outcomes.push((k.value(), v.value().to_vec()));
        }
        encode_value("snapshot image", &image)
    }

    /// Replaces every table with an image from [`Store::export`], durably.
    pub fn import(&self, bytes: &[u8]) -> Result<(), StorageError> {
        let image: Image = decode_value("snapshot image", bytes)?;
        *lock_unflushed(&self.unflushed) = UnflushedTxns::default();
        let txn = self.db.begin_write()?;
        txn.delete_table(META)?;
        txn.delete_table(TOPICS)?;
        txn.delete_table(SEGMENTS)?;
        txn.delete_table(PROGRESS)?;
        txn.delete_table(PRODUCERS)?;
        txn.delete_table(RAFT_META)?;
        txn.delete_table(MESSAGE_IDS)?;
        txn.delete_table(MESSAGE_IDS_BY_TIME)?;
        txn.delete_table(TXNS)?;
        txn.delete_table(TXN_SCHEDULE)?;
        txn.delete_table(TXN_OUTCOMES)?;
        {
            let mut t = txn.open_table(META)?;
            for (k, v) in &image.meta {
                t.insert(k.as_str(), *v)?;
            }
            let mut t = txn.open_table(TOPICS)?;
            for (k, v) in &image.topics {
                t.insert(k.as_str(), v.as_slice())?;
            }
            let mut t = txn.open_table(SEGMENTS)?;
            for (k, v) in &image.segments {
                t.insert(*k, v.as_slice())?;
            }
            let mut t = txn.open_table(PROGRESS)?;
            for ((g, topic, q), v) in &image.progress {
                t.insert((g.as_str(), *topic, *q), v.as_slice())?;
            }
            let mut t = txn.open_table(PRODUCERS)?;
            for (k, v) in &image.producers {
                t.insert(*k, v.as_slice())?;
            }
            let mut t = txn.open_table(RAFT_META)?;
            for (k, v) in &image.raft_meta {
                t.insert(k.as_str(), v.as_slice())?;
            }
            let mut ids = txn.open_table(MESSAGE_IDS)?;
            let mut by_time = txn.open_table(MESSAGE_IDS_BY_TIME)?;
            for ((topic, id), stored) in &image.message_ids {
                ids.insert((*topic, id.as_str()), *stored)?;
                by_time.insert((stored.0, *topic, id.as_str()), ())?;
            }
            let mut t = txn.open_table(TXNS)?;
            for (k, v) in &image.txns {
                t.insert(*k, v.as_slice())?;
            }
            let mut t = txn.open_table(TXN_SCHEDULE)?;
            for (k, v) in &image.txn_schedule {
                t.insert(*k, *v)?;
            }
            let mut t = txn.open_table(TXN_OUTCOMES)?;
            for (k, v) in &image.txn_outcomes {
                t.insert(*k, v.as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Starts a durable write (commit = one fsync).
    pub fn begin(&self) -> Result<Writer, StorageError> {
        Ok(Writer {
            txn: self.db.begin_write()?,
            unflushed: self.unflushed.clone(),
        })
    }

    /// A pending half message, with its body.
    pub fn read_half(&self, id: u64) -> Result<Option<HalfRecord>, StorageError> {
        let unflushed = lock_unflushed(&self.unflushed).halves.get(&id).cloned();
        let mut half = match unflushed {
            Some((record, _)) => record,
            None => {
                let txn = self.db.begin_read()?;
                let table = txn.open_table(TXNS)?;
                match table.get(id)? {
                    Some(v) => decode_value("half message", v.value())?,
                    None => return Ok(None),
                }
            }
        };
        self.fill_half_body(&mut half)?;
        Ok(Some(half))
    }

    /// Puts a half message's body back from the log, if it was left there.
    fn fill_half_body(&self, half: &mut HalfRecord) -> Result<(), StorageError> {
        let Some(at) = half.body_in_log else {
            return Ok(());
        };
        let mut record = Record {
            message: std::mem::take(&mut half.message),
            producer: None,
            body_in_log: Some(at),
        };
        self.fill_bodies([&mut record])?;
        half.message = record.message;
        half.body_in_log = None;
        Ok(())
    }

    /// Ids of the outcomes in the `txn_outcomes` table.
    #[cfg(test)]
    pub(crate) fn outcome_ids(&self) -> Result<Vec<u64>, StorageError> {
        let txn = self.db.begin_read()?;
        let mut ids = Vec::new();
        for e in txn.open_table(TXN_OUTCOMES)?.iter()? {
            ids.push(e?.0.value());
        }
        Ok(ids)
    }

    /// Reads the records at `offsets` (ascending) of one queue, with their commit time.
    pub fn read(
        &self,
        topic_id: u32,
        queue: u32,
        offsets: &[u64],
    ) -> Result<Vec<(u64, u64, Record)>, StorageError> {
        let mut out = self.read_without_bodies(topic_id, queue, offsets)?;
        self.fill_bodies(out.iter_mut().map(|(_, _, record)| record))?;
        Ok(out)
    }

    /// As [`Store::read`], but a body left in the Raft log stays there (the record's
    /// body is empty and `body_in_log` says where): for readers of metadata only.
    pub fn read_without_bodies(
        &self,
        topic_id: u32,
        queue: u32,
        offsets: &[u64],
    ) -> Result<Vec<(u64, u64, Record)>, StorageError> {
        let txn = self.db.begin_read()?;
        let segments = txn.open_table(SEGMENTS)?;
        let mut out = Vec::with_capacity(offsets.len());
        let mut current: Option<Segment> = None;
        for &offset in offsets {
            let hit = current.as_ref().is_some_and(|s| {
                offset >= s.base_offset && offset < s.base_offset + s.records.len() as u64
            });
            if !hit {
                let found = segments
                    .range((topic_id, queue, 0)..=(topic_id, queue, offset))?
                    .next_back()
                    .transpose()?;
                current = match found {
                    Some((key, value)) => Some(decode_segment(key.value().2, value.value())?),
                    None => None,
                };
            }
            let segment = current
                .as_mut()
                .ok_or_else(|| corrupt("segment", format!("no segment holds offset {offset}")))?;
            let index = (offset - segment.base_offset) as usize;
            let record = segment.records.get(index).cloned().ok_or_else(|| {
                corrupt("segment", format!("offset {offset} is past its segment"))
            })?;
            out.push((offset, segment.stored_at_ms, record));
        }
        Ok(out)
    }
}

/// Where a deduplicated message was stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoredId {
    /// Commit time of its batch.
    pub stored_at_ms: u64,
    /// Queue.
    pub queue: u32,
    /// Offset.
    pub offset: u64,
}

/// A point-in-time read view of the whole store.
pub struct Frozen(redb::ReadTransaction);

impl std::fmt::Debug for Frozen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Frozen")
    }
}

fn lock_unflushed(unflushed: &Mutex<UnflushedTxns>) -> MutexGuard<'_, UnflushedTxns> {
    unflushed.lock().unwrap_or_else(|e| e.into_inner())
}

/// One write transaction.
pub struct Writer {
    txn: redb::WriteTransaction,
    unflushed: Unflushed,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Writer")
    }
}

impl Writer {
    /// Stores a topic.
    pub fn put_topic(&mut self, name: &str, record: &TopicRecord) -> Result<(), StorageError> {
        self.txn
            .open_table(TOPICS)?
            .insert(name, encode_value("topic", record)?.as_slice())?;
        Ok(())
    }

    /// Stores [`Record`]s (or [`RecordRef`]s, which encode identically) from `base_offset`
    /// on, as one segment or, when they are large, several consecutive ones.
    pub fn put_segment<R: Serialize + EncodedSize>(
        &mut self,
        topic_id: u32,
        queue: u32,
        base_offset: u64,
        stored_at_ms: u64,
        records: &[R],
    ) -> Result<(), StorageError> {
        let mut table = self.txn.open_table(SEGMENTS)?;
        let mut base = base_offset;
        for piece in segment_pieces(records) {
            table.insert(
                (topic_id, queue, base),
                encode_segment(stored_at_ms, piece)?.as_slice(),
            )?;
            base += piece.len() as u64;
        }
        Ok(())
    }

    /// Stores a group's progress in one queue.
    pub fn put_progress(
        &mut self,
        group: &str,
        topic_id: u32,
        queue: u32,
        progress: &QueueProgress,
    ) -> Result<(), StorageError> {
        self.txn.open_table(PROGRESS)?.insert(
            (group, topic_id, queue),
            encode_value("group progress", progress)?.as_slice(),
        )?;
        Ok(())
    }

    /// Stores a producer's state.
    pub fn put_producer(&mut self, id: u64, state: &ProducerState) -> Result<(), StorageError> {
        self.txn
            .open_table(PRODUCERS)?
            .insert(id, encode_value("producer state", state)?.as_slice())?;
        Ok(())
    }

    /// Forgets a producer.
    pub fn remove_producer(&mut self, id: u64) -> Result<(), StorageError> {
        self.txn.open_table(PRODUCERS)?.remove(id)?;
        Ok(())
    }

    /// Where a message with this id was stored, if it is remembered.
    pub fn find_message_id(
        &self,
        topic_id: u32,
        id: &str,
    ) -> Result<Option<StoredId>, StorageError> {
        let table = self.txn.open_table(MESSAGE_IDS)?;
        let found = table.get((topic_id, id))?.map(|v| v.value());
        Ok(found.map(|(stored_at_ms, queue, offset)| StoredId {
            stored_at_ms,
            queue,
            offset,
        }))
    }

    /// Remembers where a message with this id was stored.
    pub fn put_message_id(
        &mut self,
        topic_id: u32,
        id: &str,
        stored: StoredId,
    ) -> Result<(), StorageError> {
        self.txn.open_table(MESSAGE_IDS)?.insert(
            (topic_id, id),
            (stored.stored_at_ms, stored.queue, stored.offset),
        )?;
        self.txn
            .open_table(MESSAGE_IDS_BY_TIME)?
            .insert((stored.stored_at_ms, topic_id, id), ())?;
        Ok(())
    }

    /// Forgets message ids stored before `before_ms`, and the oldest beyond `keep_at_most`,
    /// at most `limit` of them; returns how many were forgotten.
    pub fn expire_message_ids(
        &mut self,
        before_ms: u64,
        keep_at_most: u64,
        limit: usize,
    ) -> Result<u64, StorageError> {
        let mut ids = self.txn.open_table(MESSAGE_IDS)?;
        let mut by_time = self.txn.open_table(MESSAGE_IDS_BY_TIME)?;
        let excess = ids.len()?.saturating_sub(keep_at_most);
        let mut doomed: Vec<(u64, u32, String)> = Vec::new();
        for entry in by_time.iter()? {
            let (key, _) = entry?;
            let (at, topic, id) = key.value();
            if doomed.len() >= limit || (at >= before_ms && doomed.len() as u64 >= excess) {
                break;
            }
            doomed.push((at, topic, id.to_string()));
        }
        for (at, topic, id) in &doomed {
            by_time.remove((*at, *topic, id.as_str()))?;
            ids.remove((*topic, id.as_str()))?;
        }
        Ok(doomed.len() as u64)
    }

    /// Stores a pending half message and its schedule.
    /// Kept in memory until the next durable commit (see [`Unflushed`]).
    pub fn put_half(&mut self, id: u64, record: HalfRecord, schedule: (u32, u64)) {
        lock_unflushed(&self.unflushed)
            .halves
            .insert(id, (record, schedule));
    }

    /// Stores the id the next half message gets.
    pub fn put_next_txn_id(&mut self, next_txn_id: u64) -> Result<(), StorageError> {
        self.txn
            .open_table(META)?
            .insert(META_NEXT_TXN, next_txn_id)?;
        Ok(())
    }

    /// Updates a pending transaction's check schedule.
    pub fn put_txn_schedule(&mut self, id: u64, schedule: (u32, u64)) -> Result<(), StorageError> {
        if let Some((_, pending)) = lock_unflushed(&self.unflushed).halves.get_mut(&id) {
            *pending = schedule;
            return Ok(());
        }
        self.txn.open_table(TXN_SCHEDULE)?.insert(id, schedule)?;
        Ok(())
    }

    /// Removes a pending half message and returns it.
    pub fn take_half(&mut self, id: u64) -> Result<Option<HalfRecord>, StorageError> {
        if let Some((record, _)) = lock_unflushed(&self.unflushed).halves.remove(&id) {
            return Ok(Some(record));
        }
        let record = match self.txn.open_table(TXNS)?.remove(id)? {
            Some(v) => Some(decode_value("half message", v.value())?),
            None => None,
        };
        self.txn.open_table(TXN_SCHEDULE)?.remove(id)?;
        Ok(record)
    }

    /// Writes the half messages still pending in memory and the outcomes decided since
    /// the last durable commit into their tables (they leave memory once the commit
    /// carrying them succeeds).
    fn flush_unflushed(&mut self) -> Result<(), StorageError> {
        let unflushed = lock_unflushed(&self.unflushed);
        if !unflushed.halves.is_empty() {
            let mut txns = self.txn.open_table(TXNS)?;
            let mut schedules = self.txn.open_table(TXN_SCHEDULE)?;
            for (id, (record, schedule)) in unflushed.halves.iter() {
                txns.insert(*id, encode_value("half message", record)?.as_slice())?;
                schedules.insert(*id, *schedule)?;
            }
        }
        if !unflushed.outcomes.is_empty() {
            let mut outcomes = self.txn.open_table(TXN_OUTCOMES)?;
            for (id, outcome) in unflushed.outcomes.iter() {
                outcomes.insert(*id, outcome.as_slice())?;
            }
        }
        Ok(())
    }

    /// Records what stands for transaction `id` (in memory until the next durable
    /// commit, see [`Unflushed`]). Outcomes older than the latest `remembered` are
    /// forgotten in steps (every 1024 ids), keeping each apply cheap.
    pub fn put_txn_outcome<T: Serialize>(
        &mut self,
        id: u64,
        outcome: &T,
        remembered: u64,
    ) -> Result<(), StorageError> {
        let cutoff = id.saturating_sub(remembered);
        let encoded = encode_value("transaction outcome", outcome)?;
        let mut unflushed = lock_unflushed(&self.unflushed);
        unflushed.outcomes.insert(id, encoded);
        if cutoff > 0 && id & 1023 == 0 {
            unflushed.outcomes.retain(|&k, _| k >= cutoff);
            drop(unflushed);
            self.txn
                .open_table(TXN_OUTCOMES)?
                .retain_in(..cutoff, |_, _| false)?;
        }
        Ok(())
    }

    /// What stands for an ended transaction, if remembered.
    pub fn txn_outcome<T: for<'de> Deserialize<'de>>(
        &self,
        id: u64,
    ) -> Result<Option<T>, StorageError> {
        if let Some(outcome) = lock_unflushed(&self.unflushed).outcomes.get(&id) {
            return Ok(Some(decode_value("transaction outcome", outcome)?));
        }
        match self.txn.open_table(TXN_OUTCOMES)?.get(id)? {
            Some(v) => Ok(Some(decode_value("transaction outcome", v.value())?)),
            None => Ok(None),
        }
    }

    /// Stores a value for the Raft adapter.
    pub fn put_raft_meta(&mut self, key: &str, value: &[u8]) -> Result<(), StorageError> {
        self.txn.open_table(RAFT_META)?.insert(key, value)?;
        Ok(())
    }

    /// Records the last applied index and commits; `durable` waits for the fsync.
    ///
    /// Under Raft the log is the durable record, so applies may skip the fsync; the
    /// state machine is made durable before any log it depends on is purged.
    pub fn commit(mut self, applied_index: u64, durable: bool) -> Result<(), StorageError> {
        self.txn
            .open_table(META)?
            .insert(META_COMMIT_INDEX, applied_index)?;
        if durable {
            self.flush_unflushed()?;
        } else {
            self.txn
                .set_durability(redb::Durability::None)
                .map_err(|e| corrupt("durability", e))?;
        }
        self.txn.commit()?;
        if durable {
            *lock_unflushed(&self.unflushed) = UnflushedTxns::default();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `count` records with ids m0, m1, ... and bodies of `body_len` bytes.
    fn records(count: usize, body_len: usize) -> Vec<Record> {
        (0..count)
            .map(|i| Record {
                message: Message::new(format!("m{i}"), vec![i as u8; body_len]),
                producer: None,
                body_in_log: None,
            })
            .collect()
    }

    #[test]
    fn segments_round_trip_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let records = records(5, 10);
        {
            let store = Store::open(&path).unwrap();
            let mut w = store.begin().unwrap();
            w.put_topic(
                "t",
                &TopicRecord {
                    id: 1,
                    queues: 2,
                    created_at_ms: 7,
                },
            )
            .unwrap();
            w.put_segment(1, 1, 0, 100, &records[..3]).unwrap();
            w.put_segment(1, 1, 3, 200, &records[3..]).unwrap();
            w.commit(1, true).unwrap();
        }
        let store = Store::open(&path).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.commit_index, 1);
        assert_eq!(loaded.topics.len(), 1);
        assert_eq!(loaded.topics[0].2, vec![0, 5]);
        let got = store.read(1, 1, &[1, 2, 3, 4]).unwrap();
        assert_eq!(got.len(), 4);
        assert_eq!(got[0].2, records[1]);
        assert_eq!(got[2].1, 200);
        assert!(store.read(1, 0, &[0]).is_err(), "no segment is an error");
    }

    #[test]
    fn large_batches_are_cut_into_segments_that_fit_a_page() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let records = records(70, 1024);
        let store = Store::open(&path).unwrap();
        let mut w = store.begin().unwrap();
        w.put_segment(1, 0, 0, 100, &records[..1]).unwrap();
        w.put_segment(1, 0, 1, 200, &records[1..]).unwrap();
        w.commit(1, true).unwrap();

        let txn = store.db.begin_read().unwrap();
        let table = txn.open_table(SEGMENTS).unwrap();
        let sizes: Vec<(u64, usize)> = table
            .iter()
            .unwrap()
            .map(|e| {
                let (k, v) = e.unwrap();
                (k.value().2, v.value().len())
            })
            .collect();
        assert!(
            sizes.len() >= 6,
            "69 KiB of records in 16 KiB segments: {sizes:?}"
        );
        assert!(
            sizes.iter().all(|&(_, len)| len <= SEGMENT_MAX_BYTES),
            "{sizes:?}"
        );
        let offsets: Vec<u64> = (0..70).collect();
        let got = store.read(1, 0, &offsets).unwrap();
        assert_eq!(got.len(), 70);
        for (offset, at, record) in &got {
            assert_eq!(record, &records[*offset as usize]);
            assert_eq!(*at, if *offset == 0 { 100 } else { 200 });
        }
        drop((table, txn));
        let one_large = [Record {
            message: Message::new("big", vec![7; 40_000]),
            producer: None,
            body_in_log: None,
        }];
        let mut w = store.begin().unwrap();
        w.put_segment(1, 0, 70, 300, &one_large).unwrap();
        w.commit(2, true).unwrap();
        assert_eq!(store.read(1, 0, &[70]).unwrap()[0].2, one_large[0]);
    }

    #[test]
    fn a_record_ref_encodes_as_a_record_with_or_without_its_body() {
        let mut message = Message::new("m1", vec![5; 300]);
        message.key = Some("k".into());
        message.message_group = Some("g".into());
        message.tags = vec!["t1".into(), "t2".into()];
        message.headers.insert("h".into(), "v".into());
        message.born_at_ms = 1_700_000_000_000;
        message.deliver_at_ms = Some(1_700_000_000_500);
        let producer = Some(ProducerSequence {
            producer_id: 9,
            first_sequence: 4,
        });
        let whole = RecordRef {
            message: std::borrow::Cow::Borrowed(&message),
            producer,
            body_in_log: None,
        };
        let decoded: Record =
            postcard::from_bytes(&postcard::to_allocvec(&whole).unwrap()).unwrap();
        assert_eq!(decoded.message, message);
        assert_eq!(decoded.body_in_log, None);
        let at = BodyAt {
            index: 77,
            ordinal: 3,
            len: 300,
        };
        let bodyless = RecordRef {
            body_in_log: Some(at),
            ..whole
        };
        let bytes = postcard::to_allocvec(&bodyless).unwrap();
        let decoded: Record = postcard::from_bytes(&bytes).unwrap();
        let expected = Message {
            body: Vec::new(),
            ..message.clone()
        };
        assert_eq!(decoded.message, expected, "every field but the body");
        assert_eq!(decoded.producer, producer);
        assert_eq!(decoded.body_in_log, Some(at));
        assert!(bytes.len() < 100, "no body bytes: {}", bytes.len());
        assert!(bodyless.encoded_size_bound() >= bytes.len());
    }

    #[test]
    fn a_state_file_of_schema_version_1_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            // Written before bodies moved to the log: records would be misread.
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META)
                .unwrap()
                .insert(META_SCHEMA, 1)
                .unwrap();
            txn.commit().unwrap();
        }
        match Store::open(&path) {
            Err(StorageError::Schema { found: 1 }) => {}
            other => panic!("expected a schema error, got {other:?}"),
        }
    }

    #[test]
    fn a_body_in_the_log_without_a_log_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.redb")).unwrap();
        let message = Message::new("m0", vec![1; 10]);
        let records = [RecordRef {
            message: std::borrow::Cow::Borrowed(&message),
            producer: None,
            body_in_log: Some(BodyAt {
                index: 5,
                ordinal: 0,
                len: 10,
            }),
        }];
        let mut w = store.begin().unwrap();
        w.put_segment(1, 0, 0, 100, &records).unwrap();
        w.commit(5, true).unwrap();
        let err = store.read(1, 0, &[0]).unwrap_err();
        assert!(err.to_string().contains("Raft log"), "{err}");
    }

    #[test]
    fn corrupt_values_are_errors() {
        assert!(decode_segment(0, &[]).is_err());
        assert!(decode_segment(0, &[9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
        assert!(decode_segment(0, &[1, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
        assert!(decode_value::<TopicRecord>("topic", &[1, 0xff]).is_err());
    }

    /// A value the encoder refuses is an error naming it, not an empty value on disk.
    #[test]
    fn values_that_cannot_be_encoded_are_refused() {
        struct Refused;
        impl Serialize for Refused {
            fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
                Err(serde::ser::Error::custom("refused"))
            }
        }
        match encode_value("probe", &Refused) {
            Err(StorageError::Encode { what, detail }) => {
                assert_eq!(what, "probe");
                assert!(!detail.is_empty());
            }
            other => panic!("expected an encode error, got {other:?}"),
        }
        assert!(matches!(
            encode_segment(0, &[Refused]),
            Err(StorageError::Encode {
                what: "segment",
                ..
            })
        ));
    }
}
